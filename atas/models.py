"""Architectures, the name -> factory registry, and the wrapper that puts normalisation inside.

Every model `atas` trains or evaluates is a `NormalizedModel`: it takes images in [0, 1] and
normalises them itself, so attacks, eps and projections all live in pixel space (RobustBench
convention). The bare networks below never see [0, 1] pixels directly.

Architectures are looked up by name in `MODELS` (filled by `@register`), never with `eval`:

    model = build_model("preact_resnet18", num_classes=10,
                        mean=(0.4914, 0.4822, 0.4465), std=(0.2471, 0.2435, 0.2616))
    twin = build_model(**model.spec)          # what a checkpoint stores to rebuild it

Helpers for checkpoints written by wrapped models: `unwrap` strips DataParallel /
DistributedDataParallel / torch.compile wrappers, `clean_state_dict` strips their key prefixes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from atas.registry import Registry

__all__ = [
    "MODELS",
    "NormalizedModel",
    "register",
    "build_model",
    "list_models",
    "unwrap",
    "clean_state_dict",
    "count_parameters",
    "WongCNN",
    "SmallCNN",
    "PreActResNet",
    "WideResNet",
    "wide_resnet",
]


# ---------------------------------------------------------------------------------------------
# The normalising wrapper
# ---------------------------------------------------------------------------------------------


class NormalizedModel(nn.Module):
    """logits = net((x - mean) / std) for images x in [0, 1], shape [B, C, H, W].

    mean and std are buffers of shape [1, C, 1, 1], so they follow .to(device) and are saved in
    the state dict. `arch` and `arch_kwargs` record how the net was built; `spec` turns them back
    into the keyword arguments of `build_model`.
    """

    mean: torch.Tensor  # buffers (register_buffer below), declared for the type checker
    std: torch.Tensor

    def __init__(
        self,
        net: nn.Module,
        mean: Iterable[float],
        std: Iterable[float],
        arch: str | None = None,
        arch_kwargs: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        mean_t = torch.as_tensor(tuple(mean), dtype=torch.float32).view(1, -1, 1, 1)
        std_t = torch.as_tensor(tuple(std), dtype=torch.float32).view(1, -1, 1, 1)
        if mean_t.shape != std_t.shape:
            raise ValueError(f"mean has {mean_t.numel()} channels but std has {std_t.numel()}")
        if (std_t <= 0).any():
            raise ValueError(f"std must be positive, got {std_t.flatten().tolist()}")
        self.net = net
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)
        self.arch = arch
        self.arch_kwargs = dict(arch_kwargs or {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)

    @property
    def spec(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this model: `build_model(**model.spec)`."""
        if self.arch is None:
            raise ValueError("this NormalizedModel was not built by build_model; no spec to give")
        return {
            "name": self.arch,
            **self.arch_kwargs,
            "mean": tuple(self.mean.flatten().tolist()),
            "std": tuple(self.std.flatten().tolist()),
        }

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

# name -> factory(num_classes, in_channels=3, **kwargs) -> bare nn.Module (no normalisation).
# Packages add theirs through the entry-point group "atas.models" (atas.registry).
MODELS = Registry(
    "model",
    group="atas.models",
    hint=" (a model registered by your own code with atas.register_model needs `--import your.module` "
    "on the command line)",
)


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: `@register("wrn28_10")` adds a factory to MODELS under that name."""
    return MODELS.register(name)


def list_models() -> list[str]:
    return MODELS.names()


def _per_channel(values: float | Iterable[float] | None, default: float, channels: int, what: str) -> tuple[float, ...]:
    if values is None:
        return (default,) * channels
    if isinstance(values, (int, float)):
        return (float(values),) * channels
    values = tuple(float(v) for v in values)
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise ValueError(f"{what} has {len(values)} entries but the model takes {channels} channels")
    return values


def build_model(
    name: str,
    num_classes: int,
    in_channels: int = 3,
    mean: float | Iterable[float] | None = None,
    std: float | Iterable[float] | None = None,
    **kwargs: Any,
) -> NormalizedModel:
    """Build the registered architecture `name` and wrap it in its normalisation.

    mean/std: one value per input channel (or one value for all). None means no normalisation
    (mean 0, std 1); the dataset module supplies the real statistics. Extra keyword arguments go
    to the architecture's factory and are recorded in `model.spec`.
    """
    net = MODELS.get(name)(num_classes=num_classes, in_channels=in_channels, **kwargs)
    return NormalizedModel(
        net,
        mean=_per_channel(mean, 0.0, in_channels, "mean"),
        std=_per_channel(std, 1.0, in_channels, "std"),
        arch=name,
        arch_kwargs={"num_classes": num_classes, "in_channels": in_channels, **kwargs},
    )


# ---------------------------------------------------------------------------------------------
# Wrappers and checkpoints
# ---------------------------------------------------------------------------------------------

_PARALLEL_WRAPPERS = (nn.DataParallel, nn.parallel.DistributedDataParallel)


def unwrap(model: nn.Module) -> nn.Module:
    """The module under any stack of DataParallel / DDP (`.module`) and torch.compile
    (`._orig_mod`) wrappers, e.g. compile(DDP(model)) -> model."""
    while True:
        if isinstance(model, _PARALLEL_WRAPPERS):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = cast(nn.Module, model._orig_mod)
        else:
            return model


def _clean_key(key: str) -> str:
    parts = key.split(".")
    # Wrappers only ever sit above the model, so a leading run of `module`/`_orig_mod` is theirs.
    # `_orig_mod` also appears mid-key when a submodule alone was compiled
    # (model.net = torch.compile(model.net)); no real layer has that name, so drop it anywhere.
    # A mid-key `module` is kept: an ordinary layer may well be called that.
    while parts and parts[0] in ("module", "_orig_mod"):
        parts.pop(0)
    return ".".join(p for p in parts if p != "_orig_mod")


def clean_state_dict(state_dict: Mapping[str, Any]) -> OrderedDict[str, Any]:
    """The state dict with DataParallel/DDP (`module.`) and torch.compile (`_orig_mod.`) key
    prefixes removed, so it loads into the bare model. Raises if two keys collapse into one."""
    cleaned: OrderedDict[str, Any] = OrderedDict()
    for key, value in state_dict.items():
        new_key = _clean_key(key)
        if new_key in cleaned:
            raise ValueError(f"keys collide after cleaning: {key!r} -> {new_key!r}")
        cleaned[new_key] = value
    # load_state_dict reads per-module versions (e.g. old BatchNorm) from `_metadata`; keep it,
    # under the cleaned names. The wrapper's own "" entry is overwritten by the inner model's.
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        setattr(cleaned, "_metadata", OrderedDict((_clean_key(k), v) for k, v in metadata.items()))  # noqa: B010
    return cleaned


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (each shared tensor counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# ---------------------------------------------------------------------------------------------
# MNIST-size networks (28x28)
# ---------------------------------------------------------------------------------------------


class WongCNN(nn.Sequential):
    """Wong, Rice & Kolter (ICLR 2020), "Fast is better than free", MNIST model: two strided
    4x4 convolutions and two linear layers; 28x28 inputs only (the flatten is 32*7*7)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__(
            nn.Conv2d(in_channels, 16, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(32 * 7 * 7, 100),
            nn.ReLU(),
            nn.Linear(100, num_classes),
        )


class SmallCNN(nn.Module):
    """The SmallCNN of Madry et al. / TRADES (Zhang et al., ICML 2019) for 28x28 inputs:
    conv32-conv32-pool-conv64-conv64-pool-fc200-fc200-fc, 3x3 valid convolutions, ReLU.

    batch_norm: BatchNorm after every conv (off in TRADES; off by default).
    dropout: before the second fc layer; TRADES uses 0.5, which is the default.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, batch_norm: bool = False, dropout: float = 0.5):
        super().__init__()

        def conv(c_in: int, c_out: int) -> list[nn.Module]:
            layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, bias=not batch_norm)]
            if batch_norm:
                layers.append(nn.BatchNorm2d(c_out))
            return layers + [nn.ReLU()]

        # 28 -> 26 -> 24 -> 12 -> 10 -> 8 -> 4
        self.features = nn.Sequential(
            *conv(in_channels, 32),
            *conv(32, 32),
            nn.MaxPool2d(2),
            *conv(32, 64),
            *conv(64, 64),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 200),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(200, 200),
            nn.ReLU(),
            nn.Linear(200, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # Deliberate deviation: TRADES also zeroes the last layer's weight, which makes the input
        # gradient exactly 0 at initialisation, so the first attack step of adversarial training
        # would be a no-op. We keep PyTorch's default init for the linear layers.

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register("wong_cnn")
def wong_cnn(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    return WongCNN(num_classes, in_channels)


@register("small_cnn")
def small_cnn(num_classes: int = 10, in_channels: int = 1, batch_norm: bool = False, dropout: float = 0.5) -> nn.Module:
    return SmallCNN(num_classes, in_channels, batch_norm=batch_norm, dropout=dropout)


# ---------------------------------------------------------------------------------------------
# CIFAR-size networks (32x32)
# ---------------------------------------------------------------------------------------------


class PreActBlock(nn.Module):
    """He et al. (ECCV 2016) pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-conv3x3, with a
    1x1 conv as shortcut when the shape changes.

    The 1x1 shortcut reads the block's raw input x, as in the PreActResNet-18 of Wong et al.
    (ICLR 2020) and of the official ATAS code: the network their CIFAR numbers come from.
    Subclasses set `shortcut_preactivated = True` to feed it relu(bn1(x)) instead (WideBlock).
    """

    shortcut_preactivated = False

    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        if self.shortcut is None:
            shortcut = x
        else:
            shortcut = self.shortcut(out if self.shortcut_preactivated else x)
        out = self.conv1(out)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + shortcut


class PreActResNet(nn.Module):
    """PreActResNet with a CIFAR stem (3x3 conv, stride 1, no max-pool), as used by Wong et al.
    and the official ATAS code: four stages of 64/128/256/512 channels, final BN-ReLU, global
    average pooling (4x4 at 32x32 input), linear."""

    def __init__(self, blocks_per_stage: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        stages, c_in = [], 64
        for i, n in enumerate(blocks_per_stage):
            c_out = 64 * 2**i
            blocks = []
            for j in range(n):
                blocks.append(PreActBlock(c_in, c_out, stride=2 if (i > 0 and j == 0) else 1))
                c_in = c_out
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn = nn.BatchNorm2d(c_in)
        self.linear = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


@register("preact_resnet18")
def preact_resnet18(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return PreActResNet((2, 2, 2, 2), num_classes, in_channels)


class BasicBlock(nn.Module):
    """He et al. (CVPR 2016) basic block, post-activation: conv3x3-BN-ReLU-conv3x3-BN, plus the
    shortcut (identity, or 1x1 conv + BN when the shape changes), then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet with a CIFAR stem: 3x3 conv (stride 1) + BN + ReLU, no max-pool; four stages of
    64/128/256/512 channels (stride 2 from the second), global average pooling (4x4 at 32x32), linear.
    The ResNet-18 of the FastAT benchmark (arXiv 2604.22853) and of most CIFAR adversarial-training
    papers; unlike torchvision's `resnet18` (7x7 stride-2 stem and max-pool: 8x smaller feature maps)."""

    def __init__(self, blocks_per_stage: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages, c_in = [], 64
        for i, n in enumerate(blocks_per_stage):
            c_out = 64 * 2**i
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(c_in, c_out, stride=2 if (i > 0 and j == 0) else 1))
                c_in = c_out
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


@register("resnet18_cifar")
def resnet18_cifar(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return CifarResNet((2, 2, 2, 2), num_classes, in_channels)


class WideBlock(PreActBlock):
    """Zagoruyko & Komodakis (BMVC 2016) wide basic block, BN-ReLU pre-activation:
    BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3 (the pre-activation block with dropout). When the
    shape changes, the 1x1 shortcut conv takes the pre-activated input relu(bn1(x)), unlike
    PreActBlock: that is how the WideResNet of the official ATAS code (and of the WRN reference
    CIFAR implementation it follows) computes it, so the WRN-28-10 recipes train that network."""

    shortcut_preactivated = True

    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float):
        super().__init__(c_in, c_out, stride, dropout)


class WideResNet(nn.Module):
    """WRN-depth-k for CIFAR: 3x3 stem of 16 channels, three groups of (depth - 4) / 6 wide
    blocks with 16k/32k/64k channels (strides 1/2/2), final BN-ReLU, global average pooling
    (8x8 at 32x32 input), linear."""

    def __init__(
        self, depth: int = 28, widen_factor: int = 10, num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0
    ):
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        groups = []
        for g, stride in enumerate((1, 2, 2)):
            blocks = [
                WideBlock(widths[g] if j == 0 else widths[g + 1], widths[g + 1], stride if j == 0 else 1, dropout)
                for j in range(n)
            ]
            groups.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = groups
        self.bn = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


def wide_resnet(
    depth: int, widen_factor: int, num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0
) -> WideResNet:
    """Any WRN-depth-widen_factor; dropout 0 as in the adversarial-training literature."""
    return WideResNet(depth, widen_factor, num_classes, in_channels, dropout)


@register("wrn28_10")
def wrn28_10(num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0) -> nn.Module:
    return wide_resnet(28, 10, num_classes, in_channels, dropout)


@register("wrn34_10")
def wrn34_10(num_classes: int = 10, in_channels: int = 3, dropout: float = 0.0) -> nn.Module:
    return wide_resnet(34, 10, num_classes, in_channels, dropout)


# ---------------------------------------------------------------------------------------------
# ImageNet-size networks (torchvision, randomly initialised; nothing is downloaded)
# ---------------------------------------------------------------------------------------------


def _torchvision_resnet(
    builder: Callable[..., nn.Module], num_classes: int, in_channels: int, **kwargs: Any
) -> nn.Module:
    net = builder(weights=None, num_classes=num_classes, **kwargs)
    if in_channels != 3:
        old: Any = net.conv1  # a Conv2d; its shape attributes are typed loosely by torch
        net.conv1 = nn.Conv2d(
            in_channels, old.out_channels, old.kernel_size, stride=old.stride, padding=old.padding, bias=False
        )
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    return net


@register("resnet18")
def resnet18(num_classes: int = 1000, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    return _torchvision_resnet(torchvision.models.resnet18, num_classes, in_channels, **kwargs)


@register("resnet50")
def resnet50(num_classes: int = 1000, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    return _torchvision_resnet(torchvision.models.resnet50, num_classes, in_channels, **kwargs)
