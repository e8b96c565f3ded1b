"""Hessian-vector products at S weight samples of one architecture, in one vmapped call.

See :class:`StackedHessianOperator`; the loss, the product modes and the rewrites are
those of :mod:`exactlr.curvature.operators`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from exactlr.curvature.batches import LossFn, training_loss_mode
from exactlr.curvature.determinism import random_ops
from exactlr.curvature.objective import BatchSize, LossModule, ModelLoss, Objective
from exactlr.curvature.operators import (
    HVP_MODES,
    HessianOperator,
    LossOperator,
    objective_of,
    prefixed,
)


class StackedHessianOperator(LossOperator):
    """The Hessians ``H_1..H_S`` of one loss at S weight samples of one architecture.

    ``H_s`` is the Hessian of :class:`HessianOperator`'s loss at the weights ``w_s`` of
    sample s, in training-loss mode. The S parameter sets are stacked along a new leading
    dimension (what :func:`torch.func.stack_module_state` does) and one
    :func:`~torch.func.vmap`-ed :func:`~torch.func.functional_call` of a stateless copy
    of the architecture evaluates all S losses at once. The S losses are independent, so
    the Hessian of ``sum_s L(w_s)`` with respect to the stacked weights ``W`` is
    block-diagonal with blocks ``H_s``, and one Hessian-vector product of that sum with
    the stacked tangent ``V = (v_1; ..; v_S)`` is ``(H_1 v_1; ..; H_S v_S)``:

    * ``"forward"``: ``jvp(grad(sum_s L(w_s)), W, V)``, batch by batch;
    * ``"reverse"``: ``vjp(grad(sum_s L(w_s)), W)`` built once and reused.

    BatchNorm: the stateless copy is taken inside
    :func:`~exactlr.curvature.batches.training_loss_mode` (batch statistics per sample,
    no buffer writes, dropout off), a form vmap handles; the tests check it against
    :class:`HessianOperator` on BatchNorm models in float64.

    Vectors are ``(S, dim)`` matrices; row s is a flat vector of sample s in the order of
    :class:`HessianOperator` (trainable parameters in ``named_parameters()`` order).
    Build one with :meth:`from_models`.

    Args:
        base: Stateless template of the architecture in training-loss mode (its own
            tensors are never read; :meth:`from_models` puts it on the meta device).
        params: Stacked trainable parameters, name -> ``(S, *shape)``.
        constants: Stacked buffers and frozen parameters, name -> ``(S, *shape)``.
        objective: The batch loss (:class:`~exactlr.curvature.objective.Objective`).
        batches: List of batches on the parameters' device.
        hvp_mode: ``"forward"`` or ``"reverse"``.
        rewrite: As :class:`HessianOperator`'s (the shift hook goes on ``base``).
    """

    def __init__(
        self,
        base: nn.Module,
        params: dict[str, Tensor],
        constants: dict[str, Tensor],
        objective: Objective,
        batches: list[Any],
        *,
        hvp_mode: str,
        rewrite: bool = True,
    ) -> None:
        if hvp_mode not in ("forward", "reverse"):
            raise ValueError(f"hvp_mode={hvp_mode!r} must be 'forward' or 'reverse' here")
        if not params:
            raise ValueError("the models have no parameters that require grad")
        self.base, self.params, self.constants = base, params, constants
        self.objective, self.hvp_mode = objective, hvp_mode
        self.loss_module = LossModule(base, objective)
        self.num_models = next(iter(params.values())).shape[0]
        self._init_layout((self.num_models,), [p.shape[1:] for p in params.values()])
        self._init_batches(batches, base, rewrite)

    @classmethod
    def from_models(
        cls,
        models: Sequence[nn.Module],
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
    ) -> StackedHessianOperator:
        """Stack S models of one architecture (their current weights are the points).

        The models are not modified. ``"auto"`` picks ``"reverse"`` when S times the
        graph :class:`HessianOperator` estimates for one model fits ``memory_fraction``
        of free memory. The loss is given as for :class:`HessianOperator`
        (``loss_fn``, or ``loss`` and ``batch_size``, or one ``objective``).

        Raises:
            ValueError: No models, or models that differ in parameter/buffer names,
                shapes, dtypes or which parameters require grad.
        """
        if hvp_mode not in HVP_MODES:
            raise ValueError(f"hvp_mode={hvp_mode!r} is not one of {HVP_MODES}")
        if not models:
            raise ValueError("models is empty; pass at least one model")
        objective = objective_of(loss_fn, loss, batch_size, check_labels, objective)
        if not batches:
            raise ValueError("batches is empty; pass a list of batches")
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
                    objective=objective,
                    batches=batches,
                    memory_fraction=memory_fraction / len(models),
                    rewrite=False,
                ).hvp_mode
            base = copy.deepcopy(models[0])  # keeps the training-loss-mode flags
        return cls(
            base.to("meta"), params, stacked, objective, batches, hvp_mode=hvp_mode, rewrite=rewrite
        )

    def subset(self, index: Sequence[int]) -> StackedHessianOperator:
        """The operator of the samples ``index`` only (a new stack, no graph)."""
        rows = torch.as_tensor(list(index), dtype=torch.long, device=self.device)
        sub = StackedHessianOperator(
            self.base,
            {k: v.index_select(0, rows) for k, v in self.params.items()},
            {k: v.index_select(0, rows) for k, v in self.constants.items()},
            self.objective,
            self.batches,
            hvp_mode=self.hvp_mode,
            rewrite=False,  # the shift is this stack's: no second median
        )
        sub.rewrite, sub.shift = self.rewrite, self.shift
        return sub

    def _sample_batch_loss(
        self, params: dict[str, Tensor], constants: dict[str, Tensor], batch: Any
    ) -> Tensor:
        return functional_call(self.loss_module, (prefixed(params), prefixed(constants)), (batch,))

    def _batch_loss(self, params: dict[str, Tensor], batch: Any) -> Tensor:
        """``sum_s loss(model(w_s), batch)`` for one batch."""
        per_sample = vmap(self._sample_batch_loss, in_dims=(0, 0, None))
        return per_sample(params, self.constants, batch).sum()

    def _sample_state(self, s: int) -> tuple[dict, dict]:
        params = {k: v[s] for k, v in self.params.items()}
        constants = {k: v[s] for k, v in self.constants.items()}
        return prefixed(params), prefixed(constants)

    def losses(self) -> list[float]:
        """``L(w_s)`` for every sample; validates labels, shape and finiteness.

        Raises:
            ValueError: For labels outside the class range, a non-scalar or a non-finite
                loss.
        """
        return [
            self._checked_loss(
                self.loss_module, self._sample_state(s), f"the weights of stacked sample {s}"
            )
            for s in range(self.num_models)
        ]

    def _loss_values(self) -> Tensor:
        return torch.tensor(self.losses(), dtype=torch.float64)

    def _random_ops(self) -> list[str]:
        _, batch = next(self._weighted())
        state = self._sample_state(0)
        with self._context():
            return random_ops(self.base, lambda: functional_call(self.loss_module, state, (batch,)))

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
