"""What produced a result: hashes of weights and data, the code version.

A result or cache entry that records these can be checked against the plan that asks
for it; a file made from other weights, other data or another version does not count.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["state_dict_sha256", "tensor_digest"]


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
