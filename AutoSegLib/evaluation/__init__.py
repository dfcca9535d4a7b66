"""Evaluation: metrics per case and class, folder evaluation, and the empirical choice of model.

- ``metrics``: pure functions on arrays (Dice, IoU, voxel counts, HD95, normalized surface Dice).
- ``summary``: means over cases and classes, the summary JSON document, the printed table.
- ``folders``: :func:`evaluate_folders`, prediction folder vs reference folder.
- ``crossval``: which trained configurations have complete cross-validation predictions.
- ``selection``: :func:`find_best`, the configuration or ensemble and postprocessing to use.

Conventions and file formats: docs/evaluation.md.
"""

from AutoSegLib.evaluation.folders import EvaluationError, evaluate_folders
from AutoSegLib.evaluation.metrics import DEFAULT_NSD_TOLERANCE_MM, case_metrics
from AutoSegLib.evaluation.selection import SelectionError, find_best

__all__ = ["DEFAULT_NSD_TOLERANCE_MM", "EvaluationError", "SelectionError", "case_metrics", "evaluate_folders",
           "find_best"]
