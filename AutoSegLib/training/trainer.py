"""The training loop of one fold: the paper's recipe, never losing work, always saying where it is.

Recipe: SGD (Nesterov, momentum 0.99, weight decay 3e-5), learning rate 0.01 with poly
decay (the quick preset swaps in AdamW at 3e-3, up to 3x that when a time budget cuts it
short, see :mod:`.schedule`), Dice + cross-entropy
over the deep-supervision outputs (cross-entropy weights from the plan, lifted after every epoch
for the classes that lag when the plan asks, see :mod:`.class_lift`), gradient norm clipped at
12, mixed precision on CUDA. Each epoch ends with a validation pass on patches of the fold's
validation cases, whose per-class pseudo-Dice (and its moving average) picks the best
checkpoint and shows progress.

Checkpoints (see :mod:`.checkpoint`): ``latest`` every few epochs and at least every
``checkpoint_every_s`` seconds, ``best`` on a new best moving-average pseudo-Dice, ``final``
at the end. SIGTERM/SIGINT finish the current iteration, save ``latest`` and raise
:class:`TrainingInterrupted`, which the CLI turns into exit status 128 + signal number.

Data-parallel (torchrun, :mod:`.distributed`): the same loop on every rank with a
:class:`~AutoSegLib.training.distributed.Group`; each rank makes its slots of every batch,
gradients and metrics are reduced over the ranks, a signal to any rank stops all of them at the
same step, and rank 0 alone writes files. Without torchrun the group is of one process and every
collective returns its input.
"""

from __future__ import annotations

import math
import signal
import statistics
import time
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

import torch

from AutoSegLib.events import Reporter
from AutoSegLib.network import build_network
from AutoSegLib.planning.rules import output_classes
from AutoSegLib.models import checkpoint as ckpt
from AutoSegLib.training.loader import BatchLoader
from AutoSegLib.training.augmentation import validation_pipeline
from AutoSegLib.training.class_lift import lagging_lifts, lifted_weights, smooth_class_dice
from AutoSegLib.training.guidance import simulate_guidance, step_generators
from AutoSegLib.training.distributed import Group, loss_weight, rank_slots
from AutoSegLib.training.loss import (DeepSupervisionLoss, DiceCELoss, deep_supervision_weights, dice_from_counts,
                                      pseudo_dice)
from AutoSegLib.training.progress import append_epoch, plot_progress, truncate_log
from AutoSegLib.training.schedule import (DEFAULT_LR, MAX_BUDGET_LR_LIFT, QUICK, budget_lr_lift, epochs_within_budget,
                                         estimate_eta, poly_lr, scale_to_time_budget, seconds_per_epoch)
from AutoSegLib.training.setup import RunSetup, TrainingSetupError, configure_cpu_threads

INITIAL_LR = 0.01  # the paper preset's SGD rate (schedule.PAPER.initial_lr)
MOMENTUM = 0.99
WEIGHT_DECAY = 3e-5
GRAD_CLIP = 12.0
BUDGET_PROBE_ITERATIONS = 3  # with --time-budget, the first epoch is checked after this many iterations
EMA_WEIGHT = 0.9  # pseudo-Dice moving average: new = 0.9 * old + 0.1 * epoch value (nnU-Net)


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving a checkpoint."""

    def __init__(self, signum: int, checkpoint_path):
        self.signum, self.checkpoint_path = signum, checkpoint_path
        self.exit_status = 128 + signum  # the shell's convention: 143 for SIGTERM, 130 for SIGINT
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name}; progress saved to {checkpoint_path}; continue with --resume")


@contextmanager
def stop_on_signals():
    """Turn SIGTERM/SIGINT into a flag checked between iterations (restored afterwards)."""
    received: list[int] = []

    def handler(signum, frame):
        received.append(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def make_optimizer(network: torch.nn.Module, schedule) -> torch.optim.Optimizer:
    """The schedule's optimizer: the paper's SGD (Nesterov, momentum 0.99), or AdamW for short runs."""
    if schedule.optimizer == "adamw":
        return torch.optim.AdamW(network.parameters(), lr=schedule.initial_lr, weight_decay=WEIGHT_DECAY)
    return torch.optim.SGD(network.parameters(), lr=schedule.initial_lr, momentum=MOMENTUM, nesterov=True,
                           weight_decay=WEIGHT_DECAY)


class Trainer:
    def __init__(self, run: RunSetup, reporter: Reporter | None = None, group: Group | None = None):
        self.run, self.reporter = run, reporter or Reporter(quiet=True)
        self.group = group or Group.solo()
        self.device = self.group.device or run.device
        if self.device.type == "cpu":
            configure_cpu_threads()
        # Seeded: the same initial weights for the same --seed (with one process or several).
        torch.manual_seed(run.options.seed)
        self.network = build_network(run.config, run.n_input_channels, run.n_classes).to(self.device)
        self.model = self.group.wrap(self.network)  # DistributedDataParallel in a group of several
        global_batch = int(run.config["batch_size"])
        self.slots = rank_slots(global_batch, self.group.world_size, self.group.rank)
        self.loss_weight = loss_weight(self.slots, global_batch, self.group.world_size)
        self.optimizer = make_optimizer(self.network, run.schedule)
        self.amp = self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if self.amp else None
        n_outputs = len(run.config["strides"]) - 1
        # Designs whose outputs are not one per decoder stage (U-Net++'s nested heads, Swin-UNETR's
        # single head) say how to weigh them; the loss pairs each output with the target of its shape.
        weights = getattr(self.network, "supervision_weights", None) or deep_supervision_weights(n_outputs)
        self.loss = DeepSupervisionLoss(DiceCELoss(run.config.get("batch_dice", False), run.ignore_label,
                                                   class_weights=run.config.get("ce_class_weights")), weights)
        self.schedule = run.schedule
        # Simulated clicks of guided training (training/guidance.py): drawn per global step and sample.
        self.step = 0
        self.guidance_counts = {"guided_samples": 0, "clicks": 0}
        self.epoch, self.ema, self.best_ema, self.records = 0, None, -1.0, []
        self.class_dice: dict[str, float] = {}  # per-class pseudo-Dice smoothed over epochs (class_lift)
        self.signals: list[int] = []
        self.last_save = time.monotonic()
        self.epoch_walls: list[float] = []  # wall-clock seconds per epoch in this process (time budget)
        self.step_seconds: list[float] = []  # every training step of this process (architecture study)
        self._last_epoch_end: float | None = None
        self.started = time.monotonic()  # of the training loop; train() sets it again

    # -- state ---------------------------------------------------------------------------
    def state(self) -> dict:
        return {"network_weights": self.network.state_dict(), "optimizer_state": self.optimizer.state_dict(),
                "grad_scaler_state": self.scaler.state_dict() if self.scaler else {},
                "epoch": self.epoch, "ema_pseudo_dice": self.ema, "best_ema_pseudo_dice": self.best_ema,
                "smoothed_class_dice": self.class_dice, "schedule": self.schedule.to_dict(),
                "configuration": self.run.options.configuration, "fold": self.run.options.fold}

    def restore(self) -> Path:
        """Load the newest valid checkpoint of the run folder; returns its path.

        Every problem is a :class:`TrainingSetupError` naming the file (exit status 1 without a
        traceback on the command line): no valid checkpoint, or one made for another network.
        """
        try:
            path, state, skipped = ckpt.find_resume_checkpoint(self.run.run_folder)
        except ckpt.CheckpointError as exc:
            raise TrainingSetupError(str(exc)) from None
        for bad, reason in skipped:
            self.reporter.warning("train", f"skipping damaged checkpoint {bad}: {reason}")
        if state.get("schedule"):
            # the run continues with its own optimizer, whatever the preset on the command line
            self.schedule = type(self.schedule).from_dict(state["schedule"])
            if self.schedule.optimizer != self.run.schedule.optimizer:
                self.optimizer = make_optimizer(self.network, self.schedule)
        try:
            self.network.load_state_dict(state["network_weights"])
            self.optimizer.load_state_dict(state["optimizer_state"])
        except (RuntimeError, ValueError, KeyError) as exc:
            first = (str(exc).splitlines() or [""])[0][:300]
            raise TrainingSetupError(f"{path}: does not fit the network of the current plans ({first}); was the "
                                     "dataset planned again since this run started? Resume with the plans it "
                                     "was trained with, or start over with --overwrite") from None
        if self.scaler and state.get("grad_scaler_state"):
            self.scaler.load_state_dict(state["grad_scaler_state"])
        self.epoch = state["epoch"]
        self.ema = state.get("ema_pseudo_dice")
        self.best_ema = state.get("best_ema_pseudo_dice", -1.0)
        self.class_dice = dict(state.get("smoothed_class_dice") or {})  # older checkpoints: lifts start afresh
        self.lift_lagging_classes()
        asked = self.run.options
        if (asked.epochs not in (None, self.schedule.epochs)
                or asked.iterations_per_epoch not in (None, self.schedule.iterations_per_epoch)):
            self.reporter.warning("train", f"--resume continues the run's own schedule ({self.schedule.epochs} "
                                           f"epochs x {self.schedule.iterations_per_epoch} iterations); "
                                           "--epochs and --iterations-per-epoch apply to new runs only")
        if self.group.primary:
            self.records = truncate_log(self.run.run_folder, self.epoch)
        self.reporter.log("train", f"Resuming from {path} at epoch {self.epoch} of {self.schedule.epochs}")
        return path

    def initialize_from(self, path: Path) -> None:
        """Start a new run from another run's network weights (fine-tuning on a grown dataset).

        Only the weights are taken: optimizer, epoch counter, logs and schedule start fresh, so
        the new run's learning rate follows its own schedule. The file is loaded like any
        checkpoint (``weights_only``), and must fit the network of the current plans.
        """
        state = ckpt.load_checkpoint(path, required=("network_weights",))
        try:
            self.network.load_state_dict(state["network_weights"])
        except (RuntimeError, ValueError, KeyError) as exc:
            first = (str(exc).splitlines() or [""])[0][:300]
            raise TrainingSetupError(f"{path}: its weights do not fit the network of the current plans ({first}); "
                                     "fine-tuning needs a model trained with the same plans and labels") from None
        self.reporter.log("train", f"Starting from the weights of {path} (epoch {state.get('epoch', '?')} of its run)")

    def save(self, name: str) -> object:
        """Write ``checkpoint_{name}.pt`` (rank 0 only; the other ranks hold the same weights)."""
        path = self.run.run_folder / f"checkpoint_{name}.pt"
        if not self.group.primary:
            return path
        ckpt.save_checkpoint(path, self.state())
        if name == "latest":
            self.last_save = time.monotonic()
        return path

    # -- loop ----------------------------------------------------------------------------
    def fit(self) -> dict:
        opts = self.run.options
        if opts.resume:
            self.restore()
        elif opts.init_from is not None:
            self.initialize_from(Path(opts.init_from))
        seed = opts.seed + 1000 * self.epoch
        first = self.epoch * self.schedule.iterations_per_epoch
        self.step = first  # a resumed run continues the stream of simulated clicks too
        with BatchLoader(self.run.train_cases, self.run.config, self.run.data_folder, num_workers=opts.num_workers,
                         seed=seed, ignore_label=self.run.ignore_label, first_batch=first,
                         slots=self.slots) as train_loader, \
             BatchLoader(self.run.val_cases, self.run.config, self.run.data_folder, num_workers=opts.num_workers,
                         seed=seed + 1, transforms=validation_pipeline(self.run.config),
                         ignore_label=self.run.ignore_label, slots=self.slots) as val_loader, \
             stop_on_signals() as signals:
            self.reporter.start("train", of=self.schedule.epochs, epoch=self.epoch)
            started = self.started = time.monotonic()
            self.signals = signals
            while self.epoch < self.schedule.epochs:
                record = self.run_epoch(train_loader, val_loader)
                self.finish_epoch(record, started)
        path = self.save("final")
        self.group.barrier()  # every rank ends with the final checkpoint written
        return {"epochs": self.epoch, "ema_pseudo_dice": self.ema, "best_ema_pseudo_dice": self.best_ema,
                "checkpoint": str(path), "run_folder": str(self.run.run_folder)}

    def lr(self) -> float:
        rate = poly_lr(self.epoch, self.schedule.epochs, self.schedule.initial_lr)
        if self.run.options.time_budget_min is not None and self.records:
            # A budget's total may rise again (maybe_rescale_for_budget); the rate never does: it
            # waits at the last epoch's until the longer decay comes down to it.
            rate = min(rate, float(self.records[-1]["learning_rate"]))
        return rate

    def apply_lr(self) -> float:
        """Set the optimizer to this epoch's rate of the schedule; returns it."""
        lr = self.lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def check_stop(self, signum: int | None = None) -> None:
        """Between steps: on SIGTERM/SIGINT save ``latest`` and stop (weights of this moment).

        ``signum``: the signal any rank received, when the step already exchanged it
        (``Group.step_sync``); else asked of the group here. In a group every rank calls this at
        the same point, so all stop together, after rank 0 saved the one checkpoint.
        """
        if signum is None:
            signum = self.group.any_signal(self.signals)
        if signum:
            path = self.save("latest")
            self.group.barrier()  # no rank ends (and so makes torchrun stop the others) before the save
            raise TrainingInterrupted(signum, path)

    def run_epoch(self, train_loader, val_loader) -> dict:
        started = time.monotonic()
        lr = self.apply_lr()
        self.network.train()
        losses, step_times = [], []
        while len(losses) < self.schedule.iterations_per_epoch:  # the budget may shorten this epoch
            step_started = time.monotonic()
            with self.group.guard("a training step"):
                loss = self.train_step(next(train_loader))
            loss, signum = self.group.step_sync(loss * self.loss_weight, self.signals)  # the global batch's
            losses.append(loss)
            step_times.append(time.monotonic() - step_started)
            self.step_seconds.append(step_times[-1])
            self.check_stop(signum)
            if len(losses) == BUDGET_PROBE_ITERATIONS and not self.epoch_walls:
                self.fit_first_epoch_to_budget(step_times)
                self.share_schedule()
                lr = self.apply_lr()  # the budget may have raised the starting rate (lift_rate_for_budget)
            self.reporter.emit("progress", "train", epoch=self.epoch, iteration=len(losses),
                               of=self.schedule.iterations_per_epoch, loss=losses[-1])
        val_loss, dice = self.validate(val_loader)
        return {"epoch": self.epoch, "train_loss": sum(losses) / len(losses), "val_loss": val_loss,
                "pseudo_dice": dice, "learning_rate": lr, "epoch_time_s": round(time.monotonic() - started, 3)}

    def _autocast(self):
        return torch.autocast("cuda", dtype=torch.float16) if self.amp else nullcontext()

    def with_guidance(self, data: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """The batch with its click channels: simulated from the errors (training, ``target`` given)
        or all zero (validation); unchanged for a configuration without guidance."""
        spec = self.run.guidance
        if spec is None:
            return data
        if target is None:
            zeros = data.new_zeros((data.shape[0], spec.channels(len(self.run.foreground)), *data.shape[2:]))
            return torch.cat([data, zeros], 1)

        def forward(x):
            with self._autocast():
                out = self.network(x)
            return (out[0] if isinstance(out, (list, tuple)) else out).float()

        batch_rng, sample_rngs = step_generators(self.run.options.seed, self.step, self.slots)
        guidance, counts = simulate_guidance(forward, data, target, spec, self.run.foreground, batch_rng,
                                             sample_rngs, self.run.ignore_label)
        for key in self.guidance_counts:
            self.guidance_counts[key] += counts[key]
        return torch.cat([data, guidance], 1)

    def train_step(self, batch: dict) -> float:
        data = batch["data"].to(self.device, non_blocking=True)
        targets = [t.to(self.device, non_blocking=True).long() for t in batch["target"]]
        data = self.with_guidance(data, targets[0])
        self.step += 1
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            outputs = self.model(data)
            loss = self.loss(outputs, targets)
            if self.group.active:
                # DDP waits for a gradient of every parameter; the lowest output's head has loss weight 0
                # (nnU-Net v2 gives it 1e-6 under DDP instead). A zero term gives zero gradients and
                # leaves the loss exactly as with one process.
                loss = loss + sum(o.sum() for w, o in zip(self.loss.weights, outputs) if w == 0) * 0.0
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss became {loss.item()} at epoch {self.epoch} (cases {batch['keys']}); "
                                     "check the images for extreme values")
        weighted = loss * self.loss_weight if self.loss_weight != 1.0 else loss  # see distributed.loss_weight
        if self.scaler:
            self.scaler.scale(weighted).backward()
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), GRAD_CLIP)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            weighted.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), GRAD_CLIP)
            self.optimizer.step()
        return float(loss.detach())

    @torch.no_grad()
    def validate(self, loader) -> tuple[float, dict]:
        self.network.eval()
        losses, totals = [], None
        for _ in range(self.schedule.val_iterations):
            self.check_stop()
            batch = next(loader)
            data = self.with_guidance(batch["data"].to(self.device))  # validation: automatic (zero guidance)
            targets = [t.to(self.device).long() for t in batch["target"]]
            with self._autocast():
                outputs = self.network(data)
                losses.append(float(self.loss(outputs, targets)))
            counts = pseudo_dice(outputs[0].float(), targets[0], self.run.ignore_label, self.run.n_classes)
            totals = counts if totals is None else [a + b for a, b in zip(totals, counts)]
        names = output_classes(self.run.spec.labels)[1:]  # the foreground, as the outputs after background
        val_loss, totals = self.reduce_validation(losses, totals)
        dice = {n: (None if math.isnan(d) else float(d)) for n, d in zip(names, dice_from_counts(*totals))}
        return val_loss, dice

    def reduce_validation(self, losses: list[float], totals) -> tuple[float, list]:
        """The global validation loss and pseudo-Dice counts: weighted losses and counts summed over ranks."""
        k = len(totals[0])
        local = [sum(losses) / len(losses) * self.loss_weight] + [float(v) for t in totals for v in t.tolist()]
        summed = self.group.all_reduce_sum(local)
        counts = [[int(round(v)) for v in summed[1 + i * k: 1 + (i + 1) * k]] for i in range(3)]
        return summed[0] / self.group.world_size, counts

    def finish_epoch(self, record: dict, started: float) -> None:
        values = [v for v in record["pseudo_dice"].values() if v is not None]
        mean = sum(values) / len(values) if values else 0.0
        self.ema = mean if self.ema is None else EMA_WEIGHT * self.ema + (1 - EMA_WEIGHT) * mean
        record.update(mean_pseudo_dice=mean, ema_pseudo_dice=self.ema)
        lifts = self.lift_lagging_classes(record["pseudo_dice"])
        if lifts:
            record["class_lift"] = lifts
        self.epoch += 1
        self.records.append(record)
        if self.group.primary:
            append_epoch(self.run.run_folder, record)
            plot_progress(self.run.run_folder, self.records)
        self.maybe_rescale_for_budget(started)
        self.share_schedule()
        eta = estimate_eta([r["epoch_time_s"] for r in self.records], self.schedule.epochs - self.epoch)
        self.reporter.emit("epoch", "train", **record, done=self.epoch, of=self.schedule.epochs, eta_s=eta)
        self.reporter.log("train", f"epoch {self.epoch}/{self.schedule.epochs}: loss {record['train_loss']:.3f}, "
                                   f"pseudo-Dice {mean:.3f} (EMA {self.ema:.3f}), {record['epoch_time_s']:.0f} s")
        if self.ema > self.best_ema:
            self.best_ema = self.ema
            self.save("best")
        due = self.epoch % self.run.options.checkpoint_every_epochs == 0
        if due or time.monotonic() - self.last_save >= self.run.options.checkpoint_every_s:
            self.save("latest")

    def lift_lagging_classes(self, dice: dict | None = None) -> dict[str, float]:
        """With the plan's ``lagging_class_lift``: fold this epoch's per-class pseudo-Dice (if given) into
        the smoothed values and set the cross-entropy weights from them (:mod:`.class_lift`).

        Returns the lifted classes and their lifts (above 1 only), for the epoch's record. Every rank
        holds the same reduced pseudo-Dice, so every rank sets the same weights.
        """
        max_lift = self.run.config.get("lagging_class_lift")
        if not max_lift:
            return {}
        names = output_classes(self.run.spec.labels)[1:]
        if dice is not None:
            self.class_dice = smooth_class_dice(self.class_dice, dice)
        lifts = lagging_lifts({name: self.class_dice.get(name, 0.0) for name in names}, float(max_lift))
        weights = lifted_weights(self.run.config.get("ce_class_weights"), names, lifts)
        self.loss.loss.class_weights = torch.tensor(weights)
        return {name: round(lift, 3) for name, lift in lifts.items() if round(lift, 3) > 1.0}

    def share_schedule(self) -> None:
        """With --time-budget in a group: every rank takes rank 0's schedule (each times its own steps)."""
        if self.group.active and self.run.options.time_budget_min is not None:
            self.schedule = self.group.broadcast_object(self.schedule)

    def fit_first_epoch_to_budget(self, step_times: list[float]) -> None:
        """With --time-budget: after the first few iterations, shorten a schedule that cannot fit.

        The budget is otherwise re-planned after each epoch, but the first epoch must end for
        that: the paper's 250 iterations at 26 s each on a CPU core are 1.8 hours, whatever the
        budget. The first iteration (allocator and worker warm-up) is not counted.
        """
        budget = self.run.options.time_budget_min
        if budget is None:
            return
        seconds_per_iteration = statistics.median(step_times[1:])
        left_s = budget * 60.0 - (time.monotonic() - self.started)
        before = self.schedule
        remaining = replace(before, epochs=before.epochs - self.epoch)
        fitted = scale_to_time_budget(remaining, seconds_per_iteration, left_s + sum(step_times))
        self.lift_rate_for_budget(fitted.epochs * fitted.iterations_per_epoch,
                                  remaining.epochs * remaining.iterations_per_epoch)
        if seconds_per_epoch(before, seconds_per_iteration) * min(2, before.epochs) <= left_s:
            return  # two epochs fit: re-planning after the first epoch, from a whole epoch, is better
        self.schedule = replace(fitted, epochs=self.epoch + fitted.epochs, initial_lr=self.schedule.initial_lr)
        if self.schedule.epochs != before.epochs or self.schedule.iterations_per_epoch != before.iterations_per_epoch:
            self.reporter.log("train", f"time budget {budget:g} min: {seconds_per_iteration:.1f} s per iteration, "
                                       f"so {self.schedule.epochs - self.epoch} epochs of "
                                       f"{self.schedule.iterations_per_epoch} iterations "
                                       f"({self.schedule.val_iterations} validation) instead of "
                                       f"{before.epochs - self.epoch} of {before.iterations_per_epoch}")

    def lift_rate_for_budget(self, budget_iterations: int, requested_iterations: int) -> None:
        """With --time-budget and AdamW at its default rate: start higher when the budget leaves fewer
        iterations than the quick preset's, or than the run asked for with --epochs if that is fewer
        (:func:`~AutoSegLib.training.schedule.budget_lr_lift`): only a budget that cuts the run lifts.

        Set once, from the first iterations' speed, and kept in the schedule (so in every
        checkpoint): a resumed run, or a rate the user gave with --lr, is left as it is.
        """
        opts = self.run.options
        if (opts.resume or opts.initial_lr is not None or self.schedule.optimizer != "adamw"
                or self.schedule.initial_lr != DEFAULT_LR["adamw"]):
            return
        reference = min(QUICK.epochs * QUICK.iterations_per_epoch, requested_iterations)
        lift = budget_lr_lift(max(1, reference), max(1, budget_iterations))
        if lift <= 1.0:
            return
        self.schedule = replace(self.schedule, initial_lr=self.schedule.initial_lr * lift)
        self.reporter.log("train", f"time budget {opts.time_budget_min:g} min: about {budget_iterations} iterations "
                                   f"instead of {reference:,}, so AdamW starts at {self.schedule.initial_lr:.1e} "
                                   f"instead of {DEFAULT_LR['adamw']:.0e} (x{lift:.1f}, at most "
                                   f"x{MAX_BUDGET_LR_LIFT:g})")

    def maybe_rescale_for_budget(self, started: float) -> None:
        """With --time-budget: fit the epoch count to the budget after every epoch, up or down.

        The learning rate follows the new total, so it still decays to ~0 by the end. Epochs
        are timed by the wall clock from one call to the next, so the work around the
        iterations (progress.png, the log, checkpoints) counts too: timing only the iterations
        underestimated an epoch (3x for a small network), the total was cut again and again,
        and training stopped with the learning rate at half its initial value.
        """
        budget = self.run.options.time_budget_min
        if budget is None:
            return
        now, budget_s = time.monotonic(), budget * 60.0
        self.epoch_walls.append(now - (self._last_epoch_end or started))
        self._last_epoch_end = now
        if len(self.epoch_walls) == 1 and budget_s - (now - started) > 2 * self.epoch_walls[0]:
            return  # time enough: plan by a warm epoch; the first pays for start-up and would cap the total low
        if self.epoch == 1:
            # scale_to_time_budget prices an epoch as iterations + half-cost validation iterations
            units = self.schedule.iterations_per_epoch + 0.5 * self.schedule.val_iterations
            fitted = scale_to_time_budget(self.schedule, self.epoch_walls[-1] / units, budget_s)
            shape_changed = fitted.iterations_per_epoch != self.schedule.iterations_per_epoch
            self.schedule = fitted
            if shape_changed:  # the epoch just timed is not the epoch to come: re-plan after the next
                self.reporter.log("train", f"time budget {budget:g} min: training for {fitted.epochs} epochs "
                                           f"of {fitted.iterations_per_epoch} iterations")
                return
        # Up to the epochs the run was asked for, not the total planned so far: a machine slow in the
        # first epochs (start-up, a busy minute) would otherwise cap the run for good; planned by
        # 34 s epochs that became 19-31 s, 10 minutes ended after 7.4 (BENCHMARKS.md, issue 14).
        epochs = epochs_within_budget(self.run.schedule.epochs, self.epoch, now - started, self.epoch_walls, budget_s)
        if epochs != self.schedule.epochs:
            self.schedule = replace(self.schedule, epochs=epochs)
            self.reporter.log("train", f"time budget {budget:g} min: training for {epochs} epochs in total")
