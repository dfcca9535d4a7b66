"""Draw the extension's 128x128 icon (AutoSegExtension/Resources/Icons/AutoSeg.png) with numpy + PIL.

A CT-like axial slice (grey body, darker background) with two segmented organs in the
colours the module gives liver and spleen, and a white contour: "segmentation". Re-run after
changing the drawing: ``python Resources/make_icon.py``.
"""

from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 128
OUT = Path(__file__).resolve().parent.parent / "AutoSegExtension" / "Resources" / "Icons" / "AutoSeg.png"


def ellipse(y, x, cy, cx, ry, rx, angle=0.0):
    c, s = np.cos(angle), np.sin(angle)
    u, v = (x - cx) * c + (y - cy) * s, -(x - cx) * s + (y - cy) * c
    return (u / rx) ** 2 + (v / ry) ** 2


def draw() -> np.ndarray:
    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(float) + 0.5
    rgba = np.zeros((SIZE, SIZE, 4))
    # rounded square background
    corner = np.maximum(np.abs(x - 64) - 50, 0) ** 2 + np.maximum(np.abs(y - 64) - 50, 0) ** 2
    inside = corner <= 12 ** 2
    rgba[inside] = (0.10, 0.14, 0.22, 1.0)
    body = ellipse(y, x, 66, 64, 40, 52) <= 1
    texture = 0.55 + 0.05 * np.sin(x / 3.0) * np.cos(y / 4.0)
    rgba[body, :3] = texture[body, None]
    liver = ellipse(y, x, 60, 44, 22, 26, 0.35) <= 1
    spleen = ellipse(y, x, 56, 92, 11, 8, -0.5) <= 1
    spine = ellipse(y, x, 94, 64, 8, 9) <= 1
    rgba[spine, :3] = (0.92, 0.90, 0.82)
    for mask, colour in ((liver, (0.87, 0.51, 0.40)), (spleen, (0.62, 0.37, 0.54))):
        rgba[mask, :3] = 0.35 * rgba[mask, :3] + 0.65 * np.array(colour)
        edge = mask & ~(np.roll(mask, 1, 0) & np.roll(mask, -1, 0) & np.roll(mask, 1, 1) & np.roll(mask, -1, 1))
        rgba[edge, :3] = 1.0
    return (np.clip(rgba, 0, 1) * 255).astype(np.uint8)


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(draw(), "RGBA").save(OUT, optimize=True)
    print(f"wrote {OUT}")
