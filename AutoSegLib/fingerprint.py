"""Dataset fingerprint: the measurements of a dataset that the planner's rules work from.

Per case: spacing and shape before and after cropping to the nonzero region of all channels,
class voxel counts, each class's thickness (the radius in mm of the largest ball inside it),
and a bounded random sample of foreground intensities per channel. Aggregated: per-channel
foreground intensity statistics, the median relative size after cropping, class voxel
ratios, and each class's median radius (what ``3d_cpu`` may coarsen to, planning/cpu.py).

The file is a superset of nnU-Net v2's ``dataset_fingerprint.json`` (same key names and
meanings: ``spacings``, ``shapes_after_crop``, ``foreground_intensity_properties_per_channel``,
``median_relative_size_after_cropping``), so an nnU-Net v2 fingerprint plans as is.
Axis order is numpy's (z, y, x) throughout.

Pure functions (``crop_bbox``, ``case_measurements``, ``aggregate``) do the work; only
``extract_fingerprint`` reads files (through ``verify``'s per-case checks) and runs worker processes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from scipy import ndimage

from AutoSegLib.dataset import Dataset
from AutoSegLib.events import Reporter
from AutoSegLib.fileutil import read_json
from AutoSegLib.preprocessing.orientation import CANONICAL, STORED, canonical_orientation, left_right_axis
from AutoSegLib.preprocessing.cropping import crop_bbox, nonzero_mask
from AutoSegLib.verify import case_job, open_checked_dataset
from AutoSegLib.verify_checks import CHECKS_VERSION, CaseJob, read_case
from AutoSegLib.workers import run_tasks

# 2: class radii; 3: canonical axes (spacings and shapes along them) and class sides. Older
# fingerprints are measured again.
FINGERPRINT_VERSION = 3
# The intensity statistics are estimated from at most this many foreground voxels in total,
# spread evenly over the cases: enough for stable 0.5/99.5 percentiles, and memory stays
# bounded however large the dataset (nnU-Net v2 uses the same budget of 1e8).
TOTAL_INTENSITY_SAMPLES = 100_000_000
_SAMPLING_SEED = 1234
V2_REQUIRED_KEYS = ("spacings", "shapes_after_crop", "foreground_intensity_properties_per_channel",
                    "median_relative_size_after_cropping")


class FingerprintError(ValueError):
    """A case or a fingerprint file cannot be used; the message names it."""


def case_measurements(channels: list[np.ndarray], label: np.ndarray, spacing: tuple[float, ...],
                      label_values: list[int], foreground_values: list[int], samples_per_case: int,
                      seed: int, direction: tuple[float, ...] | None = None) -> dict:
    """Everything the fingerprint needs from one case (pure; arrays in, JSON-able dict out).

    ``foreground_values`` are the class labels whose voxels feed the intensity statistics
    (every label but background and ``ignore``: unannotated voxels say nothing about tissue).
    """
    oriented = STORED if direction is None else canonical_orientation(direction)
    bbox = crop_bbox(nonzero_mask(channels))
    crop = tuple(slice(a, b) for a, b in bbox)
    label_c = label[crop]
    counts = np.bincount(label_c.ravel().astype(np.int64), minlength=max(label_values) + 1)
    foreground = np.isin(label_c, foreground_values)
    rng = np.random.default_rng(seed)
    n_fg = int(foreground.sum())
    pick = rng.choice(n_fg, size=min(samples_per_case, n_fg), replace=False) if n_fg else np.empty(0, int)
    intensities = []
    for channel in channels:
        values = channel[crop][foreground]
        intensities.append(values[pick].astype(np.float32))
    # spacings and shapes along the canonical axes, as the plan will see the case
    shape_before = oriented.shape(label.shape)
    shape_after = oriented.shape(label_c.shape)
    return {
        "spacing": list(oriented.spacing(spacing)),
        "shape_before_crop": list(shape_before),
        "shape_after_crop": list(shape_after),
        "crop_bbox": [list(b) for b in bbox],
        "relative_size_after_crop": float(np.prod(shape_after) / np.prod(shape_before)),
        "class_voxels": {str(v): int(counts[v]) if v < len(counts) else 0 for v in label_values},
        "class_radius_mm": class_radii(label_c, spacing, foreground_values),
        "class_side": {} if direction is None else class_sides(label_c, direction, foreground_values),
        "canonical": direction is not None,
        "intensities": intensities,
    }


def class_sides(label: np.ndarray, direction, values: list[int]) -> dict[str, float]:
    """Where each class present lies across the patient, from -0.5 (right edge) to 0.5 (left edge).

    The offset of the class's centroid from the middle of the (cropped) image along its
    left-right axis, as a share of the image's width there: about 0 for a central or a paired
    class (the aorta, "kidneys"), positive for a class on the patient's left (the spleen),
    negative on the right (the liver). Counted a slice at a time: no full-size index array.
    """
    axis = left_right_axis(direction)
    matrix = np.asarray(direction, dtype=float).reshape(3, 3)
    towards_left = matrix[0, 2 - axis] > 0  # ITK's world x runs from the patient's right to left
    width = label.shape[axis]
    size = max(values) + 1 if values else 1
    counts = np.zeros((width, size), dtype=np.int64)
    for p in range(width):
        counts[p] = np.bincount(label.take(p, axis=axis).ravel().astype(np.int64), minlength=size)[:size]
    positions = (np.arange(width) + 0.5) / width - 0.5
    if not towards_left:
        positions = -positions
    sides = {}
    for v in values:
        total = int(counts[:, v].sum())
        if total:
            sides[str(v)] = float(positions @ counts[:, v] / total)
    return sides


# Radii are measured up to this many mm: a class thicker than that never limits a plan (3d_cpu
# stops coarsening at the thinnest class's radius), and the cap bounds the work and memory.
RADIUS_CAP_MM = 20.0
# A class whose padded box holds more voxels than this is measured slab by slab along the
# first axis (the distance transform needs ~20 bytes per voxel: 8 M voxels ~ 160 MB).
SLAB_VOXELS = 8_000_000


def class_radii(label: np.ndarray, spacing, values: list[int]) -> dict[str, float]:
    """Radius in mm of the largest ball inside each class present: how thin the class is.

    The largest distance (mm, anisotropic spacing honoured) from a voxel of the class to the
    nearest voxel outside it, on the class's own bounding box padded by one voxel: for a vessel
    its radius, for a plate half its thickness, for a blob about its smallest semi-axis; at most
    ``RADIUS_CAP_MM``. Its resolution is the spacing itself: a structure one voxel thin measures
    one voxel. Classes absent from the case are left out.
    """
    # find_objects takes the label map's own integer type: no 4-byte copy of a clinical-size map.
    integer = label if np.issubdtype(label.dtype, np.integer) else label.astype(np.int32)
    objects = ndimage.find_objects(integer)
    radii = {}
    for value in values:
        box = objects[value - 1] if 0 < value <= len(objects) else None
        if box is None:
            continue
        padded = tuple(slice(max(b.start - 1, 0), min(b.stop + 1, n)) for b, n in zip(box, label.shape))
        radii[str(value)] = _largest_radius(label[padded] == value, tuple(float(s) for s in spacing))
    return radii


def _largest_radius(inside: np.ndarray, spacing: tuple[float, ...]) -> float:
    """Largest distance from ``inside`` to outside it (the box's faces count as outside), capped.

    A large box is cut into slabs along the first axis that overlap by the cap: every distance
    up to ``RADIUS_CAP_MM`` is then the same as on the whole box, and memory stays bounded.
    """
    slab = max(1, SLAB_VOXELS // max(1, int(np.prod(inside.shape[1:]))))
    margin = int(np.ceil(RADIUS_CAP_MM / spacing[0])) + 1
    best = 0.0
    for start in range(0, inside.shape[0], slab):
        low, high = max(0, start - margin), min(inside.shape[0], start + slab + margin)
        part = inside[low:high]
        # Pad only the faces that are the box's own; a cut face borders more of the class.
        pad = [(1 if low == 0 else 0, 1 if high == inside.shape[0] else 0), (1, 1), (1, 1)][:inside.ndim]
        distance = ndimage.distance_transform_edt(np.pad(part, pad), sampling=spacing)
        core = distance[pad[0][0] + start - low: pad[0][0] + min(start + slab, inside.shape[0]) - low]
        best = max(best, float(core.max()))
        if best >= RADIUS_CAP_MM:
            break
    return min(best, RADIUS_CAP_MM)


def median_per_class(per_case: list[dict], labels: dict[str, int], key: str) -> dict[str, float]:
    """Each class's median of a per-case measurement (``key``: ``class_radius_mm``, ``class_side``)
    over the cases that hold it; classes in no case are left out."""
    medians = {}
    for name, value in labels.items():
        found = [m[key][str(value)] for m in per_case if str(value) in m.get(key, {})]
        if found:
            medians[name] = float(np.median(found))
    return medians


def intensity_statistics(values: np.ndarray) -> dict:
    """The per-channel statistics CT normalization needs, in nnU-Net v2's key names."""
    if values.size == 0:
        # No foreground anywhere: nothing to measure. None (JSON null), not NaN, which is not
        # valid JSON; the planner refuses CT normalization without these numbers.
        return {k: None for k in ("mean", "median", "std", "min", "max", "percentile_99_5", "percentile_00_5")}
    values = values.astype(np.float64)
    p005, p995 = np.percentile(values, [0.5, 99.5])
    return {"mean": float(values.mean()), "median": float(np.median(values)), "std": float(values.std()),
            "min": float(values.min()), "max": float(values.max()),
            "percentile_99_5": float(p995), "percentile_00_5": float(p005)}


def aggregate(case_ids: list[str], per_case: list[dict], channel_names: dict[int, str],
              labels: dict[str, int]) -> dict:
    """Combine per-case measurements into the fingerprint dict (JSON-able)."""
    n_channels = len(channel_names)
    intensity = {str(c): intensity_statistics(np.concatenate([m["intensities"][c] for m in per_case]))
                 for c in range(n_channels)}
    class_totals = {name: sum(m["class_voxels"].get(str(v), 0) for m in per_case) for name, v in labels.items()}
    all_voxels = sum(int(np.prod(m["shape_after_crop"])) for m in per_case)
    return {
        "version": FINGERPRINT_VERSION,
        "num_cases": len(per_case),
        "channel_names": {str(k): v for k, v in sorted(channel_names.items())},
        "labels": dict(labels),
        "case_ids": list(case_ids),
        "spacings": [m["spacing"] for m in per_case],
        "shapes_before_crop": [m["shape_before_crop"] for m in per_case],
        "shapes_after_crop": [m["shape_after_crop"] for m in per_case],
        "crop_bboxes": [m["crop_bbox"] for m in per_case],
        "foreground_intensity_properties_per_channel": intensity,
        "median_relative_size_after_cropping": float(np.median([m["relative_size_after_crop"] for m in per_case])),
        "class_voxel_ratios": {n: (c / all_voxels if all_voxels else 0.0) for n, c in class_totals.items()},
        "class_radius_mm": median_per_class(per_case, labels, "class_radius_mm"),
        # class name -> median offset across the patient, -0.5 right edge .. 0.5 left edge
        "class_sides": median_per_class(per_case, labels, "class_side"),
        **({"orientation": CANONICAL} if per_case and all(m.get("canonical") for m in per_case) else {}),
    }


def _measure_case(job: CaseJob, label_values: list[int], foreground_values: list[int], samples_per_case: int,
                  seed: int) -> dict:
    # read_case runs verify's checks on the arrays as read: a case verify rejects stops here,
    # named, before bincount sizes anything by a label value.
    case = read_case(job)
    return case_measurements(case.channels, case.label, case.geometry.spacing, label_values, foreground_values,
                             samples_per_case, seed, case.geometry.direction)


def _case_seed(case_id: str) -> int:
    # Stable across runs and platforms (Python's hash() is salted per process).
    return int.from_bytes(hashlib.sha256(f"{_SAMPLING_SEED}:{case_id}".encode()).digest()[:4], "little")


def extract_fingerprint(dataset: Dataset | str | Path, num_processes: int = 2,
                        reporter: Reporter | None = None) -> dict:
    """Measure every training case (in parallel) and return the fingerprint dict.

    Each case is checked as ``verify`` checks it while it is read; a case that fails, or
    whose worker process dies, is reported with its own cause and the others still run.

    Raises:
        DatasetError: dataset.json or the folder layout is unusable (as ``verify`` reports it).
        FingerprintError: one or more cases failed; the message names each case and cause.
    """
    if not isinstance(dataset, Dataset):
        dataset = open_checked_dataset(dataset)
    reporter = reporter or Reporter(quiet=True)
    cases = list(dataset.cases)
    label_values = sorted(dataset.spec.labels.values())
    foreground_values = sorted(dataset.spec.foreground_labels.values())
    samples = max(1, TOTAL_INTENSITY_SAMPLES // len(cases))
    tasks = [(c.case_id, (case_job(dataset.folder, dataset.spec, c), label_values, foreground_values, samples,
                          _case_seed(c.case_id))) for c in cases]
    with reporter.task("fingerprint", len(cases), desc="Fingerprint") as step:
        results = run_tasks(_measure_case, tasks, num_processes, on_result=lambda r: step(case=r.task_id, ok=r.ok))
    failures = {r.task_id: r.error for r in results if not r.ok}
    if failures:
        detail = "; ".join(f"case '{cid}': {msg}" for cid, msg in sorted(failures.items()))
        raise FingerprintError(f"fingerprint failed for {len(failures)} of {len(cases)} case(s): {detail} "
                               "(`autoseg verify` reports every problem of the dataset at once)")
    measured = {r.task_id: r.value for r in results}
    ordered = [c.case_id for c in cases]
    fingerprint = aggregate(ordered, [measured[c] for c in ordered], dataset.spec.channel_names, dataset.spec.labels)
    fingerprint["dataset_signature"] = dataset_signature(dataset)
    fingerprint["content_checks"] = CHECKS_VERSION
    return fingerprint


def dataset_signature(dataset: Dataset) -> str:
    """Changes when any training file or dataset.json changes (names, sizes, modification times)."""
    digest = hashlib.sha256()
    files = [dataset.folder / "dataset.json"]
    for case in dataset.cases:
        files += [*case.images, case.label]
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(dataset.folder)}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def load_fingerprint(path: str | Path) -> dict:
    """Read a fingerprint file (ours or nnU-Net v2's) and check it has what planning needs."""
    data = read_json(path)
    missing = [k for k in V2_REQUIRED_KEYS if k not in data]
    if missing:
        raise FingerprintError(f"{path}: not a dataset fingerprint, missing key(s) {', '.join(missing)}")
    n = len(data["spacings"])
    if n == 0 or len(data["shapes_after_crop"]) != n:
        raise FingerprintError(f"{path}: 'spacings' ({n}) and 'shapes_after_crop' "
                               f"({len(data['shapes_after_crop'])}) must list the same, non-zero number of cases")
    dims = {len(s) for s in data["spacings"]} | {len(s) for s in data["shapes_after_crop"]}
    if dims != {3}:
        raise FingerprintError(f"{path}: spacings and shapes must have 3 entries (z, y, x) per case, found {sorted(dims)}")
    return data
