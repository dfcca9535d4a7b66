"""What the module's buttons do, without Qt: one object the widget calls and polls.

A :class:`Session` owns at most one training chain, one prediction and one dataset change
(adding cases, installing packages) at a time, turns their events into training curves and,
when a prediction has *succeeded*, loads its result into the scene. The widget calls
:meth:`Session.poll` from a ``QTimer`` and redraws from the session's state; nothing here
ever waits for a process.

What takes long never runs on the caller's (GUI) thread: a prediction is a chain of writing
the input files (worker thread), ``autoseg predict`` (engine process), reading the result
(worker thread); only building the nodes happens in :meth:`poll`. Adding a case reads the
nodes on the caller's thread (MRML is not thread-safe) and writes its files in a worker.

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

from AutoSegLogic import commands, corrections, dataset_export, dependencies, folds, results
from AutoSegLogic.curves import TrainingCurves
from AutoSegLogic.jobs import Job, JobChain, Step, ThreadJob

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
        self.prediction: JobChain | None = None
        self.prediction_result: results.Prediction | None = None
        self.prediction_choice = None  # the engine's choice of configuration and folds (modelchoice)
        self.dataset_job: ThreadJob | Job | None = None  # adding a case, or installing packages
        self.model_job: Job | None = None  # importing a model zip into the models folder
        self.imported = None  # the library entry of the last model imported
        self.import_error = ""  # why the last import's folder could not be registered
        self._import: tuple | None = None  # (library, name, archive) of the running import
        self.added: tuple | None = None  # (export result, {case: fold}) of the last case added
        self.curves: TrainingCurves | None = None
        self.correction: corrections.CorrectionSession | None = None  # "Correct with clicks", while open
        self._curves_job: Job | None = None
        self._curves_seen = 0
        self._prediction_input: dict = {}
        self._counter = 0

    # -- jobs ------------------------------------------------------------------------------------
    def make_job(self, step: Step) -> Job | ThreadJob:
        if step.work is not None:
            return ThreadJob(step.work, step.title, step.args)
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
        if self.dataset_job is not None and not self.dataset_job.finished:
            events += self.dataset_job.poll()
        if self.model_job is not None and not self.model_job.finished:
            events += self.model_job.poll()
            if self.model_job.finished:
                self._finish_import()
        if self.correction is not None:
            self.correction.poll()
        return events

    @property
    def busy(self) -> bool:
        return any(j is not None and not j.finished
                   for j in (self.training, self.prediction, self.dataset_job, self.model_job))

    def stop(self) -> None:
        """Cancel whatever runs (training saves a checkpoint first)."""
        for job in (self.training, self.prediction, self.dataset_job, self.model_job):
            if job is not None and not job.finished:
                job.cancel()

    def shutdown(self) -> None:
        """On closing Slicer: stop the engine processes (SIGTERM; they end on their own)."""
        self.stop()
        self.stop_correcting()

    # -- training --------------------------------------------------------------------------------
    def start_training(self, settings: commands.TrainSettings) -> JobChain:
        """verify -> plan-and-preprocess -> train each fold, as one chain."""
        return self.start_steps(commands.training_steps(settings), "train")

    def start_steps(self, steps: Sequence[Step], title: str = "") -> JobChain:
        """Run engine commands one after the other as the session's training chain."""
        self._refuse_if_running(self.training, "training")
        self._refuse_if_running(self.dataset_job, "writing to the dataset")
        self.training = JobChain(steps, self.make_job, title).start()
        return self.training

    def start_fine_tune(self, dataset, configuration: str, work=None, folds_: Sequence[str] | None = None,
                        device: str = "auto", epochs: int = commands.FINE_TUNE_EPOCHS,
                        iterations_per_epoch: int = commands.FINE_TUNE_ITERATIONS) -> JobChain:
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
                         uncertainty: bool = True, result_name: str | None = None) -> JobChain:
        """Segment ``volumes`` (one per channel) with ``model``; the result loads when it succeeds.

        ``result_name`` names the segmentation (default: "<first volume> AutoSeg").

        Without a ``configuration`` (or with ``auto``) the engine's rule decides (the model's
        inference plan, else its only trained configuration); the choice is made here first, so
        a model that cannot predict is refused before any process starts
        (:attr:`prediction_choice` says what it will use).

        Returns a chain (write the input, ``autoseg predict``, read the result); this call only
        copies the voxels out of the scene.
        """
        self._refuse_if_running(self.prediction, "prediction")
        volumes = [v for v in volumes if v is not None]
        if not volumes:
            raise ValueError("choose the input volume(s) to segment")
        configuration = None if configuration in (None, "", commands.AUTO) else configuration
        choice = commands.predict_choice(model, configuration, folds_)
        folder = Path(tempfile.mkdtemp(prefix="autoseg-predict-"))
        try:
            step = commands.prediction_step(folder / "input", folder / "output", model, configuration, folds_, tta,
                                            device, uncertainty)
            channels = dataset_export.prediction_input(volumes, PREDICTION_CASE)  # voxels copied (GUI thread)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        self.prediction_result, self.prediction_choice = None, choice
        self._prediction_input = {"folder": folder, "model": Path(model), "reference": volumes[0],
                                  "uncertainty": uncertainty, "name": result_name, "volumes": list(volumes),
                                  "device": device}
        step.weight = 20.0  # the engine's work; writing and reading are a few seconds each

        def write(job):
            dataset_export.write_prediction_channels(folder / "input", channels, job)

        def read(job):
            return results.read_outputs(folder / "output", PREDICTION_CASE, model, uncertainty)

        steps = [Step(["write-input"], "write the input files", write), step,
                 Step(["read-result"], "read the result", read)]
        self.prediction = JobChain(steps, self.make_job, "predict").start()
        return self.prediction

    def _finish_prediction(self) -> None:
        info = self._prediction_input
        try:
            if self.prediction.succeeded:  # a failed run's folder is never read
                outputs = self.prediction.job.result
                self.prediction_result = results.outputs_into_scene(self.scene, outputs, info["reference"],
                                                                    info.get("name"))
        finally:
            shutil.rmtree(info["folder"], ignore_errors=True)

    # -- correcting with clicks ------------------------------------------------------------------
    def start_correcting(self, segmentation, volumes: Sequence | None = None, model=None,
                         configuration: str | None = None, folds_: Sequence[str] | None = None,
                         device: str | None = None, before_change=None) -> corrections.CorrectionSession:
        """Open "Correct with clicks" on ``segmentation`` (closing any open one).

        Without ``volumes``/``model``: those of the prediction that made ``segmentation`` in this
        session (its configuration and folds too), so a result of "Use a model" is corrected with
        that model. The engine starts in the background; :meth:`poll` advances it.
        ``before_change``: see :class:`~AutoSegLogic.corrections.CorrectionSession`.

        Raises:
            ValueError: nothing to correct with (no volumes or model), or the segmentation cannot
                be edited voxel for voxel on the volume's grid.
        """
        made_here = self.prediction_result is not None and self.prediction_result.segmentation is segmentation
        info = self._prediction_input if made_here else {}
        volumes = volumes or info.get("volumes")
        model = model or info.get("model")
        if model is None:
            raise ValueError("choose the model folder the segmentation was predicted with")
        note = ""
        choice = self.prediction_choice if made_here else None
        if choice is not None and configuration in (None, "", commands.AUTO):
            configuration = choice.configurations[0]  # a refine runs one configuration
            folds_ = folds_ or (list(choice.folds) if choice.folds else None)
            if len(choice.configurations) > 1:
                note = (f"The prediction averaged {' + '.join(choice.configurations)}; clicks are answered by "
                        f"{configuration} alone")
        configuration = None if configuration in (None, "", commands.AUTO) else configuration
        device = device or info.get("device") or "auto"
        self.stop_correcting()
        self.correction = corrections.CorrectionSession(self.scene, segmentation, volumes or [], model, configuration,
                                                        folds_, device, python=self.python, env=self.env,
                                                        before_change=before_change)
        if note:
            self.correction.messages.append(note)
        return self.correction

    def stop_correcting(self) -> None:
        """Done: stop the correction engine (the segmentation keeps every applied click)."""
        if self.correction is not None:
            self.correction.close()
            self.correction = None

    # -- models ----------------------------------------------------------------------------------
    def start_import_model(self, library, archive, name: str | None = None) -> Job:
        """``autoseg import-model`` of ``archive`` into ``library``'s folder, in a background process.

        When it succeeds, :meth:`poll` registers the model (:attr:`imported`); when it fails, the
        job's ``failure`` is the engine's one-line refusal and nothing is left in the folder.
        """
        self._refuse_if_running(self.model_job, "importing a model")
        step, name = library.import_step(archive, name)
        self.imported, self.import_error, self._import = None, "", (library, name, archive)
        self.model_job = self.make_job(step).start()
        return self.model_job

    def _finish_import(self) -> None:
        library, name, archive = self._import
        if self.model_job.succeeded:
            try:
                self.imported = library.finish_import(name, archive)
            except (ValueError, OSError) as exc:
                self.import_error = str(exc)
        else:
            library.discard_import(name)

    # -- dataset ---------------------------------------------------------------------------------
    def add_case(self, dataset, volumes: Sequence, segmentation, channel_names: Sequence[str] | None = None,
                 ignore_unannotated: bool = False, work=None,
                 terminology: dict | None = None) -> tuple[dataset_export.ExportResult, dict]:
        """Export one case and place it in the existing folds, in this thread (batch scripts, tests).

        The module uses :meth:`start_add_case`, which writes in a worker and returns at once.
        """
        self._refuse_if_running(self.training, "training")
        self._refuse_if_running(self.dataset_job, "writing to the dataset")
        prepared = dataset_export.prepare_export(dataset, [dataset_export.SceneCase(list(volumes), segmentation)],
                                                 self.scene, channel_names, ignore_unannotated, terminology)
        return _write_and_place(prepared, dataset, commands.work_folder(dataset, work))

    def start_add_case(self, dataset, volumes: Sequence, segmentation, channel_names: Sequence[str] | None = None,
                       ignore_unannotated: bool = False, work=None, terminology: dict | None = None) -> ThreadJob:
        """Check the case and copy it out of the scene now; write its files and folds in a worker.

        The job's ``result`` is (export result, {case: fold}). Refused while training runs (its
        later folds would meet a case that was not preprocessed) or another case is being written.

        Raises:
            dataset_export.ExportError: the case cannot be added (nothing is written).
        """
        self._refuse_if_running(self.training, "training")
        self._refuse_if_running(self.dataset_job, "writing to the dataset")
        prepared = dataset_export.prepare_export(dataset, [dataset_export.SceneCase(list(volumes), segmentation)],
                                                 self.scene, channel_names, ignore_unannotated, terminology)
        work_folder = commands.work_folder(dataset, work)

        def write(job):
            return _write_and_place(prepared, dataset, work_folder, job)

        self.dataset_job = ThreadJob(write, f"add case {prepared.items[0].case_id}", ["add-case"]).start()
        return self.dataset_job

    def remove_case(self, dataset, case_id: str) -> list[Path]:
        """Delete a case's files; refused while training reads the dataset or a case is being written."""
        self._refuse_if_running(self.training, "training")
        self._refuse_if_running(self.dataset_job, "writing to the dataset")
        return dataset_export.remove_case(dataset, case_id)

    # -- packages --------------------------------------------------------------------------------
    def start_install(self, requirements: Sequence[dependencies.Requirement]) -> Job:
        """``pip install`` the given packages in a background process (torch excluded: the PyTorch
        extension installs it)."""
        self._refuse_if_running(self.dataset_job, "another background task")
        self._refuse_if_running(self.training, "training")
        step = dependencies.install_step(requirements)
        self._counter += 1
        self.dataset_job = Job(step.args, python=self.python, env=self.env, title=step.title, module="pip",
                               events_protocol=False, log_path=self.log_dir / f"{self._counter:03d}-pip.log").start()
        return self.dataset_job

    @staticmethod
    def _refuse_if_running(job, what: str) -> None:
        if job is not None and not job.finished:
            raise RuntimeError(f"{what} is still running; wait for it to finish or stop it first")


def _write_and_place(prepared, dataset, work_folder, job=None) -> tuple[dataset_export.ExportResult, dict]:
    result = dataset_export.write_export(prepared, job)
    try:
        placed = folds.add_new_cases(dataset, work_folder)
    except (ValueError, OSError) as exc:  # the case is added; the engine places it when it trains
        result.notes.append(f"the folds (splits_final.json) were not updated: {exc}")
        placed = {}
    return result, placed


def _run_of(job: Job) -> list[str]:
    """A training run's identity: its arguments without the flags that resume or restart it."""
    return [a for a in job.args if a not in ("--resume", "--overwrite")]
