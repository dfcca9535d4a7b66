"""The clinician's path on every configuration, through the logic API as the widget calls it.

Real engine processes, tiny networks: train 3d_cpu (the CPU configuration, with a time budget)
and 2d; predict without naming a configuration (the engine's rule: the only trained one);
a model with both and no inference plan is refused before any process starts. The same
trained model measures the GUI-thread time of Add case and Predict on a 256x256x200 volume:
everything heavy runs in a worker thread or the engine process, so each call and each poll
stays below the 0.2 s a user would notice. About 40 s on an idle 2-core machine.
"""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
import pytest

from AutoSegLib.names import CPU_CONFIGURATION
from AutoSegLogic import commands, dataset_export, results, testing, volumes
from AutoSegLogic.jobs import Step, ThreadJob
from AutoSegLogic.session import Session

pytestmark = pytest.mark.skipif(not commands.engine_flags("predict"), reason="the engine has no predict command yet")

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
GUI_LIMIT_S = 0.2  # the bound for any one piece of GUI-thread work


def wait(session, timeout=240, watch=None):
    """Poll as the GUI's timer does; returns the slowest poll (seconds). ``watch()`` runs after each poll."""
    slowest, deadline = 0.0, time.monotonic() + timeout
    while session.busy:
        started = time.monotonic()
        session.poll()
        slowest = max(slowest, time.monotonic() - started)
        if watch:
            watch()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return slowest


@pytest.fixture(scope="module")
def trained(planned, tmp_path_factory):
    """The phantom dataset trained as 3d_cpu (2 epochs, time budget 2 min) and as 2d, tiny networks,
    on the CPU: (dataset, work, {configuration: model folder with only that configuration}, progress seen)."""
    import slicer

    root = tmp_path_factory.mktemp("configurations")
    dataset = root / planned[0].name
    shutil.copytree(planned[0], dataset)
    work = root / "work"
    session = Session(slicer.vtkMRMLScene(), env=ENV, log_dir=root / "logs")
    cpu = commands.TrainSettings(dataset, work, commands.resolve_configuration(commands.AUTO, "cpu"), ["0"],
                                 epochs=2, iterations_per_epoch=2, time_budget_min=2, device="cpu")
    steps = commands.training_steps(cpu)
    chain = session.start_steps(steps[:2])  # verify, plan-and-preprocess
    wait(session)
    assert chain.succeeded, chain.failure + chain.log_tail()
    testing.shrink_plans(work, CPU_CONFIGURATION)
    testing.shrink_plans(work, "2d")
    flat = commands.TrainSettings(dataset, work, "2d", ["0"], epochs=1, iterations_per_epoch=2, device="cpu")
    chain = session.start_steps([Step(["preprocess", str(dataset), "-w", str(work), "-c", "2d"], "preprocess 2d"),
                                 *steps[2:], *commands.training_steps(flat)[2:]])
    seen = []  # (progress, eta) of the 3d_cpu training run, as the widget shows them

    def watch():
        job = chain.job
        if job is not None and job.command == "train" and job.args[2] == CPU_CONFIGURATION:
            seen.append((job.progress, job.eta_s, len(job.epochs)))

    wait(session, watch=watch)
    assert chain.succeeded, chain.failure + chain.log_tail()
    assert "--time-budget" in chain.steps[1].args and "--preset" in chain.steps[1].args
    models = {}
    for name, other in ((CPU_CONFIGURATION, "2d"), ("2d", CPU_CONFIGURATION)):
        models[name] = root / f"model_{name}"
        shutil.copytree(work / "model", models[name])
        shutil.rmtree(models[name] / other)
    return dataset, work, models, seen


def test_auto_is_3d_cpu_on_a_cpu_and_the_plan_offers_it_with_an_epoch_time(trained):
    _, work, _, _ = trained
    assert commands.resolve_configuration(commands.AUTO, "cpu") == "3d_cpu"
    assert commands.resolve_configuration(commands.AUTO, "cuda") == "3d_fullres"
    assert "3d_cpu with the quick schedule" in commands.describe_auto("cpu")
    assert "3d_fullres with the paper schedule" in commands.describe_auto("cuda")
    offers = {o.configuration: o for o in commands.plan_offers(work)}
    assert {"3d_cpu", "2d", "3d_fullres"} <= set(offers)
    # 3d_cpu is sized for a CPU: far cheaper per epoch than 3d_fullres (tiny test networks aside)
    assert 0 < offers["3d_cpu"].cpu_seconds_per_epoch < offers["3d_fullres"].cpu_seconds_per_epoch


def test_training_progress_never_moves_back_and_has_an_eta_after_the_first_epoch(trained):
    *_, seen = trained
    shown = [p for p, _, _ in seen if p is not None]
    assert shown and all(b >= a for a, b in zip(shown, shown[1:])), shown
    assert any(eta is not None for _, eta, epochs in seen if epochs >= 1)


@pytest.mark.parametrize("configuration", ["3d_cpu", "2d"])
def test_a_single_configuration_model_predicts_without_being_told_which(trained, configuration, scene):
    _, _, models, _ = trained
    (volume,), _ = testing.phantom_case(scene, seed=5, index=1, name="new patient")
    session = Session(scene, env=ENV, log_dir=models[configuration].parent / f"logs_{configuration}")
    chain = session.start_prediction([volume], models[configuration], None, tta=False, device="cpu", uncertainty=False)
    assert session.prediction_choice.configurations == [configuration]
    assert "-c" not in chain.find("predict").args if chain.find("predict") else True  # the engine applies the rule
    wait(session)
    assert chain.succeeded, chain.failure + chain.log_tail()
    content = session.prediction_result.segmentation.GetSegmentation()
    assert content.GetNumberOfSegments() == 5
    predict = chain.find("predict")
    fractions = [e["done"] / e["of"] for e in predict.events if e.get("event") == "progress" and e.get("of")]
    assert fractions and fractions[-1] == 1.0


def test_a_model_with_two_configurations_and_no_plan_is_refused_before_any_process(trained, scene):
    _, work, _, _ = trained
    (volume,), _ = testing.phantom_case(scene, seed=5, index=1)
    session = Session(scene, env=ENV, log_dir=work / "logs_refused")
    with pytest.raises(ValueError, match="several configurations are trained .*-c 2d or -c 3d_cpu"):
        session.start_prediction([volume], work / "model", None, device="cpu")
    assert session.prediction is None
    assert session.start_prediction([volume], work / "model", "2d", tta=False, device="cpu",
                                    uncertainty=False).find("predict") is None  # the input is still being written
    session.stop()
    wait(session)


def big_case(scene, shape=(200, 256, 256)):
    """A phantom patient resampled to ``shape`` voxels (same body, finer spacing), with its segmentation."""
    from scipy import ndimage

    from AutoSegLib.imageio import Geometry
    from AutoSegLib.synthetic import label_table, make_case

    case = make_case("ct", 5, 2, None)
    factors = [s / o for s, o in zip(shape, case.images[0].shape)]
    image = ndimage.zoom(case.images[0], factors, order=0)
    label = ndimage.zoom(case.label, factors, order=0)
    geometry = Geometry(tuple(s / f for s, f in zip(case.geometry.spacing, factors)), case.geometry.origin,
                        case.geometry.direction)
    volume = volumes.add_volume(scene, image, geometry, "big patient")
    return volume, testing.segmentation_from_array(scene, label, geometry, label_table("ct"), "big patient labels")


def test_add_case_and_predict_on_a_256x256x200_volume_keep_the_gui_thread_free(trained, scene, tmp_path):
    """Every piece of GUI-thread work of Add case and Predict: the button's call, each timer poll
    while files are written and the engine runs, and the poll that puts the result in the scene.
    (The engine's own prediction of so large a volume is not waited for: it runs in its process.)"""
    _, _, models, _ = trained
    volume, segmentation = big_case(scene)
    assert volumes.array_from_node(volume).shape == (200, 256, 256)
    session = Session(scene, env=ENV, log_dir=tmp_path / "logs")

    started = time.monotonic()
    job = session.start_add_case(tmp_path / "Dataset950_Big", [volume], segmentation, ["CT"])
    add_call = time.monotonic() - started
    add_poll = wait(session)
    assert job.succeeded, job.failure
    result, _ = job.result
    assert result.case_ids == ["big_patient"] and (tmp_path / "Dataset950_Big/labelsTr/big_patient.nii.gz").is_file()

    started = time.monotonic()
    chain = session.start_prediction([volume], models[CPU_CONFIGURATION], None, tta=False, device="cpu",
                                     uncertainty=False)
    predict_call = time.monotonic() - started
    predict_poll = wait(session, watch=lambda: chain.find("predict") is not None and chain.kill())
    assert chain.find("predict") is not None, chain.failure  # the input was written; the engine had started

    # the last poll of a prediction: its result (read in a worker) into the scene
    label = dataset_export_label(tmp_path / "Dataset950_Big")
    reading = ThreadJob(lambda job: results.read_outputs(tmp_path / "Dataset950_Big" / "labelsTr", "big_patient",
                                                         models[CPU_CONFIGURATION], False), "read").start()
    testing.wait_until(reading, timeout=120)
    started = time.monotonic()
    loaded = results.outputs_into_scene(scene, reading.result, volume)
    into_scene = time.monotonic() - started
    assert np.array_equal(dataset_export.rasterize(scene, loaded.segmentation, volume)[0] > 0, label > 0)
    print(f"GUI thread: add case {add_call:.3f} s + longest poll {add_poll:.3f} s; predict {predict_call:.3f} s + "
          f"longest poll {predict_poll:.3f} s; result into the scene {into_scene:.3f} s")
    assert max(add_call, add_poll, predict_call, predict_poll, into_scene) < GUI_LIMIT_S, \
        (add_call, add_poll, predict_call, predict_poll, into_scene)


def dataset_export_label(dataset):
    from AutoSegLib.imageio import read_image

    return read_image(dataset / "labelsTr" / "big_patient.nii.gz")[0]



def test_the_cpu_time_estimate_counts_kernel_taps_so_a_2d_plan_is_not_priced_as_3d():
    three_d = {"patch_size": [16, 96, 96], "strides": [[1, 1, 1], [2, 2, 2]], "kernel_sizes": [[3, 3, 3]] * 2,
               "features_per_stage": [16, 32], "batch_size": 2}
    work = commands.convolution_work
    # stage 0: 16 x 96 x 96 voxels x 16^2 features; stage 1: 8 x 48 x 48 x 32^2
    assert work(three_d) == 147_456 * 256 + 18_432 * 1024
    # an in-plane first stage (1 x 3 x 3, anisotropic data) does a third of that stage's work
    assert work({**three_d, "kernel_sizes": [[1, 3, 3], [3, 3, 3]]}) == 147_456 * 256 / 3 + 18_432 * 1024
    two_d = {"patch_size": [96, 96], "strides": [[1, 1], [2, 2]], "kernel_sizes": [[3, 3]] * 2,
             "features_per_stage": [16, 32], "batch_size": 2}
    assert work(two_d) == pytest.approx((9_216 * 256 + 2_304 * 1024) / 3, rel=1e-12)
    # a plans.json without kernel sizes is priced as 3x3x3 throughout, as before
    assert work({k: v for k, v in three_d.items() if k != "kernel_sizes"}) == work(three_d)
    # the same slice priced with 3x3x3 kernels would cost 3x the work
    as_3d = {**two_d, "kernel_sizes": [[3, 3, 3]] * 2}
    assert work(as_3d) == pytest.approx(3 * work(two_d), rel=1e-12)
    assert commands.cpu_seconds_per_iteration(two_d) < commands.cpu_seconds_per_iteration(as_3d)
