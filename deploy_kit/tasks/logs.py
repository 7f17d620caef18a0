"""The workers' journals from every host, merged into one live stream."""

import sys

from invoke import task

from deploy_kit import journal, ui
from deploy_kit.errors import HostError, UsageError

from ._stage import STAGE_HELP, count, load_stage


@task(iterable=["service", "host"], help={
    "stage": STAGE_HELP,
    "service": "a worker service name, or 'beat' (repeatable; default: all)",
    "host": "a host name (repeatable; default: all)",
    "since": "what journalctl --since takes: '10 min ago', '2026-11-24 12:00'",
    "n": "the last N lines per host",
    "grep": "only lines matching this pattern (matched on the hosts)",
    "follow": "keep streaming new lines (default); --no-follow prints and ends (exit 7: a host not listed whole)",
    "json": "one JSON object per line: host, unit, timestamp, priority, message",
})
def logs(c, stage=None, service=None, host=None, since=None, n=None, grep=None, follow=True, json=False):
    """Stream the Celery units' journals of every host, merged, with hints on classic failures."""
    console = ui.make_console()
    with ui.user_errors():
        chosen = load_stage(stage)
        services = list(service or [])
        journal.check_services(chosen, services)
        hosts = [chosen.host(name) for name in host] if host else list(chosen.hosts)
        lines = None if n is None else count("-n", n, "lines")
        streams, items = journal.stream(chosen, hosts=hosts, services=services, since=since, lines=lines,
                                        grep=grep, follow=follow)
        if not streams:
            raise UsageError("no host of the stage runs the chosen services")
        colours = ui.host_colours([h.name for h in chosen.hosts])
        if not follow:  # a finished listing reads best in time order across hosts
            items = iter(sorted(items, key=lambda i: (0, i.timestamp) if isinstance(i, journal.JournalLine)
                                else (1, 0)))
        fatal = []
        try:
            for item in items:
                if isinstance(item, journal.HostEvent) and item.fatal:
                    fatal.append(f"{item.host}: {item.message}")  # reported once, at the end
                    continue
                if json:
                    if isinstance(item, journal.JournalLine):
                        print(item.as_json(), flush=True)
                    else:
                        print(f"{item.host}: {item.message}", file=sys.stderr, flush=True)
                else:
                    ui.print_journal_item(console, item, colours)
        except KeyboardInterrupt:
            pass
        finally:
            for stream in streams:
                stream.stop()
            for stream in streams:
                stream.join(timeout=5)
        if fatal:
            raise HostError("logs", "; ".join(fatal))
