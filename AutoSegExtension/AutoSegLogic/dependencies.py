"""Which Python packages the engine needs that this Python lacks; installing is the GUI's call.

Slicer's Python already has numpy, SimpleITK and VTK; the engine also needs PyTorch and a few
pure-Python packages. Nothing is installed at import time or when the module loads: the
widget asks the user first (``slicer.util.confirmOkCancelDisplay``), installs PyTorch through
the PyTorch extension's ``PyTorchUtils`` when it is present (it picks the build matching the
GPU driver) and the rest with ``slicer.util.pip_install``.

Keep :data:`REQUIREMENTS` in step with ``pyproject.toml``'s dependencies (a test checks it).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from dataclasses import dataclass
from typing import Callable, Sequence


@dataclass(frozen=True)
class Requirement:
    distribution: str  # the name pip installs
    module: str  # the name Python imports
    minimum: str | None = None

    @property
    def pip_spec(self) -> str:
        return f"{self.distribution}>={self.minimum}" if self.minimum else self.distribution


REQUIREMENTS = (
    # torch < 2.10 has weights_only bypasses (CVE-2025-32434 and a later unpickler bug).
    Requirement("torch", "torch", "2.10"),
    Requirement("numpy", "numpy", "1.24"),
    Requirement("scipy", "scipy", "1.10"),
    Requirement("SimpleITK", "SimpleITK", "2.3"),
    Requirement("tqdm", "tqdm", "4.60"),
    Requirement("batchgeneratorsv2", "batchgeneratorsv2", "0.3.6"),
    Requirement("matplotlib", "matplotlib", "3.5"),
)


def version_tuple(text: str) -> tuple[int, ...]:
    """``"2.10.1+cu121"`` -> ``(2, 10, 1)``: the numeric release part, for comparisons."""
    parts = []
    for piece in text.split("+")[0].split("."):
        match = re.match(r"\d+", piece)
        if not match:
            break
        parts.append(int(match.group()))
    return tuple(parts)


def missing(requirements: Sequence[Requirement] = REQUIREMENTS,
            find: Callable[[str], object] = importlib.util.find_spec,
            version_of: Callable[[str], str] = importlib.metadata.version) -> list[Requirement]:
    """Requirements not importable, or older than their minimum."""
    out = []
    for req in requirements:
        if find(req.module) is None:
            out.append(req)
            continue
        if req.minimum:
            try:
                installed = version_of(req.distribution)
            except importlib.metadata.PackageNotFoundError:
                continue  # importable but not pip-installed (e.g. built into Slicer): trust it
            if version_tuple(installed) < version_tuple(req.minimum):
                out.append(req)
    return out


def describe(requirements: Sequence[Requirement]) -> str:
    return ", ".join(r.pip_spec for r in requirements)
