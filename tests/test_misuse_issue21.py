"""Issue 21, items 7-16: the last tracebacks of the CLI, silent settings, evaluation results that
replaced each other, ATAS's silent traps in a loop of one's own, and the minor ones. Each test
failed on the code before the fix."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils.data import ConcatDataset, Subset, TensorDataset

import atas
from atas.config import ConfigError, load_config, training_warnings
from tests.helpers import needs_fmnist  # noqa: E402
from tests.test_misuse_cli import EVAL, TINY, assert_one_line, finished_run, result_file, run_cli, run_copy  # noqa: F401


@pytest.fixture(autouse=True)
def no_debug(monkeypatch):
    monkeypatch.delenv("ATAS_DEBUG", raising=False)


def caught(fn):
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in got]


# ------------------------------------------------------------------------------- the 9 tracebacks
@needs_fmnist
@pytest.mark.parametrize(
    "text, what",
    [
        ('"just a string"\n', "does not hold a config"),
        ("[1, 2]\n", "does not hold a config"),
        ("", "does not hold a config"),
        ("a: [b\n", "is not valid YAML"),
    ],
)
def test_an_edited_config_yaml_is_one_line_on_resume(run_copy, capsys, text, what):
    (run_copy / "config.yaml").write_text(text)
    status, _, err = run_cli(capsys, "train", "--resume", run_copy)
    assert status == 2
    assert_one_line(err, f"{run_copy / 'config.yaml'}", what)


@pytest.fixture
def unreadable(monkeypatch):
    """Make a folder unreadable for this user. chmod 000 is the real thing for any other user;
    root reads through any mode, so there (the test suite runs as root in CI) the calls that the
    kernel refuses inside such a folder (stat of an entry, listing it, opening a file in it) are
    refused the same way, with EACCES."""
    made = []

    def make(folder: Path) -> Path:
        folder = Path(os.path.abspath(folder))
        folder.chmod(0)
        made.append(folder)
        if os.geteuid() != 0:
            return folder

        def inside(path, itself: bool) -> bool:
            if isinstance(path, int):
                return False
            p = Path(os.path.abspath(os.fsdecode(os.fspath(path))))
            return p == folder if itself else folder in p.parents

        def deny(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))

        def guard(real, itself):
            def call(path=".", *args, **kwargs):
                if inside(path, False) or (itself and inside(path, True)):
                    deny(path)
                return real(path, *args, **kwargs)

            return call

        monkeypatch.setattr(os, "stat", guard(os.stat, False))
        monkeypatch.setattr(os, "lstat", guard(os.lstat, False))
        monkeypatch.setattr(os, "listdir", guard(os.listdir, True))
        monkeypatch.setattr(os, "scandir", guard(os.scandir, True))
        monkeypatch.setattr(builtins, "open", guard(builtins.open, False))
        monkeypatch.setattr(io, "open", guard(io.open, False))
        return folder

    yield make
    for folder in made:
        folder.chmod(0o755)


@needs_fmnist
def test_a_run_folder_that_cannot_be_read_is_one_line_for_resume_and_eval(run_copy, capsys, unreadable):
    folder = unreadable(run_copy)
    status, _, err = run_cli(capsys, "train", "--resume", folder)
    assert status == 2
    assert_one_line(err, f"cannot read {folder}: permission denied")
    status, _, err = run_cli(capsys, "eval", folder, *EVAL)
    assert status == 2
    assert_one_line(err, f"cannot read {folder}", "permission denied")


def test_a_binary_recipe_and_a_folder_recipe_are_one_line(tmp_path, capsys):
    (tmp_path / "bin.yaml").write_bytes(b"\x00\x01\xff\xfe\x80")
    status, _, err = run_cli(capsys, "train", tmp_path / "bin.yaml")
    assert status == 2
    assert_one_line(err, "bin.yaml is not a text file")
    (tmp_path / "dir.yaml").mkdir()
    status, _, err = run_cli(capsys, "train", tmp_path / "dir.yaml")
    assert status == 2
    assert_one_line(err, "dir.yaml is a folder, not a recipe")
    status, _, err = run_cli(capsys, "train", tmp_path)  # a folder without a .yaml suffix too
    assert status == 2
    assert_one_line(err, "is a folder, not a recipe")


def test_an_unknown_train_device_is_one_line_naming_the_key(tmp_path, capsys):
    status, _, err = run_cli(capsys, "train", "fmnist", "train.device=tpu", "--run-dir", tmp_path / "r")
    assert status == 2
    assert_one_line(err, "train.device=tpu is not a device", "cpu, cuda")
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------- silent settings
@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.probe_size=-5", "train.probe_size must be >= 0"),
        ("train.max_steps=0", "train.max_steps must be >= 1"),
        ("train.probe_steps=0", "train.probe_steps must be >= 1"),
    ],
)
def test_negative_probe_and_zero_steps_are_refused_naming_the_key(override, fragment, tmp_path, capsys):
    with pytest.raises(ConfigError, match=fragment):
        load_config("fmnist", [override])
    status, _, err = run_cli(capsys, "train", "fmnist", override, "--run-dir", tmp_path / "r")
    assert status == 2
    assert_one_line(err, fragment)
    assert not (tmp_path / "r").exists()


def test_an_eps_ramp_longer_than_the_run_is_said_naming_both_keys():
    cfg = load_config("fmnist", ["train.epochs=2", "train.eps_ramp_epochs=50"])
    notes = training_warnings(cfg)
    assert len(notes) == 1
    assert "train.eps_ramp_epochs=50" in notes[0] and "train.epochs=2" in notes[0] and "eps 0.008, 2/50" in notes[0]
    assert training_warnings(load_config("fmnist", ["train.epochs=2", "train.eps_ramp_epochs=2"])) == []
    per_method = load_config("fmnist", ["train.epochs=3", "method.atas.eps_ramp_epochs=5"])
    assert "method.eps_ramp_epochs=5" in training_warnings(per_method)[0]


@needs_fmnist
def test_the_eps_ramp_warning_reaches_the_cli_as_one_line(tmp_path, capsys):
    status, _, err = run_cli(
        capsys, "train", "fmnist", *TINY, "train.epochs=1", "train.eps_ramp_epochs=50", "--run-dir", tmp_path / "r"
    )
    assert status == 0
    lines = [line for line in err.splitlines() if "eps_ramp_epochs" in line]
    assert len(lines) == 1 and lines[0].startswith("atas: warning: train.eps_ramp_epochs=50")
    assert "UserWarning" not in err and "warnings.warn" not in err  # no file:line, no echoed source


# ------------------------------------------------------------------------------- 10. evaluation results
@needs_fmnist
def test_evaluations_with_other_settings_never_replace_each_other(run_copy, capsys):
    base = ["eval", run_copy, "--attacks", "clean,pgd", "--n-examples", "16", "--no-progress"]
    variants = [
        ["--pgd-steps", "3", "--pgd-restarts", "2"],
        ["--pgd-steps", "2", "--pgd-restarts", "1"],
        ["--pgd-steps", "3", "--pgd-restarts", "2", "--seed", "1"],
        ["--pgd-steps", "3", "--pgd-restarts", "2", "--pgd-loss", "ce"],
        ["--pgd-steps", "3", "--pgd-restarts", "2", "--batch-size", "8"],
    ]
    for extra in variants:
        assert run_cli(capsys, *base, *extra)[0] == 0
    files = sorted(run_copy.glob("eval-clean+pgd-n16-*.json"))
    assert len(files) == len(variants)
    results = [json.loads(f.read_text()) for f in files]
    assert len({r["request_sha256"] for r in results}) == len(variants)
    for f, r in zip(files, results):
        assert f.name == f"eval-clean+pgd-n16-{r['request_sha256']}.json"
        assert (
            r["model"]["sha256"] == r["request"]["model_sha256"] and r["data"]["sha256"] == r["request"]["data_sha256"]
        )
    # other weights (the older checkpoint), the same settings: a file of its own too
    assert run_cli(capsys, "eval", run_copy / "checkpoint.prev.pt", *base[2:], *variants[0])[0] == 0
    assert len(list(run_copy.glob("eval-clean+pgd-n16-*.json"))) == len(variants) + 1
    # the same evaluation again rewrites its own file, nothing else
    before = {f.name: f.read_bytes() for f in run_copy.glob("eval-*.json")}
    status, out, err = run_cli(capsys, *base, *variants[1])
    assert status == 0 and "kept it as" not in err
    assert sorted(f.name for f in run_copy.glob("eval-*.json")) == sorted(before)


@needs_fmnist
def test_an_evaluation_into_a_file_holding_another_is_kept_aside_with_a_message(run_copy, capsys):
    out = run_copy / "eval.json"
    assert run_cli(capsys, "eval", run_copy, *EVAL, "--out", out)[0] == 0
    first = json.loads(out.read_text())
    status, _, err = run_cli(
        capsys, "eval", run_copy, "--attacks", "clean", "--n-examples", "8", "--no-progress", "--out", out
    )
    assert status == 0
    kept = run_copy / f"eval-{first['request_sha256']}.json"
    assert f"atas: warning: {out} held an evaluation with other settings (n_examples 16 -> 8" in err
    assert f"kept it as {kept}" in err
    assert json.loads(kept.read_text())["results"] == first["results"]
    assert json.loads(out.read_text())["n_examples"] == 8
    # export still finds the run's evaluation of these weights: eval.json first
    assert run_cli(capsys, "export", run_copy, "--out", run_copy.parent / "x")[0] == 0
    card = json.loads((run_copy.parent / "x" / "card.json").read_text())
    assert card["evaluation"]["file"] == "eval.json" and card["evaluation"]["n_examples"] == 8


@pytest.fixture
def two_weight_files(tmp_path, monkeypatch):
    (tmp_path / "mynets.py").write_text(
        "import torch.nn as nn\n\ndef make_net():\n    return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    from safetensors.torch import save_file

    for seed, path in ((0, tmp_path / "w.safetensors"), (1, tmp_path / "other" / "w.safetensors")):
        torch.manual_seed(seed)
        path.parent.mkdir(exist_ok=True)
        save_file(nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).state_dict(), str(path))
    yield tmp_path
    import sys

    sys.modules.pop("mynets", None)


@needs_fmnist
def test_model_evaluations_differ_by_settings_and_weights_and_record_them(two_weight_files, capsys):
    base = [
        "eval",
        "--model",
        "mynets:make_net",
        "--data",
        "fmnist",
        "--eps",
        "0.1",
        "--attacks",
        "clean,pgd",
        "--n-examples",
        "20",
        "--no-progress",
    ]
    variants = [
        ["--weights", "w.safetensors", "--pgd-steps", "3", "--pgd-restarts", "2"],
        ["--weights", "w.safetensors", "--pgd-steps", "2", "--pgd-restarts", "1"],
        ["--weights", "w.safetensors", "--pgd-steps", "3", "--pgd-restarts", "2", "--seed", "1"],
        ["--weights", "other/w.safetensors", "--pgd-steps", "3", "--pgd-restarts", "2"],
    ]
    for extra in variants:
        status, _, err = run_cli(capsys, *base, *extra)
        assert status == 0, err
    files = sorted(two_weight_files.glob("eval-mynets.make_net-w-fmnist-clean+pgd-n20-eps0.1-*.json"))
    assert len(files) == 4
    results = [json.loads(f.read_text()) for f in files]
    from atas.external import file_sha256

    shas = {file_sha256(two_weight_files / "w.safetensors"), file_sha256(two_weight_files / "other" / "w.safetensors")}
    assert {r["model"]["weights_sha256"] for r in results} == shas
    for r in results:
        assert r["data"]["name"] == "fmnist" and Path(r["data"]["folder"]).is_dir()
        assert r["data"]["images"] == "the first 20" and len(r["data"]["sha256"]) == 64


@needs_fmnist
def test_benchmark_returns_the_model_and_data_identity():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    result = atas.benchmark(model, "fmnist", "0.1", attacks=["clean"], n_examples=8, progress=False)
    from atas.evaluation.protocol import fingerprint_model

    assert result["model"]["sha256"] == fingerprint_model(model)
    assert result["data"]["name"] == "fmnist" and Path(result["data"]["folder"]).is_dir()
    assert result["data"]["images"] == "the first 8" and len(result["data"]["sha256"]) == 64
    other = atas.benchmark(model, "fmnist", "0.1", attacks=["clean"], n_examples=9, progress=False)
    assert other["data"]["sha256"] != result["data"]["sha256"]
    assert other["request_sha256"] != result["request_sha256"]


# ------------------------------------------------------------------------------- 11-13, 15. ATAS in a loop
def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


def _batches(atk, sizes):
    g = torch.Generator().manual_seed(0)
    start = 0
    for b in sizes:
        x, y = torch.rand(b, 1, 8, 8, generator=g), torch.randint(0, 10, (b,), generator=g)
        atk.perturb(_net(), x, y, torch.arange(start, start + b))
        start += b


def test_batch_mean_at_another_batch_size_warns_once_with_the_factor_and_the_fix():
    atk = atas.ATAS(eps=0.1, num_samples=2048, epochs=30, relative=True)
    _, msgs = caught(lambda: _batches(atk, [512, 512, 100]))
    assert len(msgs) == 1
    msg = msgs[0]
    assert "batch size 512" in msg and "128/512 = 0.25x" in msg and "as if c were 0.04" in msg
    assert "method.grad_norm=per_sample" in msg and "grad_norm='per_sample'" in msg and " eps instead of " in msg
    small = atas.ATAS(eps=0.1, num_samples=2048, epochs=30, relative=True)
    _, msgs = caught(lambda: _batches(small, [32]))
    assert len(msgs) == 1 and "128/32 = 4x" in msgs[0] and "alpha_min" in msgs[0]
    for quiet in (
        atas.ATAS(eps=0.1, num_samples=2048, epochs=30, relative=True),
        atas.ATAS(eps=0.1, num_samples=2048, epochs=30, relative=True, grad_norm="per_sample"),
    ):
        _, msgs = caught(lambda q=quiet: _batches(q, [128, 128, 7] if q.opt.grad_norm == "batch_mean" else [512]))
        assert msgs == []


def test_atas_without_epochs_says_what_to_pass_at_its_first_batch():
    atk, msgs = caught(lambda: atas.ATAS(eps=0.1, num_samples=256, relative=True))
    assert msgs == []  # built, not yet used to train
    _, msgs = caught(lambda: _batches(atk, [128, 128]))
    assert len(msgs) == 1 and "epochs was not given" in msgs[0] and "epochs=" in msgs[0]
    assert "warmup_epochs=5" in msgs[0] and "epoch 6" in msgs[0]
    _, msgs = caught(lambda: _batches(atas.ATAS(eps=0.1, num_samples=256, relative=True, warmup_epochs=0), [128]))
    assert msgs == []  # no warm-up: nothing to check


def test_loading_a_state_saved_at_another_eps_or_c_names_the_values():
    src = atas.ATAS(eps=8 / 255, num_samples=128, epochs=30)
    caught(lambda: _batches(src, [128]))
    state = src.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # what a checkpoint holds still loads safely
    other = atas.ATAS(eps=16 / 255, num_samples=128, epochs=30, c=0.05)
    _, msgs = caught(lambda: other.load_state_dict(state))
    assert len(msgs) == 2, msgs
    assert "saved at eps 8/255 into an object with eps 16/255" in msgs[0] and "eps=8/255" in msgs[0]
    assert "c 0.05 -> 0.01" in msgs[1]  # the options are the state's (the run they come from had them)
    same = atas.ATAS(eps=8 / 255, num_samples=128, epochs=30)
    _, msgs = caught(lambda: same.load_state_dict(state))
    assert msgs == []
    # a state from before eps was recorded: nothing to compare, accepted as it was
    _, msgs = caught(lambda: other.load_state_dict({k: v for k, v in state.items() if k not in ("eps", "options")}))
    assert msgs == []


def test_nested_datasets_with_random_crops_are_refused_like_a_bare_subset():
    from torchvision import transforms

    class WithCrop(TensorDataset):
        transform = transforms.Compose([transforms.RandomCrop(8, padding=1), transforms.ToTensor()])

    plain = TensorDataset(torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))
    cropped = WithCrop(torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))
    for nested in (
        ConcatDataset([Subset(cropped, [0, 1]), plain]),
        ConcatDataset([plain, ConcatDataset([plain, Subset(Subset(cropped, [0, 1, 2]), [0])])]),
        Subset(ConcatDataset([plain, cropped]), [0, 5]),
    ):
        with pytest.raises(ValueError, match="RandomCrop"):
            atas.IndexedDataset(nested)
        assert len(atas.IndexedDataset(nested, allow_random_transforms=True)) == len(nested)
    assert len(atas.IndexedDataset(ConcatDataset([plain, Subset(plain, [0])]))) == 5


# ------------------------------------------------------------------------------- 16. minor
def test_a_resumed_evaluation_records_the_real_attack_times(tmp_path, monkeypatch):
    """A fake clock that advances one second per forward: a resumed evaluation's times are those
    of an unbroken one (the batches done before the kill included), not 0.0."""
    import atas.evaluation.protocol as protocol

    clock = {"t": 0.0}
    monkeypatch.setattr(protocol.time, "perf_counter", lambda: clock["t"])

    class Killed(Exception):
        pass

    class Ticking(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.inner = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
            self.calls, self.kill_after = 0, None

        def forward(self, x):
            self.calls += 1
            if self.kill_after is not None and self.calls > self.kill_after:
                raise Killed()
            clock["t"] += 1.0
            return self.inner(x)

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(32, 1, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g)
    kw = dict(attacks=("clean", "pgd"), pgd_steps=2, pgd_restarts=1, batch_size=8, progress=False)
    model = Ticking().eval()
    reference = atas.evaluate(model, x, y, 0.1, **kw)["timing"]
    state = tmp_path / "eval.state"
    model.calls, model.kill_after = 0, model.calls * 3 // 4  # dies inside PGD, clean long done
    with pytest.raises(Killed):
        atas.evaluate(model, x, y, 0.1, state_path=state, **kw)
    model.kill_after = None
    resumed = atas.evaluate(model, x, y, 0.1, state_path=state, **kw)["timing"]
    assert reference["clean"] > 0 and resumed == reference


@needs_fmnist
def test_exported_weights_are_byte_reproducible(run_copy, tmp_path, capsys):
    from atas.export import _safetensors_bytes

    tensors = {f"layer{i}.weight": torch.full((2, 3), float(i)) for i in range(6)}
    assert len({_safetensors_bytes(tensors) for _ in range(16)}) == 1
    for out in ("a", "b"):
        assert run_cli(capsys, "export", run_copy, "--out", tmp_path / out)[0] == 0
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    from safetensors import safe_open

    with safe_open(str(tmp_path / "a" / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt", "library": "atas"}


def test_compare_progress_gives_the_overall_time_left():
    from atas.compare import Eta

    eta = Eta([True, False, True, True])
    line = "about 2 min 00 s left for 2 run(s) to train (mean 1 min 00 s a run so far, 1 min 00 s spent)"
    assert eta.done(0, 60.0) == line
    assert eta.done(1, 0.1) == line  # a run read back, not trained: no time, no change
    assert (
        eta.done(2, 120.0)
        == "about 1 min 30 s left for 1 run(s) to train (mean 1 min 30 s a run so far, 3 min 00 s spent)"
    )
    assert eta.done(3, 30.0) is None  # nothing left
    assert Eta([False, True]).done(0, 5.0) is None  # nothing trained yet: no estimate
