"""Datasets: MNIST and CIFAR-10 readers (standard on-disk layouts), subsets, a synthetic set.

The readers parse the standard files themselves (IDX for MNIST, python pickles for
CIFAR-10), so folders made by torchvision or the original distributions work as they are:

```
<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
<root>/cifar-10-batches-py/{data_batch_1..5,test_batch}
```

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
import gzip
import hashlib
import math
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

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

MNIST_FOLDER = Path("MNIST") / "raw"
CIFAR10_FOLDER = "cifar-10-batches-py"
_MNIST_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR10_TEST_FILES = ("test_batch",)

# Downloads. Only MD5 is published for the original archives, so that is what is checked.
_DOWNLOAD_TIMEOUT_S = 30.0
_MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
_CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"

_HOW_TO_GET = (
    "Set --data-dir or the EXACTLR_DATA environment variable to a folder holding "
    "'MNIST/raw/...' (IDX files, gzipped or not) or 'cifar-10-batches-py/', "
    "or pass download=True."
)

# IDX type codes (third byte of the magic number) -> numpy big-endian dtype.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


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


# --------------------------------------------------------------------------- locations


def resolve_data_dirs(data_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Candidate data roots, in search order.

    Args:
        data_dir: An explicit root. If given, it is the only candidate.

    Returns:
        `[data_dir]` if given, else `[$EXACTLR_DATA (if set), ./data, ~/.cache/exactlr/data]`.
    """
    if data_dir is not None:
        return [Path(data_dir).expanduser()]
    roots: list[Path] = []
    env = os.environ.get("EXACTLR_DATA")
    if env:
        roots.append(Path(env).expanduser())
    roots.append(Path.cwd() / "data")
    roots.append(Path.home() / ".cache" / "exactlr" / "data")
    return roots


def _not_found(what: str, searched: Sequence[Path], reason: str | None = None) -> FileNotFoundError:
    listing = "\n".join(f"  {p}" for p in searched)
    message = f"{what} not found. Searched:\n{listing}\n{_HOW_TO_GET}"
    if reason:
        message += f"\nDownload failed: {reason}"
    return FileNotFoundError(message)


def _stamp(path: Path) -> tuple[str, int, int]:
    # Cache key: a re-downloaded or replaced file gets a new entry.
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


# --------------------------------------------------------------------------- MNIST


def _find_mnist(roots: Sequence[Path], train: bool) -> tuple[Path, Path] | list[Path]:
    """The (images, labels) files in the first root holding both, else the paths searched."""
    searched: list[Path] = []
    for root in roots:
        found: list[Path] = []
        for stem in _MNIST_FILES[train]:
            candidates = [root / MNIST_FOLDER / stem, root / MNIST_FOLDER / f"{stem}.gz"]
            searched.extend(candidates)
            hit = next((c for c in candidates if c.is_file()), None)
            if hit is not None:
                found.append(hit)
        if len(found) == 2:
            return found[0], found[1]
    return searched


def _read_idx(path: Path) -> np.ndarray:
    """Parses an IDX file (optionally gzipped); ValueError if it is truncated or corrupt."""
    advice = f"the file {path} is corrupted or truncated; delete it and download it again"
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise ValueError(f"Could not read {path} ({exc}): {advice}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} does not start with an IDX magic number: {advice}")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise ValueError(f"{path} has a bad IDX header (ndim={ndim}): {advice}")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = math.prod(dims) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"{path} holds {len(raw) - header} payload bytes but its header {dims} says "
            f"{expected}: {advice}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


@functools.lru_cache(maxsize=8)
def _load_mnist_cached(
    images_key: tuple[str, int, int], labels_key: tuple[str, int, int], normalize: bool, name: str
) -> ArrayDataset:
    images_path, labels_path = Path(images_key[0]), Path(labels_key[0])
    images, labels = _read_idx(images_path), _read_idx(labels_path)
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
    targets = torch.from_numpy(labels.astype(np.int64))
    validate_labels(targets, 10)
    inputs = torch.from_numpy(images.copy()).to(torch.float32).div_(255.0).unsqueeze_(1)
    if normalize:
        inputs.sub_(MNIST_MEAN).div_(MNIST_STD)
    return ArrayDataset(inputs=inputs, targets=targets, num_classes=10, name=name)


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
    roots = resolve_data_dirs(data_dir)
    found = _find_mnist(roots, train)
    if isinstance(found, list) and download:
        try:
            _download_mnist(roots[0], train)
        except (OSError, ValueError) as exc:  # URLError, timeouts and checksums included
            raise _not_found("MNIST", found, reason=str(exc)) from exc
        found = _find_mnist(roots[:1], train)
    if isinstance(found, list):
        raise _not_found("MNIST", found)
    name = "mnist-train" if train else "mnist-test"
    return _load_mnist_cached(_stamp(found[0]), _stamp(found[1]), normalize, name)


# --------------------------------------------------------------------------- CIFAR-10


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR-10 batches hold (dicts, lists, numpy arrays): no code runs."""

    _ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        if module == "numpy._core.multiarray" and not hasattr(np, "_core"):
            module = "numpy.core.multiarray"  # pickled by numpy 2, read by numpy 1
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    advice = f"the file {path} is corrupted or truncated; delete it and download it again"
    try:
        with path.open("rb") as f:
            batch = _ArrayUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError) as exc:
        raise ValueError(f"Could not unpickle {path} ({exc}): {advice}") from exc
    except Exception as exc:  # a damaged pickle can fail in many ways
        raise ValueError(f"Could not unpickle {path} ({exc!r}): {advice}") from exc
    if not isinstance(batch, dict) or "data" not in batch or "labels" not in batch:
        raise ValueError(f"{path} is not a CIFAR-10 batch (no 'data'/'labels'): {advice}")
    data, labels = batch["data"], np.asarray(batch["labels"])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise ValueError(f"{path}: 'data' must be a uint8 N x 3072 array: {advice}")
    if data.shape[1] != 3 * 32 * 32 or labels.shape != (data.shape[0],):
        raise ValueError(
            f"{path}: 'data' has shape {data.shape} and 'labels' {labels.shape}, expected "
            f"(N, 3072) and (N,): {advice}"
        )
    return data, labels


def _find_cifar10(roots: Sequence[Path], train: bool) -> list[Path] | tuple[list[Path], list[Path]]:
    """The batch files in the first root holding all of them, else `([], paths searched)`."""
    names = _CIFAR10_TRAIN_FILES if train else _CIFAR10_TEST_FILES
    searched: list[Path] = []
    for root in roots:
        paths = [root / CIFAR10_FOLDER / n for n in names]
        searched.extend(paths)
        if all(p.is_file() for p in paths):
            return paths
    return [], searched


@functools.lru_cache(maxsize=8)
def _load_cifar10_cached(
    keys: tuple[tuple[str, int, int], ...], normalize: bool, name: str
) -> ArrayDataset:
    parts = [_read_cifar_batch(Path(k[0])) for k in keys]
    data = np.concatenate([d for d, _ in parts])
    targets = torch.from_numpy(np.concatenate([lab for _, lab in parts]).astype(np.int64))
    validate_labels(targets, 10)
    inputs = torch.from_numpy(data).reshape(-1, 3, 32, 32).to(torch.float32).div_(255.0)
    if normalize:
        mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
        inputs.sub_(mean).div_(std)
    return ArrayDataset(inputs=inputs, targets=targets, num_classes=10, name=name)


def load_cifar10(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    train: bool = True,
    download: bool = False,
    normalize: bool = True,
) -> ArrayDataset:
    """Loads CIFAR-10 from `<root>/cifar-10-batches-py/` (the python pickle batches).

    Results are cached per file and `normalize`; the returned tensors are shared with the
    cache, so do not modify them in place.

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
    roots = resolve_data_dirs(data_dir)
    found = _find_cifar10(roots, train)
    if isinstance(found, tuple) and download:
        try:
            _download_cifar10(roots[0])
        except (OSError, ValueError, tarfile.TarError) as exc:
            raise _not_found("CIFAR-10", found[1], reason=str(exc)) from exc
        found = _find_cifar10(roots[:1], train)
    if isinstance(found, tuple):
        raise _not_found("CIFAR-10", found[1])
    name = "cifar10-train" if train else "cifar10-test"
    return _load_cifar10_cached(tuple(_stamp(p) for p in found), normalize, name)


# --------------------------------------------------------------------------- downloads


def _fetch(url: str, dest: Path, md5: str) -> None:
    """Downloads `url` to `dest` atomically (temp file + os.replace) after an MD5 check."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        with (
            os.fdopen(fd, "wb") as out,
            urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response,
        ):
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != md5:
            raise ValueError(f"{url}: MD5 {digest.hexdigest()} does not match {md5}")
        os.replace(tmp_name, dest)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def _fetch_any(urls: Sequence[str], dest: Path, md5: str) -> None:
    errors = []
    for url in urls:
        try:
            _fetch(url, dest, md5)
            return
        except (OSError, ValueError) as exc:
            errors.append(f"{url}: {exc}")
    raise OSError("; ".join(errors))


def _download_mnist(root: Path, train: bool) -> None:
    for stem in _MNIST_FILES[train]:
        name = f"{stem}.gz"
        dest = root / MNIST_FOLDER / name
        if not dest.is_file():
            _fetch_any([m + name for m in _MNIST_MIRRORS], dest, _MNIST_MD5[name])


def _download_cifar10(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    archive = root / "cifar-10-python.tar.gz"
    if not archive.is_file():
        _fetch(_CIFAR10_URL, archive, _CIFAR10_MD5)
    staging = Path(tempfile.mkdtemp(prefix=".cifar-10-extract.", dir=root))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar.getmembers():
                parts = Path(member.name).parts
                # Only plain files directly inside cifar-10-batches-py/: no links, no escapes.
                if not member.isfile() or len(parts) != 2 or parts[0] != CIFAR10_FOLDER:
                    continue
                source = tar.extractfile(member)
                if source is None:
                    continue
                with source, (staging / parts[1]).open("wb") as out:
                    shutil.copyfileobj(source, out)
        final = root / CIFAR10_FOLDER
        final.mkdir(exist_ok=True)
        for path in staging.iterdir():
            os.replace(path, final / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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
