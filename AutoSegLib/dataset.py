"""The dataset folder: nnU-Net v2's raw layout, so existing nnU-Net datasets work unchanged.

::

    DATASET/
      dataset.json          channel_names, labels, numTraining, file_ending
      imagesTr/{case}_{XXXX}{ending}   one file per channel, XXXX = channel index
      labelsTr/{case}{ending}
      imagesTs/{case}_{XXXX}{ending}   optional, unlabelled

This module only reads names and JSON; it never opens an image (that is ``imageio``'s job)
and never judges content (that is ``verify``'s job). :func:`scan_folder` tolerates every
structural problem and records it, so ``verify`` can report them all at once;
:func:`open_dataset` is the strict entry point later stages use.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from AutoSegLib.fileutil import TMP_PREFIX, read_json, write_json
from AutoSegLib.imageio import SUPPORTED_ENDINGS, file_ending

REQUIRED_KEYS = ("channel_names", "labels", "numTraining", "file_ending")
IGNORE_LABEL_NAME = "ignore"
# Each channel is a network input and each label a network output (a full-resolution map):
# beyond these a dataset.json is damaged rather than ambitious (TotalSegmentator has 118 labels).
MAX_CHANNELS = 256
MAX_LABELS = 1000
_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


class DatasetError(ValueError):
    """The dataset cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class DatasetSpec:
    """The contents of ``dataset.json``.

    Attributes:
        channel_names: channel index -> name ("CT", "T1", ...); the name picks normalization.
        labels: label name -> integer value; "background" is 0; "ignore" marks unannotated voxels.
        num_training: declared number of training cases.
        file_ending: e.g. ".nii.gz"; every image and label file uses it.
        extra: every other key of dataset.json, kept so a rewrite loses nothing.
    """

    channel_names: dict[int, str]
    labels: dict[str, int]
    num_training: int
    file_ending: str
    extra: dict = field(default_factory=dict)

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def ignore_value(self) -> int | None:
        return self.labels.get(IGNORE_LABEL_NAME)

    @property
    def foreground_labels(self) -> dict[str, int]:
        """Labels the network learns: everything except background and ignore."""
        return {n: v for n, v in self.labels.items() if v != 0 and n != IGNORE_LABEL_NAME}

    def to_dict(self) -> dict:
        return {
            "channel_names": {str(k): v for k, v in sorted(self.channel_names.items())},
            "labels": dict(self.labels),
            "numTraining": self.num_training,
            "file_ending": self.file_ending,
            **self.extra,
        }

    @classmethod
    def from_dict(cls, data: dict, source: str = "dataset.json") -> "DatasetSpec":
        """Parse and check a dataset.json dict; raises DatasetError naming every problem."""
        problems = _spec_problems(data)
        if problems:
            raise DatasetError(f"{source}: " + "; ".join(problems))
        extra = {k: v for k, v in data.items() if k not in REQUIRED_KEYS}
        return cls(
            channel_names={int(k): str(v) for k, v in data["channel_names"].items()},
            labels={str(k): int(v) for k, v in data["labels"].items()},
            num_training=int(data["numTraining"]),
            file_ending=str(data["file_ending"]),
            extra=extra,
        )


def _spec_problems(data) -> list[str]:
    if not isinstance(data, dict):
        return ["top level must be a JSON object"]
    problems = [f"missing key '{k}'" for k in REQUIRED_KEYS if k not in data]
    channels = data.get("channel_names")
    if "channel_names" in data:
        if not isinstance(channels, dict) or not channels:
            problems.append("'channel_names' must be a non-empty object like {\"0\": \"CT\"}")
        elif len(channels) > MAX_CHANNELS:
            problems.append(f"'channel_names' has {len(channels)} channels; at most {MAX_CHANNELS} are supported")
        elif sorted(channels) != [str(i) for i in range(len(channels))]:
            problems.append(f"'channel_names' keys must be 0..{len(channels) - 1}, found {sorted(channels)}")
        elif not all(isinstance(v, str) and v.strip() for v in channels.values()):
            problems.append(f"'channel_names' values must be non-empty names like \"CT\", found {channels}")
    labels = data.get("labels")
    if "labels" in data:
        if not isinstance(labels, dict) or not labels:
            problems.append("'labels' must be a non-empty object like {\"background\": 0, \"liver\": 1}")
        elif len(labels) > MAX_LABELS:
            problems.append(f"'labels' has {len(labels)} entries; at most {MAX_LABELS} are supported")
        else:
            problems.extend(_label_problems(labels))
    if "file_ending" in data and data["file_ending"] not in SUPPORTED_ENDINGS:
        problems.append(f"'file_ending' is {data['file_ending']!r}; supported: {', '.join(SUPPORTED_ENDINGS)}")
    if "numTraining" in data and not (isinstance(data["numTraining"], int) and not isinstance(data["numTraining"], bool)
                                      and data["numTraining"] >= 0):
        problems.append(f"'numTraining' must be a non-negative integer, found {data['numTraining']!r}")
    return problems


def _label_problems(labels: dict) -> list[str]:
    problems = []
    bad = {k: v for k, v in labels.items() if isinstance(v, bool) or not isinstance(v, int)}
    if bad:
        # nnU-Net v2 region-based training uses lists here; AutoSeg does not support regions yet.
        problems.append(f"label values must be integers (region-based labels are not supported), found {bad}")
        return problems
    if labels.get("background") != 0:
        problems.append(f"'labels' must map 'background' to 0, found {labels.get('background')!r}")
    values = sorted(v for k, v in labels.items() if k != IGNORE_LABEL_NAME)
    if values != list(range(len(values))):
        problems.append(f"label values (without 'ignore') must be consecutive from 0, found {values}")
    if IGNORE_LABEL_NAME in labels and values and labels[IGNORE_LABEL_NAME] != values[-1] + 1:
        problems.append(f"'ignore' must be the highest label value ({values[-1] + 1}), found {labels[IGNORE_LABEL_NAME]}")
    if len(set(labels.values())) != len(labels):
        problems.append(f"two labels share a value: {labels}")
    return problems


@dataclass(frozen=True)
class Case:
    """One case: its channel files in channel order and its label file (None for test cases)."""

    case_id: str
    images: tuple[Path, ...]
    label: Path | None


@dataclass
class FolderScan:
    """Everything found in one split of a dataset folder, problems included."""

    cases: list[Case]  # complete cases only (all channels and, for training, the label)
    missing_channels: dict[str, list[int]]  # case id -> channel indices without a file
    missing_labels: list[str]  # case ids with images but no label
    orphan_labels: list[Path]  # labels without any image
    duplicates: list[tuple[Path, ...]]  # files that claim the same case/channel
    unexpected: list[tuple[Path, str]]  # files that do not fit the layout, with the reason


def _split_name(path: Path) -> tuple[str, str | None]:
    ending = file_ending(path)
    return (path.name[: -len(ending)], ending) if ending else (path.name, None)


def _list_files(folder: Path, scan: FolderScan) -> list[Path]:
    """The visible files of ``folder``; hidden ones that look like images are recorded as unexpected."""
    if not folder.is_dir():
        return []
    files = sorted(p for p in folder.iterdir() if p.is_file())
    scan.unexpected += [(p, _HIDDEN_REASON) for p in files if _is_hidden_image(p)]
    return [p for p in files if not p.name.startswith(".")]


# A case hidden by a leading dot would be skipped without a word; macOS' "._" Finder files
# (copied along to other systems) look like images too. Our own temporaries are written and
# renamed by one process (fileutil.atomic_path) and are not the user's files.
_HIDDEN_REASON = ("hidden file (name starts with '.') with an image ending, which would be skipped: delete it "
                  "('._' files are macOS Finder metadata) or rename it if it is a case")


def _is_hidden_image(path: Path) -> bool:
    return path.name.startswith(".") and not path.name.startswith(TMP_PREFIX) and file_ending(path) is not None


def _group_images(files: list[Path], spec: DatasetSpec, scan: FolderScan) -> dict[str, dict[int, list[Path]]]:
    groups: dict[str, dict[int, list[Path]]] = defaultdict(lambda: defaultdict(list))
    for path in files:
        stem, ending = _split_name(path)
        match = _CHANNEL_RE.match(stem)
        if ending is None:
            scan.unexpected.append((path, f"not an image file (supported: {', '.join(SUPPORTED_ENDINGS)})"))
        elif ending != spec.file_ending:
            scan.unexpected.append((path, f"file ending {ending} differs from dataset.json file_ending {spec.file_ending}"))
        elif match is None:
            scan.unexpected.append((path, "image name must be {case}_{XXXX}" + spec.file_ending + " with a 4-digit channel index"))
        elif int(match["channel"]) not in spec.channel_names:
            scan.unexpected.append((path, f"channel {int(match['channel'])} is not in channel_names {sorted(spec.channel_names)}"))
        else:
            groups[match["case"]][int(match["channel"])].append(path)
    return groups


def _group_labels(files: list[Path], spec: DatasetSpec, scan: FolderScan) -> dict[str, list[Path]]:
    labels: dict[str, list[Path]] = defaultdict(list)
    for path in files:
        stem, ending = _split_name(path)
        if ending is None:
            scan.unexpected.append((path, f"not an image file (supported: {', '.join(SUPPORTED_ENDINGS)})"))
        elif ending != spec.file_ending:
            scan.unexpected.append((path, f"file ending {ending} differs from dataset.json file_ending {spec.file_ending}"))
        else:
            labels[stem].append(path)
    return labels


def _duplicate_ids(ids, scan: FolderScan, paths_of) -> None:
    # Case ids differing only in letter case collide on Windows and macOS file systems.
    by_lower = defaultdict(list)
    for case_id in ids:
        by_lower[case_id.lower()].append(case_id)
    for group in by_lower.values():
        if len(group) > 1:
            scan.duplicates.append(tuple(p for cid in group for p in paths_of(cid)))


def scan_folder(folder: str | Path, spec: DatasetSpec, split: str = "Tr") -> FolderScan:
    """Match image and label files of ``images{split}``/``labels{split}`` into cases.

    Never raises on layout problems: they are recorded in the returned scan.
    """
    folder = Path(folder)
    scan = FolderScan([], {}, [], [], [], [])
    images = _group_images(_list_files(folder / f"images{split}", scan), spec, scan)
    labelled = split == "Tr"
    labels = _group_labels(_list_files(folder / f"labels{split}", scan), spec, scan) if labelled else {}

    for case_id, channels in images.items():
        for paths in channels.values():
            if len(paths) > 1:
                scan.duplicates.append(tuple(paths))
    _duplicate_ids(images, scan, lambda cid: [p for ps in images[cid].values() for p in ps])

    for case_id in sorted(images):
        channels = images[case_id]
        missing = [c for c in sorted(spec.channel_names) if c not in channels]
        if missing:
            scan.missing_channels[case_id] = missing
        if labelled and case_id not in labels:
            scan.missing_labels.append(case_id)
        if not missing and (not labelled or case_id in labels):
            label = labels[case_id][0] if labelled else None
            scan.cases.append(Case(case_id, tuple(channels[c][0] for c in sorted(spec.channel_names)), label))
    scan.orphan_labels = [paths[0] for cid, paths in sorted(labels.items()) if cid not in images]
    return scan


def load_spec(folder: str | Path) -> DatasetSpec:
    """Read ``folder/dataset.json``; raises DatasetError naming the file and every problem."""
    path = Path(folder) / "dataset.json"
    if not path.is_file():
        raise DatasetError(f"{path}: dataset.json not found (is {folder} a dataset folder?)")
    try:
        data = read_json(path)
    except ValueError as exc:
        raise DatasetError(str(exc)) from exc
    return DatasetSpec.from_dict(data, source=str(path))


def save_spec(folder: str | Path, spec: DatasetSpec) -> None:
    write_json(Path(folder) / "dataset.json", spec.to_dict())


@dataclass(frozen=True)
class Dataset:
    """A dataset folder whose layout is sound: the strict view later stages use."""

    folder: Path
    spec: DatasetSpec
    cases: tuple[Case, ...]

    def case(self, case_id: str) -> Case:
        for case in self.cases:
            if case.case_id == case_id:
                return case
        raise KeyError(f"{self.folder}: no training case '{case_id}'")

    @property
    def case_ids(self) -> list[str]:
        return [c.case_id for c in self.cases]


def open_dataset(folder: str | Path) -> Dataset:
    """Open a dataset folder for processing; raises DatasetError on any layout problem.

    Content problems (shapes, geometry, label values) are ``verify``'s job; run it first.
    """
    folder = Path(folder)
    spec = load_spec(folder)
    scan = scan_folder(folder, spec)
    problems = layout_problems(scan)
    if not scan.cases and not problems:
        problems.append(f"{folder / 'imagesTr'}: no training cases found")
    if problems:
        raise DatasetError(f"{folder}: " + "; ".join(problems) + " (run `autoseg verify` for a full report)")
    return Dataset(folder, spec, tuple(scan.cases))


def layout_problems(scan: FolderScan) -> list[str]:
    """Plain-language problems of a scan, each naming the files involved."""
    problems = []
    for case_id, channels in scan.missing_channels.items():
        problems.append(f"case '{case_id}' is missing channel file(s) {', '.join(f'{c:04d}' for c in channels)}")
    problems += [f"case '{c}' has images but no label in labelsTr" for c in scan.missing_labels]
    problems += [f"{p}: label has no image (expected imagesTr/{_split_name(p)[0]}_0000...)" for p in scan.orphan_labels]
    problems += ["duplicate case id: " + ", ".join(str(p) for p in group) for group in scan.duplicates]
    problems += [f"{p}: {reason}" for p, reason in scan.unexpected]
    return problems
