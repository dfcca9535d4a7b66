"""Planner speed: time ``plan()`` on the paper's datasets and a few harder synthetic ones.

Goal (issue 3): planning every configuration of a dataset takes under 1 s.

    python benchmarks/bench_planner.py [--repeats 5]

Prints, per dataset: configurations planned, patch-shrink steps, low-resolution search
steps, and the best / median wall time over the repeats.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from AutoSegLib.planning import plan  # noqa: E402

CT = {"0": {"mean": 100.0, "std": 40.0, "median": 100.0, "min": -1024.0, "max": 3000.0,
            "percentile_00_5": -20.0, "percentile_99_5": 200.0}}


def fingerprint(spacing, shape, n, ct=False):
    return {"spacings": [list(spacing)] * n, "shapes_after_crop": [list(shape)] * n,
            "foreground_intensity_properties_per_channel": CT if ct else {},
            "median_relative_size_after_cropping": 1.0}


DATASETS = {
    "Heart (paper)": (fingerprint((1.37, 1.25, 1.25), (115, 320, 232), 20), "MRI", 2),
    "Hippocampus (paper)": (fingerprint((1.0, 1.0, 1.0), (36, 50, 35), 260), "MRI", 3),
    "Liver (paper)": (fingerprint((1.0, 0.7676, 0.7676), (482, 512, 512), 131, ct=True), "CT", 3),
    "Whole-body CT 0.8 mm, 1000 cases": (fingerprint((0.8, 0.8, 0.8), (1200, 512, 512), 1000, ct=True), "CT", 105),
    "Thick-slice MR 6 x 0.4 mm": (fingerprint((6.0, 0.4, 0.4), (30, 1024, 1024), 50), "MRI", 4),
}


def bench(repeats: int) -> None:
    print(f"{'dataset':36s} {'configs':>7s} {'shrinks':>7s} {'lowres':>6s} {'best ms':>8s} {'median ms':>9s}")
    for name, (fp, channel, n_classes) in DATASETS.items():
        labels = {"background": 0, **{f"class{i}": i for i in range(1, n_classes)}}
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            plans = plan(fp, {0: channel}, labels)
            times.append(time.perf_counter() - start)
        shrinks = sum(e["topic"] == "shrink" for c in plans.configurations.values() for e in c.explanation)
        low = plans.configurations.get("3d_lowres")
        steps = next((e["steps"] for e in low.explanation if e["topic"] == "lowres_search"), 0) if low else 0
        print(f"{name:36s} {len(plans.configurations):7d} {shrinks:7d} {steps:6d} "
              f"{1000 * min(times):8.1f} {1000 * statistics.median(times):9.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    bench(parser.parse_args().repeats)
