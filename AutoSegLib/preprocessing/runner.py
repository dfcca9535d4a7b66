"""``autoseg preprocess``: every case of every chosen configuration, in parallel, re-entrant.

Each case runs in its own worker process (:mod:`AutoSegLib.workers`), so a case that kills
its worker (out of memory) is named and the others finish. A case is skipped when its
outputs are complete and were made for the same plan and the same source files; anything
else (new plan, changed file, interrupted write) is redone.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np

from AutoSegLib.dataset import Case
from AutoSegLib.errors import ReportedFailure
from AutoSegLib.events import Reporter
from AutoSegLib.fileutil import read_json
from AutoSegLib.locks import lock_folders
from AutoSegLib.planning import Plans, PlanningError
from AutoSegLib.preprocessing import storage
from AutoSegLib.preprocessing.case import PROPERTIES_VERSION, preprocess_case
from AutoSegLib.preprocessing.sampling import MAX_LOCATIONS_PER_CLASS, MIN_FRACTION, sample_foreground_locations
from AutoSegLib.verify import case_job, open_checked_dataset
from AutoSegLib.verify_checks import CaseJob, read_case
from AutoSegLib.resources import check_preprocess_resources
from AutoSegLib.workers import run_tasks
from AutoSegLib.names import PLANS_FILE  # noqa: F401 (re-exported)

PREPROCESSED = "preprocessed"
# Plan fields that change the preprocessed arrays; batch and patch size do not, so replanning
# for another GPU keeps the preprocessed data.
_DATA_FIELDS = ("spacing", "normalization_schemes", "use_mask_for_norm", "resampling")


class PreprocessError(ReportedFailure):
    """Some cases failed; the message lists each case and its cause."""


def load_plans(work_dir: str | Path) -> Plans:
    path = Path(work_dir) / PLANS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no plans found; run `autoseg plan DATASET` first")
    try:
        return Plans.from_dict(read_json(path))
    except PlanningError as exc:
        raise PlanningError(f"{path}: {exc}") from None


def data_identifier(name: str, plans: Plans) -> str:
    """Folder holding a configuration's data: the cascade's second stage shares 3d_fullres'."""
    if name == "3d_cascade_fullres" and "3d_fullres" in plans.configurations:
        same = plans.configurations["3d_fullres"].spacing == plans.configurations[name].spacing
        return "3d_fullres" if same else name
    return name


def preprocessed_folder(work_dir: str | Path, name: str, plans: Plans) -> Path:
    return Path(work_dir) / PREPROCESSED / data_identifier(name, plans)


def case_signature(plans: Plans, name: str, case: Case, classes: list[int]) -> str:
    """Changes when anything that shapes this case's preprocessed arrays changes."""
    config = plans.configurations[name].to_dict()
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in (*case.images, case.label) if p]
    payload = {"config": {k: config[k] for k in _DATA_FIELDS}, "transpose": plans.transpose_forward,
               "orientation": plans.orientation,
               "intensity": plans.foreground_intensity_properties_per_channel, "version": PROPERTIES_VERSION,
               "sampling": [MAX_LOCATIONS_PER_CLASS, MIN_FRACTION], "classes": classes, "files": stats}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def _case_seed(case_id: str) -> int:
    return int.from_bytes(hashlib.sha256(case_id.encode()).digest()[:4], "little")


def preprocess_one(case: CaseJob, config: dict, transpose: list[int], intensity: dict, classes: list[int],
                   folder: str, signature: str, orientation: str | None = None) -> dict:
    """Read (checked as ``verify`` checks it), preprocess and write one case (runs in a worker process)."""
    started = time.monotonic()
    loaded = read_case(case)  # raises CaseError naming the case and file before anything is written
    data, seg, properties = preprocess_case(loaded.channels, loaded.label, loaded.geometry, config, transpose,
                                            intensity, orientation)
    del loaded
    if seg is not None:
        foreground = sample_foreground_locations(seg[0], classes, _case_seed(case.case_id))
    else:
        foreground = np.zeros((0, data.ndim), dtype=np.int32)
    properties.update(case_id=case.case_id, signature=signature,
                      classes_present=sorted({int(v) for v in foreground[:, 0]}))
    storage.write_case(Path(folder), case.case_id, data, seg, foreground, properties)
    return {"shape": properties["shape_after_resampling"], "seconds": round(time.monotonic() - started, 2)}


def preprocess_dataset(dataset_folder: str | Path, work_dir: str | Path, configurations: list[str] | None = None,
                       num_processes: int = 2, reporter: Reporter | None = None, strict: bool = False,
                       available_memory: int | None = None) -> dict:
    """Preprocess the training cases for the chosen configurations (default: all planned).

    Returns per configuration the counts of cases processed and skipped as current.

    Each of the ``num_processes`` workers holds one case at a time: its images and label as
    read, plus up to 4.6x the int16 image while preprocessing (0.9 GiB for a 400x512x512 CT;
    BENCHMARKS.md, Preprocessing), so RAM as well as cores bounds ``num_processes``.

    Raises:
        PreprocessError: one or more cases failed; all others were still processed.
    """
    reporter = reporter or Reporter(quiet=True)
    dataset = open_checked_dataset(dataset_folder)  # as verify: numTraining, hidden files, ...
    plans = load_plans(work_dir)
    names = configurations or list(plans.configurations)
    unknown = [n for n in names if n not in plans.configurations]
    if unknown:
        raise ValueError(f"configuration(s) {unknown} are not in the plans; planned: {', '.join(plans.configurations)}")
    # Plan order (3d_fullres before the cascade stage that shares its data), each name once.
    names = [n for n in plans.configurations if n in names]
    classes = sorted(dataset.spec.foreground_labels.values())
    # One process per configuration folder (AutoSegLib/locks.py), all held before anything is
    # written (the disk check's probe included) or any case is read.
    held = lock_folders(dict.fromkeys(preprocessed_folder(work_dir, n, plans) for n in names),
                        "preprocessing this configuration")
    # Memory and disk told before any case; strict: refused when they do not fit (AutoSegLib/resources.py).
    try:
        check_preprocess_resources(dataset.cases, {n: (plans.configurations[n].to_dict(), preprocessed_folder(
            work_dir, n, plans)) for n in names}, plans.transpose_forward, num_processes, reporter, strict,
            available_memory)
    except BaseException:
        held.close()  # a refusal leaves the folders free for the next try in this process
        raise
    summary, failures, done_folders = {}, [], {}  # folder -> configuration that filled it
    for name in names:
        folder = preprocessed_folder(work_dir, name, plans)
        if folder in done_folders:
            summary[name] = {"shared_with": done_folders[folder]}
            continue
        done_folders[folder] = name
        folder.mkdir(parents=True, exist_ok=True)
        config = plans.configurations[name].to_dict()
        todo = []
        for case in dataset.cases:
            signature = case_signature(plans, name, case, classes)
            if not storage.is_current(folder, case.case_id, signature):
                job = case_job(dataset.folder, dataset.spec, case)
                todo.append((case.case_id, (job, config, plans.transpose_forward,
                                            plans.foreground_intensity_properties_per_channel, classes,
                                            str(folder), signature, plans.orientation)))
        skipped = len(dataset.cases) - len(todo)
        if skipped:
            reporter.log("preprocess", f"{name}: {skipped} case(s) already preprocessed for this plan; skipped")
        with reporter.task("preprocess", len(todo), desc=f"Preprocess {name}", configuration=name) as step:
            def on_result(result, name=name):
                if not result.ok:
                    failures.append(f"{name} case '{result.task_id}': {result.error}")
                step(configuration=name, case=result.task_id, ok=result.ok)

            results = run_tasks(preprocess_one, todo, num_processes, on_result)
        summary[name] = {"processed": sum(r.ok for r in results), "skipped": skipped,
                         "failed": sum(not r.ok for r in results), "folder": str(folder)}
    held.close()
    if failures:
        # One line for one case (what a GUI shows as the reason); a list for several.
        separator = " " if len(failures) == 1 else "\n  "
        raise PreprocessError(f"preprocessing failed for {len(failures)} case(s):{separator}"
                              + separator.join(failures))
    return summary
