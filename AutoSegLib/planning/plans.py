"""The plans: what the planner decided, as plain JSON-ready dataclasses (plans.json).

Sizes and spacings of every configuration are in planning axis order: the image axes
permuted by ``transpose_forward`` (out-of-plane axis first). For most datasets this is the
identity and everything is simply (z, y, x). Preprocessing transposes arrays with
``transpose_forward`` after cropping; predictions go back with ``transpose_backward``.

A plans file names its network and normalization from fixed registries; ``from_dict``
rejects anything else, so a plans file can never select arbitrary code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields

from AutoSegLib.names import ARCHITECTURES, CONFIGURATIONS  # noqa: F401 (re-exported)

PLANS_VERSION = 1
NORMALIZATION_SCHEMES = ("CTNormalization", "ZScoreNormalization")
CONFIGURATION_NAMES = CONFIGURATIONS


def mirror_axes(config: dict) -> tuple[int, ...]:
    """Patch axes mirrored in training (p 0.5 each) and at test time: the configuration's
    ``mirror_axes``, else every patch axis (the method's default).

    The planner leaves out the left-right axis when labels name a side (kidney_left, ...):
    mirrored, a left kidney would be taught as kidney_left on the right (docs/decisions.md).
    """
    return tuple(int(a) for a in config.get("mirror_axes", range(len(config["patch_size"]))))


class PlanningError(ValueError):
    """Planning input or a plans file cannot be used; the message names the offending value."""


@dataclass
class Configuration:
    """One trainable configuration (``2d``, ``3d_fullres``, ``3d_lowres``, ``3d_cascade_fullres``)."""

    spacing: list[float]
    patch_size: list[int]
    batch_size: int
    median_image_size_in_voxels: list[int]
    strides: list[list[int]]
    kernel_sizes: list[list[int]]
    features_per_stage: list[int]
    n_conv_per_stage_encoder: list[int]
    n_conv_per_stage_decoder: list[int]
    normalization_schemes: list[str]
    use_mask_for_norm: list[bool]
    resampling: dict
    network: dict
    dummy_2d_augmentation: bool = False
    batch_dice: bool = False
    memory: dict = field(default_factory=dict)
    next_stage: str | None = None
    previous_stage: str | None = None
    guidance: dict | None = None  # click guidance (planning/guidance.py); None: a plain network
    explanation: list[dict] = field(default_factory=list)
    # Patch axes mirrored in training and at test time (None: every axis, the method's default).
    mirror_axes: list[int] | None = None
    # Cross-entropy weight per network output, background first (planning/class_weights.py;
    # 3d_cpu only). None: every class weighs 1, the method's loss.
    ce_class_weights: list[float] | None = None
    # The most the trainer multiplies a lagging class's cross-entropy weight by (training/class_lift.py;
    # 3d_cpu only). None: the weights stay as planned.
    lagging_class_lift: float | None = None

    @property
    def spatial_dims(self) -> int:
        return len(self.patch_size)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for optional in ("next_stage", "previous_stage", "mirror_axes", "guidance", "ce_class_weights",
                         "lagging_class_lift"):
            if out[optional] is None:
                del out[optional]
        return json.loads(json.dumps(out))  # deep, plain copy

    @classmethod
    def from_dict(cls, name: str, data: dict) -> "Configuration":
        known = {f.name for f in fields(cls)}
        try:
            config = cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise PlanningError(f"configuration '{name}': {exc}") from None
        config.validate(name)
        return config

    def validate(self, name: str) -> None:
        """Check the registries and that the per-stage lists agree with each other."""
        arch = self.network.get("architecture")
        if arch not in ARCHITECTURES:
            raise PlanningError(f"configuration '{name}': unknown network architecture {arch!r}; "
                                f"allowed: {', '.join(ARCHITECTURES)}")
        bad = [s for s in self.normalization_schemes if s not in NORMALIZATION_SCHEMES]
        if bad:
            raise PlanningError(f"configuration '{name}': unknown normalization scheme(s) {bad}; "
                                f"allowed: {', '.join(NORMALIZATION_SCHEMES)}")
        n, dims = len(self.strides), len(self.patch_size)
        if dims not in (2, 3) or len(self.spacing) != dims:
            raise PlanningError(f"configuration '{name}': patch_size {self.patch_size} and spacing "
                                f"{self.spacing} must both have 2 or 3 entries")
        if n == 0 or any(s != 1 for s in self.strides[0]):
            raise PlanningError(f"configuration '{name}': the first stride must be all ones, got {self.strides[:1]}")
        lengths = {"kernel_sizes": len(self.kernel_sizes), "features_per_stage": len(self.features_per_stage),
                   "n_conv_per_stage_encoder": len(self.n_conv_per_stage_encoder),
                   "n_conv_per_stage_decoder": len(self.n_conv_per_stage_decoder) + 1}
        wrong = {k: v for k, v in lengths.items() if v != n}
        if wrong:
            raise PlanningError(f"configuration '{name}': {n} strides but {wrong} (decoder counted +1)")
        if self.batch_size < 1 or any(p < 1 for p in self.patch_size):
            raise PlanningError(f"configuration '{name}': batch_size {self.batch_size} and patch_size "
                                f"{self.patch_size} must be positive")


@dataclass
class Plans:
    """Everything ``autoseg plan`` decided for one dataset, with its explanation."""

    dataset_name: str
    gpu_memory_gb: float
    transpose_forward: list[int]
    transpose_backward: list[int]
    num_training_cases: int
    channel_names: dict[str, str]
    labels: dict
    num_classes: int
    original_median_spacing: list[float]
    original_median_shape: list[float]
    foreground_intensity_properties_per_channel: dict
    configurations: dict[str, Configuration]
    explanation: list[dict] = field(default_factory=list)
    planner: str = "AutoSegLib.planning: nnU-Net paper rules (v1 procedure and memory model)"
    version: int = PLANS_VERSION
    # "canonical": every case is viewed along LPS axes before anything else
    # (preprocessing/orientation.py); None: arrays as stored, as nnU-Net reads them.
    orientation: str | None = None

    def to_dict(self) -> dict:
        """The plans.json content (plain JSON types only)."""
        out = {"version": self.version}
        for f in fields(self):
            if f.name not in ("version", "configurations") and not (f.name == "orientation" and self.orientation is None):
                out[f.name] = getattr(self, f.name)
        out["configurations"] = {k: c.to_dict() for k, c in self.configurations.items()}
        return json.loads(json.dumps(out))

    def to_json(self) -> str:
        """Indented JSON, for people as much as for programs."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> "Plans":
        """Read a plans dict back, checked against the schema (planning/validate.py) first.

        Raises:
            PlanningError: one line naming each offending key and value.
        """
        from AutoSegLib.planning.validate import plans_problems, summarize

        if not isinstance(data, dict):
            raise PlanningError(summarize(plans_problems(data)))
        if data.get("version") != PLANS_VERSION:
            raise PlanningError(f"plans version {data.get('version')!r} is not supported (expected {PLANS_VERSION})")
        problems = plans_problems(data)
        if problems:
            raise PlanningError(summarize(problems))
        configurations = {k: Configuration.from_dict(k, v) for k, v in data.get("configurations", {}).items()}
        known = {f.name for f in fields(cls)} - {"configurations"}
        try:
            return cls(configurations=configurations, **{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise PlanningError(f"plans: {exc}") from None

    def summary(self) -> str:
        """One line per configuration: spacing, patch, batch, network depth, cascade links."""
        from AutoSegLib.planning.explain import mm, vox

        title = f"Plan for {self.dataset_name}" if self.dataset_name else "Plan"
        lines = [f"{title} ({self.num_training_cases} cases, GPU memory {self.gpu_memory_gb:g} GB)"]
        for name, c in self.configurations.items():
            link = f", after {c.previous_stage}" if c.previous_stage else ""
            lines.append(f"  {name:19s} spacing {mm(c.spacing):24s} patch {vox(c.patch_size):15s} "
                         f"batch {c.batch_size:<4d} {len(c.strides)} stages{link}")
        return "\n".join(lines)

    def explain(self) -> str:
        """The ``--explain`` report: why each decision was taken, in plain language."""
        from AutoSegLib.planning.explain import render

        title = f"Plan for {self.dataset_name}" if self.dataset_name else "Plan"
        header = f"{title} (GPU memory {self.gpu_memory_gb:g} GB; {self.planner})"
        return render(self.explanation, {k: c.explanation for k, c in self.configurations.items()}, header)
