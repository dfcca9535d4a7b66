"""A batch of cases as a pipeline: the next case is read and the previous one written while the network runs.

For case i the calling thread runs the network (:meth:`Predictor.run_network`) while a reader
thread reads and preprocesses case i+1 (:meth:`Predictor.prepare`) and a writer thread restores
case i-1 to its input grid and writes its files (:meth:`Predictor.finish`). So a batch costs
about its network time plus one case's reading and writing, not the sum of every stage.

Memory bound: at most :data:`MAX_IN_FLIGHT` = 3 cases are held at once - one ahead (read,
preprocessed, waiting), one in the network, one behind (being restored and written). The
reader starts case i+1 only once the network has taken case i; the network's result for case i
goes to the writer only once case i-1 is written. The network therefore never waits for its own
case's export; it waits only when the case ahead is not ready yet or the writer is still on
the case before. ``inference/memory.py`` (``pipelined=True``) counts three cases.

Threads, not processes (docs/decisions.md): numpy, scipy and torch release the GIL in their
heavy loops, and threads hand arrays over without copying them.

Every case is reported on the calling thread, in input order, once it is written or has failed
(``done``); a failing case does not stop the others.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

MAX_IN_FLIGHT = 3  # one case ahead, one in the network, one behind


@dataclass
class CaseTimes:
    """Seconds each stage of one case took (what ran in the background overlapped the network)."""

    case: str
    stages: dict = field(default_factory=dict)  # read, preprocess, network, restore, write
    started: float = 0.0  # time.perf_counter() when the case's reading started
    finished: float = 0.0  # when its files were written (or it failed)

    def add(self, stage: str, seconds: float) -> None:
        self.stages[stage] = self.stages.get(stage, 0.0) + seconds


class _InFlight:
    """Counts cases between the start of their reading and the end of their writing."""

    def __init__(self):
        self.lock, self.now, self.most = threading.Lock(), 0, 0

    def enter(self) -> None:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)

    def leave(self) -> None:
        with self.lock:
            self.now -= 1


def _call(function: Callable, *args) -> tuple[Any, BaseException | None]:
    try:
        return function(*args), None
    except Exception as exc:  # noqa: BLE001 - handed back to the calling thread, which reports it
        return None, exc


def run_pipeline(items: Sequence, prepare: Callable[[Any], Any], network: Callable[[Any, Any, Callable[[], None]], Any],
                 finish: Callable[[Any, Any], None], done: Callable[[Any, BaseException | None], None],
                 pipelined: bool = True) -> int:
    """Run ``prepare`` -> ``network`` -> ``finish`` on every item, overlapped as the module says.

    Args:
        items: the cases, in order.
        prepare: ``prepare(item) -> ready``, on the reader thread.
        network: ``network(item, ready, poll) -> result``, on the calling thread; it may call
            ``poll()`` now and then (e.g. from its progress callback) so that a case the writer
            finished meanwhile is reported without waiting for the network.
        finish: ``finish(item, result)``, on the writer thread.
        done: ``done(item, error)`` on the calling thread, once per item in order, ``error``
            being the exception that stopped it (any stage) or None.
        pipelined: False runs the stages one after the other on the calling thread (the same
            functions, for comparison and for the smallest memory).

    Returns:
        The most cases that were in flight at once (at most :data:`MAX_IN_FLIGHT`).
    """
    flight = _InFlight()
    if not pipelined or len(items) < 2:
        for item in items:
            flight.enter()
            ready, error = _call(prepare, item)
            if error is None:
                result, error = _call(network, item, ready, lambda: None)
                del ready
                if error is None:
                    _, error = _call(finish, item, result)
                    del result
            flight.leave()
            done(item, error)
        return flight.most

    behind: list = []  # [(item, future)] of the one case with the writer

    def report_behind(block: bool) -> None:
        if behind and (block or behind[0][1].done()):
            item, future = behind.pop()
            _, error = future.result()
            flight.leave()
            done(item, error)

    with ThreadPoolExecutor(1, thread_name_prefix="autoseg-reader") as reader, \
            ThreadPoolExecutor(1, thread_name_prefix="autoseg-writer") as writer:
        def submit_prepare(index: int) -> Future | None:
            if index >= len(items):
                return None
            flight.enter()
            return reader.submit(_call, prepare, items[index])

        ahead = submit_prepare(0)
        for index, item in enumerate(items):
            ready, error = ahead.result()
            ahead = submit_prepare(index + 1)  # one ahead: started once this case left the reader
            result = None
            if error is None:
                result, error = _call(network, item, ready, lambda: report_behind(False))
            del ready
            report_behind(True)  # one behind: the previous case is written before this one is handed over
            if error is None:
                behind.append((item, writer.submit(_call, finish, item, result)))
            else:
                flight.leave()
                done(item, error)
            del result
        report_behind(True)
    return flight.most


def network_threads(device_type: str, n_cases: int, pipelined: bool, cores: int | None = None) -> int | None:
    """Torch threads for the network while the pipeline runs, or None to leave torch's setting.

    On a CPU with more than one case the reader and writer need a core: the network gets the
    others (``cores - 1``, at least one); with one case, or one core, it gets them all. On a
    GPU the CPU's threads only feed it. An explicit ``OMP_NUM_THREADS`` always wins.
    """
    explicit = os.environ.get("OMP_NUM_THREADS", "").strip()
    if device_type != "cpu" or (explicit.isdigit() and int(explicit) >= 1):
        return None
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if pipelined and n_cases > 1:
        return max(1, cores - 1)
    return max(1, cores)
