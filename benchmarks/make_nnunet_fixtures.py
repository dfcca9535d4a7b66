"""Make the nnU-Net v2 agreement fixtures of Testing/test_nnunet_models.py with nnunetv2 itself.

    python benchmarks/make_nnunet_fixtures.py --nnunet-python /tmp/nnunet_venv/bin/python \
        [--out Testing/data/nnunet_v2] [--work /tmp/nnunet_fixtures] [--iterations N] [--initial-lr LR] [--only NAME ...]

nnunetv2 is never installed into AutoSeg's environment; ``--nnunet-python`` is an interpreter
that has it (2.8.1 made the committed fixtures), e.g.::

    python -m venv /tmp/nnunet_venv
    /tmp/nnunet_venv/bin/pip install torch==<AutoSeg's torch version>
    /tmp/nnunet_venv/bin/pip install nnunetv2==2.8.1
    /tmp/nnunet_venv/bin/pip install --no-deps torch==<AutoSeg's torch version>  # torchvision may replace it

Per fixture (``FIXTURES``): ``autoseg make-phantoms --size 0.5`` writes an nnU-Net v2 raw dataset;
nnunetv2 extracts the fingerprint and plans it (stock planner, or the residual-encoder planner);
the plans of the configuration are shrunk to a tiny network (features 4-8-16, three stages, small
patch: the agreement test needs identical inputs and weights, not a good model) and the dataset
is preprocessed and trained for one epoch of a few hundred iterations on the CPU by nnunetv2's
stock ``nnUNetTrainer`` with only its schedule shortened (``TRAIN_DRIVER``), which writes a
genuine nnU-Net model folder ``nnUNetTrainer__PLANS__CONFIG``;
two test cases, cropped to a small box and given the configuration's target spacing (so neither
tool resamples: AutoSeg's resampling is scipy's, nnU-Net's skimage's, and they differ by design,
up to 6e-2 in probabilities at boundaries: docs/nnunet-models.md), are predicted by ``nnUNetv2_predict --save_probabilities`` (with mirroring
TTA or ``--disable_tta`` as the fixture says). Written to ``OUT/NAME/``::

    TRAINER__PLANS__CONFIG/plans.json  dataset.json  fold_0/checkpoint_final.pth   (as nnunetv2 wrote them)
    imagesTs/{case}_0000.nii.gz                                                    (the inputs)
    nnunet_predictions/{case}.nii.gz  {case}.npz                                   (nnunetv2's outputs)
    nnunet_predictions_fp32/{case}.nii.gz  {case}.npz                              (float32 accumulators)
    fixture.json                                                                    (how it was made)

``nnunet_predictions/`` holds stock ``nnUNetv2_predict`` output. nnunetv2 accumulates the sliding
windows' logits in float16 even on the CPU, which by itself moves probabilities by up to ~1e-3
(and more at image corners, where the Gaussian weights are float16 subnormals). So the cases are
predicted a second time by the same nnunetv2 with only those accumulators (and the Gaussian) in
float32 (``PREDICT_FP32``: ``torch.half`` patched to float32 in that process), into
``nnunet_predictions_fp32/``: the reference for the 1e-3 probability test.

Takes about 15 minutes on two busy cores (training is most of it); ``--reuse`` keeps the
phantoms, plans and preprocessed data of an earlier run and only trains and predicts again.
Training is not seeded: a rerun makes new weights and new reference outputs, consistent with
each other.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# name: dataset id, phantom kind, configuration, nnU-Net planner, plans identifier, TTA, patch, residual
# encoder, and the training schedule that made the committed fixture (foreground appears in its labels)
FIXTURES = {
    "ct_3d_fullres": {"dataset_id": 981, "kind": "ct", "configuration": "3d_fullres", "planner": "ExperimentPlanner",
                      "plans": "nnUNetPlans", "tta": True, "patch": [16, 32, 32], "residual": False,
                      "iterations": 600, "initial_lr": 0.02},
    "mr_2d_resenc": {"dataset_id": 982, "kind": "mr", "configuration": "2d", "planner": "nnUNetPlannerResEncM",
                     "plans": "nnUNetResEncUNetMPlans", "tta": False, "patch": [32, 32], "residual": True,
                     "iterations": 400, "initial_lr": 0.01},
}
TRAINER = "nnUNetTrainer"
# nnunetv2's stock trainer with only the schedule shortened, under the stock class name (so the
# checkpoint's trainer_name is nnU-Net's own class, found without nnU-Net walking every trainer
# module: some of those import timm -> torchvision, which often does not match the venv's torch).
TRAIN_DRIVER = """
import sys, torch
from batchgenerators.utilities.file_and_folder_operations import join, load_json
from nnunetv2.paths import nnUNet_preprocessed
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer as Stock

dataset, plans_name, configuration, iterations, initial_lr = sys.argv[1:6]

class nnUNetTrainer(Stock):
    def __init__(self, plans, configuration, fold, dataset_json, device=torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs, self.num_iterations_per_epoch, self.num_val_iterations_per_epoch = 1, int(iterations), 2
        self.initial_lr = float(initial_lr)

base = join(nnUNet_preprocessed, dataset)
plans = load_json(join(base, plans_name + ".json"))
plans["continue_training"] = False  # the stock __init__ pops it (nnUNetv2_train's --c)
trainer = nnUNetTrainer(plans, configuration, 0,
                        load_json(join(base, "dataset.json")), torch.device("cpu"))
trainer.run_training()
"""
FEATURES = [4, 8, 16]
CASES, TEST_CASES, SIZE, SEED = 6, 2, 0.5, 7
CROP_XYZ = (40, 40, 16)  # SimpleITK order; the fixture images are at most this large

PREDICT_FP32 = """
import sys, torch
import nnunetv2.inference.sliding_window_prediction as windows
gaussian = windows.compute_gaussian.__wrapped__  # under functools.lru_cache
defaults = list(gaussian.__defaults__)
defaults[2] = torch.float32  # the Gaussian's dtype
gaussian.__defaults__ = tuple(defaults)
torch.half = torch.float32  # the logits and weights accumulators of predict_from_raw_data
from nnunetv2.inference.predict_from_raw_data import predict_entry_point
sys.argv[0] = "nnUNetv2_predict"
sys.exit(predict_entry_point())
"""

ENTRY = {"fingerprint": "nnunetv2.experiment_planning.plan_and_preprocess_entrypoints:extract_fingerprint_entry",
         "plan": "nnunetv2.experiment_planning.plan_and_preprocess_entrypoints:plan_experiment_entry",
         "preprocess": "nnunetv2.experiment_planning.plan_and_preprocess_entrypoints:preprocess_entry",
         "predict": "nnunetv2.inference.predict_from_raw_data:predict_entry_point"}


def run(argv: list[str], env: dict | None = None) -> None:
    print("+", " ".join(map(str, argv)), flush=True)
    subprocess.run([str(a) for a in argv], check=True, env=env)


def nnunet(python: str, entry: str, args: list, env: dict) -> None:
    """Run one nnunetv2 console entry point by module path (no reliance on the venv's bin/)."""
    module, function = ENTRY[entry].split(":")
    code = f"import sys; from {module} import {function} as f; sys.argv[0] = {entry!r}; sys.exit(f())"
    run([python, "-c", code, *args], env)


def shrink(plans_file: Path, configuration: str, patch: list[int], residual: bool) -> dict:
    """The configuration's network made tiny; everything that preprocessing uses is left alone."""
    plans = json.loads(plans_file.read_text())
    config = plans["configurations"][configuration]
    dims = len(patch)
    kwargs = config["architecture"]["arch_kwargs"]
    kwargs.update(n_stages=3, features_per_stage=FEATURES, kernel_sizes=[[3] * dims] * 3,
                  strides=[[1] * dims, [2] * dims, [2] * dims], n_conv_per_stage_decoder=[1, 1])
    kwargs["n_blocks_per_stage" if residual else "n_conv_per_stage"] = [1, 2, 2] if residual else [2, 2, 2]
    config.update(patch_size=patch, batch_size=2)
    plans_file.write_text(json.dumps(plans, indent=4))
    return plans


def small_test_inputs(raw: Path, out: Path, plans: dict, configuration: str) -> list[str]:
    """Test cases cropped to ``CROP_XYZ`` around their centre, at the configuration's target spacing."""
    import SimpleITK as sitk

    config = plans["configurations"][configuration]
    forward = plans["transpose_forward"]
    out.mkdir(parents=True, exist_ok=True)
    cases = []
    for image_path in sorted((raw / "imagesTs").glob("*_0000.nii.gz")):
        case = image_path.name[: -len("_0000.nii.gz")]
        channels = sorted((raw / "imagesTs").glob(f"{case}_*.nii.gz"))
        for channel in channels:
            image = sitk.ReadImage(str(channel))
            size = image.GetSize()
            start = [max(0, (s - c) // 2) for s, c in zip(size, CROP_XYZ)]
            image = image[start[0]:start[0] + CROP_XYZ[0], start[1]:start[1] + CROP_XYZ[1],
                          start[2]:start[2] + CROP_XYZ[2]]
            zyx = list(reversed(image.GetSpacing()))
            planned = config["spacing"]
            for i, s in enumerate(planned):  # 2d: the in-plane axes only
                zyx[forward[i + 3 - len(planned)]] = s
            image.SetSpacing(tuple(reversed(zyx)))
            sitk.WriteImage(image, str(out / channel.name), useCompression=True)
        cases.append(case)
    return cases


def prepare_dataset(args, spec: dict, raw: Path, env: dict) -> None:
    """Phantoms -> nnunetv2 fingerprint and plans -> shrunk network -> nnunetv2 preprocessing."""
    dsid, config = str(spec["dataset_id"]), spec["configuration"]
    run([sys.executable, "-m", "AutoSegLib", "make-phantoms", raw, "--kind", spec["kind"], "--cases", CASES,
         "--test-cases", TEST_CASES, "--size", SIZE, "--seed", SEED], {**os.environ, "PYTHONPATH": str(REPO)})
    nnunet(args.nnunet_python, "fingerprint", ["-d", dsid, "-np", "1"], env)
    nnunet(args.nnunet_python, "plan", ["-d", dsid, "-pl", spec["planner"]], env)
    shrink(Path(env["nnUNet_preprocessed"]) / raw.name / f"{spec['plans']}.json", config, spec["patch"],
           spec["residual"])
    nnunet(args.nnunet_python, "preprocess", ["-d", dsid, "-plans_name", spec["plans"], "-c", config, "-np", "1"], env)


def make_fixture(name: str, spec: dict, args: argparse.Namespace) -> None:
    work = args.work / name
    raw_root, pre, results = work / "nnUNet_raw", work / "nnUNet_preprocessed", work / "nnUNet_results"
    dataset = f"Dataset{spec['dataset_id']}_Phantom{spec['kind'].upper()}"
    env = {**os.environ, "nnUNet_raw": str(raw_root), "nnUNet_preprocessed": str(pre), "nnUNet_results": str(results),
           "OMP_NUM_THREADS": str(args.threads), "nnUNet_compile": "f"}
    train_env = {**env, "nnUNet_n_proc_DA": "0"}  # augmentation in the trainer's process (planning needs >= 1)
    raw = raw_root / dataset
    dsid, config = str(spec["dataset_id"]), spec["configuration"]
    if not (args.reuse and (pre / dataset / f"{spec['plans']}_{config}").is_dir()):
        shutil.rmtree(work, ignore_errors=True)
        prepare_dataset(args, spec, raw, env)
    plans = json.loads((pre / dataset / f"{spec['plans']}.json").read_text())
    shutil.rmtree(results, ignore_errors=True)
    iterations = args.iterations or spec["iterations"]
    initial_lr = args.initial_lr or spec["initial_lr"]
    run([args.nnunet_python, "-c", TRAIN_DRIVER, dataset, spec["plans"], config, iterations, initial_lr], train_env)
    target = args.out / name
    shutil.rmtree(target, ignore_errors=True)
    cases = small_test_inputs(raw, target / "imagesTs", plans, config)
    predictions = target / "nnunet_predictions"
    predict_args = ["-d", dsid, "-c", config, "-tr", TRAINER, "-p", spec["plans"], "-f", "0", "--save_probabilities",
                    "-device", "cpu", "-npp", "1", "-nps", "1", *([] if spec["tta"] else ["--disable_tta"])]
    nnunet(args.nnunet_python, "predict", ["-i", target / "imagesTs", "-o", predictions, *predict_args], env)
    run([args.nnunet_python, "-c", PREDICT_FP32, "-i", target / "imagesTs", "-o", f"{predictions}_fp32", *predict_args],
        env)
    for folder in (predictions, Path(f"{predictions}_fp32")):
        for extra in folder.iterdir():  # keep labels and probabilities; drop the .pkl and the JSON copies
            if not (extra.name.endswith(".nii.gz") or extra.suffix == ".npz"):
                extra.unlink()
    folder = f"{TRAINER}__{spec['plans']}__{config}"
    source = results / dataset / folder
    (target / folder / "fold_0").mkdir(parents=True)
    for file in ("plans.json", "dataset.json", "fold_0/checkpoint_final.pth"):
        shutil.copy2(source / file, target / folder / file)
    code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
            "('nnunetv2', 'torch', 'numpy', 'dynamic_network_architectures')}))")
    versions = subprocess.run([args.nnunet_python, "-c", code], check=True, capture_output=True, text=True)
    record = {"made_by": "benchmarks/make_nnunet_fixtures.py", "model_folder": folder, "configuration": config,
              "tta": spec["tta"], "cases": cases, "versions": json.loads(versions.stdout),
              "phantoms": {"kind": spec["kind"], "cases": CASES, "test_cases": TEST_CASES, "size": SIZE, "seed": SEED,
                           "crop_xyz": list(CROP_XYZ), "spacing": "the configuration's target spacing"},
              "training": f"{TRAINER}, 1 epoch of {iterations} iterations, initial lr {initial_lr}, fold 0, CPU; "
                          "network shrunk to features "
                          f"{FEATURES}, patch {spec['patch']}",
              "prediction": "nnUNetv2_predict -f 0 --save_probabilities -device cpu"
                            + ("" if spec["tta"] else " --disable_tta"),
              "prediction_fp32": "the same with the sliding-window accumulators and Gaussian in float32"}
    (target / "fixture.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {target}")
    import SimpleITK as sitk

    foreground = sum(int((sitk.GetArrayFromImage(sitk.ReadImage(str(f))) > 0).sum()) for f in predictions.glob("*.nii.gz"))
    if not foreground:  # training is not seeded: a short run sometimes predicts background only
        print(f"WARNING: {name}: nnunetv2 predicted no foreground, so the label check would be trivial; run "
              "again or raise --iterations / --initial-lr", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nnunet-python", required=True, help="an interpreter with nnunetv2 installed")
    parser.add_argument("--out", type=Path, default=REPO / "Testing" / "data" / "nnunet_v2")
    parser.add_argument("--work", type=Path, default=Path("/tmp/nnunet_fixtures"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iterations", type=int, help="training iterations (one epoch; default: FIXTURES')")
    parser.add_argument("--initial-lr", type=float, help="the trainer's initial learning rate (stock 0.01; "
                        "more makes foreground appear sooner; default: FIXTURES')")
    parser.add_argument("--reuse", action="store_true", help="keep the phantoms, plans and preprocessed data "
                        "of an earlier run in --work (train and predict again)")
    parser.add_argument("--only", nargs="*", choices=sorted(FIXTURES), help="fixtures to make (default: all)")
    args = parser.parse_args()
    for name in args.only or FIXTURES:
        make_fixture(name, FIXTURES[name], args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
