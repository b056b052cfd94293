"""FGSM-PCO and the universal-perturbation initialisations (FGSM-UAP, -CUAP, -FUAP): each step
against a hand computation of its formula on a tiny model, exact resumption of the carried state,
option checks."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import atas
from atas.config import ConfigError
from atas.methods import BatchState, get_method
from atas.methods.fgsm_pco import FGSMPCO, smoothed_targets
from atas.methods.fgsm_uap import FGSMCUAP, FGSMFUAP, FGSMUAP

EPS = 8 / 255
B = 12
BATCH3 = ["fgsm_pco", "fgsm_uap", "fgsm_cuap", "fgsm_fuap"]


def tiny_net(seed=0, classes=10):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, classes))


def batch(n=B, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def project(z, x, eps=EPS):
    return torch.minimum(torch.maximum(z, x - eps), x + eps).clamp(0, 1)


def input_grad(net, z, y):
    z = z.clone().requires_grad_(True)
    return torch.autograd.grad(F.cross_entropy(net(z), y, reduction="sum"), [z])[0]


def param_grads(net, loss):
    return torch.autograd.grad(loss, list(net.parameters()), retain_graph=True)


# ---------------------------------------------------------------- FGSM-PCO
def test_pco_step_and_loss_match_the_formula():
    net, (x, y) = tiny_net(), batch()
    prior = (torch.rand_like(x) * 2 - 1) * EPS
    method = FGSMPCO(EPS)
    st = BatchState(idx=torch.arange(B), epoch=2, prior=prior)  # epoch 2: the prior as stored
    x_adv = method.attack(net, x, y, st)
    d_got = method.new_prior(x_adv, x).clone()
    loss = method.training_loss(net, x_adv, y, x, st)[0]
    grads = param_grads(net, loss)

    # By hand: x_0, g of LS-CE (0.6), c = 1 - p_y, FGSM from the prior, the fusion with beta 1.5.
    x0 = (x + prior).clamp(0, 1).requires_grad_(True)
    logits0 = net(x0)
    targets = smoothed_targets(y, 10, 0.6)
    assert torch.allclose(targets.sum(1), torch.ones(B)) and (targets.gather(1, y[:, None]) == 0.6).all()
    g = torch.autograd.grad(F.cross_entropy(logits0, targets), [x0], retain_graph=True)[0]
    c = (1 - logits0.softmax(1).gather(1, y[:, None])).clamp(0, 1).view(-1, 1, 1, 1)
    d = torch.minimum(torch.maximum((prior + EPS * g.sign()).clamp(-EPS, EPS), -x), 1 - x)
    x_new = (c * x0.detach() + (1 - c) * (x + 1.5 * d)).clamp(0, 1)
    assert torch.allclose(d_got, d, atol=1e-7) and torch.allclose(x_adv, x_new.detach(), atol=1e-6)
    assert (x_adv - x).abs().max() <= 1.5 * EPS + 1e-6 and (d_got.abs() <= EPS + 1e-7).all()
    logits = net(x_new)
    logits_fgsm = net(x + d)
    expected = (
        F.cross_entropy(logits, targets)
        + 10 * (F.mse_loss(logits_fgsm, logits0) - F.mse_loss(logits_fgsm, logits)).abs()
    )
    assert torch.allclose(loss, expected, atol=1e-6)
    # The gradient also flows through c into the attack's forward, as the official code's.
    for a, b in zip(grads, param_grads(net, expected)):
        assert torch.allclose(a, b, atol=1e-5)
    detached = (
        F.cross_entropy(net(x_new.detach()), targets)
        + 10 * (F.mse_loss(logits_fgsm, logits0) - F.mse_loss(logits_fgsm, net(x_new.detach()))).abs()
    )
    assert not all(torch.allclose(a, b, atol=1e-5) for a, b in zip(grads, param_grads(net, detached)))


def test_pco_first_epoch_starts_on_corners_and_stores_the_fgsm_perturbation():
    net, (x, y) = tiny_net(), batch()
    method = atas.method("fgsm_pco", EPS, num_samples=B)
    x_adv = method.perturb(net, x, y, torch.arange(B))
    method.loss(net, x_adv, y, x).backward()
    stored = method.store.delta
    # d_fgsm = clip(corner +- eps): every entry is -eps, 0 or +eps (or cut by the image range).
    inside = ((x + stored) > 0) & ((x + stored) < 1)
    levels = (stored / EPS)[inside]
    assert torch.allclose(levels, levels.round(), atol=1e-5) and (levels.abs() <= 1 + 1e-6).all()
    zero = atas.method("fgsm_pco", EPS, num_samples=B, delta_init="zero")
    zero.perturb(net, x, y, torch.arange(B))
    d = zero.store.delta
    inside = ((x + d) > 0) & ((x + d) < 1)
    assert ((d.abs() - EPS).abs() < 1e-6)[inside].float().mean() > 0.9  # one eps step from 0 (sign(0) = 0 aside)


def test_pco_prior_is_clipped_into_the_ramped_ball():
    net, (x, y) = tiny_net(), batch()
    method = FGSMPCO(0.3, eps_ramp_epochs=3)
    st = BatchState(idx=torch.arange(B), epoch=2, prior=torch.full_like(x, 0.3))
    x_adv = method.attack(net, x, y, st)
    assert (method.new_prior(x_adv, x).abs() <= 0.2 + 1e-6).all()
    assert (x_adv - x).abs().max() <= 1.5 * 0.2 + 1e-6


# ---------------------------------------------------------------- FGSM-UAP / CUAP
def uap_hand(net, x, y, slot, v0, m0, lam=10.0, mu=0.3, factor=1.25, x_start=None):
    """The benchmark's step written out: x_init, x_adv, the loss and the new (v, m)."""
    x_start = x if x_start is None else x_start
    x_init = project(x_start + factor * EPS * v0[slot], x)
    g = input_grad(net, x_init, y)
    x_adv = project(x_init + EPS * g.sign(), x)
    logits = net(x_adv)
    loss = F.cross_entropy(logits, y) + lam * F.mse_loss(logits, net(x_init))
    unit = g / g.abs().sum()
    v1, m1 = v0.clone(), m0.clone()
    for k in slot.unique().tolist():  # the benchmark's loop over the batch's slots
        m1[k] = unit[slot == k].mean(0) + mu * m0[k]
        v1[k] = (v0[k] + m1[k].sign()).clamp(-1, 1)
    return x_adv, loss, v1, m1


@pytest.mark.parametrize("cls", [FGSMUAP, FGSMCUAP])
def test_uap_and_cuap_step_loss_and_update_match_the_formula(cls):
    net, (x, y) = tiny_net(), batch()
    y[:3] = 4  # a class seen several times; others not at all
    method = cls(EPS)
    slots = 1 if cls is FGSMUAP else 10
    torch.manual_seed(5)
    v0 = torch.randint(-1, 2, (slots, 1, 8, 8)).float()
    m0 = torch.randn(slots, 1, 8, 8) * 1e-3
    method.uap_sign, method.momentum = v0.clone(), m0.clone()
    st = BatchState(idx=None, epoch=1)
    x_adv = method.attack(net, x, y, st)
    loss = method.training_loss(net, x_adv, y, x, st)[0]
    slot = torch.zeros_like(y) if cls is FGSMUAP else y
    want_adv, want_loss, v1, m1 = uap_hand(net, x, y, slot, v0, m0)
    assert torch.allclose(x_adv, want_adv, atol=1e-6) and torch.allclose(loss, want_loss, atol=1e-6)
    assert torch.allclose(method.momentum, m1, atol=1e-7) and torch.equal(method.uap_sign, v1)
    if cls is FGSMCUAP:
        unseen = torch.ones(10, dtype=torch.bool)
        unseen[y.unique()] = False
        assert unseen.any() and torch.equal(method.uap_sign[unseen], v0[unseen])
        assert torch.equal(method.momentum[unseen], m0[unseen])
    assert (x_adv - x).abs().max() <= EPS + 1e-6


def test_uap_starts_on_corners_and_follows_the_ramped_ball():
    net, (x, y) = tiny_net(), batch()
    method = FGSMUAP(0.3, eps_ramp_epochs=3)
    x_adv = method.attack(net, x, y, BatchState(idx=None, epoch=1))
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6
    fresh = FGSMUAP(EPS)
    fresh._ensure_state(net, x)
    assert fresh.uap_sign.shape == (1, 1, 8, 8) and (fresh.uap_sign.abs() == 1).all()
    assert (fresh.momentum == 0).all()


def test_cuap_reads_the_number_of_classes_from_the_model():
    net, (x, y) = tiny_net(classes=7), batch()
    y = y % 7
    method = atas.method("fgsm_cuap", EPS)
    method.perturb(net, x, y)
    assert method.uap_sign.shape == (7, 1, 8, 8)
    with pytest.raises(ValueError, match="label 7"):
        method.attack(net, x, torch.full_like(y, 7), BatchState(idx=None, epoch=1))


# ---------------------------------------------------------------- FGSM-FUAP
def test_fuap_selects_by_the_head_and_trains_it():
    net, (x, y) = tiny_net(), batch()
    method = FGSMFUAP(EPS, num_uaps=4)
    torch.manual_seed(2)
    v0 = torch.randint(-1, 2, (4, 1, 8, 8)).float()
    m0 = torch.zeros(4, 1, 8, 8)
    method.uap_sign, method.momentum = v0.clone(), m0.clone()
    method._ensure_head(256, 10, "cpu")
    head = copy.deepcopy(method.head)
    head_opt = torch.optim.Adam(head.parameters(), lr=1e-3)

    torch.manual_seed(3)
    x_adv = method.attack(net, x, y, BatchState(idx=None, epoch=1))
    loss = method.training_loss(net, x_adv, y, x, BatchState(idx=None, epoch=1))[0]

    torch.manual_seed(3)
    x_start = (x + (torch.rand_like(x) * 2 - 1) * EPS).clamp(0, 1)
    features = net[:-1](x_start).detach()  # the input of the last nn.Linear
    z = head[0](features)
    slot = z.argmax(1)
    F.cross_entropy(head[2](head[1](z)), y).backward()
    head_opt.step()
    want_adv, want_loss, v1, m1 = uap_hand(net, x, y, slot, v0, m0, x_start=x_start)
    assert torch.allclose(x_adv, want_adv, atol=1e-6) and torch.allclose(loss, want_loss, atol=1e-6)
    assert torch.allclose(method.momentum, m1, atol=1e-7) and torch.equal(method.uap_sign, v1)
    for a, b in zip(method.head.parameters(), head.parameters()):
        assert torch.allclose(a, b, atol=1e-7)


def test_fuap_needs_a_linear_layer():
    net = nn.Sequential(nn.Conv2d(1, 10, 8), nn.Flatten())
    x, y = batch()
    with pytest.raises(ValueError, match="last nn.Linear"):
        atas.method("fgsm_fuap", EPS).perturb(net, x, y)


# ---------------------------------------------------------------- every one of them
def train_steps(method, net, opt, data, steps, epoch_at=None):
    out = []
    for step in range(steps):
        if epoch_at is not None and step == epoch_at:
            method.start_epoch()
        x, y, idx = data[step % len(data)]
        x_adv = method.perturb(net, x, y, idx)
        loss = method.loss(net, x_adv, y, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        out += [x_adv, loss.detach()]
    return out


@pytest.mark.parametrize("name", BATCH3)
def test_state_dict_mid_run_continues_bit_identically(name):
    n = 2 * B
    x, y = batch(n, seed=4)
    data = [(x[:B], y[:B], torch.arange(B)), (x[B:], y[B:], torch.arange(B, n))]
    net = tiny_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    method = atas.method(name, EPS, num_samples=n)
    train_steps(method, net, opt, data, 3)
    buf = io.BytesIO()
    torch.save({"method": method.state_dict(), "net": net.state_dict(), "opt": opt.state_dict()}, buf)
    rng = torch.get_rng_state()
    expected = train_steps(method, net, opt, data, 4, epoch_at=1)

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    net2 = tiny_net(seed=9)
    net2.load_state_dict(saved["net"])
    opt2 = torch.optim.SGD(net2.parameters(), lr=0.1)
    opt2.load_state_dict(saved["opt"])
    resumed = atas.method(name, EPS, num_samples=n)
    resumed.load_state_dict(saved["method"])
    torch.set_rng_state(rng)
    got = train_steps(resumed, net2, opt2, data, 4, epoch_at=1)
    for a, b in zip(expected, got):
        assert torch.equal(a, b)
    final_a, final_b = method.state_dict(), resumed.state_dict()
    assert sorted(final_a["method"]) == sorted(final_b["method"])
    for key, value in final_a["method"].items():
        assert torch.equal(value, final_b["method"][key]), key
    if method.uses_store:
        assert torch.equal(method.store.delta, resumed.store.delta)
    elif name != "fgsm_pco":
        assert final_a["method"]["uap_sign"].abs().max() == 1


@pytest.mark.parametrize(
    "name, option, value",
    [
        ("fgsm_pco", "lam", -1.0),
        ("fgsm_pco", "beta", 0.0),
        ("fgsm_pco", "alpha_factor", 0.0),
        ("fgsm_pco", "ls_factor", 1.5),
        ("fgsm_pco", "delta_init", "normal"),
        ("fgsm_pco", "bn_mode", "test"),
        ("fgsm_uap", "lam", -0.5),
        ("fgsm_uap", "momentum_decay", 1.5),
        ("fgsm_cuap", "uap_factor", 0.0),
        ("fgsm_cuap", "step_factor", -1.0),
        ("fgsm_uap", "bn_mode", "x"),
        ("fgsm_fuap", "num_uaps", 0),
        ("fgsm_fuap", "num_uaps", -3),
        ("fgsm_fuap", "head_lr", 0.0),
        ("fgsm_fuap", "label_smoothing", 1.0),
    ],
)
def test_check_options_rejects_bad_values(name, option, value):
    with pytest.raises(ConfigError, match=f"method.{option}"):
        get_method(name)(EPS, **{option: value})


@pytest.mark.parametrize("name, lam_zero", [("fgsm_pco", (2, 3)), ("fgsm_uap", (2, 2)), ("fgsm_fuap", (3, 2))])
def test_passes_per_step_follow_the_regulariser(name, lam_zero):
    cls = get_method(name)
    assert cls(EPS).passes_per_step() == cls.passes
    assert cls(EPS, lam=0.0).passes_per_step() == lam_zero


def test_remedies_are_valid_option_changes():
    assert FGSMPCO(EPS).remedy(1) == {}
    for cls in (FGSMUAP, FGSMCUAP, FGSMFUAP):
        m = cls(EPS)
        m.set_options(**m.remedy(1))
        assert m.opt.lam == 20.0


def test_ranks_share_the_universal_perturbations_under_ddp(tmp_path):
    """Two gloo ranks training fgsm_fuap: the broadcast initial draw and the all-reduced updates
    leave every rank with the same perturbations, momentum and selection head (~20 s)."""
    from atas.checkpoint import load_checkpoint
    from tests.helpers import FMNIST
    from tests.test_ddp import WORLD, _torchrun

    if not (FMNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST not found in {FMNIST}")
    run_dir = tmp_path / "run"
    _torchrun(
        "fmnist",
        "model.arch=wong_cnn",
        "data.subset=256",
        f"data.data_dir={FMNIST}",
        "train.device=cpu",
        "train.batch_size=32",
        "train.epochs=1",
        "train.progress=false",
        "train.probe_size=32",
        "train.co_action=keep_best",
        "eval.at_end=false",
        "method.name=fgsm_fuap",
        "method.num_uaps=5",
        "--run-dir",
        str(run_dir),
    )
    states = [load_checkpoint(run_dir / f"checkpoint-rank{r}-of{WORLD}.pt")["method"]["method"] for r in range(WORLD)]
    assert {"uap_sign", "momentum", "head.0.weight", "adam.0.exp_avg"} <= set(states[0])
    assert (states[0]["momentum"] != 0).any()  # updated by the run, not only drawn
    for key, value in states[0].items():
        assert torch.allclose(value, states[1][key], atol=1e-6), key
