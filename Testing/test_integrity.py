"""Checksums: damage that leaves a file readable is found on load and handled like a broken file.

Checkpoints carry a CRC-32 of their content inside the file; a mismatch makes resuming fall
back to the previous checkpoint, naming the damaged one. Preprocessed arrays have theirs in the
case's properties file; a mismatch makes `preprocess` redo the case and training refuse it.
"""

from __future__ import annotations

import json
import shutil
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from test_training_checkpoint import make_state

from AutoSegLib.plan_dataset import plan_dataset
from AutoSegLib.preprocessing import storage
from AutoSegLib.preprocessing.runner import preprocess_dataset
from AutoSegLib.models.checkpoint import (
    CHECKSUM_KEY,
    LATEST,
    CheckpointError,
    content_checksum,
    find_resume_checkpoint,
    load_checkpoint,
    previous_path,
    save_checkpoint,
)
from AutoSegLib.training.data import PatchSampler, SampleError, batch_rng, make_batch


def flip_bytes(path: Path, offset: int, count: int = 1) -> None:
    """Invert ``count`` bytes in place: same size, and (with a ns clock) usually another mtime."""
    with open(path, "r+b") as handle:
        handle.seek(offset)
        data = handle.read(count)
        handle.seek(offset)
        handle.write(bytes(b ^ 0xFF for b in data))


def tensor_record_offset(path: Path) -> tuple[int, int]:
    """Where the largest tensor's bytes start inside a torch zip file, and how many there are."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "rb") as handle:
        handle.seek(info.header_offset + 26)
        name_length, extra_length = np.frombuffer(handle.read(4), "<u2")
    return info.header_offset + 30 + int(name_length) + int(extra_length), info.file_size


# -- checkpoints -------------------------------------------------------------------------------
def test_a_flipped_byte_in_a_checkpoint_tensor_falls_back_to_the_previous_checkpoint(tmp_path):
    save_checkpoint(tmp_path / LATEST, make_state(epoch=1, seed=1))
    save_checkpoint(tmp_path / LATEST, make_state(epoch=2, seed=2))
    offset, size = tensor_record_offset(tmp_path / LATEST)
    flip_bytes(tmp_path / LATEST, offset + size // 2)
    assert zipfile.ZipFile(tmp_path / LATEST).namelist()  # still a readable zip: only the checksum can tell

    with pytest.raises(CheckpointError, match=rf"{LATEST}: damaged: its content does not match the checksum"):
        load_checkpoint(tmp_path / LATEST)
    path, state, skipped = find_resume_checkpoint(tmp_path)
    assert path == previous_path(tmp_path / LATEST) and state["epoch"] == 1
    assert [p.name for p, _ in skipped] == [LATEST] and "damaged" in skipped[0][1]


def test_damage_to_many_bytes_of_the_optimizer_state_is_found(tmp_path):
    save_checkpoint(tmp_path / LATEST, make_state(epoch=3))
    with zipfile.ZipFile(tmp_path / LATEST) as archive:
        records = [i for i in archive.infolist() if "/data/" in i.filename]
    for info in records:  # every tensor record: weights and momentum
        with open(tmp_path / LATEST, "rb") as handle:
            handle.seek(info.header_offset + 26)
            name_length, extra_length = np.frombuffer(handle.read(4), "<u2")
        flip_bytes(tmp_path / LATEST, info.header_offset + 30 + int(name_length) + int(extra_length), info.file_size)
    with pytest.raises(CheckpointError, match="damaged"):
        load_checkpoint(tmp_path / LATEST)


def test_an_old_checkpoint_without_a_checksum_loads_without_a_warning(tmp_path):
    state = make_state(epoch=4)
    torch.save({**state, "checkpoint_version": 1}, tmp_path / LATEST)  # as written before checksums
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load_checkpoint(tmp_path / LATEST)
    assert loaded["epoch"] == 4 and CHECKSUM_KEY not in loaded


def test_the_checksum_is_inside_the_file_and_not_in_the_loaded_state(tmp_path):
    state = make_state(epoch=5)
    save_checkpoint(tmp_path / LATEST, state)
    raw = torch.load(tmp_path / LATEST, weights_only=True)
    assert raw[CHECKSUM_KEY] == content_checksum(raw)
    assert CHECKSUM_KEY not in load_checkpoint(tmp_path / LATEST)
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST]  # nothing stored beside it


def test_the_content_checksum_sees_values_keys_and_dtypes_but_not_dict_order():
    state = {"epoch": 3, "w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "logs": [0.5, 0.25]}
    base = content_checksum(state)
    assert content_checksum(dict(reversed(list(state.items())))) == base
    assert content_checksum({**state, "w": state["w"].t().contiguous().t()}) == base  # same values, other layout
    assert content_checksum({**state, "epoch": 4}) != base
    assert content_checksum({**state, "logs": [0.5, 0.125]}) != base
    assert content_checksum({**state, "w": state["w"].double()}) != base
    assert content_checksum({"epoch": 3, "v": state["w"], "logs": [0.5, 0.25]}) != base


# -- preprocessed cases ------------------------------------------------------------------------
def tiny_case(folder: Path, case_id: str = "c") -> None:
    rng = np.random.default_rng(0)
    data = rng.normal(size=(1, 6, 10, 12)).astype(np.float32)
    seg = np.zeros((1, 6, 10, 12), np.int16)
    seg[0, 2:4, 3:7, 4:9] = 1
    fg = np.argwhere(seg[0] == 1)[:20]
    fg = np.concatenate([np.ones((len(fg), 1), int), fg], axis=1).astype(np.int32)
    storage.write_case(folder, case_id, data, seg, fg, {"shape_after_resampling": [6, 10, 12], "signature": "s"})


def test_a_same_size_overwrite_of_a_seg_array_makes_the_case_stale_and_unreadable(tmp_path):
    tiny_case(tmp_path)
    p = storage.paths(tmp_path, "c")
    recorded = json.loads(p["properties"].read_text())["checksums"]
    assert set(recorded) == {"data", "seg", "foreground"}
    assert recorded["seg"]["bytes"] == p["seg"].stat().st_size
    assert storage.is_current(tmp_path, "c", "s")

    flip_bytes(p["seg"], p["seg"].stat().st_size - 5)  # a label voxel, not the .npy header
    assert not storage.is_current(tmp_path, "c", "s")
    with pytest.raises(storage.DamagedCaseError, match=r"preprocessed case 'c' .*c_seg\.npy.*crc32.*"
                                                       r"rerun `autoseg preprocess`"):
        storage.open_case(tmp_path, "c")


def test_the_training_loader_refuses_a_damaged_case_naming_it(tmp_path):
    tiny_case(tmp_path, "case_7")
    p = storage.paths(tmp_path, "case_7")
    flip_bytes(p["data"], p["data"].stat().st_size - 17)
    sampler = PatchSampler(tmp_path, ["case_7"], (4, 8, 8), (4, 8, 8))
    with pytest.raises(SampleError, match=r"case 'case_7'.*damaged.*case_7\.npy.*rerun `autoseg preprocess`"):
        make_batch(sampler, NoAugmentation(), 2, batch_rng(0, 0))


class NoAugmentation:
    def seed(self, value: int) -> None:
        pass

    def __call__(self, image, seg):
        return image, [seg]


def test_a_case_written_before_checksums_opens_as_it_is(tmp_path):
    tiny_case(tmp_path)
    p = storage.paths(tmp_path, "c")
    properties = json.loads(p["properties"].read_text())
    del properties["checksums"]
    p["properties"].write_text(json.dumps(properties))
    assert storage.is_current(tmp_path, "c", "s")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        case = storage.open_case(tmp_path, "c")
    assert case.seg.shape == (1, 6, 10, 12)


def test_a_verified_file_is_read_once_per_process(tmp_path, monkeypatch):
    tiny_case(tmp_path)
    storage.open_case(tmp_path, "c")
    reads = []
    monkeypatch.setattr(storage, "file_checksum", lambda path: reads.append(path) or "0")
    storage.open_case(tmp_path, "c")  # the same files, unchanged: no second read
    assert reads == []
    assert not storage.is_current(tmp_path, "c", "s")  # preprocess always reads them again
    assert [path.name for path in reads] == ["c.npy", "c_seg.npy", "c_fg.npy"]


TINY = {"patch_size": [8, 16, 16], "strides": [[1, 1, 1], [2, 2, 2]], "kernel_sizes": [[3, 3, 3]] * 2,
        "features_per_stage": [4, 8], "n_conv_per_stage_encoder": [1, 1], "n_conv_per_stage_decoder": [1],
        "batch_size": 2}


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory):
    """Three tiny box cases, planned (3d_fullres with a tiny network) and preprocessed (in-process)."""
    from conftest import box_case, write_dataset

    root = tmp_path_factory.mktemp("integrity")
    dataset = write_dataset(root / "Dataset001_Tiny", {f"case_{i}": box_case(seed=i) for i in range(3)})
    plan_dataset(dataset, root / "work")
    plans = json.loads((root / "work" / "plans.json").read_text())
    plans["configurations"]["3d_fullres"].update(TINY)
    (root / "work" / "plans.json").write_text(json.dumps(plans))
    preprocess_dataset(dataset, root / "work", ["3d_fullres"], num_processes=1)
    return dataset, root / "work"


def test_training_resumes_from_the_previous_checkpoint_when_the_newest_is_damaged(preprocessed, tmp_path):
    from AutoSegLib.events import Reporter
    from AutoSegLib.training.setup import TrainOptions, setup_run
    from AutoSegLib.training.trainer import Trainer

    class Warnings(Reporter):
        def warning(self, stage, message, **fields):
            self.warned.append(message)

    dataset, work = preprocessed
    work = Path(shutil.copytree(work, tmp_path / "work"))
    options = {"epochs": 2, "iterations_per_epoch": 1, "num_workers": 0, "device": "cpu", "checkpoint_every_epochs": 1}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny network on a shared machine
    try:
        Trainer(setup_run(dataset, work, TrainOptions("3d_fullres", "all", **options))).fit()
        folder = work / "model" / "3d_fullres" / "fold_all"
        for name in ("checkpoint_final.pt", "checkpoint_best.pt", "checkpoint_best.prev.pt"):
            (folder / name).unlink(missing_ok=True)  # as if killed after epoch 2's latest
        latest = folder / LATEST
        offset, size = tensor_record_offset(latest)
        flip_bytes(latest, offset + size // 3, 8)

        reporter = Warnings(quiet=True)
        reporter.warned = []
        trainer = Trainer(setup_run(dataset, work, TrainOptions("3d_fullres", "all", resume=True, **options)),
                          reporter)
        assert trainer.restore() == previous_path(latest)
        assert trainer.epoch == 1
        assert len(reporter.warned) == 1 and str(latest) in reporter.warned[0] and "damaged" in reporter.warned[0]
    finally:
        torch.set_num_threads(threads)


def test_preprocess_redoes_a_case_whose_array_has_a_flipped_byte(preprocessed, tmp_path):
    dataset, work = preprocessed
    work = Path(shutil.copytree(work, tmp_path / "work"))
    folder = work / "preprocessed" / "3d_fullres"
    p = storage.paths(folder, "case_1")
    good = p["seg"].read_bytes()
    flip_bytes(p["seg"], len(good) - 3)
    with pytest.raises(storage.DamagedCaseError, match="case_1"):
        storage.open_case(folder, "case_1")

    summary = preprocess_dataset(dataset, work, ["3d_fullres"], num_processes=1)["3d_fullres"]
    assert (summary["processed"], summary["skipped"]) == (1, 2)
    assert p["seg"].read_bytes() == good  # redone: the same label map as before the damage
    assert storage.open_case(folder, "case_1").seg.shape[1:] == storage.open_case(folder, "case_1").data.shape[1:]


def test_prediction_refuses_a_damaged_checkpoint_naming_it(tmp_path):
    from test_inference_predictor import make_model_folder

    from AutoSegLib.inference import ModelCheckpointError
    from AutoSegLib.models.folder import ModelFolder

    model = make_model_folder(tmp_path, folds=(0,))
    path = model / "3d_fullres" / "fold_0" / "checkpoint_final.pt"
    offset, size = tensor_record_offset(path)
    flip_bytes(path, offset + size // 2, 4)
    folder = ModelFolder.open(model)
    assert folder.load_weights("2d", 0, "final")  # the undamaged one loads
    with pytest.raises(ModelCheckpointError, match=rf"{path}: damaged"):
        folder.load_weights("3d_fullres", 0, "final")
