"""K copies of one model evaluated in one pass: the grid's stacked forward.

:class:`_Stacked` evaluates ``l(W)[k] = CE_mean(f(W[k]; x), y)`` for K weight sets W[k]
of one architecture on a shared batch, either on the *folded* layout (the K runs'
channels side by side; every model of :mod:`exactlr.models`) or with ``torch.vmap``
(any other model). :func:`exactlr.paper.grid.train_grid` trains with it.
"""

from __future__ import annotations

import copy
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, replace_all_batch_norm_modules_

__all__: list[str] = []


#: Layers without parameters that the folded path applies as they are (per channel or
#: per sample, so they act on every run's block of channels alike).
_FOLD_FREE = (
    nn.ReLU,
    nn.AvgPool2d,
    nn.MaxPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Flatten,
    nn.Identity,
)


def _foldable(model: nn.Module) -> bool:
    """Whether `_Stacked` can run `model` on the folded layout (else it uses `torch.vmap`).

    True for an `nn.Sequential` of Conv2d (groups 1, zero padding, numeric padding),
    Linear, stateless BatchNorm1d/2d and the parameter-free layers of `_FOLD_FREE`
    (Flatten over all but the batch dimension): every model of `exactlr.models`.
    """
    if not isinstance(model, nn.Sequential):
        return False
    for layer in model:
        if isinstance(layer, nn.Conv2d):
            if layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
                return False
        elif isinstance(layer, nn.BatchNorm1d | nn.BatchNorm2d):
            if layer.running_mean is not None or layer.running_var is not None:
                return False
        elif isinstance(layer, nn.Flatten):
            if layer.start_dim != 1 or layer.end_dim != -1:
                return False
        elif not isinstance(layer, (nn.Linear, *_FOLD_FREE)):
            return False
    return True


class _Stacked:
    """The batched loss of K runs: `losses(W, x, y) -> ([K] mean losses, [K, B, C] logits)`.

    `W` maps parameter names to stacked tensors `[K, *shape]`; the model's other tensors
    (frozen parameters, buffers) are shared by all runs.

    Two ways to evaluate it, the same function (tested equal in float64):

    - **folded** (`_foldable` models, i.e. every model of `exactlr.models`): the K runs'
      activations are laid side by side along the feature / channel dimension,
      `h[n, k*C + c, ...]` = run k's channel c of sample n. A Conv2d or Linear layer
      whose input is still the shared batch becomes *one* layer with K*O outputs
      (weights reshaped to `[K*O, ...]`); a later Conv2d is, on a CPU, K convolutions on
      the runs' channel blocks, concatenated (oneDNN's grouped convolution, `groups=K`,
      is slower than K separate ones there, forward + backward, as
      `benchmarks/bench_grid_layers.py` measures), and one grouped convolution on other
      devices (one kernel launch); a later Linear is one `bmm` over `[K, B, I]`;
      BatchNorm is one `F.batch_norm` over K*C channels (batch statistics: per run and
      channel, as alone); pooling, ReLU and Flatten act per channel / block and need
      nothing; the loss is `F.cross_entropy` over the `[B, C, K]` logits.
    - **vmap** (any other model): `torch.vmap(functional_call(...))` over the stacked
      weights, data unbatched. vmap's batch rules make every later convolution a
      grouped one and route BatchNorm through permuted elementwise ops, so it is slower
      than the folded layout (`benchmarks/bench_grid_layers.py` compares the two and
      K sequential runs).
    """

    def __init__(self, model: nn.Module, device: torch.device, *, fold: bool = True) -> None:
        base = copy.deepcopy(model).to(device)
        replace_all_batch_norm_modules_(base)  # no running stats: nothing updated in place
        base.train()
        self.base = base
        self.names = [n for n, p in base.named_parameters() if p.requires_grad]
        self.w0 = [p.detach() for p in base.parameters() if p.requires_grad]
        self.shared: dict[str, Tensor] = {
            n: p.detach() for n, p in base.named_parameters() if not p.requires_grad
        }
        self.shared.update({n: b for n, b in base.named_buffers() if b is not None})
        self.folded = fold and _foldable(base)
        # Later convolutions: K separate ones on a CPU (faster there than oneDNN's grouped
        # convolution, see benchmarks/bench_grid_layers.py), one grouped convolution
        # (groups=K) elsewhere (one launch).
        self.loop_convs = device.type == "cpu"

        def loss(params: dict[str, Tensor], shared: dict[str, Tensor], x: Tensor, y: Tensor):
            logits = functional_call(base, (params, shared), (x,))
            return F.cross_entropy(logits, y), logits

        self._batched = torch.vmap(loss, in_dims=(0, None, None, None))

    def __call__(self, stacked: dict[str, Tensor], x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if self.folded:
            return self._folded(stacked, x, y)
        return self._batched(stacked, self.shared, x, y)

    def _folded(self, stacked: dict[str, Tensor], x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The folded evaluation (see the class docstring)."""
        k = next(iter(stacked.values())).shape[0]

        def weight(name: str) -> Tensor | None:
            """Stacked `[K, *shape]` tensor `name` (a frozen one expanded), None if absent."""
            if name in stacked:
                return stacked[name]
            tensor = self.shared.get(name)
            return None if tensor is None else tensor.expand(k, *tensor.shape)

        h, folded = x, False  # folded: h is [B, K*C, ...]; else the shared [B, C, ...]
        for prefix, layer in self.base.named_children():
            w = weight(f"{prefix}.weight")
            b = weight(f"{prefix}.bias")
            if isinstance(layer, nn.Conv2d):
                conv = partial(
                    F.conv2d, stride=layer.stride, padding=layer.padding, dilation=layer.dilation
                )
                if folded and self.loop_convs:  # oneDNN's grouped conv is slower on a CPU
                    blocks = h.chunk(k, dim=1)
                    h = torch.cat(
                        [conv(blocks[i], w[i], None if b is None else b[i]) for i in range(k)],
                        dim=1,
                    )
                else:  # shared input: one wide conv; folded input: one grouped conv
                    h = conv(
                        h,
                        w.reshape(k * layer.out_channels, *w.shape[2:]),
                        None if b is None else b.reshape(-1),
                        groups=k if folded else 1,
                    )
            elif isinstance(layer, nn.Linear):
                if folded:  # [K, B, I] @ [K, I, O] -> [B, K*O]
                    batch = h.shape[0]
                    out = torch.bmm(
                        h.reshape(batch, k, layer.in_features).transpose(0, 1),
                        w.transpose(1, 2),
                    )
                    if b is not None:
                        out = out + b[:, None, :]
                    h = out.transpose(0, 1).reshape(batch, k * layer.out_features)
                else:
                    h = F.linear(
                        h,
                        w.reshape(k * layer.out_features, layer.in_features),
                        None if b is None else b.reshape(-1),
                    )
            elif isinstance(layer, nn.BatchNorm1d | nn.BatchNorm2d):
                if not folded:
                    h = h.repeat(1, k, *[1] * (h.dim() - 2))
                h = F.batch_norm(
                    h,
                    None,
                    None,
                    None if w is None else w.reshape(-1),
                    None if b is None else b.reshape(-1),
                    True,
                    0.0,
                    layer.eps,
                )
            else:
                h = layer(h)
                continue
            folded = True
        # A model without weighted layers has no trainable parameters (train_grid refuses it).
        assert folded, "the folded path needs a Conv2d, Linear or BatchNorm layer"
        batch = h.shape[0]
        logits = h.reshape(batch, k, -1)  # [B, K, C]
        losses = F.cross_entropy(
            logits.transpose(1, 2), y[:, None].expand(batch, k), reduction="none"
        ).mean(dim=0)
        return losses, logits.transpose(0, 1)
