"""ATAS in a plain PyTorch training loop: your model, your Dataset, your DataLoader.

Every line that exists only for ATAS ends with `# atas`; delete those lines (and take
`loss = F.cross_entropy(model(x), y)`) and this is ordinary training on Fashion-MNIST.

    python examples/own_loop.py --data ~/data --download            # 10 epochs, eps 0.2
    python examples/own_loop.py --data ~/data --resume ckpt.pt      # continue a killed run exactly
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

import atas  # atas


def small_cnn() -> nn.Module:
    """Wong et al.'s MNIST CNN: the user's own model, nothing of the library in it."""
    return nn.Sequential(transforms.Normalize((0.2860,), (0.3530,)),  # normalisation inside the model: attacks see [0, 1]
                         nn.Conv2d(1, 16, 4, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 32, 4, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(32 * 7 * 7, 100), nn.ReLU(), nn.Linear(100, 10))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="data", help="torchvision root holding FashionMNIST/raw")
    p.add_argument("--download", action="store_true")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--subset", type=int, default=None, help="train on the first N images")
    p.add_argument("--eps", type=float, default=0.2)
    p.add_argument("--checkpoint", default="ckpt.pt")
    p.add_argument("--resume", default=None, help="a checkpoint written by this script")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    train_set = datasets.FashionMNIST(args.data, train=True, download=args.download, transform=transforms.ToTensor())
    if args.subset:
        train_set = Subset(train_set, range(args.subset))
    loader = DataLoader(atas.IndexedDataset(train_set), batch_size=128, shuffle=True)  # atas
    model = small_cnn().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    # eps 0.2 is far from CIFAR's 8/255: steps in units of eps, no warm-up (the fmnist recipe's settings).
    atk = atas.ATAS(eps=args.eps, num_samples=len(train_set), epochs=args.epochs, augment=atas.RandomCropFlip(pad=2), step_numerator="2eps", alpha_unit="eps", alpha_min=0.5, alpha_max=1.75, warmup_epochs=0)  # atas

    start = 0
    if args.resume:
        ckpt = torch.load(args.resume, map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
        torch.set_rng_state(ckpt["rng"])
        torch.cuda.set_rng_state_all(ckpt.get("cuda_rng", []))  # on a GPU the crops and prior resets draw here
        start = ckpt["epoch"]
        atk.load_state_dict(ckpt["atas"])  # atas

    for epoch in range(start, args.epochs):
        model.train()
        total = 0.0
        for x, y, idx in atk.batches(loader, device):  # atas
            x_adv = atk.perturb(model, x, y, idx)  # atas
            loss = atk.loss(model, x_adv, y, x)  # atas
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(y)
        print(f"epoch {epoch + 1}: train loss {total / len(train_set):.3f}")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state_all(), "epoch": epoch + 1, "atas": atk.state_dict()}, args.checkpoint + ".tmp")  # atas
        os.replace(args.checkpoint + ".tmp", args.checkpoint)

    model.eval()
    test_set = datasets.FashionMNIST(args.data, train=False, transform=transforms.ToTensor())
    x, y = next(iter(DataLoader(test_set, batch_size=1000)))
    with torch.no_grad():
        clean = (model(x.to(device)).argmax(1).cpu() == y).float().mean().item()
    print(f"clean test accuracy (first 1000 images): {clean:.3f}")
    return {"clean": clean, "loss": total / len(train_set), "model": model}


if __name__ == "__main__":
    main()
