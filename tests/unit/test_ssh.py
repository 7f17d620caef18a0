"""The TCP socket under every SSH connection: a silent host is given up within a bound."""

import socket

from deploy_kit import ssh
from deploy_kit.config import Host


def test_every_connection_gives_up_a_host_that_stops_answering():
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        sock = ssh._tcp_connect(Host("web1", "127.0.0.1", port), timeout=5)
        try:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == ssh.DEAD_AFTER * 1000
            idle = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)
            probes = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)
            interval = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL)
            assert idle + probes * interval <= 60  # an idle link is given up within a minute
        finally:
            sock.close()
