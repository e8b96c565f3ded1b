"""Tests of exactlr.curvature.rewrites: the rewritten loss is the same function, in float64.

The Hessian references are dense double-backward Hessians of the model *as given*
(``dense_hessian`` of ``tests/conftest.py``, no rewrites), so each rewrite is checked
against an evaluation that never saw it.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from conftest import dense_hessian
from exactlr.curvature import (
    HessianOperator,
    StackedHessianOperator,
    hessian_spectral_norm,
    training_loss_mode,
)
from exactlr.curvature.rewrites import (
    CompositeBatchNorm,
    batch_norm_composite,
    data_shift,
    input_layer,
    median_shift,
    shifted_input_layer,
)

DTYPE = torch.float64


def padded_conv_net(seed: int = 0, padding_mode: str = "zeros") -> nn.Module:
    """LeNet-like: padded conv, BatchNorm2d, pooling, Linear, BatchNorm1d."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1, padding_mode=padding_mode),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(27, 5),
        nn.BatchNorm1d(5),
        nn.Tanh(),
        nn.Linear(5, 3),
    ).to(DTYPE)


def flat_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(36, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)
    ).to(DTYPE)


def background_images(n: int, side: int = 6, seed: int = 1, dtype=DTYPE) -> tuple:
    """MNIST-like data: most pixels at the background value -1, the rest in (-1, 1)."""
    g = torch.Generator().manual_seed(seed)
    ink = torch.rand(n, 1, side, side, generator=g) < 0.2
    x = torch.where(ink, torch.rand(n, 1, side, side, generator=g) * 2 - 1, -1.0)
    return x.to(dtype), torch.randint(0, 3, (n,), generator=g)


# -------------------------------------------------------------------- input layer


class MyLinear(nn.Linear):
    pass


@pytest.mark.parametrize(
    ("model", "found"),
    [
        (nn.Sequential(nn.Linear(3, 2)), True),
        (nn.Sequential(nn.Flatten(), nn.Identity(), nn.Linear(3, 2)), True),
        (nn.Sequential(nn.Conv1d(1, 2, 3)), True),
        (nn.Sequential(nn.Conv3d(1, 2, 3)), True),
        (nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 2)), False),
        (nn.Sequential(nn.Flatten()), False),
        (nn.Sequential(MyLinear(3, 2)), False),  # a subclass may change forward
        (nn.Sequential(nn.ConvTranspose2d(1, 2, 3)), False),
        (nn.Linear(3, 2), False),  # not a Sequential: its forward is unknown
    ],
)
def test_input_layer(model: nn.Module, found: bool) -> None:
    result = input_layer(model)
    assert (result is not None) == found
    if found:
        assert result is not None and result[1] is next(m for m in model if m not in result[0])


def test_input_layer_none_when_a_user_hook_could_see_the_data() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(3, 2))
    handle = model[1].register_forward_pre_hook(lambda _m, args: args)
    assert input_layer(model) is None
    handle.remove()
    handle = model.register_forward_hook(lambda _m, _a, out: out)
    assert input_layer(model) is None
    handle.remove()
    assert input_layer(model) is not None


class MySequential(nn.Sequential):
    pass


def test_input_layer_none_for_a_sequential_subclass() -> None:
    assert input_layer(MySequential(nn.Linear(3, 2))) is None


def test_median_shift_is_a_data_value_and_uses_at_most_max_samples() -> None:
    x = torch.tensor([[0.0, 5.0], [1.0, 7.0], [2.0, 6.0], [3.0, 9.0]], dtype=DTYPE)
    # Lower median of the first three rows per column: 1 and 6; with all four: 1 and 6.
    assert torch.equal(median_shift([x[:1], x[1:]]), torch.tensor([1.0, 6.0], dtype=DTYPE))
    assert torch.equal(median_shift([x], max_samples=1), x[0])


def test_data_shift_none_where_it_cannot_or_need_not_apply() -> None:
    x, _ = background_images(10)
    assert data_shift(padded_conv_net(), [x]) is not None
    assert data_shift(nn.Sequential(nn.BatchNorm2d(1)), [x]) is None  # no affine first
    assert data_shift(padded_conv_net(), [torch.zeros_like(x)]) is None  # median 0
    assert data_shift(padded_conv_net(), [x.long()]) is None  # not floating point
    assert data_shift(padded_conv_net(), []) is None


# ------------------------------------------------------------- input shift: exact


SHIFT_CASES = {
    "conv2d_zeros_padding": (lambda: padded_conv_net(), (1, 6, 6)),
    "conv2d_reflect_padding": (lambda: padded_conv_net(padding_mode="reflect"), (1, 6, 6)),
    "conv1d_strided_dilated_grouped": (
        lambda: nn.Sequential(
            nn.Conv1d(2, 4, 3, stride=2, padding=2, dilation=2, groups=2), nn.Flatten()
        ).to(DTYPE),
        (2, 9),
    ),
    "conv3d_no_bias": (
        lambda: nn.Sequential(nn.Conv3d(1, 2, 2, padding=1, bias=False)).to(DTYPE),
        (1, 3, 3, 3),
    ),
    "flatten_linear": (flat_net, (1, 6, 6)),
}


@pytest.mark.parametrize("case", sorted(SHIFT_CASES))
def test_shifted_input_layer_is_the_same_function(case: str) -> None:
    make, shape = SHIFT_CASES[case]
    model = make()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, *shape, generator=g, dtype=DTYPE)
    c = torch.randn(*shape, generator=g, dtype=DTYPE) * 3  # any shift is exact
    expected = model(x)
    with shifted_input_layer(model, c):
        got = model(x - c)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    _, layer = input_layer(model)  # type: ignore[misc]
    assert not layer._forward_hooks  # removed on exit
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_shifted_input_layer_removes_its_hook_on_error() -> None:
    model = padded_conv_net()
    with pytest.raises(RuntimeError, match="boom"), shifted_input_layer(model, torch.ones(1, 6, 6)):
        raise RuntimeError("boom")
    assert not model[0]._forward_hooks


def test_shifted_input_layer_refuses_a_model_without_input_layer() -> None:
    with (
        pytest.raises(ValueError, match="first affine layer"),
        shifted_input_layer(nn.Sequential(nn.Tanh()), torch.ones(3)),
    ):
        pass


# --------------------------------------------------------- composite BatchNorm: exact


@pytest.mark.parametrize(
    "shape", [(7, 3), (7, 3, 5), (7, 3, 4, 5), (5, 3, 2, 3, 4)], ids=["1d", "1d_seq", "2d", "3d"]
)
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_composite_matches_batch_norm(shape: tuple, affine: bool) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=DTYPE) * 2 + 1
    w = torch.rand(shape[1], generator=g, dtype=DTYPE) + 0.5 if affine else None
    b = torch.randn(shape[1], generator=g, dtype=DTYPE) if affine else None
    expected = F.batch_norm(x, None, None, w, b, training=True, eps=1e-3)
    torch.testing.assert_close(
        batch_norm_composite(x, w, b, 1e-3), expected, rtol=1e-12, atol=1e-12
    )
    with CompositeBatchNorm():  # routed through the mode: same again
        routed = F.batch_norm(x, None, None, w, b, training=True, eps=1e-3)
    torch.testing.assert_close(routed, expected, rtol=1e-12, atol=1e-12)


def test_composite_mode_leaves_running_statistics_calls_alone() -> None:
    bn = nn.BatchNorm1d(3).to(DTYPE)
    x = torch.randn(6, 3, dtype=DTYPE)
    twin = nn.BatchNorm1d(3).to(DTYPE)
    expected = twin(x)  # train mode, tracking: native op, running stats updated
    with CompositeBatchNorm():
        got = bn(x)
    assert torch.equal(got, expected)
    assert torch.equal(bn.running_mean, twin.running_mean)
    bn.eval()
    twin.eval()
    with CompositeBatchNorm():
        assert torch.equal(bn(x), twin(x))


# ------------------------------------------------------- operators: same Hessian


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_rewritten_products_match_dense_hessian(mode: str, padding_mode: str) -> None:
    model = padded_conv_net(padding_mode=padding_mode)
    batches = [background_images(16), background_images(9, seed=2)]
    hessian = dense_hessian(model, F.cross_entropy, batches)
    assert hessian.abs().max() > 1e-3
    with training_loss_mode(model):
        op = HessianOperator(model, F.cross_entropy, batches, hvp_mode=mode)
        assert op.shift is not None and float(op.shift.max()) == -1.0  # the background
        g = torch.Generator().manual_seed(4)
        for _ in range(2):
            v = torch.randn(op.dim, generator=g, dtype=DTYPE)
            torch.testing.assert_close(op(v), hessian @ v, rtol=1e-10, atol=1e-12)
        plain = HessianOperator(model, F.cross_entropy, batches, hvp_mode=mode, rewrite=False)
        assert plain.shift is None
        torch.testing.assert_close(op.loss(), plain.loss(), rtol=1e-13, atol=0)
        torch.testing.assert_close(op.gradient(), plain.gradient(), rtol=1e-11, atol=1e-13)
    assert not model[0]._forward_hooks


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_stacked_operator_with_rewrites_matches_dense_hessians(mode: str) -> None:
    models = [padded_conv_net(seed=s) for s in (0, 1)]
    batches = [background_images(12)]
    op = StackedHessianOperator.from_models(models, F.cross_entropy, batches, hvp_mode=mode)
    assert op.shift is not None
    g = torch.Generator().manual_seed(5)
    v = torch.randn(2, op.dim, generator=g, dtype=DTYPE)
    out = op(v)
    for s, model in enumerate(models):
        hessian = dense_hessian(model, F.cross_entropy, batches)
        torch.testing.assert_close(out[s], hessian @ v[s], rtol=1e-10, atol=1e-12)
    plain = StackedHessianOperator.from_models(
        models, F.cross_entropy, batches, hvp_mode=mode, rewrite=False
    )
    torch.testing.assert_close(op.losses(), plain.losses(), rtol=1e-13, atol=0)
    assert all(not m[0]._forward_hooks for m in models)


def test_float32_products_closer_to_float64_with_the_input_shift() -> None:
    """The point of the shift: less float32 rounding on data with a dominant value."""
    torch.manual_seed(0)
    model32 = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 12 * 12, 3),
    )
    x, y = background_images(3000, side=12, dtype=torch.float32)
    model64 = copy.deepcopy(model32).double()  # the same values in float64
    v = torch.randn(sum(p.numel() for p in model32.parameters()), dtype=DTYPE)

    def product(model: nn.Module, xx: Tensor, rewrite: bool) -> Tensor:
        with training_loss_mode(model):
            op = HessianOperator(
                model, F.cross_entropy, [(xx, y)], hvp_mode="forward", rewrite=rewrite
            )
            return op(v.to(xx.dtype)).double()

    exact = product(model64, x.double(), rewrite=False)
    error = {
        rewrite: float((product(model32, x, rewrite) - exact).norm() / exact.norm())
        for rewrite in (False, True)
    }
    assert error[True] < error[False] / 5, error


def test_spectral_norm_same_with_and_without_rewrites() -> None:
    model = padded_conv_net()
    batches = [background_images(20)]
    kwargs = {"tol": 1e-10, "generator": torch.Generator().manual_seed(0)}
    a = hessian_spectral_norm(model, F.cross_entropy, batches, **kwargs)
    kwargs["generator"] = torch.Generator().manual_seed(0)
    b = hessian_spectral_norm(model, F.cross_entropy, batches, rewrite=False, **kwargs)
    assert a.value == pytest.approx(b.value, rel=1e-9)
    assert a.lambda_min == pytest.approx(b.lambda_min, rel=1e-9)
    assert not model[0]._forward_hooks


def test_stacked_subset_keeps_the_shift_and_the_products() -> None:
    models = [padded_conv_net(seed=s) for s in (0, 1, 2)]
    batches = [background_images(12)]
    op = StackedHessianOperator.from_models(models, F.cross_entropy, batches, hvp_mode="forward")
    sub = op.subset([2, 0])
    assert sub.rewrite and sub.shift is op.shift
    v = torch.randn(3, op.dim, generator=torch.Generator().manual_seed(6), dtype=DTYPE)
    torch.testing.assert_close(sub(v[[2, 0]]), op(v)[[2, 0]], rtol=1e-10, atol=1e-12)
