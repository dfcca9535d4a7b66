"""The layers of docs/architecture.md hold: the model layer (AutoSegLib/models/) serves inference,
evaluation, sharing and the Slicer module without their reaching into training."""

from __future__ import annotations

import subprocess
import sys


def loaded_after(imports: str) -> set[str]:
    code = f"import sys; {imports}; print(' '.join(m for m in sys.modules if m.startswith('AutoSegLib')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


def test_inference_evaluation_and_sharing_use_the_model_layer_not_training():
    loaded = loaded_after("import AutoSegLib.inference, AutoSegLib.evaluation.selection, "
                          "AutoSegLib.sharing.importer, AutoSegLib.sharing.exporter")
    assert {"AutoSegLib.models.folder", "AutoSegLib.models.checkpoint"} <= loaded
    # fold names are parsed by the splits module (pure, no torch); nothing else of training loads
    assert {m for m in loaded if m.startswith("AutoSegLib.training.")} <= {"AutoSegLib.training.splits"}


def test_the_configuration_rule_and_nnunet_layout_need_no_torch():
    code = ("import sys, AutoSegLib.models.choice, AutoSegLib.models.nnunet_layout, AutoSegLib.names; "
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr
