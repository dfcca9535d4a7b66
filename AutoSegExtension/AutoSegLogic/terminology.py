"""Standard meaning for segments: SNOMED CT category, type and laterality, and conventional colours.

A segment called "liver" should say *Anatomical Structure / Liver* (SNOMED CT 123037004 /
10200004) to anything that reads it, above all a DICOM SEG export, not the generic "Tissue"
every new segment starts with. This module knows the structures of the phantoms and the common
abdominal, thoracic and brain structures; their codes are those Slicer's DICOM master
terminology (SegmentationCategoryTypeModifier-DICOM-Master) and the structure-to-SNOMED CT
mapping published with SlicerTotalSegmentator (totalsegmentator_snomed_mapping.csv) use, and
their colours the master list's recommended display colours (= Slicer's GenericAnatomyColors).
The slicer-core wheel has Slicer's terminology logic but not its JSON files, so the entries
live here; inside Slicer the terminology selector shows them like any other.

An entry is plain JSON (kept per label in ``dataset.json`` under ``"terminology"``, so a
model's predictions get the same codes back)::

    {"category": ["SCT", "123037004", "Anatomical Structure"], "type": ["SCT", "64033007", "Kidney"],
     "typeModifier": ["SCT", "7771000", "Left"], "color": [185, 102, 83]}

optionally with ``"region"`` / ``"regionModifier"`` (a liver lesion: type Mass, region Liver).

Example::

    from AutoSegLogic import terminology
    entry = terminology.standard_entry("kidney_left")   # Kidney, Left, SNOMED CT
    terminology.apply(segment, entry)                   # the segment's terminology tag and colour
"""

from __future__ import annotations

import re
from typing import Mapping

CATEGORY_CONTEXT = "Segmentation category and type - DICOM master list"
REGION_CONTEXT = "Anatomic codes - DICOM master list"
DATASET_KEY = "terminology"  # dataset.json: {label name: entry}

ANATOMY = ["SCT", "123037004", "Anatomical Structure"]
ALTERED = ["SCT", "49755003", "Morphologically Altered Structure"]
TISSUE = ["SCT", "85756007", "Tissue"]
LEFT, RIGHT, BOTH = ["SCT", "7771000", "Left"], ["SCT", "24028007", "Right"], ["SCT", "51440002", "Right and left"]

_VEIN, _ARTERY, _BONE = (0, 151, 206), (216, 101, 79), (241, 214, 145)
# name -> (SNOMED CT code, code meaning, colour or None, paired). "paired" structures take a
# laterality modifier from "left"/"right" in the name (both, for a plural such as "kidneys").
_STRUCTURES: dict[str, tuple] = {
    # abdomen
    "liver": ("10200004", "Liver", (221, 130, 101), False),
    "spleen": ("78961009", "Spleen", (157, 108, 162), False),
    "kidney": ("64033007", "Kidney", (185, 102, 83), True),
    "aorta": ("15825003", "Aorta", (224, 97, 76), False),
    "pancreas": ("15776009", "Pancreas", (249, 180, 111), False),
    "gallbladder": ("28231008", "Gallbladder", (139, 150, 98), False),
    "stomach": ("69695003", "Stomach", (216, 132, 105), False),
    "duodenum": ("38848004", "Duodenum", (255, 253, 229), False),
    "small intestine": ("30315005", "Small Intestine", (205, 167, 142), False),
    "colon": ("71854001", "Colon", (204, 168, 143), False),
    "esophagus": ("32849002", "Esophagus", (211, 171, 143), False),
    "adrenal gland": ("23451007", "Adrenal gland", (249, 186, 150), True),
    "inferior vena cava": ("64131007", "Inferior vena cava", _VEIN, False),
    "portal vein and splenic vein": ("110765007", "Portal vein and splenic vein", _VEIN, False),
    "urinary bladder": ("89837001", "Urinary bladder", (222, 154, 132), False),
    "prostate": ("41216001", "Prostate", (230, 158, 140), False),
    "common iliac artery": ("73634005", "Common iliac artery", _ARTERY, True),
    "common iliac vein": ("46027005", "Common iliac vein", _VEIN, True),
    "sacrum": ("54735007", "Sacrum", _BONE, False),
    "femur": ("71341001", "Femur", _BONE, True),
    "hip": ("29836001", "Hip", _BONE, True),
    "iliopsoas muscle": ("68455001", "Iliopsoas muscle", (192, 104, 88), True),
    # thorax
    "heart": ("80891009", "Heart", (206, 110, 84), False),
    "lung": ("39607008", "Lung", (197, 165, 145), True),
    "trachea": ("44567001", "Trachea", (182, 228, 255), False),
    "pulmonary artery": ("81040000", "Pulmonary artery", (0, 122, 171), False),
    "left atrium": ("82471001", "Left atrium", (203, 108, 81), False),
    "right atrium": ("73829009", "Right atrium", (210, 115, 89), False),
    "left ventricle of heart": ("87878005", "Left ventricle of heart", (152, 55, 13), False),
    "right ventricle of heart": ("53085002", "Right ventricle of heart", (181, 85, 57), False),
    "myocardium": ("74281007", "Myocardium", None, False),
    "sternum": ("56873002", "Sternum", (244, 217, 154), False),
    "rib": ("113197003", "Rib", (253, 232, 158), True),
    "clavicle": ("51299004", "Clavicle", (205, 179, 108), True),
    "scapula": ("79601000", "Scapula", _BONE, True),
    "vertebra": ("51282000", "Vertebra", _BONE, False),
    "spinal cord": ("2748008", "Spinal cord", (244, 214, 49), False),
    "thyroid gland": ("69748006", "Thyroid gland", (62, 162, 114), False),
    # head and brain
    "brain": ("12738006", "Brain", (250, 250, 225), False),
    "skull": ("89546000", "Skull", (241, 213, 144), False),
    "cerebellum": ("113305005", "Cerebellum", (194, 195, 164), False),
    "brainstem": ("15926001", "Brainstem", (145, 92, 109), False),
    "thalamus": ("42695009", "Thalamus", (166, 113, 137), True),
    "caudate nucleus": ("11000004", "Caudate nucleus", (30, 111, 85), True),
    "putamen": ("89278009", "Putamen", (210, 157, 166), True),
    "amygdala": ("4958002", "Amygdala", (98, 153, 112), True),
    "lateral ventricle": ("66720007", "Lateral ventricle", (88, 106, 215), True),
    "corpus callosum": ("88442005", "Corpus callosum", (97, 113, 158), False),
    "pituitary gland": ("56329008", "Pituitary gland", (57, 157, 110), False),
    "optic nerve": ("18234004", "Optic nerve", (244, 214, 49), True),
}
# What people call these structures -> the key above.
_SYNONYMS = {
    "gall bladder": "gallbladder", "oesophagus": "esophagus", "small bowel": "small intestine",
    "bowel": "small intestine", "large intestine": "colon", "ivc": "inferior vena cava",
    "vena cava inferior": "inferior vena cava", "portal vein": "portal vein and splenic vein",
    "bladder": "urinary bladder", "adrenal": "adrenal gland", "iliac artery": "common iliac artery",
    "iliac vena": "common iliac vein", "iliac vein": "common iliac vein", "iliopsoas": "iliopsoas muscle",
    "atrium left": "left atrium", "heart atrium left": "left atrium", "atrium right": "right atrium",
    "heart atrium right": "right atrium", "ventricle left": "left ventricle of heart",
    "heart ventricle left": "left ventricle of heart", "left ventricle": "left ventricle of heart",
    "ventricle right": "right ventricle of heart", "heart ventricle right": "right ventricle of heart",
    "right ventricle": "right ventricle of heart", "heart myocardium": "myocardium", "ribs": "rib",
    "clavicula": "clavicle", "vertebrae": "vertebra", "brain stem": "brainstem", "caudate": "caudate nucleus",
    "amygdaloid complex": "amygdala", "ventricle": "lateral ventricle", "pituitary": "pituitary gland",
    "thyroid": "thyroid gland",
}
# Lesions: morphologically altered structures (DICOM master list codes and colours).
_MASS = (["SCT", "4147007", "Mass"], (144, 238, 144))
_ALTERED_TYPES = {
    "lesion": _MASS, "mass": _MASS, "tumor": (["SCT", "108369006", "Neoplasm"], (144, 238, 144)),
    "tumour": (["SCT", "108369006", "Neoplasm"], (144, 238, 144)),
    "cyst": (["SCT", "367643001", "Cyst"], (205, 205, 100)), "edema": (["SCT", "79654002", "Edema"], (140, 224, 228)),
    "oedema": (["SCT", "79654002", "Edema"], (140, 224, 228)),
    "necrosis": (["SCT", "6574001", "Necrosis"], (216, 191, 216)),
    "hemorrhage": (["SCT", "50960005", "Hemorrhage"], (188, 65, 28)),
    "haemorrhage": (["SCT", "50960005", "Hemorrhage"], (188, 65, 28)),
}
_SIDE_WORDS = {"left": LEFT, "l": LEFT, "right": RIGHT, "r": RIGHT}


def _words(name: str) -> list[str]:
    return [w for w in re.split(r"[\s_\-.,/]+", name.lower()) if w]


def _structure(words: list[str]) -> tuple[str, list | None] | None:
    """(key of _STRUCTURES, laterality modifier) for a name's words, or None."""
    whole = " ".join(words)
    if _SYNONYMS.get(whole, whole) in _STRUCTURES and not _STRUCTURES[_SYNONYMS.get(whole, whole)][3]:
        return _SYNONYMS.get(whole, whole), None  # "left atrium", "heart_atrium_left": the side is in the name
    side = None
    if words and words[0] in _SIDE_WORDS and len(words) > 1:
        side, words = _SIDE_WORDS[words[0]], words[1:]
    elif words and words[-1] in _SIDE_WORDS and len(words) > 1:
        side, words = _SIDE_WORDS[words[-1]], words[:-1]
    text = " ".join(words)
    key = _SYNONYMS.get(text, text)
    plural = False
    if key not in _STRUCTURES and text.endswith("s"):
        key, plural = _SYNONYMS.get(text[:-1], text[:-1]), True
    if key not in _STRUCTURES:
        return None
    if not _STRUCTURES[key][3]:
        return key, None
    return key, side if side is not None else (BOTH if plural else None)



def standard_entry(name: str) -> dict | None:
    """The standard terminology of a segment name (``liver``, ``Kidney_L``, ``left kidney``,
    ``kidneys``, ``liver_lesion``, ...), or None for a name this module does not know."""
    words = _words(name)
    if not words or words == ["background"]:
        return None
    for index, word in enumerate(words):  # "liver lesion", "lesion": an altered structure (in a region)
        if word in _ALTERED_TYPES and index == len(words) - 1:
            type_code, colour = _ALTERED_TYPES[word]
            entry = {"category": list(ALTERED), "type": list(type_code), "color": list(colour)}
            region = _structure(words[:index]) if index else None
            if region is not None:
                code, meaning, _, _ = _STRUCTURES[region[0]]
                entry["region"] = ["SCT", code, meaning]
                if region[1] is not None:
                    entry["regionModifier"] = list(region[1])
            return entry
    found = _structure(words)
    if found is None:
        return None
    key, side = found
    code, meaning, colour, _ = _STRUCTURES[key]
    entry = {"category": list(ANATOMY), "type": ["SCT", code, meaning]}
    if side is not None:
        entry["typeModifier"] = list(side)
    if colour is not None:
        entry["color"] = list(colour)
    return entry


def check_entry(entry: Mapping, label: str = "") -> dict:
    """A terminology entry as stored, checked: code triples of three strings, colour 0-255."""
    where = f"terminology of '{label}'" if label else "terminology entry"
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where}: must be an object like {{'category': [...], 'type': [...]}}, got {entry!r}")
    out = {}
    for key in ("category", "type", "typeModifier", "region", "regionModifier"):
        value = entry.get(key)
        if value is None:
            if key in ("category", "type"):
                raise ValueError(f"{where}: '{key}' is required (coding scheme, code value, code meaning)")
            continue
        if not (isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, str) and v for v in value)):
            raise ValueError(f"{where}: '{key}' must be [coding scheme, code value, code meaning], got {value!r}")
        out[key] = list(value)
    colour = entry.get("color")
    if colour is not None:
        if not (isinstance(colour, (list, tuple)) and len(colour) == 3
                and all(isinstance(c, (int, float)) and 0 <= c <= 255 for c in colour)):
            raise ValueError(f"{where}: 'color' must be [red, green, blue] in 0-255, got {colour!r}")
        out["color"] = [int(round(c)) for c in colour]
    return out


# -- Slicer's representation --------------------------------------------------------------------
def serialize(entry: Mapping) -> str:
    """Slicer's terminology string for an entry (what a segment's terminology tag holds)."""
    import slicer

    empty = ["", "", ""]

    def code(key):  # Slicer's order: value, coding scheme, meaning
        scheme, value, meaning = entry.get(key) or empty
        return [value, scheme, meaning]

    return slicer.vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry(
        CATEGORY_CONTEXT, *code("category"), *code("type"), *code("typeModifier"),
        REGION_CONTEXT, *code("region"), *code("regionModifier"))


def parse(serialized: str) -> dict | None:
    """An entry from Slicer's terminology string, or None when it has no category and type."""
    import slicer

    terms = slicer.vtkSlicerTerminologyEntry()
    if not serialized or not slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(serialized, terms):
        return None
    out = {}
    for key, obj in (("category", terms.GetCategoryObject()), ("type", terms.GetTypeObject()),
                     ("typeModifier", terms.GetTypeModifierObject()), ("region", terms.GetRegionObject()),
                     ("regionModifier", terms.GetRegionModifierObject())):
        if obj is not None and obj.GetCodeValue():
            out[key] = [obj.GetCodingSchemeDesignator(), obj.GetCodeValue(), obj.GetCodeMeaning()]
    return out if "category" in out and "type" in out else None


def segment_entry(segment) -> dict | None:
    """The terminology the user gave a segment in Slicer, or None if it still has the generic default."""
    entry = parse(segment.GetTerminology())
    if entry is None or entry["type"][1] == TISSUE[1]:  # Slicer's default: "Tissue", i.e. not chosen
        return None
    return entry


def apply(segment, entry: Mapping | None) -> None:
    """Give a segment the entry's terminology tag and (when it has one) its colour."""
    if not entry:
        return
    segment.SetTerminology(serialize(entry))
    if entry.get("color"):
        segment.SetColor(*(c / 255.0 for c in entry["color"]))


def for_labels(names, stored: Mapping | None = None) -> dict[str, dict]:
    """``{label name: entry}``: the stored (user-chosen) entry of each name, else the standard one."""
    stored = {k.lower(): v for k, v in (stored or {}).items()}
    out = {}
    for name in names:
        entry = stored.get(name.lower()) or standard_entry(name)
        if entry:
            out[name] = check_entry(entry, name)
    return out
