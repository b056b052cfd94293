"""Every option of every registered method is validated before anything is written: a wrong type, a
number out of range or an unknown word fails `atas train` with one line and exit 2, and the run
folder is never created. The registry is iterated, so a method added later is covered by the same
test: each field of its Options gets the bad values of its type (see `_bad_values`)."""

from __future__ import annotations

import dataclasses
import types
import typing

import pytest

from atas.cli import main as cli
from atas.config import ConfigError, load_config
from atas.errors import AtasError
from atas.methods import METHODS


def _bad_values(tp) -> list[str]:
    """Values no option of type `tp` may accept, as typed on the command line: a word for a number
    or a flag, a negative number (no option of the family is a negative count, step, weight or
    epoch; a method with one must say so in its check and here), and an unknown word for a
    string option (every string option of a method is a choice from a vocabulary)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # `float | None`: the number's bad values
        (tp,) = [t for t in typing.get_args(tp) if t is not type(None)]
    if tp is bool:
        return ["maybe"]
    if tp is str:
        return ["no-such-choice"]
    if tp is int:
        return ["abc", "-1000000"]
    return ["abc", "-1e9"]  # float, Frac


def _cases():
    for name in METHODS.names():
        options = METHODS.get(name).Options
        hints = typing.get_type_hints(options)
        for f in dataclasses.fields(options):
            for bad in _bad_values(hints[f.name]):
                yield pytest.param(name, f.name, bad, id=f"{name}.{f.name}={bad}")


@pytest.mark.parametrize("method,option,bad", list(_cases()))
def test_every_option_of_every_method_is_checked_before_the_run_folder_exists(tmp_path, capsys, method, option, bad):
    with pytest.raises(ConfigError):
        load_config("fmnist", [f"method.name={method}", f"method.{option}={bad}"])
    run = tmp_path / "run"
    status = cli(["train", "fmnist", f"method.name={method}", f"method.{option}={bad}", "--run-dir", str(run)])
    err = capsys.readouterr().err
    assert status == 2 and f"method.{option}" in err and "Traceback" not in err, err
    assert not run.exists()


# The dataset's, the model's, the training loop's and the evaluation's (attacks') options: each
# numeric one out of its range, each choice misspelt.
SECTION_CASES = [
    "data.name=cifar11",
    "data.train_pad=-1",
    "data.num_workers=-1",
    "data.subset=0",
    "data.val_size=-1",
    "model.arch=no_such_net",
    "train.probe_size=-5",
    "train.probe_steps=0",
    "train.store_size=0",
    "train.max_steps=0",
    "train.store_dtype=float8",
    "train.amp=fp8",
    "train.co_action=ignore",
    "optim.momentum=1.5",
    "optim.weight_decay=-1",
    "optim.gamma=0",
    "optim.div_factor=0.5",
    "optim.milestones=[-1]",
    "optim.schedule=linear",
    "eval.attacks=clean,bogus",
    "eval.pgd_steps=0",
    "eval.pgd_alpha=3eps",
    "eval.pgd_loss=hinge",
    "eval.n_examples=0",
]


@pytest.mark.parametrize("override", SECTION_CASES)
def test_every_other_option_is_checked_before_the_run_folder_exists(tmp_path, capsys, override):
    run = tmp_path / "run"
    status = cli(["train", "fmnist", override, "--run-dir", str(run)])
    err = capsys.readouterr().err
    key, value = override.split("=")
    named = key.split(".")[-1] in err or value.split(",")[-1] in err  # the key, or the unknown name
    assert status == 2 and "Traceback" not in err and named and len(err.strip().splitlines()) == 1, err
    assert not run.exists()


def test_bn_mode_typo_is_refused_naming_the_choices(tmp_path, capsys):
    """The issue's case: `method.bn_mode=evl` used to write config.yaml and a checkpoint, then die mid-run."""
    status = cli(["train", "fmnist", "method.bn_mode=evl", "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert status == 2 and not (tmp_path / "run").exists()
    assert err.startswith("atas train: error: method.bn_mode must be one of eval, train") and "'evl'" in err


def test_the_error_classes_share_one_root_and_keep_their_old_bases():
    import atas
    from atas.checkpoint import CheckpointError, DiskFullError
    from atas.data import DataFormatError, DataNotFoundError
    from atas.evaluation import EvaluationError
    from atas.extras import MissingDependencyError
    from atas.trainer import TrainingDiverged

    assert atas.AtasError is AtasError
    for cls, old in (
        (ConfigError, ValueError),
        (CheckpointError, RuntimeError),
        (DiskFullError, RuntimeError),
        (DataNotFoundError, FileNotFoundError),
        (DataFormatError, ValueError),
        (EvaluationError, AssertionError),
        (MissingDependencyError, ImportError),
        (TrainingDiverged, RuntimeError),
    ):
        assert issubclass(cls, AtasError) and issubclass(cls, old), cls
    # what the CLI does with each: one line and the status, or (a bug) the traceback
    assert (ConfigError.exit_status, TrainingDiverged.exit_status, EvaluationError.exit_status) == (2, 3, None)
