import io
import json

from AutoSegLib.events import Reporter, eta_seconds


def parse(text):
    return [json.loads(line) for line in text.splitlines()]


def test_events_mode_prints_one_json_object_per_line_and_humans_get_stderr():
    out, err = io.StringIO(), io.StringIO()
    r = Reporter(events=True, out=out, err=err)
    with r.task("verify", total=3) as step:
        for _ in range(3):
            step()
    r.warning("verify", "odd spacing", case="c1")
    r.done("verify", errors=0)
    events = parse(out.getvalue())
    assert [e["event"] for e in events][0] == "start" and events[0]["of"] == 3
    assert events[-3]["event"] == "progress" and events[-3]["done"] == 3 and events[-3]["eta_s"] == 0.0
    assert events[-2] == {**events[-2], "event": "warning", "message": "odd spacing", "case": "c1"}
    assert events[-1]["event"] == "done" and events[-1]["errors"] == 0
    assert all(e["stage"] == "verify" and "t" in e for e in events)
    assert "WARNING: odd spacing" in err.getvalue()


def test_human_mode_prints_nothing_on_stdout():
    out, err = io.StringIO(), io.StringIO()
    r = Reporter(events=False, out=out, err=err)
    with r.task("fingerprint", total=2) as step:
        step()
        step()
    r.log("plan", "planned")
    assert out.getvalue() == ""
    assert "planned" in err.getvalue() and "2/2" in err.getvalue()


def test_non_finite_numbers_become_null_so_lines_stay_valid_json():
    out = io.StringIO()
    Reporter(events=True, out=out, err=io.StringIO()).emit("epoch", "train", loss=float("nan"), v=[float("inf")])
    event = json.loads(out.getvalue())
    assert event["loss"] is None and event["v"] == [None]


def test_eta():
    assert eta_seconds(0, 10, 5.0) is None
    assert eta_seconds(2, 10, 4.0) == 16.0
    assert eta_seconds(10, 10, 4.0) == 0.0
