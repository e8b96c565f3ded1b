"""The paper's networks (PAPER.md section 4) and their initialisation presets.

Unlike the authors' code, every model here has `num_classes` outputs (10), returns plain
logits (no BatchNorm/ReLU after the last layer) and takes the dataset's channel count.

Presets:
- "paper": every Linear/Conv weight ~ N(0, sigma) with sigma 0.04 (FC), 0.1 (LeNet),
  0.045 (VGG-9), biases 0; BatchNorm after every hidden layer, built with
  `track_running_stats=False` (batch statistics in train and eval mode).
- "pytorch": PyTorch's default initialisation and no BatchNorm layers.

The preset is recorded on the model as `model.exactlr_init` so `reinitialize` can draw a
fresh sample of the same distribution (one sample of W in Algorithm 2).

Example:
    >>> model = build_model("fc3x1000", generator=torch.Generator().manual_seed(0))
    >>> model(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = [
    "INIT_PRESETS",
    "MODELS",
    "build_model",
    "count_parameters",
    "fc_net",
    "lenet",
    "reinitialize",
    "vgg9",
]

INIT_PRESETS: tuple[str, ...] = ("paper", "pytorch")

# Weight standard deviations of the "paper" preset, per architecture.
_PAPER_SIGMA = {"fc": 0.04, "lenet": 0.1, "vgg9": 0.045}

# Input shapes (channels, height, width) per dataset name.
_INPUT_SHAPES = {"mnist": (1, 28, 28), "synthetic": (1, 28, 28), "cifar10": (3, 32, 32)}

_FC_NAME = re.compile(r"fc(\d+)x(\d+)")


def _check_preset(init: str) -> None:
    if init not in INIT_PRESETS:
        raise ValueError(f"unknown init preset init={init!r}; valid presets: {list(INIT_PRESETS)}")


def _bn1d(init: str, width: int) -> list[nn.Module]:
    return [nn.BatchNorm1d(width, track_running_stats=False)] if init == "paper" else []


def _bn2d(init: str, channels: int) -> list[nn.Module]:
    return [nn.BatchNorm2d(channels, track_running_stats=False)] if init == "paper" else []


def _finish(model: nn.Sequential, init: str, arch: str) -> nn.Sequential:
    """Records the preset on the model and applies it."""
    sigma = _PAPER_SIGMA[arch] if init == "paper" else None
    model.exactlr_init = {"preset": init, "sigma": sigma}
    if init == "paper":
        reinitialize(model)  # global RNG, like PyTorch's own default initialisation
    return model


def fc_net(
    depth: int = 3,
    width: int = 1000,
    *,
    in_features: int = 784,
    num_classes: int = 10,
    init: str = "paper",
) -> nn.Sequential:
    """Fully connected net: `depth` hidden layers of `width` units, then a linear head.

    Flatten, Linear(in, width) [+BN1d] + ReLU, (depth - 1) x [Linear(width, width) [+BN1d]
    + ReLU], Linear(width, num_classes). BatchNorm only with the "paper" preset.

    Args:
        depth: Number of hidden layers (>= 1).
        width: Units per hidden layer.
        in_features: Flattened input size (784 for MNIST).
        num_classes: Number of outputs (logits).
        init: "paper" (N(0, 0.04) weights, BatchNorm) or "pytorch" (defaults, no BatchNorm).

    Returns:
        The model, with `model.exactlr_init` recording the preset.

    Raises:
        ValueError: A size is not positive or `init` is unknown.
    """
    _check_preset(init)
    for label, value in (("depth", depth), ("width", width), ("in_features", in_features)):
        if value <= 0:
            raise ValueError(f"{label}={value} must be positive")
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = in_features
    for _ in range(depth):
        layers += [nn.Linear(fan_in, width), *_bn1d(init, width), nn.ReLU()]
        fan_in = width
    layers.append(nn.Linear(width, num_classes))
    return _finish(nn.Sequential(*layers), init, "fc")


def lenet(
    *,
    in_channels: int = 1,
    num_classes: int = 10,
    init: str = "paper",
    image_size: int = 28,
) -> nn.Sequential:
    """LeNet as in the paper's code (conv kernel 5, padding 1, average pooling).

    Conv(in->6) [+BN2d] + ReLU + AvgPool2, Conv(6->16) [+BN2d] + ReLU + AvgPool2, Flatten,
    Linear(16*s*s -> 120) [+BN1d] + ReLU, Linear(120 -> 84) [+BN1d] + ReLU,
    Linear(84 -> num_classes), where s = 5 for 28x28 inputs (6 for 32x32).

    Args:
        in_channels: Input channels (1 for MNIST, 3 for CIFAR-10).
        num_classes: Number of outputs (logits).
        init: "paper" (N(0, 0.1) weights, BatchNorm) or "pytorch".
        image_size: Input height = width.

    Returns:
        The model, with `model.exactlr_init` recording the preset.

    Raises:
        ValueError: `init` is unknown or `image_size` is too small.
    """
    _check_preset(init)
    side = ((image_size - 2) // 2 - 2) // 2  # each conv (k5, p1) shrinks by 2, pools halve
    if side < 1:
        raise ValueError(f"image_size={image_size} is too small for LeNet (needs >= 8)")
    model = nn.Sequential(
        nn.Conv2d(in_channels, 6, kernel_size=5, padding=1),
        *_bn2d(init, 6),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Conv2d(6, 16, kernel_size=5, padding=1),
        *_bn2d(init, 16),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * side * side, 120),
        *_bn1d(init, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        *_bn1d(init, 84),
        nn.ReLU(),
        nn.Linear(84, num_classes),
    )
    return _finish(model, init, "lenet")


def vgg9(*, in_channels: int = 3, num_classes: int = 10, init: str = "paper") -> nn.Sequential:
    """VGG-9 as in the paper's code: 7 conv layers and 2 linear layers.

    3x3 same convs, each [+BN2d] + ReLU: [64, 64] - MaxPool2, [128, 128] - MaxPool2,
    [256, 256, 256], AdaptiveMaxPool2d(4), Flatten (4096), Linear(4096, 256) [+BN1d] + ReLU,
    Linear(256, num_classes).

    Args:
        in_channels: Input channels (3 for CIFAR-10).
        num_classes: Number of outputs (logits).
        init: "paper" (N(0, 0.045) weights, BatchNorm) or "pytorch".

    Returns:
        The model, with `model.exactlr_init` recording the preset.

    Raises:
        ValueError: `init` is unknown.
    """
    _check_preset(init)
    layers: list[nn.Module] = []
    channels = in_channels
    for block, pool in (((64, 64), True), ((128, 128), True), ((256, 256, 256), False)):
        for out in block:
            layers += [nn.Conv2d(channels, out, kernel_size=3, padding=1), *_bn2d(init, out)]
            layers.append(nn.ReLU())
            channels = out
        if pool:
            layers.append(nn.MaxPool2d(2))
    layers += [nn.AdaptiveMaxPool2d(4), nn.Flatten(), nn.Linear(256 * 4 * 4, 256)]
    layers += [*_bn1d(init, 256), nn.ReLU(), nn.Linear(256, num_classes)]
    return _finish(nn.Sequential(*layers), init, "vgg9")


def _normal_(weight: torch.Tensor, sigma: float, generator: torch.Generator | None) -> None:
    if generator is None or generator.device == weight.device:
        weight.normal_(0.0, sigma, generator=generator)
        return
    # Draw on the generator's device so a CPU generator gives the same weights anywhere.
    sample = torch.empty(weight.shape, dtype=weight.dtype, device=generator.device)
    weight.copy_(sample.normal_(0.0, sigma, generator=generator))


def _reset_default(model: nn.Module) -> None:
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()


def reinitialize(model: nn.Module, *, generator: torch.Generator | None = None) -> nn.Module:
    """Re-draws the model's weights in place from its own initialisation preset.

    Models built here carry `model.exactlr_init`; with the "paper" preset every Linear/Conv
    weight is drawn from N(0, sigma) with `generator`, biases are zeroed and BatchNorm is
    reset to weight 1, bias 0. With the "pytorch" preset, or for a model built elsewhere,
    every submodule's `reset_parameters()` is called; these use the global RNG, so when a
    generator is given they run under a seed drawn from it inside `torch.random.fork_rng`
    and the global RNG state (CPU and the model's CUDA devices) is unchanged afterwards.

    Args:
        model: The model.
        generator: Source of randomness; None uses the global RNG.

    Returns:
        `model`, re-initialised.

    Raises:
        ValueError: The recorded preset is unknown.
    """
    spec: dict[str, Any] = getattr(model, "exactlr_init", None) or {"preset": "pytorch"}
    preset = spec.get("preset")
    _check_preset(str(preset))
    with torch.no_grad():
        if preset == "paper":
            sigma = float(spec["sigma"])
            for module in model.modules():
                if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
                    _normal_(module.weight, sigma, generator)
                    if module.bias is not None:
                        module.bias.zero_()
                elif isinstance(module, nn.modules.batchnorm._NormBase):
                    module.reset_parameters()  # weight 1, bias 0, running stats reset
            return model
    if generator is None:
        _reset_default(model)
        return model
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    cuda_devices = sorted(
        {p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"}
    )
    with torch.random.fork_rng(devices=cuda_devices):
        torch.default_generator.manual_seed(seed)
        for index in cuda_devices:
            torch.cuda.default_generators[index].manual_seed(seed)
        _reset_default(model)
    return model


def _fc_builder(depth: int, width: int) -> Callable[..., nn.Module]:
    def build(*, input_shape: tuple[int, int, int], num_classes: int, init: str) -> nn.Module:
        return fc_net(
            depth, width, in_features=math.prod(input_shape), num_classes=num_classes, init=init
        )

    return build


def _lenet_builder(*, input_shape: tuple[int, int, int], num_classes: int, init: str) -> nn.Module:
    channels, height, width = input_shape
    if height != width:
        raise ValueError(f"LeNet needs square images, got {height}x{width}")
    return lenet(in_channels=channels, num_classes=num_classes, init=init, image_size=height)


def _vgg9_builder(*, input_shape: tuple[int, int, int], num_classes: int, init: str) -> nn.Module:
    return vgg9(in_channels=input_shape[0], num_classes=num_classes, init=init)


#: Model name -> builder taking keyword args `input_shape` (C, H, W), `num_classes`, `init`.
#: Any "fc{depth}x{width}" name is accepted by `build_model`; these are the paper's.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "fc1x1000": _fc_builder(1, 1000),
    "fc3x1000": _fc_builder(3, 1000),
    "fc5x3000": _fc_builder(5, 3000),
    "lenet": _lenet_builder,
    "vgg9": _vgg9_builder,
}


def build_model(
    name: str,
    *,
    dataset: str = "mnist",
    init: str = "paper",
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Builds one of the paper's models for a dataset.

    With a generator the weights are a reproducible function of its state and the global
    RNG is left untouched; without one the global RNG is used (like PyTorch).

    Args:
        name: "fc1x1000", "fc3x1000", "fc5x3000" (any "fc{depth}x{width}"), "lenet", "vgg9".
        dataset: "mnist" or "synthetic" (1x28x28 inputs) or "cifar10" (3x32x32), 10 classes.
        init: "paper" or "pytorch".
        generator: Source of randomness for the weights.

    Returns:
        The model on the CPU.

    Raises:
        ValueError: Unknown `name`, `dataset` or `init`.
    """
    match = _FC_NAME.fullmatch(name)
    if match is not None:
        builder = _fc_builder(int(match[1]), int(match[2]))
    elif name in MODELS:
        builder = MODELS[name]
    else:
        raise ValueError(
            f"unknown model name={name!r}; valid names: {sorted(MODELS)} "
            "(or any 'fc{depth}x{width}')"
        )
    if dataset not in _INPUT_SHAPES:
        raise ValueError(f"unknown dataset={dataset!r}; valid datasets: {sorted(_INPUT_SHAPES)}")
    _check_preset(init)
    kwargs = {"input_shape": _INPUT_SHAPES[dataset], "num_classes": 10, "init": init}
    if generator is None:
        return builder(**kwargs)
    # Building draws default weights from the global RNG; fork it so its state is kept.
    with torch.random.fork_rng(devices=[]):
        model = builder(**kwargs)
    return reinitialize(model, generator=generator)


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of scalar parameters (all, or only those with `requires_grad`)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
