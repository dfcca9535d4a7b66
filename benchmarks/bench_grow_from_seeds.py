"""Speed of the Grow-from-seeds baseline (Slicer's vtkImageGrowCutSegment from slicer-core).

    python benchmarks/bench_grow_from_seeds.py [--repeats 3]

Grows two seed labels over noisy boxes of a phantom's size and of a 100x200x200 region, with the
dense seeds :func:`correction_seeds` paints (and once with two short seed lines only), and prints
the best and median wall time per box and per million voxels. Print ``uptime`` next to
the figures: the machine is shared.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from AutoSegLib.evaluation.grow_from_seeds import correction_seeds, grow_from_seeds  # noqa: E402

SHAPES = [(26, 79, 92), (64, 128, 128), (100, 200, 200)]


def box_case(shape, seed=0):
    """A bright ellipsoid in noise, the automatic result its left half, one positive click on the right."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    inside = z ** 2 + y ** 2 + x ** 2 < 0.5
    image = (100 * inside + rng.normal(0, 10, shape)).astype(np.float32)
    automatic = (inside & (x < 0)).astype(np.uint8)
    click = (True, (shape[0] // 2, shape[1] // 2, int(shape[2] * 0.7)))
    return image, automatic, click


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"{'box (z, y, x), seeds':>25} {'voxels':>10} {'best s':>8} {'median s':>9} {'s per Mvox':>11}")
    for shape, sparse in [(shape, False) for shape in SHAPES] + [(SHAPES[-1], True)]:
        image, automatic, click = box_case(shape)
        seeds, region = correction_seeds(automatic, 1, [click], region=(0, shape[0], 0, shape[1], 0, shape[2]))
        if sparse:  # a few seed voxels only (two short lines): the search visits far more heap entries
            seeds[:] = 0
            seeds[shape[0] // 2, shape[1] // 2, 20:30] = 1
            seeds[shape[0] // 2, shape[1] // 2, -30:-20] = 2
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            grow_from_seeds(image, seeds, region)
            times.append(time.perf_counter() - start)
        voxels = int(np.prod(shape))
        print(f"{str(shape) + (' sparse' if sparse else ''):>25} {voxels:>10} {min(times):>8.2f} "
              f"{statistics.median(times):>9.2f} {min(times) / voxels * 1e6:>11.2f}")


if __name__ == "__main__":
    main()
