"""The one rule for which configuration, folds and checkpoint a model folder predicts with.

Model folders here are empty checkpoint files in the right places: the rule only looks at what
exists (and reads inference_plan.json), so nothing is loaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from AutoSegLib.models.choice import ModelFolderError, choose, trained_configurations, trained_folds


def touch(model: Path, configuration: str, fold, kind: str = "final") -> None:
    folder = model / configuration / f"fold_{fold}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"checkpoint_{kind}.pt").write_bytes(b"")


def test_the_only_trained_configuration_is_chosen_with_its_finished_folds(tmp_path):
    touch(tmp_path, "3d_cpu", 0)
    touch(tmp_path, "3d_cpu", 3)
    touch(tmp_path, "3d_cpu", 1, "latest")  # unfinished: not a fold to predict with
    touch(tmp_path, "2d", 0, "latest")  # an unfinished configuration does not compete
    choice = choose(tmp_path)
    assert choice.configurations == ["3d_cpu"] and choice.folds is None and choice.checkpoint == "final"
    assert choice.reason == "the only trained configuration"
    assert trained_folds(tmp_path, "3d_cpu") == [0, 3]


def test_two_trained_configurations_without_an_inference_plan_name_the_flags(tmp_path):
    touch(tmp_path, "2d", 0)
    touch(tmp_path, "3d_cpu", "all")
    with pytest.raises(ModelFolderError) as info:
        choose(tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert "2d (fold 0), 3d_cpu (fold all)" in message and "-c 2d or -c 3d_cpu" in message
    assert "find-best" in message


def test_nothing_finished_points_to_resume_or_to_training(tmp_path):
    touch(tmp_path, "3d_cpu", 0, "latest")
    with pytest.raises(ModelFolderError, match=r"unfinished runs: 3d_cpu \(fold 0\).*--resume"):
        choose(tmp_path)
    with pytest.raises(ModelFolderError, match="train one first, e.g. `autoseg train DATASET 3d_cpu 0`"):
        choose(tmp_path / "empty")


def test_the_inference_plan_wins_over_what_is_trained(tmp_path):
    touch(tmp_path, "2d", 0)
    touch(tmp_path, "3d_fullres", 0)
    plan = {"version": 1, "configurations": ["3d_fullres", "2d"], "folds": [0], "checkpoint": "best",
            "postprocessing": {"largest_component_foreground": True}}
    (tmp_path / "inference_plan.json").write_text(json.dumps(plan))
    choice = choose(tmp_path)
    assert choice.configurations == ["3d_fullres", "2d"] and choice.folds == [0] and choice.checkpoint == "best"
    assert choice.postprocessing == {"largest_component_foreground": True}
    assert choose(tmp_path, folds=["all"]).folds == ["all"]  # folds asked for override the plan's


def test_what_is_asked_for_wins_over_everything(tmp_path):
    touch(tmp_path, "2d", 0)
    touch(tmp_path, "2d", 0, "latest")
    touch(tmp_path, "2d", 1, "latest")
    (tmp_path / "inference_plan.json").write_text(json.dumps({"version": 1, "configurations": ["3d_fullres"],
                                                             "folds": [0]}))
    choice = choose(tmp_path, configuration="2d", folds=[0, "1"], checkpoint="latest")
    assert (choice.configurations, choice.folds, choice.checkpoint) == (["2d"], [0, 1], "latest")


def test_an_inference_plan_naming_an_unknown_configuration_is_refused(tmp_path):
    (tmp_path / "inference_plan.json").write_text(json.dumps({"version": 1, "configurations": ["3d_huge"],
                                                             "folds": [0]}))
    with pytest.raises(ModelFolderError, match="3d_huge.*known configurations are 2d, 3d_fullres"):
        choose(tmp_path)


def test_trained_configurations_lists_every_finished_one(tmp_path):
    touch(tmp_path, "2d", 1)
    touch(tmp_path, "3d_lowres", 0)
    assert trained_configurations(tmp_path) == {"2d": [1], "3d_lowres": [0]}


def test_the_rule_needs_no_torch():
    # the Slicer module applies it inside Slicer's GUI process, where torch may be absent
    code = "import sys, AutoSegLib.models.choice, AutoSegLib.names; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "False"


def test_a_configuration_asked_for_without_its_folds_is_refused_up_front(tmp_path):
    # the Slicer module calls choose before starting a process: the error must come from here
    touch(tmp_path, "3d_cpu", 0)
    (tmp_path / "plans.json").write_text(json.dumps({"configurations": {"2d": {}, "3d_cpu": {}}}))
    with pytest.raises(ModelFolderError, match="no fold of 2d has checkpoint_final.pt"):
        choose(tmp_path, configuration="2d")
    with pytest.raises(ModelFolderError, match=r"fold\(s\) \[1\] of 3d_cpu have no checkpoint_final.pt \(fold_0: final\)"):
        choose(tmp_path, configuration="3d_cpu", folds=[0, 1])
    with pytest.raises(ModelFolderError, match="'3d_lowres' is not planned; planned: 2d, 3d_cpu"):
        choose(tmp_path, configuration="3d_lowres")
