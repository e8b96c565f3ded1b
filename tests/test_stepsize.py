"""Tests of exactlr.stepsize: the formula, its guards, and suggest_lr."""

from __future__ import annotations

import copy
import math

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import nn

from exactlr.curvature import full_loss, hessian_spectral_norm
from exactlr.stepsize import default_make_model, exact_step_size, suggest_lr

DTYPE = torch.float64


# ------------------------------------------------------------------------------ formula


@pytest.mark.parametrize(
    ("args", "kwargs", "expected"),
    [
        ((2.3, 10.0, 100), {}, math.sqrt(2 * 2.3 / (10 * 100))),  # 0.0678233
        ((2.3, 10.0, 100), {}, 0.06782329983125268),
        ((2.3, 10.0, 100), {"min_loss": 0.3, "delta_sq": 4.0}, math.sqrt(0.001)),
        ((1.0, 2.0, 1), {}, 1.0),  # sqrt(2 * 1 / (2 * 1))
        ((1.0, 8.0, 4), {"delta_sq": 0.25}, 0.5),  # sqrt(2 / (8 * 0.25 * 4))
        ((3, 1, 6), {"min_loss": -1}, math.sqrt(8 / 6)),  # ints accepted, L* < 0
    ],
)
def test_formula_hand_computed(args: tuple, kwargs: dict, expected: float) -> None:
    assert math.isclose(exact_step_size(*args, **kwargs), expected, rel_tol=1e-12)


positive = st.floats(1e-3, 1e3)


@settings(max_examples=30, deadline=None)
@given(loss=positive, k=positive, steps=st.integers(1, 10**6), factor=st.integers(2, 50))
def test_scaling_in_steps_and_smoothness(loss: float, k: float, steps: int, factor: int) -> None:
    base = exact_step_size(loss, k, steps)
    # lr ~ 1 / sqrt(T)
    assert math.isclose(
        exact_step_size(loss, k, steps * factor), base / math.sqrt(factor), rel_tol=1e-12
    )
    # lr ~ 1 / sqrt(K)
    assert math.isclose(
        exact_step_size(loss, k * factor, steps), base / math.sqrt(factor), rel_tol=1e-12
    )
    # lr ~ 1 / sqrt(delta^2)
    assert math.isclose(
        exact_step_size(loss, k, steps, delta_sq=float(factor)),
        base / math.sqrt(factor),
        rel_tol=1e-12,
    )


@settings(max_examples=30, deadline=None)
@given(
    gap=positive,
    min_loss=st.floats(-10, 10),
    k=positive,
    steps=st.integers(1, 10**4),
    factor=st.floats(0.01, 100),
)
def test_scaling_in_loss_gap(
    gap: float, min_loss: float, k: float, steps: int, factor: float
) -> None:
    # lr ~ sqrt(L0 - L*): only the gap matters, not L0 itself.
    a = exact_step_size(min_loss + gap, k, steps, min_loss=min_loss)
    b = exact_step_size(min_loss + gap * factor, k, steps, min_loss=min_loss)
    assert math.isclose(b, a * math.sqrt(factor), rel_tol=1e-6)
    assert math.isclose(a, exact_step_size(gap, k, steps), rel_tol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"total_steps": 0}, "total_steps=0"),
        ({"total_steps": -1}, "total_steps=-1"),
        ({"total_steps": 2.5}, "total_steps=2.5"),
        ({"total_steps": True}, "total_steps=True"),
        ({"total_steps": "10"}, "total_steps='10'"),
        ({"smoothness": 0.0}, "smoothness=0.0"),
        ({"smoothness": -1.0}, "smoothness=-1.0"),
        ({"smoothness": math.nan}, "smoothness=nan"),
        ({"smoothness": math.inf}, "smoothness=inf"),
        ({"smoothness": None}, "smoothness=None"),
        ({"initial_loss": math.nan}, "initial_loss=nan"),
        ({"initial_loss": math.inf}, "initial_loss=inf"),
        ({"initial_loss": 0.0}, "initial_loss=0.0"),
        ({"initial_loss": -0.5}, "initial_loss=-0.5"),
        ({"initial_loss": 1.0, "min_loss": 1.0}, "initial_loss=1.0"),
        ({"initial_loss": 1.0, "min_loss": 2.0}, "min_loss=2.0"),
        ({"min_loss": math.nan}, "min_loss=nan"),
        ({"delta_sq": 0.0}, "delta_sq=0.0"),
        ({"delta_sq": -2.0}, "delta_sq=-2.0"),
        ({"delta_sq": math.inf}, "delta_sq=inf"),
    ],
)
def test_guards_name_the_value(kwargs: dict, needle: str) -> None:
    args = {"initial_loss": 2.0, "smoothness": 5.0, "total_steps": 10}
    args.update(kwargs)
    initial_loss = args.pop("initial_loss")
    smoothness = args.pop("smoothness")
    total_steps = args.pop("total_steps")
    with pytest.raises(ValueError) as info:
        exact_step_size(initial_loss, smoothness, total_steps, **args)
    assert needle in str(info.value)


# ---------------------------------------------------------------------------- suggest_lr


def small_bn_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 3)
    ).to(DTYPE)


def batches(n: int = 24, seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=DTYPE)
    y = torch.randint(0, 3, (n,), generator=g)
    return [(x[:10], y[:10]), (x[10:], y[10:])]


def state(model: nn.Module) -> tuple:
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: m.training for n, m in model.named_modules()},
    )


def assert_state_equal(a: tuple, b: tuple) -> None:
    assert a[1] == b[1]
    assert a[0].keys() == b[0].keys()
    for k, v in a[0].items():
        assert torch.equal(v, b[0][k]), k


def test_suggest_lr_is_the_formula_and_leaves_model_alone() -> None:
    model = small_bn_net()
    model.eval()
    data = batches()
    before = state(model)
    rng = torch.get_rng_state()

    def make() -> nn.Module:
        return small_bn_net(seed=int(torch.randint(0, 1000, (1,))))

    s = suggest_lr(
        model,
        F.cross_entropy,
        data,
        total_steps=50,
        make_model=make,
        num_samples=3,
        generator=torch.Generator().manual_seed(4),
    )
    assert torch.equal(rng, torch.get_rng_state())
    assert_state_equal(before, state(model))
    l0 = full_loss(model, F.cross_entropy, data)
    assert s.initial_loss == l0
    assert s.k_hat == s.estimate.k_hat == max(s.estimate.samples)
    assert len(s.estimate.samples) == 3
    assert s.total_steps == 50
    assert s.lr == exact_step_size(l0, s.k_hat, 50)
    assert math.isclose(s.lr, math.sqrt(2 * l0 / (s.k_hat * 50)), rel_tol=1e-12)
    # Deterministic given the generator.
    again = suggest_lr(
        model,
        F.cross_entropy,
        data,
        total_steps=50,
        make_model=make,
        num_samples=3,
        generator=torch.Generator().manual_seed(4),
    )
    assert again.lr == s.lr and again.estimate.samples == s.estimate.samples


def test_initial_loss_is_the_training_loss_of_the_given_model() -> None:
    """L(w0): size-weighted mean over batches, BN with batch statistics, Dropout off."""
    model = small_bn_net()
    data = batches()
    twin = copy.deepcopy(model).train()
    twin[3] = nn.Identity()
    with torch.no_grad():
        expected = sum(len(x) * float(F.cross_entropy(twin(x), y)) for x, y in data) / 24
    assert math.isclose(full_loss(model, F.cross_entropy, data), expected, rel_tol=1e-12)


class Foreign(nn.Module):
    """A model built outside exactlr: no exactlr_init attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 5), nn.Tanh())
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_default_make_model_on_foreign_module() -> None:
    torch.manual_seed(0)
    model = Foreign().to(DTYPE)
    assert not hasattr(model, "exactlr_init")
    before = state(model)
    data = batches()
    rng = torch.get_rng_state()
    s = suggest_lr(
        model,
        F.cross_entropy,
        data,
        total_steps=20,
        num_samples=3,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(rng, torch.get_rng_state())
    assert_state_equal(before, state(model))
    assert s.lr > 0 and math.isfinite(s.lr)
    values = s.estimate.samples
    assert len(set(values)) == 3  # fresh reset_parameters() draws: different weights
    # The samples are re-initialised copies: same architecture and dtype, new weights.
    make = default_make_model(model)
    fresh = make()
    assert isinstance(fresh, Foreign) and fresh is not model
    assert fresh.head.weight.dtype == DTYPE
    assert not torch.equal(fresh.head.weight, model.head.weight)
    # Each record's value is the spectral norm of make() under the record's seed.
    record = s.estimate.records[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(record.seed)
        sample = make()
    ref = hessian_spectral_norm(sample, F.cross_entropy, data, tol=1e-8)
    # Certified to the step size's default tolerance, from below (a Ritz value).
    assert record.certified in ("norm", "ceiling")
    assert ref.value * (1 - 1e-2) <= record.value <= ref.value * (1 + 1e-8)


def test_default_make_model_uses_paper_preset_for_exactlr_models() -> None:
    from exactlr.models import build_model

    model = build_model(
        "fc1x8", dataset="mnist", init="paper", generator=torch.Generator().manual_seed(0)
    )
    make = default_make_model(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        a = make()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        b = make()
    weights = [m.weight for m in a.modules() if isinstance(m, nn.Linear)]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(weights[0], next(model.parameters()))
    # The "paper" preset: N(0, 0.04) weights, zero biases.
    assert abs(float(weights[0].detach().std()) - 0.04) < 0.002
    assert all(float(m.bias.abs().max()) == 0.0 for m in a.modules() if isinstance(m, nn.Linear))


@pytest.mark.parametrize("total_steps", [0, -1, 2.5, True])
def test_suggest_lr_rejects_bad_total_steps(total_steps: object) -> None:
    with pytest.raises(ValueError, match=f"total_steps={total_steps!r}"):
        suggest_lr(small_bn_net(), F.cross_entropy, batches(), total_steps=total_steps)


def test_suggest_lr_errors() -> None:
    model = small_bn_net()
    with pytest.raises(ValueError, match="empty"):
        suggest_lr(model, F.cross_entropy, [], total_steps=10)
    x, y = batches()[0]
    with pytest.raises(ValueError, match="label 9"):
        suggest_lr(model, F.cross_entropy, [(x, torch.full_like(y, 9))], total_steps=10)
    with pytest.raises(ValueError, match="num_samples"):
        suggest_lr(model, F.cross_entropy, batches(), total_steps=10, num_samples=0)
