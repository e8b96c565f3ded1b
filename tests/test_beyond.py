"""Methods beyond the paper: parameter-free optimizers, the LR range test, tuned
schedulers, costs, the curvature along the trajectory and the Gamma_t diagnostic."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from exactlr.cli import main
from exactlr.data import ArrayDataset, make_batches, synthetic_classification
from exactlr.paper.experiments import parse_methods, resolve_figure, run_figure
from exactlr.paper.lrfinder import READ_EVERY, lr_range_test, steepest_lr
from exactlr.paper.report import HVP_GRADIENTS, beyond_verdicts, figure_report, format_markdown
from exactlr.paper.results import load_result, result_path, save_result
from exactlr.paper.schedules import (
    TUNED_LRS,
    MethodSpec,
    build_optimizer,
    method_specs,
    paramfree_methods,
    tuned_methods,
)
from exactlr.paper.training import (
    TrainConfig,
    adam_scales,
    gamma_negative_fraction,
    train_run,
)

NO_DATA = None  # with the no_data fixture: the synthetic set


@pytest.fixture(scope="module")
def data() -> tuple[ArrayDataset, ArrayDataset]:
    return synthetic_classification(
        num_train=120, num_test=40, num_features=6, seed=0, image_shape=None
    )


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 10)).double()


def _cfg(method: MethodSpec, batch_size: int | None = None, **kw) -> TrainConfig:
    return TrainConfig("synthetic", "full", "mlp", method, epochs=4, batch_size=batch_size, **kw)


# ---------------------------------------------------------------- LR range test


def _tanh_curve(center_log10: float) -> tuple[list[float], list[float]]:
    lrs = [10 ** (-7 + 8 * i / 99) for i in range(100)]
    losses = [2.0 - math.tanh(2.0 * (math.log10(lr) - center_log10)) for lr in lrs]
    return lrs, losses


@pytest.mark.parametrize("center", [-4.0, -3.0, -1.5])
def test_steepest_lr_finds_the_known_steepest_point(center: float) -> None:
    lrs, losses = _tanh_curve(center)
    step = 8 / 99  # one grid step in log10
    assert abs(math.log10(steepest_lr(lrs, losses)) - center) <= step


def test_steepest_lr_skips_the_ends_and_drops_non_finite() -> None:
    lrs, losses = _tanh_curve(-3.0)
    # A cliff inside the skipped start must not be chosen.
    losses[2] = -100.0
    assert abs(math.log10(steepest_lr(lrs, losses)) + 3.0) <= 8 / 99
    losses[50:] = [math.nan] * 50
    assert steepest_lr(lrs, losses) <= lrs[49]


def test_steepest_lr_errors() -> None:
    with pytest.raises(ValueError, match="lrs has 2 points but losses has 3"):
        steepest_lr([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="at least 2"):
        steepest_lr([1.0, 2.0], [1.0, math.nan])


def test_lr_range_test_leaves_model_and_counts_cost(data) -> None:
    train, _ = data
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = lr_range_test(model, train, batch_size=40, num_iter=30, start_lr=1e-5, end_lr=1.0)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    assert res.steps == len(res.lrs) == len(res.losses) <= 30
    assert res.lrs[0] == pytest.approx(1e-5)
    ratios = [b / a for a, b in zip(res.lrs, res.lrs[1:], strict=False)]
    assert all(r == pytest.approx((1.0 / 1e-5) ** (1 / 29)) for r in ratios)
    assert not res.diverged
    assert res.gradient_equivalents == pytest.approx(res.steps * 40 / len(train))
    assert res.suggestion in res.lrs


def _range_test_reference(model, train, *, batch_size, num_iter, start_lr, end_lr):
    """The LR range test written out plainly: the loss read after every step."""
    net = copy.deepcopy(model).train()
    train = train.to("cpu", dtype=torch.float64)
    opt = torch.optim.Adam(net.parameters(), lr=start_lr)
    gen = torch.Generator().manual_seed(0)
    lrs, raw, smoothed, best, batches = [], [], [], math.inf, []
    for i in range(num_iter):
        if not batches:
            batches = list(make_batches(train, batch_size, shuffle=True, generator=gen))
        x, y = batches.pop(0)
        lr = start_lr * (end_lr / start_lr) ** (i / (num_iter - 1))
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        lrs.append(lr)
        raw.append(float(loss.detach()))
        smoothed.append(raw[-1] if i == 0 else 0.05 * raw[-1] + 0.95 * smoothed[-1])
        best = min(best, smoothed[-1])
        if not math.isfinite(smoothed[-1]) or smoothed[-1] > 5 * best:
            return lrs, raw, smoothed, True, i + 1
    return lrs, raw, smoothed, False, num_iter


@pytest.mark.parametrize(
    ("end_lr", "num_iter"), [(1.0, 37), (1e3, 60)], ids=["no-divergence", "diverges"]
)
def test_lr_range_test_reads_losses_in_blocks_with_the_per_step_curve(data, end_lr, num_iter):
    """Losses are read once per READ_EVERY steps; the curve, its cut at the first
    divergent step and the suggestion are those of a read after every step."""
    train, _ = data
    model = _mlp()
    res = lr_range_test(model, train, batch_size=40, num_iter=num_iter, end_lr=end_lr)
    lrs, raw, smoothed, diverged, steps = _range_test_reference(
        model, train, batch_size=40, num_iter=num_iter, start_lr=1e-7, end_lr=end_lr
    )
    assert diverged == (end_lr > 1)  # the second case does test the cut
    assert res.diverged == diverged and res.steps == steps == len(res.lrs)
    assert res.lrs == pytest.approx(lrs, rel=1e-12)
    assert res.raw_losses == pytest.approx(raw, rel=1e-9)
    assert res.losses == pytest.approx(smoothed, rel=1e-9)
    # The cost counts the steps computed past the divergence before it was read.
    computed = res.gradient_equivalents * len(train) / 40
    assert steps <= round(computed) <= min(steps + READ_EVERY - 1, num_iter)
    if diverged:
        assert steps < num_iter


def test_lr_range_test_bad_input(data) -> None:
    train, _ = data
    with pytest.raises(ValueError, match="start_lr"):
        lr_range_test(_mlp(), train, start_lr=1.0, end_lr=0.1)
    with pytest.raises(ValueError, match="batch_size=1000"):
        lr_range_test(_mlp(), train, batch_size=1000)


# ---------------------------------------------------------------- Gamma_t


def test_gamma_fraction_on_a_hand_made_sequence() -> None:
    prev = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([[1.0]])]
    cur = [torch.tensor([0.5, 2.0, 4.0]), torch.tensor([[0.9]])]
    assert float(gamma_negative_fraction(prev, cur)) == pytest.approx(2 / 4)
    assert float(gamma_negative_fraction(None, cur)) == 0.0  # v_0 = 0: nothing decreases
    with pytest.raises(ValueError, match="previous has 1 tensors"):
        gamma_negative_fraction(prev[:1], cur)


def test_adam_scales_by_hand() -> None:
    """One coordinate, gradients 1 then 0: v_hat_1 = 1, v_hat_2 = 0.999 * 0.001 / (1 -
    0.999^2). At a constant LR the scale falls (Gamma_2 < 0); halving the LR at step 2
    more than compensates (Gamma_2 > 0)."""
    for lr2, expected in ((0.1, 1.0), (0.05, 0.0)):
        p = nn.Parameter(torch.zeros(1, dtype=torch.float64))
        opt = torch.optim.Adam([p], lr=0.1)
        p.grad = torch.ones(1, dtype=torch.float64)
        opt.step()
        s1 = adam_scales(opt, 0.1)
        assert float(s1[0]) == pytest.approx(1.0 / 0.1)
        for group in opt.param_groups:
            group["lr"] = lr2
        p.grad = torch.zeros(1, dtype=torch.float64)
        opt.step()
        s2 = adam_scales(opt, lr2)
        v_hat = 0.999 * 0.001 / (1 - 0.999**2)
        assert float(s2[0]) == pytest.approx(math.sqrt(v_hat) / lr2)
        assert float(gamma_negative_fraction(s1, s2)) == expected


def test_train_run_records_gamma_for_adam_only(data) -> None:
    train, test = data
    res = train_run(_cfg(MethodSpec("c", "constant", 0.01), batch_size=40), _mlp(), train, test)
    gamma = [m.gamma_neg_frac for m in res.metrics]
    assert math.isnan(gamma[0])
    assert all(0.0 <= g <= 1.0 for g in gamma[1:])
    pytest.importorskip("prodigyopt")
    res = train_run(_cfg(paramfree_methods()[0]), _mlp(), train, test)
    assert all(math.isnan(m.gamma_neg_frac) for m in res.metrics)


# ---------------------------------------------------------------- curvature along the path


def test_sharpness_against_dense_hessian(data) -> None:
    train, test = data
    cfg = _cfg(MethodSpec("c", "constant", 0.05), curvature_every=2)
    model = _mlp()
    res = train_run(cfg, model, train, test)
    sharp = [m.sharpness for m in res.metrics]
    assert all(math.isnan(sharp[e]) for e in (1, 3))
    assert all(math.isfinite(sharp[e]) for e in (0, 2, 4))
    params = list(model.parameters())
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(flat, sizes)
        tensors = {
            name: c.view(s)
            for (name, _), c, s in zip(model.named_parameters(), chunks, shapes, strict=True)
        }
        out = torch.func.functional_call(model, tensors, (train.inputs.double(),))
        return F.cross_entropy(out, train.targets)

    flat = torch.cat([p.detach().reshape(-1) for p in params])
    eig = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss_of, flat))
    dense = float(eig.abs().max())
    assert sharp[0] == pytest.approx(dense, rel=2e-3)
    assert "__curv2" in cfg.run_name()


def test_curvature_every_is_validated() -> None:
    from exactlr.paper.training import validate_config

    with pytest.raises(ValueError, match="curvature_every=-1"):
        validate_config(_cfg(MethodSpec("c", "constant", 0.01), curvature_every=-1))


# ---------------------------------------------------------------- methods


def test_method_groups_and_specs() -> None:
    names = [m.name for m in method_specs("paramfree", 0.01)]
    assert names == ["prodigy", "dadapt_adam", "schedulefree_adamw"]
    tuned = tuned_methods()
    assert len(tuned) == 7 * len(TUNED_LRS)
    assert {m.name for m in tuned if m.lr == 0.01} == {
        "linear", "step", "onecycle", "sqrt", "inverse_time", "cosine", "exponential"
    }  # fmt: skip
    assert "cosine_lr3e-03" in {m.name for m in tuned}
    assert method_specs("lr_finder", 0.01, finder_lr=0.002)[0].label == "LR finder (0.002)"
    with pytest.raises(ValueError, match="finder_lr"):
        method_specs("lr_finder", 0.01)
    spec = paramfree_methods()[2]
    assert MethodSpec.from_dict(spec.to_dict()) == spec
    assert "optimizer" not in MethodSpec("ours", "ours", 0.1).to_dict()
    with pytest.raises(ValueError, match="optimizer='adamw'"):
        MethodSpec("x", "paramfree", 1.0, optimizer="adamw")
    with pytest.raises(ValueError, match="uses Adam"):
        MethodSpec("x", "constant", 1.0, optimizer="prodigy")


@pytest.mark.parametrize("method", paramfree_methods(), ids=lambda m: m.name)
@pytest.mark.parametrize("batch_size", [None, 40])
def test_parameter_free_optimizers_train(data, method: MethodSpec, batch_size) -> None:
    package = {"prodigy": "prodigyopt", "dadapt_adam": "dadaptation"}.get(
        method.optimizer, "schedulefree"
    )
    pytest.importorskip(package)
    train, test = data
    opt = build_optimizer(method, list(_mlp().parameters()))
    assert type(opt).__module__.split(".")[0] == package
    res = train_run(_cfg(method, batch_size=batch_size), _mlp(), train, test)
    assert res.diverged_at is None
    assert len(res.metrics) == 5
    assert res.metrics[-1].train_loss < res.metrics[0].train_loss


def test_schedulefree_is_evaluated_at_its_average(data) -> None:
    """Schedule-Free's metrics are taken in eval mode (at x, not at y): the recorded
    loss equals the loss of the optimizer's eval-mode weights."""
    sf = pytest.importorskip("schedulefree")
    train, test = data
    method = paramfree_methods()[2]
    res = train_run(_cfg(method, batch_size=None), _mlp(), train, test)
    net = _mlp()
    opt = sf.AdamWScheduleFree(net.parameters(), lr=method.lr)
    for _ in range(4):
        opt.train()
        opt.zero_grad()
        F.cross_entropy(net(train.inputs.double()), train.targets).backward()
        opt.step()
    opt.eval()
    with torch.no_grad():
        expected = float(F.cross_entropy(net(train.inputs.double()), train.targets))
    assert res.metrics[-1].train_loss == pytest.approx(expected, rel=1e-10)


def test_parse_methods() -> None:
    assert parse_methods("paper,tuned,paper") == ("paper", "tuned")
    with pytest.raises(ValueError, match="unknown method set 'paramfree'"):
        parse_methods("paper,paramfree")
    with pytest.raises(ValueError, match="empty"):
        parse_methods("paper,")


def test_cli_rejects_bad_methods(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["run", "fig1", "--scale", "smoke", "--methods", "paper,foo"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'foo'" in err[0]


# ---------------------------------------------------------------- a figure with everything


@pytest.fixture(scope="module")
def beyond_run(tmp_path_factory) -> Path:
    mp = pytest.MonkeyPatch()
    mp.delenv("EXACTLR_DATA", raising=False)
    mp.chdir(tmp_path_factory.mktemp("no_data"))
    for package in ("prodigyopt", "dadaptation", "schedulefree"):
        pytest.importorskip(package)
    out = tmp_path_factory.mktemp("beyond")
    run_figure("fig1", scale="smoke", out_dir=out, data_dir=NO_DATA, progress=False)
    run_figure(
        "fig1",
        scale="smoke",
        out_dir=out,
        data_dir=NO_DATA,
        progress=False,
        methods=("parameter-free", "lr-finder", "tuned"),
    )
    mp.undo()
    return out


def test_every_new_method_runs_at_smoke_scale(beyond_run: Path, no_data: None) -> None:
    plans = resolve_figure(
        "fig1", "smoke", data_dir=NO_DATA, methods=("paper", "parameter-free", "lr-finder", "tuned")
    )
    assert len(plans) == 8 + 3 + 1 + 42
    for plan in plans:
        data = load_result(result_path(beyond_run, plan.config))
        assert data["diverged_at"] is None or plan.role in ("tuned", "scheduler")
    finder = load_result(
        result_path(beyond_run, next(p for p in plans if p.role == "lr_finder").config)
    )
    assert finder["extra"]["finder"]["lr"] == finder["config"]["method"]["lr"]


def test_report_costs_tuned_and_beyond(beyond_run: Path) -> None:
    rep = figure_report("fig1", out_dir=beyond_run, scale="smoke")
    methods = {m["name"]: m for m in rep["methods"]}
    epochs = methods["ours"]["epochs"]
    # The paper's verdicts compare the paper's methods only; the manifest kept them.
    assert {"ours", "cosine", "prodigy", "lr_finder", "tuned_cosine"} <= set(methods)
    assert not any(m["role"] == "tuned" for m in rep["methods"])
    assert len(rep["variations"][0]["search_runs"]) == 42
    cache = json.loads(next((beyond_run / "lr").glob("*.json")).read_text())
    hvps = sum(r["num_hvps"] for r in cache["records"])
    ours = methods["ours"]["cost_breakdown"]
    assert ours["training"] == epochs
    assert ours["estimation"] == pytest.approx(
        HVP_GRADIENTS * hvps + (len(cache["records"]) + 1) / 3
    )
    finder = methods["lr_finder"]["cost_breakdown"]
    assert finder["search"] > 0 and finder["training"] == epochs
    tuned = methods["tuned_cosine"]
    assert tuned["cost_gradients"] == 7 * epochs
    assert len(tuned["searched_lrs"]) == 7
    grid = [m for m in rep["variations"][0]["search_runs"] if m["scheduler"] == "cosine"]
    finals = [m["final_grad_norm"] for m in grid] + [methods["cosine"]["final_grad_norm"]]
    assert tuned["final_grad_norm"] == min(finals)
    assert methods["prodigy"]["cost_gradients"] == epochs
    assert methods["prodigy"]["gamma_neg_frac"] is None
    assert methods["ours"]["gamma_neg_frac"] is not None
    beyond = rep["verdicts"]["beyond"]
    assert beyond["compared"] == len(rep["methods"])
    text = format_markdown(rep)
    assert "Beyond the paper" in text and "Tuned Cosine" in text


def test_beyond_verdicts_on_hand_made_entries() -> None:
    def entry(label, role, grad, loss, acc, diverged=None):
        return {
            "label": label,
            "role": role,
            "final_grad_norm": grad,
            "final_loss": loss,
            "final_test_acc": acc,
            "diverged_at": diverged,
            "cost_gradients": 10.0,
            "cost_seconds": 1.0,
        }

    methods = [
        entry("Ours", "ours", 0.1, 0.5, 0.9),
        entry("Prodigy", "paramfree", 0.05, 0.6, 0.95),
        entry("Bad", "tuned_best", 0.001, 0.001, 0.99, diverged=3),
    ]
    v = beyond_verdicts(methods)
    assert v["lowest_final_grad_norm"]["label"] == "Prodigy"
    assert v["lowest_final_loss"]["label"] == "Ours"
    assert v["best_test_acc"]["label"] == "Prodigy"
    assert (v["ours_rank_grad_norm"], v["ours_rank_loss"], v["ours_rank_test_acc"]) == (2, 1, 2)


def test_old_result_files_without_new_metrics_load(tmp_path, data) -> None:
    train, test = data
    cfg = _cfg(MethodSpec("c", "constant", 0.01))
    res = train_run(cfg, _mlp(), train, test)
    path = tmp_path / "r.json"
    save_result(path, res)
    raw = json.loads(path.read_text())
    del raw["metrics"]["gamma_neg_frac"], raw["metrics"]["sharpness"]
    path.write_text(json.dumps(raw))
    loaded = load_result(path)
    assert all(math.isnan(v) for v in loaded["metrics"]["sharpness"])
    assert len(loaded["metrics"]["gamma_neg_frac"]) == len(loaded["metrics"]["epoch"])
