"""`fab queues`: waiting and unacknowledged messages per queue, the workers that consume them."""

import json
import time

from invoke import task

from deploy_kit import queues as lib
from deploy_kit import ui
from deploy_kit.errors import UsageError
from deploy_kit.session import Session

from ._stage import STAGE_HELP, load_stage

INTERVAL = 2.0


@task(help={"stage": STAGE_HELP, "json": "print one JSON object: {queues: [...], workers: [...]}",
            "watch": "refresh every 2 s until Ctrl-C; a depth that keeps growing stands out",
            "restore": "return to their queues the messages a dead worker held, and say how many"})
def queues(c, stage=None, json=False, watch=False, restore=False):
    """Per queue: waiting, unacked (and the oldest's age), consumers; per worker: active, reserved."""
    console = ui.make_console()
    with ui.user_errors():
        if watch and (json or restore):
            raise UsageError("--watch shows a live table: use it without --json and --restore")
        chosen = load_stage(stage)
        host = lib.reporter(chosen)
        requests = [{"op": "restore_stranded", "queues": lib.queue_names(chosen)}] if restore else []
        with Session(chosen, [host]) as session:
            remote = session.remote(host.name)
            answers = lib.ask(remote, chosen, [*requests, lib.report_request(chosen)])
            report = lib.parse(answers[-1])
            if json:
                print(_dumps(report))  # exactly one object, plain, whatever the terminal
                return
            if restore:
                console.print(f"{host.name}: {answers[0]}", markup=False)
            samples = [report]
            show(console, chosen, report, samples, host.name)
            try:
                while watch:
                    time.sleep(INTERVAL)
                    samples = [*samples[-10:], lib.parse(lib.ask(remote, chosen, [lib.report_request(chosen)])[-1])]
                    if console.is_terminal:
                        console.clear()
                    show(console, chosen, samples[-1], samples, host.name)
            except KeyboardInterrupt:
                return


def _dumps(report: lib.Report) -> str:
    return json.dumps(lib.to_json(report))


def stranded(report: lib.Report, row: lib.QueueRow) -> object:
    if report.broker == "amqp":
        return "none (RabbitMQ)"  # it puts back what a closed connection held: see `fab queues --restore`
    return "?" if row.stranded is None else row.stranded


def show(console, stage, report: lib.Report, samples: list, host: str) -> None:
    rows = [(q.name, q.waiting, "-" if q.unacked is None else q.unacked, lib.age(q.oldest_unacked_s),
             stranded(report, q), ", ".join(q.consumers) or "NONE") for q in report.queues]
    console.print(ui.table(f"queues of stage {stage.name} (read on {host} at {time.strftime('%H:%M:%S')})",
                           ("queue", "waiting", "unacked", "oldest unacked", "stranded", "consumers"), rows))
    console.print(ui.table("workers", ("node", "host", "release", "active", "reserved", "processed"),
                           [(w.node, w.host, w.release or "-", w.active, w.reserved,
                             "-" if w.processed is None else w.processed) for w in report.workers]))
    for problem in [*lib.problems(stage, report), *lib.growing(samples)]:
        console.print(f"PROBLEM: {problem}", markup=False, style="bold red")
