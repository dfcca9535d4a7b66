"""Held-out Dice and time of the CPU inference options, and the default path against older code (issue 20).

    autoseg make-phantoms /tmp/phantoms --kind ct --cases 1 --test-cases 15 --seed 0
    OMP_NUM_THREADS=1 python benchmarks/inference_options.py --model DEMO/Dataset001_PhantomCT.autoseg/model \\
        --data /tmp/phantoms --work /tmp/options --before /tmp/autoseg_before

The model is one trained on the CT phantoms (``autoseg demo``: 3d_cpu, fold ``all``, seed-0
phantoms 0-11); the test cases are seed 0's test split (held out; the demo's own three test
cases are its first three). Both parts predict every case of ``DATA/imagesTs`` and score it
against ``DATA/labelsTs`` with ``AutoSegLib.evaluation.evaluate_folders`` (Dice per class, mean
over cases).

options  In one process, the predictor loaded once per option set; seconds per case are the
         prediction alone (median over the cases), the network on ``OMP_NUM_THREADS`` threads.
         Option sets: the default (TTA on every axis, step 0.5), ``--step 0.75``, ``--step 1.0``,
         ``--tta-axes`` subsets, ``--no-tta`` and ``--fast``.
before   ``autoseg predict`` with the default path, this code and the code at ``--before``
         (a ``git archive`` export of AutoSegLib, run with ``PYTHONSAFEPATH=1`` so the working
         copy cannot shadow it); per-class Dice of both, the differences, voxels that differ.
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

OPTION_SETS = {
    "default (TTA 8 mirrors, step 0.5)": dict(),
    "--step 0.75": dict(step=0.75),
    "--step 1.0": dict(step=1.0),
    "--tta-axes 1 2 (4 mirrors)": dict(tta_axes=(1, 2)),
    "--tta-axes 2 (2 mirrors)": dict(tta_axes=(2,)),
    "--fast (step 0.75, 4 mirrors)": dict(step=0.75, tta_axes=(1, 2)),
    "--no-tta": dict(tta=False),
    "--no-tta --step 0.75": dict(tta=False, step=0.75),
}


def dice_table(pred: Path, data: Path) -> dict:
    from AutoSegLib.evaluation import evaluate_folders

    labels = json.loads((data / "dataset.json").read_text())["labels"]
    summary = evaluate_folders(pred, data / "labelsTs", labels)
    per_class = {name: summary["mean"][name]["Dice"] for name in labels if name != "background"}
    return {**per_class, "foreground mean": summary["foreground_mean"]["Dice"]}


def part_options(args) -> dict:
    from AutoSegLib.inference.files import predict_files
    from AutoSegLib.inference.predictor import Predictor

    rows = {}
    names = [n for n in OPTION_SETS if not args.only or any(o in n for o in args.only)]
    for name in names:
        options = OPTION_SETS[name]
        predictor = Predictor.from_model_dir(args.model, device="cpu", **options)
        out = args.work / ("options_" + "".join(c if c.isalnum() else "_" for c in name))
        shutil.rmtree(out, ignore_errors=True)
        times = []
        predict_files(args.data / "imagesTs", out, predictor=predictor, pipelined=False, stage_times=times)
        per_case = [sum(t.stages.values()) for t in times]
        network = [t.stages["network"] for t in times]
        rows[name] = {"s_per_case": statistics.median(per_case), "network_s": statistics.median(network),
                      **dice_table(out, args.data), "load": os.getloadavg()[0]}
        print(f"{name}: {rows[name]['s_per_case']:.2f} s/case (network {rows[name]['network_s']:.2f}), "
              f"foreground Dice {rows[name]['foreground mean']:.4f}; load {os.getloadavg()[0]:.2f}", flush=True)
    base = rows.get(names[0])
    print("\n| option | s / case | speed-up | " + " | ".join(k for k in base if k not in ("s_per_case", "network_s", "load"))
          + " |")
    for name, row in rows.items():
        dice = [f"{row[k]:.4f} ({row[k] - base[k]:+.4f})" if name != names[0] else f"{row[k]:.4f}"
                for k in row if k not in ("s_per_case", "network_s", "load")]
        print(f"| {name} | {row['s_per_case']:.2f} | {base['s_per_case'] / row['s_per_case']:.2f}x | "
              + " | ".join(dice) + " |")
    return rows


def part_before(args) -> dict:
    env = dict(os.environ, PYTHONSAFEPATH="1")
    results = {}
    for name, path in (("this code", str(REPO)), ("before", args.before)):
        out = args.work / f"default_{name.replace(' ', '_')}"
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "AutoSegLib", "predict", "-i", str(args.data / "imagesTs"),
                               "-o", str(out), "-m", str(args.model), "--device", "cpu"],
                              env={**env, "PYTHONPATH": path}, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{name}: predict failed\n{done.stderr[-2000:]}")
        results[name] = {"wall_s": time.perf_counter() - t, **dice_table(out, args.data)}
        print(f"{name}: {results[name]['wall_s']:.1f} s; load {os.getloadavg()[0]:.2f}", flush=True)
    from AutoSegLib.imageio import read_image

    differing = total = 0
    for path in sorted((args.work / "default_before").glob("*.nii.gz")):
        a, b = read_image(path)[0], read_image(args.work / "default_this_code" / path.name)[0]
        differing += int((a != b).sum())
        total += a.size
    results["voxels differing"] = [differing, total]
    print("\n| class | Dice before (dba2bce) | Dice now | difference |")
    for k in results["this code"]:
        if k != "wall_s":
            now, before = results["this code"][k], results["before"][k]
            print(f"| {k} | {before:.4f} | {now:.4f} | {now - before:+.5f} |")
    print(f"voxels differing: {differing} of {total}")
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="dataset folder with imagesTs, labelsTs")
    parser.add_argument("--work", type=Path, default=Path("/tmp/inference_options"))
    parser.add_argument("--before", default=None, help="PYTHONPATH of an older AutoSegLib export")
    parser.add_argument("--parts", nargs="+", default=["options", "before"], choices=["options", "before"])
    parser.add_argument("--only", nargs="*", default=None, help="option sets whose name contains one of these")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"load {os.getloadavg()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}", flush=True)
    results = {}
    if "options" in args.parts:
        results["options"] = part_options(args)
    if "before" in args.parts and args.before:
        results["before"] = part_before(args)
    (args.work / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
