"""Tests for verdicts over several seeds, the last-10% median and finding the scale."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from exactlr.cli import main
from exactlr.paper.campaign import all_jobs, pick_scale, scales_found, seeds_found
from exactlr.paper.lrcache import LRKey
from exactlr.paper.planning import resolve_figure
from exactlr.paper.report import figure_report, format_markdown
from exactlr.paper.results import write_json_atomic
from exactlr.paper.robust import tail_epochs, tail_median
from exactlr.paper.seeds import format_seeds_markdown, parse_seeds, seeds_report, spread
from exactlr.paper.training import TrainConfig
from test_report import COSINE, OURS, write_manifest, write_run


def _tail(final: float, tail: float, epochs: int = 30) -> list[float]:
    """Gradient norms of ``epochs`` epochs: 1.0, then ``tail`` for the last 10% but the
    last epoch, which is ``final``."""
    k = tail_epochs(epochs)
    return [1.0] * (epochs + 1 - k) + [tail] * (k - 1) + [final]


def test_tail_median() -> None:
    assert tail_epochs(30) == 3 and tail_epochs(100) == 10 and tail_epochs(5) == 1
    assert tail_median(_tail(0.01, 0.5)) == 0.5  # median of [0.5, 0.5, 0.01]
    assert tail_median([2.0, 1.0, 3.0]) == 3.0  # 2 epochs: the last one alone
    assert tail_median([2.0, math.nan]) == math.inf  # a diverged last epoch ranks last
    assert tail_median([2.0]) == 2.0 and math.isnan(tail_median([]))
    with pytest.raises(ValueError, match="share"):
        tail_epochs(10, share=0.0)


def test_final_and_tail_disagree(tmp_path: Path) -> None:
    # Ours ends lowest on its last epoch only; over the last 3 epochs Cosine is lower.
    runs = [
        write_run(tmp_path, OURS, _tail(0.01, 0.5)),
        write_run(tmp_path, COSINE, _tail(0.1, 0.1)),
    ]
    write_manifest(tmp_path, "fig1", runs)
    rep = figure_report("fig1", out_dir=tmp_path, scale="cpu")
    ours = next(m for m in rep["methods"] if m["name"] == "ours")
    assert ours["final_grad_norm"] == 0.01 and ours["tail_median_grad_norm"] == 0.5
    tail = rep["verdicts"]["tail"]
    assert rep["verdicts"]["ours_lowest_final_grad_norm"] is True
    assert tail["tail_epochs"] == 3
    assert tail["ours_lowest"] == {
        "final": True,
        "tail": False,
        "best_final": "Cosine",
        "best_tail": "Cosine",
    }
    assert tail["disagree"] == ["ours_lowest", "ours_below_best_scheduler"]
    assert tail["ours_below_best_constant"] is None  # no constant LR in this row
    text = format_markdown(rep)
    assert "**Final value and median of the last 3 epoch(s) disagree** on ours lowest" in text
    assert "| 0.01 | 0.5 |" in text  # final, then the last-10% median


def test_final_and_tail_agree(tmp_path: Path) -> None:
    runs = [
        write_run(tmp_path, OURS, _tail(0.01, 0.02)),
        write_run(tmp_path, COSINE, _tail(0.1, 0.1)),
    ]
    write_manifest(tmp_path, "fig1", runs)
    rep = figure_report("fig1", out_dir=tmp_path, scale="cpu")
    assert rep["verdicts"]["tail"]["disagree"] == []
    assert "By the median of the last 3 epoch(s): the same verdicts" in format_markdown(rep)


def _reseed(out: Path, entry: dict, seed: int) -> None:
    """Turns a hand-made run of base seed 0 into the same run of base seed ``seed``
    (its own data draw and w0, so its own name), in place."""
    old = out / entry["path"]
    record = json.loads(old.read_text())
    cfg = TrainConfig.from_dict(record["config"])
    cfg = dataclasses.replace(cfg, seed=seed, data_seed=seed)
    record.update(name=cfg.run_name(), config=cfg.to_dict(), seed=seed)
    old.unlink()
    entry.update(run_name=cfg.run_name(), path=f"runs/{cfg.run_name()}.json")
    write_json_atomic(out / entry["path"], record)


def _seed_manifest(out: Path, seed: int, ours_final: float, cosine_final: float) -> None:
    """fig1 at cpu scale with base seed ``seed``: a manifest of ours and Cosine."""
    runs = [
        write_run(out, OURS, _tail(ours_final, ours_final)),
        write_run(out, COSINE, _tail(cosine_final, cosine_final)),
    ]
    for run in runs:
        _reseed(out, run, seed)
    write_manifest(out, "fig1", runs)
    if seed:
        (out / "figures" / "fig1-cpu.json").rename(out / "figures" / f"fig1-cpu-seed{seed}.json")


def test_seeds_report_aggregates_and_says_what_holds_on_every_seed(tmp_path: Path) -> None:
    _seed_manifest(tmp_path, 2, ours_final=0.3, cosine_final=0.1)  # ours loses
    _seed_manifest(tmp_path, 1, ours_final=0.02, cosine_final=0.1)
    _seed_manifest(tmp_path, 0, ours_final=0.01, cosine_final=0.2)
    assert seeds_found(tmp_path, "fig1", "cpu") == [0, 1, 2]
    rep = seeds_report("fig1", out_dir=tmp_path, scale="cpu", seeds=(0, 1, 2))
    row = rep["rows"][0]
    ours = next(m for m in row["methods"] if m["name"] == "ours")
    cosine = next(m for m in row["methods"] if m["name"] == "cosine")
    assert ours["final_grad_norm"]["median"] == 0.02
    assert (ours["final_grad_norm"]["min"], ours["final_grad_norm"]["max"]) == (0.01, 0.3)
    assert ours["ranks"] == [1, 1, 2] and ours["first_on"] == 2 and cosine["first_on"] == 1
    v = row["verdicts"]
    assert v["ours_first"] == 2 and v["seeds_compared"] == 3 and v["ours_first_tail"] == 2
    assert v["factor_to_best_scheduler"] == pytest.approx([20.0, 5.0, 1 / 3])
    assert v["every_seed"]["ours_lowest"] is False
    assert v["every_seed"]["ours_below_best_scheduler"] is False
    assert v["every_seed"]["ours_below_best_constant"] is None  # no constants compared
    text = format_seeds_markdown(rep)
    assert "Ours ends lowest on 2 of 3 seeds" in text
    assert "| Cosine | 0.1 [0.1, 0.2] |" in text
    assert "Holds on every seed: ours lowest no" in text
    json.dumps(rep, allow_nan=False)  # strict JSON


def test_parse_seeds_and_spread() -> None:
    assert parse_seeds("0, 1,2") == (0, 1, 2)
    for bad in ("", "0,0", "a", "-1", "1,,2"):
        with pytest.raises(ValueError, match="seeds"):
            parse_seeds(bad)
    assert spread([1.0, None, 3.0]) == {"values": [1.0, None, 3.0], "median": 3.0,
                                        "min": 1.0, "max": None}  # fmt: skip


def test_seed_draws_data_and_w0_and_names_say_so() -> None:
    plans = {s: resolve_figure("fig1", "paper", seed=s) for s in (0, 1)}
    ours = {s: next(p for p in ps if p.method == "ours") for s, ps in plans.items()}
    assert ours[0].config.data_seed == 0 and ours[1].config.data_seed == 1
    assert ours[0].run_name == "mnist-mini__fc3x1000__ours__seed0"  # seed 0 as before
    assert ours[1].run_name == "mnist-mini__fc3x1000__ours__seed1__data1"
    assert "data_seed" not in ours[0].config.to_dict()
    assert TrainConfig.from_dict(ours[1].config.to_dict()) == ours[1].config
    assert ours[1].lr_key.to_filename().endswith("__seed1__k20__data1")
    assert ours[0].lr_key == LRKey.of(ours[0].config, 20)
    # Appendix C.5's extra seeds vary w0 only: the base seed draws the data.
    init = [p for p in resolve_figure("init", "paper") if p.method == "ours"]
    assert [(p.config.seed, p.config.data_seed) for p in init] == [(0, 0), (1, 0), (2, 0), (0, 0)]
    assert all_jobs()[:4] == [("fig1", 0), ("fig1", 1), ("fig1", 2), ("fig2", 0)]
    assert ("fig6", 2) in all_jobs() and ("fig7", 1) not in all_jobs()


def test_pick_scale(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="no results of fig1"):
        pick_scale(tmp_path, "fig1")
    for name in ("fig1-cpu.json", "fig1-paper-seed2.json", "fig10-smoke.json", "x.json"):
        write_json_atomic(tmp_path / "figures" / name, {"runs": []})
    assert scales_found(tmp_path, "fig1") == ["cpu", "paper"]
    assert scales_found(tmp_path, "fig10") == ["smoke"]
    assert pick_scale(tmp_path, "fig10") == "smoke"
    assert main(["report", "fig1", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "several scales (cpu, paper); pass --scale" in err and len(err.splitlines()) == 1


def test_run_and_report_seeds_smoke(
    tmp_path: Path, shared_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "res"
    common = ["--scale", "smoke", "--out", str(out), "--data-dir", str(shared_data)]
    assert main(["run", "fig1", *common, "--seeds", "0,1", "--quiet"]) == 0
    assert (out / "figures" / "fig1-smoke.json").is_file()
    assert (out / "figures" / "fig1-smoke-seed1.json").is_file()
    capsys.readouterr()
    # The one scale in --out is used when --scale is not given.
    assert main(["report", "fig1", "--out", str(out), "--seeds", "0,1", "--format", "json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["seeds"] == [0, 1] and len(rep["rows"]) == 1
    row = rep["rows"][0]
    assert len(row["methods"]) == 8 and row["verdicts"]["seeds_compared"] == 2
    # Each seed draws its own data and w0: different L(w0), different LR.
    assert row["initial_loss"][0] != row["initial_loss"][1]
    assert row["ours_lr"][0] != row["ours_lr"][1]
    w0 = {
        json.loads(p.read_text())["extra"]["w0_sha256"]
        for p in (out / "runs").glob("*__ours__*.json")
    }
    assert len(w0) == 2
    for name in ("fig1-smoke.md", "fig1-smoke-seed1.md", "fig1-smoke-seeds.md"):
        assert (out / "reports" / name).is_file()
    # The estimate of the finished plan counts everything as done.
    assert main(["run", "fig1", *common, "--seeds", "0,1", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "total: 16 runs (0 to do)" in text and "about 0.00 h" in text
