"""One SSH connection per host for a whole task: opened together, reused by every phase, closed once."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import TypeVar

from deploy_kit import parallel
from deploy_kit.config import Host, Stage
from deploy_kit.errors import DeployKitError, HostsFailed
from deploy_kit.ssh import RemoteHost, connect

Result = TypeVar("Result")


class Session:
    """The open connections to a stage's hosts.

    With `require_all` (the default) a host that cannot be reached fails the whole task
    before anything runs; without it, unreachable hosts are kept in `unreachable` so a
    report (like `fab check`) can show them next to the others.
    """

    def __init__(self, stage: Stage, hosts: list[Host] | None = None, *, require_all: bool = True):
        self.stage = stage
        self.hosts = list(hosts if hosts is not None else stage.hosts)
        self.require_all = require_all
        self._reconnecting = threading.Lock()
        self.remotes: dict[str, RemoteHost] = {}
        self.unreachable: dict[str, DeployKitError] = {}

    def __enter__(self) -> Session:
        def open_one(host: Host) -> RemoteHost | DeployKitError:
            try:
                return connect(host, self.stage.ssh)
            except DeployKitError as exc:
                return exc

        opened = parallel.each(self.hosts, open_one, name=lambda h: h.name, what="connecting",
                               limit=self.stage.parallel)
        for name, outcome in opened.items():
            if isinstance(outcome, DeployKitError):
                self.unreachable[name] = outcome
            else:
                self.remotes[name] = outcome
        if self.unreachable and self.require_all:
            self.close()
            if len(self.hosts) == 1:
                raise next(iter(self.unreachable.values()))
            raise HostsFailed("connecting", self.unreachable, list(self.remotes))
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        for remote in self.remotes.values():
            remote.close()
        self.remotes.clear()

    def remote(self, name: str) -> RemoteHost:
        return self.remotes[name]

    def reconnect(self, name: str, *, only_if_dead: bool = False) -> None:
        """Replace a dropped connection; keeps the old one when the host is still unreachable. One
        at a time (the queue summary reads alongside Beat): a connection just made is never closed."""
        host = next(h for h in self.hosts if h.name == name)
        with self._reconnecting:
            old = self.remotes.get(name)
            if only_if_dead and old is not None and old.connection.transport is not None \
                    and old.connection.transport.is_active():
                return
            try:
                fresh = connect(host, self.stage.ssh)
            except DeployKitError:
                return
            self.remotes[name] = fresh
            if old is not None:
                old.close()

    def revive(self, names: Iterable[str]) -> None:
        """Reconnect the hosts whose connection died (no round trip for the live ones)."""
        for name in names:
            remote = self.remotes.get(name)
            transport = remote.connection.transport if remote is not None else None
            if transport is None or not transport.is_active():
                self.reconnect(name, only_if_dead=True)

    def each(self, work: Callable[[RemoteHost], Result], *, what: str,
             only: Iterable[str] | None = None, all_at_once: bool = False) -> dict[str, Result]:
        """`work(remote)` on every reachable host (or those of `only`) in parallel, at most
        `parallel` at a time unless `all_at_once`; the one host's error, or HostsFailed naming
        each, if any failed."""
        chosen = set(only) if only is not None else {h.name for h in self.hosts}
        reachable = [self.remotes[h.name] for h in self.hosts if h.name in self.remotes and h.name in chosen]
        return parallel.each(reachable, work, name=lambda r: r.name, what=what,
                             limit=max(len(reachable), 1) if all_at_once else self.stage.parallel)
