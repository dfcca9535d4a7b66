import dataclasses

import pytest

from AutoSegLib.training.schedule import (
    PAPER,
    PRESETS,
    QUICK,
    preset_for_device,
    Schedule,
    MAX_BUDGET_LR_LIFT,
    budget_lr_lift,
    epochs_within_budget,
    estimate_eta,
    get_preset,
    poly_lr,
    recent_epoch_seconds,
    resolve_schedule,
    scale_to_time_budget,
    seconds_per_epoch,
)


def test_poly_lr_values():
    assert poly_lr(0, 1000) == 0.01
    assert poly_lr(500, 1000) == pytest.approx(0.01 * 0.5 ** 0.9)
    assert poly_lr(999, 1000) == pytest.approx(0.01 * 0.001 ** 0.9)  # ~2e-5: near zero, positive
    assert poly_lr(1000, 1000) == 0.0
    assert poly_lr(1200, 1000) == 0.0
    assert poly_lr(1, 2, initial_lr=1.0, exponent=1.0) == 0.5
    with pytest.raises(ValueError):
        poly_lr(0, 0)


def test_presets():
    assert PRESETS == {"paper": PAPER, "quick": QUICK}
    assert PAPER == Schedule(1000, 250, 50, "sgd", 0.01)  # the paper's blueprint
    assert (QUICK.optimizer, QUICK.initial_lr) == ("adamw", 3e-3)
    assert QUICK.total_iterations < PAPER.total_iterations / 100
    assert get_preset("quick") is QUICK
    with pytest.raises(ValueError, match="unknown schedule preset 'fast'; choose one of: auto, paper, quick"):
        get_preset("fast")
    with pytest.raises(dataclasses.FrozenInstanceError):
        QUICK.epochs = 5


def test_auto_preset_is_the_papers_on_a_gpu_and_quick_on_a_cpu():
    assert preset_for_device("auto", "cuda")[0] == "paper"
    assert preset_for_device("auto", "mps")[0] == "paper"
    name, reason = preset_for_device("auto", "cpu")
    assert name == "quick" and "no GPU" in reason
    assert preset_for_device("paper", "cpu") == ("paper", "--preset paper")  # an explicit choice is kept
    with pytest.raises(ValueError, match="unknown schedule preset"):
        preset_for_device("fast", "cpu")


def test_resolve_schedule_overrides_only_what_is_given():
    assert resolve_schedule("paper", epochs=50) == Schedule(50, 250, 50)
    assert resolve_schedule("quick", iterations_per_epoch=7, val_iterations=0) == \
        Schedule(QUICK.epochs, 7, 0, "adamw", 3e-3)
    # another optimizer brings its own starting rate unless one is given
    assert resolve_schedule("quick", optimizer="sgd") == Schedule(QUICK.epochs, 25, 5, "sgd", 0.01)
    assert resolve_schedule("paper", optimizer="adamw", initial_lr=1e-3).initial_lr == 1e-3
    assert resolve_schedule("paper", initial_lr=0.02) == Schedule(1000, 250, 50, "sgd", 0.02)


def test_schedule_from_an_old_checkpoint_is_sgd_and_bad_optimizers_are_refused():
    assert Schedule.from_dict({"epochs": 3, "iterations_per_epoch": 2, "val_iterations": 1}) == \
        Schedule(3, 2, 1, "sgd", 0.01)
    assert Schedule.from_dict(QUICK.to_dict()) == QUICK
    with pytest.raises(ValueError, match="optimizer must be one of sgd, adamw, got 'adam'"):
        Schedule(1, 1, 1, "adam")
    with pytest.raises(ValueError, match="initial_lr must be a positive number"):
        Schedule(1, 1, 1, "sgd", 0.0)


def test_schedule_rejects_bad_values_and_round_trips():
    for bad in ({"epochs": 0}, {"iterations_per_epoch": 2.5}, {"val_iterations": -1}, {"epochs": True}):
        with pytest.raises(ValueError):
            dataclasses.replace(QUICK, **bad)
    assert Schedule.from_dict(QUICK.to_dict()) == QUICK


def test_seconds_per_epoch():
    assert seconds_per_epoch(Schedule(10, 100, 20), 0.5) == pytest.approx(0.5 * (100 + 10))
    assert seconds_per_epoch(Schedule(10, 100, 0), 0.5, overhead_s=2) == pytest.approx(52)


def test_scale_to_time_budget_drops_epochs_and_lr_still_reaches_zero():
    paper = Schedule(1000, 250, 50)
    scaled = scale_to_time_budget(paper, seconds_per_iteration=0.2, budget_s=3600)  # 55 s per epoch
    assert scaled == Schedule(65, 250, 50)
    assert 65 * seconds_per_epoch(paper, 0.2) <= 3600 < 66 * seconds_per_epoch(paper, 0.2)
    assert poly_lr(scaled.epochs - 1, scaled.epochs) < 0.01 * 0.03


def test_budget_lr_lift_rises_with_the_shortening_between_one_and_the_cap():
    reference = QUICK.epochs * QUICK.iterations_per_epoch
    assert budget_lr_lift(reference, reference) == 1.0
    assert budget_lr_lift(reference, 10 * reference) == 1.0  # a budget that holds more never lowers the rate
    assert budget_lr_lift(reference, reference // 2) == pytest.approx(2.0)
    assert budget_lr_lift(reference, 1_500) == pytest.approx(reference / 1_500)
    assert budget_lr_lift(reference, 550) == MAX_BUDGET_LR_LIFT == 3.0  # 10 minutes on 2 cores: capped
    assert budget_lr_lift(reference, 1, max_lift=5.0) == 5.0
    for bad in ((0, 100), (100, 0), (-5, 10)):
        with pytest.raises(ValueError, match="positive"):
            budget_lr_lift(*bad)


def test_scale_to_time_budget_never_lengthens():
    assert scale_to_time_budget(QUICK, seconds_per_iteration=0.001, budget_s=10 ** 6) == QUICK


def test_scale_to_time_budget_shortens_epochs_rather_than_leave_fewer_than_ten():
    scaled = scale_to_time_budget(Schedule(10, 250, 50), seconds_per_iteration=1.0, budget_s=100)
    assert scaled == Schedule(10, 9, 1)  # 10 epochs x (9 training + 1 * 0.5 validation) = 95 s
    # the paper's epochs on a CPU (26 s per iteration) in 10 minutes: the lr still decays in 9 steps
    paper = scale_to_time_budget(PAPER, seconds_per_iteration=26.0, budget_s=600)
    assert paper == dataclasses.replace(PAPER, epochs=9, iterations_per_epoch=2, val_iterations=1)
    assert paper.epochs * seconds_per_epoch(paper, 26.0) <= 600
    # fewer than ten epochs fit only when one-iteration epochs do not
    assert scale_to_time_budget(Schedule(10, 250, 50), 1.0, budget_s=1) == Schedule(1, 1, 1)
    assert scale_to_time_budget(Schedule(10, 250, 50), 1.0, budget_s=7) == Schedule(4, 1, 1)
    with pytest.raises(ValueError):
        scale_to_time_budget(QUICK, 0, 100)


def test_scale_to_time_budget_keeps_a_short_requested_run_and_its_validation_ratio():
    assert scale_to_time_budget(Schedule(3, 100, 20), 1.0, budget_s=150) == Schedule(3, 45, 9)
    assert scale_to_time_budget(Schedule(50, 20, 0), 1.0, budget_s=100) == Schedule(10, 10, 0)


def test_recent_epoch_seconds_skips_warm_up_epoch():
    assert recent_epoch_seconds([30.0]) == 30.0
    assert recent_epoch_seconds([30.0, 10.0, 12.0]) == 11.0
    assert recent_epoch_seconds([30.0, 1, 1, 1, 1, 1, 10, 10], window=2) == 10.0
    with pytest.raises(ValueError):
        recent_epoch_seconds([])


def test_estimate_eta():
    assert estimate_eta([], 10) is None
    assert estimate_eta([30.0, 10.0, 12.0], 10) == pytest.approx(7 * 11.0)
    assert estimate_eta([5.0] * 10, 10) == 0.0


def test_epochs_within_budget_replans_total():
    times = [20.0, 10.0, 10.0]
    assert epochs_within_budget(100, 3, elapsed_s=40, epoch_times=times, budget_s=100) == 9  # 60 s left: 6 more
    assert epochs_within_budget(5, 3, elapsed_s=40, epoch_times=times, budget_s=100) == 5  # never above request
    assert epochs_within_budget(100, 3, elapsed_s=95, epoch_times=times, budget_s=100) == 3  # stop now
    assert epochs_within_budget(100, 3, elapsed_s=130, epoch_times=times, budget_s=100) == 3


@pytest.mark.parametrize("walls", [[34, 33] + [22] * 40, [20, 20, 35, 35] + [20] * 40, [30] * 40])
def test_a_budgeted_run_follows_its_epochs_up_as_well_as_down(monkeypatch, walls):
    """The trainer's own re-planning (Trainer.maybe_rescale_for_budget) on a simulated clock: after a slow
    start the total grows again, and the run ends within the budget, less than one epoch short of it."""
    from types import SimpleNamespace

    from AutoSegLib.training import trainer as trainer_module

    clock = [0.0]
    monkeypatch.setattr(trainer_module.time, "monotonic", lambda: clock[0])
    requested = dataclasses.replace(QUICK, epochs=1000)
    run = SimpleNamespace(options=SimpleNamespace(time_budget_min=10), schedule=requested)
    fake = SimpleNamespace(run=run, schedule=requested, epoch_walls=[], _last_epoch_end=None, epoch=0,
                           reporter=SimpleNamespace(log=lambda *args: None))
    totals = []
    while fake.epoch < fake.schedule.epochs:
        clock[0] += walls[fake.epoch]
        fake.epoch += 1
        trainer_module.Trainer.maybe_rescale_for_budget(fake, 0.0)
        totals.append(fake.schedule.epochs)
    used = sum(walls[:fake.epoch])
    assert 600 - max(walls) < used <= 600 + 1e-9, (used, totals)
    if walls[0] > walls[-1]:
        assert max(totals[2:]) > totals[1]  # planned low by the slow epochs, then raised
