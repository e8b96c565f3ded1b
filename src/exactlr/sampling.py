"""Weight samples ``w ~ W`` of a model's own initialisation, and a check that they are.

Algorithm 2 needs fresh draws of the model's initialisation distribution W.
:func:`default_make_model` builds them for a given model:

* a Hugging Face ``transformers`` model is re-constructed from a copy of its config
  (``type(model)(config)``: its own ``_init_weights``, tied weights tied), on the
  model's device and dtype; a model whose structure the config no longer describes is
  re-initialised in place instead, on a copy, with the ``_init_weights`` of each
  sub-model;
* a model built by :mod:`exactlr.models` is re-drawn with its recorded preset;
* any other model gets ``reset_parameters()`` on every submodule (PyTorch's defaults).

A parameter that the re-initialisation does not touch would keep the model's value in
every sample, so the samples would not be samples. The check: the re-initialisation is
run on a copy whose parameters are all NaN, and a parameter still NaN afterwards was not
re-drawn; for re-constructed models, two samples drawn with different seeds are compared
and a parameter equal in both that is not a constant (a constant, e.g. LayerNorm's
weight 1, is a deterministic initialisation) was not re-drawn. Either is a ValueError
naming the parameters and asking for ``make_model=``. ``transformers`` is never imported
here: a model is a ``transformers`` model only if that package is already loaded.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable

import torch
from torch import nn

from exactlr.models import reinitialize

MakeModel = Callable[[], nn.Module]


def draw_model(make_model: MakeModel, seed: int) -> nn.Module:
    """Call ``make_model`` with the global RNG seeded to ``seed``, then restore it.

    Raises:
        ValueError: ``make_model()`` does not return a ``torch.nn.Module``.
    """
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = make_model()
    if not isinstance(model, nn.Module):
        raise ValueError(f"make_model() must return a torch.nn.Module, got {type(model)}")
    return model


def is_transformers_model(model: nn.Module) -> bool:
    """Whether ``model`` is a ``transformers.PreTrainedModel`` (without importing it:
    if ``transformers.modeling_utils`` is not loaded, no such model exists)."""
    module = sys.modules.get("transformers.modeling_utils")
    base = getattr(module, "PreTrainedModel", None) if module is not None else None
    return base is not None and isinstance(model, base)


def _cuda_devices(model: nn.Module) -> list[int]:
    """The CUDA devices of the model's parameters (whose RNGs an init may use)."""
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


def _signature(model: nn.Module) -> list[tuple]:
    return [(n, p.shape) for n, p in model.named_parameters()]


def _reconstruct(model: nn.Module) -> MakeModel | None:
    """Re-construction from the config, if it gives the model's structure."""
    config = copy.deepcopy(model.config)
    first = next(model.parameters())

    def make() -> nn.Module:
        return type(model)(copy.deepcopy(config)).to(device=first.device, dtype=first.dtype)

    try:
        with torch.random.fork_rng(devices=[]):
            sample = make()
    except Exception:
        return None
    return make if _signature(sample) == _signature(model) else None


def _transformers_init_(model: nn.Module) -> nn.Module:
    """Re-draw a ``transformers`` model in place with each sub-model's ``_init_weights``.

    The ``_is_hf_initialized`` marks that ``transformers`` leaves on modules and tensors
    (which make its own ``init_weights`` skip them) are cleared first.
    """
    base = sys.modules["transformers.modeling_utils"].PreTrainedModel
    for obj in [*model.modules(), *model.parameters(), *model.buffers()]:
        if hasattr(obj, "_is_hf_initialized"):
            delattr(obj, "_is_hf_initialized")

    def visit(module: nn.Module, init: Callable[[nn.Module], None]) -> None:
        for child in module.children():
            visit(child, child._init_weights if isinstance(child, base) else init)
        init(module)

    with torch.no_grad():
        visit(model, model._init_weights)
    return model


def _not_redrawn_error(model: nn.Module, names: list[str]) -> ValueError:
    listed = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    return ValueError(
        f"the default weight sampler cannot re-draw {len(names)} parameter(s) of "
        f"{type(model).__name__}: {listed}; every weight sample would keep the model's "
        "values there, so K_hat would not be over samples of the initialisation. Pass "
        "make_model= returning a freshly initialised model (e.g. lambda: MyModel(...))"
    )


def _check_in_place(model: nn.Module, init_: Callable[[nn.Module], nn.Module]) -> None:
    """NaN-poison a copy, re-initialise it, and name the parameters still NaN."""
    probe = copy.deepcopy(model)
    with torch.no_grad():
        for p in probe.parameters():
            if p.is_floating_point() or p.is_complex():
                p.fill_(float("nan"))
    with torch.random.fork_rng(devices=_cuda_devices(model)):
        init_(probe)
    names = [n for n, p in probe.named_parameters() if p.is_floating_point() and p.isnan().any()]
    if names:
        raise _not_redrawn_error(model, names)


def _check_two_draws(model: nn.Module, make: MakeModel) -> None:
    """Name the non-constant parameters equal in two samples of different seeds."""
    a, b = draw_model(make, 1), draw_model(make, 2)
    names = [
        name
        for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True)
        if p.numel() > 1 and torch.equal(p, q) and not bool((p == p.flatten()[0]).all())
    ]
    if names:
        raise _not_redrawn_error(model, names)


def default_make_model(model: nn.Module) -> MakeModel:
    """Samples of W for ``model``: fresh draws of the model's own initialisation.

    See the module docstring for how each kind of model is re-drawn and checked.

    Returns:
        ``make_model()``, drawing from the global RNG (Algorithm 2 seeds it per sample).

    Raises:
        ValueError: A parameter that the initialisation does not re-draw, named.
    """
    if is_transformers_model(model):
        make = _reconstruct(model)
        if make is not None:
            _check_two_draws(model, make)
            return make
        init_: Callable[[nn.Module], nn.Module] = _transformers_init_
    else:
        init_ = reinitialize
    _check_in_place(model, init_)

    def make_copy() -> nn.Module:
        return init_(copy.deepcopy(model))

    return make_copy
