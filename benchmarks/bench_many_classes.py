"""Does the CPU path learn every class? One training variant on a many-class dataset, scored per class.

    python benchmarks/bench_many_classes.py VARIANT [--dataset D] [--work W] [--fold 0]
        [--epochs 20] [--iterations 25] [--time-budget MIN] [--threads N] [--cases 24]

Makes (once) the detailed CT phantoms (``make-phantoms --anatomy detailed``: 31 structures,
thin vessels, lymph nodes, left/right pairs), plans and preprocesses ``3d_cpu`` in a work
folder of the variant's plan, trains fold 0 with the variant, validates it on the fold's
held-out cases as ``autoseg train`` does, and prints:

- wall time, training iterations, the load average (the 2-core test machine is shared);
- mean foreground Dice, classes never predicted, classes under 0.5;
- every class's Dice, lowest first, with its median voxel count in the held-out references.

Variants (one thing changed at a time against ``capped``, the shipped CPU plan; ``capped-b4``,
``-b1``, ``-f32``, ``-nolr`` and ``-bd`` against ``3d``, where they were measured and where their
patch, batch, width, axes and Dice pooling mean what they say):

- ``coarse``: the CPU plan before issue 14 - spacing sized by the image alone (class radii
  ignored), so thin classes end up under two voxels across;
- ``capped``: the shipped plan - coarsened no further than the thinnest class allows, rare
  classes weighed in the cross-entropy, lagging classes lifted while training; on these phantoms
  a 2D network on whole slices, since a 3D patch of a CPU's size would see 29% of the image
  (``planning/cpu.py``, ``MIN_3D_COVERAGE``);
- ``3d``: the same rules held to 3D (the plan before 2026-12-04: 2.2 x 1.07 x 1.07 mm, patch
  20 x 56 x 64, batch 2), the base of the ``capped-*`` figures in BENCHMARKS.md before that date;
- ``capped-fg66`` / ``capped-fg100``: two thirds / every sample of a batch centred on a class
  (nnU-Net forces one third);
- ``capped-lr1e-2`` / ``capped-lr6e-3`` / ``capped-lr1e-3``: AdamW at another starting rate
  (quick preset: 3e-3; with ``--time-budget`` the shipped run starts up to 3x higher,
  ``schedule.budget_lr_lift``); ``capped-lr3e-3``: the preset's 3e-3 given as ``--lr``, which
  turns that lift off;
- ``capped-nolag``: no lift for lagging classes (the plan's ``lagging_class_lift`` removed: the
  cross-entropy weights stay the plan's rare-class weights; ``training/class_lift.py``);
- ``capped-b4``: on the ``3d`` plan, batch 4 of 20 x 40 x 48 voxels instead of 2 of 20 x 56 x 64
  (about the same voxels per step): more, smaller views per step; ``capped-b1``:
  batch 1 of the plan's patch, so about twice the steps in the same minutes;
- ``capped-f32``: 32 feature maps at full resolution instead of 16 (doubling per stage), on the
  same preprocessed data: does a 31-class output need a wider network?
- ``capped-nolr``: no mirroring across the left-right axis (the patch's last axis here), in
  training and at test time: mirrored, a kidney_left is taught as kidney_left on the right;
- ``capped-bd``: the Dice term pooled over the batch (``batch_dice``), as the method does where a
  patch covers part of the image: a class absent from one sample's patch no longer scores 0;
- ``capped-ds-quarter`` / ``capped-ds-none``: deep-supervision weights 1, 1/4, 1/16, ... instead
  of the method's 1, 1/2, 1/4, ... (lowest output 0, normalized), or the full-resolution output
  alone: the coarse outputs' targets lose the thin and small classes;
- ``capped-warmup``: the learning rate rises linearly over the first 3 epochs (1/4, 2/4, 3/4 of
  the schedule's) before the poly decay;
- ``capped-unweighted``: no cross-entropy weights for rare classes (the plan's
  ``ce_class_weights`` removed; lagging classes are still lifted, from a base weight of 1);
- ``capped-sqrt`` / ``capped-all-rare`` / ``capped-p15``: other rare-class rules than the plan's
  (``planning/class_weights.py``: a class at least 3x rarer than the median foreground class
  weighs its rarity, at most 30): the square root of the rarity for every class rarer than the
  median, at most 10 (the first rule tried); the rarity for every class rarer than the median,
  at most 30; the rarity to the power 1.5, at most 100.

Fixed ``--epochs`` x ``--iterations`` compare variants at equal work whatever the machine's
load; ``--time-budget`` measures what a user gets in that many minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

VARIANTS = {
    "coarse": {"plan": "coarse"},
    "capped": {"plan": "capped"},
    "3d": {"plan": "3d"},
    "capped-fg66": {"plan": "capped", "oversample": 0.66},
    "capped-fg100": {"plan": "capped", "oversample": 1.0},
    "capped-lr1e-2": {"plan": "capped", "lr": 1e-2},
    "capped-lr1e-3": {"plan": "capped", "lr": 1e-3},
    "capped-f32": {"plan": "3d", "base_features": 32},
    "capped-unweighted": {"plan": "capped", "class_weights": None},
    "capped-sqrt": {"plan": "capped", "class_weights": (0.5, 10.0, 1.0)},  # (power, cap, min rarity)
    "capped-all-rare": {"plan": "capped", "class_weights": (1.0, 30.0, 1.0)},
    "capped-p15": {"plan": "capped", "class_weights": (1.5, 100.0, 1.0)},
    "capped-lr6e-3": {"plan": "capped", "lr": 6e-3},
    "capped-lr3e-3": {"plan": "capped", "lr": 3e-3},
    "capped-b4": {"plan": "3d", "batch_size": 4, "patch_size": [20, 40, 48]},
    "capped-b1": {"plan": "3d", "batch_size": 1},
    "capped-nolag": {"plan": "capped", "lagging_class_lift": None},
    "capped-nolr": {"plan": "3d", "mirror_axes": [0, 1]},
    "capped-bd": {"plan": "3d", "batch_dice": True},
    "capped-ds-quarter": {"plan": "capped", "ds_decay": 0.25},
    "capped-ds-none": {"plan": "capped", "ds_decay": 0.0},
    "capped-warmup": {"plan": "capped", "warmup_epochs": 3},
}


def prepare(dataset: Path, work: Path, plan_kind: str, cases: int) -> None:
    from AutoSegLib.fingerprint import extract_fingerprint
    from AutoSegLib.fileutil import write_json
    from AutoSegLib.planning import plan
    from AutoSegLib.preprocessing.runner import preprocess_dataset
    from AutoSegLib.synthetic import make_phantom_dataset
    from AutoSegLib.dataset import open_dataset

    if not (dataset / "dataset.json").is_file():
        make_phantom_dataset(dataset, kind="ct", cases=cases, test_cases=8, seed=0, anatomy="detailed")
    made = (work / "plans.json").is_file()
    work.mkdir(parents=True, exist_ok=True)
    if made:  # planned before: plan again (the planner may have changed), keep the data if it still fits
        fingerprint = json.loads((work / "dataset_fingerprint.json").read_text())
    else:
        fingerprint = extract_fingerprint(dataset)
        write_json(work / "dataset_fingerprint.json", fingerprint)
    if plan_kind == "coarse":
        fingerprint = {k: v for k, v in fingerprint.items() if k != "class_radius_mm"}
    if plan_kind == "3d":  # the shipped rules, but 3d_cpu never planned in 2D
        from AutoSegLib.planning import cpu

        cpu.prefer_2d = lambda stage: False
    spec = open_dataset(dataset).spec
    plans = plan(fingerprint, spec.channel_names, spec.labels, dataset_name=dataset.name).to_dict()
    if made:
        before = json.loads((work / "plans.json").read_text())["configurations"]["3d_cpu"]
        if any(before[k] != plans["configurations"]["3d_cpu"][k] for k in ("spacing", "patch_size")):
            raise SystemExit(f"{work} was preprocessed for another 3d_cpu spacing or patch; plan into a new folder "
                             "(give --dataset a path in another folder)")
    write_json(work / "plans.json", plans)
    if not made:
        preprocess_dataset(dataset, work, ["3d_cpu"])


def share_preprocessed(base: Path, work: Path) -> None:
    """A variant's own work folder (its own model folder) over the plan's preprocessed data."""
    import shutil

    work.mkdir(parents=True, exist_ok=True)
    for name in ("plans.json", "dataset_fingerprint.json"):
        shutil.copy2(base / name, work / name)
    if not (work / "preprocessed").exists():
        (work / "preprocessed").symlink_to(base / "preprocessed")


def set_plan_entry(work: Path, key: str, value) -> None:
    """Rewrite one entry of the variant's copy of the 3d_cpu plan (None: remove it)."""
    from AutoSegLib.fileutil import write_json

    plans = json.loads((work / "plans.json").read_text())
    plans["configurations"]["3d_cpu"][key] = value
    if value is None:
        del plans["configurations"]["3d_cpu"][key]
    write_json(work / "plans.json", plans)


def widen(work: Path, base_features: int) -> None:
    """Rewrite the variant's copy of the 3d_cpu plan with ``base_features`` maps at full resolution."""
    from AutoSegLib.fileutil import write_json
    from AutoSegLib.planning.topology import MAX_FEATURES

    plans = json.loads((work / "plans.json").read_text())
    config = plans["configurations"]["3d_cpu"]
    stages = len(config["features_per_stage"])
    config["features_per_stage"] = [min(base_features * 2 ** i, MAX_FEATURES[3]) for i in range(stages)]
    write_json(work / "plans.json", plans)


def reweigh(work: Path, dataset: Path, weighting: tuple[float, float, float] | None) -> None:
    """Rewrite the variant's 3d_cpu cross-entropy weights: (power, cap, min rarity) of the rare-class rule,
    or none."""
    from AutoSegLib.planning.class_weights import rare_class_weights
    from AutoSegLib.planning.rules import output_classes

    if weighting is None:
        set_plan_entry(work, "ce_class_weights", None)
        return
    ratios = json.loads((work / "dataset_fingerprint.json").read_text())["class_voxel_ratios"]
    labels = json.loads((dataset / "dataset.json").read_text())["labels"]
    weights = rare_class_weights([ratios[name] for name in output_classes(labels)], *weighting)
    print("cross-entropy class weights:", ", ".join(f"{w:.2f}" for w in weights))
    set_plan_entry(work, "ce_class_weights", weights)


def patch_deep_supervision(decay: float) -> None:
    """Deep-supervision weights ``1, decay, decay**2, ...`` (lowest output 0, normalized) instead of
    the method's halving; ``decay`` 0 trains the full-resolution output alone."""
    from functools import partial

    from AutoSegLib.training import loss, trainer

    trainer.deep_supervision_weights = partial(loss.deep_supervision_weights, decay=decay)


def patch_warmup(epochs: int) -> None:
    """The learning rate rises linearly over the first ``epochs`` epochs to the schedule's, then decays as before."""
    from AutoSegLib.training import trainer

    original = trainer.Trainer.lr
    trainer.Trainer.lr = lambda self: original(self) * min(1.0, (self.epoch + 1) / (epochs + 1))


def patch_oversampling(fraction: float) -> None:
    from AutoSegLib.training import data

    original = data.is_forced_foreground
    data.is_forced_foreground = lambda j, batch_size, _=None: original(j, batch_size, fraction)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variant", choices=sorted(VARIANTS))
    parser.add_argument("--dataset", type=Path, default=Path("/tmp/bench_many/Dataset950_Detailed"))
    parser.add_argument("--work", type=Path, default=None, help="default: DATASET.<variant>.autoseg beside it")
    parser.add_argument("--fold", default="0")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--iterations", type=int, default=25)
    parser.add_argument("--time-budget", type=float, default=None, help="minutes; overrides --epochs")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the CLI's)")
    parser.add_argument("--cases", type=int, default=24)
    args = parser.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    variant = VARIANTS[args.variant]
    work = args.work or args.dataset.parent / f"{args.dataset.name}.{args.variant}.autoseg"
    base = args.dataset.parent / f"{args.dataset.name}.{variant['plan']}-plan.autoseg"
    prepare(args.dataset, base, variant["plan"], args.cases)
    share_preprocessed(base, work)
    for key in ("mirror_axes", "batch_dice", "batch_size", "patch_size", "lagging_class_lift"):
        if key in variant:
            set_plan_entry(work, key, variant[key])
    if "base_features" in variant:
        widen(work, variant["base_features"])
    if "class_weights" in variant:
        reweigh(work, args.dataset, variant["class_weights"])
    if "oversample" in variant:
        patch_oversampling(variant["oversample"])
    if "ds_decay" in variant:
        patch_deep_supervision(variant["ds_decay"])
    if "warmup_epochs" in variant:
        patch_warmup(variant["warmup_epochs"])

    from AutoSegLib.cli import main as autoseg

    argv = ["train", str(args.dataset), "3d_cpu", args.fold, "-w", str(work), "--overwrite", "--device", "cpu",
            "--preset", "quick", "--iterations-per-epoch", str(args.iterations)]
    argv += ["--time-budget", str(args.time_budget)] if args.time_budget else ["--epochs", str(args.epochs)]
    if "lr" in variant:
        argv += ["--lr", str(variant["lr"])]
    started = time.monotonic()
    status = autoseg(argv)
    wall = time.monotonic() - started
    if status != 0:
        raise SystemExit(f"training failed with status {status}")
    fold_dir = work / "model" / "3d_cpu" / f"fold_{args.fold}"
    log = [json.loads(line) for line in (fold_dir / "training_log.jsonl").read_text().splitlines() if line.strip()]
    iterations = sum(int(e.get("iterations", args.iterations)) for e in log if "train_loss" in e)
    summary = json.loads((fold_dir / "validation" / "summary.json").read_text())
    report(args.variant, summary, wall, iterations, len([e for e in log if "train_loss" in e]))


def report(variant: str, summary: dict, wall: float, iterations: int, epochs: int) -> None:
    from AutoSegLib.evaluation.summary import class_ranking

    ranking = class_ranking(summary)
    sizes = {}
    for name in summary["mean"]:
        counts = [row["metrics"][name].get("n_ref") or 0 for row in summary["metric_per_case"]]
        sizes[name] = int(np.median([c for c in counts if c] or [0]))
    dice = summary["foreground_mean"]["Dice"]
    big = [(n, d) for n, d in ranking if sizes[n] >= 200]
    print(f"== {variant}: {wall / 60:.1f} min wall, {epochs} epochs (~{iterations} iterations), "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"mean foreground Dice {dice:.3f}; never predicted {len(summary['never_predicted'])}; "
          f"under 0.5: {sum(d < 0.5 for _, d in ranking)} of {len(ranking)}; classes >= 200 voxels: {len(big)}, "
          f"lowest {min(d for _, d in big):.2f}" if big else "")
    print(", ".join(f"{n} {d:.2f} ({sizes[n]})" for n, d in ranking))


if __name__ == "__main__":
    main()
