"""Peak memory and time of preprocessing one large case, and of the way back (issue 4, item 7).

Builds CT-like (and one MR-like) cases in code, then measures the library's ``preprocess_case``,
``restore_label`` and ``restore_probabilities`` (K=5) each in a fresh subprocess, so the
process's high-water mark belongs to that one call:

    peak above inputs = ru_maxrss after the call - RSS after imports and after building inputs

(the high-water mark is reset with ``/proc/self/clear_refs`` once the inputs are built, so the
temporaries used to *build* them do not count; without that file the baseline is the
high-water mark so far).

    python benchmarks/bench_preprocess_memory.py                          # cases A B C (~3 min)
    python benchmarks/bench_preprocess_memory.py --cases A B C C-1mm A-mr # all cases (~5 min)
    python benchmarks/bench_preprocess_memory.py --cases A --ops preprocess   # a subset
    python benchmarks/bench_preprocess_memory.py --lines B:preprocess         # peak per line

Cases (see CASES): A 400x512x512 CT at 1.0x0.78x0.78 mm, target = original (no resampling);
B the same to 1.5x1.0x1.0 mm; C 80x512x512 at 5 mm slices with the planner's 3d_lowres;
C-1mm the same to 1 mm slices; A-mr an MR-like A (zero outside the body, z-score in mask).

``--lines CASE:OP`` traces the lines of the functions that matter and prints, per line, the
highest RSS reached while it ran (above the inputs), nested calls included. Results and the
conclusions drawn from them: BENCHMARKS.md, section Preprocessing.
"""

from __future__ import annotations

import argparse
import json
import linecache
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MB = 1024 * 1024
K_PROBABILITIES = 5

# name: (shape z,y,x, spacing mm, modality, target spacing: a configuration name or explicit, description)
CASES = {
    "A": ((400, 512, 512), (1.0, 0.78, 0.78), "CT", "3d_fullres", "CT, target = original spacing"),
    "B": ((400, 512, 512), (1.0, 0.78, 0.78), "CT", (1.5, 1.0, 1.0), "CT, resampled to 1.5 x 1.0 x 1.0"),
    "C": ((80, 512, 512), (5.0, 0.78, 0.78), "CT", "3d_lowres", "CT 5 mm slices, planner's 3d_lowres"),
    "A-mr": ((400, 512, 512), (1.0, 0.78, 0.78), "MR", "3d_fullres", "MR-like, zero outside body, z-score in mask"),
    "C-1mm": ((80, 512, 512), (5.0, 0.78, 0.78), "CT", (1.0, 0.78, 0.78), "CT 5 mm slices to 1 mm slices"),
}
DEFAULT_CASES = ("A", "B", "C")  # A-mr and C-1mm on request (--cases)
OPS = ("preprocess", "restore_label", "restore_probabilities")
CT_INTENSITY = {"0": {"mean": 60.0, "median": 55.0, "std": 45.0, "min": -300.0, "max": 1500.0,
                      "percentile_00_5": -60.0, "percentile_99_5": 300.0}}


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------

def build_case(shape, spacing, modality: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """CT-like int16 image and uint8 label with 5 classes (0..4), built one slice at a time.

    CT: air -1000 around an elliptic body (40 HU), liver/spleen/kidneys (60/45/30 HU, labels
    1-4), a bright spine (700 HU), Gaussian noise (sd 15). MR: same anatomy, positive
    intensities, exactly 0 outside the body (so cropping and the in-mask z-score have work).
    """
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    image = np.empty(shape, np.int16)
    label = np.zeros(shape, np.uint8)
    zz, yy, xx = ((np.arange(n) + 0.5) * s for n, s in zip(shape, spacing))
    ext_z, ext_y, ext_x = (n * s for n, s in zip(shape, spacing))
    outside, tissue, spine = (-1000.0, 40.0, 700.0) if modality == "CT" else (0.0, 300.0, 150.0)
    organs = [((0.45, 0.45, 0.35), (90, 60, 70), 60 if modality == "CT" else 500, 1),
              ((0.50, 0.45, 0.70), (50, 35, 35), 45 if modality == "CT" else 400, 2),
              ((0.55, 0.60, 0.30), (40, 25, 25), 30 if modality == "CT" else 700, 3),
              ((0.55, 0.60, 0.70), (40, 25, 25), 30 if modality == "CT" else 700, 4)]
    ry = ((yy[:, None] - ext_y / 2) / (0.36 * ext_y)) ** 2
    rx = ((xx[None, :] - ext_x / 2) / (0.45 * ext_x)) ** 2
    spine_mask = ((yy[:, None] - 0.75 * ext_y) / 15) ** 2 + ((xx[None, :] - ext_x / 2) / 15) ** 2 <= 1
    for k, z in enumerate(zz):
        scale = 1.0 + 0.05 * np.sin(2 * np.pi * z / ext_z)
        body = ry + rx <= scale * scale
        plane = np.full((ny, nx), outside, np.float32)
        plane[body] = tissue
        labels = np.zeros((ny, nx), np.uint8)
        for (fz, fy, fx), (dz, dy, dx), value, cls in organs:
            rz = ((z - fz * ext_z) / dz) ** 2
            if rz >= 1:
                continue
            inside = ((yy[:, None] - fy * ext_y) / dy) ** 2 + ((xx[None, :] - fx * ext_x) / dx) ** 2 + rz <= 1
            plane[inside] = value
            labels[inside] = cls
        plane[spine_mask] = spine
        noise = rng.normal(0, 15, (ny, nx)).astype(np.float32)
        if modality == "CT":
            plane += noise
        else:
            plane[body] = np.maximum(plane[body] + noise[body], 1)  # keep the body nonzero
        image[k] = np.round(plane).astype(np.int16)
        label[k] = labels
    return image, label


def configuration(case: str) -> tuple[dict, list[int], dict]:
    """A plans.json configuration for the case from the real planner (50 such cases)."""
    from AutoSegLib.planning import plan

    shape, spacing, modality, target, _ = CASES[case]
    fingerprint = {"spacings": [list(spacing)] * 50, "shapes_after_crop": [list(shape)] * 50,
                   "foreground_intensity_properties_per_channel": CT_INTENSITY if modality == "CT" else {},
                   "median_relative_size_after_cropping": 1.0 if modality == "CT" else 0.5}
    labels = {"background": 0, "liver": 1, "spleen": 2, "kidney_l": 3, "kidney_r": 4}
    plans = plan(fingerprint, {0: modality if modality == "CT" else "T1"}, labels).to_dict()
    name = target if isinstance(target, str) else "3d_fullres"
    config = plans["configurations"][name]
    if not isinstance(target, str):
        config = {**config, "spacing": list(target)}
    return config, plans["transpose_forward"], plans["foreground_intensity_properties_per_channel"]


# --------------------------------------------------------------------------------------------
# Child process: one measurement
# --------------------------------------------------------------------------------------------

def _status() -> dict:
    values = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(("VmRSS:", "VmHWM:")):
                values[line.split(":")[0]] = int(line.split()[1]) * 1024
    return values


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM and with it ru_maxrss (RUSAGE_SELF)
        return True
    except OSError:
        return False


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class LinePeaks:
    """Highest RSS reached while each traced line ran (nested calls count for the caller's line)."""

    def __init__(self, functions):
        self.codes = {f.__code__ for f in functions}
        self.stack: list = []  # [frame, current line]
        self.peaks: dict = {}

    def _account(self):
        hwm = _status()["VmHWM"]
        for entry in self.stack:
            key = (entry[0].f_code, entry[1])
            self.peaks[key] = max(self.peaks.get(key, 0), hwm)
        _reset_peak()

    def _local(self, frame, event, arg):
        if event == "line":
            self._account()
            self.stack[-1][1] = frame.f_lineno
        elif event == "return":
            self._account()
            self.stack.pop()
        return self._local

    def _global(self, frame, event, arg):
        if event == "call" and frame.f_code in self.codes:
            self._account()
            self.stack.append([frame, frame.f_lineno])
            return self._local
        return None

    def __enter__(self):
        sys.settrace(self._global)
        return self

    def __exit__(self, *exc):
        sys.settrace(None)


def _functions():
    from AutoSegLib.preprocessing import case as lib

    return {"preprocess": lib.preprocess_case, "restore_label": lib.restore_label,
            "restore_probabilities": lib.restore_probabilities}


def _traced():
    from AutoSegLib.preprocessing import case, cropping, normalization, resampling

    return [case.preprocess_case, case.restore_label, case.restore_probabilities, case._label_in_planning_order,
            resampling.resample_label, resampling._resample_label_by_slice, resampling.resample_image,
            resampling._zoom_into, resampling._zoom_separate_into, normalization.normalize_ct,
            normalization.normalize_zscore, normalization._mean_std, cropping.cropped_nonzero_mask]


def _probabilities_from(seg: np.ndarray) -> np.ndarray:
    """K=5 float32 class probabilities at the preprocessed resolution, peaked on the label."""
    seg = seg[0]
    probs = np.full((K_PROBABILITIES, *seg.shape), 0.1 / (K_PROBABILITIES - 1), dtype=np.float32)
    for k in range(K_PROBABILITIES):
        hit = (seg == k) | ((seg < 0) & (k == 0))
        probs[k][hit] = 0.9
    return probs


def child(spec: dict) -> dict:
    from AutoSegLib.imageio import Geometry

    case, op, scratch = spec["case"], spec["op"], Path(spec["scratch"])
    shape, spacing, modality, _, _ = CASES[case]
    function = _functions()[op]
    if op == "preprocess":
        config, transpose, intensity = configuration(case)
        image, label = build_case(shape, spacing, modality)
        args = ([image], label, Geometry.identity(spacing), config, transpose, intensity)
        input_bytes = image.nbytes + label.nbytes
    else:
        properties = json.loads((scratch / f"{case}_properties.json").read_text())
        seg = np.load(scratch / f"{case}_seg.npy")
        if op == "restore_label":
            args = (seg[0], properties)
            input_bytes = seg.nbytes
        else:
            probs = _probabilities_from(seg)
            del seg
            args = (probs, properties)
            input_bytes = probs.nbytes
    reset = _reset_peak()
    baseline = _status()["VmRSS"] if reset else _maxrss()
    lines = None
    cpu_start = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    if spec.get("lines"):
        with LinePeaks(_traced()) as tracer:
            result = function(*args)
        lines = tracer
    else:
        result = function(*args)
    seconds = time.perf_counter() - start
    cpu_end = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu_end.ru_utime - cpu_start.ru_utime) + (cpu_end.ru_stime - cpu_start.ru_stime)
    peak = _maxrss() - baseline
    out = {"case": case, "op": op, "seconds": seconds, "cpu": cpu, "peak": peak, "input": input_bytes,
           "image_int16": int(np.prod(shape)) * 2, "voxels": int(np.prod(shape)), "rss": _maxrss(),
           "reset_ok": reset, "shape_out": list(result[0].shape[-3:])}
    if lines is not None:
        rows = []
        for (code, line), hwm in lines.peaks.items():
            rows.append({"function": code.co_name, "line": line, "peak": hwm - baseline,
                         "source": linecache.getline(code.co_filename, line).strip()})
        out["lines"] = rows
        out["peak"] = max([r["peak"] for r in rows] + [peak])  # the tracer's resets hide ru_maxrss
    if op == "preprocess":  # the restores start from this label
        _, seg_out, properties = result
        np.save(scratch / f"{case}_seg.npy", seg_out)
        (scratch / f"{case}_properties.json").write_text(json.dumps(properties))
    return out


# --------------------------------------------------------------------------------------------
# Parent
# --------------------------------------------------------------------------------------------

def run_child(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child {spec} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_table(rows: list[dict], header: bool = True) -> None:
    head = (f"{'case':7s} {'operation':22s} {'voxels':>11s} {'input MiB':>9s} {'peak MiB':>8s} {'x int16':>7s} "
            f"{'RSS MiB':>7s} {'wall s':>6s} {'cpu s':>6s}  output shape")
    if header:
        print(head)
        print("-" * len(head))
    for r in rows:
        print(f"{r['case']:7s} {r['op']:22s} {r['voxels']:11,d} {r['input'] / MB:9.0f} {r['peak'] / MB:8.0f} "
              f"{r['peak'] / r['image_int16']:7.1f} {r['rss'] / MB:7.0f} {r['seconds']:6.1f} {r['cpu']:6.1f}  "
              + "x".join(map(str, r["shape_out"])))


def print_lines(case: str, op: str, scratch: Path) -> None:
    if op != "preprocess":
        run_child({"case": case, "op": "preprocess", "scratch": str(scratch)})
    r = run_child({"case": case, "op": op, "scratch": str(scratch), "lines": True})
    print(f"{case} {op}: peak {r['peak'] / MB:.0f} MiB above inputs in {r['seconds']:.1f} s "
          "(traced); the lines where RSS got highest:")
    print(f"{'peak MiB':>8s}  {'function':28s} {'line':>5s}  source")
    for row in sorted(r["lines"], key=lambda x: -x["peak"])[:25]:
        print(f"{row['peak'] / MB:8.0f}  {row['function']:28s} {row['line']:5d}  {row['source'][:90]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES), choices=list(CASES))
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    parser.add_argument("--repeats", type=int, default=1, help="median time over repeats (peak is the max)")
    parser.add_argument("--lines", metavar="CASE:OP", help="per-line peak profile of one measurement")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    import scipy

    print(f"python {sys.version.split()[0]}, numpy {np.__version__}, scipy {scipy.__version__}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
          "peak = ru_maxrss above RSS after building the inputs")
    for case in args.cases:
        shape, spacing, modality, target, what = CASES[case]
        print(f"  {case}: {'x'.join(map(str, shape))} at {spacing} mm, {modality}, {what}")
    # The preprocessed label kept for the restores goes to RAM-backed /dev/shm when there is room.
    shm = Path("/dev/shm")
    use_shm = shm.is_dir() and shutil.disk_usage(shm).free > 2 * 1024 * MB
    scratch = Path(tempfile.mkdtemp(prefix="bench_preprocess_", dir=shm if use_shm else None))
    try:
        if args.lines:
            print_lines(*args.lines.split(":")[:2], scratch)
            return
        rows = []
        for case in args.cases:
            for op in OPS:  # preprocess always runs: it makes the restores' input
                if op not in args.ops and op != "preprocess":
                    continue
                results = [run_child({"case": case, "op": op, "scratch": str(scratch)}) for _ in range(args.repeats)]
                row = dict(results[-1])
                row["seconds"] = statistics.median(r["seconds"] for r in results)
                row["cpu"] = statistics.median(r["cpu"] for r in results)
                row["peak"] = max(r["peak"] for r in results)
                if op in args.ops:
                    rows.append(row)
                    print_table([row], header=len(rows) == 1)
            for leftover in scratch.glob(f"{case}_*"):
                leftover.unlink()
        print(f"load average at the end {os.getloadavg()[0]:.1f} (other processes slow the wall times, "
              "not the memory figures); x int16 = peak / size of the case's int16 image")
        if not all(r["reset_ok"] for r in rows):
            print("note: /proc/self/clear_refs unavailable; baseline was the high-water mark after building inputs")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
