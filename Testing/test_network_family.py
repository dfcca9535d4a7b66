"""Every design of the registry (docs/architectures.md): shapes, deep supervision, 2D and 3D,
checkpoints, U-Net++'s pruning, Swin-UNETR's patch rule and optional import, FLOP counts.

Networks have 4-8 features so each check takes milliseconds (Swin-UNETR: its smallest MONAI
width, 12). Exact expectations everywhere; float comparisons state their tolerance.
"""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch

from AutoSegLib import names
from AutoSegLib.network import ARCHITECTURES, NetworkConfigError, build_network, count_parameters
from AutoSegLib.network.cost import network_cost
from AutoSegLib.network.reference import reference_input
from AutoSegLib.planning import plan
from AutoSegLib.planning.architectures import configure_for_architecture, plans_for_architecture, swin_patch
from AutoSegLib.planning.validate import network_problems
from AutoSegLib.training.loss import DeepSupervisionLoss, DiceCELoss, matching_targets

pytest.importorskip("monai")  # the CI installs the test extra, which holds MONAI

NESTED = "UNetPlusPlus"
SWIN = "SwinUNETR"
CONV_DESIGNS = [a for a in ARCHITECTURES if a != SWIN]


def config(architecture: str, patch=(6, 20, 36), dims: int = 3) -> dict:
    """Three stages, anisotropic first step and kernel; the patch gives odd sizes at every stage."""
    if dims == 2:
        strides, kernels = [[1, 1], [2, 2], [2, 1]], [[3, 3]] * 3
    else:
        strides, kernels = [[1, 1, 1], [1, 2, 2], [2, 2, 2]], [[1, 3, 3], [3, 3, 3], [3, 3, 3]]
    return {"patch_size": list(patch), "strides": strides, "kernel_sizes": kernels, "features_per_stage": [4, 8, 8],
            "n_conv_per_stage_encoder": [2, 2, 2], "n_conv_per_stage_decoder": [2, 2],
            "network": {"architecture": architecture}}


def expected_heads(architecture: str, batch: int, classes: int, patch) -> list[tuple]:
    full = (batch, classes, *patch)
    if architecture == NESTED:  # X(0, 2) then X(0, 1), both at full resolution
        return [full, full]
    if architecture == SWIN:
        return [full]
    half = [p // s for p, s in zip(patch, [1, 2, 2] if len(patch) == 3 else [2, 2])]
    return [full, (batch, classes, *half)]


def test_registry_lists_names_designs_in_order():
    assert tuple(ARCHITECTURES) == names.ARCHITECTURES
    assert len(set(names.ARCHITECTURES)) == 11


# -- shapes, deep supervision, gradients ---------------------------------------------------
@pytest.mark.parametrize("architecture", CONV_DESIGNS)
def test_3d_odd_sizes_deep_supervision_and_gradients(architecture):
    torch.manual_seed(0)
    net = build_network(config(architecture), n_input_channels=2, n_classes=3)
    out = net(reference_input([2, 2, 6, 20, 36]))  # stage sizes 6x20x36, 6x10x18, 3x5x9
    assert [tuple(o.shape) for o in out] == expected_heads(architecture, 2, 3, (6, 20, 36))
    sum(o.square().mean() for o in out).backward()
    assert [n for n, p in net.named_parameters() if p.grad is None] == []
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_2d(architecture):
    patch = (64, 32) if architecture == SWIN else (12, 10)
    net = build_network(config(architecture, patch, dims=2), 1, 2).eval()
    with torch.no_grad():
        out = net(reference_input([1, 1, *patch]))
    expected = expected_heads(architecture, 1, 2, patch)
    if architecture not in (NESTED, SWIN):
        expected[1] = (1, 2, patch[0] // 2, patch[1] // 2)
    assert [tuple(o.shape) for o in out] == expected


@pytest.mark.parametrize("architecture", CONV_DESIGNS)
def test_without_deep_supervision_the_full_resolution_head(architecture):
    net = build_network(config(architecture), 1, 3).eval()
    x = reference_input([1, 1, 6, 20, 36])
    with torch.no_grad():
        heads = net(x)
        net.deep_supervision = False
        single = net(x)
    assert isinstance(single, torch.Tensor) and single.shape == (1, 3, 6, 20, 36)
    assert torch.allclose(single, heads[0], atol=1e-6)  # the deepest U-Net++ head: full depth by default


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_own_checkpoint_loads_with_weights_only(architecture):
    # Swin-UNETR in 2D: its smallest 3D network costs seconds here, and the state_dict logic is the same
    patch, dims = ((64, 32), 2) if architecture == SWIN else ((6, 20, 36), 3)
    torch.manual_seed(1)
    trained = build_network(config(architecture, patch, dims), 1, 2, deep_supervision=False).eval()
    buffer = io.BytesIO()
    torch.save({"network_weights": trained.state_dict()}, buffer)
    buffer.seek(0)
    torch.manual_seed(2)
    fresh = build_network(config(architecture, patch, dims), 1, 2, deep_supervision=False).eval()
    fresh.load_state_dict(torch.load(buffer, weights_only=True)["network_weights"])
    x = reference_input([1, 1, *patch])
    with torch.no_grad():
        assert torch.equal(fresh(x), trained(x))


def test_swin_unetr_trains_a_step_with_one_supervised_output():
    net = build_network(config(SWIN, (64, 32), dims=2), 1, 3)
    assert net.supervision_weights == [1.0]
    out = net(reference_input([2, 1, 64, 32]))
    assert [tuple(o.shape) for o in out] == [(2, 3, 64, 32)]
    target = torch.zeros(2, 1, 64, 32, dtype=torch.long)
    loss = DeepSupervisionLoss(DiceCELoss(batch_dice=False), net.supervision_weights)(out, [target, target[:, :, ::2, ::2]])
    loss.backward()
    assert torch.isfinite(loss) and net.net.out.conv.conv.weight.grad.abs().sum() > 0


# -- design details --------------------------------------------------------------------------
def test_unet_plus_plus_prunes_to_the_chosen_depth_and_skips_deeper_stages():
    net = build_network(config(NESTED), 1, 2).eval()
    assert net.supervision_weights == [0.5, 0.5]
    calls = []
    net.encoder.stages[2].register_forward_hook(lambda *a: calls.append("bottleneck"))
    net.deep_supervision = False
    net.inference_depth = 1
    with torch.no_grad():
        out = net(reference_input([1, 1, 6, 20, 36]))
    assert out.shape == (1, 2, 6, 20, 36) and calls == []
    net.inference_depth = 2
    with torch.no_grad():
        net(reference_input([1, 1, 6, 20, 36]))
    assert calls == ["bottleneck"]
    with pytest.raises(ValueError, match="from 1 to 2"):
        net.inference_depth = 3


def test_inference_depth_from_the_plan_and_refused_elsewhere():
    plan_config = config(NESTED)
    plan_config["network"]["inference_depth"] = 1
    assert build_network(plan_config, 1, 2).inference_depth == 1
    plan_config["network"]["inference_depth"] = 5
    with pytest.raises(NetworkConfigError, match="inference_depth 5 must be an integer from 1 to 2"):
        build_network(plan_config, 1, 2)
    other = config("PlainConvUNet")
    other["network"]["inference_depth"] = 1
    with pytest.raises(NetworkConfigError, match="UNetPlusPlus option"):
        build_network(other, 1, 2)
    assert network_problems("c.network", other["network"]) != []
    assert network_problems("c.network", plan_config["network"] | {"inference_depth": 1}) == []


def test_attention_only_on_the_coarse_skips():
    deep = config("AttentionSkipUNet")
    deep.update(strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [1, 2, 2]], kernel_sizes=[[3, 3, 3]] * 4,
                features_per_stage=[4, 8, 8, 8], n_conv_per_stage_encoder=[2] * 4, n_conv_per_stage_decoder=[2] * 3,
                patch_size=[4, 16, 16])
    net = build_network(deep, 1, 2)
    assert net.decoder.attention == [True, True, False]  # coarsest two of three skips


def test_attention_keys_are_pooled_to_a_bounded_count():
    from AutoSegLib.network.family_blocks import ATTENTION_MAX_KEYS, pooled_size

    assert pooled_size([12, 24, 28], 512) == [6, 12, 7]  # 8,064 skip voxels -> 504 keys
    assert pooled_size([4, 8, 8], 512) == [4, 8, 8]  # small skips attend unpooled
    assert ATTENTION_MAX_KEYS == 512


def test_swin_patch_rule_and_refusal():
    assert swin_patch([20, 48, 56], [[1, 1, 1], [2, 2, 2]]) == [32, 64, 64]
    assert swin_patch([24, 30], [[1, 1], [2, 2]]) == [32, 64]  # all 32: the longest doubles
    assert swin_patch([40, 100], [[1, 1], [1, 64]]) == [32, 128]  # a multiple of the total stride too
    with pytest.raises(NetworkConfigError, match=r"divisible by 32, got patch_size \[6, 20, 36\]"):
        build_network(config(SWIN), 1, 2)


def test_missing_monai_is_one_line_with_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "monai", None)
    monkeypatch.setitem(sys.modules, "monai.networks.nets", None)
    with pytest.raises(ImportError, match=r"^Swin-UNETR needs MONAI: pip install 'autoseg\[monai\]'$"):
        build_network(config(SWIN, (32, 32, 64)), 1, 2)


def test_planner_records_the_design_and_rounds_only_swins_patch():
    fingerprint = {"spacings": [[1.0, 1.0, 1.0]] * 4, "shapes_after_crop": [[24, 40, 56]] * 4,
                   "foreground_intensity_properties_per_channel": {}, "median_relative_size_after_cropping": 1.0}
    base = plan(fingerprint, {0: "MRI"}, {"background": 0, "a": 1}).to_dict()
    swin = plan(fingerprint, {0: "MRI"}, {"background": 0, "a": 1}, architecture=SWIN).to_dict()
    for name, config_ in swin["configurations"].items():
        assert config_["network"]["architecture"] == SWIN
        assert all(p % 32 == 0 for p in config_["patch_size"]), name
        assert "rounded" in config_["explanation"][-1]["text"]
        unchanged = {k: v for k, v in config_.items() if k not in ("patch_size", "network", "explanation")}
        assert unchanged == {k: v for k, v in base["configurations"][name].items() if k in unchanged}
    nested = plans_for_architecture(base, NESTED)
    for name, config_ in nested["configurations"].items():
        assert config_ == {**base["configurations"][name], "network": {**base["configurations"][name]["network"],
                                                                         "architecture": NESTED}}
    assert configure_for_architecture(base["configurations"]["3d_fullres"], "PlainConvUNet") == \
        base["configurations"]["3d_fullres"]


def test_plan_explain_states_the_design_and_its_cost(tmp_path, capsys):
    from AutoSegLib import cli

    stats = {"mean": 100.0, "std": 20.0, "percentile_00_5": 10.0, "percentile_99_5": 190.0, "median": 100.0,
             "min": 0.0, "max": 200.0}
    fingerprint = {"spacings": [[2.0, 1.0, 1.0]] * 4, "shapes_after_crop": [[30, 60, 70]] * 4,
                   "foreground_intensity_properties_per_channel": {"0": stats},
                   "median_relative_size_after_cropping": 1.0}
    (tmp_path / "fp.json").write_text(json.dumps(fingerprint))
    argv = ["plan", "--fingerprint", str(tmp_path / "fp.json"), "--channels", "MRI", "--num-labels", "2",
            "-o", str(tmp_path / "plans.json"), "--explain", "--architecture", NESTED]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "Network variant UNetPlusPlus" in text and "Network cost" in text and "3d_cpu: UNetPlusPlus, " in text
    plans = json.loads((tmp_path / "plans.json").read_text())
    assert {c["network"]["architecture"] for c in plans["configurations"].values()} == {NESTED}


def test_swin_unetr_cost_is_counted_though_monai_needs_real_tensors_to_build():
    cost = network_cost(config(SWIN, (64, 32), dims=2), 1, 2)
    assert cost["architecture"] == SWIN and cost["parameters"] > 1e6 and cost["gflop"] > 0


# -- the loss and the cost -------------------------------------------------------------------
def test_targets_are_matched_by_shape():
    full, half = torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 2, 2)
    outputs = [torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4)]
    assert [t is full for t in matching_targets(outputs, [full, half])] == [True, True]
    assert matching_targets([torch.zeros(1, 2, 2, 2)], [full, half])[0] is half
    with pytest.raises(ValueError, match=r"output 0 of shape \(3, 3\) has no target"):
        matching_targets([torch.zeros(1, 2, 3, 3)], [full, half])


def test_flops_and_parameters_of_a_hand_counted_network():
    # 2 stages (2, 4 features), 3x3 kernels, one 4x4 input channel, 2 classes. Multiply-adds:
    # encoder 16*2*1*9 + 16*2*2*9 + 4*4*2*9 + 4*4*4*9 = 1728; transposed conv 4*4*2*4 = 128;
    # decoder 16*2*4*9 + 16*2*2*9 = 1728; head 16*2*2 = 64. FLOPs = 2 * 3648.
    tiny = {"patch_size": [4, 4], "strides": [[1, 1], [2, 2]], "kernel_sizes": [[3, 3]] * 2,
            "features_per_stage": [2, 4], "n_conv_per_stage_encoder": [2, 2], "n_conv_per_stage_decoder": [2],
            "network": {"architecture": "PlainConvUNet"}}
    cost = network_cost(tiny, 1, 2)
    assert cost["gflop"] * 1e9 == pytest.approx(7296, abs=0.5)
    assert cost["parameters"] == count_parameters(build_network(tiny, 1, 2))


def test_costs_order_as_the_designs_do():
    costs = {a: network_cost(config(a), 1, 2)["gflop"] for a in ("PlainConvUNet", "HalfUNet", NESTED)}
    assert costs["HalfUNet"] < costs["PlainConvUNet"] < costs[NESTED]
