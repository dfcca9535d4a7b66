"""``autoseg export-model``: a model folder as a zip of JSON files and safetensors weights.

Only the files listed in :mod:`AutoSegLib.sharing` go in: the weights of each exported fold
(loaded safely, network weights only: no optimizer state, no pickle), the model's JSON files
byte for byte, the model card, and the manifest of sizes and SHA-256 hashes. The zip is
written under a temporary name and renamed into place.
"""

from __future__ import annotations

import datetime
import json
import stat
import zipfile
from pathlib import Path

from AutoSegLib import __version__
from AutoSegLib.events import Reporter
from AutoSegLib.fileutil import atomic_path, read_json
from AutoSegLib.models.folder import ModelFolder
from AutoSegLib.models.choice import DEFAULT_CHECKPOINT, parse_folds, trained_configurations
from AutoSegLib.names import DATASET_FILE, ENSEMBLE_SEPARATOR, INFERENCE_PLAN_FILE, PLANS_FILE
from AutoSegLib.sharing.card import build_card, card_markdown
from AutoSegLib.sharing.scores import fold_summaries, pooled_scores
from AutoSegLib.sharing.rules import (CARD_FILE, CARD_MARKDOWN_FILE, MANIFEST_FILE, SharingError, build_manifest,
                                      safetensors_torch, sha256_hex, weights_name)

STAGE = "export-model"


def export_model(model_dir: str | Path, output: str | Path, configurations: list[str] | None = None,
                 folds=None, notes: str = "", reporter: Reporter | None = None) -> dict:
    """Write ``model_dir`` (or the chosen configurations and folds of it) to the zip ``output``.

    Args:
        configurations: default: every configuration with a finished fold.
        folds: default: every finished fold of each configuration; else each must have them.
        notes: free text for the model card.

    Returns:
        What the ``done`` event reports: the zip, its size, configurations and folds.

    Raises:
        SharingError, ModelFolderError: ``output`` exists, nothing is trained, a configuration or
            fold is not there, a cascade lacks its first stage, a checkpoint is unsafe or damaged.

    Example:
        >>> export_model("Dataset002_MR.autoseg/model", "mr-model.zip", notes="phantoms")  # doctest: +SKIP
    """
    reporter = reporter or Reporter(quiet=True)
    output = Path(output)
    if output.exists():
        raise SharingError(f"{output}: already exists; choose another name or delete it")
    model = ModelFolder.open(model_dir)
    if type(model) is not ModelFolder:  # e.g. an nnU-Net v2 folder, whose plans.json is in nnU-Net's format
        raise SharingError(f"{model.path}: export-model takes AutoSeg model folders (WORK/model); this is a "
                           f"{type(model).__name__}")
    plan = model.inference_plan
    checkpoint = plan["checkpoint"] if plan else DEFAULT_CHECKPOINT
    selection = _selection(model, configurations, folds, checkpoint)
    if plan is not None and not _plan_fits(plan, selection):
        reporter.warning(STAGE, f"{model.path / INFERENCE_PLAN_FILE} is left out: it predicts with "
                         f"{ENSEMBLE_SEPARATOR.join(plan['configurations'])} folds {plan['folds']}, which are not "
                         "all exported; the imported model will need -c")
        plan = None
    created = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    card = build_card(read_json(model.path / PLANS_FILE), read_json(model.path / DATASET_FILE), selection, checkpoint,
                      fold_summaries=fold_summaries(model.path, selection, on_error=lambda path, exc: reporter.warning(
                          STAGE, f"{path}: left out of the model card ({exc})")),
                      pooled=pooled_scores(model.path, selection, plan), inference_plan=plan,
                      engine_version=__version__, created=created, notes=notes)
    files: dict[str, tuple[int, str]] = {}
    stamp = datetime.datetime.now().timetuple()[:6]
    with atomic_path(output) as tmp, zipfile.ZipFile(tmp, "w") as archive:
        def add(name: str, data: bytes, compress: bool = True) -> None:
            info = zipfile.ZipInfo(name, date_time=stamp)
            info.compress_type = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
            info.external_attr = (stat.S_IFREG | 0o644) << 16  # a regular file, as import requires
            archive.writestr(info, data)
            files[name] = (len(data), sha256_hex(data))

        for name in (PLANS_FILE, DATASET_FILE) + ((INFERENCE_PLAN_FILE,) if plan else ()):
            add(name, (model.path / name).read_bytes())
        with reporter.task(STAGE, sum(map(len, selection.values())), desc="weights") as step:
            for name, fold_list in selection.items():
                for fold in fold_list:
                    # Weights stored, not deflated: float weights barely compress, and it is fast.
                    add(weights_name(name, fold), _weights_bytes(model, name, fold, checkpoint), compress=False)
                    step()
        add(CARD_FILE, _json_bytes(card))
        add(CARD_MARKDOWN_FILE, card_markdown(card).encode("utf-8"))
        add(MANIFEST_FILE, _json_bytes(build_manifest(files, checkpoint, __version__, created)))
    size = output.stat().st_size
    reporter.log(STAGE, f"Wrote {output} ({size / 1e6:.1f} MB): "
                        + ", ".join(f"{name} folds {', '.join(map(str, f))}" for name, f in selection.items())
                        + f", checkpoint {checkpoint}" + (f", {INFERENCE_PLAN_FILE}" if plan else ""))
    return {"archive": str(output), "bytes": size, "configurations": selection, "checkpoint": checkpoint}


def _selection(model: ModelFolder, configurations, folds, checkpoint: str) -> dict[str, list]:
    """configuration -> folds to export, checked against what the folder holds."""
    if configurations:
        names = list(dict.fromkeys(configurations))
    else:
        names = list(trained_configurations(model.path, checkpoint))
        if not names:
            raise SharingError(f"{model.path}: nothing to export: no configuration has a fold with "
                               f"checkpoint_{checkpoint}.pt (train one first)")
    selection = {}
    for name in names:
        config = model.configuration(name)  # planned, and checked
        previous = config.get("previous_stage")
        if previous and previous not in names:
            raise SharingError(f"{name} needs its first stage {previous}: add it, e.g. --configurations "
                               f"{' '.join([*names, previous])}")
        selection[name] = model.resolve_folds(name, None if folds is None else parse_folds(folds), checkpoint)
    return selection


def _plan_fits(plan: dict, selection: dict[str, list]) -> bool:
    """The inference plan predicts only with exported configurations and folds."""
    return all(name in selection and set(plan["folds"]) <= set(selection[name]) for name in plan["configurations"])


def _weights_bytes(model: ModelFolder, name: str, fold, checkpoint: str) -> bytes:
    weights = model.load_weights(name, fold, checkpoint)  # weights_only loading, checksum checked
    # Copies: safetensors refuses tensors that share memory, which a state dict may hold.
    tensors = {key: value.detach().cpu().contiguous().clone() for key, value in weights.items()}
    return safetensors_torch().save(tensors, metadata={"format": "pt", "configuration": name, "fold": str(fold)})


def _json_bytes(value) -> bytes:
    return (json.dumps(value, indent=2) + "\n").encode("utf-8")
