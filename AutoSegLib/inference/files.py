"""``autoseg predict``: image files in, label files (and probabilities, uncertainty) out.

Input: a folder of channel-suffixed files ``{case}_{XXXX}{ending}`` (as imagesTr/imagesTs),
or one image file for a single-channel model. Output, per case, in the input's grid,
geometry and file format: ``{case}{ending}`` (labels), with ``--save-probabilities``
``{case}.npz`` (key ``probabilities``, float16, (K, z, y, x)), with ``--uncertainty``
``{case}_uncertainty{ending}`` (float32 normalized entropy in [0, 1]).

Every output is written under a temporary name and renamed into place, the label file last;
earlier outputs of a case are removed before it is predicted, so a failed run never leaves a
file that looks like its result. A failing case is reported and the others still run.

Sharding (docs/scaling.md): ``num_parts``/``part_id`` predict one part of the cases sorted by
name (:func:`select_part`), for a job array or the ranks of a torchrun group; the parts of one
output folder can run at the same time, each holding its own lock. ``skip_existing``
(``--continue``) skips a case whose outputs exist: its label file appears only by a rename
after everything else of the case was written, so a partial case never counts.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from AutoSegLib.errors import ReportedFailure
from AutoSegLib.events import Reporter
from AutoSegLib.fileutil import TMP_PREFIX, atomic_path
from AutoSegLib.imageio import Geometry, file_ending, read_image, write_image
from AutoSegLib.inference.pipeline import MAX_IN_FLIGHT, CaseTimes, network_threads, run_pipeline
from AutoSegLib.inference.probabilities import normalized_entropy
from AutoSegLib.locks import lock_folder

STAGE = "predict"
PART_LOCK_PREFIX = ".autoseg-part-"  # a folder inside the output folder, holding one part's lock
_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


class PredictionError(ReportedFailure):
    """Inputs cannot be predicted, or some cases failed; the message names each case and file."""


@dataclass(frozen=True)
class InputCase:
    case_id: str
    images: tuple[Path, ...]  # in channel order
    ending: str


@dataclass(frozen=True)
class CaseOutputs:
    labels: Path
    probabilities: Path
    uncertainty: Path

    def all(self) -> tuple[Path, ...]:
        return self.labels, self.probabilities, self.uncertainty


def _stem(path: Path, ending: str) -> str:
    return path.name[: -len(ending)]


def find_input_cases(path: str | Path, n_channels: int) -> tuple[list[InputCase], list[str]]:
    """The cases under ``path`` (a folder or one file) and warnings about skipped files.

    Raises:
        PredictionError: a case lacks a channel, has a channel the model does not take, or
            the folder holds no case; every problem is listed.
    """
    path = Path(path)
    if path.is_file():
        return [_single_file_case(path, n_channels)], []
    if not path.is_dir():
        raise PredictionError(f"{path}: input not found (give a folder of {{case}}_{{XXXX}} images or one image file)")
    groups: dict[str, dict[int, list[Path]]] = {}
    warnings, problems = [], []
    for file in sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith((".", TMP_PREFIX))):
        ending = file_ending(file)
        if ending is None:
            continue
        match = _CHANNEL_RE.match(_stem(file, ending))
        if match is None:
            warnings.append(f"{file}: skipped, not named {{case}}_{{XXXX}}{ending} (XXXX = channel, e.g. 0000)")
            continue
        groups.setdefault(match["case"], {}).setdefault(int(match["channel"]), []).append(file)
    cases = []
    for case_id, channels in sorted(groups.items()):
        extra = sorted(c for c in channels if c >= n_channels)
        missing = [c for c in range(n_channels) if c not in channels]
        doubled = [p for c in sorted(channels) for p in channels[c] if len(channels[c]) > 1]
        if extra:
            problems.append(f"case '{case_id}' has channel(s) {', '.join(f'{c:04d}' for c in extra)} but the model "
                            f"takes {n_channels} channel(s) (0000-{n_channels - 1:04d})")
        if missing:
            problems.append(f"case '{case_id}' is missing channel file(s) "
                            f"{', '.join(f'{case_id}_{c:04d}' for c in missing)} in {path}")
        if doubled:
            problems.append(f"case '{case_id}' has one channel in several files: {', '.join(map(str, doubled))}")
        if not (extra or missing or doubled):
            images = tuple(channels[c][0] for c in range(n_channels))
            cases.append(InputCase(case_id, images, file_ending(images[0])))
    if problems:
        raise PredictionError(f"{path}: " + "; ".join(problems))
    if not cases:
        raise PredictionError(f"{path}: no images named {{case}}_{{XXXX}}{{ending}} found")
    return cases, warnings


def _single_file_case(path: Path, n_channels: int) -> InputCase:
    ending = file_ending(path)
    if ending is None:
        raise PredictionError(f"{path}: not a supported image file")
    if n_channels != 1:
        raise PredictionError(f"{path}: the model takes {n_channels} channels; give a folder holding "
                              f"{{case}}_0000{ending} ... {{case}}_{n_channels - 1:04d}{ending}")
    stem = _stem(path, ending)
    match = _CHANNEL_RE.match(stem)
    return InputCase(match["case"] if match and match["channel"] == "0000" else stem, (path,), ending)


def output_paths(case: InputCase, output: Path, single_target: bool = False) -> CaseOutputs:
    """Where a case's outputs go; ``single_target``: ``output`` is the label file itself."""
    if single_target:
        folder, stem, ending = output.parent, _stem(output, file_ending(output)), file_ending(output)
    else:
        folder, stem, ending = output, case.case_id, case.ending
    return CaseOutputs(folder / f"{stem}{ending}", folder / f"{stem}.npz", folder / f"{stem}_uncertainty{ending}")


def write_case_outputs(paths: CaseOutputs, labels: np.ndarray, geometry, probabilities: np.ndarray | None = None,
                       uncertainty: np.ndarray | None = None) -> None:
    """A case's outputs, each to a temporary name first, then renamed together, labels last.

    ``probabilities`` (K, z, y, x) go to the ``.npz`` as float16, ``uncertainty`` to an image;
    either may be None (not written).
    """
    writers = [(paths.labels, lambda tmp: write_image(labels, geometry, tmp))]
    if uncertainty is not None:
        writers.append((paths.uncertainty, lambda tmp: write_image(uncertainty, geometry, tmp)))
    if probabilities is not None:
        def save_npz(tmp):
            with open(tmp, "wb") as handle:
                np.savez_compressed(handle, probabilities=probabilities.astype(np.float16))
        writers.append((paths.probabilities, save_npz))
    with contextlib.ExitStack() as stack:  # exits in reverse: the label file is renamed last
        temps = [stack.enter_context(atomic_path(path)) for path, _ in writers]
        for tmp, (_, write) in zip(temps, writers):
            write(tmp)


def select_part(cases: list[InputCase], num_parts: int, part_id: int) -> list[InputCase]:
    """Part ``part_id`` of ``num_parts``: every ``num_parts``-th case by name, from the ``part_id``-th.

    The parts are disjoint, cover every case, and do not depend on the order files were listed in
    (nnU-Net v2's ``-num_parts/-part_id`` split, of the sorted case list).

    Example:
        >>> names = [c.case_id for c in select_part([InputCase(n, (), "") for n in "dacbe"], 2, 1)]
        >>> names
        ['b', 'd']
    """
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise ValueError(f"part {part_id} of {num_parts}: need num_parts >= 1 and 0 <= part_id < num_parts")
    return sorted(cases, key=lambda c: c.case_id)[part_id::num_parts]


def is_finished(paths: CaseOutputs, save_probabilities: bool = False, uncertainty: bool = False) -> bool:
    """Every output asked for exists (the label file is renamed into place last, so it marks a finished case)."""
    wanted = [paths.labels] + [paths.probabilities] * save_probabilities + [paths.uncertainty] * uncertainty
    return all(path.is_file() for path in wanted)


def read_input_case(case: InputCase, reporter: Reporter | None = None) -> tuple[list[np.ndarray], Geometry]:
    """The channel arrays of a case (in channel order) and the first channel's geometry.

    A channel whose grid differs from the first one's is reported as a warning (the first
    channel's geometry is used for all), as ``autoseg predict`` does.

    Example (Slicer's Python console, a 2-channel model):
        >>> predictor = Predictor.from_model_dir("Dataset002_MR.autoseg/model")  # doctest: +SKIP
        >>> cases, warnings = find_input_cases("new_scans", predictor.model.n_channels)  # doctest: +SKIP
        >>> channels, geometry = read_input_case(cases[0])  # doctest: +SKIP
        >>> labels, _ = predictor.predict(channels, geometry)  # doctest: +SKIP
    """
    channels, geometry = [], None
    for image in case.images:
        array, geometry_c = read_image(image)
        channels.append(array)
        if geometry is None:
            geometry = geometry_c
        elif reporter is not None and not _same_grid(geometry, geometry_c):
            reporter.warning(STAGE, f"{image}: geometry differs from {case.images[0].name}; using the latter's",
                             case=case.case_id, file=str(image))
    return channels, geometry


def predict_case_file(predictor, case: InputCase, paths: CaseOutputs, save_probabilities: bool = False,
                      uncertainty: bool = False, reporter: Reporter | None = None,
                      progress: Callable[[float], None] | None = None) -> None:
    """Read, predict and write one case, after removing its earlier outputs.

    ``progress`` receives the fraction of the case's network work done (``Predictor.predict``).
    """
    for old in paths.all():
        old.unlink(missing_ok=True)
    channels, geometry = read_input_case(case, reporter)
    fallbacks = getattr(predictor, "host_accumulator_fallbacks", 0)
    labels, probabilities = predictor.predict(channels, geometry, progress=progress,
                                              return_probabilities=save_probabilities or uncertainty)
    if reporter is not None and getattr(predictor, "host_accumulator_fallbacks", 0) > fallbacks:
        reporter.warning(STAGE, f"case '{case.case_id}': out of GPU memory; predicted again with the sliding-window "
                                "sums in main memory (slower)", case=case.case_id)
    del channels
    entropy = normalized_entropy(probabilities) if uncertainty else None
    write_case_outputs(paths, labels, geometry, probabilities if save_probabilities else None, entropy)


def _same_grid(a, b) -> bool:
    return (np.allclose(a.spacing, b.spacing, rtol=1e-4) and np.allclose(a.origin, b.origin, atol=1e-3)
            and np.allclose(a.direction, b.direction, atol=1e-4))


CASE_ERRORS = (ReportedFailure, OSError, ValueError, RuntimeError, MemoryError)  # reported; the others go on


class _DeferredWarnings:
    """Warnings made on the reader thread, given to the Reporter (not thread-safe) on the calling thread."""

    def __init__(self):
        self.calls: list = []

    def warning(self, stage: str, message: str, **fields) -> None:
        self.calls.append((stage, message, fields))

    def replay(self, reporter: Reporter) -> None:
        calls, self.calls = self.calls, []
        for stage, message, fields in calls:
            reporter.warning(stage, message, **fields)


@dataclass
class _Job:
    index: int
    case: InputCase
    paths: CaseOutputs
    times: CaseTimes
    warnings: _DeferredWarnings
    geometry: Geometry | None = None  # the input's, as read: the outputs get it exactly


def predict_cases(predictor, cases: list[InputCase], outputs: list[CaseOutputs], save_probabilities: bool = False,
                  uncertainty: bool = False, reporter: Reporter | None = None, stage: str = STAGE,
                  pipelined: bool = True, times: list | None = None) -> list[str]:
    """Predict every case, going on after a failure; returns one message per failed case.

    ``pipelined``: the next case is read and the previous one written while the network runs
    (:mod:`.pipeline`: at most three cases in memory); False: one case at a time. ``times``:
    a list that receives each case's :class:`~AutoSegLib.inference.pipeline.CaseTimes`.
    """
    reporter = reporter or Reporter(quiet=True)
    failures = []
    wants_probabilities = save_probabilities or uncertainty
    jobs = [_Job(i, case, paths, CaseTimes(case.case_id), _DeferredWarnings())
            for i, (case, paths) in enumerate(zip(cases, outputs))]

    def prepare(job: _Job):
        job.times.started = time.perf_counter()
        for old in job.paths.all():  # a failed case never leaves an earlier result behind
            old.unlink(missing_ok=True)
        t = time.perf_counter()
        channels, job.geometry = read_input_case(job.case, job.warnings)
        job.times.add("read", time.perf_counter() - t)
        t = time.perf_counter()
        prepared = predictor.prepare(channels, job.geometry, wants_probabilities)
        job.times.add("preprocess", time.perf_counter() - t)
        return prepared

    def network(job: _Job, prepared, poll):
        job.warnings.replay(reporter)

        def progress(fraction: float) -> None:
            poll()  # the writer's case, if done, is counted first: progress only moves forward
            step.part(job.index - step.done_count + fraction, case=job.case.case_id)

        fallbacks = getattr(predictor, "host_accumulator_fallbacks", 0)
        t = time.perf_counter()
        result = predictor.run_network(prepared, progress)
        job.times.add("network", time.perf_counter() - t)
        if getattr(predictor, "host_accumulator_fallbacks", 0) > fallbacks:
            reporter.warning(STAGE, f"case '{job.case.case_id}': out of GPU memory; predicted again with the "
                                    "sliding-window sums in main memory (slower)", case=job.case.case_id)
        return result

    def finish(job: _Job, result) -> None:
        t = time.perf_counter()
        labels, probabilities = predictor.finish(result)
        del result
        entropy = normalized_entropy(probabilities) if uncertainty else None
        job.times.add("restore", time.perf_counter() - t)
        t = time.perf_counter()
        write_case_outputs(job.paths, labels, job.geometry, probabilities if save_probabilities else None, entropy)
        job.times.add("write", time.perf_counter() - t)

    def done(job: _Job, error: BaseException | None) -> None:
        job.times.finished = time.perf_counter()
        job.warnings.replay(reporter)
        if times is not None:
            times.append(job.times)
        if error is not None and not isinstance(error, CASE_ERRORS):
            raise error  # a bug, not a bad case: stop (the threads finish their current case first)
        if error is not None:
            message = " ".join(f"case '{job.case.case_id}' ({job.case.images[0]}): {error}".split())
            reporter.error(stage, message, case=job.case.case_id, file=str(job.case.images[0]))
            failures.append(message)
        step(case=job.case.case_id, ok=error is None)

    with reporter.task(stage, len(cases), desc=stage.capitalize()) as step, \
            _network_threads(predictor, len(cases), pipelined, reporter, stage):
        t = time.perf_counter()
        run_pipeline(jobs, prepare, network, finish, done, pipelined)
    if len(jobs) > 1:
        wall = time.perf_counter() - t
        net = sum(job.times.stages.get("network", 0.0) for job in jobs)
        reporter.log(stage, f"{len(jobs)} cases in {wall:.1f} s, of which the network {net:.1f} s "
                            f"({wall / max(net, 1e-9):.2f}x the network time)", wall_s=round(wall, 3),
                     network_s=round(net, 3))
    return failures


@contextlib.contextmanager
def _network_threads(predictor, n_cases: int, pipelined: bool, reporter: Reporter, stage: str):
    """Torch threads for the network while the cases run (:func:`.pipeline.network_threads`), said once."""
    device = getattr(predictor, "device", None)
    threads = network_threads(device.type if device is not None else "cpu", n_cases, pipelined)
    import torch

    before = torch.get_num_threads()
    if pipelined and n_cases > 1:
        if device is not None and device.type != "cpu":
            where = f"on {device}, the CPU's {_cores()} core(s) reading and writing"
        else:
            where = (f"on {threads or before} torch thread(s) of {_cores()} core(s)"
                     + (" (OMP_NUM_THREADS)" if threads is None else ", one core left to reading and writing"
                        if threads < _cores() else ""))
        reporter.log(stage, f"Pipeline: the next case is read and the previous one written while the network runs "
                            f"(at most {MAX_IN_FLIGHT} cases in memory); the network {where}")
    if threads is not None and threads != before:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _tta_text(predictor) -> str:
    axes = getattr(predictor, "tta_axes", None)
    if not predictor.tta or axes == ():
        return "off"
    return "on" if axes is None else f"on, image axes {', '.join(map(str, axes))} only"


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def predict_files(input_path: str | Path, output_path: str | Path, model_dir: str | Path | None = None,
                  predictor=None, save_probabilities: bool = False, uncertainty: bool = False,
                  reporter: Reporter | None = None, strict: bool = False, available_memory: int | None = None,
                  num_parts: int = 1, part_id: int = 0, skip_existing: bool = False, pipelined: bool = True,
                  stage_times: list | None = None, **predictor_options) -> dict:
    """Predict a folder of cases (or one file) into ``output_path``.

    Args:
        input_path: folder of ``{case}_{XXXX}{ending}`` files, or one image (single-channel model).
        output_path: output folder; for a single input file it may also be the label file's
            own name (e.g. ``out/liver.nii.gz``), unless it ends in ``/`` or is a folder.
        model_dir: the model folder (or pass a ready ``predictor``).
        strict, available_memory: refuse instead of warning when the memory or disk estimate
            does not fit; bytes to compare with (default: measured). See :mod:`.memory`.
        predictor_options: :meth:`Predictor.from_model_dir` arguments (configuration, folds,
            checkpoint, device, tta, step, batch_size).
        num_parts, part_id: predict only this part of the cases (:func:`select_part`).
        skip_existing: skip cases an earlier run finished (``--continue``).
        pipelined: read the next case and write the previous one while the network runs
            (:mod:`.pipeline`, at most three cases in memory); False: one case at a time.
        stage_times: a list that receives each case's stage times
            (:class:`~AutoSegLib.inference.pipeline.CaseTimes`), for benchmarks.

    Returns:
        ``{"cases": n predicted, "skipped": n already there, "output": folder}`` (plus
        ``part_id``/``num_parts`` for a part).

    Raises:
        PredictionError: bad input (before anything is written), or some cases failed.

    Example:
        >>> predict_files("imagesTs", "predictions", "Dataset001.autoseg/model", tta=False)  # doctest: +SKIP
    """
    from AutoSegLib.inference.predictor import Predictor

    reporter = reporter or Reporter(quiet=True)
    as_folder = str(output_path).endswith(("/", os.sep))  # a Path drops the trailing separator
    input_path, output_path = Path(input_path), Path(output_path)
    if predictor is None:
        if model_dir is None:
            raise ValueError("give model_dir or predictor")
        predictor = Predictor.from_model_dir(model_dir, **predictor_options)
    cases, warnings = find_input_cases(input_path, predictor.model.n_channels)
    for warning in warnings:
        reporter.warning(STAGE, warning)
    single_target = (input_path.is_file() and file_ending(output_path) is not None and not as_folder
                     and not output_path.is_dir())
    input_folder = input_path if input_path.is_dir() else input_path.parent
    if not single_target and output_path.resolve() == input_folder.resolve():
        raise PredictionError(f"{output_path}: choose an output folder other than the input folder")
    all_cases = len(cases)
    if num_parts > 1:
        cases = select_part(cases, num_parts, part_id)
    outputs = [output_paths(case, output_path, single_target) for case in cases]
    skipped = 0
    if skip_existing:
        keep = [not is_finished(o, save_probabilities, uncertainty) for o in outputs]
        skipped = keep.count(False)
        cases = [c for c, k in zip(cases, keep) if k]
        outputs = [o for o, k in zip(outputs, keep) if k]
    folder = output_path.parent if single_target else output_path
    part = f" (part {part_id} of {num_parts}: {len(cases) + skipped} of {all_cases} cases)" if num_parts > 1 else ""
    if skipped:
        part += f"; {skipped} already predicted, skipped (--continue)"
    stages = ", ".join(f"{s.name} folds {s.folds}" for s in predictor.stages)
    if predictor.choice is not None:
        stages += f" ({predictor.choice.reason})"
    reporter.log(STAGE, f"Predicting {len(cases)} case(s){part} with {stages} on {predictor.device} "
                        f"(TTA {_tta_text(predictor)}, step {predictor.step}) -> {output_path}")
    result = {"cases": len(cases), "skipped": skipped, "output": str(folder)}
    if num_parts > 1:
        result.update(part_id=part_id, num_parts=num_parts)
    if not cases:
        return result
    # One process per output folder (AutoSegLib/locks.py), before the resource check's probe file;
    # one per part of it when the cases are split (the parts write different files).
    if num_parts > 1:
        held = lock_folder(folder / f"{PART_LOCK_PREFIX}{part_id}-of-{num_parts}", "predicting this part")
    else:
        held = lock_folder(folder, "writing predictions to this folder")
    from AutoSegLib.inference.memory import check_prediction_resources

    try:  # released also when the check below refuses
        # Before any case: the output folder writable with room, the largest case's memory told.
        check_prediction_resources(predictor, cases, outputs, save_probabilities, uncertainty, reporter, strict,
                                   available_memory, pipelined=pipelined and len(cases) > 1)
        failures = predict_cases(predictor, cases, outputs, save_probabilities, uncertainty, reporter,
                                 pipelined=pipelined, times=stage_times)
    finally:
        held.release(tidy=num_parts > 1)  # a part's lock folder goes with it
    if failures:
        # one line (each case's own error event came before it; predict_cases folded each message)
        raise PredictionError(f"prediction failed for {len(failures)} of {len(cases)} case(s): "
                              + "; ".join(failures))
    return result
