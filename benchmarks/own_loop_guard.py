"""The guard in your own loop, on real data: FGSM-RS on 20,000 Fashion-MNIST training images, Wong
et al.'s MNIST CNN (normalisation inside the model), SGD 0.05 with momentum, atas.Guard with a probe
of 256 held-out test images (clean, FGSM, PGD-10: what the monitor needs). Prints the probe per
epoch, every flag and the guard's decisions, and the run's outcome.

    python benchmarks/own_loop_guard.py --eps 0.3 --epochs 8 --seed 0
"""

import argparse
import time

import torch
import torch.nn as nn
from torchvision import transforms

import atas
from atas.data import load_tensors


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--eps", type=float, default=0.3)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-recoveries", type=int, default=3)
    p.add_argument("--n-train", type=int, default=20000)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    x, y = load_tensors("fmnist", "train", None, False)
    x_train, y_train = x[: args.n_train].float() / 255, y[: args.n_train]
    x_test, y_test = load_tensors("fmnist", "test", None, False)
    x_val, y_val = x_test[-256:], y_test[-256:]  # held out: the evaluation uses the first test images
    model = nn.Sequential(
        transforms.Normalize((0.2860,), (0.3530,)), nn.Conv2d(1, 16, 4, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 4, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(32 * 7 * 7, 100), nn.ReLU(), nn.Linear(100, 10),
    )  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    train_set = torch.utils.data.TensorDataset(x_train, y_train)
    loader = torch.utils.data.DataLoader(atas.IndexedDataset(train_set), batch_size=128, shuffle=True)
    atk = atas.FGSMRS(eps=args.eps, num_samples=len(train_set))
    guard = atas.Guard(model, opt, atk, probe=atas.Probe(x_val, y_val, eps=args.eps),
                       max_recoveries=args.max_recoveries)  # fmt: skip
    t0 = time.time()
    for epoch in guard.epochs(args.epochs):
        for xb, yb, idx in atk.batches(loader):
            loss = atk.loss(model, atk.perturb(model, xb, yb, idx), yb, xb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        guard.end_epoch(epoch, row={"train_loss": loss.item()})
        r = [r for r in guard.rows if "event" not in r][-1]
        print(f"epoch {epoch}: train loss {loss.item():.3f}, probe clean {r['probe_clean']:.3f} FGSM "
              f"{r['probe_fgsm']:.3f} PGD {r['probe_pgd']:.3f} ({time.time() - t0:.0f} s)", flush=True)  # fmt: skip
    final = atas.Probe(x_val, y_val, eps=args.eps)(model)
    print(f"outcome: {guard.outcome}; final weights: probe clean {final['probe_clean']:.3f} PGD "
          f"{final['probe_pgd']:.3f}; options: {atk.opt}")  # fmt: skip


if __name__ == "__main__":
    main()
