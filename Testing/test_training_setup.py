"""Everything decided before the first iteration (AutoSegLib/training/setup.py): device, folds,
preprocessed data, configurations, run folders. No training happens here."""

from __future__ import annotations

import json
import os

import pytest
import torch

from AutoSegLib.models.device import DeviceError, resolve_device

from AutoSegLib.events import Reporter
from AutoSegLib.plan_dataset import plan_dataset
from AutoSegLib.preprocessing import storage
from AutoSegLib.preprocessing.runner import preprocess_dataset
from AutoSegLib.training.setup import (TrainingSetupError, TrainOptions, check_preprocessed, check_run_folder,
                                       configure_cpu_threads, fold_cases, setup_run)
from AutoSegLib.training.splits import SplitsError
from conftest import box_case, write_dataset

CASES = [f"case_{i}" for i in range(5)]


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """Five small box cases, planned and preprocessed for 3d_fullres: (dataset, work)."""
    root = tmp_path_factory.mktemp("setup")
    dataset = write_dataset(root / "Dataset002_Box", {c: box_case(shape=(8, 16, 16), seed=i)
                                                      for i, c in enumerate(CASES)})
    work = root / "work"
    quiet = Reporter(quiet=True)
    plan_dataset(dataset, work, num_processes=1, reporter=quiet, guidance="off")
    preprocess_dataset(dataset, work, ["3d_fullres"], num_processes=1, reporter=quiet)
    return dataset, work


@pytest.fixture
def spec(planned):
    from AutoSegLib.dataset import open_dataset

    return open_dataset(planned[0]).spec


# -- devices (AutoSegLib/models/device.py: one rule for training and inference) ------------
def test_cpu_and_auto_resolve_to_the_cpu_on_this_machine():
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert resolve_device("auto") == torch.device("cpu")
    else:  # pragma: no cover - the test machine has no GPU; keep the test honest elsewhere
        assert resolve_device("auto").type in ("cuda", "mps")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_clear_error_pointing_to_the_cpu():
    with pytest.raises(DeviceError, match=r"--device cuda: no usable CUDA GPU.*--device cpu"):
        resolve_device("cuda")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="needs a machine without Apple's MPS")
def test_mps_without_apple_metal_is_an_error():
    with pytest.raises(DeviceError, match="mps"):
        resolve_device("mps")


def test_unknown_device_lists_the_choices():
    with pytest.raises(DeviceError, match="auto, cuda, mps, cpu"):
        resolve_device("tpu")


def test_cpu_threads_follow_an_explicit_omp_num_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert configure_cpu_threads() == 1 and torch.get_num_threads() == 1
        monkeypatch.delenv("OMP_NUM_THREADS")
        cores = len(os.sched_getaffinity(0))
        assert configure_cpu_threads() == cores and torch.get_num_threads() == cores
    finally:
        torch.set_num_threads(before)


# -- folds ---------------------------------------------------------------------------------
def test_fold_0_comes_from_splits_final_which_is_made_once_and_reused(tmp_path, spec):
    messages = []
    train, val = fold_cases(tmp_path, CASES, "0", spec, log=messages.append)
    splits_file = tmp_path / "splits_final.json"
    assert splits_file.is_file() and len(messages) == 1 and "created 5 folds" in messages[0]
    assert len(val) == 1 and len(train) == 4 and set(train) | set(val) == set(CASES) and not set(train) & set(val)
    written = splits_file.read_bytes()
    # Every fold validates on different cases, together on all of them.
    vals = [fold_cases(tmp_path, CASES, str(f), spec, log=messages.append)[1] for f in range(5)]
    assert sorted(c for v in vals for c in v) == sorted(CASES)
    assert fold_cases(tmp_path, CASES, "0", spec) == (train, val)  # reused, not reshuffled
    assert splits_file.read_bytes() == written and len(messages) == 1


def test_fold_all_trains_and_validates_on_every_case_without_a_splits_file(tmp_path, spec):
    train, val = fold_cases(tmp_path, list(reversed(CASES)), "all", spec)
    assert train == val == sorted(CASES)
    assert not (tmp_path / "splits_final.json").exists()


@pytest.mark.parametrize("fold, message", [("5", r"fold 5 does not exist; the splits have folds 0\.\.4"),
                                           ("x", "fold must be a number"), ("-1", "fold must be a number")])
def test_a_fold_that_does_not_exist_is_refused(tmp_path, spec, fold, message):
    with pytest.raises(SplitsError, match=message):
        fold_cases(tmp_path, CASES, fold, spec)


# -- preprocessed data ---------------------------------------------------------------------
def test_missing_preprocessed_cases_are_named_with_the_command_that_makes_them(planned, tmp_path):
    dataset, work = planned
    folder = work / "preprocessed" / "3d_fullres"
    check_preprocessed(folder, CASES, "3d_fullres", dataset)  # complete: no error
    with pytest.raises(TrainingSetupError) as info:
        check_preprocessed(folder, CASES + ["case_9"], "3d_fullres", dataset)
    assert "1 case(s) not preprocessed" in str(info.value) and "case_9" in str(info.value)
    assert f"autoseg preprocess {dataset} -c 3d_fullres" in str(info.value)
    many = [f"extra_{i}" for i in range(7)]
    with pytest.raises(TrainingSetupError, match=r"7 case\(s\).*extra_0, extra_1, extra_2, extra_3, extra_4 and 2 more"):
        check_preprocessed(folder, many, "3d_fullres", dataset)


def test_setup_run_names_a_case_whose_preprocessed_data_is_gone(planned, tmp_path):
    import shutil

    dataset, work = planned
    copy = tmp_path / "work"
    shutil.copytree(work, copy)
    storage.paths(copy / "preprocessed" / "3d_fullres", "case_3")["properties"].unlink()
    with pytest.raises(TrainingSetupError, match="case_3"):
        setup_run(dataset, copy, TrainOptions("3d_fullres", "all"))
    assert not (copy / "model").exists()


# -- configurations ------------------------------------------------------------------------
def test_unknown_configuration_lists_the_planned_ones(planned):
    dataset, work = planned
    with pytest.raises(TrainingSetupError, match=r"'3d_highres' is not in the plans; planned: 2d, 3d_fullres"):
        setup_run(dataset, work, TrainOptions("3d_highres", "0"))


def test_cascade_is_refused_with_the_reason(planned):
    dataset, work = planned
    with pytest.raises(TrainingSetupError, match=r"3d_cascade_fullres training needs the 3d_lowres predictions"):
        setup_run(dataset, work, TrainOptions("3d_cascade_fullres", "0"))


def test_setup_run_resolves_folders_schedule_and_classes(planned):
    dataset, work = planned
    run = setup_run(dataset, work, TrainOptions("3d_fullres", "00", preset="quick", epochs=3))
    try:
        assert run.run_folder == work / "model" / "3d_fullres" / "fold_0"  # "00" is fold 0, one folder
        assert run.run_folder.is_dir()
        assert json.loads((work / "model" / "plans.json").read_text()) == json.loads((work / "plans.json").read_text())
        assert json.loads((work / "model" / "dataset.json").read_text())["labels"] == {"background": 0, "organ": 1}
        assert (run.schedule.epochs, run.schedule.iterations_per_epoch) == (3, 25)
        assert run.n_classes == 2 and run.n_input_channels == 1 and run.ignore_label is None
        assert len(run.train_cases) == 4 and len(run.val_cases) == 1
    finally:
        import shutil

        shutil.rmtree(work / "model")


# -- run folders ---------------------------------------------------------------------------
def test_resume_without_a_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    run_folder = tmp_path / "fold_0"
    with pytest.raises(TrainingSetupError, match="nothing to resume.*run without --resume"):
        check_run_folder(run_folder, TrainOptions("3d_fullres", "0", resume=True))
    run_folder.mkdir()
    (run_folder / "training_log.jsonl").write_text('{"epoch": 0}\n')  # killed before its first save
    with pytest.raises(TrainingSetupError, match="nothing to resume"):
        check_run_folder(run_folder, TrainOptions("3d_fullres", "0", resume=True))
    assert (run_folder / "training_log.jsonl").read_text() == '{"epoch": 0}\n'


def test_a_trained_fold_is_never_overwritten_without_overwrite(tmp_path):
    run_folder = tmp_path / "fold_0"
    run_folder.mkdir()
    (run_folder / "checkpoint_final.pt").write_bytes(b"weights")
    with pytest.raises(TrainingSetupError, match=r"checkpoint_final\.pt.*--resume.*--overwrite"):
        check_run_folder(run_folder, TrainOptions("3d_fullres", "0"))
    assert (run_folder / "checkpoint_final.pt").read_bytes() == b"weights"
    check_run_folder(run_folder, TrainOptions("3d_fullres", "0", resume=True))  # resuming keeps it
    assert (run_folder / "checkpoint_final.pt").read_bytes() == b"weights"
    check_run_folder(run_folder, TrainOptions("3d_fullres", "0", overwrite=True))
    assert run_folder.is_dir() and not any(run_folder.iterdir())


def test_a_refused_run_leaves_the_model_folder_untouched(planned, tmp_path):
    """Refusing happens before model/plans.json is written: it still describes the trained weights."""
    import shutil

    dataset, work = planned
    copy = tmp_path / "work"
    shutil.copytree(work, copy)
    run = setup_run(dataset, copy, TrainOptions("3d_fullres", "1"))
    (run.run_folder / "checkpoint_final.pt").write_bytes(b"weights")
    model_plans = copy / "model" / "plans.json"
    model_plans.write_text('{"the": "plans the weights were trained with"}')
    with pytest.raises(TrainingSetupError, match="--overwrite"):
        setup_run(dataset, copy, TrainOptions("3d_fullres", "1"))
    assert model_plans.read_text() == '{"the": "plans the weights were trained with"}'


def test_a_time_budget_sets_the_quick_schedules_length_and_nothing_else():
    from AutoSegLib.training.schedule import PAPER
    from AutoSegLib.training.setup import TrainOptions, budget_epochs

    assert budget_epochs("quick", TrainOptions("3d_cpu", "0")) is None  # the preset's own epochs
    assert budget_epochs("quick", TrainOptions("3d_cpu", "0", time_budget_min=10)) == PAPER.epochs  # fitted later
    assert budget_epochs("quick", TrainOptions("3d_cpu", "0", time_budget_min=10, epochs=7)) == 7  # as given
    assert budget_epochs("paper", TrainOptions("3d_cpu", "0", time_budget_min=10)) is None
