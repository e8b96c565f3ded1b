"""train_grid against train_run, config by config (float64: to rounding)."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from torch import nn

from exactlr.data import ArrayDataset, synthetic_classification
from exactlr.models import build_model
from exactlr.paper.grid import train_grid
from exactlr.paper.schedules import MethodSpec
from exactlr.paper.training import RunResult, TrainConfig, train_run

# The metrics train_grid computes (optional diagnostics added to EpochMetrics later keep
# their defaults in a grid).
_COMPARED = (
    "grad_norm",
    "grad_norm_full",
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
    "lr",
)


@pytest.fixture(scope="module")
def data() -> tuple[ArrayDataset, ArrayDataset]:
    return synthetic_classification(num_train=120, num_test=40, seed=3)


def _model(name: str = "fc2x16", init: str = "paper", dtype=torch.float64) -> nn.Module:
    model = build_model(
        name, dataset="synthetic", init=init, generator=torch.Generator().manual_seed(1)
    )
    return model.to(dtype)


def _methods(*extra: MethodSpec) -> list[MethodSpec]:
    return [
        MethodSpec("ours", "ours", 0.013),
        MethodSpec("const_1e-03", "constant", 1e-3),
        MethodSpec("const_1e-01", "constant", 1e-1),
        MethodSpec("onecycle", "scheduler", 0.01, "onecycle"),
        MethodSpec("step", "scheduler", 0.01, "step"),
        MethodSpec("cosine", "scheduler", 0.01, "cosine"),
        *extra,
    ]


def _configs(model: str, methods: list[MethodSpec], **kwargs) -> list[TrainConfig]:
    kwargs.setdefault("epochs", 3)
    kwargs.setdefault("batch_size", None)
    return [TrainConfig("synthetic", "mini", model, m, **kwargs) for m in methods]


def _assert_same(got: RunResult, want: RunResult, rtol: float, atol: float = 0.0) -> None:
    name = want.config.method.name
    assert got.config == want.config
    assert got.diverged_at == want.diverged_at, name
    assert len(got.metrics) == len(want.metrics), name
    for g, w in zip(got.metrics, want.metrics, strict=True):
        assert g.epoch == w.epoch
        for field in _COMPARED:
            a, b = getattr(g, field), getattr(w, field)
            if math.isnan(b):
                assert math.isnan(a), (name, g.epoch, field)
            else:
                assert a == pytest.approx(b, rel=rtol, abs=atol), (name, g.epoch, field, a, b)


def _check(cfgs, model, train, test, rtol=1e-9, atol=0.0) -> list[RunResult]:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grid = train_grid(cfgs, model, train, test)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])  # w0 untouched
    assert [r.config for r in grid] == list(cfgs)
    for cfg, got in zip(cfgs, grid, strict=True):
        _assert_same(got, train_run(cfg, model, train, test), rtol, atol)
    return grid


def test_full_batch_with_batchnorm_matches_train_run(data):
    train, test = data
    model = _model()
    methods = _methods(
        MethodSpec("linear", "scheduler", 0.01, "linear"),
        MethodSpec("exponential", "scheduler", 0.01, "exponential"),
    )
    grid = _check(_configs("fc2x16", methods, epochs=4), model, train, test)
    assert all(len(r.metrics) == 5 and r.diverged_at is None for r in grid)
    # Different methods really trained differently (epoch 0 is shared).
    assert len({r.metrics[-1].train_loss for r in grid}) == len(grid)
    assert len({r.metrics[0].train_loss for r in grid}) == 1


def test_mini_batch_with_batchnorm_matches_train_run(data):
    train, test = data
    # 120 samples in batches of 32: 4 steps, the last one of 24 samples.
    _check(_configs("fc2x16", _methods(), batch_size=32), _model(), train, test)


def test_mini_batch_without_batchnorm_matches_train_run(data):
    train, test = data
    # No BatchNorm: the evaluation runs over EVAL_CHUNK chunks, epoch 0 needs a second pass.
    model = _model(init="pytorch")
    methods = _methods(MethodSpec("sqrt", "scheduler", 0.01, "sqrt"))
    cfgs = _configs("fc2x16", methods, batch_size=50, init="pytorch", seed=5)
    _check(cfgs, model, train, test)


def test_lenet_with_batchnorm_matches_train_run(data):
    train, test = data
    model = _model("lenet")
    methods = [
        MethodSpec("ours", "ours", 0.02),
        MethodSpec("onecycle", "scheduler", 0.01, "onecycle"),
        MethodSpec("const_1e-03", "constant", 1e-3),
    ]
    _check(_configs("lenet", methods, epochs=2, batch_size=60), model, train, test)


def test_betas_and_eps_may_differ(data):
    train, test = data
    base = _configs("fc2x16", [MethodSpec("ours", "ours", 0.01)], batch_size=40)[0]
    cfgs = [base, dataclasses.replace(base, betas=(0.5, 0.9)), dataclasses.replace(base, eps=1e-3)]
    grid = _check(cfgs, _model(), train, test)
    assert len({r.metrics[-1].train_loss for r in grid}) == 3


def test_diverging_run_matches_and_leaves_the_others_alone(data):
    train, test = data
    model = _model(init="pytorch")
    huge = MethodSpec("huge", "constant", 1e300)
    methods = [MethodSpec("ours", "ours", 0.01), huge, MethodSpec("c", "constant", 1e-3)]
    for batch_size in (None, 40):
        cfgs = _configs("fc2x16", methods, epochs=4, batch_size=batch_size, init="pytorch")
        grid = _check(cfgs, model, train, test)
        assert grid[1].diverged_at is not None
        assert len(grid[1].metrics) == grid[1].diverged_at + 1 < 5
        assert [grid[0].diverged_at, grid[2].diverged_at] == [None, None]
        assert len(grid[0].metrics) == len(grid[2].metrics) == 5
        # Alone, the others give the same numbers as next to the diverging run.
        alone = train_grid([cfgs[0], cfgs[2]], model, train, test)
        for a, b in zip(alone, (grid[0], grid[2]), strict=True):
            _assert_same(a, b, 1e-12)


def test_float32_matches_train_run(data):
    train, test = data
    model = _model(dtype=torch.float32)
    cfgs = _configs("fc2x16", _methods(), epochs=2, batch_size=40)
    _check(cfgs, model, train, test, rtol=1e-4, atol=1e-6)


def test_float32_huge_lr_diverges_like_train_run(data):
    train, test = data
    model = _model(init="pytorch", dtype=torch.float32)
    methods = [MethodSpec("huge", "constant", 1e30), MethodSpec("ours", "ours", 0.01)]
    grid = _check(
        _configs("fc2x16", methods, epochs=3, init="pytorch"), model, train, test, 1e-4, 1e-6
    )
    assert grid[0].diverged_at is not None and grid[1].diverged_at is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("dataset", "mnist"),
        ("subset", "full"),
        ("model", "fc3x16"),
        ("epochs", 7),
        ("batch_size", 10),
        ("seed", 2),
        ("num_train", 50),
        ("init", "pytorch"),
    ],
)
def test_configs_differing_in_a_shared_field_are_rejected(data, field, value):
    train, test = data
    cfgs = _configs("fc2x16", _methods()[:2])
    cfgs[1] = dataclasses.replace(cfgs[1], **{field: value})
    with pytest.raises(ValueError, match=rf"{field}={value!r}"):
        train_grid(cfgs, _model(), train, test)


def test_bad_inputs_are_rejected(data):
    train, test = data
    with pytest.raises(ValueError, match="at least one"):
        train_grid([], _model(), train, test)
    cfg = _configs("fc2x16", [MethodSpec("ours", "ours", 0.01)])[0]
    with pytest.raises(ValueError, match="epochs=0"):
        train_grid([dataclasses.replace(cfg, epochs=0)], _model(), train, test)
    dropout = nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.Dropout(0.5)).double()
    with pytest.raises(ValueError, match="Dropout"):
        train_grid([cfg], dropout, train, test)
    with pytest.raises(ValueError, match="larger than the training set"):
        train_grid([dataclasses.replace(cfg, batch_size=500)], _model(), train, test)


def test_unsupported_config_options_are_rejected(data):
    train, test = data
    cfg = _configs("fc2x16", [MethodSpec("ours", "ours", 0.01)])[0]
    with pytest.raises(ValueError, match="curvature_every=2"):
        train_grid([dataclasses.replace(cfg, curvature_every=2)], _model(), train, test)


# --- The folded evaluation against vmap (same function, float64) ---------------------


class _Residual(nn.Module):
    """Not an nn.Sequential: the grid must fall back to vmap."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + 0.5 * self.body(x).tanh()


def _stacked_pair(model: nn.Module, k: int = 3):
    from exactlr.paper.stacked import _Stacked

    folded = _Stacked(model, torch.device("cpu"))
    plain = _Stacked(model, torch.device("cpu"), fold=False)
    gen = torch.Generator().manual_seed(5)
    weights = {
        n: (p.unsqueeze(0) + 0.05 * torch.randn(k, *p.shape, generator=gen, dtype=p.dtype))
        for n, p in zip(folded.names, folded.w0, strict=True)
    }
    return folded, plain, weights


@pytest.mark.parametrize(
    ("name", "dataset", "init"),
    [
        ("lenet", "mnist", "paper"),
        ("lenet", "cifar10", "pytorch"),
        ("fc3x100", "mnist", "paper"),
        ("vgg9", "cifar10", "paper"),
    ],
)
def test_folded_layout_equals_vmap(name, dataset, init):
    model = build_model(
        name, dataset=dataset, init=init, generator=torch.Generator().manual_seed(2)
    ).double()
    folded, plain, weights = _stacked_pair(model)
    assert folded.folded and not plain.folded and folded.loop_convs
    grouped, _, _ = _stacked_pair(model)
    grouped.loop_convs = False  # the accelerator variant: one grouped convolution
    shape = (1, 28, 28) if dataset == "mnist" else (3, 32, 32)
    x = torch.randn(6, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    y = torch.tensor([0, 3, 9, 1, 1, 5])
    results = []
    for stacked_model in (folded, plain, grouped):
        leaves = {n: w.clone().requires_grad_(True) for n, w in weights.items()}
        losses, logits = stacked_model(leaves, x, y)
        grads = torch.autograd.grad(losses.sum(), list(leaves.values()))
        results.append((losses, logits, grads))
    (l1, z1, g1) = results[0]
    assert l1.shape == (3,) and z1.shape == (3, 6, 10)
    for l2, z2, g2 in results[1:]:
        torch.testing.assert_close(l1, l2, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(z1, z2, rtol=1e-12, atol=1e-12)
        for a, b in zip(g1, g2, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # Each run alone: run 1's loss is the model's own loss at run 1's weights.
    alone = copy.deepcopy(model)
    torch.nn.utils.vector_to_parameters(
        torch.cat([weights[n][1].reshape(-1) for n in folded.names]), alone.parameters()
    )
    alone.train()
    with torch.no_grad():
        want = nn.functional.cross_entropy(alone(x), y)
    assert l1[1].item() == pytest.approx(want.item(), rel=1e-12)


def test_frozen_parameter_is_shared_by_the_folded_runs():
    model = build_model("lenet", dataset="mnist", generator=torch.Generator().manual_seed(2))
    model = model.double()
    model[0].weight.requires_grad_(False)  # frozen first convolution
    folded, plain, weights = _stacked_pair(model)
    assert "0.weight" not in folded.names and folded.folded
    x = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    y = torch.tensor([1, 2, 3, 4])
    torch.testing.assert_close(folded(weights, x, y)[0], plain(weights, x, y)[0])


def test_unsupported_models_fall_back_to_vmap(data):
    from exactlr.paper.stacked import _foldable

    assert not _foldable(_Residual())
    assert not _foldable(nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.Tanh()))
    assert not _foldable(nn.Sequential(nn.Conv2d(1, 4, 3, groups=1, padding="same")))
    assert not _foldable(nn.Sequential(nn.BatchNorm1d(4)))  # running statistics
    train, test = data
    model = _Residual().double()
    cfgs = _configs("fc2x16", _methods()[:3], epochs=2)
    _check(cfgs, model, train, test)


def test_fold_false_gives_the_same_runs(data):
    train, test = data
    cfgs = _configs("fc2x16", _methods()[:3], epochs=2, batch_size=40)
    model = _model()
    folded = train_grid(cfgs, model, train, test)
    plain = train_grid(cfgs, model, train, test, fold=False)
    for a, b in zip(folded, plain, strict=True):
        _assert_same(a, b, rtol=1e-10)
