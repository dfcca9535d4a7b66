"""Tests of the embedded phantom data (AutoSegLib.synthetic)."""

from __future__ import annotations

import io
import json
from functools import lru_cache

import numpy as np
import pytest
from scipy import ndimage

from AutoSegLib.cli import main
from AutoSegLib.dataset import open_dataset
from AutoSegLib.events import Reporter
from AutoSegLib.imageio import Geometry, read_image
from AutoSegLib.synthetic import channel_names, label_table, make_case, make_phantom_dataset, protocol_of
from AutoSegLib.synthetic.anatomy import Tissue
from AutoSegLib.synthetic.grid import PROTOCOLS, Grid

LABELS = label_table("ct")


@lru_cache(maxsize=None)
def case(kind: str, seed: int, index: int, channels: int | None = None):
    return make_case(kind, seed, index, channels)


def direction(geometry: Geometry) -> np.ndarray:
    return np.array(geometry.direction).reshape(3, 3)


def best_threshold_dice(target: np.ndarray, other: np.ndarray) -> float:
    """Best Dice for ``target`` of any rule "value above t" or "value below t" on target+other."""
    values = np.concatenate([target, other])
    truth = np.concatenate([np.ones(target.size), np.zeros(other.size)])[np.argsort(values, kind="stable")]
    below_tp = np.cumsum(truth)
    below_n = np.arange(1, truth.size + 1)
    above_tp, above_n = target.size - below_tp, truth.size - below_n
    return float(max((2 * below_tp / (below_n + target.size)).max(), (2 * above_tp / (above_n + target.size)).max()))


# -- determinism -----------------------------------------------------------------------------
def test_same_seed_and_index_give_identical_case():
    first, again = make_case("ct", 3, 1), make_case("ct", 3, 1)
    assert first.geometry == again.geometry
    np.testing.assert_array_equal(first.images[0], again.images[0])
    np.testing.assert_array_equal(first.label, again.label)


def test_case_does_not_depend_on_how_many_cases_are_generated(tmp_path):
    make_phantom_dataset(tmp_path / "two", cases=2, seed=5)
    make_phantom_dataset(tmp_path / "five", cases=5, seed=5)
    for name in ("imagesTr/phantom_ct_001_0000.nii.gz", "labelsTr/phantom_ct_001.nii.gz"):
        small, small_geometry = read_image(tmp_path / "two" / name)
        large, large_geometry = read_image(tmp_path / "five" / name)
        np.testing.assert_array_equal(small, large)
        assert small_geometry == large_geometry


def test_seeds_cases_and_splits_differ():
    base = case("ct", 0, 0)
    for other in (case("ct", 1, 0), case("ct", 0, 1), make_case("ct", 0, 0, split="test")):
        assert other.geometry != base.geometry
        assert other.label.shape != base.label.shape or not np.array_equal(other.label, base.label)


def test_ct_and_mr_with_one_seed_are_the_same_patients_on_the_same_grids():
    ct, mr = case("ct", 0, 2), case("mr", 0, 2, 2)
    assert ct.geometry == mr.geometry
    np.testing.assert_array_equal(ct.label, mr.label)


# -- geometry ------------------------------------------------------------------------------
def test_every_block_of_four_cases_holds_every_protocol():
    for seed in range(4):
        for block in range(3):
            assert sorted(protocol_of(seed, 4 * block + i) for i in range(4)) == sorted(PROTOCOLS)


def test_geometry_varies_and_stays_valid_across_eight_cases():
    cases = [case("ct", 0, i) for i in range(8)]
    ratios, identity = [], []
    for c in cases:
        z, y, x = c.label.shape
        assert 24 <= z <= 48 and 64 <= y <= 112 and 64 <= x <= 112, c.label.shape
        spacing = c.geometry.spacing
        assert spacing[1] == spacing[2] and 0.7 <= spacing[1] <= 1.6, spacing
        d = direction(c.geometry)
        np.testing.assert_allclose(d.T @ d, np.eye(3), atol=1e-12)
        ratios.append(spacing[0] / spacing[1])
        identity.append(np.array_equal(d, np.eye(3)))
        for value in spacing + c.geometry.origin:  # survives a NIfTI header's float32 exactly
            assert float(np.float32(value)) == value
    assert max(ratios) >= 3.0 and min(ratios) < 2.0
    assert not all(identity) and any(identity)
    assert any(np.any(np.abs(direction(c.geometry)) % 1 > 1e-6) for c in cases)  # an oblique grid
    assert len({c.geometry.origin for c in cases}) == 8 and len({c.label.shape for c in cases}) == 8


def test_anatomy_lives_in_physical_space_not_on_the_grid():
    own = case("ct", 0, 1)
    g = own.geometry
    corners = np.array([[i, j, k] for i in (0, own.label.shape[2] - 1) for j in (0, own.label.shape[1] - 1)
                        for k in (0, own.label.shape[0] - 1)], float)
    world = np.array(g.origin) + (corners * np.array(g.spacing[::-1])) @ direction(g).T
    lo, hi = world.min(0), world.max(0)
    step = 0.9
    shape = tuple(int(n) for n in np.ceil((hi - lo) / step)[::-1] + 1)
    other = Grid(shape, Geometry((step,) * 3, tuple(lo), tuple(np.eye(3).ravel())))
    resampled = make_case("ct", 0, 1, grid=other)
    for name in ("liver", "spleen", "kidneys"):
        vol_own, centre_own = _volume_and_centre(own.label == LABELS[name], g)
        vol_new, centre_new = _volume_and_centre(resampled.label == LABELS[name], other.geometry)
        assert abs(vol_new / vol_own - 1) < 0.1, name
        assert np.linalg.norm(centre_new - centre_own) < 1.5, name


def _volume_and_centre(mask: np.ndarray, geometry: Geometry) -> tuple[float, np.ndarray]:
    index = np.argwhere(mask)[:, ::-1].mean(0)  # (i, j, k)
    centre = np.array(geometry.origin) + direction(geometry) @ (index * np.array(geometry.spacing[::-1]))
    return mask.sum() * float(np.prod(geometry.spacing)), centre


# -- size ---------------------------------------------------------------------------------------
# What the cases written before the size option existed looked like (recorded on the CI machine):
# shape and dtype exactly; voxel counts per label, intensity means per label and the image's
# spread with tolerances. Bit-exact digests are not a promise across CPUs: numpy and scipy
# dispatch to different instruction sets, and the MR bias field rounded differently on an
# AMD EPYC than where it was recorded (issue 13).
_CASES_BEFORE_SIZE = {
    ("ct", 0, 3, None, "train"): {
        "shape": (43, 79, 79), "image_dtypes": ["int16"],
        "label_counts": [254089, 9900, 2240, 649, 720, 765],
        "spacing": (1.546875, 1.171875, 1.171875), "origin": (-53.65625, -54.59375, -139.8125),
        "means": [[-507.409, 100.69, 92.236, 152.82, 134.874, 56.766]], "stds": [497.195]},
    ("mr", 0, 1, 2, "test"): {
        "shape": (48, 112, 112), "image_dtypes": ["uint16", "uint16"],
        "label_counts": [580035, 15439, 1808, 1492, 2688, 650],
        "spacing": (1.5078125, 0.7734375, 0.7734375), "origin": (27.75, 22.421875, -236.09375),
        "means": [[670.456, 1129.063, 842.796, 648.149, 199.733, 285.08],
                  [401.319, 284.981, 567.296, 544.675, 121.494, 995.014]], "stds": [585.683, 324.86]},
}


def _assert_like_recorded(c, recorded: dict) -> None:
    assert c.label.shape == recorded["shape"] and c.label.dtype == np.uint8
    assert [str(im.dtype) for im in c.images] == recorded["image_dtypes"]
    counts = np.bincount(c.label.ravel(), minlength=len(recorded["label_counts"]))
    # a boundary voxel may fall either way on another CPU: 0.5% of each label, at least 3 voxels
    np.testing.assert_allclose(counts, recorded["label_counts"], rtol=5e-3, atol=3)
    np.testing.assert_allclose(c.geometry.spacing, recorded["spacing"], rtol=1e-9)
    np.testing.assert_allclose(c.geometry.origin, recorded["origin"], atol=1e-6)
    for image, means, std in zip(c.images, recorded["means"], recorded["stds"]):
        found = [float(image[c.label == value].mean()) for value in range(len(means))]
        np.testing.assert_allclose(found, means, rtol=5e-3, atol=1.0)
        np.testing.assert_allclose(float(image.std()), std, rtol=5e-3)


@pytest.mark.parametrize("key", sorted(_CASES_BEFORE_SIZE, key=str))
def test_default_size_gives_the_cases_of_before_the_size_option(key):
    kind, seed, index, channels, split = key
    _assert_like_recorded(make_case(kind, seed, index, channels, split=split), _CASES_BEFORE_SIZE[key])
    _assert_like_recorded(make_case(kind, seed, index, channels, split=split, size=1.0), _CASES_BEFORE_SIZE[key])


def test_default_size_writes_the_same_files(tmp_path):
    make_phantom_dataset(tmp_path / "default", cases=1, test_cases=1, seed=2)
    make_phantom_dataset(tmp_path / "one", cases=1, test_cases=1, seed=2, size=1.0)
    files = sorted(p.relative_to(tmp_path / "default") for p in (tmp_path / "default").rglob("*.nii.gz"))
    assert len(files) == 4
    for name in files:
        assert (tmp_path / "default" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()


def test_larger_size_is_a_larger_patient_at_the_same_spacing():
    for index in range(4):  # one block: every protocol
        small, large = case("ct", 0, index), make_case("ct", 0, index, size=1.5)
        expected = tuple(int(np.ceil((n - 1) * 1.5 - 1e-9)) + 1 for n in small.label.shape)
        assert large.label.shape == expected == large.images[0].shape, small.protocol
        assert large.geometry.spacing == small.geometry.spacing
        assert large.geometry.direction == small.geometry.direction
        assert large.protocol == small.protocol
        for value in large.geometry.origin:
            assert float(np.float32(value)) == value
        small_counts = np.bincount(small.label.ravel(), minlength=len(LABELS))
        large_counts = np.bincount(large.label.ravel(), minlength=len(LABELS))
        assert large_counts.size == len(LABELS) and large_counts.min() >= 20, large_counts
        # Same voxel size, 1.5x the length: every structure has ~1.5^3 the voxels.
        np.testing.assert_allclose(large_counts[1:] / small_counts[1:], 1.5 ** 3, rtol=0.15)


def test_larger_mr_case_keeps_its_contrasts():
    c = make_case("mr", 0, 2, 2, size=1.5)
    assert c.bias.shape == c.label.shape == c.images[1].shape
    t1, t2 = ({name: float(im[c.label == v].mean()) for name, v in LABELS.items()} for im in c.images)
    assert t1["liver_lesion"] < t1["liver"] and t2["liver_lesion"] > 2 * t2["liver"]


def test_size_on_the_command_line_is_written_and_recorded(tmp_path):
    out = tmp_path / "Dataset903_Large"
    assert main(["make-phantoms", str(out), "--cases", "1", "--test-cases", "1", "--size", "1.5"]) == 0
    raw = json.loads((out / "dataset.json").read_text())
    assert raw["synthetic"]["size"] == 1.5 and "size=1.5" in raw["description"]
    for image, label in (("imagesTr/phantom_ct_000_0000", "labelsTr/phantom_ct_000"),
                         ("imagesTs/phantom_ct_test_000_0000", "labelsTs/phantom_ct_test_000")):
        array, geometry = read_image(out / f"{image}.nii.gz")
        labels, label_geometry = read_image(out / f"{label}.nii.gz")
        assert array.shape == labels.shape and geometry == label_geometry
        assert set(np.unique(labels)) == set(LABELS.values())
    small = case("ct", 0, 0).label.shape
    assert read_image(out / "labelsTr/phantom_ct_000.nii.gz")[0].shape == tuple(
        int(np.ceil((n - 1) * 1.5 - 1e-9)) + 1 for n in small)


def test_size_out_of_range_on_the_command_line_is_an_error_naming_it(tmp_path, capsys):
    assert main(["make-phantoms", str(tmp_path / "ds"), "--cases", "1", "--size", "4.5"]) == 1
    assert "size must be > 0 and <= 4, got 4.5" in capsys.readouterr().err
    assert not (tmp_path / "ds").exists()


# -- labels -----------------------------------------------------------------------------------
def test_label_tables():
    for kind in ("ct", "mr"):
        table = label_table(kind)
        assert table["background"] == 0 and sorted(table.values()) == list(range(len(table)))
    assert LABELS == {"background": 0, "liver": 1, "spleen": 2, "kidneys": 3, "aorta": 4, "liver_lesion": 5}


@pytest.mark.parametrize("kind", ["ct", "mr"])
def test_every_case_holds_every_declared_label(kind):
    for index in range(8):
        c = case(kind, 1, index)
        assert c.label.dtype == np.uint8
        counts = np.bincount(c.label.ravel(), minlength=len(LABELS))
        assert counts.size == len(LABELS), f"undeclared label values {np.nonzero(counts[len(LABELS):])}"
        assert counts.min() >= 20, (c.case_id, c.protocol, counts)


def test_lesions_lie_inside_the_liver_and_kidneys_are_two_pieces():
    for index in range(4):
        c = case("ct", 0, index)
        lesion = c.label == LABELS["liver_lesion"]
        grown = ndimage.binary_dilation(lesion, iterations=1) & ~lesion
        assert np.isin(c.label[grown], [LABELS["liver"], LABELS["liver_lesion"]]).mean() > 0.6
        assert ndimage.label(c.label == LABELS["kidneys"])[1] >= 2


# -- CT ---------------------------------------------------------------------------------------
def test_ct_intensities_are_hounsfield_units():
    for index in range(4):
        c = case("ct", 0, index)
        image = c.images[0]
        assert image.dtype == np.int16 and len(c.images) == 1 and c.bias is None
        air = image[ndimage.binary_erosion(c.tissue == Tissue.AIR, iterations=2)]  # away from edges
        assert abs(np.median(air) + 1000) < 15 and 8 < air.std() < 30
        fat = image[(c.tissue == Tissue.FAT) & (c.label == 0)]
        assert -130 < fat.mean() < -70
        # Interior voxels: edges mix with the neighbours (partial volume), as in real scans.
        core = {name: ndimage.binary_erosion(c.label == value, np.ones((1, 3, 3))) for name, value in LABELS.items()}
        means = {name: image[mask].mean() for name, mask in core.items() if name != "background"}
        assert 80 < means["liver"] < 130
        assert 135 < means["kidneys"] < 215 and 125 < means["aorta"] < 215
        assert means["liver_lesion"] < means["liver"] - 20
        assert image[c.tissue == Tissue.BONE].mean() > 300


def test_liver_and_spleen_cannot_be_told_apart_by_a_threshold():
    for index in range(4):
        c = case("ct", 0, index)
        image = c.images[0]
        spleen, liver = image[c.label == LABELS["spleen"]], image[c.label == LABELS["liver"]]
        assert abs(spleen.mean() - liver.mean()) < 15
        assert best_threshold_dice(spleen, liver) < 0.8


# -- MR ---------------------------------------------------------------------------------------
def test_mr_channels_have_different_contrasts():
    for index in range(3):
        c = case("mr", 0, index, 2)
        assert [im.dtype for im in c.images] == [np.uint16, np.uint16]
        t1, t2 = ({name: float(im[c.label == v].mean()) for name, v in LABELS.items()} for im in c.images)
        assert t1["liver_lesion"] < t1["liver"] and t2["liver_lesion"] > 2 * t2["liver"]
        assert t1["liver"] > t1["spleen"] and t2["liver"] < t2["spleen"]
        assert np.corrcoef(list(t1.values()), list(t2.values()))[0, 1] < 0.8
        assert 0 < np.median(c.images[0][c.tissue == Tissue.AIR]) < np.median(c.images[0][c.label == 1]) / 5


def test_mr_has_a_bias_field_and_an_arbitrary_scale():
    scales = []
    for index in range(3):
        c = case("mr", 0, index, 2)
        liver = c.label == LABELS["liver"]
        assert c.bias.max() / c.bias.min() > 1.3
        t1 = c.images[0].astype(float)
        # The bias is what makes the liver inhomogeneous: removing it evens the liver out.
        cv_raw = t1[liver].std() / t1[liver].mean()
        corrected = t1[liver] / c.bias[liver]
        assert corrected.std() / corrected.mean() < cv_raw
        scales.append(np.median(t1[liver]))
    assert max(scales) / min(scales) > 1.2


def test_channel_names():
    assert channel_names("ct") == {0: "CT"}
    assert channel_names("mr") == {0: "T1"}
    assert channel_names("mr", 3) == {0: "T1", 1: "T2", 2: "FLAIR"}
    assert channel_names("mr", 6)[5] == "MR5"
    c = make_case("mr", 0, 0, 5)
    assert len(c.images) == 5 and not np.array_equal(c.images[3], c.images[4])


# -- dataset folder -----------------------------------------------------------------------------
def test_written_dataset_opens_and_round_trips(tmp_path):
    out = make_phantom_dataset(tmp_path / "Dataset901_PhantomMR", kind="mr", cases=3, seed=0, channels=2,
                               test_cases=2)
    dataset = open_dataset(out)
    assert dataset.spec.channel_names == {0: "T1", 1: "T2"}
    assert dataset.spec.labels == LABELS and dataset.spec.num_training == 3
    assert dataset.spec.file_ending == ".nii.gz"
    assert dataset.case_ids == ["phantom_mr_000", "phantom_mr_001", "phantom_mr_002"]
    raw = json.loads((out / "dataset.json").read_text())
    assert raw["synthetic"]["seed"] == 0 and raw["synthetic"]["kind"] == "mr" and raw["synthetic"]["size"] == 1.0
    assert "Not patient data" in raw["description"]
    for entry in dataset.cases:
        expected = case("mr", 0, int(entry.case_id[-3:]), 2)
        _assert_round_trip(expected.images + [expected.label], list(entry.images) + [entry.label], expected.geometry)
    test_ids = sorted(p.name for p in (out / "labelsTs").iterdir())
    assert test_ids == ["phantom_mr_test_000.nii.gz", "phantom_mr_test_001.nii.gz"]
    assert len(list((out / "imagesTs").iterdir())) == 4
    held_out = make_case("mr", 0, 1, 2, split="test")
    _assert_round_trip([held_out.images[1], held_out.label],
                       [out / "imagesTs/phantom_mr_test_001_0001.nii.gz", out / "labelsTs/phantom_mr_test_001.nii.gz"],
                       held_out.geometry)


def _assert_round_trip(arrays, paths, geometry: Geometry) -> None:
    read = [read_image(p) for p in paths]
    for array, (back, back_geometry) in zip(arrays, read):
        assert back.dtype == array.dtype
        np.testing.assert_array_equal(back, array)
        assert back_geometry.spacing == geometry.spacing and back_geometry.origin == geometry.origin
        # NIfTI stores orientation in float32: oblique directions come back within ~1e-7.
        np.testing.assert_allclose(back_geometry.direction, geometry.direction, atol=1e-6, rtol=0)
    assert all(g == read[0][1] for _, g in read)  # images and label share one geometry exactly


def test_axis_aligned_geometry_round_trips_exactly(tmp_path):
    out = make_phantom_dataset(tmp_path / "ct", cases=4, seed=0)
    for index in range(4):
        expected = case("ct", 0, index)
        if np.all(np.abs(direction(expected.geometry)) % 1 == 0):
            assert read_image(out / f"labelsTr/phantom_ct_{index:03d}.nii.gz")[1] == expected.geometry


def test_reports_progress(tmp_path):
    events = io.StringIO()
    make_phantom_dataset(tmp_path / "ds", cases=2, test_cases=1, reporter=Reporter(events=True, out=events,
                                                                                   quiet=True))
    records = [json.loads(line) for line in events.getvalue().splitlines()]
    assert records[0]["event"] == "start" and records[0]["stage"] == "make-phantoms" and records[0]["of"] == 3
    assert records[-1]["event"] == "progress" and records[-1]["done"] == 3


def test_empty_existing_folder_is_used(tmp_path):
    (tmp_path / "empty").mkdir()
    assert make_phantom_dataset(tmp_path / "empty", cases=1) == tmp_path / "empty"
    assert (tmp_path / "empty" / "dataset.json").is_file()


def test_refuses_to_write_into_a_non_empty_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty.*notes.txt"):
        make_phantom_dataset(tmp_path / "mine", cases=1)
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
    (tmp_path / "interrupted" / "imagesTr").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="interrupted make-phantoms run"):
        make_phantom_dataset(tmp_path / "interrupted", cases=1)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        make_phantom_dataset(tmp_path / "file", cases=1)


@pytest.mark.parametrize("kwargs, message", [
    ({"kind": "pet"}, "unknown phantom kind 'pet'; allowed: ct, mr"),
    ({"kind": "ct", "channels": 2}, "CT phantoms have exactly 1 channel"),
    ({"kind": "mr", "channels": 0}, "channels must be an integer >= 1"),
    ({"kind": "mr", "channels": 1.5}, "channels must be an integer >= 1"),
    ({"cases": 0}, "cases must be an integer >= 1"),
    ({"test_cases": -1}, "test_cases must be an integer >= 0"),
    ({"seed": -3}, "seed must be an integer >= 0"),
    ({"size": 0}, "size must be > 0 and <= 4, got 0"),
    ({"size": -1.5}, r"size must be > 0 and <= 4, got -1\.5"),
    ({"size": 4.5}, r"size must be > 0 and <= 4, got 4\.5"),
    ({"size": float("nan")}, "size must be > 0 and <= 4, got nan"),
    ({"size": "2"}, "size must be > 0 and <= 4, got '2'"),
    ({"size": True}, "size must be > 0 and <= 4, got True"),
])
def test_rejects_bad_arguments_before_writing(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_phantom_dataset(tmp_path / "ds", **kwargs)
    assert not (tmp_path / "ds").exists()


def test_make_case_rejects_bad_arguments():
    with pytest.raises(ValueError, match="allowed: ct, mr"):
        make_case("xray", 0, 0)
    with pytest.raises(ValueError, match="allowed: train, test"):
        make_case("ct", 0, 0, split="validation")
    with pytest.raises(ValueError, match="case_index must be an integer >= 0"):
        make_case("ct", 0, -1)


def test_clinical_case_is_the_adult_patient_on_an_axial_grid_of_the_given_size():
    from AutoSegLib.synthetic.cases import clinical_case

    case = clinical_case(0, 0, shape=(20, 32, 32), spacing=(22.5, 12.8, 12.8))  # 512x512x300's extent, coarse
    assert case.images[0].shape == case.label.shape == (20, 32, 32)
    assert case.geometry.spacing == (22.5, 12.8, 12.8) and case.geometry.direction == tuple(np.eye(3).ravel())
    assert case.images[0].dtype == np.int16 and {1, 2} <= set(np.unique(case.label))  # liver and spleen inside
