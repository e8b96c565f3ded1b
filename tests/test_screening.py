"""Tests of Algorithm 2's subsample screen (exactlr.screening) against dense float64
Hessians."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from conftest import dense_hessian
from exactlr import screening
from exactlr.curvature import SpectralOptions
from exactlr.smoothness import SmoothnessEstimate, estimate_smoothness

DTYPE = torch.float64


def make_model() -> nn.Module:
    """A tanh MLP whose output layer is scaled by a factor drawn with the weights: the
    samples' Hessian norms spread over a decade, so some are far below the largest."""
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(DTYPE)
    with torch.no_grad():
        model[2].weight.mul_(0.3 + 4.0 * torch.rand((), dtype=DTYPE))
    return model


def batches(n: int = 400, seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=DTYPE)
    y = torch.randint(0, 3, (n,), generator=g)
    return list(zip(x.split(n // 2), y.split(n // 2), strict=True))


def dense_norms(seeds: list[int], data: list[tuple[Tensor, Tensor]]) -> list[float]:
    norms = []
    for seed in seeds:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = make_model()
        eig = torch.linalg.eigvalsh(dense_hessian(model, F.cross_entropy, data))
        norms.append(float(eig.abs().max()))
    return norms


def estimate(data: list, **kwargs: object) -> SmoothnessEstimate:
    options = dict(
        num_samples=12, generator=torch.Generator().manual_seed(0), tol=1e-6, subsample=0.25
    )
    options.update(kwargs)
    return estimate_smoothness(make_model, F.cross_entropy, data, **options)


def test_the_screen_keeps_k_hat_and_skips_only_samples_far_below_it() -> None:
    data = batches()
    est = estimate(data)
    dense = dense_norms([r.seed for r in est.records], data)
    screened = [r for r in est.records if r.certified == "screened"]
    assert screened, "the spread of norms should let the screen skip some samples"
    assert est.k_hat == pytest.approx(max(dense), rel=1e-6)
    for r in screened:
        # No full-data product; its true norm is below half of K_hat, its record is the
        # subsample estimate, also below it.
        assert r.num_hvps == 0 and r.subsample_hvps > 0
        assert dense[r.index] < 0.5 * est.k_hat and r.value < 0.5 * est.k_hat
    for r in est.records:
        if r.certified == "norm":
            assert r.value == pytest.approx(dense[r.index], rel=1e-6)
        elif r.certified == "ceiling":
            assert r.value <= dense[r.index] * (1 + 1e-9) <= est.k_hat * (1 + 1e-6)


def test_the_screen_gives_the_k_hat_of_the_draw_order_for_fewer_products() -> None:
    data = batches()
    screened = estimate(data)
    in_order = estimate(data, screen=None)
    assert not any(r.certified == "screened" for r in in_order.records)
    assert screened.k_hat == pytest.approx(in_order.k_hat, rel=1e-6)
    assert screened.num_hvps < in_order.num_hvps
    assert [r.seed for r in screened.records] == [r.seed for r in in_order.records]


def test_kept_starts_and_rerun_subsamples_give_the_same_records(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Without room for the start vectors each full-data solve reruns its subsample with
    # the same draws: the same start, so the same values, product counts and losses.
    data = batches()
    kept = estimate(data)
    monkeypatch.setattr(screening, "KEEP_STARTS_BYTES", 0)
    rerun = estimate(data)
    for a, b in zip(kept.records, rerun.records, strict=True):
        # The kept start carries the loss of the subsample pass: the same number.
        assert (a.value, a.num_hvps, a.certified, a.loss) == (
            b.value,
            b.num_hvps,
            b.certified,
            b.loss,
        )
        assert a.subsample_hvps <= b.subsample_hvps


@pytest.mark.parametrize(
    "kwargs",
    [
        {"patience": 3},  # the adaptive stop looks at samples in draw order
        {"stop_below_max": False},  # every sample to tol
        {"subsample": None},  # no subsample norm to screen with
        {"variant": "minibatch"},
    ],
)
def test_no_screen_where_it_does_not_apply(kwargs: dict) -> None:
    est = estimate(batches(), **kwargs)
    assert not any(r.certified == "screened" for r in est.records)
    assert all(r.num_hvps > 0 for r in est.records)


def test_too_few_examples_for_a_subsample_means_no_screen() -> None:
    # subsample="auto" takes none below 2,000 examples: the samples run in draw order.
    est = estimate(batches(), subsample="auto")
    assert all(r.subsample_hvps == 0 and r.certified != "screened" for r in est.records)


@pytest.mark.parametrize("screen", [0, 1.5, True, "half"])
def test_a_bad_screen_is_named(screen: object) -> None:
    with pytest.raises(ValueError, match="screen"):
        SpectralOptions(screen=screen).validate()  # type: ignore[arg-type]
