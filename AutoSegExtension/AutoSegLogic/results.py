"""Predictions back into the scene: a segmentation to review, an uncertainty overlay to guide it.

- The label map becomes a segmentation node with one segment per label of the model's
  ``dataset.json`` (empty ones included, so a missed structure can be painted at once),
  ordered by label value, named by label, with the label's terminology (SNOMED CT codes kept
  in ``dataset.json``, else the standard ones of its name, :mod:`.terminology`) and its
  colour (the terminology's, else the fixed table of :mod:`.labels`); its reference geometry
  is the input volume, so the Segment Editor edits on the input's grid and a DICOM SEG export
  carries the codes.
- Reading the files (:func:`read_outputs`, any thread) is apart from building the nodes
  (:func:`outputs_into_scene`, GUI thread), so the module reads in the background.
- The uncertainty map becomes a scalar volume shown over the input in the slice views with a
  transparent-to-hot colour table: low uncertainty is see-through, doubtful voxels glow.

Only call these for a job that succeeded (:attr:`AutoSegLogic.jobs.Job.succeeded`): a failed
run's folder may hold an old result.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from AutoSegLib.fileutil import read_json
from AutoSegLib.imageio import SUPPORTED_ENDINGS, Geometry, read_image

from AutoSegLogic import labels as label_rules
from AutoSegLogic import terminology as terms
from AutoSegLogic.dataset_export import segmentations_logic
from AutoSegLogic.volumes import add_volume

UNCERTAINTY_COLOURS = "AutoSeg uncertainty"
UNCERTAINTY_SUFFIX = "_uncertainty"


@dataclass
class Prediction:
    segmentation: object  # vtkMRMLSegmentationNode
    uncertainty: object | None  # vtkMRMLScalarVolumeNode
    source_volume: object | None = None  # the input the Segment Editor edits it on


@dataclass
class Outputs:
    """A prediction's files read into memory (no scene access)."""

    label: np.ndarray
    geometry: Geometry
    labels: dict
    terminology: dict
    uncertainty: np.ndarray | None = None
    uncertainty_geometry: Geometry | None = None
    image: object | None = None  # the label as a vtkOrientedImageData, made in the reading thread
    present: list | None = None  # its non-zero values


def model_dataset(model) -> dict:
    """A model folder's ``dataset.json`` (an nnU-Net v2 results folder: that of its trained folders)."""
    from AutoSegLogic.library import dataset_file

    return read_json(dataset_file(model))


def model_labels(model) -> dict[str, int]:
    """Label name -> value of a model folder (its ``dataset.json``)."""
    return {str(k): int(v) for k, v in model_dataset(model)["labels"].items()}


def model_terminology(model) -> dict[str, dict]:
    """Label name -> terminology entry: the model's ``dataset.json`` entries, else the standard ones."""
    spec = model_dataset(model)
    return terms.for_labels([n for n in spec["labels"]], spec.get(terms.DATASET_KEY) or {})


def find_output(folder, case_id: str, suffix: str = "") -> Path | None:
    """``{case}{suffix}{ending}`` in ``folder`` for any supported ending, or None."""
    for ending in SUPPORTED_ENDINGS:
        path = Path(folder) / f"{case_id}{suffix}{ending}"
        if path.is_file():
            return path
    return None


def load_prediction(scene, output_folder, case_id: str, model, reference_volume, name: str | None = None,
                    uncertainty: bool = True) -> Prediction:
    """Read ``autoseg predict``'s outputs for ``case_id`` into the scene.

    Raises:
        FileNotFoundError: the label file is missing (naming the folder).
    """
    return outputs_into_scene(scene, read_outputs(output_folder, case_id, model, uncertainty), reference_volume, name)


def read_outputs(output_folder, case_id: str, model, uncertainty: bool = True) -> Outputs:
    """Read a prediction's label (and uncertainty) file and the model's labels; safe in a worker thread.

    Raises:
        FileNotFoundError: the label file is missing (naming the folder).
    """
    path = find_output(output_folder, case_id)
    if path is None:
        raise FileNotFoundError(f"{output_folder}: no prediction for case '{case_id}'")
    label, geometry = read_image(path)
    out = Outputs(label, geometry, model_labels(model), model_terminology(model), image=labelmap_image(label, geometry),
                  present=present_values(label))
    uncertainty_path = find_output(output_folder, case_id, UNCERTAINTY_SUFFIX) if uncertainty else None
    if uncertainty_path is not None:
        out.uncertainty, out.uncertainty_geometry = read_image(uncertainty_path)
    return out


def outputs_into_scene(scene, outputs: Outputs, reference_volume, name: str | None = None) -> Prediction:
    """The nodes of a prediction read by :func:`read_outputs` (GUI thread: it changes the scene)."""
    name = name or f"{reference_volume.GetName()} AutoSeg"
    segmentation = segmentation_from_labels(scene, outputs.label, outputs.geometry, outputs.labels, name,
                                            reference_volume, outputs.terminology, outputs.image, outputs.present)
    overlay = None
    if outputs.uncertainty is not None:
        overlay = uncertainty_volume(scene, outputs.uncertainty, outputs.uncertainty_geometry, f"{name} uncertainty")
    return Prediction(segmentation, overlay, reference_volume)


def segmentation_from_labels(scene, label: np.ndarray, geometry: Geometry, labels: dict[str, int], name: str,
                             reference_volume=None, terminology: dict | None = None, image=None,
                             present: list | None = None):
    """A segmentation node with one segment per foreground label, in value order.

    ``terminology`` (label name -> entry) gives segments their codes and colours; without it,
    the standard terminology of each name (:func:`.terminology.for_labels`). ``image`` is
    :func:`labelmap_image` of ``label`` and ``present`` its :func:`present_values`, when
    already made (in a worker thread).

    The segments share the label image as one binary-labelmap layer, each with its label
    value (Slicer's own representation of a labelmap without overlaps): no per-label copies,
    so even a 512x512x300 result appears in a few milliseconds.
    """
    import slicer

    if terminology is None:
        terminology = terms.for_labels(list(labels))
    segmentations_logic(scene)  # registers the representation converters outside Slicer
    by_value = {v: n for n, v in label_rules.foreground(labels)}
    for value in present if present is not None else present_values(label):
        if value not in by_value:  # a value the table lacks (should not happen): keep it visible
            by_value[value] = f"label_{value}"
    image = image if image is not None else labelmap_image(label, geometry)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.CreateDefaultDisplayNodes()
    content = node.GetSegmentation()
    converter = slicer.vtkSegmentationConverter
    if reference_volume is not None:
        node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
    else:
        content.SetConversionParameter(converter.GetReferenceImageGeometryParameterName(),
                                       converter.SerializeImageGeometry(image))
    representation = converter.GetBinaryLabelmapRepresentationName()
    for value in sorted(by_value):
        segment = slicer.vtkSegment()
        segment.SetName(by_value[value])
        segment.SetColor(*label_rules.colour_of(by_value[value], value))
        segment.SetLabelValue(int(value))
        segment.AddRepresentation(representation, image)
        terms.apply(segment, terminology.get(by_value[value]))
        content.AddSegment(segment)
    if reference_volume is not None:
        _file_beside(scene, node, reference_volume)
    return node


def present_values(label: np.ndarray) -> list[int]:
    """The non-zero values of a label map (bincount: faster than np.unique for small label values)."""
    if label.size and label.dtype.kind in "ui" and label.min() >= 0 and label.max() < 65536:
        return [int(v) for v in np.flatnonzero(np.bincount(label.ravel())) if v]
    return [int(v) for v in np.unique(label) if v]


def labelmap_image(label: np.ndarray, geometry: Geometry):
    """A ``vtkOrientedImageData`` of a label map at its geometry (thread-safe: not in any scene)."""
    import slicer
    from vtk.util import numpy_support

    from AutoSegLogic.volumes import _vtk_matrix, matrix_from_geometry

    values = np.ascontiguousarray(label if label.dtype.kind in "ui" and label.dtype.itemsize <= 2
                                  else label.astype(np.int32))
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(values.shape[2], values.shape[1], values.shape[0])
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(values.ravel(), deep=True))
    image.SetImageToWorldMatrix(_vtk_matrix(matrix_from_geometry(geometry)))
    return image


def uncertainty_volume(scene, values: np.ndarray, geometry: Geometry, name: str, opacity: float = 0.5):
    """A scalar volume of the uncertainty map, shown as a colour overlay in the slice views."""
    volume = add_volume(scene, values.astype(np.float32), geometry, name)
    display = volume.GetDisplayNode()
    display.SetAndObserveColorNodeID(uncertainty_colours(scene).GetID())
    display.AutoWindowLevelOff()
    top = float(values.max()) if values.size else 1.0
    display.SetWindowLevelMinMax(0.0, 1.0 if 0.0 < top <= 1.0 else max(top, 1e-6))
    show_as_foreground(scene, volume, opacity)
    return volume


def uncertainty_colours(scene):
    """The module's colour table: transparent at 0, through red, to opaque yellow at the top."""
    import slicer

    existing = scene.GetFirstNodeByName(UNCERTAINTY_COLOURS)
    if existing is not None and existing.IsA("vtkMRMLColorTableNode"):
        return existing
    table = slicer.vtkMRMLColorTableNode()
    table.SetName(UNCERTAINTY_COLOURS)
    table.SetTypeToUser()
    table.SetNumberOfColors(256)
    for i in range(256):
        t = i / 255.0
        table.SetColor(i, f"{t:.3f}", 1.0, min(1.0, 2 * t), max(0.0, 2 * t - 1), min(1.0, 1.5 * t))
    table.SetAttribute("Category", "AutoSeg")
    scene.AddNode(table)
    return table


def show_as_foreground(scene, volume, opacity: float = 0.5) -> int:
    """Put ``volume`` in the foreground layer of every slice view; returns the number of views."""
    composites = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    composites.InitTraversal()
    count = 0
    node = composites.GetNextItemAsObject()
    while node is not None:
        node.SetForegroundVolumeID(volume.GetID())
        node.SetForegroundOpacity(opacity)
        count += 1
        node = composites.GetNextItemAsObject()
    return count


def _file_beside(scene, node, reference) -> None:
    """File the result under the input's study in the subject hierarchy (when the scene has one)."""
    import slicer

    hierarchy_class = getattr(slicer, "vtkMRMLSubjectHierarchyNode", None)
    hierarchy = hierarchy_class.GetSubjectHierarchyNode(scene) if hierarchy_class is not None else None
    if hierarchy is None:
        return
    source = hierarchy.GetItemByDataNode(reference)
    item = hierarchy.GetItemByDataNode(node)
    if source and item:
        hierarchy.SetItemParent(item, hierarchy.GetItemParent(source))
