"""GAT, NuAT, SSAT and LIET: each step against a hand computation of its paper's formula on a tiny
model, their schedules, bit-exact continuation from a saved state, and option checks."""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from atas.config import ConfigError, load_config
from atas.methods import BatchState, get_method
from atas.methods.gat import GAT
from atas.methods.liet import LIET, js_divergence, random_smoothed_ce
from atas.methods.nuat import NuAT
from atas.methods.ssat import SSAT, first_fooling_checkpoint

EPS = 8 / 255
B = 16
BATCH2 = ["gat", "nuat", "ssat", "liet"]


def tiny_net(seed=0, bn=False):
    torch.manual_seed(seed)
    layers = (
        [nn.Conv2d(1, 4, 3, padding=1)]
        + ([nn.BatchNorm2d(4)] if bn else [])
        + [nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)]
    )
    return nn.Sequential(*layers)


def sharp_net(seed=0):
    """tiny_net with 10x larger logits: peaked softmax outputs, whose differences have gradients
    large enough to change signs of the attack's step."""
    model = tiny_net(seed)
    with torch.no_grad():
        model[-1].weight.mul_(10)
    return model


def batch(n=B, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def state(epoch=1, n=B):
    return BatchState(idx=torch.arange(n), epoch=epoch)


def project(x_adv, x, eps):
    return torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp(0, 1)


def input_gradient(objective, x0):
    """grad_x objective(x) at x0."""
    x_in = x0.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(objective(x_in), [x_in])
    return grad


# ---------------------------------------------------------------- every method
@pytest.mark.parametrize("name", BATCH2)
def test_registered_exported_and_every_option_checked(name):
    import atas

    cls = get_method(name)
    assert getattr(atas, cls.__name__) is cls and cls.__name__ in atas.__all__
    cfg = load_config("fmnist", [f"method.name={name}"])
    assert sorted(cfg.method.args) == sorted(f.name for f in dataclasses.fields(cls.Options))
    assert cls.cost and len(cls.passes) == 2


BAD_OPTIONS = [
    ("gat", "lam", -1.0),
    ("gat", "lam", float("inf")),
    ("gat", "lam_boost", 0.0),
    ("gat", "lam_boost_at", 1.0),
    ("gat", "init_factor", 1.5),
    ("gat", "step_factor", 0.0),
    ("gat", "bn_mode", "test"),
    ("nuat", "lam", -0.1),
    ("nuat", "lam_ramp", 1.5),
    ("nuat", "init_factor", -0.5),
    ("nuat", "step_factor", 3.0),
    ("nuat", "bn_mode", "x"),
    ("ssat", "alpha_factor", 0.0),
    ("ssat", "c", 1),
    ("ssat", "c", 2.5),
    ("ssat", "bn_mode", "x"),
    ("liet", "lam", -1.0),
    ("liet", "lam_ramp", -0.1),
    ("liet", "min_mask_ratio", 0.6),
    ("liet", "max_mask_ratio", 1.5),
    ("liet", "noise_factor", -1.0),
    ("liet", "li_every", 0),
    ("liet", "label_smoothing", 0.4),
    ("liet", "ls", 1.0),
]


@pytest.mark.parametrize("name, option, value", BAD_OPTIONS)
def test_check_options_rejects_bad_values_naming_the_option(name, option, value):
    cls = get_method(name)
    with pytest.raises(ConfigError, match=f"method.{option}"):
        cls(EPS, cls.Options(**{option: value}))  # as the config's validation runs it


@pytest.mark.parametrize("name", BATCH2)
def test_step_stays_in_the_ball_and_trains(name):
    model, (x, y) = tiny_net(bn=True), batch()
    method = get_method(name)(EPS, epochs=4)
    for epoch in (1, 3):
        method.start_epoch(epoch)
        for _ in range(2):
            x_adv = method.perturb(model, x, y, torch.arange(B))
            assert (x_adv - x).abs().max() <= EPS + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
            loss = method.loss(model, x_adv, y, x)
            assert torch.isfinite(loss)
            loss.backward()
    assert model.training, "the model's mode is restored after the attack"


# ---------------------------------------------------------------- GAT
def test_gat_step_and_loss_match_the_formula():
    model, (x, y) = sharp_net(), batch()
    eps, lam = 0.1, 50.0  # so that the guided step differs visibly from the plain one
    method = GAT(eps, lam=lam, lam_boost_at=None)
    p_clean = F.softmax(model(x), 1).detach()
    for t in (0, 1):  # t = 0: cross-entropy only; t = 1: with the relaxation term
        torch.manual_seed(10 + t)
        x_adv = method.attack(model, x, y, state())
        torch.manual_seed(10 + t)
        x0 = (x + 0.5 * eps * torch.sign(0.5 - torch.rand_like(x))).clamp(0, 1)

        def objective(z, t=t):
            logits = model(z)
            relax = ((p_clean - F.softmax(logits, 1)) ** 2).sum(1).mean()
            return F.cross_entropy(logits, y) + t * lam * relax

        grad = input_gradient(objective, x0)
        torch.testing.assert_close(x_adv, project(x0 + eps * grad.sign(), x, eps))
        plain = project(x0 + eps * input_gradient(lambda z: F.cross_entropy(model(z), y), x0).sign(), x, eps)
        assert torch.equal(x_adv, plain) == (t == 0)
        loss, logits = method.training_loss(model, x_adv, y, x, state())
        q_adv = F.softmax(model(x_adv), 1)
        expected = F.cross_entropy(model(x), y) + lam * ((F.softmax(model(x), 1) - q_adv) ** 2).sum(1).mean()
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
        torch.testing.assert_close(logits, model(x_adv))
    # the loss reaches the parameters through the clean forward kept by the attack
    method.attack(model, x, y, state())
    loss, _ = method.training_loss(model, x_adv, y, x, state())
    assert torch.autograd.grad(loss, [model[0].weight])[0].abs().sum() > 0


def test_gat_lambda_boost_by_fraction_of_the_run_and_alternation_option():
    method = GAT(EPS, epochs=100)
    assert [method.lam_at(e) for e in (1, 86, 87, 100)] == [
        10.0,
        10.0,
        40.0,
        40.0,
    ]  # official: x4 after epoch 85 (0-based)
    assert GAT(EPS, epochs=10).lam_at(10) == 40.0 and GAT(EPS, epochs=10).lam_at(9) == 10.0
    assert GAT(EPS).lam_at(1000) == 10.0  # unknown run length: no boost
    model, (x, y) = sharp_net(), batch()
    every = GAT(EPS, lam=50.0, alternate=False)
    torch.manual_seed(3)
    guided = every.attack(model, x, y, state())  # t = 0, guided without alternation
    alternating = GAT(EPS, lam=50.0)
    torch.manual_seed(3)
    assert not torch.equal(guided, alternating.attack(model, x, y, state()))


# ---------------------------------------------------------------- NuAT
def test_nuat_step_and_loss_match_the_formula():
    model, (x, y) = tiny_net(), batch()
    lam = 4.5
    method = NuAT(EPS)  # epochs unknown: lam from the start
    logits_clean = model(x).detach()

    def nuclear(a, b):
        return torch.linalg.svdvals(a - b).sum() / len(a)

    for t in (0, 1):
        torch.manual_seed(20 + t)
        x_adv = method.attack(model, x, y, state())
        torch.manual_seed(20 + t)
        x0 = (x + 0.5 * EPS * torch.sign(0.5 - torch.rand_like(x))).clamp(0, 1)
        grad = input_gradient(
            lambda z, t=t: F.cross_entropy(model(z), y) + t * lam * nuclear(model(z), logits_clean), x0
        )
        torch.testing.assert_close(x_adv, project(x0 + EPS * grad.sign(), x, EPS))
        loss, _ = method.training_loss(model, x_adv, y, x, state())
        expected = F.cross_entropy(model(x), y) + lam * nuclear(model(x_adv), model(x))
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # the term couples the batch: scaling one sample's logit change changes the norm sub-additively
    a = torch.randn(8, 10)
    assert nuclear(a, torch.zeros_like(a)) < a.norm(dim=1).sum() / 8


def test_nuat_lambda_ramps_linearly_over_the_run():
    method = NuAT(EPS, epochs=100)
    assert method.lam_at(1) == 0.0 and method.lam_at(91) == pytest.approx(4.5) and method.lam_at(100) == 4.5
    assert method.lam_at(46) == pytest.approx(4.5 * 45 / 90)  # official: += 4.5 / 90 after each epoch
    bench = NuAT(EPS, epochs=100, lam=4.0, lam_ramp=1.0)  # the FastAT benchmark's schedule
    assert bench.lam_at(100) == pytest.approx(3.96)
    assert NuAT(EPS, epochs=10, lam_ramp=0.0).lam_at(1) == 4.5
    # while lam_e = 0 the loss is the clean cross-entropy alone
    model, (x, y) = tiny_net(), batch()
    x_adv = method.attack(model, x, y, state(epoch=1))
    loss, _ = method.training_loss(model, x_adv, y, x, state(epoch=1))
    assert loss.item() == pytest.approx(F.cross_entropy(model(x), y).item(), rel=1e-6)


# ---------------------------------------------------------------- SSAT
def test_first_fooling_checkpoint_by_hand():
    wrong = torch.tensor(
        [
            [True, False, False, True],  # k = 1
            [False, True, False, True],
        ]
    )  # k = 2 (c = 3)
    correct = torch.tensor([True, True, True, False])
    assert first_fooling_checkpoint(correct, wrong).tolist() == [1, 2, 3, 0]


def test_ssat_step_matches_the_per_sample_rule():
    model, (x, y) = tiny_net(), batch(64)
    eps, c = 0.3, 3  # a radius where the checkpoints disagree
    method = SSAT(eps, c=c)
    torch.manual_seed(5)
    x_adv = method.attack(model, x, y, state(n=64))
    torch.manual_seed(5)
    x0 = (x + (torch.rand_like(x) * 2 - 1) * eps).clamp(0, 1)
    grad = input_gradient(lambda z: F.cross_entropy(model(z), y, reduction="sum"), x0)
    x_fgsm = project(x0 + 1.25 * eps * grad.sign(), x, eps)
    delta = x_fgsm - x
    start_right = model(x0).argmax(1) == y
    chosen = []
    for i in range(len(x)):  # the rule, one sample at a time
        if not start_right[i]:
            k, expected = 0, x[i]
        else:
            k, expected = c, x_fgsm[i]
            for j in range(1, c):
                point = x[i] + j * (delta[i] / c)
                if model(point[None]).argmax(1).item() != y[i].item():
                    k, expected = j, point
                    break
        chosen.append(k)
        torch.testing.assert_close(x_adv[i], expected, rtol=0, atol=0)
    assert len(set(chosen)) >= 3, f"the test needs a mix of outcomes, got {chosen}"
    torch.testing.assert_close(method.stats["delta"], (x_adv - x).abs().flatten(1).amax(1))
    loss, _ = method.training_loss(model, x_adv, y, x, state(n=64))
    assert loss.item() == pytest.approx(F.cross_entropy(model(x_adv), y).item(), rel=1e-6)


def test_ssat_cost_follows_c():
    assert SSAT(EPS).passes_per_step() == (4.0, 2.0) and SSAT(EPS, c=5).passes_per_step() == (6.0, 2.0)


# ---------------------------------------------------------------- LIET
def test_random_smoothed_ce_and_js_by_hand():
    logits, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0])
    torch.manual_seed(0)
    got = random_smoothed_ce(logits, y, 0.6)
    torch.manual_seed(0)
    w = torch.rand(6, 5)
    w[torch.arange(6), y] = 0
    targets = 0.6 * w / w.sum(1, keepdim=True)
    targets[torch.arange(6), y] = 0.4
    assert torch.allclose(targets.sum(1), torch.ones(6))
    assert got.item() == pytest.approx(-(targets * logits.log_softmax(1)).sum(1).mean().item(), rel=1e-6)
    assert random_smoothed_ce(logits, y, 0.0).item() == pytest.approx(F.cross_entropy(logits, y).item())
    even = F.cross_entropy(logits, y, label_smoothing=0.6 * 5 / 4)  # torch's s = ls K / (K - 1)
    assert random_smoothed_ce(logits, y, 0.6, random=False).item() == pytest.approx(even.item(), rel=1e-6)
    # train.label_smoothing does not reach LIET (its own smoothing), but does reach GAT
    assert load_config("fmnist", ["method.name=liet", "train.label_smoothing=0.4"]).method.args["ls"] == 0.6
    assert load_config("fmnist", ["method.name=liet", "train.label_smoothing=0.4"]).method.args["label_smoothing"] == 0
    assert load_config("fmnist", ["method.name=gat", "train.label_smoothing=0.4"]).method.args["label_smoothing"] == 0.4
    a, b = torch.randn(4, 5), torch.randn(4, 5)
    p, q = a.softmax(1), b.softmax(1)
    m = (p + q) / 2
    js = ((p * (p / m).log()).sum(1) + (q * (q / m).log()).sum(1)).mean() / 2
    assert js_divergence(a, b).item() == pytest.approx(js.item(), rel=1e-5)
    assert js_divergence(a, a).abs().item() < 1e-6


@pytest.mark.parametrize("mask", [0.0, 1.0])
def test_liet_step_and_loss_match_the_formula(mask):
    model, (x, y) = tiny_net(), batch()
    lam = 3.0
    method = LIET(EPS, lam=lam, ls=0.0, random_smoothing=False, min_mask_ratio=mask, max_mask_ratio=mask)
    torch.manual_seed(7)
    x_adv = method.attack(model, x, y, state())
    # the label-indicative perturbations: eps * sign of each class's gradient at the gray image
    gray = torch.full((10, 1, 8, 8), 0.5)
    li = EPS * input_gradient(lambda z: F.cross_entropy(model(z), torch.arange(10)), gray).sign()
    torch.testing.assert_close(method.li_sign * EPS, li)
    torch.manual_seed(7)
    torch.rand(())  # the mask ratio's draw (fixed here)
    noise = (torch.rand_like(x) * 2 - 1) * EPS
    replaced = torch.rand_like(x) < mask
    sign = -1.0 if torch.rand(()) < 0.5 else 1.0
    delta = torch.where(replaced, noise, li[y])
    assert bool(replaced.all()) == (mask == 1.0) and bool(replaced.any()) == (mask != 0.0)
    x0 = (x + sign * delta).clamp(0, 1)
    grad = input_gradient(lambda z: F.cross_entropy(model(z), y), x0)
    torch.testing.assert_close(x_adv, project(x0 + EPS * grad.sign(), x, EPS))
    loss, logits = method.training_loss(model, x_adv, y, x, state())
    torch.testing.assert_close(logits, model(x_adv))
    p, q = model(x0).softmax(1), model(x_adv).softmax(1)
    m = (p + q) / 2
    js = ((p * (p / m).log()).sum(1) + (q * (q / m).log()).sum(1)).mean() / 2
    expected = F.cross_entropy(model(x_adv), y) + lam * js
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_liet_schedule_large_eps_switch_and_li_refresh():
    method = LIET(EPS, epochs=100)
    assert method.lam_at(1) == pytest.approx(1.0) and method.lam_at(100) == 100.0  # official: lambda * (e / epochs)
    assert LIET(EPS).lam_at(1) == 100.0
    model, (x, y) = tiny_net(), batch()
    big = LIET(16 / 255)  # above 8/255: noise 2 eps and no projection
    for _ in range(3):
        x_adv = big.attack(model, x, y, state())
    assert (x_adv - x).abs().max() > 16 / 255 + 1e-6
    assert (x_adv - x).abs().max() <= 3 * 16 / 255 + 1e-6
    method = LIET(EPS, li_every=2)
    calls = []
    method.refresh_li = lambda model, x, orig=method.refresh_li: (calls.append(method.step_in_epoch), orig(model, x))
    for _ in range(5):
        method.attack(model, x, y, state())
    assert calls == [0, 2, 4]


# ---------------------------------------------------------------- resume: bit-exact
def run_steps(method, model, opt, batches, epoch_at):
    """Train on `batches`; epoch_at[i] starts a new epoch before batch i. Returns the x_adv's."""
    out = []
    for i, (x, y) in enumerate(batches):
        if i in epoch_at:
            method.start_epoch(epoch_at[i])
        x_adv = method.perturb(model, x, y, torch.arange(len(x)))
        loss = method.loss(model, x_adv, y, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(x_adv)
    return out


@pytest.mark.parametrize(
    "name, options", [("gat", {"lam_boost_at": 0.5}), ("nuat", {}), ("liet", {"li_every": 2}), ("ssat", {})]
)
def test_state_dict_mid_epoch_continues_bit_exactly(name, options):
    cls = get_method(name)
    batches = [batch(seed=s) for s in range(7)]
    model = tiny_net(bn=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    method = cls(EPS, epochs=3, **options)
    torch.manual_seed(0)
    run_steps(method, model, opt, batches[:3], {0: 1})  # epoch 1, three batches (odd counter)
    buffer = io.BytesIO()
    torch.save({"method": method.state_dict(), "model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    rng = torch.get_rng_state()
    expected = run_steps(method, model, opt, batches[3:], {2: 2})

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model2 = tiny_net(seed=1, bn=True)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    resumed = cls(EPS, epochs=3, **options)
    resumed.load_state_dict(saved["method"])
    torch.set_rng_state(rng)
    got = run_steps(resumed, model2, opt2, batches[3:], {2: 2})
    for a, b in zip(expected, got):
        assert torch.equal(a, b)
    for (key, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), key
    assert resumed.method_state().keys() == method.method_state().keys()


def test_carried_state_is_what_a_fresh_object_lacks():
    model, (x, y) = tiny_net(), batch()
    method = LIET(EPS)
    method.perturb(model, x, y)
    assert method.method_state()["step_in_epoch"] == 1 and method.method_state()["li_sign"].shape == (10, 1, 8, 8)
    gat = GAT(EPS)
    gat.perturb(model, x, y)
    assert gat.method_state() == {"step_in_epoch": 1}
    gat.start_epoch()
    assert gat.method_state() == {"step_in_epoch": 0}  # the alternation restarts every epoch


# ---------------------------------------------------------------- search and remedies
def test_search_only_for_liet_and_remedies_are_valid_options():
    assert get_method("liet").search == {"lam": (20.0, 100.0, 200.0)}
    for name in ("gat", "nuat", "ssat"):
        assert get_method(name).search == {}
    assert GAT(EPS).remedy(1) == {"lam": 20.0} and NuAT(EPS).remedy(1) == {"lam": 9.0}
    assert GAT(EPS, lam=30.0).remedy(1) == {"lam": 40.0} and GAT(EPS, lam=40.0).remedy(2) == {}  # capped at 4x
    assert NuAT(EPS, lam=18.0).remedy(3) == {}
    liet = LIET(EPS)
    change = liet.remedy(1)
    liet.set_options(**change)
    assert (liet.opt.min_mask_ratio, liet.opt.max_mask_ratio, liet.opt.noise_factor) == (0.0, 1.0, 2.0)
    assert liet.remedy(2) == {} and SSAT(EPS).remedy(1) == {}


# ---------------------------------------------------------------- end to end
