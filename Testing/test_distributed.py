"""Beyond one process: data-parallel training with torchrun (gloo on the CPU), folds side by side,
sharded prediction (docs/scaling.md).

The pure helpers (rank environment, batch split, fold and device lists, parts of a case list)
are tested directly. The rest runs real ``torchrun`` groups of 2 ranks in subprocesses, with the
tiny network and phantoms of test_training_run.py, one thread per rank, a free port for each
group's rendezvous and a timeout on every process.

This file is also the program the weight-equality run starts under torchrun
(``python test_distributed.py drive OUT ARGS...``): it runs ``autoseg ARGS`` as every rank does,
and after each training step records how far apart the ranks' weights are.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # the driver runs as a script
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "Testing"))

import numpy as np
import pytest
from test_training_run import CONFIG, Process, phantoms  # noqa: F401 - phantoms is a fixture

from AutoSegLib import cli
from AutoSegLib.training.distributed import (
    DistributedSetupError,
    RankEnv,
    batch_split,
    loss_weight,
    rank_env,
    rank_slots,
    split_description,
)
from AutoSegLib.training.launch import (
    LaunchError,
    Slot,
    child_arguments,
    parse_devices,
    parse_folds,
    requested_ranks,
    strip_options,
)

RUN_TIMEOUT = 240  # seconds any group may take before the test fails (instead of hanging CI)
EPOCHS, ITERATIONS = 2, 3


# -- pure helpers ------------------------------------------------------------------------------
def test_rank_env_reads_torchrun_variables_and_names_a_bad_one():
    env = rank_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert env == RankEnv(3, 4, 1, 2) and not env.primary
    assert rank_env({"PATH": "/bin"}) is None  # not under torchrun
    assert rank_env({"WORLD_SIZE": "1"}) == RankEnv(0, 1, 0, 1)
    with pytest.raises(DistributedSetupError, match="RANK='x'"):
        rank_env({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(DistributedSetupError, match="RANK=2 with WORLD_SIZE=2"):
        rank_env({"RANK": "2", "WORLD_SIZE": "2"})


def test_batch_split_is_nnunet_v2s_and_the_slots_cover_the_batch_once():
    assert batch_split(2, 2) == [1, 1]
    assert batch_split(5, 2) == [3, 2]  # the first global % world ranks take one more
    assert batch_split(7, 3) == [3, 2, 2]
    for batch, world in [(2, 1), (2, 2), (5, 2), (7, 3), (9, 4)]:
        slots = [rank_slots(batch, world, r) for r in range(world)]
        assert [i for start, stop in slots for i in range(start, stop)] == list(range(batch))
        weights = [loss_weight(s, batch, world) for s in slots]
        # the ranks' averaged weighted losses are the global batch's mean: sum_r w_r * (mean of b_r samples) / W
        per_sample = np.arange(1.0, batch + 1)
        ranks = [per_sample[s[0]:s[1]].mean() * w for s, w in zip(slots, weights)]
        assert sum(ranks) / world == pytest.approx(per_sample.mean(), rel=1e-12)
    with pytest.raises(DistributedSetupError, match="batch of 2 cannot be split over 3 ranks"):
        batch_split(2, 3)
    assert "does not divide" in split_description(5, 2) and "does not divide" not in split_description(4, 2)


def test_one_ranks_slots_are_exactly_its_part_of_the_one_process_batch(phantoms):
    """The sampling seeds are per sample, so two ranks make the batch one process makes."""
    import torch

    from AutoSegLib.fileutil import read_json
    from AutoSegLib.training.loader import BatchLoader

    _, work = phantoms
    config = read_json(work / "plans.json")["configurations"][CONFIG]
    folder = next((work / "preprocessed").iterdir())
    cases = sorted(p.name[:-len(".json")] for p in folder.glob("*.json"))
    with BatchLoader(cases, config, folder, num_workers=0, seed=5) as whole, \
            BatchLoader(cases, config, folder, num_workers=0, seed=5, slots=(0, 1)) as first, \
            BatchLoader(cases, config, folder, num_workers=0, seed=5, slots=(1, 2)) as second:
        for _ in range(3):
            batch, a, b = next(whole), next(first), next(second)
            assert batch["keys"] == a["keys"] + b["keys"]
            assert torch.allclose(batch["data"], torch.cat([a["data"], b["data"]]), rtol=0, atol=1e-6)
            for level, (ta, tb) in zip(batch["target"], zip(a["target"], b["target"])):
                assert torch.equal(level, torch.cat([ta, tb]))  # integer labels: exactly


def test_fold_and_device_lists():
    assert parse_folds("3") == ["3"] and parse_folds("all") == ["all"]
    assert parse_folds("0-4") == ["0", "1", "2", "3", "4"] and parse_folds("0,2-3") == ["0", "2", "3"]
    with pytest.raises(LaunchError, match="more than once"):
        parse_folds("0,0")
    with pytest.raises(LaunchError, match="'x' is not a fold"):
        parse_folds("0,x")
    assert parse_devices("0,cuda:1") == [Slot("cuda", "0"), Slot("cuda", "1")]
    assert parse_devices("cpu,cpu") == [Slot("cpu"), Slot("cpu")]
    with pytest.raises(LaunchError, match="names a GPU twice"):
        parse_devices("0,cuda:0")
    with pytest.raises(LaunchError, match="'gpu0' is not a GPU index"):
        parse_devices("gpu0")
    argv = ["train", "DS", "3d_fullres", "0-1", "--devices=cpu,cpu", "--epochs", "2", "--device", "auto"]
    assert strip_options(argv, {"--devices": 1, "--epochs": 1}) == ["train", "DS", "3d_fullres", "0-1", "--device",
                                                                    "auto"]
    assert child_arguments(argv, "0-1", "1", Slot("cpu")) == ["train", "DS", "3d_fullres", "1", "--epochs", "2",
                                                              "--device", "cpu"]


def test_more_gpus_than_the_machine_has_is_one_clear_line():
    with pytest.raises(LaunchError, match="--gpus 2: this machine has 0 CUDA device"):
        requested_ranks(2, None, "auto", 0)
    with pytest.raises(LaunchError, match="not both"):
        requested_ranks(2, 2, "auto", 2)
    assert requested_ranks(None, 2, "cpu", 0) == (2, "cpu")
    assert requested_ranks(2, None, "auto", 4) == (2, "cuda")
    with pytest.raises(LaunchError, match="--nproc 3 on CUDA .* has 2 CUDA device"):
        requested_ranks(None, 3, "auto", 2)


def test_cli_refuses_bad_launch_and_part_flags(phantoms, capsys):
    dataset, work = phantoms
    assert cli.main(["train", str(dataset), CONFIG, "0", "-w", str(work), "--gpus", "2"]) == 1
    assert "--gpus 2: this machine has 0 CUDA device(s)" in capsys.readouterr().err
    assert cli.main(["train", str(dataset), CONFIG, "0", "-w", str(work), "--devices", "cpu,cpu"]) == 1
    assert "--devices places several folds" in capsys.readouterr().err
    predict = ["predict", "-i", str(dataset / "imagesTr"), "-o", str(work / "never"), "-m", str(work / "model")]
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*predict, "--num-parts", "0", "--part-id", "0"])
    assert exit_info.value.code == 2 and "--num-parts: must be at least 1" in capsys.readouterr().err
    assert cli.main([*predict, "--num-parts", "2", "--part-id", "2"]) == 1
    assert "--part-id 2 is out of range for --num-parts 2 (0 to 1)" in capsys.readouterr().err
    assert cli.main([*predict, "--part-id", "1"]) == 1
    assert "--part-id needs --num-parts" in capsys.readouterr().err
    assert not (work / "never").exists()


def test_only_rank_0_reports_and_every_rank_names_itself_in_errors():
    import io

    from AutoSegLib.training.distributed import RankReporter, reporter_for

    out, err = io.StringIO(), io.StringIO()
    other = RankReporter(RankEnv(1, 2), events=True)
    other.out, other.err = out, err
    other.log("train", "epoch 1/2")
    other.emit("progress", "train", done=1)
    other.warning("train", "slow disk")
    other.error("train", "data worker 0 died")
    assert out.getvalue() == ""  # events come from rank 0 alone
    assert err.getvalue() == "WARNING: rank 1 of 2: slow disk\nERROR: rank 1 of 2: data worker 0 died\n"
    first = RankReporter(RankEnv(0, 2), events=True)
    first.out, first.err = io.StringIO(), io.StringIO()
    first.error("train", "boom")
    event = json.loads(first.out.getvalue())
    assert (event["event"], event["message"], event["rank"]) == ("error", "rank 0 of 2: boom", 0)
    assert type(reporter_for({}, events=False)).__name__ == "Reporter"  # not under torchrun
    assert type(reporter_for({"WORLD_SIZE": "1"}, events=False)).__name__ == "Reporter"


def test_a_lost_peer_becomes_one_line_and_other_errors_pass_unchanged():
    from AutoSegLib.training.distributed import Group, GroupBroken

    group = Group(RankEnv(0, 2))
    with pytest.raises(GroupBroken, match="broke off during a training step .*Connection closed by peer"):
        with group.guard("a training step"):
            raise RuntimeError("[third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer")
    with pytest.raises(RuntimeError, match="shapes do not match"):
        with group.guard("a training step"):
            raise RuntimeError("shapes do not match")


def test_select_part_splits_the_sorted_cases_whatever_their_order():
    from AutoSegLib.inference.files import InputCase, select_part

    cases = [InputCase(f"case_{i}", (), ".nii.gz") for i in (4, 0, 3, 1, 2)]
    parts = [[c.case_id for c in select_part(cases, 2, i)] for i in range(2)]
    assert parts == [["case_0", "case_2", "case_4"], ["case_1", "case_3"]]
    assert [c.case_id for c in select_part(list(reversed(cases)), 2, 1)] == parts[1]
    assert select_part(cases, 7, 6) == []  # more parts than cases: an empty part, not an error


# -- torchrun groups -------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args) -> list[str]:
    """``python -m torch.distributed.run`` arguments for 2 ranks on this machine, on a free port."""
    return ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), *map(str, args)]


def train_args(dataset, work, fold="0", *flags) -> list[str]:
    return ["train", str(dataset), CONFIG, fold, "-w", str(work), "--device", "cpu", "--num-workers", "0",
            "--no-validation", "--events", *map(str, flags)]


def run_group(argv: list[str], log: Path) -> tuple[int, list[dict], str]:
    process = Process(argv, log)
    try:
        status = process.finish(RUN_TIMEOUT)
    finally:
        process.cleanup()
    return status, process.events, log.read_text(errors="replace")


def fold_dir(work: Path, fold="0") -> Path:
    return work / "model" / CONFIG / f"fold_{fold}"


def step_losses(events: list[dict]) -> list[float]:
    return [e["loss"] for e in events if e["event"] == "progress" and e.get("stage") == "train"]


@pytest.fixture(scope="module")
def ddp_run(phantoms, tmp_path_factory):
    """Fold 0 trained by a torchrun group of 2 (the driver records the ranks' weights after each step)."""
    dataset, work = phantoms
    root = tmp_path_factory.mktemp("ddp")
    shutil.copytree(work, root / "WORK")
    out = root / "spread"
    argv = torchrun(__file__, "drive", out,
                    *train_args(dataset, root / "WORK", "0", "--epochs", EPOCHS, "--iterations-per-epoch", ITERATIONS))
    status, events, stderr = run_group(argv, root / "stderr.txt")
    assert status == 0, stderr[-3000:]
    spreads = [json.loads((root / f"spread.rank{r}.json").read_text()) for r in range(2)]
    return {"dataset": dataset, "work": root / "WORK", "events": events, "stderr": stderr, "spreads": spreads}


def test_two_ranks_hold_identical_weights_after_every_step(ddp_run):
    spreads = ddp_run["spreads"]
    assert len(spreads[0]) == len(spreads[1]) == EPOCHS * ITERATIONS  # both ranks stepped every step
    # max |w_rank0 - w_rank1| over every parameter after each step (measured: 0.0, bit-identical)
    assert max(spreads[0]) <= 1e-7, spreads[0]


def test_loss_curve_matches_one_process_with_the_same_global_batch(ddp_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    dataset = ddp_run["dataset"]
    work = tmp_path / "WORK"
    shutil.copytree(ddp_run["work"], work)
    capsys.readouterr()
    status = cli.main([*train_args(dataset, work, "0", "--epochs", EPOCHS, "--iterations-per-epoch", ITERATIONS),
                       "--overwrite"])
    single = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert status == 0
    ddp, one = step_losses(ddp_run["events"]), step_losses(single)
    assert len(ddp) == len(one) == EPOCHS * ITERATIONS
    # Same samples, same initial weights, gradients averaged by DDP: only float summation order
    # differs (measured: relative difference < 1e-6).
    assert ddp == pytest.approx(one, rel=1e-4)
    epochs_ddp = [e for e in ddp_run["events"] if e["event"] == "epoch"]
    epochs_one = [e for e in single if e["event"] == "epoch"]
    for a, b in zip(epochs_ddp, epochs_one, strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)
        assert a["pseudo_dice"] == pytest.approx(b["pseudo_dice"], rel=1e-3, abs=1e-4)  # summed counts over ranks


def test_rank_0_alone_writes_and_reports(ddp_run):
    from AutoSegLib.models import checkpoint as ckpt
    from AutoSegLib.training.progress import read_log

    events, folder = ddp_run["events"], fold_dir(ddp_run["work"])
    assert [e["event"] for e in events].count("start") == 1 and [e["event"] for e in events].count("done") == 1
    assert any("2 ranks (cpu, gloo)" in e.get("message", "") and "split over 2 ranks: 1 + 1" in e["message"]
               for e in events)
    assert [r["epoch"] for r in read_log(folder)] == list(range(EPOCHS))  # one record per epoch, not per rank
    assert (folder / "progress.png").is_file()
    state = ckpt.load_checkpoint(folder / "checkpoint_final.pt")
    assert state["epoch"] == EPOCHS and not any(k.startswith("module.") for k in state["network_weights"])
    assert not list(folder.glob(".tmp*"))


def test_a_second_group_on_a_held_fold_is_refused_by_every_rank(phantoms, tmp_path):
    from AutoSegLib.locks import lock_folder

    dataset, work = phantoms
    shutil.copytree(work, tmp_path / "WORK")
    work = tmp_path / "WORK"
    with lock_folder(fold_dir(work), "training this fold"):  # as a running trainer holds it
        status, _, stderr = run_group(torchrun("-m", "AutoSegLib", *train_args(dataset, work, "0")),
                                           tmp_path / "stderr.txt")
    assert status != 0
    assert "rank 0 of 2:" in stderr and "is training this fold; wait for it or stop it" in stderr, stderr[-3000:]
    assert "rank 1 of 2: rank 0 could not start the run" in stderr
    assert not list(fold_dir(work).glob("checkpoint_*"))


def labels_of(folder: Path) -> dict[str, np.ndarray]:
    from AutoSegLib.imageio import read_image

    return {p.name: read_image(p)[0] for p in sorted(folder.glob("*.nii.gz")) if not p.name.startswith(".")}


def test_parts_and_torchrun_ranks_predict_what_one_process_predicts(ddp_run, tmp_path, capsys):
    from AutoSegLib.fileutil import TMP_PREFIX

    dataset, model = ddp_run["dataset"], ddp_run["work"] / "model"
    images = tmp_path / "images"  # 3 cases: parts of 2 and 1
    images.mkdir()
    for path in sorted((dataset / "imagesTr").iterdir())[:3]:
        shutil.copy(path, images / path.name)
    common = ["predict", "-i", str(images), "-m", str(model), "--no-tta", "--device", "cpu", "--events"]
    one, parts, ranks = tmp_path / "one", tmp_path / "parts", tmp_path / "ranks"
    assert cli.main([*common, "-o", str(one)]) == 0
    for part in ("0", "1"):
        assert cli.main([*common, "-o", str(parts), "--num-parts", "2", "--part-id", part]) == 0
    status, _, stderr = run_group(torchrun("-m", "AutoSegLib", *common, "-o", ranks), tmp_path / "stderr.txt")
    assert status == 0, stderr[-3000:]
    expected = labels_of(one)
    assert len(expected) == 3 and len(np.unique(np.concatenate([a.ravel() for a in expected.values()]))) > 1
    for folder in (parts, ranks):
        got = labels_of(folder)
        assert sorted(got) == sorted(expected)
        for name, array in expected.items():
            assert got[name].dtype.kind in "iu" and np.array_equal(got[name], array), name  # integers, exactly
        assert not [p for p in folder.iterdir() if p.name.startswith((".autoseg-part", TMP_PREFIX))]

    # --continue: finished cases are skipped; a partial (temporary) output never counts
    (one / "phantom_ct_001.nii.gz").unlink()
    (one / f"{TMP_PREFIX}phantom_ct_001.nii.gz").write_bytes(b"half")
    capsys.readouterr()
    assert cli.main([*common, "-o", str(one), "--continue"]) == 0
    done = [json.loads(line) for line in capsys.readouterr().out.splitlines()][-1]
    assert done["event"] == "done" and (done["cases"], done["skipped"]) == (1, 2)
    assert np.array_equal(labels_of(one)["phantom_ct_001.nii.gz"], expected["phantom_ct_001.nii.gz"])


# -- the driver run under torchrun ----------------------------------------------------------------
def drive(out: str, argv: list[str]) -> int:
    """``autoseg ARGV`` as this rank, recording max |w_this - w_other| after every training step."""
    import torch
    import torch.distributed as dist

    from AutoSegLib.training import trainer

    spreads: list[float] = []
    step = trainer.Trainer.train_step

    def recorded(self, batch):
        loss = step(self, batch)
        flat = torch.cat([p.detach().reshape(-1) for p in self.network.parameters()]).double()
        high, low = flat.clone(), flat.clone()
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        spreads.append(float((high - low).max()))
        return loss

    trainer.Trainer.train_step = recorded
    status = cli.main(argv)
    Path(f"{out}.rank{os.environ['RANK']}.json").write_text(json.dumps(spreads))
    return status


if __name__ == "__main__" and len(sys.argv) > 2 and sys.argv[1] == "drive":
    sys.exit(drive(sys.argv[2], sys.argv[3:]))
