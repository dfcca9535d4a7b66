"""``autoseg engine MODEL_DIR``: a persistent process that keeps a model loaded and answers refines.

Protocol (JSON lines, docs/clicks.md): the process first writes one line, ``{"event": "ready",
"ok": true, "protocol": 1, ...}`` once the model is loaded (or ``"ok": false`` with ``error``
and exits 1). Then each line read from stdin is one request and gets exactly one line back on
stdout, with the request's ``id``:

- ``{"op": "open_case", "channels": [NPY, ...], "geometry": {...}}`` -> ``{"case": ID, "shape": [z, y, x]}``
  (the case is preprocessed once and cached for its refines)
- ``{"op": "refine", "case": ID, "previous": NPY, "clicks": [CLICK, ...], "output": NPY,
  "scope": "clicked"}`` -> ``{"output": NPY, "region": [z0, z1, y0, y1, x0, x1], "windows": n}``
- ``{"op": "close_case", "case": ID}``, ``{"op": "ping"}``, ``{"op": "shutdown"}`` (answers, then exits 0)

Arrays travel as ``.npy`` files in a folder the client owns (read with ``allow_pickle=False``;
outputs written under a temporary name and renamed). Every answer carries ``ok`` and
``seconds``; a failed request answers ``{"ok": false, "error": "..."}`` and the process stays
alive. Only protocol lines go to stdout (anything else printing there is sent to stderr), and
logs go to stderr.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from AutoSegLib.errors import ReportedFailure

PROTOCOL_VERSION = 1
MAX_CASES = 4  # cached preprocessed cases; the oldest is dropped first


class RequestError(ValueError):
    """A request the engine cannot serve; its message is the answer's ``error``."""


def protocol_stream():
    """A private copy of stdout for protocol lines; fd 1 itself then points at stderr, so a library
    that prints (or a C extension writing to fd 1) cannot corrupt the protocol."""
    sys.stdout.flush()
    out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return out


def _load_array(path) -> np.ndarray:
    if not isinstance(path, str) or not path:
        raise RequestError(f"expected the path of an .npy file, got {path!r}")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise RequestError(f"{path}: cannot read the array ({exc})") from None


def _save_array(path, array: np.ndarray) -> None:
    if not isinstance(path, str) or not path.endswith(".npy"):
        raise RequestError(f"output must be the path of an .npy file, got {path!r}")
    partial = Path(path).with_name(Path(path).name + ".partial.npy")
    np.save(partial, array, allow_pickle=False)
    os.replace(partial, path)


class Engine:
    """The request handlers around one :class:`~AutoSegLib.inference.Predictor`."""

    def __init__(self, predictor):
        self.predictor = predictor
        self.cases: dict[str, object] = {}
        self.ids = itertools.count(1)

    def ready_message(self, load_seconds: float) -> dict:
        model = self.predictor.model
        return {"event": "ready", "ok": True, "protocol": PROTOCOL_VERSION, "pid": os.getpid(),
                "model": str(model.path), "configuration": self.predictor.configurations[0],
                "folds": [str(f) for f in self.predictor.stages[0].folds], "guided": self.predictor.guided,
                "labels": dict(model.spec.labels), "device": str(self.predictor.device),
                "load_seconds": round(load_seconds, 3)}

    def handle(self, request: dict) -> dict:
        op = request.get("op")
        handler = {"open_case": self.open_case, "refine": self.refine, "close_case": self.close_case,
                   "ping": self.ping}.get(op)
        if handler is None:
            raise RequestError(f"unknown op {op!r}; known: open_case, refine, close_case, ping, shutdown")
        return handler(request)

    def ping(self, request: dict) -> dict:
        return {"pid": os.getpid(), "cases": sorted(self.cases)}

    def open_case(self, request: dict) -> dict:
        from AutoSegLib.imageio import Geometry

        paths = request.get("channels")
        if not isinstance(paths, list) or not paths:
            raise RequestError("open_case needs channels: a list of .npy paths, one per model channel")
        try:
            geometry = Geometry.from_dict(request["geometry"])
        except (KeyError, TypeError, ValueError) as exc:
            raise RequestError(f"open_case needs geometry {{spacing, origin, direction}} ({exc!r})") from None
        case = self.predictor.prepare_refine([_load_array(p) for p in paths], geometry)
        case_id = f"case-{next(self.ids)}"
        self.cases[case_id] = case
        while len(self.cases) > MAX_CASES:
            self.cases.pop(next(iter(self.cases)))
        return {"case": case_id, "shape": list(case.original_shape)}

    def _case(self, request: dict):
        case_id = request.get("case")
        if case_id not in self.cases:
            raise RequestError(f"no open case {case_id!r} (open: {', '.join(self.cases) or 'none'}; at most "
                               f"{MAX_CASES} are kept, the oldest dropped first)")
        return self.cases[case_id]

    def refine(self, request: dict) -> dict:
        from AutoSegLib.inference.clicks import click_from_json

        case = self._case(request)
        clicks = request.get("clicks")
        if not isinstance(clicks, list):
            raise RequestError("refine needs clicks: a list of {label, positive, point}")
        clicks = [click_from_json(c) for c in clicks]
        previous = _load_array(request.get("previous"))
        result = self.predictor.refine(case, None, previous, clicks, scope=request.get("scope", "clicked"))
        _save_array(request.get("output"), result.labels)
        return {"output": request["output"], "region": list(result.region), "windows": result.windows,
                "network_seconds": round(result.network_seconds, 4)}

    def close_case(self, request: dict) -> dict:
        self._case(request)
        del self.cases[request["case"]]
        return {}


def answer(engine: Engine, line: str) -> tuple[dict, bool]:
    """The answer to one request line, and whether the process should stop afterwards."""
    started = time.monotonic()
    request_id = None
    try:
        request = json.loads(line)
        if not isinstance(request, dict):
            raise RequestError(f"a request is a JSON object, got {type(request).__name__}")
        request_id = request.get("id")
        if request.get("op") == "shutdown":
            return {"id": request_id, "ok": True, "seconds": 0.0}, True
        result = engine.handle(request)
        reply = {"id": request_id, "ok": True, **result}
    except json.JSONDecodeError as exc:
        reply = {"id": None, "ok": False, "error": f"not a JSON line ({exc})"}
    except (RequestError, ReportedFailure, ValueError, OSError) as exc:  # ClickError, InputError, bad arrays
        reply = {"id": request_id, "ok": False, "error": str(exc)}
    except Exception as exc:  # an engine bug: answered, logged with its traceback, the process lives on
        traceback.print_exc(file=sys.stderr)
        reply = {"id": request_id, "ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}
    reply["seconds"] = round(time.monotonic() - started, 4)
    return reply, False


def serve(model_dir, configuration=None, folds=None, device: str = "cpu", tta: bool = False,
          checkpoint: str | None = None, stdin=None) -> int:
    """Load the model, say ready, answer requests until shutdown or end of input. Returns the exit status."""
    out = protocol_stream()
    stdin = stdin or sys.stdin
    started = time.monotonic()
    try:
        from AutoSegLib.inference import Predictor
        from AutoSegLib.inference.refiner import refine_stage

        predictor = Predictor.from_model_dir(model_dir, configuration, folds, checkpoint, device=device, tta=tta)
        refine_stage(predictor)
    except Exception as exc:
        out.write(json.dumps({"event": "ready", "ok": False, "error": str(exc)}) + "\n")
        out.flush()
        return 1
    engine = Engine(predictor)
    out.write(json.dumps(engine.ready_message(time.monotonic() - started)) + "\n")
    out.flush()
    for line in stdin:
        if not line.strip():
            continue
        reply, stop = answer(engine, line)
        out.write(json.dumps(reply) + "\n")
        out.flush()
        if stop:
            break
    return 0
