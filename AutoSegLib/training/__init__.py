"""Training: nnU-Net's recipe for one fold of one configuration, resumable and observable.

Modules (import them directly; this package imports nothing heavy so the CLI stays fast):

- ``loss``: Dice + cross-entropy with an ignore label, deep-supervision weighting and target
  downsampling, the online pseudo-Dice counts.
- ``schedule``: poly learning rate, the ``paper``/``quick`` presets, time-budget scaling, ETA.
- ``splits``: the cross-validation folds (``splits_final.json``), patient groups, fold ``all``.
- ``checkpoint``: atomic, rotated checkpoints that load with ``weights_only=True``, and the
  resume search that falls back past broken files.
- ``progress``: ``training_log.jsonl`` and ``progress.png``.
"""
