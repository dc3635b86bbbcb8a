"""`python -m muser.run --workers N`: the devices spread over N processes, so that a
machine's cores all serve. A device's sessions are one loop's work, and one loop
is one core's, so devices are the unit: device i goes to worker i mod N, and each
worker builds, serves and closes its own as a single process would. The parent
only forks, passes SIGTERM and SIGINT on, and waits.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable, Sequence

WORKER_EXIT_FAILED = 1


def shares(count: int, workers: int) -> list[list[int]]:
    """Which of `count` devices each worker serves: round robin, no worker empty."""
    workers = max(1, min(workers, count))
    return [list(range(worker, count, workers)) for worker in range(workers)]


def run_workers(
    share_lists: Sequence[Sequence[int]],
    serve: Callable[[int, Sequence[int]], None],
    *,
    forked: Callable[[], None] = lambda: None,
) -> int:
    """Fork one worker per share that runs `serve(worker, share)` and exits 0, or 1
    if it raised; then the parent calls `forked` (to let go of what the workers
    now hold). Returns the exit status for the parent: 0 once every worker has
    ended well, 1 if any failed (the others are then told to stop)."""
    children: set[int] = set()

    def pass_on(signum: int, _frame: object) -> None:
        _signal_all(children, signum)

    previous = {
        signum: signal.signal(signum, pass_on) for signum in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        try:
            for worker, share in enumerate(share_lists):
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    _worker(worker, share, serve)
                children.add(pid)
        except BaseException:  # a fork failed: the workers started so far stop too
            _signal_all(children, signal.SIGTERM)
            raise
        forked()
        return _wait(children)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _worker(
    worker: int, share: Sequence[int], serve: Callable[[int, Sequence[int]], None]
) -> None:
    """The child: default signal handling until its loop installs its own, then
    serve; never returns into the parent's code."""
    status = 0
    try:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_DFL)
        serve(worker, share)
    except SystemExit as exc:  # sys.exit's meaning: None is success, text a failure said
        status = exc.code if isinstance(exc.code, int) else 0
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
            status = WORKER_EXIT_FAILED
    except BaseException:
        import traceback  # noqa: PLC0415 - only for a worker that is going down

        traceback.print_exc()
        status = WORKER_EXIT_FAILED
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def _signal_all(children: set[int], signum: int) -> None:
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def _wait(children: set[int]) -> int:
    """Wait for every worker; when one fails, stop the rest."""
    status = 0
    while children:
        pid, wait_status = os.wait()
        children.discard(pid)
        if os.waitstatus_to_exitcode(wait_status) != 0 and status == 0:
            status = WORKER_EXIT_FAILED
            _signal_all(children, signal.SIGTERM)
    return status
