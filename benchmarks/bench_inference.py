"""Seconds per case and peak memory of prediction, with and without test-time mirroring.

Builds a CT phantom dataset (4 cases), plans it with the real planner, and makes a model
folder with one fold of randomly initialised 3d_fullres weights (speed and memory do not
depend on training). Each measurement runs in a fresh subprocess, so its high-water mark
(``VmHWM`` of /proc/self/status) belongs to that one prediction:

    load s   Predictor.from_model_dir (network built, checkpoint loaded)
    case s   predictor.predict on the in-memory case (preprocess, sliding window, restore)
    peak     VmHWM at the end (whole process: Python, torch, model, case)
    above    VmHWM minus the RSS just before predict (what predicting one case adds)

    python benchmarks/bench_inference.py                       # phantom case, TTA off and on
    python benchmarks/bench_inference.py --shape 96 256 256    # a larger case (zoomed phantom)
    python benchmarks/bench_inference.py --batch-sizes 1 2     # windows per forward pass
    python benchmarks/bench_inference.py --configuration 2d --batch-sizes 1 8 --tta-modes off

Threads: OMP_NUM_THREADS if set, else every core, as ``autoseg predict`` does.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_preprocess_memory import _status  # noqa: E402 - VmRSS/VmHWM of this process

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MB = 1024 * 1024


def build_model(root: Path) -> tuple[Path, Path]:
    """Phantom dataset, real plans, one fold of random weights for every planned configuration."""
    import torch

    from AutoSegLib.dataset import load_spec
    from AutoSegLib.events import Reporter
    from AutoSegLib.fileutil import write_json
    from AutoSegLib.network import build_network
    from AutoSegLib.plan_dataset import plan_dataset
    from AutoSegLib.synthetic import make_phantom_dataset
    from AutoSegLib.models.checkpoint import save_checkpoint

    dataset = make_phantom_dataset(root / "DS", kind="ct", cases=4, seed=3)
    plans = plan_dataset(dataset, root / "WORK", num_processes=1, reporter=Reporter(quiet=True))
    model = root / "WORK" / "model"
    spec = load_spec(dataset)
    write_json(model / "plans.json", plans.to_dict())
    write_json(model / "dataset.json", spec.to_dict())
    for name, config in plans.configurations.items():
        torch.manual_seed(0)
        net = build_network(config.to_dict(), spec.num_channels, len(spec.labels))
        save_checkpoint(model / name / "fold_0" / "checkpoint_final.pt",
                        {"network_weights": net.state_dict(), "epoch": 0})
    return dataset, model


def case_image(dataset: Path, shape: list[int] | None) -> Path:
    """The first phantom case, or it zoomed to ``shape`` at the same spacing (a larger body, more windows)."""
    from scipy import ndimage

    from AutoSegLib.imageio import read_image, write_image

    source = sorted((dataset / "imagesTr").glob("*_0000.nii.gz"))[0]
    if not shape:
        return source
    image, geometry = read_image(source)
    factors = [n / o for n, o in zip(shape, image.shape)]
    zoomed = ndimage.zoom(image.astype("float32"), factors, order=1).astype(image.dtype)
    target = source.parent.parent / f"large_{'x'.join(map(str, shape))}.nii.gz"
    write_image(zoomed, geometry, target)
    return target


def child(args) -> None:
    """One measurement; prints one JSON line."""
    from AutoSegLib.imageio import read_image
    from AutoSegLib.inference import Predictor
    from AutoSegLib.inference.predictor import default_batch_size
    from AutoSegLib.training.setup import configure_cpu_threads

    threads = configure_cpu_threads()
    image, geometry = read_image(args.image)
    started = time.perf_counter()
    predictor = Predictor.from_model_dir(args.model, args.configuration, folds=[0], device="cpu", tta=args.tta,
                                         step=args.step,
                                         batch_size=None if args.batch_size == "auto" else int(args.batch_size))
    load_s = time.perf_counter() - started
    passes = []  # (windows in the batch) per forward pass, mirrored copies included
    predictor.stages[0].network.register_forward_pre_hook(lambda module, inputs: passes.append(len(inputs[0])))
    before = _status()["VmRSS"]
    started = time.perf_counter()
    cpu = time.process_time()
    labels, _ = predictor.predict([image], geometry)
    case_s, cpu_s = time.perf_counter() - started, time.process_time() - cpu
    status = _status()
    stage = predictor.stages[0]
    batch = predictor.batch_size or default_batch_size(stage.config, predictor.device)
    print(json.dumps({"load_s": load_s, "case_s": case_s, "cpu_s": cpu_s, "peak": status["VmHWM"],
                      "above": status["VmHWM"] - before, "threads": threads, "shape": list(image.shape),
                      "patch": stage.config["patch_size"], "spacing": list(geometry.spacing),
                      "batch": batch, "forward_passes": len(passes), "windows": sum(passes) // (2 ** len(stage.config["patch_size"])
                                                                                     if args.tta else 1)}))


def machine() -> str:
    import numpy
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    mem = next((int(line.split()[1]) // 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)
    return (f"{cpu}, {os.cpu_count()} cores, {mem / 1024:.1f} GiB RAM, {platform.system()} {platform.release()}; "
            f"Python {platform.python_version()}, torch {torch.__version__}, numpy {numpy.__version__}; "
            f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}; "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                        help="zoom the phantom case to this shape (a larger case)")
    parser.add_argument("--configuration", default="3d_fullres")
    parser.add_argument("--batch-sizes", nargs="+", default=["auto"],
                        help="windows per forward pass to compare (default: the predictor's choice)")
    parser.add_argument("--step", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=1, help="runs per setting (the fastest is shown)")
    parser.add_argument("--tta-modes", nargs="+", choices=["off", "on"], default=["off", "on"])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--image", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tta", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", default="auto", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        dataset, model = build_model(Path(tmp))
        image = case_image(dataset, args.shape)
        rows = []
        for tta in [mode == "on" for mode in args.tta_modes]:
            for batch in args.batch_sizes:
                argv = [sys.executable, __file__, "--child", "--image", str(image), "--model", str(model),
                        "--configuration", args.configuration, "--step", str(args.step), "--batch-size", str(batch)]
                runs = [json.loads(subprocess.run(argv + (["--tta"] if tta else []), check=True, capture_output=True,
                                                  text=True).stdout.strip().splitlines()[-1])
                        for _ in range(args.repeats)]
                best = min(runs, key=lambda r: r["case_s"])
                rows.append((tta, best))
        first = rows[0][1]
        print(f"case: {image.name}, shape {first['shape']}, spacing {[round(s, 3) for s in first['spacing']]}; "
              f"{args.configuration} patch {first['patch']}, step {args.step}, one fold, {first['threads']} thread(s)")
        print("| TTA | windows | batch | passes | load s | case s | cpu s | peak MiB | above MiB |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for tta, r in rows:
            print(f"| {'on' if tta else 'off'} | {r['windows']} | {r['batch']} | {r['forward_passes']} | "
                  f"{r['load_s']:.2f} | {r['case_s']:.2f} | "
                  f"{r['cpu_s']:.2f} | {r['peak'] / MB:.0f} | {r['above'] / MB:.0f} |")


if __name__ == "__main__":
    main()
