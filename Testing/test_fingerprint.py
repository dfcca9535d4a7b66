import json

import numpy as np
import pytest

from AutoSegLib.fingerprint import (FingerprintError, aggregate, case_measurements,
                                    extract_fingerprint, intensity_statistics, load_fingerprint)
from AutoSegLib.preprocessing.cropping import crop_bbox, nonzero_mask
from conftest import box_case, write_dataset


def test_crop_bbox_and_nonzero_mask_fills_holes():
    image = np.zeros((5, 6, 7), np.int16)
    image[1:4, 1:5, 2:6] = 10
    image[2, 2:4, 3:5] = 0  # a dark hole inside the body stays inside the mask
    mask = nonzero_mask([image])
    assert mask[2, 2, 3]
    assert crop_bbox(mask) == ((1, 4), (1, 5), (2, 6))
    assert crop_bbox(np.zeros((2, 3), bool)) == ((0, 2), (0, 3))


def test_crop_uses_the_union_of_all_channels():
    a, b = np.zeros((4, 4, 4)), np.zeros((4, 4, 4))
    a[0, 0, 0] = 1
    b[3, 3, 3] = 1
    assert crop_bbox(nonzero_mask([a, b])) == ((0, 4), (0, 4), (0, 4))


def test_case_measurements_counts_and_samples_foreground_only():
    image = np.zeros((4, 10, 10), np.float32)
    image[:, 2:8, 2:8] = 5.0
    label = np.zeros(image.shape, np.uint8)
    label[1:3, 3:5, 3:5] = 1
    image[label == 1] = 100.0
    label[0, 2, 2] = 2  # 'ignore': excluded from the intensity statistics
    m = case_measurements([image], label, (3.0, 1.0, 1.0), [0, 1, 2], [1], samples_per_case=1000, seed=0)
    assert m["shape_before_crop"] == [4, 10, 10] and m["shape_after_crop"] == [4, 6, 6]
    assert m["relative_size_after_crop"] == pytest.approx(0.36)
    assert m["class_voxels"] == {"0": 4 * 36 - 9, "1": 8, "2": 1}
    assert np.all(m["intensities"][0] == 100.0) and m["intensities"][0].size == 8


def test_sampling_is_bounded():
    image = np.ones((10, 10, 10), np.float32)
    label = np.ones((10, 10, 10), np.uint8)
    m = case_measurements([image], label, (1.0, 1.0, 1.0), [0, 1], [1], samples_per_case=50, seed=0)
    assert m["intensities"][0].size == 50


def test_intensity_statistics_match_numpy():
    values = np.arange(1001, dtype=np.float32)
    s = intensity_statistics(values)
    assert s["mean"] == 500 and s["median"] == 500 and s["min"] == 0 and s["max"] == 1000
    assert s["percentile_00_5"] == pytest.approx(5.0) and s["percentile_99_5"] == pytest.approx(995.0)


def test_no_foreground_gives_null_statistics_not_nan():
    assert set(intensity_statistics(np.empty(0, np.float32)).values()) == {None}


def test_fingerprint_has_the_nnunet_v2_keys_and_is_json(tiny_dataset):
    fp = extract_fingerprint(tiny_dataset, num_processes=1)
    for key in ("spacings", "shapes_after_crop", "foreground_intensity_properties_per_channel",
                "median_relative_size_after_cropping"):
        assert key in fp
    assert fp["spacings"] == [[2.0, 1.0, 1.0]] * 3
    assert fp["num_cases"] == 3 and fp["case_ids"] == ["case_0", "case_1", "case_2"]
    assert 130 < fp["foreground_intensity_properties_per_channel"]["0"]["mean"] < 150  # 40 + 100 HU
    json.dumps(fp, allow_nan=False)


def test_parallel_and_serial_extraction_agree(tiny_dataset):
    serial = extract_fingerprint(tiny_dataset, num_processes=1)
    parallel = extract_fingerprint(tiny_dataset, num_processes=2)
    assert serial == parallel


def test_a_bad_case_is_named_and_the_others_finish(tmp_path):
    root = write_dataset(tmp_path / "ds", {f"c{i}": box_case(seed=i) for i in range(3)})
    path = root / "imagesTr" / "c1_0000.nii.gz"
    path.write_bytes(path.read_bytes()[:100])
    for np_ in (1, 2):
        with pytest.raises(FingerprintError, match=r"1 of 3 case\(s\): case 'c1':.*c1_0000.nii.gz"):
            extract_fingerprint(root, num_processes=np_)


def test_dataset_signature_changes_when_a_file_changes(tiny_dataset):
    before = extract_fingerprint(tiny_dataset, num_processes=1)["dataset_signature"]
    label = tiny_dataset / "labelsTr" / "case_0.nii.gz"
    label.write_bytes(label.read_bytes() + b"")
    import os
    os.utime(label, ns=(1, 1))
    assert extract_fingerprint(tiny_dataset, num_processes=1)["dataset_signature"] != before


def test_load_fingerprint_accepts_v2_files_and_names_missing_keys(tmp_path):
    v2 = {"foreground_intensity_properties_per_channel": {"0": {"mean": 1, "std": 1, "median": 1, "min": 0,
                                                                "max": 2, "percentile_00_5": 0, "percentile_99_5": 2}},
          "median_relative_size_after_cropping": 1.0, "shapes_after_crop": [[10, 20, 20]],
          "spacings": [[1.0, 1.0, 1.0]]}
    (tmp_path / "fp.json").write_text(json.dumps(v2))
    assert load_fingerprint(tmp_path / "fp.json") == v2
    del v2["spacings"]
    (tmp_path / "bad.json").write_text(json.dumps(v2))
    with pytest.raises(FingerprintError, match="bad.json.*missing key.*spacings"):
        load_fingerprint(tmp_path / "bad.json")


def test_aggregate_class_ratios_sum_to_one():
    per_case = [case_measurements(*box_case(seed=s), (1.0, 1.0, 1.0), [0, 1], [1], 100, 0) for s in range(2)]
    fp = aggregate(["a", "b"], per_case, {0: "CT"}, {"background": 0, "organ": 1})
    assert sum(fp["class_voxel_ratios"].values()) == pytest.approx(1.0)


def test_class_radii_measure_thickness_in_millimetres():
    from AutoSegLib.fingerprint import class_radii

    label = np.zeros((20, 40, 40), np.uint8)
    z, y, x = np.mgrid[:20, :40, :40]
    label[(y - 10) ** 2 + (x - 10) ** 2 <= 4] = 1  # a tube of radius 2 voxels along z
    label[5:8, 20:38, 20:38] = 2  # a plate 3 voxels thick
    label[:, 39, :] = 3  # one voxel wide, on the image border
    radii = class_radii(label, (2.0, 0.5, 0.5), [1, 2, 3, 4])
    assert radii["1"] == pytest.approx(np.sqrt(5) * 0.5)  # axis to the nearest outside voxel (1, 2): sqrt(5) voxels
    assert radii["2"] == pytest.approx(4.0)  # 2 slices of 2 mm from the plate's middle to outside
    assert radii["3"] == pytest.approx(0.5)  # the border counts as outside
    assert "4" not in radii  # absent classes are left out


def test_fingerprint_holds_each_class_median_radius(tiny_dataset):
    fp = extract_fingerprint(tiny_dataset, num_processes=1)
    assert set(fp["class_radius_mm"]) <= {name for name, value in fp["labels"].items() if value}
    assert fp["class_radius_mm"] and all(r > 0 for r in fp["class_radius_mm"].values())
    per_case = [case_measurements(*box_case(seed=s), (1.0, 1.0, 1.0), [0, 1], [1], 100, 0) for s in range(3)]
    merged = aggregate(["a", "b", "c"], per_case, {0: "CT"}, {"background": 0, "organ": 1})
    assert merged["class_radius_mm"]["organ"] == pytest.approx(np.median([m["class_radius_mm"]["1"] for m in per_case]))


def test_class_radii_of_a_large_box_are_measured_in_slabs_alike(monkeypatch):
    from AutoSegLib import fingerprint

    label = np.zeros((60, 30, 30), np.uint8)
    z, y, x = np.mgrid[:60, :30, :30]
    label[(y - 15) ** 2 + (x - 15) ** 2 <= 9] = 1  # a tube along the first axis, through every slab
    label[10:50, 2:28, 2:5] = 2  # a plate 3 voxels thick
    label[5:55, 5:25, 20:29] = 3  # a block, thicker than the cap allows at this spacing
    whole = fingerprint.class_radii(label, (1.0, 1.0, 1.0), [1, 2, 3])
    monkeypatch.setattr(fingerprint, "SLAB_VOXELS", 30 * 30 * 4)  # slabs of 4 slices
    monkeypatch.setattr(fingerprint, "RADIUS_CAP_MM", 4.0)
    sliced = fingerprint.class_radii(label, (1.0, 1.0, 1.0), [1, 2, 3])
    assert sliced["1"] == pytest.approx(whole["1"]) and sliced["2"] == pytest.approx(whole["2"])
    assert whole["3"] > 4.0 and sliced["3"] == 4.0  # capped
