"""Model folders that did not come from AutoSeg's own trainer, turned into what inference needs.

Today: nnU-Net v2 trained model folders (docs/nnunet-models.md).

- ``nnunet_plans``: pure conversion, nnU-Net v2's ``plans.json`` / ``dataset.json`` dicts in,
  AutoSeg's plans and dataset dicts out; every unsupported feature is refused by name.
- ``nnunet_layout``: which folders are nnU-Net v2 model folders and what is trained in them
  (torch-free: :mod:`AutoSegLib.modelchoice` uses it).
- ``nnunet_folder``: the I/O edge: reads the files, loads ``.pth`` checkpoints without running
  code, and gives :class:`~AutoSegLib.inference.model.ModelFolder`'s interface to the predictor.
"""
