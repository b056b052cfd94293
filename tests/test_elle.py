"""ELLE and ELLE-A: the local-linearity penalty, ELLE-A's switch, short training runs, resume."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from atas.config import ConfigError, load_config
from atas.methods import BatchState, get_method
from atas.methods.elle import ELLE, ELLEA, elle_lam_schedule, linearity_error, local_linearity_error, triplet
from atas.threat import LinfBall
from tests.helpers import needs_fmnist

EPS = 0.1
B = 32


def batch(n=B, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (n,), generator=g)


def curved_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).double()


class AffineLossNet(nn.Module):
    """Linear logits where class 0 leads every other class by ~60: for labels y != 0 the
    cross-entropy is z_0 - z_y + log(1 + sum_k exp(z_k - z_0)) = an affine function of x plus
    < 1e-20, so its linearity error must vanish although the loss varies across the ball."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(10, 64, dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor([60.0] + [0.0] * 9, dtype=torch.float64))

    def forward(self, x):
        return x.flatten(1) @ self.w.T * 0.1 + self.b


def test_linearity_error_matches_hand_computed_values():
    # affine losses along the segment: zero; l(x) = x^2 on the segment 0 -> 1 at t: t^2 - t
    t = torch.tensor([0.25, 0.5])
    assert linearity_error(torch.tensor([1.0, 3.0, 5.0, 7.0, 2.0, 5.0]), t) == 0  # l_c = (1-t) l_a + t l_b
    quad = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.25**2, 0.5**2])
    expected = ((0.25**2 - 0.25) ** 2 + (0.5**2 - 0.5) ** 2) / 2
    assert linearity_error(quad, t).item() == pytest.approx(expected)


def test_triplet_lies_in_the_ball_and_on_the_segment():
    x, _ = batch()
    ball = LinfBall(EPS)
    x_abc, t = triplet(x, ball)
    x_a, x_b, x_c = x_abc.chunk(3)
    assert x_abc.shape == (3 * B, 1, 8, 8) and t.shape == (B,) and bool(((t >= 0) & (t <= 1)).all())
    assert (x_abc - x.repeat(3, 1, 1, 1)).abs().max() <= EPS + 1e-12 and x_abc.min() >= 0 and x_abc.max() <= 1
    tt = t.view(-1, 1, 1, 1)
    assert torch.allclose(x_c, (1 - tt) * x_a + tt * x_b)
    assert not torch.equal(x_a, x_b)


def test_penalty_is_zero_for_a_linear_loss_and_positive_for_a_curved_one():
    x, y = batch()
    y = torch.where(y == 0, torch.ones_like(y), y)  # the affine regime needs y != the leading class
    ball = LinfBall(EPS)
    affine = AffineLossNet()
    with torch.no_grad():
        losses = nn.functional.cross_entropy(affine(x), y, reduction="none")
        e_affine = local_linearity_error(affine, x, y, ball)
        e_curved = local_linearity_error(curved_net(), x, y, ball)
    assert losses.std() > 0.1  # the loss does vary: the zero below is not a constant function's
    assert e_affine < 1e-20
    assert e_curved > 1e-8


def test_loss_adds_lam_times_the_penalty_and_it_reaches_the_parameters():
    model, (x, y) = curved_net(), batch()
    method = ELLE(EPS, ELLE.Options(lam=100.0))
    st = BatchState(idx=torch.arange(B), epoch=1)
    x_adv = method.attack(model, x, y, st)
    assert (x_adv - x).abs().max() <= EPS + 1e-12 and x_adv.min() >= 0 and x_adv.max() <= 1
    torch.manual_seed(5)
    loss, logits = method.training_loss(model, x_adv, y, x, st)
    ce = nn.functional.cross_entropy(logits.float(), y)  # the training CE is float32, as every method's
    torch.manual_seed(5)
    lin_err = local_linearity_error(model, x, y, LinfBall(EPS))
    assert loss.item() == pytest.approx(ce.item() + 100.0 * lin_err.item(), rel=1e-6)
    (g,) = torch.autograd.grad(loss - ce, [model[1].weight])
    assert g.abs().sum() > 0
    # lam = 0 is plain FGSM training (no triplet pass)
    plain = ELLE(EPS, ELLE.Options(lam=0.0))
    loss0, logits0 = plain.training_loss(model, x_adv, y, x, st)
    assert loss0.item() == pytest.approx(nn.functional.cross_entropy(logits0, y).item())


def test_lam_schedule_and_bad_options():
    assert (elle_lam_schedule(8 / 255), elle_lam_schedule(16 / 255), elle_lam_schedule(24 / 255)) == (1000, 5000, 10000)
    assert ELLE(8 / 255).lam == 1000
    with pytest.warns(UserWarning, match="method.lam"):
        assert ELLE(0.3).lam == 10000
    with pytest.raises(ConfigError, match="method.lam"):
        ELLE(EPS, ELLE.Options(lam=-1.0))
    with pytest.raises(ConfigError, match="decay"):
        ELLEA(EPS, ELLEA.Options(decay=1.5))
    assert get_method("elle") is ELLE and get_method("elle_a") is ELLEA


def test_elle_a_switches_on_at_a_spike_then_decays():
    method = ELLEA(EPS)
    assert float(method.penalty_weight()) == 0.0
    for e in [1.0, 1.1, 0.9, 1.0, 1.05, 0.95]:  # a calm history: lam stays 0 (0 * decay)
        method.observe(torch.tensor(e))
    assert float(method.penalty_weight()) == 0.0
    method.observe(torch.tensor(5.0))  # far above mean + 2 std of the history
    assert float(method.penalty_weight()) == 4000.0
    method.observe(torch.tensor(1.0))
    method.observe(torch.tensor(1.0))
    assert float(method.penalty_weight()) == pytest.approx(4000 * 0.99**2)
    # the running statistics are numpy's mean and population std of every value seen
    seen = torch.tensor([1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 5.0, 1.0, 1.0], dtype=torch.float64)
    s = method.method_state()
    assert int(s["count"]) == 9 and float(s["mean"]) == pytest.approx(float(seen.mean()))
    assert float((s["m2"] / s["count"]).sqrt()) == pytest.approx(float(seen.std(unbiased=False)))


def test_elle_a_needs_three_values_before_a_spike_counts():
    method = ELLEA(EPS)
    method.observe(torch.tensor(1.0))
    method.observe(torch.tensor(1.0))
    method.observe(torch.tensor(100.0))  # only 2 earlier values: no switch, as the official len(E) > 2
    assert float(method.penalty_weight()) == 0.0


def test_elle_a_state_dict_round_trip_continues_exactly():
    a = ELLEA(EPS)
    for e in [1.0, 1.2, 0.8, 4.0, 1.0]:
        a.observe(torch.tensor(e))
    b = ELLEA(EPS)
    b.load_method_state(a.method_state())
    for e in [0.7, 9.0, 1.1]:
        a.observe(torch.tensor(e))
        b.observe(torch.tensor(e))
        assert torch.equal(a.penalty_weight(), b.penalty_weight())
    assert all(torch.equal(a.method_state()[k], b.method_state()[k]) for k in a.method_state())
    with pytest.raises(ValueError, match="elle_a"):
        b.load_method_state({})


@needs_fmnist
@pytest.mark.parametrize("name", ["elle", "elle_a"])
def test_short_training_run_is_finite_and_resumes_exactly(tmp_path, name):
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
        "optim.lr=0.02",
        "train.deterministic=true",
        f"method.name={name}",
        "method.eps=0.1",
        f"out_dir={tmp_path}",
    ]
    full = train(load_config("fmnist", common + ["train.epochs=2"]), run_dir=tmp_path / "full")
    assert all(r["train_loss"] == r["train_loss"] and abs(r["train_loss"]) < 1e6 for r in full.metrics)
    train(load_config("fmnist", common + ["train.epochs=1"]), run_dir=tmp_path / "half")
    resumed = train(load_config("fmnist", common + ["train.epochs=2"]), run_dir=tmp_path / "half", resume=True)
    for (key, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), key
