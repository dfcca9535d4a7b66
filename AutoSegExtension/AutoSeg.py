"""AutoSeg: train, review, correct and retrain self-configuring segmentation models in 3D Slicer.

Slicer's scripted-module layout: the module class (title, help, acknowledgement), the widget
(GUI only), the logic (what must also run in batch), and the self-test. The work itself lives
in the ``AutoSegLogic`` package beside this file (no Qt; tested with pytest outside Slicer) and
in the engine, ``AutoSegLib``, which always runs in a separate process.
"""

import os
import pathlib
import shutil
import sys
import unittest
from typing import Annotated, Optional, Union

import qt
import slicer
from slicer import vtkMRMLLabelMapVolumeNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.util import VTKObservationMixin


def _findEngine():
    """Make ``import AutoSegLib`` work from a source checkout (the built extension bundles it)."""
    try:
        import AutoSegLib  # noqa: F401
    except ImportError:
        repository = pathlib.Path(__file__).resolve().parent.parent
        if (repository / "AutoSegLib" / "__init__.py").is_file():
            sys.path.insert(0, str(repository))


_findEngine()

from AutoSegLib.names import ARCHITECTURES, DEFAULT_ARCHITECTURE, DEFAULT_PRESET, PRESETS  # noqa: E402
from AutoSegLogic import commands, corrections, dataset_export, dependencies, quality  # noqa: E402
from AutoSegLogic.device import DeviceProbe  # noqa: E402
from AutoSegLogic.library import ModelLibrary  # noqa: E402
from AutoSegLogic.session import Session  # noqa: E402

POLL_INTERVAL_MS = 500
CORRECTION_POLL_MS = 200  # while correcting with clicks: a placed point is noticed within 0.2 s
MAX_CHANNELS = 4  # channel pickers in the GUI; the Python API takes any number


#
# AutoSeg
#
class AutoSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "AutoSeg"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["AutoSeg developers"]
        self.parent.helpText = """
Train a segmentation model on your own cases, segment new images with it, correct the results
in the Segment Editor and feed the corrections back.
<ol>
<li><b>Dataset</b>: choose a dataset folder and the channel names (e.g. CT), pick a volume and
its segmentation, <i>Add case</i>; repeat for every annotated case.</li>
<li><b>Train</b>: choose configuration and schedule, <i>Start training</i>. The model plans its
own pipeline from the data (the nnU-Net method). Training runs in the background; <i>Stop</i>
saves it, <i>Resume</i> continues.</li>
<li><b>Predict and review</b>: pick the input volume(s), <i>Predict</i>, correct the result in the
Segment Editor, <i>Add to training set</i>, then <i>Fine-tune</i>.</li>
<li><b>Correct with clicks</b> (after Predict): <i>Correct with clicks</i>, pick the segment, then
<i>+ Positive</i> (green: "this is the segment") or <i>- Negative</i> (red: "this is not") and
click in any view; the model re-predicts the area around the points within seconds, changing only
that segment. <i>Undo click</i> takes the last one back; Segment Editor tools stay available.
<i>Done</i> stops the engine; <i>Add to training set</i> as usual.</li>
<li><b>Use a model</b>: add a model zip (from <tt>autoseg export-model</tt>), an AutoSeg model folder or an
nnU-Net v2 model folder, read its model card, pick the volume of each channel, <i>Apply</i>.</li>
</ol>
"""
        self.parent.helpText += self.getDefaultModuleDocumentationLink()
        self.parent.acknowledgementText = """
AutoSeg implements the method of nnU-Net: F. Isensee, P. F. Jaeger, S. A. A. Kohl, J. Petersen,
K. H. Maier-Hein. <i>nnU-Net: a self-configuring method for deep learning-based biomedical image
segmentation</i>. Nature Methods 18, 203-211 (2021). Cite it when you publish results obtained
with AutoSeg.
"""


#
# Parameter node
#
@parameterNodeWrapper
class AutoSegParameterNode:
    """The module's settings, saved with the scene."""

    datasetFolder: pathlib.Path
    channelNames: str = "CT"
    caseVolume0: vtkMRMLScalarVolumeNode
    caseVolume1: vtkMRMLScalarVolumeNode
    caseVolume2: vtkMRMLScalarVolumeNode
    caseVolume3: vtkMRMLScalarVolumeNode
    caseSegmentation: Union[vtkMRMLSegmentationNode, vtkMRMLLabelMapVolumeNode]
    ignoreUnannotated: bool = False
    workFolder: pathlib.Path
    configuration: Annotated[str, Choice(list(commands.TRAIN_CHOICES))] = commands.AUTO
    preset: Annotated[str, Choice(list(PRESETS))] = DEFAULT_PRESET
    timeBudgetMinutes: Annotated[float, WithinRange(0, 100000)] = 0.0
    folds: str = "0"
    device: Annotated[str, Choice(list(commands.DEVICES))] = "auto"
    architecture: Annotated[str, Choice(list(ARCHITECTURES))] = DEFAULT_ARCHITECTURE
    modelFolder: pathlib.Path
    inputVolume0: vtkMRMLScalarVolumeNode
    inputVolume1: vtkMRMLScalarVolumeNode
    inputVolume2: vtkMRMLScalarVolumeNode
    inputVolume3: vtkMRMLScalarVolumeNode
    predictConfiguration: Annotated[str, Choice(list(commands.PREDICT_CHOICES))] = commands.AUTO
    predictFolds: str = ""
    testTimeAugmentation: bool = True
    uncertainty: bool = True
    reviewSegmentation: vtkMRMLSegmentationNode
    useVolume0: vtkMRMLScalarVolumeNode
    useVolume1: vtkMRMLScalarVolumeNode
    useVolume2: vtkMRMLScalarVolumeNode
    useVolume3: vtkMRMLScalarVolumeNode


def _path(value) -> Optional[pathlib.Path]:
    """A path parameter, or None when unset (the wrapper's default is '.')."""
    text = str(value or "").strip()
    return None if text in ("", ".") else pathlib.Path(text)


#
# AutoSegWidget
#
class AutoSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI only: reads the parameter node, calls the logic, shows its state. Never waits."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._shownChart = None
        self._reportedTask = None
        self._shownDevice = None
        self._lastCorrectionMessage = ""

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/AutoSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = AutoSegLogic()

        self.timer = qt.QTimer()
        self.timer.setInterval(POLL_INTERVAL_MS)
        self.timer.connect("timeout()", self.onTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.addCaseButton.connect("clicked(bool)", self.onAddCase)
        self.ui.removeCaseButton.connect("clicked(bool)", self.onRemoveCase)
        self.ui.openDatasetFolderButton.connect("clicked(bool)", self.onOpenDatasetFolder)
        self.ui.datasetFolderPathLineEdit.connect("currentPathChanged(QString)", self.refreshCases)
        self.ui.channelNamesLineEdit.connect("textChanged(QString)", self.updateChannelPickers)
        self.ui.trainButton.connect("clicked(bool)", self.onTrainButton)
        self.ui.resumeButton.connect("clicked(bool)", self.onResume)
        self.ui.predictButton.connect("clicked(bool)", self.onPredictButton)
        self.ui.addToTrainingSetButton.connect("clicked(bool)", self.onAddToTrainingSet)
        self.ui.fineTuneButton.connect("clicked(bool)", self.onFineTune)
        self.ui.configurationComboBox.connect("currentIndexChanged(int)", self.updateConfigurationInfo)
        self.ui.workFolderPathLineEdit.connect("currentPathChanged(QString)", self.updateConfigurationInfo)
        self.ui.libraryModelComboBox.connect("currentIndexChanged(int)", self.showModelCard)
        self.ui.addModelZipButton.connect("clicked(bool)", self.onAddModelZip)
        self.ui.addModelFolderButton.connect("clicked(bool)", self.onAddModelFolder)
        self.ui.removeModelButton.connect("clicked(bool)", self.onRemoveModel)
        self.ui.applyModelButton.connect("clicked(bool)", self.onApplyModel)
        self.ui.correctButton.connect("clicked(bool)", self.onCorrectButton)
        self.ui.correctSegmentComboBox.connect("currentIndexChanged(int)", self.onCorrectSegmentChanged)
        self.ui.positiveClickButton.connect("clicked(bool)", lambda checked: self.onPlaceClicks(True, checked))
        self.ui.negativeClickButton.connect("clicked(bool)", lambda checked: self.onPlaceClicks(False, checked))
        self.ui.undoClickButton.connect("clicked(bool)", self.onUndoClick)

        self.logic.startDeviceProbe()
        self.initializeParameterNode()
        self.updateChannelPickers()
        self.refreshCases()
        self.updateConfigurationInfo()
        self.refreshModels()
        self.startPolling()  # until the device probe has answered

    def cleanup(self) -> None:
        self.timer.stop()
        if self.logic is not None:
            self.logic.session.shutdown()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)
        if self.logic is not None and self.logic.session.correction is not None:
            self.stopCorrecting()

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.caseVolume0:
            self._parameterNode.caseVolume0 = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)

    # -- messages ------------------------------------------------------------------------------
    def say(self, text: str) -> None:
        self.ui.messagesTextEdit.appendPlainText(text)

    def failed(self, what: str, error: Exception) -> None:
        self.say(f"{what}: {error}")
        slicer.util.errorDisplay(f"{what}:\n{error}")

    # -- dataset -------------------------------------------------------------------------------
    def channelNames(self) -> list:
        return [n.strip() for n in self._parameterNode.channelNames.split(",") if n.strip()]

    def updateChannelPickers(self, *unused) -> None:
        count = max(1, len(self.channelNames())) if self._parameterNode else 1
        for c in range(1, MAX_CHANNELS):
            for prefix in ("caseChannel", "inputChannel"):
                for name in (f"{prefix}{c}Selector", f"{prefix}{c}SelectorLabel"):
                    getattr(self.ui, name).setVisible(c < count)

    def caseVolumes(self) -> list:
        return [getattr(self._parameterNode, f"caseVolume{c}") for c in range(max(1, len(self.channelNames())))]

    def inputVolumes(self) -> list:
        return [getattr(self._parameterNode, f"inputVolume{c}") for c in range(max(1, len(self.channelNames())))]

    def datasetFolder(self) -> pathlib.Path:
        folder = _path(self._parameterNode.datasetFolder)
        if folder is None:
            raise ValueError("choose a dataset folder first")
        return folder

    def refreshCases(self, path=None) -> None:
        """Show the dataset's cases; ``path`` is the new folder when called on its change."""
        table = self.ui.casesTableWidget
        table.clear()
        table.setColumnCount(3)
        table.setHorizontalHeaderLabels(["case", "channels", "label"])
        if path is not None:
            folder = _path(path)
        else:
            folder = _path(self._parameterNode.datasetFolder) if self._parameterNode else None
        try:
            cases = dataset_export.list_cases(folder) if folder else []
            names = dataset_export.channel_names(folder) if folder else None
            if names and names != self.channelNames():
                self._parameterNode.channelNames = ",".join(names)  # an existing dataset decides its channels
        except ValueError as error:
            self.say(str(error))
            cases = []
        table.setRowCount(len(cases))
        for row, case in enumerate(cases):
            for column, text in enumerate([case.case_id, str(case.channels), "yes" if case.has_label else "missing"]):
                table.setItem(row, column, qt.QTableWidgetItem(text))

    def onAddCase(self) -> None:
        p = self._parameterNode
        self.startAddCase(self.caseVolumes(), p.caseSegmentation, p.ignoreUnannotated, "Could not add the case")

    def startAddCase(self, volumes, segmentation, ignoreUnannotated: bool, what: str) -> None:
        """Check and copy the case now; its files are written in the background (see onTimer)."""
        try:
            job = self.logic.session.start_add_case(self.datasetFolder(), volumes, segmentation,
                                                                 self.channelNames(), ignoreUnannotated,
                                                                 _path(self._parameterNode.workFolder))
        except (ValueError, OSError, RuntimeError) as error:
            self.failed(what, error)
            return
        self.say(f"Writing {job.title}...")
        self.startPolling()

    def dependenciesReady(self) -> bool:
        ready = self.logic.ensureDependencies()
        task = self.logic.session.dataset_job
        if not ready and task is not None and task.command == "install" and not task.finished:
            self.say(f"{task.title}: running in the background (log: {task.log_path})")
            self.startPolling()
        return ready

    def reportAdded(self, result, placed) -> None:
        self.say(f"Added case(s) {', '.join(result.case_ids)} to {result.folder}")
        if result.added_labels:
            self.say(f"New label(s): {', '.join(result.added_labels)}")
        for note in result.notes:
            self.say(note)
        for case, fold in placed.items():
            self.say(f"Case {case} joins the validation set of fold {fold} (existing folds unchanged)")

    def onRemoveCase(self) -> None:
        row = self.ui.casesTableWidget.currentRow()
        if row < 0:
            return
        caseId = self.ui.casesTableWidget.item(row, 0).text()
        if not slicer.util.confirmOkCancelDisplay(f"Delete the files of case '{caseId}' from the dataset?"):
            return
        try:
            self.logic.session.remove_case(self.datasetFolder(), caseId)
        except (ValueError, OSError, RuntimeError) as error:
            self.failed("Could not remove the case", error)
        self.refreshCases()

    def onOpenDatasetFolder(self) -> None:
        folder = _path(self._parameterNode.datasetFolder)
        if folder is not None and folder.is_dir():
            qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(folder)))

    # -- training ------------------------------------------------------------------------------
    def trainSettings(self, overwrite: bool) -> "commands.TrainSettings":
        p = self._parameterNode
        configuration = commands.resolve_configuration(p.configuration, self.logic.deviceType())
        return commands.TrainSettings(dataset=self.datasetFolder(), work=_path(p.workFolder),
                                      configuration=configuration, folds=commands.parse_folds(p.folds),
                                      preset=p.preset, time_budget_min=p.timeBudgetMinutes or None,
                                      device=p.device, overwrite=overwrite, architecture=p.architecture)

    def onTrainButton(self) -> None:
        session = self.logic.session
        if session.training is not None and not session.training.finished:
            session.training.cancel()
            self.say("Stopping: the engine saves a checkpoint first (Resume continues from it)")
            return
        if not self.dependenciesReady():
            return
        try:
            settings = self.trainSettings(overwrite=False)
            model = commands.model_folder(settings.dataset, settings.work)
            trained = [f for f in settings.folds if (model / settings.configuration / f"fold_{f}").is_dir()]
            if trained:
                if not slicer.util.confirmOkCancelDisplay(
                        f"Fold(s) {', '.join(trained)} of {settings.configuration} already have a training run in "
                        f"{model}. Start over (their weights are deleted)? Cancel, then Resume, to continue them."):
                    return
                settings.overwrite = True
            chain = session.start_training(settings)
        except (ValueError, OSError, RuntimeError) as error:
            self.failed("Could not start training", error)
            return
        self.say(f"Training {settings.configuration} started ({len(chain.steps)} steps); logs in {session.log_dir}")
        self.startPolling()

    def onResume(self) -> None:
        """Continue the stopped run of this session, or else the unfinished runs found on disk."""
        session = self.logic.session
        try:
            if session.training is not None and session.training.resumable:
                session.resume_training()
            else:
                if not self.dependenciesReady():
                    return
                session.resume_training(self.trainSettings(overwrite=False))
        except (ValueError, RuntimeError, OSError) as error:
            self.failed("Could not resume", error)
            return
        self.say("Resuming training from its last checkpoint")
        self.startPolling()

    def onFineTune(self) -> None:
        if not self.dependenciesReady():
            return
        p = self._parameterNode
        try:
            configuration = commands.resolve_configuration(p.configuration, self.logic.deviceType())
            chain = self.logic.session.start_fine_tune(self.datasetFolder(), configuration, _path(p.workFolder),
                                                       device=p.device)
        except commands.EngineFeatureMissing as error:
            self.failed("Fine-tuning is not available", error)
            return
        except (ValueError, OSError, RuntimeError) as error:
            self.failed("Could not start fine-tuning", error)
            return
        self.say(f"Fine-tuning started: {', '.join(s.title for s in chain.steps)}")
        self.startPolling()

    # -- prediction ----------------------------------------------------------------------------
    def modelFolder(self) -> pathlib.Path:
        p = self._parameterNode
        model = _path(p.modelFolder)
        if model is None:
            model = commands.model_folder(self.datasetFolder(), _path(p.workFolder))
        return model

    def stopPredictionOrReady(self) -> bool:
        """The Predict and Apply buttons read Stop while a prediction runs: cancel it and say
        False; otherwise True when the engine's packages are ready to start one."""
        prediction = self.logic.session.prediction
        if prediction is not None and not prediction.finished:
            prediction.cancel()
            return False
        return self.dependenciesReady()

    def onPredictButton(self) -> None:
        session = self.logic.session
        if not self.stopPredictionOrReady():
            return
        p = self._parameterNode
        try:
            folds = commands.parse_folds(p.predictFolds) if p.predictFolds.strip() else None
            session.start_prediction(self.inputVolumes(), self.modelFolder(), p.predictConfiguration, folds,
                                     p.testTimeAugmentation, p.device, p.uncertainty)
        except (ValueError, OSError, RuntimeError) as error:
            self.failed("Could not start the prediction", error)
            return
        self.say(f"Prediction started: {session.prediction_choice.describe()}")
        self.startPolling()

    # -- use a model ---------------------------------------------------------------------------
    def refreshModels(self, select: str = "") -> None:
        """The models of the user's models folder in the picker (``select``: the one to show)."""
        combo = self.ui.libraryModelComboBox
        try:
            names = self.logic.library.names()
        except (ValueError, OSError) as error:
            self.say(f"Models folder: {error}")
            names = []
        current = select or combo.currentText
        combo.blockSignals(True)
        combo.clear()
        for name in names:
            combo.addItem(name)
        combo.setCurrentIndex(max(0, combo.findText(current)))
        combo.blockSignals(False)
        self.showModelCard()

    def showModelCard(self, *unused) -> None:
        """The chosen model's card, one volume picker per channel (labelled with its modality)."""
        name = self.ui.libraryModelComboBox.currentText
        card, text = None, f"Add a model: a zip made by 'autoseg export-model', an AutoSeg model folder or an " \
                           f"nnU-Net v2 model folder. Models are kept in {self.logic.modelsFolder()}."
        if name:
            try:
                card = self.logic.library.card(name)
                text = card.text()
            except (ValueError, OSError) as error:
                text = f"{name}: {error}"
        self.ui.modelCardTextEdit.setPlainText(text)
        channels = card.channels if card else ["image"]
        for c in range(MAX_CHANNELS):
            for suffix in ("Selector", "SelectorLabel"):
                getattr(self.ui, f"useChannel{c}{suffix}").setVisible(c < len(channels))
            if c < len(channels):
                getattr(self.ui, f"useChannel{c}SelectorLabel").text = f"{card.modality(c) if card else 'Volume'}:"
        configurations = self.ui.useModelConfigurationComboBox
        configurations.clear()
        for item in [commands.AUTO, *(card.configurations if card else [])]:
            configurations.addItem(item)
        self.ui.applyModelButton.enabled = card is not None and len(channels) <= MAX_CHANNELS
        if card is not None and len(channels) > MAX_CHANNELS:
            self.say(f"{name} has {len(channels)} channels; the panel has {MAX_CHANNELS} pickers: use the Python "
                     "console (logic.library.start_prediction)")

    def onAddModelZip(self) -> None:
        path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), "Add a model zip", "",
                                              "AutoSeg model zip (*.zip)")
        if not path:
            return
        try:
            self.logic.session.start_import_model(self.logic.library, path)
        except (ValueError, OSError, RuntimeError) as error:
            self.failed("Could not import the model", error)
            return
        self.say(f"Importing {path}: the engine checks every file before keeping it...")
        self.startPolling()

    def onAddModelFolder(self) -> None:
        path = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(),
                                                   "Add a model folder (AutoSeg or nnU-Net v2)")
        if not path:
            return
        try:
            entry = self.logic.library.register_folder(path)
        except (ValueError, OSError) as error:
            self.failed("Could not add the model folder", error)
            return
        self.say(f"Added model '{entry.name}' ({entry.path}; used where it is, not copied)")
        self.refreshModels(select=entry.name)

    def onRemoveModel(self) -> None:
        name = self.ui.libraryModelComboBox.currentText
        if not name or not slicer.util.confirmOkCancelDisplay(
                f"Remove the model '{name}' from the list? (An imported zip's folder is deleted; a registered "
                "folder stays where it is.)"):
            return
        try:
            self.logic.library.remove(name)
        except (ValueError, OSError) as error:
            self.failed("Could not remove the model", error)
        self.refreshModels()

    def onApplyModel(self) -> None:
        session = self.logic.session
        if not self.stopPredictionOrReady():
            return
        p = self._parameterNode
        name = self.ui.libraryModelComboBox.currentText
        try:
            channels = len(self.logic.library.card(name).channels)
            volumes = [getattr(p, f"useVolume{c}") for c in range(min(channels, MAX_CHANNELS))]
            configuration = self.ui.useModelConfigurationComboBox.currentText
            self.logic.library.start_prediction(session, name, volumes, configuration, p.testTimeAugmentation,
                                                p.device, p.uncertainty)
        except (ValueError, OSError, RuntimeError) as error:
            self.failed("Could not apply the model", error)
            return
        self.say(f"Applying '{name}': {session.prediction_choice.describe()}")
        self.startPolling()

    def onModelImportFinished(self) -> None:
        session = self.logic.session
        if session.imported is not None:
            self.say(f"Imported model '{session.imported.name}' into {self.logic.modelsFolder()}")
            self.refreshModels(select=session.imported.name)
        else:
            self.failed("The model was not imported", session.model_job.failure or session.import_error)

    def onAddToTrainingSet(self) -> None:
        self.startAddCase(self.inputVolumes(), self._parameterNode.reviewSegmentation, False,
                          "Could not add the reviewed case")

    # -- correct with clicks -------------------------------------------------------------------
    def onCorrectButton(self) -> None:
        """Correct with clicks / Done."""
        session = self.logic.session
        if session.correction is not None:
            self.stopCorrecting()
            return
        if not self.dependenciesReady():
            return
        p = self._parameterNode
        segmentation = p.reviewSegmentation
        try:
            if segmentation is None:
                raise ValueError("choose the reviewed segmentation first (Predict makes one)")
            madeHere = session.prediction_result is not None and session.prediction_result.segmentation is segmentation
            folds = commands.parse_folds(p.predictFolds) if p.predictFolds.strip() else None
            correction = session.start_correcting(
                segmentation, None if madeHere else self.inputVolumes(), None if madeHere else self.modelFolder(),
                None if madeHere else p.predictConfiguration, None if madeHere else folds, p.device,
                before_change=self.saveEditorUndoState)
        except (ValueError, OSError, RuntimeError) as error:
            self.failed("Could not start correcting with clicks", error)
            return
        combo = self.ui.correctSegmentComboBox
        combo.blockSignals(True)
        combo.clear()
        for segmentId, name in correction.segment_choices():
            combo.addItem(name, segmentId)
        combo.blockSignals(False)
        self.onCorrectSegmentChanged()
        self._lastCorrectionMessage = ""
        self.say(f"Correct with clicks: starting the engine for {correction.model} (the first start loads the model)")
        self.timer.setInterval(CORRECTION_POLL_MS)
        self.startPolling()

    def saveEditorUndoState(self) -> None:
        """Before a click changes the segmentation: the Segment Editor's undo state, so its Undo button
        takes the click back too (when the editor shows this segmentation)."""
        correction = self.logic.session.correction
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        if correction is not None and editor.segmentationNode() is correction.segmentation:
            editor.saveStateForUndo()

    def stopCorrecting(self) -> None:
        self.stopPlacing()
        self.logic.session.stop_correcting()
        self.timer.setInterval(POLL_INTERVAL_MS)
        self.say("Correct with clicks: done (the corrections stay in the segmentation)")
        self.updateCorrectionWidgets()

    def onCorrectSegmentChanged(self, *unused) -> None:
        correction = self.logic.session.correction
        combo = self.ui.correctSegmentComboBox
        segmentId = combo.itemData(combo.currentIndex) if combo.currentIndex >= 0 else None
        if correction is None or not segmentId:
            return
        try:
            correction.choose_segment(segmentId)
        except ValueError as error:
            self.failed("Cannot correct this segment", error)

    def onPlaceClicks(self, positive: bool, checked: bool) -> None:
        """Place points of one kind in the views (Markups place mode, kept until pressed again)."""
        correction = self.logic.session.correction
        (self.ui.negativeClickButton if positive else self.ui.positiveClickButton).checked = False
        if correction is None or not checked:
            self.stopPlacing()
            return
        node = correction.positive if positive else correction.negative
        selection = slicer.app.applicationLogic().GetSelectionNode()
        selection.SetReferenceActivePlaceNodeClassName("vtkMRMLMarkupsFiducialNode")
        selection.SetActivePlaceNodeID(node.GetID())
        interaction = slicer.app.applicationLogic().GetInteractionNode()
        interaction.SetPlaceModePersistence(1)
        interaction.SetCurrentInteractionMode(interaction.Place)

    def stopPlacing(self) -> None:
        self.ui.positiveClickButton.checked = self.ui.negativeClickButton.checked = False
        interaction = slicer.app.applicationLogic().GetInteractionNode()
        if interaction.GetCurrentInteractionMode() == interaction.Place:
            interaction.SetCurrentInteractionMode(interaction.ViewTransform)

    def onUndoClick(self) -> None:
        correction = self.logic.session.correction
        if correction is None:
            return
        try:
            self.say(correction.undo())
        except ValueError as error:
            self.failed("Could not undo the click", error)
        self.updateCorrectionWidgets()

    def updateCorrectionWidgets(self) -> None:
        correction = self.logic.session.correction
        status = correction.status if correction is not None else None
        self.ui.correctButton.text = "Done" if correction is not None else "Correct with clicks"
        usable = status in (corrections.READY, corrections.REFINING)
        for widget in (self.ui.correctSegmentComboBox, self.ui.positiveClickButton, self.ui.negativeClickButton):
            widget.enabled = usable
        self.ui.undoClickButton.enabled = status == corrections.READY and bool(correction.undo_stack)
        self.showPlacing(correction, usable)
        self.ui.correctStatusLabel.text = {
            None: "Predict (or choose a reviewed segmentation), then Correct with clicks.",
            corrections.STARTING: "Starting the engine and loading the model...",
            corrections.READY: "Ready: press + Positive or - Negative and click in any view "
                               f"({len(correction.undo_stack) if correction else 0} click(s) applied).",
            corrections.REFINING: "Computing the click (a few seconds; you can keep working)...",
            corrections.FAILED: "The engine stopped: press Done, then Correct with clicks to restart it.",
        }.get(status, "") + (f"\n{self._lastCorrectionMessage}" if correction is not None and
                             self._lastCorrectionMessage else "")

    def showPlacing(self, correction, usable: bool) -> None:
        """The point buttons follow the views' place mode (Esc or right-click ends it there); an
        engine that stopped ends it here."""
        interaction = slicer.app.applicationLogic().GetInteractionNode()
        active = slicer.app.applicationLogic().GetSelectionNode().GetActivePlaceNodeID()
        ours = [correction.positive.GetID(), correction.negative.GetID()] if correction is not None else []
        placing = interaction.GetCurrentInteractionMode() == interaction.Place and active in ours
        if placing and not usable:
            interaction.SetCurrentInteractionMode(interaction.ViewTransform)
            placing = False
        self.ui.positiveClickButton.checked = placing and active == ours[0]
        self.ui.negativeClickButton.checked = placing and active == ours[1]

    def showCorrectionMessages(self) -> None:
        correction = self.logic.session.correction
        if correction is None:
            return
        messages, correction.messages = correction.messages, []
        for message in messages:
            self.say(message)
            self._lastCorrectionMessage = message

    # -- polling -------------------------------------------------------------------------------
    def startPolling(self) -> None:
        self.updateJobWidgets()
        self.timer.start()

    def onTimer(self) -> None:
        session = self.logic.session
        wasPredicting = session.prediction is not None and not session.prediction.finished
        wasImporting = session.model_job is not None and not session.model_job.finished
        for event in session.poll():
            if event.get("event") in ("warning", "error") and event.get("message"):
                self.say(f"{event['event']}: {event['message']}")
        if session.curves is not None and session.curves.chart is not self._shownChart:
            self._shownChart = session.curves.chart
            slicer.modules.plots.logic().ShowChartInLayout(self._shownChart)
        if wasPredicting and session.prediction.finished:
            self.onPredictionFinished()
        if wasImporting and session.model_job.finished:
            self.onModelImportFinished()
        task = session.dataset_job  # a case being written, or packages being installed
        if task is not None and task.finished and task is not self._reportedTask:
            self._reportedTask = task
            self.onBackgroundTaskFinished(task)
        if self._shownDevice is None and self.logic.deviceType() is not None:  # the probe has just answered
            self._shownDevice = self.logic.deviceType()
            self.updateConfigurationInfo()
        self.showCorrectionMessages()
        self.updateJobWidgets()
        if not session.busy and self.logic.deviceType() is not None and session.correction is None:
            self.timer.stop()

    def onBackgroundTaskFinished(self, job) -> None:
        if not job.succeeded:
            self.failed(f"{job.title} failed", job.failure)
        elif job.command == "add-case":
            self.reportAdded(*job.result)
        else:
            self.say(f"{job.title}: done")
        if job.command == "add-case":
            self.refreshCases()

    def updateConfigurationInfo(self, *unused) -> None:
        if self._parameterNode is None:
            return
        p = self._parameterNode
        folder = _path(p.datasetFolder)
        work = commands.work_folder(folder, _path(p.workFolder)) if folder else _path(p.workFolder)
        self.ui.configurationInfoLabel.text = self.logic.configurationInfo(work)

    def onPredictionFinished(self) -> None:
        session = self.logic.session
        if not session.prediction.succeeded:
            self.say(f"Prediction failed: {session.prediction.failure}")
            return
        result = session.prediction_result
        self._parameterNode.reviewSegmentation = result.segmentation
        slicer.util.selectModule("SegmentEditor")  # bring it up with the result and its source volume selected
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(result.segmentation)
        setSource = getattr(editor, "setSourceVolumeNode", None) or editor.setMasterVolumeNode  # before Slicer 5.4
        setSource(result.source_volume)
        self.say(f"Prediction loaded as '{result.segmentation.GetName()}': review it in the Segment Editor, then "
                 "Add to training set")

    def updateJobWidgets(self) -> None:
        session = self.logic.session
        chain = session.training
        running = chain is not None and not chain.finished
        self.ui.trainButton.text = "Stop" if running else "Start training"
        self.ui.resumeButton.enabled = not running  # a stopped run of this session, or one found on disk
        self.ui.fineTuneButton.enabled = not running
        if chain is not None:  # the whole chain's bar: steps weighted by their expected share of the time
            finished = self.outcome(chain)
            if chain.succeeded:  # which classes the model finds poorly: the ones to review first
                report = quality.validation_report(chain.done_events("train"))
                finished += f"\n{report}" if report else ""
            self.showProgress(self.ui.trainProgressBar, self.ui.trainStatusLabel, chain,
                              chain.step_text if running else finished)
        job = session.prediction
        predicting = job is not None and not job.finished
        self.ui.predictButton.text = "Stop" if predicting else "Predict"
        self.ui.applyModelButton.text = "Stop" if predicting else "Apply"
        if job is not None:
            for bar, label in ((self.ui.predictProgressBar, self.ui.predictStatusLabel),
                               (self.ui.useModelProgressBar, self.ui.useModelStatusLabel)):
                self.showProgress(bar, label, job, job.step_text if predicting else self.outcome(job))
        importing = session.model_job is not None and not session.model_job.finished
        self.ui.addModelZipButton.enabled = self.ui.removeModelButton.enabled = not importing
        adding = session.dataset_job is not None and not session.dataset_job.finished
        self.ui.addCaseButton.enabled = self.ui.addToTrainingSetButton.enabled = not adding
        self.ui.removeCaseButton.enabled = not adding and not running
        self.updateCorrectionWidgets()

    @staticmethod
    def outcome(job) -> str:
        """'finished', or why not (a chain reports its last job's reason)."""
        return "finished" if job.succeeded else job.failure

    @staticmethod
    def showProgress(bar, label, job, text: str) -> None:
        fraction = job.progress if job is not None else None
        bar.setRange(0, 100 if fraction is not None else 0)  # 0..0: busy indicator until the engine says
        bar.value = int(100 * (fraction or 0))
        eta = job.eta_s if job is not None else None
        message = job.message if job is not None and not job.finished else ""
        label.text = text + (f", about {_duration(eta)} left" if eta else "") + (f"\n{message}" if message else "")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


#
# AutoSegLogic
#
class AutoSegLogic(ScriptedLoadableModuleLogic):
    """Everything that must also work without the GUI (Python console, batch scripts).

    The work is done by :class:`AutoSegLogic.session.Session` and the modules of the
    ``AutoSegLogic`` package; this class gives them Slicer's interpreter and environment.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._session = None
        self._library = None
        self.deviceProbe = None

    def getParameterNode(self):
        return AutoSegParameterNode(super().getParameterNode())

    @property
    def session(self) -> Session:
        if self._session is None:
            python, env = self.engineInterpreter()
            self._session = Session(slicer.mrmlScene, python=python, env=env)
        return self._session

    @staticmethod
    def modelsFolder() -> pathlib.Path:
        """The user's models folder, beside Slicer's settings file (kept across sessions and versions)."""
        return pathlib.Path(slicer.app.slicerUserSettingsFilePath).parent / "AutoSegModels"

    @property
    def library(self) -> ModelLibrary:
        """The models of :meth:`modelsFolder` ("Use a model"); the registry is read on every call."""
        if self._library is None:
            self._library = ModelLibrary(self.modelsFolder())
        return self._library

    @staticmethod
    def engineInterpreter() -> tuple:
        """Slicer's own Python for the engine processes: (executable, environment).

        ``PythonSlicer`` is a launcher that sets up the paths Slicer's Python needs, so it gets
        the environment Slicer was started with; without it, this interpreter and environment.
        """
        home = getattr(slicer.app, "slicerHome", "") or ""
        search = os.pathsep.join([os.path.join(home, "bin"), os.environ.get("PATH", "")])
        launcher = shutil.which("PythonSlicer", path=search)
        if launcher:
            return launcher, dict(slicer.util.startupEnvironment())
        return sys.executable, dict(os.environ)

    def addCase(self, dataset, volumes, segmentation, channelNames, ignoreUnannotated=False, work=None):
        """Append one case to the dataset and its existing folds, in this thread (console, batch scripts);
        returns (export result, {case: fold}). The widget uses ``session.start_add_case`` instead."""
        return self.session.add_case(dataset, volumes, segmentation, channelNames, ignoreUnannotated, work)

    def startDeviceProbe(self) -> None:
        """Find out in the background whether training would run on a GPU (for the 'auto' configuration)."""
        if self.deviceProbe is None:
            python, env = self.engineInterpreter()
            self.deviceProbe = DeviceProbe(python, env).start()

    def deviceType(self):
        """'cuda', 'mps' or 'cpu' once known, else None."""
        return self.deviceProbe.poll() if self.deviceProbe is not None else None

    def configurationInfo(self, work) -> str:
        """What 'auto' means here and what the dataset's plan offers, with the expected time per epoch."""
        lines = [commands.describe_auto(self.deviceType())]
        offers = commands.plan_offers(work) if work else []
        lines += [offer.describe() for offer in offers] or ["(the plan's configurations appear after the first "
                                                           "Start training has planned the dataset)"]
        return "\n".join(lines)

    def ensureDependencies(self, confirm: bool = True) -> bool:
        """True if the engine can run. Otherwise asks to install what is missing and starts it in the
        background (PyTorch only through the PyTorch extension); the user presses the button again after."""
        session = self.session
        installing = session.dataset_job
        if installing is not None and installing.command == "install" and not installing.finished:
            slicer.util.infoDisplay("Python packages are still being installed; try again when it has finished.")
            return False
        needed = dependencies.missing()
        if not needed:
            return True
        if any(r.module == dependencies.TORCH for r in needed) and not self.installTorch(confirm):
            return False
        rest = [r for r in needed if r.module != dependencies.TORCH]
        if not rest:
            return not dependencies.missing()
        if confirm and not slicer.util.confirmOkCancelDisplay(
                f"AutoSeg needs these Python packages: {dependencies.describe(rest)}.\n"
                "Download and install them now? (They install in the background; press the button again when "
                "the progress says they are done.)"):
            return False
        session.start_install(rest)
        return False

    @staticmethod
    def installTorch(confirm: bool = True) -> bool:
        """PyTorch through the PyTorch extension (it matches the GPU driver); never a plain pip install."""
        try:
            import PyTorchUtils
        except ImportError:
            slicer.util.errorDisplay(dependencies.torch_reason() + ".\nAutoSeg does not install PyTorch itself: "
                                     "the PyTorch extension picks the build that matches your GPU driver.")
            return False
        torch = next(r for r in dependencies.REQUIREMENTS if r.module == dependencies.TORCH)
        try:
            installed = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=confirm,
                                                                      torchVersionRequirement=f">={torch.minimum}")
        except Exception as error:  # the extension raises many kinds; all mean "not installed"
            slicer.util.errorDisplay(f"The PyTorch extension could not install PyTorch: {error}")
            return False
        return installed is not None


#
# AutoSegTest
#
class AutoSegTest(ScriptedLoadableModuleTest):
    """Run by ``Slicer --testing``: the path of the pytest suite, inside Slicer.

    Phantom cases -> dataset export -> a tiny training run as a background job (plus a cancel
    and resume) -> prediction -> segmentation in the scene, when the engine can predict.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        reason = dependencies.torch_reason()
        if reason:  # the engine cannot run here: say why instead of failing
            self.delayDisplay(f"AutoSeg self-test skipped: {reason}")
            raise unittest.SkipTest(reason)
        self.test_exportTrainPredict()

    def test_exportTrainPredict(self):
        import tempfile

        from AutoSegLogic import testing
        from AutoSegLogic.commands import TrainSettings, engine_flags
        from AutoSegLogic.results import model_labels

        self.delayDisplay("Exporting phantom cases")
        scene = slicer.mrmlScene
        root = pathlib.Path(tempfile.mkdtemp(prefix="AutoSegTest-"))
        dataset, work = root / "Dataset900_Test", root / "Dataset900_Test.autoseg"
        python, env = AutoSegLogic.engineInterpreter()
        env["OMP_NUM_THREADS"] = "1"  # a tiny network: more threads only contend
        session = Session(scene, python=python, env=env)
        for index in range(5):
            volumes, segmentation = testing.phantom_case(scene, seed=3, index=index)
            session.add_case(dataset, volumes, segmentation, ["CT"])
        self.assertEqual(len(dataset_export.list_cases(dataset)), 5)

        self.delayDisplay("Planning")
        steps = commands.training_steps(TrainSettings(dataset, work, configuration="3d_cpu", folds=["0"], epochs=2,
                                                      iterations_per_epoch=2, device="cpu"))
        chain = session.start_steps(steps[:2])  # verify, plan-and-preprocess
        testing.wait_until(session, timeout=300, idle=slicer.app.processEvents)
        self.assertTrue(chain.succeeded, chain.job.failure)
        testing.shrink_plans(work, "3d_cpu")  # the planned network is too big for a test

        self.delayDisplay("Training, stopping, resuming")
        chain = session.start_steps(steps[2:])
        testing.wait_until(session, lambda: chain.job.epochs, timeout=300, idle=slicer.app.processEvents)
        chain.cancel()
        testing.wait_until(session, timeout=120, idle=slicer.app.processEvents)
        if not chain.succeeded:  # stopped before the end: it must be resumable and finish
            self.assertTrue(chain.resumable, chain.job.failure)
            chain = session.resume_training()
            testing.wait_until(session, timeout=300, idle=slicer.app.processEvents)
        self.assertTrue(chain.succeeded, chain.job.failure)
        self.assertEqual(session.curves.rows, 2)

        if not engine_flags("predict"):
            self.delayDisplay("This engine cannot predict yet: prediction not tested")
            return
        self.delayDisplay("Predicting")
        reference = slicer.util.getNode("phantom_ct_000")
        job = session.start_prediction([reference], work / "model", None, ["0"], tta=False, device="cpu")
        testing.wait_until(session, timeout=300, idle=slicer.app.processEvents)
        self.assertTrue(job.succeeded, job.failure)
        content = session.prediction_result.segmentation.GetSegmentation()
        names = [content.GetNthSegment(i).GetName() for i in range(content.GetNumberOfSegments())]
        expected = [n for n, v in sorted(model_labels(work / "model").items(), key=lambda kv: kv[1]) if v]
        self.assertEqual(names, expected)

        self.delayDisplay("Correct with clicks: one point, applied, undone")
        self.correctWithClicks(session, reference)

        self.delayDisplay("Use a model: the trained folder registered in a models folder and applied")
        library = ModelLibrary(root / "AutoSegModels")
        entry = library.register_folder(work)
        self.assertIn("Predicts with", library.card(entry.name).text())
        library.start_prediction(session, entry.name, [reference], None, tta=False, device="cpu")
        testing.wait_until(session, timeout=300, idle=slicer.app.processEvents)
        self.assertTrue(session.prediction.succeeded, session.prediction.failure)
        content = session.prediction_result.segmentation.GetSegmentation()
        self.assertEqual([content.GetNthSegment(i).GetName() for i in range(content.GetNumberOfSegments())], expected)
        self.delayDisplay("Test passed")

    def correctWithClicks(self, session, reference):
        """A positive point at the volume's centre for the first segment: the engine answers, the
        segment changes only inside the answered region, Undo restores the label map exactly."""
        import time

        import vtk

        from AutoSegLib.inference.clicks import index_to_physical
        from AutoSegLogic import segment_masks
        from AutoSegLogic.volumes import node_geometry

        segmentation = session.prediction_result.segmentation
        correction = session.start_correcting(segmentation, device="cpu")

        def until(condition, timeout=300.0):
            deadline = time.monotonic() + timeout
            while not condition():
                session.poll()
                slicer.app.processEvents()
                time.sleep(0.05)
                self.assertLess(time.monotonic(), deadline, correction.messages)

        try:
            until(lambda: correction.status != corrections.STARTING)
            self.assertEqual(correction.status, corrections.READY, correction.messages)
            segmentId, _ = correction.segment_choices()[0]
            correction.choose_segment(segmentId)
            grid = correction.grid
            before = segment_masks.label_map(segmentation, grid, correction.labels)
            lps = index_to_physical([n // 2 for n in grid.shape], node_geometry(reference))
            correction.positive.AddControlPoint(vtk.vtkVector3d(-lps[0], -lps[1], lps[2]))
            until(lambda: correction.undo_stack or correction.status == corrections.FAILED)
            self.assertTrue(correction.undo_stack, correction.messages)
            z0, z1, y0, y1, x0, x1 = correction.undo_stack[-1].region
            changed = segment_masks.label_map(segmentation, grid, correction.labels) != before
            changed[z0:z1, y0:y1, x0:x1] = False
            self.assertFalse(changed.any())  # nothing outside the answered region
            correction.undo()
            self.assertTrue((segment_masks.label_map(segmentation, grid, correction.labels) == before).all())
        finally:
            session.stop_correcting()
