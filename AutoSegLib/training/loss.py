"""The training loss: soft Dice + cross-entropy (nnU-Net v2's recipe), ignore label, deep supervision.

Sign convention: ``loss = CE + (1 - Dice)``, so the loss is >= 0 and a perfect prediction
gives ~0. nnU-Net v2 computes ``CE - Dice`` instead (its logged losses go negative); the
gradients are identical, and nnU-Net's number is ours minus 1 (per output, before the
deep-supervision weights, which sum to 1, so also for the weighted total).

Targets are integer label maps ``(B, 1, *spatial)`` on the network's grid. Besides the class
values ``0..K-1`` they may hold ``-1`` (preprocessing's marker for background outside the
body) and the ignore label (``dataset.json``'s ``"ignore"``, the highest label value).
``-1`` counts as background. Ignore voxels are masked out of both terms, so partially
annotated cases train: the network's output there has no effect on loss or gradient.

Example:
    >>> loss_fn = DeepSupervisionLoss(DiceCELoss(batch_dice=True, ignore_label=3),
    ...                               deep_supervision_weights(len(outputs)))  # doctest: +SKIP
    >>> targets = downsample_target(target, [o.shape[2:] for o in outputs])  # doctest: +SKIP
    >>> loss = loss_fn(outputs, targets)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

OUTSIDE_BODY = -1


def prepare_target(target: torch.Tensor, n_classes: int,
                   ignore_label: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Class indices ``(B, 1, ...)`` in ``0..K-1`` and the mask of voxels that count (None: all).

    ``-1`` becomes background; ignore voxels become 0 and are False in the mask. Any other
    value outside ``0..K-1`` is an error naming the values (a label the network cannot
    predict would otherwise crash deep inside ``scatter``, on CUDA without a message).
    """
    if ignore_label is not None and 0 <= ignore_label < n_classes:
        raise ValueError(f"ignore label {ignore_label} is one of the network's {n_classes} classes; "
                         f"it must be outside 0..{n_classes - 1} (dataset.json gives it the highest value)")
    bad = (target < OUTSIDE_BODY) | (target >= n_classes)
    if ignore_label is not None:
        bad &= target != ignore_label
    if bool(bad.any()):
        values = torch.unique(target[bad]).tolist()[:10]
        allowed = f"-1 (outside body), 0..{n_classes - 1}" + (f", {ignore_label} (ignore)" if ignore_label is not None else "")
        raise ValueError(f"target holds label values {values} the loss cannot use; allowed: {allowed}")
    mask = None if ignore_label is None else target != ignore_label
    drop = target < 0 if mask is None else (target < 0) | ~mask
    return torch.where(drop, 0, target).long(), mask


def _one_hot(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    shape = (labels.shape[0], n_classes, *labels.shape[2:])
    return torch.zeros(shape, dtype=torch.bool, device=labels.device).scatter_(1, labels, True)


def soft_dice(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None,
              batch_dice: bool, smooth: float = 1e-5) -> torch.Tensor:
    """Mean soft Dice over the foreground classes (nnU-Net's MemoryEfficientSoftDiceLoss).

    Softmax over classes, background left out (``do_bg=False``), Dice per class as
    ``(2 * intersect + smooth) / max(sum_gt + sum_pred + smooth, 1e-8)``; with ``batch_dice``
    the sums run over the batch axis too (one Dice per class), otherwise one Dice per sample
    and class, all averaged. A class absent from both target and prediction scores 1.
    Math is float32 whatever the autocast dtype of ``logits``: the sums run over ~10^6 voxels.
    """
    probs = torch.softmax(logits.float(), dim=1)[:, 1:]
    onehot = _one_hot(labels, logits.shape[1])[:, 1:]
    if mask is not None:
        probs = torch.where(mask, probs, 0.0)
        onehot = onehot & mask
    axes = tuple(range(2, logits.ndim))
    intersect = (probs * onehot).sum(axes)
    sum_pred = probs.sum(axes)
    sum_gt = onehot.sum(axes, dtype=torch.float32)
    if batch_dice:
        intersect, sum_pred, sum_gt = intersect.sum(0), sum_pred.sum(0), sum_gt.sum(0)
    dice = (2 * intersect + smooth) / torch.clamp(sum_gt + sum_pred + smooth, min=1e-8)
    return dice.mean()


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None,
                         class_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy averaged over the voxels in ``mask``; 0 when the mask is empty.

    Same as ``ignore_index`` in torch, except that a patch of ignore voxels only gives 0
    rather than NaN (nnU-Net skips the term in that case). With ``class_weights`` (one per
    class) each voxel counts by its true class's weight, normalized by the weights' sum, as
    torch's weighted ``mean`` does.
    """
    truth = labels[:, 0]
    weight = None if class_weights is None else class_weights.to(logits.device, torch.float32)
    per_voxel = F.cross_entropy(logits.float(), truth, weight=weight, reduction="none")
    counts = torch.ones_like(per_voxel) if weight is None else weight[truth]
    if mask is not None:
        keep = mask[:, 0]
        per_voxel, counts = torch.where(keep, per_voxel, 0.0), torch.where(keep, counts, 0.0)
    return per_voxel.sum() / counts.sum().clamp(min=1e-8 if weight is not None else 1)


class DiceCELoss(nn.Module):
    """``weight_ce * CE + weight_dice * (1 - soft Dice)`` on logits ``(B, K, ...)``.

    Args:
        batch_dice: Dice over the whole batch (the plan's ``batch_dice``) or per sample.
        ignore_label: label value excluded from both terms, or None.
        smooth: added to numerator and denominator of the Dice (nnU-Net v2 uses 1e-5).
    """

    def __init__(self, batch_dice: bool, ignore_label: int | None = None, smooth: float = 1e-5,
                 weight_ce: float = 1.0, weight_dice: float = 1.0, class_weights: Sequence[float] | None = None):
        super().__init__()
        self.class_weights = None if class_weights is None else torch.tensor([float(w) for w in class_weights])
        self.batch_dice = batch_dice
        self.ignore_label = ignore_label
        self.smooth = smooth
        self.weight_ce = weight_ce
        self.weight_dice = weight_dice

    def components(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The unweighted terms ``(cross_entropy, 1 - dice)``, for logging."""
        if target.ndim == logits.ndim - 1:
            target = target[:, None]
        labels, mask = prepare_target(target, logits.shape[1], self.ignore_label)
        dice = soft_dice(logits, labels, mask, self.batch_dice, self.smooth)
        return masked_cross_entropy(logits, labels, mask, self.class_weights), 1 - dice

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce, dice_loss = self.components(logits, target)
        return self.weight_ce * ce + self.weight_dice * dice_loss


def deep_supervision_weights(n_outputs: int, decay: float = 0.5) -> list[float]:
    """Loss weights for outputs ordered highest resolution first: 1, 1/2, 1/4, ..., normalized.

    The lowest-resolution output gets 0, as in nnU-Net v2: it is too coarse to teach
    anything useful. A single output gets weight 1. ``decay`` is the ratio between
    neighbouring outputs (the method's 1/2; 0 trains the full-resolution output alone), for
    benchmarks/bench_many_classes.py's variants.

    Example:
        >>> deep_supervision_weights(3)
        [0.6666666666666666, 0.3333333333333333, 0.0]
    """
    if n_outputs < 1:
        raise ValueError(f"need at least one network output, got {n_outputs}")
    if n_outputs == 1:
        return [1.0]
    raw = [decay ** i for i in range(n_outputs - 1)] + [0.0]
    total = sum(raw)
    return [w / total for w in raw]


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of ``loss`` over the deep-supervision outputs and their targets."""

    def __init__(self, loss: nn.Module, weights: Sequence[float]):
        super().__init__()
        self.loss = loss
        self.weights = [float(w) for w in weights]

    def forward(self, outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(outputs) != len(self.weights) or len(targets) < len(outputs):
            raise ValueError(f"deep supervision: {len(outputs)} outputs, {len(targets)} targets, "
                             f"{len(self.weights)} weights; they must match")
        targets = matching_targets(outputs, targets)
        terms = [w * self.loss(o, t) for w, o, t in zip(self.weights, outputs, targets) if w != 0]
        return torch.stack(terms).sum()


def matching_targets(outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The target of each output: the one at the same index when the shapes agree (the blueprint's
    one output per decoder stage), else the first of the output's spatial shape (U-Net++'s nested
    heads are all at full resolution; Swin-UNETR has one head)."""
    matched = []
    for i, output in enumerate(outputs):
        if i < len(targets) and targets[i].shape[2:] == output.shape[2:]:
            matched.append(targets[i])
            continue
        same = [t for t in targets if t.shape[2:] == output.shape[2:]]
        if not same:
            raise ValueError(f"deep supervision: output {i} of shape {tuple(output.shape[2:])} has no target of "
                             f"that shape (targets: {[tuple(t.shape[2:]) for t in targets]})")
        matched.append(same[0])
    return matched


def deep_supervision_shapes(patch_size: Sequence[int], strides: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """Spatial shape of each decoder output, highest resolution first (all stages but the bottleneck).

    A strided convolution with padding ``k // 2`` gives ``ceil(size / stride)``, so this is
    right for patch sizes that are not multiples of the total stride too.

    Example:
        >>> deep_supervision_shapes([40, 96, 96], [[1, 1, 1], [2, 2, 2], [1, 2, 2]])
        [(40, 96, 96), (20, 48, 48)]
    """
    shapes, shape = [], tuple(int(s) for s in patch_size)
    for stride in strides[:-1]:
        shape = tuple(math.ceil(s / st) for s, st in zip(shape, stride))
        shapes.append(shape)
    return shapes


def downsample_target(target: torch.Tensor, shapes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """The target ``(B, C, *spatial)`` resized to each shape by nearest neighbour, dtype kept.

    Uses ``nearest-exact`` like batchgeneratorsv2's DownsampleSegForDSTransform (for a
    factor of 2 it picks the second voxel of each pair). Label values, -1 and the ignore
    label survive unchanged; a shape equal to the input's returns the input itself.
    """
    results = []
    for shape in shapes:
        shape = tuple(int(s) for s in shape)
        if shape == tuple(target.shape[2:]):
            results.append(target)
        else:
            resized = F.interpolate(target.float(), size=shape, mode="nearest-exact")
            results.append(resized.to(target.dtype))
    return results


@torch.no_grad()
def pseudo_dice(logits: torch.Tensor, target: torch.Tensor, ignore_label: int | None = None,
                n_classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hard (argmax) true positives, false positives, false negatives per foreground class.

    Counts are summed over the batch and all voxels (nnU-Net's validation step), int64 on
    the logits' device, length ``K - 1``. Accumulate them over the validation iterations and
    call :func:`dice_from_counts` once per epoch. Ignore voxels are not counted.
    """
    k = logits.shape[1]
    if n_classes is not None and n_classes != k:
        raise ValueError(f"logits have {k} classes, expected {n_classes}")
    if target.ndim == logits.ndim - 1:
        target = target[:, None]
    labels, mask = prepare_target(target, k, ignore_label)
    predicted, truth = logits.argmax(1), labels[:, 0]
    if mask is not None:
        predicted, truth = predicted[mask[:, 0]], truth[mask[:, 0]]
    # Confusion matrix in one pass (rows: truth, columns: prediction), no one-hot copies.
    confusion = torch.bincount((truth * k + predicted).flatten(), minlength=k * k).reshape(k, k)
    tp = confusion.diagonal()
    fp = confusion.sum(0) - tp
    fn = confusion.sum(1) - tp
    return tp[1:], fp[1:], fn[1:]


def dice_from_counts(tp, fp, fn) -> list[float]:
    """Dice per class from summed counts; NaN for a class absent from prediction and target.

    Average with ``numpy.nanmean`` for the mean foreground pseudo-Dice, as nnU-Net does.
    """
    dice = []
    for t, p, n in zip(tp, fp, fn):
        t, p, n = int(t), int(p), int(n)
        dice.append(2 * t / (2 * t + p + n) if 2 * t + p + n else math.nan)
    return dice
