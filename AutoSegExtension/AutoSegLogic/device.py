"""Which device training would use, found out without blocking: a short background process.

The configuration picker's ``auto`` depends on it (3d_fullres and the paper's schedule on a
GPU, 3d_cpu and the quick schedule on a CPU). Importing PyTorch takes a second or two, too
long for Slicer's GUI thread, so a child process imports it and prints the answer;
:meth:`DeviceProbe.poll` picks it up when it is there.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

# The engine's own rule (AutoSegLib.training.setup.resolve_device): CUDA, then Apple's MPS, else the CPU.
_PROBE = ("import torch; mps = getattr(torch.backends, 'mps', None);"
          "print('cuda' if torch.cuda.is_available() else 'mps' if mps is not None and mps.is_available() else 'cpu')")


class DeviceProbe:
    """``device_type``: None until known, then ``"cuda"``, ``"mps"`` or ``"cpu"``.

    Without PyTorch the answer is ``"cpu"`` at once (nothing can use a GPU yet).
    """

    def __init__(self, python: str | None = None, env: dict | None = None):
        self.python, self.env = python or sys.executable, env
        self.device_type: str | None = None
        self._proc: subprocess.Popen | None = None

    def start(self) -> "DeviceProbe":
        if importlib.util.find_spec("torch") is None and self.python == sys.executable:
            self.device_type = "cpu"
            return self
        self._proc = subprocess.Popen([self.python, "-c", _PROBE], stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                                      env=dict(self.env if self.env is not None else os.environ))
        return self

    def poll(self) -> str | None:
        """The device type once the probe has ended (``cpu`` if it failed); never waits."""
        if self.device_type is None and self._proc is not None and self._proc.poll() is not None:
            answer = self._proc.stdout.read().decode(errors="replace").strip().splitlines()
            self._proc.stdout.close()
            self.device_type = answer[-1] if answer and answer[-1] in ("cuda", "mps", "cpu") else "cpu"
        return self.device_type
