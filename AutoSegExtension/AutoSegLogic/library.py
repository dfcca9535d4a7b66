"""The user's models: a models folder with a small registry, model cards, and "Use a model".

Three kinds of model can be used (:data:`KINDS`):

- ``autoseg-zip``: a zip made by ``autoseg export-model``, unpacked *into* the models folder by
  ``autoseg import-model`` (an engine process, never the GUI thread; :meth:`ModelLibrary.import_step`);
  the folder keeps the zip's ``model_card.json``.
- ``autoseg-folder``: an AutoSeg model folder (``WORK/model``; picking ``WORK`` finds it).
- ``nnunet-folder``: an nnU-Net v2 trained model folder (``TRAINER__PLANS__CONFIG``) or a
  dataset's results folder holding several (docs/nnunet-models.md).

Folders are registered *by reference*: the registry (``models.json`` in the models folder,
written atomically) records name, path, kind and the date added; nothing is copied. Removing
an entry deletes files only for imported models, which live in the models folder.

Everything here is torch-free and quick (JSON files only), so the widget calls it directly.
Predicting goes through :meth:`AutoSegLogic.session.Session.start_prediction`, i.e. the same
``autoseg predict -m`` process and the same segments (names, terminology, colours) as for a
model trained in the module.
"""

from __future__ import annotations

import datetime
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from AutoSegLib.models import choice as modelchoice
from AutoSegLib.fileutil import TMP_PREFIX, read_json, write_json
from AutoSegLib.models import nnunet_layout
from AutoSegLib.names import DATASET_FILE, INFERENCE_PLAN_FILE, MODEL_DIR, PLANS_FILE, SUMMARY_FILE, VALIDATION_DIR
from AutoSegLib.sharing import card as card_rules, scores as card_scores

from AutoSegLogic import commands, labels as label_rules
from AutoSegLogic.jobs import Step

REGISTRY_FILE = "models.json"
REGISTRY_VERSION = 1
CARD_FILE = "model_card.json"  # what import-model keeps from the zip (AutoSegLib.sharing.rules.CARD_FILE)
AUTOSEG_ZIP, AUTOSEG_FOLDER, NNUNET_FOLDER = "autoseg-zip", "autoseg-folder", "nnunet-folder"
KINDS = {AUTOSEG_ZIP: "AutoSeg model (imported zip)", AUTOSEG_FOLDER: "AutoSeg model folder",
         NNUNET_FOLDER: "nnU-Net v2 model folder"}


class LibraryError(ValueError):
    """A model cannot be added, found or used; the message names the path or entry."""


@dataclass
class ModelEntry:
    """One registered model."""

    name: str
    path: str  # relative to the models folder for imported models, else absolute
    kind: str
    added: str
    source: str = ""  # the zip an imported model came from

    def folder(self, library_folder: Path) -> Path:
        path = Path(self.path)
        return path if path.is_absolute() else Path(library_folder) / path


@dataclass
class ModelCard:
    """What the module shows about a model before it is used."""

    name: str
    kind: str
    path: Path
    channels: list[str]  # channel names in the model's order
    labels: dict[str, int]
    configurations: dict[str, dict]  # name -> folds, spacing, patch_size, network, cross_validation?
    normalization: dict[str, list] = field(default_factory=dict)  # configuration -> scheme per channel
    notes: str = ""
    created: str = ""
    engine: str = ""
    training_cases: int | None = None
    predicts_with: str = ""  # the configuration rule's choice, or why there is none
    pooled: dict = field(default_factory=dict)

    @property
    def structures(self) -> list[str]:
        return [n for n, _ in label_rules.foreground(self.labels)]

    def modality(self, channel: int) -> str:
        """What channel ``channel`` expects, from its name and normalization."""
        schemes = {s[channel] for s in self.normalization.values() if channel < len(s)}
        name = self.channels[channel]
        if "CTNormalization" in schemes:
            return f"{name} (CT in Hounsfield units)"
        if schemes:
            return f"{name} (intensities z-scored per image: MR or other)"
        return name

    def text(self) -> str:
        lines = [f"{self.name} ({KINDS.get(self.kind, self.kind)})", f"Folder: {self.path}"]
        if self.notes:
            lines.append(f"Notes: {self.notes}")
        if self.created or self.engine:
            lines.append("Exported " + " with ".join(p for p in (self.created, self.engine) if p))
        if self.training_cases:
            lines.append(f"Trained on {self.training_cases} case(s)")
        lines.append("Channels: " + "; ".join(f"{c + 1}: {self.modality(c)}" for c in range(len(self.channels))))
        lines.append("Labels: " + ", ".join(f"{n} ({v})" for n, v in label_rules.foreground(self.labels)))
        for name, entry in self.configurations.items():
            folds = ", ".join(map(str, entry.get("folds") or [])) or "none finished"
            spacing = " x ".join(f"{s:g}" for s in entry.get("spacing") or []) or "?"
            line = f"Configuration {name}: folds {folds}; spacing {spacing} mm"
            if entry.get("network"):
                line += f"; {entry['network']}"
            mean = (entry.get("cross_validation") or {}).get("mean_over_folds") or {}
            if mean.get("mean_foreground_dice") is not None:
                per = ", ".join(f"{k} {v:.3f}" for k, v in (mean.get("per_class") or {}).items() if v is not None)
                line += f"; CV Dice {mean['mean_foreground_dice']:.3f}" + (f" ({per})" if per else "")
            lines.append(line)
        for name, scores in self.pooled.items():
            if scores.get("mean_foreground_dice") is not None:
                lines.append(f"Pooled CV Dice of {name}: {scores['mean_foreground_dice']:.3f}")
        if not any(e.get("cross_validation") for e in self.configurations.values()) and not self.pooled:
            lines.append("CV Dice: not known (no validation results in the model)")
        lines.append(f"Predicts with: {self.predicts_with}")
        return "\n".join(lines)


class ModelLibrary:
    """The registry of one models folder (Slicer: under the user's settings folder).

    Example::

        library = ModelLibrary(Path.home() / ".config/slicer.org/AutoSegModels")
        entry = library.register_folder("D:/data/Dataset001_Liver.autoseg/model")
        print(library.card(entry.name).text())
    """

    def __init__(self, folder):
        self.folder = Path(folder)

    # -- registry ----------------------------------------------------------------------------------
    @property
    def registry_path(self) -> Path:
        return self.folder / REGISTRY_FILE

    def models(self) -> list[ModelEntry]:
        """Registered models in the order added (an unreadable registry is an error, never overwritten)."""
        if not self.registry_path.is_file():
            return []
        data = read_json(self.registry_path)
        if not isinstance(data, dict) or not isinstance(data.get("models"), list):
            raise LibraryError(f"{self.registry_path}: not an AutoSeg models registry")
        if data.get("version") != REGISTRY_VERSION:
            raise LibraryError(f"{self.registry_path}: registry version {data.get('version')!r} is not supported "
                               f"(this AutoSeg reads version {REGISTRY_VERSION})")
        known = set(ModelEntry.__dataclass_fields__)
        try:
            return [ModelEntry(**{k: v for k, v in m.items() if k in known}) for m in data["models"]]
        except (TypeError, AttributeError):
            raise LibraryError(f"{self.registry_path}: an entry lacks its name, path, kind or date") from None

    def names(self) -> list[str]:
        return [m.name for m in self.models()]

    def get(self, name: str) -> ModelEntry:
        for entry in self.models():
            if entry.name == name:
                return entry
        raise LibraryError(f"no model named {name!r} in {self.registry_path}")

    def path_of(self, name: str) -> Path:
        return self.get(name).folder(self.folder)

    def _write(self, entries: list[ModelEntry]) -> None:
        write_json(self.registry_path, {"version": REGISTRY_VERSION, "models": [asdict(e) for e in entries]})

    def _add(self, entry: ModelEntry) -> ModelEntry:
        self._write(self.models() + [entry])
        return entry

    def unique_name(self, wanted: str) -> str:
        taken = set(self.names()) | ({p.name for p in self.folder.iterdir()} if self.folder.is_dir() else set())
        base = re.sub(r"[^\w.+-]+", "_", wanted).strip("._") or "model"
        name, n = base, 2
        while name in taken:
            name, n = f"{base}-{n}", n + 1
        return name

    def remove(self, name: str) -> None:
        """Forget a model; an imported one's folder (inside the models folder) is deleted too.
        A registered folder is only forgotten: its files are the user's."""
        entry = self.get(name)
        self._write([m for m in self.models() if m.name != name])
        if entry.kind == AUTOSEG_ZIP and not Path(entry.path).is_absolute():
            shutil.rmtree(entry.folder(self.folder), ignore_errors=True)

    # -- folders -----------------------------------------------------------------------------------
    def register_folder(self, path, name: str | None = None) -> ModelEntry:
        """Register an AutoSeg or nnU-Net v2 model folder by reference (checked, nothing copied).

        Raises:
            LibraryError: not a model folder, nothing trained, an nnU-Net feature AutoSeg does not
                reproduce, or the folder is already registered (naming its entry).
        """
        folder, kind = find_model_folder(path)
        for entry in self.models():
            if entry.kind != AUTOSEG_ZIP and _same(entry.folder(self.folder), folder):
                raise LibraryError(f"{folder}: already in the models list as {entry.name!r}")
        card = read_card(folder, kind)  # refuses what cannot be shown or used
        wanted = name or (folder.parent.name if folder.name == MODEL_DIR else None) or card.name or folder.name
        wanted = wanted.removesuffix(".autoseg")
        return self._add(ModelEntry(self.unique_name(wanted), str(folder), kind, _now()))

    # -- zips --------------------------------------------------------------------------------------
    def import_step(self, archive, name: str | None = None) -> tuple[Step, str]:
        """``autoseg import-model ARCHIVE -o MODELS/NAME`` for a background job, and NAME.

        Register the result with :meth:`finish_import` once the job has *succeeded*; after a
        failure call :meth:`discard_import` (removes what a killed import left).
        """
        archive = Path(archive)
        if not archive.is_file():
            raise LibraryError(f"{archive}: no such file")
        if archive.suffix.lower() != ".zip":
            raise LibraryError(f"{archive}: not a .zip file (make one with `autoseg export-model`)")
        for entry in self.models():
            if entry.source and _same(Path(entry.source), archive) and entry.folder(self.folder).is_dir():
                raise LibraryError(f"{archive}: already imported as {entry.name!r}")
        self.folder.mkdir(parents=True, exist_ok=True)
        name = self.unique_name(name or archive.stem)
        commands.require("import-model", "-o")
        return Step(["import-model", str(archive), "-o", str(self.folder / name)], f"import {archive.name}",
                    weight=1.0), name

    def finish_import(self, name: str, archive) -> ModelEntry:
        """Register the folder a successful ``import-model`` made."""
        folder = self.folder / name
        read_card(folder, AUTOSEG_ZIP)
        return self._add(ModelEntry(name, name, AUTOSEG_ZIP, _now(), str(Path(archive).resolve())))

    def discard_import(self, name: str) -> None:
        """After a failed or cancelled import: remove its temporary folder if a kill left one."""
        for leftover in self.folder.glob(f"{TMP_PREFIX}*-{name}"):
            shutil.rmtree(leftover, ignore_errors=True)

    # -- cards and prediction ----------------------------------------------------------------------
    def card(self, name: str) -> ModelCard:
        entry = self.get(name)
        card = read_card(entry.folder(self.folder), entry.kind)
        card.name = f"{entry.name}" + (f" ({card.name})" if card.name and card.name != entry.name else "")
        return card

    def start_prediction(self, session, name: str, volumes: Sequence, configuration: str | None = None,
                         tta: bool = True, device: str = "auto", uncertainty: bool = False):
        """Segment ``volumes`` (one per channel, in the card's order) with the model ``name``."""
        entry = self.get(name)
        folder = entry.folder(self.folder)
        card = read_card(folder, entry.kind)
        given = [v for v in volumes if v is not None]
        if len(given) != len(card.channels):
            raise LibraryError(f"{entry.name} expects {len(card.channels)} channel(s) "
                               f"({', '.join(card.channels)}); {len(given)} volume(s) given")
        result_name = f"{given[0].GetName()} {entry.name}"
        return session.start_prediction(given, folder, configuration, None, tta, device, uncertainty,
                                        result_name=result_name)


# -- reading model folders (pure file reads) --------------------------------------------------------
def find_model_folder(path) -> tuple[Path, str]:
    """(model folder, kind) of what the user picked: a model folder, ``WORK`` or an nnU-Net folder."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise LibraryError(f"{path}: not a folder")
    path = path.resolve()
    if nnunet_layout.is_nnunet_model(path):
        return path, NNUNET_FOLDER
    for candidate in (path, path / MODEL_DIR):
        if (candidate / PLANS_FILE).is_file() and (candidate / DATASET_FILE).is_file():
            return candidate, AUTOSEG_FOLDER
    raise LibraryError(f"{path}: not a model folder (an AutoSeg model folder has {PLANS_FILE} and {DATASET_FILE}; an "
                       "nnU-Net v2 one is named TRAINER__PLANS__CONFIGURATION or holds such folders)")


def dataset_file(folder) -> Path:
    """The ``dataset.json`` of a model folder (an nnU-Net results folder: its first trained folder's)."""
    folder = Path(folder)
    if (folder / DATASET_FILE).is_file() or not nnunet_layout.is_nnunet_model(folder):
        return folder / DATASET_FILE
    found = nnunet_layout.model_folders(folder)
    return next(iter(found.values()))[0] / DATASET_FILE


def read_card(folder, kind: str) -> ModelCard:
    """The card of a model folder of ``kind``; refuses a folder that is not usable, in one line."""
    folder = Path(folder)
    try:
        if kind == NNUNET_FOLDER:
            card = _nnunet_card(folder)
        else:
            card = _autoseg_card(folder, kind)
    except (OSError, KeyError, TypeError, AttributeError) as exc:
        raise LibraryError(f"{folder}: cannot read the model ({exc})") from None
    except modelchoice.ModelFolderError as exc:
        raise LibraryError(str(exc)) from None
    try:
        card.predicts_with = commands.predict_choice(folder).describe()
    except ValueError as exc:
        card.predicts_with = f"choose a configuration ({exc})"
    return card


def _autoseg_card(folder: Path, kind: str) -> ModelCard:
    plans, dataset = read_json(folder / PLANS_FILE), read_json(folder / DATASET_FILE)
    if (folder / CARD_FILE).is_file():  # an imported zip's card, as its author exported it
        data = read_json(folder / CARD_FILE)
    else:
        trained = modelchoice.trained_configurations(folder)
        if not trained:
            raise LibraryError(f"{folder}: no configuration has a finished fold (checkpoint_final.pt)")
        plan_path = folder / INFERENCE_PLAN_FILE
        plan = modelchoice.read_inference_plan(plan_path) if plan_path.is_file() else None
        data = card_rules.build_card(plans, dataset, trained, modelchoice.DEFAULT_CHECKPOINT,
                                     fold_summaries=card_scores.fold_summaries(folder, trained),
                                     pooled=card_scores.pooled_scores(folder, trained, plan),
                                     inference_plan=plan, engine_version="", created="", notes="")
    configurations = data.get("configurations") or {}
    planned = plans.get("configurations", {})
    return ModelCard(name=str(data.get("name") or folder.name), kind=kind, path=folder,
                     channels=_channels(data.get("channels") or dataset["channel_names"]),
                     labels={str(k): int(v) for k, v in (data.get("labels") or dataset["labels"]).items()},
                     configurations=configurations,
                     normalization={n: list(planned.get(n, {}).get("normalization_schemes") or [])
                                    for n in configurations},
                     notes=str(data.get("notes") or ""), created=str(data.get("created") or ""),
                     engine=" ".join(str(v) for v in (data.get("engine") or {}).values() if v)
                     if data.get("created") else "",
                     training_cases=data.get("training_cases") or dataset.get("numTraining"),
                     pooled=data.get("pooled_cross_validation") or {})


def _nnunet_card(folder: Path) -> ModelCard:
    from AutoSegLib.models import nnunet_plans

    found = nnunet_layout.model_folders(folder)
    problem = nnunet_layout.ambiguity(folder, found)
    if problem:
        raise LibraryError(problem)
    dataset_path = dataset_file(folder)
    dataset = nnunet_plans.convert_dataset(read_json(dataset_path), str(dataset_path))
    labels = {str(k): int(v) for k, v in dataset["labels"].items()}
    names_by_value = {str(v): k for k, v in labels.items()}
    configurations, normalization, name = {}, {}, ""
    for configuration, (trained_folder, *_) in found.items():
        source = trained_folder / PLANS_FILE
        plans = read_json(source)
        name = name or str(plans.get("dataset_name") or "")
        converted = nnunet_plans.convert_configuration(plans, configuration, str(source))  # refuses what differs
        folds = nnunet_layout.trained_folds(trained_folder)
        entry = {"folds": folds, "spacing": converted.get("spacing"), "patch_size": converted.get("patch_size"),
                 "network": (converted.get("network") or {}).get("architecture"),
                 "folder": trained_folder.name}
        per_fold = {}
        for fold in folds:
            path = trained_folder / nnunet_layout.fold_dir_name(fold) / VALIDATION_DIR / SUMMARY_FILE
            if path.is_file():
                scores = card_rules.dice_scores(read_json(path))
                if scores is not None:  # nnU-Net keys classes by value
                    scores["per_class"] = {names_by_value.get(k, k): v for k, v in scores["per_class"].items()}
                    per_fold[str(fold)] = scores
        if per_fold:
            entry["cross_validation"] = {"per_fold": per_fold, "mean_over_folds": card_rules.mean_over_folds(per_fold)}
        configurations[configuration] = entry
        normalization[configuration] = list(converted.get("normalization_schemes") or [])
    if not any(e["folds"] for e in configurations.values()):
        raise LibraryError(f"{folder}: no nnU-Net v2 configuration has a fold with checkpoint_final.pth")
    return ModelCard(name=name or folder.name, kind=NNUNET_FOLDER, path=folder,
                     channels=_channels(dataset["channel_names"]), labels=labels, configurations=configurations,
                     normalization=normalization, training_cases=dataset.get("numTraining"),
                     notes=str(dataset.get("description") or ""))


def _channels(channel_names: dict) -> list[str]:
    return [str(channel_names[k]) for k in sorted(channel_names, key=int)]


def _same(a: Path, b: Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")
