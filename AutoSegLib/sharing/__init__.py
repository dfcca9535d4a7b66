"""Sharing a model as a verified zip: ``autoseg export-model`` and ``autoseg import-model``.

The archive (format ``autoseg-model``, version 1; docs/sharing.md)::

    manifest.json                            format, version, and each other file's size and SHA-256
    model_card.json  MODEL_CARD.md           labels, channels, configurations, folds, CV Dice, notes
    plans.json  dataset.json  [inference_plan.json]   the model folder's own files, byte for byte
    {configuration}/fold_{k}/weights.safetensors      network weights only (no optimizer, no pickle)

Nothing else may be in it. Import checks every entry name, type and size before reading any
data, extracts into a temporary folder beside the target while counting and hashing bytes,
turns each weights file into a ``checkpoint_{kind}.pt`` the engine loads with
``weights_only=True``, opens the result as a model folder, and only then renames it into
place. Any problem is one :class:`~AutoSegLib.sharing.rules.SharingError` line naming the
entry, and leaves nothing behind.

Modules: :mod:`.rules` (entry names, manifest, size limits; pure), :mod:`.card` (the model
card; pure), :mod:`.exporter` and :mod:`.importer` (the file I/O). This package imports
nothing heavy; the exporter and importer load torch and safetensors.
"""
