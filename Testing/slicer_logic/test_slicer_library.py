""""Use a model": the models folder and its registry, model cards, importing a zip with the engine,
and predicting with an imported model or an nnU-Net v2 folder into a real MRML scene.

The AutoSeg model is written in code (tiny plans, random weights saved as real checkpoints, one
fold validated) and exported with ``autoseg export-model``; what is tested is where files,
names and segments go, not how good the network is.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from AutoSegLib.cli import main as autoseg
from AutoSegLib.fileutil import read_json, write_json
from AutoSegLib.imageio import Geometry
from AutoSegLogic import commands, library, terminology, testing
from AutoSegLogic.library import LibraryError, ModelLibrary
from AutoSegLogic.session import Session
from AutoSegLogic.volumes import add_volume

pytestmark = pytest.mark.skipif(not commands.engine_flags("import-model"), reason="the engine has no import-model")

REPO = Path(__file__).resolve().parents[2]
NNUNET = REPO / "Testing" / "data" / "nnunet_v2" / "ct_3d_fullres"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
LABELS = {"background": 0, "liver": 1, "spleen": 2, "blob": 3}  # two standard structures, one of the user's
CONFIG = {"spacing": [2.0, 1.0, 1.0], "patch_size": [8, 16, 16], "batch_size": 2,
          "median_image_size_in_voxels": [8, 16, 16], "strides": [[1, 1, 1], [2, 2, 2]],
          "kernel_sizes": [[3, 3, 3]] * 2, "features_per_stage": [4, 8], "n_conv_per_stage_encoder": [1, 1],
          "n_conv_per_stage_decoder": [1], "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
          "resampling": {"image_order": 3, "label_order": 1, "label_encoding": "one_hot",
                         "separate_z_anisotropy_threshold": 3.0, "out_of_plane_order": 0,
                         "separate_z_for_typical_case": False},
          "network": {"architecture": "PlainConvUNet"}}


def make_model(root: Path) -> Path:
    """WORK/model: 3d_fullres fold 0 with random weights and a validation summary."""
    import torch

    from AutoSegLib.network import build_network
    from AutoSegLib.models.checkpoint import save_checkpoint

    model = root / "Dataset950_Abdomen.autoseg" / "model"
    plans = {"version": 1, "dataset_name": "Dataset950_Abdomen", "gpu_memory_gb": 8.0,
             "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "num_training_cases": 4,
             "channel_names": {"0": "CT"}, "labels": LABELS, "num_classes": len(LABELS),
             "original_median_spacing": [2.0, 1.0, 1.0], "original_median_shape": [12, 24, 24],
             "foreground_intensity_properties_per_channel": {"0": {
                 "mean": 60.0, "std": 40.0, "median": 60.0, "min": -100.0, "max": 300.0,
                 "percentile_00_5": -50.0, "percentile_99_5": 250.0}},
             "configurations": {"3d_fullres": CONFIG}}
    write_json(model / "plans.json", plans)
    write_json(model / "dataset.json", {"channel_names": {"0": "CT"}, "labels": LABELS, "numTraining": 4,
                                        "file_ending": ".nii.gz"})
    torch.manual_seed(0)
    with torch.no_grad():
        network = build_network(CONFIG, 1, len(LABELS))
        save_checkpoint(model / "3d_fullres" / "fold_0" / "checkpoint_final.pt",
                        {"network_weights": network.state_dict(), "epoch": 1})
    write_json(model / "3d_fullres" / "fold_0" / "validation" / "summary.json",
               {"version": 1, "mean": {"liver": {"Dice": 0.9}, "spleen": {"Dice": 0.8}, "blob": {"Dice": 0.4}},
                "foreground_mean": {"Dice": 0.7}})
    return model


@pytest.fixture(scope="module")
def model_zip(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("source")
    model = make_model(root)
    archive = root / "abdomen.zip"
    assert autoseg(["export-model", str(model), str(archive), "--notes", "random weights; a test"]) == 0
    return model, archive


def ct_volume(scene, name: str = "patient"):
    rng = np.random.default_rng(1)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s) for s in (10, 20, 18)], indexing="ij")
    image = (150 * (z ** 2 + y ** 2 + x ** 2 < 0.4) + rng.normal(0, 10, z.shape)).astype(np.int16)
    return add_volume(scene, image, Geometry((2.0, 1.0, 1.0), (3.0, -5.0, 7.0), tuple(np.eye(3).ravel())), name)


def segments(node) -> list:
    content = node.GetSegmentation()
    return [content.GetNthSegment(i) for i in range(content.GetNumberOfSegments())]


def test_an_imported_zip_is_registered_shown_and_applied_to_a_volume(model_zip, tmp_path, scene):
    _, archive = model_zip
    models = tmp_path / "AutoSegModels"
    lib = ModelLibrary(models)
    session = Session(scene, env=ENV, log_dir=tmp_path / "logs")
    job = session.start_import_model(lib, archive)
    assert job.args[:2] == ["import-model", str(archive)]  # the engine unpacks it, in its own process
    testing.wait_until(session, timeout=120)
    assert job.succeeded, job.failure + "\n" + job.log_tail()
    entry = session.imported
    assert entry.name == "abdomen" and entry.kind == library.AUTOSEG_ZIP
    assert lib.path_of("abdomen") == models / "abdomen" and (models / "abdomen" / "model_card.json").is_file()

    card = lib.card("abdomen")
    assert card.channels == ["CT"] and card.structures == ["liver", "spleen", "blob"]
    assert list(card.configurations) == ["3d_fullres"] and card.configurations["3d_fullres"]["folds"] == [0]
    text = card.text()
    for expected in ("random weights; a test", "CT in Hounsfield units", "liver (1)", "blob (3)",
                     "Configuration 3d_fullres: folds 0", "CV Dice 0.700", "Predicts with: 3d_fullres"):
        assert expected in text, (expected, text)

    # a new logic object (Slicer restarted) reads the same registry
    again = ModelLibrary(models)
    assert [(m.name, m.kind) for m in again.models()] == [("abdomen", library.AUTOSEG_ZIP)]
    # the same zip again: refused, naming the entry
    with pytest.raises(LibraryError, match="already imported as 'abdomen'"):
        session.start_import_model(again, archive)

    volume = ct_volume(scene)
    with pytest.raises(LibraryError, match="expects 1 channel"):
        again.start_prediction(session, "abdomen", [volume, volume])
    chain = again.start_prediction(session, "abdomen", [volume], tta=False, device="cpu")
    testing.wait_until(session, timeout=120)
    assert chain.succeeded, chain.failure + "\n" + chain.log_tail()
    node = session.prediction_result.segmentation
    assert node.GetName() == "patient abdomen"
    found = segments(node)
    assert [s.GetName() for s in found] == ["liver", "spleen", "blob"]
    liver, blob = terminology.segment_entry(found[0]), terminology.segment_entry(found[2])
    assert liver["type"][:2] == ["SCT", "10200004"]  # SNOMED CT: liver, as for the module's own models
    assert blob is None or blob.get("type", [None, None])[1] != "10200004"
    assert node.GetNodeReference("referenceImageGeometryRef") is volume

    # removing an imported model deletes its folder (it lives in the models folder)
    again.remove("abdomen")
    assert not (models / "abdomen").exists() and ModelLibrary(models).models() == []


def test_a_bad_zip_is_refused_with_the_engines_message_and_leaves_nothing(model_zip, tmp_path, scene):
    _, archive = model_zip
    bad = tmp_path / "tampered.zip"
    with zipfile.ZipFile(archive) as source, zipfile.ZipFile(bad, "w") as out:
        for info in source.infolist():
            data = source.read(info)
            out.writestr(info, data.replace(b'"liver"', b'"livex"') if info.filename == "dataset.json" else data)
    models = tmp_path / "AutoSegModels"
    lib = ModelLibrary(models)
    session = Session(scene, env=ENV, log_dir=tmp_path / "logs")
    job = session.start_import_model(lib, bad)
    testing.wait_until(session, timeout=120)
    assert job.status == "failed"
    assert job.failure.startswith(f"{bad}: entry 'dataset.json': SHA-256") and "\n" not in job.failure
    assert session.imported is None and lib.models() == []
    assert sorted(p.name for p in models.iterdir()) == []  # no model folder, no temporary one, no registry
    # a kill during an import can leave the engine's temporary folder: discarding the import removes it
    (models / ".tmp-0123abcd-tampered").mkdir()
    lib.discard_import("tampered")
    assert list(models.iterdir()) == []
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(LibraryError, match="not a .zip"):
        lib.import_step(tmp_path / "notes.txt")


def test_folders_are_registered_by_reference_once(model_zip, tmp_path):
    model, _ = model_zip
    lib = ModelLibrary(tmp_path / "AutoSegModels")
    entry = lib.register_folder(model.parent)  # WORK: its model/ is found
    assert (entry.name, entry.kind, Path(entry.path)) == ("Dataset950_Abdomen", library.AUTOSEG_FOLDER, model)
    assert not any(p.is_dir() for p in lib.folder.iterdir())  # nothing copied
    with pytest.raises(LibraryError, match="already in the models list as 'Dataset950_Abdomen'"):
        lib.register_folder(model)
    card = lib.card(entry.name)  # no model_card.json: built from the folder's files
    assert card.structures == ["liver", "spleen", "blob"]
    assert card.configurations["3d_fullres"]["cross_validation"]["mean_over_folds"]["mean_foreground_dice"] == 0.7
    assert "CV Dice 0.700 (liver 0.900, spleen 0.800, blob 0.400)" in card.text()
    registry = read_json(lib.registry_path)
    assert registry["version"] == 1 and set(registry["models"][0]) >= {"name", "path", "kind", "added"}
    lib.remove(entry.name)
    assert model.is_dir() and lib.models() == []  # a registered folder is the user's: only forgotten
    with pytest.raises(LibraryError, match="not a model folder"):
        lib.register_folder(tmp_path)


def test_an_nnunet_v2_folder_is_registered_shows_its_card_and_predicts(tmp_path, scene):
    lib = ModelLibrary(tmp_path / "AutoSegModels")
    entry = lib.register_folder(NNUNET)  # the dataset's results folder
    assert entry.kind == library.NNUNET_FOLDER
    with pytest.raises(LibraryError, match="already in the models list"):
        lib.register_folder(NNUNET)
    card = lib.card(entry.name)
    assert card.channels == ["CT"]
    assert card.structures == ["liver", "spleen", "kidneys", "aorta", "liver_lesion"]
    assert card.configurations["3d_fullres"]["folds"] == [0]
    text = card.text()
    assert "CT in Hounsfield units" in text and "CV Dice: not known" in text and "Predicts with: 3d_fullres" in text
    # the trained model folder itself is another reference to the same model's files: allowed, named apart
    inner = lib.register_folder(NNUNET / "nnUNetTrainer__nnUNetPlans__3d_fullres")
    assert inner.name != entry.name and lib.card(inner.name).structures == card.structures

    from AutoSegLib.imageio import read_image

    image, geometry = read_image(NNUNET / "imagesTs" / "phantom_ct_test_000_0000.nii.gz")
    volume = add_volume(scene, image, geometry, "ct test")
    session = Session(scene, env=ENV, log_dir=tmp_path / "logs")
    chain = lib.start_prediction(session, entry.name, [volume], tta=False, device="cpu")
    testing.wait_until(session, timeout=120)
    assert chain.succeeded, chain.failure + "\n" + chain.log_tail()
    assert chain.find("predict").args[chain.find("predict").args.index("-m") + 1] == str(NNUNET.resolve())
    assert [s.GetName() for s in segments(session.prediction_result.segmentation)] == card.structures


def test_an_nnunet_folder_with_a_feature_autoseg_does_not_reproduce_is_refused_by_name(tmp_path):
    folder = tmp_path / "Dataset981_PhantomCT" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    shutil.copytree(NNUNET / folder.name, folder, ignore=shutil.ignore_patterns("*.pth"))
    (folder / "fold_0" / "checkpoint_final.pth").write_bytes(b"")  # only its presence is looked at here
    plans = read_json(folder / "plans.json")
    plans["configurations"]["3d_fullres"]["normalization_schemes"] = ["NoNormalization"]
    write_json(folder / "plans.json", plans)
    lib = ModelLibrary(tmp_path / "AutoSegModels")
    with pytest.raises(LibraryError, match="NoNormalization"):
        lib.register_folder(folder)
    assert lib.models() == []


def test_an_unusable_registry_is_reported_not_overwritten(tmp_path):
    models = tmp_path / "AutoSegModels"
    models.mkdir()
    (models / library.REGISTRY_FILE).write_text("[1, 2]")
    with pytest.raises(LibraryError, match="not an AutoSeg models registry"):
        ModelLibrary(models).register_folder(NNUNET)
    assert (models / library.REGISTRY_FILE).read_text() == "[1, 2]"
    (models / library.REGISTRY_FILE).write_text('{"version": 2, "models": []}')
    with pytest.raises(LibraryError, match="registry version 2 is not supported"):
        ModelLibrary(models).models()
    shutil.rmtree(models)
