"""Run independent tasks in worker processes, one process per task, never hanging on a death.

Why not a pool: ``multiprocessing.Pool`` waits forever when a worker is killed (the
out-of-memory killer, a segfault in a C library), and ``ProcessPoolExecutor`` breaks as a
whole without saying which task was running. One short-lived process per task costs a fork
(milliseconds) and makes the answer exact: the task whose process died is the one that
killed it, and the others carry on.

Each task's function runs in the child and its return value (picklable, small) comes back
through a pipe. A child that raises sends the error text; a child that dies sends nothing,
and its exit code says how it died.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import traceback
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any, Callable, Iterable

from AutoSegLib.errors import ReportedFailure


@dataclass(frozen=True)
class TaskResult:
    task_id: str
    ok: bool
    value: Any = None
    error: str | None = None


def _child(conn, fn, args) -> None:
    try:
        value = fn(*args)
        conn.send((True, value))
    except BaseException as exc:  # noqa: BLE001 - everything must reach the parent as text
        summary = describe_error(exc)
        if not isinstance(exc, EXPECTED_ERRORS):
            summary += "\n" + "".join(traceback.format_exception(exc)[-4:]).rstrip()
        conn.send((False, summary))
    finally:
        conn.close()


# Failures of one task that its message explains (bad file, bad value, too big for this machine):
# reported as the task's result without a traceback; anything else is a bug and keeps one.
EXPECTED_ERRORS = (OSError, ValueError, MemoryError, ReportedFailure)


def describe_error(exc: BaseException) -> str:
    """The text a failed task reports: its own message, with the error type unless that says it all."""
    if isinstance(exc, ReportedFailure):
        return str(exc)  # written for the user, naming the case and file already
    return f"{type(exc).__name__}: {exc}"


def describe_exit(exitcode: int | None) -> str:
    """Plain words for how a worker process ended without reporting back."""
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " - usually the system's out-of-memory killer" if name == "SIGKILL" else ""
        return f"the worker process was killed by {name}{hint}"
    return f"the worker process exited with code {exitcode} without reporting a result"


def run_tasks(fn: Callable, tasks: Iterable[tuple[str, tuple]], num_processes: int,
              on_result: Callable[[TaskResult], None] | None = None) -> list[TaskResult]:
    """Run ``fn(*args)`` for each ``(task_id, args)``; at most ``num_processes`` at once.

    ``num_processes <= 1`` runs in this process (debuggable; exceptions other than
    :data:`EXPECTED_ERRORS` propagate with their traceback). Results arrive in completion order
    through ``on_result`` and are also returned.
    """
    tasks = list(tasks)
    results: list[TaskResult] = []

    def finish(result: TaskResult) -> None:
        results.append(result)
        if on_result is not None:
            on_result(result)

    if num_processes <= 1:
        for task_id, args in tasks:
            try:
                finish(TaskResult(task_id, True, fn(*args)))
            except EXPECTED_ERRORS as exc:
                finish(TaskResult(task_id, False, error=describe_error(exc)))
        return results

    ctx = mp.get_context()
    pending = list(reversed(tasks))
    running: dict[Any, tuple[str, Any, Any]] = {}  # sentinel -> (task id, process, connection)
    try:
        while pending or running:
            while pending and len(running) < num_processes:
                task_id, args = pending.pop()
                receiver, sender = ctx.Pipe(duplex=False)
                process = ctx.Process(target=_child, args=(sender, fn, args), daemon=True)
                process.start()
                sender.close()
                running[process.sentinel] = (task_id, process, receiver)
            # Wait on the pipes too, not only on the process sentinels: a child whose result
            # is larger than the pipe buffer (~64 KB) cannot exit until someone reads it.
            receivers = {entry[2]: sentinel for sentinel, entry in running.items()}
            for ready in wait([*running, *receivers]):
                sentinel = receivers.get(ready, ready)
                if sentinel in running:
                    task_id, process, receiver = running.pop(sentinel)
                    finish(_collect(task_id, process, receiver))
    finally:
        for _, process, receiver in running.values():  # interrupted: leave no orphans
            process.terminate()
            process.join(5)
            if process.is_alive():  # the task ignores or handles SIGTERM
                process.kill()
                process.join()
            receiver.close()
    return results


def _collect(task_id: str, process, receiver) -> TaskResult:
    # Called when the child has exited or its pipe is readable. The parent closed its copy of
    # the sending end, so recv returns the child's one message or fails at once (EOF) when
    # the child died without finishing it; it cannot block on a live, silent child.
    try:
        message = receiver.recv()
    except (EOFError, OSError):
        message = None
    finally:
        receiver.close()
    process.join()
    if message is None:
        return TaskResult(task_id, False, error=describe_exit(process.exitcode))
    ok, payload = message
    return TaskResult(task_id, True, payload) if ok else TaskResult(task_id, False, error=payload)
