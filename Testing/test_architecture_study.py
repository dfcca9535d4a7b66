"""``autoseg compare-architectures`` end to end: every design trains and predicts on CT phantoms
with 3d_cpu, the report is written, and a second run reuses every finished fold.

The 3d_cpu network is shrunk (patch 16x32x32, 3 stages of 4-16 features, one convolution per
stage; Swin-UNETR rounds the patch to 32x64x32 at its smallest width) and each run trains one
iteration: what is under test is that every design goes through the same pipeline.
"""

from __future__ import annotations

import json

import pytest

from AutoSegLib import cli
from AutoSegLib.fileutil import read_json, write_json
from AutoSegLib.names import ARCHITECTURES
from conftest import TINY

pytest.importorskip("monai")

CONFIG = "3d_cpu"


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    dataset, work = root / "CT", root / "CT.autoseg"
    assert cli.main(["make-phantoms", str(dataset), "--kind", "ct", "--cases", "4", "--seed", "3", "--events"]) == 0
    assert cli.main(["plan-and-preprocess", str(dataset), "-w", str(work), "-c", CONFIG, "--events"]) == 0
    plans = read_json(work / "plans.json")
    plans["configurations"][CONFIG].update(TINY)
    write_json(work / "plans.json", plans)
    return dataset, work


def study_argv(dataset, work, study, architectures) -> list[str]:
    return ["compare-architectures", str(dataset), "-w", str(work), "-o", str(study), "--architectures",
            *architectures, "--num-folds", "2", "-f", "0", "--epochs", "1", "--iterations-per-epoch", "1",
            "--device", "cpu", "--events"]


def test_every_design_trains_predicts_and_is_reported_then_reused(phantoms, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    dataset, work = phantoms
    study = tmp_path / "study"
    assert cli.main(study_argv(dataset, work, study, ARCHITECTURES)) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert events[-1]["event"] == "done" and events[-1]["runs"] == len(ARCHITECTURES)
    report = read_json(study / "report.json")
    designs = report["datasets"]["CT"]["designs"]
    assert list(designs) == list(ARCHITECTURES) and report["baseline"] == "PlainConvUNet"
    classes = ["liver", "spleen", "kidneys", "aorta", "liver_lesion"]
    for name, design in designs.items():
        assert list(design["dice"]) == [*classes, "foreground mean"], name
        assert all(0.0 <= (design["dice"][c]["per_fold"]["0"] or 0.0) <= 1.0 for c in classes), name
        assert design["parameters"] > 0 and design["gflop"] > 0 and design["iterations"] == 1, name
        run = study / "CT" / name
        assert read_json(run / "plans.json")["configurations"][CONFIG]["network"]["architecture"] == name
        assert (run / "model" / CONFIG / "fold_0" / "validation" / "summary.json").is_file()
        assert (run / "preprocessed").resolve() == (work / "preprocessed").resolve()  # shared data
    assert designs["SwinUNETR"]["patch_size"] == [32, 64, 32]
    assert designs["UNetPlusPlus"]["patch_size"] == TINY["patch_size"]
    assert (study / "report.png").stat().st_size > 0 and "| UNetPlusPlus |" in (study / "report.md").read_text()
    # same splits for every design
    assert len({(study / "CT" / a / "splits_final.json").read_text() for a in ARCHITECTURES}) == 1

    # Resumable: the finished folds are reused, only the report is written again (a subset here).
    assert cli.main(study_argv(dataset, work, study, ["PlainConvUNet", "HalfUNet"])) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sum("reused" in e.get("message", "") for e in events) == 2
    assert not any(e["stage"] == "train" for e in events)
    assert list(read_json(study / "report.json")["datasets"]["CT"]["designs"]) == ["PlainConvUNet", "HalfUNet"]


def test_baseline_must_be_compared(phantoms, tmp_path, capsys):
    dataset, work = phantoms
    argv = study_argv(dataset, work, tmp_path / "s", ["HalfUNet"]) + ["--baseline", "PlainConvUNet"]
    assert cli.main(argv) == 1
    assert "--baseline PlainConvUNet is not among --architectures (HalfUNet)" in capsys.readouterr().out
