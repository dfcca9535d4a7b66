"""Click guidance: the Click value and its JSON, guidance maps, simulated clicks, the plan field, guided training.

Arrays are made by hand so every expected position is an exact integer; the training test
runs a tiny guided network for a few iterations on five CT phantoms.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from AutoSegLib import cli
from AutoSegLib.imageio import Geometry
from AutoSegLib.inference.clicks import (Click, ClickError, ball_offsets, click_from_json, click_index, click_to_json,
                                         component_centre, encode_guidance, error_click, index_to_physical,
                                         physical_to_index)
from AutoSegLib.planning import Plans
from AutoSegLib.planning.guidance import (GuidanceSpec, default_guidance, guidance_channels, guidance_problems,
                                          with_guidance)
from AutoSegLib.training.guidance import simulate_guidance, step_generators, training_click
from conftest import TINY

OBLIQUE = Geometry((2.5, 0.8, 1.2), (-30.0, 12.5, 7.0),
                   tuple(np.array([[0.0, 0.6, 0.8], [1.0, 0.0, 0.0], [0.0, 0.8, -0.6]]).ravel().tolist()))


# -- the click value ------------------------------------------------------------------------------
def test_click_json_round_trip_and_malformed_clicks_are_named():
    click = Click(3, False, (1.5, -2.0, 40.25))
    assert click_from_json(click_to_json(click)) == click
    for bad, words in [({"label": 0, "positive": True, "point": [0, 0, 0]}, "label must be an integer >= 1"),
                       ({"label": 1, "positive": 1, "point": [0, 0, 0]}, "positive must be true or false"),
                       ({"label": 1, "positive": True, "point": [0, 0]}, "three finite numbers"),
                       ({"label": 1, "positive": True, "point": [0, float("nan"), 0]}, "three finite numbers"),
                       ({"label": 1, "positive": True}, "exactly label, positive and point")]:
        with pytest.raises(ClickError, match=words):
            click_from_json(bad)


def test_physical_points_map_to_voxels_through_an_oblique_geometry():
    for index in [(0, 0, 0), (3, 7, 2), (11, 0, 19)]:
        point = index_to_physical(index, OBLIQUE)
        np.testing.assert_allclose(physical_to_index(point, OBLIQUE), index, atol=1e-9)
    assert click_index(Click(1, True, index_to_physical((4, 5, 6), OBLIQUE)), OBLIQUE, (12, 20, 20)) == (4, 5, 6)
    with pytest.raises(ClickError, match=r"outside the image \(voxel \(12, 5, 6\)"):
        click_index(Click(1, True, index_to_physical((12, 5, 6), OBLIQUE)), OBLIQUE, (12, 20, 20))


# -- guidance maps ----------------------------------------------------------------------------------
def test_guidance_maps_draw_balls_in_the_class_and_sign_channel():
    assert len(ball_offsets(1, 3)) == 7 and len(ball_offsets(2, 3)) == 33 and len(ball_offsets(0, 3)) == 1
    maps = encode_guidance([(0, True, (5, 5, 5)), (1, False, (2.4, 6.6, 3.0))], (10, 10, 10), n_foreground=2,
                           radius=2)
    assert maps.shape == (4, 10, 10, 10) and maps.dtype == np.float32
    assert [int(m.sum()) for m in maps] == [33, 0, 0, 33]
    assert maps[0, 5, 5, 5] == 1 and maps[0, 5, 5, 7] == 1 and maps[0, 5, 6, 7] == 0
    assert maps[3, 2, 7, 3] == 1  # the point is rounded to (2, 7, 3)
    edge = encode_guidance([(0, True, (0, 0, 0))], (4, 4, 4), n_foreground=1, radius=1)
    assert int(edge[0].sum()) == 4  # the part of the ball inside the grid
    with pytest.raises(ValueError, match="class position 2"):
        encode_guidance([(2, True, (1, 1, 1))], (4, 4, 4), n_foreground=2)


# -- simulated clicks ------------------------------------------------------------------------------
def test_the_click_goes_to_the_centre_of_the_largest_error():
    truth = np.zeros((9, 12, 12), bool)
    truth[1:8, 1:10, 1:6] = True  # 7 x 9 x 5
    predicted = truth.copy()
    predicted[1:8, 1:10, 1:4] = False  # missed: 7 x 9 x 3 (189 voxels) centred at (4, 5, 2)
    predicted[2:5, 2:5, 8:11] = True  # extra: 3 x 3 x 3 (27 voxels) centred at (3, 3, 9)
    assert error_click(predicted, truth) == (True, (4, 5, 2), 189)
    predicted[1:8, 1:10, 1:4] = True  # only the extra part is wrong now
    assert error_click(predicted, truth) == (False, (3, 3, 9), 27)
    assert error_click(truth, truth) is None


def test_a_tie_between_missed_and_extra_parts_clicks_the_missed_one():
    truth = np.zeros((5, 5, 11), bool)
    truth[2, 2, 1] = True
    predicted = np.zeros_like(truth)
    predicted[2, 2, 9] = True
    assert error_click(predicted, truth) == (True, (2, 2, 1), 1)


def test_the_centre_respects_the_spacing():
    component = np.zeros((5, 9, 9), bool)
    component[0:5, 0:9, 0:9] = True
    assert component_centre(component) == (2, 4, 4)
    # thin slices: the component is deep in z only in voxels, not in mm - the centre is the same voxel
    assert component_centre(component, spacing=(4.0, 1.0, 1.0)) == (2, 4, 4)


def test_training_clicks_draw_among_the_wrong_classes_only():
    truth = np.zeros((6, 6, 6), np.int16)
    truth[1:5, 1:5, 1:3] = 1
    truth[1:5, 1:5, 4:6] = 2
    predicted = truth.copy()
    predicted[1:5, 1:5, 4:6] = 0  # class 2 (position 1) missed entirely, class 1 right
    rng = np.random.default_rng(0)
    for _ in range(5):
        position, positive, index = training_click(predicted, truth, [1, 2], rng)
        assert (position, positive) == (1, True) and truth[index] == 2
    assert training_click(truth, truth, [1, 2], rng) is None


def test_simulated_guidance_leaves_the_automatic_share_at_zero():
    spec = GuidanceSpec(automatic_share=0.5, max_rounds=2)
    data = torch.zeros((8, 1, 6, 6, 6))
    target = torch.zeros((8, 1, 6, 6, 6), dtype=torch.long)
    target[:, :, 2:4, 2:4, 2:4] = 1

    def always_background(x):
        assert x.shape[1] == 1 + 2  # image + the guidance of one class
        return torch.stack([torch.ones(x.shape[0], *x.shape[2:]), torch.zeros(x.shape[0], *x.shape[2:])], 1)

    batch_rng, sample_rngs = step_generators(3, 0, (0, 8))
    guidance, counts = simulate_guidance(always_background, data, target, spec, [1], batch_rng, sample_rngs)
    guided = [b for b in range(8) if guidance[b].sum() > 0]
    assert len(guided) == counts["guided_samples"] and 0 < len(guided) < 8
    assert counts["clicks"] == counts["rounds"] * len(guided)
    for b in guided:  # every click is positive, in the missed cube, and no negative map is drawn
        assert guidance[b, 1].sum() == 0 and guidance[b, 0, 2:4, 2:4, 2:4].sum() > 0


# -- the plan field --------------------------------------------------------------------------------
def test_a_rank_draws_for_its_slots_what_one_process_draws_for_them():
    _, whole = step_generators(7, 12, (0, 4))
    _, second_half = step_generators(7, 12, (2, 4))
    assert [r.random() for r in whole[2:]] == [r.random() for r in second_half]
    assert step_generators(7, 12, (0, 1))[0].integers(1000) == step_generators(7, 12, (2, 3))[0].integers(1000)


def test_guidance_entries_are_checked_and_count_two_channels_per_class():
    assert guidance_problems("g", default_guidance()) == [] and guidance_problems("g", None) == []
    assert "radius" in " ".join(guidance_problems("g", {**default_guidance(), "radius": -1}))
    assert "encoding" in " ".join(guidance_problems("g", {**default_guidance(), "encoding": "gaussian-ish"}))
    assert "keys" in " ".join(guidance_problems("g", {"radius": 2}))
    assert guidance_channels({"guidance": default_guidance()}, 5) == 10 and guidance_channels({}, 5) == 0


def test_plans_keep_guidance_and_leave_a_cascade_stage_plain():
    from test_inference_predictor import tiny_config, tiny_plans

    raw = tiny_plans({"3d_lowres": tiny_config((2.0, 1.0, 1.0), (8, 16, 16), next_stage="3d_cascade_fullres"),
                      "3d_cascade_fullres": tiny_config((2.0, 1.0, 1.0), (8, 16, 16), previous_stage="3d_lowres"),
                      "2d": tiny_config((1.0, 1.0), (16, 16))})
    plans = with_guidance(Plans.from_dict(raw), True)
    out = Plans.from_dict(plans.to_dict()).to_dict()["configurations"]
    assert out["3d_lowres"]["guidance"] == default_guidance() and "guidance" not in out["3d_cascade_fullres"]
    assert "guidance" not in out["2d"]  # refines predict 3D windows
    assert "guidance" not in Plans.from_dict(raw).to_dict()["configurations"]["3d_lowres"]  # old plans: unchanged
    raw["configurations"]["3d_lowres"]["guidance"] = {**default_guidance(), "max_rounds": 0}
    with pytest.raises(ValueError, match="max_rounds"):
        Plans.from_dict(raw)


# -- guided training -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guided_work(tmp_path_factory):
    from AutoSegLib.fileutil import read_json, write_json

    root = tmp_path_factory.mktemp("guided")
    dataset, work = root / "DS", root / "WORK"
    assert cli.main(["make-phantoms", str(dataset), "--cases", "4", "--seed", "2", "--events"]) == 0
    assert cli.main(["plan-and-preprocess", str(dataset), "-w", str(work), "-c", "3d_fullres", "--guidance", "on",
                     "--events"]) == 0
    plans = read_json(work / "plans.json")
    plans["configurations"]["3d_fullres"].update(TINY)
    write_json(work / "plans.json", plans)
    return dataset, work


def test_a_guided_network_trains_and_its_model_records_the_guidance(guided_work, monkeypatch):
    from AutoSegLib.fileutil import read_json
    from AutoSegLib.models.checkpoint import load_checkpoint
    from AutoSegLib.training.setup import TrainOptions, setup_run
    from AutoSegLib.training.trainer import Trainer

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    dataset, work = guided_work
    assert read_json(work / "plans.json")["configurations"]["3d_fullres"]["guidance"] == default_guidance()
    options = TrainOptions("3d_fullres", "all", preset="quick", epochs=2, iterations_per_epoch=4, device="cpu",
                           num_workers=0, overwrite=True)
    run = setup_run(dataset, work, options)
    try:
        with run.lock:
            trainer = Trainer(run)
            trainer.schedule = trainer.schedule.__class__(**{**trainer.schedule.to_dict(), "val_iterations": 1})
            trainer.fit()
    finally:
        torch.set_num_threads(before)
    n_foreground = len(run.foreground)
    assert run.n_input_channels == 1 + 2 * n_foreground
    assert trainer.guidance_counts["clicks"] > 0  # 8 steps of 2 samples, half guided on average
    model_plans = read_json(work / "model" / "plans.json")
    assert model_plans["configurations"]["3d_fullres"]["guidance"] == default_guidance()
    weights = load_checkpoint(work / "model" / "3d_fullres" / "fold_all" / "checkpoint_final.pt")["network_weights"]
    first = next(v for k, v in weights.items() if v.dim() == 5)
    assert first.shape[1] == 1 + 2 * n_foreground

    from AutoSegLib.inference import Predictor  # automatic prediction fills the click channels with zeros

    predictor = Predictor.from_model_dir(work / "model", folds=["all"], device="cpu", tta=False)
    assert predictor.guided
    image = np.zeros((20, 40, 40), np.float32)
    labels, _ = predictor.predict([image], Geometry.identity((2.0, 1.0, 1.0)))
    assert labels.shape == image.shape


def test_guidance_off_plans_plain_networks(guided_work, tmp_path):
    from AutoSegLib.fileutil import read_json

    dataset, _ = guided_work
    assert cli.main(["plan", str(dataset), "-w", str(tmp_path / "W"), "--guidance", "off", "--events"]) == 0
    configurations = read_json(tmp_path / "W" / "plans.json")["configurations"]
    assert all("guidance" not in c for c in configurations.values())


def test_guidance_auto_follows_the_device_and_says_why():
    from AutoSegLib.planning.guidance import guidance_decision

    assert guidance_decision("auto", "cuda")[0] and guidance_decision("auto", "mps")[0]
    enabled, reason = guidance_decision("auto", "cpu")
    assert not enabled and "no GPU" in reason and "--guidance on" in reason
    assert guidance_decision("on", "cpu")[0] and not guidance_decision("off", "cuda")[0]
    with pytest.raises(ValueError, match="--guidance 'yes'"):
        guidance_decision("yes", "cpu")
