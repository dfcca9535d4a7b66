"""AutoSeg and nnU-Net v2 side by side on clinical-size CT (issue 20): 512x512x300 at 0.8x0.8x1.5 mm.

    taskset -c 1 env OMP_NUM_THREADS=1 python benchmarks/clinical_size.py \\
        --nnunet-python /tmp/nnunet_venv/bin/python --before /tmp/autoseg_before --work /tmp/clinical

Both systems run the same trained nnU-Net v2 model folder (``Testing/data/nnunet_v2/ct_3d_fullres``:
6 classes, 3d_fullres at 2.17x1.03x1.03 mm, a small plain U-Net with 16x32x32 patches) on the same
core, in one run, alternating, so a changing load hits both alike. AutoSeg reads nnU-Net model
folders itself (``autoseg predict -m``), so the network, the weights and the target grid are the
same; what differs is each system's pipeline: preprocessing, sliding window, resampling back,
argmax and writing. Optionally (``--before``: a folder holding an export of an older AutoSegLib,
e.g. ``git archive dba2bce AutoSegLib | tar -x -C /tmp/autoseg_before``) the older AutoSeg runs
too, for before/after figures.

Parts (``--parts``):

preprocess  per case, start-up excluded (timed inside a child process after its imports): read the
            image, then preprocess it for the model's 3d_fullres (crop, normalize, cubic resampling
            to 2.17x1.03x1.03 mm). AutoSeg: ``imageio.read_image`` + ``preprocess_case``; nnU-Net:
            ``SimpleITKIO.read_images`` + ``DefaultPreprocessor.run_case_npy`` (what
            ``nnUNetv2_predict`` runs per case). Without and with the label (training preprocessing).
inference   ``autoseg predict -f 0 --no-tta --device cpu`` against ``nnUNetv2_predict_from_modelfolder
            -f 0 --disable_tta -device cpu -npp 1 -nps 1``: wall seconds per case (process start to
            exit) and peak PSS of the process tree (compare_nnunet.Run). Then AutoSeg's stages in
            one process through the Python API: read, preprocess, network (sliding window and
            softmax), resample back (to labels), write.
classes     AutoSeg's peak memory (VmHWM) predicting the clinical case with a model of ``--classes``
            classes (random weights, 3 mm, a tiny network: the restore to the input grid is what
            grows with the classes) and the estimator's figure (inference/memory.py).

The case is ``AutoSegLib.synthetic.cases.clinical_case`` (about a minute to make; kept in --work).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
FIXTURE = REPO / "Testing" / "data" / "nnunet_v2" / "ct_3d_fullres"
MODEL = FIXTURE / "nnUNetTrainer__nnUNetPlans__3d_fullres"

NNUNET_PREPROCESS = r'''
import json, sys, time
t0 = time.perf_counter()
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
model, image, label = sys.argv[1], sys.argv[2], (sys.argv[3] if len(sys.argv) > 3 else None)
plans = PlansManager(json.load(open(model + "/plans.json")))
dataset = json.load(open(model + "/dataset.json"))
imports = time.perf_counter() - t0
t0 = time.perf_counter()
io = SimpleITKIO()
data, properties = io.read_images([image])
seg = io.read_seg(label)[0] if label else None
t1 = time.perf_counter()
data, seg, properties = DefaultPreprocessor(verbose=False).run_case_npy(
    data, seg, properties, plans, plans.get_configuration("3d_fullres"), dataset)
t2 = time.perf_counter()
print(json.dumps({"read": t1 - t0, "preprocess": t2 - t1, "imports": imports, "shape": list(data.shape)}))
'''


def child_preprocess(model: str, image: str, label: str | None) -> None:
    """AutoSeg's per-case preprocessing for the model's 3d_fullres, timed after the imports."""
    t0 = time.perf_counter()
    from AutoSegLib.imageio import read_image
    from AutoSegLib.models.folder import ModelFolder
    from AutoSegLib.preprocessing.case import preprocess_case

    folder = ModelFolder.open(model)
    config, plans = folder.configuration("3d_fullres"), folder.plans
    imports = time.perf_counter() - t0
    t0 = time.perf_counter()
    array, geometry = read_image(image)
    seg = read_image(label)[0] if label else None
    t1 = time.perf_counter()
    data, _, _ = preprocess_case([array], seg, geometry, config, plans.transpose_forward,
                                 plans.foreground_intensity_properties_per_channel)
    t2 = time.perf_counter()
    print(json.dumps({"read": t1 - t0, "preprocess": t2 - t1, "imports": imports, "shape": list(data.shape)}))


def child_stages(model: str, image: str, out: str) -> None:
    """AutoSeg's inference stages of one case through the Python API (one process, no TTA)."""
    import numpy as np
    import torch

    from AutoSegLib.imageio import read_image, write_image
    from AutoSegLib.inference.predictor import Predictor, _PassCounter, _network_passes
    from AutoSegLib.inference.probabilities import label_dtype
    from AutoSegLib.preprocessing.case import preprocess_case, restore_labels
    from AutoSegLib.training.setup import configure_cpu_threads

    configure_cpu_threads()
    predictor = Predictor.from_model_dir(model, folds=[0], device="cpu", tta=False)
    stage = predictor.stages[0]
    times = {}
    t = time.perf_counter()
    array, geometry = read_image(image)
    times["read"] = time.perf_counter() - t
    t = time.perf_counter()
    plans = predictor.model.plans
    data, _, properties = preprocess_case([array], None, geometry, stage.config, plans.transpose_forward,
                                          plans.foreground_intensity_properties_per_channel)
    times["preprocess"] = time.perf_counter() - t
    t = time.perf_counter()
    probabilities = predictor._fold_mean(stage, data, _PassCounter(None, _network_passes(stage)))
    times["network"] = time.perf_counter() - t
    del data
    t = time.perf_counter()
    labels = restore_labels(probabilities, properties, label_dtype(predictor.model.n_classes))[0]
    times["resample back"] = time.perf_counter() - t
    t = time.perf_counter()
    write_image(labels.astype(np.uint8), geometry, out)
    times["write"] = time.perf_counter() - t
    times["threads"] = torch.get_num_threads()
    print(json.dumps(times))


def child_classes(work: str, image: str, out: str, classes: int) -> None:
    """Predict the clinical case with a random-weights model of ``classes`` classes; print VmHWM."""
    import numpy as np
    import torch

    from AutoSegLib.fileutil import write_json
    from AutoSegLib.imageio import read_image, write_image
    from AutoSegLib.inference import Predictor
    from AutoSegLib.models.checkpoint import save_checkpoint
    from AutoSegLib.network import build_network
    from AutoSegLib.training.setup import configure_cpu_threads

    configure_cpu_threads()
    model = Path(work) / f"model_{classes}"
    if not (model / "plans.json").is_file():
        labels = {"background": 0, **{f"organ{k}": k for k in range(1, classes)}}
        config = {"spacing": [3.0, 3.0, 3.0], "patch_size": [32, 64, 64], "batch_size": 2,
                  "median_image_size_in_voxels": [150, 137, 137], "strides": [[1, 1, 1], [2, 2, 2]],
                  "kernel_sizes": [[3, 3, 3]] * 2, "features_per_stage": [4, 8], "n_conv_per_stage_encoder": [1, 1],
                  "n_conv_per_stage_decoder": [1], "normalization_schemes": ["CTNormalization"],
                  "use_mask_for_norm": [False], "network": {"architecture": "PlainConvUNet"},
                  "resampling": {"image_order": 3, "label_order": 1, "label_encoding": "one_hot",
                                 "separate_z_anisotropy_threshold": 3.0, "out_of_plane_order": 0,
                                 "separate_z_for_typical_case": False}}
        ct = {"mean": 60.0, "std": 45.0, "median": 55.0, "min": -300.0, "max": 1500.0, "percentile_00_5": -60.0,
              "percentile_99_5": 300.0}
        write_json(model / "plans.json", {
            "version": 1, "dataset_name": "Clinical", "gpu_memory_gb": 8.0, "transpose_forward": [0, 1, 2],
            "transpose_backward": [0, 1, 2], "num_training_cases": 4, "channel_names": {"0": "CT"},
            "labels": labels, "num_classes": classes, "original_median_spacing": [1.5, 0.8, 0.8],
            "original_median_shape": [300, 512, 512], "foreground_intensity_properties_per_channel": {"0": ct},
            "configurations": {"3d_fullres": config}})
        write_json(model / "dataset.json", {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 4,
                                            "file_ending": ".nii.gz"})
        torch.manual_seed(0)
        net = build_network(config, 1, classes)
        save_checkpoint(model / "3d_fullres" / "fold_0" / "checkpoint_final.pt",
                        {"network_weights": net.state_dict(), "epoch": 1})
    predictor = Predictor.from_model_dir(model, "3d_fullres", folds=[0], device="cpu", tta=False)
    array, geometry = read_image(image)
    t = time.perf_counter()
    labels, _ = predictor.predict([array], geometry)
    seconds = time.perf_counter() - t
    write_image(labels.astype(np.uint8), geometry, out)
    with open("/proc/self/status") as status:
        hwm = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    estimate = None
    try:
        from AutoSegLib.inference.memory import predictor_estimate

        estimate = predictor_estimate(predictor, array.shape, geometry.spacing, 2).peak
    except Exception as exc:  # noqa: BLE001 - the older code may not have it
        print(f"no estimate: {exc}", file=sys.stderr)
    print(json.dumps({"vmhwm": hwm, "estimate": estimate, "predict_s": seconds, "classes": classes}))


# ---------------------------------------------------------------------------------------------
def run_json(argv: list[str], env: dict) -> dict:
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def env_for(pythonpath: str | None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = pythonpath or str(REPO)
    env["PYTHONSAFEPATH"] = "1"  # `python -m AutoSegLib` must not import the working directory's copy
    return env


def make_case(work: Path) -> tuple[Path, Path]:
    images, labels = work / "imagesTs", work / "labelsTs"
    image, label = images / "clinical_000_0000.nii.gz", labels / "clinical_000.nii.gz"
    if not image.is_file():
        from AutoSegLib.imageio import write_image
        from AutoSegLib.synthetic.cases import clinical_case

        images.mkdir(parents=True, exist_ok=True)
        labels.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        case = clinical_case(0, 0)
        write_image(case.images[0], case.geometry, image)
        write_image(case.label, case.geometry, label)
        print(f"made the clinical case {case.images[0].shape} at {case.geometry.spacing} mm in "
              f"{time.perf_counter() - t:.0f} s", flush=True)
    return image, label


def main() -> int:
    from compare_nnunet import NNUNET_LAUNCHER, Run, cpu_model, load

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nnunet-python", default="/tmp/nnunet_venv/bin/python")
    parser.add_argument("--before", default=None, help="PYTHONPATH of an older AutoSegLib export (before/after)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/clinical_size"))
    parser.add_argument("--parts", nargs="+", default=["preprocess", "inference", "classes"],
                        choices=["preprocess", "inference", "classes"])
    parser.add_argument("--repeats", type=int, default=2, help="preprocessing repeats per system (median)")
    parser.add_argument("--classes", type=int, nargs="+", default=[21])
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, *rest = args.child
        {"preprocess": lambda: child_preprocess(rest[0], rest[1], rest[2] if len(rest) > 2 else None),
         "stages": lambda: child_stages(*rest),
         "classes": lambda: child_classes(rest[0], rest[1], rest[2], int(rest[3]))}[mode]()
        return 0

    args.work.mkdir(parents=True, exist_ok=True)
    image, label = make_case(args.work)
    launcher = args.work / "launcher.py"
    launcher.write_text(NNUNET_LAUNCHER)
    nn_script = args.work / "nnunet_preprocess.py"
    nn_script.write_text(NNUNET_PREPROCESS)
    cores = len(os.sched_getaffinity(0))
    nn_env = dict(os.environ, BENCH_CPU_COUNT=str(cores), nnUNet_raw=str(args.work), nnUNet_preprocessed=str(args.work),
                  nnUNet_results=str(args.work))
    systems = {"AutoSeg": env_for(None)}
    if args.before:
        systems["AutoSeg before"] = env_for(args.before)
    me = [sys.executable, str(Path(__file__).resolve()), "--child"]
    print(f"machine: {cpu_model()}, {cores} usable core(s) (affinity {sorted(os.sched_getaffinity(0))}), "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; load {load()}", flush=True)
    results: dict = {"load_start": load()}

    if "preprocess" in args.parts:
        rows = {}
        for with_label in (False, True):
            extra = [str(label)] if with_label else []
            for _ in range(args.repeats):
                for name, env in systems.items():
                    rows.setdefault((name, with_label), []).append(
                        run_json(me + ["preprocess", str(MODEL), str(image), *extra], env))
                rows.setdefault(("nnU-Net v2", with_label), []).append(
                    run_json([args.nnunet_python, str(launcher), str(nn_script), str(MODEL), str(image), *extra],
                             nn_env))
                print(f"  preprocess label={with_label}: " + ", ".join(
                    f"{n} {r[-1]['preprocess']:.1f}+{r[-1]['read']:.1f} s" for (n, wl), r in rows.items()
                    if wl == with_label), flush=True)
        results["preprocess"] = {f"{n}|{wl}": {k: statistics.median(r[k] for r in v) for k in ("read", "preprocess")}
                                 for (n, wl), v in rows.items()}
        results["preprocess_shape"] = {n: v[0]["shape"] for (n, wl), v in rows.items()}
        print(json.dumps(results["preprocess"], indent=1), flush=True)

    if "inference" in args.parts:
        runs = {}
        order = list(systems) + ["nnU-Net v2"]
        for name in order:
            out = args.work / f"pred_{name.replace(' ', '_')}"
            shutil.rmtree(out, ignore_errors=True)
            if name == "nnU-Net v2":
                argv = [args.nnunet_python, str(launcher),
                        "nnunetv2.inference.predict_from_raw_data:predict_entry_point_modelfolder",
                        "-i", str(image.parent), "-o", str(out), "-m", str(MODEL), "-f", "0", "--disable_tta",
                        "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_progress_bar"]
                env = nn_env
            else:
                argv = [sys.executable, "-m", "AutoSegLib", "predict", "-i", str(image.parent), "-o", str(out),
                        "-m", str(MODEL), "-f", "0", "--no-tta", "--device", "cpu"]
                env = systems[name]
            run = Run(argv, env, args.work / "logs" / f"predict_{name.replace(' ', '_')}.log")()
            runs[name] = {"wall": run.wall, "tree_pss": run.tree_pss, "process_peak": run.process_peak}
            print(f"  predict {name}: {run.wall:.1f} s, peak PSS {run.tree_pss / 2**20:.0f} MiB, largest VmHWM "
                  f"{run.process_peak / 2**20:.0f} MiB; load {load()}", flush=True)
        from AutoSegLib.imageio import read_image

        ours = read_image(args.work / "pred_AutoSeg" / "clinical_000.nii.gz")[0]
        theirs = read_image(args.work / "pred_nnU-Net_v2" / "clinical_000.nii.gz")[0]
        runs["agreement with nnU-Net"] = float((ours == theirs).mean())
        if args.before:
            before = read_image(args.work / "pred_AutoSeg_before" / "clinical_000.nii.gz")[0]
            runs["voxels differing from before"] = int((ours != before).sum())
        runs["stages"] = run_json(me + ["stages", str(MODEL), str(image), str(args.work / "stages.nii.gz")],
                                  systems["AutoSeg"])
        results["inference"] = runs
        print(json.dumps(runs, indent=1), flush=True)

    if "classes" in args.parts:
        results["classes"] = {}
        for k in args.classes:
            for name, env in systems.items():
                got = run_json(me + ["classes", str(args.work), str(image), str(args.work / f"classes_{k}.nii.gz"),
                                     str(k)], env)
                results["classes"][f"{name}|{k}"] = got
                print(f"  {k} classes, {name}: VmHWM {got['vmhwm'] / 2**30:.2f} GiB, estimate "
                      f"{(got['estimate'] or 0) / 2**30:.2f} GiB, {got['predict_s']:.1f} s; load {load()}", flush=True)
    results["load_end"] = load()
    (args.work / "results.json").write_text(json.dumps(results, indent=1))
    print(f"load at the end {load()}; results in {args.work / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
