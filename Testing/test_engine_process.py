"""The persistent engine process and its client: one load for many refines, errors, death, silence.

The engine is the real ``python -m AutoSegLib engine`` on a tiny guided model folder with
random weights (what is tested is the process and its protocol, not the segmentation). One
engine serves the module's tests; the kill test starts its own.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import sys

import numpy as np
import pytest

from AutoSegLib.inference.engine_process import EngineError, EngineProcess

from test_refine import GEOMETRY, click, image
from test_refine import guided_model  # noqa: F401 - a fixture this module uses

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def engine(guided_model):  # noqa: F811
    with EngineProcess(guided_model, device="cpu", timeout=120, env=ENV) as engine:
        yield engine


def test_the_engine_loads_once_and_answers_refine_after_refine(engine):
    assert engine.ready["ok"] and engine.ready["guided"] and engine.ready["configuration"] == "3d_fullres"
    assert engine.ready["labels"] == {"background": 0, "organ": 1, "tumour": 2}
    case = engine.open_case([image()], GEOMETRY)
    previous = np.zeros((20, 40, 36), np.uint8)
    first = engine.refine(case, previous, [click(1, True, (10, 20, 18))])
    second = engine.refine(case, first.labels, [click(1, True, (10, 20, 18)), click(2, False, (12, 22, 16))])
    assert first.region == (7, 13, 14, 26, 12, 24)  # as in-process (test_refine): the same window rule
    for result, before in ((first, previous), (second, first.labels)):
        assert result.labels.dtype == np.uint8 and result.labels.shape == previous.shape
        mask = np.ones(previous.shape, bool)
        mask[tuple(slice(result.region[2 * a], result.region[2 * a + 1]) for a in range(3))] = False
        np.testing.assert_array_equal(result.labels[mask], before[mask])
    assert engine.request("ping")["pid"] == engine.ready["pid"] == engine.pid  # the same process, loaded once
    engine.close_case(case)
    assert list(engine.folder.iterdir()) == []  # the arrays of finished requests are gone


def test_bad_requests_get_an_error_and_the_engine_stays_alive(engine):
    case = engine.open_case([image()], GEOMETRY)
    previous = np.zeros((20, 40, 36), np.uint8)
    with pytest.raises(EngineError, match="the model has no label 9"):
        engine.refine(case, previous, [click(9, True, (10, 20, 18))])
    with pytest.raises(EngineError, match="outside the image"):
        engine.refine(case, previous, [click(1, True, (25, 20, 18))])
    with pytest.raises(EngineError, match="no open case 'case-999'"):
        engine.refine("case-999", previous, [click(1, True, (10, 20, 18))])
    with pytest.raises(EngineError, match="unknown op 'frobnicate'"):
        engine.request("frobnicate")
    with pytest.raises(EngineError, match="the model takes 1 channel"):
        engine.open_case([image(), image()], GEOMETRY)
    engine.process.stdin.write("this is not json\n")
    engine.process.stdin.flush()
    reply = engine._next_line(60, "a malformed line")
    assert reply["ok"] is False and "not a JSON line" in reply["error"]
    assert engine.refine(case, previous, [click(1, True, (10, 20, 18))]).region == (7, 13, 14, 26, 12, 24)


def test_a_model_that_does_not_load_is_reported(tmp_path):
    with pytest.raises(EngineError, match=r"could not load .*not a model folder"):
        EngineProcess(tmp_path, device="cpu", env=ENV)


def test_an_engine_that_does_not_answer_is_stopped_after_the_timeout(tmp_path):
    # A stand-in for Python: says ready, then never answers.
    fake = tmp_path / "fake-python"
    fake.write_text(f"#!{sys.executable}\nimport json, sys, time\n"
                    "print(json.dumps({'event': 'ready', 'ok': True}), flush=True)\n"
                    "print('thinking', file=sys.stderr, flush=True)\ntime.sleep(60)\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    engine = EngineProcess(tmp_path, python=str(fake), timeout=0.5)
    with pytest.raises(EngineError, match=r"did not answer within 0.5 s \(ping\); it was stopped.*\n.*thinking"):
        engine.request("ping")
    assert engine.process.poll() is not None


def test_click_json_is_what_the_engine_reads():
    from AutoSegLib.inference.clicks import Click, click_to_json

    line = json.dumps(click_to_json(Click(2, True, (1.0, 2.0, 3.0))))
    assert json.loads(line) == {"label": 2, "positive": True, "point": [1.0, 2.0, 3.0]}


def test_a_killed_engine_is_reported_with_its_signal_and_last_messages(engine):
    # Last in this file: it kills the module's engine.
    case = engine.open_case([image()], GEOMETRY)
    os.kill(engine.pid, signal.SIGKILL)
    engine.process.wait(10)
    with pytest.raises(EngineError, match=r"the engine process ended before refine \(killed by signal 9\)"):
        engine.refine(case, np.zeros((20, 40, 36), np.uint8), [click(1, True, (10, 20, 18))])
    assert not engine.folder.exists()
    with pytest.raises(EngineError, match="was closed"):
        engine.request("ping")
