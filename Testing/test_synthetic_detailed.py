"""The detailed phantom anatomy: 31 labelled structures of the basic phantoms' patients (issue 14)."""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np
import pytest
from scipy import ndimage

from AutoSegLib.cli import main
from AutoSegLib.fingerprint import class_radii
from AutoSegLib.synthetic import label_table, make_case
from AutoSegLib.synthetic.anatomy import DETAILED_LABELS

BASIC = label_table("ct")
DETAILED = label_table("ct", "detailed")
THIN = ("renal_artery_right", "renal_artery_left", "renal_vein_right", "superior_mesenteric_artery")


@lru_cache(maxsize=None)
def pair(kind: str, index: int):
    """The same patient with the basic and the detailed label table."""
    return make_case(kind, 3, index), make_case(kind, 3, index, anatomy="detailed")


def test_detailed_table_has_31_structures_with_consecutive_values():
    assert DETAILED == DETAILED_LABELS and DETAILED["background"] == 0
    assert sorted(DETAILED.values()) == list(range(32))
    for side in ("right", "left"):  # pairs told apart only by side
        for stem in ("kidney", "adrenal_gland", "renal_artery", "renal_vein", "paraspinal_muscle", "ribs",
                     "abdominal_wall"):
            assert f"{stem}_{side}" in DETAILED
    assert label_table("mr", "detailed") == DETAILED
    with pytest.raises(ValueError, match="unknown phantom anatomy 'full'"):
        label_table("ct", "full")


@pytest.mark.parametrize("index", range(4))
def test_every_structure_is_in_every_case(index):
    _, detailed = pair("ct", index)
    counts = np.bincount(detailed.label.ravel(), minlength=len(DETAILED))
    assert counts.size == len(DETAILED)
    missing = [name for name, value in DETAILED.items() if counts[value] == 0]
    assert not missing, (detailed.case_id, detailed.protocol, missing)


@pytest.mark.parametrize("kind", ["ct", "mr"])
def test_detailed_labels_are_the_same_patient_as_the_basic_ones(kind):
    for index in range(4):
        basic, detailed = pair(kind, index)
        assert detailed.geometry.spacing == basic.geometry.spacing and detailed.label.shape == basic.label.shape
        d = detailed.label
        # The kidneys and the aorta are painted alike in both; the detailed table splits the kidneys by side.
        kidneys = (d == DETAILED["kidney_right"]) | (d == DETAILED["kidney_left"])
        assert np.array_equal(kidneys, basic.label == BASIC["kidneys"])
        assert np.array_equal(d == DETAILED["aorta"], basic.label == BASIC["aorta"])
        # The right kidney lies on the patient's right (body x < 0): each side is one organ.
        for side in ("right", "left"):
            assert ndimage.label(d == DETAILED[f"kidney_{side}"])[1] >= 1
        # Most of the liver is liver in both; vessels and lesions cut into it only a little.
        liver = basic.label == BASIC["liver"]
        assert (d[liver] == DETAILED["liver"]).mean() > 0.9


def test_thin_and_small_structures_are_thin_and_small():
    """Vessels 1-3 voxels across at full resolution, lymph nodes a few dozen voxels."""
    for index in range(4):
        _, c = pair("ct", index)
        values = [DETAILED[n] for n in THIN]
        radii = class_radii(c.label, c.geometry.spacing, values)
        finest = min(c.geometry.spacing)
        for name, value in zip(THIN, values):
            assert radii[str(value)] <= 3 * finest, (c.case_id, name, radii[str(value)], c.geometry.spacing)
        nodes = int((c.label == DETAILED["lymph_nodes"]).sum())
        assert 0 < nodes < 400, (c.case_id, nodes)
        # The big ones stay big: the liver is thicker than any vessel.
        assert class_radii(c.label, c.geometry.spacing, [DETAILED["liver"]])[str(DETAILED["liver"])] > 4.0


def test_left_renal_vein_passes_in_front_of_the_aorta():
    _, c = pair("ct", 0)
    vein = np.argwhere(c.label == DETAILED["renal_vein_left"])
    aorta = np.argwhere(c.label == DETAILED["aorta"])
    assert len(vein) and len(aorta)
    # Voxels of the vein touch the aorta's anterior wall: the two structures touch.
    touching = ndimage.binary_dilation(c.label == DETAILED["renal_vein_left"]) & (c.label == DETAILED["aorta"])
    assert touching.any()


def test_make_phantoms_detailed_on_the_command_line(tmp_path):
    out = tmp_path / "Dataset951_Detailed"
    assert main(["make-phantoms", str(out), "--anatomy", "detailed", "--cases", "2"]) == 0
    spec = json.loads((out / "dataset.json").read_text())
    assert spec["labels"] == DETAILED and spec["synthetic"]["anatomy"] == "detailed"
    assert "anatomy=detailed" in spec["description"]
    basic = tmp_path / "basic"
    assert main(["make-phantoms", str(basic), "--cases", "1"]) == 0
    assert "anatomy" not in json.loads((basic / "dataset.json").read_text())["synthetic"]


def test_unknown_anatomy_is_refused_by_name(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["make-phantoms", str(tmp_path / "x"), "--anatomy", "whole-body"])
    assert "whole-body" in capsys.readouterr().err
