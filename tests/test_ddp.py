"""DDP on CPU (gloo): a real 2-process torchrun training run, its resume, and the sharding contract.

One module-scoped run (Fashion-MNIST subset, wong_cnn, ATAS with no warm-up so the store is used
from the first step): epoch 1 under torchrun, then `--resume RUN_DIR train.epochs=2` under
torchrun. The tests then read the per-rank checkpoints: each rank's store holds exactly the
indices i % 2 == rank, every one of them was visited and rewritten by that rank, the two ranks'
weights agree (DDP averaged the gradients), and resuming the 2-rank run in one process is
refused. Around 25 s on two CPU cores.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from atas.checkpoint import CheckpointError, load_checkpoint
from atas.config import load_config
from atas.distributed import DistContext, saved_world_sizes
from tests.helpers import FMNIST

REPO = Path(__file__).resolve().parents[1]
N, WORLD = 512, 2
OVERRIDES = [
    "model.arch=wong_cnn",
    f"data.subset={N}",
    f"data.data_dir={FMNIST}",
    "train.device=cpu",
    "train.batch_size=64",
    "train.epochs=1",
    "train.progress=false",
    "train.probe_size=64",
    "train.co_action=keep_best",
    "eval.at_end=false",
    "method.warmup_epochs=0",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def _torchrun(*args: str, entry: tuple[str, ...] = ("-m", "atas"), timeout: float = 240) -> str:
    """Run `torchrun --nproc-per-node 2 <entry> train ARGS`; its stdout. A hang (ranks waiting on
    each other) fails the test after `timeout` s, and the whole process group is killed with it."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        f"--nproc-per-node={WORLD}",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        *entry,
        "train",
        *args,
    ]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and the ranks it started
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} hung for {timeout} s\n--- stdout\n{out[-3000:]}\n--- stderr\n{err[-3000:]}")
    assert proc.returncode == 0, f"{' '.join(cmd)}\n--- stdout\n{out[-3000:]}\n--- stderr\n{err[-5000:]}"
    return out


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    if not (FMNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST not found in {FMNIST} (apt-get install dataset-fashion-mnist)")
    root = tmp_path_factory.mktemp("ddp")
    run_dir, epoch1 = root / "run", root / "epoch1"
    _torchrun("fmnist", *OVERRIDES, "--run-dir", str(run_dir))  # epoch 1, then the run ends
    epoch1.mkdir()
    for rank in range(WORLD):
        shutil.copy(run_dir / f"checkpoint-rank{rank}-of{WORLD}.pt", epoch1)
    _torchrun("--resume", str(run_dir), "train.epochs=2")  # resumed: epoch 2
    return run_dir, epoch1


def _ckpt(folder: Path, rank: int) -> dict:
    return load_checkpoint(folder / f"checkpoint-rank{rank}-of{WORLD}.pt")


@pytest.mark.slow
def test_ddp_run_completes_and_each_rank_writes_its_checkpoint(ddp_run):
    run_dir, _ = ddp_run
    assert not (run_dir / "checkpoint.pt").exists()
    assert saved_world_sizes(run_dir, "checkpoint.pt") == {WORLD}
    steps_per_epoch = (N // WORLD) // 64
    for rank in range(WORLD):
        state = _ckpt(run_dir, rank)
        assert state["epoch"] == 2 and state["step"] == 2 * steps_per_epoch
    metrics = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 2  # rank 0 logs, once per epoch, across the resume


@pytest.mark.slow
def test_each_rank_store_holds_exactly_its_shard_and_updated_every_row(ddp_run):
    run_dir, epoch1 = ddp_run
    owned = []
    for rank in range(WORLD):
        store, before = _ckpt(run_dir, rank)["method"]["store"], _ckpt(epoch1, rank)["method"]["store"]
        expected = torch.arange(N)[rank::WORLD]
        assert torch.equal(store["indices"], expected) and torch.equal(before["indices"], expected)
        assert store["delta"].shape[0] == len(expected)  # no row for another rank's index
        # warm-up 0: v_i > 0 once sample i went through this rank's ATAS step, so every owned
        # index was visited here, in both epochs (v changes again in epoch 2) ...
        assert (before["grad_sq_ema"] > 0).all() and (store["grad_sq_ema"] != before["grad_sq_ema"]).all()
        # ... and its prior rewritten: every row differs from its value one epoch earlier.
        changed = (store["delta"] != before["delta"]).flatten(1).any(1)
        assert changed.all(), f"rank {rank}: rows of indices {expected[~changed].tolist()} were not rewritten"
        eps = load_config("fmnist").method.eps
        assert store["delta"].abs().max() <= eps + 1e-6
        owned.append(set(store["indices"].tolist()))
    assert owned[0].isdisjoint(owned[1]) and owned[0] | owned[1] == set(range(N))


@pytest.mark.slow
def test_ranks_hold_the_same_weights(ddp_run):
    """DDP averages the gradients, so the parameters agree across ranks (buffers may not: BN
    running statistics are broadcast from rank 0 before each forward, then updated locally)."""
    run_dir, _ = ddp_run
    models = [_ckpt(run_dir, rank)["model"] for rank in range(WORLD)]
    params = [k for k in models[0] if not ("running_" in k or "num_batches" in k)]
    for k in params:
        assert torch.allclose(models[0][k], models[1][k], atol=1e-6), k


@pytest.mark.slow
def test_resuming_a_two_rank_run_in_one_process_is_refused(ddp_run, monkeypatch):
    from atas.trainer import load_run_config, train

    run_dir, _ = ddp_run
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(CheckpointError, match="world size"):
        train(load_run_config(run_dir), run_dir=run_dir, resume=True)


_CO_AT_EPOCH_2 = """
import sys
from atas.monitor import COMonitor
_update = COMonitor.update
def update(self, row):  # rank 0's monitor (the probe runs there only) flags epoch 2
    verdict = _update(self, row)
    return dict(verdict, co=True) if row["epoch"] == 2 else verdict
COMonitor.update = update
from atas.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_co_stop_on_rank_0_stops_every_rank(tmp_path):
    """train.co_action=stop: the verdict exists on rank 0 only; without the broadcast rank 1 would
    train on into epoch 3 and both ranks would wait on each other forever."""
    if not (FMNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST not found in {FMNIST}")
    entry = tmp_path / "co_at_epoch_2.py"
    entry.write_text(_CO_AT_EPOCH_2)
    overrides = [o for o in OVERRIDES if not o.startswith("train.epochs")]
    out = _torchrun(
        "fmnist",
        *overrides,
        "train.epochs=4",
        "train.co_action=stop",
        "--run-dir",
        str(tmp_path / "run"),
        entry=(str(entry),),
        timeout=90,
    )
    assert "ending the run" in out
    for rank in range(WORLD):
        assert _ckpt(tmp_path / "run", rank)["epoch"] == 2


# ---------------------------------------------------------------- DistContext without processes
def test_resume_path_names_the_saved_world_size(tmp_path):
    for rank in range(WORLD):
        (tmp_path / f"checkpoint-rank{rank}-of{WORLD}.pt").touch()
    with pytest.raises(CheckpointError, match=r"world size 1: .*world size 2.*--nproc-per-node 2"):
        DistContext().resume_path(tmp_path, "checkpoint.pt")
    with pytest.raises(CheckpointError, match="world size 4"):
        DistContext(True, 1, 4).resume_path(tmp_path, "checkpoint.pt")
    assert DistContext(True, 1, 2).resume_path(tmp_path, "checkpoint.pt").name == "checkpoint-rank1-of2.pt"
    (tmp_path / "checkpoint-rank1-of2.pt").unlink()
    with pytest.raises(CheckpointError, match="rank 1"):
        DistContext(True, 1, 2).resume_path(tmp_path, "checkpoint.pt")
    with pytest.raises(CheckpointError, match="nothing to resume"):
        DistContext().resume_path(tmp_path / "empty", "checkpoint.pt")


def test_shard_indices_are_rank_stable_and_equal_sized():
    cfg = load_config("fmnist", ["train.batch_size=2"])
    shards = [DistContext(True, r, 3).shard_indices(cfg, 10) for r in range(3)]
    assert [s.tolist() for s in shards] == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]  # index 9 dropped
    assert DistContext().broadcast_flag(True) is True


def _collectives_worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    ctx = DistContext(True, rank, WORLD)
    # Only rank 0 has a verdict; everyone must end up with it.
    stop = ctx.broadcast_flag(rank == 0)
    keep = ctx.broadcast_flag(rank == 1)
    sums = torch.tensor([1.5 * (rank + 1), rank, 64.0, 0.1, 0.01 * (rank + 1), 0.2 * (rank + 1)])
    reduced = ctx.reduce_sums(sums)
    torch.save({"stop": stop, "keep": keep, "sums": reduced}, f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.slow
def test_broadcast_flag_and_metric_reduction_across_two_processes(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "result")
    mp.spawn(_collectives_worker, args=(_free_port(), out), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        got = torch.load(f"{out}.{rank}", weights_only=True)
        assert got["stop"] is True and got["keep"] is False
        assert torch.allclose(got["sums"], torch.tensor([4.5, 1.0, 128.0, 0.2, 0.01, 0.4]))
