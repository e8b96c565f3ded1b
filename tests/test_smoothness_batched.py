"""Tests of the batched path of Algorithm 2: stacked weight samples under vmap.

References are float64 dense Hessians by double backward (``dense_hessian`` of
``tests/conftest.py``) and the sequential code paths.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from conftest import dense_hessian
from exactlr.curvature import (
    HessianOperator,
    StackedHessianOperator,
    hessian_spectral_norm,
    hessian_spectral_norms,
    lanczos,
    lanczos_batched,
    random_unit_vector,
    training_loss_mode,
)
from exactlr.sampling import draw_model as _draw_model
from exactlr.smoothness import estimate_smoothness

DTYPE = torch.float64
Batches = list[tuple[Tensor, Tensor]]


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).to(DTYPE)


def bn_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)).to(DTYPE)


def bn_conv() -> nn.Module:
    """BatchNorm2d with running buffers, Dropout, and a frozen bias."""
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.BatchNorm2d(2),
        nn.Tanh(),
        nn.Dropout(0.5),
        nn.Flatten(),
        nn.Linear(18, 3),
    ).to(DTYPE)
    model[0].bias.requires_grad_(False)
    return model


MAKERS: dict[str, Callable[[], nn.Module]] = {"mlp": mlp, "bn": bn_mlp, "bn_conv": bn_conv}


def batches(kind: str, sizes: tuple[int, ...] = (7, 13), seed: int = 1) -> Batches:
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    shape = (n, 1, 5, 5) if kind == "bn_conv" else (n, 3)
    x = torch.randn(*shape, generator=g, dtype=DTYPE)
    y = torch.randint(0, 3, (n,), generator=g)
    return list(zip(x.split(list(sizes)), y.split(list(sizes)), strict=True))


def draw(kind: str, seeds: list[int]) -> list[nn.Module]:
    return [_draw_model(MAKERS[kind], seed) for seed in seeds]


def dense_extremes(model: nn.Module, data: Batches) -> tuple[float, float]:
    """(lambda_max, lambda_min) of the size-weighted mean loss, by double backward."""
    eig = torch.linalg.eigvalsh(dense_hessian(model, F.cross_entropy, data))
    return float(eig[-1]), float(eig[0])


def state(model: nn.Module) -> dict:
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "training": {n: m.training for n, m in model.named_modules()},
        "grads": [p.grad for p in model.parameters()],
    }


def same_state(a: dict, b: dict) -> bool:
    return (
        a["training"] == b["training"]
        and all(g is None for g in b["grads"])
        and all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])
        and all(torch.equal(a["buffers"][k], b["buffers"][k]) for k in a["buffers"])
    )


# ------------------------------------------------------------------- the stacked product


@pytest.mark.parametrize("mode", ["forward", "reverse"])
@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_stacked_hvp_equals_per_sample_hvps(kind: str, mode: str) -> None:
    data = batches(kind)
    models = draw(kind, [11, 12, 13, 14])
    before = [state(m) for m in models]
    op = StackedHessianOperator.from_models(models, F.cross_entropy, data, hvp_mode=mode)
    assert op.num_models == 4 and op.hvp_mode == mode
    g = torch.Generator().manual_seed(0)
    vectors = torch.randn(4, op.dim, generator=g, dtype=DTYPE)
    stacked = op.matvec(vectors)
    again = op.matvec(2 * vectors)  # reverse mode reuses its graph
    losses = op.losses()
    for s, model in enumerate(models):
        with training_loss_mode(model):
            ref_op = HessianOperator(model, F.cross_entropy, data, hvp_mode="forward")
            assert ref_op.dim == op.dim
            ref = ref_op.matvec(vectors[s])
            loss = ref_op.loss()
        scale = float(ref.abs().max())
        assert float((stacked[s] - ref).abs().max()) <= 1e-10 * scale
        assert float((again[s] - 2 * ref).abs().max()) <= 2e-10 * scale
        assert math.isclose(losses[s], loss, rel_tol=1e-12)
        assert same_state(before[s], state(model))
    # A sub-stack is the operator of those samples.
    sub = op.subset([1, 3]).matvec(vectors[[1, 3]])
    assert torch.allclose(sub, stacked[[1, 3]], rtol=0, atol=1e-12 * float(stacked.abs().max()))


def test_stacked_operator_rejects_mixed_architectures() -> None:
    data = batches("mlp")
    wide = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3)).to(DTYPE)
    with pytest.raises(ValueError, match="one architecture"):
        StackedHessianOperator.from_models([mlp(), wide], F.cross_entropy, data)
    with pytest.raises(ValueError, match="empty"):
        StackedHessianOperator.from_models([], F.cross_entropy, data)
    op = StackedHessianOperator.from_models([mlp(), mlp()], F.cross_entropy, data)
    with pytest.raises(ValueError, match="shape"):
        op.matvec(torch.zeros(3, op.dim, dtype=DTYPE))


# --------------------------------------------------------------------- batched Lanczos


def test_lanczos_batched_is_lanczos_per_operator() -> None:
    g = torch.Generator().manual_seed(4)
    mats = []
    for n_neg in (0, 3, 6):
        q, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=DTYPE))
        d = torch.linspace(0.1, 4.0, 30, dtype=DTYPE)
        d[:n_neg] *= -1.3
        mats.append(q @ torch.diag(d) @ q.T)
    v0 = torch.randn(3, 30, generator=g, dtype=DTYPE)
    calls: list[list[int]] = []

    def matvec(block: Tensor, index: list[int]) -> Tensor:
        calls.append(list(index))
        return torch.stack([mats[s] @ row for s, row in zip(index, block, strict=True)])

    for target in ("both", "norm"):
        calls.clear()
        batched = lanczos_batched(matvec, v0, tol=1e-7, target=target)
        for s, res in enumerate(batched):
            single = lanczos(lambda v, s=s: mats[s] @ v, v0[s], tol=1e-7, target=target)
            assert res == single  # same iteration, same products: identical results
            exact = torch.linalg.eigvalsh(mats[s])
            assert abs(res.spectral_norm - float(exact.abs().max())) <= 1e-6 * 4.0 * 1.3
        # Stopped runs are not asked for products again.
        counts = [sum(s in c for c in calls) for s in range(3)]
        assert counts == [r.num_matvecs for r in batched]


def test_lanczos_batched_errors() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        lanczos_batched(lambda q, i: q, torch.ones(4))
    with pytest.raises(ValueError, match="shape"):
        lanczos_batched(lambda q, i: q[:, :2], torch.ones(2, 4))
    with pytest.raises(ValueError, match="not finite"):
        lanczos_batched(lambda q, i: q * math.nan, torch.ones(2, 4))


# ----------------------------------------------------------- spectral norms against dense


@pytest.mark.parametrize("mode", ["forward", "reverse"])
@pytest.mark.parametrize("kind", sorted(MAKERS))
def test_batched_norms_match_dense_eigvalsh(kind: str, mode: str) -> None:
    data = batches(kind)
    seeds = [21, 22, 23, 24, 25]
    models = draw(kind, seeds)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    results = hessian_spectral_norms(
        models, F.cross_entropy, data, tol=1e-9, generators=gens, hvp_mode=mode
    )
    assert len(results) == 5
    for model, res, seed in zip(models, results, seeds, strict=True):
        lmax, lmin = dense_extremes(model, data)
        norm = max(abs(lmax), abs(lmin))
        assert res.converged and res.hvp_mode == mode and res.method == "lanczos"
        assert abs(res.value - norm) <= 1e-6 * norm
        assert abs(res.lambda_max - lmax) <= 1e-6 * norm
        assert abs(res.lambda_min - lmin) <= 1e-6 * norm
        single = hessian_spectral_norm(
            model,
            F.cross_entropy,
            data,
            tol=1e-9,
            generator=torch.Generator().manual_seed(seed),
            hvp_mode=mode,
            target="both",
        )
        assert math.isclose(res.value, single.value, rel_tol=1e-8)
        assert math.isclose(res.loss, single.loss, rel_tol=1e-12)
    # target="both" starts a single model from a block of two vectors, the stack from
    # one; with target="norm" both run the same iteration from the same start vector:
    # equal counts up to rounding at the stopping threshold.
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    stacked = hessian_spectral_norms(
        models, F.cross_entropy, data, tol=1e-9, generators=gens, hvp_mode=mode, target="norm"
    )
    for model, res, seed in zip(models, stacked, seeds, strict=True):
        single = hessian_spectral_norm(
            model,
            F.cross_entropy,
            data,
            tol=1e-9,
            generator=torch.Generator().manual_seed(seed),
            hvp_mode=mode,
            target="norm",
        )
        assert math.isclose(res.value, single.value, rel_tol=1e-8)
        assert abs(res.num_hvps - single.num_hvps) <= 1


# ----------------------------------------------------------------- estimate_smoothness


@pytest.mark.parametrize("kind", ["mlp", "bn"])
def test_estimate_with_sample_batch_equals_sequential(kind: str) -> None:
    data = batches(kind)
    rng = torch.get_rng_state()
    # Every sample to tol: the ceiling stop is not part of the stacked path.
    kwargs = dict(num_samples=6, tol=1e-8, stop_below_max=False)
    seq = estimate_smoothness(
        MAKERS[kind], F.cross_entropy, data, generator=torch.Generator().manual_seed(5), **kwargs
    )
    bat = estimate_smoothness(
        MAKERS[kind],
        F.cross_entropy,
        data,
        generator=torch.Generator().manual_seed(5),
        sample_batch=4,
        **kwargs,
    )
    assert torch.equal(rng, torch.get_rng_state())
    assert [r.seed for r in bat.records] == [r.seed for r in seq.records]
    assert [r.index for r in bat.records] == list(range(6))
    for a, b in zip(bat.records, seq.records, strict=True):
        assert math.isclose(a.value, b.value, rel_tol=1e-7)
        assert math.isclose(a.loss, b.loss, rel_tol=1e-12)
        assert a.converged and a.num_hvps > 0 and a.seconds >= 0
        lmax, lmin = dense_extremes(_draw_model(MAKERS[kind], a.seed), data)
        assert math.isclose(a.value, max(abs(lmax), abs(lmin)), rel_tol=1e-6)
    assert math.isclose(bat.k_hat, seq.k_hat, rel_tol=1e-7)
    assert bat.k_hat == max(bat.samples) == bat.running_max[-1]
    assert bat.running_max == [max(bat.samples[: j + 1]) for j in range(6)]
    assert not bat.stopped_early and bat.discarded == 0


def test_adaptive_stop_with_groups() -> None:
    data = batches("bn")
    base = bn_mlp()

    def same() -> nn.Module:
        return copy.deepcopy(base)

    kwargs = dict(num_samples=10, patience=2, tol=1e-8, stop_below_max=False)
    est = estimate_smoothness(same, F.cross_entropy, data, sample_batch=4, **kwargs)
    # Sample 0 sets the max, 1 and 2 do not grow it: stop after 3 as sequentially; the
    # group's fourth sample was evaluated and dropped.
    assert est.stopped_early and len(est.samples) == 3 and est.discarded == 1
    assert len(est.records) == len(est.running_max) == 3
    seq = estimate_smoothness(same, F.cross_entropy, data, **kwargs)
    assert seq.discarded == 0 and len(seq.samples) == 3
    assert est.samples == pytest.approx(seq.samples, rel=1e-7)

    # Random samples: batched and sequential stop at the same sample.
    for patience in (1, 2, 3):
        kw = dict(num_samples=12, patience=patience, rel_tol=0.02, tol=1e-8, stop_below_max=False)
        a = estimate_smoothness(
            bn_mlp,
            F.cross_entropy,
            data,
            sample_batch=5,
            generator=torch.Generator().manual_seed(7),
            **kw,
        )
        b = estimate_smoothness(
            bn_mlp, F.cross_entropy, data, generator=torch.Generator().manual_seed(7), **kw
        )
        assert (a.stopped_early, len(a.samples)) == (b.stopped_early, len(b.samples))
        assert a.samples == pytest.approx(b.samples, rel=1e-7)
        used = len(a.samples)
        assert a.discarded == (min(-(-used // 5) * 5, 12) - used if a.stopped_early else 0)


def test_unbatchable_settings_fall_back_to_sequential() -> None:
    data = batches("bn", (6, 9, 11))
    gen = 3
    for kwargs in (
        {"variant": "minibatch"},
        {"method": "power"},
        {"subsample": 0.5},
    ):
        a = estimate_smoothness(
            bn_mlp,
            F.cross_entropy,
            data,
            num_samples=3,
            sample_batch=3,
            generator=torch.Generator().manual_seed(gen),
            **kwargs,
        )
        b = estimate_smoothness(
            bn_mlp,
            F.cross_entropy,
            data,
            num_samples=3,
            generator=torch.Generator().manual_seed(gen),
            **kwargs,
        )
        assert a.samples == b.samples  # the same sequential loop, bit for bit


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_sample_batch(bad: object) -> None:
    with pytest.raises(ValueError, match="sample_batch"):
        estimate_smoothness(mlp, F.cross_entropy, batches("mlp"), sample_batch=bad)


def test_group_rejects_bad_labels_and_mixed_models() -> None:
    x, y = batches("mlp")[0]
    with pytest.raises(ValueError, match="label 4"):
        estimate_smoothness(
            mlp, F.cross_entropy, [(x, torch.full_like(y, 4))], num_samples=2, sample_batch=2
        )
    sizes = iter([4, 5])

    def varying() -> nn.Module:
        width = next(sizes)
        return nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, 3)).to(DTYPE)

    with pytest.raises(ValueError, match="one architecture"):
        estimate_smoothness(varying, F.cross_entropy, [(x, y)], num_samples=2, sample_batch=2)
    with pytest.raises(ValueError, match="generators"):
        hessian_spectral_norms([mlp(), mlp()], F.cross_entropy, [(x, y)], generators=[None])
    v = random_unit_vector(4)
    assert v.shape == (4,)
