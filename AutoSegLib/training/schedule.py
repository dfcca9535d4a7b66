"""How long training runs and how the learning rate decays: presets, time budget, ETA.

The paper's blueprint trains 1000 epochs of 250 iterations with ``lr = 0.01 * (1 -
epoch / epochs) ** 0.9``. An "epoch" is just a fixed number of iterations (nnU-Net samples
patches at random, it never passes over the data), so a shorter schedule is fewer epochs,
and the poly decay stretches to the new length: the rate still ends near 0, which is what
lets a short run converge instead of stopping mid-descent.

Example:
    >>> schedule = resolve_schedule("quick", epochs=10)
    >>> poly_lr(0, schedule.epochs)
    0.01
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Sequence


OPTIMIZERS = ("sgd", "adamw")


@dataclass(frozen=True)
class Schedule:
    """Epoch count and iterations per epoch; ``val_iterations`` batches validate each epoch.

    ``optimizer`` and ``initial_lr`` belong to the schedule because the right choice depends
    on its length: the paper's SGD (Nesterov, momentum 0.99) is tuned for 250,000
    iterations; over a few hundred it has learned little beyond the largest organ (below).
    """

    epochs: int
    iterations_per_epoch: int
    val_iterations: int
    optimizer: str = "sgd"
    initial_lr: float = 0.01

    def __post_init__(self):
        for name in ("epochs", "iterations_per_epoch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"schedule {name} must be a positive integer, got {value!r}")
        if isinstance(self.val_iterations, bool) or not isinstance(self.val_iterations, int) or self.val_iterations < 0:
            raise ValueError(f"schedule val_iterations must be a non-negative integer, got {self.val_iterations!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"schedule optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if not (isinstance(self.initial_lr, (int, float)) and math.isfinite(self.initial_lr) and self.initial_lr > 0):
            raise ValueError(f"schedule initial_lr must be a positive number, got {self.initial_lr!r}")

    @property
    def total_iterations(self) -> int:
        return self.epochs * self.iterations_per_epoch

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Schedule":
        # Checkpoints written before the optimizer was part of the schedule trained with SGD.
        return cls(int(data["epochs"]), int(data["iterations_per_epoch"]), int(data["val_iterations"]),
                   str(data.get("optimizer", "sgd")), float(data.get("initial_lr", 0.01)))


# The paper's blueprint (nnU-Net v2's defaults): the one for real work.
PAPER = Schedule(epochs=1000, iterations_per_epoch=250, val_iterations=50)
# What a CPU user trains: minutes on a laptop CPU with the 3d_cpu configuration (about 20 on 2
# cores for the MR phantoms). 2,000 iterations are 1/125 of the paper's schedule, too few for
# its SGD: on the CT phantoms (3d_cpu, 2-core CPU) SGD had learned only the liver after 350
# iterations (pseudo-Dice 0.85, the four other classes 0.00), while AdamW at 3e-3 reached liver
# 0.89, spleen 0.78, kidneys 0.78, aorta 0.73, lesion 0.47 by iteration 275. The length is the
# MR phantoms' kidneys': 500 iterations left them at 0.54-0.64 held-out Dice, 2,000 bring every
# class to 0.70 on two folds (docs/decisions.md, "The quick preset's length"). Poly decay,
# weight decay, gradient clipping, loss and augmentation stay the paper's. Tune here; nothing
# else hard-codes these numbers (the demo trains a quarter of it, demo.DEMO_EPOCHS).
QUICK = Schedule(epochs=80, iterations_per_epoch=25, val_iterations=5, optimizer="adamw", initial_lr=3e-3)
PRESETS: dict[str, Schedule] = {"paper": PAPER, "quick": QUICK}
AUTO = "auto"  # names.DEFAULT_PRESET: the paper's recipe on a GPU, the quick one on a CPU


def preset_for_device(preset: str, device_type: str) -> tuple[str, str]:
    """The preset to train with, and why: ``auto`` follows the device, any other name is kept.

    The paper's schedule (250,000 SGD iterations) is what a GPU is for; on a CPU it would run
    for weeks, and cut short by ``--time-budget`` its SGD learns little (validation Dice 0.185
    after 4 minutes on the MR phantoms, against 0.384 for the quick preset, issue 13).
    """
    if preset != AUTO:
        get_preset(preset)
        return preset, f"--preset {preset}"
    if device_type in ("cuda", "mps"):
        return "paper", f"auto: a {device_type.upper()} GPU, so the paper's recipe"
    return "quick", "auto: no GPU found, so the quick recipe for CPUs; --preset paper forces the paper's"


# Starting learning rate of each optimizer when --optimizer overrides a preset's.
DEFAULT_LR = {"sgd": PAPER.initial_lr, "adamw": QUICK.initial_lr}


def get_preset(name: str) -> Schedule:
    """The preset called ``name``; an unknown name is an error listing the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown schedule preset {name!r}; choose one of: {', '.join([AUTO, *PRESETS])}") from None


def resolve_schedule(preset: str = "paper", epochs: int | None = None, iterations_per_epoch: int | None = None,
                     val_iterations: int | None = None, optimizer: str | None = None,
                     initial_lr: float | None = None) -> Schedule:
    """A preset with the command line's ``--epochs`` / ``--iterations-per-epoch`` overrides applied.

    Shortening the epoch also shortens its validation, unless given: validation keeps the
    preset's ratio (50 per 250 in the paper's schedule), so it never costs more than the
    training it checks.
    """
    base = get_preset(preset)
    if val_iterations is None and iterations_per_epoch is not None:
        ratio = base.val_iterations / base.iterations_per_epoch
        val_iterations = min(base.val_iterations, max(1, round(iterations_per_epoch * ratio)))
    if optimizer is not None and initial_lr is None and optimizer != base.optimizer:
        initial_lr = DEFAULT_LR[optimizer]
    overrides = {"epochs": epochs, "iterations_per_epoch": iterations_per_epoch, "val_iterations": val_iterations,
                 "optimizer": optimizer, "initial_lr": initial_lr}
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


def poly_lr(epoch: int, max_epochs: int, initial_lr: float = 0.01, exponent: float = 0.9) -> float:
    """Poly decay, stepped per epoch: ``initial_lr * (1 - epoch / max_epochs) ** exponent``.

    Epoch 0 trains at ``initial_lr``; the last epoch (``max_epochs - 1``) at a small positive
    rate; from ``max_epochs`` on it is 0 (never negative, never complex).
    """
    if max_epochs < 1:
        raise ValueError(f"max_epochs must be positive, got {max_epochs}")
    return initial_lr * max(0.0, 1 - epoch / max_epochs) ** exponent


def seconds_per_epoch(schedule: Schedule, seconds_per_iteration: float, val_iteration_cost: float = 0.5,
                      overhead_s: float = 0.0) -> float:
    """Estimated wall time of one epoch.

    A validation iteration runs the network forward only (about a third of a training
    iteration) plus data loading; 0.5 errs on the safe side. ``overhead_s`` covers the
    per-epoch work outside iterations (log, plot, checkpoint).
    """
    iterations = schedule.iterations_per_epoch + val_iteration_cost * schedule.val_iterations
    return seconds_per_iteration * iterations + overhead_s


MIN_BUDGET_EPOCHS = 10  # below this, epochs get shorter rather than fewer (the lr decays per epoch)


def scale_to_time_budget(schedule: Schedule, seconds_per_iteration: float, budget_s: float,
                         val_iteration_cost: float = 0.5, overhead_s: float = 0.0) -> Schedule:
    """The schedule shortened so that it finishes within ``budget_s``.

    Epochs are dropped first, keeping iterations per epoch (the unit of validation and
    logging); pass the new ``epochs`` to :func:`poly_lr` so the decay still reaches ~0 at the
    new last epoch. The learning rate changes once per epoch, so a budget that would leave
    fewer than ``MIN_BUDGET_EPOCHS`` epochs (a 10-minute budget with the paper's 250-iteration
    epochs on a CPU leaves none) keeps that many epochs and shortens each one instead,
    training and validation iterations alike (at least one of each). Only when not even that
    many one-iteration epochs fit are there fewer epochs. A schedule that already fits is
    returned unchanged: the budget is a ceiling, never a reason to train longer.
    """
    if seconds_per_iteration <= 0 or budget_s <= 0:
        raise ValueError(f"seconds_per_iteration ({seconds_per_iteration}) and budget_s ({budget_s}) must be positive")
    per_epoch = seconds_per_epoch(schedule, seconds_per_iteration, val_iteration_cost, overhead_s)
    epochs = math.floor(budget_s / per_epoch)
    wanted = min(MIN_BUDGET_EPOCHS, schedule.epochs)
    if epochs >= wanted:
        return replace(schedule, epochs=min(schedule.epochs, epochs))
    share = (budget_s / wanted - overhead_s) / (per_epoch - overhead_s)  # of each epoch's iterations
    iterations = max(1, math.floor(schedule.iterations_per_epoch * share))
    val_iterations = min(schedule.val_iterations, max(1, math.floor(schedule.val_iterations * share)))
    shorter = replace(schedule, iterations_per_epoch=iterations, val_iterations=val_iterations)
    fit = math.floor(budget_s / seconds_per_epoch(shorter, seconds_per_iteration, val_iteration_cost, overhead_s))
    return replace(shorter, epochs=max(1, min(wanted, fit)))


MAX_BUDGET_LR_LIFT = 3.0  # AdamW under a time budget starts at most 3x its rate (9e-3 for the quick preset)


def budget_lr_lift(reference_iterations: int, budget_iterations: int, max_lift: float = MAX_BUDGET_LR_LIFT) -> float:
    """How much higher AdamW starts when a time budget leaves fewer iterations than its rate was chosen for.

    The quick preset's 3e-3 was chosen for its 2,000 iterations. AdamW's step per parameter is
    about its rate, so a run cut to a third of them at the same rate travels a third as far:
    on the 31-structure detailed phantoms, 10 minutes on 2 cores (550 iterations) gave mean
    foreground Dice 0.62 at 3e-3, 0.69 at 6e-3 and 0.71 at 1e-2 (BENCHMARKS.md, "A shorter run
    starts faster"). So the rate rises with the shortening, ``reference / budget``, between 1 (a
    budget that holds the whole preset changes nothing) and ``max_lift``; the poly decay still
    ends near 0.

    Example:
        >>> budget_lr_lift(2000, 1000), budget_lr_lift(2000, 550), budget_lr_lift(2000, 4000)
        (2.0, 3.0, 1.0)
    """
    if reference_iterations <= 0 or budget_iterations <= 0:
        raise ValueError(f"iterations must be positive, got {reference_iterations} and {budget_iterations}")
    return min(max_lift, max(1.0, reference_iterations / budget_iterations))


def recent_epoch_seconds(epoch_times: Sequence[float], window: int = 5) -> float:
    """Typical epoch duration: the mean of the last ``window`` epochs.

    The first epoch is left out once there are others: it pays for worker start-up,
    allocator warm-up and any compilation, and would inflate every estimate.
    """
    if not epoch_times:
        raise ValueError("no epoch finished yet")
    times = list(epoch_times[1:]) if len(epoch_times) > 1 else list(epoch_times)
    recent = times[-window:]
    return sum(recent) / len(recent)


def estimate_eta(epoch_times: Sequence[float], total_epochs: int, window: int = 5) -> float | None:
    """Seconds until ``total_epochs`` are done from the epochs done so far; None before the first."""
    if not epoch_times:
        return None
    remaining = max(0, total_epochs - len(epoch_times))
    return remaining * recent_epoch_seconds(epoch_times, window)


def epochs_within_budget(requested_epochs: int, epochs_done: int, elapsed_s: float,
                         epoch_times: Sequence[float], budget_s: float) -> int:
    """Total epochs to plan for now, so the run ends within ``budget_s``; call after each epoch.

    The schedule from :func:`scale_to_time_budget` rests on a few timed iterations; the
    machine may turn out slower (other jobs, thermal throttling) or faster. Re-planning the
    total after every epoch, and feeding it to :func:`poly_lr`, makes ``--time-budget`` end
    on time with the learning rate still decaying to ~0. Never more than ``requested_epochs``,
    never fewer than ``epochs_done`` (``== epochs_done`` means: stop now).
    """
    fit = math.floor(max(0.0, budget_s - elapsed_s) / recent_epoch_seconds(epoch_times))
    return max(epochs_done, min(requested_epochs, epochs_done + fit))
