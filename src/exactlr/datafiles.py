"""Dataset files on disk: where they are looked for, how they are parsed and downloaded.

The standard layouts, so folders made by torchvision or the original distributions work
as they are:

```
<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
<root>/cifar-10-batches-py/{data_batch_1..5,test_batch}
```

IDX files (MNIST) and the python pickles of CIFAR-10 are parsed here into numpy arrays
(the pickles without executing code: only numpy arrays, lists and strings are
allowed); :mod:`exactlr.data` turns them into datasets.
"""

from __future__ import annotations

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
from pathlib import Path

import numpy as np

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


def not_found_error(
    what: str, searched: Sequence[Path], reason: str | None = None
) -> FileNotFoundError:
    listing = "\n".join(f"  {p}" for p in searched)
    message = f"{what} not found. Searched:\n{listing}\n{_HOW_TO_GET}"
    if reason:
        message += f"\nDownload failed: {reason}"
    return FileNotFoundError(message)


def file_stamp(path: Path) -> tuple[str, int, int]:
    """Cache key of a file: a re-downloaded or replaced file gets a new entry."""
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


# --------------------------------------------------------------------------- MNIST


def find_mnist(roots: Sequence[Path], train: bool) -> tuple[list[Path], list[Path]]:
    """``([images, labels], searched)``: the first root holding both, else ``([], searched)``."""
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
            return found, searched
    return [], searched


def read_idx(path: Path) -> np.ndarray:
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


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
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
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: labels must be integers, got {labels.dtype}: {advice}")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise ValueError(f"{path}: 'data' must be a uint8 N x 3072 array: {advice}")
    if data.shape[1] != 3 * 32 * 32 or labels.shape != (data.shape[0],):
        raise ValueError(
            f"{path}: 'data' has shape {data.shape} and 'labels' {labels.shape}, expected "
            f"(N, 3072) and (N,): {advice}"
        )
    return data, labels


def find_cifar10(roots: Sequence[Path], train: bool) -> tuple[list[Path], list[Path]]:
    """``(batch files, searched)`` from the first root holding all, else ``([], searched)``."""
    names = _CIFAR10_TRAIN_FILES if train else _CIFAR10_TEST_FILES
    searched: list[Path] = []
    for root in roots:
        paths = [root / CIFAR10_FOLDER / n for n in names]
        searched.extend(paths)
        if all(p.is_file() for p in paths):
            return paths, searched
    return [], searched


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


def download_mnist(root: Path, train: bool) -> None:
    for stem in _MNIST_FILES[train]:
        name = f"{stem}.gz"
        dest = root / MNIST_FOLDER / name
        if not dest.is_file():
            _fetch_any([m + name for m in _MNIST_MIRRORS], dest, _MNIST_MD5[name])


def download_cifar10(root: Path) -> None:
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
