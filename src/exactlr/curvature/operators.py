"""Hessian-vector products of a training loss: one weight point, or S stacked ones.

The loss is the size-weighted mean of the batches' mean losses, each given by an
:class:`~exactlr.curvature.objective.Objective` (``loss_fn(outputs, targets)`` on pairs,
or ``loss(model, batch)`` on batches of any structure). Products ``H v`` are built with
:mod:`torch.func` on a :func:`~torch.func.functional_call` of the loss as a module
(:class:`~exactlr.curvature.objective.LossModule`), in one of two modes:

* ``"forward"`` -- forward-over-reverse, ``jvp(grad(L), w, v)`` batch by batch: low memory
  (one batch's graph at a time).
* ``"reverse"`` -- reverse-over-reverse, ``vjp(grad(L), w)`` built once and reused for
  every product: fewer sweeps per product, but it keeps the gradient graph of all the
  data in memory.

``benchmarks/bench_curvature.py`` measures the cost of a product of each mode in
gradients. ``"auto"`` picks ``"reverse"`` when the estimated graph fits a memory budget
(:mod:`exactlr.curvature.memory`). Every evaluation runs with
``scaled_dot_product_attention`` on its math kernel, the one with both a double backward
and forward-mode AD (the fused CPU/GPU kernels have neither); any other op without the
derivative a mode needs is a ValueError naming the op and the other mode.

Unless ``rewrite=False``, products are taken of an exactly equal rewrite of the loss
(:mod:`exactlr.curvature.rewrites`): for ``(inputs, targets)`` pairs the data enter
shifted by their median with the first layer compensating (less float32 cancellation),
and in ``"reverse"`` mode training-mode BatchNorm is built from elementary ops (a cheaper
double backward).

:class:`HessianOperator` and :class:`~exactlr.curvature.stacked.StackedHessianOperator`
share :class:`LossOperator`: the batches and their weights, the rewrites, the loss
checks, the determinism probe and the two product modes; they differ only in how one
batch's loss is evaluated and how vectors are laid out (``(dim,)`` against ``(S, dim)``).
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp
from torch.nn.attention import SDPBackend, sdpa_kernel

from exactlr.curvature.batches import LossFn, head_of, tensors_of
from exactlr.curvature.determinism import (
    nondeterminism_error,
    random_ops,
    relative_difference,
    repeat_tolerance,
)
from exactlr.curvature.memory import choose_hvp_mode
from exactlr.curvature.objective import BatchSize, LossModule, ModelLoss, Objective
from exactlr.curvature.rewrites import data_shift, rewritten

HVP_MODES = ("auto", "forward", "reverse")

_Op = TypeVar("_Op", bound="LossOperator")

#: Examples of the determinism probe (:meth:`LossOperator.check_deterministic`).
PROBE_EXAMPLES = 64

_MISSING_DERIVATIVE = re.compile(
    r"derivative for (?P<back>[\w:.]+) is not implemented"
    r"|forward AD with (?P<fwd>[\w:.]+)"
    r"|Batching rule not implemented for (?P<vmap>[\w:.]+)"
)


def objective_of(
    loss_fn: LossFn | None,
    loss: ModelLoss | None,
    batch_size: BatchSize | None,
    check_labels: bool,
    objective: Objective | None,
) -> Objective:
    """The :class:`Objective` of an operator's arguments (``objective`` or the parts)."""
    if objective is None:
        return Objective(loss_fn, loss, batch_size, check_labels)
    if loss_fn is not None or loss is not None or batch_size is not None:
        raise ValueError("pass either objective= or loss_fn/loss/batch_size, not both")
    return objective


def _unsupported_op_error(exc: Exception, mode: str) -> ValueError | None:
    """A ValueError naming the op a product mode cannot differentiate, or None."""
    match = _MISSING_DERIVATIVE.search(str(exc))
    if match is None:
        return None
    op = match.group("back") or match.group("fwd") or match.group("vmap")
    need = {"forward": "forward-mode AD (jvp over grad)", "reverse": "a double backward"}
    other = "reverse" if mode == "forward" else "forward"
    return ValueError(
        f"the {mode!r} Hessian-vector product needs {need[mode]} of {op}, which PyTorch "
        f"does not implement ({str(exc).splitlines()[0]}); try hvp_mode={other!r}, or "
        "replace the op in the model"
    )


class LossOperator:
    """What both operators share: weighted batches, rewrites, loss checks, products.

    A subclass sets ``objective``, ``params`` and ``hvp_mode``, calls
    :meth:`_init_layout` and :meth:`_init_batches`, and defines :meth:`_batch_loss` (one
    batch's loss as a function of ``params``, summed over the samples of a stack),
    :meth:`_loss_values` and :meth:`_check_vectors`. Vectors have the leading shape
    ``lead`` (``()`` for one point, ``(S,)`` for S stacked points) followed by ``dim``.
    """

    objective: Objective
    params: dict[str, Tensor]
    hvp_mode: str

    def _init_batches(self, batches: list[Any], network: nn.Module, rewrite: bool) -> None:
        """Keep the batches, their weights ``n_b / N`` and the data shift of the rewrite.

        ``network`` is the module whose first layer carries the shift hook (pairs only).

        Raises:
            ValueError: A batch size that is not a positive integer.
        """
        self.batches = batches
        sizes = [self.objective.size(b) for b in batches]
        for i, n in enumerate(sizes):
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"batch {i} has size {n!r}; a batch size is a positive int")
        self.sizes = sizes
        total = sum(sizes)
        self.weights = [n / total for n in sizes]
        self.rewrite, self.network = rewrite, network
        pairs = self.objective.pairs
        self.shift = data_shift(network, [x for x, _ in batches]) if rewrite and pairs else None
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
    def _batch_loss(self, params: dict[str, Tensor], batch: Any) -> Tensor:
        raise NotImplementedError

    def _loss_values(self) -> Tensor:
        raise NotImplementedError

    def _context(self, *, composite: bool = False) -> contextlib.ExitStack:
        """Every evaluation: the exact rewrites, and attention on its math kernel."""
        stack = contextlib.ExitStack()
        stack.enter_context(
            rewritten(self.network, self.shift, composite_batch_norm=composite and self.rewrite)
        )
        stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        return stack

    def _weighted(self) -> Iterator[tuple[float, Any]]:
        """``(weight, batch)`` of every batch, pairs' inputs shifted on the fly."""
        for w, batch in zip(self.weights, self.batches, strict=True):
            if self.shift is not None:
                x, y = batch
                batch = (x - self.shift, y)
            yield w, batch

    def _total_loss(self, params: dict[str, Tensor]) -> Tensor:
        """``sum_b w_b * batch_loss_b(params)``."""
        total = None
        for w, batch in self._weighted():
            term = w * self._batch_loss(params, batch)
            total = term if total is None else total + term
        assert total is not None
        return total

    def _checked_loss(self, module: LossModule, state: tuple[dict, dict], where: str) -> float:
        """The full-data loss of ``module`` with ``state`` (no grad); validates it.

        Raises:
            ValueError: Labels outside the class range, a non-scalar or non-finite loss.
        """
        total = 0.0
        with torch.no_grad(), self._context():
            for i, (w, batch) in enumerate(self._weighted()):
                value = functional_call(module, state, (batch,), {"check_index": i})
                _check_scalar(value, self.objective)
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
        """The Hessian(s) times ``vectors`` (one product, of every stacked point at once).

        Raises:
            ValueError: An op in the model without the derivative this mode needs.
        """
        self._check_vectors(vectors)
        self.num_products += 1
        tangent = self.unflatten(vectors.to(self.dtype))
        try:
            if self.hvp_mode == "reverse":
                if self._reverse_fn is None:
                    with self._context(composite=True):
                        _, self._reverse_fn = vjp(grad(self._total_loss), self.params)
                return self._flat(self._reverse_fn(tangent)[0])
            return self._forward_products(tangent)
        except (RuntimeError, NotImplementedError) as exc:
            error = _unsupported_op_error(exc, self.hvp_mode)
            if error is None:
                raise
            raise error from exc

    def __call__(self, vectors: Tensor) -> Tensor:
        return self.matvec(vectors)

    def _forward_products(self, tangent: dict[str, Tensor]) -> Tensor:
        """``"forward"`` mode: ``sum_b w_b jvp(grad(batch_loss_b), params, tangent)``."""
        out = None
        with self._context():
            for w, batch in self._weighted():

                def batch_grad(p: dict[str, Tensor], batch: Any = batch) -> dict:
                    return grad(self._batch_loss)(p, batch)

                _, hv = jvp(batch_grad, (self.params,), (tangent,))
                hv_flat = self._flat(hv)
                out = w * hv_flat if out is None else out + w * hv_flat
        assert out is not None
        return out

    def release(self) -> None:
        """Free the reusable graph of ``"reverse"`` mode."""
        self._reverse_fn = None

    # -- determinism ------------------------------------------------------------------------
    def check_deterministic(self, vectors: Tensor, count: int = PROBE_EXAMPLES) -> None:
        """The loss and one product, each evaluated twice, must agree.

        The probe runs on the first ``count`` examples of the first batch
        (:meth:`head`): a random op, a state change or a nondeterministic kernel shows
        on any examples, and there the probe costs a sliver of one full-data product.
        Two evaluations at the same weights may differ only by reduction-order rounding
        (:func:`~exactlr.curvature.determinism.repeat_tolerance`). Nothing is counted in
        ``num_products``.

        Args:
            vectors: The vector(s) of the probe product (e.g. the solver's start).
            count: Examples of the probe.

        Raises:
            ValueError: A difference, naming the random ops of the forward pass if any.
        """
        probe = self.head(count)
        try:
            tol = repeat_tolerance(self.dtype)
            difference = relative_difference(probe._loss_values(), probe._loss_values())
            what = "loss"
            if difference <= tol:
                a, b = probe.matvec(vectors), probe.matvec(vectors)
                difference, what = relative_difference(a, b), "Hessian-vector product"
        finally:
            probe.release()
        if difference > tol:
            raise nondeterminism_error(what, difference, self._random_ops())

    def head(self: _Op, count: int) -> _Op:
        """This operator on the first ``count`` examples of its first batch only.

        A shallow copy: the weights, model and objective are shared; the batch, its
        weight, the data shift of the rewrite and the product count are its own.
        Tensors whose first dimension is not the batch's size are kept whole.
        """
        head = copy.copy(self)
        batch = head_of(self.batches[0], count, self.sizes[0])
        head._init_batches([batch], self.network, self.rewrite)
        return head

    def _random_ops(self) -> list[str]:
        """The random ops of one forward pass over the first batch."""
        raise NotImplementedError


def _check_scalar(value: object, objective: Objective) -> None:
    """A batch loss must be a 0-d tensor (the mean over the batch)."""
    if isinstance(value, Tensor) and value.ndim == 0:
        return
    got = f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
    if objective.pairs:
        advice = "use reduction='mean'"
    else:
        advice = "return the batch's mean loss as a tensor, e.g. lambda m, b: m(**b).loss"
    name = "loss_fn" if objective.pairs else "loss"
    raise ValueError(f"{name} must return a scalar (mean over the batch), got {got}; {advice}")


def prefixed(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {LossModule.PREFIX + k: v for k, v in tensors.items()}


class HessianOperator(LossOperator):
    """The Hessian of the size-weighted mean loss of ``model`` over ``batches``.

    A thin stateful wrapper: it holds the detached parameters, the batches and (in
    ``"reverse"`` mode) the reusable gradient graph. Use it inside
    :func:`~exactlr.curvature.batches.training_loss_mode` (``hessian_spectral_norm``
    does). Vectors are flat, in the order of ``model.named_parameters()`` restricted to
    parameters that require grad.

    Args:
        model: The network; its current weights are the point ``w``.
        loss_fn: ``loss_fn(outputs, targets)`` returning the mean loss of an
            ``(inputs, targets)`` batch; None with ``loss``.
        batches: List of batches on the model's device (see
            :func:`~exactlr.curvature.batches.materialize_batches`).
        loss: ``loss(model, batch)`` returning the mean loss of a batch of any structure
            (instead of ``loss_fn``).
        batch_size: ``batch_size(batch) -> int``, the batch's weight; default: the first
            dimension of its first tensor.
        check_labels: Check class targets of a cross-entropy ``loss_fn``.
        objective: All of the above as one
            :class:`~exactlr.curvature.objective.Objective` (instead of them).
        hvp_mode: ``"forward"``, ``"reverse"`` or ``"auto"`` (see the module docstring).
        memory_fraction: In ``"auto"``, the share of free memory the reusable graph may
            use before ``"forward"`` is chosen.
        rewrite: Apply the exact rewrites of :mod:`exactlr.curvature.rewrites` (input
            shift of the first layer for pairs, composite BatchNorm in ``"reverse"``
            mode): same function, less rounding and cheaper products. False: evaluate
            the model as given.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn | None = None,
        batches: list[Any] | None = None,
        *,
        loss: ModelLoss | None = None,
        batch_size: BatchSize | None = None,
        check_labels: bool = True,
        objective: Objective | None = None,
        hvp_mode: str = "auto",
        memory_fraction: float = 0.25,
        rewrite: bool = True,
    ) -> None:
        if hvp_mode not in HVP_MODES:
            raise ValueError(f"hvp_mode={hvp_mode!r} is not one of {HVP_MODES}")
        if not batches:
            raise ValueError("batches is empty; pass a list of batches")
        self.model = model
        self.objective = objective_of(loss_fn, loss, batch_size, check_labels, objective)
        self.loss_module = LossModule(model, self.objective)
        self.params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise ValueError("the model has no parameters that require grad")
        self.buffers = dict(model.named_buffers())
        self._state_buffers = prefixed(self.buffers)
        self._init_layout((), [p.shape for p in self.params.values()])
        self._init_batches(batches, model, rewrite)
        self.hvp_mode = self._choose_mode(memory_fraction) if hvp_mode == "auto" else hvp_mode

    @property
    def loss_fn(self) -> LossFn | None:
        """The ``loss_fn`` of the objective (None with ``loss``)."""
        return self.objective.loss_fn

    def _state(self, params: dict[str, Tensor]) -> tuple[dict, dict]:
        return prefixed(params), self._state_buffers

    def _batch_loss(self, params: dict[str, Tensor], batch: Any) -> Tensor:
        return functional_call(self.loss_module, self._state(params), (batch,))

    def loss(self) -> float:
        """The full-data loss ``L(w)``; validates labels, shape and finiteness.

        Raises:
            ValueError: For labels outside the model's class range or a non-finite loss.
        """
        return self._checked_loss(self.loss_module, self._state(self.params), "these weights")

    def _loss_values(self) -> Tensor:
        return torch.tensor([self.loss()], dtype=torch.float64)

    @staticmethod
    def flatten(tensors: dict[str, Tensor] | Sequence[Tensor]) -> Tensor:
        """Concatenate tensors (dict values in order) into one flat vector."""
        values = tensors.values() if isinstance(tensors, dict) else tensors
        return torch.cat([t.reshape(-1) for t in values])

    def gradient(self) -> Tensor:
        """The flat gradient ``grad L(w)`` (one backward pass per batch)."""
        g = None
        with self._context():
            for w, batch in self._weighted():
                gb = self.flatten(grad(self._batch_loss)(self.params, batch))
                g = w * gb if g is None else g + w * gb
        assert g is not None
        return g

    def _random_ops(self) -> list[str]:
        _, batch = next(self._weighted())
        with self._context():
            return random_ops(
                self.model,
                lambda: functional_call(self.loss_module, self._state(self.params), (batch,)),
            )

    def _choose_mode(self, memory_fraction: float) -> str:
        """``"reverse"`` if the reusable graph of all batches fits the memory budget."""
        pairs = self.objective.pairs
        probe = head_of(self.batches[0], 2, self.sizes[0])

        def run_probe() -> object:
            if pairs:  # the model alone: labels are validated later, with a clear error
                return functional_call(self.model, (self.params, self.buffers), (probe[0],))
            with self._context():
                return functional_call(self.loss_module, self._state(self.params), (probe,))

        probe_bytes = sum(
            t.numel() * t.element_size() for t in tensors_of(probe[0] if pairs else probe)
        )
        return choose_hvp_mode(
            self.model,
            run_probe,
            probe_samples=min(2, self.sizes[0]),
            probe_input_bytes=probe_bytes,
            total_samples=sum(self.sizes),
            num_params=self.dim,
            dtype=self.dtype,
            device=self.device,
            memory_fraction=memory_fraction,
        )
