"""The peer methods N-FGSM, GradAlign, FGSM-PGI (MEP) and Free-AT: invariants on tiny CPU models,
then one short end-to-end run of each on a Fashion-MNIST subset."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn as nn

from atas.augment import PairedAugment
from atas.config import ConfigError, load_config
from atas.methods import BatchState, get_method, list_methods
from atas.methods.fgsm_pgi import FGSMPGI
from atas.methods.free import Free
from atas.methods.grad_align import GradAlign, grad_align_lam_schedule, gradient_misalignment
from atas.methods.n_fgsm import NFGSM
from atas.store import PerSampleStore
from tests.helpers import needs_fmnist

EPS = 8 / 255
B = 16
NEW_METHODS = ["n_fgsm", "grad_align", "fgsm_pgi", "free"]


def tiny_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))


def batch(n=B, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def state(n=B, epoch=1):
    return BatchState(idx=torch.arange(n), epoch=epoch)


def linf(a, b):
    return (a - b).abs().flatten(1).amax(1)


# ---------------------------------------------------------------- every method
@pytest.mark.parametrize("name", NEW_METHODS)
def test_perturb_shape_range_and_registry(name):
    model, (x, y) = tiny_net(), batch()
    method = get_method(name)(EPS)
    st = state()
    if method.uses_store:
        store = PerSampleStore(B, (1, 8, 8), EPS)
        identity = PairedAugment(8, flip=False).sample(B, "cpu")
        st = BatchState(idx=torch.arange(B), epoch=1, store=store, prior=store.gather_delta(st.idx, identity))
    x_adv = method.attack(model, x, y, st)
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    loss, logits = method.training_loss(model, x_adv, y, x, st)
    assert logits.shape == (B, 10) and torch.isfinite(loss)


@pytest.mark.parametrize("name", NEW_METHODS)
def test_unknown_option_rejected_listing_valid_ones(name):
    cfg = load_config("fmnist", [f"method.name={name}"])  # as `atas train fmnist method.name=...`
    valid = sorted(cfg.method.args)  # validation filled in every default
    assert valid == sorted(f.name for f in dataclasses.fields(get_method(name).Options))
    with pytest.raises(ConfigError, match="method.no_such_option") as err:
        load_config("fmnist", [f"method.name={name}", "method.no_such_option=1"])
    assert ", ".join(valid) in str(err.value)


# ---------------------------------------------------------------- N-FGSM
def test_n_fgsm_bound_and_no_projection_by_default():
    model, (x, y) = tiny_net(), batch(64)
    method = NFGSM(EPS)
    assert (method.opt.noise_factor, method.opt.step_factor, method.opt.clip_delta) == (2.0, 1.0, None)
    dist = linf(method.attack(model, x, y, state(64)), x)
    assert (dist <= (2.0 + 1.0) * EPS + 1e-6).all()
    assert (dist > EPS + 1e-6).any(), "the default must not project back to the eps ball"


def test_n_fgsm_clip_delta_projects():
    model, (x, y) = tiny_net(), batch(64)
    options = NFGSM.Options(clip_delta=1.0)
    dist = linf(NFGSM(EPS, options).attack(model, x, y, state(64)), x)
    assert (dist <= EPS + 1e-6).all()
    with pytest.raises(ConfigError):
        NFGSM(EPS, NFGSM.Options(clip_delta=-1.0))


def test_n_fgsm_eps_ramp_scales_noise_step_and_clip():
    model, (x, y) = tiny_net(), batch(64)
    reach = {}
    for epoch in (1, 2, 3, 4):
        method = NFGSM(EPS, NFGSM.Options(eps_ramp_epochs=4))
        reach[epoch] = float(linf(method.attack(model, x, y, state(64, epoch)), x).max())
        assert reach[epoch] <= 3.0 * EPS * epoch / 4 + 1e-6  # noise 2 eps + step eps, both ramped
    assert reach[1] < reach[2] < reach[3] < reach[4]
    assert reach[4] > 2.0 * EPS  # the full N-FGSM reach after the ramp
    clipped = NFGSM(EPS, NFGSM.Options(eps_ramp_epochs=2, clip_delta=1.0))
    assert (linf(clipped.attack(model, x, y, state(64, 1)), x) <= EPS / 2 + 1e-6).all()
    with pytest.raises(ConfigError, match="eps_ramp_epochs"):
        NFGSM(EPS, NFGSM.Options(eps_ramp_epochs=-1))


@pytest.mark.parametrize("name", ["grad_align", "fgsm_pgi"])
def test_eps_ramp_bounds_the_step_of_the_ball_methods(name):
    cls = get_method(name)
    model, (x, y) = tiny_net(), batch(64)
    for epoch, radius in ((1, EPS / 4), (2, EPS / 2), (4, EPS), (9, EPS)):
        method = cls(EPS, cls.Options(eps_ramp_epochs=4, lam=0.0))
        st = state(64, epoch)
        if method.uses_store:
            store = PerSampleStore(64, (1, 8, 8), EPS)
            identity = PairedAugment(8, flip=False).sample(64, "cpu")
            st = BatchState(idx=torch.arange(64), epoch=epoch, store=store, prior=store.gather_delta(st.idx, identity))
        reach = linf(method.attack(model, x, y, st), x)
        assert (reach <= radius + 1e-6).all() and reach.max() > 0.9 * radius, (epoch, float(reach.max()))
        if method.uses_store:
            assert linf(method.new_prior(None, x) + x, x).max() <= radius + 1e-6
    with pytest.raises(ConfigError, match="eps_ramp_epochs"):
        cls(EPS, cls.Options(eps_ramp_epochs=-1))


# ---------------------------------------------------------------- GradAlign
def test_grad_align_lambda_schedule_matches_paper():
    assert grad_align_lam_schedule(8 / 255) == pytest.approx(0.2)
    assert grad_align_lam_schedule(16 / 255) == pytest.approx(2.0)
    # the rounded values of the official script (sh/exps_diff_eps_cifar10.sh)
    for e, lam in [(1, 0.027), (4, 0.063), (12, 0.632), (15, 1.5)]:
        assert grad_align_lam_schedule(e / 255) == pytest.approx(lam, abs=6e-4)
    assert GradAlign(8 / 255).lam == pytest.approx(0.2)
    with pytest.warns(UserWarning, match="method.lam"):
        assert GradAlign(0.2).lam == pytest.approx(2.0)  # held at its 16/255 value, with a warning
    assert GradAlign(0.2, GradAlign.Options(lam=0.5)).lam == 0.5


def test_grad_align_regulariser_zero_for_parallel_gradients():
    # Two classes, linear logits [w.x, 0]: grad_x CE = (sigmoid(w.x) - [y == 0]) * w, always along
    # w with a sign fixed by y, so the gradients at x and x + eta are parallel: cos = 1.
    torch.manual_seed(0)
    lin = nn.Linear(64, 1)
    model = nn.Sequential(nn.Flatten(), lin, nn.ConstantPad1d((0, 1), 0.0))
    x, _ = batch()
    y = torch.randint(0, 2, (B,))
    method = GradAlign(EPS, GradAlign.Options(lam=1.0))
    method.attack(model, x, y, state())
    assert method._reg.abs().item() < 1e-6


def test_grad_align_regulariser_positive_and_reaches_parameters():
    model, (x, y) = tiny_net(), batch()
    method = GradAlign(EPS, GradAlign.Options(lam=1.0))
    x_adv = method.attack(model, x, y, state())
    reg = method._reg
    assert reg.item() > 0
    grads = torch.autograd.grad(reg, list(model.parameters()), retain_graph=True)
    assert all(torch.isfinite(g).all() for g in grads)
    assert grads[0].abs().sum() > 0, "double backprop must reach the first layer"
    loss, _ = method.training_loss(model, x_adv, y, x, state())
    ce = nn.functional.cross_entropy(model(x_adv), y)
    assert loss.item() == pytest.approx(ce.item() + reg.item(), rel=1e-5)
    # the official variant detaches the attack's gradient and still trains through the noisy one
    method = GradAlign(EPS, GradAlign.Options(lam=1.0, backprop_clean_grad=False))
    method.attack(model, x, y, state())
    assert torch.autograd.grad(method._reg, [model[0].weight])[0].abs().sum() > 0


def test_grad_align_default_attack_is_fgsm_from_x():
    model, (x, y) = tiny_net(), batch()
    x_adv = GradAlign(EPS, GradAlign.Options(lam=0.0)).attack(model, x, y, state())
    x_in = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(nn.functional.cross_entropy(model(x_in), y, reduction="sum"), [x_in])
    expected = torch.minimum(torch.maximum(x + EPS * grad.sign(), x - EPS), x + EPS).clamp(0, 1)
    torch.testing.assert_close(x_adv, expected)


def test_gradient_misalignment_ignores_zero_gradients_and_stays_finite():
    a = torch.randn(4, 3, requires_grad=True)
    b = torch.randn(4, 3)
    with torch.no_grad():
        a[0] = 0
    value = gradient_misalignment(a, b)
    value.backward()
    assert torch.isfinite(a.grad).all() and a.grad[0].abs().sum() == 0
    cos = nn.functional.cosine_similarity(a[1:].detach(), b[1:], dim=1)
    assert value.item() == pytest.approx((1 - cos).mean().item(), rel=1e-5)
    assert gradient_misalignment(torch.zeros(2, 3), torch.ones(2, 3)).item() == 0


# ---------------------------------------------------------------- FGSM-PGI (MEP)
def first_input(model, fn):
    """Run fn() and return the input of the model's first forward call."""
    seen = []
    handle = model.register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].detach().clone()))
    try:
        fn()
    finally:
        handle.remove()
    return seen[0]


def pgi_state(store, idx, epoch):
    cf = PairedAugment(8, flip=False).sample(len(idx), "cpu")  # identity crop
    return cf, BatchState(idx=idx, epoch=epoch, store=store, prior=store.gather_delta(idx, cf))


def test_fgsm_pgi_defaults_follow_official_script():
    o = FGSMPGI.Options()
    assert (o.lam, o.momentum_decay, o.alpha_factor, o.ls_factor, o.reset_every) == (10.0, 0.3, 1.0, 0.6, 40)
    assert FGSMPGI.uses_store


def test_fgsm_pgi_prior_read_written_and_momentum_carried():
    model, (x, y) = tiny_net(), batch()
    store = PerSampleStore(B, (1, 8, 8), EPS)
    method = FGSMPGI(EPS, FGSMPGI.Options(reset_every=0))
    idx = torch.arange(B)
    method.on_epoch_start(1, store)

    cf, st = pgi_state(store, idx, epoch=1)
    x_adv = method.attack(model, x, y, st)
    assert (linf(x_adv, x) <= EPS + 1e-6).all()
    first = method.new_prior(x_adv, x)
    assert first.abs().max() <= EPS + 1e-6
    store.scatter_delta(idx, cf, first)
    momentum_after_1 = method.momentum.clone()
    assert momentum_after_1.abs().sum() > 0

    # epoch 2: the prior read is what epoch 1 wrote, and x_init = x + that prior
    method.on_epoch_start(2, store)
    cf, st = pgi_state(store, idx, epoch=2)
    torch.testing.assert_close(st.prior, first)
    x_init = first_input(model, lambda: method.attack(model, x, y, st))
    torch.testing.assert_close(x_init, (x + first).clamp(0, 1))
    # momentum: normalised new gradient + 0.3 * the old one
    new_part = method.momentum - 0.3 * momentum_after_1
    assert new_part.abs().sum().item() == pytest.approx(1.0, rel=1e-4)  # ||g||_1-normalised


def test_fgsm_pgi_first_epoch_starts_on_corners_and_resets():
    model, (x, y) = tiny_net(), batch()
    x = x * 0.5 + 0.25  # away from the image border, so no clipping hides the corners
    store = PerSampleStore(B, (1, 8, 8), EPS)
    method = FGSMPGI(EPS, FGSMPGI.Options(reset_every=2))
    method.on_epoch_start(1, store)
    st = pgi_state(store, torch.arange(B), epoch=1)[1]
    x_init = first_input(model, lambda: method.attack(model, x, y, st))
    torch.testing.assert_close((x_init - x).abs(), torch.full_like(x, EPS))
    before = store.delta.clone()
    method.on_epoch_start(2, store)
    assert torch.equal(store.delta, before)  # not a reset epoch
    method.on_epoch_start(3, store)
    assert not torch.equal(store.delta, before)  # epoch 3 = 1 + 2: redrawn
    assert method.momentum.abs().sum() == 0


def test_fgsm_pgi_regulariser_term_present():
    model, (x, y) = tiny_net(), batch()
    store = PerSampleStore(B, (1, 8, 8), EPS)
    method = FGSMPGI(EPS)
    _, st = pgi_state(store, torch.arange(B), epoch=1)
    x_adv = method.attack(model, x, y, st)
    x_init = (x + (EPS * st.prior.sign()).clamp(-EPS, EPS)).clamp(0, 1)
    loss, logits = method.training_loss(model, x_adv, y, x, st)
    ce = nn.functional.cross_entropy(logits, y, label_smoothing=0.4 * 10 / 9)
    reg = nn.functional.mse_loss(logits, model(x_init))
    assert reg.item() > 0 and method.stats["reg"].item() == pytest.approx(reg.item(), rel=1e-5)
    assert loss.item() == pytest.approx(ce.item() + 10.0 * reg.item(), rel=1e-5)
    loss.backward()  # through both the adversarial and the prior-initialised forward
    assert model[0].weight.grad.abs().sum() > 0


def test_fgsm_ep_keeps_no_momentum_and_stores_the_perturbation():
    model, (x, y) = tiny_net(), batch()
    store = PerSampleStore(B, (1, 8, 8), EPS)
    method = FGSMPGI(EPS, FGSMPGI.Options(momentum_decay=0.0))
    _, st = pgi_state(store, torch.arange(B), epoch=1)
    x_adv = method.attack(model, x, y, st)
    torch.testing.assert_close(method.new_prior(x_adv, x), x_adv - x)
    assert method.momentum is None


# ---------------------------------------------------------------- Free-AT
def free_step(method, model, x, y):
    """One replay as the trainer runs it: perturb, loss, backward."""
    x_adv = method.attack(model, x, y, state(len(x)))
    loss, _ = method.training_loss(model, x_adv, y, x, state(len(x)))
    model.zero_grad()
    loss.backward()
    return x_adv


def test_free_replays_and_delta_carried_and_bounded():
    model, (x, y) = tiny_net(), batch()
    method = Free(EPS)
    assert method.replays == 8 and Free(EPS, Free.Options(m=3)).replays == 3
    x_adv = free_step(method, model, x, y)
    torch.testing.assert_close(x_adv, x)  # delta starts at zero
    x_adv = free_step(method, model, x, y)  # the first backward's step is applied now
    assert (linf(x_adv, x) > 0).any() and (linf(x_adv, x) <= EPS + 1e-6).all()
    leaf, grad = method._delta_leaf.detach(), method._delta_leaf.grad
    expected = (leaf + EPS * grad.sign()).clamp(-EPS, EPS)
    x2, y2 = batch(seed=5)  # a new minibatch starts from the carried delta
    torch.testing.assert_close(method.attack(model, x2, y2, state()), (x2 + expected).clamp(0, 1))
    for _ in range(10):
        free_step(method, model, x2, y2)
    assert method.delta.abs().max() <= EPS + 1e-6


def test_free_step_is_eps_sign_of_the_input_gradient():
    model, (x, y) = tiny_net(), batch()
    method = Free(EPS)
    free_step(method, model, x, y)
    grad = method._delta_leaf.grad.clone()
    method.attack(model, x, y, state())
    torch.testing.assert_close(method.delta, (EPS * grad.sign()).clamp(-EPS, EPS))


def test_free_survives_batch_size_changes():
    model, (x, y) = tiny_net(), batch()
    method = Free(EPS, Free.Options(m=2))
    free_step(method, model, x, y)
    free_step(method, model, x, y)
    xs, ys = x[:5], y[:5]  # last partial batch
    assert free_step(method, model, xs, ys).shape == xs.shape  # (applies the full batch's step)
    rows_tail = method.delta[5:].clone()
    free_step(method, model, xs, ys)
    method.attack(model, xs, ys, state(5))
    assert torch.equal(method.delta[5:], rows_tail)  # untouched rows wait for the next full batch
    xl, yl = batch(24, seed=3)  # a larger batch grows delta with zeros
    assert free_step(method, model, xl, yl).shape == xl.shape
    assert method.delta.shape[0] == 24 and (method.delta.abs() <= EPS + 1e-6).all()


def test_free_ignores_non_finite_gradient():
    model, (x, y) = tiny_net(), batch()
    method = Free(EPS)
    free_step(method, model, x, y)
    method._delta_leaf.grad.fill_(float("nan"))
    method.attack(model, x, y, state())
    assert torch.isfinite(method.delta).all()


# ---------------------------------------------------------------- end to end


@needs_fmnist
@pytest.mark.parametrize("name", list_methods())
def test_short_training_run(tmp_path, name):
    """Two optimizer steps (x m replays for Free) of a real run of every registered method: data,
    store, probe, checkpoint."""
    extra = {"grad_align": ["method.lam=0.5"], "free": ["method.m=2"]}.get(name, [])
    from atas.trainer import train

    cfg = load_config(
        "fmnist",
        [
            f"method.name={name}",
            "data.subset=256",
            "train.epochs=1",
            "train.batch_size=64",
            "model.arch=wong_cnn",
            "train.probe_size=64",
            "train.probe_steps=2",
            "train.co_action=keep_best",
            "train.progress=false",
            "eval.at_end=false",
            f"out_dir={tmp_path}",
            "train.device=cpu",
            "train.max_steps=2",
        ]
        + extra,
    )
    run = train(cfg)
    assert len(run.metrics) == 1 and run.metrics[0]["step"] == 2
    assert math.isfinite(run.metrics[0]["train_loss"])
    assert (run.store is not None) == get_method(name).uses_store  # the per-sample store iff the method keeps one
    if run.store is not None:
        assert run.store.delta.abs().max() <= cfg.method.eps + 1e-6


def test_pgd_eps_ramp_grows_linearly_to_eps():
    from atas.methods import BatchState
    from atas.methods.pgd import PGDAT

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
    method = PGDAT(0.3, PGDAT.Options(steps=5, eps_ramp_epochs=3))
    reach = []
    for epoch in (1, 2, 3, 4):
        x_adv = method.attack(model, x, y, BatchState(torch.arange(32), epoch))
        reach.append(round(float((x_adv - x).abs().max()), 4))
    assert reach[0] <= 0.1 + 1e-6 and reach[1] <= 0.2 + 1e-6 and reach[2] <= 0.3 + 1e-6
    assert reach[0] < reach[1] < reach[2] and reach[3] == reach[2]
