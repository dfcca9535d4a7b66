"""The empirical parameters: which configuration (or ensemble of two) to use, and which postprocessing.

Following the method: every trained configuration is scored on its pooled cross-validation
predictions (each training case predicted once, by the fold that held it out), and so is every
pair of configurations ensembled by averaging their softmax probabilities. The candidate with
the highest mean foreground Dice wins; on a tie, the one with fewer members (cheaper to run).
Postprocessing is then decided on the winner's pooled predictions:

1. Keep only the largest component of all foreground classes together, if that raises the mean
   foreground Dice and lowers no class's Dice.
2. On top of step 1's outcome, for each class on its own: keep only its largest component, if
   that raises the class's Dice. (Removing a class's voxels changes no other class, so this is
   the same rule as step 1.) Skipped with a single foreground class, where it repeats step 1.

Selection scores overlap only (Dice and voxel counts); surface distances would cost far more
and do not enter the choice. The result is ``WORK/model/inference_plan.json``
(docs/evaluation.md), which the predictor follows.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np

from AutoSegLib.errors import ReportedFailure
from AutoSegLib.evaluation.crossval import ValidatedConfiguration, load_probabilities, validated_configurations
from AutoSegLib.evaluation.folders import check_same_grid
from AutoSegLib.evaluation.metrics import IGNORE_LABEL_NAME, case_metrics, overlap_metrics, scored_labels
from AutoSegLib.evaluation.summary import class_means, json_ready, nanmean, summary_document
from AutoSegLib.events import Reporter
from AutoSegLib.fileutil import write_json
from AutoSegLib.imageio import read_image
from AutoSegLib.postprocessing import apply_postprocessing, keep_largest_component
from AutoSegLib.names import CROSSVAL_DIR, ENSEMBLE_SEPARATOR, INFERENCE_PLAN_FILE  # noqa: F401 (re-exported)

STAGE = "find-best"
PLAN_FILE = INFERENCE_PLAN_FILE
PLAN_VERSION = 1


class SelectionError(ReportedFailure):
    """No selection is possible; the message says what is missing, per configuration and fold."""


# -- predictions of one case ---------------------------------------------------------------
def _predict(members: tuple[str, ...], files: dict, ref_path: Path, ref: np.ndarray, ref_geometry,
             n_classes: int, cache: dict) -> np.ndarray:
    """A candidate's label map for one case: the label file of a single configuration, or the
    argmax of the averaged probabilities of an ensemble."""
    if len(members) == 1:
        path = files[members[0]][0]
        pred, geometry = read_image(path)
        check_same_grid(path, pred.shape, geometry, ref_path, ref.shape, ref_geometry)
        return pred
    total = np.zeros((n_classes, *ref.shape), np.float32)
    for name in members:
        if name not in cache:
            cache[name] = load_probabilities(files[name][1], ref.shape, n_classes)
        total += cache[name]
    return np.argmax(total, axis=0).astype(np.uint8 if n_classes <= 256 else np.uint16)


def score_case(ref_path: Path, files: dict, candidates: dict[str, tuple[str, ...]], labels: dict[str, int],
               n_classes: int) -> dict[str, dict]:
    """candidate name -> overlap metrics per label, for one case (a worker task)."""
    ref, ref_geometry = read_image(ref_path)
    cache: dict = {}
    return {name: case_metrics(_predict(members, files, ref_path, ref, ref_geometry, n_classes, cache), ref, labels,
                               ignore_value=labels.get(IGNORE_LABEL_NAME), surface=False)
            for name, members in candidates.items()}


def postprocessing_variants(pred: np.ndarray, ref: np.ndarray, labels: dict[str, int]) -> dict:
    """One case's metrics without (``none``) and with (``foreground``) the foreground step, and on
    top of each, every class's own metrics after keeping its largest component (``class_kept``)."""
    ignore = labels.get(IGNORE_LABEL_NAME)
    valid = None if ignore is None else ref != ignore
    variants = {"none": pred, "foreground": apply_postprocessing(pred, {"largest_component_foreground": True})}
    result = {}
    for variant, labelmap in variants.items():
        result[variant] = {
            "all": case_metrics(labelmap, ref, labels, ignore_value=ignore, surface=False),
            "class_kept": {name: overlap_metrics(keep_largest_component(labelmap == value), ref == value, valid)
                           for name, value in scored_labels(labels).items()},
        }
    return result


def postprocessing_case(ref_path: Path, files: dict, members: tuple[str, ...], labels: dict[str, int],
                        n_classes: int) -> dict:
    """:func:`postprocessing_variants` of the winner's prediction for one case (a worker task)."""
    ref, ref_geometry = read_image(ref_path)
    pred = _predict(members, files, ref_path, ref, ref_geometry, n_classes, {})
    return postprocessing_variants(pred, ref, labels)


# -- decisions -----------------------------------------------------------------------------
def _better(after: float, before: float) -> bool:
    return math.isfinite(after) and (not math.isfinite(before) or after > before)


def _lower(after: float, before: float) -> bool:
    return math.isfinite(after) and math.isfinite(before) and after < before


def dice_scores(per_case: list[dict], label_names: list[str]) -> dict:
    """``{"mean_foreground_dice", "per_class"}`` of per-case metrics (``{"metrics": ...}`` entries)."""
    per_class = {name: values.get("Dice", math.nan) for name, values in class_means(per_case, label_names).items()}
    return {"mean_foreground_dice": nanmean(per_class.values()), "per_class": per_class}


def choose_candidate(scores: dict[str, dict], members: dict[str, tuple[str, ...]]) -> str:
    """Highest mean foreground Dice; ties go to fewer members, then to the earlier candidate."""
    def key(item):
        index, name = item
        return (_finite_or_low(scores[name]["mean_foreground_dice"]), -len(members[name]), -index)

    return max(enumerate(scores), key=key)[1]


def decide_postprocessing(results: list[dict], labels: dict[str, int]) -> tuple[dict, list[dict], list[dict]]:
    """The postprocessing spec from :func:`postprocessing_variants` of every case.

    Returns ``(spec, steps, final_per_case)``: the decision, one record per step tried (with
    the Dice before and after), and each case's metrics with the decision applied.
    """
    scored = scored_labels(labels)
    names = list(scored)

    def scores(variant: str, part: str = "all") -> dict:
        if part == "all":
            return dice_scores([{"metrics": r[variant]["all"]} for r in results], names)
        return dice_scores([{"metrics": r[variant]["class_kept"]} for r in results], names)

    base, foreground = scores("none"), scores("foreground")
    use_foreground = (_better(foreground["mean_foreground_dice"], base["mean_foreground_dice"])
                      and not any(_lower(foreground["per_class"][n], base["per_class"][n]) for n in names))
    steps = [{"step": "largest component of all foreground", "metric": "mean foreground Dice",
              "before": base["mean_foreground_dice"], "after": foreground["mean_foreground_dice"],
              "chosen": use_foreground}]
    variant = "foreground" if use_foreground else "none"
    current, kept = (foreground if use_foreground else base), scores(variant, "class_kept")
    classes = []
    if len(names) > 1:
        for name in names:
            chosen = _better(kept["per_class"][name], current["per_class"][name])
            steps.append({"step": f"largest component of {name}", "metric": f"Dice of {name}",
                          "before": current["per_class"][name], "after": kept["per_class"][name], "chosen": chosen})
            if chosen:
                classes.append(scored[name])
    chosen_names = {n for n in names if scored[n] in classes}
    final = [{n: (r[variant]["class_kept"][n] if n in chosen_names else r[variant]["all"][n]) for n in names}
             for r in results]
    spec = {"largest_component_foreground": use_foreground, "largest_component_classes": classes}
    return spec, steps, final


def _reason(winner: str, scores: dict, members: dict, n_folds: int) -> str:
    dice = scores[winner]["mean_foreground_dice"]
    if len(scores) == 1:
        return (f"{winner} is the only configuration with complete cross-validation predictions "
                f"(mean foreground Dice {dice:.4f} over {n_folds} folds).")
    runner = max((n for n in scores if n != winner), key=lambda n: _finite_or_low(scores[n]["mean_foreground_dice"]))
    kind = "The ensemble " if len(members[winner]) > 1 else ""
    return (f"{kind}{winner} has the highest mean foreground Dice in {n_folds}-fold cross-validation "
            f"({dice:.4f}; next best {runner} {scores[runner]['mean_foreground_dice']:.4f}).")


def _finite_or_low(value: float) -> float:
    return value if math.isfinite(value) else -math.inf


def _postprocessing_reason(steps: list[dict]) -> str:
    chosen = [s for s in steps if s["chosen"]]
    if not chosen:
        return "Removing smaller connected components did not improve the cross-validation Dice: no postprocessing."
    parts = [f"keeping only the {s['step']} raised the {s['metric']} from {s['before']:.4f} to {s['after']:.4f}"
             for s in chosen]
    return "Postprocessing: " + "; ".join(parts) + "."


# -- the whole selection -------------------------------------------------------------------
def candidate_members(configurations: list[ValidatedConfiguration]) -> dict[str, tuple[str, ...]]:
    """Every configuration alone, then every pair as an ensemble named ``a+b``."""
    names = [c.name for c in configurations]
    pairs = {ENSEMBLE_SEPARATOR.join(pair): pair for pair in itertools.combinations(names, 2)}
    return {**{n: (n,) for n in names}, **pairs}


def _missing_report(model_dir: Path, incomplete: dict[str, list[str]]) -> str:
    if not incomplete:
        return (f"{model_dir}: no trained configuration found (expected {model_dir}/CONFIGURATION/fold_K/"
                "validation/); train every fold with `autoseg train` first")
    lines = [f"  {name}: " + "; ".join(problems) for name, problems in incomplete.items()]
    return (f"{model_dir}: no configuration has complete cross-validation predictions "
            "(every fold trained and its validation cases predicted, label and .npz probabilities):\n"
            + "\n".join(lines))


def _run(fn, tasks: list, num_processes: int, reporter: Reporter, step_name: str) -> dict:
    from AutoSegLib.workers import run_tasks

    with reporter.task(STAGE, len(tasks), desc=f"Find best: {step_name}", step=step_name) as step:
        results = run_tasks(fn, tasks, num_processes, on_result=lambda r: step())
    failed = sorted((r.task_id, r.error) for r in results if not r.ok)
    if failed:
        raise SelectionError(f"{len(failed)} case(s) could not be scored: "
                             + "; ".join(f"{case}: {error}" for case, error in failed))
    return {r.task_id: r.value for r in results}


def _prediction_names(members: tuple[str, ...], files: dict) -> str:
    if len(members) == 1:
        return str(files[members[0]][0])
    return " + ".join(str(files[name][1]) for name in members)


def find_best(work_dir, dataset_folder, reporter: Reporter | None = None, num_processes: int = 1) -> dict:
    """Choose configuration(s) and postprocessing from cross-validation; write ``inference_plan.json``.

    Reads ``WORK/splits_final.json``, the validation predictions under ``WORK/model/`` and the
    references in ``DATASET/labelsTr``. Writes ``WORK/model/crossval/{candidate}.json`` (pooled
    summaries, overlap metrics) and, last, ``WORK/model/inference_plan.json``.

    Returns:
        The inference plan as written.

    Raises:
        SelectionError: no configuration has complete validation predictions (the message lists
            what each configuration and fold lacks), or a case cannot be scored.

    Example:
        >>> plan = find_best("Dataset001_PhantomCT.autoseg", "Dataset001_PhantomCT")
        >>> plan["configurations"], plan["postprocessing"]
    """
    from AutoSegLib.dataset import open_dataset
    from AutoSegLib.names import MODEL_DIR
    from AutoSegLib.training.splits import SPLITS_FILE, load_splits

    reporter = reporter or Reporter(quiet=True)
    work_dir = Path(work_dir)
    dataset = open_dataset(dataset_folder)
    labels = dict(dataset.spec.labels)
    n_classes = len(labels) - (IGNORE_LABEL_NAME in labels)
    splits = load_splits(work_dir / SPLITS_FILE, dataset.case_ids)
    model_dir = work_dir / MODEL_DIR
    configurations, incomplete = validated_configurations(model_dir, splits, dataset.spec.file_ending)
    if not configurations:
        raise SelectionError(_missing_report(model_dir, incomplete))
    for name, problems in incomplete.items():
        reporter.warning(STAGE, f"configuration {name} is left out (incomplete cross-validation): "
                         + "; ".join(problems))

    members = candidate_members(configurations)
    names = list(scored_labels(labels))
    cases = sorted({c for fold in splits for c in fold["val"]})
    files_of = {case: {c.name: (c.label_files[case], c.probability_files[case]) for c in configurations}
                for case in cases}
    tasks = [(case, (dataset.case(case).label, files_of[case], members, labels, n_classes)) for case in cases]
    per_case = _run(score_case, tasks, num_processes, reporter, "candidates")
    scores, crossval_dir = {}, model_dir / CROSSVAL_DIR
    for name in members:
        entries = [{"case": case, "prediction": _prediction_names(members[name], files_of[case]),
                    "reference": str(dataset.case(case).label), "metrics": per_case[case][name]} for case in cases]
        scores[name] = dice_scores(entries, names)
        write_json(crossval_dir / f"{name}.json", summary_document(entries, labels, names, candidate=name,
                                                                   configurations=list(members[name])))
    winner = choose_candidate(scores, members)

    tasks = [(case, (dataset.case(case).label, files_of[case], members[winner], labels, n_classes)) for case in cases]
    pp_results = _run(postprocessing_case, tasks, num_processes, reporter, "postprocessing")
    spec, steps, final = decide_postprocessing([pp_results[case] for case in cases], labels)
    final_entries = [{"case": case, "metrics": metrics} for case, metrics in zip(cases, final)]
    write_json(crossval_dir / f"{winner}.postprocessed.json",
               summary_document(final_entries, labels, names, candidate=winner, postprocessing=spec))

    plan = {
        "version": PLAN_VERSION,
        "configurations": list(members[winner]),
        "folds": list(range(len(splits))),
        "checkpoint": "final",
        "postprocessing": spec,
        "cross_validation": scores,
        "postprocessing_evaluation": {"steps": steps, "after": dice_scores(final_entries, names)},
        "chosen_because": _reason(winner, scores, members, len(splits)) + " "
                          + _postprocessing_reason(steps),
    }
    plan = json_ready(plan)
    write_json(model_dir / PLAN_FILE, plan)
    return plan


def format_candidates(plan: dict) -> str:
    """The candidates of an inference plan as a table (mean foreground Dice, then per class)."""
    scores = plan["cross_validation"]
    winner = ENSEMBLE_SEPARATOR.join(plan["configurations"])
    classes = list(next(iter(scores.values()))["per_class"])
    width = max(len("candidate"), *(len(n) for n in scores)) + 2
    cell = lambda v: f"{'-' if v is None else f'{v:.4f}':>12}"  # noqa: E731
    lines = [f"{'candidate':<{width}}{'fg Dice':>12}" + "".join(f"{c[:11]:>12}" for c in classes)]
    for name, score in scores.items():
        mark = " *" if name == winner else ""
        lines.append(f"{name + mark:<{width}}{cell(score['mean_foreground_dice'])}"
                     + "".join(cell(score["per_class"][c]) for c in classes))
    after = plan["postprocessing_evaluation"]["after"]
    lines.append(f"{'* + postproc.':<{width}}{cell(after['mean_foreground_dice'])}"
                 + "".join(cell(after["per_class"][c]) for c in classes))
    lines.append(plan["chosen_because"])
    return "\n".join(lines)
