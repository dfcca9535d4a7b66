"""``autoseg verify``: check a dataset folder and report every problem at once.

Order of work: ``dataset.json`` (nothing else can be checked without it), the folder layout
(names only, from :func:`~AutoSegLib.dataset.scan_folder`), then the content of every complete
case - headers, then voxels - in worker processes (:mod:`AutoSegLib.verify_checks`), then
checks across cases. Problems never stop the run; each names its file or case and the
offending values.

Example:
    >>> report = verify_dataset("Dataset001_Liver", num_processes=2)
    >>> print(report.format())
    >>> report.ok
    True
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

from AutoSegLib.dataset import Case, Dataset, DatasetError, DatasetSpec, FolderScan, load_spec, scan_folder
from AutoSegLib.events import Reporter
from AutoSegLib.verify_checks import CaseJob, CaseResult, Problem, check_case

REPORT_VERSION = 1
# Titles of the groups in :meth:`VerifyReport.format`, in the order checks run.
CHECK_TITLES = {
    "dataset_json": "dataset.json", "empty": "no training cases", "num_training": "numTraining",
    "missing_channel": "missing channel files", "missing_label": "missing labels",
    "orphan_label": "labels without images", "duplicate": "duplicate case ids",
    "unexpected_file": "files that do not fit the layout", "unreadable": "unreadable files",
    "dimension": "image dimension", "components": "multi-component (RGB/vector) images",
    "direction": "non-orthonormal direction", "shape": "shape mismatch", "geometry": "geometry mismatch",
    "nan": "NaN or infinite voxels", "label_type": "label pixel type", "label_values": "undeclared label values",
    "worker": "worker processes", "internal": "internal errors", "empty_label": "labels without foreground",
    "spacing": "unusual spacing", "lost_geometry": "possibly lost geometry",
}

__all__ = ["Problem", "VerifyReport", "case_job", "open_checked_dataset", "verify_dataset"]


@dataclass
class VerifyReport:
    """Everything ``verify`` found in one dataset folder.

    Attributes:
        folder: the dataset folder.
        problems: errors and warnings in the order found (layout, then case by case, then across cases).
        training_cases, test_cases: complete cases whose content was checked.
    """

    folder: Path
    problems: list[Problem] = field(default_factory=list)
    training_cases: int = 0
    test_cases: int = 0

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def format(self) -> str:
        """Every problem, errors first, grouped by check; one line each."""
        lines = [f"Verified {self.folder}: {self.training_cases} training and {self.test_cases} test case(s) "
                 f"checked; {len(self.errors)} error(s), {len(self.warnings)} warning(s)"]
        for title, problems in (("ERRORS", self.errors), ("WARNINGS", self.warnings)):
            if problems:
                lines.append(f"{title}:")
                lines += _grouped_lines(problems)
        lines.append("Dataset OK" if self.ok else "Dataset has errors: fix them and run `autoseg verify` again")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"version": REPORT_VERSION, "folder": str(self.folder), "ok": self.ok,
                "training_cases": self.training_cases, "test_cases": self.test_cases,
                "errors": [p.to_dict() for p in self.errors], "warnings": [p.to_dict() for p in self.warnings]}


def _grouped_lines(problems: list[Problem]) -> list[str]:
    groups: dict[str, list[Problem]] = {}
    for problem in problems:
        groups.setdefault(problem.check, []).append(problem)
    order = list(CHECK_TITLES)
    lines = []
    for check in sorted(groups, key=lambda c: order.index(c) if c in order else len(order)):
        lines.append(f"  {CHECK_TITLES.get(check, check)} ({len(groups[check])}):")
        lines += [f"    {p.message}" for p in groups[check]]
    return lines


def verify_dataset(folder: str | Path, num_processes: int = 2, reporter: Reporter | None = None) -> VerifyReport:
    """Check a dataset folder (nnU-Net v2 layout) and return every problem found.

    Args:
        folder: the dataset folder (with dataset.json, imagesTr, labelsTr, optional imagesTs).
        num_processes: worker processes for the per-case checks; 1 checks in this process.
        reporter: receives progress as task "verify" counting cases; None for silence.

    Never raises on bad data: every problem becomes a :class:`Problem` in the report.
    """
    folder = Path(folder)
    report = VerifyReport(folder)
    try:
        spec = load_spec(folder)
    except (DatasetError, OSError) as exc:
        path, text = folder / "dataset.json", str(exc)
        if str(path) not in text:  # e.g. a UnicodeDecodeError from a binary file names no file
            text = f"{path}: {text}"
        report.problems.append(Problem("error", text, path, None, "dataset_json"))
        return report  # without labels, channels and file ending nothing else can be checked

    train = scan_folder(folder, spec, "Tr")
    report.problems += training_layout_problems(folder, spec, train)
    jobs = [case_job(folder, spec, case) for case in train.cases]
    report.training_cases = len(jobs)
    if (folder / "imagesTs").is_dir():
        test = scan_folder(folder, spec, "Ts")
        report.problems += _layout_problems(folder, spec, test, "Ts")
        jobs += [case_job(folder, spec, case) for case in test.cases]
        report.test_cases = len(test.cases)

    results, retry_warnings = _run_jobs(jobs, num_processes, reporter or Reporter(quiet=True))
    for result in results:
        report.problems += result.problems
    report.problems += retry_warnings
    report.problems += _cross_case_problems(results, report.training_cases)
    return report


def case_job(folder: Path, spec: DatasetSpec, case: Case) -> CaseJob:
    """What the per-case checks need to know about one case of ``folder``."""
    return CaseJob(case.case_id, tuple(case.images), case.label, Path(folder), tuple(sorted(spec.labels.values())),
                   spec.ignore_value)


def open_checked_dataset(folder: str | Path) -> Dataset:
    """:func:`~AutoSegLib.dataset.open_dataset` with ``verify``'s checks of dataset.json and layout.

    The entry of every stage that reads training cases (fingerprint, preprocessing): what
    ``verify`` rejects by name and count (numTraining, missing channels or labels, hidden or
    misnamed files) they reject too, with the same messages. Content is checked per case as
    it is read (:func:`~AutoSegLib.verify_checks.read_case`).

    Raises:
        DatasetError: naming dataset.json or each offending file.
    """
    folder = Path(folder)
    spec = load_spec(folder)
    scan = scan_folder(folder, spec, "Tr")
    errors = [p.message for p in training_layout_problems(folder, spec, scan) if p.severity == "error"]
    if errors:
        raise DatasetError(f"{folder}: " + "; ".join(errors) + " (run `autoseg verify` for a full report)")
    return Dataset(folder, spec, tuple(scan.cases))


# -- layout ------------------------------------------------------------------------------------
def training_layout_problems(folder: Path, spec: DatasetSpec, scan: FolderScan) -> list[Problem]:
    """Problems of imagesTr/labelsTr found from names alone, numTraining included."""
    return _count_problems(folder, spec, scan) + _layout_problems(folder, spec, scan, "Tr")


def _count_problems(folder: Path, spec: DatasetSpec, scan: FolderScan) -> list[Problem]:
    found = {c.case_id for c in scan.cases} | set(scan.missing_channels) | set(scan.missing_labels)
    json_path = folder / "dataset.json"
    if not found:
        return [Problem("error", f"imagesTr: no training cases found (dataset.json numTraining is {spec.num_training}); "
                                 f"expected files like imagesTr/case_0000{spec.file_ending}", folder / "imagesTr",
                        None, "empty")]
    if len(found) != spec.num_training:
        return [Problem("error", f"dataset.json: numTraining is {spec.num_training} but imagesTr holds "
                                 f"{len(found)} training case(s)", json_path, None, "num_training")]
    return []


def _layout_problems(folder: Path, spec: DatasetSpec, scan: FolderScan, split: str) -> list[Problem]:
    """The problems :func:`scan_folder` recorded, one per file or case, each naming its files."""
    ending, images = spec.file_ending, f"images{split}"

    def rel(path: Path) -> str:
        return path.relative_to(folder).as_posix()

    problems = []
    for case_id, channels in scan.missing_channels.items():
        expected = [folder / images / f"{case_id}_{c:04d}{ending}" for c in channels]
        problems.append(Problem("error", f"case '{case_id}': missing channel file(s) "
                                         f"{', '.join(rel(p) for p in expected)}", expected[0], case_id,
                                "missing_channel"))
    for case_id in scan.missing_labels:
        expected = folder / "labelsTr" / f"{case_id}{ending}"
        problems.append(Problem("error", f"case '{case_id}': has images but no label {rel(expected)}", expected,
                                case_id, "missing_label"))
    for path in scan.orphan_labels:
        case_id = path.name[: -len(ending)]
        problems.append(Problem("error", f"{rel(path)}: label has no image (expected {images}/{case_id}_0000{ending})",
                                path, case_id, "orphan_label"))
    for group in scan.duplicates:
        problems.append(Problem("error", "duplicate case id (names may differ only in letter case, which Windows "
                                         f"and macOS treat as the same file): {', '.join(rel(p) for p in group)}",
                                group[0], None, "duplicate"))
    for path, reason in scan.unexpected:
        problems.append(Problem("error", f"{rel(path)}: {reason}", path, None, "unexpected_file"))
    return problems


# -- running the per-case checks -----------------------------------------------------------------
def _check_job(job: CaseJob) -> CaseResult:
    """The worker entry point: a bug in a check must become a problem, not a lost case."""
    try:
        return check_case(job)
    except Exception as exc:  # noqa: BLE001 - reported, with the case, as an error
        return CaseResult([Problem("error", f"case '{job.case_id}': checking failed unexpectedly: "
                                            f"{type(exc).__name__}: {exc}", job.images[0], job.case_id,
                                   "internal")], None)


def _run_jobs(jobs: list[CaseJob], num_processes: int, reporter: Reporter) -> tuple[list[CaseResult], list[Problem]]:
    """Results in job order, plus a warning if a worker died but every case passed alone."""
    results: list[CaseResult | None] = [None] * len(jobs)
    warnings: list[Problem] = []
    with reporter.task("verify", len(jobs), desc="Verify") as step:
        if num_processes <= 1:
            for i, job in enumerate(jobs):
                results[i] = _check_job(job)
                step()
            return results, warnings
        unfinished = _run_pool(jobs, num_processes, results, step)
        for i in unfinished:
            # The pool cannot say which case killed it: recheck each unfinished case in a
            # process of its own, so the culprit is named and the others still get checked.
            results[i] = _run_alone(jobs[i])
            step()
    if unfinished and not any(p.check == "worker" for i in unfinished for p in results[i].problems):
        names = ", ".join(f"'{jobs[i].case_id}'" for i in unfinished)
        warnings.append(Problem("warning", f"a worker process died while cases {names} were checked in parallel; "
                                           "they passed when checked one at a time, so the machine may be short of "
                                           "memory (try -np 1)", None, None, "worker"))
    return results, warnings


def _run_pool(jobs: list[CaseJob], num_processes: int, results: list, step) -> list[int]:
    """Run jobs on a pool; return the indices left unfinished because a worker died."""
    with ProcessPoolExecutor(max_workers=min(num_processes, max(1, len(jobs)))) as pool:
        futures = {pool.submit(_check_job, job): i for i, job in enumerate(jobs)}
        for future in as_completed(futures):  # a broken pool fails every pending future at once
            try:
                results[futures[future]] = future.result()
            except Exception:  # noqa: BLE001 - BrokenProcessPool, above all: rechecked alone
                continue
            step()
    return [i for i in range(len(jobs)) if results[i] is None]


def _run_alone(job: CaseJob) -> CaseResult:
    with ProcessPoolExecutor(max_workers=1) as pool:
        try:
            return pool.submit(_check_job, job).result()
        except BrokenProcessPool:
            files = ", ".join(p.name for p in [*job.images, *([job.label] if job.label else [])])
            text = (f"case '{job.case_id}': the process checking it died (killed by the system, often for lack "
                    f"of memory, or a crash while reading {files})")
            check = "worker"
        except Exception as exc:  # noqa: BLE001 - e.g. a result that cannot be sent back
            text, check = f"case '{job.case_id}': checking failed: {type(exc).__name__}: {exc}", "internal"
    return CaseResult([Problem("error", text, job.images[0], job.case_id, check)], None)


# -- across cases --------------------------------------------------------------------------------
def _cross_case_problems(results: list[CaseResult], num_training: int) -> list[Problem]:
    # Mixed 2D/3D datasets need no check here: every file must be 3D (verify_checks._ndim_ok).
    problems = []
    training = [r.reference for r in results[:num_training]]
    if training and all(h is not None and _looks_like_lost_geometry(h) for h in training):
        problems.append(Problem(
            "warning", "every training case has spacing 1 x 1 x 1 mm, origin 0 and identity direction: the files "
                       "may have lost their geometry (e.g. saved from arrays without a header); if so, the method "
                       "will plan for 1 mm voxels", None, None, "lost_geometry"))
    return problems


def _looks_like_lost_geometry(header) -> bool:
    g = header.geometry
    return (len(header.shape) == 3 and all(s == 1.0 for s in g.spacing) and all(o == 0.0 for o in g.origin)
            and all(d == (1.0 if i % 4 == 0 else 0.0) for i, d in enumerate(g.direction)))
