"""What produced a result: hashes of weights and data, the code version.

A result or cache entry that records these can be checked against the plan that asks
for it; a file made from other weights, other data or another version does not count.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from exactlr._version import __version__
from exactlr.data import ArrayDataset

__all__ = [
    "DataIdentity",
    "code_version",
    "dataset_sha256",
    "provenance",
    "provenance_mismatch",
    "state_dict_sha256",
    "tensor_digest",
]


def tensor_digest(digest: Any, tensor: torch.Tensor) -> None:
    """Feeds ``tensor``'s dtype, shape and CPU bytes into a hashlib ``digest``."""
    tensor = tensor.detach().to("cpu").contiguous()
    digest.update(f"{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    if tensor.numel():
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())


def state_dict_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over a state_dict's names, dtypes, shapes and values (CPU bytes)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(f"{key}|".encode())
        tensor_digest(digest, state[key])
    return digest.hexdigest()


def dataset_sha256(dataset: ArrayDataset) -> str:
    """SHA-256 of a dataset's samples as trained on: inputs and labels, in order.

    It identifies the data files' content and the subset's indices together: two sets
    drawn from other files, or other samples of the same files, hash differently.
    """
    digest = hashlib.sha256(f"{dataset.num_classes}|".encode())
    tensor_digest(digest, dataset.inputs)
    tensor_digest(digest, dataset.targets)
    return digest.hexdigest()


@functools.cache
def code_version() -> dict[str, Any]:
    """The code that produced a result: exactlr's version and, in a git checkout, the
    commit (None elsewhere)."""
    commit = None
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        if out.returncode == 0:
            commit = out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"exactlr": __version__, "git_commit": commit}


@dataclass(frozen=True)
class DataIdentity:
    """What a run's data were: the named set, where it came from, and its hashes.

    Attributes:
        dataset: Dataset name as trained on (``"synthetic"`` for the embedded set).
        subset: ``"mini"`` or ``"full"``.
        num_train: Training samples trained on (after the ``num_train`` cap).
        num_test: Test samples evaluated on.
        train_sha256: :func:`dataset_sha256` of the training samples.
        test_sha256: :func:`dataset_sha256` of the test samples.
        synthetic_fallback: True when the figure asks for real data but none was found,
            so the synthetic set stands in (smoke scale only).
    """

    dataset: str
    subset: str
    num_train: int
    num_test: int
    train_sha256: str
    test_sha256: str
    synthetic_fallback: bool = False

    @classmethod
    def of(
        cls,
        train: ArrayDataset,
        test: ArrayDataset,
        *,
        dataset: str,
        subset: str,
        synthetic_fallback: bool = False,
    ) -> DataIdentity:
        """The identity of ``train`` / ``test`` (hashes computed here)."""
        return cls(
            dataset=dataset,
            subset=subset,
            num_train=len(train),
            num_test=len(test),
            train_sha256=dataset_sha256(train),
            test_sha256=dataset_sha256(test),
            synthetic_fallback=synthetic_fallback,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form."""
        return dataclasses.asdict(self)


def provenance(data: DataIdentity, w0_sha256: str) -> dict[str, Any]:
    """The provenance record of a result or cache entry: data identity, w0, code."""
    return {"data": data.to_dict(), "w0_sha256": w0_sha256, "code": code_version()}


def provenance_mismatch(recorded: Any, expected: dict[str, Any]) -> str | None:
    """Why a recorded provenance does not match the expected one (None if it does),
    phrased to follow the file's name.

    The data identity and w0 must be equal; the code version is recorded, not compared
    (a newer exactlr reads older results).
    """
    if not isinstance(recorded, dict):
        return "records no provenance (data, w0)"
    if recorded.get("data") != expected["data"]:
        return "was made from other data"
    if recorded.get("w0_sha256") != expected["w0_sha256"]:
        return "was made from other initial weights w0"
    return None
