"""Mixed precision and memory layout: the ATAS step under bf16 autocast matches fp32 on the same batch."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from atas.augment import sample_crop_flip
from atas.methods import BatchState
from atas.methods.atas import ATAS
from atas.store import PerSampleStore
from tests.helpers import needs_fmnist


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x):
        return self.fc(F.relu(self.c2(F.relu(self.bn(self.c1(x))))).flatten(1))


def _step(autocast: bool, channels_last: bool = False):
    torch.manual_seed(0)
    model = _Net()
    x, y = torch.rand(64, 3, 8, 8), torch.randint(0, 10, (64,))
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    store = PerSampleStore(64, (3, 8, 8), eps=8 / 255)
    store.grad_sq_ema.fill_(1e-6)
    idx = torch.arange(64)
    cf = sample_crop_flip(64, 8, 8, False, "cpu")
    method = ATAS(8 / 255, ATAS.Options(warmup_epochs=0))
    state = BatchState(idx, 1, store, store.gather_delta(idx, cf))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        x_adv = method.attack(model, x, y, state)
    return x_adv, method.stats["alpha"], store.grad_sq_ema.clone(), x


def test_atas_step_under_bf16_autocast_matches_fp32():
    adv32, alpha32, v32, x = _step(False)
    adv16, alpha16, v16, _ = _step(True)
    assert v16.dtype == torch.float32 and alpha16.dtype == torch.float32  # norms and EMA kept in fp32
    assert torch.allclose(v16, v32, rtol=0.1)  # bf16 activations: a few % on the norm
    assert torch.allclose(alpha16, alpha32, rtol=0.05)
    agree = ((adv16 - x).sign() == (adv32 - x).sign()).float().mean()
    assert agree > 0.9  # the signed step points the same way
    assert (adv16 - x).abs().max() <= 8 / 255 + 1e-6 and adv16.dtype == torch.float32


def test_channels_last_gives_the_same_step():
    adv, alpha, v, _ = _step(False)
    adv_cl, alpha_cl, v_cl, _ = _step(False, channels_last=True)
    assert torch.allclose(alpha, alpha_cl, rtol=1e-4) and torch.allclose(adv, adv_cl, atol=1e-6)


@needs_fmnist
def test_training_runs_under_bf16_and_channels_last(tmp_path):
    from atas.config import load_config
    from atas.trainer import train

    cfg = load_config(
        "fmnist",
        [
            "model.arch=wong_cnn",
            "data.subset=256",
            "train.batch_size=64",
            "train.epochs=1",
            "train.amp=bf16",
            "train.channels_last=true",
            "train.probe_size=32",
            "train.co_action=keep_best",
            "train.probe_steps=1",
            "train.progress=false",
            "eval.at_end=false",
            f"out_dir={tmp_path}",
        ],
    )
    run = train(cfg, run_dir=tmp_path / "r")
    assert run.metrics[0]["train_loss"] == run.metrics[0]["train_loss"]  # finite, not NaN
    assert all(p.dtype == torch.float32 for p in run.model.parameters())  # master weights stay fp32
