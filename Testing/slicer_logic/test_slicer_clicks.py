"""Correct with clicks (issue 21), on real MRML classes: Markups points -> LPS clicks, one segment
changed inside the answered region only, exact undo, and the real engine process behind it.

The engine runs a tiny model with random weights and click guidance, written in code: what is
tested is where the voxels go, not how good the answer is; the expected voxels of the chosen
segment come from the same model's ``Predictor.refine`` run in this process.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="the Slicer logic tests need the slicer-core wheel")

from AutoSegLib.imageio import Geometry  # noqa: E402
from AutoSegLib.inference.clicks import Click, click_index, index_to_physical  # noqa: E402

from AutoSegLogic import corrections, results, segment_masks  # noqa: E402
from AutoSegLogic.segment_masks import Grid, SegmentGridError  # noqa: E402
from AutoSegLogic.volumes import add_volume  # noqa: E402

LABELS = {"background": 0, "organ": 1, "tumour": 2}
SHAPE = (12, 24, 28)
# An oblique grid with its own spacing and origin: RAS != LPS != index anywhere.
_A = np.deg2rad(25)
GEOMETRY = Geometry((2.0, 1.0, 1.5), (-31.5, 12.25, 40.0),
                    tuple((np.array([[np.cos(_A), -np.sin(_A), 0], [np.sin(_A), np.cos(_A), 0], [0, 0, 1]])
                           @ np.diag([1, -1, 1])).ravel()))


def phantom():
    rng = np.random.default_rng(4)
    z, y, x = np.indices(SHAPE)
    organ = ((z - 6) / 5) ** 2 + ((y - 12) / 9) ** 2 + ((x - 13) / 10) ** 2 < 1
    tumour = ((z - 6) / 2.5) ** 2 + ((y - 12) / 3) ** 2 + ((x - 18) / 3) ** 2 < 1
    image = (100 * organ + 80 * tumour + rng.normal(0, 5, SHAPE)).astype(np.float32)
    label = np.where(tumour, 2, np.where(organ, 1, 0)).astype(np.uint8)
    return image, label


def build_scene(label=None):
    """A scene with the volume and a predicted segmentation (organ, tumour, one shared layer) plus a
    hand-made segment the model does not know ("marker", its own layer)."""
    scene = slicer.vtkMRMLScene()
    image, truth = phantom()
    label = truth if label is None else label
    volume = add_volume(scene, image, GEOMETRY, "ct")
    segmentation = results.segmentation_from_labels(scene, label, GEOMETRY, LABELS, "ct AutoSeg", volume)
    grid = Grid.of_volume(volume)
    marker = segmentation.GetSegmentation().AddEmptySegment("", "marker")
    mask = np.zeros(SHAPE, bool)
    mask[5:8, 10:14, 15:20] = True  # overlaps organ and tumour voxels: an overlapping layer of its own
    segment_masks.set_segment_mask(segmentation, marker, mask, grid)
    return scene, volume, segmentation, grid


def masks(segmentation, grid) -> dict[str, np.ndarray]:
    return {segment_masks.segment_name(segmentation, s): segment_masks.segment_mask(segmentation, s, grid)
            for s in segment_masks.segment_ids(segmentation)}


def segment_id(segmentation, name):
    return segmentation.GetSegmentation().GetSegmentIdBySegmentName(name)


def outside(region):
    out = np.ones(SHAPE, bool)
    out[region[0]:region[1], region[2]:region[3], region[4]:region[5]] = False
    return out


# -- masks on the grid -------------------------------------------------------------------------------
def test_segments_read_back_voxel_for_voxel_on_an_oblique_grid():
    scene, volume, segmentation, grid = build_scene()
    _, truth = phantom()
    found = masks(segmentation, grid)
    np.testing.assert_array_equal(found["organ"], truth == 1)
    np.testing.assert_array_equal(found["tumour"], truth == 2)
    assert found["marker"].sum() == 3 * 4 * 5
    np.testing.assert_array_equal(segment_masks.label_map(segmentation, grid, LABELS), truth)  # marker: no label


def test_a_segmentation_off_the_volumes_grid_is_refused():
    scene, volume, segmentation, grid = build_scene()
    shifted = Grid(grid.shape, grid.ijk_to_ras + np.pad(np.ones((3, 1)) * 0.5, ((0, 1), (3, 0))), "other")
    with pytest.raises(SegmentGridError, match="not on the voxel grid of 'other'"):
        segment_masks.check_segmentation(segmentation, shifted)


# -- applying an answer ---------------------------------------------------------------------------
def test_an_answer_changes_only_the_chosen_segment_and_only_inside_the_region():
    scene, volume, segmentation, grid = build_scene()
    before = masks(segmentation, grid)
    answer = np.zeros(SHAPE, np.uint8)  # the engine's whole label map: it disagrees everywhere
    answer[:, :, :] = 2
    answer[2:9, 4:20, 6:22] = 1
    answer[6, 12, 10] = 0
    region = (3, 9, 8, 18, 9, 24)
    step = segment_masks.apply_class_change(segmentation, segment_id(segmentation, "organ"), 1, answer, region, grid)
    after = masks(segmentation, grid)
    box = ~outside(region)
    organ = before["organ"].copy()
    organ[box] = answer[box] == 1
    np.testing.assert_array_equal(after["organ"], organ)
    gained = box & organ & ~before["organ"]
    assert gained.any() and (before["tumour"] & gained).any() and (before["marker"] & gained).any()
    for name in ("tumour", "marker"):  # lose exactly the voxels the organ gained; never gain any
        np.testing.assert_array_equal(after[name], before[name] & ~gained)
    assert not after["tumour"][before["organ"] & ~organ].any()  # what the organ lost goes to nobody
    for name in after:
        np.testing.assert_array_equal(after[name][outside(region)], before[name][outside(region)])
    assert step.changed_voxels == sum(int((after[n] != before[n]).sum()) for n in after)

    segment_masks.undo_step(segmentation, step, grid)
    for name, mask in masks(segmentation, grid).items():
        np.testing.assert_array_equal(mask, before[name])


def test_undo_is_refused_when_the_segment_was_edited_after_the_click():
    scene, volume, segmentation, grid = build_scene()
    answer = np.ones(SHAPE, np.uint8)
    organ = segment_id(segmentation, "organ")
    step = segment_masks.apply_class_change(segmentation, organ, 1, answer, (0, 4, 0, 4, 0, 4), grid)
    edited = segment_masks.segment_mask(segmentation, organ, grid)
    edited[1, 1, 1] = False  # as a Segment Editor erase would
    segment_masks.set_segment_mask(segmentation, organ, edited, grid)
    with pytest.raises(SegmentGridError, match="organ were edited after this click"):
        segment_masks.undo_step(segmentation, step, grid)
    np.testing.assert_array_equal(segment_masks.segment_mask(segmentation, organ, grid), edited)


# -- Markups -> clicks ---------------------------------------------------------------------------------
def test_points_become_lps_clicks_through_the_volume_geometry_and_a_parent_transform():
    import vtk

    scene = slicer.vtkMRMLScene()
    positive, negative = corrections.click_nodes(scene)
    assert corrections.click_nodes(scene) == (positive, negative)  # found again, not made twice
    assert positive.GetName() == corrections.POSITIVE_NAME and negative.GetAttribute(corrections.ROLE_ATTRIBUTE) == \
        "negative"
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = vtk.vtkMatrix4x4()
    for row, value in enumerate((5.0, -3.0, 2.5)):
        shift.SetElement(row, 3, value)
    transform.SetMatrixTransformToParent(shift)
    positive.SetAndObserveTransformNodeID(transform.GetID())
    lps = index_to_physical((3, 4, 5), GEOMETRY)  # the centre of voxel (z, y, x) = (3, 4, 5)
    ras = (-lps[0], -lps[1], lps[2])
    positive.AddControlPoint(vtk.vtkVector3d(ras[0] - 5.0, ras[1] + 3.0, ras[2] - 2.5))  # local = world - shift
    negative.AddControlPoint(vtk.vtkVector3d(*ras))
    (_, world), = corrections.placed_points(positive)
    np.testing.assert_allclose(world, ras, atol=1e-9)
    click = Click(1, True, corrections.lps_from_ras(world))
    np.testing.assert_allclose(click.point, lps, atol=1e-9)
    assert click_index(click, GEOMETRY, SHAPE) == (3, 4, 5)
    (_, plain), = corrections.placed_points(negative)
    assert click_index(Click(1, False, corrections.lps_from_ras(plain)), GEOMETRY, SHAPE) == (3, 4, 5)


def test_engine_errors_lose_their_log_lines():
    message = corrections.plain_error("refine: the engine process ended during refine (killed by signal 9). Its last "
                                      "messages:\nTraceback (most recent call last):\n  File x")
    assert message == "refine: the engine process ended during refine (killed by signal 9)."
    assert "Traceback" not in message


# -- the session with the real engine ------------------------------------------------------------------
def tiny_guided_model(root, guided=True):
    from AutoSegLogic.testing import tiny_guided_model as make

    return make(root, LABELS, GEOMETRY.spacing, SHAPE, guided=guided)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_guided_model(tmp_path_factory.mktemp("clicks"))


ENGINE_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_until(session, condition, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not condition():
        session.poll()
        assert time.monotonic() < deadline, f"gave up waiting; status {session.status}, {session.messages}"
        time.sleep(0.05)


def open_session(model, **kwargs):
    scene, volume, segmentation, grid = build_scene()
    session = corrections.CorrectionSession(scene, segmentation, [volume], model, device="cpu", env=ENGINE_ENV,
                                            **kwargs)
    run_until(session, lambda: session.status != corrections.STARTING)
    assert session.status == corrections.READY, session.messages
    return scene, volume, segmentation, grid, session


def place(node, index):
    import vtk

    lps = index_to_physical(index, GEOMETRY)
    node.AddControlPoint(vtk.vtkVector3d(-lps[0], -lps[1], lps[2]))


def test_clicks_update_only_the_chosen_segment_near_them_and_undo_exactly(model):
    import torch

    from AutoSegLib.inference import Predictor

    scene, volume, segmentation, grid, session = open_session(model)
    try:
        assert session.guided
        assert [name for _, name in session.segment_choices()] == ["organ", "tumour"]  # "marker": not the model's
        with pytest.raises(ValueError, match="'marker' is not a structure of the model"):
            session.choose_segment(segment_id(segmentation, "marker"))
        session.choose_segment(segment_id(segmentation, "tumour"))
        before = masks(segmentation, grid)
        previous = segment_masks.label_map(segmentation, grid, LABELS)
        place(session.positive, (6, 12, 11))
        place(session.negative, (6, 12, 19))
        run_until(session, lambda: session.undo_stack)
        step = session.undo_stack[-1]
        after = masks(segmentation, grid)
        assert session.positive.GetNthControlPointLabel(0) == "+ tumour"
        assert session.negative.GetNthControlPointLabel(0) == "- tumour"

        # the chosen segment inside the region is the engine's answer, as Predictor.refine computes it
        # here (one thread, as the engine process runs: the same sums in the same order)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            predictor = Predictor.from_model_dir(model, device="cpu", tta=False)
            expected = predictor.refine([phantom()[0]], GEOMETRY, previous, session.clicks())
        finally:
            torch.set_num_threads(threads)
        assert tuple(expected.region) == step.region
        box = ~outside(step.region)
        assert 0 < box.sum() < box.size  # near the clicks, not the whole image
        np.testing.assert_array_equal(after["tumour"][box], expected.labels[box] == 2)
        gained = box & after["tumour"] & ~before["tumour"]
        for name in ("organ", "marker"):
            np.testing.assert_array_equal(after[name], before[name] & ~gained)
        for name in after:
            np.testing.assert_array_equal(after[name][outside(step.region)], before[name][outside(step.region)])

        message = session.undo()
        assert message.startswith("Undone: the last click on tumour")
        for name, mask in masks(segmentation, grid).items():
            np.testing.assert_array_equal(mask, before[name])
        assert session.positive.GetNumberOfControlPoints() == session.negative.GetNumberOfControlPoints() == 0
        with pytest.raises(ValueError, match="no click to undo"):
            session.undo()
    finally:
        session.close()
    assert scene.GetFirstNodeByName(corrections.POSITIVE_NAME) is None  # Done removes the click lists


def test_a_dead_engine_is_reported_in_plain_words_and_the_click_is_removed(model):
    scene, volume, segmentation, grid, session = open_session(model)
    try:
        session.choose_segment(segment_id(segmentation, "organ"))
        before = masks(segmentation, grid)
        session.engine.process.kill()
        session.engine.process.wait(10)
        place(session.positive, (6, 12, 11))
        run_until(session, lambda: session.status == corrections.FAILED)
        text = "\n".join(session.messages)
        assert "The click could not be applied (its point was removed): the engine process ended before refine " \
               "(killed by signal 9)." in text
        assert "press Correct with clicks again to restart it" in text and "last messages" not in text
        assert session.positive.GetNumberOfControlPoints() == 0
        for name, mask in masks(segmentation, grid).items():
            np.testing.assert_array_equal(mask, before[name])
    finally:
        session.close()


def test_a_point_outside_the_volume_is_removed_with_a_message(model):
    scene, volume, segmentation, grid, session = open_session(model)
    try:
        session.choose_segment(segment_id(segmentation, "organ"))
        place(session.positive, (6, 12, 40))  # x = 40 of 28 voxels
        run_until(session, lambda: any("outside volume 'ct'" in m for m in session.messages))
        assert session.positive.GetNumberOfControlPoints() == 0 and not session.undo_stack
    finally:
        session.close()


def test_an_engine_that_cannot_start_says_why(tmp_path):
    broken = tiny_guided_model(tmp_path)
    (broken / "3d_fullres" / "fold_0" / "checkpoint_final.pt").write_bytes(b"")
    scene, volume, segmentation, grid = build_scene()
    session = corrections.CorrectionSession(scene, segmentation, [volume], broken, device="cpu", env=ENGINE_ENV)
    try:
        run_until(session, lambda: session.status != corrections.STARTING)
        assert session.status == corrections.FAILED
        assert session.messages[0].startswith("The correction engine could not start:")
        assert "Traceback" not in session.messages[0]
    finally:
        session.close()


def test_the_module_session_corrects_then_adds_the_corrected_case_to_the_training_set(model, tmp_path):
    from AutoSegLib.fileutil import read_json
    from AutoSegLib.imageio import read_image

    from AutoSegLogic.session import Session

    scene, volume, segmentation, grid = build_scene()
    segmentation.GetSegmentation().RemoveSegment(segment_id(segmentation, "marker"))
    session = Session(scene, env=ENGINE_ENV, log_dir=tmp_path / "logs")
    saved = []  # what the Segment Editor's undo would save: the state just before each change

    def before_change():
        saved.append(segment_masks.label_map(segmentation, grid, LABELS))

    correction = session.start_correcting(segmentation, [volume], model, device="cpu", before_change=before_change)
    try:
        run_until(session, lambda: correction.status != corrections.STARTING)
        correction.choose_segment(segment_id(segmentation, "organ"))
        place(correction.positive, (6, 12, 8))
        run_until(session, lambda: correction.undo_stack)
        corrected = segment_masks.label_map(segmentation, grid, LABELS)
        assert correction.undo_stack[-1].changed_voxels > 0 and not np.array_equal(corrected, phantom()[1])
        assert len(saved) == 1
        np.testing.assert_array_equal(saved[0], phantom()[1])
        result, _ = session.add_case(tmp_path / "Dataset901_Clicks", [volume], segmentation, ["CT"])
    finally:
        session.stop_correcting()
    assert session.correction is None and correction.status == corrections.CLOSED
    dataset = tmp_path / "Dataset901_Clicks"
    values = read_json(dataset / "dataset.json")["labels"]
    written, _ = read_image(next((dataset / "labelsTr").iterdir()))
    expected = np.zeros(SHAPE, np.uint8)
    expected[corrected == 1], expected[corrected == 2] = values["organ"], values["tumour"]
    np.testing.assert_array_equal(written, expected)
    assert result.case_ids and scene.GetFirstNodeByName(corrections.POSITIVE_NAME) is None


def test_a_region_of_a_segment_reads_as_that_box_of_the_whole_mask():
    scene, volume, segmentation, grid = build_scene()
    for name in ("organ", "marker"):
        whole = segment_masks.segment_mask(segmentation, segment_id(segmentation, name), grid)
        for region in [(0, 12, 0, 24, 0, 28), (5, 8, 10, 14, 15, 20), (0, 1, 0, 1, 0, 1), (3, 9, 2, 20, 16, 28)]:
            box = whole[region[0]:region[1], region[2]:region[3], region[4]:region[5]]
            np.testing.assert_array_equal(
                segment_masks.segment_mask(segmentation, segment_id(segmentation, name), grid, region), box)


def test_writing_a_segment_that_moves_away_clears_its_old_voxels_and_keeps_the_shared_layer():
    scene, volume, segmentation, grid = build_scene()
    before = masks(segmentation, grid)
    organ = segment_id(segmentation, "organ")
    moved = np.zeros(SHAPE, bool)
    moved[0:2, 0:3, 0:4] = True  # far from where the organ was, and partly on nothing else
    segment_masks.set_segment_mask(segmentation, organ, moved, grid)
    after = masks(segmentation, grid)
    np.testing.assert_array_equal(after["organ"], moved)
    np.testing.assert_array_equal(after["tumour"], before["tumour"])
    np.testing.assert_array_equal(after["marker"], before["marker"])
    segment_masks.set_segment_mask(segmentation, organ, np.zeros(SHAPE, bool), grid)
    assert not segment_masks.segment_mask(segmentation, organ, grid).any()
    content = segmentation.GetSegmentation()
    assert content.GetNumberOfLayers() == 2  # organ and tumour still share theirs (marker has its own)


def test_points_wait_when_the_chosen_segment_is_renamed_to_a_name_the_model_does_not_know(model):
    scene, volume, segmentation, grid, session = open_session(model)
    try:
        organ = segment_id(segmentation, "organ")
        session.choose_segment(organ)
        segmentation.GetSegmentation().GetSegment(organ).SetName("organ (checked)")
        place(session.positive, (6, 12, 8))
        for _ in range(5):
            session.poll()
        assert session.segment_id is None and session.status == corrections.READY and not session.undo_stack
        assert sum("'organ (checked)' is not a structure of the model" in m for m in session.messages) == 1
        session.choose_segment(segment_id(segmentation, "tumour"))
        run_until(session, lambda: session.undo_stack)
        assert session.positive.GetNthControlPointLabel(0) == "+ tumour"
    finally:
        session.close()


def test_done_while_the_engine_starts_stops_the_engine_it_was_starting(model):
    from AutoSegLib.inference.engine_process import EngineProcess

    started = []

    def factory(*args, **kwargs):
        engine = corrections.default_engine(*args, **kwargs)
        started.append(engine)
        return engine

    scene, volume, segmentation, grid = build_scene()
    session = corrections.CorrectionSession(scene, segmentation, [volume], model, device="cpu", env=ENGINE_ENV,
                                            engine_factory=factory)
    job = session._job
    session.close()
    deadline = time.monotonic() + 120
    while not job.finished:
        job.poll()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert len(started) == 1 and isinstance(started[0], EngineProcess)
    assert started[0].closed and started[0].process.poll() is not None


def test_a_model_without_click_guidance_still_answers_and_the_user_is_told(tmp_path):
    plain = tiny_guided_model(tmp_path, guided=False)
    scene, volume, segmentation, grid, session = open_session(plain)
    try:
        assert session.guided is False
        assert "trained without click guidance" in session.messages[0]
        session.choose_segment(segment_id(segmentation, "organ"))
        before = masks(segmentation, grid)
        place(session.negative, (6, 12, 13))
        run_until(session, lambda: session.undo_stack)
        region = session.undo_stack[-1].region
        for name, mask in masks(segmentation, grid).items():
            np.testing.assert_array_equal(mask[outside(region)], before[name][outside(region)])
    finally:
        session.close()
