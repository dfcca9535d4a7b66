"""Segments in clinical terms: SNOMED CT category, type and laterality, conventional colours.

The expected codes are Slicer's (its DICOM master terminology,
SegmentationCategoryTypeModifier-DICOM-Master.json, and SlicerTotalSegmentator's published
structure-to-SNOMED CT mapping, totalsegmentator_snomed_mapping.csv); the colours are the
master list's recommended display colours, which are Slicer's GenericAnatomyColors. They are
written out here, not taken from the code under test. The segments' terminology strings are
read back with Slicer's own terminology logic (vtkSlicerTerminologiesModuleLogic from the
slicer-core wheel), the way Slicer's DICOM SEG export reads them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from AutoSegLib.imageio import Geometry, write_image
from AutoSegLogic import dataset_export, results, terminology, testing, volumes
from AutoSegLogic.dataset_export import ExportError, SceneCase

ANATOMICAL_STRUCTURE = ("SCT", "123037004", "Anatomical Structure")
# structure -> (type, laterality modifier or None, GenericAnatomyColors RGB)
SLICER = {
    "liver": (("SCT", "10200004", "Liver"), None, (221, 130, 101)),
    "spleen": (("SCT", "78961009", "Spleen"), None, (157, 108, 162)),
    "kidney_left": (("SCT", "64033007", "Kidney"), ("SCT", "7771000", "Left"), (185, 102, 83)),
    "right kidney": (("SCT", "64033007", "Kidney"), ("SCT", "24028007", "Right"), (185, 102, 83)),
    "aorta": (("SCT", "15825003", "Aorta"), None, (224, 97, 76)),
}
GEOMETRY = Geometry((2.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))


def slicer_terms(segment):
    """(context, category, type, type modifier) as Slicer's terminology logic reads the segment's tag."""
    import slicer

    entry = slicer.vtkSlicerTerminologyEntry()
    assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(segment.GetTerminology(), entry)

    def code(obj):
        return (obj.GetCodingSchemeDesignator(), obj.GetCodeValue(), obj.GetCodeMeaning()) if obj.GetCodeValue() \
            else None

    return (entry.GetTerminologyContextName(), code(entry.GetCategoryObject()), code(entry.GetTypeObject()),
            code(entry.GetTypeModifierObject()))


def segments(node) -> dict:
    content = node.GetSegmentation()
    return {content.GetNthSegment(i).GetName(): content.GetNthSegment(i) for i in range(content.GetNumberOfSegments())}


def write_model(folder, labels: dict, extra: dict | None = None):
    folder.mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": labels,
                                                     "numTraining": 1, "file_ending": ".nii.gz", **(extra or {})}))
    return folder


def test_a_predicted_abdominal_segmentation_carries_slicers_snomed_codes_and_colours(scene, tmp_path):
    labels = {"background": 0, **{name: value for value, name in enumerate(SLICER, start=1)}}
    model = write_model(tmp_path / "model", labels)
    label = np.zeros((4, 6, 12), np.uint8)
    for value in range(1, 6):
        label[:, :, 2 * value:2 * value + 2] = value
    write_image(label, GEOMETRY, tmp_path / "out" / "case.nii.gz")
    reference = volumes.add_volume(scene, np.zeros(label.shape, np.int16), GEOMETRY, "patient")

    # the module's path: read in a worker, into the scene on the GUI thread
    node = results.outputs_into_scene(scene, results.read_outputs(tmp_path / "out", "case", model), reference).segmentation
    found = segments(node)
    assert list(found) == list(SLICER)
    for name, (type_code, modifier, colour) in SLICER.items():
        context, category, type_, type_modifier = slicer_terms(found[name])
        assert context == "Segmentation category and type - DICOM master list"
        assert (category, type_, type_modifier) == (ANATOMICAL_STRUCTURE, type_code, modifier), name
        assert np.allclose(found[name].GetColor(), np.array(colour) / 255, atol=1e-6), name
    index, names = dataset_export.rasterize(scene, node, reference)  # the shared layer holds the right voxels
    assert names == list(SLICER) and np.array_equal(index, label)


@pytest.mark.parametrize("name, type_value, modifier", [
    ("Liver", "10200004", None), ("kidneys", "64033007", "51440002"), ("Kidney_R", "64033007", "24028007"),
    ("left adrenal gland", "23451007", "7771000"), ("heart_atrium_left", "82471001", None),
    ("urinary_bladder", "89837001", None), ("lung_left", "39607008", "7771000"), ("brainstem", "15926001", None),
    ("spinal cord", "2748008", None), ("small_bowel", "30315005", None)])
def test_standard_names_get_codes_whatever_their_spelling(name, type_value, modifier):
    entry = terminology.standard_entry(name)
    assert entry["category"] == list(ANATOMICAL_STRUCTURE) and entry["type"][1] == type_value
    assert (entry.get("typeModifier") or [None, None])[1] == modifier


def test_a_lesion_is_an_altered_structure_in_its_organ_and_unknown_names_get_nothing():
    entry = terminology.standard_entry("liver_lesion")
    assert entry["category"] == ["SCT", "49755003", "Morphologically Altered Structure"]
    assert entry["type"] == ["SCT", "4147007", "Mass"] and entry["region"] == ["SCT", "10200004", "Liver"]
    assert terminology.standard_entry("structure_a") is None and terminology.standard_entry("background") is None
    assert terminology.parse(terminology.serialize(entry)) == {k: v for k, v in entry.items() if k != "color"}


def test_terminology_is_kept_in_dataset_json_and_given_back_to_predictions(scene, tmp_path):
    label = np.zeros((4, 6, 8), np.uint8)
    label[1:3, 1:4, 1:3], label[1:3, 1:4, 5:7] = 1, 2
    volume = volumes.add_volume(scene, (label * 40).astype(np.int16), GEOMETRY, "p1")
    segmentation = testing.segmentation_from_array(scene, label, GEOMETRY, {"liver": 1, "growth": 2}, "p1 seg")
    # the user gave "growth" a meaning in Slicer's terminology selector (a cyst)...
    cyst = {"category": ["SCT", "49755003", "Morphologically Altered Structure"],
            "type": ["SCT", "367643001", "Cyst"]}
    terminology.apply(segments(segmentation)["growth"], cyst)
    dataset_export.export_cases(tmp_path / "DS", [SceneCase([volume], segmentation)], scene, ["CT"])
    stored = json.loads((tmp_path / "DS" / "dataset.json").read_text())["terminology"]
    assert stored["growth"]["type"] == cyst["type"] and stored["liver"]["type"][1] == "10200004"
    # ... and a model trained on it predicts segments with the same codes
    model = write_model(tmp_path / "model", {"background": 0, "liver": 1, "growth": 2}, {"terminology": stored})
    node = results.segmentation_from_labels(scene, label, GEOMETRY, results.model_labels(model), "result",
                                            volume, results.model_terminology(model))
    assert slicer_terms(segments(node)["growth"])[2] == ("SCT", "367643001", "Cyst")
    # or the caller names it when adding a case; a label the dataset lacks is refused
    with pytest.raises(ExportError, match=r"terminology given for \['nowhere'\]"):
        dataset_export.export_cases(tmp_path / "DS", [SceneCase([volume], segmentation, "p2")], scene,
                                    terminology={"nowhere": cyst})
    with pytest.raises(ExportError, match="'type' must be"):
        dataset_export.export_cases(tmp_path / "DS", [SceneCase([volume], segmentation, "p2")], scene,
                                    terminology={"growth": {**cyst, "type": ["SCT", "1"]}})


def test_a_labelmap_case_takes_its_names_from_its_colour_table(scene, tmp_path):
    import slicer

    label = np.zeros((4, 6, 8), np.uint8)
    label[1:3, 1:4, 1:3], label[1:3, 1:4, 5:7] = 1, 3
    volume = volumes.add_volume(scene, (label * 40).astype(np.int16), GEOMETRY, "p1")
    labelmap = volumes.add_volume(scene, label, GEOMETRY, "p1 labels", labelmap=True)
    colours = slicer.vtkMRMLColorTableNode()
    colours.SetTypeToUser()
    colours.SetNumberOfColors(4)
    for value, name in enumerate(["background", "Label_1", "spleen", "right kidney"]):
        colours.SetColor(value, name, 0.5, 0.5, 0.5, 1.0)
    colours.SetColorName(1, "liver")
    scene.AddNode(colours)
    labelmap.GetDisplayNode().SetAndObserveColorNodeID(colours.GetID())
    result = dataset_export.export_cases(tmp_path / "DS", [SceneCase([volume], labelmap)], scene, ["CT"])
    assert result.added_labels == ["liver", "right kidney"]
    stored = json.loads((tmp_path / "DS" / "dataset.json").read_text())["terminology"]
    assert stored["right kidney"]["typeModifier"] == ["SCT", "24028007", "Right"]
