"""The public method object: one engine for a user's loop and `atas train`, its state, its errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import atas
from atas.config import load_config, method_options
from atas.data import load_tensors
from atas.loaders import ResidentLoader
from atas.trainer import lr_factor, make_model, make_optimizer, seed_everything, train
from tests.helpers import needs_fmnist


@needs_fmnist
@pytest.mark.parametrize("name", ["atas", "grad_align"])
def test_plain_loop_with_the_public_object_equals_atas_train(tmp_path, name):
    """The same batches through atas.train and through a hand-written loop on the public object
    give bit-identical weights: the trainer is a client of the same engine."""
    cfg = load_config(
        "fmnist",
        [
            "model.arch=wong_cnn",
            "data.subset=256",
            "train.batch_size=64",
            "train.epochs=2",
            "train.probe_size=0",
            "train.progress=false",
            "eval.at_end=false",
            "train.deterministic=true",
            f"method.name={name}",
            "method.atas.warmup_epochs=1",
            f"out_dir={tmp_path}",
        ],
    )
    trained = train(cfg, run_dir=tmp_path / "r").model

    # The user's loop: their model/optimizer/schedule, atas's method object, the same batches.
    seed_everything(cfg.train.seed, True)
    x, y = load_tensors("fmnist", "train")
    x, y = x[:256], y[:256]
    loader = ResidentLoader(x, y, 64, seed=cfg.train.seed)
    model = make_model(cfg)
    opt = make_optimizer(cfg, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, len(loader)))
    atk = atas.method(
        name, cfg.method.eps, options=method_options(cfg), epochs=2, num_samples=256, augment=atas.RandomCropFlip(pad=2)
    )
    for _ in range(2):
        model.train()
        for xb, yb, idx in atk.batches(loader):
            x_adv = atk.perturb(model, xb, yb, idx)
            loss = atk.loss(model, x_adv, yb, xb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    for (k, a), b in zip(trained.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k


def tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))


def batches(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_state_dict_resumes_exactly_and_carries_the_store():
    x, y = batches(32)
    loader = DataLoader(atas.IndexedDataset(TensorDataset(x, y)), batch_size=8, shuffle=False)

    def run(atk, model, epochs):
        out = []
        for _ in range(epochs):
            for xb, yb, idx in atk.batches(loader):
                out.append(atk.perturb(model, xb, yb, idx))
        return out

    model = tiny_net()
    full = atas.ATAS(eps=0.1, num_samples=32, epochs=3, warmup_epochs=0, augment=atas.RandomCropFlip(pad=1))
    torch.manual_seed(1)
    run(full, model, 2)
    state = copy.deepcopy(full.state_dict())  # as a checkpoint file holds it
    assert state["epoch"] == 2 and state["store"]["delta"].shape == (32, 1, 10, 10)
    rng = torch.get_rng_state()
    expected = run(full, model, 1)

    resumed = atas.ATAS(eps=0.1, num_samples=32, epochs=3, warmup_epochs=0, augment=atas.RandomCropFlip(pad=1))
    resumed.load_state_dict(state)
    torch.set_rng_state(rng)
    got = run(resumed, model, 1)
    assert resumed.current_epoch == 3
    for a, b in zip(expected, got):
        assert torch.equal(a, b)


def test_methods_without_state_need_no_indices_and_every_method_trains():
    model, (x, y) = tiny_net(), batches(16)
    for name in atas.list_methods():
        atk = atas.method(name, "8/255", num_samples=16)
        for _ in range(atk.replays):
            x_adv = atk.perturb(model, x, y, torch.arange(16))
            loss = atk.loss(model, x_adv, y, x)
            loss.backward()
        assert torch.isfinite(loss) and (x_adv - x).abs().max() <= 3 * 8 / 255 + 1e-6, name  # N-FGSM: 3 eps


def test_regularised_method_warns_when_its_loss_is_not_used():
    model, (x, y) = tiny_net(), batches(16)
    atk = atas.GradAlign(eps=0.1, lam=0.5)
    atk.perturb(model, x, y)
    with pytest.warns(UserWarning, match="regulariser"):
        atk.perturb(model, x, y)


# -- bad input: a clear error, nothing lost --------------------------------------------------
def test_dataset_without_indices_is_refused_with_the_fix():
    x, y = batches(16)
    atk = atas.ATAS(eps=0.1, num_samples=16)
    with pytest.raises(ValueError, match="IndexedDataset"):
        next(iter(atk.batches(DataLoader(TensorDataset(x, y), batch_size=8))))
    with pytest.raises(ValueError, match="dataset indices"):
        atk.perturb(tiny_net(), x, y)


@pytest.mark.parametrize("bad", [16, -1])
def test_index_out_of_range_is_refused(bad):
    x, y = batches(4)
    atk = atas.ATAS(eps=0.1, num_samples=16)
    with pytest.raises(IndexError, match="num_samples=16"):
        atk.perturb(tiny_net(), x, y, torch.tensor([0, 1, 2, bad]))
    assert atk.store is None or torch.isfinite(atk.store.delta).all()


def test_image_size_differing_from_the_store_is_refused():
    atk = atas.ATAS(eps=0.1, num_samples=16)
    x, y = batches(4)
    atk.perturb(tiny_net(), x, y, torch.arange(4))
    bigger = torch.rand(4, 1, 10, 10)
    net = nn.Sequential(nn.Flatten(), nn.Linear(100, 10))
    with pytest.raises(ValueError, match="image size"):
        atk.perturb(net, bigger, y, torch.arange(4))


def test_resuming_with_a_store_of_another_size_is_refused():
    atk = atas.ATAS(eps=0.1, num_samples=16)
    x, y = batches(4)
    atk.perturb(tiny_net(), x, y, torch.arange(4))
    other = atas.ATAS(eps=0.1, num_samples=20)
    with pytest.raises(ValueError, match="num_samples=16.*num_samples=20"):
        other.load_state_dict(atk.state_dict())


def test_augment_without_the_paired_crop_is_refused():
    atk = atas.ATAS(eps=0.1, num_samples=16, augment=atas.RandomCropFlip(pad=1))
    x, y = batches(4)
    with pytest.raises(RuntimeError, match="augment_batch"):
        atk.perturb(tiny_net(), x, y, torch.arange(4))


def test_random_torchvision_crops_are_explained_not_silently_misaligned():
    from torchvision import transforms

    class WithTransform(TensorDataset):
        transform = transforms.Compose([transforms.RandomCrop(8, padding=1), transforms.ToTensor()])

    ds = WithTransform(*batches(4))
    with pytest.raises(ValueError, match="RandomCrop.*RandomCropFlip"):
        atas.IndexedDataset(ds)
    assert len(atas.IndexedDataset(ds, allow_random_transforms=True)) == 4


def test_paired_crop_moves_the_prior_with_the_image():
    """The prior gathered for a batch is cropped/flipped by the same window as the image."""
    atk = atas.ATAS(eps=0.1, num_samples=4, augment=atas.RandomCropFlip(pad=2), warmup_epochs=0)
    x, y = batches(4)
    idx = torch.arange(4)
    torch.manual_seed(3)
    xa = atk.augment_batch(x, idx)
    atk.perturb(tiny_net(), xa, y, idx)
    _, cf = atk._crop
    frames = torch.nn.functional.pad(x, (2, 2, 2, 2))
    from atas.augment import crop

    assert torch.equal(crop(frames, cf), xa)
    assert atk.store.frame == 12
