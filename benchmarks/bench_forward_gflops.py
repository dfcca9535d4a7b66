"""GFLOP/s of the 3D network's inference forward pass against a float32 matmul, on this core (issue 20).

    taskset -c 0 env OMP_NUM_THREADS=1 python benchmarks/bench_forward_gflops.py
    ... --patch 40 96 96 --variants eager contiguous batch2 frozen compiled

The network is the phantom 3d_fullres plan's (5 stages, 32-320 features, two convolutions per
stage, group norm, leaky ReLU; random weights: speed does not depend on training). FLOPs are
counted by torch's FlopCounterMode (a multiply-add = 2). The matmul (2048^3 float32) is timed
between the variants, in the same process, so a load that changes during the run hits both; the
figure reported is forward GFLOP/s / matmul GFLOP/s, each a median.

Variants:
  eager       what the predictor runs: channels_last_3d, inference mode, one window per call
  contiguous  the same in contiguous (NCDHW) layout
  batch2      two windows per call (channels_last_3d)
  frozen      torch.jit.trace + torch.jit.freeze + optimize_for_inference (oneDNN fusion of
              convolution and nonlinearity, weights pre-packed)
  compiled    torch.compile (inductor, CPU); compile time printed apart
Results with the outputs' largest difference from the eager ones (float rounding only).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from AutoSegLib.network import build_network  # noqa: E402


def config(patch) -> dict:
    return {"patch_size": list(patch), "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
            "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
            "features_per_stage": [32, 64, 128, 256, 320], "n_conv_per_stage_encoder": [2] * 5,
            "n_conv_per_stage_decoder": [2] * 4, "network": {"architecture": "PlainConvUNet"}}


def matmul_gflops(repeats: int = 5) -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t)
    return 2 * 2048 ** 3 / statistics.median(times) / 1e9


def timed(fn, x, repeats: int) -> float:
    with torch.inference_mode():
        fn(x)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patch", type=int, nargs=3, default=[40, 96, 96])
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=["eager", "contiguous", "batch2", "frozen"])
    args = parser.parse_args()
    torch.manual_seed(0)
    net = build_network(config(args.patch), 1, args.classes, deep_supervision=False).eval()
    x1 = torch.randn(1, 1, *args.patch)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        net(x1)
    flops = counter.get_total_flops()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS')}, affinity {sorted(os.sched_getaffinity(0))}, load "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}; patch {args.patch}: {flops / 1e9:.1f} GFLOP per window")
    last = net.to(memory_format=torch.channels_last_3d)
    with torch.inference_mode():
        reference = last(x1.to(memory_format=torch.channels_last_3d))
    for variant in args.variants:
        x, fn, windows = x1.to(memory_format=torch.channels_last_3d), last, 1
        setup = 0.0
        if variant == "contiguous":
            fn, x = build_network(config(args.patch), 1, args.classes, deep_supervision=False).eval(), x1
            fn.load_state_dict(net.state_dict())
        elif variant == "batch2":
            x, windows = torch.cat([x, x]).contiguous(memory_format=torch.channels_last_3d), 2
        elif variant == "frozen":
            t = time.perf_counter()
            with torch.inference_mode(False), torch.no_grad():
                fn = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(last, x)))
            setup = time.perf_counter() - t
        elif variant == "compiled":
            t = time.perf_counter()
            fn = torch.compile(last)
            with torch.inference_mode():
                fn(x)
            setup = time.perf_counter() - t
        with torch.no_grad():
            diff = float((fn(x)[:1].float() - reference).abs().max()) if variant != "frozen" else float(
                (fn(x).float() - reference).abs().max())
        before = matmul_gflops()
        seconds = timed(fn, x, args.repeats)
        after = matmul_gflops()
        matmul = statistics.median([before, after])
        rate = flops * windows / seconds / 1e9
        print(f"{variant:11s} {seconds / windows:6.2f} s/window  {rate:6.1f} GFLOP/s  matmul {matmul:6.1f} GFLOP/s  "
              f"{100 * rate / matmul:5.1f}%  setup {setup:5.1f} s  max |diff| {diff:.2e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
