"""Worker processes: every task answered, failures and deaths named, nothing left running."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import pytest

from AutoSegLib.workers import TaskResult, describe_exit, run_tasks


@contextlib.contextmanager
def deadline(seconds: float):
    """Fail instead of hanging: SIGALRM interrupts the wait (children do not inherit the timer)."""
    def expire(signum, frame):
        raise TimeoutError(f"run_tasks did not return within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def square(x):
    return x * x


def pid_and_square(x):
    return os.getpid(), x * x


def fail_on(x, bad):
    if x == bad:
        raise ValueError(f"bad value {x}")
    if x == -bad:
        raise RuntimeError("engine bug")
    return x


def kill_self_on(x, victim):
    if x == victim:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def exit_with(code):
    os._exit(code)


def big_result(n):
    return b"x" * n


def unpicklable():
    return lambda: None


def sleep_and_time(seconds):
    start = time.monotonic()
    time.sleep(seconds)
    return start, time.monotonic()


def sleep_if_slow(path, slow):
    if slow:
        Path(path).write_text(str(os.getpid()))
        time.sleep(60)
    return "fast"


def by_id(results):
    assert len({r.task_id for r in results}) == len(results)
    return {r.task_id: r for r in results}


def test_every_task_answered_each_in_its_own_process():
    seen = []
    with deadline(30):
        results = run_tasks(pid_and_square, [(f"t{i}", (i,)) for i in range(5)], 2, seen.append)
    assert seen == results
    out = by_id(results)
    assert sorted(out) == [f"t{i}" for i in range(5)]
    assert all(r.ok and r.error is None for r in results)
    assert [out[f"t{i}"].value[1] for i in range(5)] == [0, 1, 4, 9, 16]
    pids = {r.value[0] for r in results}
    assert len(pids) == 5 and os.getpid() not in pids


def test_at_most_num_processes_run_at_once():
    with deadline(30):
        results = run_tasks(sleep_and_time, [(str(i), (0.4,)) for i in range(5)], 2)
    intervals = [r.value for r in results]
    overlap = max(sum(s <= t < e for s, e in intervals) for t, _ in intervals)
    assert overlap == 2


def test_a_raising_task_reports_its_error_and_the_others_finish():
    with deadline(30):
        out = by_id(run_tasks(fail_on, [(f"t{i}", (i, 3)) for i in (1, 2, 3, 4, -3)], 2))
    assert out["t3"] == TaskResult("t3", False, error="ValueError: bad value 3")
    assert not out["t-3"].ok
    # An unexpected exception brings its traceback tail along, for the bug report.
    assert out["t-3"].error.startswith("RuntimeError: engine bug\n") and "fail_on" in out["t-3"].error
    assert [out[t].value for t in ("t1", "t2", "t4")] == [1, 2, 4]


def test_a_killed_worker_is_named_with_its_signal_and_the_others_finish():
    with deadline(30):
        out = by_id(run_tasks(kill_self_on, [(f"case_{i}", (i, 2)) for i in range(5)], 2))
    assert not out["case_2"].ok
    assert out["case_2"].error == ("the worker process was killed by SIGKILL - usually the system's "
                                   "out-of-memory killer")
    assert all(out[f"case_{i}"].ok and out[f"case_{i}"].value == i for i in (0, 1, 3, 4))


def test_a_worker_exiting_without_a_result_reports_its_exit_code():
    with deadline(30):
        out = by_id(run_tasks(exit_with, [("quits", (3,)), ("clean", (0,))], 2))
    assert out["quits"].error == "the worker process exited with code 3 without reporting a result"
    assert out["clean"].error == "the worker process exited with code 0 without reporting a result"


def test_describe_exit():
    assert describe_exit(-signal.SIGTERM) == "the worker process was killed by SIGTERM"
    assert "out-of-memory" in describe_exit(-signal.SIGKILL)
    assert describe_exit(-200) == "the worker process was killed by signal 200"
    assert describe_exit(None) == "the worker process exited with code None without reporting a result"


def test_results_larger_than_the_pipe_buffer_do_not_deadlock():
    # A child cannot exit before its result is read; waiting on the process alone hung here.
    with deadline(30):
        out = by_id(run_tasks(big_result, [("small", (10,)), ("big", (3_000_000,))], 2))
    assert len(out["big"].value) == 3_000_000 and out["small"].value == b"x" * 10


def test_an_unpicklable_result_is_an_error_not_a_hang():
    with deadline(30):
        (result,) = run_tasks(unpicklable, [("lambda", ())], 2)
    assert not result.ok and "pickle" in result.error.lower()


def test_one_process_runs_in_this_process():
    seen = []
    results = run_tasks(pid_and_square, [("a", (2,)), ("b", (3,))], 1, seen.append)
    assert results == seen and [r.value for r in results] == [(os.getpid(), 4), (os.getpid(), 9)]
    out = by_id(run_tasks(fail_on, [("ok", (1, 2)), ("bad", (2, 2))], 1))
    assert out["bad"] == TaskResult("bad", False, error="ValueError: bad value 2") and out["ok"].value == 1
    with pytest.raises(RuntimeError, match="engine bug"):  # debuggable: the real traceback
        run_tasks(fail_on, [("bug", (-2, 2))], 1)


def test_no_tasks():
    assert run_tasks(square, [], 2) == [] and run_tasks(square, [], 1) == []


def test_interrupted_run_leaves_no_worker_running(tmp_path):
    pid_file = tmp_path / "slow.pid"

    def interrupt(result):
        # Once the slow task's process is known to run, interrupt like Ctrl+C would.
        for _ in range(300):
            if pid_file.exists() and pid_file.read_text():
                break
            time.sleep(0.05)
        raise KeyboardInterrupt

    started = time.monotonic()
    with deadline(30), pytest.raises(KeyboardInterrupt):
        run_tasks(sleep_if_slow, [("slow", (str(pid_file), True)), ("fast", (str(pid_file), False))], 2, interrupt)
    assert time.monotonic() - started < 20  # the slow task would take 60 s
    with pytest.raises(ProcessLookupError):  # terminated and reaped, not an orphan
        os.kill(int(pid_file.read_text()), 0)
