"""The command line as users and the Slicer module run it: real subprocesses, real exit codes."""

import json
import os
import subprocess
import sys
import time

import pytest

from AutoSegLib.cli import COMMANDS, default_work_dir, main
from AutoSegLib.cli_parser import build_parser


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "AutoSegLib", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def events_of(result):
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_help_is_fast_and_lists_commands():
    started = time.monotonic()
    result = run("--help")
    assert result.returncode == 0
    for command in ("make-phantoms", "verify", "plan", "demo"):
        assert command in result.stdout
    # Heavy imports happen inside commands; a generous bound that still catches `import torch` at top.
    assert time.monotonic() - started < 5


def test_every_sub_command_has_a_command_and_every_command_a_sub_command():
    (sub,) = [a for a in build_parser()._actions if a.dest == "command"]
    stages = {name: parser.get_default("stage") for name, parser in sub.choices.items()}
    assert all(stage == name for name, stage in stages.items()), stages
    assert set(stages) == set(COMMANDS)


def test_usage_error_exits_2():
    assert run("make-phantoms").returncode == 2


def test_verify_events_end_with_done_on_a_clean_dataset(tiny_dataset):
    result = run("verify", tiny_dataset, "--events")
    assert result.returncode == 0, result.stderr
    events = events_of(result)
    assert events[-1]["event"] == "done" and events[-1]["stage"] == "verify"
    assert any(e["event"] == "progress" and e["done"] == e["of"] == 3 for e in events)


def test_verify_failure_exits_1_with_an_error_event_naming_the_file(tiny_dataset):
    (tiny_dataset / "labelsTr" / "case_1.nii.gz").unlink()
    result = run("verify", tiny_dataset, "--events")
    assert result.returncode == 1
    events = events_of(result)
    assert events[-1]["event"] == "error"
    assert any("case_1" in e.get("message", "") for e in events if e["event"] == "error")
    assert "case_1" in result.stderr


def test_missing_dataset_is_a_clear_error_not_a_traceback(tmp_path):
    result = run("verify", tmp_path / "nope")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "nope" in result.stderr


def test_default_work_dir_sits_beside_the_dataset(tmp_path):
    assert default_work_dir(tmp_path / "Dataset001_X") == tmp_path.resolve() / "Dataset001_X.autoseg"


def test_main_returns_status_instead_of_exiting(tiny_dataset, capsys):
    assert main(["verify", str(tiny_dataset), "-np", "1"]) == 0


@pytest.fixture(scope="module")
def phantom_ct(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "Dataset002_CT"
    result = run("make-phantoms", out, "--kind", "ct", "--cases", 4, "--seed", 3, "--events")
    assert result.returncode == 0, result.stderr
    assert events_of(result)[-1] == {**events_of(result)[-1], "event": "done", "dataset": str(out)}
    return out


def test_plan_writes_fingerprint_and_plans_and_reuses_the_fingerprint(phantom_ct):
    work = phantom_ct.parent / "work"
    first = run("plan", phantom_ct, "-w", work, "--events")
    assert first.returncode == 0, first.stderr
    assert events_of(first)[-1]["event"] == "done"
    plans = json.loads((work / "plans.json").read_text())
    fingerprint = json.loads((work / "dataset_fingerprint.json").read_text())
    assert fingerprint["num_cases"] == 4 and len(fingerprint["spacings"]) == 4
    assert {"2d", "3d_fullres"} <= set(plans["configurations"])
    assert plans["configurations"]["3d_fullres"]["normalization_schemes"] == ["CTNormalization"]
    stamp = (work / "dataset_fingerprint.json").stat().st_mtime_ns
    again = run("plan", phantom_ct, "-w", work, "--gpu-memory", "24")
    assert again.returncode == 0 and "reusing" in again.stderr
    assert (work / "dataset_fingerprint.json").stat().st_mtime_ns == stamp


def test_plan_explain_reads_as_an_explanation(phantom_ct):
    result = run("plan", phantom_ct, "-w", phantom_ct.parent / "work_explain", "--explain")
    assert result.returncode == 0, result.stderr
    for phrase in ("Configuration 3d_fullres", "Configuration 2d", "CT normalization", "Batch size",
                   "no low-resolution cascade", "mm", "Network cost", "3d_cpu: PlainConvUNet, ", " GFLOP for a "):
        assert phrase in result.stdout


def test_plan_from_a_fingerprint_file_alone(phantom_ct, tmp_path):
    fingerprint = json.loads((phantom_ct.parent / "work" / "dataset_fingerprint.json").read_text())
    v2 = {k: fingerprint[k] for k in ("spacings", "shapes_after_crop", "foreground_intensity_properties_per_channel",
                                      "median_relative_size_after_cropping")}  # what nnU-Net v2 writes
    (tmp_path / "fp.json").write_text(json.dumps(v2))
    result = run("plan", "--fingerprint", tmp_path / "fp.json", "--channels", "CT", "--num-labels", 5,
                 "-o", tmp_path / "plans.json")
    assert result.returncode == 0, result.stderr
    from_fp = json.loads((tmp_path / "plans.json").read_text())["configurations"]
    from_ds = json.loads((phantom_ct.parent / "work" / "plans.json").read_text())["configurations"]
    assert from_fp["3d_fullres"]["patch_size"] == from_ds["3d_fullres"]["patch_size"]
    via_json = run("plan", "--fingerprint", tmp_path / "fp.json", "--dataset-json", phantom_ct / "dataset.json",
                   "-o", tmp_path / "plans2.json")
    assert via_json.returncode == 0, via_json.stderr


@pytest.mark.parametrize("extra, message", [
    (["--channels", "T1,T2", "--num-labels", "2"], "intensity statistics for 1 channel(s) but 2"),
    ([], "--channels"),
])
def test_plan_from_fingerprint_errors_are_clear(phantom_ct, tmp_path, extra, message):
    fp = phantom_ct.parent / "work" / "dataset_fingerprint.json"
    result = run("plan", "--fingerprint", fp, "-o", tmp_path / "p.json", *extra)
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "p.json").exists()


def test_make_phantoms_refuses_to_overwrite(phantom_ct):
    result = run("make-phantoms", phantom_ct, "--cases", 1)
    assert result.returncode == 1 and str(phantom_ct) in result.stderr


def test_openmp_threads_wait_passively_unless_the_user_chose(monkeypatch):
    import AutoSegLib

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    AutoSegLib.passive_openmp_waits()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    AutoSegLib.passive_openmp_waits()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_importing_the_engine_before_torch_sets_passive_waits_for_the_python_api():
    # Slicer's console: the first import is AutoSegLib's, so OpenMP starts with passive waits.
    code = "import os; import AutoSegLib.inference; print(os.environ.get('OMP_WAIT_POLICY'))"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "PASSIVE"
