"""Background batch loading (AutoSegLib/training/loader.py): shapes, determinism, dead workers."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from AutoSegLib.training.augmentation import Augmentation, training_pipeline, validation_pipeline
from AutoSegLib.training.loader import (BatchLoader, DataLoaderError, choose_transport, default_num_workers,
                                        fit_workers)
from test_training_data import make_config, write_case


@pytest.fixture
def dataset(tmp_path) -> tuple[list[str], dict, Path]:
    folder = tmp_path / "3d_fullres"
    boxes = {1: ((2, 6), (4, 12), (4, 12)), 2: ((8, 10), (20, 24), (20, 26))}
    for i in range(3):
        write_case(folder, f"case_{i}", shape=(12, 28, 30), boxes=boxes, outside_columns=2, seed=i)
    return [f"case_{i}" for i in range(3)], make_config(patch=(8, 16, 16)), folder


class Failing(Augmentation):
    """Raises on its third sample, in whichever process runs it."""

    calls = 0

    def __call__(self, image, seg):
        Failing.calls += 1
        if Failing.calls == 3:
            raise ValueError("augmentation exploded on purpose")
        return super().__call__(image, seg)


class Stuck(Augmentation):
    def __call__(self, image, seg):
        time.sleep(3600)


def gone(pid: int) -> bool:
    """Ended: no such process, or a zombie waiting for whoever inherited it to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].startswith("Z")
    except OSError:
        return True


def test_workers_yield_batches_of_the_right_shapes(dataset):
    cases, config, folder = dataset
    with BatchLoader(cases, config, folder, num_workers=2, seed=0) as loader:
        batches = [next(loader) for _ in range(5)]
    for i, batch in enumerate(batches):
        assert batch["index"] == i
        assert batch["data"].shape == (2, 1, 8, 16, 16) and batch["data"].dtype == torch.float32
        assert [tuple(t.shape) for t in batch["target"]] == [(2, 1, 8, 16, 16), (2, 1, 8, 8, 8)]
        assert all(t.dtype == torch.int16 and t.min() >= 0 for t in batch["target"])
        assert set(batch["keys"]) <= set(cases)


def test_stream_does_not_depend_on_worker_count(dataset):
    cases, config, folder = dataset

    def stream(workers, first_batch=0, count=4):
        with BatchLoader(cases, config, folder, num_workers=workers, seed=5, first_batch=first_batch) as loader:
            return [next(loader) for _ in range(count)]

    here, two = stream(0), stream(2)
    for a, b in zip(here, two):
        assert torch.equal(a["data"], b["data"])
        assert all(torch.equal(x, y) for x, y in zip(a["target"], b["target"]))
    resumed = stream(0, first_batch=2, count=1)[0]  # a resumed run continues the same stream
    assert torch.equal(resumed["data"], here[2]["data"])


def test_in_process_loading_leaves_the_callers_generators_alone(dataset):
    cases, config, folder = dataset
    torch.manual_seed(11)
    expected = torch.rand(3)
    torch.manual_seed(11)
    with BatchLoader(cases, config, folder, num_workers=0, seed=0) as loader:
        next(loader)
    assert torch.equal(torch.rand(3), expected)


def test_killed_worker_is_reported_within_seconds(dataset):
    cases, config, folder = dataset
    loader = BatchLoader(cases, config, folder, num_workers=2, seed=0)
    next(loader), next(loader)  # both workers are past start-up
    victim = loader._processes[1]
    os.kill(victim.pid, signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(DataLoaderError, match=r"data worker 1 .*killed by SIGKILL") as caught:
        for _ in range(50):
            next(loader)
    assert time.monotonic() - started < 5
    assert "died at batch" in str(caught.value)  # says what it was doing
    assert all(gone(p.pid) for p in loader._processes)  # the error closed the loader


def test_worker_exception_reaches_the_main_process(dataset):
    cases, config, folder = dataset
    Failing.calls = 0
    failing = Failing(**vars(validation_pipeline(config)))
    with BatchLoader(cases, config, folder, num_workers=1, seed=0, transforms=failing) as loader:
        next(loader)
        with pytest.raises(DataLoaderError) as caught:
            next(loader)
    message = str(caught.value)
    assert "augmentation exploded on purpose" in message and "Traceback" in message
    assert "case 'case_" in message and "batch 1" in message


def test_stuck_worker_times_out(dataset):
    cases, config, folder = dataset
    stuck = Stuck(**vars(validation_pipeline(config)))
    with BatchLoader(cases, config, folder, num_workers=1, seed=0, transforms=stuck, timeout=1) as loader:
        with pytest.raises(DataLoaderError, match="made no batch in 1 s although alive; last at batch 0"):
            next(loader)


def test_close_leaves_no_child_processes(dataset):
    cases, config, folder = dataset
    loader = BatchLoader(cases, config, folder, num_workers=2, seed=0)
    next(loader)
    pids = [p.pid for p in loader._processes]
    loader.close()
    loader.close()
    assert all(gone(pid) for pid in pids)
    assert not [c for c in mp.active_children() if c.pid in pids]
    with pytest.raises(DataLoaderError, match="closed"):
        next(loader)


def _trainer(cases, folder, sender):
    loader = BatchLoader(cases, make_config(), folder, num_workers=2)
    next(loader)
    sender.send([p.pid for p in loader._processes])
    time.sleep(60)


def test_workers_end_when_the_training_process_is_killed(dataset):
    cases, _, folder = dataset
    ctx = mp.get_context("fork")  # a trainer without the start-up cost of a fresh interpreter
    reader, sender = ctx.Pipe(duplex=False)
    trainer = ctx.Process(target=_trainer, args=(cases, folder, sender))
    trainer.start()
    pids = reader.recv() if reader.poll(30) else []
    try:
        assert len(pids) == 2
        os.kill(trainer.pid, signal.SIGKILL)  # no chance to close its loader
        trainer.join()
        deadline = time.monotonic() + 5
        while not all(gone(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(gone(pid) for pid in pids)
    finally:
        for pid in pids:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
        if trainer.is_alive():
            trainer.kill()


def test_spawned_workers_work_too(dataset):
    """Windows and macOS start workers by spawning a fresh interpreter."""
    cases, config, folder = dataset
    with BatchLoader(cases, config, folder, num_workers=1, seed=0, start_method="spawn",
                     transforms=training_pipeline(config)) as loader:
        assert next(loader)["data"].shape == (2, 1, 8, 16, 16)


def test_shared_memory_only_with_room():
    mb = 2**20
    assert choose_transport("auto", 10 * mb, 10_000 * mb)[0] == "pipe"
    assert choose_transport("shared_memory", 10 * mb, 10_000 * mb)[0] == "shared_memory"
    transport, why = choose_transport("shared_memory", 20 * mb, 64 * mb)  # Docker's default /dev/shm
    assert transport == "pipe" and "64 MB free" in why
    assert choose_transport("shared_memory", 10 * mb, None)[0] == "pipe"
    with pytest.raises(ValueError, match="allowed: auto, pipe, shared_memory"):
        choose_transport("carrier pigeon", 1, 1)


def test_shared_memory_transport_yields_the_same_batches(dataset):
    cases, config, folder = dataset
    with BatchLoader(cases, config, folder, num_workers=1, seed=2, transport="shared_memory") as loader:
        assert loader.transport == "shared_memory"
        shared = next(loader)
    with BatchLoader(cases, config, folder, num_workers=0, seed=2) as loader:
        assert torch.equal(next(loader)["data"], shared["data"])


def test_worker_count_fits_machine_and_memory(monkeypatch):
    # one core stays with the network; at least one worker, at most the cap
    for cores, expected in ((1, 1), (2, 1), (3, 2), (16, 4)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)), raising=False)
        assert default_num_workers() == expected
    assert default_num_workers(cap=2) == 2
    assert fit_workers(4, per_worker=1000, available=2500) == 1
    assert fit_workers(4, per_worker=1000, available=100) == 1  # never zero
    assert fit_workers(3, per_worker=1000, available=None) == 3
