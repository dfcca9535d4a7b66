import math

import pytest
import torch

from AutoSegLib.training.loss import (
    DeepSupervisionLoss,
    DiceCELoss,
    deep_supervision_shapes,
    deep_supervision_weights,
    dice_from_counts,
    downsample_target,
    masked_cross_entropy,
    prepare_target,
    pseudo_dice,
    soft_dice,
)

BIG = 20.0  # softmax(+-20) is one-hot to within 1e-17


def confident_logits(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Logits (B, K, ...) that predict ``labels`` (B, 1, ...) with near certainty."""
    onehot = torch.zeros(labels.shape[0], n_classes, *labels.shape[2:])
    onehot.scatter_(1, labels.long().clamp(0, n_classes - 1), 1.0)
    return (2 * onehot - 1) * BIG


def random_case(seed=0, shape=(2, 1, 4, 5, 6), n_classes=3):
    gen = torch.Generator().manual_seed(seed)
    target = torch.randint(0, n_classes, shape, generator=gen)
    logits = torch.randn(shape[0], n_classes, *shape[2:], generator=gen)
    return logits, target


def test_perfect_prediction_gives_zero_loss():
    _, target = random_case()
    loss_fn = DiceCELoss(batch_dice=False, ignore_label=None)
    ce, dice_loss = loss_fn.components(confident_logits(target, 3), target)
    assert ce.item() == pytest.approx(0.0, abs=1e-6)
    assert dice_loss.item() == pytest.approx(0.0, abs=1e-6)
    assert loss_fn(confident_logits(target, 3), target).item() == pytest.approx(0.0, abs=1e-6)


def test_totally_wrong_prediction_dice_term_is_one():
    target = torch.ones(1, 1, 4, 4, dtype=torch.long)
    logits = confident_logits(torch.zeros_like(target), 2)  # predicts background everywhere
    _, dice_loss = DiceCELoss(batch_dice=True).components(logits, target)
    assert dice_loss.item() == pytest.approx(1.0, abs=1e-6)


def test_loss_equals_nnunet_plus_one():
    # nnU-Net v2: CE (mean) - MemoryEfficientSoftDiceLoss dice, softmax, do_bg=False, smooth 1e-5.
    logits, target = random_case(seed=3, n_classes=3)
    probs = torch.softmax(logits, 1)
    onehot = torch.nn.functional.one_hot(target[:, 0], 3).movedim(-1, 1).float()
    inter = (probs * onehot)[:, 1:].sum((2, 3, 4))
    denom = probs[:, 1:].sum((2, 3, 4)) + onehot[:, 1:].sum((2, 3, 4))
    nnunet = torch.nn.functional.cross_entropy(logits, target[:, 0]) - ((2 * inter + 1e-5) / (denom + 1e-5)).mean()
    ours = DiceCELoss(batch_dice=False)(logits, target)
    assert ours.item() == pytest.approx(nnunet.item() + 1, abs=1e-5)


def test_ignore_voxels_do_not_change_loss_or_gradient():
    logits, target = random_case(seed=1)
    target[0, 0, :2] = 3  # ignore label = 3 (the network has 3 classes)
    target[1, 0, :, :1] = 3
    ignored = (target == 3).expand(-1, 3, -1, -1, -1)
    other = logits.clone()
    other[ignored] = torch.randn(int(ignored.sum())) * 50
    for batch_dice in (True, False):
        loss_fn = DiceCELoss(batch_dice=batch_dice, ignore_label=3)
        a, b = logits.clone().requires_grad_(), other.clone().requires_grad_()
        la, lb = loss_fn(a, target), loss_fn(b, target)
        assert la.item() == pytest.approx(lb.item(), abs=1e-6)
        la.backward()
        lb.backward()
        assert torch.all(a.grad[ignored] == 0) and torch.all(b.grad[ignored] == 0)
        assert torch.allclose(a.grad, b.grad, atol=1e-7)


def test_ignore_equals_loss_on_the_annotated_voxels_only():
    # Per-sample Dice and CE over the annotated half equal the loss computed on that half alone.
    logits, target = random_case(seed=2, shape=(1, 1, 4, 6, 6))
    target[:, :, 2:] = 3
    loss_fn = DiceCELoss(batch_dice=False, ignore_label=3)
    expected = DiceCELoss(batch_dice=False)(logits[:, :, :2], target[:, :, :2])
    assert loss_fn(logits, target).item() == pytest.approx(expected.item(), abs=1e-6)


def test_all_ignored_patch_gives_finite_loss():
    logits, _ = random_case()
    target = torch.full((2, 1, 4, 5, 6), 3)
    loss = DiceCELoss(batch_dice=True, ignore_label=3)(logits.requires_grad_(), target)
    loss.backward()
    ce, dice_loss = DiceCELoss(batch_dice=True, ignore_label=3).components(logits, target)
    assert ce.item() == 0.0
    assert dice_loss.item() == pytest.approx(0.0, abs=1e-6)  # no class anywhere: Dice 1 by smoothing
    assert torch.isfinite(logits.grad).all()


def test_batch_dice_differs_from_per_sample_dice():
    # Sample 0: 4 foreground voxels found exactly. Sample 1: no foreground, 1 false positive.
    target = torch.zeros(2, 1, 1, 4, 4, dtype=torch.long)
    target[0, 0, 0, 0] = 1
    prediction = target.clone()
    prediction[1, 0, 0, 3, 3] = 1
    logits = confident_logits(prediction, 2)
    labels, mask = prepare_target(target, 2, None)
    per_sample = soft_dice(logits, labels, mask, batch_dice=False)
    batch = soft_dice(logits, labels, mask, batch_dice=True)
    assert per_sample.item() == pytest.approx((1 + 1e-5 / (1 + 1e-5)) / 2, abs=1e-6)  # 1 and ~0
    assert batch.item() == pytest.approx((8 + 1e-5) / (9 + 1e-5), abs=1e-6)  # 2*4 / (4 + 5)


def test_outside_body_marker_counts_as_background():
    logits, target = random_case(seed=4)
    outside = target.clone()
    outside[target == 0] = -1
    for batch_dice in (True, False):
        loss_fn = DiceCELoss(batch_dice=batch_dice, ignore_label=3)
        assert loss_fn(logits, outside).item() == pytest.approx(loss_fn(logits, target).item(), abs=1e-7)


def test_gradients_are_finite_and_nonzero():
    logits, target = random_case(seed=5)
    logits.requires_grad_()
    DiceCELoss(batch_dice=True, ignore_label=None)(logits, target).backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


def test_float32_math_under_bfloat16_logits():
    logits, target = random_case(seed=6)
    half = logits.to(torch.bfloat16)
    loss = DiceCELoss(batch_dice=True)(half, target)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(DiceCELoss(batch_dice=True)(half.float(), target).item(), abs=1e-6)


def test_undeclared_label_value_is_an_error_naming_it():
    logits, target = random_case()
    target[0, 0, 0, 0, 0] = 7
    target[0, 0, 0, 0, 1] = -3
    with pytest.raises(ValueError, match=r"\[-3, 7\].*allowed: -1 \(outside body\), 0\.\.2, 3 \(ignore\)"):
        DiceCELoss(batch_dice=True, ignore_label=3)(logits, target)


def test_ignore_label_inside_class_range_is_an_error():
    logits, target = random_case()
    with pytest.raises(ValueError, match="ignore label 2 is one of the network's 3 classes"):
        DiceCELoss(batch_dice=True, ignore_label=2)(logits, target)


def test_masked_cross_entropy_matches_ignore_index():
    logits, target = random_case(seed=7)
    target[0, 0, 1] = 3
    labels, mask = prepare_target(target, 3, 3)
    expected = torch.nn.functional.cross_entropy(logits, target[:, 0], ignore_index=3)
    assert masked_cross_entropy(logits, labels, mask).item() == pytest.approx(expected.item(), abs=1e-6)


def test_weighted_cross_entropy_matches_torch_with_and_without_ignore():
    logits, target = random_case(seed=8)
    weights = torch.tensor([1.0, 2.5, 4.0])
    labels, _ = prepare_target(target, 3, None)
    expected = torch.nn.functional.cross_entropy(logits, target[:, 0], weight=weights)
    assert masked_cross_entropy(logits, labels, None, weights).item() == pytest.approx(expected.item(), abs=1e-6)
    target[0, 0, 1] = 3
    labels, mask = prepare_target(target, 3, 3)
    expected = torch.nn.functional.cross_entropy(logits, target[:, 0], weight=weights, ignore_index=3)
    assert masked_cross_entropy(logits, labels, mask, weights).item() == pytest.approx(expected.item(), abs=1e-6)


def test_class_weights_change_only_the_cross_entropy_term():
    logits, target = random_case(seed=9)
    plain, weighted = DiceCELoss(False), DiceCELoss(False, class_weights=[1.0, 1.0, 5.0])
    ce_plain, dice_plain = plain.components(logits, target)
    ce_weighted, dice_weighted = weighted.components(logits, target)
    assert dice_weighted.item() == pytest.approx(dice_plain.item(), abs=1e-7)
    assert abs(ce_weighted.item() - ce_plain.item()) > 1e-3


def test_deep_supervision_weights():
    assert deep_supervision_weights(1) == [1.0]
    assert deep_supervision_weights(3) == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert deep_supervision_weights(5) == pytest.approx([8 / 15, 4 / 15, 2 / 15, 1 / 15, 0.0])
    assert sum(deep_supervision_weights(5)) == pytest.approx(1.0)
    assert deep_supervision_weights(4, decay=0.25) == pytest.approx([16 / 21, 4 / 21, 1 / 21, 0.0])
    assert deep_supervision_weights(3, decay=0.0) == pytest.approx([1.0, 0.0, 0.0])  # full resolution alone
    with pytest.raises(ValueError):
        deep_supervision_weights(0)


def test_deep_supervision_loss_is_weighted_sum_and_skips_zero_weights():
    base = DiceCELoss(batch_dice=True)
    logits, target = random_case(seed=8, shape=(2, 1, 8, 8, 8))
    outputs = [logits, logits[:, :, ::2, ::2, ::2], torch.full((2, 3, 2, 2, 2), float("nan"))]
    targets = downsample_target(target, [o.shape[2:] for o in outputs])
    total = DeepSupervisionLoss(base, deep_supervision_weights(3))(outputs, targets)
    expected = 2 / 3 * base(outputs[0], targets[0]) + 1 / 3 * base(outputs[1], targets[1])
    assert total.item() == pytest.approx(expected.item(), abs=1e-6)  # the NaN output has weight 0
    with pytest.raises(ValueError, match="3 outputs, 2 targets, 3 weights"):
        DeepSupervisionLoss(base, deep_supervision_weights(3))(outputs, targets[:2])


def test_deep_supervision_shapes_follow_strides_with_ceil():
    strides = [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]]
    assert deep_supervision_shapes([40, 96, 96], strides) == [(40, 96, 96), (20, 48, 48), (10, 24, 24), (5, 12, 12)]
    assert deep_supervision_shapes([5, 7], [[1, 1], [2, 2], [2, 2]]) == [(5, 7), (3, 4)]
    conv = torch.nn.Conv2d(1, 1, 3, stride=2, padding=1)
    assert tuple(conv(torch.zeros(1, 1, 5, 7)).shape[2:]) == (3, 4)


def test_downsample_target_nearest_keeps_values_and_dtype():
    target = torch.arange(16, dtype=torch.int16).reshape(1, 1, 4, 4) - 1  # includes -1
    full, half, odd = downsample_target(target, [(4, 4), (2, 2), (3, 3)])
    assert full is target
    assert half.dtype == torch.int16
    assert half[0, 0].tolist() == [[4, 6], [12, 14]]  # nearest-exact: second voxel of each pair
    assert set(odd.unique().tolist()) <= set(target.unique().tolist())


def test_pseudo_dice_counts_and_ignore():
    target = torch.tensor([[[[0, 1, 1, 2, 3, 3]]]])  # (B=1, 1, 1, 6); 3 = ignore
    prediction = torch.tensor([[[[1, 1, 0, 2, 2, 1]]]])  # the last two sit on ignore voxels
    tp, fp, fn = pseudo_dice(confident_logits(prediction, 3), target, ignore_label=3, n_classes=3)
    assert tp.tolist() == [1, 1] and fp.tolist() == [1, 0] and fn.tolist() == [1, 0]
    assert dice_from_counts(tp, fp, fn) == pytest.approx([0.5, 1.0])
    with pytest.raises(ValueError, match="logits have 3 classes, expected 4"):
        pseudo_dice(confident_logits(prediction, 3), target, ignore_label=3, n_classes=4)


def test_dice_from_counts_absent_class_is_nan():
    dice = dice_from_counts([0, 3], [0, 1], [0, 1])
    assert math.isnan(dice[0]) and dice[1] == pytest.approx(0.75)


def test_pseudo_dice_matches_direct_count_on_random_data():
    logits, target = random_case(seed=9, n_classes=4)
    target[0, 0, 0] = 4  # ignore
    target[1, 0, 1] = -1  # outside body: background
    tp, fp, fn = pseudo_dice(logits, target, ignore_label=4)
    pred, keep = logits.argmax(1), target[:, 0] != 4
    truth = target[:, 0].clamp(min=0)
    for c in (1, 2, 3):
        assert tp[c - 1] == ((pred == c) & (truth == c) & keep).sum()
        assert fp[c - 1] == ((pred == c) & (truth != c) & keep).sum()
        assert fn[c - 1] == ((pred != c) & (truth == c) & keep).sum()
