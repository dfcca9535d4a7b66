"""Simulated clicks for guided training (DeepEdit's scheme; docs/clicks.md).

Each training batch arrives augmented; the guidance channels are made here, on the augmented
patch, so they always agree with it. A share of the samples (``automatic_share``) keeps
all-zero guidance: automatic prediction is trained as before. For the others, 1 to
``max_rounds`` rounds (drawn per batch): the network predicts those samples without gradients
from their current guidance, and each gets one click at the centre of the largest error of a
class drawn among the classes it gets wrong (positive on a missed part, negative on an extra
part). Drawing the class, rather than taking the largest error overall, gives small structures
their clicks too; the benchmark's fixed rule (worst class) is not used in training.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from AutoSegLib.inference.clicks import encode_guidance, error_click
from AutoSegLib.planning.guidance import GuidanceSpec


def training_click(predicted: np.ndarray, truth: np.ndarray, foreground: Sequence[int], rng: np.random.Generator,
                   ignore_label: int | None = None) -> tuple[int, bool, tuple[int, ...]] | None:
    """One simulated click for one sample: ``(class position, positive, index)``, or None when
    the prediction has no error. The class is drawn among those with an error."""
    valid = truth != ignore_label if ignore_label is not None else None
    wrong = []
    for position, value in enumerate(foreground):
        want, got = truth == value, predicted == value
        if valid is not None:
            got &= valid
        if np.any(want != got):
            wrong.append((position, want, got))
    if not wrong:
        return None
    position, want, got = wrong[int(rng.integers(len(wrong)))]
    positive, index, _ = error_click(got, want)
    return position, positive, index


def step_generators(seed: int, step: int, slots: tuple[int, int]) -> tuple[np.random.Generator, list]:
    """The batch's generator (rounds) and one per sample of ``slots`` (automatic or guided, the
    class clicked), from the seed, the global step and the sample's place in the global batch: the
    ranks of a data-parallel run draw exactly what one process draws (training/distributed.py)."""
    batch = np.random.default_rng([seed, 21, step])
    return batch, [np.random.default_rng([seed, 21, step, 1 + j]) for j in range(*slots)]


def simulate_guidance(forward: Callable[[torch.Tensor], torch.Tensor], data: torch.Tensor, target: torch.Tensor,
                      spec: GuidanceSpec, foreground: Sequence[int], batch_rng: np.random.Generator,
                      sample_rngs: Sequence[np.random.Generator],
                      ignore_label: int | None = None) -> tuple[torch.Tensor, dict]:
    """Guidance channels (B, 2 x classes, *patch) for a batch, and counts for the log.

    Args:
        forward: the network on (b, C + guidance, *patch), returning logits (b, K, *patch)
            (the full-resolution output); called without gradients.
        data: the batch's image channels (B, C, *patch).
        target: its full-resolution labels (B, 1, *patch).
        batch_rng: draws the number of rounds; ``sample_rngs``: one per sample (:func:`step_generators`).
    """
    batch = data.shape[0]
    guidance = np.zeros((batch, spec.channels(len(foreground)), *data.shape[2:]), dtype=np.float32)
    rounds = int(batch_rng.integers(1, spec.max_rounds + 1))
    guided = np.array([b for b, rng in enumerate(sample_rngs) if rng.random() >= spec.automatic_share], dtype=int)
    counts = {"guided_samples": len(guided), "clicks": 0, "rounds": 0}
    if len(guided) == 0:
        return torch.from_numpy(guidance).to(data.device), counts
    truth = target[guided, 0].cpu().numpy()
    index = torch.from_numpy(guided).to(data.device)
    for _ in range(rounds):
        with torch.no_grad():
            x = torch.cat([data[index], torch.from_numpy(guidance[guided]).to(data.device)], 1)
            predicted = forward(x).argmax(1).cpu().numpy()
        for row, b in enumerate(guided):
            click = training_click(predicted[row], truth[row], foreground, sample_rngs[b], ignore_label)
            if click is not None:
                encode_guidance([click], guidance.shape[2:], len(foreground), spec.radius, out=guidance[b])
                counts["clicks"] += 1
        counts["rounds"] += 1
    return torch.from_numpy(guidance).to(data.device), counts
