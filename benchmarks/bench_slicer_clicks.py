"""What a click costs on the Slicer side, for a clinical-size volume (slicer-core, no Slicer app).

    python benchmarks/bench_slicer_clicks.py [--shape 300 512 512] [--clicks 5]

A volume with five structures as a predicted segmentation (one shared layer) and a real engine
process (``autoseg engine``) with a tiny guided model of random weights: the network part of a
click is negligible here, so the figures are the module's own cost around the engine's:

- ``read``: the segments as one label map (GUI thread, before the engine is asked);
- ``engine``: the refine round trip (worker thread: arrays through .npy files, the engine's
  merge of the whole label map);
- ``apply``: the answer into the chosen segment and the undo record (GUI thread).

A real 3d model adds its windows' network time (issue 21's benchmark of the engine). Print
``uptime`` next to the figures: the machine is shared.

Measured (2 cores shared, load average 8.5; 300x512x512, 5 clicks): engine start 10.7 s; read
median 0.05 s (max 0.42), engine round trip 0.32 s, apply 0.17 s (max 0.52), total 0.53 s (max
1.27). Before writing only the segment's box to Slicer, apply took 0.8 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "AutoSegExtension")]

import slicer  # noqa: E402
import vtk  # noqa: E402

from AutoSegLib.imageio import Geometry  # noqa: E402
from AutoSegLib.inference.clicks import index_to_physical  # noqa: E402
from AutoSegLogic import corrections, results, segment_masks  # noqa: E402
from AutoSegLogic.testing import tiny_guided_model  # noqa: E402
from AutoSegLogic.volumes import add_volume  # noqa: E402

LABELS = {"background": 0, "liver": 1, "spleen": 2, "left kidney": 3, "right kidney": 4, "aorta": 5}


def case(shape):
    rng = np.random.default_rng(0)
    z, y, x = (np.linspace(-1, 1, n, dtype=np.float32).reshape([-1 if a == k else 1 for a in range(3)])
               for k, n in enumerate(shape))
    label = np.zeros(shape, np.uint8)
    for value, (cz, cy, cx, r) in enumerate([(0, -0.2, -0.3, 0.35), (0, -0.2, 0.4, 0.2), (0.1, 0.3, -0.35, 0.15),
                                             (0.1, 0.3, 0.35, 0.15), (0, 0.25, 0, 0.08)], start=1):
        label[((z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2) < r * r] = value
    image = (40.0 * label + rng.normal(0, 5, shape)).astype(np.float32)
    return image, label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[300, 512, 512])
    parser.add_argument("--clicks", type=int, default=5)
    args = parser.parse_args()
    shape = tuple(args.shape)
    geometry = Geometry((1.5, 0.8, 0.8), (-200.0, -200.0, -300.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    image, label = case(shape)
    scene = slicer.vtkMRMLScene()
    volume = add_volume(scene, image, geometry, "ct")
    segmentation = results.segmentation_from_labels(scene, label, geometry, LABELS, "ct AutoSeg", volume)
    model = tiny_guided_model(tempfile.mkdtemp(prefix="bench-clicks-"), LABELS, geometry.spacing, shape)
    started = time.perf_counter()
    session = corrections.CorrectionSession(scene, segmentation, [volume], model, device="cpu",
                                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    while session.status == corrections.STARTING:
        session.poll()
        time.sleep(0.02)
    print(f"{shape} voxels; engine start (process, model, open_case): {time.perf_counter() - started:.1f} s "
          f"({session.status})")
    liver = segmentation.GetSegmentation().GetSegmentIdBySegmentName("liver")
    session.choose_segment(liver)
    timings = {"read": [], "engine": [], "apply": [], "total": []}
    start_refine, apply = session._start_refine, session._apply

    def timed_start():  # only the calls that found a new point and started a refine
        start = time.perf_counter()
        start_refine()
        if session.status == corrections.REFINING:
            timings["read"].append(time.perf_counter() - start)

    def timed_apply(*a):
        start = time.perf_counter()
        apply(*a)
        timings["apply"].append(time.perf_counter() - start)

    session._start_refine, session._apply = timed_start, timed_apply
    for k in range(args.clicks):
        index = (shape[0] // 2, int(shape[1] * 0.4), int(shape[2] * (0.2 + 0.1 * k)))
        lps = index_to_physical(index, geometry)
        placed = time.perf_counter()
        session.positive.AddControlPoint(vtk.vtkVector3d(-lps[0], -lps[1], lps[2]))
        while len(session.undo_stack) <= k and session.status != corrections.FAILED:
            session.poll()
            time.sleep(0.005)
        timings["total"].append(time.perf_counter() - placed)
        timings["engine"].append(timings["total"][-1] - timings["read"][-1] - timings["apply"][-1])
    session.close()
    for name, values in timings.items():
        print(f"{name:>7}: median {statistics.median(values):.2f} s, max {max(values):.2f} s over {len(values)} clicks")
    print(session.messages[-1] if session.messages else "")


if __name__ == "__main__":
    main()
