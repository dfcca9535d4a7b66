"""The model layer: everything about a trained model folder, for training, inference, evaluation,
sharing and the Slicer module alike (docs/architecture.md).

- ``folder``: :class:`~AutoSegLib.models.folder.ModelFolder`, an AutoSeg model folder (plans,
  labels, folds, checkpoints, inference plan), opened and validated; nnU-Net v2 folders open
  through the same call.
- ``checkpoint``: checkpoint files written atomically with a checksum, loaded without running code.
- ``device``: which torch device (``auto``: CUDA, then MPS, then the CPU).
- ``choice``: which configuration(s), folds and checkpoint a prediction uses (torch-free).
- ``nnunet_plans``: pure conversion, nnU-Net v2's ``plans.json`` / ``dataset.json`` dicts in,
  AutoSeg's plans and dataset dicts out; every unsupported feature is refused by name.
- ``nnunet_layout``: which folders are nnU-Net v2 model folders and what is trained in them
  (torch-free).
- ``nnunet_folder``: the I/O edge for nnU-Net v2 folders: reads the files, loads ``.pth``
  checkpoints without running code, and gives ``ModelFolder``'s interface to the predictor.

Importing this package imports none of its modules (the torch-free ones stay torch-free).
"""
