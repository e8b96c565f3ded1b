"""Algorithm 2 of the paper: estimate the Lipschitz smoothness K of a loss.

    K_hat = max_{j = 1..N} || Hessian of L at w_j ||_2,      w_j ~ W  i.i.d.,

where W is the model's own initialisation distribution: ``make_model()`` returns a freshly
initialised network of the architecture, one sample ``w_j``. Theorem 4: as N grows, K_hat
converges in distribution to K(L). Every sample is kept (value, both extreme eigenvalues,
products, seconds) together with the running maximum, so that convergence can be plotted.

Two variants of L:

* ``variant="full"`` (default): the Hessian of the full-data loss over all batches.
* ``variant="minibatch"``: the spectral norm on each mini-batch separately, max over
  batches (what the authors' mini-batch code does); an upper-bound-flavoured estimate of
  the smoothness of the stochastic losses.

Global RNG state is never changed: each sample's weights are drawn inside
:func:`torch.random.fork_rng` from a seed taken from ``generator``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from exactlr.curvature import Batch, LossFn, hessian_spectral_norm, materialize_batches

VARIANTS = ("full", "minibatch")


@dataclass(frozen=True)
class SampleRecord:
    """One weight sample of Algorithm 2.

    Attributes:
        index: Sample number, from 0.
        value: Hessian spectral norm at this sample (max over batches for "minibatch").
        lambda_max: Largest Hessian eigenvalue (at the batch giving ``value``).
        lambda_min: Smallest Hessian eigenvalue (at the batch giving ``value``).
        num_hvps: Hessian-vector products spent on this sample.
        seconds: Wall time of this sample.
        converged: Whether every solver run met its tolerance.
        seed: The seed the sample's weights were drawn with.
        loss: Full-data (or max mini-batch) loss at this sample.
    """

    index: int
    value: float
    lambda_max: float
    lambda_min: float
    num_hvps: int
    seconds: float
    converged: bool
    seed: int
    loss: float


@dataclass(frozen=True)
class SmoothnessEstimate:
    """Result of Algorithm 2.

    Attributes:
        k_hat: ``max_j ||H(w_j)||_2``.
        samples: Per-sample spectral norms, in draw order.
        records: Per-sample details (:class:`SampleRecord`).
        running_max: ``max(samples[:j+1])`` for each j (Theorem 4's sequence).
        stopped_early: True if the adaptive stop ended the loop before ``num_samples``.
        variant: ``"full"`` or ``"minibatch"``.
    """

    k_hat: float
    samples: list[float]
    records: list[SampleRecord] = field(repr=False)
    running_max: list[float] = field(repr=False)
    stopped_early: bool = False
    variant: str = "full"

    @property
    def num_hvps(self) -> int:
        """Total Hessian-vector products over all samples."""
        return sum(r.num_hvps for r in self.records)

    @property
    def seconds(self) -> float:
        """Total wall time over all samples."""
        return sum(r.seconds for r in self.records)


def _draw_model(make_model: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Call ``make_model`` with the global RNG seeded to ``seed``, then restore it."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = make_model()
    if not isinstance(model, nn.Module):
        raise ValueError(f"make_model() must return a torch.nn.Module, got {type(model)}")
    return model


def estimate_smoothness(
    make_model: Callable[[], nn.Module],
    loss_fn: LossFn,
    batches: Iterable[Batch],
    *,
    num_samples: int = 10,
    generator: torch.Generator | None = None,
    variant: str = "full",
    patience: int | None = None,
    rel_tol: float = 0.01,
    device: torch.device | str | None = None,
    progress: bool = False,
    **spectral_kwargs: object,
) -> SmoothnessEstimate:
    """Algorithm 2: ``K_hat = max_j ||H(w_j)||_2`` over fresh initialisations ``w_j``.

    Args:
        make_model: Returns a freshly initialised model of the architecture (one sample
            of W). Called with the global RNG seeded per sample (and restored after).
        loss_fn: Mean-reduced loss ``loss_fn(outputs, targets)``.
        batches: Iterable of ``(inputs, targets)``; the loss is their size-weighted mean.
        num_samples: N, the number of weight samples (the maximum if ``patience`` is set).
        generator: Seeds the samples and the solvers' start vectors.
        variant: ``"full"`` (full-data Hessian) or ``"minibatch"`` (max over batches).
        patience: Adaptive stop: end once the running max has not grown by more than
            ``rel_tol`` (relative) over ``patience`` consecutive samples. None: fixed N.
        rel_tol: Relative growth counted as "grown" for the adaptive stop.
        device: Device for the sampled models and the data (default: the model's own).
        progress: Show a tqdm progress bar (if tqdm is installed).
        **spectral_kwargs: Passed to :func:`~exactlr.curvature.hessian_spectral_norm`
            (``method``, ``tol``, ``max_iters``, ``hvp_mode``, ``subsample``,
            ``subsample_tol``, ``target``). ``target`` defaults to ``"norm"`` here: the
            spectral norm is certified to ``tol``; the records' smaller-magnitude
            eigenvalue is then only a loose estimate (pass ``target="both"`` for both).

    Returns:
        A :class:`SmoothnessEstimate`.

    Raises:
        ValueError: Bad ``num_samples``, ``variant``, ``patience`` or ``rel_tol``, and
            whatever :func:`hessian_spectral_norm` rejects (empty batches, bad labels).

    Example:
        >>> import torch.nn.functional as F
        >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> est = estimate_smoothness(lambda: torch.nn.Linear(4, 3), F.cross_entropy,
        ...                           [(x, y)], num_samples=3)
        >>> est.k_hat == max(est.samples)
        True
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples=}")
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is not one of {VARIANTS}")
    if patience is not None and (not isinstance(patience, int) or patience < 1):
        raise ValueError(f"patience must be None or a positive integer, got {patience=}")
    if not (rel_tol >= 0 and math.isfinite(rel_tol)):
        raise ValueError(f"rel_tol must be a non-negative finite number, got {rel_tol=}")
    allowed = {"method", "tol", "max_iters", "hvp_mode", "subsample", "subsample_tol", "target"}
    unknown = set(spectral_kwargs) - allowed
    if unknown:
        raise ValueError(f"unknown keyword arguments {sorted(unknown)} for the spectral norm")
    # K_hat needs only each sample's spectral norm: stop on its error bound and leave the
    # smaller end of the spectrum loose (5-6x fewer products when lambda_max dominates).
    if spectral_kwargs.get("method", "lanczos") == "lanczos":
        spectral_kwargs.setdefault("target", "norm")
    data = materialize_batches(batches, torch.device(device) if device is not None else None)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    seeds = torch.randint(0, 2**62, (num_samples,), generator=generator).tolist()

    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=num_samples, desc="K_hat samples", unit="sample")
        except ImportError:  # tqdm is an optional extra
            bar = None

    records: list[SampleRecord] = []
    running: list[float] = []
    since_growth = 0
    stopped_early = False
    try:
        for index, seed in enumerate(seeds):
            start = time.perf_counter()
            model = _draw_model(make_model, seed)
            if device is not None:
                model = model.to(device)
            groups = [[b] for b in data] if variant == "minibatch" else [data]
            best = None
            hvps, converged, loss = 0, True, -math.inf
            solver_gen = torch.Generator().manual_seed(seed)
            for group in groups:
                res = hessian_spectral_norm(
                    model, loss_fn, group, generator=solver_gen, **spectral_kwargs
                )
                hvps += res.num_hvps
                converged = converged and res.converged
                loss = max(loss, res.loss)
                if best is None or res.value > best.value:
                    best = res
            assert best is not None
            records.append(
                SampleRecord(
                    index=index,
                    value=best.value,
                    lambda_max=best.lambda_max,
                    lambda_min=best.lambda_min,
                    num_hvps=hvps,
                    seconds=time.perf_counter() - start,
                    converged=converged,
                    seed=int(seed),
                    loss=loss,
                )
            )
            previous = running[-1] if running else None
            running.append(best.value if previous is None else max(previous, best.value))
            if previous is not None and running[-1] > previous * (1 + rel_tol):
                since_growth = 0
            elif previous is not None:
                since_growth += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(k_hat=f"{running[-1]:.4g}", last=f"{best.value:.4g}")
            if patience is not None and since_growth >= patience and index + 1 < num_samples:
                stopped_early = True
                break
    finally:
        if bar is not None:
            bar.close()
    return SmoothnessEstimate(
        k_hat=running[-1],
        samples=[r.value for r in records],
        records=records,
        running_max=running,
        stopped_early=stopped_early,
        variant=variant,
    )
