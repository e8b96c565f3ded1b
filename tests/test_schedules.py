"""Schedulers against hand-written LR tables (as torch's own scheduler tests do)."""

from __future__ import annotations

import pickle

import pytest
import torch

from exactlr.paper.schedules import (
    CONSTANT_LRS,
    SCHEDULER_BASE_LR,
    SCHEDULERS,
    MethodSpec,
    build_scheduler,
    constant_methods,
    method_specs,
    ours_methods,
    scheduler_methods,
    step_size_for,
)


def _optimizer(lr: float = SCHEDULER_BASE_LR) -> torch.optim.Optimizer:
    return torch.optim.Adam([torch.zeros(2, requires_grad=True)], lr=lr)


def _epoch_lrs(name: str, epochs: int, num: int | None = None) -> list[float]:
    """LR in force during epochs t = 0..num-1 (scheduler stepped once per epoch)."""
    opt = _optimizer()
    scheduler, per_batch = build_scheduler(name, opt, epochs=epochs, steps_per_epoch=1)
    assert not per_batch
    lrs = []
    for _ in range(epochs if num is None else num):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    return lrs


# LR during epochs t = 0..10 of a 10-epoch run (t = 10 checks the end of the horizon).
TABLES_10 = {
    "linear": [0.01, 0.0091, 0.0082, 0.0073, 0.0064, 0.0055, 0.0046, 0.0037, 0.0028, 0.0019, 0.001],
    # step size max(1, round(0.4 * 10)) = 4
    "step": [0.01] * 4 + [0.001] * 4 + [1e-4] * 3,
    "exponential": [
        0.01, 0.009, 0.0081, 0.00729, 0.006561, 0.0059049, 0.00531441, 0.004782969,
        0.0043046721, 0.00387420489, 0.003486784401,
    ],
    # 0.01 / sqrt(t + 1)
    "sqrt": [
        0.01, 0.0070710678, 0.0057735027, 0.005, 0.0044721360, 0.0040824829, 0.0037796447,
        0.0035355339, 0.0033333333, 0.0031622777, 0.0030151134,
    ],
    # 0.01 / (1 + 0.01 t)
    "inverse_time": [
        0.01, 0.0099009901, 0.0098039216, 0.0097087379, 0.0096153846, 0.0095238095,
        0.0094339623, 0.0093457944, 0.0092592593, 0.0091743119, 0.0090909091,
    ],
    # 0.005 + 0.005 (1 + cos(pi t / 10)) / 2
    "cosine": [
        0.01, 0.0098776413, 0.0095225425, 0.0089694631, 0.0082725425, 0.0075,
        0.0067274575, 0.0060305369, 0.0054774575, 0.0051223587, 0.005,
    ],
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(TABLES_10))
def test_scheduler_table_epochs_10(name: str) -> None:
    expected = TABLES_10[name]
    assert _epoch_lrs(name, epochs=10, num=len(expected)) == pytest.approx(
        expected, rel=1e-7, abs=1e-12
    )


def test_step_100_epochs_authors_table() -> None:
    lrs = _epoch_lrs("step", epochs=100)
    assert lrs[:40] == pytest.approx([0.01] * 40)
    assert lrs[40:80] == pytest.approx([0.001] * 40)
    assert lrs[80:] == pytest.approx([1e-4] * 20)


@pytest.mark.parametrize(
    ("epochs", "step_size"), [(20, 10), (50, 20), (100, 40), (10, 4), (7, 3), (1, 1), (2, 1)]
)
def test_step_size(epochs: int, step_size: int) -> None:
    assert step_size_for(epochs) == step_size


def test_step_20_epochs_uses_authors_step_10() -> None:
    lrs = _epoch_lrs("step", epochs=20)
    assert lrs == pytest.approx([0.01] * 10 + [0.001] * 10)


def test_onecycle_per_batch() -> None:
    opt = _optimizer()
    epochs, steps = 10, 5
    scheduler, per_batch = build_scheduler("onecycle", opt, epochs=epochs, steps_per_epoch=steps)
    assert per_batch
    lrs = []
    for _ in range(epochs * steps):  # exactly total_steps steps must not raise
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(0.01 / 25)
    assert max(lrs) == pytest.approx(0.01)
    # Peak at pct_start * total_steps - 1 = 14 (torch's default pct_start 0.3).
    assert lrs.index(max(lrs)) == 14
    assert lrs[-1] < lrs[0]


def test_every_scheduler_builds_and_only_onecycle_is_per_batch() -> None:
    for name in SCHEDULERS:
        scheduler, per_batch = build_scheduler(name, _optimizer(), epochs=5, steps_per_epoch=3)
        assert isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler)
        assert per_batch == (name == "onecycle")


@pytest.mark.parametrize("name", ["sqrt", "inverse_time"])
def test_lambdas_are_picklable(name: str) -> None:
    scheduler, _ = build_scheduler(name, _optimizer(), epochs=5, steps_per_epoch=1)
    lambdas = pickle.loads(pickle.dumps(scheduler.lr_lambdas))
    assert lambdas[0](3) == scheduler.lr_lambdas[0](3)


def test_build_scheduler_errors() -> None:
    with pytest.raises(ValueError, match="name='warmup'"):
        build_scheduler("warmup", _optimizer(), epochs=5, steps_per_epoch=1)
    with pytest.raises(ValueError, match="epochs=0"):
        build_scheduler("cosine", _optimizer(), epochs=0, steps_per_epoch=1)
    with pytest.raises(ValueError, match="steps_per_epoch=0"):
        build_scheduler("onecycle", _optimizer(), epochs=3, steps_per_epoch=0)


def test_labels() -> None:
    ours, x2, half = ours_methods(0.045, variants=True)
    assert (ours.label, x2.label, half.label) == (
        "Ours (0.045)",
        "Ours x 2 (0.09)",
        "Ours / 2 (0.022)",
    )
    assert [m.label for m in constant_methods()] == [
        "LR 0.1",
        "LR 0.01",
        "LR 0.001",
        "LR 0.0001",
        "LR 1e-05",
    ]
    assert [m.label for m in scheduler_methods()] == [
        "Linear",
        "Step",
        "One Cycle",
        "Square Root",
        "Inverse Time",
        "Cosine",
        "Exponential",
    ]


def test_names_and_values() -> None:
    assert [m.name for m in constant_methods()] == [
        "const_1e-01",
        "const_1e-02",
        "const_1e-03",
        "const_1e-04",
        "const_1e-05",
    ]
    assert [m.lr for m in constant_methods()] == list(CONSTANT_LRS)
    ours, x2, half = ours_methods(0.04, variants=True)
    assert (ours.name, x2.name, half.name) == ("ours", "ours_x2", "ours_half")
    assert (ours.lr, x2.lr, half.lr) == pytest.approx((0.04, 0.08, 0.02))
    assert all(m.kind == "ours" and m.scheduler is None for m in (ours, x2, half))
    for m in scheduler_methods():
        assert (m.kind, m.lr, m.scheduler) == ("scheduler", SCHEDULER_BASE_LR, m.name)


def test_method_specs_groups() -> None:
    names = [m.name for m in method_specs("schedulers", 0.045)]
    assert names == ["ours", *SCHEDULERS]
    names = [m.name for m in method_specs("constants", 0.046)]
    assert names == ["ours", "ours_x2", "ours_half"] + [f"const_{lr:.0e}" for lr in CONSTANT_LRS]
    assert method_specs("ours", 0.01) == [MethodSpec("ours", "ours", 0.01)]
    assert method_specs("constants", 0.046)[1].lr == pytest.approx(0.092)


def test_method_specs_errors() -> None:
    with pytest.raises(ValueError, match="group='figures'"):
        method_specs("figures", 0.01)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="ours_lr"):
            method_specs("ours", bad)


def test_method_spec_validation_and_round_trip() -> None:
    with pytest.raises(ValueError, match="kind='adam'"):
        MethodSpec("x", "adam", 0.1)
    with pytest.raises(ValueError, match="scheduler='warmup'"):
        MethodSpec("warmup", "scheduler", 0.01, "warmup")
    with pytest.raises(ValueError, match="scheduler='cosine'"):
        MethodSpec("ours", "ours", 0.01, "cosine")
    for spec in method_specs("schedulers", 0.03) + constant_methods():
        assert MethodSpec.from_dict(spec.to_dict()) == spec
