"""No secret anywhere: a full deploy, rollback, `fab logs`, `fab status`, `fab check`, `--plan`,
the hosts' history and state files, the journal lines deploy-kit prints, and the command lines
visible in the hosts' process list while the deploy runs are grepped for every secret value."""

import contextlib
import json
import threading
from collections import Counter

from deploy_kit import units
from deploy_kit.sandbox import Sandbox

from .conftest import TEST_SANDBOX, fab, in_container, on_host

# A value with the characters that break naive quoting and masking.
TOKEN = "s3cr3t-Tok en'\"$HOME;#=%x`id`"


def forms(secret: str) -> set[str]:
    """The secret and its parts a careless printer might show (4 characters or more)."""
    return {secret} | {part for part in secret.replace("'", " ").replace('"', " ").split() if len(part) >= 8}


class ProcessList:
    """Every command line of both hosts, sampled while something runs."""

    def __init__(self, machines):
        self.machines, self.seen, self.samples, self.stop = machines, set(), Counter(), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.is_set():
            for machine in self.machines:
                with contextlib.suppress(Exception):  # a sample lost while a host is busy is no finding
                    self.seen.update(in_container(machine, "ps -eo args --no-headers").splitlines())
                    self.samples[machine] += 1
            self.stop.wait(0.3)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=10)


def test_no_secret_in_any_output_file_journal_or_process_list(deployed, sandbox_config):
    box = Sandbox(TEST_SANDBOX)
    password = box.redis_password_file.read_text().strip()
    fab("env.set", "PAYMENT_API_TOKEN", "--stage", TEST_SANDBOX, config_file=sandbox_config, check=True,
        stdin=TOKEN + "\n")
    secrets = forms(TOKEN) | forms(password)
    outputs = []
    try:
        for args in (("deploy", "--plan"), ("check",), ("env.show",)):
            outputs.append(fab(*args, "--stage", TEST_SANDBOX, config_file=sandbox_config, check=True))
        with ProcessList([h.name for h in deployed.hosts]) as processes:
            outputs.append(fab("deploy", "--stage", TEST_SANDBOX, config_file=sandbox_config, check=True,
                               timeout=900))
            outputs.append(fab("rollback", "--stage", TEST_SANDBOX, config_file=sandbox_config, check=True,
                               timeout=900))
        for args in (("logs", "--no-follow", "-n", "300"), ("status",), ("releases",), ("deploy", "--plan")):
            outputs.append(fab(*args, "--stage", TEST_SANDBOX, config_file=sandbox_config, check=True))
        files = "".join(on_host(deployed, i, "cat /srv/exampleapp/.deploy-kit/history.jsonl "
                                             "/srv/exampleapp/.deploy-kit/cutover.json "
                                             "/srv/exampleapp/.deploy-kit/live.jsonl") for i in (0, 1))
        # The value did reach the service's environment: deploy-kit hid it, it did not lose it.
        assert "PAYMENT_API_TOKEN=" in on_host(deployed, 0, f"cat {deployed.app.env_file}")
    finally:
        fab("env.unset", "PAYMENT_API_TOKEN", "--stage", TEST_SANDBOX, config_file=sandbox_config, check=True)
    # The sampler did watch the deploy: many samples of each host, and it caught the cutover's own program. (How
    # many distinct command lines it sees depends on the deploy's speed: no finding.)
    assert all(processes.samples[h.name] >= 10 for h in deployed.hosts), processes.samples
    assert any("cutover-run.py" in line for line in processes.seen)
    places = {f"fab {' '.join(p.args[1:3])}": p.stdout + p.stderr for p in outputs}
    places.update({"files on the hosts": files, "process list": "\n".join(processes.seen)})
    for where, text in places.items():
        for secret in secrets:
            assert secret not in text, f"a secret appears in {where}"


HOSTILE_VALUES = {
    "DK_SPACES": "two  words and a tab\there",
    "DK_QUOTES": "it's \"quoted\" 'twice'",
    "DK_HASH": "#not-a-comment # nor this",
    "DK_EQUALS": "a=b==c",
    "DK_DOLLAR": "$HOME ${PATH} $(id) `id`",
    "DK_BACKSLASH": "C:\\path\\n\\t\\\\",
    "DK_PERCENT": "100% %i %h %%",
    "DK_EMPTY": "",
}


def test_env_values_reach_the_service_unchanged_and_every_reader_agrees(deployed, sandbox_config):
    """`fab env.set` of values with spaces, quotes, #, =, $, backslashes and systemd's % reach the
    service byte for byte; `fab env.show --reveal` shows the same; `fab check` sees every key."""
    for key, value in HOSTILE_VALUES.items():
        fab("env.set", key, "--stage", TEST_SANDBOX, config_file=sandbox_config, check=True, stdin=value + "\n")
    try:
        code = ("import json, os\nprint(json.dumps({k: os.environ.get(k) for k in "
                f"{sorted(HOSTILE_VALUES)!r}}}))\n")
        command = units.as_service_command(deployed, str(deployed.app.current_link),
                                           [str(units.python(deployed.app)), "-c", code])
        for index in (0, 1):
            seen = json.loads(on_host(deployed, index, command + "\n").strip().splitlines()[-1])
            assert seen == HOSTILE_VALUES
        shown = fab("env.show", "--stage", TEST_SANDBOX, config_file=sandbox_config, check=True).stdout
        assert all(key in shown for key in HOSTILE_VALUES)
        assert fab("check", "--stage", TEST_SANDBOX, config_file=sandbox_config).returncode == 0
    finally:
        for key in HOSTILE_VALUES:
            fab("env.unset", key, "--stage", TEST_SANDBOX, config_file=sandbox_config, check=True)


def test_services_never_run_as_root_and_nothing_they_run_is_theirs_to_write(deployed, sandbox_config):
    fab("env.set", "DK_PERMS=1", "--stage", TEST_SANDBOX, config_file=sandbox_config, check=True)
    fab("env.unset", "DK_PERMS", "--stage", TEST_SANDBOX, config_file=sandbox_config, check=True)
    app = deployed.app
    for index in (0, 1):
        script = (f"echo env $(stat -c '%a %U:%G' {app.env_file})\n"
                  "for pid in $(systemctl show -p MainPID --value 'exampleapp-worker-*' exampleapp-beat.service); do\n"
                  "  [ \"$pid\" = 0 ] || echo user $(ps -o user= -p \"$pid\")\ndone\n"
                  f"runuser -u {app.user} -- sh -c 'touch {app.current_link}/x 2>/dev/null && echo code writable "
                  f"|| echo code read-only'\n")
        lines = on_host(deployed, index, script).splitlines()
        assert f"env 640 root:{app.group}" in lines
        users = {line.split()[1] for line in lines if line.startswith("user ")}
        assert users == {app.user}  # every worker (and Beat) process runs as the service account
        assert "code read-only" in lines
