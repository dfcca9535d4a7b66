"""Names are defined once (AutoSegLib/names.py) and every listing of them follows.

Issue 13: the configuration list had 3-4 copies and the Slicer copy had drifted (no 3d_cpu);
`train --help` and `predict -c` did not name 3d_cpu. These tests read the places users see.
"""

from __future__ import annotations

import re
from pathlib import Path

from AutoSegLib import names
from AutoSegLib.cli_parser import build_parser
from AutoSegLib.planning.plans import CONFIGURATION_NAMES

ROOT = Path(__file__).resolve().parent.parent


def subcommand(name: str):
    parser = build_parser()
    return parser._subparsers._group_actions[0].choices[name]


def option(command: str, flag: str):
    return next(a for a in subcommand(command)._actions if flag in a.option_strings or a.dest == flag)


def test_train_help_names_every_trainable_configuration_and_the_presets():
    text = subcommand("train").format_help()
    flat = " ".join(text.split())
    for name in names.TRAINABLE_CONFIGURATIONS:
        assert name in flat
    assert tuple(option("train", "--preset").choices) == names.PRESETS
    assert option("train", "--preset").default == names.DEFAULT_PRESET == "auto"
    assert tuple(option("train", "--device").choices) == names.DEVICES


def test_predict_takes_every_configuration_a_plan_can_hold():
    assert tuple(option("predict", "-c").choices) == names.CONFIGURATIONS
    assert names.CPU_CONFIGURATION in " ".join(subcommand("predict").format_help().split())


def test_plan_architectures_and_plan_configurations_come_from_names():
    assert tuple(option("plan", "--architecture").choices) == names.ARCHITECTURES
    assert CONFIGURATION_NAMES == names.CONFIGURATIONS


def test_no_other_module_spells_out_the_configuration_list():
    # a tuple literal of configuration names anywhere but names.py is a copy that will drift
    pattern = re.compile(r"\(\s*\"(2d|3d_fullres|3d_lowres|3d_cpu)\"\s*,\s*\"(2d|3d_fullres|3d_lowres|3d_cpu)\"")
    copies = [str(path.relative_to(ROOT)) for folder in ("AutoSegLib", "AutoSegExtension")
              for path in (ROOT / folder).rglob("*.py")
              if path.name != "names.py" and pattern.search(path.read_text(encoding="utf-8"))]
    assert copies == []


def test_code_cites_only_documents_that_are_in_the_repository():
    cited = set()
    for folder in ("AutoSegLib", "AutoSegExtension"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            assert "DESIGN.md" not in text, f"{path} cites DESIGN.md, which is not in the repository"
            cited |= set(re.findall(r"docs/[\w-]+\.md", text))
    missing = sorted(doc for doc in cited if not (ROOT / doc).is_file())
    assert missing == [] and "docs/architecture.md" in cited


def test_listing_reads_like_a_sentence():
    assert names.listing(["a"]) == "a"
    assert names.listing(["a", "b", "c"]) == "a, b or c"
    assert names.listing(["a", "b"], last="and") == "a and b"
