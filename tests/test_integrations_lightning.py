"""exactlr.integrations.lightning.ExactLR under a real Lightning Trainer on the CPU."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from exactlr.integrations.lightning import ExactLR, training_step_loss  # noqa: E402

NUM_SAMPLES, BATCH, EPOCHS = 48, 16, 2


def _data() -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(NUM_SAMPLES, 6, generator=gen)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 0.5).long()
    return TensorDataset(x, y)


class TinyModule(pl.LightningModule):
    """A 6-8-3 classifier; ``optimizers`` picks a ``configure_optimizers`` return form."""

    def __init__(self, form: str = "single") -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        self.form = form
        self.step_lrs: list[list[float]] = []

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return {"loss": loss} if self.form == "dict-output" else loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # The LR each optimizer will step with (recorded before the step).
        self.step_lrs.append([g["lr"] for opt in self.trainer.optimizers for g in opt.param_groups])

    def configure_optimizers(self) -> Any:
        if self.form == "two-groups":
            return torch.optim.Adam(
                [{"params": self.net[0].parameters()}, {"params": self.net[2].parameters()}],
                lr=1e-3,
            )
        if self.form == "list":
            return [torch.optim.Adam(self.parameters(), lr=1e-3)]
        if self.form == "dict":
            return {"optimizer": torch.optim.Adam(self.parameters(), lr=1e-3)}
        if self.form == "scheduler":
            opt = torch.optim.Adam(self.parameters(), lr=1e-3)
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=100)]
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def _trainer(tmp_path: Path, callback: ExactLR, epochs: int = EPOCHS, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=pl.loggers.CSVLogger(tmp_path, name="run"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
        **kwargs,
    )


def _reference_lr(module: nn.Module, steps: int, seed: int) -> float:
    """The rule computed directly with suggest_lr on the same loss and batches."""
    from exactlr import suggest_lr

    batches = list(DataLoader(_data(), batch_size=BATCH))
    return suggest_lr(
        module,
        batches=batches,
        loss=training_step_loss,
        total_steps=steps,
        num_samples=2,
        generator=torch.Generator().manual_seed(seed),
    ).lr


@pytest.mark.parametrize("form", ["single", "dict-output", "two-groups", "list", "dict"])
def test_optimizer_runs_at_the_suggested_lr(tmp_path: Path, form: str) -> None:
    torch.manual_seed(0)
    module = TinyModule(form)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    expected = _reference_lr(module, EPOCHS * 3, seed=1)
    callback = ExactLR(num_samples=2, generator=torch.Generator().manual_seed(1))
    trainer = _trainer(tmp_path, callback)
    trainer.fit(module, DataLoader(_data(), batch_size=BATCH))
    s = callback.suggestion
    assert s is not None and s.total_steps == EPOCHS * 3 == trainer.global_step
    # The model that was trained started from its own w0: the suggestion measured it.
    assert s.lr == pytest.approx(expected, rel=1e-9)
    assert s.lr == pytest.approx(math.sqrt(2 * s.initial_loss / (s.k_hat * s.total_steps)))
    # Every step of every param group ran at the suggestion.
    assert len(module.step_lrs) == EPOCHS * 3
    assert all(lr == s.lr for lrs in module.step_lrs for lr in lrs)
    assert any(not torch.equal(v, before[k]) for k, v in module.state_dict().items())
    # And the logger has the evidence.
    rows = list(csv.DictReader((Path(trainer.logger.log_dir) / "metrics.csv").open()))
    logged = next(r for r in rows if r.get("exactlr/lr"))
    assert float(logged["exactlr/lr"]) == pytest.approx(s.lr)
    assert float(logged["exactlr/k_hat"]) == pytest.approx(s.k_hat)
    assert float(logged["exactlr/initial_loss"]) == pytest.approx(s.initial_loss)


def test_t_counts_gradient_accumulation_and_num_batches_limits_the_data(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = TinyModule()
    callback = ExactLR(num_samples=2, num_batches=1, generator=torch.Generator().manual_seed(1))
    trainer = _trainer(tmp_path, callback, accumulate_grad_batches=3)
    trainer.fit(module, DataLoader(_data(), batch_size=BATCH))
    s = callback.suggestion
    assert s is not None and s.total_steps == EPOCHS * 1
    # L(w0) is that of the first batch alone.
    torch.manual_seed(0)
    fresh = TinyModule()
    x, y = next(iter(DataLoader(_data(), batch_size=BATCH)))
    with torch.no_grad():
        first = float(F.cross_entropy(fresh.net(x), y))
    assert s.initial_loss == pytest.approx(first, rel=1e-6)


def test_a_scheduler_is_warned_about(tmp_path: Path) -> None:
    torch.manual_seed(0)
    callback = ExactLR(num_samples=1)
    with pytest.warns(UserWarning, match="scheduler"):
        _trainer(tmp_path, callback).fit(
            TinyModule("scheduler"), DataLoader(_data(), batch_size=BATCH)
        )


def test_check_steps_are_logged(tmp_path: Path) -> None:
    torch.manual_seed(0)
    callback = ExactLR(num_samples=2, check_steps=2)
    trainer = _trainer(tmp_path, callback)
    trainer.fit(TinyModule(), DataLoader(_data(), batch_size=BATCH))
    s = callback.suggestion
    assert s is not None and s.check is not None and s.check.steps == 2
    rows = list(csv.DictReader((Path(trainer.logger.log_dir) / "metrics.csv").open()))
    logged = next(r for r in rows if r.get("exactlr/check_end_norm"))
    assert float(logged["exactlr/check_end_norm"]) == pytest.approx(s.check.end_norm)


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match="num_batches must be None or a positive integer"):
        ExactLR(num_batches=0)


def test_readme_example_runs_as_written(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## In Lightning\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {"__name__": "readme"}
    exec(compile(block, "README.md", "exec"), namespace)
    s = namespace["exact"].suggestion
    assert s.total_steps == 20 and s.check is not None and s.check.steps == 10
    assert namespace["trainer"].optimizers[0].param_groups[0]["lr"] == s.lr


def test_resuming_keeps_the_checkpoints_lr(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = TinyModule()
    first = ExactLR(num_samples=2)
    trainer = _trainer(tmp_path, first)
    trainer.fit(module, DataLoader(_data(), batch_size=BATCH))
    assert first.suggestion is not None
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    again = ExactLR(num_samples=2)
    resumed = TinyModule()
    trainer = _trainer(tmp_path, again, epochs=EPOCHS + 1)
    trainer.fit(resumed, DataLoader(_data(), batch_size=BATCH), ckpt_path=path)
    assert again.suggestion is None
    assert resumed.step_lrs == [[first.suggestion.lr]] * 3
