import json

import pytest

from AutoSegLib.fileutil import atomic_path, read_json, write_json


def test_exception_inside_keeps_previous_file(tmp_path):
    path = tmp_path / "plans.json"
    write_json(path, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text('{"v": 2, "half')
            raise RuntimeError("killed mid-write")
    assert read_json(path) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["plans.json"]


def test_temporary_name_keeps_suffixes(tmp_path):
    with atomic_path(tmp_path / "case.nii.gz") as tmp:
        assert tmp.name.endswith(".nii.gz") and tmp.parent == tmp_path
        tmp.write_bytes(b"x")
    assert (tmp_path / "case.nii.gz").read_bytes() == b"x"


def test_bad_json_names_file_and_position(tmp_path):
    path = tmp_path / "dataset.json"
    path.write_text('{"a": 1,\n "b": }')
    with pytest.raises(ValueError, match=r"dataset.json.*line 2"):
        read_json(path)


def test_write_json_is_readable(tmp_path):
    write_json(tmp_path / "a.json", {"x": [1, 2]})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": [1, 2]}
