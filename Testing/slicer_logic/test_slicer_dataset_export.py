"""Scene -> dataset folder: layout, label values by name, geometry (RAS/LPS), append, refusals.

Geometry is checked independently of the code under test: SimpleITK's physical point of a
voxel index in the written file (LPS) must equal MRML's IJKToRAS applied to the same index,
with x and y negated.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from AutoSegLib.imageio import Geometry, read_image
from AutoSegLib.verify import verify_dataset
from AutoSegLogic import dataset_export, testing, volumes
from AutoSegLogic.dataset_export import ExportError, SceneCase

LABELS = {"background": 0, "liver": 1, "spleen": 2, "kidney": 3}


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def oblique_matrix(spacing_xyz=(0.7, 1.3, 3.0), origin_ras=(12.5, -40.0, 101.0), angles=(0.3, -0.2, 0.5)) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = rotation(*angles) * np.asarray(spacing_xyz)
    matrix[:3, 3] = origin_ras
    return matrix


def volume_node(scene, array, ijk_to_ras, name="vol", labelmap=False):
    geometry = volumes.geometry_from_matrix(ijk_to_ras)
    return volumes.add_volume(scene, array, geometry, name, labelmap)


def boxes(shape, *regions) -> np.ndarray:
    label = np.zeros(shape, np.uint8)
    for value, (z, y, x) in regions:
        label[z[0]:z[1], y[0]:y[1], x[0]:x[1]] = value
    return label


def make_case(scene, name, label, labels=LABELS, matrix=None, seed=0):
    matrix = oblique_matrix() if matrix is None else matrix
    image = (np.random.default_rng(seed).normal(0, 10, label.shape) + 40 * label).astype(np.int16)
    volume = volume_node(scene, image, matrix, name)
    geometry = volumes.geometry_from_matrix(matrix)
    segmentation = testing.segmentation_from_array(scene, label, geometry,
                                                   {n: v for n, v in labels.items() if v in np.unique(label)},
                                                   f"{name} seg")
    return volume, segmentation, image


def files_of(folder) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


SHAPE = (6, 9, 11)
LABEL = boxes(SHAPE, (1, ((1, 4), (2, 6), (2, 7))), (2, ((3, 5), (6, 8), (7, 10))))


# -- layout, values, geometry -----------------------------------------------------------------------
def test_export_writes_the_layout_with_labels_by_name_and_exact_oblique_geometry(scene, tmp_path):
    matrix = oblique_matrix()
    volume, segmentation, image = make_case(scene, "Patient 7 CT", LABEL, matrix=matrix)
    result = dataset_export.export_cases(tmp_path / "DS", [SceneCase([volume], segmentation)], scene, ["CT"])

    assert result.case_ids == ["Patient_7_CT"] and result.added_labels == ["liver", "spleen"]
    folder = tmp_path / "DS"
    assert files_of(folder) == {"dataset.json", "imagesTr/Patient_7_CT_0000.nii.gz", "labelsTr/Patient_7_CT.nii.gz"}
    spec = json.loads((folder / "dataset.json").read_text())
    terminology = spec.pop("terminology")
    assert spec == {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "spleen": 2},
                    "numTraining": 1, "file_ending": ".nii.gz"}
    assert [terminology[n]["type"][1] for n in ("liver", "spleen")] == ["10200004", "78961009"]
    written, _ = read_image(folder / "imagesTr/Patient_7_CT_0000.nii.gz")
    label, _ = read_image(folder / "labelsTr/Patient_7_CT.nii.gz")
    assert np.array_equal(written, image) and written.dtype == image.dtype
    assert np.array_equal(label, LABEL)
    for path in ("imagesTr/Patient_7_CT_0000.nii.gz", "labelsTr/Patient_7_CT.nii.gz"):
        itk = sitk.ReadImage(str(folder / path))
        for ijk in [(0, 0, 0), (10, 0, 0), (0, 8, 0), (0, 0, 5), (10, 8, 5)]:
            ras = matrix @ np.array([*ijk, 1.0])
            lps = np.array(itk.TransformIndexToPhysicalPoint(ijk))
            assert np.allclose(lps, [-ras[0], -ras[1], ras[2]], atol=1e-3), (path, ijk)
    assert verify_dataset(folder, num_processes=1).ok


@pytest.mark.parametrize("protocol_index", [0, 1, 2, 3])
def test_phantom_protocols_round_trip_through_the_scene(scene, tmp_path, protocol_index):
    """Thin, thick, flipped and oblique phantom scans come back voxel for voxel, geometry exact."""
    from AutoSegLib.synthetic import make_case as phantom

    case = phantom("ct", 11, protocol_index)
    (volume,), segmentation = testing.phantom_case(scene, 11, protocol_index)
    result = dataset_export.export_cases(tmp_path / "DS", [SceneCase([volume], segmentation)], scene, ["CT"])
    label, geometry = read_image(tmp_path / "DS" / "labelsTr" / f"{result.case_ids[0]}.nii.gz")
    image, _ = read_image(tmp_path / "DS" / "imagesTr" / f"{result.case_ids[0]}_0000.nii.gz")
    assert np.array_equal(image, case.images[0]) and np.array_equal(label, case.label), case.protocol
    assert np.allclose(geometry.spacing, case.geometry.spacing) and np.allclose(geometry.origin, case.geometry.origin,
                                                                                 atol=1e-4)
    assert np.allclose(geometry.direction, case.geometry.direction, atol=1e-6)


def test_matrix_and_geometry_are_inverse():
    matrix = oblique_matrix()
    geometry = volumes.geometry_from_matrix(matrix)
    assert geometry.spacing == pytest.approx((3.0, 1.3, 0.7))  # numpy order z, y, x
    assert geometry.origin == pytest.approx((-12.5, 40.0, 101.0))  # LPS
    assert np.allclose(volumes.matrix_from_geometry(geometry), matrix)


def test_segmentation_on_another_grid_is_rasterized_on_the_reference_grid(scene, tmp_path):
    """Segments drawn on a 3x finer grid land on the reference (first) volume's voxels."""
    coarse = oblique_matrix()
    fine = coarse.copy()
    fine[:3, :3] = coarse[:3, :3] / 3
    fine[:3, 3] = coarse[:3, 3] - coarse[:3, :3] @ np.array([1 / 3] * 3)  # fine voxel 1 = coarse voxel 0
    expected = boxes(SHAPE, (1, ((1, 4), (2, 6), (2, 7))))
    fine_label = np.zeros(tuple(3 * s for s in SHAPE), np.uint8)
    fine_label[3:12, 6:18, 6:21] = 1  # coarse voxels [1,4) x [2,6) x [2,7)
    volume = volume_node(scene, np.zeros(SHAPE, np.int16), coarse, "coarse")
    segmentation = testing.segmentation_from_array(scene, fine_label, volumes.geometry_from_matrix(fine),
                                                   {"liver": 1}, "drawn on fine grid")
    dataset_export.export_cases(tmp_path / "DS", [SceneCase([volume], segmentation, "c1")], scene, ["CT"])
    label, geometry = read_image(tmp_path / "DS" / "labelsTr" / "c1.nii.gz")
    assert label.shape == SHAPE and np.array_equal(label, expected)
    assert np.allclose(volumes.matrix_from_geometry(geometry), coarse)


def test_rasterize_leaves_the_scene_as_it_was(scene):
    volume, segmentation, _ = make_case(scene, "v", LABEL)
    before = scene.GetNumberOfNodes()
    dataset_export.rasterize(scene, segmentation, volume)
    assert scene.GetNumberOfNodes() == before


def test_overlapping_segments_later_one_wins(scene, tmp_path):
    volume = volume_node(scene, np.zeros(SHAPE, np.int16), oblique_matrix(), "v")
    geometry = volumes.geometry_from_matrix(oblique_matrix())
    segmentation = testing.segmentation_from_array(scene, boxes(SHAPE, (1, ((0, 6), (0, 9), (0, 6)))), geometry,
                                                   {"liver": 1}, "s")
    extra = testing.segmentation_from_array(scene, boxes(SHAPE, (1, ((0, 6), (0, 9), (4, 11)))), geometry,
                                            {"spleen": 1}, "t")
    segmentation.GetSegmentation().CopySegmentFromSegmentation(extra.GetSegmentation(),
                                                               extra.GetSegmentation().GetNthSegmentID(0))
    dataset_export.export_cases(tmp_path / "DS", [SceneCase([volume], segmentation, "c")], scene, ["CT"])
    label, _ = read_image(tmp_path / "DS" / "labelsTr" / "c.nii.gz")
    assert (label[:, :, :4] == 1).all() and (label[:, :, 4:] == 2).all()


# -- appending -------------------------------------------------------------------------------------
def test_append_keeps_existing_cases_and_values_and_numbers_new_names(scene, tmp_path):
    folder = tmp_path / "DS"
    volume, segmentation, _ = make_case(scene, "first", LABEL)
    dataset_export.export_cases(folder, [SceneCase([volume], segmentation)], scene, ["CT"])
    first_label = (folder / "labelsTr" / "first.nii.gz").read_bytes()

    second = boxes(SHAPE, (2, ((0, 2), (0, 3), (0, 3))), (3, ((4, 6), (5, 9), (6, 11))))
    volume2, segmentation2, _ = make_case(scene, "second", second, {"background": 0, "Spleen ": 2, "kidney": 3})
    result = dataset_export.export_cases(folder, [SceneCase([volume2], segmentation2)], scene)  # names from the dataset

    assert result.added_labels == ["kidney"]
    assert (folder / "labelsTr" / "first.nii.gz").read_bytes() == first_label
    spec = json.loads((folder / "dataset.json").read_text())
    assert spec["labels"] == {"background": 0, "liver": 1, "spleen": 2, "kidney": 3} and spec["numTraining"] == 2
    label, _ = read_image(folder / "labelsTr" / "second.nii.gz")
    assert np.array_equal(label, second)  # "Spleen " is the dataset's spleen (2); kidney is new (3)
    assert verify_dataset(folder, num_processes=1).ok


def test_case_ids_come_from_volume_names_and_never_collide(scene, tmp_path):
    folder = tmp_path / "DS"
    cases = [SceneCase([make_case(scene, "CT scan", LABEL, seed=s)[0]], make_case(scene, f"x{s}", LABEL)[1])
             for s in range(2)]
    first = dataset_export.export_cases(folder, cases[:1], scene, ["CT"])
    second = dataset_export.export_cases(folder, cases[1:], scene, ["CT"])
    assert first.case_ids == ["CT_scan"] and second.case_ids == ["CT_scan_2"]
    assert [c.case_id for c in dataset_export.list_cases(folder)] == ["CT_scan", "CT_scan_2"]


def test_partially_annotated_case_marks_the_rest_ignore(scene, tmp_path):
    folder = tmp_path / "DS"
    partial = boxes(SHAPE, (1, ((1, 4), (2, 6), (2, 7))), (9, ((0, 6), (0, 2), (0, 11))))
    volume, segmentation, _ = make_case(scene, "partial", partial, {"liver": 1, "background": 9})
    result = dataset_export.export_cases(folder, [SceneCase([volume], segmentation)], scene, ["CT"],
                                         ignore_unannotated=True)
    assert result.labels == {"background": 0, "liver": 1, "ignore": 2}
    label, _ = read_image(folder / "labelsTr" / "partial.nii.gz")
    expected = np.full(SHAPE, 2, np.uint8)
    expected[:, 0:2, :] = 0  # painted "background"
    expected[1:4, 2:6, 2:7] = 1
    assert np.array_equal(label, expected)
    assert verify_dataset(folder, num_processes=1).ok

    # a new structure now would need 'ignore' renumbered in existing files: refused, nothing written
    before = files_of(folder), (folder / "dataset.json").read_text()
    volume2, segmentation2, _ = make_case(scene, "later", LABEL, {"liver": 1, "aorta": 2})
    with pytest.raises(ExportError, match=r"case 'later'.*\['aorta'\].*'ignore'"):
        dataset_export.export_cases(folder, [SceneCase([volume2], segmentation2)], scene)
    assert (files_of(folder), (folder / "dataset.json").read_text()) == before


def test_a_labelmap_node_takes_segment_names_from_its_colour_table(scene, tmp_path):
    import slicer

    matrix = oblique_matrix()
    volume = volume_node(scene, np.zeros(SHAPE, np.int16), matrix, "v")
    labelmap = volume_node(scene, LABEL, matrix, "labels", labelmap=True)
    colours = slicer.vtkMRMLColorTableNode()
    colours.SetTypeToUser()
    colours.SetNumberOfColors(3)
    for value, name in enumerate(["background", "Liver", "Spleen"]):
        colours.SetColor(value, name, 0.5, 0.5, 0.5, 1.0)
    scene.AddNode(colours)
    labelmap.GetDisplayNode().SetAndObserveColorNodeID(colours.GetID())
    dataset_export.export_cases(tmp_path / "DS", [SceneCase([volume], labelmap, "lm")], scene, ["CT"])
    spec = json.loads((tmp_path / "DS" / "dataset.json").read_text())
    assert spec["labels"] == {"background": 0, "Liver": 1, "Spleen": 2}
    label, _ = read_image(tmp_path / "DS" / "labelsTr" / "lm.nii.gz")
    assert np.array_equal(label, LABEL)


def test_second_channel_on_another_grid_is_resampled_onto_the_first(scene, tmp_path):
    first_matrix = np.diag([1.0, 1.0, 2.0, 1.0])
    second_matrix = np.diag([2.0, 2.0, 2.0, 1.0])
    t1 = np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE)
    y, x = np.mgrid[0:5, 0:6]
    t2 = np.broadcast_to((10 * x + 100 * y).astype(np.int16), (SHAPE[0], 5, 6)).copy()  # linear in x, y
    v1, v2 = volume_node(scene, t1, first_matrix, "T1"), volume_node(scene, t2, second_matrix, "T2")
    segmentation = testing.segmentation_from_array(scene, LABEL, volumes.geometry_from_matrix(first_matrix),
                                                   {"liver": 1, "spleen": 2}, "s")
    result = dataset_export.export_cases(tmp_path / "DS", [SceneCase([v1, v2], segmentation, "mr")], scene,
                                         ["T1", "T2"])
    assert any("'T2' resampled onto the grid of 'T1'" in n for n in result.notes)
    out, geometry = read_image(tmp_path / "DS" / "imagesTr" / "mr_0001.nii.gz")
    assert out.shape == SHAPE and out.dtype == np.int16
    assert np.allclose(volumes.matrix_from_geometry(geometry), first_matrix)
    # T2's value at a T1 voxel centre (x, y in mm) is 10 * x/2 + 100 * y/2 (linear interpolation is exact)
    assert out[2, 4, 6] == 10 * 6 / 2 + 100 * 4 / 2
    assert verify_dataset(tmp_path / "DS", num_processes=1).ok


def test_remove_case_deletes_its_files_and_updates_the_count(scene, tmp_path):
    folder = tmp_path / "DS"
    cases = [SceneCase([make_case(scene, f"c{i}", LABEL, seed=i)[0]], make_case(scene, f"s{i}", LABEL)[1], f"c{i}")
             for i in range(2)]
    dataset_export.export_cases(folder, cases, scene, ["CT"])
    removed = dataset_export.remove_case(folder, "c0")
    assert sorted(p.name for p in removed) == ["c0.nii.gz", "c0_0000.nii.gz"]
    assert [c.case_id for c in dataset_export.list_cases(folder)] == ["c1"]
    assert json.loads((folder / "dataset.json").read_text())["numTraining"] == 1
    with pytest.raises(ExportError, match="no case 'c0'"):
        dataset_export.remove_case(folder, "c0")


def test_prediction_input_has_one_file_per_channel_on_the_first_grid(scene, tmp_path):
    v1 = volume_node(scene, np.ones(SHAPE, np.int16), oblique_matrix(), "a")
    v2 = volume_node(scene, np.ones((3, 4, 5), np.float32), np.diag([3.0, 3.0, 3.0, 1.0]), "b")
    dataset_export.write_prediction_input(tmp_path / "in", [v1, v2], "case")
    assert files_of(tmp_path / "in") == {"case_0000.nii.gz", "case_0001.nii.gz"}
    _, g0 = read_image(tmp_path / "in" / "case_0000.nii.gz")
    a1, g1 = read_image(tmp_path / "in" / "case_0001.nii.gz")
    assert a1.shape == SHAPE and g0 == g1


# -- refusals: each names the case and writes nothing -------------------------------------------------
def refused(folder, call, match):
    before = files_of(folder) if folder.exists() else set()
    with pytest.raises(ExportError, match=match):
        call()
    assert (files_of(folder) if folder.exists() else set()) == before


def test_refuses_a_different_channel_count(scene, tmp_path):
    folder = tmp_path / "DS"
    volume, segmentation, _ = make_case(scene, "one", LABEL)
    dataset_export.export_cases(folder, [SceneCase([volume], segmentation)], scene, ["CT"])
    extra = volume_node(scene, np.zeros(SHAPE, np.int16), oblique_matrix(), "second")
    refused(folder, lambda: dataset_export.export_cases(folder, [SceneCase([volume, extra], segmentation, "two")],
                                                        scene),
            r"case 'two': 2 volume\(s\) \('one', 'second'\) but the dataset has 1 channel\(s\) \(CT\)")
    refused(folder, lambda: dataset_export.export_cases(folder, [SceneCase([volume], segmentation, "t")], scene,
                                                        ["T1"]), r"channels are \['CT'\], not \['T1'\]")


def test_refuses_an_empty_segmentation(scene, tmp_path):
    folder = tmp_path / "DS"
    volume = volume_node(scene, np.zeros(SHAPE, np.int16), oblique_matrix(), "v")
    empty = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "nothing")
    refused(folder, lambda: dataset_export.export_cases(folder, [SceneCase([volume], empty, "e1")], scene, ["CT"]),
            r"case 'e1': segmentation 'nothing' has no segments")
    elsewhere = oblique_matrix(origin_ras=(900.0, 900.0, 900.0))  # segments entirely outside the volume
    outside = testing.segmentation_from_array(scene, LABEL, volumes.geometry_from_matrix(elsewhere),
                                              {"liver": 1, "spleen": 2}, "far away")
    refused(folder, lambda: dataset_export.export_cases(folder, [SceneCase([volume], outside, "e2")], scene, ["CT"]),
            r"case 'e2': segmentation 'far away' is empty")


def test_refuses_a_sheared_grid_naming_the_case(scene, tmp_path):
    folder = tmp_path / "DS"
    volume, segmentation, _ = make_case(scene, "ok", LABEL)
    sheared = oblique_matrix()
    sheared[0, 1] += 0.4
    bad = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "sheared")
    volumes.set_node_array(bad, np.zeros(SHAPE, np.int16))
    bad.SetIJKToRASMatrix(volumes._vtk_matrix(sheared))
    refused(folder, lambda: dataset_export.export_cases(folder, [SceneCase([volume], segmentation),
                                                                 SceneCase([bad], segmentation)], scene, ["CT"]),
            r"case 'sheared': volume 'sheared': its IJK-to-RAS directions .* are not orthonormal")


def test_refuses_transformed_nodes_and_reused_case_ids(scene, tmp_path):
    folder = tmp_path / "DS"
    volume, segmentation, _ = make_case(scene, "v", LABEL)
    dataset_export.export_cases(folder, [SceneCase([volume], segmentation, "case1")], scene, ["CT"])
    refused(folder, lambda: dataset_export.export_cases(folder, [SceneCase([volume], segmentation, "CASE1")], scene),
            r"case 'CASE1' is already in the dataset")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    volume.SetAndObserveTransformNodeID(transform.GetID())
    refused(folder, lambda: dataset_export.export_cases(folder, [SceneCase([volume], segmentation, "c2")], scene),
            r"case 'c2': volume 'v' is under transform 'shift'; harden")


def test_refuses_a_new_dataset_without_channel_names_or_in_a_foreign_folder(scene, tmp_path):
    volume, segmentation, _ = make_case(scene, "v", LABEL)
    refused(tmp_path / "new", lambda: dataset_export.export_cases(tmp_path / "new", [SceneCase([volume], segmentation)],
                                                                  scene), "give the channel names")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    refused(tmp_path / "busy", lambda: dataset_export.export_cases(tmp_path / "busy",
                                                                   [SceneCase([volume], segmentation)], scene, ["CT"]),
            "not empty and has no dataset.json")


def test_geometry_equality_uses_verify_tolerances():
    g = Geometry((2.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    nudged = Geometry((2.0, 1.0, 1.0), (0.0005, 0.0, 0.0), g.direction)
    assert volumes.same_grid(g, (2, 3, 4), nudged, (2, 3, 4))
    assert not volumes.same_grid(g, (2, 3, 4), nudged, (2, 3, 5))
    assert not volumes.same_grid(g, (2, 3, 4), Geometry(g.spacing, (0.01, 0.0, 0.0), g.direction), (2, 3, 4))


# -- removing cases -----------------------------------------------------------------------------------
@pytest.mark.parametrize("case_id", ["../evil", "..", "a/b", "/tmp/x", "x\n", ""])
def test_remove_case_refuses_anything_but_a_plain_case_name(scene, tmp_path, case_id):
    volume, segmentation, _ = make_case(scene, "p1", LABEL)
    dataset_export.export_cases(tmp_path / "DS", [SceneCase([volume], segmentation)], scene, ["CT"])
    outside = tmp_path / "DS" / "evil.nii.gz"  # what "../evil" would name from labelsTr
    outside.write_bytes(b"keep me")
    before = files_of(tmp_path / "DS")
    with pytest.raises(ExportError, match="is not a case name"):
        dataset_export.remove_case(tmp_path / "DS", case_id)
    assert files_of(tmp_path / "DS") == before and outside.read_bytes() == b"keep me"


def test_remove_case_goes_through_the_session_and_is_refused_while_training_runs(scene, tmp_path):
    from AutoSegLogic.jobs import Step
    from AutoSegLogic.session import Session

    volume, segmentation, _ = make_case(scene, "p1", LABEL)
    session = Session(scene, log_dir=tmp_path / "logs")
    session.add_case(tmp_path / "DS", [volume], segmentation, ["CT"])
    session.start_steps([Step(["verify", str(tmp_path / "DS")], "check")])  # not polled: still running
    with pytest.raises(RuntimeError, match="training is still running"):
        session.remove_case(tmp_path / "DS", "p1")
    with pytest.raises(RuntimeError, match="training is still running"):
        session.start_add_case(tmp_path / "DS", [volume], segmentation, ["CT"])
    session.training.kill()
    testing.wait_until(session, timeout=60)
    assert session.remove_case(tmp_path / "DS", "p1") and dataset_export.list_cases(tmp_path / "DS") == []


def test_cases_are_read_from_their_labelmap_layers_as_slicers_export_reads_them(scene):
    """The fast path (layers already on the volume's grid, painted in a worker) equals Slicer's export."""
    overlapping = LABEL.copy()
    volume, segmentation, _ = make_case(scene, "p1", overlapping)
    content = segmentation.GetSegmentation()
    extra = testing.segmentation_from_array(scene, boxes(SHAPE, (1, ((2, 5), (3, 7), (5, 9)))), volumes.node_geometry(
        volume), {"lesion": 1}, "extra")
    content.AddSegment(extra.GetSegmentation().GetNthSegment(0))  # overlaps liver and spleen: it must win
    fast, names = dataset_export.rasterize(scene, segmentation, volume)
    layers = dataset_export._layers_on_grid(content, [content.GetNthSegmentID(i) for i in range(3)], volume,
                                            fast.shape)
    assert layers is not None and names == ["liver", "spleen", "lesion"]
    logic = dataset_export.segmentations_logic(scene)
    ids = [content.GetNthSegmentID(i) for i in range(3)]
    with volumes.temporary_nodes(scene):
        slow = dataset_export._export_index(scene, logic, segmentation, ids, volume, "p1", "p1 seg")
    assert np.array_equal(fast, slow) and (fast == 3).any()


def test_a_voxel_snapshot_is_copied_later_and_refuses_voxels_changed_in_place(scene):
    """The GUI thread only takes a snapshot; the writing thread copies it."""
    from vtk.util import numpy_support

    image = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    volume = volume_node(scene, image, np.eye(4))
    snapshot = volumes.VoxelSnapshot(volume)
    volumes.set_node_array(volume, image + 100)  # a filter's new voxels: the snapshot keeps the old ones
    assert np.array_equal(snapshot.array(), image)
    snapshot = volumes.VoxelSnapshot(volume)
    scalars = volume.GetImageData().GetPointData().GetScalars()
    numpy_support.vtk_to_numpy(scalars)[:] = 7  # edited in place, as slicer.util.arrayFromVolume users do
    scalars.Modified()
    with pytest.raises(volumes.GeometryError, match="was changed while it was being saved"):
        snapshot.array()
