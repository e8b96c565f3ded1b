"""Devices: no host-device synchronisation inside inner loops, and the CUDA paths.

A GPU is not always there, so the sync check has two forms:

* On any machine, ``HostReads`` (a ``TorchDispatchMode``) records every operator that
  must copy a device value to the host on a GPU (``.item()``/``float()`` on a tensor,
  ``nonzero``, boolean masks, ``equal``, ...) with the exactlr function it came from.
  Training the same run with 2 and with 8 batches per epoch must read the host exactly as
  often: reads per epoch are allowed, reads per batch are not. The only per-step reads
  are of Adam's ``step`` counter, which torch keeps on the CPU unless Adam is capturable
  (``torch.optim`` reads it for the bias correction, exactlr for the Gamma_t scales), so
  they are no sync on a GPU; they are listed as such, not hidden.
* With a CUDA GPU, the same runs under ``torch.cuda.set_sync_debug_mode("warn")`` must
  warn equally often with 2 and 8 batches per epoch, and every public path is run on
  ``cuda`` and compared with the CPU (float64). Without a GPU these tests skip.
"""

from __future__ import annotations

import collections
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import exactlr
from exactlr.curvature import (
    hessian_spectral_norm,
    hessian_spectral_norms,
    lanczos,
    lanczos_batched,
)
from exactlr.data import ArrayDataset, make_batches, synthetic_classification
from exactlr.models import build_model
from exactlr.paper.grid import train_grid
from exactlr.paper.lrfinder import READ_EVERY, lr_range_test
from exactlr.paper.schedules import MethodSpec
from exactlr.paper.training import TrainConfig, train_run
from exactlr.smoothness import estimate_smoothness
from exactlr.stepsize import suggest_lr

_PACKAGE = str(Path(exactlr.__file__).resolve().parent)
# Operators that read a device value on the host (a GPU sync when the tensor is on one).
_HOST_READ_OPS = {
    "_local_scalar_dense",  # .item(), float(t), int(t), bool(t)
    "is_nonzero",
    "nonzero",
    "masked_select",
    "equal",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "repeat_interleave",
}
# Reads of Adam's `step` counter: a CPU tensor unless Adam is capturable, so no GPU sync.
_CPU_COUNTER_READS = {"torch.optim:_get_value", "exactlr.paper.passes:adam_scales"}

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
# The device of the comparison tests; EXACTLR_TEST_DEVICE=cpu runs them on the CPU as a
# check of the tests themselves where no GPU is lent (cuda:1, mps, ... work too).
DEVICE = os.environ.get("EXACTLR_TEST_DEVICE", "cuda")


def _available(name: str) -> bool:
    kind = torch.device(name).type
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "mps":
        return torch.backends.mps.is_available()
    return kind == "cpu"


needs_device = pytest.mark.skipif(not _available(DEVICE), reason=f"no {DEVICE} device")


# Indexing with a boolean mask needs the mask's count of True values on the host.
_MASK_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}


def _has_mask(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(
        isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices
    )


# Tensor methods that copy to the host without dispatching an operator on a CPU tensor
# (on a GPU tensor they copy device to host: a sync).
_HOST_READ_METHODS = ("tolist", "numpy", "cpu", "__array__")


class HostReads(TorchDispatchMode):
    """Counts host reads by site: ``"<module>:<function>"`` of the innermost exactlr
    frame, or ``"torch.optim:<function>"`` when torch's optimizer code made the read.

    Operators are seen through the dispatch mode; ``Tensor.tolist`` / ``numpy`` /
    ``cpu`` / ``__array__``, which read a CPU tensor's memory directly, are wrapped
    while the recorder is active.
    """

    def __init__(self) -> None:
        super().__init__()
        self.sites: collections.Counter[str] = collections.Counter()
        self._saved: dict[str, object] = {}

    def __enter__(self):  # type: ignore[no-untyped-def]
        for name in _HOST_READ_METHODS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def wrapped(tensor, *args, _original=original, **kwargs):  # type: ignore[no-untyped-def]
                self.sites[self._site(1)] += 1
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, wrapped)
        return super().__enter__()

    def __exit__(self, *exc):  # type: ignore[no-untyped-def]
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved.clear()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func.overloadpacket.__name__
        if name in _HOST_READ_OPS or (name in _MASK_OPS and _has_mask(args)):
            self.sites[self._site(2)] += 1
        return func(*args, **(kwargs or {}))

    @staticmethod
    def _site(depth: int) -> str:
        frame = sys._getframe(depth + 1)
        while frame is not None:
            path = frame.f_code.co_filename
            if f"{Path('torch', 'optim')}" in path:
                return f"torch.optim:{frame.f_code.co_name}"
            if path.startswith(_PACKAGE):
                parts = Path(path).relative_to(_PACKAGE).with_suffix("").parts
                module = ".".join(("exactlr", *(p for p in parts if p != "__init__")))
                return f"{module}:{frame.f_code.co_name}"
            frame = frame.f_back
        return "outside exactlr"

    def device_syncs(self) -> dict[str, int]:
        """The reads that would synchronise with a GPU (all but the CPU counters)."""
        return {k: v for k, v in self.sites.items() if k not in _CPU_COUNTER_READS}


@pytest.fixture(scope="module")
def data() -> tuple[ArrayDataset, ArrayDataset]:
    return synthetic_classification(num_train=160, num_test=40, seed=0)


def _model(
    name: str = "fc2x16", dtype: torch.dtype = torch.float64, seed: int = 0
) -> torch.nn.Module:
    return build_model(
        name, dataset="synthetic", init="paper", generator=torch.Generator().manual_seed(seed)
    ).to(dtype)


def _cfg(batch_size: int | None, method: MethodSpec | None = None, **kw) -> TrainConfig:
    method = method or MethodSpec("const_lr", "constant", 0.01)
    return TrainConfig("synthetic", "mini", "fc2x16", method, epochs=2, batch_size=batch_size, **kw)


def _cosine() -> MethodSpec:
    return MethodSpec("cosine", "scheduler", 0.01, "cosine")


def _reads_of_train_run(data, batch_size: int, method: MethodSpec | None = None) -> HostReads:
    train, test = data
    with HostReads() as reads:
        train_run(_cfg(batch_size, method), _model(), train, test)
    return reads


def _reads_of_train_grid(data, batch_size: int) -> HostReads:
    train, test = data
    cfgs = [_cfg(batch_size), _cfg(batch_size, _cosine())]
    with HostReads() as reads:
        train_grid(cfgs, _model(), train, test)
    return reads


@pytest.mark.parametrize("method", [None, _cosine()], ids=["constant", "cosine"])
def test_train_run_reads_the_host_per_epoch_not_per_batch(data, method):
    few = _reads_of_train_run(data, batch_size=80, method=method)  # 2 batches per epoch
    many = _reads_of_train_run(data, batch_size=20, method=method)  # 8 batches per epoch
    assert few.device_syncs() == many.device_syncs()
    assert few.device_syncs(), "the recorder saw no reads at all: it is not working"
    # What does grow with the batches is Adam's CPU step counter, and only that.
    grown = {k for k in many.sites if many.sites[k] != few.sites.get(k, 0)}
    assert grown == _CPU_COUNTER_READS


def test_train_grid_reads_the_host_per_epoch_not_per_batch(data):
    few = _reads_of_train_grid(data, batch_size=80)
    many = _reads_of_train_grid(data, batch_size=20)
    assert few.device_syncs() == many.device_syncs()
    assert few.device_syncs()
    grown = {k for k in many.sites if many.sites[k] != few.sites.get(k, 0)}
    assert grown <= _CPU_COUNTER_READS


def test_lanczos_reads_the_host_a_fixed_number_of_times_per_product():
    """Lanczos must read its coefficients to test convergence: a few scalars per
    product (each product is a full pass over the data), never per layer or sample."""
    eigenvalues = torch.linspace(-3.0, 7.0, 60, dtype=torch.float64)
    matrix = torch.diag(eigenvalues)

    def reads(iters: int) -> int:
        with HostReads() as recorder:
            res = lanczos(
                lambda v: matrix @ v,
                torch.ones(60, dtype=torch.float64),
                max_iters=iters,
                tol=1e-15,
            )
        assert res.num_matvecs == iters
        return sum(recorder.device_syncs().values())

    # One copy of (alpha_k, beta_k) per product; the tridiagonal algebra is host-side.
    assert reads(20) - reads(10) == 10


def test_batched_lanczos_reads_the_host_once_per_batched_product():
    """S runs in lockstep: one copy brings all their scalars, not one per run."""
    diagonals = torch.stack(
        [torch.linspace(-3.0, 7.0, 60, dtype=torch.float64) * (1 + s) for s in range(3)]
    )

    def reads(iters: int) -> int:
        with HostReads() as recorder:
            results = lanczos_batched(
                lambda q, index: diagonals[index] * q,
                torch.ones(3, 60, dtype=torch.float64),
                max_iters=iters,
                tol=1e-15,
            )
        assert [r.num_matvecs for r in results] == [iters] * 3
        return sum(recorder.device_syncs().values())

    assert reads(20) - reads(10) == 10


def test_lr_range_test_reads_the_losses_once_per_block_of_steps(data):
    train, _ = data

    def reads(num_iter: int) -> int:
        with HostReads() as recorder:
            res = lr_range_test(_model(), train, batch_size=40, num_iter=num_iter, end_lr=1e-2)
        assert res.steps == num_iter and not res.diverged
        return recorder.device_syncs().get("exactlr.paper.lrfinder:read", 0)

    assert reads(4 * READ_EVERY) - reads(2 * READ_EVERY) == 2


@pytest.mark.parametrize("hvp_mode", ["reverse", "forward"])
def test_spectral_norm_reads_the_host_once_per_product(data, hvp_mode):
    """The whole solve on a model: per extra product, one read (the Lanczos scalars)."""
    train, _ = data
    batches = make_batches(train.to("cpu", dtype=torch.float64), 40)

    def reads(iters: int) -> dict[str, int]:
        with HostReads() as recorder:
            res = hessian_spectral_norm(
                _model(),
                F.cross_entropy,
                batches,
                tol=1e-15,
                max_iters=iters,
                hvp_mode=hvp_mode,
                generator=torch.Generator().manual_seed(0),
            )
        assert res.num_hvps == iters
        return recorder.device_syncs()

    few, many = reads(6), reads(12)
    grown = {k: many[k] - few.get(k, 0) for k in many if many[k] != few.get(k, 0)}
    assert grown == {"exactlr.curvature.solvers:_host_scalars": 6}


def test_stacked_spectral_norms_read_the_host_once_per_batched_product(data):
    """Algorithm 2's stacked samples: one read per vmapped product for all samples."""
    train, _ = data
    batches = make_batches(train.to("cpu", dtype=torch.float64), 40)

    def reads(iters: int) -> dict[str, int]:
        models = [_model(seed=seed) for seed in range(3)]
        with HostReads() as recorder:
            results = hessian_spectral_norms(
                models,
                F.cross_entropy,
                batches,
                tol=1e-15,
                max_iters=iters,
                generators=[torch.Generator().manual_seed(seed) for seed in range(3)],
            )
        assert [r.num_hvps for r in results] == [iters] * 3
        return recorder.device_syncs()

    few, many = reads(6), reads(12)
    grown = {k: many[k] - few.get(k, 0) for k in many if many[k] != few.get(k, 0)}
    assert grown == {"exactlr.curvature.solvers:_host_scalars": 6}


def test_the_recorder_sees_a_read_where_there_is_one():
    with HostReads() as reads:
        x = torch.ones(3)
        float(x.sum())
        x[x > 0].sum()
        x.tolist()
    assert reads.sites["outside exactlr"] == 3


# ---- on a GPU (skipped without one) ------------------------------------------------


def _sync_warnings(fn) -> int:  # type: ignore[no-untyped-def]
    """Number of synchronising CUDA calls ``fn`` makes (torch's sync debug mode)."""
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return sum("synchroniz" in str(w.message) for w in caught)


@needs_cuda
def test_cuda_train_run_syncs_per_epoch_not_per_batch(data):
    train, test = data

    def run(batch_size: int):  # type: ignore[no-untyped-def]
        return lambda: train_run(_cfg(batch_size), _model(), train, test, device=DEVICE)

    run(80)()  # warm-up: first-use allocations and library loading may sync once
    assert _sync_warnings(run(80)) == _sync_warnings(run(20))


@needs_cuda
def test_cuda_train_grid_syncs_per_epoch_not_per_batch(data):
    train, test = data

    def run(batch_size: int):  # type: ignore[no-untyped-def]
        cfgs = [_cfg(batch_size), _cfg(batch_size, _cosine())]
        return lambda: train_grid(cfgs, _model(), train, test, device=DEVICE)

    run(80)()
    assert _sync_warnings(run(80)) == _sync_warnings(run(20))


@needs_device
@pytest.mark.parametrize("batch_size", [None, 40])
def test_device_train_run_matches_cpu(data, batch_size):
    train, test = data
    cpu = train_run(_cfg(batch_size), _model(), train, test, device="cpu")
    gpu = train_run(_cfg(batch_size), _model(), train, test, device=DEVICE)
    assert gpu.device.startswith(torch.device(DEVICE).type)
    for a, b in zip(cpu.metrics, gpu.metrics, strict=True):
        assert math.isclose(a.train_loss, b.train_loss, rel_tol=1e-9)
        assert math.isclose(a.grad_norm_full, b.grad_norm_full, rel_tol=1e-8)
        assert math.isclose(a.test_acc, b.test_acc, abs_tol=1e-12)


@needs_device
def test_device_train_grid_matches_device_train_run(data):
    train, test = data
    cfgs = [_cfg(40), _cfg(40, _cosine())]
    grid = train_grid(cfgs, _model(), train, test, device=DEVICE)
    for cfg, got in zip(cfgs, grid, strict=True):
        want = train_run(cfg, _model(), train, test, device=DEVICE)
        for a, b in zip(want.metrics, got.metrics, strict=True):
            assert math.isclose(a.train_loss, b.train_loss, rel_tol=1e-9)


@needs_device
@pytest.mark.parametrize("name", ["fc2x16", "lenet"])
def test_device_spectral_norm_matches_cpu(name):
    dataset = "synthetic" if name == "fc2x16" else "mnist"
    model = build_model(
        name, dataset=dataset, init="paper", generator=torch.Generator().manual_seed(0)
    ).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((64, 1, 28, 28), generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (64,), generator=gen)
    values = {}
    for device in ("cpu", DEVICE):
        net = model.to(device)
        res = hessian_spectral_norm(
            net,
            F.cross_entropy,
            [(x.to(device), y.to(device))],
            tol=1e-8,
            max_iters=200,
            generator=torch.Generator().manual_seed(2),
        )
        values[device] = res.value
    assert math.isclose(values["cpu"], values[DEVICE], rel_tol=1e-6)


@needs_device
def test_device_smoothness_and_suggest_lr_match_cpu(data):
    train, _ = data
    batches = make_batches(train, None)

    def make() -> torch.nn.Module:
        return build_model("fc2x16", dataset="synthetic", init="paper").double()

    khat = {}
    for device in ("cpu", DEVICE):
        est = estimate_smoothness(
            make,
            F.cross_entropy,
            [(x.double(), y) for x, y in batches],
            num_samples=3,
            generator=torch.Generator().manual_seed(0),
            device=device,
            tol=1e-8,
            max_iters=200,
        )
        khat[device] = est.k_hat
    assert math.isclose(khat["cpu"], khat[DEVICE], rel_tol=1e-6)
    gpu_batches = [(x.double().to(DEVICE), y.to(DEVICE)) for x, y in batches]
    s = suggest_lr(_model().to(DEVICE), F.cross_entropy, gpu_batches, total_steps=10, num_samples=2)
    assert s.lr > 0 and math.isfinite(s.lr)


@needs_device
@pytest.mark.parametrize(
    "command",
    [
        ["lr", "--model", "fc1x32", "--dataset", "synthetic", "--samples", "2", "--epochs", "3"],
        ["run", "fig1", "--scale", "smoke"],
        ["run", "fig1", "--scale", "smoke", "--methods", "lr-finder", "--curvature-every", "1"],
        ["demo", "--epochs", "2"],
    ],
    ids=["lr", "run-fig1", "run-fig1-lr-finder-curvature", "demo"],
)
def test_device_cli(tmp_path, shared_data, command):
    extra = ["--out", str(tmp_path / "out")] if command[0] in ("run", "demo") else []
    data = ["--data-dir", str(shared_data)] if command[0] != "demo" else []
    proc = subprocess.run(
        [sys.executable, "-m", "exactlr", *command, *extra, *data, "--device", DEVICE, "--quiet"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
