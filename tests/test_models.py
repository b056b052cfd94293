"""CPU tests for atas.models: every registered architecture, the normalising wrapper, the
registry's error, and the unwrap / clean_state_dict helpers for checkpoints of wrapped models."""

import pytest
import torch
import torch.nn as nn

from atas.models import (
    MODELS,
    NormalizedModel,
    build_model,
    clean_state_dict,
    count_parameters,
    list_models,
    register,
    unwrap,
)

# The input each architecture is meant for (C, H, W). A newly registered name without an entry
# here fails the shape test on purpose: add it.
INPUT_SHAPE = {
    "wong_cnn": (1, 28, 28),
    "small_cnn": (1, 28, 28),
    "preact_resnet18": (3, 32, 32),
    "resnet18_cifar": (3, 32, 32),
    "wrn28_10": (3, 32, 32),
    "wrn34_10": (3, 32, 32),
    "resnet18": (3, 64, 64),
    "resnet50": (3, 64, 64),
}


def _build(name: str, num_classes: int = 7, **kwargs) -> NormalizedModel:
    torch.manual_seed(0)
    channels = INPUT_SHAPE[name][0]
    return build_model(name, num_classes, in_channels=channels, mean=[0.5] * channels, std=[0.25] * channels, **kwargs)


@pytest.mark.parametrize("name", list_models())
def test_shape_and_input_gradient(name):
    assert name in INPUT_SHAPE, f"add {name!r} to INPUT_SHAPE"
    model = _build(name)
    x = torch.rand(2, *INPUT_SHAPE[name], requires_grad=True)
    logits = model(x)
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()
    logits.logsumexp(dim=1).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert model.arch == name


def test_every_name_has_a_factory_and_list_is_sorted():
    assert list_models() == sorted(MODELS)
    assert set(INPUT_SHAPE) <= set(MODELS)


@pytest.mark.parametrize("name", ["small_cnn", "preact_resnet18"])
def test_normalisation_inside_equals_manual(name):
    model = _build(name).eval()
    assert model.mean.shape == model.std.shape == (1, INPUT_SHAPE[name][0], 1, 1)
    x = torch.rand(3, *INPUT_SHAPE[name])
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.net((x - 0.5) / 0.25))


def test_mean_std_defaults_and_broadcast():
    model = build_model("wong_cnn", 10, in_channels=1)
    assert model.mean.flatten().tolist() == [0.0] and model.std.flatten().tolist() == [1.0]
    model = build_model("preact_resnet18", 10, mean=0.5, std=(0.2,))
    assert model.mean.flatten().tolist() == [0.5] * 3
    assert model.std.shape == (1, 3, 1, 1)
    with pytest.raises(ValueError, match="channels"):
        build_model("preact_resnet18", 10, mean=(0.1, 0.2), std=(1, 1, 1))


def test_mean_std_live_in_state_dict_and_move_with_model():
    model = _build("wong_cnn")
    sd = model.state_dict()
    assert "mean" in sd and "std" in sd
    assert model.double().mean.dtype == torch.float64


def test_spec_rebuilds_same_model():
    model = _build("small_cnn", num_classes=5, batch_norm=True, dropout=0.0)
    assert model.spec["batch_norm"] is True and model.spec["num_classes"] == 5
    twin = build_model(**model.spec)
    twin.load_state_dict(model.state_dict())  # strict: same architecture, same keys
    assert isinstance(twin.net.features[1], nn.BatchNorm2d)
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(twin.eval()(x), model.eval()(x))


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        build_model("resnet1337", 10)
    message = str(err.value)
    assert "resnet1337" in message
    for name in list_models():
        assert name in message


def test_register_rejects_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        register("wong_cnn")(lambda num_classes, in_channels=3: nn.Identity())


def test_torchvision_resnet_other_in_channels():
    model = build_model("resnet18", 4, in_channels=1)
    assert model.net.conv1.in_channels == 1
    assert model(torch.rand(2, 1, 64, 64)).shape == (2, 4)


class _FakeCompiled(nn.Module):
    """Stands in for torch.compile's OptimizedModule, which keeps the original in `_orig_mod`."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self._orig_mod = module

    def forward(self, x):
        return self._orig_mod(x)


def test_unwrap_strips_every_wrapper():
    model = _build("wong_cnn")
    assert unwrap(model) is model
    assert unwrap(nn.DataParallel(model)) is model
    assert unwrap(_FakeCompiled(model)) is model
    assert unwrap(_FakeCompiled(nn.DataParallel(_FakeCompiled(model)))) is model


def test_clean_state_dict_strips_prefixes():
    value = torch.zeros(1)
    sd = {
        "module.net.0.weight": value,
        "_orig_mod.module.net.0.bias": value,
        "module._orig_mod.mean": value,
        "net._orig_mod.2.weight": value,
        "std": value,
        "net.module.weight": value,
    }
    assert list(clean_state_dict(sd)) == [
        "net.0.weight",
        "net.0.bias",
        "mean",
        "net.2.weight",
        "std",
        "net.module.weight",
    ]
    with pytest.raises(ValueError, match="collide"):
        clean_state_dict({"module.std": value, "std": value})


def test_cleaned_wrapped_state_dict_loads_into_fresh_model():
    model = _build("small_cnn", batch_norm=True)
    wrapped = _FakeCompiled(nn.DataParallel(model))
    sd = wrapped.state_dict()
    assert all(k.startswith("_orig_mod.module.") for k in sd)
    fresh = build_model(**model.spec)
    fresh.load_state_dict(clean_state_dict(sd))  # strict
    for key, tensor in fresh.state_dict().items():
        torch.testing.assert_close(tensor, model.state_dict()[key])


@pytest.mark.parametrize("name, expected", [("preact_resnet18", 11.17e6), ("wrn28_10", 36.5e6)])
def test_parameter_counts(name, expected):
    model = build_model(name, 10)
    assert count_parameters(model) == pytest.approx(expected, rel=0.01)
    for p in model.parameters():
        p.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 0


def test_real_torch_compile_wrapper():
    # torch.compile wraps lazily: nothing is compiled until the first call, which we never make.
    model = _build("wong_cnn")
    compiled = torch.compile(nn.DataParallel(model))
    assert unwrap(compiled) is model
    fresh = build_model(**model.spec)
    fresh.load_state_dict(clean_state_dict(compiled.state_dict()))
