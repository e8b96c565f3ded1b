"""Shared test fixtures, and the dense float64 Hessian reference (``dense_hessian``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from exactlr.curvature import training_loss_mode

_SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The offline dataset copies (`MNIST/raw`, `cifar-10-batches-py`), see shared/data/README."""
    candidates = [_SHARED_DATA]
    if os.environ.get("EXACTLR_DATA"):
        candidates.append(Path(os.environ["EXACTLR_DATA"]))
    for path in candidates:
        if path.is_dir():
            return path
    pytest.skip(f"offline data folder not found (looked in {candidates}); set EXACTLR_DATA")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tests use tiny problems: extra threads only add overhead (and thrash on a busy
    2-core machine, where OpenMP spin-waiting made 3-epoch runs 20-100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_data(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No data folder given and none found ($EXACTLR_DATA unset, no ./data): smoke-scale
    figures run on the synthetic set (with ``data_dir=None``)."""
    monkeypatch.delenv("EXACTLR_DATA", raising=False)
    monkeypatch.chdir(tmp_path_factory.mktemp("no_data"))


def dense_hessian(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    batches: Sequence[tuple[Tensor, Any]],
) -> Tensor:
    """Hessian of ``sum_b (n_b / N) loss_fn(model(x_b), y_b)`` by double backward.

    The slow reference of every curvature test (STYLE.md rule 2): the dense matrix over
    the flattened parameters that require grad, in the model's dtype (float64 in the
    tests), with the model in its training-loss mode
    (:func:`~exactlr.curvature.training_loss_mode`). ``torch.autograd.functional.hessian``
    (plain double backward), not ``torch.func.hessian``: in torch 2.13 the latter's
    vmap-over-jvp gives wrong Hessians for BatchNorm in batch-statistics mode.
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p.detach() for n, p in model.named_parameters() if p.requires_grad]
    shapes, sizes = [p.shape for p in params], [p.numel() for p in params]
    total = sum(len(x) for x, _ in batches)
    with training_loss_mode(model):
        buffers = dict(model.named_buffers())

        def loss(flat: Tensor) -> Tensor:
            chunks = [c.view(s) for c, s in zip(flat.split(sizes), shapes, strict=True)]
            p = dict(zip(names, chunks, strict=True))
            out = 0.0
            for x, y in batches:
                outputs = torch.func.functional_call(model, (p, buffers), (x,))
                out = out + len(x) / total * loss_fn(outputs, y)
            return out

        flat = torch.cat([p.reshape(-1) for p in params])
        return torch.autograd.functional.hessian(loss, flat)
