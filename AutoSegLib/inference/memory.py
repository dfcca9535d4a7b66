"""Peak memory of predicting one case, from the plans and the image header alone; checks before predicting.

:func:`estimate_prediction` counts the arrays the code path of :mod:`.predictor` keeps alive,
phase by phase, for a case of ``N0`` voxels resampled to ``N1`` (per configuration), ``K``
classes and ``C`` channels (bytes; CPU, where the accumulators are float32):

=================  ===================================================================================
read               the channels as read (``C*N0*b``) and ITK's copy of one of them
preprocess         inputs, nonzero mask ``N0``, float32 scratch ``N0*4`` (if resampled), data ``C*N1*4``
sliding window     inputs, data, weights ``N1*4``, logits ``K*N1*4``, [fold sum ``K*N1*4``],
                   one batch of windows through the network (``ACTIVATIONS * batch * patch * f0 * 4``)
softmax            inputs, data, logits ``K*N1*4`` (overwritten by the probabilities), [fold sum]
restore            labels only (one configuration, no probabilities kept: ``restore_labels``): inputs,
                   fold mean ``K*N1*4``, one restored class ``N0*4``, the running maximum ``N0*4``,
                   a boolean ``N0`` and the labels ``N0``. Otherwise: inputs, fold mean ``K*N1*4``,
                   probabilities on the input grid ``K*N0*4``
labels             (probabilities path) inputs, probabilities ``K*N0*4``, labels ``N0`` (the argmax is
                   taken a slab at a time: its temporaries are a few MiB)
outputs            labels ``N0``, ITK's copy ``N0``; with probabilities kept ``K*N0*4``, their float16
                   copy for the ``.npz`` ``K*N0*2``; uncertainty ``N0*4`` and two float32 temporaries
=================  ===================================================================================

An ensemble of two configurations holds the first one's ``K*N0*4`` through the second; a
cascade's first stage restores its labels as above and leaves them (``N0``) and their one-hot
(``(K-1)*N1*4``) to the second. No cropping is assumed (headers do not say where the body is).

A batch predicted as a pipeline (``pipelined``, :mod:`.pipeline`) holds up to three cases: one
ahead (its largest phase among read and preprocess), one in the network (sliding window or
softmax) and one behind (restore to the outputs). The estimate adds the three largest phases
(each case taken as this one: the largest case bounds the others), the network's heap kept by
the allocator counted once; they need not coincide, so it is an upper bound.

On a 600x600x600 int16 CT with ``3d_cpu`` and 6 classes (N1 = 334x385x385) the restore peaks
at 0.9 + 0.9 + 0.4 GB (with probabilities kept: 5.2 GB of them on the input grid; before
issue 20 the argmax added a 5.2 GB copy and a 1.7 GB int64 result). Measured against
``/usr/bin/time -v`` in BENCHMARKS.md ("Memory estimate", "Clinical size").

Example:
    >>> config = {"spacing": [2.0, 2.0, 2.0], "patch_size": [32, 32, 32], "features_per_stage": [16, 32]}
    >>> estimate = estimate_prediction({"3d": config}, ["3d"], n_classes=3, shape=(300, 300, 300),
    ...                                spacing=(1.0, 1.0, 1.0), transpose_forward=[0, 1, 2])
    >>> estimate.phase
    '3d restore'
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

from AutoSegLib.resources import MemoryEstimate, planning_shape, peak_of

# Peak bytes of one forward pass per (window voxel x first-stage feature x 4 bytes), by patch
# dimension: 5.7-7.3 for the phantom plans' 3D networks, 8.1-9.5 for 2D (measured with a fresh
# process's VmHWM around predict_window_batch, TTA on and off); the upper end is taken.
ACTIVATIONS = {2: 9.5, 3: 7.5}
# What a process holds before predicting: Python, numpy, scipy, SimpleITK and torch imported
# (329 MiB measured with AutoSeg's imports); the model's weights come on top (:func:`model_bytes`).
BASE_PROCESS = 330 << 20
# Windows of a CPU forward pass: as many as hold this many voxels.
CPU_BATCH_VOXELS = 2 ** 17
# ... and at least two samples per pass for windows of up to CPU_BATCH_VOXELS: for a batch of one,
# torch sends a 3D convolution whose channels x depth x height stay under ~20,000 to its own slow
# kernel instead of oneDNN - every stage of a 3d_cpu network (16-32 features, 20-32 slices), the
# deep stages of any. One detailed-phantom 3d_cpu window (20 x 56 x 64) took 339 ms alone and 98
# ms each two at a time, a CT-phantom window (32 x 48 x 48) 134 and 78 ms (2 threads,
# channels-last; BENCHMARKS.md "Two windows per pass on the CPU"). A 40 x 96 x 96 window is as fast
# alone (its early stages, where the work is, take oneDNN's path anyway).
CPU_MIN_SAMPLES = 2


def min_samples_per_pass(patch_size: Sequence[int], device: str = "cpu") -> int:
    """Samples each forward pass should hold: ``CPU_MIN_SAMPLES`` for CPU windows of up to
    ``CPU_BATCH_VOXELS`` voxels (see there), else 1."""
    if device == "cuda" or math.prod(int(p) for p in patch_size) > CPU_BATCH_VOXELS:
        return 1
    return CPU_MIN_SAMPLES


def default_batch(config: Mapping, device: str = "cpu") -> int:
    """Windows per forward pass: the training batch on a GPU (it fit there with gradients); on the
    CPU as many windows as hold ``CPU_BATCH_VOXELS`` voxels, and ``CPU_MIN_SAMPLES`` of small ones.

    On the CPU small windows pay a fixed cost per call: 16 slices of 80x96 per pass predict a 2D
    phantom case 4x faster than one at a time (benchmarks/bench_inference.py).
    """
    if device == "cuda":
        return max(1, int(config.get("batch_size", 1)))
    window = math.prod(int(p) for p in config["patch_size"])
    return max(min_samples_per_pass(config["patch_size"]), CPU_BATCH_VOXELS // window)


def model_bytes(n_parameters: int, folds: int = 1) -> int:
    """The network's float32 weights plus one state dict kept per fold."""
    return 4 * int(n_parameters) * (1 + int(folds))


def _stage_phases(name: str, configurations: Mapping[str, Mapping], held: dict, n_channels: int, n_classes: int,
                  shape, spacing, transpose, folds: int, tta: bool, batch_size: int | None, device: str,
                  to_labels: bool = False) -> list:
    """Phases of one configuration (and its cascade's first stage, first); ``held`` is alive throughout.

    ``to_labels``: the stage is restored straight to labels (``restore_labels``), not probabilities.
    """
    config = configurations[name]
    phases = []
    cascade = config.get("previous_stage")
    n0 = math.prod(int(s) for s in shape)
    k = n_classes
    if cascade:
        phases += _stage_phases(cascade, configurations, held, n_channels, n_classes, shape, spacing, transpose,
                                folds, tta, batch_size, device, to_labels=True)
        held = {**held, f"{cascade} labels": n0,
                **_retained(cascade, network_bytes(configurations[cascade], n_channels, k, batch_size, tta, device))}
    shape_t, new_shape = planning_shape(shape, spacing, config, transpose)
    n1 = math.prod(new_shape)
    resample = tuple(new_shape) != tuple(shape_t)
    channels = n_channels + ((k - 1) if cascade else 0)
    patch = [int(p) for p in config["patch_size"]]
    lead = len(new_shape) - len(patch)
    padded = list(new_shape[:lead]) + [max(s, p) for s, p in zip(new_shape[lead:], patch)]
    n1p = math.prod(padded)
    data = {"data (float32)": channels * n1 * 4}
    if n1p != n1:
        data["padded data"] = channels * n1p * 4
    phases.append((f"{name} preprocess", {**held, "nonzero mask": n0, "scratch (float32)": n0 * 4 * resample,
                                          "data (float32)": n_channels * n1 * 4}))
    if cascade:
        phases.append((f"{name} one-hot", {**held, "data (float32)": n_channels * n1 * 4,
                                           "one-hot": (k - 1) * n1 * 4, "data with one-hot": channels * n1 * 4}))
    network = {"network (one batch)": network_bytes(config, channels, k, batch_size, tta, device)}
    fold_sum = {"fold sum": k * n1 * 4} if folds > 1 else {}
    if device == "cpu":  # elsewhere the accumulators live in the device's memory, not here
        phases.append((f"{name} sliding window", {**held, **data, "weights": n1p * 4, "logits": k * n1p * 4,
                                                  **fold_sum, **network}))
        # the softmax overwrites the logits a slab at a time (sliding.softmax): no second K-class volume
        phases.append((f"{name} softmax", {**held, **data, "logits (then probabilities)": k * n1p * 4, **fold_sum}))
    else:
        phases.append((f"{name} sliding window", {**held, **data, **network}))
    restored = ({"restored class": n0 * 4, "running maximum": n0 * 4, "better (bool)": n0, "labels": n0}
                if to_labels else {"probabilities (input grid)": k * n0 * 4})
    phases.append((f"{name} restore", {**held, "fold mean": k * n1 * 4, **restored,
                                       **_retained(name, network["network (one batch)"])}))
    return phases


def _retained(name: str, network: float) -> dict:
    # The network's activations are many allocations below glibc's mmap threshold: freed, they
    # stay in the heap, so the process keeps about one batch's worth until it ends (measured:
    # RSS after the sliding window 100 MiB above its arrays for a 65 MiB batch of 3d_cpu), one
    # per configuration run (an ensemble of 3d_cpu and 2d measured 12% above one batch's worth).
    return {f"retained by the allocator ({name})": network}


def network_bytes(config: Mapping, channels: int, n_classes: int, batch_size: int | None = None, tta: bool = True,
                  device: str = "cpu") -> float:
    """Peak of one forward pass of a batch of windows (TTA: a flipped copy in, a flipped one out).

    With TTA a pass holds at least :func:`min_samples_per_pass` samples (a window and its flips,
    :func:`~AutoSegLib.inference.sliding.predict_window_batch`), whatever the batch of windows.
    """
    batch = batch_size or default_batch(config, device)
    if tta:
        batch = max(batch, min_samples_per_pass(config["patch_size"], device))
    window = math.prod(int(p) for p in config["patch_size"])
    features = int((config.get("features_per_stage") or [32])[0])
    activations = ACTIVATIONS.get(len(config["patch_size"]), max(ACTIVATIONS.values()))
    return activations * batch * window * features * 4 + batch * (channels + n_classes) * window * 4 * bool(tta)


def estimate_prediction(configurations: Mapping[str, Mapping], names: Sequence[str], n_classes: int, shape,
                        spacing, transpose_forward, n_channels: int = 1, input_bytes: int = 2, folds: int = 1,
                        tta: bool = True, batch_size: int | None = None, save_probabilities: bool = False,
                        uncertainty: bool = False, postprocessing: bool = False, device: str = "cpu",
                        base: int = BASE_PROCESS, pipelined: bool = False) -> MemoryEstimate:
    """Peak memory of :meth:`Predictor.predict` plus writing the outputs, for one case.

    Args:
        configurations: the plans' configurations (a cascade's first stage is looked up here).
        names: the configuration(s) predicted (two: an ensemble).
        n_classes: classes including background (K).
        shape, spacing: the image's, (z, y, x), as its header gives them.
        transpose_forward: the plans' axis order.
        input_bytes: bytes per voxel of the image as read (2 for int16 CT).
        folds: folds per configuration; tta, batch_size: as the predictor's.
        save_probabilities, uncertainty, postprocessing: what happens after the argmax.
        device: where the network and its accumulators run (``cpu`` or a GPU type).
        base: the process before predicting (default :data:`BASE_PROCESS`; add :func:`model_bytes`).
        pipelined: a batch overlapped by :mod:`.pipeline` (three cases at once; see above).
    """
    n0 = math.prod(int(s) for s in shape)
    k = int(n_classes)
    inputs = {"inputs": n_channels * n0 * input_bytes}
    phases = [("read", {"inputs": (n_channels + 1) * n0 * input_bytes})]
    held = dict(inputs)
    # As Predictor.predict: one configuration without probabilities is restored straight to labels.
    to_labels = len(names) == 1 and not (save_probabilities or uncertainty)
    for i, name in enumerate(names):
        phases += _stage_phases(name, configurations, held, n_channels, k, shape, spacing, transpose_forward,
                                folds, tta, batch_size, device, to_labels)
        stage = configurations[name]
        while stage is not None:  # a cascade leaves its first stage's heap behind too
            inputs.update(_retained(name, network_bytes(stage, n_channels, k, batch_size, tta, device)))
            name = stage.get("previous_stage")
            stage = configurations[name] if name else None
        held = {**inputs, "ensemble sum": k * n0 * 4}
    probabilities = {} if to_labels else {"probabilities (input grid)": k * n0 * 4}
    if not to_labels:
        phases.append(("labels", {**inputs, **probabilities, "labels": n0}))
    if postprocessing:
        phases.append(("postprocessing", {**inputs, **probabilities, "labels": n0, "components": n0 * 9}))
    kept = probabilities if (save_probabilities or uncertainty) else {}
    if uncertainty:
        phases.append(("uncertainty", {**kept, "labels": n0, "entropy": n0 * 4, "temporaries": n0 * 8}))
    # Written one at a time, each through one copy: ITK's of an image, the float16 one of the .npz.
    writer = max(n0 * (4 if uncertainty else 1), k * n0 * 2 * bool(save_probabilities))
    phases.append(("outputs", {**kept, "labels": n0, "uncertainty": n0 * 4 * bool(uncertainty),
                               "writer copy": writer}))
    if pipelined:
        phases.append(pipelined_phase(phases))
    return peak_of(phases, base)


_AHEAD = ("read", "preprocess", "one-hot")
_NETWORK = ("sliding window", "softmax")
RETAINED = "retained by the allocator"


def pipelined_phase(phases: list) -> tuple[str, dict]:
    """Three cases at once (:mod:`.pipeline`): the largest phase of the case ahead, of the case in
    the network and of the case behind, each part named by its case; the allocator's retained
    network heap belongs to the process and is counted once."""
    def group(phase: str) -> str:
        if phase.endswith(_AHEAD):
            return "ahead"
        return "network" if phase.endswith(_NETWORK) else "behind"

    parts, retained = {}, {}
    for which in ("ahead", "network", "behind"):
        members = [(name, p) for name, p in phases if group(name) == which]
        if not members:
            continue
        name, largest = max(members, key=lambda item: sum(v for k, v in item[1].items() if not k.startswith(RETAINED)))
        for part, size in largest.items():
            if part.startswith(RETAINED):
                retained[part] = max(retained.get(part, 0), size)
            else:
                parts[f"{which} ({name}): {part}"] = size
    return "pipeline (a case ahead, one in the network, one behind)", {**parts, **retained}


# -- before `autoseg predict` starts -------------------------------------------------------------
def output_bytes(n_voxels: int, n_classes: int, save_probabilities: bool, uncertainty: bool) -> int:
    """Upper bound of one case's output files: uncompressed label, float16 probabilities, float32 uncertainty."""
    header = 4096
    labels = n_voxels * (1 if n_classes <= 256 else 2) + header
    return labels + save_probabilities * (n_classes * n_voxels * 2 + header) + uncertainty * (n_voxels * 4 + header)


def predictor_estimate(predictor, shape, spacing, input_bytes: int, save_probabilities: bool = False,
                       uncertainty: bool = False, pipelined: bool = False, **changes) -> MemoryEstimate:
    """:func:`estimate_prediction` for a loaded :class:`~AutoSegLib.inference.predictor.Predictor`.

    ``changes`` override what the predictor would do (``names``, ``folds``, ``save_probabilities``
    ...), to tell what a different command line would need.
    """
    from AutoSegLib.inference.predictor import wants_postprocessing

    configurations = {}
    for stage in predictor.stages:
        while stage is not None:
            configurations[stage.name] = stage.config
            stage = stage.previous
    configurations.update(changes.pop("configurations", {}))
    parameters = sum(p.numel() for s in predictor.stages for p in s.network.parameters())
    folds = max(len(s.weights) for s in predictor.stages)
    options = dict(configurations=configurations, names=[s.name for s in predictor.stages],
                   n_classes=predictor.model.n_classes, shape=shape, spacing=spacing,
                   transpose_forward=predictor.model.plans.transpose_forward, n_channels=predictor.model.n_channels,
                   input_bytes=input_bytes, folds=folds, tta=predictor.tta, batch_size=predictor.batch_size,
                   save_probabilities=save_probabilities, uncertainty=uncertainty,
                   postprocessing=wants_postprocessing(predictor.postprocessing), device=predictor.device.type,
                   base=BASE_PROCESS + model_bytes(parameters, folds), pipelined=pipelined)
    options.update(changes)
    return estimate_prediction(**options)


def _header(path):
    from AutoSegLib.imageio import read_header

    try:
        return read_header(path)
    except OSError:
        return None  # the case fails when it is read, and is reported there with its cause


def check_prediction_resources(predictor, cases, outputs, save_probabilities: bool = False, uncertainty: bool = False,
                               reporter=None, strict: bool = False, available: int | None = None,
                               stage: str = "predict", pipelined: bool = False) -> MemoryEstimate | None:
    """Before any case is predicted: prove the output folder writable, check its disk has room for
    every output, and tell the largest case's peak memory against what is available.

    Args:
        cases, outputs: :func:`AutoSegLib.inference.files.find_input_cases`'s cases and their paths.
        available: bytes of memory to compare with (default: :func:`~AutoSegLib.resources.available_memory`).
        strict: refuse (raise) instead of warning when memory or disk look too small.
        pipelined: the cases run as a pipeline (:mod:`.pipeline`): three at once.

    Returns:
        The largest case's estimate (None when no header could be read).

    Raises:
        ResourceError: the output folder is read-only or its disk full; with ``strict``, also
            when the estimates do not fit.
    """
    from AutoSegLib.events import Reporter
    from AutoSegLib.resources import (available_memory, check_disk, check_memory, check_writable, format_bytes,
                                      pixel_bytes)

    reporter = reporter or Reporter(quiet=True)
    folder = outputs[0].labels.parent
    check_writable(folder)
    headers = [(case, _header(case.images[0])) for case in cases]
    # a case that is not 3D is refused by the predictor with its own message; nothing to estimate
    headers = [(case, paths, h) for (case, h), paths in zip(headers, outputs) if h is not None and len(h.shape) == 3]
    k = predictor.model.n_classes
    needed = sum(output_bytes(math.prod(h.shape), k, save_probabilities, uncertainty) for _, _, h in headers)
    needed -= sum(p.stat().st_size for _, paths, _ in headers for p in paths.all() if p.is_file())  # replaced
    warning = check_disk(folder, needed, f"the outputs of {len(headers)} case(s)", strict)
    if warning:
        reporter.warning(stage, warning)
    if not headers:
        return None
    sized = [(predictor_estimate(predictor, h.shape, h.geometry.spacing, pixel_bytes(h.pixel_type, h.components),
                                 save_probabilities, uncertainty, pipelined), case, h) for case, _, h in headers]
    estimate, case, header = max(sized, key=lambda item: item[0].peak)
    available = available_memory() if available is None else available
    shape = "x".join(map(str, header.shape))
    known = f"{format_bytes(available)} available" if available is not None else "available memory unknown"
    which = "the largest case, " if len(sized) > 1 else ""
    reporter.log(stage, f"Memory: {which}'{case.case_id}' ({shape}) needs about {format_bytes(estimate.peak)} at "
                        f"its peak ({estimate.describe()}); {known}",
                 case=case.case_id, estimate_bytes=estimate.peak, added_bytes=estimate.added,
                 available_bytes=available)
    advice = _advice(predictor, estimate, header, save_probabilities, uncertainty, pipelined)
    warning = check_memory(estimate, available, f"Predicting case '{case.case_id}' ({shape})", advice, strict)
    if warning:
        reporter.warning(stage, warning, case=case.case_id)
    return estimate


def _advice(predictor, estimate: MemoryEstimate, header, save_probabilities: bool, uncertainty: bool,
            pipelined: bool = False) -> str:
    """What would lower the peak, each with its estimate; and what would not."""
    from AutoSegLib.resources import format_bytes, pixel_bytes

    def added(**changes) -> int:
        options = dict(save_probabilities=save_probabilities, uncertainty=uncertainty, pipelined=pipelined)
        options.update(changes)
        return predictor_estimate(predictor, header.shape, header.geometry.spacing,
                                  pixel_bytes(header.pixel_type, header.components), **options).added

    candidates = [("one case at a time (--no-pipeline)", dict(pipelined=False))] if pipelined else []
    if save_probabilities or uncertainty:
        candidates.append(("without --save-probabilities and --uncertainty",
                           dict(save_probabilities=False, uncertainty=False)))
    if max(len(s.weights) for s in predictor.stages) > 1:
        candidates.append(("one fold (-f 0)", dict(folds=1)))
    model, names = predictor.model, [s.name for s in predictor.stages]
    for name in model.plans.configurations:
        if (len(names) > 1 and name in names) or (name not in names and model.trained_folds(name)):
            try:
                configurations = {n: model.configuration(n) for n in model.plans.configurations}
            except Exception:  # noqa: BLE001 - a broken other configuration is simply not suggested
                continue
            candidates.append((f"-c {name}", dict(names=[name], configurations=configurations)))
    levers = []
    for text, changes in candidates:
        lower = added(**changes)
        if lower < 0.95 * estimate.added:
            levers.append(f"{text}: {format_bytes(lower)}")
    k = model.n_classes
    grid = estimate.parts.get("probabilities (input grid)", 0)
    advice = ("What lowers it: " + "; ".join(levers) + ". ") if levers else ""
    if grid:
        advice += f"Of the estimate, {format_bytes(grid)} is the {k} class probabilities on the input grid. "
    advice += ("Whatever the configuration, the input grid's size sets the floor: crop the image to the region of "
               "interest or resample it coarser, or use a machine with more memory. --step and --no-tta change the "
               "time, not the memory.")
    return advice
