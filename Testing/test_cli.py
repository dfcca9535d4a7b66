"""The command line as users and the Slicer module run it: real subprocesses, real exit codes."""

import json
import subprocess
import sys
import time

import pytest

from AutoSegLib.cli import default_work_dir, main


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
