"""Click guidance in the plans: whether a configuration's network takes click maps, and how.

A configuration with a ``guidance`` entry trains and predicts with two extra input channels
per foreground class (positive and negative clicks, docs/clicks.md), after the image channels
(and after a cascade's previous-stage channels, which no guided configuration has). Automatic
prediction fills them with zeros. No entry (every plan made before issue 21, ``--guidance off``)
is the plain network, unchanged.

Example:
    >>> spec = GuidanceSpec.from_dict(default_guidance())
    >>> spec.channels(n_foreground=5), spec.radius
    (10, 2.0)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

GUIDANCE_VERSION = 1
ENCODINGS = ("disc",)
# The share of training samples that keep all-zero guidance, so the automatic result does not
# get worse. DeepEdit uses half; at 500 iterations (the quick preset then) that once left the guided
# model's automatic Dice 0.018 below the plain model's (CT phantoms, two seeds, the previous
# plan). Measured again on the canonical plan (BENCHMARKS.md, "Automatic share 0.75"): 0.75 is
# 0.003 below plain (three seeds), 0.5 0.004 below (two seeds), both within the 0.01 target and
# the seed noise. Three quarters is kept for the cheaper guided step (1.05-1.2x a plain one
# against 1.5x), with worst-class click gains still +0.107 after 3 clicks (three-seed mean).
AUTOMATIC_SHARE = 0.75
# Simulated click rounds per guided batch, drawn from 1..MAX_ROUNDS: each round costs one
# forward pass without gradients (about a third of a training step), so 3 keeps a guided
# step under twice an automatic one on the CPU while the network still sees several clicks.
MAX_ROUNDS = 3
# A ball of 2 voxels at the network's resolution: 33 voxels, found by a 3x3x3 kernel's
# first convolution from every neighbour of the clicked voxel.
RADIUS = 2.0


@dataclass(frozen=True)
class GuidanceSpec:
    """A configuration's ``guidance`` entry (plans.json)."""

    encoding: str = "disc"
    radius: float = RADIUS
    automatic_share: float = AUTOMATIC_SHARE
    max_rounds: int = MAX_ROUNDS
    version: int = GUIDANCE_VERSION

    def channels(self, n_foreground: int) -> int:
        return 2 * n_foreground

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "GuidanceSpec":
        problems = guidance_problems("guidance", data)
        if problems:
            raise ValueError("; ".join(problems))
        return cls(**data)


def default_guidance() -> dict:
    return GuidanceSpec().to_dict()


def guidance_of(config: dict) -> GuidanceSpec | None:
    """The configuration's guidance, or None for a plain (automatic-only) network."""
    entry = config.get("guidance")
    return None if entry is None else GuidanceSpec.from_dict(entry)


def guidance_problems(key: str, value) -> list[str]:
    """Problems of a ``guidance`` entry, one line each naming the key and value."""
    if value is None:
        return []
    if not isinstance(value, dict):
        return [f"{key}: {value!r}: must be an object or null"]
    expected = set(GuidanceSpec.__dataclass_fields__)
    if set(value) != expected:
        return [f"{key}: keys {sorted(value)}: must be exactly {sorted(expected)}"]
    problems = []
    if value["version"] != GUIDANCE_VERSION:
        problems.append(f"{key}.version: {value['version']!r}: only version {GUIDANCE_VERSION} is supported")
    if value["encoding"] not in ENCODINGS:
        problems.append(f"{key}.encoding: {value['encoding']!r}: allowed: {', '.join(ENCODINGS)}")
    radius = value["radius"]
    if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not 0 <= radius <= 16:
        problems.append(f"{key}.radius: {radius!r}: must be a number of voxels from 0 to 16")
    share = value["automatic_share"]
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
        problems.append(f"{key}.automatic_share: {share!r}: must be a fraction from 0 to 1")
    rounds = value["max_rounds"]
    if isinstance(rounds, bool) or not isinstance(rounds, int) or not 1 <= rounds <= 10:
        problems.append(f"{key}.max_rounds: {rounds!r}: must be an integer from 1 to 10")
    return problems


GUIDANCE_CHOICES = ("auto", "on", "off")
# Measured on the 2-core CPU (BENCHMARKS.md, "Automatic share 0.75, three seeds"): a guided
# training run of the quick preset takes 1.15-1.4x the minutes of a plain one (three seeds, 1 thread),
# for an automatic result within 0.003 of it. On a CPU, where minutes are the limit and a user may
# never click, plain is the default; with a GPU the extra minutes are small.
GUIDED_RUN_COST = 1.3


def guidance_decision(choice: str, device_type: str) -> tuple[bool, str]:
    """Whether new plans take clicks, and the sentence ``--explain`` gives for it.

    ``auto``: on when this machine trains on a GPU (``device_type`` cuda or mps), off on a CPU.
    """
    if choice not in GUIDANCE_CHOICES:
        raise ValueError(f"--guidance {choice!r}; choose one of {', '.join(GUIDANCE_CHOICES)}")
    if choice == "on":
        return True, "Click guidance: on (--guidance on): the 3D networks also learn to take correction clicks."
    if choice == "off":
        return False, "Click guidance: off (--guidance off): plain networks; a click only re-predicts near it."
    if device_type in ("cuda", "mps"):
        return True, (f"Click guidance: on (auto: a {device_type.upper()} device trains here): the 3D networks also "
                      "learn to take correction clicks (docs/clicks.md).")
    return False, (f"Click guidance: off (auto: no GPU here). On a CPU guided training takes about "
                   f"{GUIDED_RUN_COST:g}x the minutes of plain training (for the same automatic result); "
                   "--guidance on trains it (docs/clicks.md). Without it a click only re-predicts near it.")


def with_guidance(plans, enabled: bool = True):
    """The plans with guidance on every configuration that can take it (in place, returned).

    A cascade's second stage is left plain: its input already carries the first stage's
    segmentation, and refining it would need the first stage again for every click. So is a
    2D configuration: a refine predicts 3D windows around the clicks (inference/refiner.py).
    """
    for config in plans.configurations.values():
        takes_clicks = enabled and not config.previous_stage and len(config.patch_size) == 3
        config.guidance = default_guidance() if takes_clicks else None
    return plans


def guidance_channels(config: dict, n_foreground: int) -> int:
    """Extra network input channels the configuration's guidance takes (0 without guidance)."""
    spec = guidance_of(config)
    return 0 if spec is None else spec.channels(n_foreground)
