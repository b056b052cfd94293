"""The FastAT benchmark's training techniques: weight averaging, label smoothing for every method,
OneCycle, the validation selection of raw vs averaged weights, the cost record, the CIFAR ResNet-18,
the recipes and the RobustBench fields of an export."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import atas
from atas.averaging import WeightAverage
from atas.cli import main as cli
from atas.config import ConfigError, load_config
from atas.data import train_indices, val_indices
from atas.export import export_model, load_model, robustbench_entry
from atas.methods import get_method
from atas.models import build_model
from atas.selection import Selector, better, improves, selection_mode
from atas.trainer import lr_factor, train
from tests.helpers import needs_fmnist


def _bn_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def _sgd_step(model: nn.Module, opt) -> None:
    model.train()
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


# --------------------------------------------------------------------------------------------
# Weight averaging
# --------------------------------------------------------------------------------------------
def test_weight_average_is_the_hand_formula_on_weights_and_bn_buffers():
    model = _bn_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tau = 0.9
    wa = WeightAverage(model, tau=tau)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(3):
        _sgd_step(model, opt)
        wa.update(epoch=1)
        for k, v in model.state_dict().items():
            expected[k] = tau * expected[k] + (1 - tau) * v if v.is_floating_point() else v.clone()
    got = wa.module.state_dict()
    assert wa.num_updates == 3
    for k, v in expected.items():
        assert torch.allclose(got[k], v, rtol=0, atol=1e-6), k
    # the BatchNorm running statistics are averaged too (and moved: the check is not vacuous)
    assert not torch.equal(got["1.running_mean"], model.state_dict()["1.running_mean"])
    assert int(got["1.num_batches_tracked"]) == 3  # a counter is copied, not averaged
    assert not wa.module.training and not any(p.requires_grad for p in wa.module.parameters())


def test_weight_average_copies_before_its_start_epoch_and_refuses_bad_tau():
    model = _bn_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    wa = WeightAverage(model, tau=0.5, start_epoch=2)
    _sgd_step(model, opt)
    wa.update(epoch=1)
    for k, v in model.state_dict().items():
        assert torch.equal(wa.module.state_dict()[k], v), k
    assert wa.num_updates == 0
    for tau in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match="tau"):
            WeightAverage(model, tau=tau)


def test_weight_average_state_dict_round_trips_bit_for_bit():
    model = _bn_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    wa = WeightAverage(model, tau=0.99)
    for _ in range(2):
        _sgd_step(model, opt)
        wa.update()
    other = WeightAverage(model, tau=0.99)
    other.load_state_dict(wa.state_dict())
    _sgd_step(model, opt)
    wa.update()
    other.update()
    for k, v in wa.module.state_dict().items():
        assert torch.equal(other.module.state_dict()[k], v), k
    with pytest.raises(ValueError, match="tau"):
        WeightAverage(model, tau=0.5).load_state_dict(wa.state_dict())


@pytest.mark.parametrize("tau", ["1.0", "-0.5", "2"])
def test_wa_tau_outside_0_1_refused_before_the_run_folder_exists(tmp_path, tau, capsys):
    run_dir = tmp_path / "r"
    assert cli(["train", "fmnist", f"train.wa_tau={tau}", f"out_dir={tmp_path}", "name=r"]) != 0
    assert "train.wa_tau" in capsys.readouterr().err
    assert not run_dir.exists()
    with pytest.raises(ConfigError, match="train.wa_tau"):
        load_config("fmnist", [f"train.wa_tau={tau}"])


def test_selection_rule_needs_what_it_uses():
    assert selection_mode("auto", 0.0, 1000) == "raw"  # existing runs: unchanged
    assert selection_mode("auto", 0.9995, 0) == "averaged"
    assert selection_mode("auto", 0.9995, 1000) == "val"  # the benchmark
    with pytest.raises(ConfigError, match="train.wa_tau"):
        load_config("fmnist", ["train.select=averaged"])
    with pytest.raises(ConfigError, match="data.val_size"):
        load_config("fmnist", ["train.select=val"])
    with pytest.raises(ConfigError, match="train.select"):
        load_config("fmnist", ["train.select=best"])


# --------------------------------------------------------------------------------------------
# Label smoothing
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["fgsm_rs", "n_fgsm", "pgd", "atas", "grad_align", "elle", "free", "none"])
def test_label_smoothing_is_torchs_in_every_methods_training_loss(name):
    """The training loss with label_smoothing s is F.cross_entropy(..., label_smoothing=s) on the
    same logits (regularisers off, so that the cross-entropy is the whole loss)."""
    off = {"grad_align": {"lam": 0.0}, "elle": {"lam": 0.0}, "pgd": {"steps": 1}}.get(name, {})
    torch.manual_seed(0)
    model = build_model("wong_cnn", num_classes=10, in_channels=1)
    x, y, idx = torch.rand(6, 1, 28, 28), torch.randint(0, 10, (6,)), torch.arange(6)
    losses = {}
    for s in (0.0, 0.3):
        m = atas.method(name, 0.1, num_samples=6, epochs=2, label_smoothing=s, **off)
        m.start_epoch(1)
        torch.manual_seed(1)
        x_adv = m.perturb(model, x, y, idx)
        loss = m.loss(model, x_adv, y, x)
        assert torch.allclose(loss, F.cross_entropy(m.logits.float(), y, label_smoothing=s), atol=1e-6)
        losses[s] = loss.item()
    assert losses[0.3] != losses[0.0]


def test_fgsm_pgi_composes_its_own_smoothing_with_the_runs():
    torch.manual_seed(0)
    model = build_model("wong_cnn", num_classes=10, in_channels=1)
    x, y, idx = torch.rand(6, 1, 28, 28), torch.randint(0, 10, (6,)), torch.arange(6)
    for ls_factor, s in ((1.0, 0.3), (0.6, 0.0), (0.6, 0.3)):
        m = atas.method("fgsm_pgi", 0.1, num_samples=6, epochs=2, lam=0.0, ls_factor=ls_factor, label_smoothing=s)
        m.start_epoch(1)
        x_adv = m.perturb(model, x, y, idx)
        loss = m.loss(model, x_adv, y, x)
        # targets smoothed twice: first the method's (true-class probability ls_factor), then s
        k = 10
        first = torch.full((6, k), (1 - ls_factor) / (k - 1)).scatter_(1, y[:, None], ls_factor)
        target = (1 - s) * first + s / k
        hand = -(target * F.log_softmax(m.logits.float(), 1)).sum(1).mean()
        assert torch.allclose(loss, hand, atol=1e-6), (ls_factor, s)


def test_run_level_label_smoothing_reaches_every_method_unless_set_per_method():
    cfg = load_config("fmnist", ["train.label_smoothing=0.4", "method.name=pgd"])
    assert cfg.method.args["label_smoothing"] == 0.4
    cfg = load_config("fmnist", ["train.label_smoothing=0.4", "method.name=pgd", "method.pgd.label_smoothing=0.1"])
    assert cfg.method.args["label_smoothing"] == 0.1
    assert load_config("fmnist", []).method.args["label_smoothing"] == 0.0  # default: off
    with pytest.raises(ConfigError, match="train.label_smoothing"):
        load_config("fmnist", ["train.label_smoothing=1.0"])


def test_a_method_without_cross_entropy_ignores_the_run_level_key_and_refuses_its_own(monkeypatch):
    cls = get_method("fgsm_rs")
    monkeypatch.setattr(cls, "supports_label_smoothing", False)
    assert (
        load_config("fmnist", ["method.name=fgsm_rs", "train.label_smoothing=0.4"]).method.args["label_smoothing"] == 0
    )
    with pytest.raises(ConfigError, match="no cross-entropy"):
        load_config("fmnist", ["method.name=fgsm_rs", "method.label_smoothing=0.4"])


# --------------------------------------------------------------------------------------------
# OneCycle
# --------------------------------------------------------------------------------------------
def test_onecycle_is_torchs_onecycle_lr_per_iteration():
    cfg = load_config("fmnist", ["optim.schedule=onecycle", "optim.pct_start=0.3", "train.epochs=5", "optim.lr=0.1"])
    steps_per_epoch = 7
    factor = lr_factor(cfg, steps_per_epoch)
    total = 5 * steps_per_epoch
    opt = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1)
    ref = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=total, pct_start=0.3, cycle_momentum=False)
    for it in range(total):
        assert 0.1 * factor(it) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=1e-15), it
        opt.step()
        if it < total - 1:
            ref.step()
    curve = [factor(it) for it in range(total)]
    assert curve[0] == pytest.approx(1 / 25, rel=1e-9) and max(curve) > 0.99  # the peak falls between two steps
    assert 0.3 * total - 1 <= curve.index(max(curve)) <= 0.3 * total and curve[-1] == pytest.approx(
        1 / 25 / 1e4, rel=1e-9
    )


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------
class _Constant(nn.Module):
    """Predicts class `k` whatever the input: robust exactly on the images of class k."""

    def __init__(self, k: int):
        super().__init__()
        self.k, self.w = k, nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return F.one_hot(torch.full((len(x),), self.k), 3).float() * 5 + self.w * x.flatten(1)[:, :3]


def test_selection_picks_the_better_model_and_keeps_the_best_epoch():
    x, y = torch.rand(10, 3, 4, 4), torch.tensor([0] * 7 + [1] * 3)
    sel = Selector(x, y, eps=8 / 255)
    row, new = sel.judge(_Constant(1), _Constant(0), epoch=1, step=5)
    assert new and row["val_pick"] == "averaged" and row["val_pgd_averaged"] == pytest.approx(0.7)
    assert row["val_pgd_raw"] == pytest.approx(0.3) and sel.best["weights"] == "averaged" and sel.best["epoch"] == 1
    row, new = sel.judge(_Constant(0), _Constant(1), epoch=2, step=10)  # as good as epoch 1: not better
    assert row["val_pick"] == "raw" and not new and row["selected_epoch"] == 1
    # the rule itself: a tie goes to the raw weights; equal PGD is broken by clean accuracy
    assert better({"pgd": 0.5}, {"pgd": 0.5}) == "raw" and better({"pgd": 0.4}, {"pgd": 0.5}) == "averaged"
    assert improves({"pgd": 0.5, "clean": 0.8}, {"pgd": 0.5, "clean": 0.7})
    assert not improves({"pgd": 0.5, "clean": 0.7}, {"pgd": 0.5, "clean": 0.7})
    # a guard rollback loads an older state: the better best stays
    older = {"best": {"pgd": 0.1, "clean": 0.1, "weights": "raw", "epoch": 0, "step": 0}}
    sel.load_state_dict(older)
    assert sel.best["epoch"] == 1


# --------------------------------------------------------------------------------------------
# End to end on Fashion-MNIST
# --------------------------------------------------------------------------------------------
TINY = [
    "model.arch=wong_cnn",
    "train.co_action=keep_best",
    "data.subset=448",
    "data.val_size=64",
    "train.batch_size=64",
    "train.probe_size=32",
    "train.probe_steps=2",
    "train.progress=false",
    "eval.at_end=false",
    "optim.lr=0.02",
    "method.name=fgsm_rs",
    "train.deterministic=true",
    "train.wa_tau=0.9",
    "train.label_smoothing=0.2",
    "optim.schedule=onecycle",
]


def _tiny(tmp_path, *extra):
    return load_config("fmnist", TINY + [f"out_dir={tmp_path}"] + list(extra))


@needs_fmnist
def test_resume_with_weight_averaging_is_bit_exact(tmp_path, one_thread):
    full = train(_tiny(tmp_path, "train.epochs=2"), run_dir=tmp_path / "full")
    # killed after epoch 1 (max_steps: the OneCycle curve is the 2-epoch run's, as in a real kill)
    train(_tiny(tmp_path, "train.epochs=2", "train.max_steps=6"), run_dir=tmp_path / "half")
    resumed = train(_tiny(tmp_path, "train.epochs=2"), run_dir=tmp_path / "half", resume=True)
    for a, b in (
        (full.raw_model, resumed.raw_model),
        (full.averaged_model, resumed.averaged_model),
        (full.model, resumed.model),
    ):
        for (name, u), v in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(u, v), name
    assert full.weights == resumed.weights and full.weights["rule"] == "val"
    # the average really averages: it is not the raw model
    assert not torch.equal(
        full.raw_model.state_dict()["net.0.weight"], full.averaged_model.state_dict()["net.0.weight"]
    )
    rows = [json.loads(r) for r in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        assert {"val_pgd_raw", "val_pgd_averaged", "val_pick", "selected_epoch", "peak_memory_mb", "passes_fwd"} <= set(
            r
        )
        assert r["passes_fwd"] == 2 and r["passes_bwd"] == 2 and r["peak_memory_mb"] > 0
    cost = json.loads((tmp_path / "full" / "cost.json").read_text())
    assert (
        cost["passes_per_step"] == [2, 2] and cost["train_time_s"] > 0 and cost["memory_kind"] == "cpu_peak_rss_process"
    )
    # the run folder's default weights are the selected ones; raw and averaged are there on request
    _, _, info = load_model(tmp_path / "full")
    assert info["weights"] == full.weights["weights"] and info["selected_epoch"] == full.weights["epoch"]
    avg, _, info = load_model(tmp_path / "full", weights="averaged")
    assert info["weights"] == "averaged"
    for u, v in zip(avg.state_dict().values(), full.averaged_model.state_dict().values()):
        assert torch.equal(u, v)


@needs_fmnist
def test_without_the_new_keys_a_run_is_unchanged(tmp_path, one_thread):
    """Default keys: no average, raw weights handed on, no selected.pt; the cost is still recorded."""
    base = [k for k in TINY if not k.startswith(("train.wa_tau", "train.label_smoothing", "optim.schedule"))]
    cfg = load_config("fmnist", base + [f"out_dir={tmp_path}", "train.epochs=1"])
    run = train(cfg, run_dir=tmp_path / "r")
    assert run.averaged_model is None and run.model is run.raw_model and run.weights["weights"] == "raw"
    assert not (tmp_path / "r" / "selected.pt").exists() and (tmp_path / "r" / "cost.json").exists()
    with pytest.raises(Exception, match="no weight average"):
        load_model(tmp_path / "r", weights="averaged")


@needs_fmnist
def test_export_writes_the_robustbench_fields_from_the_runs_own_evaluation(tmp_path, one_thread):
    argv = [
        "train",
        "fmnist",
        *TINY,
        "train.epochs=1",
        "data.subset=256",
        "eval.at_end=true",
        "eval.attacks=clean,aa",
        "eval.n_examples=16",
        "eval.batch_size=16",
        f"out_dir={tmp_path}",
        "name=r",
    ]
    assert cli(argv) == 0
    result = json.loads((tmp_path / "r" / "eval.json").read_text())
    assert result["weights"] in ("raw", "averaged") and result["checkpoint"]["rule"] == "val"
    export_model(tmp_path / "r", tmp_path / "exp")
    card = json.loads((tmp_path / "exp" / "card.json").read_text())
    rb = json.loads((tmp_path / "exp" / "robustbench.json").read_text())
    assert card["robustbench"] == rb and card["weights"] == result["weights"]
    assert rb["threat_model"] == "Linf" and rb["additional_data"] is False and rb["number_forward_passes"] == 1
    assert rb["eps"] == "0.2" and rb["architecture"] == "wong_cnn" and rb["n_examples"] == 16
    assert rb["clean_acc"] == f"{100 * result['results']['clean']['accuracy']:.2f}"
    assert rb["autoattack_acc"] == f"{100 * result['results']['aa']['accuracy']:.2f}" == rb["reported"]
    assert {"name", "authors", "venue"} <= set(rb)
    # the other weights were never evaluated: no entry, and the note says which `atas eval` to run
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "robustbench.json").write_text("{}")  # an earlier export's entry goes
    other = "raw" if result["weights"] == "averaged" else "averaged"
    assert cli(["export", str(tmp_path / "r"), "--out", str(tmp_path / "raw"), "--which-weights", other]) == 0
    card = json.loads((tmp_path / "raw" / "card.json").read_text())
    assert card["weights"] == other
    assert card["robustbench"] is None and "--attacks clean,aa" in card["robustbench_note"]
    assert not (tmp_path / "raw" / "robustbench.json").exists()


def test_robustbench_entry_needs_clean_and_autoattack():
    card = {
        "architecture": "resnet18_cifar",
        "eps": "8/255",
        "dataset": "cifar10",
        "method": "atas",
        "weights": "averaged",
    }
    ev = {
        "n_examples": 10000,
        "results": {"clean": {"accuracy": 0.8312, "n": 10000}, "aa": {"accuracy": 0.4851, "n": 10000}},
    }
    rb = robustbench_entry(card, ev)
    assert rb["architecture"] == "ResNet-18" and rb["clean_acc"] == "83.12" and rb["autoattack_acc"] == "48.51"
    assert robustbench_entry(card, {"results": {"clean": {"accuracy": 0.8}, "pgd": {"accuracy": 0.5}}}) is None


# --------------------------------------------------------------------------------------------
# Models, data, recipes
# --------------------------------------------------------------------------------------------
def test_cifar_resnet18_has_the_3x3_stem_and_no_max_pool():
    model = build_model("resnet18_cifar", num_classes=10)
    net = model.net if hasattr(model, "net") else model
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert build_model("resnet18_cifar", num_classes=200)(torch.rand(1, 3, 64, 64)).shape == (1, 200)
    assert sum(p.numel() for p in net.parameters()) == 11_173_962  # the standard CIFAR ResNet-18


def test_val_from_stride_spreads_the_held_out_images_over_a_class_sorted_split():
    held = val_indices(1000, 20, "stride")
    assert held.tolist() == [25 + 50 * i for i in range(20)]  # one in every 50: every class of 50
    keep = train_indices(1000, 20, "stride")
    assert len(keep) == 980 and not set(keep.tolist()) & set(held.tolist())
    assert val_indices(1000, 20, "last").tolist() == list(range(980, 1000)) and train_indices(1000, 20, "last") is None


@pytest.mark.parametrize("recipe", ["fastat-cifar10", "fastat-cifar100", "fastat-tinyimagenet"])
def test_fastat_recipes_are_the_benchmarks_recipe(recipe):
    cfg = load_config(recipe, ["method.name=n_fgsm"])
    o, t = cfg.optim, cfg.train
    assert (o.lr, o.momentum, o.weight_decay, o.schedule, o.pct_start) == (0.1, 0.9, 5e-4, "onecycle", 0.3)
    assert (t.epochs, t.batch_size, t.wa_tau, t.label_smoothing) == (100, 128, 0.9995, 0.4)
    assert cfg.method.eps.text == "8/255" and cfg.method.args["label_smoothing"] == 0.4
    assert selection_mode(t.select, t.wa_tau, cfg.data.val_size) == "val"
    assert cfg.model.arch == ("preact_resnet18" if "tiny" in recipe else "resnet18_cifar")
    assert cfg.data.val_size == (2000 if "tiny" in recipe else 1000)
    pgi = load_config(recipe, ["method.name=fgsm_pgi"]).method.args  # 0.4 in attack and loss, once
    k = {"fastat-cifar10": 10, "fastat-cifar100": 100, "fastat-tinyimagenet": 200}[recipe]
    assert pgi["label_smoothing"] == 0 and pgi["ls_factor"] == pytest.approx(1 - 0.4 + 0.4 / k)


@needs_fmnist
def test_compare_summary_and_report_carry_time_memory_and_passes(tmp_path, one_thread):
    argv = [
        "compare",
        "fmnist",
        "--methods",
        "fgsm_rs,pgd",
        "--seeds",
        "1",
        "--attacks",
        "clean,pgd",
        "--n-examples",
        "16",
        "--out",
        str(tmp_path),
        "model.arch=wong_cnn",
        "data.subset=192",
        "data.val_size=64",
        "train.epochs=1",
        "train.batch_size=64",
        "train.probe_size=16",
        "train.probe_steps=1",
        "eval.pgd_steps=1",
        "eval.pgd_restarts=1",
        "train.progress=false",
        "train.wa_tau=0.9",
        "pgd.steps=2",
    ]
    assert cli(argv) == 0
    runs = {r["method"]: r for r in json.loads((tmp_path / "summary.json").read_text())["runs"]}
    assert runs["fgsm_rs"]["passes_per_step"] == [2, 2] and runs["pgd"]["passes_per_step"] == [3, 3]
    for r in runs.values():
        assert r["train_time_s"] > 0 and r["peak_memory_mb"] > 0 and r["memory_kind"] == "cpu_peak_rss_process"
        assert r["weights"] in ("raw", "averaged")
    md = (tmp_path / "report.md").read_text()
    assert "peak memory (MB)" in md and "passes fwd/bwd" in md and "3/3" in md
    assert (tmp_path / "time_vs_robust.png").read_bytes()[:4] == b"\x89PNG"


def test_the_documented_weight_averaging_snippet_runs():
    """docs/own-code.md's "Weight averaging and label smoothing in your own loop" block, as written."""
    import re
    from pathlib import Path

    from torch.utils.data import DataLoader, TensorDataset

    docs = Path(__file__).resolve().parent.parent / "docs" / "own-code.md"
    section = (
        docs.read_text().split("### Weight averaging and label smoothing in your own loop", 1)[1].split("\n##", 1)[0]
    )
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    torch.manual_seed(0)
    train_set = TensorDataset(torch.rand(16, 3, 8, 8), torch.randint(0, 3, (16,)))
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))
    scope = {
        "atas": atas,
        "model": model,
        "train_set": train_set,
        "epochs": 2,
        "device": "cpu",
        "loader": DataLoader(atas.IndexedDataset(train_set), batch_size=8),
        "opt": torch.optim.SGD(model.parameters(), lr=0.1),
    }
    exec(compile(block, str(docs), "exec"), scope)
    wa, averaged = scope["wa"], scope["averaged"]
    assert wa.num_updates == 4 and not averaged.training and scope["atk"].opt.label_smoothing == 0.4
    assert not torch.equal(averaged[1].running_mean, model[1].running_mean)  # BN buffers averaged, lagging
    assert set(scope["state"]) == {"model", "wa"}


def test_lightning_callback_updates_and_checkpoints_the_weight_average(tmp_path):
    L = pytest.importorskip("lightning")
    from torch.utils.data import DataLoader, TensorDataset

    import atas.lightning

    torch.manual_seed(0)
    x, y = torch.rand(32, 3, 8, 8), torch.randint(0, 3, (32,))

    class Lit(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 3))
            self.atk = atas.FGSMRS(eps=0.1, num_samples=32, epochs=2, label_smoothing=0.4)
            self.wa = atas.WeightAverage(self.net, tau=0.9)

        def forward(self, x):
            return self.net(x)

        def training_step(self, b, i):
            xb, yb, idx = b
            return self.atk.loss(self, self.atk.perturb(self, xb, yb, idx), yb, xb)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    model = Lit()
    callback = atas.lightning.AdversarialTraining(weight_average=model.wa)
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[callback],
    )
    trainer.fit(model, DataLoader(atas.IndexedDataset(TensorDataset(x, y)), batch_size=8))
    assert model.wa.num_updates == 8  # 4 batches x 2 epochs, one per step
    assert not torch.equal(model.wa.module[0].weight, model.net[0].weight)
    (ckpt,) = tmp_path.rglob("*.ckpt")
    state = torch.load(ckpt, weights_only=False)["callbacks"]
    (saved,) = [v for v in state.values() if "weight_average" in v]
    assert saved["weight_average"]["num_updates"] == 8
    other = atas.WeightAverage(Lit().net, tau=0.9)
    other.load_state_dict(saved["weight_average"])
    for k, v in model.wa.module.state_dict().items():
        assert torch.equal(other.module.state_dict()[k], v), k
