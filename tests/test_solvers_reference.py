"""The solvers' certificates against dense float64 Hessians, over many weight seeds.

``converged=True`` must mean what the result's ``certified`` field says: with
``target="both"`` that ``lambda_max`` and ``lambda_min`` are within ``tol * value`` of
the dense Hessian's extreme eigenvalues; with ``target="norm"`` that ``value`` is within
``tol * value`` of the spectral norm and the other end lies inside the spectrum. The
dense reference is ``torch.autograd.functional.hessian`` (plain double backward) over
the flattened parameters (``dense_hessian`` of ``tests/conftest.py``).

A residual bound cannot see an extreme eigenvalue that the Krylov space has not picked
up; over a random start that is a matter of chance, so these tests count over 30 weight
seeds. ``test_block_start_finds_the_extreme_a_single_start_misses`` keeps the case where
one start vector stops, "converged", at the second-smallest eigenvalue.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import dense_hessian
from exactlr.curvature import (
    HessianOperator,
    hessian_spectral_norm,
    lanczos,
    random_unit_vector,
    training_loss_mode,
)

DTYPE = torch.float64
TOL = 1e-4


def conv_bn(seed: int) -> nn.Module:
    """Conv(1->4, 3x3) - BatchNorm2d (batch statistics) - tanh - linear: 483 parameters."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Tanh(), nn.Flatten(), nn.Linear(144, 3)
    ).to(DTYPE)


def tanh_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3)
    ).to(DTYPE)


def bn_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3)).to(
        DTYPE
    )


FAMILIES = {"conv_bn": (conv_bn, (1, 8, 8)), "tanh_mlp": (tanh_mlp, (6,)), "bn_mlp": (bn_mlp, (6,))}
#: 30 (family, seed) cases: 10 seeds per family.
CASES = [(family, seed) for family in FAMILIES for seed in range(10)]


def problem(family: str, seed: int, data_seed: int | None = None) -> tuple:
    """Model, loss and two batches of 32 (inputs of the family's shape, 3 classes)."""
    make, shape = FAMILIES[family]
    g = torch.Generator().manual_seed(1000 + seed if data_seed is None else data_seed)
    x = torch.randn(64, *shape, generator=g, dtype=DTYPE)
    y = torch.randint(0, 3, (64,), generator=g)
    return make(seed), F.cross_entropy, [(x[:32], y[:32]), (x[32:], y[32:])]


@functools.cache
def dense_extremes(family: str, seed: int, data_seed: int | None = None) -> tuple[float, float]:
    """``(lambda_min, lambda_max)`` of the dense float64 Hessian (double backward)."""
    model, loss_fn, batches = problem(family, seed, data_seed)
    hessian = dense_hessian(model, loss_fn, batches)
    eig = torch.linalg.eigvalsh(hessian)
    return float(eig[0]), float(eig[-1])


def check(res, lmin: float, lmax: float, tol: float) -> None:
    """What ``res.certified`` claims, if ``res.converged``."""
    norm = max(abs(lmin), abs(lmax))
    slack = 1e-10 * norm
    # Ritz values and Rayleigh quotients always lie inside the spectrum.
    assert lmin - slack <= res.lambda_min <= res.lambda_max <= lmax + slack
    if not res.converged:
        return
    assert abs(res.value - norm) <= tol * norm
    if res.certified == "both":
        assert abs(res.lambda_max - lmax) <= tol * norm
        assert abs(res.lambda_min - lmin) <= tol * norm
    else:
        assert res.certified == "norm"


@pytest.mark.parametrize(("family", "seed"), CASES)
@pytest.mark.parametrize(("method", "target"), [("lanczos", "both"), ("power", "both")])
def test_certificate_holds_against_dense_hessian(
    family: str, seed: int, method: str, target: str
) -> None:
    lmin, lmax = dense_extremes(family, seed)
    model, loss_fn, batches = problem(family, seed)
    res = hessian_spectral_norm(
        model,
        loss_fn,
        batches,
        method=method,
        target=target,
        tol=TOL,
        max_iters=300 if method == "lanczos" else 400,
        generator=torch.Generator().manual_seed(0),
        hvp_mode="reverse",
    )
    assert res.certified == target
    if method == "lanczos":  # Lanczos meets tol well within its budget here
        assert res.converged
    check(res, lmin, lmax, TOL)


def test_norm_target_single_start_misses_are_rare_and_from_below() -> None:
    """``target="norm"`` runs one start vector: its value is a Ritz value, always at most
    the norm, and within tol of it unless the start missed the top eigenvector. Over
    the 30 cases that happens once (bn_mlp, seed 4: 0.82366 for 0.82760, 4.8e-3 off);
    the block of ``target="both"`` misses none (test above)."""
    misses = []
    for family, seed in CASES:
        lmin, lmax = dense_extremes(family, seed)
        norm = max(abs(lmin), abs(lmax))
        model, loss_fn, batches = problem(family, seed)
        res = hessian_spectral_norm(
            model,
            loss_fn,
            batches,
            tol=TOL,
            max_iters=300,
            generator=torch.Generator().manual_seed(0),
            hvp_mode="reverse",
        )
        assert res.converged and res.certified == "norm"
        assert res.value <= norm * (1 + 1e-10)
        if norm - res.value > TOL * norm:
            misses.append((family, seed, (norm - res.value) / norm))
    assert len(misses) <= 1, misses


def test_block_start_finds_the_extreme_a_single_start_misses() -> None:
    """conv_bn, weight seed 0, data seed 1: lambda_min = -0.86744, its neighbour -0.85834.

    From the start vector of generator seed 0, plain Lanczos stops "converged" at the
    neighbour (an error 10x tol that its residual bound cannot see); the default
    ``target="both"`` run (a block of two start vectors) finds lambda_min.
    """
    lmin, lmax = dense_extremes("conv_bn", 0, 1)
    model, loss_fn, batches = problem("conv_bn", 0, 1)
    norm = max(abs(lmin), abs(lmax))
    with training_loss_mode(model):
        op = HessianOperator(model, loss_fn, batches, hvp_mode="reverse")
        v0 = random_unit_vector(op.dim, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
        single = lanczos(op, v0, tol=TOL, max_iters=300)
    assert single.converged and single.lambda_min - lmin > 10 * TOL * norm  # the miss
    res = hessian_spectral_norm(
        model,
        loss_fn,
        batches,
        target="both",
        tol=TOL,
        generator=torch.Generator().manual_seed(0),
        hvp_mode="reverse",
    )
    assert res.converged and res.certified == "both"
    check(res, lmin, lmax, TOL)
