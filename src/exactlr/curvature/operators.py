"""Hessian-vector products of a training loss: one weight point, or S stacked ones.

The loss is the size-weighted mean over ``(inputs, targets)`` batches (see
:mod:`exactlr.curvature.batches`). Products ``H v`` are built with :mod:`torch.func` on a
:func:`~torch.func.functional_call` of the model, in one of two modes:

* ``"forward"`` -- forward-over-reverse, ``jvp(grad(L), w, v)`` batch by batch: low memory
  (one batch's graph at a time).
* ``"reverse"`` -- reverse-over-reverse, ``vjp(grad(L), w)`` built once and reused for
  every product: fewer sweeps per product, but it keeps the gradient graph of all the
  data in memory.

``benchmarks/bench_curvature.py`` measures the cost of a product of each mode in
gradients. ``"auto"`` picks ``"reverse"`` when the estimated graph fits a memory budget
(:mod:`exactlr.curvature.memory`).

Unless ``rewrite=False``, products are taken of an exactly equal rewrite of the loss
(:mod:`exactlr.curvature.rewrites`): the data enter shifted by their median with the
first layer compensating (less float32 cancellation), and in ``"reverse"`` mode
training-mode BatchNorm is built from elementary ops (a cheaper double backward).

:class:`HessianOperator` and :class:`StackedHessianOperator` share
:class:`_LossOperator`: the batches and their weights, the rewrites, the loss checks and
the two product modes; they differ only in how one batch's loss is evaluated and how
vectors are laid out (``(dim,)`` against ``(S, dim)``).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from exactlr.curvature.batches import Batch, LossFn, check_targets, training_loss_mode
from exactlr.curvature.memory import choose_hvp_mode
from exactlr.curvature.rewrites import data_shift, rewritten

HVP_MODES = ("auto", "forward", "reverse")


class _LossOperator:
    """What both operators share: weighted batches, rewrites, loss checks, products.

    A subclass calls :meth:`_init_batches` and :meth:`_init_layout` and defines
    :meth:`_batch_loss` (one batch's loss as a function of ``params``, summed over the
    samples of a stack) and :meth:`_check_vectors`. Vectors have the leading shape
    ``lead`` (``()`` for one point, ``(S,)`` for S stacked points) followed by ``dim``.
    """

    loss_fn: LossFn
    params: dict[str, Tensor]
    hvp_mode: str

    def _init_batches(self, batches: list[Batch], network: nn.Module, rewrite: bool) -> None:
        """Keep the batches, their weights ``n_b / N`` and the data shift of the rewrite.

        ``network`` is the module whose first layer carries the shift hook.
        """
        self.batches = batches
        sizes = [len(x) for x, _ in batches]
        self.sizes = sizes
        total = sum(sizes)
        self.weights = [n / total for n in sizes]
        self.rewrite, self.network = rewrite, network
        self.shift = data_shift(network, [x for x, _ in batches]) if rewrite else None
        self.num_products = 0
        self._reverse_fn: Callable | None = None

    def _init_layout(self, lead: tuple[int, ...], shapes: list[torch.Size]) -> None:
        """Flat layout: parameter ``shapes`` after a leading ``lead``, in ``params`` order."""
        first = next(iter(self.params.values()))
        self.lead, self.shapes = lead, shapes
        self.numels = [math.prod(s) for s in shapes]
        self.dim = sum(self.numels)
        self.dtype, self.device = first.dtype, first.device

    # -- the loss -----------------------------------------------------------------------
    def _batch_loss(self, params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        raise NotImplementedError

    def _rewritten(self, *, composite: bool = False) -> contextlib.AbstractContextManager:
        """Evaluate ``network`` on the shifted inputs as if on the data (exact rewrites)."""
        return rewritten(self.network, self.shift, composite_batch_norm=composite and self.rewrite)

    def _pairs(self) -> Iterator[tuple[float, Tensor, Tensor]]:
        """``(weight, rewritten inputs, targets)`` of every batch (shifted on the fly)."""
        for w, (x, y) in zip(self.weights, self.batches, strict=True):
            yield w, (x if self.shift is None else x - self.shift), y

    def _total_loss(self, params: dict[str, Tensor]) -> Tensor:
        """``sum_b w_b * batch_loss_b(params)``."""
        total = None
        for w, x, y in self._pairs():
            term = w * self._batch_loss(params, x, y)
            total = term if total is None else total + term
        assert total is not None
        return total

    def _checked_loss(self, module: nn.Module, state: tuple[dict, dict], where: str) -> float:
        """The full-data loss of ``module`` with ``state`` (no grad); validates it.

        Raises:
            ValueError: Labels outside the class range, a non-scalar or non-finite loss.
        """
        total = 0.0
        with torch.no_grad(), self._rewritten():
            for i, (w, x, y) in enumerate(self._pairs()):
                outputs = functional_call(module, state, (x,))
                check_targets(outputs, y, i)
                value = self.loss_fn(outputs, y)
                if value.ndim != 0:
                    raise ValueError(
                        f"loss_fn must return a scalar (mean over the batch), got shape "
                        f"{tuple(value.shape)}; use reduction='mean'"
                    )
                total += w * float(value)
        if not math.isfinite(total):
            raise ValueError(f"the loss at {where} is not finite (loss={total})")
        return total

    # -- vectors ------------------------------------------------------------------------
    def unflatten(self, vector: Tensor) -> dict[str, Tensor]:
        """Split flat vector(s) into a dict shaped like the parameters (after ``lead``)."""
        chunks = vector.split(self.numels, dim=-1)
        return {
            name: c.reshape(*self.lead, *shape)
            for name, c, shape in zip(self.params, chunks, self.shapes, strict=True)
        }

    def _flat(self, tensors: dict[str, Tensor]) -> Tensor:
        """Concatenate parameter-shaped tensors (after ``lead``) into flat vector(s)."""
        return torch.cat([t.reshape(*self.lead, -1) for t in tensors.values()], dim=-1)

    # -- Hessian-vector products ----------------------------------------------------------
    def _check_vectors(self, vectors: Tensor) -> None:
        """Raise ValueError for vectors of the wrong shape (subclasses that check)."""

    def matvec(self, vectors: Tensor) -> Tensor:
        """The Hessian(s) times ``vectors`` (one product, of every stacked point at once)."""
        self._check_vectors(vectors)
        self.num_products += 1
        tangent = self.unflatten(vectors.to(self.dtype))
        if self.hvp_mode == "reverse":
            if self._reverse_fn is None:
                with self._rewritten(composite=True):
                    _, self._reverse_fn = vjp(grad(self._total_loss), self.params)
            return self._flat(self._reverse_fn(tangent)[0])
        return self._forward_products(tangent)

    def __call__(self, vectors: Tensor) -> Tensor:
        return self.matvec(vectors)

    def _forward_products(self, tangent: dict[str, Tensor]) -> Tensor:
        """``"forward"`` mode: ``sum_b w_b jvp(grad(batch_loss_b), params, tangent)``."""
        out = None
        with self._rewritten():
            for w, x, y in self._pairs():

                def batch_grad(p: dict[str, Tensor], x: Tensor = x, y: Tensor = y) -> dict:
                    return grad(self._batch_loss)(p, x, y)

                _, hv = jvp(batch_grad, (self.params,), (tangent,))
                hv_flat = self._flat(hv)
                out = w * hv_flat if out is None else out + w * hv_flat
        assert out is not None
        return out

    def release(self) -> None:
        """Free the reusable graph of ``"reverse"`` mode."""
        self._reverse_fn = None


class HessianOperator(_LossOperator):
    """The Hessian of the size-weighted mean loss of ``model`` over ``batches``.

    A thin stateful wrapper: it holds the detached parameters, the batches and (in
    ``"reverse"`` mode) the reusable gradient graph. Use it inside
    :func:`~exactlr.curvature.batches.training_loss_mode` (``hessian_spectral_norm``
    does). Vectors are flat, in the order of ``model.named_parameters()`` restricted to
    parameters that require grad.

    Args:
        model: The network; its current weights are the point ``w``.
        loss_fn: ``loss_fn(outputs, targets)`` returning the mean loss of a batch.
        batches: List of ``(inputs, targets)`` pairs on the model's device.
        hvp_mode: ``"forward"``, ``"reverse"`` or ``"auto"`` (see the module docstring).
        memory_fraction: In ``"auto"``, the share of free memory the reusable graph may
            use before ``"forward"`` is chosen.
        rewrite: Apply the exact rewrites of :mod:`exactlr.curvature.rewrites` (input
            shift of the first layer, composite BatchNorm in ``"reverse"`` mode): same
            function, less rounding and cheaper products. False: evaluate the model as
            given.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batches: list[Batch],
        *,
        hvp_mode: str = "auto",
        memory_fraction: float = 0.25,
        rewrite: bool = True,
    ) -> None:
        if hvp_mode not in HVP_MODES:
            raise ValueError(f"hvp_mode={hvp_mode!r} is not one of {HVP_MODES}")
        self.model = model
        self.loss_fn = loss_fn
        self.params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise ValueError("the model has no parameters that require grad")
        self.buffers = dict(model.named_buffers())
        self._init_layout((), [p.shape for p in self.params.values()])
        self._init_batches(batches, model, rewrite)
        self.hvp_mode = self._choose_mode(memory_fraction) if hvp_mode == "auto" else hvp_mode

    def _batch_loss(self, params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        outputs = functional_call(self.model, (params, self.buffers), (x,))
        return self.loss_fn(outputs, y)

    def loss(self) -> float:
        """The full-data loss ``L(w)``; validates targets and finiteness.

        Raises:
            ValueError: For labels outside the model's class range or a non-finite loss.
        """
        return self._checked_loss(self.model, (self.params, self.buffers), "these weights")

    @staticmethod
    def flatten(tensors: dict[str, Tensor] | Sequence[Tensor]) -> Tensor:
        """Concatenate tensors (dict values in order) into one flat vector."""
        values = tensors.values() if isinstance(tensors, dict) else tensors
        return torch.cat([t.reshape(-1) for t in values])

    def gradient(self) -> Tensor:
        """The flat gradient ``grad L(w)`` (one backward pass per batch)."""
        g = None
        with self._rewritten():
            for w, x, y in self._pairs():
                gb = self.flatten(grad(self._batch_loss)(self.params, x, y))
                g = w * gb if g is None else g + w * gb
        assert g is not None
        return g

    def _choose_mode(self, memory_fraction: float) -> str:
        """``"reverse"`` if the reusable graph of all batches fits the memory budget."""

        def run_probe(probe: Tensor) -> object:
            return functional_call(self.model, (self.params, self.buffers), (probe,))

        return choose_hvp_mode(
            self.model,
            run_probe,
            [x for x, _ in self.batches],
            num_params=self.dim,
            dtype=self.dtype,
            device=self.device,
            memory_fraction=memory_fraction,
        )


class StackedHessianOperator(_LossOperator):
    """The Hessians ``H_1..H_S`` of one loss at S weight samples of one architecture.

    ``H_s`` is the Hessian of :class:`HessianOperator`'s loss at the weights ``w_s`` of
    sample s, ``L(w) = sum_b (n_b / N) loss_fn(model(x_b; w), y_b)``, in training-loss
    mode. The S parameter sets are stacked along a new leading dimension (what
    :func:`torch.func.stack_module_state` does) and one :func:`~torch.func.vmap`-ed
    :func:`~torch.func.functional_call` of a stateless copy of the architecture evaluates
    all S losses at once. The S losses are independent, so the Hessian of
    ``sum_s L(w_s)`` with respect to the stacked weights ``W`` is block-diagonal with
    blocks ``H_s``, and one Hessian-vector product of that sum with the stacked tangent
    ``V = (v_1; ..; v_S)`` is ``(H_1 v_1; ..; H_S v_S)``:

    * ``"forward"``: ``jvp(grad(sum_s L(w_s)), W, V)``, batch by batch;
    * ``"reverse"``: ``vjp(grad(sum_s L(w_s)), W)`` built once and reused.

    BatchNorm: the stateless copy is taken inside
    :func:`~exactlr.curvature.batches.training_loss_mode` (train mode,
    ``track_running_stats=False``: batch statistics per sample, no buffer writes; Dropout
    off), a form vmap handles; the tests check it against :class:`HessianOperator` on
    BatchNorm models in float64.

    Vectors are ``(S, dim)`` matrices; row s is a flat vector of sample s in the order of
    :class:`HessianOperator` (trainable parameters in ``named_parameters()`` order).
    Build one with :meth:`from_models`.

    Args:
        base: Stateless template of the architecture in training-loss mode (its own
            tensors are never read; :meth:`from_models` puts it on the meta device).
        params: Stacked trainable parameters, name -> ``(S, *shape)``.
        constants: Stacked buffers and frozen parameters, name -> ``(S, *shape)``.
        loss_fn: ``loss_fn(outputs, targets)`` returning the mean loss of a batch.
        batches: List of ``(inputs, targets)`` pairs on the parameters' device.
        hvp_mode: ``"forward"`` or ``"reverse"``.
        rewrite: As :class:`HessianOperator`'s (the shift hook goes on ``base``).
    """

    def __init__(
        self,
        base: nn.Module,
        params: dict[str, Tensor],
        constants: dict[str, Tensor],
        loss_fn: LossFn,
        batches: list[Batch],
        *,
        hvp_mode: str,
        rewrite: bool = True,
    ) -> None:
        if hvp_mode not in ("forward", "reverse"):
            raise ValueError(f"hvp_mode={hvp_mode!r} must be 'forward' or 'reverse' here")
        if not params:
            raise ValueError("the models have no parameters that require grad")
        self.base, self.params, self.constants = base, params, constants
        self.loss_fn, self.hvp_mode = loss_fn, hvp_mode
        self.num_models = next(iter(params.values())).shape[0]
        self._init_layout((self.num_models,), [p.shape[1:] for p in params.values()])
        self._init_batches(batches, base, rewrite)

    @classmethod
    def from_models(
        cls,
        models: Sequence[nn.Module],
        loss_fn: LossFn,
        batches: list[Batch],
        *,
        hvp_mode: str = "auto",
        memory_fraction: float = 0.25,
        rewrite: bool = True,
    ) -> StackedHessianOperator:
        """Stack S models of one architecture (their current weights are the points).

        The models are not modified. ``"auto"`` picks ``"reverse"`` when S times the
        graph :class:`HessianOperator` estimates for one model fits ``memory_fraction``
        of free memory.

        Raises:
            ValueError: No models, or models that differ in parameter/buffer names,
                shapes, dtypes or which parameters require grad.
        """
        if hvp_mode not in HVP_MODES:
            raise ValueError(f"hvp_mode={hvp_mode!r} is not one of {HVP_MODES}")
        if not models:
            raise ValueError("models is empty; pass at least one model")
        signatures = [_state_signature(m) for m in models]
        if any(sig != signatures[0] for sig in signatures[1:]):
            raise ValueError(
                "the models must share one architecture (same parameter and buffer names, "
                "shapes, dtypes and requires_grad) to be stacked"
            )
        trainable = [n for n, p in models[0].named_parameters() if p.requires_grad]
        named = [{**dict(m.named_parameters()), **dict(m.named_buffers())} for m in models]
        stacked = {name: torch.stack([d[name].detach() for d in named]) for name in named[0]}
        params = {name: stacked.pop(name) for name in trainable}
        with training_loss_mode(models[0]):
            if hvp_mode == "auto":
                hvp_mode = HessianOperator(
                    models[0],
                    loss_fn,
                    batches,
                    memory_fraction=memory_fraction / len(models),
                    rewrite=False,
                ).hvp_mode
            base = copy.deepcopy(models[0])  # keeps the training-loss-mode flags
        return cls(
            base.to("meta"), params, stacked, loss_fn, batches, hvp_mode=hvp_mode, rewrite=rewrite
        )

    def subset(self, index: Sequence[int]) -> StackedHessianOperator:
        """The operator of the samples ``index`` only (a new stack, no graph)."""
        rows = torch.as_tensor(list(index), dtype=torch.long, device=self.device)
        sub = StackedHessianOperator(
            self.base,
            {k: v.index_select(0, rows) for k, v in self.params.items()},
            {k: v.index_select(0, rows) for k, v in self.constants.items()},
            self.loss_fn,
            self.batches,
            hvp_mode=self.hvp_mode,
            rewrite=False,  # the shift is this stack's: no second median
        )
        sub.rewrite, sub.shift = self.rewrite, self.shift
        return sub

    def _sample_batch_loss(
        self, params: dict[str, Tensor], constants: dict[str, Tensor], x: Tensor, y: Tensor
    ) -> Tensor:
        return self.loss_fn(functional_call(self.base, (params, constants), (x,)), y)

    def _batch_loss(self, params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        """``sum_s loss_fn(model(x; w_s), y)`` for one batch."""
        per_sample = vmap(self._sample_batch_loss, in_dims=(0, 0, None, None))
        return per_sample(params, self.constants, x, y).sum()

    def losses(self) -> list[float]:
        """``L(w_s)`` for every sample; validates targets and finiteness.

        Raises:
            ValueError: For labels outside the class range, a non-scalar or a non-finite
                loss.
        """
        out = []
        for s in range(self.num_models):
            params = {k: v[s] for k, v in self.params.items()}
            constants = {k: v[s] for k, v in self.constants.items()}
            where = f"the weights of stacked sample {s}"
            out.append(self._checked_loss(self.base, (params, constants), where))
        return out

    def flatten(self, tensors: dict[str, Tensor]) -> Tensor:
        """Concatenate ``(S, *shape)`` tensors into ``(S, dim)`` rows."""
        return self._flat(tensors)

    def _check_vectors(self, vectors: Tensor) -> None:
        if vectors.shape != (self.num_models, self.dim):
            raise ValueError(
                f"expected vectors of shape {(self.num_models, self.dim)}, "
                f"got {tuple(vectors.shape)}"
            )


def _state_signature(model: nn.Module) -> list[tuple]:
    """Names, shapes, dtypes and requires_grad of a model's parameters and buffers."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"expected a torch.nn.Module, got {type(model)}")
    params = [(n, p.shape, p.dtype, p.requires_grad) for n, p in model.named_parameters()]
    buffers = [(n, b.shape, b.dtype) for n, b in model.named_buffers()]
    return params + buffers
