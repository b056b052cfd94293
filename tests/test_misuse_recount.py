"""The recount of bad inputs to the command line (issue 21): every row is something a user can
type wrong, in train, eval, export, compare, recipes, their keys, types, ranges, paths and files.
Each gives exit 2 and one line `atas <command>: error: ...` that contains the row's fragment (the
option it names, or what is wrong), no traceback, and writes nothing where a run would go.
Rows marked ARGPARSE are refused by the argument parser itself (its usage line and one error line,
exit 2), the standard form of a malformed command line; rows marked MULTILINE (data that is not
found) give the error line first, then the folders searched and the ways to fix it, by design."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.helpers import FMNIST
from tests.test_misuse_cli import TINY, assert_one_line, finished_run, run_cli  # noqa: F401

ARGPARSE = "ARGPARSE"
MULTILINE = "MULTILINE:"  # data not found: one error line, then the places searched and the fixes
R = "{run}"  # replaced by a copy of a finished run folder
T = "{tmp}"  # replaced by the test's temporary folder

TRAIN = [
    # recipe and command line shape
    (["train"], "give a recipe"),
    (["train", "no-such-recipe"], "no recipe file 'no-such-recipe'"),
    (["train", "fmnist", "train.epochs"], "is not key=value"),
    (["train", "fmnist", "=5"], "has no key"),
    (["train", "fmnist", "--no-such-flag"], ARGPARSE),
    # keys
    (["train", "fmnist", "train.nope=1"], "unknown key(s) train.nope"),
    (["train", "fmnist", "nosection.x=1"], "unknown key(s) nosection"),
    (["train", "fmnist", "train=5"], "train: expected a mapping"),
    (["train", "fmnist", "method.nosuchoption=1"], "method.nosuchoption"),
    (["train", "fmnist", "method.pgd.nosuch=1"], "method.pgd.nosuch"),
    (["train", "fmnist", "method.nosuchmethod.c=1"], "method.nosuchmethod"),
    # types
    (["train", "fmnist", "train.epochs=abc"], "train.epochs"),
    (["train", "fmnist", "train.epochs=2.5"], "train.epochs"),
    (["train", "fmnist", "train.deterministic=maybe"], "train.deterministic"),
    (["train", "fmnist", "method.eps=abc"], "expected a number"),
    (["train", "fmnist", "method.eps=1/0"], "division by zero"),
    (["train", "fmnist", "optim.milestones=abc"], "optim.milestones"),
    (["train", "fmnist", "optim.lr=1e400"], "finite number"),
    (["train", "fmnist", "method.c=nan"], "method.c"),
    # ranges and names
    (["train", "fmnist", "train.epochs=0"], "train.epochs must be >= 1"),
    (["train", "fmnist", "train.epochs=-1"], "train.epochs must be >= 1"),
    (["train", "fmnist", "train.batch_size=0"], "train.batch_size must be >= 1"),
    (["train", "fmnist", "method.eps=0"], "method.eps must be > 0"),
    (["train", "fmnist", "method.eps=-0.1"], "method.eps must be > 0"),
    (["train", "fmnist", "method.eps=8"], "Did you mean method.eps=8/255"),
    (["train", "fmnist", "method.name=nosuch"], "nosuch"),
    (["train", "fmnist", "model.arch=nosuch"], "unknown model 'nosuch'"),
    (["train", "fmnist", "data.name=nosuch"], "nosuch"),
    (["train", "fmnist", "optim.lr=0"], "optim.lr must be > 0"),
    (["train", "fmnist", "optim.name=rmsprop"], "optim.name must be sgd or adam"),
    (["train", "fmnist", "optim.schedule=linear"], "optim.schedule must be"),
    (["train", "fmnist", "train.amp=fp8"], "train.amp must be off, bf16 or fp16"),
    (["train", "fmnist", "train.store_dtype=int4"], "train.store_dtype must be"),
    (["train", "fmnist", "train.co_action=panic"], "train.co_action must be one of"),
    (["train", "fmnist", "train.probe_size=-5"], "train.probe_size must be >= 0"),
    (["train", "fmnist", "train.probe_steps=0"], "train.probe_steps must be >= 1"),
    (["train", "fmnist", "train.probe_restarts=0"], "train.probe_restarts must be >= 1"),
    (["train", "fmnist", "train.max_steps=0"], "train.max_steps must be >= 1"),
    (["train", "fmnist", "train.max_steps=-3"], "train.max_steps must be >= 1"),
    (["train", "fmnist", "train.device=tpu"], "train.device=tpu is not a device"),
    (["train", "fmnist", "train.eps_ramp_epochs=-1"], "eps_ramp_epochs must be >= 0"),
    (["train", "fmnist", "train.max_recoveries=-1"], "train.max_recoveries must be >= 0"),
    (["train", "fmnist", "train.recover_budget_epochs=-1"], "train.recover_budget_epochs must be >= 0"),
    (["train", "fmnist", "data.subset=0"], "data.subset must be >= 1"),
    (["train", "fmnist", "data.test_subset=-5"], "data.test_subset must be >= 1"),
    (["train", "fmnist", "data.val_size=-1"], "data.val_size must be >= 0"),
    (["train", "fmnist", "data.subset=256", "data.val_size=256"], "data.val_size=256 holds out all"),
    (["train", "fmnist", "eval.attacks=nosuch"], "unknown attack(s) nosuch"),
    (["train", "fmnist", "eval.attacks="], "eval.attacks"),
    (["train", "fmnist", "eval.pgd_steps=0"], "eval.pgd_steps must be >= 1"),
    (["train", "fmnist", "eval.pgd_restarts=0"], "eval.pgd_restarts must be >= 1"),
    (["train", "fmnist", "eval.batch_size=0"], "eval.batch_size must be >= 1"),
    (["train", "fmnist", "eval.n_examples=0"], "eval.n_examples must be >= 1"),
    (["train", "fmnist", "eval.pgd_alpha=abc"], "eval.pgd_alpha"),
    (["train", "fmnist", "eval.pgd_schedule=linear"], "pgd_schedule"),
    (["train", "fmnist", "eval.pgd_loss=hinge"], "pgd_loss"),
    (["train", "fmnist", "method.c=0"], "method.c > 0"),
    (["train", "fmnist", "method.beta=1"], "method.beta < 1"),
    (["train", "fmnist", "method.alpha_min=0"], "method.alpha_min"),
    (["train", "fmnist", "method.grad_norm=nope"], "method.grad_norm must be"),
    (["train", "fmnist", "method.step_numerator=-2eps"], "method.step_numerator must be"),
    (["train", "fmnist", "method.step_scale=2"], "method.step_scale must lie in (0, 1]"),
    (["train", "fmnist", "method.label_smoothing=1"], "method.label_smoothing must be in [0, 1)"),
    # recipe files
    (["train", f"{T}/bin.yaml"], "is not a text file"),
    (["train", f"{T}/folder.yaml"], "is a folder, not a recipe"),
    (["train", f"{T}/invalid.yaml"], "not valid YAML"),
    (["train", f"{T}/list.yaml"], "is a YAML list, not a recipe"),
    (["train", f"{T}/unknown.yaml"], "unknown key(s) trian"),
    # run folders
    (["train", "fmnist", *TINY, "--run-dir", f"{T}/a-file"], "a-file"),
    (["train", "fmnist", *TINY, "--run-dir", R], "holds another run"),
    (["train", "--resume", f"{T}/missing"], "is not a run folder"),
    (["train", "--resume", f"{T}/a-file"], "is not a run folder"),
    (["train", "--resume", T], "is not a run folder"),
    (["train", "--resume", f"{T}/config-str"], "does not hold a config"),
    (["train", "--resume", f"{T}/config-list"], "does not hold a config"),
    (["train", "--resume", f"{T}/config-empty"], "does not hold a config"),
    (["train", "--resume", f"{T}/config-invalid"], "not valid YAML"),
    (["train", "--resume", R, "method.c=0.5"], "cannot resume: the config differs"),
]

EVAL = [
    (["eval"], "give a run folder"),
    (["eval", f"{T}/missing"], "does not exist"),
    (["eval", T], "holds no checkpoint.pt"),
    (["eval", f"{T}/garbage.pt"], "not a checkpoint"),
    (["eval", R, "--attacks", "nosuch"], "unknown attack(s) nosuch"),
    (["eval", R, "--attacks", ""], "(none given)"),
    (["eval", R, "--n-examples", "0"], "must be >= 1"),
    (["eval", R, "--n-examples", "999999"], "give at most 10000"),
    (["eval", R, "--n-examples", "abc"], ARGPARSE),
    (["eval", R, "--eps", "8"], "Did you mean --eps=8/255"),
    (["eval", R, "--eps", "abc"], "expected a number"),
    (["eval", R, "--eps", "0"], "--eps must be > 0"),
    (["eval", R, "--pgd-steps", "0"], "eval.pgd_steps must be >= 1"),
    (["eval", R, "--pgd-restarts", "0"], "eval.pgd_restarts must be >= 1"),
    (["eval", R, "--batch-size", "0"], "eval.batch_size must be >= 1"),
    (["eval", R, "--pgd-alpha", "abc"], "pgd_alpha"),
    (["eval", R, "--pgd-schedule", "linear"], ARGPARSE),
    (["eval", R, "--device", "tpu"], "--device tpu: not a device"),
    (["eval", R, "--out", f"{T}/a-file/x.json"], "a-file"),
    (
        ["eval", R, "--data-dir", f"{T}/missing", "--n-examples", "4"],
        MULTILINE + "test split not found in data.data_dir",
    ),
    (["eval", "--model", "no_such_module:f", "--data", "fmnist", "--eps", "0.1"], "no_such_module"),
    (["eval", "--model", "json", "--data", "fmnist", "--eps", "0.1"], "MODULE:FUNCTION"),
    (["eval", "--model", "json:nosuchfunction", "--data", "fmnist", "--eps", "0.1"], "nosuchfunction"),
    (["eval", "--model", "torch.nn:Flatten", "--eps", "0.1"], "give --data and --eps"),
    (["eval", "--model", "torch.nn:Flatten", "--data", "fmnist"], "give --data and --eps"),
    (["eval", R, "--model", "torch.nn:Flatten", "--data", "fmnist", "--eps", "0.1"], "not both"),
    (["eval", "--model", "torch.nn:Flatten", "--data", "fmnist", "--eps", "8"], "Did you mean --eps=8/255"),
    (
        ["eval", "--model", "torch.nn:Flatten", "--data", "fmnist", "--eps", "0.1", "--weights", f"{T}/missing.pt"],
        "no such file",
    ),
    (
        ["eval", "--model", "torch.nn:Flatten", "--data", "fmnist", "--eps", "0.1", "--weights", f"{T}/garbage.pt"],
        "not a readable torch file",
    ),
    (
        ["eval", "--model", "torch.nn:Flatten", "--data", "fmnist", "--eps", "0.1", "--mean", "0.5"],
        "--mean and --std go together",
    ),
    (
        ["eval", "--model", "torch.nn:Flatten", "--data", "fmnist", "--eps", "0.1", "--mean", "a", "--std", "b"],
        "--mean: 'a' is not a number",
    ),
    (["eval", "--model", "torch.nn:Flatten", "--data", "nosuch", "--eps", "0.1"], "nosuch"),
    (
        ["eval", "--model", "torch.nn:Flatten", "--data", "fmnist", "--eps", "0.1", "--attacks", "nosuch"],
        "unknown attack(s) nosuch",
    ),
    (
        ["eval", "--model", "torch.nn:Flatten", "--data", "fmnist", "--eps", "0.1", "--pgd-steps", "0"],
        "--pgd-steps must be >= 1",
    ),
    (
        ["eval", "--model", "torch.nn:Flatten", "--data", "fmnist", "--eps", "0.1", "--n-examples", "0"],
        "--n-examples must be >= 1",
    ),
]

EXPORT = [
    (["export", f"{T}/missing", "--out", f"{T}/x"], "does not exist"),
    (["export", R], ARGPARSE),
    (["export", R, "--out", f"{T}/a-file"], "a-file"),
    (["export", f"{T}/garbage.pt", "--out", f"{T}/x"], "not a checkpoint"),
    (["export", T, "--out", f"{T}/x"], "holds no checkpoint.pt"),
]

COMPARE = [
    (["compare", "fmnist", "--methods", "nosuch"], "unknown method(s) nosuch"),
    (["compare", "fmnist", "--methods", ","], "--methods is empty"),
    (["compare", "fmnist", "--seeds", "0"], "--seeds must be >= 1"),
    (["compare", "fmnist", "--eps", "8"], "8/255"),
    (["compare", "fmnist", "--n-examples", "0"], "--n-examples must be >= 1"),
    (["compare", "fmnist", "--attacks", "nosuch"], "unknown attack(s) nosuch"),
    (["compare", "no-such-recipe"], "no recipe file"),
    (["compare", "fmnist", "train.epochs=0"], "train.epochs must be >= 1"),
    (["compare", "fmnist", "--tune-val-size", "10"], "add --tune"),
]

OTHER = [
    (["recipes", "--import", "no_such_plugin_module"], "no_such_plugin_module"),
    (["no-such-command"], ARGPARSE),
]

ROWS = TRAIN + EVAL + EXPORT + COMPARE + OTHER


def _fill(tmp: Path, run: Path | None) -> None:
    (tmp / "bin.yaml").write_bytes(b"\x00\x01\xff\xfe\x80")
    (tmp / "folder.yaml").mkdir()
    (tmp / "invalid.yaml").write_text("train: [1\n")
    (tmp / "list.yaml").write_text("- 1\n- 2\n")
    (tmp / "unknown.yaml").write_text("trian:\n  epochs: 2\n")
    (tmp / "a-file").write_text("x")
    (tmp / "garbage.pt").write_bytes(b"not a checkpoint at all")
    if run is not None:
        for name, text in (
            ("config-str", '"s"\n'),
            ("config-list", "[1]\n"),
            ("config-empty", ""),
            ("config-invalid", "a: [b\n"),
        ):
            shutil.copytree(run, tmp / name)
            (tmp / name / "config.yaml").write_text(text)


def test_the_table_is_a_recount_of_at_least_the_issues_74():
    assert len(ROWS) >= 74 and len({tuple(argv) for argv, _ in ROWS}) == len(ROWS)


@pytest.mark.parametrize("argv, fragment", ROWS, ids=[" ".join(a)[:60] for a, _ in ROWS])
def test_a_bad_input_is_one_clear_line_and_exit_2(argv, fragment, tmp_path, capsys, monkeypatch, request):
    needs_run = any(R in a for a in argv) or any("config-" in a for a in argv)
    run = None
    if needs_run:
        if not FMNIST.exists():
            pytest.skip("needs Debian's dataset-fashion-mnist")
        run = tmp_path / "run"
        shutil.copytree(request.getfixturevalue("finished_run"), run)
    _fill(tmp_path, run)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    argv = [a.replace(R, str(run)).replace(T, str(tmp_path)) for a in argv]
    before = sorted(p.name for p in tmp_path.iterdir())
    if fragment is ARGPARSE:
        with pytest.raises(SystemExit) as e:
            run_cli(capsys, *argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and "error:" in err.splitlines()[-1]
        return
    status, _, err = run_cli(capsys, *argv)
    assert status == 2, err
    if fragment.startswith(MULTILINE):
        assert "Traceback" not in err and fragment[len(MULTILINE) :] in err.splitlines()[0]
        err, fragment = err.splitlines()[0], fragment[len(MULTILINE) :]
    line = assert_one_line(err, fragment)
    assert line.startswith(f"atas {argv[0]}: error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no runs/ or reports/ folder, no result
