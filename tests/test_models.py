"""Tests for exactlr.models: architectures, parameter counts, init presets, reinitialize."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from exactlr.models import (
    MODELS,
    build_model,
    count_parameters,
    fc_net,
    lenet,
    reinitialize,
    vgg9,
)


def _linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def _conv(c_in: int, c_out: int, k: int) -> int:
    return c_in * c_out * k * k + c_out


def _bn(n: int) -> int:
    return 2 * n  # affine weight and bias


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(
    ("name", "dataset", "shape"),
    [
        ("fc1x1000", "mnist", (1, 28, 28)),
        ("fc3x1000", "synthetic", (1, 28, 28)),
        ("fc2x16", "cifar10", (3, 32, 32)),
        ("lenet", "mnist", (1, 28, 28)),
        ("lenet", "cifar10", (3, 32, 32)),
        ("vgg9", "cifar10", (3, 32, 32)),
        ("vgg9", "mnist", (1, 28, 28)),
    ],
)
@pytest.mark.parametrize("init", ["paper", "pytorch"])
def test_output_shapes(name: str, dataset: str, shape: tuple[int, ...], init: str) -> None:
    model = build_model(name, dataset=dataset, init=init, generator=torch.Generator())
    out = model(torch.randn(4, *shape, generator=torch.Generator().manual_seed(0)))
    assert out.shape == (4, 10)


def test_fc_parameter_counts() -> None:
    expected = _linear(784, 1000) + 2 * _linear(1000, 1000) + 3 * _bn(1000) + _linear(1000, 10)
    assert count_parameters(fc_net(3, 1000)) == expected
    assert count_parameters(build_model("fc3x1000")) == expected
    no_bn = _linear(784, 1000) + 2 * _linear(1000, 1000) + _linear(1000, 10)
    assert count_parameters(fc_net(3, 1000, init="pytorch")) == no_bn
    assert count_parameters(fc_net(1, 1000)) == _linear(784, 1000) + _bn(1000) + _linear(1000, 10)


def test_lenet_parameter_counts() -> None:
    features = 16 * 5 * 5  # 28 -conv-> 26 -pool-> 13 -conv-> 11 -pool-> 5
    expected = (
        _conv(1, 6, 5) + _bn(6) + _conv(6, 16, 5) + _bn(16)
        + _linear(features, 120) + _bn(120) + _linear(120, 84) + _bn(84) + _linear(84, 10)
    )  # fmt: skip
    assert count_parameters(lenet()) == expected
    cifar = lenet(in_channels=3, image_size=32)  # 32 -> 30 -> 15 -> 13 -> 6
    first_linear = next(m for m in cifar.modules() if isinstance(m, nn.Linear))
    assert first_linear.in_features == 16 * 6 * 6
    assert (
        count_parameters(cifar)
        == expected - _conv(1, 6, 5) + _conv(3, 6, 5) + (16 * 36 - features) * 120
    )


def test_vgg9_parameter_counts() -> None:
    convs = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 256)]
    expected = sum(_conv(a, b, 3) + _bn(b) for a, b in convs)
    expected += _linear(4096, 256) + _bn(256) + _linear(256, 10)
    model = vgg9()
    assert count_parameters(model) == expected
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 7
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 2


@pytest.mark.parametrize(("builder", "sigma"), [(fc_net, 0.04), (lenet, 0.1), (vgg9, 0.045)])
def test_paper_preset(builder, sigma: float) -> None:
    torch.manual_seed(0)
    model = builder()
    assert model.exactlr_init == {"preset": "paper", "sigma": sigma}
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    flat = torch.cat([w.detach().flatten() for w in weights])
    assert flat.std().item() == pytest.approx(sigma, rel=0.02)
    assert abs(flat.mean().item()) < 0.05 * sigma
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            assert torch.count_nonzero(m.bias) == 0
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(not m.track_running_stats and m.affine for m in norms)
    assert all(m.running_mean is None for m in norms)
    # The head gives plain logits: nothing after the last Linear.
    assert isinstance(list(model.children())[-1], nn.Linear)


@pytest.mark.parametrize("builder", [fc_net, lenet, vgg9])
def test_pytorch_preset_has_no_batchnorm(builder) -> None:
    model = builder(init="pytorch")
    assert model.exactlr_init["preset"] == "pytorch"
    assert not any(isinstance(m, nn.modules.batchnorm._NormBase) for m in model.modules())
    assert any(torch.count_nonzero(m.bias) > 0 for m in model.modules() if isinstance(m, nn.Linear))


def test_unknown_preset() -> None:
    with pytest.raises(ValueError, match="init='xavier'"):
        fc_net(init="xavier")
    with pytest.raises(ValueError, match="init='xavier'"):
        build_model("lenet", init="xavier")


@pytest.mark.parametrize("init", ["paper", "pytorch"])
def test_reinitialize_reproducible_without_global_rng(init: str) -> None:
    model = lenet(init=init)
    state = torch.get_rng_state()
    a = _weights(reinitialize(model, generator=torch.Generator().manual_seed(1)))
    b = _weights(reinitialize(model, generator=torch.Generator().manual_seed(1)))
    c = _weights(reinitialize(model, generator=torch.Generator().manual_seed(2)))
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_reinitialize_foreign_model() -> None:
    model = nn.Sequential(nn.Linear(5, 3), nn.LayerNorm(3), nn.Linear(3, 2))
    state = torch.get_rng_state()
    a = _weights(reinitialize(model, generator=torch.Generator().manual_seed(5)))
    b = _weights(reinitialize(model, generator=torch.Generator().manual_seed(5)))
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    before = _weights(model)
    reinitialize(model)  # global RNG: a fresh draw
    assert not torch.equal(before[0], model[0].weight)


def test_reinitialize_resets_trained_values() -> None:
    model = fc_net(1, 8, in_features=4)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(3.0)
    reinitialize(model, generator=torch.Generator().manual_seed(0))
    assert torch.count_nonzero(model[1].bias) == 0
    assert torch.equal(model[2].weight, torch.ones(8)) and torch.count_nonzero(model[2].bias) == 0


def test_build_model_is_seeded_and_leaves_global_rng() -> None:
    state = torch.get_rng_state()
    a = build_model("fc1x1000", generator=torch.Generator().manual_seed(0))
    b = build_model("fc1x1000", generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert build_model("fc1x1000").exactlr_init == {"preset": "paper", "sigma": 0.04}


def test_build_model_names_and_errors() -> None:
    assert set(MODELS) == {"fc1x1000", "fc3x1000", "fc5x3000", "lenet", "vgg9"}
    assert count_parameters(build_model("fc2x7")) == (
        _linear(784, 7) + _linear(7, 7) + 2 * _bn(7) + _linear(7, 10)
    )
    assert build_model("fc1x10", dataset="cifar10")[1].in_features == 3 * 32 * 32
    assert build_model("lenet", dataset="cifar10")[0].in_channels == 3
    assert build_model("vgg9", dataset="mnist")[0].in_channels == 1
    with pytest.raises(ValueError, match=r"name='resnet'.*fc1x1000.*vgg9"):
        build_model("resnet")
    with pytest.raises(ValueError, match="dataset='svhn'"):
        build_model("lenet", dataset="svhn")
    with pytest.raises(ValueError, match="depth=0"):
        build_model("fc0x10")
