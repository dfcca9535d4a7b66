"""MR appearance: tissue map -> multi-contrast magnitude images on an arbitrary scale.

Each channel is a contrast (T1, T2, FLAIR, PD, then generic mixtures) with a relative
signal per tissue, chosen so the channels disagree in the ways radiologists rely on: fluid
(lesions, gallbladder, stomach, CSF) is dark on T1 and bright on T2, the liver is brighter
than the spleen on T1 and darker on T2, flowing blood is a void. Per case, every tissue
signal is jittered, each channel gets its own arbitrary scanner scale, and all channels
share one smooth multiplicative receive-coil bias field (with a small per-channel
variation), a low-order polynomial of world position whose log spans ~+-25-40%. Noise is
Rician, as in magnitude images, so air is dark but never exactly zero. Stored as uint16.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from AutoSegLib.synthetic.anatomy import Tissue
from AutoSegLib.synthetic.grid import Grid
from AutoSegLib.synthetic.render import Rendering

BASE_CHANNELS = ("T1", "T2", "FLAIR", "PD")

# Relative signal per tissue for T1, T2, FLAIR, PD (1.0 ~ fat on T1).
_SIGNAL = {
    Tissue.AIR: (0.0, 0.0, 0.0, 0.0),
    Tissue.FAT: (0.95, 0.75, 0.65, 0.85),
    Tissue.MUSCLE: (0.35, 0.18, 0.25, 0.45),
    Tissue.BOWEL: (0.40, 0.45, 0.35, 0.55),
    Tissue.GAS: (0.0, 0.0, 0.0, 0.0),
    Tissue.BONE: (0.05, 0.04, 0.05, 0.08),
    Tissue.MARROW: (0.75, 0.55, 0.50, 0.70),
    Tissue.DISC: (0.35, 0.60, 0.30, 0.60),
    Tissue.CSF: (0.12, 0.95, 0.08, 0.80),
    Tissue.ARTERY: (0.08, 0.06, 0.08, 0.10),
    Tissue.VEIN: (0.25, 0.30, 0.20, 0.35),
    Tissue.LIVER: (0.62, 0.22, 0.35, 0.55),
    Tissue.SPLEEN: (0.45, 0.45, 0.42, 0.65),
    Tissue.KIDNEY: (0.42, 0.55, 0.40, 0.70),
    Tissue.LESION: (0.15, 0.90, 0.20, 0.75),
    Tissue.BILE: (0.18, 0.92, 0.12, 0.80),
    Tissue.FLUID: (0.15, 0.85, 0.15, 0.75),
}
_BIAS_SCALE_MM = 80.0


def channel_names(channels: int) -> tuple[str, ...]:
    """Names of the first ``channels`` MR contrasts: T1, T2, FLAIR, PD, then MR4, MR5, ..."""
    return tuple(BASE_CHANNELS[:channels]) + tuple(f"MR{c}" for c in range(len(BASE_CHANNELS), channels))


def signal_table(channels: int) -> np.ndarray:
    """(tissues, channels) relative signals; extra channels are fixed mixtures of the base four.

    Extra channels depend only on their index, so channel c means the same contrast in
    every case and every dataset.
    """
    base = np.array([_SIGNAL[t] for t in Tissue])
    extra = [base @ np.random.default_rng(c).dirichlet(np.ones(len(BASE_CHANNELS)) * 0.5)
             for c in range(len(BASE_CHANNELS), channels)]
    return np.column_stack([base[:, :channels], *extra]) if extra else base[:, :channels]


def bias_field(grid: Grid, rng: np.random.Generator) -> np.ndarray:
    """Smooth positive multiplicative field on ``grid`` (float32, geometric mean 1)."""
    p = grid.points()
    centre = np.array(grid.geometry.origin) + grid.index_matrix @ ((np.array(grid.shape[::-1]) - 1) / 2)
    u = [(p[c] - np.float32(centre[c])) * np.float32(1 / _BIAS_SCALE_MM) for c in range(3)]
    linear, quadratic = rng.normal(size=3), rng.normal(size=(3, 3))
    log_bias = sum(np.float32(linear[c]) * u[c] for c in range(3))
    log_bias += sum(np.float32(quadratic[a, b] * 0.5) * u[a] * u[b] for a in range(3) for b in range(a, 3))
    log_bias -= log_bias.mean()
    log_bias *= np.float32(rng.uniform(0.08, 0.15) / max(float(log_bias.std()), 1e-6))
    return np.exp(log_bias)


def mr_images(rendering: Rendering, grid: Grid, rng: np.random.Generator,
              channels: int) -> tuple[list[np.ndarray], np.ndarray]:
    """uint16 images of ``channels`` contrasts and the shared bias field (float32)."""
    signals = signal_table(channels) * rng.uniform(0.9, 1.1, size=(len(Tissue), channels))
    bias = bias_field(grid, rng)
    images = []
    for c in range(channels):
        clean = signals[:, c].astype(np.float32)[rendering.tissue]
        clean *= 1.0 + np.float32(0.08) * rendering.texture
        clean = ndimage.gaussian_filter(clean, sigma=(0.45, 0.55, 0.55))
        clean *= bias ** np.float32(rng.uniform(0.85, 1.15))
        scale = rng.uniform(400.0, 3000.0)
        sigma = np.float32(rng.uniform(0.015, 0.035))
        real = clean + sigma * rng.standard_normal(clean.shape, np.float32)
        imag = sigma * rng.standard_normal(clean.shape, np.float32)
        magnitude = np.sqrt(real * real + imag * imag) * np.float32(scale)
        images.append(np.clip(np.rint(magnitude), 0, 65535).astype(np.uint16))
    return images, bias
