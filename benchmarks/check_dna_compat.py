"""Check AutoSegLib's U-Nets against dynamic-network-architectures (DNA), the nnU-Net v2 networks.

Needs DNA and nnunetv2 installed (not an AutoSeg dependency), e.g. in a separate venv:

    PYTHONPATH=/path/to/AutoSeg /tmp/nnunet_venv/bin/python benchmarks/check_dna_compat.py \
        [--write-fixtures Testing/data]

Per plan, DNA's network is built the way nnU-Net v2 builds it (``get_network_from_plans``
with the class path and keyword arguments of an nnU-Net plans file), and ours with
``build_network``. Checked: state_dict keys, order and shapes; module paths and layer types;
DNA's weights loaded into ours with strict=True give the same outputs and gradients (train
and eval mode, deep supervision on and off); initialisation statistics. ``--write-fixtures``
stores DNA's layout and its outputs for formula weights (``AutoSegLib.network.reference``)
as ``dna_reference_<plan>.json``, which ``Testing/test_network.py`` checks without DNA.
Exit status 1 if anything differs.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib.metadata import version
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from AutoSegLib.network import build_network  # noqa: E402
from AutoSegLib.network.reference import (fill_deterministic, output_summary, reference_input,  # noqa: E402
                                          state_dict_layout)

TOLERANCE = 1e-4
PHANTOM = {"patch_size": [40, 96, 112], "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]],
           "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
           "features_per_stage": [32, 64, 128, 256, 320], "n_conv_per_stage_encoder": [2] * 5,
           "n_conv_per_stage_decoder": [2] * 4, "network": {"architecture": "PlainConvUNet"}}
TWO_D = {"patch_size": [256, 224], "strides": [[1, 1]] + [[2, 2]] * 5, "kernel_sizes": [[3, 3]] * 6,
         "features_per_stage": [32, 64, 128, 256, 512, 512], "n_conv_per_stage_encoder": [2] * 6,
         "n_conv_per_stage_decoder": [2] * 5, "network": {"architecture": "PlainConvUNet"}}
ANISO = {"patch_size": [16, 128, 128], "strides": [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]],
         "kernel_sizes": [[1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
         "features_per_stage": [32, 64, 128, 256, 320, 320], "n_conv_per_stage_encoder": [2, 2, 2, 3, 3, 3],
         "n_conv_per_stage_decoder": [1, 2, 2, 2, 2], "network": {"architecture": "PlainConvUNet"}}


def residual(config: dict, blocks: list[int]) -> dict:
    """The nnU-Net ResEnc preset shape: more blocks deeper down, one convolution per decoder stage."""
    return {**config, "n_conv_per_stage_encoder": blocks, "n_conv_per_stage_decoder": [1] * (len(blocks) - 1),
            "network": {"architecture": "ResidualEncoderUNet"}}


# name: (config, input channels, classes, input shape for the output check, stored as fixture)
PLANS = {
    "3d_plain": (PHANTOM, 1, 6, [1, 1, 8, 32, 32], True),
    "2d_plain": (TWO_D, 2, 6, [1, 2, 64, 64], True),
    "3d_residual": (residual(PHANTOM, [1, 3, 4, 6, 6]), 1, 6, [1, 1, 8, 32, 32], True),
    "2d_residual": (residual(TWO_D, [1, 3, 4, 6, 6, 6]), 1, 3, [2, 1, 64, 64], False),
    "3d_anisotropic_plain": (ANISO, 4, 3, [2, 4, 8, 64, 64], False),
}


def dna_network(config: dict, n_in: int, n_classes: int, deep_supervision: bool = True) -> torch.nn.Module:
    """DNA's network built as nnU-Net v2 builds it from a plans file."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    dims = len(config["patch_size"])
    residual_encoder = config["network"]["architecture"] == "ResidualEncoderUNet"
    kwargs = {"n_stages": len(config["strides"]), "features_per_stage": config["features_per_stage"],
              "conv_op": f"torch.nn.modules.conv.Conv{dims}d", "kernel_sizes": config["kernel_sizes"],
              "strides": config["strides"],
              ("n_blocks_per_stage" if residual_encoder else "n_conv_per_stage"): config["n_conv_per_stage_encoder"],
              "n_conv_per_stage_decoder": config["n_conv_per_stage_decoder"], "conv_bias": True,
              "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dims}d",
              "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
              "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
    arch = "ResidualEncoderUNet" if residual_encoder else "PlainConvUNet"
    return get_network_from_plans(f"dynamic_network_architectures.architectures.unet.{arch}", kwargs,
                                  ["conv_op", "norm_op", "dropout_op", "nonlin"], n_in, n_classes,
                                  allow_init=True, deep_supervision=deep_supervision)


def leaf_types(net: torch.nn.Module) -> list[tuple[str, str]]:
    return [(name, type(m).__name__) for name, m in net.named_modules() if not list(m.children())]


def max_difference(a, b) -> float:
    a, b = (a if isinstance(a, list) else [a]), (b if isinstance(b, list) else [b])
    assert [x.shape for x in a] == [y.shape for y in b], "output shapes differ"
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def compare_outputs(dna, ours, shape: list[int]) -> dict:
    """Outputs and input gradients with identical weights, in each mode."""
    ours.load_state_dict(dna.state_dict(), strict=True)
    result = {}
    for train in (True, False):
        for ds in (True, False):
            dna.train(train), ours.train(train)
            dna.decoder.deep_supervision, ours.deep_supervision = ds, ds
            x = torch.randn(2, *shape[1:])
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            out_a, out_b = dna(xa), ours(xb)
            loss = lambda out: sum((o * o).mean() for o in (out if isinstance(out, list) else [out]))  # noqa: E731
            loss(out_a).backward(), loss(out_b).backward()
            key = f"{'train' if train else 'eval'}, deep supervision {'on' if ds else 'off'}"
            result[key] = (max_difference(out_a, out_b), max_difference(xa.grad, xb.grad))
    return result


def init_statistics(dna, ours) -> tuple[float, float, bool]:
    """Range of per-tensor std ratios (ours / DNA) over conv weights; same all-zero tensors."""
    a, b = dict(dna.named_parameters()), dict(ours.named_parameters())
    ratios = [b[k].std().item() / a[k].std().item() for k in a if a[k].dim() > 1 and a[k].numel() > 1000]
    zeros_match = all((a[k].abs().sum() == 0) == (b[k].abs().sum() == 0) for k in a)
    return min(ratios), max(ratios), zeros_match


def fixture(name: str, config: dict, n_in: int, n_classes: int, shape: list[int]) -> dict:
    """DNA's layout and its outputs for formula weights and input.

    In float64: a 4-voxel instance norm in the bottleneck amplifies float32 rounding (which
    differs between oneDNN and native kernels) to ~1e-2 in the deepest heads.
    """
    dna = dna_network(config, n_in, n_classes).double().eval()
    fill_deterministic(dna)
    with torch.no_grad():
        outputs = dna(reference_input(shape, torch.float64))
    return {"plan": name, "dtype": "float64", "config": config, "n_input_channels": n_in, "n_classes": n_classes,
            "generated_with": {"dynamic_network_architectures": version("dynamic_network_architectures"),
                               "nnunetv2": version("nnunetv2"), "torch": torch.__version__},
            "n_parameters": sum(p.numel() for p in dna.parameters()),
            "state_dict": state_dict_layout(dna), "input_shape": shape, "outputs": output_summary(outputs)}


def to_json(record: dict) -> str:
    """One line per top-level value and per list entry: readable diffs when DNA changes."""
    lines = []
    for key, value in record.items():
        if isinstance(value, list) and value and isinstance(value[0], (list, dict)):
            entries = ",\n  ".join(json.dumps(v) for v in value)
            lines.append(f" {json.dumps(key)}: [\n  {entries}\n ]")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def write_fixtures(folder: Path) -> None:
    for name, (config, n_in, n_classes, shape, store) in PLANS.items():
        if store:
            path = folder / f"dna_reference_{name}.json"
            path.write_text(to_json(fixture(name, config, n_in, n_classes, shape)))
            print(f"wrote {path}")


def check_plan(name: str, config: dict, n_in: int, n_classes: int, shape: list[int]) -> bool:
    torch.manual_seed(0)
    dna, ours = dna_network(config, n_in, n_classes), build_network(config, n_in, n_classes)
    keys_ok = state_dict_layout(dna) == state_dict_layout(ours)
    leaves_ok = leaf_types(dna) == leaf_types(ours)
    low, high, zeros_ok = init_statistics(dna, ours)
    diffs = compare_outputs(dna, ours, shape)
    worst = max(max(d) for d in diffs.values())
    print(f"\n{name}: {config['network']['architecture']}, {len(config['strides'])} stages, "
          f"{n_in} in, {n_classes} classes, {sum(p.numel() for p in ours.parameters()):,} parameters")
    print(f"  state_dict keys, order and shapes equal: {keys_ok} ({len(ours.state_dict())} entries)")
    print(f"  module paths and layer types equal:      {leaves_ok}")
    print(f"  init: conv weight std ours/DNA {low:.3f}-{high:.3f}; same zero-initialised tensors: {zeros_ok}")
    for mode, (out, grad) in diffs.items():
        print(f"  DNA weights, {mode:31s} max |output diff| {out:.2e}, max |input grad diff| {grad:.2e}")
    return keys_ok and leaves_ok and zeros_ok and 0.8 < low and high < 1.25 and worst < TOLERANCE


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-fixtures", type=Path, help="folder for dna_reference_<plan>.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"DNA {version('dynamic_network_architectures')}, nnunetv2 {version('nnunetv2')}, "
          f"torch {torch.__version__}")
    ok = all([check_plan(name, *spec[:4]) for name, spec in PLANS.items()])
    if args.write_fixtures:
        write_fixtures(args.write_fixtures)
    print("\nRESULT:", "compatible" if ok else "DIFFERENCES FOUND")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
