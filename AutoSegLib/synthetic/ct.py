"""CT appearance: tissue map -> Hounsfield units, as a portal-venous abdominal scan.

Each tissue gets a per-case mean drawn from a realistic band (contrast timing and patients
differ) plus a texture from the physical texture field. Liver and spleen enhance almost
equally (the spleen within -5..+8 HU of the liver), so only shape and position tell them
apart; lesions, gallbladder and stomach fluid are all hypodense to the liver, and aorta
and vena cava share blood values. The clean image is blurred by a point spread function
(partial volume at edges and across thick slices) and gets in-plane correlated quantum
noise whose level grows for thinner slices, as dose-limited CT does. Stored as int16 HU.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from AutoSegLib.synthetic.anatomy import Tissue
from AutoSegLib.synthetic.render import Rendering

CHANNEL_NAMES = ("CT",)
HU_LIMITS = (-1024, 3071)

# tissue: (low, high) of the per-case mean HU, texture standard deviation (HU)
_HU = {
    Tissue.AIR: ((-1000, -1000), 0.0),
    Tissue.FAT: ((-115, -85), 8.0),
    Tissue.MUSCLE: ((40, 60), 6.0),
    Tissue.BOWEL: ((15, 45), 12.0),
    Tissue.GAS: ((-1000, -900), 20.0),
    Tissue.BONE: ((600, 950), 60.0),
    Tissue.MARROW: ((150, 260), 30.0),
    Tissue.DISC: ((70, 100), 8.0),
    Tissue.CSF: ((5, 15), 3.0),
    Tissue.ARTERY: ((140, 200), 6.0),
    Tissue.VEIN: ((120, 180), 8.0),
    Tissue.LIVER: ((90, 120), 8.0),
    Tissue.SPLEEN: ((90, 120), 8.0),  # replaced by liver + (-5..+8): see tissue_means
    Tissue.KIDNEY: ((150, 200), 10.0),
    Tissue.LESION: ((30, 80), 8.0),  # replaced by liver - (35..60)
    Tissue.BILE: ((0, 20), 3.0),
    Tissue.FLUID: ((5, 30), 5.0),
}


def tissue_means(rng: np.random.Generator) -> np.ndarray:
    """Per-case mean HU of every tissue, indexed by Tissue value."""
    means = np.array([rng.uniform(*_HU[t][0]) for t in Tissue])
    means[Tissue.SPLEEN] = means[Tissue.LIVER] + rng.uniform(-5.0, 8.0)
    means[Tissue.LESION] = means[Tissue.LIVER] - rng.uniform(35.0, 60.0)
    means[Tissue.VEIN] = min(means[Tissue.VEIN], means[Tissue.ARTERY] - 5.0)
    return means


def ct_image(rendering: Rendering, spacing: tuple[float, ...], rng: np.random.Generator) -> np.ndarray:
    """The CT image (int16 HU) of a rendering on a grid with ``spacing`` (z, y, x) mm."""
    means = tissue_means(rng).astype(np.float32)
    texture = np.array([_HU[t][1] for t in Tissue], np.float32)
    clean = means[rendering.tissue] + texture[rendering.tissue] * rendering.texture
    image = ndimage.gaussian_filter(clean, sigma=(0.45, 0.55, 0.55))
    # Quantum noise scales with 1/sqrt(slice thickness); the reconstruction kernel
    # correlates it in-plane only.
    sigma = float(np.clip(rng.uniform(10.0, 18.0) * np.sqrt(2.0 / spacing[0]), 10.0, 25.0))
    noise = ndimage.gaussian_filter(rng.standard_normal(image.shape, np.float32), sigma=(0, 0.6, 0.6))
    image += noise * np.float32(sigma / noise.std())
    return np.clip(np.rint(image), *HU_LIMITS).astype(np.int16)
