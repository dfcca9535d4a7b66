"""Estimated against measured peak memory of ``autoseg predict``, at several image sizes.

Builds the CT phantom dataset, plans it with the real planner and makes a model folder with
random weights (bench_inference.build_model; memory does not depend on training), zooms the
first phantom to each ``--sizes`` cube at the same spacing, then for each size:

    estimate   what `autoseg predict` prints before starting (AutoSegLib/inference/memory.py)
    measured   the peak RSS of the whole `autoseg predict` process (``/usr/bin/time -v``, else
               the child's VmHWM via ``resource``)

With ``--phases`` a second, in-process run records the high-water mark of each step (read,
preprocess, sliding window, softmax, restore, labels, write) next to the estimate's phases.

    python benchmarks/bench_memory_estimate.py --sizes 100 200 300           # ~4 min on 2 cores
    python benchmarks/bench_memory_estimate.py --sizes 600 --step 1.0         # ~15 min, 13 GB
    python benchmarks/bench_memory_estimate.py --sizes 200 --phases --configuration 3d_fullres
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import build_model, case_image, machine  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
MiB = 1 << 20


def measure_cli(image: Path, model: Path, out: Path, args) -> dict:
    """Run `autoseg predict` on one image; its printed estimate, peak RSS and wall time."""
    folder = out.parent / f"in_{image.name.split('.')[0]}"
    folder.mkdir(exist_ok=True)
    target = folder / "case_0000.nii.gz"
    if not target.exists():
        os.link(image, target) if image.stat().st_dev == folder.stat().st_dev else shutil.copy(image, target)
    command = [sys.executable, "-m", "AutoSegLib", "predict", "-i", str(folder), "-o", str(out), "-m", str(model),
               "-c", args.configuration, "--device", "cpu", "--step", str(args.step), "--events"]
    if args.no_tta:
        command.append("--no-tta")
    timer = shutil.which("time") and Path("/usr/bin/time").exists()
    started = time.perf_counter()
    done = subprocess.run((["/usr/bin/time", "-v"] if timer else []) + command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"predict failed ({done.returncode}):\n{done.stderr[-2000:]}")
    estimate = next(e for e in map(json.loads, done.stdout.splitlines())
                    if e.get("event") == "log" and "estimate_bytes" in e)
    if timer:
        peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)[1]) * 1024
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {"estimate": estimate["estimate_bytes"], "peak": peak, "seconds": seconds, "message": estimate["message"]}


def _hwm(reset: bool = False) -> int:
    with open("/proc/self/status") as handle:
        value = next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmHWM:"))
    if reset:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    return value


def child_phases(args) -> None:
    """In-process prediction with the high-water mark of each step; prints one JSON line."""
    import AutoSegLib.inference.files as files
    import AutoSegLib.inference.predictor as predictor_module
    from AutoSegLib.inference import Predictor
    from AutoSegLib.inference.files import find_input_cases, output_paths, predict_case_file
    from AutoSegLib.training.setup import configure_cpu_threads

    configure_cpu_threads()
    peaks: dict[str, int] = {}

    def wrap(module, name, label):
        original = getattr(module, name)

        def wrapped(*a, **k):
            peaks[f"before {label}"] = max(peaks.get(f"before {label}", 0), _hwm(reset=True))
            try:
                return original(*a, **k)
            finally:
                peaks[label] = max(peaks.get(label, 0), _hwm(reset=True))
        setattr(module, name, wrapped)

    for module, name, label in [(files, "read_image", "read"), (predictor_module, "preprocess_case", "preprocess"),
                                (predictor_module, "sliding_window_logits", "sliding window"),
                                (predictor_module, "softmax", "softmax"),
                                (predictor_module, "restore_probabilities", "restore"),
                                (predictor_module, "labels_from_probabilities", "labels"),
                                (files, "write_case_outputs", "outputs")]:
        wrap(module, name, label)
    predictor = Predictor.from_model_dir(args.model, args.configuration, folds=[0], device="cpu",
                                         tta=not args.no_tta, step=args.step)
    base = _hwm(reset=True)
    cases, _ = find_input_cases(args.image, 1)
    predict_case_file(predictor, cases[0], output_paths(cases[0], Path(args.out)))
    peaks["end"] = _hwm()
    print(json.dumps({"base": base, "peaks": peaks}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 200, 300], help="cube sizes in voxels")
    parser.add_argument("--configuration", default="3d_cpu")
    parser.add_argument("--step", type=float, default=1.0,
                        help="window step (default 1.0: memory does not depend on it, time does)")
    parser.add_argument("--no-tta", action="store_true")
    parser.add_argument("--phases", action="store_true", help="also measure each step in-process")
    parser.add_argument("--root", type=Path, default=None, help="keep the dataset, model and images here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--image", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_phases(args)
        return
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or Path(tmp)
        if (root / "WORK" / "model" / "plans.json").is_file():
            dataset, model = root / "DS", root / "WORK" / "model"
        else:
            dataset, model = build_model(root)
        print("| size | configuration | estimate | measured peak RSS | estimate / measured | s |")
        print("|---|---|---:|---:|---:|---:|")
        for size in args.sizes:
            image = case_image(dataset, [size] * 3)
            out = root / f"out_{size}"
            shutil.rmtree(out, ignore_errors=True)
            row = measure_cli(image, model, out, args)
            print(f"| {size}^3 | {args.configuration} | {row['estimate'] / MiB:.0f} MiB | {row['peak'] / MiB:.0f} MiB | "
                  f"{row['estimate'] / row['peak']:.2f} | {row['seconds']:.0f} |", flush=True)
            if args.phases:
                argv = [sys.executable, __file__, "--child", "--image", str(image), "--model", str(model),
                        "--out", str(out), "--configuration", args.configuration, "--step", str(args.step)]
                result = json.loads(subprocess.run(argv + (["--no-tta"] if args.no_tta else []), check=True,
                                                   capture_output=True, text=True).stdout.strip().splitlines()[-1])
                print(f"  in-process, base {result['base'] / MiB:.0f} MiB: " + ", ".join(
                    f"{k} {v / MiB:.0f}" for k, v in result["peaks"].items()) + " (MiB, process high-water marks)")
            print(f"  printed: {row['message']}")


if __name__ == "__main__":
    main()
