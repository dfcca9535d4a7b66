"""Logic of the AutoSeg Slicer module that needs no Qt: MRML nodes <-> engine files and processes.

Everything here takes the scene and nodes it works on as arguments (never the global
``slicer.mrmlScene``), uses only MRML, VTK, numpy and AutoSegLib, and so runs the same inside
Slicer, in Slicer's Python console and in pytest with the ``slicer-core`` wheel.

Modules:

- ``volumes``: volume node <-> numpy array and geometry (MRML's RAS <-> ITK's LPS).
- ``labels``: segment names -> dataset label values, and the fixed colours of labels.
- ``terminology``: SNOMED CT category, type and laterality of structures, and their colours.
- ``dataset_export``: cases from the scene -> an nnU-Net v2 dataset folder (append-only).
- ``folds``: new cases added to an existing ``splits_final.json`` without moving old ones.
- ``jobs``: engine commands in background processes, read through ``--events``; file work in
  worker threads (``ThreadJob``).
- ``commands``: the argument lists of training, prediction and fine-tuning; configuration
  choices (``auto``), plan offers with epoch-time estimates, the predict rule.
- ``device``: whether training would run on a GPU, probed without blocking.
- ``results``: predictions back into the scene (segmentation + uncertainty overlay).
- ``segment_masks``: segments as masks on the volume's grid; one segment changed in a box, undoable.
- ``corrections``: correct with clicks: Markups points -> clicks -> a persistent engine process ->
  the chosen segment updated near them; undo.
- ``curves``: per-epoch loss and pseudo-Dice in table and plot nodes.
- ``library``: the user's models folder ("Use a model"): a registry of imported zips and
  referenced AutoSeg / nnU-Net v2 model folders, their model cards, predicting with them.
- ``dependencies``: which Python packages the engine still needs (installing is the GUI's job).
"""
