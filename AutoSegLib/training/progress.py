"""What a training run tells people: the per-epoch log (JSON lines) and the progress picture.

``training_log.jsonl`` holds one JSON object per epoch (losses, per-class pseudo-Dice,
learning rate, epoch time). It is appended and flushed after every epoch, so a killed run
keeps its history up to the last finished epoch; on resume the log is cut back to the
checkpoint's epoch so the history never holds epochs whose weights were lost.

``progress.png`` plots the same numbers in three panels (losses with pseudo-Dice, learning
rate, epoch time), redrawn after each epoch and written atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from AutoSegLib.fileutil import atomic_path
from AutoSegLib.names import PROGRESS_PLOT_FILE, TRAINING_LOG_FILE  # noqa: F401 (re-exported)

LOG_FILE = TRAINING_LOG_FILE
PLOT_FILE = PROGRESS_PLOT_FILE


def append_epoch(folder: Path, record: dict) -> None:
    """Append one epoch's record and make it durable before training goes on."""
    with open(Path(folder) / LOG_FILE, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_log(folder: Path) -> list[dict]:
    """All complete epoch records; a torn last line (killed mid-write) is dropped."""
    path = Path(folder) / LOG_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def truncate_log(folder: Path, epochs_done: int) -> list[dict]:
    """Keep the records of the first ``epochs_done`` epochs (those the checkpoint contains)."""
    records = [r for r in read_log(folder) if r.get("epoch", 0) < epochs_done]
    with atomic_path(Path(folder) / LOG_FILE) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return records


def plot_progress(folder: Path, records: list[dict]) -> None:
    """Draw progress.png from the epoch records (no-op without records)."""
    if not records:
        return
    import matplotlib

    matplotlib.use("Agg")  # no display in a background process
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in records]
    fig, (ax_loss, ax_lr, ax_time) = plt.subplots(3, 1, figsize=(10, 11), sharex=True)
    ax_loss.plot(epochs, [r["train_loss"] for r in records], color="tab:blue", label="training loss")
    if any(r.get("val_loss") is not None for r in records):
        ax_loss.plot(epochs, [r.get("val_loss") for r in records], color="tab:red", label="validation loss")
    ax_loss.set_ylabel("loss")
    ax_dice = ax_loss.twinx()
    ax_dice.plot(epochs, [r.get("mean_pseudo_dice") for r in records], color="tab:green", linestyle=":",
                 label="pseudo-Dice (mean)")
    ax_dice.plot(epochs, [r.get("ema_pseudo_dice") for r in records], color="tab:green", label="pseudo-Dice (EMA)")
    for name in records[-1].get("pseudo_dice", {}):  # thin lines per class: which one lags?
        ax_dice.plot(epochs, [r.get("pseudo_dice", {}).get(name) for r in records], linewidth=0.8, alpha=0.6,
                     label=name)
    ax_dice.set_ylabel("pseudo-Dice")
    ax_dice.set_ylim(0, 1)
    lines = ax_loss.get_legend_handles_labels()
    more = ax_dice.get_legend_handles_labels()
    ax_loss.legend(lines[0] + more[0], lines[1] + more[1], loc="center right")
    ax_lr.plot(epochs, [r["learning_rate"] for r in records], color="tab:purple")
    ax_lr.set_ylabel("learning rate")
    ax_time.plot(epochs, [r["epoch_time_s"] for r in records], color="tab:gray")
    ax_time.set_ylabel("epoch time (s)")
    ax_time.set_xlabel("epoch")
    for ax in (ax_loss, ax_lr, ax_time):
        ax.grid(alpha=0.3)
    # Fixed margins instead of tight_layout(), which draws the whole figure once more just to
    # measure it: that halves the ~0.6 s this costs after every epoch on a loaded 2-core CPU.
    fig.subplots_adjust(left=0.08, right=0.92, bottom=0.05, top=0.98, hspace=0.08)
    with atomic_path(Path(folder) / PLOT_FILE) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
