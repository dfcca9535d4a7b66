"""AutoSeg and nnU-Net v2 side by side on one phantom dataset, on this machine, in one run (issue 8).

    python benchmarks/compare_nnunet.py --nnunet-python /tmp/nnunet_venv/bin/python         # ~45 min
    python benchmarks/compare_nnunet.py --nnunet-python ... --quick                         # ~15 min
    python benchmarks/compare_nnunet.py --nnunet-python ... --parts preprocess training inference
    python benchmarks/compare_nnunet.py --nnunet-python ... --sizes 1 1.5 2                 # + scaling

On a shared machine pin the whole run to one core, e.g.
``taskset -c 1 env OMP_NUM_THREADS=1 python benchmarks/compare_nnunet.py ...``: both systems
then get the same core and the same thread setting. Times are from one process start to its
exit unless said otherwise; figures are medians of ``--repeats`` runs (TTA inference:
``--tta-repeats``, default 1; training: of the measured iterations).

The script installs nothing. ``--nnunet-python`` must be an interpreter that has nnunetv2 (it
is never a dependency of AutoSeg); the script says how to make one if it is missing.

It makes one CT phantom dataset (``autoseg make-phantoms``) as ``nnUNet_raw/Dataset777_CTPhantom``
in a temporary folder, with ``nnUNet_preprocessed`` and ``nnUNet_results`` beside it and
AutoSeg's work folder outside ``nnUNet_raw``, and measures, for both systems:

preprocess   wall time of fingerprint + planning + 3d_fullres preprocessing with the same number
             of processes: ``autoseg plan-and-preprocess -c 3d_fullres -np N`` against
             ``nnUNetv2_plan_and_preprocess -d 777 -c 3d_fullres -np N -npfp N``; a second row adds
             the dataset checks (``autoseg verify`` before, ``--verify_dataset_integrity``).
             Fresh output folders every repeat (neither system reuses a fingerprint). Both plan
             every configuration (nnU-Net: 2d, 3d_fullres; AutoSeg also 3d_cpu) and preprocess
             3d_fullres only.
training     iterations per second at the same 3d_fullres plan (patch, batch, network; if the
             planners differ, AutoSeg's configuration is forced to nnU-Net's), each with its real
             trainer and data loader: AutoSeg's ``Trainer.train_step`` fed by its ``BatchLoader``;
             nnU-Net's stock ``nnUNetTrainer`` (``on_train_start``, then ``next(dataloader_train)``
             and ``train_step`` exactly as its ``run_training`` loop does, with its augmentation
             processes). Also the pure network step on a batch in memory (forward, loss, backward,
             optimizer; data workers stopped), its share of the iteration, and GFLOP/s (torch's
             FlopCounterMode, step = 3 x forward) against the float32 matmul rate measured here.
inference    wall time per case (process start to exit, divided by the cases: start-up is
             included, as for a user) and peak memory of the process tree, TTA off and on, one
             fold (0) of the 3d_fullres networks just trained for a few iterations (weights do not
             change speed): ``autoseg predict -f 0 [--no-tta]`` against
             ``nnUNetv2_predict -d 777 -c 3d_fullres -f 0 [--disable_tta] -device cpu -npp 1 -nps 1``.
             Memory: peak over 0.1 s samples of the summed PSS of the process and its descendants
             (shared pages counted once); the summed RSS (libraries counted once per process) and
             the largest single process's VmHWM are printed too.
dice         test-set Dice after the same wall-clock training budget (``--train-minutes``), both on
             fold ``all`` (the same training cases), both predicted with their default mirroring
             TTA, both scored by ``autoseg evaluate`` (same metric code):
             nnU-Net: stock ``nnUNetTrainer`` on 3d_fullres, with only ``num_epochs``,
             ``num_iterations_per_epoch`` and ``num_val_iterations_per_epoch`` set so that the run
             fits 90% of the budget at the speed measured in the training part (its learning rate
             then decays over that length, as AutoSeg's does under ``--time-budget``); killed if
             still running ``--grace-seconds`` after the budget, then predicted with the newest
             checkpoint it wrote.
             AutoSeg: ``autoseg train DS 3d_cpu all --preset quick --time-budget MIN`` (its CPU
             choice); with ``--autoseg-fullres-dice`` also the paper recipe on 3d_fullres as it
             is (``--preset paper``: ``--time-budget`` shortens its 250-iteration epochs after
             timing the first 3 iterations, keeping 10 epochs for the learning-rate decay).
scaling      (``--sizes``, part ``scaling``; runs when a size other than 1 is listed) how both
             systems cope with larger images. Size S is ``autoseg make-phantoms --size S``: the same
             patients S times larger at the same spacing, so about S times the voxels per axis.
             Size 1 is the main run above (its dataset and figures). Every other size gets its own
             small dataset (``--scaling-cases`` + ``--scaling-test-cases``, same seed) as
             ``nnUNet_raw/Dataset778_CTPhantomSize1p5`` etc. (ids from 778 in the order given), then,
             with the commands of the parts above: fingerprint + planning + 3d_fullres
             preprocessing (``--scaling-repeats`` runs each, alternating); the same 3d_fullres plan on
             both sides (AutoSeg's forced to nnU-Net's if they differ, as for training); one training
             iteration each, only to have fold-0 weights; inference without TTA (seconds per case,
             start-up included, and peak PSS of the process tree). The table gives per size the
             median image shape, its voxels, the 3d_fullres patch and the three figures with ratios.
             Rows of different case counts are not strictly comparable: nnU-Net's fixed start-up
             costs are spread over the cases (size 1 has the main run's counts).

nnU-Net's trainer is run by a small driver written to the temporary folder and executed by
``--nnunet-python``: it imports ``nnunetv2``'s ``nnUNetTrainer`` and defines a subclass with the
same class name (so ``nnUNetv2_predict`` finds the trainer its checkpoints name) that only sets the
three schedule numbers above. Nothing is written into the nnunetv2 installation.

Cores: nnU-Net sizes its CPU threads (``nnUNetv2_predict -device cpu``: one per core), its
augmentation processes and its planner's threads by ``os.cpu_count()``, which counts the
machine's cores, not the ones the process may use. Every nnU-Net command therefore runs through a
launcher that makes ``os.cpu_count()`` and ``multiprocessing.cpu_count()`` return the usable cores
(as AutoSeg counts them, ``sched_getaffinity``); ``--nnunet-stock-cpu-count`` turns this off.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIG = "3d_fullres"
DATASET_ID = 777
DATASET_NAME = f"Dataset{DATASET_ID:03d}_CTPhantom"
SCALING_FIRST_ID = 778  # datasets of the scaling part: 778, 779, ... in the order of --sizes
MAX_SIZE = 4.0  # autoseg make-phantoms --size accepts (0, 4]
MB = 1024 * 1024
INSTALL_HINT = """\
nnunetv2 is needed in a separate interpreter (never in AutoSeg's environment), e.g.:
    python -m venv /tmp/nnunet_venv
    /tmp/nnunet_venv/bin/pip install torch==<the torch version AutoSeg uses>
    /tmp/nnunet_venv/bin/pip install nnunetv2
then pass --nnunet-python /tmp/nnunet_venv/bin/python. (nnunetv2 pulls torchvision, which may
replace that torch; `pip install --no-deps torch==<version>` afterwards restores it: the trainer
and predictor do not import torchvision.)"""

# ---------------------------------------------------------------------------------------------
# The driver run by the nnU-Net interpreter. Kept free of AutoSeg imports.
NNUNET_DRIVER = r'''
import argparse, json, os, statistics, sys, time
import torch
from batchgenerators.utilities.file_and_folder_operations import join, load_json
from nnunetv2.paths import nnUNet_preprocessed
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer as StockTrainer


def make_trainer(args):
    class nnUNetTrainer(StockTrainer):
        """The stock trainer; only the schedule numbers differ. Same class name, so the
        checkpoint's trainer_name resolves to the stock class in nnUNetv2_predict."""

        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cuda")):
            # the stock __init__ records its arguments by this signature (checkpoints keep them)
            super().__init__(plans, configuration, fold, dataset_json, device)
            if args.epochs:
                self.num_epochs = args.epochs
            if args.iterations:
                self.num_iterations_per_epoch = args.iterations
            if args.val_iterations is not None:
                self.num_val_iterations_per_epoch = args.val_iterations

    base = join(nnUNet_preprocessed, args.dataset)
    plans = load_json(join(base, "nnUNetPlans.json"))
    plans["continue_training"] = False
    fold = args.fold if args.fold == "all" else int(args.fold)
    return nnUNetTrainer(plans=plans, configuration=args.config, fold=fold,
                         dataset_json=load_json(join(base, "dataset.json")), device=torch.device("cpu"))


def throughput(args):
    args.epochs, args.iterations, args.val_iterations = 1, args.warmup + args.measure, 0
    trainer = make_trainer(args)
    started = time.perf_counter()
    trainer.on_train_start()
    trainer.on_train_epoch_start()
    setup_s = time.perf_counter() - started
    waits, steps = [], []
    for i in range(args.warmup + args.measure):
        t0 = time.perf_counter()
        batch = next(trainer.dataloader_train)
        t1 = time.perf_counter()
        trainer.train_step(batch)
        t2 = time.perf_counter()
        print(f"iteration {i + 1}: waited {t1 - t0:.2f} s, step {t2 - t1:.2f} s", file=sys.stderr, flush=True)
        if i >= args.warmup:
            waits.append(t1 - t0)
            steps.append(t2 - t1)
    trainer.on_train_end()  # checkpoint_final.pth (for the inference part); stops the data workers
    pure = []
    for _ in range(args.measure):
        t0 = time.perf_counter()
        trainer.train_step(batch)
        pure.append(time.perf_counter() - t0)
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        trainer.network(batch["data"])
    arch = trainer.configuration_manager.network_arch_init_kwargs
    result = {"waits": waits, "steps": steps, "pure": pure, "gflop": 3 * counter.get_total_flops() / 1e9,
              "setup_s": setup_s, "threads": torch.get_num_threads(),
              "data_workers": getattr(trainer.dataloader_train, "num_processes", 0),
              "patch": list(trainer.configuration_manager.patch_size), "batch": trainer.batch_size,
              "features": list(arch["features_per_stage"]),
              "parameters": sum(p.numel() for p in trainer.network.parameters())}
    with open(args.out, "w") as handle:
        json.dump(result, handle)


def train(args):
    trainer = make_trainer(args)
    started = time.perf_counter()
    trainer.run_training()
    with open(args.out, "w") as handle:
        json.dump({"wall_s": time.perf_counter() - started, "epochs": trainer.num_epochs,
                   "iterations_per_epoch": trainer.num_iterations_per_epoch}, handle)


def info(args):
    import importlib.metadata as md
    import numpy
    versions = {name: md.version(name) for name in ("nnunetv2", "torch", "numpy", "batchgenerators",
                                                     "batchgeneratorsv2", "dynamic_network_architectures",
                                                     "blosc2", "SimpleITK")}
    with open(args.out, "w") as handle:
        json.dump({"versions": versions, "python": sys.version.split()[0],
                   "threads": torch.get_num_threads()}, handle)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["throughput", "train", "info"])
    parser.add_argument("--dataset")
    parser.add_argument("--config", default="3d_fullres")
    parser.add_argument("--fold", default="0")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--measure", type=int, default=3)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--iterations", type=int)
    parser.add_argument("--val-iterations", type=int)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    {"throughput": throughput, "train": train, "info": info}[args.mode](args)
'''


# Runs a nnU-Net entry point (module:function) or the driver (a .py file). With BENCH_CPU_COUNT set,
# os.cpu_count and multiprocessing.cpu_count return it first: nnU-Net sizes its threads and
# augmentation processes by them, which count every core of the machine, not the ones this
# process may run on (AutoSeg uses sched_getaffinity).
NNUNET_LAUNCHER = r'''
import multiprocessing, os, runpy, sys
if os.environ.get("BENCH_CPU_COUNT"):
    count = int(os.environ["BENCH_CPU_COUNT"])
    os.cpu_count = lambda: count
    multiprocessing.cpu_count = lambda: count
if __name__ == "__main__":  # not again in spawned worker processes (they do get the patch above)
    target, sys.argv = sys.argv[1], sys.argv[1:]
    if target.endswith(".py"):
        runpy.run_path(target, run_name="__main__")
    else:
        module, function = target.split(":")
        sys.argv[0] = function
        sys.exit(getattr(__import__(module, fromlist=[function]), function)())
'''

# ---------------------------------------------------------------------------------------------
# Processes: wall time and peak memory of a command's whole process tree.

def _children(pid: int) -> list[int]:
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/children") as handle:
                    found.extend(int(c) for c in handle.read().split())
            except OSError:
                pass
    except OSError:
        pass
    return found


def _tree(pid: int) -> list[int]:
    pids, stack = [], [pid]
    while stack:
        p = stack.pop()
        pids.append(p)
        stack.extend(_children(p))
    return pids


def _pss(pid: int) -> int:
    """Proportional set size: shared pages (libraries, page cache of forked parents) split among users."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _rss_and_hwm(pid: int) -> tuple[int, int]:
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss, hwm


class Run:
    """One command: wall seconds, exit status, and the peak memory of its process tree.

    ``tree_pss``: the peak over samples of the summed PSS of the process and its descendants (each
    shared page counted once, split among its users), the figure reported; ``tree_rss``: the same
    with RSS (counts shared library pages once per process); ``process_peak``: the largest VmHWM
    of any one process (exact, not sampled).
    """

    def __init__(self, argv: list[str], env: dict, log: Path, timeout: float | None = None, interval: float = 0.1):
        self.argv, self.env, self.log, self.timeout, self.interval = list(map(str, argv)), env, log, timeout, interval
        self.tree_pss = self.tree_rss = self.process_peak = 0
        self.killed = False

    def _sample(self, pid: int, stop: threading.Event) -> None:
        while not stop.is_set():
            total_rss = total_pss = 0
            for p in _tree(pid):
                rss, hwm = _rss_and_hwm(p)
                total_rss += rss
                total_pss += _pss(p)
                self.process_peak = max(self.process_peak, hwm)
            self.tree_rss = max(self.tree_rss, total_rss)
            self.tree_pss = max(self.tree_pss, total_pss)
            stop.wait(self.interval)

    def __call__(self, check: bool = True) -> "Run":
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "w") as out:
            out.write("$ " + " ".join(map(str, self.argv)) + "\n")
            out.flush()
            started = time.perf_counter()
            proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            stop = threading.Event()
            sampler = threading.Thread(target=self._sample, args=(proc.pid, stop), daemon=True)
            sampler.start()
            try:
                self.returncode = proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                self.killed = True
                _stop_group(proc)
                self.returncode = proc.returncode
            self.wall = time.perf_counter() - started
            stop.set()
            sampler.join()
            _stop_group(proc)  # leftover workers of the command, if any
        if check and self.returncode != 0 and not self.killed:
            tail = "".join(self.log.read_text(errors="replace").splitlines(keepends=True)[-25:])
            raise RuntimeError(f"command failed with status {self.returncode} (log {self.log}):\n"
                               f"{' '.join(map(str, self.argv))}\n{tail}")
        return self


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop the session this script started for ``proc`` (its own process group only)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


# ---------------------------------------------------------------------------------------------
# Machine and versions.

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def matmul_gflops() -> float:
    """Median float32 GEMM rate with the threads training uses (bench_training's measurement)."""
    from AutoSegLib.training.setup import configure_cpu_threads

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_training import matmul_gflops as measure

    return measure(configure_cpu_threads())


def git_state() -> str:
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ---------------------------------------------------------------------------------------------

class Bench:
    def __init__(self, args):
        self.args = args
        self.root = Path(args.root or tempfile.mkdtemp(prefix="compare_nnunet_")).resolve()
        self.raw = self.root / "nnUNet_raw"
        self.dataset = self.raw / DATASET_NAME
        self.nn_pre = self.root / "nnUNet_preprocessed"
        self.nn_results = self.root / "nnUNet_results"
        self.work = self.root / "autoseg_work"
        self.logs = self.root / "logs"
        self.driver = self.root / "nnunet_driver.py"
        self.launcher = self.root / "nnunet_launch.py"
        self.nnpy = str(args.nnunet_python)
        self.nnbin = Path(self.nnpy).parent
        env = dict(os.environ)
        env.update(nnUNet_raw=str(self.raw), nnUNet_preprocessed=str(self.nn_pre), nnUNet_results=str(self.nn_results),
                   PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p]),
                   PYTHONUNBUFFERED="1")
        if not args.nnunet_stock_cpu_count:
            env["BENCH_CPU_COUNT"] = str(len(os.sched_getaffinity(0)))
        self.env = env
        self.results: dict = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
        self.counter = 0

    # -- helpers ---------------------------------------------------------------------------
    def log(self, name: str) -> Path:
        self.counter += 1
        return self.logs / f"{self.counter:02d}_{name}.log"

    def autoseg(self, *argv) -> list[str]:
        return [sys.executable, "-m", "AutoSegLib", *map(str, argv)]

    def nnunet_cli(self, name: str, *argv) -> list[str]:
        """The console script ``name`` (its entry point, through the launcher)."""
        target = {"nnUNetv2_plan_and_preprocess": "nnunetv2.experiment_planning.plan_and_preprocess_entrypoints:"
                                                  "plan_and_preprocess_entry",
                  "nnUNetv2_predict": "nnunetv2.inference.predict_from_raw_data:predict_entry_point"}[name]
        return [self.nnpy, str(self.launcher), target, *map(str, argv)]

    def driver_argv(self, mode: str, *argv) -> list[str]:
        return [self.nnpy, str(self.launcher), str(self.driver), mode, *map(str, argv)]

    def preprocess_argv(self, system: str, dataset: Path, dataset_id: int, work: Path, *extra) -> list[str]:
        """Fingerprint + planning + 3d_fullres preprocessing of ``system``, ``-np`` processes."""
        n = self.args.num_processes
        if system == "autoseg":
            return self.autoseg("plan-and-preprocess", dataset, "-w", work, "-c", CONFIG, "-np", n)
        return self.nnunet_cli("nnUNetv2_plan_and_preprocess", "-d", dataset_id, "-c", CONFIG, "-np", n, "-npfp", n,
                               "--no_pbar", *extra)

    def predict_argv(self, system: str, images: Path, out: Path, dataset_id: int, work: Path, tta: bool) -> list[str]:
        """Fold-0 3d_fullres inference of ``system`` on the CPU."""
        if system == "autoseg":
            return self.autoseg("predict", "-i", images, "-o", out, "-m", work / "model", "-c", CONFIG,
                                "-f", "0", "--device", "cpu", *([] if tta else ["--no-tta"]))
        return self.nnunet_cli("nnUNetv2_predict", "-i", images, "-o", out, "-d", dataset_id, "-c",
                               CONFIG, "-f", "0", "-device", "cpu", "-npp", 1, "-nps", 1,
                               "--disable_progress_bar", *([] if tta else ["--disable_tta"]))

    def say(self, text: str) -> None:
        print(text, flush=True)

    # -- set-up ----------------------------------------------------------------------------
    def check_nnunet(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.driver.write_text(NNUNET_DRIVER)
        self.launcher.write_text(NNUNET_LAUNCHER)
        out = self.root / "nnunet_info.json"
        try:
            proc = subprocess.run(self.driver_argv("info", "--out", out), env=self.env, capture_output=True, text=True)
        except OSError as exc:
            sys.exit(f"--nnunet-python {self.nnpy}: cannot run it ({exc})\n\n{INSTALL_HINT}")
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["?"])[-1]
            sys.exit(f"--nnunet-python {self.nnpy}: nnunetv2 does not import ({last})\n\n{INSTALL_HINT}")
        self.nn_info = json.loads(out.read_text())

    def machine(self) -> dict:
        import numpy
        import torch

        import AutoSegLib

        mem = next((int(line.split()[1]) / 1024**2 for line in open("/proc/meminfo")
                    if line.startswith("MemTotal")), 0.0)
        usable = len(os.sched_getaffinity(0))
        info = {
            "cpu": cpu_model(), "logical_cores": os.cpu_count(), "usable_cores": usable,
            "affinity": sorted(os.sched_getaffinity(0)), "ram_gib": round(mem, 1),
            "os": f"{platform.system()} {platform.release()}",
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
            "autoseg": f"AutoSeg {AutoSegLib.__version__} ({git_state()}), Python {platform.python_version()}, "
                       f"torch {torch.__version__}, numpy {numpy.__version__}",
            "nnunet": f"nnunetv2 {self.nn_info['versions']['nnunetv2']}, Python {self.nn_info['python']}, "
                      + ", ".join(f"{k} {v}" for k, v in self.nn_info["versions"].items() if k != "nnunetv2"),
            "load_start": load(),
        }
        if self.nn_info["versions"]["torch"] != torch.__version__:
            info["warning"] = (f"different torch builds: AutoSeg {torch.__version__}, nnU-Net "
                               f"{self.nn_info['versions']['torch']}; network speed is not comparable")
        return info

    def make_dataset(self) -> None:
        a = self.args
        if (self.dataset / "dataset.json").is_file():
            self.say(f"reusing {self.dataset}")
        else:
            Run(self.autoseg("make-phantoms", self.dataset, "--kind", "ct", "--cases", a.cases,
                             "--test-cases", a.test_cases, "--seed", a.seed), self.env, self.log("make_phantoms"))()
        spec = json.loads((self.dataset / "dataset.json").read_text())
        median = median_shape(self.dataset / "imagesTr")
        synthetic = spec.get("synthetic", {})
        self.results["dataset"] = {"name": DATASET_NAME, "cases": spec["numTraining"],
                                   "test_cases": spec.get("numTest", 0), "median_shape": median,
                                   "seed": synthetic.get("seed")}
        self.say(f"dataset: {self.dataset} ({spec['numTraining']} training + {spec.get('numTest', 0)} test cases, "
                 f"median {'x'.join(map(str, median))} voxels)")

    # -- 1: fingerprint + planning + preprocessing -----------------------------------------
    def part_preprocess(self) -> None:
        a = self.args
        n = a.num_processes
        rows = {"plain": {"autoseg": [], "nnunet": []}, "checked": {"autoseg": [], "nnunet": []}}
        variants = ["plain"] + (["checked"] if not a.no_verify_row else [])
        self.say(f"\n== preprocessing: {a.repeats} repeat(s), {n} process(es)")
        for r in range(a.repeats):
            for variant in variants:
                order = ["autoseg", "nnunet"] if (r % 2 == 0) else ["nnunet", "autoseg"]
                for system in order:
                    if system == "autoseg":
                        work = self.root / f"autoseg_pp_{variant}_{r}"
                        shutil.rmtree(work, ignore_errors=True)
                        started = time.perf_counter()
                        if variant == "checked":
                            Run(self.autoseg("verify", self.dataset), self.env, self.log("autoseg_verify"))()
                        Run(self.preprocess_argv("autoseg", self.dataset, DATASET_ID, work),
                            self.env, self.log(f"autoseg_plan_preprocess_{variant}"))()
                        wall = time.perf_counter() - started
                        keep = work
                    else:
                        shutil.rmtree(self.nn_pre / DATASET_NAME, ignore_errors=True)
                        extra = ["--verify_dataset_integrity"] if variant == "checked" else []
                        run = Run(self.preprocess_argv("nnunet", self.dataset, DATASET_ID, self.work, *extra),
                                  self.env, self.log(f"nnunet_plan_preprocess_{variant}"))()
                        wall = run.wall
                    rows[variant][system].append(wall)
                    self.say(f"  repeat {r + 1} {variant:7s} {system:7s} {wall:7.1f} s   (load {load()})")
        self.results["preprocess"] = rows
        # the last plain AutoSeg work folder becomes the work folder of the other parts
        shutil.rmtree(self.work, ignore_errors=True)
        shutil.move(str(self.root / f"autoseg_pp_plain_{a.repeats - 1}"), str(self.work))
        for path in self.root.glob("autoseg_pp_*"):
            shutil.rmtree(path, ignore_errors=True)

    def ensure_preprocessed(self) -> None:
        if not (self.work / "plans.json").is_file():
            Run(self.preprocess_argv("autoseg", self.dataset, DATASET_ID, self.work), self.env,
                self.log("autoseg_plan_preprocess"))()
        if not (self.nn_pre / DATASET_NAME / "nnUNetPlans.json").is_file():
            Run(self.preprocess_argv("nnunet", self.dataset, DATASET_ID, self.work), self.env,
                self.log("nnunet_plan_preprocess"))()

    # -- plans: same patch, batch and network ----------------------------------------------
    def align_plans(self) -> None:
        self.results["plan"] = self.force_same_plan(self.work, DATASET_NAME)

    def force_same_plan(self, work: Path, name: str) -> dict:
        """Give AutoSeg's 3d_fullres nnU-Net's patch, batch and network if they differ; the note says what."""
        from AutoSegLib.fileutil import read_json, write_json
        from AutoSegLib.planning import Plans

        ours_all = read_json(work / "plans.json")
        ours = ours_all["configurations"][CONFIG]
        theirs = read_json(self.nn_pre / name / "nnUNetPlans.json")["configurations"][CONFIG]
        arch = theirs["architecture"]["arch_kwargs"]
        wanted = {"patch_size": list(theirs["patch_size"]), "batch_size": theirs["batch_size"],
                  "strides": [list(s) for s in arch["strides"]],
                  "kernel_sizes": [list(k) for k in arch["kernel_sizes"]],
                  "features_per_stage": list(arch["features_per_stage"]),
                  "n_conv_per_stage_encoder": list(arch["n_conv_per_stage"]),
                  "n_conv_per_stage_decoder": list(arch["n_conv_per_stage_decoder"])}
        differs = {k: (ours.get(k), v) for k, v in wanted.items() if ours.get(k) != v}
        spacing_same = [round(x, 6) for x in ours["spacing"]] == [round(x, 6) for x in theirs["spacing"]]
        note = {"patch": wanted["patch_size"], "batch": wanted["batch_size"], "features": wanted["features_per_stage"],
                "strides": wanted["strides"], "spacing_autoseg": ours["spacing"], "spacing_nnunet": theirs["spacing"],
                "identical": not differs, "forced": sorted(differs), "patch_autoseg": ours.get("patch_size")}
        if differs:
            ours_all["configurations"][CONFIG] = {**ours, **wanted}
            Plans.from_dict(ours_all)
            write_json(work / "plans.json", ours_all)
            self.say(f"  plans differ in {', '.join(sorted(differs))}: AutoSeg's {CONFIG} forced to nnU-Net's")
        else:
            self.say(f"  both planners chose the same {CONFIG}: patch {wanted['patch_size']}, batch "
                     f"{wanted['batch_size']}, features {wanted['features_per_stage']}")
        if not spacing_same:
            note["warning"] = "target spacings differ; the preprocessed images are not the same size"
            self.say("  WARNING: " + note["warning"])
        return note

    # -- 2: training throughput ------------------------------------------------------------
    def part_training(self) -> None:
        a = self.args
        self.say(f"\n== training throughput: {a.warmup} warm-up + {a.iterations} measured iteration(s), {CONFIG} "
                 f"fold 0, {a.training_repeats} run(s) each")
        self.results["matmul_gflops"] = matmul_gflops()
        self.say(f"  float32 matmul 2048^3: {self.results['matmul_gflops']:.1f} GFLOP/s")
        runs: dict[str, list[dict]] = {"autoseg": [], "nnunet": []}
        for r in range(a.training_repeats):
            for system in ["autoseg", "nnunet"] if r % 2 == 0 else ["nnunet", "autoseg"]:
                runs[system].append(self.throughput(system, DATASET_NAME, self.work, a.warmup, a.iterations))
        merged = {}
        for system, results in runs.items():  # every measured iteration of every run
            pooled = {k: [x for r in results for x in r[k]] for k in ("waits", "steps", "pure")}
            merged[system] = {**results[-1], **pooled}
        ours, theirs = merged["autoseg"], merged["nnunet"]
        for name, r in (("autoseg", ours), ("nnunet", theirs)):
            totals = [w + s for w, s in zip(r["waits"], r["steps"])]
            r["s_per_it"] = statistics.median(totals)
            r["it_per_s"] = 1 / r["s_per_it"]
            r["pure_s"] = statistics.median(r["pure"])
            r["wait_fraction"] = sum(r["waits"]) / sum(totals)
            r["network_share"] = min(1.0, r["pure_s"] / r["s_per_it"])
            r["gflops"] = r["gflop"] / r["pure_s"]
            r["gflops_loop"] = r["gflop"] / r["s_per_it"]
            self.say(f"  {name:7s} {r['s_per_it']:.2f} s/it ({r['it_per_s']:.3f} it/s), "
                     f"network step {r['pure_s']:.2f} s "
                     f"({r['gflop']:.0f} GFLOP, {r['gflops']:.1f} GFLOP/s), data wait {100 * r['wait_fraction']:.0f}%, "
                     f"{r['data_workers']} data worker(s), {r['threads']} thread(s); load {load()}")
        self.results["training"] = {"autoseg": ours, "nnunet": theirs}

    def throughput(self, system: str, name: str, work: Path, warmup: int, iterations: int, tag: str = "") -> dict:
        """One training-throughput run on fold 0 of dataset ``name``; it leaves the fold-0 weights."""
        out = self.root / f"{system}_throughput{tag}.json"
        if system == "autoseg":
            Run([sys.executable, __file__, "--child-throughput", "--root", self.root, "--child-dataset", name,
                 "--child-work", work, "--warmup", warmup, "--iterations", iterations, "--out", out], self.env,
                self.log(f"autoseg_throughput{tag}"))()
        else:
            shutil.rmtree(self.nn_results / name / f"nnUNetTrainer__nnUNetPlans__{CONFIG}" / "fold_0",
                          ignore_errors=True)
            Run(self.driver_argv("throughput", "--dataset", name, "--config", CONFIG, "--fold", "0",
                                 "--warmup", warmup, "--measure", iterations, "--out", out),
                self.env, self.log(f"nnunet_throughput{tag}"))()
        return json.loads(out.read_text())

    # -- 3: inference ------------------------------------------------------------------------
    def part_inference(self) -> None:
        a = self.args
        images = self.dataset / "imagesTs"
        cases = len(list(images.glob("*_0000.nii.gz")))
        self.say(f"\n== inference: {cases} test case(s), {CONFIG} fold 0, {a.repeats} repeat(s)")
        runs = {(s, t): [] for s in ("autoseg", "nnunet") for t in ("off", "on")}
        for r in range(a.repeats):
            for tta in ("off", "on") if r < a.tta_repeats else ("off",):
                order = ["autoseg", "nnunet"] if r % 2 == 0 else ["nnunet", "autoseg"]
                for system in order:
                    run = self.timed_predict(system, images, DATASET_ID, self.work, tta == "on",
                                             self.root / f"pred_{system}_tta{tta}_{r}", f"{system}_predict_tta{tta}")
                    runs[(system, tta)].append(run)
                    self.say(f"  repeat {r + 1} TTA {tta:3s} {system:7s} {run['wall']:7.1f} s "
                             f"({run['per_case']:.1f} s/case), "
                             f"tree peak PSS {run['tree_pss'] / MB:.0f} MiB (RSS sum {run['tree_rss'] / MB:.0f}), "
                             f"largest process {run['process_peak'] / MB:.0f} MiB  (load {load()})")
        self.results["inference"] = {f"{s}_tta_{t}": v for (s, t), v in runs.items()}
        self.results["inference_cases"] = cases

    def timed_predict(self, system: str, images: Path, dataset_id: int, work: Path, tta: bool, out: Path,
                      log: str) -> dict:
        """Predict every case of ``images`` into ``out`` (removed after): wall time and peak memory."""
        cases = len(list(images.glob("*_0000.nii.gz")))
        shutil.rmtree(out, ignore_errors=True)
        run = Run(self.predict_argv(system, images, out, dataset_id, work, tta), self.env, self.log(log))()
        done = len(list(out.glob("*.nii.gz")))
        if done != cases:
            raise RuntimeError(f"{system} wrote {done} of {cases} predictions (log {run.log})")
        shutil.rmtree(out, ignore_errors=True)
        return {"wall": run.wall, "per_case": run.wall / cases, "tree_pss": run.tree_pss, "tree_rss": run.tree_rss,
                "process_peak": run.process_peak}

    # -- 4: Dice after the same training budget ------------------------------------------------
    def nnunet_schedule(self, budget_s: float) -> tuple[int, int, int]:
        """Epochs, iterations and validation iterations per epoch that fit the budget at the measured speed."""
        t = self.results.get("training", {}).get("nnunet")
        s_per_it = t["s_per_it"] if t else self.args.nnunet_s_per_it
        startup = (t or {}).get("setup_s", 15.0) + 10.0
        # 90% of the budget (epoch ends plot, log and checkpoint); validation iterations run the
        # network forward only (about a third of a step) plus loading: priced at half a step
        total = max(1, int((0.9 * budget_s - startup) / (s_per_it * (1 + 0.5 * 0.2))))
        epochs = max(1, min(self.args.nnunet_epochs, total // 5))
        per_epoch = max(1, total // epochs)
        return epochs, per_epoch, max(1, round(per_epoch * 0.2))

    def part_dice(self) -> None:
        a = self.args
        budget_s = a.train_minutes * 60
        self.say(f"\n== Dice after {a.train_minutes:g} min of training each, fold all, test set imagesTs")
        Run(self.autoseg("preprocess", self.dataset, "-w", self.work, "-c", "3d_cpu", "-np", a.num_processes),
            self.env, self.log("autoseg_preprocess_3d_cpu"))()
        runs = {}
        labels_ts = self.dataset / "labelsTs"
        images = self.dataset / "imagesTs"
        # nnU-Net, stock trainer on 3d_fullres, schedule sized to the budget
        epochs, per_epoch, val = self.nnunet_schedule(budget_s)
        folder = self.nn_results / DATASET_NAME / f"nnUNetTrainer__nnUNetPlans__{CONFIG}" / "fold_all"
        shutil.rmtree(folder, ignore_errors=True)
        out = self.root / "nnunet_train.json"
        run = Run(self.driver_argv("train", "--dataset", DATASET_NAME, "--config", CONFIG, "--fold", "all",
                                   "--epochs", epochs, "--iterations", per_epoch, "--val-iterations", val,
                                   "--out", out),
                  self.env, self.log("nnunet_train_budget"), timeout=budget_s + a.grace_seconds)()
        checkpoint = next((c for c in ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")
                           if (folder / c).is_file()), None)
        runs["nnunet"] = {"label": f"nnU-Net {CONFIG}, nnUNetTrainer (SGD), {epochs} x {per_epoch} iterations "
                                   f"planned", "wall": run.wall, "killed": run.killed, "checkpoint": checkpoint,
                          "iterations_done": _nnunet_iterations_done(folder, per_epoch)}
        self.say(f"  nnunet   trained {run.wall:.0f} s{' (killed: budget + grace)' if run.killed else ''}, "
                 f"{runs['nnunet']['iterations_done']} iterations, predicting with {checkpoint}")
        if checkpoint:
            pred = self.root / "dice_pred_nnunet"
            shutil.rmtree(pred, ignore_errors=True)
            p = Run(self.nnunet_cli("nnUNetv2_predict", "-i", images, "-o", pred, "-d", DATASET_ID, "-c", CONFIG, "-f",
                                    "all", "-chk", checkpoint, "-device", "cpu", "-npp", 1, "-nps", 1,
                                    "--disable_progress_bar"), self.env, self.log("nnunet_predict_dice"))()
            runs["nnunet"].update(self.evaluate(pred, labels_ts), predict_s=p.wall)
        # AutoSeg, CPU configuration with the quick preset, then optionally the paper recipe on 3d_fullres
        variants = [("autoseg", "3d_cpu", ["--preset", "quick"], "AutoSeg 3d_cpu, quick preset (AdamW)")]
        if a.autoseg_fullres_dice:
            # the paper preset unchanged: --time-budget shortens its epochs after 3 timed iterations
            variants.append(("autoseg_fullres", CONFIG, ["--preset", "paper"],
                             f"AutoSeg {CONFIG}, paper preset (SGD)"))
        for key, config, preset, label in variants:
            train = Run(self.autoseg("train", self.dataset, config, "all", "-w", self.work, *preset, "--time-budget",
                                     a.train_minutes, "--no-validation", "--device", "cpu", "--overwrite"),
                        self.env, self.log(f"{key}_train_budget"), timeout=budget_s + a.grace_seconds)()
            iterations = _autoseg_iterations_done(self.work / "model" / config / "fold_all")
            runs[key] = {"label": label, "wall": train.wall, "killed": train.killed, "iterations_done": iterations,
                         "checkpoint": "final"}
            self.say(f"  {key:8s} trained {train.wall:.0f} s, {iterations} iterations")
            pred = self.root / f"dice_pred_{key}"
            shutil.rmtree(pred, ignore_errors=True)
            p = Run(self.autoseg("predict", "-i", images, "-o", pred, "-m", self.work / "model", "-c", config, "-f",
                                 "all", "--device", "cpu"), self.env, self.log(f"{key}_predict_dice"))()
            runs[key].update(self.evaluate(pred, labels_ts), predict_s=p.wall)
        for key, r in runs.items():
            if "dice" in r:
                self.say(f"  {key:15s} mean Dice {r['mean_dice']:.3f}: "
                         + ", ".join(f"{n} {_fmt(v, 3)}" for n, v in r["dice"].items()))
        self.results["dice"] = runs

    def evaluate(self, pred: Path, gt: Path) -> dict:
        summary = pred / "summary.json"
        Run(self.autoseg("evaluate", pred, gt, "--labels", self.dataset / "dataset.json", "-o", summary, "-np",
                         self.args.num_processes), self.env, self.log("evaluate"))()
        doc = json.loads(summary.read_text())
        return {"dice": {name: m.get("Dice") for name, m in doc["mean"].items()},
                "mean_dice": doc["foreground_mean"].get("Dice")}

    # -- 5: scaling with the image size ----------------------------------------------------------
    def part_scaling(self) -> None:
        a = self.args
        sizes = [size for size in a.sizes if size != 1.0]
        self.say(f"\n== scaling: size(s) {', '.join(f'{size:g}' for size in sizes)}; {a.scaling_cases} training + "
                 f"{a.scaling_test_cases} test cases each, {a.scaling_repeats} repeat(s), inference without TTA")
        self.results["scaling"] = {}
        for number, size in enumerate(sizes):
            started = time.monotonic()
            row = self.scale_one(SCALING_FIRST_ID + number, size)
            row["wall_s"] = time.monotonic() - started
            self.results["scaling"][f"{size:g}"] = row
            self.say(f"  size {size:g} took {row['wall_s'] / 60:.1f} min")

    def scale_one(self, dataset_id: int, size: float) -> dict:
        """Dataset of phantom size ``size``; preprocessing, fold-0 weights and inference of both systems."""
        a = self.args
        name = f"Dataset{dataset_id:03d}_CTPhantomSize{size:g}".replace(".", "p")
        dataset, work, tag = self.raw / name, self.root / f"autoseg_work_{name}", f"_size{size:g}"
        if (dataset / "dataset.json").is_file():
            self.say(f"  reusing {dataset}")
        else:
            Run(self.autoseg("make-phantoms", dataset, "--kind", "ct", "--cases", a.scaling_cases, "--test-cases",
                             a.scaling_test_cases, "--seed", a.seed, "--size", size), self.env,
                self.log(f"make_phantoms{tag}"))()
        row = {"dataset": name, "cases": a.scaling_cases, "test_cases": a.scaling_test_cases,
               "median_shape": median_shape(dataset / "imagesTr"),
               "preprocess": {"autoseg": [], "nnunet": []}, "inference": {"autoseg": [], "nnunet": []}}
        self.say(f"  size {size:g}: {name}, median {'x'.join(map(str, row['median_shape']))} voxels")
        for r in range(a.scaling_repeats):
            for system in alternating(r):
                shutil.rmtree(work if system == "autoseg" else self.nn_pre / name, ignore_errors=True)
                run = Run(self.preprocess_argv(system, dataset, dataset_id, work), self.env,
                          self.log(f"{system}_plan_preprocess{tag}"))()
                row["preprocess"][system].append(run.wall)
                self.say(f"  size {size:g} preprocess {system:7s} {run.wall:7.1f} s   (load {load()})")
        row["plan"] = self.force_same_plan(work, name)
        for system in ("autoseg", "nnunet"):
            # one iteration: the fold-0 weights inference needs (weights do not change its speed)
            self.throughput(system, name, work, warmup=1, iterations=0, tag=tag)
        for r in range(a.scaling_repeats):
            for system in alternating(r):
                run = self.timed_predict(system, dataset / "imagesTs", dataset_id, work, False,
                                         self.root / f"pred_{system}{tag}", f"{system}_predict{tag}")
                row["inference"][system].append(run)
                self.say(f"  size {size:g} inference {system:7s} {run['per_case']:.1f} s/case, tree peak PSS "
                         f"{run['tree_pss'] / MB:.0f} MiB  (load {load()})")
        return row


def alternating(repeat: int) -> list[str]:
    """Which system runs first in ``repeat``: they take turns, so drifting load hits both."""
    return ["autoseg", "nnunet"] if repeat % 2 == 0 else ["nnunet", "autoseg"]


def median_shape(images: Path) -> list[int]:
    """Median (z, y, x) array shape of the images in a folder."""
    from AutoSegLib.imageio import read_image

    shapes = [read_image(path)[0].shape for path in sorted(images.glob("*.nii.gz"))]
    return [int(statistics.median(shape[axis] for shape in shapes)) for axis in range(3)]


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _nnunet_iterations_done(folder: Path, per_epoch: int) -> int | None:
    logs = sorted(folder.glob("training_log_*.txt"))
    if not logs:
        return None
    epochs = logs[-1].read_text(errors="replace").count("Epoch time:")
    return epochs * per_epoch


def _autoseg_iterations_done(folder: Path) -> int | None:
    import torch

    path = folder / "checkpoint_final.pt"
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    schedule = state.get("schedule") or {}
    return int(state.get("epoch", 0)) * int(schedule.get("iterations_per_epoch", 0))


# ---------------------------------------------------------------------------------------------
# AutoSeg's side of the training throughput, in its own process (like nnU-Net's driver).

def child_throughput(args) -> None:
    import torch
    from bench_training import forward_gflop, pure_step_seconds, timed_iterations

    from AutoSegLib.training.loader import BatchLoader
    from AutoSegLib.training.setup import TrainOptions, setup_run
    from AutoSegLib.training.trainer import Trainer

    root = Path(args.root)
    started = time.perf_counter()
    run = setup_run(root / "nnUNet_raw" / args.child_dataset, args.child_work or root / "autoseg_work",
                    TrainOptions(CONFIG, "0", overwrite=True, device="cpu"))
    trainer = Trainer(run)

    def log(i, wait_s, step_s):
        print(f"iteration {i + 1}: waited {wait_s:.2f} s, step {step_s:.2f} s", flush=True)

    with BatchLoader(run.train_cases, run.config, run.data_folder, seed=0, ignore_label=run.ignore_label) as loader:
        setup_s = time.perf_counter() - started
        workers = loader.num_workers
        waits, steps, batch = timed_iterations(lambda: next(loader), trainer.train_step, args.warmup,
                                               args.iterations, log)
    trainer.save("final")  # for the inference part
    pure = pure_step_seconds(trainer.train_step, batch, args.iterations)
    gflop = 3 * forward_gflop(trainer.network, batch["data"])
    Path(args.out).write_text(json.dumps({
        "waits": waits, "steps": steps, "pure": pure, "gflop": gflop,
        "setup_s": setup_s, "threads": torch.get_num_threads(), "data_workers": workers,
        "patch": list(run.config["patch_size"]), "batch": run.config["batch_size"],
        "features": list(run.config["features_per_stage"]),
        "parameters": sum(p.numel() for p in trainer.network.parameters())}))


# ---------------------------------------------------------------------------------------------
# The table.

def median(values):
    return statistics.median(values) if values else None


def ratio(nnunet, autoseg):
    return None if not nnunet or not autoseg else nnunet / autoseg


def verdict(value, target) -> str:
    if value is None or target is None:
        return ""
    return "met" if value >= target else "NOT met"


def report(bench: Bench) -> str:
    res, lines = bench.results, []
    m = res["machine"]
    a = bench.args
    lines.append(f"machine: {m['cpu']}; {m['logical_cores']} logical cores, this run pinned to "
                 f"{m['usable_cores']} (CPU {','.join(map(str, m['affinity']))}); {m['ram_gib']} GiB RAM; {m['os']}; "
                 f"OMP_NUM_THREADS={m['OMP_NUM_THREADS']}; load average at start {m['load_start']}, "
                 f"at end {m.get('load_end', '?')}")
    lines.append(f"AutoSeg: {m['autoseg']}")
    lines.append(f"nnU-Net: {m['nnunet']}")
    if "warning" in m:
        lines.append("WARNING: " + m["warning"])
    d = res.get("dataset", {})
    lines.append(f"data: {DATASET_NAME}, CT phantoms, {d.get('cases')} training + {d.get('test_cases')} test cases, "
                 f"median {'x'.join(map(str, d.get('median_shape', [])))} voxels, seed {d.get('seed')}")
    if "plan" in res:
        p = res["plan"]
        lines.append(f"plan ({CONFIG}): patch {'x'.join(map(str, p['patch']))}, batch {p['batch']}, features "
                     f"{p['features']}; " + ("identical in both planners" if p["identical"]
                                              else f"forced on AutoSeg: {', '.join(p['forced'])}"))
    lines.append(f"settings: {a.repeats} repeat(s) of preprocessing and inference without TTA, {a.tta_repeats} with "
                 f"TTA (medians); {a.num_processes} process(es) for preprocessing; "
                 f"{a.training_repeats} training run(s) "
                 f"of {a.warmup} warm-up + {a.iterations} measured iterations (medians); training budget "
                 f"{a.train_minutes:g} min; nnU-Net cpu_count: "
                 f"{'stock (all cores)' if a.nnunet_stock_cpu_count else 'usable cores'}")
    lines.append("")
    lines.append("| measurement | AutoSeg | nnU-Net v2 | ratio (AutoSeg better > 1) | target | |")
    lines.append("|---|---:|---:|---:|---:|---|")

    def row(name, ours, theirs, r, target=None, unit="", digits=2, note="", ratio_text=None):
        cell = lambda v: "-" if v is None else f"{v:.{digits}f}{unit}"  # noqa: E731
        target_cell = "" if target is None else f">= {target:g}x"
        shown = ratio_text if ratio_text is not None else "-" if r is None else f"{r:.2f}x"
        lines.append(f"| {name} | {cell(ours)} | {cell(theirs)} | {shown} | {target_cell} | "
                     f"{note or verdict(r, target)} |")

    def difference(ours, theirs):
        return "-" if ours is None or theirs is None else f"{ours - theirs:+.3f} (difference)"

    if "preprocess" in res:
        pp = res["preprocess"]
        for variant, label in (("plain", "fingerprint + plan + preprocess 3d_fullres"),
                               ("checked", "same, with dataset checks")):
            o, t = median(pp[variant]["autoseg"]), median(pp[variant]["nnunet"])
            if o is not None:
                row(f"{label}, s", o, t, ratio(t, o), 3.0 if variant == "plain" else None, digits=1)
    if "training" in res:
        tr = res["training"]
        o, t = tr["autoseg"], tr["nnunet"]
        peak = res["matmul_gflops"]
        row("training, iterations/s (same plan)", o["it_per_s"], t["it_per_s"], o["it_per_s"] / t["it_per_s"], 1.0,
            digits=3)
        row("training, s per iteration", o["s_per_it"], t["s_per_it"], t["s_per_it"] / o["s_per_it"], digits=2)
        row("pure network step (batch in memory), s", o["pure_s"], t["pure_s"], t["pure_s"] / o["pure_s"], digits=2)
        share_ok = "met" if o["network_share"] >= 0.9 else "NOT met"
        row("network share of the iteration, %", 100 * o["network_share"], 100 * t["network_share"], None, digits=0,
            note=f"target >= 90%: {share_ok}")
        row("waiting for data, % of the loop", 100 * o["wait_fraction"], 100 * t["wait_fraction"], None, digits=0)
        row("GFLOP per step (3 x forward)", o["gflop"], t["gflop"], None, digits=0)
        row(f"GFLOP/s in the network step (matmul peak {peak:.1f})", o["gflops"], t["gflops"],
            o["gflops"] / t["gflops"], digits=1)
        row("GFLOP/s over the whole iteration", o["gflops_loop"], t["gflops_loop"], o["gflops_loop"] / t["gflops_loop"],
            digits=1)
        row("... as % of matmul peak", 100 * o["gflops_loop"] / peak, 100 * t["gflops_loop"] / peak, None, digits=0)
    if "inference" in res:
        inf = res["inference"]
        for tta, target in (("off", 1.8), ("on", 1.2)):
            o, t = inf[f"autoseg_tta_{tta}"], inf[f"nnunet_tta_{tta}"]
            if not o or not t:
                continue
            os_, ts = median([x["per_case"] for x in o]), median([x["per_case"] for x in t])
            row(f"inference TTA {tta}, s per case ({res['inference_cases']} cases, {len(o)} run(s))", os_, ts,
                ratio(ts, os_), target, digits=1)
            om, tm = median([x["tree_pss"] for x in o]) / MB, median([x["tree_pss"] for x in t]) / MB
            row(f"inference TTA {tta}, peak memory of the process tree (PSS), MiB", om, tm, ratio(tm, om), digits=0)
            om, tm = median([x["tree_rss"] for x in o]) / MB, median([x["tree_rss"] for x in t]) / MB
            row(f"inference TTA {tta}, same as summed RSS, MiB", om, tm, ratio(tm, om), digits=0)
            om, tm = median([x["process_peak"] for x in o]) / MB, median([x["process_peak"] for x in t]) / MB
            row(f"inference TTA {tta}, largest single process VmHWM, MiB", om, tm, ratio(tm, om), digits=0)
    if "dice" in res:
        dc = res["dice"]
        t = dc.get("nnunet", {})
        for key in ("autoseg", "autoseg_fullres"):
            o = dc.get(key)
            if not o:
                continue
            names = list((o.get("dice") or t.get("dice") or {}).keys())
            for name in names:
                ov, tv = (o.get("dice") or {}).get(name), (t.get("dice") or {}).get(name)
                row(f"Dice {name} ({key})", ov, tv, None, digits=3, ratio_text=difference(ov, tv))
            ov, tv = o.get("mean_dice"), t.get("mean_dice")
            if tv is None and t and not t.get("checkpoint") and ov is not None:
                tv = 0.0  # no checkpoint within the budget: nothing to predict with
            better = None if ov is None or tv is None else ("met" if ov > tv else "NOT met")
            row(f"**Dice mean ({key})**", ov, tv, None, digits=3, ratio_text=difference(ov, tv),
                note=f"target higher: {better}" if better else "")
        lines.append("")
        for key, r in dc.items():
            lines.append(f"- {key}: {r['label']}; trained {r['wall']:.0f} s wall (process start to exit)"
                         f"{', killed at the budget' if r.get('killed') else ''}, {r.get('iterations_done')} "
                         f"iterations, predicted with {r.get('checkpoint')} (mirroring TTA) in "
                         f"{r.get('predict_s', 0):.0f} s")
    if "training" in res:
        tr = res["training"]
        lines.append("")
        for key, r in tr.items():
            lines.append(f"- training {key}: {r['data_workers']} data-augmentation process(es), {r['threads']} network "
                         f"thread(s), {r['parameters'] / 1e6:.1f} M parameters, patch {'x'.join(map(str, r['patch']))} "
                         f"batch {r['batch']}, setup {r['setup_s']:.0f} s")
    lines.append("")
    lines.extend(scaling_table(bench))
    return "\n".join(lines)


def scaling_table(bench: Bench) -> list[str]:
    """Rows per phantom size: image and patch size, then preprocessing, inference and memory of both."""
    res, a = bench.results, bench.args
    if "scaling" not in res:
        return [f"scaling (--sizes {' '.join(f'{size:g}' for size in a.sizes)}): not run; list a size other than 1, "
                "e.g. --sizes 1 1.5 2"]
    rows = {float(size): row for size, row in res["scaling"].items()}
    if 1.0 in a.sizes and "dataset" in res:
        rows[1.0] = {"cases": res["dataset"]["cases"], "test_cases": res["dataset"]["test_cases"],
                     "median_shape": res["dataset"]["median_shape"], "plan": res.get("plan"),
                     "preprocess": res.get("preprocess", {}).get("plain", {}),
                     "inference": {s: res.get("inference", {}).get(f"{s}_tta_off", []) for s in ("autoseg", "nnunet")}}
    lines = [f"scaling: CT phantoms of size S (`make-phantoms --size S`: the same patients S times larger at the same "
             f"spacing), seed {a.seed}; size 1 is the main run, other sizes {a.scaling_repeats} repeat(s) each; "
             "3d_fullres, the same plan on both sides (* AutoSeg's forced to nnU-Net's); inference without TTA, "
             "fold 0, seconds per case from process start to exit; ratio = nnU-Net / AutoSeg (AutoSeg better > 1)",
             "",
             "| size | cases | median shape | voxels (M) | patch | preprocess s AutoSeg | nnU-Net | ratio "
             "| inference s/case AutoSeg | nnU-Net | ratio | peak PSS MiB AutoSeg | nnU-Net | ratio |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for size in sorted(rows):
        row = rows[size]
        plan = row.get("plan") or {}
        patch = "x".join(map(str, plan["patch"])) + ("*" if plan["forced"] else "") if plan else "-"
        shape = row["median_shape"]
        pre = [median(row["preprocess"].get(s, [])) for s in ("autoseg", "nnunet")]
        runs = [row["inference"].get(s, []) for s in ("autoseg", "nnunet")]
        per_case = [median([run["per_case"] for run in r]) for r in runs]
        memory = [median([run["tree_pss"] / MB for run in r]) for r in runs]
        cells = [f"{size:g}", f"{row['cases']}+{row['test_cases']}", "x".join(map(str, shape)),
                 f"{math.prod(shape) / 1e6:.2f}", patch]
        for ours, theirs, digits in (pre + [1], per_case + [1], memory + [0]):
            r = ratio(theirs, ours)
            cells += [_fmt(ours, digits), _fmt(theirs, digits), "-" if r is None else f"{r:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=textwrap.dedent(__doc__.split("\n", 2)[2]))
    parser.add_argument("--nnunet-python", type=Path, help="a Python interpreter with nnunetv2 installed")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 8+2 cases, 1 repeat, 2 iterations, 2-minute training budget")
    parser.add_argument("--parts", nargs="+", default=["preprocess", "training", "inference", "dice", "scaling"],
                        choices=["preprocess", "training", "inference", "dice", "scaling"],
                        help="parts to run (default all; scaling runs only when --sizes lists a size other than 1)")
    parser.add_argument("--cases", type=int, default=20, help="training cases (default 20)")
    parser.add_argument("--test-cases", type=int, default=4, help="held-out cases (default 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-np", "--num-processes", type=int, default=1,
                        help="processes for fingerprint and preprocessing, both systems (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of preprocessing and inference (default 3)")
    parser.add_argument("--tta-repeats", type=int, default=None,
                        help="repeats of the TTA inference runs (default 1)")
    parser.add_argument("--no-verify-row", action="store_true", help="skip the preprocessing row with dataset checks")
    parser.add_argument("--iterations", type=int, default=3, help="measured training iterations (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="training iterations before measuring (default 1)")
    parser.add_argument("--training-repeats", type=int, default=1,
                        help="training-throughput runs per system, in alternating order (default 1)")
    parser.add_argument("--train-minutes", type=float, default=10.0, help="training budget for the Dice part")
    parser.add_argument("--grace-seconds", type=float, default=120.0,
                        help="a training process still running this long after the budget is killed (default 120)")
    parser.add_argument("--nnunet-epochs", type=int, default=10,
                        help="epochs the nnU-Net budget run is split into (default 10; fewer if it has few iterations)")
    parser.add_argument("--nnunet-s-per-it", type=float, default=40.0,
                        help="nnU-Net seconds per iteration for sizing its budget run when the training part is "
                             "skipped (default 40, one core of the test machine)")
    parser.add_argument("--nnunet-stock-cpu-count", action="store_true",
                        help="let nnU-Net count every core of the machine (its default) rather than the usable ones "
                             "for its threads and processes")
    parser.add_argument("--autoseg-fullres-dice", action="store_true",
                        help="also train AutoSeg 3d_fullres with the paper preset under the same budget")
    parser.add_argument("--sizes", type=float, nargs="+", default=[1.0],
                        help="phantom sizes for the scaling part, each in (0, 4] (make-phantoms --size: the same "
                             "patients S times larger at the same spacing, about S times the voxels per axis); size 1 "
                             "is the main run, every other size gets its own small dataset (default: 1, no scaling)")
    parser.add_argument("--scaling-cases", type=int, default=6,
                        help="training cases of each scaling dataset (default 6; at least 5 for the 5-fold split)")
    parser.add_argument("--scaling-test-cases", type=int, default=2,
                        help="test cases of each scaling dataset, predicted for the timing (default 2)")
    parser.add_argument("--scaling-repeats", type=int, default=1,
                        help="repeats of preprocessing and inference at each size other than 1 (default 1)")
    parser.add_argument("--root", type=Path, default=None, help="work in this folder (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--json", type=Path, default=None, help="also write every figure to this JSON file")
    parser.add_argument("--child-throughput", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-dataset", default=DATASET_NAME, help=argparse.SUPPRESS)
    parser.add_argument("--child-work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_throughput:
        child_throughput(args)
        return 0
    if args.nnunet_python is None:
        parser.error("--nnunet-python is required\n\n" + INSTALL_HINT)
    if args.quick:
        args.cases, args.test_cases, args.repeats, args.iterations, args.warmup = 8, 2, 1, 2, 1
        args.train_minutes = min(args.train_minutes, 2.0)
    args.tta_repeats = 1 if args.tta_repeats is None else min(args.tta_repeats, args.repeats)
    if args.cases < 5:
        parser.error("--cases must be at least 5 (nnU-Net's 5-fold split)")
    bad = [size for size in args.sizes if not 0 < size <= MAX_SIZE]
    if bad:
        parser.error(f"--sizes must each be > 0 and <= {MAX_SIZE:g}, got {' '.join(f'{size:g}' for size in bad)}")
    scaling = "scaling" in args.parts and any(size != 1.0 for size in args.sizes)
    if scaling and args.scaling_cases < 5:
        parser.error(f"--scaling-cases must be at least 5 (nnU-Net's 5-fold split), got {args.scaling_cases}")
    if scaling and (args.scaling_test_cases < 1 or args.scaling_repeats < 1):
        parser.error("--scaling-test-cases and --scaling-repeats must be at least 1")

    bench = Bench(args)
    began = time.monotonic()
    bench.check_nnunet()
    bench.results["machine"] = bench.machine()
    bench.say(f"work folder: {bench.root} (logs in {bench.logs})")
    bench.say(f"machine: {bench.results['machine']['cpu']}, {bench.results['machine']['usable_cores']} usable core(s), "
              f"load {load()}")
    try:
        bench.make_dataset()
        if "preprocess" in args.parts:
            bench.part_preprocess()
        bench.ensure_preprocessed()
        bench.align_plans()
        if "training" in args.parts or "inference" in args.parts:
            if "training" not in args.parts:
                parser.error("--parts inference needs the training part (it makes the fold-0 checkpoints)")
            bench.part_training()
        if "inference" in args.parts:
            bench.part_inference()
        if "dice" in args.parts:
            bench.part_dice()
        if scaling:
            bench.part_scaling()
    finally:
        bench.results["machine"]["load_end"] = load()
        bench.results["total_s"] = time.monotonic() - began
        if args.json:
            args.json.write_text(json.dumps(bench.results, indent=1, default=str))
    command = "python " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:])
    print(f"\n## Result ({time.strftime('%Y-%m-%d %H:%M')}, {bench.results['total_s'] / 60:.0f} min)\n")
    print(f"command: `{command}`")
    print(report(bench))
    if not args.keep and args.root is None:
        shutil.rmtree(bench.root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
