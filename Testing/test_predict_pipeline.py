"""The batch pipeline of ``autoseg predict`` (inference/pipeline.py): same files as one case at a
time, failures reported by name, at most three cases in flight, the network never waiting for
its own case's export."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from AutoSegLib import cli
from AutoSegLib.fileutil import TMP_PREFIX
from AutoSegLib.imageio import read_image, write_image
from AutoSegLib.inference import predict_files
from AutoSegLib.inference import files as files_module
from AutoSegLib.inference.memory import estimate_prediction
from AutoSegLib.inference.pipeline import MAX_IN_FLIGHT, network_threads, run_pipeline
from AutoSegLib.resources import ResourceError
from test_inference_files import one_thread  # noqa: F401 (autouse fixture: one torch thread)
from test_inference_predictor import blob_image, make_model_folder, oblique_geometry, tiny_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_folder(tmp_path_factory.mktemp("model"), folds=(0,))


def write_cases(folder, names, shape=(12, 30, 26)):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        write_image(blob_image(shape, seed=i).astype(np.int16), oblique_geometry(), folder / f"{name}_0000.nii.gz")
    return folder


@pytest.mark.parametrize("configuration, extra", [("3d_fullres", {}), ("2d", {"save_probabilities": True,
                                                                             "uncertainty": True}),
                                                  (["3d_fullres", "2d"], {})])
def test_pipelined_files_equal_one_case_at_a_time(tmp_path, model_dir, configuration, extra):
    names = ["a", "b", "c", "d"]
    inputs = write_cases(tmp_path / "in", names)
    outputs = {}
    for pipelined in (False, True):
        out = tmp_path / f"out_{pipelined}"
        result = predict_files(inputs, out, model_dir, configuration=configuration, device="cpu", tta=False,
                               pipelined=pipelined, **extra)
        assert result["cases"] == 4
        outputs[pipelined] = out
    values = set()
    for name in names:
        sequential, pipelined = (read_image(outputs[p] / f"{name}.nii.gz")[0] for p in (False, True))
        np.testing.assert_array_equal(pipelined, sequential)  # integers: exactly
        values |= set(np.unique(sequential).tolist())
        if extra:
            np.testing.assert_array_equal(np.load(outputs[True] / f"{name}.npz")["probabilities"],
                                          np.load(outputs[False] / f"{name}.npz")["probabilities"])
    assert len(values) > 1  # the random network predicts more than one class: the comparison means something


def test_a_failing_case_in_the_middle_is_named_and_the_others_are_written(tmp_path, model_dir, capsys, monkeypatch):
    inputs = write_cases(tmp_path / "in", ["a", "b", "c", "d", "e"])
    (inputs / "b_0000.nii.gz").write_bytes(b"not an image")  # fails on the reader thread
    real = files_module.write_image

    def failing_write(array, geometry, path):  # fails on the writer thread
        if "d.nii.gz" in str(path):
            raise OSError(28, "No space left on device")
        return real(array, geometry, path)

    monkeypatch.setattr(files_module, "write_image", failing_write)
    monkeypatch.setattr("AutoSegLib.events._MIN_EVENT_INTERVAL_S", 0.0)  # every progress event
    out = tmp_path / "out"
    capsys.readouterr()
    status = cli.main(["predict", "-i", str(inputs), "-o", str(out), "-m", str(model_dir), "-c", "3d_fullres",
                       "--no-tta", "--device", "cpu", "--events"])
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert status == 1
    errors = [e for e in events if e["event"] == "error"]
    assert [e.get("case") for e in errors[:2]] == ["b", "d"]
    assert "b_0000.nii.gz" in errors[0]["message"] and "No space left" in errors[1]["message"]
    assert "2 of 5 case(s)" in errors[-1]["message"]
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz", "c.nii.gz", "e.nii.gz"]
    assert not any(p.name.startswith(TMP_PREFIX) for p in out.iterdir())
    finished = [(e["case"], e["ok"]) for e in events if e["event"] == "progress" and "ok" in e]
    assert finished == [("a", True), ("b", False), ("c", True), ("d", False), ("e", True)]  # in input order


def test_continue_and_parts_still_work_when_pipelined(tmp_path, model_dir):
    inputs = write_cases(tmp_path / "in", ["a", "b", "c", "d"])
    out = tmp_path / "out"
    for part in (0, 1):
        result = predict_files(inputs, out, model_dir, configuration="3d_fullres", device="cpu", tta=False,
                               num_parts=2, part_id=part)
        assert result["cases"] == 2
    result = predict_files(inputs, out, model_dir, configuration="3d_fullres", device="cpu", tta=False,
                           skip_existing=True)
    assert result == {"cases": 0, "skipped": 4, "output": str(out)}


def bounded_run(n: int, fail: int | None = None):
    """run_pipeline on ``n`` items with instrumented stages. Each finish(i) waits until network(i + 1)
    has started, so the run deadlocks (and times out) if an export blocks the network; each finish
    also waits for prepare(i + 2) to start, so the pipeline is driven to its fullest."""
    lock, counts, log = threading.Lock(), {"now": 0, "most": 0}, []
    network_started = [threading.Event() for _ in range(n + 1)]
    prepare_started = [threading.Event() for _ in range(n + 2)]
    network_started[n].set()
    prepare_started[n].set()
    prepare_started[n + 1].set()

    def enter():
        with lock:
            counts["now"] += 1
            counts["most"] = max(counts["most"], counts["now"])

    def leave():
        with lock:
            counts["now"] -= 1

    def prepare(i):
        enter()
        prepare_started[i].set()
        if i == fail:
            network_started[i].set()  # it never gets there
            leave()
            raise ValueError(f"item {i} is broken")
        return f"ready {i}"

    def network(i, ready, poll):
        assert ready == f"ready {i}"
        network_started[i].set()
        poll()
        return f"result {i}"

    def finish(i, result):
        assert result == f"result {i}"
        ok = network_started[i + 1].wait(10) and prepare_started[i + 2].wait(10)
        leave()
        if not ok:
            raise TimeoutError(f"item {i}: the network waited for this export")

    def done(i, error):
        log.append((i, None if error is None else type(error).__name__))

    most = run_pipeline(list(range(n)), prepare, network, finish, done)
    return counts["most"], most, log


def test_at_most_three_cases_in_flight_and_exports_never_block_the_network():
    seen, reported, log = bounded_run(6)
    assert log == [(i, None) for i in range(6)]  # every item, in order, no timeout
    assert seen == MAX_IN_FLIGHT == 3  # reached, never exceeded (counted by the stages themselves)
    assert reported == 3


def test_a_failing_item_leaves_the_bound_and_the_order_intact():
    seen, _, log = bounded_run(5, fail=2)
    assert log == [(0, None), (1, None), (2, "ValueError"), (3, None), (4, None)]
    assert seen <= 3


def test_one_case_at_a_time_has_one_in_flight():
    log = []
    most = run_pipeline([0, 1, 2], lambda i: i, lambda i, r, poll: r, lambda i, r: None,
                        lambda i, e: log.append(i), pipelined=False)
    assert most == 1 and log == [0, 1, 2]


def test_network_threads_leave_a_core_to_the_pipeline(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert network_threads("cpu", 10, True, cores=2) == 1
    assert network_threads("cpu", 10, True, cores=8) == 7
    assert network_threads("cpu", 1, True, cores=2) == 2  # one case: nothing to overlap
    assert network_threads("cpu", 10, False, cores=2) == 2
    assert network_threads("cpu", 10, True, cores=1) == 1
    assert network_threads("cuda", 10, True, cores=2) is None
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert network_threads("cpu", 10, True, cores=2) is None  # the user's setting wins


def test_memory_estimate_counts_three_cases_when_pipelined():
    config = tiny_config((2.0, 1.0, 1.0), (8, 16, 16))
    options = dict(configurations={"3d": config}, names=["3d"], n_classes=3, shape=(60, 200, 200),
                   spacing=(1.0, 1.0, 1.0), transpose_forward=[0, 1, 2])
    one = estimate_prediction(**options)
    three = estimate_prediction(**options, pipelined=True)
    assert three.phase.startswith("pipeline")
    groups = {"ahead": ("read", "3d preprocess"), "network": ("3d sliding window", "3d softmax"),
              "behind": ("3d restore", "outputs")}
    assert set(one.phases) == {p for g in groups.values() for p in g}
    assert three.added == sum(max(one.phases[p] for p in g) for g in groups.values())
    assert one.added < three.added < 3 * one.added


def test_memory_advice_offers_one_case_at_a_time(tmp_path, model_dir, capsys):
    inputs = write_cases(tmp_path / "in", ["a", "b"])
    capsys.readouterr()
    status = cli.main(["predict", "-i", str(inputs), "-o", str(tmp_path / "out"), "-m", str(model_dir),
                       "-c", "3d_fullres", "--device", "cpu", "--events", "--strict"], )
    assert status == 0
    logs = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    memory = [e for e in logs if e["event"] == "log" and e["message"].startswith("Memory:")]
    assert "pipeline" in memory[0]["message"]
    with pytest.raises(ResourceError, match="one case at a time"):
        predict_files(inputs, tmp_path / "out2", model_dir, configuration="3d_fullres", device="cpu", strict=True,
                      available_memory=1 << 20)
