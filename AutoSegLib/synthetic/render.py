"""Sample an :class:`~AutoSegLib.synthetic.anatomy.Anatomy` on a voxel grid.

Every voxel centre is mapped to the body frame and tested against the anatomy, painting a
tissue map and a label map in a fixed order (later structures win, the way the kidneys
indent the liver and the gallbladder sits in its fossa). Labels come from the same paint
strokes as tissues, so the two can never disagree. Organs are evaluated only on the voxel
block their closed-form bounds allow, which keeps a 48x112x112 case well under a second.

Textures are random fields on a fixed 2.5 mm lattice in the body frame, interpolated at
the voxel centres: the same patient on another grid shows the same texture, and the
bowel/fat/gas pattern of the cavity is anatomy rather than noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from AutoSegLib.synthetic.anatomy import Anatomy, Tissue, stroke_labels
from AutoSegLib.synthetic.grid import Grid

_LATTICE_STEP = 2.5  # mm
_LATTICE_MIN = np.array([-104.0, -52.0, -64.0])  # z, y, x in the body frame
_LATTICE_SHAPE = (96, 42, 52)  # covers z -104..136, y -52..53, x -64..66 mm; wraps beyond


@dataclass(frozen=True)
class Rendering:
    """Tissue and label maps of one case plus the fine texture field (unit variance)."""

    tissue: np.ndarray  # uint8, Tissue values
    label: np.ndarray  # uint8, the values of anatomy.label_names(anatomy)
    texture: np.ndarray  # float32


def texture_fields(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fine (~2.5 mm) and coarse (~6 mm) periodic random fields on the body-frame lattice."""
    rng = np.random.default_rng(seed)
    fields = []
    for sigma in (1.0, 2.4):
        field = ndimage.gaussian_filter(rng.standard_normal(_LATTICE_SHAPE, np.float32), sigma, mode="wrap")
        fields.append(field / field.std())
    return fields[0], fields[1]


def _sample(field: np.ndarray, q: tuple[np.ndarray, ...]) -> np.ndarray:
    coords = np.stack([(q[2 - a] - np.float32(_LATTICE_MIN[a])) * np.float32(1 / _LATTICE_STEP) for a in range(3)])
    return ndimage.map_coordinates(field, coords, order=1, mode="grid-wrap", output=np.float32)


class _Canvas:
    """Tissue and label arrays painted stroke by stroke, each stroke on its own block."""

    def __init__(self, grid: Grid, anatomy: Anatomy, q: tuple[np.ndarray, ...], labels: dict[str, int]):
        self.grid, self.anatomy, self.q, self.labels = grid, anatomy, q, labels
        self.tissue = np.full(grid.shape, Tissue.AIR, np.uint8)
        self.label = np.zeros(grid.shape, np.uint8)

    def paint(self, bounds, inside, tissue: Tissue, structure: str | None = None, where=None) -> None:
        """Paint voxels inside ``bounds`` (shapes) where ``inside(q)`` (and ``where(block)``).

        The label is ``structure``'s in this anatomy's table; a structure the table does not
        label (or none) paints background, the way a vessel in front of an organ hides it.
        """
        block = self.grid.block_of(self.anatomy.pose, bounds)
        if block is None:
            return
        mask = inside(tuple(c[block] for c in self.q))
        if where is not None:
            mask &= where(block)
        self.tissue[block][mask] = tissue
        self.label[block][mask] = self.labels.get(structure, 0)

    def mark(self, mask: np.ndarray, structure: str) -> None:
        """Label whole-grid ``mask`` as ``structure`` (for strokes painted without a block)."""
        value = self.labels.get(structure, 0)
        if value:
            self.label[mask] = value

    def is_tissue(self, *tissues: Tissue):
        return lambda block: np.isin(self.tissue[block], tissues)


def render(anatomy: Anatomy, grid: Grid, labels: str = "basic") -> Rendering:
    """Tissue map, label map and texture of ``anatomy`` on ``grid`` (pure, deterministic).

    ``labels`` names the label table ("basic": 5 classes, "detailed": 31); the extra
    structures of ``anatomy.details`` are painted whenever the anatomy has them.
    """
    q = grid.points(anatomy.pose)
    fine_field, coarse_field = texture_fields(anatomy.texture_seed)
    fine, coarse = _sample(fine_field, q), _sample(coarse_field, q)
    canvas = _Canvas(grid, anatomy, q, stroke_labels(labels))
    cavity = _trunk(canvas, fine, coarse)
    _skeleton(canvas, cavity)
    _organs(canvas, cavity)
    return Rendering(canvas.tissue, canvas.label, fine)


def _trunk(canvas: _Canvas, fine: np.ndarray, coarse: np.ndarray) -> np.ndarray:
    a, q, tissue = canvas.anatomy, canvas.q, canvas.tissue
    body = a.body.inside(q)
    tissue[body] = Tissue.FAT
    wall = a.muscle.inside(q)
    tissue[wall] = Tissue.MUSCLE
    cavity = a.cavity.inside(q)
    # Ribs: slanted bands in the wall over the upper abdomen, sparing the anterior midline.
    period, phase, thickness, lowest = a.ribs
    band = np.mod(q[2] - np.float32(0.3) * q[1] + np.float32(phase), np.float32(period)) < thickness
    lateral = np.abs(q[0]) > np.float32(0.3 * a.cavity.half_x)
    ribs = wall & ~cavity & band & lateral & (q[2] > lowest)
    tissue[ribs] = Tissue.BONE
    left = q[0] > 0  # body x points to the patient's left
    canvas.mark(body & ~wall, "subcutaneous_fat")
    for side, half in (("right", ~left), ("left", left)):
        canvas.mark(wall & ~cavity & ~ribs & half, f"abdominal_wall_{side}")
        canvas.mark(ribs & half, f"ribs_{side}")
    # Mesenteric fat gathers posteriorly (toward the retroperitoneum); gas only in bowel.
    fatty = coarse > np.float32(a.visceral_fat) - np.float32(0.03) * q[1]
    tissue[cavity & fatty] = Tissue.FAT
    tissue[cavity & ~fatty] = Tissue.BOWEL
    tissue[cavity & ~fatty & (fine > np.float32(a.bowel_gas))] = Tissue.GAS
    return cavity


def _skeleton(canvas: _Canvas, cavity: np.ndarray) -> None:
    s = canvas.anatomy.shapes
    for side in ("right", "left"):
        muscle = s[f"paraspinal_{side}"]
        canvas.paint([muscle], muscle.inside, Tissue.MUSCLE, f"paraspinal_muscle_{side}")
    vertebra, canal, arch = s["vertebra"], s["canal"], s["arch"]
    canvas.paint([vertebra], vertebra.inside, Tissue.BONE, "vertebral_body")
    canvas.paint([vertebra], vertebra.scaled(0.8).inside, Tissue.MARROW, "vertebral_body")
    period, phase, thickness = canvas.anatomy.discs

    def disc(q):
        return vertebra.inside(q) & (np.mod(q[2] + np.float32(phase), np.float32(period)) < thickness)

    canvas.paint([vertebra], disc, Tissue.DISC, "intervertebral_discs")
    canvas.paint([arch], arch.inside, Tissue.BONE, "vertebral_arch")
    canvas.paint([canal], canal.inside, Tissue.CSF, "spinal_canal")
    canvas.paint([s["spinous"]], s["spinous"].inside, Tissue.BONE, "spinous_process")


def _organs(canvas: _Canvas, cavity: np.ndarray) -> None:
    a, s = canvas.anatomy, canvas.anatomy.shapes

    def in_cavity(block):
        return cavity[block]

    stomach = s["stomach"]
    lumen = stomach.scaled(0.82)
    canvas.paint([stomach], stomach.inside, Tissue.MUSCLE, "stomach", where=in_cavity)
    canvas.paint([stomach], lumen.inside, Tissue.FLUID, "stomach", where=in_cavity)
    canvas.paint([stomach], lambda q: lumen.inside(q) & (q[1] < a.stomach_level), Tissue.GAS, "stomach",
                 where=in_cavity)

    spleen = s["spleen"]
    notch = spleen.scaled((0.55, 0.55, 0.6), shift=(-0.95, 0.0, 0.0))
    canvas.paint([spleen], lambda q: spleen.inside(q) & ~notch.inside(q), Tissue.SPLEEN, "spleen", where=in_cavity)
    lobes = [s["liver_right"], s["liver_left"]]
    canvas.paint(lobes, lambda q: lobes[0].inside(q) | lobes[1].inside(q), Tissue.LIVER, "liver", where=in_cavity)
    for side in ("right", "left"):
        kidney, hilum = s[f"kidney_{side}"], s[f"hilum_{side}"]
        canvas.paint([kidney], kidney.inside, Tissue.KIDNEY, f"kidney_{side}", where=in_cavity)
        canvas.paint([hilum], hilum.inside, Tissue.FAT, where=canvas.is_tissue(Tissue.KIDNEY))
    canvas.paint([s["gallbladder"]], s["gallbladder"].inside, Tissue.BILE, "gallbladder", where=in_cavity)
    _details(canvas)
    canvas.paint([s["aorta"]], s["aorta"].inside, Tissue.ARTERY, "aorta")
    canvas.paint([s["ivc"]], s["ivc"].inside, Tissue.VEIN, "inferior_vena_cava")
    for lesion in a.lesions:
        canvas.paint([lesion], lesion.inside, Tissue.LESION, "liver_lesion",
                     where=canvas.is_tissue(Tissue.LIVER, Tissue.LESION))


# Tissues the detailed anatomy's small structures may displace: what fills the cavity.
_FILLER = (Tissue.FAT, Tissue.BOWEL, Tissue.GAS)


def _details(canvas: _Canvas) -> None:
    """The detailed anatomy's extra structures (none for the basic anatomy's patients)."""
    d = canvas.anatomy.details
    if not d:
        return
    filler = canvas.is_tissue(*_FILLER)
    canvas.paint([d["pancreas"]], d["pancreas"].inside, Tissue.SPLEEN, "pancreas", where=filler)
    for side in ("right", "left"):
        gland = d[f"adrenal_gland_{side}"]
        canvas.paint([gland], gland.inside, Tissue.MUSCLE, f"adrenal_gland_{side}", where=filler)
    for node in d["lymph_nodes"]:
        canvas.paint([node], node.inside, Tissue.MUSCLE, "lymph_nodes", where=filler)
    not_kidney = canvas.is_tissue(*(t for t in Tissue if t != Tissue.KIDNEY))
    for name, tissue in (("renal_vein_right", Tissue.VEIN), ("renal_vein_left", Tissue.VEIN),
                         ("renal_artery_right", Tissue.ARTERY), ("renal_artery_left", Tissue.ARTERY),
                         ("superior_mesenteric_artery", Tissue.ARTERY), ("portal_vein", Tissue.VEIN)):
        for piece in d[name]:
            canvas.paint([piece], piece.inside, tissue, name, where=not_kidney)
