"""Tests of atas.evaluation (`atas.evaluate`): CPU only, tiny models, deterministic, invariants rather than numbers."""

import importlib
import json
import warnings

import pytest
import torch
import torch.nn as nn

from atas.evaluation import (
    ATTACKS,
    FGSM,
    PGD,
    EvaluationError,
    EvaluationWarning,
    check_adversarial,
    evaluate,
    format_table,
    save_result,
)

ev = importlib.import_module("atas.evaluation.protocol")  # the batch driver and its checks

D, K = 16, 10  # 1x4x4 images, 10 classes (standard AutoAttack targets 9 wrong classes)


def _blobs(n, seed):
    """Gaussian blobs around 10 fixed centres in [0.25, 0.75]^16, as [n, 1, 4, 4] images."""
    centres = 0.25 + 0.5 * torch.rand(K, D, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % K
    x = (centres[y] + 0.08 * torch.randn(n, D, generator=g)).clamp(0, 1)
    return x.view(n, 1, 4, 4), y


@pytest.fixture(scope="module")
def trained():
    """A small MLP trained for 60 steps: clean ~100%, robust accuracy strictly in between at eps 0.05."""
    torch.manual_seed(0)
    x, y = _blobs(256, seed=1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, 32), nn.ReLU(), nn.Linear(32, K))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(60):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x_test, y_test = _blobs(64, seed=2)
    return model, x_test, y_test


def _correct(model, x_adv, y):
    with torch.no_grad():
        return model(x_adv).argmax(1) == y


def _quiet(**kw):
    return dict(progress=False, **kw)


# ---------------------------------------------------------------------------------- attacks


@pytest.mark.parametrize("attack", [FGSM(0.05), PGD(0.05, steps=5, restarts=2), PGD(0.05, steps=3, alpha=0.2)])
def test_adversarial_examples_stay_in_ball_and_box(trained, attack):
    model, x, y = trained
    x = x.clone()
    x[:4] = 0.0  # samples at the corners of the box: clipping must hold there too
    x[4:8] = 1.0
    x_adv = attack(model, x, y)
    assert (x_adv - x).abs().max() <= 0.05 + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    check_adversarial(x_adv, x, 0.05)


def test_check_adversarial_raises_on_violations():
    x = torch.full((2, 1, 4, 4), 0.5)
    with pytest.raises(EvaluationError, match="exceeds eps"):
        check_adversarial(x + 0.1, x, 0.05)
    with pytest.raises(EvaluationError, match=r"\[0, 1\]"):
        check_adversarial(x * 3, x * 3, 0.05)
    with pytest.raises(EvaluationError, match="NaN"):
        check_adversarial(x * float("nan"), x, 0.05)
    assert issubclass(EvaluationError, AssertionError)


def test_evaluate_raises_when_an_attack_leaves_the_ball(trained, monkeypatch):
    model, x, y = trained
    monkeypatch.setattr(FGSM, "__call__", lambda self, model, x, y: (x + 2 * self.eps).clamp(0, 1))
    with pytest.raises(EvaluationError, match="fgsm"):
        evaluate(model, x, y, 0.05, attacks=("fgsm",), **_quiet())


def test_pgd_default_alpha_is_quarter_eps():
    assert PGD(0.04).alpha == pytest.approx(0.01)
    assert PGD(0.04, steps=10, alpha=2.5 * 0.04 / 10).alpha == pytest.approx(0.01)


def test_pgd_restarts_are_the_worst_case_over_single_restarts(trained):
    """A sample is robust under PGD-k-3 iff it survives each of 3 single-restart runs that draw
    the same starts (one full-batch draw per restart from the global RNG)."""
    model, x, y = trained
    rows = []

    class Counting(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            rows.append(x.shape[0])
            return self.inner(x)

    counting = Counting(model).eval()
    torch.manual_seed(123)
    robust3 = _correct(model, PGD(0.05, steps=2, restarts=3)(counting, x, y), y)
    rows3, rows[:] = sum(rows), []
    torch.manual_seed(123)
    single = PGD(0.05, steps=2, restarts=1)
    robust1 = [_correct(model, single(counting, x, y), y) for _ in range(3)]
    assert torch.equal(robust3, robust1[0] & robust1[1] & robust1[2])
    # the restarts disagree on some sample, so the AND above is not vacuous
    assert not (torch.equal(robust1[0], robust1[1]) and torch.equal(robust1[1], robust1[2]))
    # already-fooled samples are not attacked again: fewer rows through the model
    assert rows3 < sum(rows)


def test_pgd_run_reports_clean_errors_as_not_robust(trained):
    model, x, y = trained
    y_wrong = (y + 1) % K
    x_adv, robust = PGD(0.01, steps=3, restarts=2).run(model, x, y_wrong)
    clean_wrong = ~_correct(model, x, y_wrong)
    assert not robust[clean_wrong].any()
    assert torch.equal(x_adv[clean_wrong], x[clean_wrong])  # nothing to attack: x itself is returned


def _linear_model(k, seed):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(64, k)
    with torch.no_grad():
        lin.weight.copy_(0.3 * torch.randn(k, 64, generator=g))
        lin.bias.copy_(-0.5 * lin.weight.sum(1))  # centred: the classes share the unit cube
    return nn.Sequential(nn.Flatten(), lin).eval(), lin


def _analytic_robust(lin, x, y, eps):
    """Exact robustness of a linear classifier on the L-inf ball intersected with [0, 1]: for each
    wrong class j the margin (w_y - w_j).x' + b_y - b_j is minimised at the vertex
    x' = clip(x - eps * sign(w_y - w_j), 0, 1); robust iff every minimised margin is > 0.
    Also returns the smallest |minimised margin| (to keep exact ties out of the test)."""
    w, b = lin.weight.detach(), lin.bias.detach()
    x = x.flatten(1)
    robust = torch.ones(len(y), dtype=torch.bool)
    closest = torch.full((len(y),), float("inf"))
    for j in range(w.shape[0]):
        d = w[y] - w[j]  # [N, 64]
        x_worst = (x - eps * d.sign()).clamp(0, 1)
        margin = (d * x_worst).sum(1) + b[y] - b[j]
        other = y != j
        robust &= ~other | (margin > 0)
        closest = torch.where(other, torch.minimum(closest, margin.abs()), closest)
    return robust, closest


def test_pgd_finds_the_analytic_worst_case_of_a_linear_binary_model():
    model, lin = _linear_model(2, seed=3)
    g = torch.Generator().manual_seed(4)
    x = torch.rand(200, 1, 8, 8, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:20] = 1 - y[:20]  # some clean errors too
    eps = 0.03
    robust, closest = _analytic_robust(lin, x, y, eps)
    keep = closest > 1e-3  # no exact ties: argmax at a tie is arbitrary
    x, y, robust = x[keep], y[keep], robust[keep]
    assert 0.2 < robust.float().mean() < 0.8  # non-trivial
    result = evaluate(
        model, x, y, eps, attacks=("clean", "fgsm", "pgd"), pgd_steps=10, pgd_restarts=2, batch_size=64, **_quiet()
    )
    assert result["per_sample"]["pgd"] == robust.tolist()
    assert result["results"]["pgd"]["n_correct"] == int(robust.sum())
    # for a binary linear model the signed gradient always points at the optimal vertex
    assert result["per_sample"]["fgsm"] == robust.tolist()


def test_no_attack_beats_the_analytic_worst_case_of_a_linear_multiclass_model():
    model, lin = _linear_model(K, seed=5)
    x = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        y = model(x).argmax(1)
    eps = 0.02
    robust, _ = _analytic_robust(lin, x, y, eps)
    result = evaluate(
        model, x, y, eps, attacks=("clean", "fgsm", "pgd", "apgd-ce"), pgd_steps=20, pgd_restarts=2, **_quiet()
    )
    assert 0 < robust.sum() < len(y)
    # (multiclass: untargeted CE ascent need not reach the optimal vertex, so only the bound holds)
    for name in ("fgsm", "pgd", "apgd-ce"):
        flags = torch.tensor(result["per_sample"][name])
        assert not (robust & ~flags).any(), name  # nothing fools a provably robust sample


# ---------------------------------------------------------------------------------- evaluate


def test_evaluate_result_layout_and_ordering(trained):
    model, x, y = trained
    result = evaluate(
        model,
        x,
        y,
        0.05,
        eps_label="0.05 (test)",
        pgd_steps=10,
        pgd_restarts=3,
        n_examples=40,
        batch_size=16,
        **_quiet(),
    )
    assert result["eps"] == 0.05 and result["eps_label"] == "0.05 (test)"
    assert result["n_examples"] == 40 and result["seed"] == 0
    assert set(result["results"]) == {"clean", "fgsm", "pgd"}
    acc = {k: v["accuracy"] for k, v in result["results"].items()}
    assert 0 < acc["pgd"] <= acc["clean"]
    assert acc["pgd"] < acc["clean"]  # the attack does something on this model
    for name, res in result["results"].items():
        assert res["n_correct"] == sum(result["per_sample"][name]) and res["n"] == 40
        assert res["accuracy"] == pytest.approx(res["n_correct"] / 40)
        assert res["is_autoattack"] is False
    assert result["results"]["pgd"]["label"] == "PGD-10-3"
    assert result["results"]["pgd"]["settings"]["alpha"] == pytest.approx(0.0125)
    # PGD's worst case includes the clean point
    clean, pgd = (torch.tensor(result["per_sample"][k]) for k in ("clean", "pgd"))
    assert not (pgd & ~clean).any()
    assert set(result["versions"]) >= {"torch", "torchvision", "pyautoattack", "atas", "python"}
    assert result["device"] == "cpu" and result["warnings"] == []
    # n_examples takes the FIRST n: same verdicts as evaluating x[:40] directly
    again = evaluate(model, x[:40], y[:40], 0.05, pgd_steps=10, pgd_restarts=3, batch_size=16, **_quiet())
    assert again["per_sample"] == result["per_sample"]


def test_evaluate_is_seeded_and_leaves_global_rng_alone(trained):
    model, x, y = trained
    kw = dict(attacks=("pgd",), pgd_steps=2, pgd_restarts=2, batch_size=16, **_quiet())
    rng = torch.get_rng_state()
    a = evaluate(model, x, y, 0.05, seed=1, **kw)
    assert torch.equal(torch.get_rng_state(), rng)
    b = evaluate(model, x, y, 0.05, seed=1, **kw)
    assert a["per_sample"] == b["per_sample"]


def test_uint8_input_equals_float_input(trained):
    model, _, _ = trained
    x8, y = (
        (torch.rand(32, 1, 4, 4, generator=torch.Generator().manual_seed(7)) * 255).to(torch.uint8),
        torch.arange(32) % K,
    )
    kw = dict(attacks=("clean", "pgd"), pgd_steps=3, pgd_restarts=1, **_quiet())
    assert (
        evaluate(model, x8, y, 8 / 255, **kw)["per_sample"]
        == evaluate(model, x8.float() / 255, y, 8 / 255, **kw)["per_sample"]
    )
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        evaluate(model, x8.float(), y, 8 / 255, **kw)  # 0..255 floats: a normalisation bug
    with pytest.raises(ValueError, match="eps"):
        evaluate(model, x8, y, 8, **kw)  # 8 meant as 8/255


def test_train_mode_is_warned_and_restored_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, 32), nn.BatchNorm1d(32), nn.Dropout(0.5), nn.Linear(32, K))
    x, y = _blobs(32, seed=3)
    model.train()
    model[2].eval()  # a deliberately frozen BN must stay frozen
    modes = [m.training for m in model.modules()]
    bn_stats = model[2].running_mean.clone()
    with pytest.warns(EvaluationWarning, match="train mode"):
        result = evaluate(model, x, y, 0.05, attacks=("clean", "pgd"), pgd_steps=2, pgd_restarts=1, **_quiet())
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(model[2].running_mean, bn_stats)  # no BN statistics updated by attacks
    assert any("train mode" in w for w in result["warnings"])
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        expected = evaluate(model, x, y, 0.05, attacks=("clean", "pgd"), pgd_steps=2, pgd_restarts=1, **_quiet())
    assert result["per_sample"] == expected["per_sample"]  # it really ran in eval mode


def test_modes_restored_even_when_evaluation_fails():
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, K)).train()
    x, y = _blobs(8, seed=3)
    with pytest.raises(ValueError):  # names are checked before the model is touched
        evaluate(model, x, y, 0.05, attacks=("clean", "nope"), **_quiet())
    assert all(m.training for m in model.modules())
    model.forward = lambda x: (_ for _ in ()).throw(RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"), pytest.warns(EvaluationWarning):
        evaluate(model, x, y, 0.05, attacks=("clean",), **_quiet())
    assert all(m.training for m in model.modules())


def test_probability_outputs_are_warned(trained):
    model, x, y = trained
    probs = nn.Sequential(model, nn.Softmax(dim=1)).eval()
    with pytest.warns(EvaluationWarning, match="probabilities"):
        result = evaluate(probs, x, y, 0.05, attacks=("clean",), **_quiet())
    assert any("probabilities" in w for w in result["warnings"])


def test_unknown_attack_lists_valid_names(trained):
    model, x, y = trained
    with pytest.raises(ValueError) as info:
        evaluate(model, x, y, 0.05, attacks=("clean", "autoattack"), **_quiet())
    for name in ATTACKS:
        assert name in str(info.value)
    assert "autoattack" in str(info.value)


def test_sanity_warnings_across_attacks():
    def res(acc):
        return {"accuracy": acc, "label": "x"}

    messages = []
    ev._sanity_across_attacks({"clean": res(0.5), "fgsm": res(0.8), "pgd": res(0.0)}, messages.append)
    assert len(messages) == 1 and "catastrophic overfitting" in messages[0]
    assert messages[0].startswith("SANITY CHECK FAILED")
    messages = []
    ev._sanity_across_attacks({"clean": res(0.5), "pgd": res(0.6), "aa": res(0.7)}, messages.append)
    assert len(messages) == 3  # pgd > clean, aa > clean, aa > pgd
    messages = []
    ev._sanity_across_attacks({"clean": res(0.8), "fgsm": res(0.5), "pgd": res(0.4), "aa": res(0.38)}, messages.append)
    assert messages == []  # AA 2 points below PGD: within the WEAK_PGD_POINTS tolerance


# ---------------------------------------------------------------------------------- resuming


class Killed(Exception):
    pass


class Killable(nn.Module):
    """Wraps a model; raises Killed on the forward after `kill_after` forwards (a simulated kill)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = 0
        self.kill_after = None

    def forward(self, x):
        self.calls += 1
        if self.kill_after is not None and self.calls > self.kill_after:
            raise Killed()
        return self.inner(x)


def test_killed_evaluation_resumes_to_the_same_result(trained, tmp_path):
    model, x, y = trained
    kw = dict(attacks=("clean", "fgsm", "pgd"), pgd_steps=4, pgd_restarts=3, batch_size=8, seed=3, **_quiet())
    wrapped = Killable(model).eval()
    reference = evaluate(wrapped, x, y, 0.05, **kw)
    total_calls = wrapped.calls

    state = tmp_path / "state" / "eval.json"
    wrapped.calls, wrapped.kill_after = 0, total_calls * 2 // 3  # dies inside PGD
    with pytest.raises(Killed):
        evaluate(wrapped, x, y, 0.05, state_path=state, **kw)
    saved = json.loads(state.read_text())
    assert len(saved["attacks"]["clean"]["correct"]) == 64
    assert 0 < len(saved["attacks"]["pgd"]["correct"]) < 64
    assert [p.name for p in state.parent.iterdir()] == ["eval.json"]  # no temp files left behind

    wrapped.calls, wrapped.kill_after = 0, None
    resumed = evaluate(wrapped, x, y, 0.05, state_path=state, **kw)
    assert wrapped.calls < total_calls  # finished batches were not redone
    assert resumed["results"] == reference["results"]
    assert resumed["per_sample"] == reference["per_sample"]
    assert resumed["warnings"] == []


def test_state_with_other_settings_starts_fresh(trained, tmp_path):
    model, x, y = trained
    kw = dict(attacks=("clean", "pgd"), pgd_steps=2, pgd_restarts=2, batch_size=16, **_quiet())
    state = tmp_path / "eval.json"
    evaluate(model, x, y, 0.05, state_path=state, seed=0, **kw)
    other = evaluate(model, x, y, 0.05, state_path=state, seed=1, **kw)
    assert other["per_sample"] == evaluate(model, x, y, 0.05, seed=1, **kw)["per_sample"]
    assert other["warnings"] == []  # a new evaluation, not a problem worth a warning
    # another model (same architecture, other weights) must not reuse the saved verdicts
    moved = nn.Sequential(nn.Flatten(), nn.Linear(D, K)).eval()
    again = evaluate(moved, x, y, 0.05, state_path=state, seed=1, **kw)
    assert again["per_sample"] == evaluate(moved, x, y, 0.05, seed=1, **kw)["per_sample"]


# ---------------------------------------------------------------------------------- AutoAttack


@pytest.mark.slow
def test_autoattack_runs_through_pyautoattack_and_is_strongest(trained):
    model, x, y = trained
    result = evaluate(
        model,
        x,
        y,
        0.05,
        attacks=("clean", "pgd", "aa", "apgd-ce"),
        pgd_steps=10,
        pgd_restarts=3,
        n_examples=16,
        batch_size=16,
        **_quiet(),
    )
    res = result["results"]
    assert res["aa"]["accuracy"] <= res["pgd"]["accuracy"] <= res["clean"]["accuracy"]
    assert res["aa"]["accuracy"] <= res["apgd-ce"]["accuracy"]
    assert res["aa"]["is_autoattack"] is True
    assert res["aa"]["settings"]["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert res["aa"]["settings"]["apgd-t"]["n_target_classes"] == 9
    assert res["apgd-ce"]["is_autoattack"] is False
    assert "NOT AutoAttack" in res["apgd-ce"]["label"]
    assert res["apgd-ce"]["settings"]["attacks"] == ["apgd-ce"]
    assert res["apgd-ce"]["settings"]["apgd-ce"]["n_restarts"] == 1  # as inside standard AA
    aa, clean = (torch.tensor(result["per_sample"][k]) for k in ("aa", "clean"))
    assert not (aa & ~clean).any()


# ---------------------------------------------------------------------------------- reports


def test_format_table_and_save_result(trained, tmp_path):
    model, x, y = trained
    result = evaluate(model, x, y, 8 / 255, attacks=("clean", "pgd"), pgd_steps=3, pgd_restarts=2, **_quiet())
    table = format_table(result)
    assert "8/255" in table and "PGD-3-2" in table
    for res in result["results"].values():
        assert f"{100 * res['accuracy']:.2f}" in table
        assert f"{res['n_correct']}/{res['n']}" in table.replace(" ", "")
    path = tmp_path / "out" / "eval.json"
    save_result(result, path)
    assert json.loads(path.read_text()) == json.loads(json.dumps(result))
    assert [p.name for p in path.parent.iterdir()] == ["eval.json"]
