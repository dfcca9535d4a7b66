"""Training batches made in background worker processes, never hanging on a dead one.

Each worker owns one pipe to the main process and makes the batches whose index is its own
modulo the number of workers; the main process reads them in index order. Batch ``i`` is
drawn from a generator seeded by ``(seed, i)``, so the stream of batches is the same for
any number of workers (0 included) and a resumed run can continue it (``first_batch``).

Why not ``torch.utils.data.DataLoader`` or a ``multiprocessing.Queue``: a queue's pipe is
also held open by the main process, so a worker killed half-way through sending leaves
the reader waiting for bytes that never come. Here the main process closes its copy of
each worker's sending end, so a dead worker is an end-of-file at once; between batches
the reader polls with a timeout and checks every worker's exit code. The error names the
worker, the batch and case it was making, and the cause: its exception with traceback, or
the signal that killed it.

Transport: by default batches travel as numpy arrays pickled through the pipe. Torch's
shared-memory tensors (``transport="shared_memory"``) are used only when asked and
``/dev/shm`` has room: Docker's default 64 MB would fail under load.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import multiprocessing as mp
import numpy as np
import torch
import torch.multiprocessing  # noqa: F401 - registers tensor sharing for the shared-memory transport

from AutoSegLib.errors import ReportedFailure
from AutoSegLib.training.augmentation import Augmentation, training_pipeline
from AutoSegLib.training.data import PatchSampler, batch_rng, make_batch
from AutoSegLib.workers import describe_exit

TRANSPORTS = ("auto", "pipe", "shared_memory")
POLL_SECONDS = 0.2
STATUS_BYTES = 240
WORKER_BASE_BYTES = 300 * 2**20  # interpreter, torch and batchgeneratorsv2 in a worker
SHM_PATH = "/dev/shm"


class DataLoaderError(ReportedFailure):
    """A data worker died or failed; the message says which, where, and why."""


def default_num_workers(cap: int = 4) -> int:
    """One core stays with the training process; at least one worker, at most ``cap``."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(1, min(cores - 1, cap))


def batch_nbytes(config: dict, batch_size: int, channels: int) -> int:
    """Bytes of one batch as sent: float32 image plus int16 targets (all scales < 1.2x)."""
    voxels = batch_size * math.prod(config["patch_size"])
    return int(voxels * (4 * channels + 2 * 1.2))


def worker_nbytes(sample_size: tuple[int, ...], batch_size: int, channels: int) -> int:
    """Rough peak memory of one worker: base, plus ~6 float copies of each sampled patch.

    Measured: ~2 copies (benchmarks/bench_dataloading.py); the margin covers many labels.
    """
    return WORKER_BASE_BYTES + 6 * 4 * (channels + 1) * batch_size * math.prod(sample_size)


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo (bytes), None where that does not exist."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def fit_workers(requested: int, per_worker: int, available: int | None) -> int:
    """Fewest of ``requested`` and what fits in half the available memory; at least 1."""
    if available is None:
        return requested
    return max(1, min(requested, int(0.5 * available // per_worker)))


def choose_transport(requested: str, in_flight_bytes: int, shm_free: int | None) -> tuple[str, str]:
    """``pipe`` or ``shared_memory``, and why.

    Shared memory needs room for every batch in flight, with a 4x margin for tensors the
    trainer still holds; without a ``/dev/shm`` to measure it is not trusted.
    """
    if requested not in TRANSPORTS:
        raise ValueError(f"transport {requested!r}; allowed: {', '.join(TRANSPORTS)}")
    if requested == "pipe":
        return "pipe", "requested"
    if requested == "auto":
        return "pipe", "default: as fast as shared memory on the benchmark, and needs no /dev/shm"
    if shm_free is None:
        return "pipe", f"shared memory requested but {SHM_PATH} does not exist here"
    if shm_free < 4 * in_flight_bytes:
        return "pipe", (f"shared memory requested but {SHM_PATH} has {shm_free / 2**20:.0f} MB free, "
                        f"less than the {4 * in_flight_bytes / 2**20:.0f} MB wanted")
    return "shared_memory", f"{SHM_PATH} has {shm_free / 2**20:.0f} MB free"


def shared_memory_free() -> int | None:
    return shutil.disk_usage(SHM_PATH).free if os.path.isdir(SHM_PATH) else None


@dataclass(frozen=True)
class _WorkerSpec:
    folder: str
    cases: tuple[str, ...]
    augmentation: Augmentation
    batch_size: int
    seed: int
    ignore_label: int | None
    first_batch: int
    num_workers: int
    transport: str
    slots: tuple[int, int] | None = None


def _to_numpy(batch: dict) -> dict:
    return {**batch, "data": batch["data"].numpy(), "target": [t.numpy() for t in batch["target"]]}


def _to_torch(batch: dict) -> dict:
    return {**batch, "data": torch.from_numpy(batch["data"]), "target": [torch.from_numpy(t) for t in batch["target"]]}


def _exit_with_parent(parent_pid: int) -> None:
    """End this worker within a second of the training process dying.

    A SIGKILLed trainer cannot stop its workers, and a worker blocked sending to a pipe whose
    reading end another worker inherited would wait forever.
    """
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    os._exit(0)


def _worker_main(worker_id: int, spec: _WorkerSpec, sender, status, parent_pid: int) -> None:
    """Make batches worker_id, worker_id + n, ... until the pipe closes or an error."""
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C is the main process's to handle
    torch.set_num_threads(1)  # workers run side by side; threads inside them only contend
    index = spec.first_batch + worker_id
    try:
        sampler = PatchSampler(spec.folder, list(spec.cases), spec.augmentation.patch_size,
                               spec.augmentation.input_patch_size, spec.ignore_label)

        def on_case(case_id: str) -> None:
            status.value = f"batch {index}, case '{case_id}'".encode()[:STATUS_BYTES]

        while True:
            batch = make_batch(sampler, spec.augmentation, spec.batch_size, batch_rng(spec.seed, index), on_case,
                               spec.slots)
            batch["index"] = index
            sender.send(("batch", _to_numpy(batch) if spec.transport == "pipe" else batch))
            index += spec.num_workers
    except (BrokenPipeError, ConnectionResetError):
        return  # the main process closed the loader or died: nothing left to report to
    except BaseException as exc:  # noqa: BLE001 - everything must reach the main process as text
        summary = "".join(traceback.format_exception_only(exc)).strip()
        report = f"{status.value.decode(errors='replace')}: {summary}\n" + "".join(traceback.format_exception(exc))
        try:
            sender.send(("error", report.rstrip()))
        except OSError:
            pass
    finally:
        sender.close()


class BatchLoader:
    """Endless iterator of training (or validation) batches from background processes.

    Args:
        cases: case ids to draw from.
        config: the configuration (dict from plans.json, or a ``Configuration``).
        folder: ``WORK/preprocessed/{configuration}``.
        batch_size: default: the plan's.
        num_workers: processes making batches; 0 makes them in this process (debuggable).
            Default: :func:`default_num_workers`, fewer if memory is short (see ``notes``).
        seed: with ``first_batch``, fixes every batch; independent of ``num_workers``.
        transforms: an ``Augmentation``; default ``training_pipeline(config)``.
        ignore_label: the dataset's ``ignore`` value, never chosen for forced foreground.
        first_batch: index of the first batch (continue a stream after resuming).
        timeout: seconds a live worker may take for one batch before it is called stuck.
        transport: "auto" (= "pipe"), "pipe" or "shared_memory" (falls back to pipe when
            /dev/shm is small or missing).
        slots: ``(start, stop)``: make only these samples of each batch of ``batch_size``
            (one rank's part of the global batch in data-parallel training; see
            :func:`~AutoSegLib.training.data.make_batch`). Default: the whole batch.
        start_method: multiprocessing start method; default: the platform's.

    Each batch is ``{"data": float32 (B, C, *patch), "target": [int16 (B, 1, *shape_k)],
    "keys": [case ids], "index": int}``; targets are one per network output, full
    resolution first. Use as a context manager, or call ``close()``.

    Example:
        >>> with BatchLoader(cases, config, folder, num_workers=2, seed=0) as loader:
        ...     batch = next(loader)

    Raises:
        DataLoaderError: from ``next()`` when a worker died (naming the signal) or raised
            (with its traceback), or a live worker gave nothing for ``timeout`` seconds.
    """

    def __init__(self, cases: list[str], config, folder: str | Path, batch_size: int | None = None,
                 num_workers: int | None = None, seed: int = 0, transforms: Augmentation | None = None, *,
                 ignore_label: int | None = None, first_batch: int = 0, timeout: float = 300.0,
                 transport: str = "auto", start_method: str | None = None, slots: tuple[int, int] | None = None):
        config = config.to_dict() if hasattr(config, "to_dict") else config
        self.augmentation = transforms or training_pipeline(config)
        self.batch_size = int(batch_size or config["batch_size"])
        self.slots = None if slots is None else (int(slots[0]), int(slots[1]))
        made = self.batch_size if self.slots is None else self.slots[1] - self.slots[0]
        self.seed, self.first_batch, self.timeout = int(seed), int(first_batch), float(timeout)
        self.notes: list[str] = []
        self._next = self.first_batch
        self._closed = False
        self._processes: list = []
        self._readers: list = []
        self._status: list = []
        channels = len(config.get("normalization_schemes", [None]))
        spec_args = (str(folder), tuple(cases), self.augmentation, self.batch_size, self.seed, ignore_label,
                     self.first_batch)
        requested = default_num_workers() if num_workers is None else int(num_workers)
        if requested <= 0:
            self.num_workers, self.transport = 0, "in-process"
            self._sampler = PatchSampler(folder, list(cases), self.augmentation.patch_size,
                                         self.augmentation.input_patch_size, ignore_label)
            return
        per_worker = worker_nbytes(self.augmentation.input_patch_size, made, channels)
        self.num_workers = fit_workers(requested, per_worker, available_memory())
        if self.num_workers < requested:
            self.notes.append(f"{self.num_workers} data worker(s) instead of {requested}: about "
                              f"{per_worker / 2**20:.0f} MB each and memory is short")
        in_flight = 2 * self.num_workers * batch_nbytes(config, made, channels)
        self.transport, why = choose_transport(transport, in_flight, shared_memory_free())
        self.notes.append(f"batches travel by {self.transport} ({why})")
        spec = _WorkerSpec(*spec_args, self.num_workers, self.transport, self.slots)
        self._start(spec, mp.get_context(start_method))

    def _start(self, spec: _WorkerSpec, ctx) -> None:
        try:
            for worker_id in range(self.num_workers):
                reader, sender = ctx.Pipe(duplex=False)
                status = ctx.Array("c", STATUS_BYTES + 1, lock=False)
                process = ctx.Process(target=_worker_main, args=(worker_id, spec, sender, status, os.getpid()),
                                      name=f"autoseg-data-{worker_id}", daemon=True)
                process.start()
                # Close our copy before the next fork: only the worker may hold the sending
                # end, so its death is an end-of-file rather than a silent wait.
                sender.close()
                self._processes.append(process)
                self._readers.append(reader)
                self._status.append(status)
        except BaseException:
            self.close()
            raise

    def __iter__(self) -> "BatchLoader":
        return self

    def __next__(self) -> dict:
        if self._closed:
            raise DataLoaderError("the batch loader is closed")
        if self.num_workers == 0:
            batch = self._make_here()
        else:
            batch = self._receive((self._next - self.first_batch) % self.num_workers)
        self._next += 1
        return batch

    def _make_here(self) -> dict:
        # One thread, as in a worker: the same float rounding (so the same batches), and
        # faster - these small tensor operations only lose to thread hand-over. The global
        # generators the augmentation reseeds are the trainer's too: give them back unchanged.
        threads, np_state, torch_state = torch.get_num_threads(), np.random.get_state(), torch.get_rng_state()
        torch.set_num_threads(1)
        try:
            batch = make_batch(self._sampler, self.augmentation, self.batch_size, batch_rng(self.seed, self._next),
                               slots=self.slots)
        finally:
            torch.set_num_threads(threads)
            np.random.set_state(np_state)
            torch.set_rng_state(torch_state)
        batch["index"] = self._next
        return batch

    def _receive(self, worker: int) -> dict:
        reader, started = self._readers[worker], time.monotonic()
        while True:
            self._check_workers()
            if reader.poll(POLL_SECONDS):
                try:
                    message = reader.recv()
                except Exception:  # noqa: BLE001 - end of file, or shared tensors of a dead sender
                    self._fail_dead(worker)
                if message[0] == "error":
                    self._fail(f"data worker {worker} failed at {message[1]}")
                batch = message[1]
                return _to_torch(batch) if self.transport == "pipe" else batch
            if time.monotonic() - started > self.timeout:
                self._fail(f"data worker {worker} (pid {self._processes[worker].pid}) made no batch in "
                           f"{self.timeout:.0f} s although alive; last at {self._where(worker)}")

    def _check_workers(self) -> None:
        for worker, process in enumerate(self._processes):
            if process.exitcode is not None:
                self._fail_dead(worker)

    def _where(self, worker: int) -> str:
        return self._status[worker].value.decode(errors="replace") or "start-up"

    def _fail_dead(self, worker: int) -> None:
        """Report a worker that has ended: its own error message if it sent one, else its exit."""
        reader, process = self._readers[worker], self._processes[worker]
        try:
            while reader.poll(0.5):  # an error report may still wait behind finished batches
                message = reader.recv()
                if message[0] == "error":
                    self._fail(f"data worker {worker} failed at {message[1]}")
        except DataLoaderError:
            raise
        except Exception:  # noqa: BLE001 - end of file, or shared tensors of a dead sender
            pass
        process.join(2)
        self._fail(f"data worker {worker} (pid {process.pid}) died at {self._where(worker)}: "
                   f"{describe_exit(process.exitcode)}")

    def _fail(self, message: str) -> None:
        self.close()
        raise DataLoaderError(message)

    def close(self) -> None:
        """Stop and reap every worker; safe to call more than once."""
        self._closed = True
        for reader in self._readers:
            reader.close()  # a worker blocked sending gets a broken pipe and ends
        for process in self._processes:
            if process.exitcode is None:
                process.terminate()
        for process in self._processes:
            process.join(2)
            if process.exitcode is None:
                process.kill()
                process.join(2)
        self._readers = []

    def __enter__(self) -> "BatchLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
