"""The phantom patient: an abdomen modelled in physical space, independent of any grid.

The model is a miniature abdomen, about a third of adult size (trunk ~80-100 mm wide), so
real-world voxel spacings (0.7-1.5 mm pixels) give arrays a CPU trains on in minutes. In the
body frame (mm; x to the patient's left, y posterior, z superior, as LPS) it holds:

* the trunk: subcutaneous fat, a muscular wall and the abdominal cavity, each a
  superellipse section that swells slowly along z; the cavity is filled with a patchy
  mixture of bowel, mesenteric fat and gas drawn from a physical texture field;
* a lumbar spine (vertebral bodies with marrow, cortex and discs, canal, arch, spinous
  process), paraspinal muscles and ribs over the upper abdomen;
* the aorta and the inferior vena cava (same blood, only the aorta is labelled);
* labelled organs: liver (two lobes), spleen (crescent with a hilar notch), kidneys (one
  label for both, each with a fatty hilum, so the label has two components), aorta, and 1-3
  liver lesions of 3-8 mm radius (the small structure);
* unlabelled look-alikes that make context matter: gallbladder and stomach (fluid, like
  the lesions), the vena cava (blood, like the aorta).

Sizes, positions and shapes vary per case; the patient's pose on the table is part of the
anatomy. Randomness is confined to :func:`sample_anatomy`; rendering is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import IntEnum

import numpy as np

from AutoSegLib.names import PHANTOM_ANATOMIES
from AutoSegLib.synthetic.grid import Pose
from AutoSegLib.synthetic.shapes import Blob, Tube, chain, random_rotation, rotation

LABELS = {"background": 0, "liver": 1, "spleen": 2, "kidneys": 3, "aorta": 4, "liver_lesion": 5}
ANATOMIES = PHANTOM_ANATOMIES
# The detailed anatomy labels 31 structures of the same patients, as a whole-abdomen dataset
# would: large organs, touching ones (vertebral body, discs, arch, spinous process, canal),
# left/right pairs told apart only by side, thin vessels (renal arteries 2-2.8 mm across, a
# voxel or two at the phantoms' 0.7-1.5 mm pixels), small blobs (adrenals, lymph nodes) and
# thin plates (ribs, 2-3 mm).
DETAILED_LABELS = {name: value for value, name in enumerate((
    "background", "liver", "spleen", "kidney_right", "kidney_left", "adrenal_gland_right",
    "adrenal_gland_left", "aorta", "inferior_vena_cava", "portal_vein", "superior_mesenteric_artery",
    "renal_artery_right", "renal_artery_left", "renal_vein_right", "renal_vein_left", "gallbladder",
    "stomach", "pancreas", "liver_lesion", "lymph_nodes", "vertebral_body", "intervertebral_discs",
    "vertebral_arch", "spinous_process", "spinal_canal", "paraspinal_muscle_right",
    "paraspinal_muscle_left", "ribs_right", "ribs_left", "abdominal_wall_right", "abdominal_wall_left",
    "subcutaneous_fat"))}
# The basic anatomy's label of each painted structure; any other structure paints background.
_BASIC_STROKES = {"liver": 1, "spleen": 2, "kidney_right": 3, "kidney_left": 3, "aorta": 4, "liver_lesion": 5}


def stroke_labels(anatomy: str) -> dict[str, int]:
    """Structure name -> label value painted for it, for ``anatomy`` ("basic" or "detailed")."""
    if anatomy not in ANATOMIES:
        raise ValueError(f"unknown anatomy {anatomy!r}; allowed: {', '.join(ANATOMIES)}")
    return dict(_BASIC_STROKES) if anatomy == "basic" else {k: v for k, v in DETAILED_LABELS.items() if v}


def label_names(anatomy: str) -> dict[str, int]:
    """Label name -> value as dataset.json declares it for ``anatomy``."""
    stroke_labels(anatomy)
    return dict(LABELS) if anatomy == "basic" else dict(DETAILED_LABELS)
_REF_CAVITY = (36.0, 24.0)  # mm; organ layout below is written for this cavity and scaled


class Tissue(IntEnum):
    """Tissue classes; the CT and MR models give each its own intensities."""

    AIR = 0
    FAT = 1
    MUSCLE = 2
    BOWEL = 3
    GAS = 4
    BONE = 5
    MARROW = 6
    DISC = 7
    CSF = 8
    ARTERY = 9
    VEIN = 10
    LIVER = 11
    SPLEEN = 12
    KIDNEY = 13
    LESION = 14
    BILE = 15
    FLUID = 16


@dataclass(frozen=True)
class Section:
    """Trunk cross-section: a superellipse, fuller posteriorly, swelling slowly along z."""

    half_x: float
    half_ant: float
    half_post: float
    power: float
    swell: float
    period: float
    phase: float

    def inside(self, q: tuple[np.ndarray, ...]) -> np.ndarray:
        x, y, z = q
        scale = 1.0 + np.float32(self.swell) * np.sin(z * np.float32(2 * np.pi / self.period) + np.float32(self.phase))
        half_y = np.where(y < 0, np.float32(self.half_ant), np.float32(self.half_post))
        p = np.float32(self.power)
        return np.abs(x / (self.half_x * scale)) ** p + np.abs(y / (half_y * scale)) ** p < 1.0

    def support(self, v: np.ndarray) -> tuple[float, float]:
        # Support of a superellipse is the dual norm; the z extent is left to the caller.
        dual = self.power / (self.power - 1.0)
        grow = 1.0 + self.swell
        half_y = max(self.half_ant, self.half_post)
        half = ((self.half_x * grow * abs(v[0])) ** dual + (half_y * grow * abs(v[1])) ** dual) ** (1 / dual)
        return 0.0, float(half)

    def shrunk(self, lateral: float, anterior: float, posterior: float) -> "Section":
        return replace(self, half_x=self.half_x - lateral, half_ant=self.half_ant - anterior,
                       half_post=self.half_post - posterior)


@dataclass(frozen=True)
class Anatomy:
    """One phantom patient. Shapes are in the body frame; ``pose`` places it in the world."""

    pose: Pose
    body: Section
    muscle: Section
    cavity: Section
    shapes: dict  # name -> Blob | Tube
    lesions: tuple[Blob, ...]
    discs: tuple[float, float, float]  # period, phase, thickness (mm along z)
    ribs: tuple[float, float, float, float]  # period, phase, thickness, lowest z
    stomach_level: float  # body y of the air-fluid level; gas floats anteriorly (y smaller)
    visceral_fat: float  # texture threshold: lower means more mesenteric fat
    bowel_gas: float  # texture threshold: lower means more gas
    texture_seed: int
    details: dict = field(default_factory=dict)  # the detailed anatomy's extra structures (sample_details)

    def labelled_shapes(self) -> list:
        """Bounds of every labelled structure; the field of view must hold all of them.

        The aorta runs through every slice, so a disc of it at organ level stands in for it.
        The detailed anatomy's extra structures do not widen it: a patient gets the same grid
        with either label table, and a structure at the edge may be cut, as in real scans.
        """
        names = ("liver_right", "liver_left", "spleen", "kidney_right", "kidney_left")
        return [self.shapes[n] for n in names] + list(self.lesions) + [self.shapes["aorta"].section(10.0)]


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw one phantom patient."""
    cx = rng.uniform(32.0, 41.0)
    cy = min(rng.uniform(20.0, 27.0), 0.75 * cx)
    wall = rng.uniform(1.8, 3.0)
    fat_lat, fat_ant, fat_post = rng.uniform(2.0, 8.0), rng.uniform(2.0, 9.0), rng.uniform(2.0, 5.0)
    swell = (rng.uniform(0.02, 0.06), rng.uniform(120.0, 220.0), rng.uniform(0, 2 * np.pi))
    body = Section(cx + wall + fat_lat, cy + wall + fat_ant, 1.25 * cy + wall + fat_post,
                   rng.uniform(2.1, 2.8), *swell)
    muscle = body.shrunk(fat_lat, fat_ant, fat_post)
    cavity = replace(muscle.shrunk(wall, wall, wall), power=rng.uniform(2.0, 2.4))

    kx, ky = cx / _REF_CAVITY[0], cy / _REF_CAVITY[1]
    ks = float(np.sqrt(kx * ky))
    spine_y = muscle.half_post - 15.0 * ks
    shapes = _spine(spine_y, ks) | _vessels(rng, spine_y, kx, ks) | _organs(rng, spine_y, kx, ky, ks)
    lesions = _lesions(rng, shapes["liver_right"])

    disc_period = rng.uniform(9.0, 11.0) * ks
    rib_period = rng.uniform(9.0, 12.0)
    stomach = shapes["stomach"]
    pose = Pose(rotation(np.array([0.0, 0.0, 1.0]), np.radians(rng.uniform(-8, 8))) @ random_rotation(rng, 4.0),
                np.array([rng.uniform(-15, 15), rng.uniform(-25, 10), rng.uniform(-400, 100)]))
    return Anatomy(
        pose=pose, body=body, muscle=muscle, cavity=cavity, shapes=shapes, lesions=lesions,
        discs=(disc_period, rng.uniform(0, disc_period), 0.25 * disc_period),
        ribs=(rib_period, rng.uniform(0, rib_period), rng.uniform(2.0, 3.0), rng.uniform(-5.0, 5.0)),
        stomach_level=float(stomach.centre[1] - stomach.semi[1] * rng.uniform(0.0, 0.7)),
        visceral_fat=rng.uniform(-0.3, 0.5), bowel_gas=rng.uniform(1.9, 2.5),
        texture_seed=int(rng.integers(2**63)),
    )


def _spine(y: float, k: float) -> dict:
    canal_y = y + 8.2 * k
    return {
        "vertebra": Tube(0.0, y, 6.0 * k, 5.0 * k),
        "canal": Tube(0.0, canal_y, 2.4 * k, 2.2 * k),
        "arch": Tube(0.0, canal_y, 4.4 * k, 4.0 * k),
        "spinous": Tube(0.0, y + 13.0 * k, 1.4 * k, 3.0 * k),
        "paraspinal_right": Tube(-8.5 * k, y + 10.0 * k, 6.0 * k, 5.5 * k),
        "paraspinal_left": Tube(8.5 * k, y + 10.0 * k, 6.0 * k, 5.5 * k),
    }


def _vessels(rng: np.random.Generator, spine_y: float, kx: float, k: float) -> dict:
    front = spine_y - 5.0 * k
    radius = rng.uniform(2.8, 3.8) * k
    return {
        "aorta": Tube(2.5 * kx + rng.normal(0, 0.7), front - radius - 0.8 * k, radius, radius),
        "ivc": Tube(-7.0 * kx + rng.normal(0, 0.7), front - 3.0 * k, 4.0 * k, 2.7 * k),
    }


def _organs(rng: np.random.Generator, spine_y: float, kx: float, ky: float, k: float) -> dict:
    def at(x, y, z):
        return np.array([x * kx, y * ky, z]) + rng.normal(0, 1.5, 3)

    liver, left_lobe = rng.uniform(0.85, 1.15), rng.uniform(0.7, 1.3)
    organs = {
        "liver_right": Blob.sample(rng, at(-15, -1, 13), np.array([19 * kx, 16 * ky, 21 * k]) * liver, 8.0,
                                   wobble=0.14),
        "liver_left": Blob.sample(rng, at(4, -11, 20), np.array([14 * kx, 7 * ky, 9 * k]) * left_lobe, 8.0,
                                  wobble=0.12),
        "gallbladder": Blob.sample(rng, at(-12, -13, 1), np.array([3.2, 3.2, 6.5]) * k * rng.uniform(0.7, 1.3),
                                   10.0, base=rotation([1, 0, 0], np.radians(25)), wobble=0.05),
        "stomach": Blob.sample(rng, at(13, -9, 17), np.array([9 * kx, 7.5 * ky, 10 * k]) * rng.uniform(0.8, 1.2),
                               8.0, wobble=0.06),
        "spleen": Blob.sample(rng, at(24, 9, 18), np.array([7.0, 12.0, 11.0]) * k * rng.uniform(0.75, 1.2),
                              10.0, base=rotation([0, 0, 1], np.radians(-35))),
    }
    for side, sign, z in (("right", 1.0, -6.0), ("left", -1.0, -2.0)):
        # sign: +1 where medial is +x. The hilum faces antero-medially, the upper pole leans in.
        base = rotation([0, 0, 1], np.radians(-25 * sign)) @ rotation([0, 1, 0], np.radians(12 * sign))
        centre = np.array([-sign * 15.0 * kx, spine_y - 2.0 * k, z]) + rng.normal(0, 1.5, 3)
        kidney = Blob.sample(rng, centre, np.array([5.0, 4.3, 10.0]) * k * rng.uniform(0.85, 1.15), 6.0,
                             base=base, wobble=0.05)
        organs[f"kidney_{side}"] = kidney
        organs[f"hilum_{side}"] = kidney.scaled((0.45, 0.45, 0.5), shift=(sign * 0.8, 0.0, 0.0))
    return organs


def _lesions(rng: np.random.Generator, lobe: Blob) -> tuple[Blob, ...]:
    count = 1 + int(rng.random() < 0.4) + int(rng.random() < 0.15)
    lesions = []
    for n in range(count):
        # Deep in the lateral half of the right lobe, clear of the medial vena cava.
        u = rng.normal(size=3)
        u *= 0.45 * rng.random() ** (1 / 3) / np.linalg.norm(u)
        u[0] = -abs(u[0])
        radius = rng.uniform(4.0, 8.0) if n == 0 else rng.uniform(3.0, 5.5)
        lesions.append(Blob.sample(rng, lobe.point(u), radius * rng.uniform(0.85, 1.15, 3), 90.0, wobble=0.1))
    return tuple(lesions)


def sample_details(rng: np.random.Generator, anatomy: Anatomy) -> dict:
    """The detailed anatomy's extra structures for ``anatomy`` (drawn from their own stream).

    Placed relative to the patient's own organs, so they move with them: adrenals cap the
    upper poles of the kidneys, renal arteries run from the aorta and renal veins to the vena
    cava (the left vein passing in front of the aorta, under the superior mesenteric artery),
    the portal vein rises from behind the pancreas into the liver, lymph nodes lie in the fat
    beside the aorta.
    """
    s = anatomy.shapes
    aorta, ivc, vertebra = s["aorta"], s["ivc"], s["vertebra"]
    k = vertebra.rx / 6.0  # the patient's scale (vertebra is 6 k wide)
    front = aorta.cy - aorta.rx  # anterior wall of the aorta
    details: dict = {}
    for side, sign in (("right", 1.0), ("left", -1.0)):  # sign: +1 where medial is +x
        kidney = s[f"kidney_{side}"]
        top = kidney.point((0.0, 0.0, 0.95))
        centre = top + np.array([sign * 2.0 * k, 0.5 * k, 3.5 * k]) + rng.normal(0, 0.5, 3)
        semi = np.array([1.6, 4.0, 5.0]) * k * rng.uniform(0.85, 1.15)
        details[f"adrenal_gland_{side}"] = Blob.sample(rng, centre, semi, 10.0,
                                                       base=rotation([0, 0, 1], np.radians(-30 * sign)), wobble=0.08)
        hilum = kidney.point((sign * 0.75, -0.15, 0.05))
        level = kidney.centre[2] + rng.uniform(1.0, 4.0)
        artery = [(aorta.cx, aorta.cy, level), (0.5 * (aorta.cx + hilum[0]), aorta.cy + 1.5 * k, level), hilum]
        details[f"renal_artery_{side}"] = chain(artery, rng.uniform(1.0, 1.4) * k)
        vein_level = level + rng.uniform(1.0, 3.0)
        if side == "right":
            vein = [hilum + np.array([0.0, -1.5 * k, 1.0]), (ivc.cx, ivc.cy, vein_level)]
        else:  # in front of the aorta, behind the superior mesenteric artery
            vein = [hilum + np.array([0.0, -1.5 * k, 1.0]), (aorta.cx + 4.0 * k, front - 1.8 * k, vein_level),
                    (aorta.cx, front - 2.0 * k, vein_level), (ivc.cx, ivc.cy, vein_level)]
        details[f"renal_vein_{side}"] = chain(vein, rng.uniform(1.4, 2.0) * k)
    renal = min(s["kidney_right"].centre[2], s["kidney_left"].centre[2])
    sma_top = renal + rng.uniform(8.0, 12.0)
    sma_radius = rng.uniform(1.0, 1.4) * k
    sma = [(aorta.cx, aorta.cy, sma_top), (aorta.cx, front - 4.5 * k, sma_top - 4.0),
           (aorta.cx + rng.normal(0, 1.0), front - 5.5 * k, renal - 60.0)]
    details["superior_mesenteric_artery"] = chain(sma, sma_radius)
    details["pancreas"] = Blob.sample(
        rng, np.array([aorta.cx + 5.0 * k, front - 8.0 * k, sma_top - 3.0]) + rng.normal(0, 1.0, 3),
        np.array([14.0, 3.2, 4.0]) * k * rng.uniform(0.85, 1.15), 8.0,
        base=rotation([0, 0, 1], np.radians(-10)), wobble=0.1)
    liver = s["liver_right"]
    porta = liver.point((0.55, -0.1, -0.2))
    confluence = np.array([aorta.cx - 4.0 * k, front - 8.0 * k, sma_top - 5.0])
    details["portal_vein"] = chain([confluence, 0.5 * (confluence + porta) + np.array([0, 0, 2.0]), porta],
                                   rng.uniform(1.8, 2.4) * k)
    nodes = []
    for _ in range(2 + int(rng.integers(3))):
        side = rng.choice([-1.0, 1.0])
        centre = np.array([aorta.cx + side * (aorta.rx + rng.uniform(2.5, 5.0) * k),
                           aorta.cy + rng.uniform(-3.0, 3.0) * k, renal + rng.uniform(-12.0, 10.0)])
        nodes.append(Blob.sample(rng, centre, rng.uniform(1.5, 3.0) * rng.uniform(0.8, 1.2, 3) * k, 90.0,
                                 wobble=0.1))
    details["lymph_nodes"] = tuple(nodes)
    return details
