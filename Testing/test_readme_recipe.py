"""The README's own-data recipe and its console snippet, run as a newcomer would run them.

The lines are read from README.md itself (the code blocks after the ``newcomer-recipe`` and
``console-snippet`` markers), so the README and the engine cannot drift apart again (issue 13:
the recipe ended in ``no fold of 3d_fullres``, the snippet handed channels over one by one).
Two changes only, both stated here: training runs 1 epoch of 2 iterations instead of the quick
schedule (the suite's time budget; what is tested is that the lines work, not the Dice), and the
snippet's example paths point at this test's folders.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from AutoSegLib.imageio import read_image

README = Path(__file__).resolve().parent.parent / "README.md"
SHORT_TRAINING = ["--epochs", "1", "--iterations-per-epoch", "2"]


def code_block_after(marker: str) -> list[str]:
    """The lines of the first fenced code block after the HTML comment ``<!-- marker ...``."""
    text = README.read_text(encoding="utf-8")
    start = text.index(f"<!-- {marker}")
    match = re.compile(r"```[a-z]*\n(.*?)```", re.S).search(text, start)
    assert match is not None, f"README.md: no code block after the {marker} marker"
    return [line for line in match.group(1).splitlines() if line.strip()]


def autoseg_command() -> list[str]:
    found = shutil.which("autoseg")
    return [found] if found else [sys.executable, "-m", "AutoSegLib"]


def run_line(line: str, cwd: Path) -> subprocess.CompletedProcess:
    words = shlex.split(line, comments=True)
    assert words[0] == "autoseg", f"README recipe line does not start with autoseg: {line}"
    if words[1] == "train":
        words += SHORT_TRAINING
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a shared 2-core CI machine
    return subprocess.run(autoseg_command() + words[1:], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> tuple[Path, dict[str, subprocess.CompletedProcess]]:
    """Every line of the recipe run in order in a fresh folder; each must exit 0."""
    folder = tmp_path_factory.mktemp("newcomer")
    results = {}
    for line in code_block_after("newcomer-recipe"):
        result = run_line(line, folder)
        assert result.returncode == 0, f"README line failed: {line}\n{result.stderr[-3000:]}"
        results[shlex.split(line)[1]] = result
    return folder, results


def test_the_recipe_runs_line_by_line_on_a_cpu_and_ends_with_a_dice_table(recipe):
    folder, results = recipe
    assert list(results)[-1] == "evaluate"
    table = results["evaluate"].stdout
    assert "Dice" in table.splitlines()[0] and "foreground mean" in table
    assert "3d_cpu" in results["predict"].stderr and "the only trained configuration" in results["predict"].stderr
    first_line = results["train"].stderr.splitlines()[0]
    assert "with the quick schedule [auto: no GPU found" in first_line  # the device picked the schedule


def test_classes_never_predicted_after_training_are_named(recipe):
    folder, results = recipe
    import json

    summary = json.loads(next(folder.glob("*.autoseg/model/3d_cpu/fold_0/validation/summary.json")).read_text())
    for name in summary["never_predicted"]:  # 2 iterations of training: usually several
        assert f"class '{name}' was never predicted" in results["train"].stderr
    # Training ends with every class's validation Dice, lowest first, and names the weak ones.
    ranking = results["train"].stderr.split("validation Dice per class, lowest first: ")[1].splitlines()[0]
    scores = [float(item.rsplit(" ", 1)[1]) for item in ranking.split(", ")]
    assert scores == sorted(scores) and len(scores) == len(summary["mean"])
    if min(scores) < 0.5:
        assert "below Dice 0.50 on validation, lowest first" in results["train"].stderr
    evaluated = json.loads((folder / "segmentations" / "summary.json").read_text())
    for name in evaluated["never_predicted"]:
        assert f"class '{name}' was never predicted" in results["evaluate"].stderr


def test_the_console_snippet_runs_as_written_and_matches_the_command_line(recipe):
    folder, _ = recipe
    dataset = next(p for p in folder.iterdir() if p.is_dir() and (p / "dataset.json").is_file())
    code = "\n".join(code_block_after("console-snippet"))
    replaced = {"D:/data/new_scans": dataset / "imagesTs", "D:/data/segmented": folder / "console"}
    for example, real in replaced.items():
        assert example in code, f"README console snippet no longer names {example}"
        code = code.replace(example, real.as_posix())
    code = code.replace(f"D:/data/{dataset.name}.autoseg/model", (folder / f"{dataset.name}.autoseg" / "model").as_posix())
    assert "D:/data" not in code, "README console snippet has an example path this test does not replace"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=folder, capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    written = sorted(p.name for p in (folder / "console").iterdir())
    assert written == sorted(p.name for p in (folder / "segmentations").glob("*.nii.gz"))
    for name in written:
        console, _ = read_image(folder / "console" / name)
        cli, _ = read_image(folder / "segmentations" / name)
        assert console.shape == cli.shape
        assert np.mean(console == cli) > 0.999  # the same model, cases and configuration
