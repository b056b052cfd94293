"""Evaluating a model atas did not train: `atas eval --model`, plugins, safe weights, bf16, DataLoaders."""

from __future__ import annotations

import json
import pickle
import textwrap

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import atas
from atas.cli import main as cli
from tests.helpers import needs_fmnist

USER_MODULE = textwrap.dedent('''
    import torch.nn as nn
    import atas

    def factory():
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 10))

    def not_a_model():
        return "a string"

    @atas.register_model(__name__ + "_net")
    def user_linear_net(num_classes=10, in_channels=1):
        return nn.Sequential(nn.Flatten(), nn.Linear(784 * in_channels, num_classes))
''')


@pytest.fixture
def user_pkg(tmp_path, monkeypatch):
    name = f"user_models_{abs(hash(str(tmp_path))) % 10**8}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def weights_file(tmp_path, fmt="safetensors"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "w.safetensors"
        save_file(model.state_dict(), str(path))
    else:
        path = tmp_path / "w.pt"
        torch.save(model.state_dict(), path)
    return path, model


@needs_fmnist
def test_atas_eval_model_factory_with_safetensors_weights(user_pkg, tmp_path):
    path, model = weights_file(tmp_path)
    out = tmp_path / "res.json"
    assert (
        cli(
            [
                "eval",
                "--model",
                f"{user_pkg}:factory",
                "--weights",
                str(path),
                "--data",
                "fmnist",
                "--eps",
                "0.1",
                "--attacks",
                "clean,pgd",
                "--n-examples",
                "64",
                "--pgd-steps",
                "3",
                "--pgd-restarts",
                "1",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["n_examples"] == 64 and result["model"]["factory"] == f"{user_pkg}:factory"
    expected = atas.benchmark(model, "fmnist", 0.1, attacks=["clean"], n_examples=64, progress=False)
    assert result["results"]["clean"]["accuracy"] == expected["results"]["clean"]["accuracy"]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_module_xyz:f", "cannot import"),
        ("{pkg}:not_a_model", "not a torch.nn.Module"),
        ("{pkg}:missing", "no callable"),
        ("nocolon", "MODULE:FUNCTION"),
    ],
)
def test_bad_model_spec_is_one_clear_error(user_pkg, tmp_path, capsys, spec, message):
    code = cli(["eval", "--model", spec.format(pkg=user_pkg), "--data", "fmnist", "--eps", "0.1"])
    assert code == 2 and message in capsys.readouterr().err


def test_weights_whose_keys_do_not_match_name_the_keys(tmp_path):
    path, _ = weights_file(tmp_path)
    other = nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.ReLU(), nn.Linear(10, 10))
    with pytest.raises(atas.ConfigError, match=r"missing from the file: 3\.weight, 3\.bias"):
        from atas.external import load_weights

        load_weights(other, path)
    renamed = nn.Sequential(nn.Identity(), nn.Flatten(), nn.Linear(784, 10))
    with pytest.raises(
        atas.ConfigError, match=r"missing from the file: 2\.weight.*not in the model: 1\.bias, 1\.weight"
    ):
        from atas.external import load_weights

        load_weights(renamed, path)


def test_a_pickle_given_as_weights_is_refused_with_the_reason(tmp_path):
    from atas.external import load_weights

    class Payload:
        def __reduce__(self):
            return (print, ("this would run on load",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"weight": Payload()}, f)
    with pytest.raises(atas.ConfigError, match="refused.*never"):
        load_weights(nn.Linear(2, 2), path)
    torch_path = tmp_path / "evil_torch.pt"
    torch.save({"layer": nn.Linear(2, 2)}, torch_path)  # a whole module: pickled Python objects
    with pytest.raises(atas.ConfigError, match="refused"):
        load_weights(nn.Linear(2, 2), torch_path)


def test_plain_torch_state_dict_loads(tmp_path):
    from atas.external import load_weights

    path, model = weights_file(tmp_path, "pt")
    fresh = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    load_weights(fresh, path)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


@needs_fmnist
def test_user_registered_model_trains_and_exports_with_import(user_pkg, tmp_path):
    run = tmp_path / "run"
    assert (
        cli(
            [
                "train",
                "fmnist",
                f"model.arch={user_pkg}_net",
                "data.subset=128",
                "train.epochs=1",
                "train.probe_size=0",
                "train.progress=false",
                "eval.at_end=false",
                f"out_dir={tmp_path}",
                "--run-dir",
                str(run),
                "--import",
                user_pkg,
            ]
        )
        == 0
    )
    assert cli(["export", str(run), "--out", str(tmp_path / "exp"), "--import", user_pkg]) == 0
    assert (tmp_path / "exp" / "model.safetensors").exists()


def test_bf16_model_evaluates():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4)).to(torch.bfloat16)
    x, y = torch.rand(32, 1, 4, 4), torch.randint(0, 4, (32,))
    result = atas.benchmark(
        model, (x, y), "1/255", attacks=["clean", "fgsm", "pgd"], pgd_steps=3, pgd_restarts=1, progress=False
    )
    r = result["results"]
    assert r["pgd"]["accuracy"] <= r["clean"]["accuracy"] and next(model.parameters()).dtype == torch.bfloat16


def test_benchmark_accepts_a_dataloader_and_normalization():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    x, y = torch.rand(40, 1, 4, 4), torch.randint(0, 4, (40,))
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    from_loader = atas.benchmark(net, loader, 0.05, attacks=["clean"], n_examples=32, progress=False)
    from_tensors = atas.benchmark(net, (x, y), 0.05, attacks=["clean"], n_examples=32, progress=False)
    assert from_loader["n_examples"] == 32
    assert from_loader["results"]["clean"]["n_correct"] == from_tensors["results"]["clean"]["n_correct"]
    normed = atas.benchmark(net, (x, y), 0.05, attacks=["clean"], normalization=((0.5,), (0.25,)), progress=False)
    with torch.no_grad():
        expected = (net((x - 0.5) / 0.25).argmax(1) == y).sum().item()
    assert normed["results"]["clean"]["n_correct"] == expected
    assert atas.benchmark(net, (x, y), "8/255", attacks=["clean"], progress=False)["eps_label"] == "8/255"
