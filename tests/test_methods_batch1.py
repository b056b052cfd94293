"""Methods of batch 1 (FGSM-AT, ConvergeSmooth on FGSM-RS / FGSM-MEP, ZeroGrad, MultiGrad, N-/RS-AAER):
each step against a hand computation of its paper's formula on a tiny model, option checks, and
bit-exact continuation of the methods that carry state from a checkpoint."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from atas.augment import PairedAugment
from atas.config import ConfigError, load_config
from atas.methods import BatchState, get_method
from atas.methods.aaer import NAAER, RSAAER, aaer_penalty
from atas.methods.converge_smooth import FGSMMEPCS, FGSMRSCS, soft_targets
from atas.methods.fgsm import FGSMAT
from atas.methods.fgsm_pgi import FGSMPGI, smoothed_ce
from atas.methods.fgsm_rs import FGSMRS
from atas.methods.n_fgsm import NFGSM
from atas.methods.zerograd import MultiGrad, ZeroGrad, kth_quantile, row_quantile
from atas.store import PerSampleStore

EPS = 8 / 255
B = 16
BATCH1 = ["fgsm", "fgsm_rs_cs", "fgsm_mep_cs", "zerograd", "multigrad", "n_aaer", "rs_aaer"]


def tiny_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))


class Cos(nn.Module):
    def forward(self, x):
        return torch.cos(x)


def curved_net(seed=0):
    """A net whose loss bends inside the ball: a single step often LOWERS it (abnormal examples)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), Cos(), nn.Linear(32, 10))
    with torch.no_grad():
        net[1].weight.mul_(30.0)
    return net


def batch(n=B, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def state(n=B, epoch=1):
    return BatchState(idx=torch.arange(n), epoch=epoch)


def store_state(n=B, epoch=1, eps=EPS):
    store = PerSampleStore(n, (1, 8, 8), eps)
    identity = PairedAugment(8, flip=False).sample(n, "cpu")
    idx = torch.arange(n)
    return BatchState(idx=idx, epoch=epoch, store=store, prior=store.gather_delta(idx, identity))


def mean_ce_grad(model, x, y):
    """The official codes' input gradient: of the batch-MEAN cross-entropy."""
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(x), y), [x])
    return g


def uniform(x, eps, seed, scale=1.0):
    """The draw LinfBall.random_start makes after torch.manual_seed(seed): x + U(-scale eps, scale eps)."""
    torch.manual_seed(seed)
    return (x + (torch.rand_like(x) * 2 - 1) * (scale * eps)).clamp(0, 1)


def project(x_adv, x, eps):
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)


# ---------------------------------------------------------------- every method of the batch
@pytest.mark.parametrize("name", BATCH1)
def test_registered_exported_and_contract_attributes(name):
    import atas

    cls = get_method(name)
    assert getattr(atas, cls.__name__) is cls
    assert cls.label and cls.cost and len(cls.passes) == 2
    model, (x, y) = tiny_net(), batch()
    method = cls(EPS, num_samples=B) if cls.uses_store else cls(EPS)
    st = store_state() if cls.uses_store else state()
    x_adv = method.attack(model, x, y, st)
    assert x_adv.shape == x.shape and not x_adv.requires_grad and 0 <= x_adv.min() and x_adv.max() <= 1
    loss, logits = method.training_loss(model, x_adv, y, x, st)
    assert torch.isfinite(loss) and logits.shape == (B, 10)
    loss.backward()  # the training loss reaches the parameters
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", BATCH1)
def test_unknown_option_rejected_and_defaults_complete(name):
    import dataclasses

    cfg = load_config("fmnist", [f"method.name={name}"])
    assert sorted(cfg.method.args) == sorted(f.name for f in dataclasses.fields(get_method(name).Options))
    with pytest.raises(ConfigError, match="method.no_such_option"):
        load_config("fmnist", [f"method.name={name}", "method.no_such_option=1"])


@pytest.mark.parametrize(
    "name, option, value",
    [
        ("fgsm", "alpha_factor", 0.0),
        ("fgsm", "bn_mode", "test"),
        ("zerograd", "q", 1.0),
        ("zerograd", "q", -0.1),
        ("zerograd", "alpha_factor", -1.0),
        ("multigrad", "samples", 0),
        ("multigrad", "threshold", 4),
        ("multigrad", "bn_mode", "none"),
        ("n_aaer", "lam1", -1.0),
        ("n_aaer", "lam2", float("inf")),
        ("n_aaer", "bn_mode", "x"),
        ("rs_aaer", "lam3", -0.5),
        ("rs_aaer", "alpha_factor", 0.0),
        ("fgsm_rs_cs", "gamma", 0.0),
        ("fgsm_rs_cs", "ratio", 0.5),
        ("fgsm_rs_cs", "w2", -1.0),
        ("fgsm_rs_cs", "stride", -1),
        ("fgsm_rs_cs", "ls_factor", 0.0),
        ("fgsm_mep_cs", "gamma", -1.0),
        ("fgsm_mep_cs", "stride", -2),
        ("fgsm_mep_cs", "label_smoothing", 1.5),
        ("fgsm_mep_cs", "momentum_decay", -1.0),
    ],
)
def test_check_options_rejects_bad_values(name, option, value):
    cls = get_method(name)
    with pytest.raises(ConfigError, match=f"method.{option}"):
        cls.check_options(cls.Options(**{option: value}))
    with pytest.raises(ConfigError, match=f"method.{option}"):
        load_config("fmnist", [f"method.name={name}", f"method.{option}={value}"])


def test_fgsm_rs_and_n_fgsm_split_into_start_and_step_is_the_same_attack():
    model, (x, y) = tiny_net(), batch()
    for cls in (FGSMRS, NFGSM):
        m = cls(EPS)
        torch.manual_seed(3)
        whole = m.attack(model, x, y, state())
        torch.manual_seed(3)
        ball = m.ball_at(1)
        x0 = m.start(x, ball)
        halves = m.step(x0, mean_ce_grad(model, x0, y), x, ball)
        assert torch.equal(whole, halves)


# ---------------------------------------------------------------- FGSM-AT
def test_fgsm_step_and_loss_by_hand():
    model, (x, y) = tiny_net(), batch()
    m = FGSMAT(EPS)
    assert m.opt.alpha_factor == 1.0 and m.passes_per_step() == (2, 2)
    x_adv = m.attack(model, x, y, state())
    expected = (x + EPS * mean_ce_grad(model, x, y).sign()).clamp(0, 1)  # from x, no random start
    assert torch.equal(x_adv, expected)
    loss, _ = m.training_loss(model, x_adv, y, x, state())
    assert loss.item() == pytest.approx(F.cross_entropy(model(expected), y).item(), rel=1e-6)
    assert m.remedy(1) == {"alpha_factor": 0.8}


# ---------------------------------------------------------------- ZeroGrad / MultiGrad
def test_row_quantile_equals_torch_quantile():
    a = torch.rand(5, 37, generator=torch.Generator().manual_seed(0))
    for q in (0.0, 0.1, 0.35, 0.5, 0.99, 1.0 - 1e-9):
        assert torch.allclose(row_quantile(a, q), torch.quantile(a, q, dim=1), atol=1e-7), q
        assert torch.allclose(kth_quantile(a, q), torch.quantile(a, q, dim=1), atol=1e-6), q  # beyond 2^24


def test_zerograd_step_and_loss_by_hand():
    model, (x, y) = tiny_net(), batch()
    m = ZeroGrad(EPS)
    assert (m.opt.q, m.opt.alpha_factor, m.opt.random_start) == (0.35, 2.0, True)
    torch.manual_seed(7)
    x_adv = m.attack(model, x, y, state())
    x0 = uniform(x, EPS, 7)
    g = mean_ce_grad(model, x0, y)
    t = torch.quantile(g.abs().flatten(1), 0.35, dim=1).view(-1, 1, 1, 1)
    g = torch.where(g.abs() < t, torch.zeros_like(g), g)
    expected = project(x0 + 2 * EPS * g.sign(), x, EPS)
    assert torch.allclose(x_adv, expected, atol=1e-7)
    # the zeroed coordinates keep their start value: about a q fraction of each image
    kept = (x_adv == x0).flatten(1).float().mean(1)
    assert (kept >= 0.35 - 1 / 64).all()
    loss, _ = m.training_loss(model, x_adv, y, x, state())
    assert loss.item() == pytest.approx(F.cross_entropy(model(expected), y).item(), rel=1e-6)
    assert m.remedy(1) == {"q": 0.675}


def test_multigrad_consensus_step_and_loss_by_hand():
    model, (x, y) = tiny_net(), batch()
    m = MultiGrad(EPS)
    assert (m.opt.samples, m.opt.threshold, m.passes_per_step()) == (3, None, (4, 4))
    assert MultiGrad(EPS, samples=5).passes_per_step() == (6, 6)
    torch.manual_seed(11)
    x_adv = m.attack(model, x, y, state())
    torch.manual_seed(11)
    signs = []
    for _ in range(3):  # three draws in a row, as the method makes them
        x_s = (x + (torch.rand_like(x) * 2 - 1) * EPS).clamp(0, 1)
        signs.append(mean_ce_grad(model, x_s, y).sign())
    votes = sum(signs)
    unanimous = torch.where(votes.abs() < 3, torch.zeros_like(votes), votes)
    expected = project(x + 2 * EPS * unanimous.sign(), x, EPS)  # from x (delta = 0), step cut to eps
    assert torch.equal(x_adv, expected)
    assert torch.allclose(m.stats["zeroed"], (unanimous == 0).flatten(1).float().mean(1))
    assert 0 < m.stats["zeroed"].mean() < 1
    loss, _ = m.training_loss(model, x_adv, y, x, state())
    assert loss.item() == pytest.approx(F.cross_entropy(model(expected), y).item(), rel=1e-6)
    # a majority (2 of 3) moves every coordinate with a non-zero vote
    torch.manual_seed(11)
    majority = MultiGrad(EPS, threshold=2).attack(model, x, y, state())
    assert torch.equal(majority, project(x + EPS * votes.sign(), x, EPS))


# ---------------------------------------------------------------- N-AAER / RS-AAER
def official_aaer(l0_logits, l1_logits, y, lam1, lam2, lam3):
    """The AAER term as the official code computes it: boolean indexing, .item() for the normal set."""
    l0 = F.cross_entropy(l0_logits, y, reduction="none")
    l1 = F.cross_entropy(l1_logits, y, reduction="none")
    ab, nor = l0 > l1, l0 <= l1
    n_ab, n_nor = int(ab.sum()), int(nor.sum())
    if n_ab == 0 or n_nor == 0:
        return torch.zeros(())
    var_ab = ((l0_logits[ab] - l1_logits[ab]) ** 2).sum(1).mean(0)
    var_nor = ((l0_logits[nor] - l1_logits[nor]) ** 2).sum(1).mean(0).item()
    ce_ab = (l0[ab] - l1[ab]).sum() / n_ab
    return lam1 * n_ab / len(y) * (lam2 * ce_ab + lam3 * max(var_ab - var_nor, 0))


@pytest.mark.parametrize("cls, base", [(NAAER, NFGSM), (RSAAER, FGSMRS)])
def test_aaer_attack_is_its_base_and_loss_matches_official_formula(cls, base):
    eps = 0.1
    model, (x, y) = curved_net(), batch(64)
    m = cls(eps)
    torch.manual_seed(5)
    x_adv = m.attack(model, x, y, state(64))
    torch.manual_seed(5)
    assert torch.equal(x_adv, base(eps).attack(model, x, y, state(64)))
    torch.manual_seed(5)
    x0 = m.start(x, m.ball_at(1))
    with torch.no_grad():
        before = model(x0)
    loss, logits = m.training_loss(model, x_adv, y, x, state(64))
    o = m.opt
    reg = official_aaer(before, model(x_adv), y, o.lam1, o.lam2, o.lam3)
    n_ab = int((F.cross_entropy(before, y, reduction="none") > F.cross_entropy(logits, y, reduction="none")).sum())
    assert 0 < n_ab < 64, n_ab
    assert reg.item() > 0
    assert loss.item() == pytest.approx(F.cross_entropy(logits, y).item() + reg.item(), rel=1e-5)
    assert m.stats["abnormal"].sum().item() == n_ab
    with pytest.raises(RuntimeError, match="perturb"):
        m.training_loss(model, x_adv, y, x, state(64))  # the attack's logits are used once


def test_aaer_defaults_follow_the_official_commands():
    assert (NAAER.Options().lam2, NAAER.Options().lam3, NAAER.Options().noise_factor) == (1.5, 0.15, 2.0)
    assert (RSAAER.Options().lam2, RSAAER.Options().lam3, RSAAER.Options().alpha_factor) == (2.5, 1.5, 1.25)
    assert NAAER(EPS).remedy(1) == {"lam2": 3.0, "lam3": 0.3}


def test_aaer_penalty_is_zero_without_both_kinds_and_gradient_raises_abnormal_loss():
    y = torch.tensor([0, 1])
    start = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    up = torch.tensor([[-1.0, 1.0], [1.0, -1.0]])  # both losses rise: all normal
    reg, ab = aaer_penalty(start, up, y, 1.0, 1.0, 1.0)
    assert reg.item() == 0 and ab.sum() == 0
    adv = torch.tensor([[1.0, -1.0], [1.0, -1.0]], requires_grad=True)  # sample 0 abnormal, 1 normal
    reg, ab = aaer_penalty(start, adv, y, 1.0, 2.0, 0.0)
    assert ab.tolist() == [1.0, 0.0]
    l0, l1 = math.log(2), math.log(1 + math.exp(-2))
    assert reg.item() == pytest.approx(0.5 * 2.0 * (l0 - l1), rel=1e-6)
    reg.backward()
    # minimising the term raises the abnormal sample's loss: its true logit is pushed down
    assert adv.grad[0, 0] > 0 and adv.grad[1].abs().sum() == 0


# ---------------------------------------------------------------- ConvergeSmooth
def set_cs(method, prev_mean, beta):
    method._cs["prev_mean"], method._cs["beta"] = torch.tensor(prev_mean), torch.tensor(beta)


def test_rs_cs_step_by_hand_no_projection_by_default():
    model, (x, y) = tiny_net(), batch()
    m = FGSMRSCS(EPS)
    assert (m.opt.alpha_factor, m.opt.project, m.opt.gamma, m.opt.ls_factor) == (1.0, False, 0.03, 0.6)
    torch.manual_seed(2)
    x_adv = m.attack(model, x, y, state())
    x0 = uniform(x, EPS, 2)
    expected = (x0 + EPS * mean_ce_grad(model, x0, y).sign()).clamp(0, 1)  # official: no eps ball
    assert torch.equal(x_adv, expected)
    assert (x_adv - x).abs().max() > EPS + 1e-6
    torch.manual_seed(2)
    projected = FGSMRSCS(EPS, project=True).attack(model, x, y, state())
    assert torch.equal(projected, project(expected, x, EPS))


@pytest.mark.parametrize("offset, sign", [(+1.0, +1), (-1.0, -1), (0.0, 0)])
def test_rs_cs_loss_by_hand(offset, sign):
    """offset +1: the normal loss jumped up past the band (term +w2*l); -1: fell (term -w2*l); 0: none."""
    model, (x, y) = tiny_net(), batch()
    m = FGSMRSCS(EPS, epochs=10, w2=0.5)
    torch.manual_seed(4)
    x_adv = m.attack(model, x, y, state(epoch=5))
    x0 = uniform(x, EPS, 4)
    targets = soft_targets(y, 10, 0.6)
    assert torch.allclose(targets.sum(1), torch.ones(B)) and targets[0, y[0]] == pytest.approx(0.6)

    def ls_ce(logits):  # the official LabelSmoothLoss
        return -(targets * F.log_softmax(logits, 1)).sum(1).mean()

    normal = ls_ce(model(x0)).item()
    set_cs(m, normal - offset, 0.01)  # tau = clip(0.01, 0.03, 0.03) = 0.03
    loss, logits = m.training_loss(model, x_adv, y, x, state(epoch=5))
    expected = ls_ce(model(x_adv)).item() + 0.5 * sign * normal
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert m.stats["cs_active"].mean().item() == abs(sign)


def test_cs_band_is_clipped_beta_and_window_follows_stride():
    m = FGSMRSCS(EPS, epochs=10, gamma=0.1, ratio=4.0)
    for beta, diff, fired in [
        (0.0, 0.03, True),
        (0.0, 0.02, False),
        (0.05, 0.04, False),
        (0.05, 0.06, True),
        (1.0, 0.09, False),
        (1.0, 0.11, True),
        (-1.0, 0.026, True),
    ]:
        set_cs(m, 1.0, beta)
        m.smoothness(torch.tensor(1.0 + diff), 4, epoch=5)
        assert bool(m.stats["cs_active"][0]) == fired, (beta, diff)
    assert [e for e in range(1, 12) if m.constraint_active(e)] == [3, 4, 5, 6, 7, 8, 9]
    assert [e for e in range(1, 6) if FGSMRSCS(EPS, stride=0).constraint_active(e)] == [2, 3, 4, 5]
    assert FGSMRSCS(EPS).remedy(1) == {"gamma": 0.015}


def test_cs_epoch_means_and_beta_follow_the_official_bookkeeping():
    m = FGSMRSCS(EPS, stride=0)
    m.start_epoch(1)
    for loss, n in [(2.0, 2), (1.0, 6)]:
        m.smoothness(torch.tensor(loss), n, epoch=1)
    m.start_epoch(2)  # L_1 = (4 + 6) / 8 = 1.25, beta = 1.25 - 0
    assert m._cs["prev_mean"].item() == pytest.approx(1.25) and m._cs["beta"].item() == pytest.approx(1.25)
    m.smoothness(torch.tensor(1.0), 4, epoch=2)
    m.start_epoch(2)  # the same epoch again (a resume): nothing rolls over
    assert m._cs["prev_mean"].item() == pytest.approx(1.25)
    m.start_epoch(3)  # L_2 = 1.0, beta = 1.0 - 1.25
    assert m._cs["prev_mean"].item() == pytest.approx(1.0) and m._cs["beta"].item() == pytest.approx(-0.25)


def test_mep_cs_is_fgsm_mep_plus_the_constraint_on_the_clean_loss():
    model, (x, y) = tiny_net(), batch()
    m = FGSMMEPCS(EPS, epochs=10, num_samples=B)
    assert isinstance(m, FGSMPGI) and m.opt.lam == 0.0 and m.passes_per_step() == (3, 3)
    assert FGSMMEPCS(EPS, lam=10.0).passes_per_step() == (3, 4)
    torch.manual_seed(6)
    st = store_state(epoch=5)
    x_adv = m.attack(model, x, y, st)
    torch.manual_seed(6)
    st_ref = store_state(epoch=5)
    ref = FGSMPGI(EPS, lam=0.0, num_samples=B)
    assert torch.equal(x_adv, ref.attack(model, x, y, st_ref))
    assert torch.equal(m.new_prior(x_adv, x), ref.new_prior(x_adv, x))
    normal = smoothed_ce(model(x), y, 0.6).item()
    set_cs(m, normal - 1.0, 0.0)
    loss, _ = m.training_loss(model, x_adv, y, x, st)
    assert loss.item() == pytest.approx(smoothed_ce(model(x_adv), y, 0.6).item() + normal, rel=1e-5)


def train_steps(method, model, opt, data, epochs):
    for _ in range(epochs):
        method.start_epoch()
        for x, y, idx in data:
            x_adv = method.perturb(model, x, y, idx)
            loss = method.loss(model, x_adv, y, x)
            opt.zero_grad()
            loss.backward()
            opt.step()


@pytest.mark.parametrize(
    "name, options",
    [("fgsm_rs_cs", {"stride": 0, "gamma": 0.001}), ("fgsm_mep_cs", {"stride": 0, "gamma": 0.001, "lam": 1.0})],
)
def test_checkpoint_mid_run_continues_bit_exactly(name, options):
    """state_dict after 2 epochs, loaded (weights_only) into a fresh object: epochs 3-4 identical."""
    cls = get_method(name)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(48, 1, 8, 8, generator=g), torch.randint(0, 10, (48,), generator=g)
    data = [(x[i : i + 16], y[i : i + 16], torch.arange(i, i + 16)) for i in range(0, 48, 16)]

    def fresh():
        model = tiny_net(0)
        return (
            model,
            torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
            cls(0.1, num_samples=48, epochs=4, **options),
        )

    model, opt, method = fresh()
    torch.manual_seed(1)
    train_steps(method, model, opt, data, 2)
    buf = io.BytesIO()
    torch.save(
        {
            "model": model.state_dict(),
            "opt": opt.state_dict(),
            "method": method.state_dict(),
            "rng": torch.get_rng_state(),
        },
        buf,
    )
    train_steps(method, model, opt, data, 2)
    assert method.stats["cs_active"].sum() > 0, "the constraint must have fired in the continued epochs"

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model2, opt2, method2 = fresh()
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    method2.load_state_dict(saved["method"])
    torch.set_rng_state(saved["rng"])
    train_steps(method2, model2, opt2, data, 2)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    s1, s2 = method.state_dict()["method"], method2.state_dict()["method"]
    assert s1.keys() == s2.keys()
    for k in s1:
        assert torch.equal(torch.as_tensor(s1[k]), torch.as_tensor(s2[k])), k
    with pytest.raises(ValueError, match=name):
        method2.load_method_state({})


# ---------------------------------------------------------------- end to end
from tests.helpers import needs_fmnist  # noqa: E402


@needs_fmnist
@pytest.mark.parametrize("name", ["fgsm_rs_cs", "fgsm_mep_cs"])
def test_training_run_resumes_exactly_through_the_constraint(tmp_path, name):
    """`atas train --resume` after epoch 2 of 3 gives the weights of the uninterrupted run (the
    constraint, on from epoch 2 with stride 0, reads the epoch means carried in the checkpoint)."""
    from atas.trainer import train

    common = [
        "model.arch=wong_cnn",
        "train.co_action=keep_best",
        "data.subset=256",
        "train.batch_size=64",
        "train.probe_size=64",
        "train.probe_steps=2",
        "train.progress=false",
        "eval.at_end=false",
        "train.deterministic=true",
        f"method.name={name}",
        "method.eps=0.1",
        "method.stride=0",
        "method.gamma=0.001",
        f"out_dir={tmp_path}",
    ]
    full = train(load_config("fmnist", common + ["train.epochs=3"]), run_dir=tmp_path / "full")
    assert all(math.isfinite(r["train_loss"]) for r in full.metrics)
    train(load_config("fmnist", common + ["train.epochs=2"]), run_dir=tmp_path / "half")
    resumed = train(load_config("fmnist", common + ["train.epochs=3"]), run_dir=tmp_path / "half", resume=True)
    for (key, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), key
