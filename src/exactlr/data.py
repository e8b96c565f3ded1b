"""Datasets: MNIST and CIFAR-10 readers (standard on-disk layouts), subsets, a synthetic set.

The files themselves (standard layouts, locations, parsing, downloads) are handled by
:mod:`exactlr.datafiles`; this module turns them into datasets (normalised tensors,
cached per file), subsets of them, and batches.

Everything is returned as an `ArrayDataset` of in-memory tensors; `make_batches` turns one
into the list of `(inputs, targets)` pairs that the rest of the library consumes.

Example:
    >>> train, test = load_dataset("synthetic")
    >>> batches = make_batches(train, 500)
    >>> len(batches), batches[0][0].shape
    (4, torch.Size([500, 1, 28, 28]))
"""

from __future__ import annotations

import functools
import math
import os
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from exactlr.datafiles import (
    download_cifar10,
    download_mnist,
    file_stamp,
    find_cifar10,
    find_mnist,
    not_found_error,
    read_cifar_batch,
    read_idx,
    resolve_data_dirs,
)

__all__ = [
    "DATASETS",
    "ArrayDataset",
    "load_cifar10",
    "load_dataset",
    "load_mnist",
    "make_batches",
    "mini_subset",
    "resolve_data_dirs",
    "synthetic_classification",
    "validate_labels",
]

#: Dataset name -> (channels, height, width, num_classes).
DATASETS: dict[str, tuple[int, int, int, int]] = {
    "mnist": (1, 28, 28, 10),
    "cifar10": (3, 32, 32, 10),
    "synthetic": (1, 28, 28, 10),
}

SUBSETS: tuple[str, ...] = ("full", "mini")

# Normalisation used by the paper's code (PAPER.md section 4).
MNIST_MEAN, MNIST_STD = 0.5, 0.5
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True, eq=False)
class ArrayDataset:
    """An in-memory classification dataset.

    Datasets returned by the loaders may share their tensors with a process-wide cache:
    treat `inputs` and `targets` as read-only (never modify them in place; `.clone()` first).

    Attributes:
        inputs: Float tensor `[N, ...]`, e.g. `[N, 1, 28, 28]`.
        targets: int64 tensor `[N]` of class indices in `[0, num_classes)`.
        num_classes: Number of classes.
        name: Human-readable name, e.g. `"mnist-train"`.
    """

    inputs: Tensor
    targets: Tensor
    num_classes: int
    name: str

    def __post_init__(self) -> None:
        if self.inputs.shape[:1] != self.targets.shape or self.targets.dim() != 1:
            raise ValueError(
                f"inputs ({tuple(self.inputs.shape)}) and targets ({tuple(self.targets.shape)}) "
                f"of dataset {self.name!r} must have the same first dimension, targets 1-D"
            )
        if self.targets.dtype != torch.int64:
            raise ValueError(f"targets of {self.name!r} must be int64, got {self.targets.dtype}")
        if self.num_classes <= 0:
            raise ValueError(f"num_classes={self.num_classes} must be positive")

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> ArrayDataset:
        """Returns a copy on `device`; `dtype` (if given) applies to the inputs only."""
        return ArrayDataset(
            inputs=self.inputs.to(device=device, dtype=dtype),
            targets=self.targets.to(device=device),
            num_classes=self.num_classes,
            name=self.name,
        )


# --------------------------------------------------------------------------- files


def _locate(
    what: str,
    data_dir: str | os.PathLike[str] | None,
    find: Callable[[Sequence[Path]], tuple[list[Path], list[Path]]],
    fetch: Callable[[Path], None] | None,
) -> list[Path]:
    """The files of dataset ``what``: found in a candidate root, or downloaded into the first.

    Args:
        what: The dataset's name in messages (``"MNIST"``).
        data_dir: Data root; see `resolve_data_dirs` for the default search order.
        find: ``find(roots) -> (files, searched)``, ``files`` empty when they are missing.
        fetch: ``fetch(root)`` downloads the files into ``root``; None: no download.

    Raises:
        FileNotFoundError: Not found (nor downloaded); the message lists every path searched.
    """
    roots = resolve_data_dirs(data_dir)
    files, searched = find(roots)
    if not files and fetch is not None:
        try:
            fetch(roots[0])
        except (OSError, ValueError, tarfile.TarError) as exc:  # URLError, timeouts, checksums
            raise not_found_error(what, searched, reason=str(exc)) from exc
        files, searched = find(roots[:1])
    if not files:
        raise not_found_error(what, searched)
    return files


def _image_dataset(
    pixels: Tensor,
    labels: np.ndarray,
    stats: tuple[Sequence[float], Sequence[float]] | None,
    name: str,
) -> ArrayDataset:
    """Ten-class images from uint8 ``pixels [N, C, H, W]`` and their ``labels``.

    Pixels map to ``x = p / 255`` in [0, 1], then, with ``stats = (mean, std)`` (one
    value per channel), to ``(x - mean_c) / std_c``.

    Raises:
        ValueError: A label is outside ``0..9``.
    """
    targets = torch.from_numpy(labels.astype(np.int64))
    validate_labels(targets, 10)
    inputs = pixels.to(torch.float32).div_(255.0)
    if stats is not None:
        mean, std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in stats)
        inputs.sub_(mean).div_(std)
    return ArrayDataset(inputs=inputs, targets=targets, num_classes=10, name=name)


# --------------------------------------------------------------------------- MNIST


@functools.lru_cache(maxsize=8)
def _load_mnist_cached(
    images_key: tuple[str, int, int], labels_key: tuple[str, int, int], normalize: bool, name: str
) -> ArrayDataset:
    images_path, labels_path = Path(images_key[0]), Path(labels_key[0])
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise ValueError(
            f"{images_path} holds {images.dtype} of shape {images.shape}, expected uint8 "
            "[N, 28, 28]; delete it and download it again"
        )
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{labels_path} holds labels of shape {labels.shape} for {images.shape[0]} images "
            f"in {images_path}; delete both and download them again"
        )
    pixels = torch.from_numpy(images.copy()).unsqueeze_(1)
    stats = ((MNIST_MEAN,), (MNIST_STD,)) if normalize else None
    return _image_dataset(pixels, labels, stats, name)


def load_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    train: bool = True,
    download: bool = False,
    normalize: bool = True,
) -> ArrayDataset:
    """Loads MNIST from `<root>/MNIST/raw/` (IDX files, gzipped or not).

    Results are cached per file and `normalize`; the returned tensors are shared with the
    cache, so do not modify them in place.

    Args:
        data_dir: Data root; see `resolve_data_dirs` for the default search order.
        train: The 60,000 training images if True, else the 10,000 test images.
        download: Download into the first candidate root if the files are missing.
        normalize: Map pixels from [0, 1] with mean 0.5, std 0.5 (the paper's code) if
            True; return raw [0, 1] pixels if False.

    Returns:
        An `ArrayDataset` with float32 inputs `[N, 1, 28, 28]` and int64 targets.

    Raises:
        FileNotFoundError: The files are in none of the candidate roots (and could not be
            downloaded); the message lists every path searched.
        ValueError: A file is truncated or corrupted.
    """
    fetch = functools.partial(download_mnist, train=train) if download else None
    images, labels = _locate("MNIST", data_dir, lambda roots: find_mnist(roots, train), fetch)
    name = "mnist-train" if train else "mnist-test"
    return _load_mnist_cached(file_stamp(images), file_stamp(labels), normalize, name)


# --------------------------------------------------------------------------- CIFAR-10


@functools.lru_cache(maxsize=8)
def _load_cifar10_cached(
    keys: tuple[tuple[str, int, int], ...], normalize: bool, name: str
) -> ArrayDataset:
    parts = [read_cifar_batch(Path(k[0])) for k in keys]
    data = np.concatenate([d for d, _ in parts])
    pixels = torch.from_numpy(data).reshape(-1, 3, 32, 32)
    labels = np.concatenate([lab for _, lab in parts])
    stats = (CIFAR10_MEAN, CIFAR10_STD) if normalize else None
    return _image_dataset(pixels, labels, stats, name)


def load_cifar10(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    train: bool = True,
    download: bool = False,
    normalize: bool = True,
) -> ArrayDataset:
    """Loads CIFAR-10 from `<root>/cifar-10-batches-py/` (the python pickle batches).

    Cached like `load_mnist`, per batch file and `normalize`: the returned tensors are
    the cache's own, so do not modify them in place.

    Args:
        data_dir: Data root; see `resolve_data_dirs` for the default search order.
        train: The 50,000 training images (`data_batch_1..5`) if True, else `test_batch`.
        download: Download into the first candidate root if the files are missing.
        normalize: Normalise each channel with the paper's mean (0.4914, 0.4822, 0.4465)
            and std (0.2470, 0.2435, 0.2616) if True; raw [0, 1] pixels if False.

    Returns:
        An `ArrayDataset` with float32 inputs `[N, 3, 32, 32]` and int64 targets.

    Raises:
        FileNotFoundError: The files are in none of the candidate roots (and could not be
            downloaded); the message lists every path searched.
        ValueError: A batch file is corrupted or has the wrong shape.
    """
    fetch = download_cifar10 if download else None
    files = _locate("CIFAR-10", data_dir, lambda roots: find_cifar10(roots, train), fetch)
    name = "cifar10-train" if train else "cifar10-test"
    return _load_cifar10_cached(tuple(file_stamp(p) for p in files), normalize, name)


# --------------------------------------------------------------------------- subsets


def mini_subset(
    dataset: ArrayDataset,
    *,
    per_class: int | None = None,
    total: int | None = None,
    seed: int = 0,
) -> ArrayDataset:
    """A reproducible random subset, drawn with a local generator (global RNG untouched).

    Exactly one of `per_class` and `total` must be given. The chosen samples keep their
    original order.

    Args:
        dataset: The dataset to draw from.
        per_class: Draw this many samples of every class (stratified).
        total: Draw this many samples uniformly at random without replacement.
        seed: Seed of the draw.

    Returns:
        A new `ArrayDataset` (copied tensors).

    Raises:
        ValueError: Neither or both sizes given, a size <= 0, or more samples requested
            than available (overall or in some class).
    """
    if (per_class is None) == (total is None):
        raise ValueError(f"give exactly one of per_class and total, got {per_class=}, {total=}")
    generator = torch.Generator().manual_seed(seed)
    targets = dataset.targets.cpu()
    if per_class is not None:
        if per_class <= 0:
            raise ValueError(f"per_class={per_class} must be positive")
        chosen = []
        for c in range(dataset.num_classes):
            members = torch.nonzero(targets == c).flatten()
            if per_class > members.numel():
                raise ValueError(
                    f"per_class={per_class} is larger than the {members.numel()} samples of "
                    f"class {c} in {dataset.name!r}"
                )
            chosen.append(members[torch.randperm(members.numel(), generator=generator)[:per_class]])
        index = torch.cat(chosen)
        label = f"{per_class}-per-class"
    else:
        assert total is not None
        if not 0 < total <= len(dataset):
            raise ValueError(
                f"total={total} must be in [1, {len(dataset)}] (the size of {dataset.name!r})"
            )
        index = torch.randperm(len(dataset), generator=generator)[:total]
        label = f"{total}"
    index = index.sort().values.to(dataset.targets.device)
    return ArrayDataset(
        inputs=dataset.inputs[index],
        targets=dataset.targets[index],
        num_classes=dataset.num_classes,
        name=f"{dataset.name}[{label},seed={seed}]",
    )


def load_dataset(
    name: str,
    *,
    subset: str = "full",
    data_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    download: bool = False,
) -> tuple[ArrayDataset, ArrayDataset]:
    """Loads a dataset by name as `(train, test)`, normalised as in the paper's code.

    Subsets (PAPER.md section 3): mini-MNIST is 5,500 train + 1,000 test images drawn
    uniformly; mini-CIFAR-10 is 500 train + 100 test images per class. For "synthetic"
    `subset` is ignored and `seed` seeds the generator.

    Args:
        name: "mnist", "cifar10" or "synthetic".
        subset: "full" or "mini".
        data_dir: Data root; see `resolve_data_dirs`.
        seed: Seed of the mini-subset draw (or of the synthetic set).
        download: Passed to the reader.

    Returns:
        `(train, test)`.

    Raises:
        ValueError: Unknown `name` or `subset`.
        FileNotFoundError: The data files are missing.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset name={name!r}; valid names: {sorted(DATASETS)}")
    if name == "synthetic":
        return synthetic_classification(seed=seed)
    if subset not in SUBSETS:
        raise ValueError(f"unknown subset={subset!r}; valid subsets: {list(SUBSETS)}")
    if name == "mnist":
        train = load_mnist(data_dir, train=True, download=download)
        test = load_mnist(data_dir, train=False, download=download)
        if subset == "mini":
            train = mini_subset(train, total=5500, seed=seed)
            test = mini_subset(test, total=1000, seed=seed)
        return train, test
    train = load_cifar10(data_dir, train=True, download=download)
    test = load_cifar10(data_dir, train=False, download=download)
    if subset == "mini":
        train = mini_subset(train, per_class=500, seed=seed)
        test = mini_subset(test, per_class=100, seed=seed)
    return train, test


def synthetic_classification(
    *,
    num_train: int = 2000,
    num_test: int = 500,
    num_features: int = 784,
    num_classes: int = 10,
    seed: int = 0,
    image_shape: tuple[int, ...] | None = (1, 28, 28),
) -> tuple[ArrayDataset, ArrayDataset]:
    """A learnable, not trivially separable, MNIST-shaped classification set (no files).

    Each class is a mixture of two Gaussian clusters in a 16-dimensional latent space
    (overlapping, so no model reaches 100%); latents are mapped to `num_features` features
    by a fixed random linear map followed by `tanh`. Deterministic from `seed` (local
    generator; the global RNG is untouched). Train and test come from the same distribution.

    Args:
        num_train: Training samples.
        num_test: Test samples.
        num_features: Features per sample.
        num_classes: Classes (balanced up to rounding).
        seed: Seed of everything random.
        image_shape: Shape of one sample (product must equal `num_features`), or None for
            flat `[N, num_features]` inputs.

    Returns:
        `(train, test)` with float32 inputs `[N, *image_shape]` and int64 targets.

    Raises:
        ValueError: A size is not positive, or `image_shape` does not match `num_features`.
    """
    for label, value in (
        ("num_train", num_train),
        ("num_test", num_test),
        ("num_features", num_features),
        ("num_classes", num_classes),
    ):
        if value <= 0:
            raise ValueError(f"{label}={value} must be positive")
    if image_shape is not None and math.prod(image_shape) != num_features:
        raise ValueError(
            f"image_shape={image_shape} has {math.prod(image_shape)} elements, "
            f"not num_features={num_features}"
        )
    generator = torch.Generator().manual_seed(seed)
    latent_dim, clusters_per_class = 16, 2
    means = 1.5 * torch.randn(num_classes, clusters_per_class, latent_dim, generator=generator)
    mixing = torch.randn(latent_dim, num_features, generator=generator) / math.sqrt(latent_dim)
    offset = 0.1 * torch.randn(num_features, generator=generator)

    n = num_train + num_test
    targets = torch.arange(n) % num_classes
    targets = targets[torch.randperm(n, generator=generator)]
    cluster = torch.randint(clusters_per_class, (n,), generator=generator)
    latent = means[targets, cluster] + torch.randn(n, latent_dim, generator=generator)
    inputs = torch.tanh(latent @ mixing + offset)
    inputs = inputs + 0.1 * torch.randn(n, num_features, generator=generator)
    shape = (num_features,) if image_shape is None else tuple(image_shape)
    inputs = inputs.reshape(n, *shape).contiguous()

    def part(lo: int, hi: int, split: str) -> ArrayDataset:
        return ArrayDataset(
            inputs=inputs[lo:hi].clone(),
            targets=targets[lo:hi].clone(),
            num_classes=num_classes,
            name=f"synthetic-{split}",
        )

    return part(0, num_train, "train"), part(num_train, n, "test")


# --------------------------------------------------------------------------- batches


def make_batches(
    dataset: ArrayDataset,
    batch_size: int | None,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> list[tuple[Tensor, Tensor]]:
    """Splits a dataset into `(inputs, targets)` batches.

    Without shuffling the batches are views of the dataset's tensors (no copy).

    Args:
        dataset: The dataset.
        batch_size: Samples per batch; None for one full batch.
        shuffle: Permute the samples first (with `generator`; copies the data).
        generator: Generator for the permutation; None uses the global RNG.
        drop_last: Drop a last batch smaller than `batch_size`.

    Returns:
        The list of batches; the last one may be smaller unless `drop_last`.

    Raises:
        ValueError: `batch_size` is not positive or is larger than the dataset.
    """
    n = len(dataset)
    if n == 0:
        raise ValueError(f"dataset {dataset.name!r} is empty")
    if batch_size is None:
        batch_size = n
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be positive (or None for full batch)")
    if batch_size > n:
        raise ValueError(
            f"batch_size={batch_size} is larger than the dataset ({n} samples); use "
            f"batch_size<={n} or None for full batch"
        )
    inputs, targets = dataset.inputs, dataset.targets
    if shuffle:
        perm = torch.randperm(n, generator=generator)
        perm = perm.to(inputs.device)
        inputs, targets = inputs[perm], targets[perm]
    stop = n - n % batch_size if drop_last else n
    return [
        (inputs[lo : min(lo + batch_size, stop)], targets[lo : min(lo + batch_size, stop)])
        for lo in range(0, stop, batch_size)
    ]


def validate_labels(targets: Tensor | np.ndarray | Sequence[int], num_classes: int) -> None:
    """Checks that every label is an integer in `[0, num_classes)`.

    Args:
        targets: Labels.
        num_classes: Number of classes.

    Raises:
        ValueError: A label is outside the range (the message names it and its index),
            or the labels are not integers.
    """
    t = torch.as_tensor(targets)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"labels must be integers, got dtype {t.dtype}")
    t = t.flatten()
    bad = torch.nonzero((t < 0) | (t >= num_classes)).flatten()
    if bad.numel() > 0:
        i = int(bad[0])
        raise ValueError(
            f"label {int(t[i])} at index {i} is outside the valid range [0, {num_classes}) "
            f"({bad.numel()} invalid labels in all)"
        )
