"""Data loading speed: sampling, augmentation and background loading, in ms per batch.

    python benchmarks/bench_dataloading.py [--work WORK] [--batches 40] [--v1]

Without ``--work`` a CT phantom dataset (6 cases) is made, planned and preprocessed in a
temporary folder. Two variants of its 3d_fullres configuration are timed: the plan as it
is, and a 40 x 96 x 112 patch with full 3D rotation (the heavier, isotropic case); plus the
2d configuration. All single-threaded per process, as in a data worker.

Rows: sampling alone (cut patches from the memory-mapped cases), augmentation alone
(batchgeneratorsv2 training pipeline on already-cut patches, with stacking), the
validation pipeline, and BatchLoader throughput with 1 and 2 workers (consumer doing
nothing, so the figure is what the workers can deliver). ``--v1`` adds the same
transforms from batchgenerators v1, as nnU-Net v2 used them before batchgeneratorsv2
(without its deep-supervision downsampling, which costs about 1 ms).

The machine's load average is printed: on a shared machine the figures move a lot.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from AutoSegLib.fileutil import read_json  # noqa: E402
from AutoSegLib.preprocessing.storage import list_cases  # noqa: E402
from AutoSegLib.training.augmentation import (AugmentationParams, training_pipeline,  # noqa: E402
                                              validation_pipeline)
from AutoSegLib.training.data import PatchSampler, batch_rng, is_forced_foreground  # noqa: E402
from AutoSegLib.training.loader import BatchLoader  # noqa: E402


def prepare(work: Path | None) -> Path:
    if work is not None:
        return work
    root = Path(tempfile.mkdtemp(prefix="bench_dataloading_"))
    for args in (["make-phantoms", str(root / "Dataset001_CT"), "--cases", "6"],
                 ["plan-and-preprocess", str(root / "Dataset001_CT"), "-w", str(root / "work")]):
        subprocess.run([sys.executable, "-m", "AutoSegLib", *args], check=True, capture_output=True)
    return root / "work"


def variants(work: Path) -> dict[str, tuple[dict, Path]]:
    configs = read_json(work / "plans.json")["configurations"]
    full = configs["3d_fullres"]
    folder = work / "preprocessed" / "3d_fullres"
    iso = {**full, "patch_size": [40, 96, 112], "dummy_2d_augmentation": False,
           "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]}
    label = "x".join(map(str, full["patch_size"]))
    out = {f"3d_fullres plan {label}" + (" (in-plane)" if full.get("dummy_2d_augmentation") else ""): (full, folder),
           "3d_fullres 40x96x112 (3D rotation)": (iso, folder)}
    if "2d" in configs:
        out["2d " + "x".join(map(str, configs["2d"]["patch_size"]))] = (configs["2d"], work / "preprocessed" / "2d")
    return out


def timed(fn, count: int) -> list[float]:
    times = []
    for i in range(count):
        start = time.perf_counter()
        fn(i)
        times.append((time.perf_counter() - start) * 1000)
    return times


def sampled_patches(sampler: PatchSampler, batch_size: int, index: int):
    rng = batch_rng(0, index)
    keys = [sampler.case_ids[int(k)] for k in rng.integers(len(sampler.case_ids), size=batch_size)]
    return [sampler.sample(key, is_forced_foreground(j, batch_size), rng) for j, key in enumerate(keys)]


def augment_batch(aug, patches, seed):
    aug.seed(seed)
    outputs = [aug(torch.from_numpy(image), torch.from_numpy(seg)) for image, seg in patches]
    torch.stack([o[0] for o in outputs])
    return [torch.stack(level) for level in zip(*[o[1] for o in outputs])]


def loader_rate(cases, config, folder, workers: int, count: int, transport: str = "pipe") -> tuple[float, int]:
    with BatchLoader(cases, config, folder, num_workers=workers, seed=0, transport=transport) as loader:
        for _ in range(3):
            next(loader)
        start = time.perf_counter()
        for _ in range(count):
            next(loader)
        per_batch = (time.perf_counter() - start) * 1000 / count
        memory = max(_pss(p.pid) for p in loader._processes)
    return per_batch, memory


def _pss(pid: int) -> int:
    """Proportional set size in MB: pages shared with the parent after fork count by share."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0


def v1_pipeline(config: dict):
    """The same transforms and probabilities with batchgenerators v1 (numpy / scipy)."""
    from batchgenerators.transforms.abstract_transforms import Compose
    from batchgenerators.transforms.color_transforms import (BrightnessMultiplicativeTransform,
                                                             ContrastAugmentationTransform, GammaTransform)
    from batchgenerators.transforms.noise_transforms import GaussianBlurTransform, GaussianNoiseTransform
    from batchgenerators.transforms.resample_transforms import SimulateLowResolutionTransform
    from batchgenerators.transforms.spatial_transforms import MirrorTransform, SpatialTransform
    from batchgenerators.transforms.utility_transforms import RemoveLabelTransform

    from AutoSegLib.training.augmentation import max_rotation

    patch = tuple(config["patch_size"])
    dummy = len(patch) == 3 and config.get("dummy_2d_augmentation", False)
    angle = max_rotation(patch, dummy)
    spatial = SpatialTransform(
        patch[1:] if dummy else patch, patch_center_dist_from_border=None, do_elastic_deform=False,
        do_rotation=True, angle_x=(-angle, angle), angle_y=(-angle, angle), angle_z=(-angle, angle),
        p_rot_per_axis=1, do_scale=True, scale=(0.7, 1.4), border_mode_data="constant", border_cval_data=0,
        order_data=3, border_mode_seg="constant", border_cval_seg=-1, order_seg=1, random_crop=False,
        p_el_per_sample=0, p_scale_per_sample=0.2, p_rot_per_sample=0.2, independent_scale_for_each_axis=False)
    rest = Compose([
        GaussianNoiseTransform(p_per_sample=0.1),
        GaussianBlurTransform((0.5, 1.0), different_sigma_per_channel=True, p_per_sample=0.2, p_per_channel=0.5),
        BrightnessMultiplicativeTransform(multiplier_range=(0.75, 1.25), p_per_sample=0.15),
        ContrastAugmentationTransform(p_per_sample=0.15),
        SimulateLowResolutionTransform(zoom_range=(0.5, 1), per_channel=True, p_per_channel=0.5, order_downsample=0,
                                       order_upsample=3, p_per_sample=0.25, ignore_axes=(0,) if dummy else None),
        GammaTransform((0.7, 1.5), True, True, retain_stats=True, p_per_sample=0.1),
        GammaTransform((0.7, 1.5), False, True, retain_stats=True, p_per_sample=0.3),
        MirrorTransform(tuple(range(len(patch)))),
        RemoveLabelTransform(-1, 0),
    ])

    def run(patches, seed):
        np.random.seed(seed)
        data = np.stack([p[0] for p in patches])
        seg = np.stack([p[1] for p in patches]).astype(np.float32)
        if dummy:  # fold z into channels, as nnU-Net's Convert3DTo2DTransform
            b, c, z = data.shape[:3]
            out = spatial(data=data.reshape(b, c * z, *data.shape[3:]), seg=seg.reshape(b, z, *seg.shape[3:]))
            out = {"data": out["data"].reshape(b, c, z, *patch[1:]), "seg": out["seg"].reshape(b, 1, z, *patch[1:])}
        else:
            out = spatial(data=data, seg=seg)
        return rest(**out)

    return run


def row(name: str, times: list[float]) -> str:
    return f"  {name:44s} {statistics.median(times):8.1f} {statistics.mean(times):8.1f} {max(times):8.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="an AutoSeg work folder with plans.json and preprocessed data")
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--v1", action="store_true", help="also time batchgenerators v1's transforms")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = prepare(args.work)
    n = args.batches
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"Data loading, ms per batch ({n} batches; torch {torch.__version__}, 1 thread per process; "
          f"{os.cpu_count()} CPUs, load average {load:.1f})")
    for title, (config, folder) in variants(work).items():
        cases = list_cases(folder)
        batch = config["batch_size"]
        aug = training_pipeline(config)
        val = validation_pipeline(config)
        sampler = PatchSampler(folder, cases, config["patch_size"], aug.input_patch_size)
        val_sampler = PatchSampler(folder, cases, config["patch_size"], config["patch_size"])
        print(f"\n{title}: batch {batch}, sampled {'x'.join(map(str, aug.input_patch_size))}, "
              f"{len(cases)} cases")
        print(f"  {'':44s} {'median':>8s} {'mean':>8s} {'max':>8s}")
        patches = [sampled_patches(sampler, batch, i) for i in range(n)]
        print(row("sampling (training, larger patch)", timed(lambda i: sampled_patches(sampler, batch, i), n)))
        print(row("sampling (validation, final patch)", timed(lambda i: sampled_patches(val_sampler, batch, i), n)))
        print(row("augmentation, batchgeneratorsv2", timed(lambda i: augment_batch(aug, patches[i], i), n)))
        nearest = training_pipeline(config, AugmentationParams(label_interpolation="nearest"))
        print(row("  same, labels resampled nearest-neighbour", timed(lambda i: augment_batch(nearest, patches[i], i), n)))
        val_patches = [sampled_patches(val_sampler, batch, i) for i in range(n)]
        print(row("validation pipeline (fix-ups, DS targets)", timed(lambda i: augment_batch(val, val_patches[i], i), n)))
        if args.v1:
            v1 = v1_pipeline(config)
            print(row("augmentation, batchgenerators v1", timed(lambda i: v1(patches[i], i), n)))
        del patches, val_patches  # keep the forked workers' memory figures honest
        if not title.startswith("2d"):
            for workers, transport in ((1, "pipe"), (2, "pipe"), (2, "shared_memory")):
                per_batch, memory = loader_rate(cases, config, folder, workers, n, transport)
                print(f"  {f'BatchLoader, {workers} worker(s), {transport}':44s} {per_batch:8.1f}"
                      f"{'':18s} (worker PSS {memory} MB)")


if __name__ == "__main__":
    main()
