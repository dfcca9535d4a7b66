import json

import pytest

from AutoSegLib.dataset import DatasetError, DatasetSpec, layout_problems, load_spec, open_dataset, scan_folder


def test_open_dataset_lists_complete_cases_in_channel_order(tiny_dataset):
    ds = open_dataset(tiny_dataset)
    assert ds.case_ids == ["case_0", "case_1", "case_2"]
    assert ds.case("case_1").images[0].name == "case_1_0000.nii.gz"
    assert ds.case("case_1").label.name == "case_1.nii.gz"
    assert ds.spec.num_channels == 1 and ds.spec.foreground_labels == {"organ": 1}


def test_spec_round_trip_keeps_extra_keys():
    data = {"channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "a": 1, "ignore": 2},
            "numTraining": 3, "file_ending": ".nrrd", "name": "x", "licence": "CC-BY"}
    spec = DatasetSpec.from_dict(data)
    assert spec.ignore_value == 2 and spec.foreground_labels == {"a": 1}
    assert spec.to_dict() == data


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("labels"), "missing key 'labels'"),
    (lambda d: d.update(channel_names={"1": "CT"}), "keys must be 0..0"),
    (lambda d: d.update(labels={"background": 0, "a": 2}), "consecutive from 0, found [0, 2]"),
    (lambda d: d.update(labels={"bg": 0, "a": 1}), "map 'background' to 0"),
    (lambda d: d.update(labels={"background": 0, "a": [1, 2]}), "region-based"),
    (lambda d: d.update(file_ending=".png"), "'file_ending' is '.png'"),
    (lambda d: d.update(numTraining=-1), "non-negative integer"),
    (lambda d: d.update(labels={"background": 0, "a": 1, "ignore": 5}), "'ignore' must be the highest"),
])
def test_spec_problems_are_named(change, message):
    data = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1}, "numTraining": 1,
            "file_ending": ".nii.gz"}
    change(data)
    with pytest.raises(DatasetError, match=message.replace("[", r"\[").replace("]", r"\]")):
        DatasetSpec.from_dict(data)


def test_missing_dataset_json_names_the_path(tmp_path):
    with pytest.raises(DatasetError, match="dataset.json not found"):
        load_spec(tmp_path)


def test_scan_records_every_layout_problem(tiny_dataset):
    (tiny_dataset / "imagesTr" / "case_1_0000.nii.gz").rename(tiny_dataset / "imagesTr" / "case_1_0001.nii.gz")
    (tiny_dataset / "labelsTr" / "case_2.nii.gz").unlink()
    (tiny_dataset / "labelsTr" / "stray.nii.gz").write_bytes(b"")
    (tiny_dataset / "imagesTr" / "notes.txt").write_text("x")
    (tiny_dataset / "imagesTr" / "case_0_0000.nrrd").write_bytes(b"")
    spec = load_spec(tiny_dataset)
    scan = scan_folder(tiny_dataset, spec)
    assert [c.case_id for c in scan.cases] == ["case_0"]
    text = "\n".join(layout_problems(scan))
    assert "channel 1 is not in channel_names" in text
    assert "case_1.nii.gz: label has no image" in text  # its only image was renamed away
    assert "case 'case_2' has images but no label" in text
    assert "stray.nii.gz: label has no image" in text
    assert "notes.txt: not an image file" in text
    assert "case_0_0000.nrrd: file ending .nrrd differs" in text
    with pytest.raises(DatasetError, match="case_2"):
        open_dataset(tiny_dataset)


def test_case_ids_differing_only_in_letter_case_are_duplicates(tiny_dataset):
    for sub, name in [("imagesTr", "CASE_0_0000.nii.gz"), ("labelsTr", "CASE_0.nii.gz")]:
        (tiny_dataset / sub / name).write_bytes((tiny_dataset / sub / name.lower()).read_bytes())
    scan = scan_folder(tiny_dataset, load_spec(tiny_dataset))
    assert any({p.name for p in group} == {"CASE_0_0000.nii.gz", "case_0_0000.nii.gz"} for group in scan.duplicates)


def test_empty_dataset_is_refused(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps(
        {"channel_names": {"0": "CT"}, "labels": {"background": 0, "a": 1}, "numTraining": 0, "file_ending": ".nii.gz"}))
    with pytest.raises(DatasetError, match="no training cases"):
        open_dataset(tmp_path)


def test_test_split_needs_no_labels(tiny_dataset):
    (tiny_dataset / "imagesTs").mkdir()
    src = tiny_dataset / "imagesTr" / "case_0_0000.nii.gz"
    (tiny_dataset / "imagesTs" / "new_0000.nii.gz").write_bytes(src.read_bytes())
    scan = scan_folder(tiny_dataset, load_spec(tiny_dataset), split="Ts")
    assert [(c.case_id, c.label) for c in scan.cases] == [("new", None)]
