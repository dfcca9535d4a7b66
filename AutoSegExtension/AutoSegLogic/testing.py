"""Helpers shared by the pytest suite and the module's in-Slicer self-test: phantom cases in a
scene, a tiny network plan, and waiting for a job (tests may wait; the GUI never does).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from AutoSegLib.fileutil import read_json, write_json

from AutoSegLogic import dataset_export
from AutoSegLogic.volumes import add_volume

# The phantom plan's network shrunk so an iteration takes ~0.05 s on a CPU: the mechanics under
# test (events, checkpoints, cancel, results) do not depend on its size.
TINY_NETWORK = {"patch_size": [16, 32, 32], "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
                "kernel_sizes": [[3, 3, 3]] * 3, "features_per_stage": [4, 8, 16],
                "n_conv_per_stage_encoder": [1, 1, 1], "n_conv_per_stage_decoder": [1, 1], "batch_size": 2}


# The same for a 2d configuration (one slice per sample).
TINY_NETWORK_2D = {"patch_size": [32, 32], "strides": [[1, 1], [2, 2], [2, 2]], "kernel_sizes": [[3, 3]] * 3,
                   "features_per_stage": [4, 8, 16], "n_conv_per_stage_encoder": [1, 1, 1],
                   "n_conv_per_stage_decoder": [1, 1], "batch_size": 2}


def phantom_case(scene, seed: int, index: int, kind: str = "ct", channels: int | None = None, name: str = ""):
    """A phantom case as scene nodes: (channel volumes, segmentation node with named segments)."""
    from AutoSegLib.synthetic import label_table, make_case

    case = make_case(kind, seed, index, channels)
    name = name or case.case_id
    volumes = [add_volume(scene, image, case.geometry, f"{name} channel {c}" if c else name)
               for c, image in enumerate(case.images)]
    return volumes, segmentation_from_array(scene, case.label, case.geometry, label_table(kind), f"{name} labels")


def segmentation_from_array(scene, label, geometry, labels: dict, name: str):
    """A segmentation node from a label array, segments named by ``labels`` (name -> value)."""
    logic = dataset_export.segmentations_logic(scene)
    labelmap = add_volume(scene, label, geometry, f"{name} labelmap", labelmap=True)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.CreateDefaultDisplayNodes()
    if not logic.ImportLabelmapToSegmentationNode(labelmap, node):
        raise RuntimeError(f"could not import labelmap '{name}'")
    scene.RemoveNode(labelmap)
    names = {v: n for n, v in labels.items()}
    content = node.GetSegmentation()
    for i in range(content.GetNumberOfSegments()):
        segment = content.GetNthSegment(i)
        segment.SetName(names[segment.GetLabelValue()])
    return node


def tiny_guided_model(root, labels: dict, spacing, median_shape, channel: str = "CT", seed: int = 0,
                      guided: bool = True) -> Path:
    """``root/model``: one tiny 3d_fullres configuration with click guidance (``guided``), random
    weights, fold 0.

    For the mechanics of correcting with clicks (where the answer goes), not for its quality.
    """
    import torch

    from AutoSegLib.models.checkpoint import save_checkpoint
    from AutoSegLib.network import build_network
    from AutoSegLib.planning.guidance import default_guidance

    n_foreground = len([v for v in labels.values() if v])
    config = {"spacing": list(spacing), "patch_size": [8, 16, 16], "batch_size": 2,
              "median_image_size_in_voxels": list(median_shape), "strides": [[1, 1, 1], [2, 2, 2]],
              "kernel_sizes": [[3, 3, 3]] * 2, "features_per_stage": [4, 8], "n_conv_per_stage_encoder": [1, 1],
              "n_conv_per_stage_decoder": [1], "normalization_schemes": ["ZScoreNormalization"],
              "use_mask_for_norm": [False], "network": {"architecture": "PlainConvUNet"},
              "resampling": {"image_order": 3, "label_order": 1, "label_encoding": "one_hot",
                             "separate_z_anisotropy_threshold": 3.0, "out_of_plane_order": 0,
                             "separate_z_for_typical_case": False},
              **({"guidance": default_guidance()} if guided else {})}
    intensities = {"mean": 100.0, "std": 20.0, "median": 100.0, "min": 0.0, "max": 200.0, "percentile_00_5": 5.0,
                   "percentile_99_5": 190.0}
    plans = {"version": 1, "dataset_name": "Clicks", "gpu_memory_gb": 8.0, "transpose_forward": [0, 1, 2],
             "transpose_backward": [0, 1, 2], "num_training_cases": 4, "channel_names": {"0": channel},
             "labels": dict(labels), "num_classes": len(labels), "original_median_spacing": list(spacing),
             "original_median_shape": list(median_shape),
             "foreground_intensity_properties_per_channel": {"0": intensities},
             "configurations": {"3d_fullres": config}}
    model = Path(root) / "model"
    model.mkdir(parents=True)
    write_json(model / "plans.json", plans)
    write_json(model / "dataset.json", {"channel_names": {"0": channel}, "labels": dict(labels), "numTraining": 4,
                                        "file_ending": ".nii.gz"})
    torch.manual_seed(seed)
    network = build_network(config, 1 + (2 * n_foreground if guided else 0), len(labels))
    save_checkpoint(model / "3d_fullres" / "fold_0" / "checkpoint_final.pt",
                    {"network_weights": network.state_dict(), "epoch": 1})
    return model


def shrink_plans(work, configuration: str = "3d_fullres") -> None:
    """Replace the planned network of ``configuration`` with :data:`TINY_NETWORK` (2d: :data:`TINY_NETWORK_2D`)."""
    path = Path(work) / "plans.json"
    plans = read_json(path)
    planned = plans["configurations"][configuration]
    planned.update(TINY_NETWORK_2D if len(planned["patch_size"]) == 2 else TINY_NETWORK)
    write_json(path, plans)


def wait_until(job, condition: Callable[[], bool] | None = None, timeout: float = 120.0, interval: float = 0.05,
               on_events: Callable[[list], None] | None = None, idle: Callable[[], None] | None = None) -> None:
    """Poll ``job`` (a Job, JobChain or Session) until ``condition()`` (default: finished) or timeout.

    ``idle`` runs between polls (in Slicer: ``slicer.app.processEvents``). Raises AssertionError
    when the job ends before ``condition`` holds, TimeoutError after ``timeout`` seconds.
    """
    def ended() -> bool:
        return job.finished if hasattr(job, "finished") else not job.busy

    condition = condition or ended
    deadline = time.monotonic() + timeout
    while True:
        events = job.poll()
        if on_events and events:
            on_events(events)
        if condition():
            return
        if ended():
            raise AssertionError(f"{getattr(job, 'title', job)} ended ({getattr(job, 'status', '')}) before the "
                                 f"awaited moment: {getattr(job, 'failure', '')}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout:.0f} s waiting for {getattr(job, 'title', job)}")
        if idle:
            idle()
        time.sleep(interval)
