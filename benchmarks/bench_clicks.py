"""Click-guided correction on held-out CT phantoms (issue 21): Dice after simulated clicks, latency per click.

Steps (each prints its figures; run them in order, training one model at a time)::

    python benchmarks/bench_clicks.py prepare B            # phantoms, plans (guided + plain), 3d_cpu data
    nice -n 10 env OMP_NUM_THREADS=1 python benchmarks/bench_clicks.py train B guided
    nice -n 10 env OMP_NUM_THREADS=1 python benchmarks/bench_clicks.py train B plain
    nice -n 10 env OMP_NUM_THREADS=1 python benchmarks/bench_clicks.py dice B      # tables -> B/dice.json
    python benchmarks/bench_clicks.py latency B            # the persistent engine, 2 threads
    python benchmarks/bench_clicks.py flops B              # per refine window, for the GPU estimate

The recipe is the demo's (``autoseg demo``): 12 training CT phantoms (seed 0), here with 6
held-out ones; ``3d_cpu``, quick preset (AdamW, 20 x 25 = 500 iterations), fold ``all``. The
two models differ only in the plan's ``guidance`` entry (``plain`` = ``--no-guidance``), and
train with the same seed.

Clicks are simulated by a fixed rule on the original grid: each click at the centre (maximum
of the distance transform, in mm) of the largest error component of the target class, positive
on a missed part, negative on an extra part; every refine gets all clicks so far. The target
class is either the worst class (lowest mean automatic Dice of the model over the held-out
cases) or, for the per-class table, each class in turn. The same clicks seed Slicer's Grow from
seeds (AutoSegLib/evaluation/grow_from_seeds.py, when present). Automatic results and refines
use no test-time mirroring (what the engine does by default).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

CONFIG = "3d_cpu"
TRAIN_CASES, TEST_CASES, SEED = 12, 6, 0
CLICK_COUNTS = (0, 1, 3, 5)
MODELS = ("plain", "guided")


def folders(base: Path) -> dict:
    return {"dataset": base / "Dataset001_PhantomCT", "guided": base / "guided.autoseg",
            "plain": base / "plain.autoseg"}


def cmd_prepare(args) -> None:
    from AutoSegLib.fileutil import read_json, write_json
    from AutoSegLib.plan_dataset import plan_dataset
    from AutoSegLib.preprocessing.runner import preprocess_dataset
    from AutoSegLib.synthetic import make_phantom_dataset

    f = folders(args.base)
    if not (f["dataset"] / "dataset.json").is_file():
        make_phantom_dataset(f["dataset"], kind="ct", cases=TRAIN_CASES, seed=SEED, test_cases=TEST_CASES)
    plan_dataset(f["dataset"], f["guided"], num_processes=2, guidance=True)
    preprocess_dataset(f["dataset"], f["guided"], configurations=[CONFIG], num_processes=2)
    if f["plain"].exists():
        shutil.rmtree(f["plain"])
    shutil.copytree(f["guided"], f["plain"], ignore=shutil.ignore_patterns("model"))
    plans = read_json(f["plain"] / "plans.json")
    for config in plans["configurations"].values():
        config.pop("guidance", None)
    write_json(f["plain"] / "plans.json", plans)
    print(f"prepared {f['dataset']} ({TRAIN_CASES} training, {TEST_CASES} held-out), {f['guided']}, {f['plain']}")


def cmd_train(args) -> None:
    f = folders(args.base)
    work = f[args.model]
    command = [sys.executable, "-m", "AutoSegLib", "train", str(f["dataset"]), CONFIG, "all", "-w", str(work),
               "--preset", "quick", "--device", "cpu", "--overwrite", "--no-validation", "--num-workers", "1"]
    started = time.monotonic()
    load_before = os.getloadavg()
    subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    seconds = time.monotonic() - started
    record = {"model": args.model, "iterations": 500, "wall_s": round(seconds, 1), "load_before": load_before,
              "load_after": os.getloadavg(), "threads": os.environ.get("OMP_NUM_THREADS", "default")}
    (work / "train_time.json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("base", type=Path)
    p.set_defaults(func=cmd_prepare)
    p = sub.add_parser("train")
    p.add_argument("base", type=Path)
    p.add_argument("model", choices=MODELS)
    p.set_defaults(func=cmd_train)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
