"""exactlr.integrations.transformers.ExactLRCallback under transformers.Trainer, CPU, offline."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from exactlr.integrations.transformers import ExactLRCallback, model_output_loss  # noqa: E402

NUM_EXAMPLES, BATCH, EPOCHS, SEQ = 24, 8, 2, 6


def _model(seed: int = 0) -> BertForSequenceClassification:
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
    )
    torch.manual_seed(seed)
    return BertForSequenceClassification(config)


def _dataset() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (NUM_EXAMPLES, SEQ), generator=gen)
    labels = ids[:, 0] % 3
    mask = torch.ones(NUM_EXAMPLES, SEQ, dtype=torch.long)
    return [
        {
            "input_ids": ids[i],
            "attention_mask": mask[i],
            "labels": labels[i],
        }
        for i in range(NUM_EXAMPLES)
    ]


class _RecordLR(TrainerCallback):
    """The LR each optimizer step runs with (read before the step)."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.lrs.append(kwargs["optimizer"].param_groups[0]["lr"])


def _train(tmp_path: Path, schedule: str, **callback_kwargs: Any) -> tuple[Any, _RecordLR, Any]:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    exact = ExactLRCallback(
        num_samples=2, generator=torch.Generator().manual_seed(1), **callback_kwargs
    )
    record = _RecordLR()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        per_device_train_batch_size=BATCH,
        num_train_epochs=EPOCHS,
        learning_rate=1e-4,
        lr_scheduler_type=schedule,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
        dataloader_drop_last=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_dataset(), callbacks=[exact, record])
    trainer.train()
    changed = any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert changed
    return exact, record, trainer


def test_optimizer_runs_at_the_suggested_lr(tmp_path: Path) -> None:
    exact, record, trainer = _train(tmp_path, "constant")
    s = exact.suggestion
    steps = EPOCHS * math.ceil(NUM_EXAMPLES / BATCH)
    assert s is not None and s.total_steps == steps == trainer.state.global_step
    assert s.lr == pytest.approx(math.sqrt(2 * s.initial_loss / (s.k_hat * steps)), rel=1e-12)
    assert record.lrs == [s.lr] * steps
    # L(w0) is the model's own loss over the training set at its initial weights, without
    # dropout (the curvature's loss is deterministic).
    model, data = _model().eval(), _dataset()
    collated = {k: torch.stack([d[k] for d in data]) for k in data[0]}
    with torch.no_grad():
        assert s.initial_loss == pytest.approx(float(model(**collated).loss), rel=1e-5)


def test_the_trainers_schedule_is_rescaled_to_the_suggestion(tmp_path: Path) -> None:
    exact, record, _ = _train(tmp_path, "linear")
    s = exact.suggestion
    assert s is not None
    steps = s.total_steps
    # Linear decay from the suggestion, not from args.learning_rate.
    expected = [s.lr * (steps - t) / steps for t in range(steps)]
    assert record.lrs == pytest.approx(expected, rel=1e-12)


def test_model_output_loss_needs_labels() -> None:
    model = _model()
    batch = {"input_ids": torch.randint(1, 50, (2, SEQ))}
    with pytest.raises(ValueError, match="the batches need 'labels'"):
        model_output_loss(model, batch)


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match="num_batches must be None or a positive integer"):
        ExactLRCallback(num_batches=-2)


def test_readme_example_runs_as_written(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## In the Hugging Face Trainer\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    s = namespace["exact"].suggestion
    assert s.total_steps == 12 == namespace["trainer"].state.global_step
    assert namespace["trainer"].optimizer.param_groups[0]["lr"] == s.lr


def test_resuming_keeps_the_checkpoints_lr(tmp_path: Path) -> None:
    def trainer(epochs: int, callbacks: list) -> Trainer:
        args = TrainingArguments(
            output_dir=str(tmp_path),
            use_cpu=True,
            report_to=[],
            per_device_train_batch_size=BATCH,
            num_train_epochs=epochs,
            lr_scheduler_type="constant",
            save_strategy="epoch",
            logging_strategy="no",
            disable_tqdm=True,
        )
        return Trainer(model=_model(), args=args, train_dataset=_dataset(), callbacks=callbacks)

    first = ExactLRCallback(num_samples=2)
    trainer(1, [first]).train()
    assert first.suggestion is not None
    again, record = ExactLRCallback(num_samples=2), _RecordLR()
    trainer(2, [again, record]).train(resume_from_checkpoint=True)
    assert again.suggestion is None
    assert record.lrs == [first.suggestion.lr] * math.ceil(NUM_EXAMPLES / BATCH)
