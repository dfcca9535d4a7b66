"""The predictor: a trained model folder applied to in-memory images, no temporary files.

One case goes::

    channels (z, y, x) + geometry
      -> per configuration: preprocess_case (crop, transpose, normalize, resample)
         [cascade: + the low-resolution stage's segmentation, one-hot, as extra channels]
         -> per fold: sliding-window logits (Gaussian-weighted, mirrored) -> softmax
         -> mean over folds -> restore_probabilities (back to the input's grid)
      -> mean over configurations (an ensemble of two) -> argmax -> [postprocessing]

With one configuration and no probabilities wanted, the restore and the argmax are one step
(restore_labels, a class at a time): the K class probabilities never exist on the input grid.

:meth:`Predictor.predict` runs three phases that a batch of cases can overlap
(:mod:`.pipeline`): :meth:`~Predictor.prepare` (checks, preprocessing; no network),
:meth:`~Predictor.run_network` (sliding windows, softmax, fold mean; a cascade's whole chain)
and :meth:`~Predictor.finish` (back to the input grid, argmax, postprocessing; no network).

Folds and configurations are ensembled by averaging softmax probabilities (what find-best
measured from the saved ``.npz`` files). nnU-Net v2 averages the *logits* of the folds of one
configuration before its softmax; the two differ only where folds disagree strongly.

Example (3D Slicer's Python console; Slicer stores RAS, AutoSeg's geometry is ITK's LPS)::

    import numpy as np, vtk, slicer
    from AutoSegLib.inference import Predictor
    from AutoSegLib.imageio import Geometry

    predictor = Predictor.from_model_dir("/data/Dataset001_Liver.autoseg/model")
    volume = slicer.util.getNode("CT")
    m = vtk.vtkMatrix4x4(); volume.GetIJKToRASDirectionMatrix(m)
    ras = np.array([[m.GetElement(r, c) for c in range(3)] for r in range(3)])
    x, y, z = volume.GetOrigin()
    geometry = Geometry(tuple(reversed(volume.GetSpacing())), (-x, -y, z),
                        tuple((np.diag([-1, -1, 1]) @ ras).ravel()))
    labels, probabilities = predictor.predict([slicer.util.arrayFromVolume(volume)], geometry,
                                              return_probabilities=True)
    result = slicer.modules.volumes.logic().CreateAndAddLabelVolume(volume, "prediction")
    slicer.util.updateVolumeFromArray(result, labels)  # same grid as the input volume
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from AutoSegLib.errors import ReportedFailure
from AutoSegLib.imageio import Geometry
from AutoSegLib.models.folder import ModelCheckpointError, ModelFolder, ModelFolderError
from AutoSegLib.models.choice import choose
from AutoSegLib.inference.memory import default_batch
from AutoSegLib.inference.probabilities import label_dtype, labels_from_probabilities, one_hot_foreground
from AutoSegLib.inference.sliding import sliding_window_logits, softmax
from AutoSegLib.network import build_network
from AutoSegLib.network.layout import inference_memory_format
from AutoSegLib.planning.plans import mirror_axes
from AutoSegLib.preprocessing.case import preprocess_case, restore_labels, restore_probabilities


class InputError(ReportedFailure):
    """The images do not fit the model (channel count, shapes, dimensions)."""


@dataclass
class PreparedCase:
    """A case checked and preprocessed (:meth:`Predictor.prepare`), waiting for the network."""

    channels: list[np.ndarray] | None  # kept only for a cascade's second stage
    geometry: Geometry
    data: list  # per configuration: (preprocessed data, properties), or None (preprocessed later)
    return_probabilities: bool


@dataclass
class NetworkResult:
    """Fold-mean probabilities per configuration on its preprocessed grid (:meth:`Predictor.run_network`)."""

    means: list  # (probabilities (K, ...) float32, properties) per configuration
    return_probabilities: bool


@dataclass
class Stage:
    """One configuration ready to run: its network and the weights of each fold."""

    name: str
    config: dict
    network: torch.nn.Module
    folds: list
    weights: list[dict]
    previous: "Stage | None" = None  # the low-resolution stage of a cascade
    guidance_channels: int = 0  # click maps after the image channels (zeros when predicting automatically)


def mirror_axes_for(config: dict) -> tuple[int, ...]:
    """Patch axes to mirror at test time: those training mirrored (the plan's ``mirror_axes``,
    else every axis; :func:`AutoSegLib.planning.plans.mirror_axes`)."""
    return mirror_axes(config)


def default_batch_size(config: dict, device: torch.device) -> int:
    """Windows per forward pass (:func:`AutoSegLib.inference.memory.default_batch`, which the memory
    estimate uses too)."""
    return default_batch(config, "cuda" if device.type == "cuda" else "cpu")


def _check_step(step: float) -> float:
    if not 0 < float(step) <= 1:
        raise ValueError(f"step must be in (0, 1] (a fraction of the patch size), got {step}")
    return float(step)


def _check_tta_axes(axes) -> tuple[int, ...] | None:
    if axes is None:
        return None
    axes = tuple(sorted({int(a) for a in axes}))
    if any(a not in (0, 1, 2) for a in axes):
        raise ValueError(f"tta_axes must be image axes 0, 1, 2 (z, y, x), got {list(axes)}")
    return axes


def wants_postprocessing(spec: dict | None) -> bool:
    return bool(spec) and bool(spec.get("largest_component_foreground") or spec.get("largest_component_classes"))


class Predictor:
    """Predicts label maps (and probabilities) with an ensemble of trained folds.

    Build it with :meth:`from_model_dir`; see the module docstring for use in Slicer.
    """

    def __init__(self, model: ModelFolder, stages: list[Stage], device: torch.device, tta: bool = True,
                 step: float = 0.5, batch_size: int | None = None, postprocessing: dict | None = None,
                 choice=None, tta_axes=None):
        self.model, self.stages, self.device = model, stages, torch.device(device)
        self.tta, self.step, self.batch_size = bool(tta), _check_step(step), batch_size
        self.tta_axes = _check_tta_axes(tta_axes)  # image axes (z, y, x = 0, 1, 2) to mirror; None: all
        self.postprocessing = postprocessing
        self.host_accumulator_fallbacks = 0  # stages predicted again with accumulators in host memory
        self.choice = choice  # the ModelChoice from_model_dir made (how the configuration was chosen)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, configuration: str | list[str] | None = None, folds=None,
                       checkpoint: str | None = None, device: str = "auto", tta: bool = True, step: float = 0.5,
                       batch_size: int | None = None, tta_axes=None) -> "Predictor":
        """Load a model folder's networks for prediction.

        Args:
            model_dir: ``WORK/model`` (plans.json, dataset.json, ``{configuration}/fold_{k}/``).
            configuration: one name, or two for an ensemble. None: the rule of
                :func:`AutoSegLib.models.choice.choose` - ``inference_plan.json``'s choice (with its
                folds, checkpoint and postprocessing), else the one trained configuration.
            folds: e.g. ``[0, 1]`` or ``["all"]``; None: the inference plan's, else every
                fold that has the checkpoint.
            checkpoint: ``final`` (default), ``best`` or ``latest``.
            device: ``auto`` (CUDA, then MPS, then CPU), ``cuda``, ``mps`` or ``cpu``.
            tta: mirror every window along the axes training mirrored (8x the work in 3D).
            tta_axes: mirror only along these image axes (0, 1, 2 = z, y, x of the input array,
                as numpy orders it); each axis doubles the work. None: every axis training
                mirrored; ``()``: none, as ``tta=False``.
            step: window spacing as a fraction of the patch size.
            batch_size: windows per forward pass (default: :func:`default_batch_size`).

        Raises:
            ModelFolderError: missing files, configuration, fold or checkpoint, naming what exists.
            ModelCheckpointError: a corrupt, unsafe or mismatched checkpoint (also a CheckpointError).
        """
        from AutoSegLib.models.device import resolve_device

        model = ModelFolder.open(model_dir)
        choice = choose(model.path, configuration, folds, checkpoint)
        _check_step(step)
        _check_tta_axes(tta_axes)
        torch_device = resolve_device(device)
        stages = [_load_stage(model, name, choice.folds, choice.checkpoint, torch_device)
                  for name in choice.configurations]
        return cls(model, stages, torch_device, tta, step, batch_size, choice.postprocessing or None, choice,
                   tta_axes)

    @property
    def configurations(self) -> list[str]:
        return [s.name for s in self.stages]

    # -- prediction ---------------------------------------------------------------------
    def predict(self, channels: list[np.ndarray], geometry: Geometry, return_probabilities: bool = False,
                progress: Callable[[float], None] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Segment one case given as arrays.

        Args:
            channels: one (z, y, x) array per model channel, in the model's channel order.
            geometry: the images' geometry (spacing decides the resampling).
            return_probabilities: also return the ensemble's class probabilities.
            progress: called with the fraction (0-1] of the case's network work done, after each
                forward pass (every fold, configuration and cascade stage counted).

        Returns:
            labels (z, y, x), uint8 (label values as in dataset.json), on the input's grid, and
            probabilities (K, z, y, x) float32 on the same grid, or None.
        """
        prepared = self.prepare(channels, geometry, return_probabilities)
        return self.finish(self.run_network(prepared, progress))

    # -- the three phases of predict, for a pipeline over cases (inference/pipeline.py) ----
    def prepare(self, channels: list[np.ndarray], geometry: Geometry,
                return_probabilities: bool = False) -> "PreparedCase":
        """Check the input and preprocess it for every configuration that needs no network first.

        A cascade's second stage is preprocessed in :meth:`run_network` (it takes the first
        stage's segmentation); its channels are kept for that, otherwise they are dropped here.
        """
        channels = self.check_input(channels, geometry)
        plans = self.model.plans
        data = []
        for stage in self.stages:
            if stage.previous is not None:
                data.append(None)
                continue
            array, _, properties = preprocess_case(channels, None, geometry, stage.config, plans.transpose_forward,
                                                   plans.foreground_intensity_properties_per_channel,
                                                   plans.orientation)
            data.append((array, properties))
        keep = any(stage.previous is not None for stage in self.stages)
        return PreparedCase(channels if keep else None, geometry, data, bool(return_probabilities))

    def run_network(self, prepared: "PreparedCase",
                    progress: Callable[[float], None] | None = None) -> "NetworkResult":
        """Fold-mean probabilities of every configuration on its preprocessed grid (``prepared.data``
        is consumed: each stage's input is released once its network has run)."""
        passes = _PassCounter(progress, sum(_network_passes(stage) for stage in self.stages))
        means = []
        for i, stage in enumerate(self.stages):
            ready, prepared.data[i] = prepared.data[i], None
            if ready is None:
                means.append(self._stage_fold_mean(stage, prepared.channels, prepared.geometry, passes))
            else:
                array, properties = ready
                del ready
                means.append((self._fold_mean(stage, array, passes), properties))
                del array
        return NetworkResult(means, prepared.return_probabilities)

    def finish(self, result: "NetworkResult") -> tuple[np.ndarray, np.ndarray | None]:
        """Labels (and probabilities if asked) on the input grid from :meth:`run_network`'s result,
        which is consumed; as :meth:`predict` returns them."""
        means, result.means = result.means, []
        if len(means) == 1 and not result.return_probabilities:
            # One configuration and no probabilities asked for: the labels come straight from the
            # preprocessed grid, a class at a time (restore_labels), never K values per input voxel.
            probabilities, properties = means.pop()
            labels = restore_labels(probabilities, properties, label_dtype(self.model.n_classes))[0]
            del probabilities
            return self.postprocess(labels), None
        total = None
        while means:
            probabilities, properties = means.pop(0)
            restored = restore_probabilities(probabilities, properties)[0]
            del probabilities
            total = restored if total is None else np.add(total, restored, out=total)
            del restored
        if len(self.stages) > 1:
            total /= len(self.stages)
        labels = self.postprocess(labels_from_probabilities(total))
        return labels, (total if result.return_probabilities else None)

    def predict_probabilities(self, channels: list[np.ndarray], geometry: Geometry,
                              progress: Callable[[float], None] | None = None) -> np.ndarray:
        """Ensemble-mean class probabilities (K, z, y, x) float32 on the input's grid."""
        channels = self.check_input(channels, geometry)
        passes = _PassCounter(progress, sum(_network_passes(stage) for stage in self.stages))
        total = None
        for stage in self.stages:
            probabilities = self._stage_probabilities(stage, channels, geometry, passes)
            total = probabilities if total is None else np.add(total, probabilities, out=total)
        if len(self.stages) > 1:
            total /= len(self.stages)
        return total

    # -- click-guided correction (docs/clicks.md) ------------------------------------------
    @property
    def guided(self) -> bool:
        """True when the network was trained with click guidance (clicks then steer a refine)."""
        return any(stage.guidance_channels for stage in self.stages)

    def prepare_refine(self, channels: list[np.ndarray], geometry: Geometry):
        """Preprocess a case once for many refines (:class:`~AutoSegLib.inference.refine.RefineCase`)."""
        from AutoSegLib.inference.refiner import prepare_case

        return prepare_case(self, channels, geometry)

    def refine(self, channels, geometry: Geometry, previous_labels: np.ndarray, clicks, scope: str = "clicked"):
        """Correct ``previous_labels`` with clicks; re-predicts only windows around them.

        Args:
            channels: the case's images, as for :meth:`predict`; or a prepared case
                (:meth:`prepare_refine`), and then ``geometry`` is ignored.
            previous_labels: the label map to correct (z, y, x), on the images' grid.
            clicks: every :class:`~AutoSegLib.inference.clicks.Click` of the correction so far (the
                network sees them all; the windows cover them all).
            scope: ``clicked`` changes only voxels that are or become a clicked label; ``all``
                takes every class of the re-predicted windows.

        Returns:
            :class:`~AutoSegLib.inference.refine.RefineResult`: the whole merged label map (the
            previous map's dtype) and ``region`` (z0, z1, y0, y1, x0, x1), outside which nothing changed.

        Raises:
            ClickError: a click outside the image or naming a label the model does not have;
                an ensemble or cascade (refine runs one configuration).
        """
        from AutoSegLib.inference.refine import RefineCase
        from AutoSegLib.inference.refiner import prepare_case, refine_case

        case = channels if isinstance(channels, RefineCase) else prepare_case(self, channels, geometry)
        return refine_case(self, case, previous_labels, clicks, scope)

    def postprocess(self, labels: np.ndarray) -> np.ndarray:
        """The inference plan's postprocessing (largest connected components), if it asks for any."""
        if not wants_postprocessing(self.postprocessing):
            return labels
        from AutoSegLib.postprocessing import apply_postprocessing

        return apply_postprocessing(labels, self.postprocessing).astype(labels.dtype, copy=False)

    def check_input(self, channels, geometry: Geometry) -> list[np.ndarray]:
        channels = [np.asarray(c) for c in channels]
        names = ", ".join(self.model.spec.channel_names.values())
        if len(channels) != self.model.n_channels:
            raise InputError(f"the model takes {self.model.n_channels} channel(s) ({names}), got {len(channels)}")
        shapes = {c.shape for c in channels}
        if len(shapes) > 1:
            raise InputError(f"channels differ in shape: {[c.shape for c in channels]}")
        if channels[0].ndim != 3 or geometry.ndim != 3:
            raise InputError(f"images must be 3D (z, y, x): got shape {channels[0].shape}, geometry of "
                             f"{geometry.ndim} axes")
        return channels

    def _stage_probabilities(self, stage: Stage, channels: list[np.ndarray], geometry: Geometry,
                             passes: "_PassCounter") -> np.ndarray:
        probabilities, properties = self._stage_fold_mean(stage, channels, geometry, passes)
        return restore_probabilities(probabilities, properties)[0]

    def _stage_labels(self, stage: Stage, channels: list[np.ndarray], geometry: Geometry,
                      passes: "_PassCounter") -> np.ndarray:
        probabilities, properties = self._stage_fold_mean(stage, channels, geometry, passes)
        return restore_labels(probabilities, properties, label_dtype(self.model.n_classes))[0]

    def _stage_fold_mean(self, stage: Stage, channels: list[np.ndarray], geometry: Geometry,
                         passes: "_PassCounter") -> tuple[np.ndarray, dict]:
        """Fold-mean probabilities on the stage's preprocessed grid, and the properties to restore them."""
        previous = None
        if stage.previous is not None:
            previous = self._stage_labels(stage.previous, channels, geometry, passes)
        plans = self.model.plans
        data, seg, properties = preprocess_case(channels, previous, geometry, stage.config, plans.transpose_forward,
                                                plans.foreground_intensity_properties_per_channel, plans.orientation)
        if seg is not None:
            data = np.concatenate([data, one_hot_foreground(seg[0], self.model.foreground_values)])
        probabilities = self._fold_mean(stage, data, passes)  # zero guidance: automatic prediction
        del data
        return probabilities, properties

    def _fold_mean(self, stage: Stage, data: np.ndarray, passes: "_PassCounter") -> np.ndarray:
        """Fold-mean probabilities; on a GPU that runs out of memory, again with host accumulators.

        The network's activations fit (a training batch did), but the accumulators of a large
        image may not: K float16 values per voxel, 12 GB for 100 classes at 512x512x600. As
        nnU-Net does, the case is then predicted again with them in host memory.
        """
        if self.device.type == "cpu":
            return self._fold_mean_on(stage, data, passes, self.device)
        first_pass = passes.started
        try:
            return self._fold_mean_on(stage, data, passes, self.device)
        except torch.OutOfMemoryError:
            pass  # retried below: in here the traceback still holds the failed attempt's tensors
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        passes.started = first_pass
        self.host_accumulator_fallbacks += 1
        return self._fold_mean_on(stage, data, passes, torch.device("cpu"))

    def _fold_mean_on(self, stage: Stage, data: np.ndarray, passes: "_PassCounter",
                      accumulators: torch.device) -> np.ndarray:
        x = torch.from_numpy(data).to(accumulators)
        batch = self.batch_size or default_batch_size(stage.config, self.device)
        mirror = self.mirror_axes(stage.config)
        total = None
        for weights in stage.weights:
            if len(stage.weights) > 1:
                stage.network.load_state_dict(weights)
            network = self._forward(stage.network, stage.guidance_channels)  # automatic: zero click maps
            logits = sliding_window_logits(network, x, stage.config["patch_size"], self.step,
                                           mirror, batch, progress=passes.next_pass(), network_device=self.device)
            probabilities = softmax(logits)  # on the CPU: the logits' own memory, an inference tensor
            del logits
            with torch.inference_mode():
                total = probabilities if total is None else total.add_(probabilities)
        with torch.inference_mode():
            total /= len(stage.weights)
        return total.cpu().numpy()

    def mirror_axes(self, config: dict) -> tuple[int, ...]:
        """Patch axes mirrored at test time: training's (:func:`mirror_axes_for`), narrowed to
        ``tta_axes`` (image axes, mapped through the plans' transpose), none without TTA."""
        if not self.tta:
            return ()
        axes = mirror_axes_for(config)
        if self.tta_axes is None:
            return axes
        transpose = self.model.plans.transpose_forward
        lead = len(transpose) - len(config["patch_size"])  # a 2D patch covers the last two axes
        return tuple(a for a in axes if int(transpose[a + lead]) in self.tta_axes)

    def _forward(self, network, zero_channels: int = 0):
        """The network as sliding windows call it: autocast on CUDA; ``zero_channels`` all-zero
        guidance channels appended to each batch of windows (never to the whole image)."""
        if self.device.type != "cuda" and not zero_channels:
            return network

        def run(x):
            if zero_channels:
                x = torch.cat([x, x.new_zeros((x.shape[0], zero_channels, *x.shape[2:]))], 1)
            if self.device.type != "cuda":
                return network(x)
            with torch.autocast("cuda"):
                return network(x)
        return run


def _network_passes(stage: Stage) -> int:
    """Sliding-window passes one case takes through ``stage``: one per fold, cascade included."""
    return len(stage.weights) + (_network_passes(stage.previous) if stage.previous is not None else 0)


class _PassCounter:
    """Turns each pass's ``(windows_done, windows_total)`` into the case's fraction done."""

    def __init__(self, callback: Callable[[float], None] | None, total_passes: int):
        self.callback, self.total, self.started = callback, max(1, total_passes), 0
        self.reported = 0.0  # never less than before, even when a pass is repeated

    def next_pass(self) -> Callable[[int, int], None] | None:
        if self.callback is None:
            return None
        before, self.started = self.started, self.started + 1

        def report(done: int, of: int) -> None:
            self.reported = max(self.reported, min(1.0, (before + done / of) / self.total))
            self.callback(self.reported)
        return report


def _load_stage(model: ModelFolder, name: str, folds, checkpoint: str, device: torch.device) -> Stage:
    config = model.configuration(name)
    previous = None
    if config.get("previous_stage"):
        if config["previous_stage"] == name:
            raise ModelFolderError(f"{model.path}: configuration {name} names itself as its previous stage")
        previous = _load_stage(model, config["previous_stage"], folds, checkpoint, device)
    fold_list = model.resolve_folds(name, folds, checkpoint)
    from AutoSegLib.planning.guidance import guidance_channels

    network = build_network(config, model.network_input_channels(config), model.n_classes, deep_supervision=False)
    weights = []
    for fold in fold_list:
        state = model.load_weights(name, fold, checkpoint)
        try:
            network.load_state_dict(state)  # checked now, so a mismatch fails before any prediction
        except RuntimeError as exc:
            first = (str(exc).splitlines() or [""])[0][:300]
            path = model.fold_dir(name, fold)
            raise ModelCheckpointError(f"{path}: the {checkpoint} checkpoint does not fit the network of "
                                       f"{model.path / 'plans.json'} ({first})") from None
        weights.append(state)
    network.to(device, memory_format=inference_memory_format(len(config["patch_size"]), device)).eval()
    return Stage(name, config, network, fold_list, weights, previous,
                 guidance_channels(config, len(model.foreground_values)))
