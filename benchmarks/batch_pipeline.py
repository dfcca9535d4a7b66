"""A batch of clinical-size cases through ``predict_files``: pipelined against one case at a time (issue 20).

    python benchmarks/batch_pipeline.py --work /tmp/batch --cases 10 --modes pipelined
    python benchmarks/batch_pipeline.py --work /tmp/batch_small --cases 3 --shape 150 256 256 \\
        --modes sequential pipelined

The cases are ``AutoSegLib.synthetic.cases.clinical_case(0, i)`` (512x512x300 CT at 0.8x0.8x1.5
mm by default; about 45 s each to make, kept in ``--work/imagesTs``). The model is the nnU-Net v2
fixture ``Testing/data/nnunet_v2/ct_3d_fullres`` (3d_fullres at 2.17x1.03x1.03 mm, fold 0),
predicted without TTA on the CPU, as ``benchmarks/clinical_size.py`` does. Each mode runs in its
own process (its VmHWM is its peak memory) with the thread rule of ``autoseg predict``
(:func:`AutoSegLib.inference.pipeline.network_threads`) unless ``--threads`` fixes the network's.

Printed per case: its stage times (read, preprocess, network, restore, write; the background
stages overlap the network when pipelined), when it was written (seconds from the start), and
for the batch: wall time, the sum of the network times, their ratio (issue 20's target: <= 1.1),
the process's VmHWM, the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "Testing" / "data" / "nnunet_v2" / "ct_3d_fullres" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
STAGES = ("read", "preprocess", "network", "restore", "write")


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def make_cases(work: Path, n: int, shape) -> Path:
    from AutoSegLib.imageio import write_image
    from AutoSegLib.synthetic.cases import clinical_case

    images = work / "imagesTs"
    images.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image = images / f"clinical_{i:03d}_0000.nii.gz"
        if image.is_file():
            continue
        t = time.perf_counter()
        case = clinical_case(0, i, shape=shape)
        tmp = images / ".making.nii.gz"
        write_image(case.images[0], case.geometry, tmp)
        tmp.rename(image)
        print(f"made case {i} {case.images[0].shape} in {time.perf_counter() - t:.0f} s", flush=True)
    for extra in sorted(images.glob("clinical_*_0000.nii.gz"))[n:]:
        raise SystemExit(f"{images} holds more than {n} cases ({extra.name}); use another --work")
    return images


def child(mode: str, images: str, out: str, model: str, threads: int | None) -> None:
    import torch

    from AutoSegLib.events import Reporter
    from AutoSegLib.inference.files import predict_files
    from AutoSegLib.inference.predictor import Predictor
    from AutoSegLib.training.setup import configure_cpu_threads

    configure_cpu_threads()  # as `autoseg predict` does; the pipeline then picks the network's threads
    predictor = Predictor.from_model_dir(model, folds=[0], device="cpu", tta=False)
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(threads)  # the pipeline keeps an explicit setting
        torch.set_num_threads(threads)
    times, logs = [], []

    class Log(Reporter):
        def log(self, stage, message, **fields):
            logs.append(message)

    start = time.perf_counter()
    predict_files(images, out, predictor=predictor, pipelined=mode == "pipelined", stage_times=times,
                  reporter=Log(quiet=True))
    wall = time.perf_counter() - start
    with open("/proc/self/status") as status:
        hwm = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    from AutoSegLib.imageio import read_header
    from AutoSegLib.inference.memory import predictor_estimate

    header = read_header(sorted(Path(images).glob("*_0000.nii.gz"))[0])
    estimate = predictor_estimate(predictor, header.shape, header.geometry.spacing, 2,
                                  pipelined=mode == "pipelined" and len(times) > 1)
    print(json.dumps({"wall": wall, "vmhwm": hwm, "estimate": estimate.peak, "estimate_phase": estimate.describe(),
                      "threads": torch.get_num_threads(), "logs": logs, "cases": [
        {"case": t.case, **t.stages, "started": t.started - start, "finished": t.finished - start} for t in times]}))


def report(mode: str, result: dict) -> None:
    print(f"\n{mode}: {len(result['cases'])} cases")
    for line in result["logs"]:
        print(f"  log: {line}")
    print("  case            " + "".join(f"{s:>11}" for s in STAGES) + "    started   written")
    for c in result["cases"]:
        print(f"  {c['case']:<16}" + "".join(f"{c.get(s, 0.0):>10.1f}s" for s in STAGES)
              + f" {c['started']:>9.1f}s {c['finished']:>8.1f}s")
    network = sum(c.get("network", 0.0) for c in result["cases"])
    background = sum(c.get(s, 0.0) for c in result["cases"] for s in STAGES if s != "network")
    print(f"  total {result['wall']:.1f} s; network {network:.1f} s (sum over cases); other stages {background:.1f} s; "
          f"total / network = {result['wall'] / network:.3f}; VmHWM {result['vmhwm'] / 2**30:.2f} GiB "
          f"(estimate {result['estimate'] / 2**30:.2f} GiB, {result['estimate_phase']})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/batch_pipeline"))
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--shape", type=int, nargs=3, default=[300, 512, 512], help="z y x of each case")
    parser.add_argument("--modes", nargs="+", default=["pipelined"], choices=["pipelined", "sequential"])
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the network (default: the rule)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.threads)
        return 0
    images = make_cases(args.work, args.cases, tuple(args.shape))
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONSAFEPATH="1")
    print(f"{os.cpu_count()} cores, affinity {sorted(os.sched_getaffinity(0))}, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS')}, model {args.model}", flush=True)
    results = {}
    for mode in args.modes:
        out = args.work / f"pred_{mode}"
        shutil.rmtree(out, ignore_errors=True)
        before = load()
        argv = [sys.executable, str(Path(__file__).resolve()), "--child", mode, str(images), str(out), str(args.model)]
        if args.threads:
            argv += ["--threads", str(args.threads)]
        done = subprocess.run(argv, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
        results[mode]["load"] = [before, load()]
        report(mode, results[mode])
        print(f"  load average before {before}, after {load()}", flush=True)
    if len(results) == 2:
        from AutoSegLib.imageio import read_image

        same = all((read_image(args.work / "pred_pipelined" / p.name)[0] == read_image(p)[0]).all()
                   for p in sorted((args.work / "pred_sequential").glob("*.nii.gz")))
        print(f"\nlabel files identical between the modes: {same}")
    (args.work / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
