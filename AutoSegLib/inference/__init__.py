"""Inference: a trained model folder applied to new images, nnU-Net v2's way.

Modules, pure in the middle and I/O at the edges:

- ``windows``: where the sliding windows go, the Gaussian importance map, padding (numpy).
- ``sliding``: one network over one preprocessed case: weighted logits, mirroring (torch).
- ``probabilities``: labels, normalized entropy, one-hot cascade inputs (numpy).
- ``model``: the model folder: plans, labels, inference plan, folds, checkpoints.
- ``predictor``: :class:`Predictor`, in-memory arrays in, labels and probabilities out.
- ``pipeline``: a batch of cases overlapped: the next one read and the previous one written while
  the network runs (at most three cases in memory).
- ``files``: :func:`predict_files` (``autoseg predict``), atomic outputs; :func:`find_input_cases`
  groups a folder's ``{case}_{XXXX}`` files into cases by channel, :func:`read_input_case` reads one.
- ``validation``: :func:`validate_fold`, run after training.

Example:
    >>> from AutoSegLib.inference import Predictor
    >>> predictor = Predictor.from_model_dir("Dataset001.autoseg/model", tta=False)  # doctest: +SKIP
    >>> labels, _ = predictor.predict([ct_array], geometry)  # doctest: +SKIP
"""

from AutoSegLib.inference.files import InputCase, PredictionError, find_input_cases, predict_files, read_input_case
from AutoSegLib.models.folder import ModelCheckpointError, ModelFolderError
from AutoSegLib.inference.predictor import InputError, Predictor
from AutoSegLib.inference.validation import validate_fold

__all__ = ["Predictor", "predict_files", "find_input_cases", "read_input_case", "InputCase", "validate_fold",
           "PredictionError", "ModelFolderError", "ModelCheckpointError", "InputError"]
