"""Background jobs on real engine processes: events, success rule, failures, kill, cancel, resume.

The tests poll like the GUI's timer does (``poll()`` never waits) and sleep between polls
themselves; synchronisation is by the events a job has seen, never by fixed delays.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from AutoSegLogic import commands, jobs, quality, testing
from AutoSegLogic.jobs import Job, JobChain, Step, ThreadJob
from AutoSegLogic.session import Session

# One thread per engine process: the test network is tiny, and on a shared 2-core machine
# OpenMP threads spin waiting for cores other jobs hold.
ENGINE_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TRAIN_FLAGS = ["--device", "cpu", "--num-workers", "1"]


def poll_until(job, condition=None, timeout=120.0):
    """Poll as the GUI does; also checks that no poll ever blocks."""
    slowest = 0.0

    def timed_poll():
        nonlocal slowest
        started = time.monotonic()
        events = original()
        slowest = max(slowest, time.monotonic() - started)
        return events

    original, job.poll = job.poll, timed_poll
    try:
        testing.wait_until(job, condition, timeout)
    finally:
        job.poll = original
    assert slowest < 0.5, f"poll() took {slowest:.2f} s"


def train_job(dataset, work, *flags, log=None):
    return Job(["train", str(dataset), "3d_fullres", "0", "-w", str(work), *TRAIN_FLAGS, *flags], env=ENGINE_ENV,
               log_path=log)


# -- success and failure rules ---------------------------------------------------------------------
def test_a_successful_command_reports_progress_and_succeeds(tmp_path):
    job = Job(["make-phantoms", str(tmp_path / "DS"), "--cases", "2", "--seed", "4"], env=ENGINE_ENV).start()
    assert job.status == jobs.RUNNING and job.pid
    poll_until(job)
    assert job.succeeded and job.exit_status == 0 and job.failure == ""
    kinds = [e["event"] for e in job.events]
    assert kinds[0] == "start" and kinds[-1] == "done" and "progress" in kinds
    assert job.progress == 1.0 and job.done_event["dataset"] == str(tmp_path / "DS")
    assert "Wrote 2 CT phantom case(s)" in job.message
    assert "Wrote 2 CT phantom case(s)" in job.log_tail()  # human messages (stderr) go to the log


def test_a_reported_failure_fails_with_the_engine_message(tmp_path):
    job = Job(["verify", str(tmp_path / "nowhere")], env=ENGINE_ENV).start()
    poll_until(job)
    assert job.status == jobs.FAILED and job.exit_status == 1
    assert job.failure.startswith(f"{tmp_path / 'nowhere'}: verification found 1 error(s)\n- ")
    assert "dataset.json not found" in job.failure  # the problem itself, from the earlier error event
    assert not job.resumable


def test_exit_status_0_without_a_done_event_is_a_failure():
    """`autoseg --version` exits 0 and prints a line that is not an event: not a success."""
    job = Job(["--version"], env=ENGINE_ENV).start()
    poll_until(job)
    assert job.exit_status == 0 and job.status == jobs.FAILED
    assert "without reporting" in job.failure and job.message.startswith("autoseg ")


def test_a_chain_runs_steps_in_order_and_stops_at_the_first_failure(tmp_path):
    made = []

    def make(step):
        made.append(step.title)
        return Job(step.args, env=ENGINE_ENV, title=step.title)

    dataset = tmp_path / "DS"
    good = JobChain([Step(["make-phantoms", str(dataset), "--cases", "1"], "make"),
                     Step(["verify", str(dataset)], "check")], make).start()
    poll_until(good)
    assert good.succeeded and made == ["make", "check"] and good.step_text == "step 2/2: check"
    made.clear()
    bad = JobChain([Step(["verify", str(tmp_path / "nowhere")], "check"),
                    Step(["make-phantoms", str(tmp_path / "never"), "--cases", "1"], "never")], make).start()
    poll_until(bad)
    assert bad.status == jobs.FAILED and made == ["check"] and not (tmp_path / "never").exists()
    assert not bad.resumable
    with pytest.raises(ValueError, match="training step"):
        bad.resume()


# -- training: killed from outside, cancelled and resumed ----------------------------------------------
def test_a_job_killed_from_outside_fails_with_the_engines_last_message(work_copy):
    dataset, work = work_copy
    job = train_job(dataset, work, "--epochs", "50", "--iterations-per-epoch", "2").start()
    poll_until(job, lambda: job.epochs, timeout=90)
    os.killpg(job.pid, signal.SIGKILL)  # e.g. the out-of-memory killer (the whole process group)
    poll_until(job)
    assert job.status == jobs.FAILED and job.exit_status == -signal.SIGKILL
    assert "killed by SIGKILL from outside AutoSeg" in job.failure
    assert "epoch 1/50" in job.failure  # the engine's last message
    assert job.done_event is None and job.eta_s is None


def test_cancel_saves_a_checkpoint_and_resume_finishes_the_run(work_copy):
    dataset, work = work_copy
    session = Session(_scene(), env=ENGINE_ENV, log_dir=work / "logs")
    steps = [Step(["train", str(dataset), "3d_fullres", "0", "-w", str(work), *TRAIN_FLAGS, "--epochs", "4",
                   "--iterations-per-epoch", "3"], "train fold 0")]
    chain = session.start_steps(steps, "train")
    poll_until(session, lambda: chain.job.epochs, timeout=90)
    assert 0 < chain.job.progress < 1 and chain.job.eta_s is not None
    session.stop()
    poll_until(session, timeout=60)

    job = chain.job
    assert job.status == jobs.CANCELLED and job.exit_status == 143, job.log_tail()
    assert "SIGTERM" in job.failure and "--resume" in job.failure
    latest = work / "model" / "3d_fullres" / "fold_0" / "checkpoint_latest.pt"
    assert latest.is_file() and str(latest) in job.error
    assert chain.resumable and session.curves.rows >= 1

    resumed = session.resume_training()
    assert resumed.job.args[-1] == "--resume"
    poll_until(session, timeout=90)
    assert resumed.succeeded, resumed.job.failure
    assert resumed.job.done_event["epochs"] == 4
    # The fold's validation Dice per class reaches the module, weakest first (shown when training ends).
    dice = resumed.job.done_event["validation_dice_per_class"]
    assert list(dice) == sorted(dice, key=lambda name: (dice[name], name))
    assert resumed.done_events("train") == [resumed.job.done_event]
    assert quality.validation_report(resumed.done_events("train")).startswith("Validation Dice, weakest first: ")
    assert session.curves.column("epoch") == [1, 2, 3, 4]  # one chart for the run, across the resume
    assert sorted(p.name for p in (work / "logs").iterdir()) == ["001-train.log"]  # one log per run, resumes appended
    assert "Resuming from" in resumed.job.log_tail(50)


def _scene():
    import slicer

    return slicer.vtkMRMLScene()


# -- commands ---------------------------------------------------------------------------------------
def test_training_steps_are_verify_plan_then_one_run_per_fold(tmp_path):
    settings = commands.TrainSettings(tmp_path / "DS", configuration="3d_fullres", folds=commands.parse_folds("0-2"),
                                      preset="paper",
                                      time_budget_min=90, device="cuda", overwrite=True)
    steps = commands.training_steps(settings)
    work = str(tmp_path / "DS.autoseg")
    assert [s.args[0] for s in steps] == ["verify", "plan-and-preprocess", "train", "train", "train"]
    assert steps[1].args == ["plan-and-preprocess", str(tmp_path / "DS"), "-w", work, "-c", "3d_fullres"]
    assert steps[3].args == ["train", str(tmp_path / "DS"), "3d_fullres", "1", "-w", work, "--preset", "paper",
                             "--device", "cuda", "--time-budget", "90", "--overwrite"]
    train_flags = commands.engine_flags("train")
    for step in steps:
        assert set(a for a in step.args if a.startswith("-")) <= commands.engine_flags(step.args[0]) | train_flags


def test_the_advanced_network_choice_is_planned_and_checked(tmp_path):
    # The default adds no flag (older engines run the chain); another design goes to plan-and-preprocess.
    default = commands.training_steps(commands.TrainSettings(tmp_path / "DS"))
    assert "--architecture" not in default[1].args
    steps = commands.training_steps(commands.TrainSettings(tmp_path / "DS", architecture="UNetPlusPlus"))
    assert steps[1].args[-2:] == ["--architecture", "UNetPlusPlus"]
    assert "--architecture" in commands.engine_flags("plan-and-preprocess")
    assert all("--architecture" not in s.args for s in steps[2:])  # training reads the design from the plans
    with pytest.raises(ValueError, match="architecture 'os.system' is not one of PlainConvUNet, "):
        commands.training_steps(commands.TrainSettings(tmp_path / "DS", architecture="os.system"))


def test_parse_folds():
    assert commands.parse_folds("") == ["0"]
    assert commands.parse_folds("all") == ["all"]
    assert commands.parse_folds("0, 2 4-5") == ["0", "2", "4", "5"]
    with pytest.raises(ValueError, match="'x' is not a fold"):
        commands.parse_folds("0,x")


def test_settings_are_checked_against_the_allowed_values(tmp_path):
    with pytest.raises(ValueError, match="device 'gpu' is not one of auto, cuda, mps, cpu"):
        commands.training_steps(commands.TrainSettings(tmp_path, device="gpu"))


def test_fine_tune_is_refused_by_an_engine_without_init_from(work_copy, monkeypatch):
    # An older engine bundled elsewhere may lack the flag: the button must say so, not fail later.
    dataset, work = work_copy
    monkeypatch.setattr(commands, "engine_flags", lambda command: {"--resume", "--epochs"})
    with pytest.raises(commands.EngineFeatureMissing, match="'train' lacks --init-from"):
        commands.fine_tune_steps(dataset, "3d_fullres", work)
    assert not (work / commands.FINE_TUNE_DIR).exists()


def test_fine_tune_refuses_labels_the_model_was_not_trained_on(work_copy, monkeypatch):
    dataset, work = work_copy
    monkeypatch.setattr(commands, "require", lambda *a: None)
    (work / "model").mkdir(exist_ok=True)
    spec = json.loads((dataset / "dataset.json").read_text())
    (work / "model" / "dataset.json").write_text(json.dumps({**spec, "labels": {"background": 0, "liver": 1}}))
    with pytest.raises(ValueError, match="train a new model instead"):
        commands.fine_tune_steps(dataset, "3d_fullres", work)


def test_prediction_needs_the_predict_command(tmp_path):
    if commands.engine_flags("predict"):
        step = commands.prediction_step(tmp_path / "in", tmp_path / "out", tmp_path / "m", folds=["0", "1"],
                                        tta=False, uncertainty=True)
        assert step.args[:7] == ["predict", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "-m",
                                 str(tmp_path / "m")]
        assert {"-f", "--no-tta", "--uncertainty", "--device"} <= set(step.args)
        assert {a for a in step.args if a.startswith("-")} <= commands.engine_flags("predict")
    else:
        with pytest.raises(commands.EngineFeatureMissing, match="no 'predict' command"):
            commands.prediction_step(tmp_path / "in", tmp_path / "out", tmp_path / "m")


def test_resume_after_a_restart_finds_the_unfinished_runs_on_disk(tmp_path):
    dataset = tmp_path / "DS"
    model = tmp_path / "DS.autoseg" / "model" / "3d_fullres"
    for fold, files in {"0": ["checkpoint_latest.pt"], "1": ["checkpoint_latest.pt", "checkpoint_final.pt"],
                        "2": []}.items():
        (model / f"fold_{fold}").mkdir(parents=True)
        for name in files:
            (model / f"fold_{fold}" / name).write_bytes(b"")
    settings = commands.TrainSettings(dataset, configuration="3d_fullres", folds=["0", "1", "2", "3"], overwrite=True)
    steps = commands.resume_steps(settings)
    assert [s.title for s in steps] == ["resume 3d_fullres fold 0"]
    assert steps[0].args[-1] == "--resume" and "--overwrite" not in steps[0].args
    with pytest.raises(ValueError, match="no unfinished 3d_fullres run among folds 1, 2"):
        commands.resume_steps(commands.TrainSettings(dataset, configuration="3d_fullres", folds=["1", "2"]))


# -- progress as the widget shows it ------------------------------------------------------------------
def feed(job, *events):
    for event in events:
        job._take(event)  # what poll() does with each line the engine printed
    return job.progress


def test_training_progress_does_not_move_back_during_the_final_validation():
    job = Job(["train", "D", "3d_cpu", "0"])
    shown = [feed(job, {"event": "start", "stage": "train", "of": 2}),
             feed(job, {"event": "epoch", "stage": "train", "done": 1, "of": 2, "eta_s": None}),
             feed(job, {"event": "epoch", "stage": "train", "done": 2, "of": 2, "eta_s": 0.0}),
             feed(job, {"event": "start", "stage": "validate", "of": 2}),
             feed(job, {"event": "progress", "stage": "validate", "done": 1, "of": 2}),
             feed(job, {"event": "progress", "stage": "validate", "done": 2, "of": 2})]
    assert shown == pytest.approx([0.0, 0.475, 0.95, 0.95, 0.975, 1.0])


def test_an_eta_is_estimated_from_the_progress_until_the_engine_gives_one(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(jobs.time, "monotonic", lambda: now[0])
    job = Job(["train", "D", "3d_cpu", "0"])
    feed(job, {"event": "start", "stage": "train", "of": 10})
    assert job.eta_s is None  # nothing measured yet
    now[0] += 30
    feed(job, {"event": "epoch", "stage": "train", "done": 1, "of": 10, "eta_s": None})
    assert job.eta_s == pytest.approx(30 / 0.095 * (1 - 0.095))  # after the first epoch: from its pace
    feed(job, {"event": "progress", "stage": "train", "epoch": 1, "iteration": 1, "of": 2, "eta_s": 250.0})
    assert job.eta_s == pytest.approx(250.0)  # the engine's own estimate wins once it has one


def test_prediction_progress_moves_with_every_window_and_a_chain_never_goes_back():
    job = Job(["predict", "-i", "in", "-o", "out", "-m", "model"])
    shown = [feed(job, {"event": "start", "stage": "predict", "of": 2}),
             *[feed(job, {"event": "progress", "stage": "predict", "done": d, "of": 2}) for d in (0.25, 0.5, 1, 1.6, 2)]]
    assert shown == pytest.approx([None, 0.125, 0.25, 0.5, 0.8, 1.0])
    chain = JobChain([Step(["a"], "a", lambda j: None), Step(["b"], "b", weight=8.0),
                      Step(["c"], "c", lambda j: None)], lambda step: Job(step.args, title=step.title))
    chain.job, chain.index = Job(["predict"]), 1  # the engine step, a quarter done
    feed(chain.job, {"event": "progress", "stage": "predict", "done": 1, "of": 4})
    assert chain.progress == pytest.approx((1 + 8 * 0.25) / 10)
    chain.job = Job(["predict"])  # a new job that has not reported yet: the bar stays where it was
    assert chain.progress == pytest.approx(0.3)


def test_a_thread_job_reports_like_an_engine_job():
    def work(job):
        job.report(1, 2, "half")
        return 42

    job = ThreadJob(work, "compute").start()
    testing.wait_until(job, timeout=10)
    assert job.succeeded and job.result == 42 and job.progress == 1.0 and job.message == "half"

    def broken(job):
        raise OSError("disk full")

    job = ThreadJob(broken, "write files").start()
    testing.wait_until(job, timeout=10)
    assert job.status == jobs.FAILED and job.failure == "write files: disk full"


def test_the_validation_report_ranks_classes_over_folds_and_counts_the_weak_ones():
    folds = [{"stage": "train", "validation_dice_per_class": {"liver": 0.9, "vessel": 0.2, "nerve": 0.4}},
             {"stage": "train", "validation_dice_per_class": {"liver": 0.8, "vessel": 0.4, "nerve": None}}]
    assert quality.class_dice(folds) == pytest.approx({"liver": 0.85, "vessel": 0.3, "nerve": 0.4})
    assert quality.validation_report(folds) == ("Validation Dice, weakest first: vessel 0.30, nerve 0.40, liver 0.85; "
                                                "2 of 3 below 0.50: review them first")
    assert quality.validation_report(folds, shown=1).startswith("Validation Dice, weakest first: vessel 0.30 (+2 more)")
    assert quality.validation_report([{"stage": "train"}]) == ""  # trained with --no-validation
    good = [{"validation_dice_per_class": {"liver": 0.9}}]
    assert quality.validation_report(good).endswith("every class at 0.50 or above")
