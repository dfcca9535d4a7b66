"""Validation after training: predict a fold's held-out cases as a user would, and score them.

Unlike the pseudo-Dice on patches that training prints every epoch, this runs the full
predictor (sliding window, Gaussian weighting, mirroring, resampling back to the original
grid) on whole images, so its numbers are the ones find-best compares. Outputs, in
``WORK/model/{configuration}/fold_{k}/validation/``: ``{case}{ending}`` (labels),
``{case}.npz`` (probabilities, float16, original grid; find-best averages them to judge
ensembles) and ``summary.json`` (from :func:`AutoSegLib.evaluation.evaluate_folders`).

Example:
    >>> validate_fold("Dataset001.autoseg", "Dataset001", "3d_fullres", 0)  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

from AutoSegLib.dataset import open_dataset
from AutoSegLib.events import Reporter
from AutoSegLib.inference.files import CaseOutputs, InputCase, PredictionError, predict_cases
from AutoSegLib.models.folder import CHECKPOINTS, ModelFolderError
from AutoSegLib.training.splits import parse_fold
from AutoSegLib.names import SUMMARY_FILE, VALIDATION_DIR  # noqa: F401 (re-exported)

STAGE = "validate"


def validation_checkpoint(fold_dir: Path) -> str:
    """``final``, or ``best`` when training stopped before its end; an error when neither exists."""
    for kind in ("final", "best"):
        if (fold_dir / CHECKPOINTS[kind]).is_file():
            return kind
    present = sorted(p.name for p in fold_dir.glob("checkpoint_*.pt")) if fold_dir.is_dir() else []
    raise ModelFolderError(f"{fold_dir}: no {CHECKPOINTS['final']} or {CHECKPOINTS['best']} to validate "
                           f"(found: {', '.join(present) or 'nothing'})")


def validate_fold(work_dir: str | Path, dataset_folder: str | Path, configuration: str, fold,
                  reporter: Reporter | None = None, device: str = "auto", tta: bool = True,
                  step: float = 0.5) -> dict:
    """Predict the validation cases of one trained fold from imagesTr, then evaluate them.

    Fold ``all`` validates on its own training cases (it only shows that training worked).

    Returns:
        The evaluation summary (what ``summary.json`` holds).

    Raises:
        ModelFolderError: no usable checkpoint; PredictionError: some cases failed.
    """
    from AutoSegLib.inference.predictor import Predictor
    from AutoSegLib.names import MODEL_DIR
    from AutoSegLib.training.setup import fold_cases

    reporter = reporter or Reporter(quiet=True)
    work_dir = Path(work_dir)
    dataset = open_dataset(dataset_folder)
    fold = parse_fold(fold)
    _, val_ids = fold_cases(work_dir, dataset.case_ids, str(fold), dataset.spec)
    model_dir = work_dir / MODEL_DIR
    fold_dir = model_dir / configuration / f"fold_{fold}"
    checkpoint = validation_checkpoint(fold_dir)
    predictor = Predictor.from_model_dir(model_dir, configuration, [fold], checkpoint, device, tta, step)
    out = fold_dir / VALIDATION_DIR
    ending = dataset.spec.file_ending
    wanted = set(val_ids)
    cases = [InputCase(c.case_id, c.images, ending) for c in dataset.cases if c.case_id in wanted]
    outputs = [CaseOutputs(out / f"{c.case_id}{ending}", out / f"{c.case_id}.npz",
                           out / f"{c.case_id}_uncertainty{ending}") for c in cases]
    reporter.log(STAGE, f"Validating {configuration} fold {fold} ({checkpoint} checkpoint) on {len(cases)} "
                        f"case(s) -> {out}")
    failures = predict_cases(predictor, cases, outputs, save_probabilities=True, reporter=reporter, stage=STAGE)
    if failures:
        raise PredictionError(f"validation of {configuration} fold {fold} failed for {len(failures)} case(s):\n  "
                              + "\n  ".join(failures))
    from AutoSegLib.evaluation import evaluate_folders

    return evaluate_folders(out, dataset.folder / "labelsTr", labels=dict(dataset.spec.labels),
                            output=out / SUMMARY_FILE, case_ids=[c.case_id for c in cases], reporter=reporter)
