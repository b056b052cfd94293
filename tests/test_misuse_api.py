"""Misuse of the public method object: said out loud (a warning naming the option, or a clear error
raised before anything is written), never a silently different run."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import atas
from atas.config import RECIPE_DIR, load_config, method_options

DOCS = Path(__file__).resolve().parent.parent / "docs" / "own-code.md"


def tiny_net(side=8):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * side * side, 10))


def batch(n=8, side=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, side, side, generator=g), torch.randint(0, 10, (n,), generator=g)


def caught(fn):
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in got]


# -- 1. defaults that cannot adapt -------------------------------------------------------------
def test_warmup_covering_the_whole_run_warns_naming_the_option():
    _, msgs = caught(lambda: atas.ATAS(eps=8 / 255, epochs=3))
    assert len(msgs) == 1 and "warmup_epochs=5 covers the whole run (epochs=3)" in msgs[0]
    _, msgs = caught(lambda: atas.ATAS(eps=8 / 255, epochs=30))
    assert msgs == []
    _, msgs = caught(lambda: atas.ATAS(eps=8 / 255))  # epochs unknown: nothing to say
    assert msgs == []


def test_absolute_bounds_below_eps_warn_and_relative_is_one_argument():
    _, msgs = caught(lambda: atas.ATAS(eps=0.1, epochs=30))
    assert len(msgs) == 1 and "largest step" in msgs[0] and "relative=True" in msgs[0]
    atk, msgs = caught(lambda: atas.ATAS(eps=0.1, epochs=30, relative=True))
    assert msgs == []
    assert (atk.opt.step_numerator, atk.opt.alpha_unit) == ("2eps", "eps")
    assert atk.numerator == pytest.approx(0.2)
    assert (atk.alpha_min, atk.alpha_max) == pytest.approx((0.05, 0.175))
    # The same through atas.method, and an option given by name still wins.
    atk = atas.method("atas", 0.1, relative=True, alpha_max=2.0)
    assert atk.alpha_max == pytest.approx(0.2) and atk.alpha_min == pytest.approx(0.05)
    # relative=True at 8/255 is the official configuration up to rounding.
    official, rel = atas.ATAS(eps=8 / 255), atas.ATAS(eps=8 / 255, relative=True)
    assert (rel.numerator, rel.alpha_min, rel.alpha_max) == pytest.approx(
        (official.numerator, official.alpha_min, official.alpha_max)
    )


@pytest.mark.parametrize("recipe", sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")))
def test_shipped_recipes_warn_only_where_no_step_reaches_eps(recipe):
    """The official constants at 4/255, 8/255, 12/255 (and ImageNet's) can reach eps: silent. At 16/255
    the official largest step, 14/255, cannot: that recipe reproduces the paper and says so."""
    cfg = load_config(recipe)
    _, msgs = caught(lambda: atas.get_method(cfg.method.name)(cfg.method.eps, method_options(cfg), cfg.train.epochs))
    if recipe.endswith("eps16"):
        assert len(msgs) == 1 and "largest step this configuration can take is 14/255" in msgs[0]
    else:
        assert msgs == [], msgs


# -- 2. a batch of another image size under RandomCropFlip ------------------------------------------
def test_another_image_size_under_random_crop_flip_is_refused_before_writing():
    atk = atas.ATAS(eps=0.1, num_samples=16, augment=atas.RandomCropFlip(pad=2), warmup_epochs=0)
    x, y = batch(8, side=8)
    loader = DataLoader(atas.IndexedDataset(TensorDataset(x, y)), batch_size=8)
    for xb, yb, idx in atk.batches(loader):
        atk.perturb(tiny_net(), xb, yb, idx)
    before = atk.store.delta.clone(), atk.store.grad_sq_ema.clone()
    bigger, _ = batch(8, side=10)
    loader = DataLoader(atas.IndexedDataset(TensorDataset(bigger, y)), batch_size=8)
    with pytest.raises(ValueError, match="images are 10x10.*bound to 8x8 images.*image size it started with"):
        next(iter(atk.batches(loader)))
    with pytest.raises(ValueError, match="images are 10x10"):
        atk.augment_batch(bigger, torch.arange(8))
    assert torch.equal(atk.store.delta, before[0]) and torch.equal(atk.store.grad_sq_ema, before[1])


# -- 3. another method's state ----------------------------------------------------------------------
def test_loading_another_methods_state_is_refused_naming_both():
    x, y = batch(8)
    src = atas.ATAS(eps=0.1, num_samples=8)
    src.perturb(tiny_net(), x, y, torch.arange(8))
    state = src.state_dict()
    assert state["name"] == "atas"
    with pytest.raises(ValueError, match="saved by method 'atas' into 'fgsm_rs'"):
        atas.FGSMRS(eps=0.1).load_state_dict(state)
    # A state saved before the name was recorded is accepted, as before.
    old = {k: v for k, v in state.items() if k != "name"}
    atas.FGSMRS(eps=0.1).load_state_dict({"epoch": 3, "method": {}})
    fresh = atas.ATAS(eps=0.1, num_samples=8)
    fresh.load_state_dict(old)
    assert fresh.current_epoch == 1


# -- 4. Free-AT without its replay loop -------------------------------------------------------------
def test_free_without_replays_warns_once_and_with_them_stays_quiet():
    model = tiny_net()

    def run(replays, batches=3, copy=False):
        atk = atas.Free(eps=0.1, m=3)
        for i in range(batches):
            x, y = batch(8, seed=i)
            for _ in range(replays):
                xb = x.clone() if copy else x  # a fresh copy per replay is still the same minibatch
                loss = atk.loss(model, atk.perturb(model, xb, y), y, xb)
                loss.backward()
        return atk

    _, msgs = caught(lambda: run(1))
    assert msgs == [
        "free: a new minibatch came after 1 perturb() call(s) on the last one, but Free-AT replays "
        "each minibatch m=3 times. Put the per-batch lines in `for _ in range(atk.replays):`, or this "
        "trains one pass per minibatch (not Free-AT)."
    ]
    for copy in (False, True):
        _, msgs = caught(lambda copy=copy: run(3, copy=copy))
        assert msgs == []


# -- 5. half precision ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_gets_a_clear_error_before_the_store(dtype):
    x, y = batch(4)
    atk = atas.ATAS(eps=0.1, num_samples=4)
    with pytest.raises(TypeError, match=f"{dtype} parameters.*float32.*torch.autocast"):
        atk.perturb(tiny_net().to(dtype), x, y, torch.arange(4))
    assert atk.store is None
    with pytest.raises(TypeError, match=f"x is {dtype}"):
        atk.perturb(tiny_net(), x.to(dtype), y, torch.arange(4))
    with pytest.raises(TypeError, match="autocast"):
        atas.FGSMRS(eps=0.1).perturb(tiny_net().to(dtype), x, y)


# -- 6. seeing ATAS adapt ---------------------------------------------------------------------------
def test_step_sizes_and_store_summary_are_read_only_views():
    x, y = batch(16)
    model = tiny_net()
    atk = atas.ATAS(eps=0.1, num_samples=16, epochs=3, relative=True, warmup_epochs=1)
    with pytest.raises(RuntimeError, match="after perturb"):
        atk.store_summary()
    assert atk.last_step_sizes is None
    loader = DataLoader(atas.IndexedDataset(TensorDataset(x, y)), batch_size=8)
    for xb, yb, idx in atk.batches(loader):
        atk.perturb(model, xb, yb, idx)
    assert torch.equal(atk.last_step_sizes, torch.full((8,), 0.1))  # warm-up: alpha = eps
    s = atk.store_summary()
    assert (s["epoch"], s["num_samples"], s["updated"]) == (1, 16, 0) and s["grad_norm_ema"]["mean"] is None
    assert 0 < s["prior_abs"]["mean"] <= s["prior_abs"]["max"] <= 0.1 + 1e-6
    for xb, yb, idx in atk.batches(loader):
        atk.perturb(model, xb, yb, idx)
    alpha = atk.last_step_sizes
    assert alpha.shape == (8,) and not alpha.requires_grad and ((alpha >= 0.05 - 1e-7) & (alpha <= 0.175 + 1e-7)).all()
    alpha.zero_()  # a copy: the object's numbers are untouched
    assert atk.last_step_sizes.min() > 0
    s = atk.store_summary()
    ema = s["grad_norm_ema"]
    assert s["updated"] == 16 and 0 < ema["min"] <= ema["mean"] <= ema["max"]
    assert torch.allclose(torch.tensor(s["grad_norm_ema"]["max"]), atk.store.grad_sq_ema.max().sqrt())
    with pytest.raises(TypeError, match="no per-sample state"):
        atas.FGSMRS(eps=0.1).store_summary()


def doc_block(heading):
    section = DOCS.read_text().split(f"### {heading}", 1)[1].split("\n##", 1)[0]
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return compile(block, str(DOCS), "exec")


def test_the_documented_relative_snippet_runs():
    scope = {"atas": atas, "train_set": TensorDataset(*batch(16))}
    _, msgs = caught(lambda: exec(doc_block("Short runs and other eps: the eps-relative steps"), scope))
    assert msgs == [] and scope["atk"].alpha_max == pytest.approx(0.175)


def test_the_documented_watching_snippet_runs(capsys):
    """docs/own-code.md's "Watching ATAS adapt" block, as written, after two epochs of a tiny run."""
    block = doc_block("Watching ATAS adapt")
    x, y = batch(16)
    model = tiny_net()
    atk = atas.ATAS(eps=0.1, num_samples=16, epochs=2, relative=True, warmup_epochs=0)
    loader = DataLoader(atas.IndexedDataset(TensorDataset(x, y)), batch_size=8)
    scope = {
        "atk": atk,
        "model": model,
        "loader": loader,
        "device": "cpu",
        "range": lambda n: range(2),
        "epochs": 2,
        "opt": torch.optim.SGD(model.parameters(), lr=0.01),
    }
    exec(block, scope)
    out = capsys.readouterr().out
    assert "16/16 samples adapting" in out and out.count("\n") == 2


def test_elle_classes_are_exported_like_the_others():
    assert atas.ELLE is atas.get_method("elle") and atas.ELLEA is atas.get_method("elle_a")
    assert {"ELLE", "ELLEA"} <= set(atas.__all__)
    text = DOCS.read_text()
    assert "`atas.ELLE`" in text and "`atas.ELLEA`" in text


# -- 7. Lightning resume --------------------------------------------------------------------------
def test_lightning_resume_gives_the_uninterrupted_weights_bit_for_bit(tmp_path):
    """Interrupted after epoch 1 (the resumed epoch 2 re-draws ATAS's prior) or after epoch 2, then
    resumed with fit(ckpt_path=...): the same final weights and store as one uninterrupted fit."""
    L = pytest.importorskip("lightning")
    from lightning.pytorch.callbacks import ModelCheckpoint

    import atas.lightning

    x, y = batch(32, seed=5)

    class Lit(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(tiny_net(), nn.Dropout(0.2))  # dropout: the generators matter in the step too
            self.atk = atas.ATAS(
                eps=0.1,
                num_samples=32,
                epochs=3,
                relative=True,
                warmup_epochs=1,
                reset_every=2,
                augment=atas.RandomCropFlip(pad=1),
            )

        def forward(self, x):
            return self.net(x)

        def training_step(self, b, i):
            xb, yb, idx = b
            xb = self.atk.augment_batch(xb, idx)
            return self.atk.loss(self, self.atk.perturb(self, xb, yb, idx), yb, xb)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def fit(root, ckpt=None):
        L.seed_everything(0, verbose=False)
        model = Lit()
        trainer = L.Trainer(
            max_epochs=3,
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=root,
            callbacks=[atas.lightning.AdversarialTraining(), ModelCheckpoint(save_top_k=-1)],
        )
        loader = DataLoader(atas.IndexedDataset(TensorDataset(x, y)), batch_size=8, shuffle=True)
        trainer.fit(model, loader, ckpt_path=ckpt)
        return model

    full = fit(tmp_path / "full")
    ckpts = sorted((tmp_path / "full").rglob("*.ckpt"))
    assert [c.name[:7] for c in ckpts] == ["epoch=0", "epoch=1", "epoch=2"]
    for ckpt in ckpts[:2]:
        resumed = fit(tmp_path / ckpt.stem, ckpt=str(ckpt))
        assert resumed.atk.current_epoch == 3
        for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
            assert torch.equal(a, b), (ckpt.name, k)
        assert torch.equal(full.atk.store.delta, resumed.atk.store.delta)
        assert torch.equal(full.atk.store.grad_sq_ema, resumed.atk.store.grad_sq_ema)
