"""How much memory a reusable double-backward graph needs, and how much there is.

``"reverse"`` Hessian-vector products keep the gradient graph of all the data alive
between products; ``"forward"`` ones hold one batch's graph at a time. The operators'
``hvp_mode="auto"`` picks ``"reverse"`` when :func:`reverse_graph_bytes` fits a share of
:func:`available_memory_bytes`.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import Tensor, nn

#: A double-backward graph saves activations, their gradients and BN/ReLU intermediates:
#: about this many times the forward activations.
GRAPH_ACTIVATION_FACTOR = 4
#: ... plus about this many copies of the weights.
GRAPH_WEIGHT_COPIES = 4


def available_memory_bytes(device: torch.device) -> int:
    """Free memory of ``device``: the CUDA allocator's free bytes, else ``MemAvailable``."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30


def activation_bytes(model: nn.Module, forward: Callable[[], object]) -> int:
    """Bytes of every module output (and nothing else) that ``forward()`` produces.

    Forward hooks on every submodule of ``model`` record the outputs; they are removed
    before returning, also on error.
    """
    sizes: list[int] = []

    def hook(_m: nn.Module, _i: object, out: object) -> None:
        if isinstance(out, Tensor):
            sizes.append(out.numel() * out.element_size())

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            forward()
    finally:
        for h in handles:
            h.remove()
    return sum(sizes)


def reverse_graph_bytes(
    per_sample_activation_bytes: float, num_samples: int, num_params: int, dtype: torch.dtype
) -> float:
    """Estimated size of the reusable graph of ``"reverse"`` products over all the data."""
    param_bytes = num_params * torch.empty((), dtype=dtype).element_size()
    return (
        GRAPH_ACTIVATION_FACTOR * per_sample_activation_bytes * num_samples
        + GRAPH_WEIGHT_COPIES * param_bytes
    )


def choose_hvp_mode(
    model: nn.Module,
    run_probe: Callable[[], object],
    *,
    probe_samples: int,
    probe_input_bytes: int,
    total_samples: int,
    num_params: int,
    dtype: torch.dtype,
    device: torch.device,
    memory_fraction: float,
) -> str:
    """``"reverse"`` if the graph over ``total_samples`` fits ``memory_fraction`` of memory.

    The activations per sample are measured by ``run_probe()``, a forward pass over
    ``probe_samples`` samples of the first batch (two where it has them: BatchNorm1d in
    train mode rejects a batch of one) whose inputs take ``probe_input_bytes``.
    """
    measured = activation_bytes(model, run_probe)
    per_sample = (measured + probe_input_bytes) / probe_samples
    need = reverse_graph_bytes(per_sample, total_samples, num_params, dtype)
    budget = memory_fraction * available_memory_bytes(device)
    return "reverse" if need <= budget else "forward"
