"""Evaluate any classifier, trained by atas or not: `atas.benchmark(model, data, eps)`.

    result = atas.benchmark(model, "cifar10", "8/255", normalization=((0.49, 0.48, 0.45), (0.25, 0.24, 0.26)))
    result = atas.benchmark(model, (x_test, y_test), 0.2, attacks=["clean", "pgd", "aa"], n_examples=1000)
    result = atas.benchmark(model, test_loader, 0.1)
    print(atas.format_table(result))

The model is evaluated as it is: on its own device and in its own dtype (a bf16/fp16 model gets
float32 images in [0, 1] cast to its dtype inside a wrapper, and its logits back as float32), in
eval() mode. A model that expects normalised inputs gets `normalization=(mean, std)` applied
inside the wrapper, so every attack still works in [0, 1] pixel space.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, cast

import torch
import torch.nn as nn

from atas.config import Config, Frac, parse_fraction
from atas.evaluation.protocol import evaluate, fingerprint_model
from atas.evaluation.run import load_test_set


class InputAdapter(nn.Module):
    """logits = model(((x - mean) / std).to(dtype)).float() for x in [0, 1]: normalisation and the
    model's dtype inside the model, as the evaluation protocol wants."""

    def __init__(self, model: nn.Module, mean=None, std=None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.model, self.dtype = model, dtype
        if (mean is None) != (std is None):
            raise ValueError("normalization needs both mean and std")
        if mean is not None:
            mean_t = torch.as_tensor(tuple(mean) if not torch.is_tensor(mean) else mean, dtype=torch.float32)
            std_t = torch.as_tensor(tuple(std) if not torch.is_tensor(std) else std, dtype=torch.float32)
            if mean_t.numel() != std_t.numel() or (std_t <= 0).any():
                raise ValueError(f"normalization: mean and std need one positive std per mean, got {mean!r}, {std!r}")
            self.register_buffer("mean", mean_t.view(1, -1, 1, 1))
            self.register_buffer("std", std_t.view(1, -1, 1, 1))
        else:
            self.mean = self.std = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return self.model(x.to(self.dtype)).float()


def _model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    tensor: torch.Tensor | None = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    if tensor is None:
        return torch.float32, torch.device("cpu")
    return (tensor.dtype if tensor.is_floating_point() else torch.float32), tensor.device


def _collect(data: Iterable, n_examples: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) from a DataLoader or map-style Dataset whose items start with (x, y)."""
    xs, ys, n = [], [], 0
    is_loader = isinstance(data, torch.utils.data.DataLoader)
    items = data if is_loader else (cast(Any, data)[i] for i in range(len(cast(Any, data))))  # a map-style Dataset
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise ValueError(f"each batch/item of the data must be (x, y, ...), got {type(item).__name__}")
        x, y = torch.as_tensor(item[0]), torch.as_tensor(item[1])
        if not is_loader:
            x, y = x.unsqueeze(0), y.reshape(1)
        xs.append(x)
        ys.append(y)
        n += len(x)
        if n_examples is not None and n >= n_examples:
            break
    if not xs:
        raise ValueError("the data is empty")
    return torch.cat(xs), torch.cat(ys)


def benchmark(
    model: nn.Module,
    data,
    eps: float | str,
    attacks: Sequence[str] = ("clean", "pgd", "aa"),
    *,
    normalization: tuple | None = None,
    n_examples: int | None = None,
    data_dir=None,
    batch_size: int = 256,
    device=None,
    seed: int = 0,
    progress: bool = True,
    **kwargs,
) -> dict:
    """Robust accuracy of any classifier under L-inf attacks of radius `eps`.

    Args:
        model: maps images to logits; evaluated on its own device and dtype, in eval() mode.
        data: a dataset name ("fmnist", "cifar10", ...; its unpadded test split), a tuple (x, y) of
            tensors (x uint8 or float in [0, 1], [N, C, H, W]), or a DataLoader / Dataset of
            (x, y[, idx]) items with x in [0, 1].
        eps: radius in pixels: a float (0.2) or an exact fraction ("8/255").
        attacks: names as for `atas.evaluate` ("clean", "fgsm", "pgd", "aa", "apgd-ce", "apgd-t").
        normalization: (mean, std) per channel when the model expects normalised inputs.
        n_examples: the first n examples (None: all).
        kwargs: passed to `atas.evaluate` (pgd_steps, pgd_restarts, state_path, ...).
    Returns: the result dict of `atas.evaluate` (print it with `atas.format_table`), with what was
        measured: "model" {"class", "sha256" of its state dict, "normalization"} and "data" {"name",
        "folder", "split", "images", "sha256" of the images and labels evaluated} ("request" holds
        every setting; "request_sha256" names it).
    """
    # A Frac (atas eval --eps, a config's method.eps) carries how it was written; a string is parsed here, once.
    label = eps.text if isinstance(eps, Frac) else eps.strip() if isinstance(eps, str) else None
    eps = parse_fraction(eps)
    if n_examples is not None and (int(n_examples) != n_examples or n_examples < 1):
        raise ValueError(f"n_examples must be a positive integer or None (all), got {n_examples!r}")
    if isinstance(data, (str, Config)):
        x, y = load_test_set(data, n_examples, data_dir)
    elif isinstance(data, (tuple, list)) and len(data) == 2 and torch.is_tensor(data[0]):
        x, y = data
    else:
        x, y = _collect(data, n_examples)
    dtype, model_device = _model_dtype_device(model)
    wrapped: nn.Module = model
    if normalization is not None or dtype != torch.float32:
        mean, std = normalization if normalization is not None else (None, None)
        wrapped = InputAdapter(model, mean, std, dtype).to(model_device).eval()
    modes = [(m, m.training) for m in model.modules()]
    model.eval()  # evaluation is in eval() mode by definition: no warning for a freshly built model
    try:
        result = evaluate(
            wrapped,
            x,
            y,
            eps,
            attacks,
            n_examples=n_examples,
            batch_size=batch_size,
            device=device if device is not None else model_device,
            seed=seed,
            progress=progress,
            eps_label=label,
            **kwargs,
        )
    finally:
        for m, training in modes:
            m.training = training
    result["model"] = {
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "sha256": fingerprint_model(model),
        "normalization": None if normalization is None else [list(map(float, v)) for v in normalization],
    }
    result["data"] = {
        **_data_identity(data, data_dir),
        "split": "test" if isinstance(data, (str, Config)) else None,
        "images": f"the first {result['n_examples']}",
        "sha256": result["request"]["data_sha256"],
    }
    return result


def _data_identity(data, data_dir) -> dict:
    """Which data a benchmark measured on: a dataset by name and the folder it was read from;
    tensors or a loader by what they are (their sha256 is in the result's "data")."""
    if isinstance(data, (str, Config)):
        from atas.data import data_source, dataset_info

        name = dataset_info(data.data.name if isinstance(data, Config) else data).name
        folder = data_source(name, "test", data.data.data_dir if isinstance(data, Config) else data_dir)
        return {"name": name, "folder": None if folder is None else str(folder)}
    return {"name": None, "folder": None, "source": type(data).__name__}
