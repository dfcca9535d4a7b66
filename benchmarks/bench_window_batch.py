"""Milliseconds per window of one forward pass on the CPU, by windows per pass: is one alone slower?

    python benchmarks/bench_window_batch.py PLANS_JSON [--configuration 3d_cpu] [--threads 2]
                                           [--batches 1 2 4] [--repeats 5] [--classes K]

Builds the configuration's network (random weights cost what trained ones do) in eval mode, in
the layout prediction uses (``channels_last_3d`` for 3D on the CPU) and in the contiguous one, and
times ``--repeats`` passes of each batch of random windows after two warm-up passes.

Why: for a batch of one, torch runs a 3D convolution whose channels x depth x height stay under
about 20,000 in its own slow kernel instead of oneDNN's, which is every stage of a small
``3d_cpu`` network. The predictor therefore sends windows of up to ``CPU_BATCH_VOXELS`` voxels at
least two at a time (``AutoSegLib/inference/memory.py``, ``min_samples_per_pass``). Rerun this on
a new torch: if one window alone is no slower per window than two, the rule can go.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import AutoSegLib  # noqa: E402,F401 - sets OpenMP's passive waits before torch loads, as the CLI does
import torch  # noqa: E402

from AutoSegLib.network.layout import inference_memory_format  # noqa: E402
from AutoSegLib.network.registry import build_network  # noqa: E402


def ms_per_window(network, patch, channels: int, batch: int, memory_format, repeats: int) -> float:
    x = torch.randn(batch, channels, *patch).to(memory_format=memory_format)
    with torch.inference_mode():
        for _ in range(2):
            network(x)
        started = time.perf_counter()
        for _ in range(repeats):
            network(x)
    return (time.perf_counter() - started) / repeats / batch * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("plans", type=Path)
    parser.add_argument("--configuration", default="3d_cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--classes", type=int, default=None, help="network outputs (default: the plans' labels)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    plans = json.loads(args.plans.read_text())
    config = plans["configurations"][args.configuration]
    channels = len(config.get("normalization_schemes", [None]))
    classes = args.classes or len(plans.get("labels", {})) or 2
    patch = [int(p) for p in config["patch_size"]]
    print(f"{args.configuration}: patch {'x'.join(map(str, patch))}, features {config['features_per_stage']}, "
          f"{classes} outputs; torch {torch.__version__}, {args.threads} thread(s), load average "
          f"{os.getloadavg()[0]:.1f}")
    network = build_network(config, channels, classes, deep_supervision=False).eval()
    layouts = {"contiguous": torch.contiguous_format}
    chosen = inference_memory_format(len(patch), "cpu")
    if chosen != torch.contiguous_format:
        layouts["channels-last (as predicted)"] = chosen
    for name, memory_format in layouts.items():
        network = network.to(memory_format=memory_format)
        cells = [f"{b} a pass: {ms_per_window(network, patch, channels, b, memory_format, args.repeats):.0f} ms"
                 for b in args.batches]
        print(f"  {name}, per window: " + ", ".join(cells))


if __name__ == "__main__":
    main()
