"""Data-parallel training of one fold with torch.distributed, launched by ``torchrun`` (docs/scaling.md).

Every rank runs the same ``autoseg train`` with its own part of each batch; DistributedDataParallel
averages the gradients, so the ranks keep identical weights. The rules, as nnU-Net v2's DDP:

- the plan's batch is the *global* batch, split over the ranks (:func:`rank_slots`): each rank
  makes its slots of every batch, and since each sample has its own generator
  (:func:`AutoSegLib.training.data.make_batch`) the ranks together make exactly the batch one
  process makes - the per-rank sampling seeds are the seeds of a rank's slots;
- each rank's loss is weighted by its share of the batch (:func:`loss_weight`), so the averaged
  gradient is the global batch's even when the batch does not divide;
- rank 0 alone writes: checkpoints, the training log, progress.png, events; it alone holds the
  fold folder's lock (AutoSegLib/locks.py), so a second group (or a single trainer) of the same
  fold is refused by rank 0 and all its ranks stop;
- once per step the ranks exchange one small tensor: the step's loss (averaged into the global
  loss) and whether any rank received SIGTERM/SIGINT; a signal to any rank therefore stops every
  rank at the same step, after rank 0 saved one checkpoint;
- NCCL on CUDA, gloo on the CPU.

The helpers above the :class:`Group` are pure (no torch, no environment access) and unit-tested.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Mapping

from AutoSegLib.errors import ReportedFailure
from AutoSegLib.events import Reporter

RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
SIGNAL_SLOTS = 65  # signal numbers 1-64
# In the messages of the RuntimeErrors gloo and NCCL raise when a peer is gone.
COMMUNICATION_ERRORS = ("gloo", "NCCL", "ProcessGroup", "Connection reset", "Connection closed")


class DistributedSetupError(ReportedFailure):
    """The group cannot run as started (environment, devices, batch size); one line naming the problem."""


class GroupBroken(ReportedFailure):
    """Another rank of the group ended or failed; this rank stops too."""


# -- pure helpers ---------------------------------------------------------------------------
@dataclass(frozen=True)
class RankEnv:
    """This process's place in a torchrun group (torchrun's environment variables)."""

    rank: int
    world_size: int
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def primary(self) -> bool:
        return self.rank == 0


def rank_env(environ: Mapping[str, str]) -> RankEnv | None:
    """torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``LOCAL_WORLD_SIZE``; None outside torchrun.

    Example:
        >>> rank_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
        RankEnv(rank=1, world_size=2, local_rank=1, local_world_size=2)
        >>> rank_env({}) is None
        True

    Raises:
        DistributedSetupError: a variable is not a whole number, or the rank is out of range.
    """
    if "WORLD_SIZE" not in environ:
        return None
    values = {}
    for name in RANK_VARIABLES:
        text = environ.get(name, "0" if name in ("RANK", "LOCAL_RANK") else environ["WORLD_SIZE"])
        try:
            values[name] = int(text)
        except ValueError:
            raise DistributedSetupError(f"{name}={text!r}: not a whole number (torchrun sets it; was it "
                                        "changed by hand?)") from None
    env = RankEnv(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"], values["LOCAL_WORLD_SIZE"])
    if env.world_size < 1 or not 0 <= env.rank < env.world_size:
        raise DistributedSetupError(f"RANK={env.rank} with WORLD_SIZE={env.world_size}: the rank must be from 0 "
                                    "to WORLD_SIZE - 1")
    if not 0 <= env.local_rank < max(env.local_world_size, 1):
        raise DistributedSetupError(f"LOCAL_RANK={env.local_rank} with LOCAL_WORLD_SIZE={env.local_world_size}: "
                                    "out of range")
    return env


def batch_split(global_batch: int, world_size: int) -> list[int]:
    """Samples per rank: nnU-Net v2's rule, the first ``global % world`` ranks take one more.

    Example:
        >>> batch_split(5, 2)
        [3, 2]

    Raises:
        DistributedSetupError: fewer samples than ranks (a rank would have nothing to train on).
    """
    if world_size < 1:
        raise DistributedSetupError(f"{world_size} ranks: need at least one")
    if global_batch < world_size:
        raise DistributedSetupError(f"the plan's batch of {global_batch} cannot be split over {world_size} ranks "
                                    f"(each needs at least one sample); start at most {global_batch} processes")
    base, extra = divmod(global_batch, world_size)
    return [base + (rank < extra) for rank in range(world_size)]


def rank_slots(global_batch: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(start, stop)``: the samples of each global batch this rank makes.

    Example:
        >>> [rank_slots(5, 2, r) for r in range(2)]
        [(0, 3), (3, 5)]
    """
    sizes = batch_split(global_batch, world_size)
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


def loss_weight(slots: tuple[int, int], global_batch: int, world_size: int) -> float:
    """Factor on a rank's loss so that the ranks' *averaged* gradient is the global batch's.

    DDP averages gradients over ranks; a rank with ``b`` of ``B`` samples must count ``b / B``,
    not ``1 / world``. Exact for losses that are means over samples (cross-entropy, per-sample
    Dice); batch Dice (2D configurations) is computed per rank, as nnU-Net v2 does.
    """
    return (slots[1] - slots[0]) * world_size / global_batch


def split_description(global_batch: int, world_size: int) -> str:
    """One line for the log: how the plan's batch is split, and what happens when it does not divide."""
    sizes = batch_split(global_batch, world_size)
    text = f"the plan's batch of {global_batch} is split over {world_size} ranks: {' + '.join(map(str, sizes))}"
    if len(set(sizes)) > 1:
        text += (f" ({global_batch} does not divide by {world_size}; each rank's loss is weighted by its share, "
                 "so the gradient is still the whole batch's, but the ranks with more samples set the pace)")
    return text


def backend_for(device_type: str) -> str:
    """NCCL between GPUs, gloo on the CPU."""
    return "nccl" if device_type == "cuda" else "gloo"


# -- the reporter of a rank -------------------------------------------------------------------
class RankReporter(Reporter):
    """Rank 0 reports as usual (events, logs); the others only their own warnings and errors.

    Every warning and error of a group says which rank it comes from: ``rank 1 of 2: ...``.
    """

    def __init__(self, env: RankEnv, events: bool = False):
        super().__init__(events=events and env.primary, quiet=not env.primary)
        self.env = env
        self.prefix = f"rank {env.rank} of {env.world_size}: "

    def warning(self, stage: str, message: str, **fields) -> None:
        if self.env.primary:
            super().warning(stage, self.prefix + message, **fields)
        else:
            self.err.write(f"WARNING: {self.prefix}{message}\n")
            self.err.flush()

    def error(self, stage: str, message: str, **fields) -> None:
        self.emit("error", stage, message=self.prefix + message, rank=self.env.rank, **fields)
        self.err.write(f"ERROR: {self.prefix}{message}\n")
        self.err.flush()


def reporter_for(environ: Mapping[str, str], events: bool) -> Reporter:
    """A :class:`RankReporter` inside a torchrun group of several ranks, else the usual reporter."""
    try:
        env = rank_env(environ)
    except DistributedSetupError:
        env = None  # the command reports it, naming the variable
    if env is None or env.world_size == 1:
        return Reporter(events=events)
    return RankReporter(env, events)


# -- the process group ---------------------------------------------------------------------
class Group:
    """This process's rank in a data-parallel group, and the few collectives training needs.

    ``Group.solo()`` is the group of one process: every collective returns its input, so the
    trainer runs the same code with and without torchrun.
    """

    def __init__(self, env: RankEnv | None = None, device=None):
        self.env = env or RankEnv(0, 1)
        self.device = device
        self.pids: list[int] = []  # of every rank, once the run is set up (for the log: whom to signal)

    @classmethod
    def solo(cls) -> "Group":
        return cls()

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def primary(self) -> bool:
        return self.env.primary

    @property
    def active(self) -> bool:
        return self.env.world_size > 1

    def _collective(self, what: str, call):
        try:
            return call()
        except RuntimeError as exc:  # gloo/NCCL: a peer closed its connection, or a timeout
            raise self._broken(what, exc) from None

    def _broken(self, what: str, exc: Exception) -> GroupBroken:
        first = (str(exc).splitlines() or [""])[0][:200]
        return GroupBroken(f"the group broke off during {what} (another rank ended or failed: {first}); that "
                           "rank's error says why")

    @contextmanager
    def guard(self, what: str):
        """Around work with collectives inside (DDP's gradient all-reduce in backward): a lost peer
        becomes :class:`GroupBroken`; any other error passes unchanged."""
        try:
            yield
        except RuntimeError as exc:
            if self.active and any(mark in str(exc) for mark in COMMUNICATION_ERRORS):
                raise self._broken(what, exc) from None
            raise

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over the ranks (float64)."""
        if not self.active:
            return list(values)
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        self._collective("a reduction", lambda: dist.all_reduce(tensor, op=dist.ReduceOp.SUM))
        return tensor.cpu().tolist()

    def step_sync(self, weighted_loss: float, signals: list[int]) -> tuple[float, int]:
        """After a step: the global batch's loss and the signal any rank received (0 if none).

        One all-reduce per step: the summed ``loss * weight`` (divided by the world size) and
        the largest signal number.
        """
        signum = signals[0] if signals else 0
        if not self.active:
            return weighted_loss, signum
        import torch
        import torch.distributed as dist

        # One SUM carries both: the loss in element 0, and a one-hot of the signal number, so a
        # signal received by any rank (or several) shows up on every rank.
        vector = torch.zeros(1 + SIGNAL_SLOTS, dtype=torch.float64, device=self._comm_device())
        vector[0] = weighted_loss
        if 0 < signum < SIGNAL_SLOTS:
            vector[1 + signum] = 1.0
        self._collective("a training step", lambda: dist.all_reduce(vector, op=dist.ReduceOp.SUM))
        received = [i for i in range(1, SIGNAL_SLOTS) if vector[1 + i] > 0]
        return float(vector[0]) / self.world_size, max(received, default=0)

    def any_signal(self, signals: list[int]) -> int:
        """The signal any rank received (0 if none); every rank must call it at the same point."""
        return self.step_sync(0.0, signals)[1]

    def broadcast_object(self, value):
        """Rank 0's ``value`` on every rank (e.g. a schedule a time budget changed)."""
        if not self.active:
            return value
        import torch.distributed as dist

        box = [value]
        self._collective("a broadcast", lambda: dist.broadcast_object_list(box, src=0))
        return box[0]

    def all_gather_object(self, value) -> list:
        """Every rank's ``value``, in rank order."""
        if not self.active:
            return [value]
        import torch.distributed as dist

        values = [None] * self.world_size
        self._collective("a gather", lambda: dist.all_gather_object(values, value))
        return values

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            self._collective("a barrier", dist.barrier)

    def wrap(self, network):
        """``DistributedDataParallel`` around the network in a group; the network itself alone."""
        if not self.active:
            return network
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device is not None and self.device.type == "cuda" else None
        return DistributedDataParallel(network, device_ids=ids)

    def _comm_device(self):
        # NCCL reduces CUDA tensors only; gloo CPU tensors.
        return self.device if self.device is not None and self.device.type == "cuda" else "cpu"

    def close(self) -> None:
        if self.active:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def rank_device(requested: str, env: RankEnv):
    """The device of one rank: ``cuda:LOCAL_RANK`` on GPUs, else the CPU.

    Raises:
        DistributedSetupError: more ranks on this node than GPUs, or Apple's MPS (no DDP there).
    """
    import torch

    from AutoSegLib.models.device import resolve_device

    device = resolve_device(requested)
    if device.type == "mps":
        raise DistributedSetupError("data-parallel training does not run on Apple's MPS; use --device cpu")
    if device.type != "cuda":
        return device
    count = torch.cuda.device_count()
    if env.local_rank >= count:
        raise DistributedSetupError(f"rank {env.rank}: local rank {env.local_rank} but this node has {count} CUDA "
                                    f"device(s) visible; start at most {count} processes per node")
    torch.cuda.set_device(env.local_rank)
    return torch.device("cuda", env.local_rank)


def start_group(env: RankEnv, requested_device: str, timeout_s: float = 1800.0) -> Group:
    """Join torchrun's process group (NCCL on CUDA, gloo otherwise) and return this rank's :class:`Group`."""
    from datetime import timedelta

    import torch.distributed as dist

    device = rank_device(requested_device, env)
    if not dist.is_initialized():
        dist.init_process_group(backend_for(device.type), timeout=timedelta(seconds=timeout_s))
    return Group(env, device)


def share_setup_outcome(group: Group, error: BaseException | None) -> None:
    """Rank 0 tells the others whether it could set the run up; they raise its message.

    Rank 0 prepares the run alone (fold lock, splits, model folder); the others must not read the
    folder before that, nor train when it was refused.
    """
    message = None if error is None else f"{type(error).__name__}: {error}"
    message = group.broadcast_object(message)
    if message is not None and not group.primary:
        raise DistributedSetupError(f"rank 0 could not start the run, so this rank stops too "
                                    f"({message.split(': ', 1)[-1]})")


def torchrun_command(nproc: int, autoseg_args: list[str], python: str = sys.executable) -> list[str]:
    """``python -m torch.distributed.run --standalone --nproc-per-node N -m AutoSegLib ARGS``.

    ``--standalone`` picks a free port on this machine; several nodes need the rendezvous flags
    instead (docs/scaling.md). ``python -m`` rather than the ``torchrun`` script: the script may
    belong to another environment than the running one.
    """
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "AutoSegLib", *autoseg_args]


def start_rank_run(dataset_folder, work_dir, options, env: RankEnv):
    """Join the group and set the fold's run up: rank 0 first (lock, splits, model folder), then the others.

    Returns ``(run, group)``; close the group when done. A refusal on rank 0 (the fold is being
    trained, nothing to resume ...) stops every rank: rank 0 raises its own error, the others
    :class:`DistributedSetupError` quoting it.
    """
    import os

    from AutoSegLib.training.setup import setup_run

    group = start_group(env, options.device)
    try:
        if group.primary:
            try:
                run = setup_run(dataset_folder, work_dir, options)
            except BaseException as exc:
                share_setup_outcome(group, exc)
                raise
            share_setup_outcome(group, None)
        else:
            share_setup_outcome(group, None)
            run = setup_run(dataset_folder, work_dir, options, primary=False)
        run.device = group.device
        group.pids = group.all_gather_object(os.getpid())
    except BaseException:
        group.close()
        raise
    return run, group
