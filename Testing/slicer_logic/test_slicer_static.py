"""What can be checked of the Slicer module without the Slicer application.

The widget cannot run here (no Qt), so its contract with the .ui file and the parameter node
is checked statically: every widget the code looks up exists, every SlicerParameterName is a
parameter of the right type for its widget, the GUI code never waits for a process, and the
build files name every file the module needs.
"""

from __future__ import annotations

import ast
import json
import re
import struct
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "AutoSegExtension"
MODULE = MODULE_DIR / "AutoSeg.py"
UI = MODULE_DIR / "Resources" / "UI" / "AutoSeg.ui"
ICON = MODULE_DIR / "Resources" / "Icons" / "AutoSeg.png"
SOURCE = MODULE.read_text()
TREE = ast.parse(SOURCE)


def ui_widgets() -> dict[str, ET.Element]:
    root = ET.parse(UI).getroot()
    return {w.get("name"): w for w in root.iter("widget")}


def class_node(name: str) -> ast.ClassDef:
    return next(n for n in TREE.body if isinstance(n, ast.ClassDef) and n.name == name)


def parameters() -> dict[str, str]:
    """Parameter-node field -> its annotation as source text."""
    cls = class_node("AutoSegParameterNode")
    return {n.target.id: ast.get_source_segment(SOURCE, n.annotation) for n in cls.body if isinstance(n, ast.AnnAssign)}


def test_the_ui_file_is_valid_designer_xml():
    root = ET.parse(UI).getroot()
    assert root.tag == "ui" and root.find("class").text == "AutoSeg"
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget"  # setMRMLScene reaches the node selectors
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names)), "duplicate widget names"
    custom = {c.find("class").text for c in root.iter("customwidget")}
    used = {w.get("class") for w in root.iter("widget")}
    assert {c for c in used if c.startswith(("ctk", "qMRML"))} <= custom


def test_every_widget_the_code_looks_up_exists():
    widgets = ui_widgets()
    looked_up = set(re.findall(r"self\.ui\.(\w+)", SOURCE))
    for prefix in ("caseChannel", "inputChannel"):  # looked up by name in updateChannelPickers
        looked_up |= {f"{prefix}{c}Selector" for c in range(1, 4)} | {f"{prefix}{c}SelectorLabel" for c in range(1, 4)}
    looked_up |= {f"useChannel{c}{suffix}" for c in range(4) for suffix in ("Selector", "SelectorLabel")}  # showModelCard
    assert looked_up - set(widgets) == set()
    assert len(looked_up) > 20


# widget class -> what its parameterNodeWrapper connector can represent
CONNECTABLE = {"QLineEdit": r"^str$", "QCheckBox": r"^bool$", "ctkPathLineEdit": r"^pathlib\.Path$",
               "QDoubleSpinBox": r"^(Annotated\[)?float\b", "QComboBox": r"^Annotated\[str, Choice\(",
               "qMRMLNodeComboBox": r"^(Union\[)?vtkMRML\w+Node(, vtkMRML\w+Node)*\]?$"}


def test_every_bound_widget_names_a_parameter_of_a_type_it_can_show():
    params = parameters()
    bound = {}
    for name, widget in ui_widgets().items():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                assert prop.get("stdset") == "0", f"{name}: SlicerParameterName must be a dynamic property"
                bound[name] = (widget.get("class"), prop.find("string").text)
    assert len(bound) >= 20
    for name, (cls, param) in bound.items():
        assert param in params, f"{name} is bound to unknown parameter {param!r}"
        assert re.match(CONNECTABLE[cls], params[param]), f"{name} ({cls}) cannot show {param}: {params[param]}"
    assert len({p for _, p in bound.values()}) == len(bound), "two widgets bound to one parameter"


def test_node_selectors_do_not_offer_labelmaps_as_images():
    for name, widget in ui_widgets().items():
        if re.fullmatch(r"(case|input|use)Channel\dSelector", name):
            props = {p.get("name"): p for p in widget.findall("property")}
            assert props["showChildNodeTypes"].find("bool").text == "false", name


BLOCKING = [r"\.wait\(", r"communicate\(", r"\bsleep\(", r"subprocess\.run\(", r"check_output\(", r"check_call\(",
            r"wait_until\(", r"\.join\(\s*(timeout|\))"]


def gui_source() -> str:
    """AutoSeg.py without its test class (tests may wait; the GUI may not)."""
    return SOURCE[:SOURCE.index("class AutoSegTest")]


@pytest.mark.parametrize("pattern", BLOCKING)
def test_the_gui_and_the_job_code_never_wait(pattern):
    code = {"AutoSeg.py (GUI)": gui_source()}
    for name in ("jobs.py", "session.py", "results.py", "curves.py", "device.py", "dataset_export.py", "terminology.py",
                 "library.py", "corrections.py", "segment_masks.py"):
        code[name] = (MODULE_DIR / "AutoSegLogic" / name).read_text()
    for name, text in code.items():
        lines = [line for line in text.splitlines() if re.search(pattern, line) and not line.strip().startswith("#")]
        assert not lines, f"{name} blocks: {lines}"


def test_the_widget_polls_from_a_qt_timer():
    widget = ast.get_source_segment(SOURCE, class_node("AutoSegWidget"))
    assert "qt.QTimer()" in widget and '"timeout()", self.onTimer' in widget
    assert "session.poll()" in widget


def test_packages_are_installed_only_when_the_user_acts():
    """pip_install / installTorch are called inside functions run from buttons, never at import."""
    calls = []

    class Finder(ast.NodeVisitor):
        stack: list[str] = []

        def visit_FunctionDef(self, node):
            self.stack.append(node.name)
            self.generic_visit(node)
            self.stack.pop()

        def visit_Call(self, node):
            name = ast.get_source_segment(SOURCE, node.func)
            if name.endswith(("pip_install", "installTorch")):
                calls.append((name, self.stack[-1] if self.stack else "<module>"))
            self.generic_visit(node)

    Finder().visit(TREE)
    assert calls and {where for _, where in calls} <= {"ensureDependencies", "installTorch"}
    assert "confirmOkCancelDisplay" in ast.get_source_segment(SOURCE, class_node("AutoSegLogic"))


def test_module_metadata_cites_the_method():
    module = ast.get_source_segment(SOURCE, class_node("AutoSeg"))
    for text in ("Isensee", "Nature Methods", "nnU-Net", "helpText", "acknowledgementText", '"Segmentation"'):
        assert text in module
    assert {"AutoSeg", "AutoSegWidget", "AutoSegLogic", "AutoSegTest"} <= {
        n.name for n in TREE.body if isinstance(n, ast.ClassDef)}


def test_icon_is_a_128_pixel_png():
    data = ICON.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (128, 128)


def test_the_build_lists_every_module_file():
    cmake = (MODULE_DIR / "CMakeLists.txt").read_text()
    logic = sorted(p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / "AutoSegLogic").glob("*.py"))
    listed = re.findall(r"^\s+(AutoSegLogic/\S+\.py)$", cmake, re.M)
    assert sorted(listed) == logic
    assert "${MODULE_NAME}.py" in cmake and "slicerMacroBuildScriptedModule(" in cmake
    assert "Resources/UI/${MODULE_NAME}.ui" in cmake and "Resources/Icons/${MODULE_NAME}.png" in cmake
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in cmake
    assert "AutoSegLib/*.py" in cmake and "ctkMacroCompilePythonScript(" in cmake  # the engine is bundled
    top = (REPO / "CMakeLists.txt").read_text()
    for text in ("project(AutoSeg)", "EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS",
                 "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS",
                 "find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "add_subdirectory(AutoSegExtension)",
                 "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"):
        assert text in top


def test_extensions_index_entries():
    folder = REPO / "Resources" / "ExtensionsIndex"
    entry = json.loads((folder / "AutoSeg.json").read_text())
    assert {"$schema", "category", "scm_url"} <= set(entry) and entry["category"] == "Segmentation"
    s4ext = dict(line.split(" ", 1) for line in (folder / "AutoSeg.s4ext").read_text().splitlines()
                 if line.strip() and not line.startswith("#") and " " in line)
    for key in ("scm", "scmurl", "depends", "category", "iconurl", "description", "contributors", "homepage"):
        assert key in s4ext, key


def cmake_settings() -> dict[str, str]:
    """``set(NAME "value")`` of the top-level CMakeLists.txt, ``${NAME}`` references expanded."""
    values = {}
    for name, value in re.findall(r'^set\((EXTENSION_\w+)\s+"([^"]*)"\)', (REPO / "CMakeLists.txt").read_text(), re.M):
        values[name] = re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], value)
    return values


def test_extension_metadata_is_complete_and_consistent():
    cmake = cmake_settings()
    homepage = cmake["EXTENSION_HOMEPAGE"]
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", homepage), homepage
    for name in ("EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL"):
        assert cmake[name], f"{name} is empty"
    for name in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):  # derived from the homepage, naming real files
        for url in cmake[name].split():
            assert url.startswith(f"{homepage}/raw/main/"), url
            assert (REPO / url[len(f"{homepage}/raw/main/"):]).is_file(), url
    assert cmake["EXTENSION_DEPENDS"] == "PyTorch"
    folder = REPO / "Resources" / "ExtensionsIndex"
    entry = json.loads((folder / "AutoSeg.json").read_text())
    assert entry["scm_url"] == f"{homepage}.git" and entry["build_dependencies"] == ["PyTorch"]
    assert entry["category"] == cmake["EXTENSION_CATEGORY"]
    s4ext = dict((line.split(" ", 1) + [""])[:2] for line in (folder / "AutoSeg.s4ext").read_text().splitlines()
                 if line.strip() and not line.startswith("#"))
    assert s4ext["scmurl"] == entry["scm_url"] and s4ext["homepage"] == homepage
    assert s4ext["depends"] == "PyTorch" and s4ext["iconurl"] == cmake["EXTENSION_ICONURL"]
    assert s4ext["screenshoturls"].strip() == cmake["EXTENSION_SCREENSHOTURLS"]
    assert s4ext["category"] == cmake["EXTENSION_CATEGORY"] and s4ext["description"] == cmake["EXTENSION_DESCRIPTION"]
    assert s4ext["contributors"] == cmake["EXTENSION_CONTRIBUTORS"]
    for text in [json.dumps(entry), (folder / "AutoSeg.s4ext").read_text(), (REPO / "CMakeLists.txt").read_text()]:
        assert "REPLACE-WITH" not in text


def test_the_logic_package_never_imports_qt():
    for path in (MODULE_DIR / "AutoSegLogic").glob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
        assert not imported & {"qt", "ctk", "PythonQt"}, path.name
