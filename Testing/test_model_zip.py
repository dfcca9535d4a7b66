"""Sharing models as zips: export -> import round trip, the model card, and every refused archive.

The model folder is the predictor tests' hand-made one (tiny plans, random weights). Hostile
archives are made by rewriting the exported zip one way each; every refusal must be exit
status 1, one line naming the entry, and no folder (target or temporary) left behind.
"""

from __future__ import annotations

import io
import json
import shutil
import stat
import struct
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from test_inference_predictor import LABELS, blob_image, make_model_folder, oblique_geometry
from test_training_checkpoint import Payload

from AutoSegLib import __version__
from AutoSegLib.cli import main
from AutoSegLib.fileutil import read_json, write_json
from AutoSegLib.imageio import write_image
from AutoSegLib.inference import Predictor
from AutoSegLib.sharing import rules
from AutoSegLib.sharing.importer import copy_counted
from AutoSegLib.sharing.rules import SharingError, sha256_hex
from AutoSegLib.models.checkpoint import load_checkpoint

TERMINOLOGY = {"organ": {"category": ["SCT", "123037004", "Anatomical Structure"],
                         "type": ["SCT", "10200004", "Liver"], "color": [221, 130, 101]}}
FOLD_DICE = {0: {"organ": 0.8, "tumour": 0.4}, 1: {"organ": 0.9, "tumour": None}}
WEIGHTS = "3d_fullres/fold_0/weights.safetensors"


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def summary(dice: dict) -> dict:
    values = [v for v in dice.values() if v is not None]
    return {"version": 1, "mean": {name: {"Dice": value, "IoU": None} for name, value in dice.items()},
            "foreground_mean": {"Dice": sum(values) / len(values)}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """3d_fullres and 2d, folds 0 and 1; 3d_fullres validated and chosen by an inference plan."""
    plan = {"version": 1, "configurations": ["3d_fullres"], "folds": [0, 1], "checkpoint": "final",
            "postprocessing": {}, "cross_validation": {"3d_fullres": {"mean_foreground_dice": 0.7,
                                                                      "per_class": {"organ": 0.85, "tumour": 0.55}}}}
    model = make_model_folder(tmp_path_factory.mktemp("source"), inference_plan=plan)
    write_json(model / "dataset.json", {**read_json(model / "dataset.json"), "terminology": TERMINOLOGY})
    for fold, dice in FOLD_DICE.items():
        write_json(model / "3d_fullres" / f"fold_{fold}" / "validation" / "summary.json", summary(dice))
    write_json(model / "crossval" / "2d+3d_fullres.json", summary({"organ": 0.9, "tumour": 0.6}))  # find-best's
    write_json(model / "crossval" / "3d_fullres.postprocessed.json", summary({"organ": 0.86, "tumour": 0.5}))
    (model / "3d_fullres" / "fold_0" / "training_log.jsonl").write_text("{}\n")  # never exported
    return model


@pytest.fixture(scope="module")
def archive(model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zips") / "tiny.zip"
    assert main(["export-model", str(model_dir), str(out), "--notes", "phantom test model"]) == 0
    return out


# -- helpers --------------------------------------------------------------------------------
def entries_of(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as zf:
        return {name: zf.read(name) for name in zf.namelist()}


def manifest_of(files: dict[str, bytes], **changes) -> bytes:
    """A manifest that matches ``files`` (the manifest itself left out), with ``changes`` on top."""
    listed = {name: (len(data), sha256_hex(data)) for name, data in files.items() if name != rules.MANIFEST_FILE}
    manifest = rules.build_manifest(listed, "final", __version__, "2026-12-03T00:00:00Z")
    return json.dumps({**manifest, **changes}).encode()


def write_zip(path: Path, entries: list[tuple[str | zipfile.ZipInfo, bytes]], compress=zipfile.ZIP_STORED) -> Path:
    with warnings.catch_warnings(), zipfile.ZipFile(path, "w", compression=compress) as zf:
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate-name attack
        for name, data in entries:
            zf.writestr(name, data)
    return path


def rezip(archive: Path, out: Path, *, replace: dict | None = None, add: list | None = None, drop=(),
          fix_manifest: bool = True, **manifest_changes) -> Path:
    """``archive`` with entries replaced, added or dropped; the manifest redone to match (unless not)."""
    files = {name: data for name, data in entries_of(archive).items() if name not in drop}
    files.update(replace or {})
    if fix_manifest or manifest_changes:
        files[rules.MANIFEST_FILE] = manifest_of(files, **manifest_changes)
    return write_zip(out, [*files.items(), *(add or [])])


def assert_refused(path: Path, tmp_path: Path, capsys, entry: str) -> str:
    capsys.readouterr()
    target = tmp_path / "models" / "imported"
    assert main(["import-model", str(path), "-o", str(target)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ERROR: "), lines
    assert entry in lines[0], lines[0]
    assert not (tmp_path / "models").exists(), list((tmp_path / "models").rglob("*"))  # target, temp, parent
    return lines[0]


def predict(model: Path):
    predictor = Predictor.from_model_dir(model, device="cpu", tta=False)
    return predictor.predict([blob_image()], oblique_geometry(), return_probabilities=True)


# -- export and import ----------------------------------------------------------------------
def test_round_trip_predicts_identically(model_dir, archive, tmp_path):
    names = set(entries_of(archive))
    weights = {f"{c}/fold_{f}/weights.safetensors" for c in ("3d_fullres", "2d") for f in (0, 1)}
    assert names == {"manifest.json", "model_card.json", "MODEL_CARD.md", "plans.json", "dataset.json",
                     "inference_plan.json", *weights}
    assert entries_of(archive)["plans.json"] == (model_dir / "plans.json").read_bytes()

    target = tmp_path / "imported"
    assert main(["import-model", str(archive), "-o", str(target)]) == 0
    for config in ("3d_fullres", "2d"):
        for fold in (0, 1):
            original = load_checkpoint(model_dir / config / f"fold_{fold}" / "checkpoint_final.pt",
                                       required=("network_weights",))
            imported = load_checkpoint(target / config / f"fold_{fold}" / "checkpoint_final.pt",
                                       required=("network_weights",))
            assert set(imported) == {"network_weights", "checkpoint_version"}  # no optimizer state
            assert original["network_weights"].keys() == imported["network_weights"].keys()
            assert all(torch.equal(v, imported["network_weights"][k]) for k, v in original["network_weights"].items())
    labels, probabilities = predict(model_dir)
    labels2, probabilities2 = predict(target)
    np.testing.assert_array_equal(labels, labels2)
    np.testing.assert_allclose(probabilities, probabilities2, rtol=0, atol=1e-6)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_model_card_holds_labels_channels_folds_and_cross_validation(archive):
    files = entries_of(archive)
    card = json.loads(files["model_card.json"])
    assert card["labels"] == LABELS and card["channels"] == {"0": "MR0"} and card["terminology"] == TERMINOLOGY
    assert card["engine"] == {"name": "AutoSegLib", "version": __version__}
    assert card["notes"] == "phantom test model" and card["created"].endswith("Z") and card["checkpoint"] == "final"
    assert {name: c["folds"] for name, c in card["configurations"].items()} == {"2d": [0, 1], "3d_fullres": [0, 1]}
    cv = card["configurations"]["3d_fullres"]["cross_validation"]
    assert cv["per_fold"]["0"]["per_class"] == FOLD_DICE[0]
    assert cv["per_fold"]["1"]["per_class"] == FOLD_DICE[1]
    assert cv["mean_over_folds"]["per_class"]["organ"] == pytest.approx(0.85)
    assert cv["mean_over_folds"]["per_class"]["tumour"] == pytest.approx(0.4)  # fold 1 has no value
    assert "cross_validation" not in card["configurations"]["2d"]  # no validation summaries
    pooled = card["pooled_cross_validation"]  # crossval/ when find-best wrote it, else the inference plan's
    assert pooled["2d+3d_fullres"]["per_class"] == {"organ": 0.9, "tumour": 0.6}
    assert pooled["3d_fullres + postprocessing"]["mean_foreground_dice"] == pytest.approx(0.68)
    assert card["inference_plan"]["configurations"] == ["3d_fullres"]
    text = files["MODEL_CARD.md"].decode()
    assert "organ (1)" in text and "3d_fullres fold 0 | 0.800 | 0.400" in text and "phantom test model" in text
    manifest = json.loads(files["manifest.json"])
    assert manifest["format_version"] == rules.FORMAT_VERSION
    assert {f["path"]: (f["size"], f["sha256"]) for f in manifest["files"]} == {
        name: (len(data), sha256_hex(data)) for name, data in files.items() if name != "manifest.json"}


def test_export_of_one_configuration_drops_the_inference_plan_and_predicts_via_the_cli(model_dir, tmp_path,
                                                                                       capsys):
    out = tmp_path / "2d.zip"
    assert main(["export-model", str(model_dir), str(out), "-c", "2d", "-f", "0"]) == 0
    assert "inference_plan.json is left out" in capsys.readouterr().err
    assert set(entries_of(out)) == {"manifest.json", "model_card.json", "MODEL_CARD.md", "plans.json",
                                    "dataset.json", "2d/fold_0/weights.safetensors"}
    card = json.loads(entries_of(out)["model_card.json"])
    assert "pooled_cross_validation" not in card and "inference_plan" not in card  # none made of 2d alone
    assert main(["import-model", str(out)]) == 0  # default target: beside the zip, named after it
    image = tmp_path / "in" / "case_0000.nii.gz"
    image.parent.mkdir()
    write_image(blob_image(), oblique_geometry(), image)
    assert main(["predict", "-i", str(image.parent), "-o", str(tmp_path / "pred"), "-m", str(tmp_path / "2d"),
                 "--no-tta", "--device", "cpu"]) == 0
    assert (tmp_path / "pred" / "case.nii.gz").is_file()


def test_export_refuses_an_existing_zip_and_an_untrained_fold(model_dir, archive, tmp_path, capsys):
    before = archive.read_bytes()
    assert main(["export-model", str(model_dir), str(archive)]) == 1
    assert "already exists" in capsys.readouterr().err and archive.read_bytes() == before
    assert main(["export-model", str(model_dir), str(tmp_path / "x.zip"), "-f", "3"]) == 1
    assert "fold(s) [3]" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_pickle_payload_is_refused_on_export_and_import_without_running(model_dir, archive, tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    payload = io.BytesIO()
    torch.save({"network_weights": {}, "x": Payload(marker)}, payload)
    # In the archive, listed with the right hash and size, where weights belong.
    bad = rezip(archive, tmp_path / "pickle.zip", replace={WEIGHTS: payload.getvalue()})
    message = assert_refused(bad, tmp_path, capsys, WEIGHTS)
    assert "not a safetensors weights file" in message and not marker.exists()
    # In a model folder being exported.
    poisoned = tmp_path / "poisoned"
    shutil.copytree(model_dir, poisoned)
    (poisoned / "3d_fullres" / "fold_0" / "checkpoint_final.pt").write_bytes(payload.getvalue())
    out = tmp_path / "out" / "poisoned.zip"
    assert main(["export-model", str(poisoned), str(out)]) == 1
    assert "checkpoint_final.pt: refused" in capsys.readouterr().err and not marker.exists()
    assert not out.parent.exists() or not list(out.parent.iterdir())


# -- refused archives -----------------------------------------------------------------------
def symlink_entry(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


def test_refuses_path_traversal(archive, tmp_path, capsys):
    bad = rezip(archive, tmp_path / "bad.zip", add=[("../evil.json", b"{}")])
    assert "path traversal" in assert_refused(bad, tmp_path, capsys, "'../evil.json'")
    assert not (tmp_path / "evil.json").exists()


def test_refuses_absolute_paths(archive, tmp_path, capsys):
    name = f"{tmp_path}/evil.json"
    bad = rezip(archive, tmp_path / "bad.zip", add=[(name, b"{}")])
    assert "absolute path" in assert_refused(bad, tmp_path, capsys, name)
    assert not (tmp_path / "evil.json").exists()


def test_refuses_symlink_entries(archive, tmp_path, capsys):
    # A name the archive may hold, listed with its hash: only the entry's type is wrong.
    files = {name: data for name, data in entries_of(archive).items() if name != "inference_plan.json"}
    files["inference_plan.json"] = b"/etc/passwd"
    files["manifest.json"] = manifest_of(files)
    bad = write_zip(tmp_path / "bad.zip", [(symlink_entry(n) if n == "inference_plan.json" else n, d)
                                           for n, d in files.items()])
    assert "symbolic link" in assert_refused(bad, tmp_path, capsys, "'inference_plan.json'")


def test_refuses_duplicate_names(archive, tmp_path, capsys):
    bad = rezip(archive, tmp_path / "bad.zip", add=[("plans.json", b"{}")])
    assert "appears 2 times" in assert_refused(bad, tmp_path, capsys, "'plans.json'")


def test_refuses_files_not_in_the_manifest(archive, tmp_path, capsys):
    # A checkpoint with a pickle payload where the engine would look for one.
    marker, payload = tmp_path / "payload-ran", io.BytesIO()
    torch.save({"network_weights": {}, "x": Payload(marker)}, payload)
    extra = "3d_fullres/fold_0/checkpoint_final.pt"
    bad = rezip(archive, tmp_path / "bad.zip", add=[(extra, payload.getvalue())])
    assert "not listed in manifest.json" in assert_refused(bad, tmp_path, capsys, repr(extra))
    assert not marker.exists()


def test_refuses_a_manifest_entry_missing_from_the_archive(archive, tmp_path, capsys):
    bad = rezip(archive, tmp_path / "bad.zip", drop=["2d/fold_1/weights.safetensors"], fix_manifest=False)
    assert "missing from the archive" in assert_refused(bad, tmp_path, capsys, "'2d/fold_1/weights.safetensors'")


def test_refuses_a_hash_mismatch(archive, tmp_path, capsys):
    data = bytearray(entries_of(archive)[WEIGHTS])
    data[-1] ^= 0xFF  # same size, last byte of a weight changed
    bad = rezip(archive, tmp_path / "bad.zip", replace={WEIGHTS: bytes(data)}, fix_manifest=False)
    assert "SHA-256" in assert_refused(bad, tmp_path, capsys, repr(WEIGHTS))


def test_refuses_a_size_mismatch(archive, tmp_path, capsys):
    files = entries_of(archive)
    manifest = json.loads(files["manifest.json"])
    for item in manifest["files"]:
        if item["path"] == "plans.json":
            item["size"] += 1
    bad = rezip(archive, tmp_path / "bad.zip", replace={"manifest.json": json.dumps(manifest).encode()},
                fix_manifest=False)
    assert "manifest.json says" in assert_refused(bad, tmp_path, capsys, "'plans.json'")


def test_refuses_a_zip_bomb(archive, tmp_path, capsys):
    files = {name: data for name, data in entries_of(archive).items() if name != "manifest.json"}
    files[WEIGHTS] = bytes(32 << 20)  # 32 MiB of zeros deflate to ~32 kB
    files["manifest.json"] = manifest_of(files)
    bad = write_zip(tmp_path / "bad.zip", list(files.items()), compress=zipfile.ZIP_DEFLATED)
    assert bad.stat().st_size < 100_000
    assert "zip bomb" in assert_refused(bad, tmp_path, capsys, repr(WEIGHTS))


def test_extraction_counts_bytes_beyond_the_declared_size():
    # zipfile itself stops at the declared size; this is the second lock if it ever did not.
    with pytest.raises(SharingError, match="'x': holds more than the 4 bytes"):
        copy_counted(io.BytesIO(b"12345"), io.BytesIO(), 4, "x")
    with pytest.raises(SharingError, match="'x': holds 3 bytes, but manifest.json says 4"):
        copy_counted(io.BytesIO(b"123"), io.BytesIO(), 4, "x")


def test_refuses_an_unknown_format_version(archive, tmp_path, capsys):
    bad = rezip(archive, tmp_path / "bad.zip", format_version=2)
    assert "format version 2 is not supported" in assert_refused(bad, tmp_path, capsys, "manifest.json")


def test_refuses_weights_of_an_unknown_configuration(archive, tmp_path, capsys):
    bad = rezip(archive, tmp_path / "bad.zip", add=[("3d_evil/fold_0/weights.safetensors", b"")])
    assert_refused(bad, tmp_path, capsys, "'3d_evil/fold_0/weights.safetensors'")
    listed = rezip(archive, tmp_path / "listed.zip", replace={"3d_evil/fold_0/weights.safetensors": b""})
    assert "not a file an AutoSeg model zip holds" in assert_refused(listed, tmp_path, capsys, "3d_evil")


def test_refuses_weights_that_do_not_fit_the_plans(archive, tmp_path, capsys):
    files = entries_of(archive)
    bad = rezip(archive, tmp_path / "bad.zip", replace={WEIGHTS: files["2d/fold_0/weights.safetensors"]})
    assert "does not fit the network of plans.json" in assert_refused(bad, tmp_path, capsys, repr(WEIGHTS))


def test_refuses_a_damaged_zip_stream(archive, tmp_path, capsys):
    bad = tmp_path / "bad.zip"
    data = bytearray(archive.read_bytes())
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo(WEIGHTS)  # stored: its bytes follow the local header as they are
    name_length, extra_length = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    start = info.header_offset + 30 + name_length + extra_length
    data[start + info.compress_size - 1] ^= 0xFF
    bad.write_bytes(bytes(data))
    assert "cannot be read (Bad CRC-32" in assert_refused(bad, tmp_path, capsys, repr(WEIGHTS))


def test_refuses_an_existing_target(archive, tmp_path, capsys):
    target = tmp_path / "models" / "mine"
    target.mkdir(parents=True)
    (target / "plans.json").write_text("keep me")
    assert main(["import-model", str(archive), "-o", str(target)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(target) in lines[0] and "already exists" in lines[0]
    assert (target / "plans.json").read_text() == "keep me"
    assert [p.name for p in target.parent.iterdir()] == ["mine"]


def test_refuses_a_file_that_is_not_a_zip(tmp_path, capsys):
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"PK\x03\x04 truncated")
    assert "not a readable zip file" in assert_refused(bad, tmp_path, capsys, str(bad))


@pytest.mark.parametrize("name, problem", [
    ("a/../b", "path traversal"), ("C:/x", "absolute path"), ("a\\b", "backslash"), ("a//b", "empty or '.'"),
    ("./a", "empty or '.'"), ("dir/", "empty or '.'"), ("", "empty name")])
def test_path_problem(name, problem):
    assert problem in rules.path_problem(name)


def test_safe_names_pass():
    assert rules.path_problem("3d_fullres/fold_0/weights.safetensors") is None
    assert rules.parse_weights_name("3d_fullres/fold_all/weights.safetensors") == ("3d_fullres", "all")
    assert rules.parse_weights_name("3d_fullres/fold_01/weights.safetensors") is None


def test_a_missing_safetensors_package_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)  # what an import of an absent package meets
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(SharingError, match="pip install safetensors"):
        rules.safetensors_torch()
