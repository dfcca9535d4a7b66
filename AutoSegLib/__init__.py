"""AutoSegLib: the self-configuring segmentation engine behind the AutoSeg Slicer extension.

It follows the nnU-Net method (Isensee et al., Nature Methods 2021): a dataset fingerprint,
rule-based planning, preprocessing, U-Net training, sliding-window inference and empirical
selection. AutoSegLib never imports slicer, qt, ctk or vtk; the Slicer module drives it
through its command line (``autoseg ... --events``) or its Python API.

Stages are separate modules with file contracts between them (docs/architecture.md).
Heavy modules are imported by the caller, not here, so ``import AutoSegLib`` stays cheap.
"""

import os

__version__ = "0.1.0"


def passive_openmp_waits() -> None:
    """Let idle OpenMP threads sleep instead of spinning, unless the user chose otherwise.

    OpenMP reads the variable once, when torch's runtime loads, so it is set on importing
    AutoSegLib, which every entry point (the CLI, the Python API in Slicer's console) does
    before torch. With spinning threads a CPU run collapses as soon as anything else wants a
    core - the Slicer GUI, a second job, a data worker: one training iteration of 3d_cpu on
    2 cores took 12.7 s with the default and 1.8 s with PASSIVE while another process held
    one core; predicting 3 MR cases from the console took 21-24 s against 8-11 s (issue 13).
    On an idle machine PASSIVE costs ~13% (docs/decisions.md); ``OMP_WAIT_POLICY=ACTIVE``
    set by the user wins.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


passive_openmp_waits()
