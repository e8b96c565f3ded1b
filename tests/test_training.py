"""train_run against a line-by-line reference loop and a direct float64 gradient."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from exactlr.data import ArrayDataset, make_batches, synthetic_classification
from exactlr.models import build_model
from exactlr.paper.schedules import MethodSpec, ours_methods
from exactlr.paper.training import EpochMetrics, TrainConfig, train_run, validate_config

EPOCHS = 3


@pytest.fixture(scope="module")
def data() -> tuple[ArrayDataset, ArrayDataset]:
    return synthetic_classification(num_train=200, num_test=50, seed=0)


def _model(init: str = "paper", seed: int = 0) -> nn.Module:
    return build_model(
        "fc1x32", dataset="synthetic", init=init, generator=torch.Generator().manual_seed(seed)
    )


def _cfg(
    batch_size: int | None, lr: float = 0.01, method: MethodSpec | None = None, **kw
) -> TrainConfig:
    method = method or MethodSpec("const_lr", "constant", lr)
    return TrainConfig(
        "synthetic", "mini", "fc1x32", method, epochs=EPOCHS, batch_size=batch_size, **kw
    )


def _full_loss_and_grad_norm(model: nn.Module, batches: list) -> tuple[float, float]:
    """Direct reference: L = sum_b (n_b / N) CE_b in train mode, its autograd gradient."""
    n = sum(len(y) for _, y in batches)
    params = list(model.parameters())
    loss = sum(F.cross_entropy(model(x), y) * (len(y) / n) for x, y in batches)
    grads = torch.autograd.grad(loss, params)
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads))
    return float(loss.detach()), float(norm)


def _reference_run(cfg: TrainConfig, model: nn.Module, train: ArrayDataset) -> nn.Module:
    """The training loop written out plainly (PAPER.md section 3): Adam, CE, reshuffled batches."""
    net = copy.deepcopy(model).train()
    opt = torch.optim.Adam(net.parameters(), lr=cfg.method.lr, betas=cfg.betas, eps=cfg.eps)
    gen = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.epochs):
        for x, y in make_batches(
            train, cfg.batch_size, shuffle=cfg.batch_size is not None, generator=gen
        ):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
    return net


@pytest.mark.parametrize("batch_size", [None, 64])
def test_metrics_match_reference_float64(data, batch_size: int | None) -> None:
    train, test = (d.to("cpu", dtype=torch.float64) for d in data)
    model = _model().double()
    cfg = _cfg(batch_size, lr=0.01)
    result = train_run(cfg, model, train, test)
    assert result.diverged_at is None
    assert [m.epoch for m in result.metrics] == list(range(EPOCHS + 1))

    reference = _reference_run(cfg, model, train)
    eval_batches = make_batches(train, batch_size)  # BatchNorm model: the training split
    loss, norm = _full_loss_and_grad_norm(reference, eval_batches)
    last = result.metrics[-1]
    assert last.grad_norm_full == pytest.approx(norm, rel=1e-6)
    assert last.train_loss == pytest.approx(loss, rel=1e-6)
    # and at w0
    loss0, norm0 = _full_loss_and_grad_norm(copy.deepcopy(model).train(), eval_batches)
    assert result.metrics[0].grad_norm_full == pytest.approx(norm0, rel=1e-6)
    assert result.metrics[0].train_loss == pytest.approx(loss0, rel=1e-6)
    with torch.no_grad():
        x, y = test.inputs, test.targets
        logits = (
            reference(x)
            if batch_size is None
            else torch.cat(
                [reference(xb) for xb, _ in make_batches(test, min(batch_size, len(test)))]
            )
        )
        assert last.test_acc == pytest.approx(float((logits.argmax(1) == y).double().mean()))


def test_paper_grad_norm_definition(data) -> None:
    train, test = data
    model = _model()
    full = train_run(_cfg(None), model, train, test).metrics
    # Full batch: the gradient of step e is the full gradient at w_{e-1}.
    for prev, cur in itertools.pairwise(full):
        assert cur.grad_norm == prev.grad_norm_full
    assert full[0].grad_norm == full[0].grad_norm_full
    # Mini-batch at w0: sqrt(mean_b ||g_b||^2) over the unshuffled batches.
    mini = train_run(_cfg(64), model, train, test).metrics
    batches = make_batches(train, 64)
    sq = []
    net = copy.deepcopy(model).train()
    for x, y in batches:
        grads = torch.autograd.grad(F.cross_entropy(net(x), y), list(net.parameters()))
        sq.append(sum(float((g.double() ** 2).sum()) for g in grads))
    assert mini[0].grad_norm == pytest.approx(math.sqrt(sum(sq) / len(sq)), rel=1e-5)


@pytest.mark.parametrize("batch_size", [None, 64])
def test_loss_decreases_and_caller_model_untouched(data, batch_size: int | None) -> None:
    train, test = data
    model = _model()
    before = copy.deepcopy(model.state_dict())
    seen: list[EpochMetrics] = []
    result = train_run(_cfg(batch_size, lr=0.01), model, train, test, on_epoch=seen.append)
    losses = [m.train_loss for m in result.metrics]
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    assert seen == result.metrics
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training  # mode untouched too
    m = result.metrics[-1]
    assert 0.0 <= m.train_acc <= 1.0 and 0.0 <= m.test_acc <= 1.0
    assert m.seconds >= result.metrics[0].seconds >= 0.0
    assert result.seconds >= m.seconds


@pytest.mark.parametrize("batch_size", [None, 64])
def test_deterministic_and_same_w0(data, batch_size: int | None) -> None:
    train, test = data
    model = _model()
    a = train_run(_cfg(batch_size), model, train, test).metrics
    b = train_run(_cfg(batch_size), model, train, test).metrics
    strip = [{k: v for k, v in vars(m).items() if k != "seconds"} for m in a]
    assert strip == [{k: v for k, v in vars(m).items() if k != "seconds"} for m in b]
    # A different method from the same w0: identical epoch-0 metrics except the LR.
    c = train_run(_cfg(batch_size, lr=0.1), model, train, test).metrics
    for field in (
        "grad_norm",
        "grad_norm_full",
        "train_loss",
        "train_acc",
        "test_loss",
        "test_acc",
    ):
        assert getattr(c[0], field) == getattr(a[0], field)
    assert c[1].train_loss != a[1].train_loss


def test_shuffle_seed_changes_minibatch_run(data) -> None:
    train, test = data
    model = _model()
    a = train_run(_cfg(64, seed=0), model, train, test).metrics
    b = train_run(_cfg(64, seed=1), model, train, test).metrics
    assert a[0].train_loss == b[0].train_loss
    assert a[-1].train_loss != b[-1].train_loss


def test_scheduler_lr_recorded(data) -> None:
    train, test = data
    method = MethodSpec("step", "scheduler", 0.01, "step")
    result = train_run(_cfg(None, method=method), _model(), train, test)
    # step size max(1, round(0.4 * 3)) = 1: epochs 1, 2, 3 use 0.01, 0.001, 1e-4.
    assert [m.lr for m in result.metrics] == pytest.approx([0.01, 0.01, 0.001, 1e-4])
    onecycle = MethodSpec("onecycle", "scheduler", 0.01, "onecycle")
    result = train_run(_cfg(50, method=onecycle), _model(), train, test)  # 4 steps per epoch
    assert result.metrics[0].lr == pytest.approx(0.01 / 25)
    assert len(result.metrics) == EPOCHS + 1


def test_divergence_recorded_and_stops(data) -> None:
    train, test = data
    # No BatchNorm (pytorch preset): after one step of size 1e30 the logits overflow.
    model = _model(init="pytorch")
    cfg = TrainConfig(
        "synthetic",
        "mini",
        "fc1x32",
        MethodSpec("const_1e30", "constant", 1e30),
        epochs=5,
        batch_size=None,
    )
    result = train_run(cfg, model, train, test)
    assert result.diverged_at == 1
    assert len(result.metrics) == 2
    assert not result.metrics[-1].is_finite()
    assert math.isfinite(result.metrics[0].train_loss)


def test_divergence_at_w0(data) -> None:
    train, test = data
    huge = ArrayDataset(train.inputs * 1e38, train.targets, train.num_classes, "huge")
    result = train_run(_cfg(None), _model(init="pytorch"), huge, test)
    assert result.diverged_at == 0
    assert len(result.metrics) == 1
    assert not math.isfinite(result.metrics[0].train_loss)


def test_num_train_cap(data) -> None:
    train, test = data
    model = _model(init="pytorch")
    capped = train_run(_cfg(None, num_train=100), model, train, test).metrics[0]
    first = ArrayDataset(train.inputs[:100], train.targets[:100], train.num_classes, "first")
    direct = train_run(_cfg(None), model, first, test).metrics[0]
    assert capped.train_loss == pytest.approx(direct.train_loss, rel=1e-6)


def test_run_name_and_round_trip() -> None:
    ours = ours_methods(0.045)[0]
    cfg = TrainConfig("mnist", "mini", "fc3x1000", ours, epochs=100, batch_size=None)
    assert cfg.run_name() == "mnist-mini__fc3x1000__ours__seed0"
    cfg2 = TrainConfig(
        "mnist",
        "full",
        "lenet",
        ours,
        epochs=20,
        batch_size=5000,
        seed=3,
        init="pytorch",
        eps=1e-6,
        num_train=1000,
    )
    assert (
        cfg2.run_name()
        == "mnist-full__lenet__ours__seed3__e20__b5000__eps1e-06__n1000__init-pytorch"
    )
    for c in (cfg, cfg2):
        assert TrainConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({**cfg.to_dict(), "lr": 1.0})


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"epochs": 0}, "epochs=0"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"eps": 0.0}, "eps=0.0"),
        ({"betas": (0.9, 1.0)}, "betas="),
        ({"betas": (-0.1, 0.9)}, "betas="),
        ({"method": MethodSpec("c", "constant", 0.0)}, "lr=0.0"),
        ({"method": MethodSpec("c", "constant", float("nan"))}, "lr=nan"),
        ({"method": MethodSpec("c", "constant", float("inf"))}, "lr=inf"),
        ({"num_train": 0}, "num_train=0"),
    ],
)
def test_validate_config(change: dict, match: str) -> None:
    base = dict(
        dataset="synthetic",
        subset="mini",
        model="fc1x32",
        method=MethodSpec("c", "constant", 0.1),
        epochs=1,
        batch_size=None,
    )
    cfg = TrainConfig(**{**base, **change})
    with pytest.raises(ValueError, match=match):
        validate_config(cfg)


def test_batch_larger_than_train_set(data) -> None:
    train, test = data
    with pytest.raises(ValueError, match="batch_size=500"):
        train_run(_cfg(500), _model(), train, test)


def test_progress_bar_runs(data) -> None:
    train, test = data
    result = train_run(_cfg(None), _model(), train, test, progress=True)
    assert len(result.metrics) == EPOCHS + 1


def test_training_leaves_the_allocator_alone() -> None:
    """train_run and the range test do not switch glibc's settings on their own: the
    caller decides (the CLI enters keep_freed_memory around every subcommand)."""
    from exactlr import allocator
    from exactlr.paper.lrfinder import lr_range_test

    train, test = synthetic_classification(num_train=64, num_test=16)
    model = build_model("fc1x8", dataset="synthetic", generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig("synthetic", "full", "fc1x8", MethodSpec("c", "constant", 1e-2), 2, None)
    depths: list[int] = []

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        depths.append(allocator._depth)
        return F.cross_entropy(logits, y)

    train_run(cfg, model, train, test, on_epoch=lambda m: depths.append(allocator._depth))
    lr_range_test(model, train, num_iter=20, loss_fn=loss)
    assert len(depths) == 3 + 20 and set(depths) == {0}
    with allocator.keep_freed_memory():  # the caller's choice is kept
        train_run(cfg, model, train, test, on_epoch=lambda m: depths.append(allocator._depth))
    assert allocator._depth == 0
