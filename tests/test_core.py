"""Invariants of the core pieces: fractions, config, threat model, paired augmentation, store, ATAS step."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from atas.augment import PairedAugment, crop, sample_crop_flip, uncrop_into
from atas.config import Config, ConfigError, Frac, config_from_dict, load_config, parse_fraction
from atas.methods import BatchState, get_method
from atas.methods.atas import ATAS
from atas.store import PerSampleStore
from atas.threat import LinfBall, signed_step


# ---------------------------------------------------------------- fractions and config
def test_parse_fraction_exact():
    assert parse_fraction("8/255") == 8 / 255
    assert parse_fraction(" 16 / 255 ") == 16 / 255
    assert parse_fraction("0.3") == 0.3
    assert parse_fraction(0.25) == 0.25
    assert Frac("8/255").text == "8/255" and float(Frac("8/255")) == 8 / 255


@pytest.mark.parametrize("bad", ["__import__('os')", "8/", "eight", "1/0", "2**3", ""])
def test_parse_fraction_rejects_code_and_garbage(bad):
    with pytest.raises(ConfigError):
        parse_fraction(bad)


def test_eps_8_suggests_8_over_255():
    with pytest.raises(ConfigError, match=r"8/255"):
        load_config("fmnist", ["method.eps=8"])
    with pytest.raises(ConfigError, match="> 0"):
        load_config("fmnist", ["method.eps=0"])
    with pytest.raises(ConfigError, match="> 0"):
        load_config("fmnist", ["method.eps=-0.1"])


def test_config_round_trip_and_overrides():
    cfg = load_config("fmnist", ["method.eps=8/255", "train.epochs=3", "optim.milestones=[1,2]", "method.c=0.02"])
    assert cfg.method.eps.text == "8/255" and cfg.train.epochs == 3 and cfg.optim.milestones == [1, 2]
    assert cfg.method.args["c"] == 0.02
    # method defaults are filled in so the saved config is complete
    args = cfg.method.args
    assert args["beta"] == 0.5 and args["alpha_min"] == "0.5" and args["alpha_unit"] == "eps"
    again = config_from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()
    import yaml

    assert config_from_dict(yaml.safe_load(cfg.to_yaml())).to_dict() == cfg.to_dict()


def test_defaults_reproduce_official_atas():
    cfg = Config()
    config_from_dict(cfg.to_dict())  # validates
    o = ATAS.Options()
    assert (o.c, o.beta, o.warmup_epochs, o.reset_every) == (0.01, 0.5, 5, 10)
    assert float(o.alpha_min) == 4 / 255 and float(o.alpha_max) == 14 / 255
    assert o.step_numerator == "official" and o.grad_norm == "batch_mean" and o.bn_mode == "eval"
    assert cfg.optim.milestones == [24, 28] and cfg.optim.lr == 0.1 and cfg.optim.weight_decay == 5e-4
    assert cfg.train.epochs == 30 and cfg.train.batch_size == 128 and float(cfg.method.eps) == 8 / 255


@pytest.mark.parametrize(
    "override, match",
    [
        (["train.epochs=abc"], "train.epochs"),
        (["train.epochs=2.5"], "train.epochs"),
        (["train.nonsense=1"], "valid keys"),
        (["method.name=fsgm_rs"], "valid: .*atas.*fgsm_rs"),  # a typo (fgsm is a method now)
        (["model.arch=resnet9000"], "valid"),
        (["data.name=cifar11"], "cifar10"),
        (["method.no_such_option=1"], "valid keys"),
        (["train.deterministic=maybe"], "true or false"),
        (["train.store_dtype=float64"], "store_dtype"),
    ],
)
def test_bad_config_values_name_the_fix(override, match):
    with pytest.raises((ConfigError, ValueError), match=match):
        load_config("fmnist", override)


def test_unknown_recipe_lists_shipped():
    with pytest.raises(ConfigError, match="fmnist"):
        load_config("no-such-recipe")


# ---------------------------------------------------------------- threat model
def test_projection_and_range_invariants():
    torch.manual_seed(0)
    ball = LinfBall(0.1)
    x = torch.rand(8, 3, 5, 5)
    x_adv = ball.project(x + torch.randn_like(x), x)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-7
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    start = ball.random_start(x)
    assert (start - x).abs().max() <= 0.1 + 1e-7 and start.min() >= 0 and start.max() <= 1
    stepped = signed_step(x, torch.randn_like(x), torch.full((8,), 0.05))
    assert torch.allclose((stepped - x).abs(), torch.full_like(x, 0.05))


def test_eps_out_of_range_rejected():
    with pytest.raises(ValueError):
        LinfBall(0.0)
    with pytest.raises(ValueError):
        LinfBall(8.0)


# ---------------------------------------------------------------- paired augmentation
def _reference_crop(frames, top, left, flip, size):
    out = []
    for f, t, l, fl in zip(frames, top.tolist(), left.tolist(), flip.tolist()):
        w = f[:, t : t + size, l : l + size]
        out.append(torch.flip(w, [2]) if fl else w)
    return torch.stack(out)


def test_crop_matches_per_sample_reference_and_inverse_restores_window():
    torch.manual_seed(1)
    frames = torch.rand(16, 3, 40, 40)
    cf = sample_crop_flip(16, 40, 32, True, "cpu")
    assert cf.flip.any() and not cf.flip.all()
    windows = crop(frames, cf)
    assert torch.equal(windows, _reference_crop(frames, cf.top, cf.left, cf.flip, 32))
    restored = torch.zeros_like(frames)
    uncrop_into(restored, torch.arange(16), windows, cf)
    for b in range(16):  # inside the window: the original; outside: untouched zeros
        t, l = int(cf.top[b]), int(cf.left[b])
        assert torch.equal(restored[b, :, t : t + 32, l : l + 32], frames[b, :, t : t + 32, l : l + 32])
        mask = torch.ones(40, 40, dtype=torch.bool)
        mask[t : t + 32, l : l + 32] = False
        assert restored[b][:, mask].abs().sum() == 0


def test_paired_augment_pads_with_zeros_and_offsets_cover_range():
    aug = PairedAugment(32, pad=4, flip=True)
    assert aug.frame == 40
    cf = aug.sample(4000, "cpu")
    assert int(cf.top.min()) == 0 and int(cf.top.max()) == 8  # both ends, like RandomCrop(32, padding=4)
    x = torch.ones(2, 3, 32, 32)
    cf = aug.sample(2, "cpu")
    cf.top[:], cf.left[:], cf.flip[:] = 0, 0, False
    out = aug(x, cf)
    assert out[:, :, :4, :].abs().sum() == 0 and out[:, :, 4:, 4:].min() == 1


# ---------------------------------------------------------------- per-sample store
def test_store_scatter_touches_only_its_indices_and_window():
    torch.manual_seed(2)
    store = PerSampleStore(10, (3, 40, 40), eps=0.1)
    before = store.delta.clone()
    idx = torch.tensor([7, 2, 5])
    cf = sample_crop_flip(3, 40, 32, True, "cpu")
    window = torch.full((3, 3, 32, 32), 0.05)
    store.scatter_delta(idx, cf, window)
    untouched = [i for i in range(10) if i not in idx.tolist()]
    assert torch.equal(store.delta[untouched], before[untouched])
    assert torch.allclose(store.gather_delta(idx, cf), window)
    for b, i in enumerate(idx.tolist()):
        t, l = int(cf.top[b]), int(cf.left[b])
        mask = torch.ones(40, 40, dtype=torch.bool)
        mask[t : t + 32, l : l + 32] = False
        assert torch.equal(store.delta[i][:, mask], before[i][:, mask])


def test_store_init_uniform_and_state_dict_round_trip():
    torch.manual_seed(3)
    store = PerSampleStore(50, (1, 32, 32), eps=0.2, dtype="float16")
    assert store.delta.dtype == torch.float16
    assert store.delta.abs().max() <= 0.2 + 1e-3 and store.delta.abs().mean() > 0.08
    store.grad_sq_ema += 1.5
    other = PerSampleStore(50, (1, 32, 32), eps=0.2, dtype="float16")
    other.load_state_dict(store.state_dict())
    assert torch.equal(other.delta, store.delta) and torch.equal(other.grad_sq_ema, store.grad_sq_ema)
    with pytest.raises(ValueError, match="dataset size"):
        PerSampleStore(49, (1, 32, 32), eps=0.2).load_state_dict(store.state_dict())


def test_low_resolution_store_is_really_updated():
    """ImageNet-style storage (frame 64 stored at 16): the write-back changes the stored prior
    (official defect 2: there the prior is never updated)."""
    torch.manual_seed(4)
    store = PerSampleStore(4, (3, 64, 64), eps=0.1, storage_size=16)
    before = store.delta.clone()
    idx = torch.tensor([1, 3])
    cf = sample_crop_flip(2, 64, 56, True, "cpu")
    store.scatter_delta(idx, cf, torch.full((2, 3, 56, 56), 0.1))
    assert not torch.equal(store.delta[1], before[1]) and torch.equal(store.delta[0], before[0])
    # the stored prior now points towards the written value inside the window
    assert store.gather_delta(idx, cf).mean() > 0.07


# ---------------------------------------------------------------- the ATAS step
class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).flatten(1))


def _official_step(model, x_nat, x_start, y, v_old, c, beta, amin, amax, eps):
    """The official formula, written as the official code computes it: gradient of the batch-MEAN
    loss, numerator 16/255, clamp, project, clip."""
    model.eval()
    x_start = x_start.clone().requires_grad_(True)
    loss = F.cross_entropy(model(x_start), y)
    (grad,) = torch.autograd.grad(loss, [x_start])
    v = grad.flatten(1).norm(dim=1) ** 2 * (1 - beta) + v_old * beta
    alpha = (1 / (1 + v.sqrt() / c) * 2 * 8 / 255).clamp(amin, amax)
    x_adv = x_start.detach() + alpha.view(-1, 1, 1, 1) * grad.sign()
    x_adv = torch.min(torch.max(x_adv, x_nat - eps), x_nat + eps).clamp(0, 1)
    return x_adv, v, alpha


def test_atas_step_hand_computed():
    m = ATAS(8 / 255, ATAS.Options(c=0.01, beta=0.5))
    grad = torch.zeros(2, 1, 2, 2)
    grad[0, 0, 0, 0] = 3.0 * 2  # ||g_0|| = 6 -> batch-mean scaled: 3
    grad[1, 0, 0, 0] = 0.0  # zero gradient
    v_old = torch.tensor([2.0, 0.0])
    alpha, v = m.step_size(grad, v_old)
    # v_0 = 0.5*2 + 0.5*9 = 5.5 ; alpha_0 = (16/255)/(1+sqrt(5.5)/0.01) -> clamped to 4/255
    assert v[0].item() == pytest.approx(5.5) and alpha[0].item() == pytest.approx(4 / 255)
    # v_1 = 0 -> alpha = 16/255, clamped to alpha_max 14/255
    assert v[1].item() == 0 and alpha[1].item() == pytest.approx(14 / 255)
    # unclamped middle value: sqrt(v)/c = 1 -> alpha = 8/255
    alpha, _ = m.step_size(torch.zeros(1, 1, 1, 1), torch.tensor([0.0001 / 0.5]))
    assert alpha.item() == pytest.approx(8 / 255, rel=1e-5)


@pytest.mark.parametrize("batch", [128, 37])
def test_atas_step_equals_official_formula_with_batch_mean_scaling(batch):
    torch.manual_seed(5)
    model, eps = _Tiny(), 8 / 255
    x = torch.rand(batch, 1, 8, 8)
    y = torch.randint(0, 10, (batch,))
    store = PerSampleStore(200, (1, 8, 8), eps=eps)
    store.grad_sq_ema.uniform_(0, 1e-4)
    idx = torch.randperm(200)[:batch]
    cf = sample_crop_flip(batch, 8, 8, False, "cpu")
    prior = store.gather_delta(idx, cf)
    v_old = store.gather_grad_sq_ema(idx).clone()
    method = ATAS(eps, ATAS.Options(warmup_epochs=0), epochs=30)
    x_adv = method.attack(model, x, y, BatchState(idx, epoch=1, store=store, prior=prior))
    ref_adv, ref_v, ref_alpha = _official_step(
        model, x, (x + prior).clamp(0, 1), y, v_old, 0.01, 0.5, 4 / 255, 14 / 255, eps
    )
    assert torch.allclose(store.gather_grad_sq_ema(idx), ref_v, rtol=1e-4, atol=1e-12)
    assert torch.allclose(method.stats["alpha"], ref_alpha, rtol=1e-4)
    assert torch.allclose(x_adv, ref_adv, atol=1e-6)
    assert (x_adv - x).abs().max() <= eps + 1e-6


def test_atas_per_sample_scaling_is_batch_size_independent():
    torch.manual_seed(6)
    model, eps = _Tiny(), 8 / 255
    x, y = torch.rand(64, 1, 8, 8), torch.randint(0, 10, (64,))
    method = ATAS(eps, ATAS.Options(grad_norm="per_sample", warmup_epochs=0))
    alphas = []
    for chunk in (slice(0, 64), slice(0, 16)):
        store = PerSampleStore(64, (1, 8, 8), eps=eps)
        store.delta.zero_()
        idx = torch.arange(64)[chunk]
        cf = sample_crop_flip(len(idx), 8, 8, False, "cpu")
        method.attack(model, x[chunk], y[chunk], BatchState(idx, 1, store, store.gather_delta(idx, cf)))
        alphas.append(method.stats["alpha"])
    assert torch.allclose(alphas[0][:16], alphas[1], rtol=1e-5)


def test_atas_warmup_uses_eps_and_keeps_ema():
    torch.manual_seed(7)
    model, eps = _Tiny(), 8 / 255
    store = PerSampleStore(8, (1, 8, 8), eps=eps)
    idx, x, y = torch.arange(8), torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    method = ATAS(eps, ATAS.Options(warmup_epochs=5))
    cf = sample_crop_flip(8, 8, 8, False, "cpu")
    method.attack(model, x, y, BatchState(idx, 5, store, store.gather_delta(idx, cf)))
    assert torch.allclose(method.stats["alpha"], torch.full((8,), eps)) and store.grad_sq_ema.sum() == 0
    method.attack(model, x, y, BatchState(idx, 6, store, store.gather_delta(idx, cf)))
    assert store.grad_sq_ema.sum() > 0


def test_atas_official_numerator_vs_2eps():
    grad, v = torch.zeros(1, 1, 1, 1), torch.zeros(1)
    official = ATAS(0.2, ATAS.Options(alpha_min=Frac("0.001"), alpha_max=Frac("1")))
    two_eps = ATAS(0.2, ATAS.Options(step_numerator="2eps", alpha_min=Frac("0.001"), alpha_max=Frac("1")))
    assert official.step_size(grad, v)[0].item() == pytest.approx(16 / 255)
    assert two_eps.step_size(grad, v)[0].item() == pytest.approx(0.4)


@pytest.mark.parametrize("epochs, expected", [(30, [10, 20]), (20, [10]), (10, []), (25, [10, 20])])
def test_reset_schedule_every_10_epochs_never_the_last(epochs, expected):
    store = PerSampleStore(4, (1, 4, 4), eps=0.1)
    method = ATAS(0.1, ATAS.Options(), epochs=epochs)
    resets = []
    for epoch in range(1, epochs + 1):
        store.delta.zero_()
        method.on_epoch_start(epoch, store)
        if store.delta.abs().sum() > 0:
            resets.append(epoch)
    assert resets == expected


def test_method_registry_lists_names():
    with pytest.raises(ValueError, match="atas.*fgsm_rs.*none.*pgd"):
        get_method("fsgm_rs")  # a typo (fgsm is a method now)
