"""Click-guided correction on held-out CT phantoms (issue 21): Dice after simulated clicks, latency per click.

Steps (each prints its figures; run them in order, training one model at a time)::

    python benchmarks/bench_clicks.py prepare B            # phantoms, plans (guided + plain), 3d_cpu data
    nice -n 10 env OMP_NUM_THREADS=1 python benchmarks/bench_clicks.py train B guided
    nice -n 10 env OMP_NUM_THREADS=1 python benchmarks/bench_clicks.py train B plain
    # other seeds, the same way: plain_seed2, guided_seed2, plain_seed3, guided_seed3
    nice -n 10 env OMP_NUM_THREADS=1 python benchmarks/bench_clicks.py automatic B # every trained model
    nice -n 10 env OMP_NUM_THREADS=1 python benchmarks/bench_clicks.py dice B      # tables -> B/dice.json
    python benchmarks/bench_clicks.py latency B            # the persistent engine, 2 threads
    python benchmarks/bench_clicks.py flops B              # per refine window, for the GPU estimate

The recipe is the demo's (``autoseg demo``): 12 training CT phantoms (seed 0), here with 6
held-out ones; ``3d_cpu``, quick preset (AdamW, 20 x 25 = 500 iterations), fold ``all``. The
two models differ only in the plan's ``guidance`` entry (``plain`` = ``--guidance off``), and
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
# The same recipe with other seeds (the number after "_seed"): how far runs of one recipe differ
# (the noise floor of "automatic Dice drops by no more than 0.01"), and the guided - plain
# difference averaged over seeds.
REPEATS = ("plain_seed2", "guided_seed2", "plain_seed3", "guided_seed3")


def folders(base: Path) -> dict:
    return {"dataset": base / "Dataset001_PhantomCT", "guided": base / "guided.autoseg",
            "plain": base / "plain.autoseg", **{r: base / f"{r}.autoseg" for r in REPEATS}}


def cmd_prepare(args) -> None:
    from AutoSegLib.fileutil import read_json, write_json
    from AutoSegLib.plan_dataset import plan_dataset
    from AutoSegLib.preprocessing.runner import preprocess_dataset
    from AutoSegLib.synthetic import make_phantom_dataset

    f = folders(args.base)
    if not (f["dataset"] / "dataset.json").is_file():
        make_phantom_dataset(f["dataset"], kind="ct", cases=TRAIN_CASES, seed=SEED, test_cases=TEST_CASES)
    plan_dataset(f["dataset"], f["guided"], num_processes=2, guidance="on")
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
    seed = []
    if args.model in REPEATS:
        if not work.exists():
            source = f[args.model.split("_")[0]]
            shutil.copytree(source, work, ignore=shutil.ignore_patterns("model", "train_time.json"))
        seed = ["--seed", args.model.split("_seed")[1]]
    command = [sys.executable, "-m", "AutoSegLib", "train", str(f["dataset"]), CONFIG, "all", "-w", str(work),
               "--preset", "quick", "--device", "cpu", "--overwrite", "--no-validation", "--num-workers", "1", *seed]
    started = time.monotonic()
    load_before = os.getloadavg()
    subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    seconds = time.monotonic() - started
    record = {"model": args.model, "iterations": 500, "wall_s": round(seconds, 1), "load_before": load_before,
              "load_after": os.getloadavg(), "threads": os.environ.get("OMP_NUM_THREADS", "default")}
    (work / "train_time.json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record))


# -- Dice after clicks ------------------------------------------------------------------------------
def dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two masks; NaN when both are empty (left out of means, as the evaluation does)."""
    total = int(predicted.sum()) + int(truth.sum())
    return float("nan") if total == 0 else 2.0 * int(np.logical_and(predicted, truth).sum()) / total


def test_cases(dataset: Path) -> list[tuple[str, np.ndarray, np.ndarray, object]]:
    from AutoSegLib.imageio import read_image

    cases = []
    for label_path in sorted((dataset / "labelsTs").glob("*.nii.gz")):
        case = label_path.name[:-len(".nii.gz")]
        image, geometry = read_image(dataset / "imagesTs" / f"{case}_0000.nii.gz")
        truth, _ = read_image(label_path)
        cases.append((case, image, truth.astype(np.uint8), geometry))
    return cases


def click_sequence(predictor, prepared, image, truth, automatic, geometry, label: int, n_clicks: int,
                   spacing) -> tuple[list[np.ndarray], list[tuple[bool, tuple]], list[float]]:
    """Label maps after 0..n clicks on ``label`` by the fixed rule, the clicks (index form), refine seconds."""
    from AutoSegLib.inference.clicks import Click, error_click, index_to_physical

    results, clicks, index_clicks, seconds = [automatic], [], [], []
    labels = automatic
    for _ in range(n_clicks):
        found = error_click(labels == label, truth == label, spacing)
        if found is None:  # nothing left to correct: the result stays
            results.append(labels)
            continue
        positive, index, _ = found
        index_clicks.append((positive, index))
        clicks.append(Click(label, positive, index_to_physical(index, geometry)))
        started = time.monotonic()
        labels = predictor.refine(prepared, None, labels, clicks).labels
        seconds.append(time.monotonic() - started)
        results.append(labels)
    return results, index_clicks, seconds


def grow_sequence(image, automatic, truth, label, index_clicks, spacing) -> dict[int, float] | None:
    """Dice of ``label`` after Grow from seeds with the first k of the same clicks (None: module absent)."""
    try:
        from AutoSegLib.evaluation.grow_from_seeds import grow_correction
    except ImportError:
        return None
    out = {}
    for k in CLICK_COUNTS[1:]:
        if k > len(index_clicks):
            out[k] = out.get(max([j for j in out] or [0]), dice(automatic == label, truth == label))
            continue
        grown, _ = grow_correction(image.astype(np.float32), automatic, label, index_clicks[:k], spacing)
        out[k] = dice(grown == label, truth == label)
    return out


def cmd_dice(args) -> None:
    from AutoSegLib.inference import Predictor

    f = folders(args.base)
    cases = test_cases(f["dataset"])
    labels = json.loads((f["dataset"] / "dataset.json").read_text())["labels"]
    classes = {name: value for name, value in labels.items() if value != 0}
    report = {"cases": [c[0] for c in cases], "classes": classes, "models": {}, "load": os.getloadavg()}
    for model_name in args.models:
        predictor = Predictor.from_model_dir(f[model_name] / "model", CONFIG, ["all"], device="cpu", tta=False)
        per_case = []
        for case, image, truth, geometry in cases:
            automatic, _ = predictor.predict([image], geometry)
            prepared = predictor.prepare_refine([image], geometry)
            per_case.append((case, image, truth, geometry, automatic, prepared))
        auto = {name: float(np.nanmean([dice(a == v, t == v) for _, _, t, _, a, _ in per_case]))
                for name, v in classes.items()}
        worst = min(auto, key=auto.get)
        table, seconds, grow = {}, [], {}
        for name, value in classes.items():
            curves = []
            grow_curves = []
            for case, image, truth, geometry, automatic, prepared in per_case:
                spacing = geometry.spacing
                results, index_clicks, took = click_sequence(predictor, prepared, image, truth, automatic, geometry,
                                                             value, max(CLICK_COUNTS), spacing)
                seconds += took
                curves.append([dice(r == value, truth == value) for r in results])
                if model_name.startswith("guided") and args.grow:
                    g = grow_sequence(image, automatic, truth, value, index_clicks, spacing)
                    if g is not None:
                        grow_curves.append([curves[-1][0]] + [g[k] for k in CLICK_COUNTS[1:]])
            mean = np.nanmean(np.array(curves, dtype=float), axis=0)
            table[name] = {str(k): round(float(mean[k]), 4) for k in CLICK_COUNTS}
            if grow_curves:
                gmean = np.nanmean(np.array(grow_curves, dtype=float), axis=0)
                grow[name] = {str(k): round(float(v), 4) for k, v in zip(CLICK_COUNTS, gmean)}
            print(f"{model_name:7s} {name:14s} " + "  ".join(f"{k} clicks {table[name][str(k)]:.3f}"
                                                          for k in CLICK_COUNTS)
                  + ("  | grow from seeds " + "  ".join(f"{grow[name][str(k)]:.3f}" for k in CLICK_COUNTS[1:])
                     if name in grow else ""), flush=True)
        report["models"][model_name] = {
            "automatic": {k: round(v, 4) for k, v in auto.items()}, "worst_class": worst, "after_clicks": table,
            "grow_from_seeds": grow, "refine_seconds_median": round(statistics.median(seconds), 3) if seconds else None,
            "refines": len(seconds)}
    report["load_after"] = os.getloadavg()
    (args.base / args.output).write_text(json.dumps(report, indent=2))
    if set(MODELS) <= set(report["models"]):
        print_tables(report)


def cmd_automatic(args) -> None:
    from AutoSegLib.inference import Predictor

    f = folders(args.base)
    cases = test_cases(f["dataset"])
    labels = json.loads((f["dataset"] / "dataset.json").read_text())["labels"]
    classes = {name: value for name, value in labels.items() if value != 0}
    out = {}
    for name in (*MODELS, *REPEATS):
        if not (f[name] / "model" / CONFIG / "fold_all" / "checkpoint_final.pt").is_file():
            continue  # not trained, or still training
        predictor = Predictor.from_model_dir(f[name] / "model", CONFIG, ["all"], device="cpu", tta=False)
        predicted = [(predictor.predict([image], geometry)[0], truth) for _, image, truth, geometry in cases]
        out[name] = {c: round(float(np.nanmean([dice(p == v, t == v) for p, t in predicted])), 4)
                     for c, v in classes.items()}
        out[name]["mean"] = round(float(np.mean(list(out[name].values()))), 4)
        print(name, json.dumps(out[name]), flush=True)
    (args.base / "automatic.json").write_text(json.dumps(out, indent=2))


def print_tables(report: dict) -> None:
    models = report["models"]
    print("\n| class | automatic, plain | automatic, guided | guided: 1 click | 3 clicks | 5 clicks | "
          "plain: 3 clicks | grow from seeds: 1 | 3 | 5 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in report["classes"]:
        g, p = models["guided"], models["plain"]
        gs = g["grow_from_seeds"].get(name, {})
        cells = [p["automatic"][name], g["automatic"][name], *(g["after_clicks"][name][k] for k in ("1", "3", "5")),
                 p["after_clicks"][name]["3"], *(gs.get(k, float("nan")) for k in ("1", "3", "5"))]
        print(f"| {name} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    for model_name, m in models.items():
        w = m["worst_class"]
        print(f"{model_name}: worst class {w}: automatic {m['after_clicks'][w]['0']:.3f}, 3 clicks "
              f"{m['after_clicks'][w]['3']:.3f} (+{m['after_clicks'][w]['3'] - m['after_clicks'][w]['0']:.3f}); "
              f"median refine {m['refine_seconds_median']} s in-process over {m['refines']} refines")


# -- latency of the persistent process -------------------------------------------------------------
def cmd_latency(args) -> None:
    from AutoSegLib.inference.clicks import Click, error_click, index_to_physical
    from AutoSegLib.inference.engine_process import EngineProcess

    f = folders(args.base)
    case, image, truth, geometry = test_cases(f["dataset"])[0]
    labels_json = json.loads((f["dataset"] / "dataset.json").read_text())["labels"]
    classes = [v for v in labels_json.values() if v != 0]
    load_before = os.getloadavg()
    started = time.monotonic()
    with EngineProcess(f[args.model] / "model", configuration=CONFIG, folds=["all"], device="cpu") as engine:
        ready_s = time.monotonic() - started
        t = time.monotonic()
        case_id = engine.open_case([image], geometry)
        open_s = time.monotonic() - t
        labels = np.zeros(truth.shape, np.uint8)
        times, clicks, engine_s, network_s = [], [], [], []
        for i in range(args.clicks):
            label = classes[i % len(classes)]
            found = error_click(labels == label, truth == label, geometry.spacing)
            positive, index = (True, tuple(int(v) for v in np.argwhere(truth == label)[0])) if found is None else found[:2]
            clicks.append(Click(label, positive, index_to_physical(index, geometry)))
            t = time.monotonic()
            result = engine.refine(case_id, labels, clicks)
            times.append(time.monotonic() - t)
            engine_s.append(result.seconds)
            network_s.append(result.network_seconds)
            labels = result.labels
    after = times[1:]
    record = {"model": args.model, "case": case, "image_shape": list(truth.shape), "engine_start_s": round(ready_s, 2),
              "open_case_s": round(open_s, 3), "first_click_s": round(times[0], 3),
              "median_click_s_after_first": round(statistics.median(after), 3), "max_click_s_after_first":
              round(max(after), 3), "clicks": len(times), "median_engine_side_s": round(statistics.median(engine_s[1:]), 3),
              "median_network_s": round(statistics.median(network_s[1:]), 3),
              "threads": os.environ.get("OMP_NUM_THREADS", "default (2 cores)"), "load_before": load_before,
              "load_after": os.getloadavg()}
    print(json.dumps(record, indent=2))
    (args.base / f"latency_{args.model}.json").write_text(json.dumps(record, indent=2))


def cmd_step_cost(args) -> None:
    """Seconds per training step, guided against plain, alternating in one process (same load).

    Each model's scratch fold ``0`` is set up in a copy of its work folder; batches are made in
    this process beforehand, so only the steps are timed (the guided one includes its simulated
    clicks' forward passes).
    """
    import tempfile

    import torch

    from AutoSegLib.training.loader import BatchLoader
    from AutoSegLib.training.setup import TrainOptions, setup_run, configure_cpu_threads
    from AutoSegLib.training.trainer import Trainer

    configure_cpu_threads()
    f = folders(args.base)
    trainers, batches = {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in MODELS:
            work = Path(scratch) / name
            shutil.copytree(f[name], work, ignore=shutil.ignore_patterns("model"))
            run = setup_run(f["dataset"], work, TrainOptions(CONFIG, "0", preset="quick", device="cpu",
                                                              num_workers=0))
            trainers[name] = Trainer(run)
            trainers[name].network.train()
            with BatchLoader(run.train_cases, run.config, run.data_folder, num_workers=0, seed=1) as loader:
                batches[name] = [next(loader) for _ in range(args.steps)]
        times = {name: [] for name in MODELS}
        for block in range(2):
            for name in MODELS:
                for batch in batches[name][block::2]:
                    started = time.monotonic()
                    trainers[name].train_step(batch)
                    times[name].append(time.monotonic() - started)
        for trainer in trainers.values():
            trainer.run.lock.release()
    out = {name: round(statistics.median(t[1:]), 3) for name, t in times.items()}
    out.update(steps=args.steps, threads=torch.get_num_threads(), load=os.getloadavg())
    print(json.dumps(out))


def cmd_flops(args) -> None:
    from AutoSegLib.network.cost import network_cost
    from AutoSegLib.planning.guidance import guidance_channels

    f = folders(args.base)
    plans = json.loads((f["guided"] / "plans.json").read_text())
    config = plans["configurations"][CONFIG]
    n_classes = int(plans["num_classes"])
    n_in = len(plans["channel_names"]) + guidance_channels(config, n_classes - 1)
    cost = network_cost(config, n_in, n_classes)
    forward_s = None
    if (f["guided"] / "model").is_dir():  # the trained network's forward pass of one window on this CPU
        import torch

        from AutoSegLib.inference import Predictor

        network = Predictor.from_model_dir(f["guided"] / "model", CONFIG, ["all"], device="cpu").stages[0].network
        x = torch.zeros((1, n_in, *config["patch_size"]))
        times = []
        with torch.inference_mode():
            for _ in range(11):
                started = time.monotonic()
                network(x)
                times.append(time.monotonic() - started)
        forward_s = statistics.median(times[1:])
        # the rest of a refine (mapping the clicks, the window's input, probabilities back to the
        # original grid, the merge): the same refine with the network replaced by a stand-in
        from AutoSegLib.inference.clicks import Click, index_to_physical

        predictor = Predictor.from_model_dir(f["guided"] / "model", CONFIG, ["all"], device="cpu", tta=False)
        _, image, truth, geometry = test_cases(f["dataset"])[0]
        prepared = predictor.prepare_refine([image], geometry)
        k = n_classes
        predictor.stages[0].network = lambda x: torch.zeros((x.shape[0], k, *x.shape[2:]))
        clicks = [Click(5, True, index_to_physical(np.argwhere(truth == 5)[0], geometry))]
        rest = []
        for _ in range(6):
            started = time.monotonic()
            predictor.refine(prepared, None, truth, clicks)
            rest.append(time.monotonic() - started)
        cost["refine_without_network_s_median"] = round(statistics.median(rest[1:]), 4)
    print(json.dumps({"configuration": CONFIG, "patch": config["patch_size"], "input_channels": n_in, **cost,
                      "cpu_forward_s_median": forward_s, "threads": os.environ.get("OMP_NUM_THREADS", "default"),
                      "load": os.getloadavg()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("base", type=Path)
    p.set_defaults(func=cmd_prepare)
    p = sub.add_parser("train")
    p.add_argument("base", type=Path)
    p.add_argument("model", choices=(*MODELS, *REPEATS))
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("automatic", help="automatic Dice per class of each trained model (the seed-noise check)")
    p.add_argument("base", type=Path)
    p.set_defaults(func=cmd_automatic)
    p = sub.add_parser("dice")
    p.add_argument("base", type=Path)
    p.add_argument("--no-grow", dest="grow", action="store_false", help="skip Grow from seeds")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=(*MODELS, *REPEATS))
    p.add_argument("--output", default="dice.json", help="file in BASE for the figures")
    p.set_defaults(func=cmd_dice)
    p = sub.add_parser("latency")
    p.add_argument("base", type=Path)
    p.add_argument("--model", choices=MODELS, default="guided")
    p.add_argument("--clicks", type=int, default=12)
    p.set_defaults(func=cmd_latency)
    p = sub.add_parser("step-cost")
    p.add_argument("base", type=Path)
    p.add_argument("--steps", type=int, default=20)
    p.set_defaults(func=cmd_step_cost)
    p = sub.add_parser("flops")
    p.add_argument("base", type=Path)
    p.set_defaults(func=cmd_flops)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
