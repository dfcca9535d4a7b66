"""Training patches: which case, where, and how a batch is put together.

The rules are nnU-Net v2's (``nnUNetDataLoader``):

- every sample draws its case uniformly at random (with replacement);
- the last third of each batch is forced to contain foreground (:func:`is_forced_foreground`);
- a forced sample picks a class present in the case, then one of its stored locations, and
  puts that voxel at the centre of the patch; any other sample takes a random position;
- the patch is cut larger than the network's (``sample_size``, see
  ``augmentation.initial_patch_size``) and the spatial augmentation crops it back;
- where the patch leaves the image, the image is padded with 0 and the label with -1
  ("outside"), which the augmentation's fix-ups turn into background.

2D configurations sample one slice of the 3D case: the patch is treated as (1, y, x), so a
forced sample takes the slice of its foreground voxel.

Reading touches only the part of the memory-mapped case inside the patch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from AutoSegLib.preprocessing.storage import PreprocessedCase, open_case

OVERSAMPLE_FOREGROUND = 0.33
PAD_IMAGE = 0
PAD_LABEL = -1

Box = list[tuple[int, int]]


class SampleError(RuntimeError):
    """A patch could not be made; the message names the case."""


def is_forced_foreground(sample_index: int, batch_size: int, fraction: float = OVERSAMPLE_FOREGROUND) -> bool:
    """True for the samples of a batch that must contain foreground (nnU-Net v2's rule).

    v2's ``_oversample_last_XX_percent``: sample ``j`` is forced when
    ``j >= round(batch_size * (1 - fraction))``. With 0.33 that is one sample of 2 or 3, 2 of
    4 to 7 ... and at least one for every batch size >= 2 (the planner's minimum). A batch of
    1 gets none: round(0.67) = 1.
    """
    return not sample_index < round(batch_size * (1 - fraction))


def batch_rng(seed: int, batch_index: int) -> np.random.Generator:
    """The generator of one batch: the same seed and index give the same batch anywhere."""
    return np.random.default_rng([seed, batch_index])


def sample_box(shape: tuple[int, ...], size: tuple[int, ...], final_size: tuple[int, ...],
               rng: np.random.Generator, center: np.ndarray | None = None) -> Box:
    """Where to cut a patch of ``size`` from an image of ``shape``: [(start, stop)] per axis.

    The margin ``size - final_size`` (at least enough to fit a too-small image) is allowed
    to hang out on both sides, so the centred final patch still reaches every image border.
    A random box is uniform over that range; with ``center`` the box is centred on it,
    clamped only at the lower end (as v2: a voxel near the far border stays centred).
    """
    boxes = []
    for d, (extent, s, f) in enumerate(zip(shape, size, final_size)):
        need = max(s - f, s - extent)
        low, high = (-need) // 2, extent + need // 2 + need % 2 - s
        if center is None:
            start = int(rng.integers(low, high + 1))
        else:
            start = max(low, int(center[d]) - s // 2)
        boxes.append((start, start + s))
    return boxes


def crop_and_pad(array: np.ndarray, box: Box, pad_value: float, dtype=None) -> np.ndarray:
    """Copy ``array[:, box]`` (leading channel axis kept), padding where the box leaves it.

    Slicing first means a memory-mapped array reads only the pages inside the box.
    """
    out = np.full((array.shape[0], *[b - a for a, b in box]), pad_value, dtype=dtype or array.dtype)
    inside = [(max(a, 0), min(b, n)) for (a, b), n in zip(box, array.shape[1:])]
    if all(hi > lo for lo, hi in inside):
        source = (slice(None), *[slice(lo, hi) for lo, hi in inside])
        target = (slice(None), *[slice(lo - a, hi - a) for (lo, hi), (a, _) in zip(inside, box)])
        out[target] = array[source]
    return out


def group_foreground(rows: np.ndarray, ignore_label: int | None = None) -> dict[int, np.ndarray]:
    """Stored foreground rows ``[class, *index]`` as class -> locations, without ``ignore``."""
    groups = {}
    for value in np.unique(rows[:, 0]) if len(rows) else []:
        if ignore_label is not None and value == ignore_label:
            continue
        groups[int(value)] = rows[rows[:, 0] == value, 1:]
    return groups


def pick_foreground_voxel(groups: dict[int, np.ndarray], rng: np.random.Generator) -> np.ndarray | None:
    """A class present in the case (uniformly), then one of its locations; None if none."""
    if not groups:
        return None
    classes = sorted(groups)
    locations = groups[classes[int(rng.integers(len(classes)))]]
    return locations[int(rng.integers(len(locations)))]


class PatchSampler:
    """Cuts patches from the preprocessed cases of one configuration folder.

    Cases are opened (memory-mapped) on first use and kept open.

    Args:
        folder: ``WORK/preprocessed/{configuration}``.
        case_ids: the cases to draw from.
        patch_size: the network's patch (2 or 3 values).
        sample_size: the patch to cut (``Augmentation.input_patch_size``).
        ignore_label: never chosen as the class of a forced-foreground sample.
    """

    def __init__(self, folder: str | Path, case_ids: list[str], patch_size, sample_size,
                 ignore_label: int | None = None):
        if not case_ids:
            raise ValueError("no cases to sample from")
        self.folder = Path(folder)
        self.case_ids = list(case_ids)
        self.patch_size = tuple(int(v) for v in patch_size)
        self.sample_size = tuple(int(v) for v in sample_size)
        self.ignore_label = ignore_label
        self._open: dict[str, tuple[PreprocessedCase, dict[int, np.ndarray]]] = {}

    def _case(self, case_id: str) -> tuple[PreprocessedCase, dict[int, np.ndarray]]:
        if case_id not in self._open:
            case = open_case(self.folder, case_id)
            if case.seg is None:
                raise ValueError(f"case '{case_id}' in {self.folder} has no label map")
            self._open[case_id] = (case, group_foreground(case.foreground, self.ignore_label))
        return self._open[case_id]

    def sample(self, case_id: str, force_foreground: bool, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Image float32 (C, *sample_size) and label int16 (1, *sample_size) of one patch."""
        case, groups = self._case(case_id)
        shape = case.data.shape[1:]
        extra = len(shape) - len(self.patch_size)  # 1 for a 2D patch from a 3D case: one slice
        if extra not in (0, 1):
            raise ValueError(f"case '{case_id}' has shape {shape}, which does not fit patch {self.patch_size}")
        size, final = (1,) * extra + self.sample_size, (1,) * extra + self.patch_size
        center = pick_foreground_voxel(groups, rng) if force_foreground else None
        box = sample_box(shape, size, final, rng, center)
        image = crop_and_pad(case.data, box, PAD_IMAGE, np.float32)
        seg = crop_and_pad(case.seg, box, PAD_LABEL, np.int16)
        if extra:
            image, seg = image[:, 0], seg[:, 0]
        return image, seg


def make_batch(sampler: PatchSampler, augmentation, batch_size: int, rng: np.random.Generator,
               on_case: Callable[[str], None] | None = None, slots: tuple[int, int] | None = None) -> dict:
    """Draw, augment and stack one batch (or the ``slots`` part of it).

    Each sample ``j`` has its own generator, spawned from ``rng`` (``rng.spawn``), for its case,
    its augmentation seed and its position. So sample ``j`` is the same whichever part of the
    batch is made: the ranks of a data-parallel run, each making its ``slots = (start, stop)``
    of the global batch (:func:`AutoSegLib.training.distributed.rank_slots`), together make
    exactly the batch one process makes. The foreground rule counts ``j`` in the whole batch.

    Returns:
        ``{"data": float32 (b, C, *patch), "target": [int16 (b, 1, *shape_k)] one per network
        output (full resolution first), "keys": [case id per sample]}``, b = the slots' count.

    Raises:
        SampleError: naming the case whose patch failed (with the original as its cause).
    """
    start, stop = slots if slots is not None else (0, batch_size)
    if not 0 <= start < stop <= batch_size:
        raise ValueError(f"slots {start}..{stop} do not fit a batch of {batch_size}")
    generators = rng.spawn(batch_size)[start:stop]
    keys, images, targets = [], [], []
    for j, sample_rng in zip(range(start, stop), generators):
        key = sampler.case_ids[int(sample_rng.integers(len(sampler.case_ids)))]
        keys.append(key)
        if on_case is not None:
            on_case(key)
        augmentation.seed(int(sample_rng.integers(2**63)))
        try:
            image, seg = sampler.sample(key, is_forced_foreground(j, batch_size), sample_rng)
            image, target = augmentation(torch.from_numpy(image), torch.from_numpy(seg))
        except Exception as exc:
            raise SampleError(f"case '{key}': {type(exc).__name__}: {exc}") from exc
        images.append(image)
        targets.append(target)
    return {"data": torch.stack(images), "target": [torch.stack(level) for level in zip(*targets)], "keys": keys}
