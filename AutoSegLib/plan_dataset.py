"""The plan stage's I/O: fingerprint a dataset folder, plan, write both files to the work folder.

The rules themselves live in the pure :mod:`AutoSegLib.planning`; this module only decides
what to read and write. A fingerprint is reused when the dataset's files are unchanged
(same names, sizes and modification times), so replanning for other hardware is instant.
"""

from __future__ import annotations

from pathlib import Path

from AutoSegLib.events import Reporter
from AutoSegLib.fileutil import read_json, write_json
from AutoSegLib.fingerprint import FINGERPRINT_VERSION, dataset_signature, extract_fingerprint
from AutoSegLib.verify import open_checked_dataset
from AutoSegLib.verify_checks import CHECKS_VERSION
from AutoSegLib.names import FINGERPRINT_FILE, PLANS_FILE  # noqa: F401 (re-exported)



def fingerprint_dataset(dataset_folder: str | Path, work_dir: str | Path, num_processes: int = 2,
                        reporter: Reporter | None = None, force: bool = False) -> dict:
    """Return the dataset's fingerprint, extracting it unless a current one is in ``work_dir``."""
    reporter = reporter or Reporter(quiet=True)
    dataset = open_checked_dataset(dataset_folder)  # numTraining, hidden files...: as verify, every time
    path = Path(work_dir) / FINGERPRINT_FILE
    if path.is_file() and not force:
        try:
            existing = read_json(path)
        except ValueError:
            existing = {}
        # Reused only if made from these files by today's per-case checks (an older one may
        # hold a case they now reject).
        if (existing.get("version") == FINGERPRINT_VERSION
                and existing.get("content_checks") == CHECKS_VERSION
                and existing.get("dataset_signature") == dataset_signature(dataset)):
            reporter.log("fingerprint", f"Dataset unchanged; reusing {path}")
            return existing
    fingerprint = extract_fingerprint(dataset, num_processes=num_processes, reporter=reporter)
    write_json(path, fingerprint)
    reporter.log("fingerprint", f"Wrote {path}")
    return fingerprint


def plan_dataset(dataset_folder: str | Path, work_dir: str | Path, gpu_memory_gb: float = 8.0,
                 num_processes: int = 2, reporter: Reporter | None = None, force_fingerprint: bool = False,
                 architecture: str = "PlainConvUNet", guidance: str = "auto"):
    """Fingerprint (or reuse), plan, and write ``plans.json``; returns the Plans.

    ``guidance``: ``on`` plans networks that also take correction clicks (planning/guidance.py),
    ``off`` plain ones (as before issue 21), ``auto`` on when this machine has a GPU; the plan's
    explanation says which and why.
    """
    from AutoSegLib.planning import plan

    reporter = reporter or Reporter(quiet=True)
    dataset_folder = Path(dataset_folder)
    fingerprint = fingerprint_dataset(dataset_folder, work_dir, num_processes, reporter, force_fingerprint)
    spec = open_checked_dataset(dataset_folder).spec
    plans = plan(fingerprint, spec.channel_names, spec.labels, gpu_memory_gb=gpu_memory_gb,
                 dataset_name=dataset_folder.resolve().name, architecture=architecture)
    apply_guidance(plans, guidance)
    path = Path(work_dir) / PLANS_FILE
    write_json(path, plans.to_dict())
    reporter.log("plan", f"Wrote {path}")
    return plans


def apply_guidance(plans, choice: str):
    """Click guidance on the plans as ``choice`` decides (``auto``: by this machine's device), and
    the reason in their explanation (planning/guidance.py); the plans, changed in place."""
    from AutoSegLib.planning.explain import note
    from AutoSegLib.planning.guidance import guidance_decision, with_guidance

    enabled, reason = guidance_decision(choice, training_device_type() if choice == "auto" else "")
    with_guidance(plans, enabled)
    note(plans.explanation, "remark", message=reason)
    return plans


def training_device_type() -> str:
    """The device ``--device auto`` would train on here (cuda, mps or cpu)."""
    from AutoSegLib.models.device import resolve_device

    return resolve_device("auto").type
