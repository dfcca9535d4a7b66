"""Cases from the scene -> a dataset folder in nnU-Net v2's layout, only ever appended to.

A case is one or more scalar volume nodes (the channels, in a fixed order) and a
segmentation node or labelmap node. Export writes::

    DATASET/imagesTr/{case}_{XXXX}.nii.gz   each channel; the first in its own geometry
    DATASET/labelsTr/{case}.nii.gz          the segments rasterized on the first channel's grid
    DATASET/dataset.json                    channel names, the name -> value label table, numTraining

Further channels on another grid are resampled onto the first channel's (the layout needs
one grid per case). Label values come from segment names through the dataset's label table
(:mod:`.labels`), so cases exported at different times agree. Existing cases are never
touched. Every case of a call is prepared and checked before anything is written: a refusal
(different channel count, empty segmentation, a sheared grid, a transformed node, ...) names
the case and leaves the folder as it was.

Example (in Slicer's Python console)::

    from AutoSegLogic import dataset_export
    dataset_export.export_cases("D:/data/Dataset001_Liver", [dataset_export.SceneCase(
        [getNode("CT 1")], getNode("Segmentation"))], slicer.mrmlScene, channel_names=["CT"])
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from AutoSegLib.dataset import DatasetSpec, IGNORE_LABEL_NAME, load_spec, save_spec, scan_folder
from AutoSegLib.imageio import Geometry, write_image

from AutoSegLogic import labels as label_rules
from AutoSegLogic import terminology as terms
from AutoSegLogic.volumes import (GeometryError, VoxelSnapshot, array_from_node, materialise, node_geometry,
                                  resample_onto, same_grid, temporary_nodes)

DEFAULT_ENDING = ".nii.gz"
_CASE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ExportError(ValueError):
    """A case cannot be exported; the message names the case and what to do."""


@dataclass
class SceneCase:
    """One case in the scene: channel volumes in order, and its segmentation or labelmap node."""

    volumes: Sequence
    segmentation: object
    case_id: str | None = None  # default: made from the first volume's name


@dataclass
class _Prepared:
    case_id: str
    images: list[np.ndarray]
    geometry: Geometry
    index_of: Callable[[], np.ndarray]  # -> segment index + 1 per voxel (0 = no segment); any thread
    segment_names: list[str]
    notes: list[str] = field(default_factory=list)
    terminology: dict = field(default_factory=dict)  # segment name -> entry the user chose in Slicer


@dataclass
class PreparedExport:
    """Cases read from the scene and checked, ready to be written (by :func:`write_export`, in any thread)."""

    folder: Path
    spec: DatasetSpec
    items: list
    added: list[str]
    ignore_unannotated: bool


@dataclass
class ExportResult:
    folder: Path
    case_ids: list[str]
    added_labels: list[str]
    labels: dict[str, int]
    notes: list[str]


@dataclass(frozen=True)
class CaseInfo:
    case_id: str
    channels: int
    has_label: bool


# -- public API ------------------------------------------------------------------------------
def export_cases(folder, cases: Sequence[SceneCase], scene, channel_names: Sequence[str] | None = None,
                 ignore_unannotated: bool = False, terminology: dict | None = None) -> ExportResult:
    """Append ``cases`` to the dataset at ``folder`` (created if needed); returns what was added.

    Args:
        folder: dataset folder; created with ``dataset.json`` when it does not exist yet.
        cases: the cases to add; none is written unless all can be.
        scene: the MRML scene the nodes live in (temporary nodes are added and removed).
        channel_names: e.g. ``["CT"]`` or ``["T1", "T2"]``; required for a new dataset, and
            must match an existing one's. A channel named CT gets CT normalization.
        ignore_unannotated: voxels outside every segment become ``ignore`` (not learned from)
            instead of background: for partially annotated cases. A segment named
            ``background`` then marks the voxels known to be background.
        terminology: ``{label name: entry}`` (see :mod:`.terminology`) to give labels a meaning
            of the user's choice. Otherwise a label takes the terminology its segment was given
            in Slicer, else the standard one of its name (liver, left kidney, ...); dataset.json
            keeps it, and predictions get it back.

    Raises:
        ExportError: naming the case (or the dataset) and the problem; nothing was written.

    :func:`prepare_export` (scene access, GUI thread) and :func:`write_export` (files, any
    thread) do the same in two parts, so the module writes in the background.
    """
    return write_export(prepare_export(folder, cases, scene, channel_names, ignore_unannotated, terminology))


def prepare_export(folder, cases: Sequence[SceneCase], scene, channel_names: Sequence[str] | None = None,
                   ignore_unannotated: bool = False, terminology: dict | None = None) -> PreparedExport:
    """Read and check the cases from the scene (no file is written); see :func:`export_cases`."""
    folder = Path(folder)
    spec = _open_or_new_spec(folder, channel_names)
    taken = {c.case_id.lower() for c in list_cases(folder)} if (folder / "dataset.json").is_file() else set()
    prepared = []
    for case in cases:
        item = _prepare(case, spec, scene, taken)
        taken.add(item.case_id.lower())
        prepared.append(item)
    table, added = dict(spec.labels), []
    for item in prepared:
        try:
            table, fresh = label_rules.extend_labels(table, item.segment_names, ignore_unannotated, item.case_id)
        except label_rules.LabelError as exc:
            raise ExportError(str(exc)) from None
        added += fresh
    extra = dict(spec.extra)
    extra[terms.DATASET_KEY] = _label_terminology(table, spec.extra.get(terms.DATASET_KEY) or {}, prepared,
                                                  terminology or {})
    spec = DatasetSpec(spec.channel_names, table, spec.num_training, spec.file_ending, extra)
    return PreparedExport(folder, spec, prepared, added, ignore_unannotated)


def write_export(prepared: PreparedExport, job=None) -> ExportResult:
    """Write prepared cases (thread-safe: files only); ``job`` (a ThreadJob) gets progress and may cancel."""
    folder, spec = prepared.folder, prepared.spec
    indexes = [item.index_of() for item in prepared.items]  # refusals (an empty segmentation) before any write
    folder.mkdir(parents=True, exist_ok=True)
    save_spec(folder, spec)  # labels first: a case file never holds a value dataset.json lacks
    notes = []
    for n, (item, index) in enumerate(zip(prepared.items, indexes)):
        if job is not None and job.cancel_requested:
            break
        try:
            _write_case(folder, spec, item, index, prepared.ignore_unannotated)
        except GeometryError as exc:
            raise ExportError(f"case '{item.case_id}': {exc}") from None
        notes += item.notes
        if job is not None:
            job.report(n + 1, len(prepared.items), f"wrote case {item.case_id}")
    _update_count(folder)
    return ExportResult(folder, [p.case_id for p in prepared.items], prepared.added, dict(spec.labels), notes)


def _label_terminology(table: dict, stored: dict, prepared, explicit: dict) -> dict:
    """Per label: what the caller gave, else what is stored, else the segment's, else the standard."""
    out = {}
    chosen = {}
    for item in prepared:
        for name, entry in item.terminology.items():
            chosen.setdefault(label_rules.normalise(name), entry)
    lookup = {label_rules.normalise(k): v for k, v in stored.items()}
    given = {label_rules.normalise(k): v for k, v in explicit.items()}
    for name in table:
        key = label_rules.normalise(name)
        entry = given.get(key) or lookup.get(key) or chosen.get(key) or terms.standard_entry(name)
        if entry and name not in (label_rules.BACKGROUND, IGNORE_LABEL_NAME):
            try:
                out[name] = terms.check_entry(entry, name)
            except ValueError as exc:
                raise ExportError(str(exc)) from None
    unknown = sorted(set(given) - {label_rules.normalise(n) for n in table})
    if unknown:
        raise ExportError(f"terminology given for {unknown}, which no label of the dataset has (labels: "
                          f"{', '.join(table)})")
    return out


def list_cases(folder) -> list[CaseInfo]:
    """The training cases of a dataset folder (empty when it has no dataset.json yet)."""
    folder = Path(folder)
    if not (folder / "dataset.json").is_file():
        return []
    spec = load_spec(folder)
    scan = scan_folder(folder, spec)
    complete = [CaseInfo(c.case_id, len(c.images), True) for c in scan.cases]
    partial = [CaseInfo(c, spec.num_channels - len(m), c not in scan.missing_labels)
               for c, m in scan.missing_channels.items()]
    partial += [CaseInfo(c, spec.num_channels, False) for c in scan.missing_labels if c not in scan.missing_channels]
    return sorted(complete + partial, key=lambda c: c.case_id)


def channel_names(folder) -> list[str] | None:
    """The channel names of the dataset at ``folder`` in order, or None if it has no dataset.json yet."""
    folder = Path(folder)
    if not (folder / "dataset.json").is_file():
        return None
    spec = load_spec(folder)
    return [spec.channel_names[i] for i in sorted(spec.channel_names)]


def remove_case(folder, case_id: str) -> list[Path]:
    """Delete a case's files and update numTraining; returns the removed files.

    The engine drops a removed case from ``splits_final.json`` at the next training run.
    """
    folder = Path(folder)
    if not isinstance(case_id, str) or not _CASE_ID_RE.fullmatch(case_id) or case_id in (".", ".."):
        raise ExportError(f"{folder}: '{case_id}' is not a case name (letters, digits, '_', '-' and '.'; no "
                          "folders); nothing was removed")
    spec = load_spec(folder)
    images = [p for p in (folder / "imagesTr").glob(f"{_glob_escape(case_id)}_*{spec.file_ending}")
              if re.fullmatch(re.escape(case_id) + r"_\d{4}" + re.escape(spec.file_ending), p.name)]
    label = folder / "labelsTr" / f"{case_id}{spec.file_ending}"
    removed = images + ([label] if label.exists() else [])
    if not removed:
        raise ExportError(f"{folder}: no case '{case_id}' to remove")
    for path in ([label] if label.exists() else []) + images:  # label first: no half case looks complete
        path.unlink()
    _update_count(folder)
    return removed


def write_prediction_input(folder, volumes: Sequence, case_id: str = "case", file_ending: str = DEFAULT_ENDING) -> Path:
    """Write the channels of one case for ``autoseg predict -i`` (further channels on the first's grid)."""
    return write_prediction_channels(folder, prediction_input(volumes, case_id), file_ending=file_ending)


def prediction_input(volumes: Sequence, case_id: str = "case") -> tuple[str, list[np.ndarray], Geometry]:
    """The voxels of one case's channels copied out of the scene (GUI thread): (case id, images, geometry)."""
    images, geometry, _ = _channels(volumes, case_id)
    return case_id, images, geometry


def write_prediction_channels(folder, channels: tuple, job=None, file_ending: str = DEFAULT_ENDING) -> Path:
    """Write :func:`prediction_input`'s result as ``autoseg predict -i`` files (any thread)."""
    folder = Path(folder)
    case_id, images, geometry = channels
    for c, image in enumerate(images):
        if job is not None and job.cancel_requested:
            break
        try:
            write_image(materialise(image), geometry, folder / f"{case_id}_{c:04d}{file_ending}")
        except GeometryError as exc:
            raise ExportError(f"case '{case_id}': {exc}") from None
        if job is not None:
            job.report(c + 1, len(images))
    return folder


# -- preparing a case (no writing) --------------------------------------------------------------
def _open_or_new_spec(folder: Path, channel_names) -> DatasetSpec:
    names = [str(n).strip() for n in channel_names] if channel_names is not None else None
    if names is not None and (not names or not all(names)):
        raise ExportError(f"channel names must be non-empty, got {list(channel_names)}")
    if (folder / "dataset.json").is_file():
        spec = load_spec(folder)
        existing = [spec.channel_names[i] for i in sorted(spec.channel_names)]
        if names is not None and names != existing:
            raise ExportError(f"{folder}: the dataset's channels are {existing}, not {names}; every case must have "
                              "the same channels in the same order")
        return spec
    if folder.exists() and any(folder.iterdir()):
        raise ExportError(f"{folder}: folder is not empty and has no dataset.json; choose an empty or new folder")
    if names is None:
        raise ExportError(f"{folder}: new dataset: give the channel names, e.g. ['CT'] or ['T1', 'T2']")
    folder.mkdir(parents=True, exist_ok=True)
    spec = DatasetSpec(dict(enumerate(names)), {label_rules.BACKGROUND: 0}, 0, DEFAULT_ENDING)
    return spec


def _prepare(case: SceneCase, spec: DatasetSpec, scene, taken: set[str]) -> _Prepared:
    volumes = [v for v in case.volumes if v is not None]
    name = case.case_id or (volumes[0].GetName() if volumes else "case")
    case_id = _choose_case_id(case.case_id, name, taken)
    if len(volumes) != spec.num_channels:
        shown = ", ".join(f"'{v.GetName()}'" for v in volumes) or "none"
        raise ExportError(f"case '{case_id}': {len(volumes)} volume(s) ({shown}) but the dataset has "
                          f"{spec.num_channels} channel(s) ({', '.join(spec.channel_names.values())})")
    if case.segmentation is None:
        raise ExportError(f"case '{case_id}': no segmentation given")
    images, geometry, notes = _channels(volumes, case_id)
    chosen: dict = {}
    index_of, names = rasterize_deferred(scene, case.segmentation, volumes[0], case_id, chosen)
    return _Prepared(case_id, images, geometry, index_of, names, notes, chosen)


def _channels(volumes: Sequence, case_id: str) -> tuple[list, Geometry, list[str]]:
    """The channels on the first one's grid: snapshots (copied later, in the writing thread), or
    arrays for channels that had to be resampled here."""
    try:
        reference = node_geometry(volumes[0])
        first = VoxelSnapshot(volumes[0])
        images, notes = [first], []
        for volume in volumes[1:]:
            geometry, array = node_geometry(volume), VoxelSnapshot(volume)
            if not same_grid(geometry, array.shape, reference, first.shape):
                array = resample_onto(array.array(), geometry, reference, first.shape)
                notes.append(f"case '{case_id}': channel '{volume.GetName()}' resampled onto the grid of "
                             f"'{volumes[0].GetName()}'")
            images.append(array)
    except GeometryError as exc:
        raise ExportError(f"case '{case_id}': {exc}") from None
    return images, reference, notes


def rasterize(scene, segmentation, reference_volume, case_id: str = "",
              terminology: dict | None = None) -> tuple[np.ndarray, list[str]]:
    """Segments on the reference volume's grid: (array of segment index + 1, segment names).

    Where segments overlap, the later segment in the node's list wins (as in Slicer's own
    labelmap export). A labelmap node is first turned into segments named by its colour table
    (the names Slicer shows for its values). ``terminology``, when given, receives
    ``{segment name: entry}`` for the segments whose terminology the user set in Slicer.
    """
    index_of, names = rasterize_deferred(scene, segmentation, reference_volume, case_id, terminology)
    return index_of(), names


def rasterize_deferred(scene, segmentation, reference_volume, case_id: str = "",
                       terminology: dict | None = None) -> tuple[Callable[[], np.ndarray], list[str]]:
    """:func:`rasterize` in two parts: what needs the scene now, the voxel work in the returned function.

    When the segments' binary labelmaps already lie on the reference volume's grid (a
    segmentation made on that volume, the usual case), only their layers are copied here; the
    function then paints them into the index array in any thread (and raises ExportError for
    an empty segmentation). Otherwise Slicer's export resamples them here.
    """
    logic = segmentations_logic(scene)
    _check_untransformed(segmentation, case_id)
    with temporary_nodes(scene):
        if segmentation.IsA("vtkMRMLLabelMapVolumeNode"):
            node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{segmentation.GetName()} (segments)")
            if not logic.ImportLabelmapToSegmentationNode(segmentation, node):
                raise ExportError(f"case '{case_id}': labelmap '{segmentation.GetName()}' could not be read as segments")
            _name_from_colour_table(segmentation, node)
            segmentation_node = node
        else:
            segmentation_node = segmentation
        content = segmentation_node.GetSegmentation()
        ids = [content.GetNthSegmentID(i) for i in range(content.GetNumberOfSegments())]
        if not ids:
            raise ExportError(f"case '{case_id}': segmentation '{segmentation.GetName()}' has no segments")
        names = [content.GetSegment(i).GetName() for i in ids]
        if terminology is not None:
            for segment_id in ids:
                entry = terms.segment_entry(content.GetSegment(segment_id))
                if entry is not None:
                    terminology.setdefault(content.GetSegment(segment_id).GetName(), entry)
        shape = _shape_of(reference_volume)
        layers = _layers_on_grid(content, ids, reference_volume, shape)
        index = None if layers is not None else _export_index(scene, logic, segmentation_node, ids, reference_volume,
                                                              case_id, segmentation.GetName())
    what = (segmentation.GetName(), reference_volume.GetName())

    def index_of() -> np.ndarray:
        result = _paint(layers, shape) if layers is not None else index
        if result.shape != shape:
            raise ExportError(f"case '{case_id}': rasterized segmentation has shape {result.shape}, volume "
                              f"'{what[1]}' {shape}")
        if not result.any():
            raise ExportError(f"case '{case_id}': segmentation '{what[0]}' is empty (no segment has voxels inside "
                              f"volume '{what[1]}')")
        return result.astype(np.uint16, copy=False)

    return index_of, names


def _shape_of(volume) -> tuple[int, int, int]:
    image = volume.GetImageData()
    if image is None:
        raise ExportError(f"volume '{volume.GetName()}' has no voxels")
    nx, ny, nz = image.GetDimensions()
    return nz, ny, nx


def _export_index(scene, logic, segmentation_node, ids, reference_volume, case_id: str, name: str) -> np.ndarray:
    """Slicer's own export onto the reference grid (resamples segments made on another grid)."""
    import slicer
    import vtk

    id_array = vtk.vtkStringArray()
    for segment_id in ids:
        id_array.InsertNextValue(segment_id)
    out = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "AutoSeg export")
    if not logic.ExportSegmentsToLabelmapNode(segmentation_node, id_array, out, reference_volume,
                                              slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY):
        raise ExportError(f"case '{case_id}': segmentation '{name}' could not be rasterized on volume "
                          f"'{reference_volume.GetName()}'")
    return array_from_node(out)


def _layers_on_grid(content, ids, reference_volume, shape) -> list | None:
    """Copies of the segments' labelmap layers when they lie on the reference grid, else None.

    Returns ``[(segment number, label value, layer array, (z0, y0, x0))]`` in segment order.
    """
    import slicer
    import vtk
    from vtk.util import numpy_support

    from AutoSegLogic.volumes import ijk_to_ras

    binary = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    source = getattr(content, "GetSourceRepresentationName", None) or content.GetMasterRepresentationName
    if source() != binary:
        return None
    reference = ijk_to_ras(reference_volume)
    copies, out = {}, []
    for number, segment_id in enumerate(ids, start=1):
        segment = content.GetSegment(segment_id)
        image = segment.GetRepresentation(binary)
        if image is None or image.GetNumberOfScalarComponents() != 1:
            return None
        key = image.GetAddressAsString("vtkOrientedImageData")
        if key not in copies:
            matrix = vtk.vtkMatrix4x4()
            image.GetImageToWorldMatrix(matrix)
            grid = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
            if not np.allclose(grid, reference, rtol=0, atol=1e-4):
                return None
            x0, x1, y0, y1, z0, z1 = image.GetExtent()
            scalars = image.GetPointData().GetScalars()
            if x1 < x0 or y1 < y0 or z1 < z0 or scalars is None:
                copies[key] = None
            else:
                values = numpy_support.vtk_to_numpy(scalars).reshape(z1 - z0 + 1, y1 - y0 + 1, x1 - x0 + 1)
                copies[key] = (values.copy(), (z0, y0, x0))
        if copies[key] is not None:
            out.append((number, segment.GetLabelValue(), *copies[key]))
    return out


def _paint(layers: list, shape) -> np.ndarray:
    """The index array from copied layers: later segments over earlier ones (any thread)."""
    index = np.zeros(shape, np.uint16)
    for number, value, layer, start in layers:
        source, target = [], []
        for begin, size, full in zip(start, layer.shape, shape):  # clip the layer's extent to the grid
            low, high = max(begin, 0), min(begin + size, full)
            if high <= low:
                break
            source.append(slice(low - begin, high - begin))
            target.append(slice(low, high))
        else:
            block = index[tuple(target)]
            block[layer[tuple(source)] == value] = number
    return index


_GENERIC_NAME = re.compile(r"(?i)^(label[_ ]?\d*|invalid|none|)$")


def _name_from_colour_table(labelmap, segmentation_node) -> None:
    """Name imported segments as the labelmap's colour table names their values (not Label_1, ...).

    Entries with a terminology (Slicer 5.8+ colour tables can carry one) pass it on to the segment.
    """
    display = labelmap.GetDisplayNode()
    colours = display.GetColorNode() if display is not None else None
    if colours is None:
        return
    content = segmentation_node.GetSegmentation()
    for i in range(content.GetNumberOfSegments()):
        segment = content.GetNthSegment(i)
        value = segment.GetLabelValue()
        name = colours.GetColorName(value) if 0 <= value < colours.GetNumberOfColors() else ""
        if name and not _GENERIC_NAME.match(name.strip()):
            segment.SetName(name)
        get_terminology = getattr(colours, "GetTerminologyAsString", None)
        text = get_terminology(value) if get_terminology is not None else ""
        if text and terms.parse(text) is not None:
            segment.SetTerminology(text)


def _check_untransformed(node, case_id: str) -> None:
    if node.GetParentTransformNode() is not None:
        raise ExportError(f"case '{case_id}': '{node.GetName()}' is under transform "
                          f"'{node.GetParentTransformNode().GetName()}'; harden the transform first")


_segmentations_logic = None


def segmentations_logic(scene):
    """The Segmentations module logic; created once outside Slicer (that registers the converters)."""
    global _segmentations_logic
    import slicer

    modules = getattr(slicer, "modules", None)
    if modules is not None and hasattr(modules, "segmentations"):
        return modules.segmentations.logic()
    if _segmentations_logic is None:
        _segmentations_logic = slicer.vtkSlicerSegmentationsModuleLogic()
        _segmentations_logic.SetMRMLScene(scene)
    return _segmentations_logic


def _choose_case_id(explicit: str | None, name: str, taken: set[str]) -> str:
    if explicit is not None:
        if not _CASE_ID_RE.fullmatch(explicit):
            raise ExportError(f"case id '{explicit}' may hold only letters, digits, '_', '-' and '.'")
        if explicit.lower() in taken:
            raise ExportError(f"case '{explicit}' is already in the dataset; existing cases are never replaced "
                              "(remove it first, or choose another id)")
        return explicit
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_.-") or "case"
    candidate, n = base, 1
    while candidate.lower() in taken:
        n += 1
        candidate = f"{base}_{n}"
    return candidate


# -- writing -------------------------------------------------------------------------------------
def _label_values(item: _Prepared, index: np.ndarray, table: dict[str, int], ignore_unannotated: bool) -> np.ndarray:
    lookup = np.zeros(len(item.segment_names) + 1, np.int64)
    lookup[0] = table[IGNORE_LABEL_NAME] if ignore_unannotated else 0
    for i, name in enumerate(item.segment_names, start=1):
        lookup[i] = label_rules.value_of(table, name)
    values = lookup[index]
    return values.astype(np.uint8 if values.max() < 256 else np.uint16)


def _write_case(folder: Path, spec: DatasetSpec, item: _Prepared, index: np.ndarray, ignore_unannotated: bool) -> None:
    ending = spec.file_ending
    for c, image in enumerate(item.images):
        write_image(materialise(image), item.geometry, folder / "imagesTr" / f"{item.case_id}_{c:04d}{ending}")
    # The label last: a case without its label is not a training case yet.
    write_image(_label_values(item, index, spec.labels, ignore_unannotated), item.geometry,
                folder / "labelsTr" / f"{item.case_id}{ending}")


def _update_count(folder: Path) -> None:
    spec = load_spec(folder)
    count = len(scan_folder(folder, spec).cases)
    if count != spec.num_training:
        save_spec(folder, DatasetSpec(spec.channel_names, spec.labels, count, spec.file_ending, spec.extra))


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]])", r"[\1]", text)
