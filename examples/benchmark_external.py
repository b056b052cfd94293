"""Evaluate a model that atas did not train: your architecture, your weights, atas's evaluation.

    python examples/benchmark_external.py --weights ckpt.pt --data fmnist --eps 0.2 --n-examples 1000

The same from the command line, with the model factory named as module:function:

    atas eval --model examples.own_loop:small_cnn --weights weights.safetensors --data fmnist --eps 0.2

The model is evaluated in eval() mode on unpadded test images in [0, 1]; a model that expects
normalised inputs gets `normalization=(mean, std)` inside a wrapper; bf16/fp16 models work as they are.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import atas

sys.path.insert(0, str(Path(__file__).resolve().parent))
from own_loop import small_cnn


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", required=True, help="a checkpoint of examples/own_loop.py or a state dict")
    p.add_argument("--data", default="fmnist", help="dataset name (its unpadded test split)")
    p.add_argument("--eps", default="0.2", help="L-inf radius, e.g. 0.2 or 8/255")
    p.add_argument("--attacks", default="clean,pgd,aa")
    p.add_argument("--n-examples", type=int, default=1000)
    p.add_argument("--bf16", action="store_true", help="evaluate the model in bfloat16")
    args = p.parse_args(argv)

    model = small_cnn()
    state = torch.load(args.weights, map_location="cpu", weights_only=True)   # never unpickles code
    model.load_state_dict(state.get("model", state))
    if args.bf16:
        model = model.to(torch.bfloat16)
    result = atas.benchmark(model, args.data, args.eps, attacks=args.attacks.split(","), n_examples=args.n_examples)
    print(atas.format_table(result))
    return result


if __name__ == "__main__":
    main()
