"""Training throughput on the CPU at a fixed plan: iterations per second, compute, data waits.

    python benchmarks/bench_training.py [--iterations 3] [--warmup 1] [--only planned|nnunet]
                                        [--num-workers N] [--threads N] [--work WORK]

A CT phantom dataset (8 cases) is made, planned and preprocessed for 3d_fullres in a
temporary folder (or ``--work`` reuses one: DATASET and WORK beside each other as made
here). Two plans are timed, each with AutoSeg's real training step (``Trainer.train_step``:
deep-supervision Dice + CE, SGD with Nesterov, gradient clipping) fed by the real
``BatchLoader`` with its data-augmentation workers in separate processes:

- ``planned``: the phantom 3d_fullres plan as planned;
- ``nnunet``: the same plan forced to patch 32 x 112 x 112, batch 2 (what nnU-Net v2 plans
  for this data, issue 8), its network laid out by our planner for that patch.

Per plan: seconds per iteration (median of N after warm-up) and iterations per second,
the pure network step on a batch already in memory (forward, loss, backward, optimizer),
the fraction of the loop spent waiting for the data workers, and the network's GFLOP per
step (forward counted by torch's FlopCounterMode, step ~ 3x forward) against the machine's
measured float32 matmul rate. The load average is printed: on a shared machine figures move
a lot (the 2-core test machine runs other jobs; OpenMP threads then wait for cores).

Stays under 5 minutes: a plan stops measuring once ``--max-seconds`` (default 100) are
used, keeping at least 2 measured iterations.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from AutoSegLib.events import Reporter  # noqa: E402
from AutoSegLib.fileutil import read_json, write_json  # noqa: E402
from AutoSegLib.planning.topology import features_per_stage, plan_topology  # noqa: E402

CONFIG = "3d_fullres"
NNUNET_PATCH = [32, 112, 112]  # issue 8: nnunetv2 2.8.1's 3d_fullres plan for the CT phantoms
NNUNET_BATCH = 2


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        model = platform.processor() or model
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info = torch.__config__.parallel_info().splitlines()
    backend = next((line.split(":", 1)[1].strip() for line in info if "parallel backend" in line), "?")
    return (f"{model}; {os.cpu_count()} logical cores ({usable} usable); Python {platform.python_version()}; "
            f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads by default, "
            f"parallel backend {backend}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")


def load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def prepare(work: Path | None) -> tuple[Path, Path]:
    if work is not None:
        candidates = [p for p in work.parent.iterdir() if (p / "dataset.json").is_file()]
        if len(candidates) != 1:
            sys.exit(f"--work {work}: expected exactly one dataset folder beside it")
        return candidates[0], work
    from AutoSegLib.plan_dataset import plan_dataset
    from AutoSegLib.preprocessing.runner import preprocess_dataset
    from AutoSegLib.synthetic import make_phantom_dataset

    root = Path(tempfile.mkdtemp(prefix="bench_training_"))
    quiet = Reporter(quiet=True)
    dataset = make_phantom_dataset(root / "Dataset001_CT", kind="ct", cases=8, seed=0, reporter=quiet)
    plan_dataset(dataset, root / "work", num_processes=2, reporter=quiet)
    preprocess_dataset(dataset, root / "work", [CONFIG], num_processes=2, reporter=quiet)
    return Path(dataset), root / "work"


def matmul_gflops(threads: int) -> float:
    """Median float32 GEMM rate (2048^3), the machine's practical compute ceiling."""
    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.mm(a, b)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * 2048**3 / statistics.median(times) / 1e9


def forced_config(config: dict) -> dict:
    topology = plan_topology(config["spacing"], NNUNET_PATCH)
    n = topology.n_stages
    return {**config, "patch_size": list(topology.patch_size), "batch_size": NNUNET_BATCH,
            "strides": [list(s) for s in topology.strides], "kernel_sizes": [list(k) for k in topology.kernel_sizes],
            "features_per_stage": list(features_per_stage(n, 3)), "n_conv_per_stage_encoder": [2] * n,
            "n_conv_per_stage_decoder": [2] * (n - 1)}


def forward_gflop(network: torch.nn.Module, batch: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        network(batch)
    return counter.get_total_flops() / 1e9


def timed_iterations(next_batch, train_step, warmup: int, iterations: int, log, stop=None):
    """Run ``warmup + iterations`` training iterations, timing the data wait and the step apart.

    ``log(i, wait_s, step_s)`` is called after each; ``stop(steps, iteration_s)`` may end the
    measurement early. Returns the measured waits and steps (warm-up left out) and the last batch.
    """
    waits, steps, batch = [], [], None
    for i in range(warmup + iterations):
        t0 = time.perf_counter()
        batch = next_batch()
        t1 = time.perf_counter()
        train_step(batch)
        t2 = time.perf_counter()
        log(i, t1 - t0, t2 - t1)
        if i >= warmup:
            waits.append(t1 - t0)
            steps.append(t2 - t1)
            if stop is not None and stop(steps, t2 - t0):
                break
    return waits, steps, batch


def pure_step_seconds(train_step, batch, repeats: int) -> list[float]:
    """Seconds of ``repeats`` training steps on one batch already in memory (no data loading)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        train_step(batch)
        times.append(time.perf_counter() - t0)
    return times


def bench_plan(name: str, config: dict, dataset: Path, work: Path, args, peak: float) -> dict:
    from AutoSegLib.planning import Plans
    from AutoSegLib.training.loader import BatchLoader
    from AutoSegLib.training.setup import TrainOptions, setup_run
    from AutoSegLib.training.trainer import Trainer

    plans = read_json(work / "plans.json")
    plans["configurations"][CONFIG] = config
    Plans.from_dict(plans)
    write_json(work / "plans.json", plans)
    run = setup_run(dataset, work, TrainOptions(CONFIG, "0", overwrite=True, device="cpu",
                                                num_workers=args.num_workers))
    trainer = Trainer(run)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    patch = "x".join(map(str, config["patch_size"]))
    print(f"\n[{name}] patch {patch}, batch {config['batch_size']}, {len(config['strides'])} stages "
          f"{config['features_per_stage']}, {sum(p.numel() for p in trainer.network.parameters()) / 1e6:.1f} M "
          f"parameters; network threads {threads}; load {load()}", flush=True)

    started = time.monotonic()

    def log(i, wait_s, step_s):
        label = "warm-up" if i < args.warmup else "measured"
        print(f"  iteration {i + 1} ({label}): waited {wait_s:.2f} s for data, step {step_s:.2f} s", flush=True)

    def out_of_time(steps, iteration_s):
        if len(steps) >= 2 and time.monotonic() - started + iteration_s > args.max_seconds:
            print(f"  (stopping: --max-seconds {args.max_seconds:g} reached)")
            return True
        return False

    with BatchLoader(run.train_cases, run.config, run.data_folder, num_workers=args.num_workers, seed=0,
                     ignore_label=run.ignore_label) as loader:
        print(f"  data: {loader.num_workers} worker process(es); {'; '.join(loader.notes)}", flush=True)
        waits, steps, batch = timed_iterations(lambda: next(loader), trainer.train_step, args.warmup,
                                               args.iterations, log, out_of_time)
    gflop = 3 * forward_gflop(trainer.network, batch["data"])
    pure = pure_step_seconds(trainer.train_step, batch, len(steps))
    totals = [w + s for w, s in zip(waits, steps)]
    per_iteration = statistics.median(totals)
    result = {"name": name, "patch": patch, "batch": config["batch_size"], "s_per_it": per_iteration,
              "it_per_s": 1 / per_iteration, "pure_s": statistics.median(pure),
              "wait_fraction": sum(waits) / sum(totals), "gflop": gflop, "n": len(totals), "threads": threads}
    result["gflops"] = gflop / result["pure_s"]
    result["peak_fraction"] = result["gflops"] / peak
    result["compute_fraction"] = result["pure_s"] / per_iteration
    print(f"  -> {per_iteration:.2f} s/it ({1 / per_iteration:.3f} it/s); pure network step {result['pure_s']:.2f} s "
          f"({gflop:.0f} GFLOP, {result['gflops']:.1f} GFLOP/s = {100 * result['peak_fraction']:.0f}% of matmul); "
          f"waiting for data {100 * result['wait_fraction']:.1f}% of the loop; load {load()}", flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=3, help="measured iterations per plan (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="iterations before measuring (default 1)")
    parser.add_argument("--only", choices=["planned", "nnunet"], default=None)
    parser.add_argument("--num-workers", type=int, default=None, help="data workers (default: as training)")
    parser.add_argument("--threads", type=int, default=None, help="network threads (default: as training)")
    parser.add_argument("--max-seconds", type=float, default=100.0, help="per plan, measuring (default 100)")
    parser.add_argument("--work", type=Path, default=None, help="a prepared work folder to reuse")
    args = parser.parse_args()
    if args.iterations < 1:
        parser.error("--iterations must be at least 1")

    began = time.monotonic()
    print(f"machine: {machine()}")
    print(f"load average (1, 5, 15 min): {load()}")
    dataset, work = prepare(args.work)
    print(f"data: {dataset} -> {work} ({time.monotonic() - began:.0f} s)")
    from AutoSegLib.training.setup import configure_cpu_threads

    threads = args.threads or configure_cpu_threads()
    peak = matmul_gflops(threads)
    print(f"float32 matmul (2048^3, {threads} thread(s)): {peak:.1f} GFLOP/s")

    planned = read_json(work / "plans.json")["configurations"][CONFIG]
    original = dict(planned)
    variants = {"planned": planned, "nnunet": forced_config(planned)}
    results = []
    try:
        for name, config in variants.items():
            if args.only in (None, name):
                results.append(bench_plan(name, config, dataset, work, args, peak))
    finally:
        plans = read_json(work / "plans.json")
        plans["configurations"][CONFIG] = original
        write_json(work / "plans.json", plans)

    print("\nplan     patch        batch  s/it    it/s    network step  GFLOP/step  GFLOP/s  of matmul  "
          "data wait  network share")
    for r in results:
        print(f"{r['name']:8s} {r['patch']:12s} {r['batch']:5d}  {r['s_per_it']:6.2f}  {r['it_per_s']:6.3f}  "
              f"{r['pure_s']:10.2f} s  {r['gflop']:10.0f}  {r['gflops']:7.1f}  {100 * r['peak_fraction']:8.0f}%  "
              f"{100 * r['wait_fraction']:8.1f}%  {100 * min(1.0, r['compute_fraction']):12.0f}%")
    print(f"(medians of {', '.join(str(r['n']) for r in results)} iterations after {args.warmup} warm-up; "
          f"{threads} network thread(s); load average now {load()}; total {time.monotonic() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
