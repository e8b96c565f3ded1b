"""Tests for exactlr.paper.experiments: figure specs, scales, shared runs, the runner, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exactlr.paper import experiments
from exactlr.paper.experiments import (
    FIGURES,
    SCALES,
    describe_scale,
    execute_run,
    get_figure,
    list_figures,
    resolve_figure,
    run_figure,
)
from exactlr.paper.plotting import plot_figure
from exactlr.paper.report import figure_report
from exactlr.paper.results import load_result

PAPER_TABLE = {  # PAPER.md section 3: model, subset, batch, groups, legend LR
    "fig1": ("fc3x1000", "mini", None, "schedulers", 0.045),
    "fig2": ("fc3x1000", "mini", None, "constants", 0.046),
    "fig3": ("fc3x1000", "full", 5000, "schedulers", 0.012),
    "fig4": ("fc1x1000", "full", 5000, "constants", 0.014),
    "fig6": ("lenet", "mini", None, "schedulers", 0.044),
    "fig7": ("lenet", "full", 5000, "schedulers", 0.013),
    "fig8": ("lenet", "full", 5000, "constants", 0.011),
    "fig9": ("lenet", "mini", None, "constants", 0.039),
    "fig10": ("vgg9", "full", 2500, "schedulers", None),
    "fig11": ("vgg9", "full", 2500, "constants", 0.002),
}


def test_figures_cover_the_paper() -> None:
    expected = [f"fig{i}" for i in range(1, 17)] + ["init"]
    assert list(FIGURES) == expected
    for name, (model, subset, batch, group, lr) in PAPER_TABLE.items():
        spec = FIGURES[name]
        assert (spec.model, spec.subset, spec.batch_size, spec.epochs) == (
            model,
            subset,
            batch,
            100,
        ), name
        assert group in spec.groups and spec.paper_ours_lr == lr, name
    assert FIGURES["fig10"].dataset == "cifar10"


def test_paper_scale_plans() -> None:
    fig1 = resolve_figure("fig1", "paper")
    assert len(fig1) == 8  # ours + 7 schedulers
    assert {p.config.epochs for p in fig1} == {100}
    assert {p.config.num_train for p in fig1} == {None}
    assert {p.num_samples for p in fig1} == {20}
    assert [p.role for p in fig1].count("ours") == 1
    fig2 = resolve_figure("fig2", "paper")
    roles = sorted(p.role for p in fig2)
    assert roles.count("constant") == 5 and roles.count("ours_variant") == 2
    fig5 = resolve_figure("fig5", "paper")
    assert sorted({p.config.batch_size for p in fig5}) == [256, 512, 1024, 2048]
    assert {p.config.model for p in fig5} == {"fc5x3000", "lenet", "vgg9"}
    assert {p.role for p in fig5} == {"ours"}
    fig12 = resolve_figure("fig12", "paper")
    by_epochs = {p.config.epochs: p.paper_ours_lr for p in fig12 if p.role == "ours"}
    assert by_epochs == {20: 0.096, 50: 0.051, 150: 0.031}
    fig16 = resolve_figure("fig16", "paper")
    assert sorted(p.config.eps for p in fig16) == [1e-9, 1e-8, 1e-7, 1e-6]
    assert len({p.lr_key for p in fig16}) == 1  # the rule does not depend on eps
    init = resolve_figure("init", "paper", seed=3)
    assert {(p.config.init, p.config.seed) for p in init} == {
        ("paper", 3),
        ("paper", 4),
        ("paper", 5),
        ("pytorch", 3),
    }


def test_cpu_scale_is_reduced_and_documented() -> None:
    fig1 = resolve_figure("fig1", "cpu")
    assert {(p.config.model, p.config.epochs, p.config.num_train) for p in fig1} == {
        ("fc3x1000", 30, 2000)
    }
    fig7 = resolve_figure("fig7", "cpu")
    assert {(p.config.batch_size, p.config.num_train, p.config.epochs) for p in fig7} == {
        (2000, 12000, 20)
    }
    for scale in SCALES:
        assert len(describe_scale(scale)) > 50
    assert "fig16" in list_figures() and "smoke" in list_figures()


def test_shared_runs_have_identical_names() -> None:
    ours1 = [p for p in resolve_figure("fig1", "cpu") if p.role == "ours"]
    ours2 = [p for p in resolve_figure("fig2", "cpu") if p.role == "ours"]
    assert ours1[0].run_name == ours2[0].run_name
    assert ours1[0].lr_key == ours2[0].lr_key
    names12 = {p.run_name for p in resolve_figure("fig12", "cpu") if p.role == "ours"}
    names14 = {p.run_name for p in resolve_figure("fig14", "cpu") if p.role == "ours"}
    assert names12 == names14 and len(names12) == 3


def test_unknown_names_raise() -> None:
    with pytest.raises(ValueError, match="valid figures: fig1"):
        get_figure("fig99")
    with pytest.raises(ValueError, match="valid scales"):
        resolve_figure("fig1", "huge")


def test_smoke_falls_back_to_synthetic_without_data(tmp_path: Path, no_data: None) -> None:
    plans = resolve_figure("fig3", "smoke")
    assert all(p.synthetic_fallback for p in plans)
    # A data folder asked for but without the data is an error, never a silent fallback.
    with pytest.raises(FileNotFoundError, match="holds no mnist files"):
        resolve_figure("fig3", "smoke", data_dir=tmp_path)
    assert {p.config.dataset for p in plans} == {"synthetic"}


# ------------------------------------------------------------------------ running


def _check_figure_outputs(name: str, out: Path, paths: list[Path]) -> None:
    assert paths and all(p.is_file() for p in paths)
    results = [load_result(p) for p in paths]
    # Identical w0 for every method of a row (same architecture, init and seed).
    groups: dict[tuple, set[str]] = {}
    for r in results:
        cfg = r["config"]
        key = (r["extra"]["row"], cfg["model"], cfg["dataset"], cfg["init"], cfg["seed"])
        groups.setdefault(key, set()).add(r["extra"]["w0_sha256"])
    assert all(len(hashes) == 1 for hashes in groups.values()), groups
    ours = [r for r in results if r["extra"]["role"] == "ours"]
    assert ours
    for r in ours:
        cache = json.loads((out / "lr" / f"{r['extra']['ours']['key']}.json").read_text())
        assert r["config"]["method"]["lr"] == pytest.approx(cache["lr"])
        assert cache["k_hat"] == pytest.approx(max(cache["samples"]))
        assert cache["total_steps"] == r["config"]["epochs"] * cache["batches_per_epoch"]
        assert r["extra"]["label"].startswith("Ours (")
    pngs = plot_figure(name, out_dir=out, scale="smoke")
    assert all(p.stat().st_size > 1000 for p in pngs)
    report = figure_report(name, out_dir=out, scale="smoke")
    assert report["missing"] == []
    assert len(report["methods"]) == len(paths)
    json.dumps(report, allow_nan=False)


FAST = ["fig1", "fig2", "fig3", "fig4", "fig6", "fig9"]
SLOW = ["fig5", "fig7", "fig8", "fig10", "fig11", "fig12", "fig13", "fig14", "fig15", "fig16"]


@pytest.fixture(scope="module")
def smoke_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("smoke")


@pytest.mark.parametrize("name", FAST)
def test_smoke_figure(name: str, smoke_out: Path, shared_data: Path) -> None:
    paths = run_figure(name, scale="smoke", out_dir=smoke_out, data_dir=shared_data, progress=False)
    assert {load_result(p)["config"]["dataset"] for p in paths} == {"mnist"}
    _check_figure_outputs(name, smoke_out, paths)


@pytest.mark.slow
@pytest.mark.parametrize("name", [*SLOW, "init"])
def test_smoke_figure_slow(name: str, smoke_out: Path, shared_data: Path) -> None:
    paths = run_figure(name, scale="smoke", out_dir=smoke_out, data_dir=shared_data, progress=False)
    _check_figure_outputs(name, smoke_out, paths)


def test_resume_trains_nothing_the_second_time(tmp_path: Path, no_data: None) -> None:
    calls: list[str] = []

    def counting(plan, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(plan.run_name)
        return execute_run(plan, **kwargs)

    # No data folder: the smoke scale runs on the synthetic set.
    kwargs = dict(scale="smoke", out_dir=tmp_path, progress=False)
    paths = run_figure("fig2", runner=counting, **kwargs)
    assert len(calls) == len(paths) == 8
    mtimes = [p.stat().st_mtime_ns for p in paths]
    lr_files = list((tmp_path / "lr").glob("*.json"))
    assert len(lr_files) == 1
    calls.clear()
    assert run_figure("fig2", runner=counting, **kwargs) == paths
    assert calls == []
    assert [p.stat().st_mtime_ns for p in paths] == mtimes
    # fig1 shares ours with fig2: only the 7 schedulers are trained.
    run_figure("fig1", runner=counting, **kwargs)
    assert len(calls) == 7 and not any("__ours__" in c for c in calls)
    manifest = json.loads((tmp_path / "figures" / "fig1-smoke.json").read_text())
    assert len(manifest["runs"]) == 8


def test_run_figure_rejects_file_as_out_dir(tmp_path: Path) -> None:
    target = tmp_path / "a_file"
    target.write_text("x")
    with pytest.raises(ValueError, match="existing file"):
        run_figure("fig1", scale="smoke", out_dir=target, progress=False)
    with pytest.raises(ValueError, match="num_threads=0"):
        run_figure("fig1", scale="smoke", out_dir=tmp_path, num_threads=0, progress=False)


def test_state_dict_hash_sees_every_value() -> None:
    import torch

    state = {"w": torch.zeros(3), "b": torch.ones(2)}
    h = experiments.state_dict_sha256(state)
    assert h == experiments.state_dict_sha256({k: v.clone() for k, v in state.items()})
    state["w"][1] = 1e-7
    assert h != experiments.state_dict_sha256(state)


def test_horizon_figures_share_one_smoothness_estimate(smoke_out: Path, shared_data: Path) -> None:
    # fig12 varies T only: K_hat and L(w0) are estimated once, alpha is rescaled per T.
    run_figure("fig12", scale="smoke", out_dir=smoke_out, data_dir=shared_data, progress=False)
    entries = [
        json.loads(p.read_text())
        for p in (smoke_out / "lr").glob("*.json")
        if "lenet" in p.name and "bfull" in p.name
    ]
    assert len(entries) == 3
    assert len({e["k_hat"] for e in entries}) == 1
    assert sum("reused_from" in e for e in entries) == 2
    for e in entries:
        expected = (2 * e["initial_loss"] / (e["k_hat"] * e["total_steps"])) ** 0.5
        assert e["lr"] == pytest.approx(expected, rel=1e-12)


def test_run_name_holds_betas_and_t_is_computed_once() -> None:
    from exactlr.paper.schedules import MethodSpec
    from exactlr.paper.training import TrainConfig, steps_per_epoch

    cfg = TrainConfig("mnist", "mini", "lenet", MethodSpec("ours", "ours", 0.01), 3, 64)
    assert "betas" not in cfg.run_name()
    other = TrainConfig(
        "mnist", "mini", "lenet", MethodSpec("ours", "ours", 0.01), 3, 64, betas=(0.8, 0.99)
    )
    assert other.run_name() == cfg.run_name() + "__betas0.8-0.99"
    assert steps_per_epoch(200, 64) == 4 and steps_per_epoch(200, None) == 1
    assert cfg.total_steps(200) == 12
    capped = TrainConfig(
        "mnist", "mini", "lenet", MethodSpec("ours", "ours", 0.01), 3, 64, num_train=128
    )
    assert capped.total_steps(200) == 6  # the first 128 samples: 2 batches per epoch


def test_lr_keys_are_typed_and_name_their_files(no_data: None) -> None:
    from exactlr.paper.lrcache import LRKey

    plan = next(p for p in resolve_figure("fig1", "smoke") if p.role == "ours")
    key = plan.lr_key
    assert isinstance(key, LRKey) and key == LRKey.of(plan.config, 2)
    assert key.to_filename() == "synthetic-full-n256__fc3x32__paper__bfull__e3__seed0__k2"
    assert (
        key.smoothness_key().to_filename() == "synthetic-full-n256__fc3x32__paper__bfull__seed0__k2"
    )
    assert key.finder_key().to_filename() == "synthetic-full-n256__fc3x32__paper__bfull__seed0"
    assert plan.scale is experiments.Scale.SMOKE and f"{plan.scale}" == "smoke"


def test_results_record_t_and_run_figure_restores_threads(tmp_path: Path, no_data: None) -> None:
    import torch

    before = torch.get_num_threads()
    paths = run_figure(
        "fig1", scale="smoke", out_dir=tmp_path, progress=False,
        num_threads=before + 1,
    )  # fmt: skip
    assert torch.get_num_threads() == before
    for path in paths:
        result = load_result(path)
        assert result["total_steps"] == result["extra"]["ours"]["total_steps"] == 3
