"""Tests for exactlr.data: readers on the offline copies, subsets, batches, synthetic set."""

from __future__ import annotations

import gzip
import pickle
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from exactlr import data
from exactlr.data import (
    DATASETS,
    ArrayDataset,
    load_cifar10,
    load_dataset,
    load_mnist,
    make_batches,
    mini_subset,
    resolve_data_dirs,
    synthetic_classification,
    validate_labels,
)


def _toy(n: int = 10, num_classes: int = 3) -> ArrayDataset:
    return ArrayDataset(
        inputs=torch.arange(n * 2, dtype=torch.float32).reshape(n, 2),
        targets=torch.arange(n) % num_classes,
        num_classes=num_classes,
        name="toy",
    )


# --------------------------------------------------------------------------- MNIST


def test_mnist_raw_pixels_match_published_statistics(shared_data: Path) -> None:
    train = load_mnist(shared_data, train=True, normalize=False)
    test = load_mnist(shared_data, train=False, normalize=False)
    assert train.inputs.shape == (60000, 1, 28, 28)
    assert test.inputs.shape == (10000, 1, 28, 28)
    assert train.inputs.dtype == torch.float32 and train.targets.dtype == torch.int64
    pixels = train.inputs.double()
    assert pixels.min() == 0.0 and pixels.max() == 1.0
    assert pixels.mean().item() == pytest.approx(0.1307, abs=1e-4)
    assert pixels.std().item() == pytest.approx(0.3081, abs=1e-4)
    assert train.targets[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert train.num_classes == 10
    assert torch.bincount(test.targets).sum() == 10000


def test_mnist_normalised_and_cached(shared_data: Path) -> None:
    train = load_mnist(shared_data, train=True)
    assert train.inputs.double().mean().item() == pytest.approx((0.1307 - 0.5) / 0.5, abs=2e-4)
    assert train.inputs.min() == -1.0 and train.inputs.max() == 1.0
    again = load_mnist(shared_data, train=True)
    assert again.inputs is train.inputs  # served from the cache


def test_mnist_reads_uncompressed_files(shared_data: Path, tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for stem in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(shared_data / "MNIST" / "raw" / f"{stem}.gz", "rb") as f:
            (raw / stem).write_bytes(f.read())
    plain = load_mnist(tmp_path, train=False, normalize=False)
    packed = load_mnist(shared_data, train=False, normalize=False)
    assert torch.equal(plain.inputs, packed.inputs)
    assert torch.equal(plain.targets, packed.targets)


def test_truncated_mnist_file_names_it(shared_data: Path, tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    labels = "t10k-labels-idx1-ubyte.gz"
    shutil.copy(shared_data / "MNIST" / "raw" / labels, raw / labels)
    images = raw / "t10k-images-idx3-ubyte.gz"
    full = (shared_data / "MNIST" / "raw" / images.name).read_bytes()
    images.write_bytes(full[: len(full) // 2])
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte\.gz.*download"):
        load_mnist(tmp_path, train=False)


def test_short_idx_payload_is_rejected(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    header = np.array([0x00000803, 3, 28, 28], dtype=">u4").tobytes()
    with gzip.open(raw / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(header + bytes(28 * 28 * 2))  # header says 3 images, 2 present
    with gzip.open(raw / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(np.array([0x00000801, 3], dtype=">u4").tobytes() + bytes([1, 2, 3]))
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte\.gz holds 1568 payload"):
        load_mnist(tmp_path, train=False)


def test_missing_data_lists_searched_paths(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        load_mnist(missing)
    message = str(info.value)
    assert str(missing / "MNIST" / "raw" / "train-images-idx3-ubyte.gz") in message
    assert str(missing / "MNIST" / "raw" / "train-labels-idx1-ubyte") in message
    assert "EXACTLR_DATA" in message and "download=True" in message
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        load_cifar10(missing)


def test_failed_download_is_clean(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(url: str, timeout: float) -> None:
        raise urllib.error.URLError("network is closed")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(FileNotFoundError, match="network is closed"):
        load_mnist(tmp_path, download=True)
    with pytest.raises(FileNotFoundError, match="network is closed"):
        load_cifar10(tmp_path, download=True)
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert leftovers == []


def test_resolve_data_dirs_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_data_dirs(tmp_path) == [tmp_path]
    monkeypatch.setenv("EXACTLR_DATA", str(tmp_path))
    roots = resolve_data_dirs()
    assert roots[0] == tmp_path and roots[1] == Path.cwd() / "data"
    assert roots[2] == Path.home() / ".cache" / "exactlr" / "data"
    monkeypatch.delenv("EXACTLR_DATA")
    assert resolve_data_dirs()[0] == Path.cwd() / "data"


# --------------------------------------------------------------------------- CIFAR-10


def test_cifar10_shapes_and_classes(shared_data: Path) -> None:
    train = load_cifar10(shared_data, train=True)
    test = load_cifar10(shared_data, train=False)
    assert train.inputs.shape == (50000, 3, 32, 32)
    assert test.inputs.shape == (10000, 3, 32, 32)
    assert torch.bincount(test.targets, minlength=10).tolist() == [1000] * 10
    # Normalised per channel with the dataset's own statistics: close to mean 0, std 1.
    assert train.inputs.mean(dim=(0, 2, 3)).abs().max() < 0.01
    assert (train.inputs.std(dim=(0, 2, 3)) - 1).abs().max() < 0.02


def test_corrupted_cifar_pickle_names_file(shared_data: Path, tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    full = (shared_data / "cifar-10-batches-py" / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(full[:1000])
    with pytest.raises(ValueError, match=r"test_batch.*download"):
        load_cifar10(tmp_path, train=False)


def test_cifar_pickle_with_code_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps({"data": Path("x"), "labels": []}))
    with pytest.raises(ValueError, match="not allowed"):
        load_cifar10(tmp_path, train=False)


# --------------------------------------------------------------------------- subsets


def test_mini_mnist_sizes_and_reproducibility(shared_data: Path) -> None:
    state = torch.get_rng_state()
    train, test = load_dataset("mnist", subset="mini", data_dir=shared_data, seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert len(train) == 5500 and len(test) == 1000
    again, _ = load_dataset("mnist", subset="mini", data_dir=shared_data, seed=0)
    other, _ = load_dataset("mnist", subset="mini", data_dir=shared_data, seed=1)
    assert torch.equal(train.inputs, again.inputs) and torch.equal(train.targets, again.targets)
    assert not torch.equal(train.targets, other.targets)
    full, _ = load_dataset("mnist", data_dir=shared_data)
    assert len(full) == 60000


def test_mini_cifar_is_stratified(shared_data: Path) -> None:
    train, test = load_dataset("cifar10", subset="mini", data_dir=shared_data, seed=3)
    assert torch.bincount(train.targets, minlength=10).tolist() == [500] * 10
    assert torch.bincount(test.targets, minlength=10).tolist() == [100] * 10
    assert train.inputs.shape == (5000, 3, 32, 32)


def test_mini_subset_rules() -> None:
    ds = _toy(30, 3)
    state = torch.get_rng_state()
    a = mini_subset(ds, per_class=4, seed=7)
    b = mini_subset(ds, per_class=4, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.bincount(a.targets).tolist() == [4, 4, 4]
    assert torch.equal(a.inputs, b.inputs)
    assert any(
        not torch.equal(a.inputs, mini_subset(ds, per_class=4, seed=s).inputs) for s in (8, 9)
    )
    # The chosen rows are real rows of the dataset, in their original order.
    rows = (a.inputs[:, 0] / 2).long()
    assert torch.equal(ds.targets[rows], a.targets) and bool((rows.diff() > 0).all())
    assert len(mini_subset(ds, total=30)) == 30
    with pytest.raises(ValueError, match="per_class=11"):
        mini_subset(ds, per_class=11)
    with pytest.raises(ValueError, match="total=31"):
        mini_subset(ds, total=31)
    with pytest.raises(ValueError, match="exactly one"):
        mini_subset(ds, per_class=1, total=1)
    with pytest.raises(ValueError, match="exactly one"):
        mini_subset(ds)


def test_load_dataset_errors() -> None:
    with pytest.raises(ValueError, match=r"name='imagenet'.*cifar10.*mnist.*synthetic"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match=r"subset='tiny'.*full.*mini"):
        load_dataset("mnist", subset="tiny")
    assert set(DATASETS) == {"mnist", "cifar10", "synthetic"}
    assert DATASETS["cifar10"] == (3, 32, 32, 10)


# --------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_and_shaped() -> None:
    state = torch.get_rng_state()
    train, test = synthetic_classification(seed=0)
    assert torch.equal(torch.get_rng_state(), state)
    assert train.inputs.shape == (2000, 1, 28, 28) and test.inputs.shape == (500, 1, 28, 28)
    assert train.inputs.dtype == torch.float32 and train.targets.dtype == torch.int64
    again, _ = synthetic_classification(seed=0)
    other, _ = synthetic_classification(seed=1)
    assert torch.equal(train.inputs, again.inputs) and torch.equal(train.targets, again.targets)
    assert not torch.equal(train.inputs, other.inputs)
    counts = torch.bincount(train.targets, minlength=10)
    assert counts.min() > 150  # roughly balanced
    flat, _ = synthetic_classification(
        num_train=50, num_test=10, num_features=20, num_classes=3, image_shape=None
    )
    assert flat.inputs.shape == (50, 20) and int(flat.targets.max()) < 3
    with pytest.raises(ValueError, match="image_shape"):
        synthetic_classification(num_features=100)
    mini, _ = load_dataset("synthetic", subset="mini")
    assert torch.equal(mini.inputs, train.inputs)  # subset is ignored for "synthetic"


def test_synthetic_is_learnable_but_not_linearly_trivial() -> None:
    train, test = synthetic_classification(seed=0)
    # Least-squares linear classifier on one-hot targets: well above chance, below 100%.
    x = torch.cat([train.inputs.flatten(1), torch.ones(len(train), 1)], dim=1).double()
    y = torch.nn.functional.one_hot(train.targets, 10).double()
    w = torch.linalg.lstsq(x, y).solution
    xt = torch.cat([test.inputs.flatten(1), torch.ones(len(test), 1)], dim=1).double()
    accuracy = ((xt @ w).argmax(1) == test.targets).double().mean().item()
    assert 0.5 < accuracy < 0.99


# --------------------------------------------------------------------------- batches


def test_make_batches_sizes_views_and_errors() -> None:
    ds = _toy(10)
    batches = make_batches(ds, 4)
    assert [len(y) for _, y in batches] == [4, 4, 2]
    assert batches[0][0].data_ptr() == ds.inputs.data_ptr()  # a view, not a copy
    assert torch.equal(torch.cat([x for x, _ in batches]), ds.inputs)
    assert [len(y) for _, y in make_batches(ds, 4, drop_last=True)] == [4, 4]
    (whole,) = make_batches(ds, None)
    assert whole[0].shape == (10, 2)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    s1 = make_batches(ds, 3, shuffle=True, generator=g1)
    s2 = make_batches(ds, 3, shuffle=True, generator=g2)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(s1, s2, strict=True))
    assert sorted(torch.cat([y for _, y in s1]).tolist()) == sorted(ds.targets.tolist())
    with pytest.raises(ValueError, match=r"batch_size=11 is larger than the dataset \(10"):
        make_batches(ds, 11)
    with pytest.raises(ValueError, match="batch_size=0"):
        make_batches(ds, 0)


def test_validate_labels_and_dataset_checks() -> None:
    validate_labels(torch.tensor([0, 1, 2]), 3)
    with pytest.raises(ValueError, match=r"label 3 at index 1 .*\[0, 3\)"):
        validate_labels(torch.tensor([0, 3, 1]), 3)
    with pytest.raises(ValueError, match="label -1"):
        validate_labels([-1], 3)
    with pytest.raises(ValueError, match="first dimension"):
        ArrayDataset(torch.zeros(3, 2), torch.zeros(4, dtype=torch.int64), 2, "bad")
    moved = _toy().to("cpu", dtype=torch.float64)
    assert moved.inputs.dtype == torch.float64 and moved.targets.dtype == torch.int64
    assert len(moved) == 10


def test_module_exports() -> None:
    assert set(data.__all__) >= {"load_mnist", "load_cifar10", "mini_subset", "make_batches"}
