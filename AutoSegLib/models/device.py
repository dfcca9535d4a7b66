"""Which torch device a model trains or predicts on: one rule for training, inference and the CLI.

``auto`` picks CUDA, then Apple's MPS, then the CPU; asking for a device that is not there is an
error that says what to do. (The Slicer module asks the same question in a child process, since
importing torch would stall its GUI: AutoSegExtension/AutoSegLogic/device.py.)
"""

from __future__ import annotations

from AutoSegLib.names import DEVICES


class DeviceError(ValueError):
    """The device asked for does not exist on this machine; the message says which to use."""


def resolve_device(requested: str):
    """``auto`` picks CUDA, then Apple's MPS, then the CPU; an unavailable choice is an error.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    import torch

    if requested not in DEVICES:
        raise DeviceError(f"unknown device {requested!r}; choose one of {', '.join(DEVICES)}")
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda: no usable CUDA GPU found (is the NVIDIA driver installed, "
                          "and is this PyTorch a CUDA build?); use --device cpu to run on the CPU")
    if requested == "mps" and not has_mps:
        raise DeviceError("--device mps: Apple's Metal backend is not available on this machine")
    return torch.device(requested)
