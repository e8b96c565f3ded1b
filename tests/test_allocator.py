"""keep_freed_memory: glibc keeps freed large blocks while active, and only then."""

from __future__ import annotations

import inspect
import resource
import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import exactlr
from exactlr import allocator
from exactlr.allocator import ENV_SWITCH, keep_freed_memory

glibc_only = pytest.mark.skipif(
    allocator._glibc() is None or allocator._user_tuned(),
    reason="needs glibc's malloc with its default settings",
)

BIG = 16 * 1024 * 1024  # float32 elements: 64 MiB, above glibc's largest mmap threshold


def _faults_of_last_allocations(total: int = 32, last: int = 8) -> float:
    """Median minor page faults of the last ``last`` of ``total`` fresh 64 MiB tensors.

    Not the first ones: small allocations of the process land in a freed block in
    between, so that it no longer fits the next 64 MiB request and the heap grows a few
    times (up to 9 measured under pytest) before it holds enough free blocks.
    """
    faults = []
    for _ in range(total):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(BIG)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return statistics.median(faults[-last:])


class _RecordingLibc:
    """Stands in for glibc: records the mallopt / malloc_trim calls."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad))
        return 1


SET = [("mallopt", -4, 0), ("mallopt", -1, 2**31 - 1)]
RESTORE = [
    ("mallopt", -4, 65536),
    ("mallopt", -3, 32 * 1024 * 1024),
    ("mallopt", -1, 64 * 1024 * 1024),
    ("malloc_trim", 0),
]


@pytest.fixture
def fake_libc(monkeypatch: pytest.MonkeyPatch) -> _RecordingLibc:
    libc = _RecordingLibc()
    monkeypatch.setattr(allocator, "_glibc", lambda: libc)
    for name in (ENV_SWITCH, "GLIBC_TUNABLES", *allocator._USER_TUNING):
        monkeypatch.delenv(name, raising=False)
    return libc


def test_sets_on_entry_and_restores_mmap_use_on_exit(fake_libc: _RecordingLibc) -> None:
    with keep_freed_memory() as active:
        assert active is True
        assert fake_libc.calls == SET
    assert fake_libc.calls == SET + RESTORE


def test_nested_uses_set_and_restore_once(fake_libc: _RecordingLibc) -> None:
    with keep_freed_memory(), keep_freed_memory() as inner:
        assert inner is True
    with keep_freed_memory():
        with keep_freed_memory():
            pass
        assert fake_libc.calls == SET + RESTORE + SET  # the inner exit restored nothing
    assert fake_libc.calls == 2 * (SET + RESTORE)
    assert allocator._depth == 0


def test_restored_when_the_block_raises(fake_libc: _RecordingLibc) -> None:
    with pytest.raises(RuntimeError, match="boom"), keep_freed_memory():
        raise RuntimeError("boom")
    assert fake_libc.calls == SET + RESTORE
    assert allocator._depth == 0


@glibc_only
def test_freed_large_blocks_are_reused_without_page_faults() -> None:
    """The real glibc: while active, a new 64 MiB tensor reuses the last one's pages."""
    with keep_freed_memory() as active:
        inside = _faults_of_last_allocations()
    assert active is True
    assert inside < 0.01 * BIG * 4 / 4096  # without: up to one fault per 4 KiB page


@pytest.mark.parametrize(
    ("name", "value"),
    [
        (ENV_SWITCH, "0"),
        (ENV_SWITCH, "off"),
        ("MALLOC_TRIM_THRESHOLD_", "0"),
        ("GLIBC_TUNABLES", "glibc.malloc.mmap_max=0"),
    ],
)
def test_switched_off_by_the_environment(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with keep_freed_memory() as active:
        assert active is False
        assert allocator._depth == 0


def test_no_op_without_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    with keep_freed_memory() as active:
        assert active is False


def test_library_functions_leave_the_allocator_alone(fake_libc: _RecordingLibc) -> None:
    """The public functions do not touch glibc: only an explicit keep_freed_memory does."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    exactlr.hessian_spectral_norm(model, F.cross_entropy, [(x, y)], tol=1e-3)
    exactlr.estimate_smoothness(
        lambda: nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)),
        F.cross_entropy,
        [(x, y)],
        num_samples=2,
        tol=1e-3,
    )
    exactlr.suggest_lr(model, F.cross_entropy, [(x, y)], total_steps=10, num_samples=2)
    assert fake_libc.calls == []
    with keep_freed_memory():
        exactlr.hessian_spectral_norm(model, F.cross_entropy, [(x, y)], tol=1e-3)
    assert fake_libc.calls == SET + RESTORE


def test_results_are_the_same_inside_and_outside(monkeypatch: pytest.MonkeyPatch) -> None:
    assert list(inspect.signature(exactlr.hessian_spectral_norm).parameters)[:3] == [
        "model",
        "loss_fn",
        "batches",
    ]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 3)).double()
    x, y = torch.randn(300, 20, dtype=torch.float64), torch.randint(0, 3, (300,))
    kwargs = {"generator": torch.Generator().manual_seed(1), "tol": 1e-8}
    with keep_freed_memory():
        kept = exactlr.hessian_spectral_norm(model, F.cross_entropy, [(x, y)], **kwargs)
    kwargs["generator"] = torch.Generator().manual_seed(1)
    plain = exactlr.hessian_spectral_norm(model, F.cross_entropy, [(x, y)], **kwargs)
    assert kept.value == plain.value  # bitwise: only where the bytes live changes
    assert kept.num_hvps == plain.num_hvps


def test_a_bad_switch_value_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_SWITCH, "maybe")
    bad = pytest.raises(ValueError, match=r"EXACTLR_KEEP_FREED_MEMORY='maybe'.*1.*0")
    with bad, keep_freed_memory():
        pass
    assert allocator._depth == 0
