"""The U-Net from a plans configuration: shapes, deep supervision, DNA layout, refusals.

The DNA fixtures (Testing/data/dna_reference_*.json) come from dynamic-network-architectures
itself via benchmarks/check_dna_compat.py, so these tests check nnU-Net v2 weight
compatibility without DNA installed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from AutoSegLib.network import ARCHITECTURES, NetworkConfigError, build_network, count_parameters
from AutoSegLib.network.blocks import InstanceNorm
from AutoSegLib.network.layout import inference_memory_format
from AutoSegLib.network.reference import fill_deterministic, output_summary, reference_input, state_dict_layout
from AutoSegLib.planning import plan

DATA = Path(__file__).parent / "data"
# Designs with one head per decoder stage (the blueprint's outputs); U-Net++ and Swin-UNETR have
# their own output contracts, tested in Testing/test_network_family.py with every design.
STAGE_HEAD_DESIGNS = [a for a in ARCHITECTURES if a not in ("UNetPlusPlus", "SwinUNETR")]
DNA_DESIGNS = ["PlainConvUNet", "ResidualEncoderUNet", "ConvSkipUNet"]
FIXTURES = sorted(DATA.glob("dna_reference_*.json"))


def config_3d(architecture="PlainConvUNet", features=(4, 8, 16, 16), n_conv=(2, 2, 2, 2)) -> dict:
    """A small anisotropic plan: in-plane-only first downsampling and 1x3x3 first kernel."""
    n = len(features)
    return {"patch_size": [8, 32, 32], "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]][:n],
            "kernel_sizes": [[1, 3, 3]] + [[3, 3, 3]] * (n - 1), "features_per_stage": list(features),
            "n_conv_per_stage_encoder": list(n_conv), "n_conv_per_stage_decoder": [2] * (n - 1),
            "network": {"architecture": architecture}}


def config_2d(architecture="PlainConvUNet") -> dict:
    return {"patch_size": [24, 40], "strides": [[1, 1], [2, 2], [2, 2], [1, 2]],
            "kernel_sizes": [[3, 3]] * 4, "features_per_stage": [4, 8, 16, 16],
            "n_conv_per_stage_encoder": [2, 2, 2, 2], "n_conv_per_stage_decoder": [2, 2, 2],
            "network": {"architecture": architecture}}


def shapes(outputs) -> list[tuple[int, ...]]:
    return [tuple(o.shape) for o in outputs]


# -- shapes and deep supervision ------------------------------------------------------------
@pytest.mark.parametrize("architecture", STAGE_HEAD_DESIGNS)
def test_3d_heads_halve_per_stride_highest_resolution_first(architecture):
    net = build_network(config_3d(architecture), n_input_channels=2, n_classes=6)
    out = net(torch.zeros(2, 2, 8, 32, 32))
    # Strides (1,2,2), (2,2,2), (2,2,2); one head per decoder stage = n_stages - 1.
    assert shapes(out) == [(2, 6, 8, 32, 32), (2, 6, 8, 16, 16), (2, 6, 4, 8, 8)]


@pytest.mark.parametrize("architecture", STAGE_HEAD_DESIGNS)
def test_2d_heads_follow_anisotropic_strides(architecture):
    net = build_network(config_2d(architecture), n_input_channels=1, n_classes=3)
    out = net(torch.zeros(2, 1, 24, 40))
    assert [type(o) for o in out] == [torch.Tensor] * 3
    assert shapes(out) == [(2, 3, 24, 40), (2, 3, 12, 20), (2, 3, 6, 10)]


def test_without_deep_supervision_one_full_resolution_tensor():
    net = build_network(config_3d(), 1, 4, deep_supervision=False)
    out = net(torch.zeros(2, 1, 8, 32, 32))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 4, 8, 32, 32)


def test_deep_supervision_switches_at_runtime_and_keeps_weights():
    net = build_network(config_3d(), 1, 4).eval()
    x = reference_input([2, 1, 8, 32, 32])
    with torch.no_grad():
        full_res_head = net(x)[0]
        net.deep_supervision = False
        assert net.decoder.deep_supervision is False  # DNA's switch, which nnU-Net code sets
        assert torch.equal(net(x), full_res_head)
        net.decoder.deep_supervision = True
        assert len(net(x)) == 3


@pytest.mark.parametrize("architecture", DNA_DESIGNS)
def test_backward_reaches_every_parameter(architecture):
    net = build_network(config_3d(architecture), 1, 3)
    out = net(reference_input([2, 1, 8, 32, 32]))
    sum(o.square().mean() for o in out).backward()
    # Every head is in the loss, so every parameter gets a gradient (some are exactly zero at
    # initialisation: conv biases before an instance norm, convs before a zeroed norm).
    assert [name for name, p in net.named_parameters() if p.grad is None] == []
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())
    assert net.encoder.stages[0][0].convs[0].conv.weight.grad.abs().sum() > 0 if architecture != \
        "ResidualEncoderUNet" else net.encoder.stem.convs[0].conv.weight.grad.abs().sum() > 0


def test_eval_forward_is_deterministic():
    net = build_network(config_3d(), 1, 3).eval()
    x = reference_input([2, 1, 8, 32, 32])
    with torch.no_grad():
        first, second = net(x), net(x)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# -- instance norm as a one-channel-per-group group norm -------------------------------------
@pytest.mark.parametrize("dims", [2, 3])
def test_instance_norm_equals_torchs_instance_norm_with_the_same_parameters(dims):
    ours = InstanceNorm(5)
    torchs = (torch.nn.InstanceNorm2d if dims == 2 else torch.nn.InstanceNorm3d)(5, eps=1e-5, affine=True)
    assert list(ours.state_dict()) == list(torchs.state_dict()) == ["weight", "bias"]
    with torch.no_grad():
        torchs.weight.copy_(torch.linspace(0.5, 1.5, 5))
        torchs.bias.copy_(torch.linspace(-0.2, 0.3, 5))
    ours.load_state_dict(torchs.state_dict())
    x = reference_input([3, 5] + [6, 7, 9][-dims:]) * 4 + 2  # per-sample, per-channel statistics
    assert torch.allclose(ours(x), torchs(x), atol=1e-5)


def test_network_gives_the_same_logits_in_channels_last_layout():
    torch.manual_seed(0)
    net = build_network(config_3d(), 1, 3, deep_supervision=False).eval()
    x = reference_input([2, 1, 8, 32, 32])
    with torch.no_grad():
        contiguous = net(x)
        net.to(memory_format=torch.channels_last_3d)
        channels_last = net(x.to(memory_format=torch.channels_last_3d))
    assert torch.allclose(contiguous, channels_last, atol=1e-4)


def test_inference_layout_is_channels_last_only_for_3d_on_the_cpu():
    assert inference_memory_format(3, "cpu") == torch.channels_last_3d
    assert inference_memory_format(2, "cpu") == torch.contiguous_format
    assert inference_memory_format(3, "cuda") == torch.contiguous_format


# -- compatibility with dynamic-network-architectures ----------------------------------------
def test_fixtures_are_present():
    assert {p.stem for p in FIXTURES} >= {"dna_reference_3d_plain", "dna_reference_2d_plain",
                                          "dna_reference_3d_residual"}


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_state_dict_and_outputs_equal_dna(path):
    ref = json.loads(path.read_text())
    net = build_network(ref["config"], ref["n_input_channels"], ref["n_classes"])
    assert state_dict_layout(net) == ref["state_dict"]
    assert count_parameters(net) == ref["n_parameters"]
    net = net.double().eval()
    fill_deterministic(net)
    with torch.no_grad():
        ours = output_summary(net(reference_input(ref["input_shape"], torch.float64)))
    assert [o["shape"] for o in ours] == [o["shape"] for o in ref["outputs"]]
    # float64, so other torch versions and CPUs agree far below any layout error's effect.
    for mine, theirs in zip(ours, ref["outputs"]):
        for key in ("sum", "abs_sum"):
            assert mine[key] == pytest.approx(theirs[key], abs=1e-8 * theirs["abs_sum"])
        assert mine["samples"] == pytest.approx(theirs["samples"], abs=1e-8)


def test_conv_skip_keeps_every_plain_key_and_adds_skip_convs():
    plain = build_network(config_3d(), 1, 3)
    conv_skip = build_network(config_3d("ConvSkipUNet"), 1, 3)
    result = conv_skip.load_state_dict(plain.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(k.startswith("decoder.skip_convs.") for k in result.missing_keys)


def test_shared_encoder_weights_are_counted_and_stored_once():
    net = build_network(config_3d(), 1, 3)
    state = net.state_dict()
    assert state["decoder.encoder.stages.0.0.convs.0.conv.weight"].data_ptr() == \
        state["encoder.stages.0.0.convs.0.conv.weight"].data_ptr()
    unique = {p.data_ptr(): p.numel() for p in state.values()}
    assert count_parameters(net) == sum(unique.values())


# -- initialisation --------------------------------------------------------------------------
def test_he_initialisation_and_zero_biases():
    torch.manual_seed(0)
    net = build_network(config_3d(features=(32, 64, 64, 64)), 1, 3)
    conv = net.encoder.stages[2][0].convs[1].conv  # 64 -> 64, 3x3x3: fan-in 1728
    expected_std = math.sqrt(2.0 / (1 + 0.01 ** 2) / (64 * 27))
    assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.03)
    biases = [p for name, p in net.named_parameters() if name.endswith("conv.bias") or "seg_layers" in name
              and name.endswith("bias")]
    assert biases and all(torch.count_nonzero(b) == 0 for b in biases)


def test_residual_blocks_start_as_their_shortcut():
    net = build_network(config_3d("ResidualEncoderUNet", n_conv=(1, 2, 2, 2)), 1, 3)
    block = net.encoder.stages[1].blocks[1]
    assert torch.count_nonzero(block.conv2.norm.weight) == 0 and torch.count_nonzero(block.conv2.norm.bias) == 0
    assert torch.count_nonzero(block.conv1.norm.weight) == block.conv1.norm.weight.numel()


# -- refusals --------------------------------------------------------------------------------
def test_unknown_architecture_refused_with_allowed_list():
    config = config_3d()
    config["network"] = {"architecture": "os.system"}
    with pytest.raises(NetworkConfigError, match="'os.system'.*PlainConvUNet, ResidualEncoderUNet, ConvSkipUNet"):
        build_network(config, 1, 2)


@pytest.mark.parametrize("change, message", [
    ({"network": {"architecture": "PlainConvUNet", "norm": "BatchNorm"}}, "norm 'BatchNorm'.*'InstanceNorm'"),
    ({"n_conv_per_stage_decoder": [2, 2, 2, 2]}, r"'n_conv_per_stage_decoder': 4"),
    ({"features_per_stage": [4, 8, 16]}, r"'features_per_stage': 3"),
    ({"kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 2, 3], [3, 3, 3]]}, r"must be odd"),
    ({"strides": [[1, 1, 1], [1, 2, 2], [2, 2], [2, 2, 2]]}, r"3 positive integers"),
    ({"patch_size": [8, 30, 32]}, r"not divisible by the total stride \[4, 8, 8\]"),
    ({"patch_size": [8, 32, 32, 32]}, r"2 or 3 entries"),
])
def test_inconsistent_configuration_refused(change, message):
    with pytest.raises(NetworkConfigError, match=message):
        build_network({**config_3d(), **change}, 1, 2)


def test_missing_key_refused():
    config = config_3d()
    del config["kernel_sizes"]
    with pytest.raises(NetworkConfigError, match="kernel_sizes"):
        build_network(config, 1, 2)


# -- from the planner ------------------------------------------------------------------------
def test_every_planned_configuration_builds_and_runs():
    # Thick slices: the 3D plan starts with 1x3x3 kernels and in-plane-only downsampling.
    fingerprint = {"spacings": [[3.0, 0.8, 0.8]] * 4, "shapes_after_crop": [[24, 64, 64]] * 4,
                   "foreground_intensity_properties_per_channel": {}, "median_relative_size_after_cropping": 1.0}
    plans = plan(fingerprint, {0: "MRI"}, {"background": 0, "a": 1, "b": 2}).to_dict()
    for name, config in plans["configurations"].items():
        net = build_network(config, 1, 3).eval()
        # The smallest input the strides divide with a 2-voxel bottleneck (instance norm needs 2).
        size = [2 * math.prod(s[a] for s in config["strides"]) for a in range(len(config["patch_size"]))]
        with torch.no_grad():
            out = net(torch.zeros(2, 1, *size))
        assert len(out) == len(config["strides"]) - 1 and out[0].shape[2:] == tuple(size), name
