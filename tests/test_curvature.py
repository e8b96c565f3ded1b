"""Tests of exactlr.curvature against float64 dense references (STYLE.md rule 2).

The dense reference Hessian is ``dense_hessian`` of ``tests/conftest.py``, built with
``torch.autograd.functional.hessian`` (plain double backward). ``torch.func.hessian`` is
*not* used: in torch 2.13 its vmap-over-jvp gives wrong Hessians for BatchNorm in
batch-statistics mode (error ~0.1 on a tiny model), while double backward agrees with
the operator to ~1e-15.
"""

from __future__ import annotations

import copy
import math

import hypothesis.strategies as st
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import Tensor, nn

from conftest import dense_hessian
from exactlr.curvature import (
    HessianOperator,
    hessian_spectral_norm,
    lanczos,
    power_iteration,
    random_unit_vector,
    training_loss_mode,
)

DTYPE = torch.float64
Batches = list[tuple[Tensor, Tensor]]


# ---------------------------------------------------------------------------- helpers


def snapshot(model: nn.Module) -> dict:
    """Parameters, buffers, grads, requires_grad and train flags of every submodule."""
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: p.grad for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "training": {n: m.training for n, m in model.named_modules()},
        "track": {
            n: m.track_running_stats
            for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
        },
    }


def assert_same_state(before: dict, after: dict) -> None:
    assert before["training"] == after["training"]
    assert before["track"] == after["track"]
    assert before["requires_grad"] == after["requires_grad"]
    assert all(g is None for g in after["grads"].values())
    for key in ("params", "buffers"):
        assert before[key].keys() == after[key].keys()
        for name, value in before[key].items():
            assert torch.equal(value, after[key][name]), f"{key} {name} changed"


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DTYPE)


def bn_mlp(track: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=track), nn.Tanh(), nn.Linear(4, 3)
    ).to(DTYPE)
    with torch.no_grad():  # non-trivial affine parameters and running stats
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
        if track:
            model[1].running_mean.uniform_(-1, 1)
            model[1].running_var.uniform_(0.5, 2)
            model[1].num_batches_tracked.fill_(3)
    return model


def conv_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.BatchNorm2d(2),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(8, 3),
    ).to(DTYPE)


def data(n: int, in_shape: tuple[int, ...], seed: int = 1, classes: int = 3) -> tuple:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *in_shape, generator=g, dtype=DTYPE)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def split(x: Tensor, y: Tensor, sizes: list[int]) -> Batches:
    return list(zip(x.split(sizes), y.split(sizes), strict=True))


CASES = {
    "mlp_tanh": (mlp, (4,)),
    "bn1d_track": (lambda: bn_mlp(True), (3,)),
    "bn1d_notrack": (lambda: bn_mlp(False), (3,)),
    "conv_bn2d_avgpool": (conv_net, (1, 6, 6)),
}


# ------------------------------------------------------------- HVPs vs dense Hessian


@pytest.mark.parametrize("mode", ["forward", "reverse"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_hvp_matches_dense_hessian(case: str, mode: str) -> None:
    make, in_shape = CASES[case]
    model = make()
    batches = [data(12, in_shape)]
    hessian = dense_hessian(model, F.cross_entropy, batches)
    assert torch.allclose(hessian, hessian.T, atol=1e-12)
    assert hessian.abs().max() > 1e-3  # a non-trivial reference
    with training_loss_mode(model):
        op = HessianOperator(model, F.cross_entropy, batches, hvp_mode=mode)
        assert op.dim == hessian.shape[0]
        g = torch.Generator().manual_seed(2)
        for _ in range(3):  # reverse mode: the reused graph gives the same answers
            v = torch.randn(op.dim, generator=g, dtype=DTYPE)
            torch.testing.assert_close(op(v), hessian @ v, rtol=1e-10, atol=1e-12)
        assert op.num_products == 3


@pytest.mark.parametrize("mode", ["forward", "reverse"])
def test_bn_reference_independent_of_training_loss_mode(mode: str) -> None:
    """The operator's BN Hessian equals the one of a plain train-mode copy of the model."""
    model = bn_mlp(True)
    batches = [data(10, (3,))]
    twin = copy.deepcopy(model).train()  # batch statistics; updates the twin's buffers only
    names = [n for n, _ in twin.named_parameters()]
    params = [p.detach() for p in twin.parameters()]
    sizes, shapes = [p.numel() for p in params], [p.shape for p in params]

    def loss(flat: Tensor) -> Tensor:
        chunks = [c.view(s) for c, s in zip(flat.split(sizes), shapes, strict=True)]
        out = torch.func.functional_call(twin, dict(zip(names, chunks, strict=True)), batches[0][0])
        return F.cross_entropy(out, batches[0][1])

    hessian = torch.autograd.functional.hessian(loss, torch.cat([p.reshape(-1) for p in params]))
    with training_loss_mode(model):
        op = HessianOperator(model, F.cross_entropy, batches, hvp_mode=mode)
        v = torch.randn(op.dim, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
        torch.testing.assert_close(op(v), hessian @ v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["forward", "reverse"])
@pytest.mark.parametrize("case", ["mlp_tanh", "bn1d_notrack", "conv_bn2d_avgpool"])
def test_unequal_batches_give_size_weighted_mean(case: str, mode: str) -> None:
    make, in_shape = CASES[case]
    model = make()
    x, y = data(20, in_shape, seed=3)
    batches = split(x, y, [7, 13])
    weighted = (7 / 20) * dense_hessian(model, F.cross_entropy, batches[:1]) + (
        13 / 20
    ) * dense_hessian(model, F.cross_entropy, batches[1:])
    with training_loss_mode(model):
        op = HessianOperator(model, F.cross_entropy, batches, hvp_mode=mode)
        v = torch.randn(op.dim, generator=torch.Generator().manual_seed(4), dtype=DTYPE)
        hv = op(v)
    torch.testing.assert_close(hv, weighted @ v, rtol=1e-10, atol=1e-12)
    if case == "mlp_tanh":  # no BN: the batches are one full batch
        full = dense_hessian(model, F.cross_entropy, [(x, y)])
        torch.testing.assert_close(hv, full @ v, rtol=1e-10, atol=1e-12)
    else:  # with BN the split matters: batch statistics differ
        full = dense_hessian(model, F.cross_entropy, [(x, y)])
        assert not torch.allclose(hv, full @ v, rtol=1e-6, atol=1e-8)


def test_auto_mode_works_with_batchnorm1d() -> None:
    """Regression: the memory probe of "auto" once ran BatchNorm1d on a batch of one."""
    model = bn_mlp(False)
    batches = [data(10, (3,))]
    res = hessian_spectral_norm(model, F.cross_entropy, batches, hvp_mode="auto")
    assert res.hvp_mode in ("forward", "reverse")
    eig = torch.linalg.eigvalsh(dense_hessian(model, F.cross_entropy, batches))
    assert math.isclose(res.value, float(eig.abs().max()), rel_tol=1e-4)


# ------------------------------------------------------------------ solvers on a matrix


def sym_matrix(eigenvalues: list[float], seed: int = 0) -> Tensor:
    n = len(eigenvalues)
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DTYPE))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=DTYPE)) @ q.T


def start(n: int, seed: int = 5) -> Tensor:
    return random_unit_vector(n, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


SPECTRA = {
    "indefinite": [-5.0, 3.0, 2.0, 1.0, 0.5, -0.2, 0.1, *[0.01 * i for i in range(13)]],
    "near_degenerate_top": [10.0, 10.0 - 1e-6, 4.0, 3.0, -1.0, *[0.1] * 10],
    "rank_deficient": [7.0, -3.0, 2.0, *[0.0] * 17],
    "dim1": [-2.5],
    "dim2": [1.5, -4.0],
    "psd_clustered": [1.0, 0.9, 0.8, *[0.5 + 0.01 * i for i in range(27)]],
}


@pytest.mark.parametrize("name", sorted(SPECTRA))
def test_lanczos_on_known_spectrum(name: str) -> None:
    eigs = SPECTRA[name]
    a = sym_matrix(eigs)
    calls = []

    def matvec(v: Tensor) -> Tensor:
        calls.append(1)
        return a @ v

    res = lanczos(matvec, start(len(eigs)), tol=1e-6, max_iters=100)
    norm = max(abs(e) for e in eigs)
    assert res.converged
    assert res.num_matvecs == len(calls) <= len(eigs)
    assert abs(res.spectral_norm - norm) <= 1e-4 * norm
    assert abs(res.lambda_max - max(eigs)) <= 1e-4 * norm
    assert abs(res.lambda_min - min(eigs)) <= 1e-4 * norm
    assert res.error_estimate >= 0


@pytest.mark.parametrize(("after", "products"), [(2, 2), (3, 3)])
def test_the_ceiling_stop_comes_after_ceiling_after_products(after: int, products: int) -> None:
    # A start near the top eigenvector (what the multi-fidelity start gives): the bound
    # is under the ceiling at once; the stop waits for ``ceiling_after`` products, and
    # the norm it certifies is a true upper bound.
    a = torch.diag(torch.linspace(-1.0, 10.0, 50, dtype=torch.float64))
    v0 = torch.zeros(50, dtype=torch.float64)
    v0[-1] = 1.0
    v0 += 0.05 * torch.randn(50, generator=torch.Generator().manual_seed(0), dtype=v0.dtype)
    res = lanczos(lambda v: a @ v, v0, tol=1e-12, target="norm", ceiling=20.0, ceiling_after=after)
    assert (res.num_matvecs, res.certified) == (products, "ceiling")
    assert res.spectral_norm <= 10.0 <= res.spectral_norm + res.error_estimate <= 20.0


def test_lanczos_breakdown_on_rank_deficient_matrix() -> None:
    """The Krylov space of a rank-3 matrix has dimension <= 4: an exact stop, no NaNs."""
    res = lanczos(lambda v: sym_matrix(SPECTRA["rank_deficient"]) @ v, start(20), tol=1e-12)
    assert res.converged and res.num_matvecs <= 5
    assert math.isclose(res.lambda_max, 7.0, rel_tol=1e-9)
    assert math.isclose(res.lambda_min, -3.0, rel_tol=1e-9)


def test_lanczos_zero_operator() -> None:
    res = lanczos(lambda v: torch.zeros_like(v), start(6))
    assert res.converged and res.spectral_norm == 0.0 and res.num_matvecs == 1


def test_lanczos_not_converged_within_max_iters() -> None:
    eigs = [1.0 + 0.001 * i for i in range(50)]  # clustered: slow
    res = lanczos(lambda v: sym_matrix(eigs) @ v, start(50), tol=1e-14, max_iters=3)
    assert not res.converged and res.num_matvecs == 3


@pytest.mark.parametrize(
    ("name", "dominant"),
    [
        ("indefinite", -5.0),
        ("near_degenerate_top", 10.0),
        ("rank_deficient", 7.0),
        ("dim1", -2.5),
        ("dim2", -4.0),
    ],
)
def test_power_iteration_on_known_spectrum(name: str, dominant: float) -> None:
    a = sym_matrix(SPECTRA[name])
    # The residual stop: near_degenerate_top's pair (gap 1e-6) cannot be split, but
    # every unit vector of it has a residual <= 1e-6, within tol * 10.
    lam, vec, num, converged = power_iteration(
        lambda v: a @ v, start(len(SPECTRA[name])), tol=1e-7, max_iters=1000
    )
    assert converged and num <= 1000
    assert abs(lam - dominant) <= 1e-4 * abs(dominant)  # signed: negative curvature kept
    if name != "near_degenerate_top":  # there any vector of the top pair is fine
        residual = a @ vec - lam * vec
        assert float(residual.norm()) <= 1e-3 * abs(dominant)


def test_power_iteration_null_start_vector() -> None:
    a = torch.diag(torch.tensor([3.0, 0.0], dtype=DTYPE))
    lam, _, num, converged = power_iteration(lambda v: a @ v, torch.tensor([0.0, 1.0], dtype=DTYPE))
    assert (lam, num, converged) == (0.0, 1, True)


@pytest.mark.parametrize("solver", [power_iteration, lanczos])
def test_solver_argument_errors(solver) -> None:
    a = torch.eye(3, dtype=DTYPE)
    with pytest.raises(ValueError, match="max_iters"):
        solver(lambda v: a @ v, start(3), max_iters=0)
    with pytest.raises(ValueError, match="tol"):
        solver(lambda v: a @ v, start(3), tol=0.0)
    with pytest.raises(ValueError, match="tol"):
        solver(lambda v: a @ v, start(3), tol=math.nan)
    with pytest.raises(ValueError, match="v0"):
        solver(lambda v: a @ v, torch.zeros(3, dtype=DTYPE))
    with pytest.raises(ValueError, match="not finite"):
        solver(lambda v: v * math.nan, start(3))
    with pytest.raises(ValueError, match="shape"):
        solver(lambda v: v[:2], start(3))


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 12),
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(1e-3, 1e3),
)
def test_lanczos_random_symmetric(n: int, seed: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(n, n, generator=g, dtype=DTYPE) * scale
    a = 0.5 * (b + b.T)
    eig = torch.linalg.eigvalsh(a)
    norm = float(eig.abs().max())
    res = lanczos(lambda v: a @ v, start(n, seed % 1000), tol=1e-6, max_iters=100)
    assert res.converged
    assert abs(res.spectral_norm - norm) <= 1e-4 * norm
    assert abs(res.lambda_max - float(eig[-1])) <= 1e-4 * norm
    assert abs(res.lambda_min - float(eig[0])) <= 1e-4 * norm


@settings(max_examples=25, deadline=None)
@given(
    eigs=st.lists(st.floats(-10, 10), min_size=1, max_size=10),
    dominant=st.floats(1.0, 10.0),
    sign=st.sampled_from([-1.0, 1.0]),
    seed=st.integers(0, 1000),
)
def test_power_iteration_random_symmetric(
    eigs: list[float], dominant: float, sign: float, seed: int
) -> None:
    # Power iteration needs a gap in magnitude (with +-lambda it cannot converge): make
    # the dominant eigenvalue 1.5x larger in magnitude than the others.
    top = sign * max(1.5 * max(abs(e) for e in eigs), dominant)
    spectrum = [top, *eigs]
    a = sym_matrix(spectrum, seed)
    norm = float(torch.linalg.eigvalsh(a).abs().max())
    lam, _, _, converged = power_iteration(
        lambda v: a @ v, start(len(spectrum), seed), tol=1e-10, max_iters=2000
    )
    assert converged
    assert abs(abs(lam) - norm) <= 1e-4 * norm
    assert math.copysign(1.0, lam) == sign


# ------------------------------------------------------------ hessian_spectral_norm


def indefinite_setup() -> tuple[nn.Module, object, Batches]:
    """A tanh MLP with loss mean(o_0^2) - 3 mean(o_1^2): lambda_min dominates."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DTYPE)

    def loss_fn(out: Tensor, _target: Tensor) -> Tensor:
        return out[:, 0].pow(2).mean() - 3.0 * out[:, 1].pow(2).mean()

    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    return model, loss_fn, [(x, torch.zeros(16))]


SETUPS = {
    "mlp": lambda: (mlp(), F.cross_entropy, [data(16, (4,))]),
    "bn": lambda: (bn_mlp(True), F.cross_entropy, split(*data(20, (3,)), [7, 13])),
    "conv": lambda: (conv_net(), F.cross_entropy, [data(12, (1, 6, 6))]),
    "indefinite": indefinite_setup,
}


# Power iteration in forward mode is slow (hundreds of ~30 ms products on the BN and MLP
# setups); the modes are checked product by product above, so it runs on two setups only.
SPECTRAL_CASES = [
    (setup, method, mode)
    for setup in sorted(SETUPS)
    for method in ("lanczos", "power")
    for mode in ("forward", "reverse")
    if not (method == "power" and mode == "forward" and setup in ("bn", "mlp"))
]


@pytest.mark.parametrize(("setup", "method", "mode"), SPECTRAL_CASES)
def test_spectral_norm_matches_eigvalsh(setup: str, method: str, mode: str, monkeypatch) -> None:
    model, loss_fn, batches = SETUPS[setup]()
    eig = torch.linalg.eigvalsh(dense_hessian(model, loss_fn, batches))
    lmax, lmin = float(eig[-1]), float(eig[0])
    norm = max(abs(lmax), abs(lmin))
    if setup == "indefinite":
        assert abs(lmin) > 1.5 * abs(lmax) and lmax > 0  # the setup does what it says

    calls = []
    original = HessianOperator.__call__

    def counting(self, v):
        calls.append(1)
        return original(self, v)

    monkeypatch.setattr(HessianOperator, "__call__", counting)
    tol, iters = (1e-6, 100) if method == "lanczos" else (1e-10, 3000)
    before = snapshot(model)
    res = hessian_spectral_norm(
        model,
        loss_fn,
        batches,
        method=method,
        tol=tol,
        max_iters=iters,
        generator=torch.Generator().manual_seed(0),
        hvp_mode=mode,
        target="both",
    )
    assert_same_state(before, snapshot(model))
    assert res.converged
    assert res.num_hvps == len(calls) > 0
    assert res.hvp_mode == mode and res.method == method
    assert res.value == max(abs(res.lambda_max), abs(res.lambda_min))
    assert abs(res.value - norm) <= 1e-4 * norm
    assert abs(res.lambda_max - lmax) <= 1e-4 * norm
    assert abs(res.lambda_min - lmin) <= 1e-4 * norm
    assert math.isfinite(res.loss) and res.seconds >= 0


def test_default_tolerance_is_relative_accuracy_of_norm() -> None:
    """With the default tol=1e-4 Lanczos' a-posteriori stop gives ~1e-4 relative accuracy."""
    for setup in ("mlp", "bn", "conv", "indefinite"):
        model, loss_fn, batches = SETUPS[setup]()
        norm = float(torch.linalg.eigvalsh(dense_hessian(model, loss_fn, batches)).abs().max())
        res = hessian_spectral_norm(
            model, loss_fn, batches, generator=torch.Generator().manual_seed(1)
        )
        assert res.converged
        assert abs(res.value - norm) <= 1e-4 * norm, setup


# ---------------------------------------------------------- the model is left untouched


def dropout_model_in_eval() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 3)
    ).to(DTYPE)
    model.eval()
    model[3].train()  # a mixed state must be restored exactly
    return model


@pytest.mark.parametrize("mode", ["forward", "reverse"])
@pytest.mark.parametrize("kind", ["bn_track_train", "bn_track_eval", "dropout_eval"])
def test_model_untouched(kind: str, mode: str) -> None:
    if kind == "dropout_eval":
        model = dropout_model_in_eval()
    else:
        model = bn_mlp(True)
        model.train(kind == "bn_track_train")
    batches = split(*data(20, (3,)), [7, 13])
    before = snapshot(model)
    hessian_spectral_norm(model, F.cross_entropy, batches, hvp_mode=mode, method="power")
    hessian_spectral_norm(model, F.cross_entropy, batches, hvp_mode=mode)
    assert_same_state(before, snapshot(model))


def test_dropout_is_off_during_curvature() -> None:
    """The Hessian of a Dropout model is the one of the model without Dropout."""
    model = dropout_model_in_eval()
    batches = [data(16, (3,))]
    r1 = hessian_spectral_norm(
        model, F.cross_entropy, batches, generator=torch.Generator().manual_seed(0)
    )
    plain = copy.deepcopy(model)
    plain[3] = nn.Identity()
    norm = float(torch.linalg.eigvalsh(dense_hessian(plain, F.cross_entropy, batches)).abs().max())
    assert abs(r1.value - norm) <= 1e-4 * norm


@pytest.mark.parametrize("mode", ["forward", "reverse", "auto"])
def test_model_untouched_after_exception(mode: str) -> None:
    model = bn_mlp(True)
    model.eval()
    model[1].train()
    x, y = data(10, (3,))
    y = y.clone()
    y[4] = 7
    before = snapshot(model)
    with pytest.raises(ValueError, match="label 7"):
        hessian_spectral_norm(model, F.cross_entropy, [(x, y)], hvp_mode=mode)
    assert_same_state(before, snapshot(model))

    def failing_loss(out: Tensor, target: Tensor) -> Tensor:
        if out.requires_grad or torch._C._functorch.is_gradtrackingtensor(out):
            raise RuntimeError("boom inside the product")
        return F.cross_entropy(out, target)

    with pytest.raises(RuntimeError, match="boom"):
        hessian_spectral_norm(model, failing_loss, [data(10, (3,))], hvp_mode=mode)
    assert_same_state(before, snapshot(model))


# ------------------------------------------------------------------------------ errors


def test_errors() -> None:
    model = mlp()
    batches = [data(8, (4,))]
    with pytest.raises(ValueError, match="empty"):
        hessian_spectral_norm(model, F.cross_entropy, [])
    with pytest.raises(ValueError, match="empty"):
        hessian_spectral_norm(model, F.cross_entropy, iter([]))
    x, y = batches[0]
    with pytest.raises(ValueError, match="label 3"):
        hessian_spectral_norm(model, F.cross_entropy, [(x, torch.full_like(y, 3))])
    with pytest.raises(ValueError, match="label -1"):
        hessian_spectral_norm(model, F.cross_entropy, [(x, torch.full_like(y, -1))])
    bad_x = x.clone()
    bad_x[2, 1] = math.nan
    with pytest.raises(ValueError, match="non-finite"):
        hessian_spectral_norm(model, F.cross_entropy, [(bad_x, y)])
    with pytest.raises(ValueError, match="non-empty"):
        hessian_spectral_norm(model, F.cross_entropy, [(x[:0], y[:0])])
    with pytest.raises(ValueError, match="method='foo'"):
        hessian_spectral_norm(model, F.cross_entropy, batches, method="foo")
    for tol in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="tol"):
            hessian_spectral_norm(model, F.cross_entropy, batches, tol=tol)
    for max_iters in (0, -3, 2.5):
        with pytest.raises(ValueError, match="max_iters"):
            hessian_spectral_norm(model, F.cross_entropy, batches, max_iters=max_iters)
    with pytest.raises(ValueError, match="hvp_mode"):
        hessian_spectral_norm(model, F.cross_entropy, batches, hvp_mode="sideways")
    with pytest.raises(ValueError, match="not finite"):
        hessian_spectral_norm(model, lambda o, t: F.cross_entropy(o, t) * math.inf, batches)
    nan_model = mlp()
    with torch.no_grad():
        nan_model[0].weight[0, 0] = math.nan
    with pytest.raises(ValueError, match="not finite"):
        hessian_spectral_norm(nan_model, F.cross_entropy, batches)


# ------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_deterministic_and_global_rng_untouched(method: str) -> None:
    model = bn_mlp(False)
    batches = [data(12, (3,))]
    state = torch.get_rng_state()
    results = [
        hessian_spectral_norm(
            model,
            F.cross_entropy,
            batches,
            method=method,
            generator=torch.Generator().manual_seed(11),
        )
        for _ in range(2)
    ]
    assert torch.equal(state, torch.get_rng_state())
    a, b = results
    assert (a.value, a.lambda_max, a.lambda_min, a.num_hvps) == (
        b.value,
        b.lambda_max,
        b.lambda_min,
        b.num_hvps,
    )


# ------------------------------------- multi-fidelity start and the "norm" stopping rule


def test_lanczos_ritz_vectors_are_eigenvectors() -> None:
    eigenvalues = [6.0, -4.0, 2.0, 1.0, *[0.1 * i for i in range(16)]]
    a = sym_matrix(eigenvalues)
    res = lanczos(lambda v: a @ v, start(20), tol=1e-10, return_vectors=True)
    assert res.vector_max is not None and res.vector_min is not None
    for vector, value in ((res.vector_max, 6.0), (res.vector_min, -4.0)):
        assert float(vector.norm()) == pytest.approx(1.0, abs=1e-12)
        # The eigenvalue bound is r^2 / gap, so the residual r is about its square root.
        assert float((a @ vector - value * vector).norm()) <= 1e-4
    assert lanczos(lambda v: a @ v, start(20)).vector_max is None


@pytest.mark.parametrize("dominant_sign", [1.0, -1.0])
def test_lanczos_target_norm_stops_no_later_and_meets_tol(dominant_sign: float) -> None:
    # One end dominates the other five-fold: "norm" needs only that end's bound.
    eigenvalues = [dominant_sign * 10.0, -dominant_sign * 2.0, *[0.05 * i for i in range(38)]]
    a = sym_matrix(eigenvalues, seed=2)
    both = lanczos(lambda v: a @ v, start(40), tol=1e-8)
    norm = lanczos(lambda v: a @ v, start(40), tol=1e-8, target="norm")
    assert both.converged and norm.converged
    assert norm.num_matvecs <= both.num_matvecs
    assert norm.spectral_norm == pytest.approx(10.0, rel=1e-8)
    assert norm.error_estimate <= 1e-8 * norm.spectral_norm
    with pytest.raises(ValueError, match="target"):
        lanczos(lambda v: a @ v, start(40), target="max")


@pytest.mark.parametrize("setup", sorted(SETUPS))
@pytest.mark.parametrize("target", ["both", "norm"])
def test_multi_fidelity_matches_eigvalsh(setup: str, target: str) -> None:
    model, loss_fn, batches = SETUPS[setup]()
    eig = torch.linalg.eigvalsh(dense_hessian(model, loss_fn, batches))
    lmax, lmin = float(eig[-1]), float(eig[0])
    norm = max(abs(lmax), abs(lmin))
    before = snapshot(model)
    res = hessian_spectral_norm(
        model,
        loss_fn,
        batches,
        tol=1e-6,
        generator=torch.Generator().manual_seed(0),
        subsample=0.5,
        target=target,
    )
    assert_same_state(before, snapshot(model))
    assert res.converged and res.subsample_hvps > 0 and res.num_hvps > 0
    assert res.value == max(abs(res.lambda_max), abs(res.lambda_min))
    assert abs(res.value - norm) <= 1e-4 * norm
    if target == "both":
        assert abs(res.lambda_max - lmax) <= 1e-4 * norm
        assert abs(res.lambda_min - lmin) <= 1e-4 * norm
    # Ritz values lie inside the spectrum, whatever the start vector.
    assert lmin - 1e-8 * norm <= res.lambda_min <= res.lambda_max <= lmax + 1e-8 * norm


def test_multi_fidelity_default_tolerance_on_norm() -> None:
    for setup in ("mlp", "bn", "conv", "indefinite"):
        model, loss_fn, batches = SETUPS[setup]()
        norm = float(torch.linalg.eigvalsh(dense_hessian(model, loss_fn, batches)).abs().max())
        res = hessian_spectral_norm(
            model,
            loss_fn,
            batches,
            tol=1e-3,
            generator=torch.Generator().manual_seed(1),
            subsample=0.3,
            target="norm",
        )
        assert res.converged
        assert abs(res.value - norm) <= 1e-3 * norm, setup


def test_auto_subsample_share_by_example_count() -> None:
    from exactlr.curvature.options import resolve_subsample

    assert resolve_subsample("auto", 1999) is None  # 200 examples would be over 10%
    assert resolve_subsample("auto", 2000) == pytest.approx(0.1)
    assert resolve_subsample("auto", 2500) == pytest.approx(0.08)
    assert resolve_subsample("auto", 5500) == 0.05
    assert resolve_subsample("auto", 60000) == 0.05
    assert resolve_subsample("auto", 60000, method="power") is None
    assert resolve_subsample(0.3, 10) == 0.3 and resolve_subsample(None, 10**6) is None


def test_auto_subsample_starts_from_a_subsample_on_many_examples() -> None:
    """The default (``subsample="auto"``) takes a subsample start from 2,000 examples
    on, none below, and certifies the same norm as the dense float64 Hessian."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    for n, started in ((1999, False), (2400, True)):
        x = torch.randn(n, 5, dtype=torch.float64)
        y = torch.randint(0, 3, (n,))
        batches = [(x[: n // 2], y[: n // 2]), (x[n // 2 :], y[n // 2 :])]
        norm = float(
            torch.linalg.eigvalsh(dense_hessian(model, F.cross_entropy, batches)).abs().max()
        )
        res = hessian_spectral_norm(
            model, F.cross_entropy, batches, tol=1e-6, generator=torch.Generator().manual_seed(0)
        )
        assert (res.subsample_hvps > 0) is started, n
        assert res.converged and abs(res.value - norm) <= 1e-5 * norm, n


def test_subsample_batches_keeps_each_batch_share() -> None:
    from exactlr.curvature import subsample_batches

    x, y = data(30, (4,))
    batches = split(x, y, [10, 20])
    sub = subsample_batches(batches, 0.3, generator=torch.Generator().manual_seed(0))
    assert [len(b[0]) for b in sub] == [3, 6]
    for (xs, ys), (xb, yb) in zip(sub, batches, strict=True):
        rows = [int((xb == row).all(dim=1).nonzero()) for row in xs]
        assert rows == sorted(set(rows)) and torch.equal(yb[rows], ys)
    # At least two samples of each batch (BatchNorm needs two).
    assert [len(b[0]) for b in subsample_batches(batches, 0.01)] == [2, 2]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"subsample": 1.0},
        {"subsample": 0.0},
        {"subsample": 0.5, "method": "power"},
        {"subsample": "half"},
        {"subsample": True},
        {"target": "norm", "method": "power"},
        {"target": "max"},
    ],
)
def test_multi_fidelity_argument_errors(kwargs: dict) -> None:
    model, loss_fn, batches = SETUPS["mlp"]()
    with pytest.raises(ValueError, match=r"subsample|target"):
        hessian_spectral_norm(model, loss_fn, batches, **kwargs)
