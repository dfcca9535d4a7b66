"""Embedded default data: synthetic abdominal CT and MR phantoms with ground-truth labels.

AutoSeg ships no patient data, yet every stage must be demonstrable and testable on data
that behaves like the real thing. This package generates it:

* :mod:`.anatomy` models a miniature abdomen in physical space (mm, patient frame), with
  labelled organs, unlabelled look-alikes and per-case variation of shape, size and pose;
* :mod:`.grid` draws each case's voxel grid (spacing, anisotropy, origin, direction) from
  four acquisition protocols and keeps every labelled organ in the field of view; a
  ``size`` above 1 scales the patient and grows the grid at the same spacing (larger images);
* :mod:`.render` samples the anatomy on the grid into tissue and label maps;
* :mod:`.ct` and :mod:`.mr` turn tissues into Hounsfield units or multi-contrast MR
  signal with texture, partial volume, noise and (MR) a bias field;
* :mod:`.cases` ties these together per case, deterministically from (seed, split, index);
* :mod:`.writer` writes a dataset folder in nnU-Net v2's raw layout.

Only :mod:`.writer` touches disk. Labels of both kinds::

    background 0, liver 1, spleen 2, kidneys 3, aorta 4, liver_lesion 5

or, with ``anatomy="detailed"`` (``make-phantoms --anatomy detailed``), the same patients with
31 labelled structures (``anatomy.DETAILED_LABELS``): both kidneys and adrenals, thin vessels,
lymph nodes, spine parts, and ribs, wall and back muscles by side.

Example:
    >>> from AutoSegLib.synthetic import make_phantom_dataset
    >>> make_phantom_dataset("Dataset900_PhantomCT", kind="ct", cases=20, test_cases=5)  # doctest: +SKIP
"""

from AutoSegLib.synthetic.cases import (KINDS, PhantomCase, case_id, channel_names, label_table, make_case,
                                        protocol_of)
from AutoSegLib.synthetic.writer import make_phantom_dataset

__all__ = ["KINDS", "PhantomCase", "case_id", "channel_names", "label_table", "make_case",
           "make_phantom_dataset", "protocol_of"]
