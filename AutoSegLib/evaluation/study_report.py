"""The architecture study's report: from per-run records to JSON, markdown and a plot.

A *record* is one trained and validated fold of one design on one dataset::

    {"dataset": "ct", "architecture": "UNetPlusPlus", "fold": "0", "dice": {"liver": 0.91, ...},
     "parameters": 1.2e6, "gflop": 10.5, "seconds_per_iteration": 0.6, "iterations": 100,
     "seconds_per_case": 4.2}

Classes are the dataset's foreground labels; the foreground Dice of a fold is the mean over
its classes (as the validation summary's ``foreground_mean``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from AutoSegLib.evaluation.study import average_ranks, bootstrap_p_value, fold_wise_differences, mean_std
from AutoSegLib.evaluation.summary import nanmean
from AutoSegLib.fileutil import atomic_path

REPORT_VERSION = 1
FOREGROUND = "foreground mean"


def build_report(records: Sequence[dict], architectures: Sequence[str], baseline: str, settings: dict) -> dict:
    """Per dataset and design: Dice per class (folds, mean, std), fold-wise differences against
    ``baseline`` with bootstrap p-values, average rank over classes, cost and time; then the
    average rank over every class of every dataset."""
    datasets = list(dict.fromkeys(r["dataset"] for r in records))
    report = {"version": REPORT_VERSION, "baseline": baseline, "architectures": list(architectures),
              "settings": settings, "datasets": {}}
    pooled = {a: [] for a in architectures}
    for dataset in datasets:
        runs = [r for r in records if r["dataset"] == dataset]
        classes = list(dict.fromkeys(c for r in runs for c in r["dice"]))
        designs = {a: _design(a, [r for r in runs if r["architecture"] == a], classes) for a in architectures}
        for a, design in designs.items():
            base = designs[baseline]
            design["difference_to_baseline"] = {item: _difference(design, base, item) for item in [*classes, FOREGROUND]}
        means = {a: [designs[a]["dice"][c]["mean"] for c in classes] for a in architectures}
        for a, rank in average_ranks(means).items():
            designs[a]["average_rank"] = rank
            pooled[a] += means[a]
        report["datasets"][dataset] = {"classes": classes, "designs": designs}
    report["average_rank_over_datasets"] = average_ranks(pooled)
    return report


def _design(architecture: str, runs: list[dict], classes: list[str]) -> dict:
    runs = sorted(runs, key=lambda r: str(r["fold"]))
    dice = {}
    for c in [*classes, FOREGROUND]:
        per_fold = {str(r["fold"]): (nanmean(r["dice"].values()) if c == FOREGROUND else r["dice"].get(c))
                    for r in runs}
        per_fold = {f: (None if v is None or (isinstance(v, float) and math.isnan(v)) else v)
                    for f, v in per_fold.items()}
        mean, std = mean_std(list(per_fold.values()))
        dice[c] = {"per_fold": per_fold, "mean": mean, "std": std}
    first = runs[0] if runs else {}
    return {"folds": [str(r["fold"]) for r in runs], "dice": dice,
            "parameters": first.get("parameters"), "gflop": first.get("gflop"),
            "patch_size": first.get("patch_size"),
            "iterations": mean_std([r.get("iterations") for r in runs])[0],
            "seconds_per_iteration": mean_std([r.get("seconds_per_iteration") for r in runs])[0],
            "seconds_per_case": mean_std([r.get("seconds_per_case") for r in runs])[0]}


def _difference(design: dict, base: dict, item: str) -> dict:
    diffs = fold_wise_differences(design["dice"][item]["per_fold"], base["dice"][item]["per_fold"])
    return {"per_fold": diffs, "mean": (sum(diffs) / len(diffs)) if diffs else None,
            "p_value": bootstrap_p_value(diffs)}


# -- markdown ------------------------------------------------------------------------------
def _num(value, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _pm(entry: dict) -> str:
    return f"{_num(entry['mean'])} ± {_num(entry['std'])}" if entry["std"] is not None else _num(entry["mean"])


def to_markdown(report: dict) -> str:
    baseline = report["baseline"]
    s = report["settings"]
    lines = ["# Architecture study", "",
             f"Configuration {s.get('configuration')}, folds {', '.join(map(str, s.get('folds', [])))}, "
             f"time budget {s.get('time_budget_min')} min per run, {s.get('preset')} schedule; baseline {baseline}. "
             "Dice: validation cases of each fold, whole images in their original geometry, predicted without "
             "mirroring. s / iteration: median training step; s / case: prediction and scoring per case. Differences: "
             "design minus baseline on the same fold (mean over folds), two-tailed bootstrap p-value. "
             "Rank: mean over classes of the rank of the design's mean Dice (1 = best).", ""]
    for dataset, data in report["datasets"].items():
        lines += [f"## {dataset}", "",
                  "| design | parameters | GFLOP | s / iteration | iterations | s / case | foreground Dice | "
                  f"difference to {baseline} (p) | average rank |", "|---|---|---|---|---|---|---|---|---|"]
        for a, d in data["designs"].items():
            diff = d["difference_to_baseline"][FOREGROUND]
            shown = "-" if a == baseline else f"{_num(diff['mean'], 4)} ({_num(diff['p_value'], 2)})"
            params = "-" if d["parameters"] is None else f"{d['parameters'] / 1e6:.2f} M"
            lines.append(f"| {a} | {params} | {_num(d['gflop'], 1)} | {_num(d['seconds_per_iteration'], 2)} | "
                         f"{_num(d['iterations'], 0)} | {_num(d['seconds_per_case'], 1)} | {_pm(d['dice'][FOREGROUND])} "
                         f"| {shown} | {_num(d['average_rank'], 2)} |")
        classes = data["classes"]
        lines += ["", "Dice per class (mean ± std over folds; difference to the baseline, p):", "",
                  "| design | " + " | ".join(classes) + " |", "|---" * (len(classes) + 1) + "|"]
        for a, d in data["designs"].items():
            cells = []
            for c in classes:
                diff = d["difference_to_baseline"][c]
                extra = "" if a == baseline else f" ({_num(diff['mean'], 3)}, p {_num(diff['p_value'], 2)})"
                cells.append(_pm(d["dice"][c]) + extra)
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
        lines.append("")
    if len(report["datasets"]) > 1:
        ranks = sorted(report["average_rank_over_datasets"].items(), key=lambda kv: kv[1])
        lines += ["## Average rank over every class of every dataset", "",
                  "| design | average rank |", "|---|---|"] + [f"| {a} | {_num(r, 2)} |" for a, r in ranks] + [""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Foreground Dice per design: one dot per fold, a bar at the mean, per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(report["datasets"])
    fig, axes = plt.subplots(1, len(datasets), figsize=(1.2 + 0.9 * len(report["architectures"]) * len(datasets), 4.2),
                             squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        designs = report["datasets"][dataset]["designs"]
        names = list(designs)
        for x, a in enumerate(names):
            entry = designs[a]["dice"][FOREGROUND]
            ax.bar(x, entry["mean"] or 0.0, color="tab:blue" if a != report["baseline"] else "tab:gray", alpha=0.6)
            folds = [v for v in entry["per_fold"].values() if v is not None]
            ax.plot([x] * len(folds), folds, "k.", markersize=6)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("foreground Dice (validation)")
        ax.set_title(dataset)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
