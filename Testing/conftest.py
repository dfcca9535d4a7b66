"""Shared fixtures: tiny datasets built in code, so every test states its own data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from AutoSegLib.imageio import Geometry, write_image

# A network small enough to train in seconds, laid over a phantom plan's configuration
# (``plans["configurations"][name].update(TINY)``): patch 16x32x32, 3 stages of 4-16 features.
TINY = {"patch_size": [16, 32, 32], "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]], "kernel_sizes": [[3, 3, 3]] * 3,
        "features_per_stage": [4, 8, 16], "n_conv_per_stage_encoder": [1, 1, 1], "n_conv_per_stage_decoder": [1, 1],
        "batch_size": 2}


def write_dataset(root: Path, cases: dict[str, tuple[list[np.ndarray], np.ndarray]],
                  geometry: Geometry | None = None, channel_names=None, labels=None,
                  ending: str = ".nii.gz") -> Path:
    """Write a dataset folder in the nnU-Net v2 layout from arrays; returns its path."""
    geometry = geometry or Geometry((2.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    channel_names = channel_names or {"0": "CT"}
    labels = labels or {"background": 0, "organ": 1}
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    for case_id, (channels, label) in cases.items():
        for c, image in enumerate(channels):
            write_image(image, geometry, root / "imagesTr" / f"{case_id}_{c:04d}{ending}")
        write_image(label, geometry, root / "labelsTr" / f"{case_id}{ending}")
    spec = {"channel_names": channel_names, "labels": labels, "numTraining": len(cases), "file_ending": ending}
    (root / "dataset.json").write_text(json.dumps(spec))
    return root


def box_case(shape=(6, 10, 12), box=((1, 5), (2, 8), (3, 9)), value=100, seed=0):
    """A CT-like case: noisy body, one labelled box of brighter tissue."""
    rng = np.random.default_rng(seed)
    image = (rng.normal(0, 5, shape) + 40).astype(np.int16)
    label = np.zeros(shape, np.uint8)
    sl = tuple(slice(a, b) for a, b in box)
    label[sl] = 1
    image[sl] += value
    return [image], label


@pytest.fixture
def tiny_dataset(tmp_path) -> Path:
    cases = {f"case_{i}": box_case(seed=i) for i in range(3)}
    return write_dataset(tmp_path / "Dataset001_Tiny", cases)
