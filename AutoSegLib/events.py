"""The progress protocol: how long-running work tells people and programs where it is.

Two audiences, one call site. Engine code reports through a :class:`Reporter`:

* human mode (the default): progress bars and messages on stderr;
* events mode (``--events``): one JSON object per line on stdout, for the Slicer module and
  batch scripts, plus the same human messages on stderr.

Event objects (see docs/events.md)::

    {"event": "start",    "stage": "verify", "of": 12}
    {"event": "progress", "stage": "verify", "done": 3, "of": 12, "eta_s": 4.1, "elapsed_s": 1.4}
    {"event": "log"|"warning", "stage": ..., "message": "..."}
    {"event": "error",    "stage": ..., "message": "..."}
    {"event": "done",     "stage": ..., "elapsed_s": 5.2, ...result fields}

Every event also carries ``"t"`` (Unix time). A command ends with exactly one ``done`` event
for its top-level stage on success, or an ``error`` event and a non-zero exit status.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from typing import Any, Iterator, TextIO

PROTOCOL_VERSION = 1
_MIN_EVENT_INTERVAL_S = 0.5  # progress events are throttled; start/final ones never are


def eta_seconds(done: float, of: int, elapsed_s: float) -> float | None:
    """Linear estimate of the time left; None until there is something to extrapolate from."""
    if done <= 0 or of <= 0 or elapsed_s <= 0:
        return None
    return max(0.0, elapsed_s / done * (of - done))


def _clean(value: Any) -> Any:
    # JSON has no NaN/Inf; a consumer's parser would reject the whole line.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class Reporter:
    """Reports progress as JSON events (``events=True``) or as human output.

    Example:
        >>> r = Reporter(events=False)
        >>> with r.task("verify", total=3) as step:
        ...     for case in ["a", "b", "c"]:
        ...         step()
    """

    def __init__(self, events: bool = False, out: TextIO | None = None, err: TextIO | None = None,
                 quiet: bool = False):
        self.events = events
        self.out = out if out is not None else sys.stdout
        self.err = err if err is not None else sys.stderr
        self.quiet = quiet

    # -- raw emission -------------------------------------------------------------------
    def emit(self, event: str, stage: str, **fields: Any) -> None:
        if not self.events:
            return
        record = {"event": event, "stage": stage, **_clean(fields), "t": round(time.time(), 3)}
        self.out.write(json.dumps(record) + "\n")
        self.out.flush()

    def _human(self, text: str) -> None:
        if not self.quiet:
            self.err.write(text + "\n")
            self.err.flush()

    # -- messages -----------------------------------------------------------------------
    def log(self, stage: str, message: str, **fields: Any) -> None:
        self.emit("log", stage, message=message, **fields)
        self._human(message)

    def warning(self, stage: str, message: str, **fields: Any) -> None:
        self.emit("warning", stage, message=message, **fields)
        self._human(f"WARNING: {message}")

    def error(self, stage: str, message: str, **fields: Any) -> None:
        self.emit("error", stage, message=message, **fields)
        self._human(f"ERROR: {message}")

    def start(self, stage: str, **fields: Any) -> None:
        self.emit("start", stage, **fields)

    def done(self, stage: str, **fields: Any) -> None:
        self.emit("done", stage, **fields)

    # -- counted work -------------------------------------------------------------------
    @contextlib.contextmanager
    def task(self, stage: str, total: int, desc: str | None = None, **fields: Any) -> Iterator["_Step"]:
        """Count ``total`` units of work; the yielded callable advances the count by one (or n).

        ``fields`` go into the ``start`` event (e.g. which configuration this count is for).
        """
        step = _Step(self, stage, total, desc or stage)
        self.start(stage, of=total, **fields)
        try:
            yield step
        finally:
            step.close()


class _Step:
    def __init__(self, reporter: Reporter, stage: str, total: int, desc: str):
        self.reporter, self.stage, self.total = reporter, stage, total
        self.done_count = 0
        self.started = time.monotonic()
        self._last_emit = 0.0
        self._bar = None
        if not reporter.events and not reporter.quiet:
            from tqdm import tqdm  # imported here so `autoseg --help` stays instant

            self._bar = tqdm(total=total, desc=desc, file=reporter.err, leave=True,
                             dynamic_ncols=True, mininterval=0.5)

    def __call__(self, n: int = 1, **fields: Any) -> None:
        self.done_count += n
        if self._bar is not None:
            self._bar.update(n)
        now = time.monotonic()
        final = self.done_count >= self.total
        if final or now - self._last_emit >= _MIN_EVENT_INTERVAL_S:
            self._last_emit = now
            elapsed = now - self.started
            self.reporter.emit("progress", self.stage, done=self.done_count, of=self.total,
                               eta_s=_round(eta_seconds(self.done_count, self.total, elapsed)),
                               elapsed_s=round(elapsed, 3), **fields)

    def part(self, fraction: float, **fields: Any) -> None:
        """Progress inside the current unit (``fraction`` of it done), e.g. windows of one case.

        Sent as a ``progress`` event with a fractional ``done``, as often as whole units are; the
        terminal bar moves on whole units only.
        """
        now = time.monotonic()
        if now - self._last_emit < _MIN_EVENT_INTERVAL_S:
            return
        self._last_emit = now
        done, elapsed = self.done_count + min(1.0, max(0.0, float(fraction))), now - self.started
        self.reporter.emit("progress", self.stage, done=round(done, 3), of=self.total,
                           eta_s=_round(eta_seconds(done, self.total, elapsed)), elapsed_s=round(elapsed, 3),
                           **fields)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
