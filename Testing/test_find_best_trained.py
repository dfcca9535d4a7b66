"""find-best on REALLY trained configurations (issue 6): two configurations, every fold trained
and validated, then ``autoseg find-best`` chooses and ``autoseg predict`` follows its choice.

Testing/test_find_best.py checks the selection rules on fabricated validation folders; here the
validation folders come from ``autoseg train`` itself (it validates each fold at its end), so the
whole chain is exercised: plans -> training -> validation files -> selection -> inference plan ->
prediction. Five CT phantoms give five folds of one held-out case each.

Both configurations get TINY networks (1 epoch x 2 iterations each; nothing is learnt, the
numbers are whatever two barely trained networks predict) that really differ: ``3d_fullres``
keeps its spacing with one patch covering the whole typical image (one window per case, so
validation costs 8 mirrored passes) and 2 stages of 4-8 features; ``3d_cpu`` keeps its own
coarser spacing with 3 stages of 4-16 features. Everything runs in this process with one thread
(the machine is shared), events parsed from stdout as in test_training_run.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from AutoSegLib import cli

DATASET_NAME = "DS"
CONFIGS = ("3d_fullres", "3d_cpu")
FOLDS = [0, 1, 2, 3, 4]
TINY = {
    # The whole typical image (39 x 80 x 82 voxels at full resolution) in one window.
    "3d_fullres": {"patch_size": [40, 80, 96], "strides": [[1, 1, 1], [2, 2, 2]], "kernel_sizes": [[3, 3, 3]] * 2,
                   "features_per_stage": [4, 8], "n_conv_per_stage_encoder": [1, 1],
                   "n_conv_per_stage_decoder": [1], "batch_size": 2},
    # 3d_cpu's own patch (its typical image is 23 x 46 x 47 at its coarser spacing), a deeper, wider net.
    "3d_cpu": {"patch_size": [24, 48, 48], "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
               "kernel_sizes": [[3, 3, 3]] * 3, "features_per_stage": [4, 8, 16],
               "n_conv_per_stage_encoder": [1, 1, 1], "n_conv_per_stage_decoder": [1, 1], "batch_size": 2},
}


def run(argv) -> tuple[int, list[dict]]:
    """``autoseg ...`` in this process; returns the exit status and the events it printed.

    (Module-scoped fixtures cannot use capsys; the Reporter writes to the sys.stdout it finds
    when cli.main builds it, so redirecting stdout catches every event.)
    """
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = cli.main([str(a) for a in argv])
    return status, [json.loads(line) for line in out.getvalue().splitlines()]


def describe(events: list[dict]) -> str:
    return json.dumps([e for e in events if e["event"] in ("error", "warning", "done")])[-2000:]


# -- fixtures ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_thread():
    before = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    """Five phantoms, both configurations planned with tiny networks, every fold of both trained
    and validated: (dataset, work, {(configuration, fold): train events})."""
    from AutoSegLib.fileutil import read_json, write_json
    from AutoSegLib.planning import Plans

    root = tmp_path_factory.mktemp("find_best_trained")
    dataset, work = root / DATASET_NAME, root / "WORK"
    status, events = run(["make-phantoms", dataset, "--cases", 5, "--seed", 1, "--events"])
    assert status == 0, describe(events)
    status, events = run(["plan-and-preprocess", dataset, "-w", work, "-c", *CONFIGS, "--events"])
    assert status == 0, describe(events)
    plans = read_json(work / "plans.json")
    planned = {name: dict(plans["configurations"][name]) for name in CONFIGS}
    assert planned["3d_cpu"]["spacing"] != planned["3d_fullres"]["spacing"]  # 3d_cpu keeps its coarser grid
    for name in CONFIGS:
        plans["configurations"][name].update(TINY[name])
    parsed = Plans.from_dict(plans)  # the tiny plans are valid plans
    for name in CONFIGS:
        assert parsed.configurations[name].spacing == planned[name]["spacing"]
        assert parsed.configurations[name].patch_size == TINY[name]["patch_size"]
        assert parsed.configurations[name].features_per_stage == TINY[name]["features_per_stage"]
    write_json(work / "plans.json", plans)

    runs = {}
    for name in CONFIGS:
        for fold in FOLDS:
            status, events = run(["train", dataset, name, fold, "-w", work, "--epochs", 1,
                                  "--iterations-per-epoch", 2, "--num-workers", 0, "--device", "cpu", "--events"])
            assert status == 0, f"{name} fold {fold}: {describe(events)}"
            runs[name, fold] = events
    return dataset, work, runs


@pytest.fixture(scope="module")
def best(trained):
    """``autoseg find-best`` on the trained folds: (dataset, work, status, events)."""
    dataset, work, _ = trained
    status, events = run(["find-best", dataset, "-w", work, "-np", 1, "--events"])
    return dataset, work, status, events


# -- helpers -------------------------------------------------------------------------------
def dice(pred: np.ndarray, ref: np.ndarray, value: int) -> float:
    """docs/evaluation.md: 2TP / (2TP + FP + FN); NaN when the label is in neither."""
    p, r = pred == value, ref == value
    denominator = int(p.sum()) + int(r.sum())
    return math.nan if denominator == 0 else 2 * int((p & r).sum()) / denominator


def pooled_scores(per_case: list[dict[str, float]], names: list[str]) -> tuple[float, dict[str, float]]:
    """Per class the mean over cases of the defined Dice values; then the mean over classes."""
    per_class = {}
    for name in names:
        values = [c[name] for c in per_case if c[name] is not None and math.isfinite(c[name])]
        per_class[name] = float(np.mean(values)) if values else math.nan
    defined = [v for v in per_class.values() if math.isfinite(v)]
    return (float(np.mean(defined)) if defined else math.nan), per_class


def as_float(value) -> float:
    return math.nan if value is None else float(value)


def held_out(work: Path) -> dict[str, int]:
    """case -> the fold that held it out, from splits_final.json."""
    splits = json.loads((work / "splits_final.json").read_text())
    assert len(splits) == 5
    return {case: k for k, fold in enumerate(splits) for case in fold["val"]}


# -- training ------------------------------------------------------------------------------
def test_every_fold_of_both_configurations_is_trained_and_validated(trained):
    from AutoSegLib.models import checkpoint as ckpt

    dataset, work, runs = trained
    folds_of = held_out(work)
    cases = sorted(p.name[: -len(".nii.gz")] for p in (dataset / "labelsTr").glob("*.nii.gz"))
    assert sorted(folds_of) == cases and sorted(set(folds_of.values())) == FOLDS  # one held-out case per fold
    for (name, fold), events in runs.items():
        done = events[-1]
        assert done["event"] == "done" and done["epochs"] == 1, describe(events)
        assert done["validation_dice"] is None or 0.0 <= done["validation_dice"] <= 1.0
        validation = work / "model" / name / f"fold_{fold}" / "validation"
        case = next(c for c, k in folds_of.items() if k == fold)
        assert (validation / f"{case}.nii.gz").is_file() and (validation / f"{case}.npz").is_file()
        assert (validation / "summary.json").is_file()
    # The two configurations are really different networks on different grids.
    model_plans = json.loads((work / "model" / "plans.json").read_text())["configurations"]
    assert model_plans["3d_fullres"]["spacing"] != model_plans["3d_cpu"]["spacing"]
    shapes = {}
    for name in CONFIGS:
        weights = ckpt.load_checkpoint(work / "model" / name / "fold_0" / "checkpoint_final.pt")["network_weights"]
        shapes[name] = {key: tuple(value.shape) for key, value in weights.items()}
    assert shapes["3d_fullres"] != shapes["3d_cpu"]
    parameters = {name: sum(math.prod(shape) for shape in shapes[name].values()) for name in CONFIGS}
    assert parameters["3d_cpu"] > parameters["3d_fullres"]  # 3 stages of 4-16 features vs 2 of 4-8


# -- find-best -----------------------------------------------------------------------------
def test_find_best_chooses_between_the_trained_configurations_and_writes_the_plan(best):
    dataset, work, status, events = best
    assert status == 0, describe(events)
    done = events[-1]
    assert done["event"] == "done" and done["stage"] == "find-best"
    path = work / "model" / "inference_plan.json"
    assert done["inference_plan"] == str(path) and path.is_file()
    assert not [e for e in events if e["event"] == "warning"]  # no configuration was left out
    plan = json.loads(path.read_text())

    assert plan["version"] == 1 and plan["checkpoint"] == "final"
    assert plan["folds"] == FOLDS
    assert plan["configurations"] in (["3d_cpu"], ["3d_fullres"], ["3d_cpu", "3d_fullres"])
    assert done["configurations"] == plan["configurations"]
    labels = json.loads((dataset / "dataset.json").read_text())["labels"]
    foreground = {name: value for name, value in labels.items() if value != 0}
    spec = plan["postprocessing"]
    assert done["postprocessing"] == spec
    assert set(spec) == {"largest_component_foreground", "largest_component_classes"}
    assert isinstance(spec["largest_component_foreground"], bool)
    assert set(spec["largest_component_classes"]) <= set(foreground.values())

    # Three candidates: each configuration alone (by name), then their ensemble "a+b".
    scores = plan["cross_validation"]
    assert list(scores) == ["3d_cpu", "3d_fullres", "3d_cpu+3d_fullres"]
    for name, score in scores.items():
        assert set(score["per_class"]) == set(foreground), name
        value = score["mean_foreground_dice"]
        assert value is None or 0.0 <= value <= 1.0
        assert (work / "model" / "crossval" / f"{name}.json").is_file()

    # The winner: highest mean foreground Dice; a tie goes to fewer members, then the earlier candidate.
    members = {name: name.split("+") for name in scores}

    def rank(item):
        index, name = item
        value = scores[name]["mean_foreground_dice"]  # null (no class defined anywhere) ranks last
        return (-math.inf if value is None else value, -len(members[name]), -index)

    ranked = max(enumerate(scores), key=rank)[1]
    assert plan["configurations"] == members[ranked]
    assert ranked in plan["chosen_because"]
    assert (work / "model" / "crossval" / f"{ranked}.postprocessed.json").is_file()


def test_the_scores_are_those_of_the_trained_folds_validation(best):
    """Each candidate's cross-validation score, recomputed here from the files training wrote:
    the single configurations from their label maps, the ensemble from the averaged .npz
    probabilities, every case predicted by the fold that held it out."""
    from AutoSegLib.imageio import read_image

    dataset, work, status, _ = best
    assert status == 0
    plan = json.loads((work / "model" / "inference_plan.json").read_text())
    labels = json.loads((dataset / "dataset.json").read_text())["labels"]
    foreground = {name: value for name, value in labels.items() if value != 0}
    per_case = {name: [] for name in plan["cross_validation"]}
    for case, fold in sorted(held_out(work).items()):
        ref, _ = read_image(dataset / "labelsTr" / f"{case}.nii.gz")
        total = np.zeros((len(labels), *ref.shape), np.float32)
        for name in ("3d_cpu", "3d_fullres"):
            validation = work / "model" / name / f"fold_{fold}" / "validation"
            pred, _ = read_image(validation / f"{case}.nii.gz")
            assert pred.shape == ref.shape
            per_case[name].append({label: dice(pred, ref, value) for label, value in foreground.items()})
            with np.load(validation / f"{case}.npz") as data:
                probabilities = data["probabilities"]
            assert probabilities.shape == total.shape and probabilities.dtype == np.float16
            total += probabilities
        ensemble = np.argmax(total, axis=0)
        per_case["3d_cpu+3d_fullres"].append({label: dice(ensemble, ref, value) for label, value in foreground.items()})
    for name, cases in per_case.items():
        mean, per_class = pooled_scores(cases, list(foreground))
        recorded = plan["cross_validation"][name]
        assert as_float(recorded["mean_foreground_dice"]) == pytest.approx(mean, abs=1e-6, nan_ok=True), name
        for label in foreground:
            assert as_float(recorded["per_class"][label]) == pytest.approx(per_class[label], abs=1e-6, nan_ok=True)
    # The label maps are the argmax of the probabilities (float16 rounding aside): the two
    # configurations' predictions really come from different networks.
    case, fold = sorted(held_out(work).items())[0]
    probs = {name: np.load(work / "model" / name / f"fold_{fold}" / "validation" / f"{case}.npz")["probabilities"]
             for name in ("3d_cpu", "3d_fullres")}
    assert not np.array_equal(probs["3d_cpu"], probs["3d_fullres"])


# -- predict follows the plan --------------------------------------------------------------
def test_predict_uses_the_inference_plan_by_default(best, tmp_path, capsys):
    from scipy import ndimage

    from AutoSegLib.imageio import read_image

    dataset, work, status, _ = best
    assert status == 0
    plan = json.loads((work / "model" / "inference_plan.json").read_text())
    spec = plan["postprocessing"]
    cases = sorted(p.name[: -len("_0000.nii.gz")] for p in (dataset / "imagesTr").glob("*_0000.nii.gz"))[:2]
    inputs = tmp_path / "in"
    inputs.mkdir()
    for case in cases:
        shutil.copy2(dataset / "imagesTr" / f"{case}_0000.nii.gz", inputs)
    out = tmp_path / "out"

    capsys.readouterr()
    status = cli.main(["predict", "-i", str(inputs), "-o", str(out), "-m", str(work / "model"), "--no-tta",
                       "--device", "cpu", "--events"])
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert status == 0, describe(events)
    assert events[-1]["event"] == "done" and events[-1]["cases"] == 2
    message = next(e["message"] for e in events if e["event"] == "log" and e["message"].startswith("Predicting"))
    # The plan's configuration(s), each with the plan's folds, and no other configuration.
    stages = ", ".join(f"{name} folds {plan['folds']}" for name in plan["configurations"])
    assert message.startswith(f"Predicting 2 case(s) with {stages} (from inference_plan.json) on cpu"), message
    for other in set(CONFIGS) - set(plan["configurations"]):
        assert other not in message

    values = set(json.loads((dataset / "dataset.json").read_text())["labels"].values())
    assert sorted(p.name for p in out.iterdir()) == [f"{case}.nii.gz" for case in cases]
    for case in cases:
        image, image_geometry = read_image(inputs / f"{case}_0000.nii.gz")
        labels, geometry = read_image(out / f"{case}.nii.gz")
        assert labels.shape == image.shape
        assert geometry.spacing == pytest.approx(image_geometry.spacing)
        assert geometry.origin == pytest.approx(image_geometry.origin)
        assert geometry.direction == pytest.approx(image_geometry.direction)
        assert set(np.unique(labels).tolist()) <= values
        # The plan's postprocessing was applied: what it keeps is one largest component (or
        # several tied for largest), 26-connected as docs/evaluation.md says. The class step runs
        # after the foreground step and may split the foreground it kept, so the foreground is
        # checked only when it is the last step.
        masks = [labels == value for value in spec["largest_component_classes"]]
        if spec["largest_component_foreground"] and not spec["largest_component_classes"]:
            masks.append(labels > 0)
        for mask in masks:
            components, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
            sizes = np.bincount(components.ravel())[1:]
            assert count == 0 or (sizes == sizes.max()).all(), sorted(sizes.tolist())
