import json

import pytest

from AutoSegLib.fileutil import read_json, write_json
from AutoSegLib.training.splits import (
    SPLITS_FILE,
    SplitsError,
    fold_cases,
    groups_from_spec,
    load_groups,
    load_or_create_splits,
    load_splits,
    make_splits,
    parse_fold,
)

IDS = [f"case_{i:02d}" for i in range(12)]


def val_sets(splits):
    return [fold["val"] for fold in splits]


def assert_partition(splits, ids):
    vals = [c for fold in splits for c in fold["val"]]
    assert sorted(vals) == sorted(ids)  # disjoint and covering
    for fold in splits:
        assert sorted(fold["train"] + fold["val"]) == sorted(ids)


def test_ungrouped_splits_equal_nnunet_v2():
    # sklearn KFold(5, shuffle=True, random_state=12345) over the sorted ids, as nnU-Net v2 does.
    expected = [["case_00", "case_03", "case_08"], ["case_07", "case_10", "case_11"], ["case_06", "case_09"],
                ["case_01", "case_04"], ["case_02", "case_05"]]
    splits = make_splits(list(reversed(IDS)))
    assert val_sets(splits) == expected
    assert_partition(splits, IDS)
    assert splits[0]["train"] == [c for c in IDS if c not in expected[0]]


def test_deterministic_and_seed_dependent():
    assert make_splits(IDS) == make_splits(IDS)
    assert make_splits(IDS, seed=1) != make_splits(IDS)
    assert_partition(make_splits(IDS, n_folds=3, seed=1), IDS)


def test_groups_stay_in_one_fold_and_folds_balance():
    groups = {c: f"patient_{i // 3}" for i, c in enumerate(IDS[:9])}  # 3 patients x 3 scans, 3 single cases
    splits = make_splits(IDS, n_folds=3, groups=groups)
    assert_partition(splits, IDS)
    for patient in {"patient_0", "patient_1", "patient_2"}:
        cases = {c for c, g in groups.items() if g == patient}
        assert sum(bool(cases & set(v)) for v in val_sets(splits)) == 1
    assert [len(v) for v in val_sets(splits)] == [4, 4, 4]
    assert make_splits(IDS, n_folds=3, groups=groups) == splits


def test_singleton_groups_equal_ungrouped():
    assert make_splits(IDS, groups={c: c.upper() for c in IDS}) == make_splits(IDS)


def test_too_few_cases_or_groups_for_the_folds():
    with pytest.raises(SplitsError, match="only 3 cases for 5 folds; train fold 'all'"):
        make_splits(IDS[:3])
    with pytest.raises(SplitsError, match="only 4 patient groups for 5 folds"):
        make_splits(IDS, groups={c: str(i % 4) for i, c in enumerate(IDS)})
    with pytest.raises(SplitsError, match="at least 2 folds"):
        make_splits(IDS, n_folds=1)


def test_bad_ids_and_groups():
    with pytest.raises(SplitsError, match=r"duplicate case ids \['case_01'\]"):
        make_splits(IDS + ["case_01"])
    with pytest.raises(SplitsError, match=r"not in the dataset: \['case_99'\]"):
        make_splits(IDS, groups={"case_99": "p"})


def test_file_written_once_and_reused(tmp_path):
    messages = []
    splits = load_or_create_splits(tmp_path, IDS, log=messages.append)
    assert read_json(tmp_path / SPLITS_FILE) == splits
    assert len(messages) == 1
    # A different seed, fold count or case order later does not reshuffle: the file wins.
    assert load_or_create_splits(tmp_path, list(reversed(IDS)), n_folds=3, seed=9, log=messages.append) == splits
    assert len(messages) == 1
    assert [p.name for p in tmp_path.iterdir()] == [SPLITS_FILE]


def test_new_cases_keep_old_folds(tmp_path):
    old = load_or_create_splits(tmp_path, IDS)
    new_ids = IDS + ["case_12", "case_13", "case_14"]
    messages = []
    splits = load_or_create_splits(tmp_path, new_ids, log=messages.append)
    assert_partition(splits, new_ids)
    for before, after in zip(val_sets(old), val_sets(splits)):
        assert set(before) <= set(after)
    # The three new cases fill the three folds with only 2 validation cases (2, 3, 4).
    assert [len(v) for v in val_sets(splits)] == [3, 3, 3, 3, 3]
    assert read_json(tmp_path / SPLITS_FILE) == splits
    assert messages and "case_12 ->" in messages[0]
    assert load_or_create_splits(tmp_path, new_ids) == splits  # stable afterwards


def test_new_scan_of_known_patient_joins_its_fold(tmp_path):
    groups = {"case_00": "p0", "case_01": "p0"}
    old = load_or_create_splits(tmp_path, IDS, groups=groups)
    home = next(f for f, v in enumerate(val_sets(old)) if "case_00" in v)
    splits = load_or_create_splits(tmp_path, IDS + ["case_new"], groups={**groups, "case_new": "p0"})
    assert "case_new" in splits[home]["val"]


def test_removed_cases_are_dropped(tmp_path):
    old = load_or_create_splits(tmp_path, IDS)
    messages = []
    splits = load_or_create_splits(tmp_path, IDS[1:], log=messages.append)
    assert_partition(splits, IDS[1:])
    assert val_sets(splits) == [[c for c in v if c != "case_00"] for v in val_sets(old)]
    assert "dropped cases no longer in the dataset: ['case_00']" in messages[0]


def test_groups_added_after_the_folds_are_checked(tmp_path):
    splits = load_or_create_splits(tmp_path, IDS)
    a, b = splits[0]["val"][0], splits[1]["val"][0]
    with pytest.raises(SplitsError, match=r"group 'p' is split over folds \[0, 1\].*delete the file"):
        load_or_create_splits(tmp_path, IDS, groups={a: "p", b: "p"})


def test_hand_edited_file_cannot_be_extended(tmp_path):
    write_json(tmp_path / SPLITS_FILE, [{"train": IDS[2:], "val": IDS[:2]}, {"train": IDS[1:], "val": IDS[:1]}])
    with pytest.raises(SplitsError, match=r"do not partition.*added \['case_12'\], removed \[\]"):
        load_or_create_splits(tmp_path, IDS + ["case_12"])


def test_load_splits_reports_every_problem(tmp_path):
    path = tmp_path / "my_splits.json"
    folds = [
        {"train": IDS[2:], "val": IDS[:2]},  # fine
        {"train": IDS[3:] + ["ghost"], "val": IDS[:2]},  # unknown id, case_02 missing
        {"train": IDS[1:], "val": IDS[:2]},  # case_01 in both
    ]
    path.write_text(json.dumps(folds))
    with pytest.raises(SplitsError) as err:
        load_splits(path, IDS)
    message = str(err.value)
    assert "fold 1: unknown case ids (not in the dataset) ['ghost']" in message
    assert "fold 1: cases in neither train nor val ['case_02']" in message
    assert "fold 2: cases in both train and val ['case_01']" in message
    assert "fold 0" not in message


def test_load_splits_accepts_a_valid_file_and_rejects_bad_structure(tmp_path):
    path = tmp_path / "s.json"
    write_json(path, make_splits(IDS, n_folds=2))
    assert load_splits(path, IDS) == make_splits(IDS, n_folds=2)
    path.write_text(json.dumps([{"train": IDS, "val": "case_00"}]))
    with pytest.raises(SplitsError, match="fold 0 must be an object with 'train' and 'val' lists"):
        load_splits(path, IDS)
    with pytest.raises(SplitsError, match="not found"):
        load_splits(tmp_path / "missing.json", IDS)


def test_fold_all_and_fold_numbers():
    splits = make_splits(IDS)
    assert fold_cases(None, "all", list(reversed(IDS))) == (IDS, IDS)
    assert fold_cases(splits, 2, IDS) == (splits[2]["train"], splits[2]["val"])
    with pytest.raises(SplitsError, match=r"fold 5 does not exist; the splits have folds 0\.\.4 and 'all'"):
        fold_cases(splits, 5, IDS)
    assert parse_fold("all") == "all" and parse_fold("3") == 3
    for bad in ("x", "-1"):
        with pytest.raises(SplitsError, match="fold must be a number"):
            parse_fold(bad)


def test_groups_from_dataset_json_convention(tmp_path):
    assert groups_from_spec({"description": "x"}) is None
    assert groups_from_spec({"case_groups": {"a": "p1", "b": 7}}) == {"a": "p1", "b": "7"}
    with pytest.raises(SplitsError, match="dataset.json 'case_groups': group ids must be strings or integers"):
        groups_from_spec({"case_groups": {"a": [1]}})
    with pytest.raises(SplitsError, match="must be a JSON object"):
        groups_from_spec({"case_groups": ["a"]})
    write_json(tmp_path / "groups.json", {"a": "p1"})
    assert load_groups(tmp_path / "groups.json") == {"a": "p1"}
