"""Shared test fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

_SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The offline dataset copies (`MNIST/raw`, `cifar-10-batches-py`), see shared/data/README."""
    candidates = [_SHARED_DATA]
    if os.environ.get("EXACTLR_DATA"):
        candidates.append(Path(os.environ["EXACTLR_DATA"]))
    for path in candidates:
        if path.is_dir():
            return path
    pytest.skip(f"offline data folder not found (looked in {candidates}); set EXACTLR_DATA")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tests use tiny problems: extra threads only add overhead (and thrash on a busy
    2-core machine, where OpenMP spin-waiting made 3-epoch runs 20-100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_data(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """No data folder given and none found ($EXACTLR_DATA unset, no ./data): smoke-scale
    figures run on the synthetic set (with ``data_dir=None``)."""
    monkeypatch.delenv("EXACTLR_DATA", raising=False)
    monkeypatch.chdir(tmp_path_factory.mktemp("no_data"))
