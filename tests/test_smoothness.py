"""Tests of exactlr.smoothness (Algorithm 2) against dense float64 references."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from conftest import dense_hessian
from exactlr.curvature import SpectralOptions, hessian_spectral_norm
from exactlr.smoothness import SampleRecord, estimate_smoothness

DTYPE = torch.float64


def make_model() -> nn.Module:
    """A fresh tiny BN network drawn from the global RNG (one sample of W)."""
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)).to(DTYPE)


def batches(sizes: tuple[int, ...] = (7, 13), seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    x = torch.randn(n, 3, generator=g, dtype=DTYPE)
    y = torch.randint(0, 3, (n,), generator=g)
    return list(zip(x.split(list(sizes)), y.split(list(sizes)), strict=True))


def dense_norm(model: nn.Module, data: list[tuple[Tensor, Tensor]]) -> tuple[float, float]:
    """(lambda_max, lambda_min) of the size-weighted mean loss, by double backward."""
    eig = torch.linalg.eigvalsh(dense_hessian(model, F.cross_entropy, data))
    return float(eig[-1]), float(eig[0])


def redraw(seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make_model()


def test_estimate_fields_and_dense_reference() -> None:
    data = batches()
    rng = torch.get_rng_state()
    est = estimate_smoothness(
        make_model,
        F.cross_entropy,
        data,
        num_samples=3,
        generator=torch.Generator().manual_seed(0),
        tol=1e-6,
        target="both",  # certify lambda_min too: the default certifies only the norm
        stop_below_max=False,  # every sample to tol, not only those that set the max
    )
    assert torch.equal(rng, torch.get_rng_state())
    assert len(est.samples) == len(est.records) == len(est.running_max) == 3
    assert est.k_hat == max(est.samples) == est.running_max[-1]
    assert all(a <= b for a, b in zip(est.running_max, est.running_max[1:], strict=False))
    assert est.running_max == [max(est.samples[: j + 1]) for j in range(3)]
    assert not est.stopped_early and est.variant == "full"
    assert est.num_hvps == sum(r.num_hvps for r in est.records) > 0
    assert len({r.seed for r in est.records}) == 3
    assert len(set(est.samples)) == 3  # different weights, different curvature
    for i, record in enumerate(est.records):
        assert isinstance(record, SampleRecord)
        assert record.index == i and record.converged and record.num_hvps > 0
        assert record.value == est.samples[i]
        assert record.value == max(abs(record.lambda_max), abs(record.lambda_min))
        assert record.seconds >= 0 and math.isfinite(record.loss)
        # The sample is the spectral norm of make_model() under the record's seed ...
        model = redraw(record.seed)
        lmax, lmin = dense_norm(model, data)
        norm = max(abs(lmax), abs(lmin))
        assert abs(record.value - norm) <= 1e-4 * norm
        assert abs(record.lambda_max - lmax) <= 1e-4 * norm
        assert abs(record.lambda_min - lmin) <= 1e-4 * norm
        # ... and what hessian_spectral_norm gives on that model.
        direct = hessian_spectral_norm(model, F.cross_entropy, data, tol=1e-6)
        assert math.isclose(record.value, direct.value, rel_tol=1e-5)


def test_minibatch_variant_is_max_over_batches() -> None:
    data = batches((6, 9, 11))
    est = estimate_smoothness(
        make_model,
        F.cross_entropy,
        data,
        num_samples=2,
        variant="minibatch",
        generator=torch.Generator().manual_seed(3),
        tol=1e-6,
        stop_below_max=False,
        target="both",
    )
    assert est.variant == "minibatch"
    for record in est.records:
        model = redraw(record.seed)
        per_batch = [dense_norm(model, [b]) for b in data]
        norms = [max(abs(a), abs(b)) for a, b in per_batch]
        expected = max(norms)
        assert abs(record.value - expected) <= 1e-4 * expected
        best = per_batch[norms.index(expected)]
        assert abs(record.lambda_max - best[0]) <= 1e-4 * expected
        assert abs(record.lambda_min - best[1]) <= 1e-4 * expected
        # Not the full-data norm: the variants differ.
        full = max(abs(v) for v in dense_norm(model, data))
        assert abs(record.value - full) > 1e-3 * full


def test_deterministic_given_generator() -> None:
    data = batches()
    rng = torch.get_rng_state()
    runs = [
        estimate_smoothness(
            make_model,
            F.cross_entropy,
            data,
            num_samples=2,
            generator=torch.Generator().manual_seed(9),
            method="power",
        )
        for _ in range(2)
    ]
    assert torch.equal(rng, torch.get_rng_state())
    assert runs[0].samples == runs[1].samples
    assert [r.seed for r in runs[0].records] == [r.seed for r in runs[1].records]
    other = estimate_smoothness(
        make_model,
        F.cross_entropy,
        data,
        num_samples=2,
        generator=torch.Generator().manual_seed(10),
    )
    assert other.samples != runs[0].samples


def test_adaptive_stop_on_constant_weights() -> None:
    base = make_model()

    def same() -> nn.Module:
        return copy.deepcopy(base)

    est = estimate_smoothness(
        same,
        F.cross_entropy,
        batches(),
        num_samples=10,
        patience=2,
        generator=torch.Generator().manual_seed(0),
        tol=1e-6,
        stop_below_max=False,
    )
    # Sample 0 sets the max; samples 1 and 2 do not grow it: stop after 3.
    assert est.stopped_early
    assert len(est.samples) == 3
    assert max(est.samples) - min(est.samples) <= 1e-4 * est.k_hat
    full = estimate_smoothness(
        make_model,
        F.cross_entropy,
        batches(),
        num_samples=3,
        patience=5,
        generator=torch.Generator().manual_seed(0),
    )
    assert not full.stopped_early and len(full.samples) == 3


def test_model_from_make_model_keeps_its_state() -> None:
    """A sampled model's eval mode and BN running stats do not leak into the estimate."""
    template = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3))
    template = template.to(DTYPE)
    with torch.no_grad():
        template[1].running_mean.fill_(5.0)
    template.eval()

    def make() -> nn.Module:
        return copy.deepcopy(template)

    est = estimate_smoothness(make, F.cross_entropy, batches(), num_samples=1, tol=1e-6)
    # Curvature of the training loss: batch statistics, not the running ones.
    norm = max(abs(v) for v in dense_norm(template, batches()))
    assert abs(est.k_hat - norm) <= 1e-4 * norm


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"num_samples": 0}, "num_samples=0"),
        ({"num_samples": -2}, "num_samples=-2"),
        ({"num_samples": 1.5}, "num_samples=1.5"),
        ({"variant": "batchwise"}, "variant='batchwise'"),
        ({"patience": 0}, "patience=0"),
        ({"patience": 1.5}, "patience=1.5"),
        ({"rel_tol": -0.1}, "rel_tol=-0.1"),
        ({"rel_tol": math.nan}, "rel_tol=nan"),
        ({"colour": "red"}, "colour"),
        ({"method": "qr"}, "method='qr'"),
        ({"tol": 0.0}, "tol=0.0"),
    ],
)
def test_bad_arguments(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError) as info:
        estimate_smoothness(make_model, F.cross_entropy, batches(), **kwargs)
    assert needle in str(info.value)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="empty"):
        estimate_smoothness(make_model, F.cross_entropy, [])
    with pytest.raises(ValueError, match=r"nn\.Module"):
        estimate_smoothness(lambda: "not a model", F.cross_entropy, batches())
    x, y = batches()[0]
    with pytest.raises(ValueError, match="label 4"):
        estimate_smoothness(make_model, F.cross_entropy, [(x, torch.full_like(y, 4))])


def test_default_certifies_the_norm_only() -> None:
    # Algorithm 2 needs each sample's spectral norm: by default Lanczos stops on the
    # norm's error bound, with no more products than certifying both ends.
    data = batches()
    kwargs = dict(
        num_samples=2,
        generator=torch.Generator().manual_seed(0),
        tol=1e-6,
        stop_below_max=False,
    )
    fast = estimate_smoothness(make_model, F.cross_entropy, data, **kwargs)
    both = estimate_smoothness(make_model, F.cross_entropy, data, target="both", **kwargs)
    assert fast.num_hvps <= both.num_hvps
    for record in fast.records:
        lmax, lmin = dense_norm(redraw(record.seed), data)
        norm = max(abs(lmax), abs(lmin))
        assert abs(record.value - norm) <= 1e-4 * norm


def test_options_as_one_value_or_by_keyword_give_the_same_estimate() -> None:
    data = batches()
    kwargs = dict(num_samples=2, generator=torch.Generator().manual_seed(0))
    typed = estimate_smoothness(
        make_model,
        F.cross_entropy,
        data,
        options=SpectralOptions(tol=1e-6, target="both", rewrite=False),
        **kwargs,
    )
    kwargs["generator"] = torch.Generator().manual_seed(0)
    named = estimate_smoothness(
        make_model, F.cross_entropy, data, tol=1e-6, target="both", rewrite=False, **kwargs
    )
    assert typed.samples == named.samples
    assert typed.num_hvps == named.num_hvps


def test_keywords_replace_single_options() -> None:
    base = SpectralOptions(tol=1e-3, max_iters=7)
    merged = SpectralOptions.from_keywords(base, tol=1e-5)
    assert (merged.tol, merged.max_iters) == (1e-5, 7)
    assert base.tol == 1e-3  # frozen: the base is unchanged


def test_an_unknown_option_is_named_with_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"colour.*valid options: method, tol, .*rewrite"):
        estimate_smoothness(make_model, F.cross_entropy, batches(), colour="red")
    with pytest.raises(ValueError, match="options must be a SpectralOptions"):
        estimate_smoothness(make_model, F.cross_entropy, batches(), options={"tol": 1e-3})


def test_stop_below_max_keeps_k_hat_and_says_what_it_certified() -> None:
    # A sample whose norm is certified below the running max cannot change K_hat: its
    # solver stops early and its record says so; K_hat is the same to tol.
    data = batches()
    kwargs = dict(num_samples=6, generator=torch.Generator().manual_seed(0), tol=1e-6)
    cut = estimate_smoothness(make_model, F.cross_entropy, data, **kwargs)
    kwargs["generator"] = torch.Generator().manual_seed(0)
    every = estimate_smoothness(make_model, F.cross_entropy, data, stop_below_max=False, **kwargs)
    assert cut.k_hat == pytest.approx(every.k_hat, rel=1e-5)
    assert cut.num_hvps <= every.num_hvps
    for a, b in zip(cut.records, every.records, strict=True):
        assert a.value <= b.value * (1 + 1e-8)
        if a.certified == "ceiling":
            assert a.value <= cut.running_max[a.index - 1] and a.num_hvps <= b.num_hvps
        else:
            assert a.certified == "norm" and a.value == pytest.approx(b.value, rel=1e-5)
    assert any(r.certified == "ceiling" for r in cut.records)
