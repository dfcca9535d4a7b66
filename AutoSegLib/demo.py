"""``autoseg demo``: the whole pipeline on embedded phantom data, end to end.

Each stage is a small function that runs the real engine code and returns a one-line result
for the closing table. Stages the engine does not have yet are listed as such, never faked:
as later work lands, its stage function joins ``STAGES``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from AutoSegLib.events import Reporter
from AutoSegLib.names import CPU_CONFIGURATION, DATASET_FILE

DATASET_NAME = "Dataset001_PhantomCT"
# The demo trains the configuration planned for this machine's compute with the quick preset's
# recipe on every training case (fold "all"), for a quarter of its length: 500 iterations, a few
# minutes on a laptop CPU, enough for the CT phantoms' five large classes (held-out mean Dice
# 0.87); a user's own data gets the whole quick preset (training/schedule.py).
DEMO_CONFIGURATION = CPU_CONFIGURATION
DEMO_FOLD = "all"
DEMO_EPOCHS = 20
# Stages the demo does not run yet, with the reason shown in its table.
NOT_YET: dict[str, str] = {}


@dataclass
class DemoState:
    work: Path
    cases: int
    seed: int
    reporter: Reporter
    device: str = "auto"
    dataset: Path = field(init=False)
    results: dict = field(default_factory=dict)

    def __post_init__(self):
        self.dataset = self.work / DATASET_NAME

    @property
    def work_dir(self) -> Path:
        # The engine's work folder for this dataset (docs/architecture.md: <dataset>.autoseg beside it).
        return self.work / f"{DATASET_NAME}.autoseg"


def stage_make_phantoms(state: DemoState) -> str:
    from AutoSegLib.synthetic import make_phantom_dataset

    if (state.dataset / DATASET_FILE).is_file():
        return f"reused {state.dataset}"
    make_phantom_dataset(state.dataset, kind="ct", cases=state.cases, seed=state.seed,
                         test_cases=max(2, state.cases // 4), reporter=state.reporter)
    return f"{state.cases} training + {max(2, state.cases // 4)} test CT cases in {state.dataset}"


def stage_verify(state: DemoState) -> str:
    from AutoSegLib.verify import verify_dataset

    report = verify_dataset(state.dataset, num_processes=2, reporter=state.reporter)
    if not report.ok:
        raise RuntimeError("verification failed:\n" + report.format())
    return f"{len(report.errors)} errors, {len(report.warnings)} warnings"


def stage_plan(state: DemoState) -> str:
    from AutoSegLib.plan_dataset import plan_dataset

    plans = plan_dataset(state.dataset, state.work_dir, num_processes=2, reporter=state.reporter)
    parts = []
    for name, config in plans.to_dict()["configurations"].items():
        patch = "x".join(str(s) for s in config["patch_size"])
        parts.append(f"{name} patch {patch} batch {config['batch_size']}")
    return "; ".join(parts)


def stage_preprocess(state: DemoState) -> str:
    from AutoSegLib.preprocessing.runner import preprocess_dataset

    summary = preprocess_dataset(state.dataset, state.work_dir, num_processes=2, reporter=state.reporter)
    parts = []
    for name, counts in summary.items():
        if "shared_with" in counts:
            parts.append(f"{name} shares {counts['shared_with']}")
        else:
            parts.append(f"{name}: {counts['processed']} new, {counts['skipped']} current")
    return "; ".join(parts)


def stage_train(state: DemoState) -> str:
    from AutoSegLib.training.setup import TrainOptions, setup_run
    from AutoSegLib.training.trainer import Trainer

    options = TrainOptions(configuration=DEMO_CONFIGURATION, fold=DEMO_FOLD, preset="quick", epochs=DEMO_EPOCHS,
                           overwrite=True, device=state.device)
    run = setup_run(state.dataset, state.work_dir, options)
    with run.lock:  # the fold folder's, given back when training ends (later stages only read it)
        state.reporter.log("train", f"Training {DEMO_CONFIGURATION} on {len(run.train_cases)} cases, quick preset "
                                    f"shortened for the demo ({run.schedule.epochs} epochs x "
                                    f"{run.schedule.iterations_per_epoch} iterations)")
        for note in run.notes:
            state.reporter.log("train", note)
        trainer = Trainer(run, state.reporter)
        result = trainer.fit()
    state.results["model"] = run.model_folder
    last = trainer.records[-1]
    state.results["pseudo_dice"] = last["pseudo_dice"]
    state.results["mean_pseudo_dice"] = last["mean_pseudo_dice"]
    return (f"{result['epochs']} epochs, pseudo-Dice of the last epoch {last['mean_pseudo_dice']:.3f} "
            f"(moving average {result['ema_pseudo_dice']:.3f}); model in {run.model_folder}")


def stage_predict(state: DemoState) -> str:
    from AutoSegLib.inference.files import predict_files

    out = state.work / "predictions"
    predict_files(state.dataset / "imagesTs", out, state.results["model"], configuration=DEMO_CONFIGURATION,
                  folds=[DEMO_FOLD], device=state.device, uncertainty=True, reporter=state.reporter)
    state.results["predictions"] = out
    n = len(list((state.dataset / "labelsTs").glob("*.nii.gz")))
    return f"{n} held-out case(s) -> {out} (labels + uncertainty maps, original geometry)"


def stage_evaluate(state: DemoState) -> str:
    from AutoSegLib.dataset import load_spec
    from AutoSegLib.evaluation import evaluate_folders
    from AutoSegLib.evaluation.summary import never_predicted_warnings

    spec = load_spec(state.dataset)
    summary = evaluate_folders(state.results["predictions"], state.dataset / "labelsTs", labels=dict(spec.labels),
                               output=state.work / "predictions" / "summary.json", reporter=state.reporter)
    for message in never_predicted_warnings(summary):
        state.reporter.warning("evaluate", message)
    dice = {name: metrics.get("Dice") for name, metrics in summary["mean"].items()}
    state.results["dice"] = dice
    state.results["mean_dice"] = summary["foreground_mean"].get("Dice")
    parts = [f"{name} {value:.2f}" if value is not None else f"{name} -" for name, value in dice.items()]
    mean = summary["foreground_mean"].get("Dice")
    return f"Dice on held-out cases: {', '.join(parts)}; mean {mean:.3f}" if mean is not None else ", ".join(parts)


STAGES: list[tuple[str, Callable[[DemoState], str]]] = [
    ("make-phantoms", stage_make_phantoms),
    ("verify", stage_verify),
    ("plan", stage_plan),
    ("preprocess", stage_preprocess),
    ("train", stage_train),
    ("predict", stage_predict),
    ("evaluate", stage_evaluate),
]


def run_demo(work: str | Path, reporter: Reporter | None = None, cases: int = 12, seed: int = 0,
             device: str = "auto") -> dict:
    """Run every stage that exists on a phantom CT dataset in ``work`` and print a result table."""
    from AutoSegLib.locks import lock_folder

    reporter = reporter or Reporter()
    state = DemoState(Path(work).resolve(), cases, seed, reporter, device)
    # One demo per folder; its stages lock their own folders too (re-entrant in this process).
    with lock_folder(state.work, "running the demo in this folder"):
        return _run_stages(state, reporter)


def _run_stages(state: DemoState, reporter: Reporter) -> dict:
    reporter.start("demo", of=len(STAGES))
    rows = []
    for index, (name, run) in enumerate(STAGES, start=1):
        reporter.log("demo", f"[{index}/{len(STAGES)}] {name}")
        started = time.monotonic()
        summary = run(state)
        seconds = time.monotonic() - started
        rows.append((name, "done", f"{seconds:.1f}", summary))
        reporter.emit("progress", "demo", done=index, of=len(STAGES), substage=name, summary=summary)
    rows += [(name, "not yet available", "-", why) for name, why in NOT_YET.items()]
    reporter.log("demo", format_table(rows))
    figures = {k: v for k, v in state.results.items() if k in ("pseudo_dice", "mean_pseudo_dice", "dice", "mean_dice")}
    reporter.done("demo", work=str(state.work), stages={r[0]: r[1] for r in rows}, **figures)
    return {r[0]: {"status": r[1], "seconds": r[2], "summary": r[3]} for r in rows}


def format_table(rows: list[tuple[str, str, str, str]]) -> str:
    header = ("stage", "status", "seconds", "result")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(3)]
    lines = ["", "AutoSeg demo results", "-" * 20]
    for row in [header, *rows]:
        lines.append("  ".join(str(v).ljust(w) for v, w in zip(row[:3], widths)) + "  " + str(row[3]))
    return "\n".join(lines)
