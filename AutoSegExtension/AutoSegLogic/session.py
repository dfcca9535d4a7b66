"""What the module's buttons do, without Qt: one object the widget calls and polls.

A :class:`Session` owns at most one training chain and one prediction job at a time, turns
their events into training curves and, when a prediction has *succeeded*, loads its result
into the scene. The widget calls :meth:`Session.poll` from a ``QTimer`` and redraws from the
session's state; nothing here ever waits for a process.

Example (Slicer's Python console)::

    from AutoSegLogic.session import Session
    from AutoSegLogic.commands import TrainSettings
    session = Session(slicer.mrmlScene)
    session.start_training(TrainSettings(Path("D:/data/Dataset001_Liver"), preset="quick"))
    # ... later, repeatedly:
    session.poll(); print(session.training.step_text, session.training.job.progress)
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Sequence

from AutoSegLogic import commands, dataset_export, folds, results
from AutoSegLogic.curves import TrainingCurves
from AutoSegLogic.jobs import Job, JobChain, Step

PREDICTION_CASE = "case"


class Session:
    """Jobs of one module instance.

    Args:
        scene: the MRML scene results and curves go to.
        python, env: interpreter and environment for the engine processes (see :class:`Job`).
        log_dir: where each job's stderr log is kept (default: a temporary folder).
    """

    def __init__(self, scene, python: str | None = None, env: dict | None = None, log_dir=None):
        self.scene, self.python, self.env = scene, python, env
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="autoseg-logs-"))
        self.training: JobChain | None = None
        self.prediction: Job | None = None
        self.prediction_result: results.Prediction | None = None
        self.curves: TrainingCurves | None = None
        self._curves_job: Job | None = None
        self._curves_seen = 0
        self._prediction_input: dict = {}
        self._counter = 0

    # -- jobs ------------------------------------------------------------------------------------
    def make_job(self, step: Step) -> Job:
        self._counter += 1
        log = self.log_dir / f"{self._counter:03d}-{step.args[0]}.log"
        return Job(step.args, python=self.python, env=self.env, log_path=log, title=step.title)

    def poll(self) -> list[dict]:
        """Advance every running job; returns the events seen. Never blocks."""
        events = []
        if self.training is not None and not self.training.finished:
            events += self.training.poll()
            self._follow_curves()
        if self.prediction is not None and not self.prediction.finished:
            events += self.prediction.poll()
            if self.prediction.finished:
                self._finish_prediction()
        return events

    @property
    def busy(self) -> bool:
        return any(j is not None and not j.finished for j in (self.training, self.prediction))

    def stop(self) -> None:
        """Cancel whatever runs (training saves a checkpoint first)."""
        for job in (self.training, self.prediction):
            if job is not None and not job.finished:
                job.cancel()

    def shutdown(self) -> None:
        """On closing Slicer: stop the engine processes (SIGTERM; they end on their own)."""
        self.stop()

    # -- training --------------------------------------------------------------------------------
    def start_training(self, settings: commands.TrainSettings) -> JobChain:
        """verify -> plan-and-preprocess -> train each fold, as one chain."""
        return self.start_steps(commands.training_steps(settings), "train")

    def start_steps(self, steps: Sequence[Step], title: str = "") -> JobChain:
        """Run engine commands one after the other as the session's training chain."""
        self._refuse_if_running(self.training, "training")
        self.training = JobChain(steps, self.make_job, title).start()
        return self.training

    def start_fine_tune(self, dataset, configuration: str, work=None, folds_: Sequence[str] | None = None,
                        device: str = "auto", epochs: int = commands.FINE_TUNE_EPOCHS,
                        iterations_per_epoch: int = commands.FINE_TUNE_ITERATIONS) -> JobChain:
        self._refuse_if_running(self.training, "training")
        self._refuse_if_running(self.training, "training")
        steps = commands.fine_tune_steps(dataset, configuration, work, folds_, epochs, iterations_per_epoch, device)
        return self.start_steps(steps, "fine-tune")

    def resume_training(self, settings: commands.TrainSettings | None = None) -> JobChain:
        """Continue this session's stopped training chain; without one, the unfinished runs of
        ``settings``' folds found on disk (e.g. after Slicer was closed during training)."""
        if self.training is not None and self.training.resumable:
            self.training = self.training.resume().start()
            return self.training
        if settings is None:
            raise ValueError("there is no stopped training to resume")
        return self.start_steps(commands.resume_steps(settings), "resume")

    def _follow_curves(self) -> None:
        """One chart per training run; a resumed run continues its run's chart."""
        if self._curves_job is not None:  # the epochs it reported up to now, even if it just ended
            for event in self._curves_job.epochs[self._curves_seen:]:
                self.curves.add_epoch(event)
            self._curves_seen = len(self._curves_job.epochs)
        job = self.training.job
        if job is None or job.command != "train" or job is self._curves_job:
            return
        if self._curves_job is None or _run_of(job) != _run_of(self._curves_job):
            self.curves = TrainingCurves(self.scene, f"AutoSeg {job.title}")
        self._curves_job, self._curves_seen = job, 0
        self._follow_curves()

    # -- prediction ------------------------------------------------------------------------------
    def start_prediction(self, volumes: Sequence, model, configuration: str | None = None,
                         folds_: Sequence[str] | None = None, tta: bool = True, device: str = "auto",
                         uncertainty: bool = True) -> Job:
        """Export the input volumes and start ``autoseg predict``; the result loads when it succeeds."""
        self._refuse_if_running(self.prediction, "prediction")
        volumes = [v for v in volumes if v is not None]
        if not volumes:
            raise ValueError("choose the input volume(s) to segment")
        folder = Path(tempfile.mkdtemp(prefix="autoseg-predict-"))
        try:
            step = commands.prediction_step(folder / "input", folder / "output", model, configuration, folds_, tta,
                                            device, uncertainty)
            dataset_export.write_prediction_input(folder / "input", volumes, PREDICTION_CASE)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        self.prediction_result = None
        self._prediction_input = {"folder": folder, "model": Path(model), "reference": volumes[0],
                                  "uncertainty": uncertainty}
        self.prediction = self.make_job(step).start()
        return self.prediction

    def _finish_prediction(self) -> None:
        info = self._prediction_input
        try:
            if self.prediction.succeeded:  # a failed run's folder is never read
                self.prediction_result = results.load_prediction(
                    self.scene, info["folder"] / "output", PREDICTION_CASE, info["model"], info["reference"],
                    uncertainty=info["uncertainty"])
        finally:
            shutil.rmtree(info["folder"], ignore_errors=True)

    # -- dataset ---------------------------------------------------------------------------------
    def add_case(self, dataset, volumes: Sequence, segmentation, channel_names: Sequence[str] | None = None,
                 ignore_unannotated: bool = False, work=None) -> tuple[dataset_export.ExportResult, dict]:
        """Export one case and place it in the existing folds; returns (export result, {case: fold}).

        Refused while training runs: its later folds would meet a case that was not preprocessed.
        """
        self._refuse_if_running(self.training, "training")
        result = dataset_export.export_cases(dataset, [dataset_export.SceneCase(list(volumes), segmentation)],
                                             self.scene, channel_names, ignore_unannotated)
        try:
            placed = folds.add_new_cases(dataset, commands.work_folder(dataset, work))
        except (ValueError, OSError) as exc:  # the case is added; the engine places it when it trains
            result.notes.append(f"the folds (splits_final.json) were not updated: {exc}")
            placed = {}
        return result, placed

    @staticmethod
    def _refuse_if_running(job, what: str) -> None:
        if job is not None and not job.finished:
            raise RuntimeError(f"{what} is still running; wait for it to finish or stop it first")


def _run_of(job: Job) -> list[str]:
    """A training run's identity: its arguments without the flags that resume or restart it."""
    return [a for a in job.args if a not in ("--resume", "--overwrite")]
