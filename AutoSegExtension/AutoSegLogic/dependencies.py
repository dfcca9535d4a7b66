"""Which Python packages the engine needs that this Python lacks; installing is the GUI's call.

Slicer's Python already has numpy, SimpleITK and VTK; the engine also needs PyTorch and a few
pure-Python packages. Nothing is installed at import time or when the module loads. PyTorch
comes only from the PyTorch extension (the extension depends on it, as SlicerNNUNet and
SlicerTotalSegmentator do; its ``PyTorchUtils`` picks the build matching the GPU driver), never
from a plain ``pip install torch``. The other packages are installed after the user agreed,
by ``python -m pip install`` in a background process (:func:`install_step`), so Slicer stays
responsive.

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
    Requirement("safetensors", "safetensors", "0.4"),
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


TORCH = "torch"


def torch_reason(requirements: Sequence[Requirement] = REQUIREMENTS, find=importlib.util.find_spec,
                 version_of=importlib.metadata.version) -> str:
    """Why the engine cannot run here ('' if PyTorch is usable): for messages and skipped self-tests."""
    torch = [r for r in missing([r for r in requirements if r.module == TORCH], find, version_of)]
    if not torch:
        return ""
    return (f"PyTorch ({torch[0].pip_spec}) is not installed in Slicer's Python; install the PyTorch extension "
            "(Extensions Manager), then PyTorch through it (its module, or AutoSeg's Start training)")


def install_step(requirements: Sequence[Requirement]):
    """The ``pip install`` of the non-PyTorch requirements (run with ``python -m``, see Session)."""
    from AutoSegLogic.jobs import Step

    rest = [r for r in requirements if r.module != TORCH]
    if not rest:
        raise ValueError("nothing to install with pip (PyTorch comes from the PyTorch extension)")
    return Step(["install", "--disable-pip-version-check", *[r.pip_spec for r in rest]],
                f"install {describe(rest)}")
