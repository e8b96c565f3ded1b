"""Data-parallel curvature on torch.distributed: 2 CPU processes (gloo) against one process.

Every scenario runs in one spawn of two ranks (starting processes is the slow part); the
ranks save what they computed and the test compares it, in float64, with the same
computation in this process on all the data. A separate spawn checks that a rank with
bad input ends both ranks with one error naming it, within a bounded wait.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from exactlr import estimate_smoothness, hessian_spectral_norm, suggest_lr
from exactlr.curvature import full_loss
from exactlr.curvature.distributed import (
    RanksError,
    RanksValueError,
    resolve_group,
    shard_batches,
)

WORLD = 2
TIMEOUT_S = 240  # the test's own bound on a spawn (the group's timeout is shorter)
SPLIT = 41  # rank 0 holds samples [0, 41), rank 1 the other 23: unequal shards
TOL = 1e-10


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, 3, (64,), generator=gen)


def _model(width: int = 8, seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, width), nn.Tanh(), nn.Linear(width, 3)).double()


def _make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _start_generator() -> torch.Generator:
    return torch.Generator().manual_seed(5)


def _dict_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """The loss contract's ``loss(model, batch)`` on dict batches."""
    return F.cross_entropy(model(batch["features"]), batch["labels"])


def _batches(x: torch.Tensor, y: torch.Tensor, cuts: list[int]) -> list:
    """Consecutive batches of ``(x, y)`` ending at ``cuts``."""
    starts = [0, *cuts[:-1]]
    return [(x[a:b], y[a:b]) for a, b in zip(starts, cuts, strict=True)]


def _norm(res) -> dict:
    return {
        "value": res.value,
        "lambda_max": res.lambda_max,
        "lambda_min": res.lambda_min,
        "num_hvps": res.num_hvps,
        "loss": res.loss,
    }


def _estimate(est) -> dict:
    return {
        "k_hat": est.k_hat,
        "samples": est.samples,
        "num_hvps": [r.num_hvps for r in est.records],
        "seeds": [r.seed for r in est.records],
        "losses": [r.loss for r in est.records],
    }


def _shard_scenarios(rank: int) -> dict:
    """Every data-parallel computation of one rank (its shard of the data)."""
    x, y = _data()
    part = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
    full_batch = [(x[part], y[part])]
    # Rank 0: three batches (10, 20, 11 samples), rank 1: one of 23.
    uneven = _batches(x, y, [10, 30, SPLIT]) if rank == 0 else [(x[SPLIT:], y[SPLIT:])]
    sampler = DistributedSampler(TensorDataset(x, y), num_replicas=WORLD, rank=rank, shuffle=False)
    loader = DataLoader(TensorDataset(x, y), batch_size=12, sampler=sampler)
    model = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(5)
    out = {
        "norm_full_batch": _norm(
            hessian_spectral_norm(model, F.cross_entropy, full_batch, tol=TOL, generator=gen)
        ),
        "norm_power": _norm(
            hessian_spectral_norm(
                model,
                F.cross_entropy,
                uneven,
                method="power",
                tol=1e-8,
                max_iters=300,
                generator=torch.Generator().manual_seed(5),
            )
        ),
        "norm_subsample": _norm(
            hessian_spectral_norm(
                model, F.cross_entropy, uneven, tol=TOL, subsample=0.5, generator=gen
            )
        ),
        "loss_uneven": full_loss(model, F.cross_entropy, uneven),
        "smooth_uneven": _estimate(
            estimate_smoothness(
                _make_model, F.cross_entropy, uneven, num_samples=3, tol=TOL, target="both"
            )
        ),
        "smooth_stacked": _estimate(
            estimate_smoothness(
                _make_model, F.cross_entropy, uneven, num_samples=3, tol=TOL, sample_batch=3
            )
        ),
        "smooth_minibatch": _estimate(
            estimate_smoothness(
                _make_model, F.cross_entropy, uneven, num_samples=2, tol=TOL, variant="minibatch"
            )
        ),
    }
    dicts = [{"features": xb, "labels": yb} for xb, yb in uneven]
    out["norm_loss_contract"] = _norm(
        hessian_spectral_norm(
            model, batches=dicts, loss=_dict_loss, tol=TOL, generator=_start_generator()
        )
    )
    with_loss = suggest_lr(
        model, batches=dicts, loss=_dict_loss, total_steps=100, num_samples=2, tol=TOL
    )
    out["suggest_loss_contract"] = {"lr": with_loss.lr, "initial_loss": with_loss.initial_loss}
    lr = suggest_lr(model, F.cross_entropy, loader, total_steps=100, num_samples=2, tol=TOL)
    out["suggest_sampler"] = {"lr": lr.lr, "initial_loss": lr.initial_loss, "k_hat": lr.k_hat}
    samples = suggest_lr(
        model,
        F.cross_entropy,
        [(x, y)],
        total_steps=100,
        num_samples=3,
        tol=TOL,
        parallel="samples",
        stop_below_max=False,
    )
    out["suggest_samples"] = {"lr": samples.lr, "k_hat": samples.k_hat}
    out["samples_mode"] = _estimate(samples.estimate)
    out["model_unchanged"] = all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    out["training_flags"] = [m.training for m in model.modules()]
    out["group_intact"] = dist.is_initialized() and dist.get_world_size() == WORLD
    out["shard_sizes"] = [len(b[0]) for b in shard_batches([(x, y)], model)]
    try:
        shard_batches([(x, y)], nn.Sequential(nn.Linear(5, 3), nn.BatchNorm1d(3)))
    except RanksValueError as err:
        out["shard_batchnorm"] = str(err)
    return out


def _bad_input_scenarios(rank: int) -> dict:
    """Each case is bad on rank 1 only; every rank must raise the same error."""
    x, y = _data()
    mine = (x[:SPLIT], y[:SPLIT]) if rank == 0 else (x[SPLIT:], y[SPLIT:])
    bad_labels = (mine[0], mine[1] + 5) if rank == 1 else mine
    cases = {
        "labels": lambda: hessian_spectral_norm(_model(), F.cross_entropy, [bad_labels]),
        "params": lambda: hessian_spectral_norm(
            _model(width=9 if rank == 1 else 8), F.cross_entropy, [mine]
        ),
        "weights": lambda: hessian_spectral_norm(_model(seed=1 + rank), F.cross_entropy, [mine]),
        "empty": lambda: suggest_lr(
            _model(), F.cross_entropy, [] if rank == 1 else [mine], total_steps=10
        ),
    }

    def fails_in_products(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if rank == 1 and torch.is_grad_enabled():  # the loss passes, a product raises
            raise RuntimeError("no second derivative here")
        return F.cross_entropy(outputs, targets)

    cases["product"] = lambda: hessian_spectral_norm(_model(), fails_in_products, [mine])
    out = {}
    for name, case in cases.items():
        try:
            case()
            out[name] = "no error"
        except RanksError as err:
            out[name] = f"{type(err).__name__}: {err}"
    return out


def _worker(rank: int, port: int, scenario: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        result = _shard_scenarios(rank) if scenario == "shards" else _bad_input_scenarios(rank)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        if scenario == "uncaught":  # a failure left to end the processes
            hessian_spectral_norm(
                _model(),
                F.cross_entropy,
                [(torch.randn(4, 5).double(), torch.full((4,), 7 if rank == 1 else 0))],
            )
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(scenario: str, out_dir: Path) -> list[dict]:
    """Run ``scenario`` on 2 ranks; wait at most TIMEOUT_S; each rank's saved result."""
    context = mp.spawn(
        _worker, args=(_free_port(), scenario, str(out_dir)), nprocs=WORLD, join=False
    )
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.terminate()
            pytest.fail(f"the 2-rank {scenario!r} run did not end within {TIMEOUT_S} s")
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


def _close(a: float, b: float, rtol: float = 1e-9) -> bool:
    return abs(a - b) <= rtol * max(abs(a), abs(b), 1e-12)


@pytest.fixture(scope="module")
def shard_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return _spawn("shards", tmp_path_factory.mktemp("shards"))


def test_both_ranks_get_identical_results(shard_results: list[dict]) -> None:
    first, second = shard_results
    assert first == second  # bit-equal: the solvers see the same all-reduced products


def test_full_batch_split_unequally_equals_one_process(shard_results: list[dict]) -> None:
    x, y = _data()
    one = _norm(
        hessian_spectral_norm(
            _model(), F.cross_entropy, [(x, y)], tol=TOL, generator=torch.Generator().manual_seed(5)
        )
    )
    two = shard_results[0]["norm_full_batch"]
    print(f"full batch: 1 process {one}\n            2 processes {two}")
    assert two["num_hvps"] == one["num_hvps"]
    for key in ("value", "lambda_max", "lambda_min", "loss"):
        assert _close(two[key], one[key]), key
    assert one["lambda_min"] < 0 < one["lambda_max"]  # negative curvature is counted


def test_uneven_shards_equal_one_process(shard_results: list[dict]) -> None:
    x, y = _data()
    batches = _batches(x, y, [10, 30, SPLIT, 64])
    got = shard_results[0]
    assert _close(got["loss_uneven"], full_loss(_model(), F.cross_entropy, batches), 1e-12)
    power = hessian_spectral_norm(
        _model(),
        F.cross_entropy,
        batches,
        method="power",
        tol=1e-8,
        max_iters=300,
        generator=torch.Generator().manual_seed(5),
    )
    assert got["norm_power"]["num_hvps"] == power.num_hvps
    assert _close(got["norm_power"]["value"], power.value)
    # The subsample start differs (each rank draws its own share); the answer does not.
    exact = hessian_spectral_norm(_model(), F.cross_entropy, batches, tol=TOL)
    assert _close(got["norm_subsample"]["value"], exact.value, 1e-8)
    for key, kwargs in (
        ("smooth_uneven", {"num_samples": 3, "target": "both"}),
        ("smooth_stacked", {"num_samples": 3, "sample_batch": 3}),
    ):
        one = _estimate(
            estimate_smoothness(_make_model, F.cross_entropy, batches, tol=TOL, **kwargs)
        )
        two = got[key]
        print(f"{key}: 1 process k_hat={one['k_hat']!r}, 2 processes k_hat={two['k_hat']!r}")
        assert two["seeds"] == one["seeds"] and two["num_hvps"] == one["num_hvps"]
        assert all(_close(a, b) for a, b in zip(two["samples"], one["samples"], strict=True))
        assert all(_close(a, b) for a, b in zip(two["losses"], one["losses"], strict=True))


def test_loss_contract_on_dict_batches_equals_one_process(shard_results: list[dict]) -> None:
    x, y = _data()
    dicts = [{"features": xb, "labels": yb} for xb, yb in _batches(x, y, [10, 30, SPLIT, 64])]
    norm = hessian_spectral_norm(
        _model(), batches=dicts, loss=_dict_loss, tol=TOL, generator=_start_generator()
    )
    got = shard_results[0]["norm_loss_contract"]
    assert got["num_hvps"] == norm.num_hvps
    assert _close(got["value"], norm.value) and _close(got["loss"], norm.loss, 1e-12)
    one = suggest_lr(
        _model(), batches=dicts, loss=_dict_loss, total_steps=100, num_samples=2, tol=TOL
    )
    two = shard_results[0]["suggest_loss_contract"]
    assert _close(two["lr"], one.lr) and _close(two["initial_loss"], one.initial_loss, 1e-12)


def test_minibatch_variant_is_the_max_over_all_ranks_batches(shard_results: list[dict]) -> None:
    x, y = _data()
    batches = _batches(x, y, [10, 30, SPLIT, 64])
    one = estimate_smoothness(
        _make_model, F.cross_entropy, batches, num_samples=2, tol=TOL, variant="minibatch"
    )
    two = shard_results[0]["smooth_minibatch"]
    # Start vectors per batch differ from one process: equal to the solver tolerance.
    assert all(_close(a, b, 1e-7) for a, b in zip(two["samples"], one.samples, strict=True))


def test_distributed_sampler_loader_equals_one_process(shard_results: list[dict]) -> None:
    x, y = _data()
    loader = DataLoader(TensorDataset(x, y), batch_size=12)
    one = suggest_lr(_model(), F.cross_entropy, loader, total_steps=100, num_samples=2, tol=TOL)
    two = shard_results[0]["suggest_sampler"]
    print(f"DistributedSampler: 1 process lr={one.lr!r}, 2 processes lr={two['lr']!r}")
    assert _close(two["initial_loss"], one.initial_loss, 1e-12)
    assert _close(two["k_hat"], one.k_hat) and _close(two["lr"], one.lr)


def test_samples_split_over_ranks_equals_one_process(shard_results: list[dict]) -> None:
    x, y = _data()
    one = suggest_lr(
        _model(),
        F.cross_entropy,
        [(x, y)],
        total_steps=100,
        num_samples=3,
        tol=TOL,
        stop_below_max=False,
    )
    got = shard_results[0]
    # Whole samples on whole data: the same computation as one process, bit for bit.
    # Every sample to tol: ranks evaluate samples side by side, so a ceiling stop would
    # see a different running maximum than one process does.
    assert got["samples_mode"] == _estimate(one.estimate)
    assert got["suggest_samples"] == {"lr": one.lr, "k_hat": one.k_hat}


def test_model_and_group_left_untouched(shard_results: list[dict]) -> None:
    for got in shard_results:
        assert got["model_unchanged"] and got["group_intact"]
        assert got["training_flags"] == [m.training for m in _model().modules()]
    assert [r["shard_sizes"] for r in shard_results] == [[32], [32]]
    assert "without changing the loss of a BatchNorm model" in shard_results[0]["shard_batchnorm"]


def test_bad_input_on_one_rank_ends_every_rank_with_its_error(tmp_path: Path) -> None:
    with pytest.raises(mp.ProcessRaisedException, match=r"rank 1 of 2 failed: label 7"):
        _spawn("uncaught", tmp_path)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert results[0] == results[1]  # every rank raised the same message
    got = results[0]
    assert got["labels"].startswith("RanksValueError: rank 1 of 2 failed: label")
    assert "different parameter counts (rank 0: 75, rank 1: 84)" in got["params"]
    assert "weights on rank 1 differ" in got["weights"]
    assert got["empty"].startswith("RanksValueError: rank 1 of 2 failed: batches is empty")
    assert got["product"] == "RanksError: rank 1 of 2 failed: no second derivative here"


def test_single_process_defaults() -> None:
    assert resolve_group(None) is None and resolve_group(False) is None
    with pytest.raises(ValueError, match="process_group must be"):
        resolve_group("world")
    x, y = _data()
    assert shard_batches([(x, y)], _model()) == [(x, y)]
    with pytest.raises(ValueError, match="parallel='both' is not one of"):
        suggest_lr(_model(), F.cross_entropy, [(x, y)], total_steps=1, parallel="both")


def test_torchrun_cli_prints_once_and_matches_one_process(tmp_path: Path) -> None:
    # Whole batches per rank: the paper's FC networks have BatchNorm.
    # A random start: each rank would draw its own subsample (same answer to --tol only).
    args = ["lr", "--model", "fc1x16", "--batch-size", "100", "--samples", "2", "--json"]
    args += ["--subsample", "none"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, "-m", "exactlr", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=TIMEOUT_S,
        check=True,
    )
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    double = subprocess.run(
        [*launcher, f"--nproc-per-node={WORLD}", "-m", "exactlr", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=TIMEOUT_S,
        cwd=tmp_path,
    )
    assert double.returncode == 0, double.stderr[-2000:]
    one, two = json.loads(single.stdout), json.loads(double.stdout)  # one JSON: rank 0 only
    print(f"torchrun CLI: 1 process lr={one['lr']!r}, 2 processes lr={two['lr']!r}")
    assert two["total_steps"] == one["total_steps"]
    assert abs(two["lr"] - one["lr"]) <= 1e-4 * one["lr"]  # float32 products
    assert abs(two["initial_loss"] - one["initial_loss"]) <= 1e-5 * one["initial_loss"]
