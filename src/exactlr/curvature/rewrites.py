"""Exact rewrites of a training loss that change only its rounding and its cost.

The curvature code evaluates ``L(w)`` and its derivatives many times at one point. Two
rewrites make that cheaper or more accurate without changing the function:

* **Input shift** (accuracy). For a network whose first weighted layer is affine in the
  data, ``f(x) = A_W x + b``, the identity

      A_W x + b = A_W (x - c) + b + A_W c

  holds for every fixed ``c`` of one sample's shape (padding is linear, so it holds for
  convolutions too). With ``c`` the per-element median of the data, most entries of
  ``x - c`` of data with a dominant value are exact zeros (MNIST's background), and the
  weight derivatives of the first layer, sums over batch x positions of ``dy * x``, no
  longer cancel large equal terms in float32 (``benchmarks/bench_rewrites.py`` measures
  the float32 product's error against float64 with and without the shift). ``A_W c`` is
  one sample's layer output: negligible cost.
* **Composite BatchNorm** (speed). Training-mode ``F.batch_norm`` without running
  statistics is written as ``(x - mean) * rsqrt(var + eps) * gamma + beta`` with
  elementary ops. The function is the same (biased variance, batch statistics); its
  double backward through elementary ops is cheaper on a CPU than ATen's
  ``native_batch_norm`` double backward, which is most of a reverse-over-reverse
  Hessian-vector product on a BatchNorm network (``benchmarks/bench_rewrites.py``
  times both).

Both are context managers used by :mod:`exactlr.curvature` around its own evaluations
only: the user's model is never left changed.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

#: Modules that may precede the first layer: they only reshape the data.
_SHAPE_ONLY = (nn.Flatten, nn.Identity, nn.Unflatten)
#: First layers whose output is ``A_W x + b`` (exact types: a subclass may change forward).
_AFFINE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: Samples used to estimate the median shift (any shift is exact; this only sets how good).
MEDIAN_SAMPLES = 8192
#: ``F.batch_norm``'s own signature, to read its arguments however they were passed.
_BATCH_NORM = inspect.signature(F.batch_norm)


def input_layer(model: nn.Module) -> tuple[list[nn.Module], nn.Module] | None:
    """The first weighted layer of ``model`` if it sees the data directly, else None.

    Only a plain ``nn.Sequential`` whose first modules merely reshape (Flatten,
    Identity, Unflatten) and are followed by an ``nn.Linear`` or ``nn.Conv1d/2d/3d``
    qualifies (exact types: a subclass may change ``forward``), and only if none of
    these carries a forward hook of its own (it could see or change the shifted data).

    Returns:
        ``(leading shape-only modules, the layer)`` or None.
    """
    if type(model) is not nn.Sequential or _hooked(model):
        return None
    leading: list[nn.Module] = []
    for module in model:
        if _hooked(module):
            return None
        if type(module) in _AFFINE:
            return leading, module
        if type(module) not in _SHAPE_ONLY:
            return None
        leading.append(module)
    return None


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def median_shift(inputs: Sequence[Tensor], max_samples: int = MEDIAN_SAMPLES) -> Tensor:
    """Per-element (lower) median of the first ``max_samples`` samples of ``inputs``.

    The lower median is one of the data values, so ``x - c`` is an exact zero wherever a
    sample has the median value.
    """
    rows: list[Tensor] = []
    count = 0
    for x in inputs:
        take = x[: max_samples - count]
        rows.append(take)
        count += len(take)
        if count >= max_samples:
            break
    return torch.cat(rows).median(dim=0).values


def data_shift(model: nn.Module, inputs: Sequence[Tensor]) -> Tensor | None:
    """The input shift ``c`` for ``model`` on ``inputs``, or None where none applies.

    None when the model has no first affine layer that sees the data
    (:func:`input_layer`), the inputs are not floating point, or the median is zero.
    """
    if input_layer(model) is None or not inputs or not inputs[0].is_floating_point():
        return None
    shift = median_shift(inputs)
    return shift if bool(shift.any()) else None


@contextlib.contextmanager
def rewritten(
    model: nn.Module, shift: Tensor | None, *, composite_batch_norm: bool = False
) -> Iterator[None]:
    """Both rewrites around evaluations of ``model`` on ``x - shift``.

    Args:
        model: The network evaluated inside (its first layer gets the shift hook).
        shift: From :func:`data_shift`; None: no input shift.
        composite_batch_norm: Route training-mode BatchNorm to
            :func:`batch_norm_composite` (worth it for reverse-over-reverse products).
    """
    with contextlib.ExitStack() as stack:
        if shift is not None:
            stack.enter_context(shifted_input_layer(model, shift))
        if composite_batch_norm:
            stack.enter_context(CompositeBatchNorm())
        yield


def _layer_term(layer: nn.Module, c: Tensor) -> Tensor:
    """``A_W c``: the layer's output for input ``c`` without its bias."""
    if isinstance(layer, nn.Linear):
        return F.linear(c, layer.weight)
    return layer._conv_forward(c, layer.weight, None)  # type: ignore[operator]


@contextlib.contextmanager
def shifted_input_layer(model: nn.Module, shift: Tensor) -> Iterator[None]:
    """While active, the first layer adds ``A_W c``: feed it ``x - c`` for ``f(x)``.

    Args:
        model: A model for which :func:`input_layer` is not None.
        shift: ``c``, one sample's shape (as the data, before any leading Flatten).
    """
    found = input_layer(model)
    if found is None:
        raise ValueError("the model has no first affine layer that sees the data")
    leading, layer = found
    with torch.no_grad():
        c = shift.unsqueeze(0)
        for module in leading:
            c = module(c)

    def hook(module: nn.Module, _args: object, output: Tensor) -> Tensor:
        # module.weight is whatever functional_call substituted: derivatives flow.
        return output + _layer_term(module, c.to(output.dtype))

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def batch_norm_composite(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """Training-mode BatchNorm with batch statistics, written with elementary ops.

    ``y = (x - mean) / sqrt(var + eps) * gamma + beta``, mean and biased variance over
    every dimension but the channel dimension 1, as ``F.batch_norm(..., training=True)``.
    """
    dims = [0, *range(2, x.ndim)]
    shape = [1, -1] + [1] * (x.ndim - 2)
    centred = x - x.mean(dims, keepdim=True)
    scale = torch.rsqrt((centred * centred).mean(dims, keepdim=True) + eps)
    if weight is not None:
        scale = scale * weight.view(shape)
    out = centred * scale
    return out + bias.view(shape) if bias is not None else out


class CompositeBatchNorm(TorchFunctionMode):
    """Routes training-mode ``F.batch_norm`` without running statistics to the composite.

    Calls with running statistics (eval mode, or tracking in train mode) pass through.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm:
            bound = _BATCH_NORM.bind(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            if a["training"] and a["running_mean"] is None:
                return batch_norm_composite(a["input"], a["weight"], a["bias"], a["eps"])
        return func(*args, **kwargs)
