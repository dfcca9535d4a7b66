"""One phantom case from (kind, seed, split, index): anatomy, grid and appearance, no I/O.

Randomness is derived, never shared: case ``index`` of ``split`` draws from
``SeedSequence([seed, split code, 0, index])``, spawned into independent streams for the
anatomy, the grid and the appearance. So a case is identical however many cases are
generated, the same anatomy can be rendered on any other grid (``grid=``), and a CT and an
MR dataset with the same seed hold the same patients scanned on the same grids (paired
data). The acquisition protocol comes from ``SeedSequence([seed, split code, 1, block])``:
each block of four consecutive cases holds all four protocols in shuffled order, so even a
small dataset has thin, thick, flipped and oblique scans.

``size`` scales the patient, not the randomness: a case of size 1.5 is the same patient, grid
protocol and appearance as at size 1, 1.5 times larger at the same spacing (``grid.enlarged``).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, replace

import numpy as np

from AutoSegLib.imageio import Geometry
from AutoSegLib.synthetic import ct, mr
from AutoSegLib.synthetic.anatomy import ANATOMIES, label_names, sample_anatomy, sample_details
from AutoSegLib.synthetic.grid import PROTOCOLS, Grid, enlarged, sample_grid
from AutoSegLib.synthetic.render import render

KINDS = ("ct", "mr")
SPLITS = {"train": 0, "test": 1}
MAX_SIZE = 4.0  # up to 190x445x445 voxels: about 1.7 GB and 25 s per case on one core


@dataclass(frozen=True)
class PhantomCase:
    """A generated case.

    Attributes:
        case_id: e.g. ``phantom_ct_003`` (training) or ``phantom_ct_test_000`` (test).
        images: one (z, y, x) array per channel: int16 HU for CT, uint16 for MR.
        label: (z, y, x) uint8 with the values of :func:`label_table`.
        geometry: spacing (z, y, x), origin and direction (ITK order) of every array.
        tissue: (z, y, x) uint8 tissue map (``anatomy.Tissue``), the truth behind the images.
        bias: MR receive-coil bias field (float32, geometric mean 1); None for CT.
        protocol: acquisition protocol of the grid (one of ``grid.PROTOCOLS``, or "custom").
    """

    case_id: str
    images: list[np.ndarray]
    label: np.ndarray
    geometry: Geometry
    tissue: np.ndarray
    bias: np.ndarray | None
    protocol: str


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown phantom kind {kind!r}; allowed: {', '.join(KINDS)}")
    return kind


def check_int(name: str, value, least: int) -> int:
    """``value`` as an int if it is an integer >= ``least``; ValueError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    return int(value)


def check_size(size) -> float:
    """``size`` as a float if it is a number in (0, MAX_SIZE]; ValueError naming the value otherwise."""
    if isinstance(size, bool) or not isinstance(size, numbers.Real) or not (0 < size <= MAX_SIZE):
        raise ValueError(f"size must be > 0 and <= {MAX_SIZE:g}, got {size!r}")
    return float(size)


def check_channels(kind: str, channels: int | None) -> int:
    """Number of channels for ``kind``: CT has exactly one, MR one (default) or more."""
    check_kind(kind)
    if channels is None:
        return 1
    channels = check_int("channels", channels, 1)
    if kind == "ct" and channels != 1:
        raise ValueError(f"CT phantoms have exactly 1 channel, got channels={channels}")
    return channels


def check_anatomy(anatomy: str) -> str:
    if anatomy not in ANATOMIES:
        raise ValueError(f"unknown phantom anatomy {anatomy!r}; allowed: {', '.join(ANATOMIES)}")
    return anatomy


def label_table(kind: str, anatomy: str = "basic") -> dict[str, int]:
    """Label name -> value of ``kind`` phantoms of ``anatomy`` (background 0, values consecutive)."""
    check_kind(kind)
    return label_names(check_anatomy(anatomy))


def channel_names(kind: str, channels: int | None = None) -> dict[int, str]:
    """Channel index -> name as dataset.json declares it ("CT"; "T1", "T2", ...)."""
    count = check_channels(kind, channels)
    names = ct.CHANNEL_NAMES if kind == "ct" else mr.channel_names(count)
    return dict(enumerate(names))


def case_id(kind: str, index: int, split: str = "train") -> str:
    return f"phantom_{kind}_{index:03d}" if split == "train" else f"phantom_{kind}_{split}_{index:03d}"


def protocol_of(seed: int, index: int, split: str = "train") -> str:
    block = np.random.SeedSequence([seed, SPLITS[split], 1, index // len(PROTOCOLS)])
    order = np.random.default_rng(block).permutation(len(PROTOCOLS))
    return PROTOCOLS[order[index % len(PROTOCOLS)]]


def make_case(kind: str, seed: int, case_index: int, channels: int | None = None, *,
              split: str = "train", grid: Grid | None = None, size: float = 1.0,
              anatomy: str = "basic") -> PhantomCase:
    """Generate one case in memory.

    Args:
        kind: "ct" or "mr".
        seed: dataset seed (>= 0).
        case_index: index of the case within its split (>= 0).
        channels: MR contrasts (default 1); must be None or 1 for CT.
        split: "train" or "test"; the splits draw from disjoint random streams.
        grid: render the same patient on this grid instead of the case's own.
        size: scale of the patient (0 < size <= 4). The case's own grid keeps its spacing and
            grows with the patient, so each axis has about ``size`` times the voxels; a given
            ``grid`` is used as it is.
        anatomy: "basic" (5 labels) or "detailed" (31 labels: the same patients with more
            structures, thin and small ones among them, drawn from a stream of their own).

    Example:
        >>> case = make_case("mr", seed=0, case_index=3, channels=2)
        >>> [image.dtype for image in case.images], case.label.dtype
        ([dtype('uint16'), dtype('uint16')], dtype('uint8'))
    """
    count = check_channels(kind, channels)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
    seed, case_index = check_int("seed", seed, 0), check_int("case_index", case_index, 0)
    size, labels = check_size(size), check_anatomy(anatomy)
    # Children of a SeedSequence do not depend on how many are spawned: the basic streams are
    # the same whether or not the detailed anatomy's fourth one is drawn.
    streams = np.random.SeedSequence([seed, SPLITS[split], 0, case_index]).spawn(4)
    anatomy_rng, grid_rng, look_rng, detail_rng = (np.random.default_rng(s) for s in streams)
    patient = sample_anatomy(anatomy_rng)
    if labels == "detailed":
        patient = replace(patient, details=sample_details(detail_rng, patient))
    protocol = protocol_of(seed, case_index, split) if grid is None else "custom"
    if grid is None:
        grid = sample_grid(grid_rng, protocol, patient.pose, patient.labelled_shapes(), [patient.body])
        if size != 1.0:  # at 1 the origin would only be rounded again
            grid = enlarged(grid, patient.pose, size)
    patient = replace(patient, pose=replace(patient.pose, scale=size))
    rendering = render(patient, grid, labels)
    if kind == "ct":
        images, bias = [ct.ct_image(rendering, grid.geometry.spacing, look_rng)], None
    else:
        images, bias = mr.mr_images(rendering, grid, look_rng, count)
    return PhantomCase(case_id(kind, case_index, split), images, rendering.label, grid.geometry,
                       rendering.tissue, bias, protocol)
