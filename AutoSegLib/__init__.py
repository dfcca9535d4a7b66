"""AutoSegLib: the self-configuring segmentation engine behind the AutoSeg Slicer extension.

It follows the nnU-Net method (Isensee et al., Nature Methods 2021): a dataset fingerprint,
rule-based planning, preprocessing, U-Net training, sliding-window inference and empirical
selection. AutoSegLib never imports slicer, qt, ctk or vtk; the Slicer module drives it
through its command line (``autoseg ... --events``) or its Python API.

Stages are separate modules with file contracts between them (see docs/ and DESIGN.md).
Heavy modules are imported by the caller, not here, so ``import AutoSegLib`` stays cheap.
"""

__version__ = "0.1.0"
