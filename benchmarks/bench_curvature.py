"""Benchmark of the curvature engine: HVP cost and solver products, measured in one run.

Prints ratios measured in this process (no assertions on time):

1. The cost of one Hessian-vector product relative to one gradient, for the
   forward-over-reverse mode and the reverse-over-reverse mode (graph build + first
   product, each later product, and amortised over a typical 6-product Lanczos run).
   Repetitions are interleaved (gradient, forward HVP, reverse HVPs, gradient, ...) and
   the median is reported, so that drifting machine load hits all of them alike.
2. The Hessian-vector products that power iteration and Lanczos need to reach a relative
   error of 1e-3 and 1e-4 of the spectral norm, against a tightly converged Lanczos
   reference (tol 1e-8, up to 300 products, its own start vector) at the same weights.
   Both solvers start from the same vector; the operator is wrapped to record the
   solver's current estimate after every product.

Run (from the repository root):

    .venv/bin/python benchmarks/bench_curvature.py                  # FC 3x1000, mini-MNIST
    .venv/bin/python benchmarks/bench_curvature.py --models fc3x1000,lenet
    .venv/bin/python benchmarks/bench_curvature.py --quick          # 1,000 samples
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from exactlr.curvature import (
    HessianOperator,
    lanczos,
    power_iteration,
    random_unit_vector,
    training_loss_mode,
)
from exactlr.data import load_dataset
from exactlr.models import build_model

THRESHOLDS = (1e-3, 1e-4)


class _Done(Exception):
    """Raised by the recorder to end a solver run once every threshold is reached."""


@dataclass
class Recorder:
    """Wraps an operator; after each product records the solver's spectral-norm estimate.

    ``kind="power"``: the estimate is ``|v^T A v|`` for the (unit) input ``v``, which is
    exactly power iteration's Rayleigh quotient. ``kind="lanczos"``: the inputs are the
    orthonormal Lanczos vectors, so the Ritz values of ``Q^T A Q`` are Lanczos' Ritz values
    and the estimate is the largest in magnitude.

    Attributes:
        matvec: The operator.
        kind: ``"power"`` or ``"lanczos"``.
        reference: The reference spectral norm.
        stop_below: End the run (raise ``_Done``) once the error is below this.
        estimates: Estimate after each product.
    """

    matvec: Callable[[Tensor], Tensor]
    kind: str
    reference: float
    stop_below: float
    estimates: list[float] = field(default_factory=list)
    rayleigh: list[float] = field(default_factory=list)
    _inputs: list[Tensor] = field(default_factory=list)
    _projected: list[list[float]] = field(default_factory=list)

    def __call__(self, v: Tensor) -> Tensor:
        w = self.matvec(v)
        if self.kind == "power":
            estimate = float(torch.dot(v.double(), w.double())) / float(v.double().norm()) ** 2
            self.rayleigh.append(estimate)
            estimate = abs(estimate)
        else:
            # Row k of Q^T A Q: q_i^T (A q_k) for i <= k (A is symmetric); O(k dim) a step.
            self._inputs.append(v.detach().clone())
            self._projected.append([float(torch.dot(q, w)) for q in self._inputs])
            k = len(self._inputs)
            t = torch.zeros(k, k, dtype=torch.float64)
            for i, row in enumerate(self._projected):
                t[i, : i + 1] = torch.tensor(row, dtype=torch.float64)
            theta = torch.linalg.eigvalsh(t, UPLO="L")
            estimate = max(abs(float(theta[0])), abs(float(theta[-1])))
        self.estimates.append(estimate)
        if abs(estimate - self.reference) / self.reference <= self.stop_below:
            raise _Done
        return w

    def products_to(self, threshold: float) -> int | None:
        """First product count after which the relative error is <= threshold."""
        for k, estimate in enumerate(self.estimates, start=1):
            if abs(estimate - self.reference) / self.reference <= threshold:
                return k
        return None


def _median_time(samples: list[float]) -> float:
    return statistics.median(samples)


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _autograd_gradient(model: nn.Module, x: Tensor, y: Tensor) -> None:
    loss = F.cross_entropy(model(x), y)
    torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])


def measure_costs(model: nn.Module, batches: list[tuple[Tensor, Tensor]], reps: int) -> None:
    """Part 1: HVP cost in gradients, both modes, interleaved repetitions."""
    x, y = batches[0]
    grad_times, grad_func_times, fwd_times, build_times, reuse_times = [], [], [], [], []
    gen = torch.Generator().manual_seed(1)
    with training_loss_mode(model):
        for _ in range(reps):
            op_f = HessianOperator(model, F.cross_entropy, batches, hvp_mode="forward")
            v = random_unit_vector(op_f.dim, generator=gen)
            grad_times.append(_timed(lambda: _autograd_gradient(model, x, y)))
            grad_func_times.append(_timed(op_f.gradient))
            fwd_times.append(_timed(lambda op=op_f, v=v: op(v)))
            op_r = HessianOperator(model, F.cross_entropy, batches, hvp_mode="reverse")
            build_times.append(_timed(lambda op=op_r, v=v: op(v)))
            for _ in range(5):
                reuse_times.append(_timed(lambda op=op_r, v=v: op(v)))
            op_r.release()
            del op_r
    g = _median_time(grad_times)
    g_func = _median_time(grad_func_times)
    fwd = _median_time(fwd_times)
    build = _median_time(build_times)
    reuse = _median_time(reuse_times)
    amortised = (build + 5 * reuse) / 6
    print(
        f"gradient: {g:.3f} s (autograd)  {g_func:.3f} s (torch.func, operator.gradient)   "
        f"forward hvp {fwd:.3f} s   reverse hvp: build+first {build:.3f} s, "
        f"later {reuse:.3f} s   [median of {reps} reps; {len(reuse_times)} reused products]"
    )
    print(
        f"hvp/grad forward: {fwd / g:.2f}   reverse (reused graph): {reuse / g:.2f}   "
        f"reverse (build+first product): {build / g:.2f}   "
        f"reverse (incl. graph build, 6 products): {amortised / g:.2f}"
    )


def measure_products(
    model: nn.Module, batches: list[tuple[Tensor, Tensor]], max_power: int, max_lanczos: int
) -> None:
    """Part 2: products to 1e-3 / 1e-4 relative error, power iteration vs Lanczos."""
    with training_loss_mode(model):
        op = HessianOperator(model, F.cross_entropy, batches, hvp_mode="reverse")
        try:
            ref_v0 = random_unit_vector(op.dim, generator=torch.Generator().manual_seed(123))
            start = time.perf_counter()
            ref = lanczos(op, ref_v0, tol=1e-8, max_iters=300)
            ref_seconds = time.perf_counter() - start
            reference = ref.spectral_norm
            print(
                f"reference: ||H|| = {reference:.6g}  (lambda_max {ref.lambda_max:.6g}, "
                f"lambda_min {ref.lambda_min:.6g}; Lanczos {ref.num_matvecs} products, "
                f"error bound {ref.error_estimate:.2g}, converged {ref.converged}, "
                f"{ref_seconds:.0f} s)"
            )
            v0 = random_unit_vector(op.dim, generator=torch.Generator().manual_seed(7))
            stop_below = min(THRESHOLDS)
            power_rec = Recorder(op, "power", reference, stop_below)
            with contextlib.suppress(_Done):
                power_iteration(power_rec, v0, tol=1e-12, max_iters=max_power)
            lanczos_rec = Recorder(op, "lanczos", reference, stop_below)
            with contextlib.suppress(_Done):
                lanczos(lanczos_rec, v0, tol=1e-12, max_iters=max_lanczos)
        finally:
            op.release()
    for threshold in THRESHOLDS:
        p = power_rec.products_to(threshold)
        q = lanczos_rec.products_to(threshold)
        p_text = str(p) if p is not None else f">{len(power_rec.estimates)}"
        q_text = str(q) if q is not None else f">{len(lanczos_rec.estimates)}"
        ratio = f"{q / p:.2f}" if p is not None and q is not None else "n/a"
        print(f"products to {threshold:.0e}: power {p_text}  lanczos {q_text}  ratio {ratio}")
    # PyHessian's stopping rule (relative change of the Rayleigh quotient <= 1e-3).
    r = power_rec.rayleigh
    for k in range(1, len(r)):
        if abs(r[k] - r[k - 1]) <= 1e-3 * abs(r[k]):
            error = abs(abs(r[k]) - reference) / reference
            print(f"power with PyHessian's rule (tol 1e-3) stops at {k + 1} with error {error:.1e}")
            break
    else:
        print(f"power with PyHessian's rule (tol 1e-3) had not stopped after {len(r)} products")
    errors = ", ".join(f"{abs(e - reference) / reference:.1e}" for e in lanczos_rec.estimates[:12])
    print(f"lanczos relative error per product: {errors}")


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("EXACTLR_DATA", "/work/shared/data"),
        help="data root with MNIST/raw (default: $EXACTLR_DATA or /work/shared/data)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--reps", type=int, default=3, help="timing repetitions (default 3)")
    parser.add_argument("--models", default="fc3x1000", help="comma list: fc3x1000,lenet")
    parser.add_argument("--quick", action="store_true", help="1,000 samples instead of 5,500")
    parser.add_argument("--max-power", type=int, default=200, help="power iteration cap")
    parser.add_argument("--max-lanczos", type=int, default=100, help="Lanczos cap")
    parser.add_argument("--seed", type=int, default=0, help="weight seed")
    parser.add_argument("--skip-costs", action="store_true", help="only part 2")
    parser.add_argument("--skip-products", action="store_true", help="only part 1")
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]

    torch.set_num_threads(args.threads)
    train, _ = load_dataset("mnist", subset="mini", data_dir=args.data_dir)
    n = 1000 if args.quick else len(train)
    x, y = train.inputs[:n].float().contiguous(), train.targets[:n].contiguous()
    batches = [(x, y)]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, "
        f"mini-MNIST full batch of {n} samples"
    )
    for name in args.models.split(","):
        model = build_model(
            name, dataset="mnist", init="paper", generator=torch.Generator().manual_seed(args.seed)
        )
        dim = sum(p.numel() for p in model.parameters())
        print(f"== {name} (paper preset, {dim:,} parameters)")
        if not args.skip_costs:
            measure_costs(model, batches, args.reps)
        if not args.skip_products:
            measure_products(model, batches, args.max_power, args.max_lanczos)


if __name__ == "__main__":
    main()
