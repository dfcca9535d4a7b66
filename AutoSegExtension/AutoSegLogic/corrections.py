"""Correct a prediction with clicks: Markups points -> engine clicks -> one segment updated, undoable.

The user picks a segment and places points in any view. Convention, shown in the module:
two Markups point lists, **"AutoSeg positive clicks"** (green, "this is the segment") and
**"AutoSeg negative clicks"** (red, "this is not the segment"); each point is labelled
"+ name" / "- name" with the segment it was placed for (switching segments keeps earlier points
and what they meant).

A :class:`CorrectionSession` keeps one engine process (``autoseg engine``) with the model loaded
and the case's images preprocessed, so a click costs only the network windows around the clicks
(1-3 s on a CPU). Nothing here waits: opening the engine and each refine run in a worker thread
(:class:`~AutoSegLogic.jobs.ThreadJob`); the widget calls :meth:`CorrectionSession.poll` from
its ``QTimer``, which notices new points, starts a refine with every click so far (the engine's
contract: earlier clicks keep guiding the network where windows overlap) and applies a finished
answer on the GUI thread: only the chosen segment, only inside the answered region
(:func:`.segment_masks.apply_class_change`). :meth:`undo` restores the segments the last
answer touched exactly and removes its points. The GUI thread's share of a click (reading the
segments, applying the answer) was 0.2 s (median; 0.9 s at most) on a 300x512x512 volume with
five structures (benchmarks/bench_slicer_clicks.py, load average 8.5 on 2 cores).

Points are physical: a point's world position (parent transforms applied) in RAS becomes a
:class:`~AutoSegLib.inference.clicks.Click` in LPS, ``(-r, -a, s)``.

Example (Slicer's Python console)::

    corrections = CorrectionSession(slicer.mrmlScene, segmentationNode, [ctVolume], modelFolder)
    corrections.choose_segment(segmentationNode.GetSegmentation().GetSegmentIdBySegmentName("liver"))
    # place points in corrections.positive / corrections.negative, then repeatedly:
    corrections.poll(); print(corrections.status)
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from AutoSegLib.inference.clicks import Click, ClickError, click_index

from AutoSegLogic import labels as label_rules
from AutoSegLogic import results, segment_masks
from AutoSegLogic.jobs import ThreadJob
from AutoSegLogic.segment_masks import Grid, SegmentGridError, UndoStep
from AutoSegLogic.volumes import array_from_node, node_geometry

POSITIVE_NAME = "AutoSeg positive clicks"
NEGATIVE_NAME = "AutoSeg negative clicks"
ROLE_ATTRIBUTE = "AutoSeg.clicks"  # "positive" / "negative" on the two Markups nodes
POSITIVE_COLOUR = (0.1, 0.8, 0.2)
NEGATIVE_COLOUR = (0.9, 0.15, 0.15)

STARTING, READY, REFINING, FAILED, CLOSED = "starting", "ready", "refining", "failed", "closed"


# -- Markups <-> clicks ----------------------------------------------------------------------------
def lps_from_ras(ras: Sequence[float]) -> tuple[float, float, float]:
    """A RAS point (Slicer) as LPS (ITK, the engine): x and y negated."""
    return (-float(ras[0]), -float(ras[1]), float(ras[2]))


def click_nodes(scene) -> tuple:
    """The positive and negative point lists of the scene (made, coloured and labelled if missing)."""
    return _click_node(scene, "positive"), _click_node(scene, "negative")


def _click_node(scene, role: str):
    import slicer

    nodes = scene.GetNodesByClass("vtkMRMLMarkupsFiducialNode")
    nodes.InitTraversal()
    node = nodes.GetNextItemAsObject()
    while node is not None:
        if node.GetAttribute(ROLE_ATTRIBUTE) == role:
            return node
        node = nodes.GetNextItemAsObject()
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", POSITIVE_NAME if role == "positive" else NEGATIVE_NAME)
    node.SetAttribute(ROLE_ATTRIBUTE, role)
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    if display is not None:
        colour = POSITIVE_COLOUR if role == "positive" else NEGATIVE_COLOUR
        display.SetSelectedColor(*colour)
        display.SetColor(*colour)
    if isinstance(node, slicer.vtkMRMLMarkupsNode):
        node.SetMarkupLabelFormat("")  # the point's label says its segment; no running numbers
    return node


def placed_points(node) -> list[tuple[str, tuple[float, float, float]]]:
    """``(control point id, world RAS position)`` of every placed point of a Markups node."""
    import slicer

    points = []
    for i in range(node.GetNumberOfControlPoints()):
        if node.GetNthControlPointPositionStatus(i) != slicer.vtkMRMLMarkupsNode.PositionDefined:
            continue  # a point being placed (preview) or without position
        ras = [0.0, 0.0, 0.0]
        node.GetNthControlPointPositionWorld(i, ras)
        points.append((node.GetNthControlPointID(i), tuple(float(v) for v in ras)))
    return points


def remove_points(node, point_ids) -> None:
    for point_id in point_ids:
        index = node.GetNthControlPointIndexByID(point_id)
        if index >= 0:
            node.RemoveNthControlPoint(index)


def plain_error(text: str) -> str:
    """The part of an engine error a user can act on: without the process's last log lines."""
    text = str(text).split("Its last messages:")[0].strip()
    return text.rstrip(".") + "." if text else "the correction engine failed"


# -- the session -----------------------------------------------------------------------------------
def default_engine(model, configuration, folds, device, python, env):
    """An :class:`~AutoSegLib.inference.engine_process.EngineProcess` (starts it and waits for the model)."""
    from AutoSegLib.inference.engine_process import EngineProcess

    return EngineProcess(model, configuration=configuration, folds=folds, device=device, python=python, env=env)


class CorrectionSession:
    """Click-guided correction of one segmentation with one model (see the module docstring).

    Args:
        scene: the scene of the segmentation (the click nodes are made there).
        segmentation: the segmentation node to correct (on the grid of ``volumes[0]``).
        volumes: the input volume(s), one per model channel, as for Predict.
        model: the model folder (its ``dataset.json`` maps segment names to label values).
        configuration, folds, device: the engine's choice (None: the model's own rule).
        engine_factory: ``(model, configuration, folds, device, python, env) -> engine`` with
            ``open_case``, ``refine`` and ``close`` (default: a real engine process).
        before_change: called (GUI thread) just before a click's answer or an undo changes the
            segmentation; the module saves the Segment Editor's undo state there, so its Undo
            takes a click back too.

    Raises:
        ValueError: the volumes or the segmentation cannot be used (the message says why).
    """

    def __init__(self, scene, segmentation, volumes: Sequence, model, configuration: str | None = None,
                 folds=None, device: str = "cpu", python: str | None = None, env: dict | None = None,
                 engine_factory: Callable | None = None, before_change: Callable[[], None] | None = None):
        volumes = [v for v in volumes if v is not None]
        if not volumes:
            raise ValueError("choose the input volume(s) the segmentation was predicted from")
        if segmentation is None:
            raise ValueError("choose the segmentation to correct")
        self.scene, self.segmentation, self.model = scene, segmentation, Path(model)
        self.grid = Grid.of_volume(volumes[0])
        self.geometry = node_geometry(volumes[0])
        segment_masks.check_segmentation(segmentation, self.grid)
        self.labels = results.model_labels(self.model)
        channels = [array_from_node(v) for v in volumes]  # copied here: MRML is read on the GUI thread only
        for volume, array in zip(volumes, channels):
            if array.shape != self.grid.shape:
                raise ValueError(f"volume '{volume.GetName()}' has {array.shape} voxels, '{volumes[0].GetName()}' "
                                 f"{self.grid.shape}: the channels of a case share one grid")
        self.positive, self.negative = click_nodes(scene)
        self.segment_id: str | None = None
        self.undo_stack: list[UndoStep] = []
        self.messages: list[str] = []  # for the widget: what happened since it last looked
        self.status = STARTING
        self.guided: bool | None = None
        self.engine = None
        self.case_id = None
        # a point's key: (positive, its control point id), ids being unique per Markups node only
        self._meaning: dict[tuple, tuple[str, int]] = {}  # point key -> (segment id, label)
        self._applied: set[tuple] = set()
        self._job: ThreadJob | None = None
        self._job_points: list[tuple] = []
        self.before_change = before_change
        factory = engine_factory or default_engine

        def open_engine(job):
            engine = factory(self.model, configuration, folds, device, python, env)
            try:
                case_id = engine.open_case(channels, self.geometry)
            except BaseException:
                engine.close()
                raise
            if job.cancel_requested:  # Done was pressed while it started: nobody will poll for it
                engine.close()
                return None
            return engine, case_id

        self._job = ThreadJob(open_engine, "start the correction engine", ["open-engine"]).start()

    # -- choices ----------------------------------------------------------------------------------
    def segment_choices(self) -> list[tuple[str, str]]:
        """``(segment id, name)`` of the segments the model knows (by name), in the segmentation's order."""
        out = []
        for segment_id in segment_masks.segment_ids(self.segmentation):
            name = segment_masks.segment_name(self.segmentation, segment_id)
            if label_rules.value_of(self.labels, name):
                out.append((segment_id, name))
        return out

    def choose_segment(self, segment_id: str) -> None:
        """The segment the next points correct.

        Raises:
            ValueError: no such segment, or its name is not one of the model's structures.
        """
        segment = self.segmentation.GetSegmentation().GetSegment(segment_id)
        if segment is None:
            raise ValueError(f"segmentation '{self.segmentation.GetName()}' has no segment '{segment_id}'")
        self._label_of(segment.GetName())
        self.segment_id = segment_id

    def _label_of(self, name: str) -> int:
        value = label_rules.value_of(self.labels, name)
        if not value:
            known = ", ".join(n for n, _ in label_rules.foreground(self.labels))
            raise ValueError(f"segment '{name}' is not a structure of the model in {self.model} (it knows: "
                             f"{known}); rename the segment or choose another")
        return value

    # -- polling ----------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self._job is not None and not self._job.finished

    def poll(self) -> None:
        """Advance: finish what the worker finished, then start a refine for new points. Never blocks."""
        if self._job is not None:
            self._job.poll()
            if self._job.finished:
                job, self._job = self._job, None
                self._finish(job)
        if self.status == READY and self._job is None:
            self._start_refine()

    def _finish(self, job: ThreadJob) -> None:
        if self.status == CLOSED:
            return
        if job.command == "open-engine":
            if job.succeeded:
                self.engine, self.case_id = job.result
                self.guided = bool(getattr(self.engine, "guided", True))
                self.status = READY
                self.messages.append("Ready: place points" + ("" if self.guided else
                                     " (this model was trained without click guidance: a click only re-predicts the "
                                     "area around it; train a new model to get guided corrections)"))
            else:
                self.status = FAILED
                self._report(f"The correction engine could not start: {plain_error(job.error)}", job.error)
            return
        points, self._job_points = self._job_points, []
        if job.succeeded:
            self._apply(job.result, points)
        else:
            dead = self.engine is not None and getattr(self.engine, "closed", False)
            self._drop(points)
            self._report(f"The click could not be applied (its point was removed): {plain_error(job.error)}",
                         job.error)
            if dead:
                self.status = FAILED
                self.messages.append("The correction engine stopped; press Correct with clicks again to restart it")
            else:
                self.status = READY

    def _report(self, message: str, detail: str) -> None:
        self.messages.append(message)
        logging.warning("AutoSeg corrections: %s", detail)  # the whole text, engine log lines included

    # -- refine -----------------------------------------------------------------------------------
    def new_points(self) -> list[tuple]:
        """Keys ``(positive, control point id)`` of placed points not applied yet, claiming them for
        the chosen segment (and labelling them "+ name" / "- name")."""
        fresh = []
        chosen = self._chosen()
        for node, positive in ((self.positive, True), (self.negative, False)):
            for point_id, _ in placed_points(node):
                key = (positive, point_id)
                if key in self._applied:
                    continue
                if key not in self._meaning:
                    if chosen is None:
                        continue  # waits until a segment is chosen
                    name, value = chosen
                    self._meaning[key] = (self.segment_id, value)
                    node.SetNthControlPointLabel(node.GetNthControlPointIndexByID(point_id),
                                                 f"{'+' if positive else '-'} {name}")
                fresh.append(key)
        return fresh

    def _chosen(self) -> tuple[str, int] | None:
        """(name, label value) of the chosen segment; None, said once, when it was deleted or renamed
        to a name the model does not know since it was chosen."""
        if self.segment_id is None:
            return None
        segment = self.segmentation.GetSegmentation().GetSegment(self.segment_id)
        try:
            if segment is None:
                raise ValueError("the chosen segment was deleted")
            return segment.GetName(), self._label_of(segment.GetName())
        except ValueError as error:
            self.segment_id = None
            self.messages.append(f"{error}; choose a segment for the new points")
            return None

    def clicks(self, keys=None) -> list[Click]:
        """The clicks of the placed points (all claimed ones, or those of ``keys``): positive, then negative."""
        out = []
        for node, positive in ((self.positive, True), (self.negative, False)):
            for point_id, ras in placed_points(node):
                key = (positive, point_id)
                if key in self._meaning and (keys is None or key in keys):
                    out.append(Click(self._meaning[key][1], positive, lps_from_ras(ras)))
        return out

    def _start_refine(self) -> None:
        fresh = self.new_points()
        if not fresh:
            return
        # one segment per answer: the first new point's segment, and the new points placed for it
        segment_id = self._meaning[fresh[0]][0]
        fresh = [p for p in fresh if self._meaning[p][0] == segment_id]
        outside = [p for p in fresh if not self._inside(p)]
        if outside:
            self._drop(outside)
            self.messages.append(f"{len(outside)} point(s) outside volume '{self.grid.name}' were removed")
            fresh = [p for p in fresh if p not in outside]
            if not fresh:
                return
        if segment_id not in segment_masks.segment_ids(self.segmentation):
            self._drop(fresh)
            self.messages.append("The segment of the new point(s) was deleted; the points were removed")
            return
        clicks = self.clicks(self._applied | set(fresh))  # every click so far, and the new ones
        try:
            previous = segment_masks.label_map(self.segmentation, self.grid, self.labels)
        except SegmentGridError as error:
            self._drop(fresh)
            self.messages.append(f"The click could not be applied (its point was removed): {error}")
            return
        engine, case_id = self.engine, self.case_id

        def refine(job):
            return segment_id, engine.refine(case_id, previous, clicks)

        self._job_points = fresh
        self.status = REFINING
        self._job = ThreadJob(refine, "refine", ["refine"]).start()

    def _inside(self, key: tuple) -> bool:
        click = self.clicks([key])
        if not click:
            return False
        try:
            click_index(click[0], self.geometry, self.grid.shape)
        except ClickError:
            return False
        return True

    def _apply(self, outcome, points: list[tuple]) -> None:
        segment_id, result = outcome
        self.status = READY
        if self.segmentation.GetSegmentation().GetSegment(segment_id) is None:
            self._drop(points)
            self.messages.append("The segment was deleted while the click was computed; the point was removed")
            return
        name = segment_masks.segment_name(self.segmentation, segment_id)
        self._before_change()
        try:
            step = segment_masks.apply_class_change(self.segmentation, segment_id, self._label_of(name),
                                                    np.asarray(result.labels), result.region, self.grid)
        except (SegmentGridError, ValueError) as error:
            self._drop(points)
            self.messages.append(f"The click could not be applied (its point was removed): {error}")
            return
        step.point_ids = list(points)
        self._applied.update(points)
        self.undo_stack.append(step)
        self.messages.append(f"{name}: {step.changed_voxels} voxel(s) changed")

    def _before_change(self) -> None:
        if self.before_change is not None:
            try:
                self.before_change()
            except Exception as error:  # a hook that fails must not lose the click
                logging.warning("AutoSeg corrections: saving the undo state failed: %s", error)

    def _drop(self, keys) -> None:
        for node, positive in ((self.positive, True), (self.negative, False)):
            remove_points(node, [point_id for sign, point_id in keys if sign == positive])
        for key in keys:
            self._meaning.pop(key, None)
            self._applied.discard(key)

    # -- undo, close ------------------------------------------------------------------------------
    def undo(self) -> str:
        """Undo the last applied answer: its segments exactly as before, its points removed.

        Raises:
            ValueError: nothing to undo, a refine is running, or a segment was edited since
                (:func:`.segment_masks.undo_step`).
        """
        if self.status == REFINING:
            raise ValueError("a click is being computed; undo when it has been applied")
        if not self.undo_stack:
            raise ValueError("there is no click to undo")
        step = self.undo_stack[-1]
        edited = segment_masks.edited_since(self.segmentation, step, self.grid)
        if not edited:
            self._before_change()
        segment_masks.undo_step(self.segmentation, step, self.grid)
        self.undo_stack.pop()
        self._drop(step.point_ids)
        name = segment_masks.segment_name(self.segmentation, step.segment_id) \
            if self.segmentation.GetSegmentation().GetSegment(step.segment_id) else step.segment_id
        return f"Undone: the last click on {name} ({step.changed_voxels} voxel(s) restored)"

    def close(self, remove_points_nodes: bool = True) -> None:
        """Stop the engine (in the background: it may take a few seconds) and, by default, remove the
        click lists from the scene. The segmentation keeps every applied correction."""
        if self.status == CLOSED:
            return
        self.status = CLOSED
        if self._job is not None and self._job.command == "open-engine":
            self._job.cancel()  # the worker closes the engine it was starting
        if self.engine is not None:
            _close_in_background(self.engine)
            self.engine = None
        if remove_points_nodes:
            for node in (self.positive, self.negative):
                if node is not None and node.GetScene() is not None:
                    self.scene.RemoveNode(node)


def _close_in_background(engine) -> None:
    threading.Thread(target=engine.close, daemon=True, name="autoseg-close-engine").start()
