"""The scales a figure runs at, as a typed object.

A :class:`Scale` says how far a figure is reduced from the paper's sizes
(:attr:`Scale.description` in words; :func:`exactlr.paper.planning.resolve_figure`
applies the rules), how often its runs checkpoint, which solver settings K_hat uses and
how many test images it evaluates on.

* ``paper``: the paper's sizes, 100 epochs, K_hat from 20 weight samples (Lanczos).
* ``cpu``: one MNIST figure in well under 30 minutes on 2 CPU cores, widths kept; a
  VGG-9 figure in under an hour (500 images), fig5 (12 K_hat estimates) in about one.
* ``smoke``: seconds per figure (a few hundred images, width-32 nets, 2-4 epochs,
  2 K_hat samples), for tests and for checking the plumbing; its numbers mean nothing.

``Scale`` is a ``str`` enum: ``Scale.SMOKE == "smoke"``, and it is written to files and
file names as its value.
"""

from __future__ import annotations

import enum

from exactlr.curvature import SpectralOptions

__all__ = ["SCALES", "Scale", "describe_scale", "parse_scale"]


class Scale(str, enum.Enum):
    """How far a figure is reduced from the paper's sizes."""

    SMOKE = "smoke"
    CPU = "cpu"
    PAPER = "paper"

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @property
    def description(self) -> str:
        """What this scale changes relative to the paper, in words."""
        return _DESCRIPTIONS[self]

    @property
    def default_checkpoint_every(self) -> int:
        """Epochs between a run's checkpoints: 0 (none) at smoke scale, else 5.

        Smoke runs take seconds, so checkpoints would cost more than they save.
        """
        return 0 if self is Scale.SMOKE else 5

    @property
    def spectral_options(self) -> SpectralOptions:
        """K_hat's solver: Lanczos; smoke only checks the plumbing, so a loose tolerance
        and few iterations; other scales the library's defaults."""
        if self is Scale.SMOKE:
            return SpectralOptions(method="lanczos", tol=1e-2, max_iters=6)
        return SpectralOptions(method="lanczos")

    @property
    def num_threads(self) -> int | None:
        """CPU threads the CLI runs this scale with: 1 at smoke scale, whose tensors are
        so small that OpenMP's spin-waiting costs more than the work (compare
        ``exactlr run fig1 --scale smoke`` with ``--threads 1`` and ``--threads 2``);
        None: torch's default."""
        return 1 if self is Scale.SMOKE else None

    @property
    def num_test(self) -> int | None:
        """Test images used (the first ones of the test set); None: all."""
        return 500 if self is Scale.SMOKE else None


#: The scales, smallest first.
SCALES: tuple[str, ...] = tuple(s.value for s in Scale)

_DESCRIPTIONS = {
    Scale.PAPER: (
        "the paper's sizes: mini-MNIST 5,500/1,000 and full MNIST / CIFAR-10, widths as in "
        "the paper, batch sizes as in the paper, 100 epochs (T = 20/50/150 where varied), "
        "K_hat from 20 weight samples (Lanczos, full-data Hessian)"
    ),
    Scale.CPU: (
        "reduced for 2 CPU cores, widths kept except FC 5x3000 -> FC 5x1000: "
        "full-batch mini-MNIST runs use 2,000 of the 5,500 training images (test: the 1,000 "
        "mini-MNIST test images) and 30% of the epochs (100 -> 30; T = 20/50/150 -> "
        "6/15/45); mini-batch MNIST runs use 12,000 training images (test: all 10,000), "
        "batch 5000 -> 2000 and 20% of the epochs (100 -> 20; T -> 4/10/30); VGG-9 "
        "runs (CIFAR-10) use 500 training images of mini-CIFAR-10 (test: its 1,000), batch "
        "2500 -> 125, 10 epochs and K_hat from 3 weight samples, so that fig10 and fig11 "
        "take under an hour each (a VGG-9 epoch of 1,000 images, metrics included, costs "
        "~60 CPU seconds); "
        "fig5 keeps its batch sizes 256..2048 on 6,000 MNIST images, divides them by 16 "
        "(16..128) for VGG-9 and takes K_hat from 2 samples in every row (it needs 12 "
        "estimates); elsewhere K_hat from 5 weight samples"
    ),
    Scale.SMOKE: (
        "plumbing check only (numbers mean nothing): 256 training images of mini-MNIST "
        "(200 of mini-CIFAR-10) and the first 500 test images when the data folder exists, "
        "else the synthetic set; FC "
        "widths -> 32, VGG-9 -> LeNet, 3 epochs (T = 20/50/150 -> 2/3/4), mini-batches of "
        "64 (fig5: 16..128), K_hat from 2 weight samples (Lanczos capped at 6 iterations), "
        "one CPU thread"
    ),
}


def parse_scale(scale: str | Scale) -> Scale:
    """The :class:`Scale` called ``scale``.

    Raises:
        ValueError: Unknown scale (the message lists the valid ones).
    """
    try:
        return Scale(scale)
    except ValueError:
        raise ValueError(f"unknown scale {scale!r}; valid scales: {', '.join(SCALES)}") from None


def describe_scale(scale: str | Scale) -> str:
    """What ``scale`` changes relative to the paper, in words.

    Raises:
        ValueError: Unknown scale.
    """
    return parse_scale(scale).description
