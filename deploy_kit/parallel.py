"""Run one function per host in parallel, with a bound, and collect every host's outcome.

Like Fabric's GroupResult/GroupException: each host yields a result or an error;
when any host failed, one HostsFailed lists every host's outcome.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from deploy_kit.errors import DeployKitError, HostsFailed

Item = TypeVar("Item")
Result = TypeVar("Result")


def each(items: Iterable[Item], work: Callable[[Item], Result], *, name: Callable[[Item], str],
         what: str, limit: int = 10) -> dict[str, Result]:
    """`work(item)` for every item, at most `limit` at once; results keyed by `name(item)`.

    Raises HostsFailed naming each failed item when any failed; an unexpected
    exception (a bug) is re-raised as it is so its traceback is not lost.
    """
    items = list(items)
    if not items:
        return {}
    results: dict[str, Result] = {}
    failures: dict[str, BaseException] = {}
    pool = ThreadPoolExecutor(max_workers=max(1, min(limit, len(items))))
    try:
        futures = {name(item): pool.submit(work, item) for item in items}
        for key, future in futures.items():
            try:
                results[key] = future.result()
            except DeployKitError as exc:
                failures[key] = exc
    except BaseException:  # Ctrl-C (or a bug): leave now; the caller closes the connections the work uses
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    if failures:
        if len(items) == 1:
            raise next(iter(failures.values()))
        raise HostsFailed(what, failures, [k for k in futures if k in results])
    return results
