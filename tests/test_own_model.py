"""Any model, any batch: the loss contract, deterministic curvature, labels, weight samples.

Every curvature value is checked against a dense float64 Hessian computed without the
library (``torch.autograd.functional.hessian`` of a hand-written loss of the flat
weights, or of ``functional_call`` on an eval-mode copy), with the model handed to the
library as a user has it: in train mode, dropout on.
"""

from __future__ import annotations

import collections
import copy
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

import exactlr
from exactlr.curvature import hessian_spectral_norm, training_loss_mode
from exactlr.curvature.batches import map_tensors, to_device
from exactlr.curvature.operators import PROBE_EXAMPLES
from exactlr.stepsize import default_make_model

DTYPE = torch.float64
TIGHT = dict(tol=1e-10, max_iters=400, target="both")


def flat_params(model: nn.Module) -> tuple[Tensor, Callable]:
    """The model's trainable parameters as one vector, and vector -> parameter dict."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    sizes = [p.numel() for _, p in named]

    def unflat(flat: Tensor) -> dict[str, Tensor]:
        return {n: c.view(p.shape) for (n, p), c in zip(named, flat.split(sizes), strict=True)}

    return torch.cat([p.detach().reshape(-1) for _, p in named]), unflat


def dense_extremes(fn: Callable[[Tensor], Tensor], flat: Tensor) -> tuple[float, float]:
    """``(lambda_max, lambda_min)`` of the dense Hessian of ``fn`` at ``flat``."""
    hessian = torch.autograd.functional.hessian(fn, flat)
    assert torch.allclose(hessian, hessian.T, atol=1e-9)
    values = torch.linalg.eigvalsh(hessian)
    return float(values[-1]), float(values[0])


def assert_extremes(res: exactlr.SpectralNormResult, lmax: float, lmin: float) -> None:
    scale = max(abs(lmax), abs(lmin))
    assert abs(res.lambda_max - lmax) <= 1e-7 * scale
    assert abs(res.lambda_min - lmin) <= 1e-7 * scale
    assert res.value == pytest.approx(scale, rel=1e-7)


# ------------------------------------------------------------- any batch structure


class TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(2, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self.head(torch.tanh(self.a(a) + self.b(b)))


def _two_input_batches() -> list[dict[str, Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for n in (5, 9):
        out.append(
            {
                "a": torch.randn(n, 3, generator=g, dtype=DTYPE),
                "b": torch.randn(n, 2, generator=g, dtype=DTYPE),
                "y": torch.randint(0, 3, (n,), generator=g),
            }
        )
    return out


@pytest.mark.parametrize("hvp_mode", ["forward", "reverse"])
def test_dict_batches_with_a_loss_match_the_dense_hessian(hvp_mode: str) -> None:
    torch.manual_seed(1)
    model = TwoInputs().to(DTYPE)
    data = _two_input_batches()
    flat, unflat = flat_params(model)

    def reference(w: Tensor) -> Tensor:  # size-weighted mean of the batch means
        total = sum(len(b["y"]) for b in data)
        losses = [
            len(b["y"])
            / total
            * F.cross_entropy(functional_call(model, unflat(w), (b["a"], b["b"])), b["y"])
            for b in data
        ]
        return sum(losses)

    lmax, lmin = dense_extremes(reference, flat)
    res = hessian_spectral_norm(
        model,
        batches=data,
        loss=lambda m, b: F.cross_entropy(m(b["a"], b["b"]), b["y"]),
        hvp_mode=hvp_mode,
        **TIGHT,
    )
    assert res.converged
    assert_extremes(res, lmax, lmin)
    assert res.loss == pytest.approx(float(reference(flat)), rel=1e-12)


def test_tuples_of_several_tensors_and_a_custom_batch_size() -> None:
    torch.manual_seed(1)
    model = TwoInputs().to(DTYPE)
    data = [(b["a"], b["b"], b["y"]) for b in _two_input_batches()]

    def loss(m: nn.Module, b: tuple) -> Tensor:
        return F.cross_entropy(m(b[0], b[1]), b[2])

    flat, unflat = flat_params(model)
    weights = [1.0, 3.0]  # batch_size says the second batch counts three times the first

    def reference(w: Tensor) -> Tensor:
        terms = [
            wt / sum(weights) * F.cross_entropy(functional_call(model, unflat(w), (a, b)), y)
            for wt, (a, b, y) in zip(weights, data, strict=True)
        ]
        return sum(terms)

    lmax, lmin = dense_extremes(reference, flat)
    res = hessian_spectral_norm(
        model, batches=data, loss=loss, batch_size=lambda b: 1 if len(b[2]) == 5 else 3, **TIGHT
    )
    assert_extremes(res, lmax, lmin)
    # The default weight is the first dimension of the first tensor: 5 and 9.
    plain = exactlr.full_loss(model, batches=data, loss=loss)
    expected = sum(len(y) * float(loss(model, (a, b, y))) for a, b, y in data) / 14
    assert plain == pytest.approx(expected, rel=1e-12)


def test_containers_are_moved_recursively_and_keep_their_types() -> None:
    pair = collections.namedtuple("pair", "x y")
    batch = {"p": pair(torch.ones(2), torch.zeros(2)), "l": [torch.ones(1)], "n": 3}
    out = map_tensors(batch, lambda t: t + 1)
    assert isinstance(out["p"], pair) and torch.equal(out["p"].y, torch.ones(2))
    assert out["n"] == 3 and torch.equal(out["l"][0], torch.full((1,), 2.0))
    assert torch.equal(batch["p"].x, torch.ones(2))  # the user's batch is untouched
    assert to_device(batch, None) is batch


def test_a_loss_that_does_not_return_a_scalar_is_named() -> None:
    model = TwoInputs().to(DTYPE)
    with pytest.raises(ValueError, match=r"loss must return a scalar.*m\(\*\*b\)\.loss"):
        hessian_spectral_norm(model, batches=_two_input_batches(), loss=lambda m, b: m)
    with pytest.raises(ValueError, match="exactly one of loss_fn"):
        hessian_spectral_norm(model, F.cross_entropy, _two_input_batches(), loss=lambda m, b: 0)
    with pytest.raises(ValueError, match="loss="):
        hessian_spectral_norm(model, F.cross_entropy, _two_input_batches())


# ------------------------------------------------------------- BatchNorm and dropout


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(2 * 3 * 3, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.drop(F.relu(self.bn(self.conv(x))))
        return self.head(F.dropout(h.flatten(1), 0.3, self.training))


def test_cnn_with_batchnorm_and_dropout_matches_the_dense_hessian() -> None:
    torch.manual_seed(0)
    model = SmallCNN().to(DTYPE).train()
    g = torch.Generator().manual_seed(3)
    x, y = (
        torch.randn(12, 1, 5, 5, generator=g, dtype=DTYPE),
        torch.randint(0, 3, (12,), generator=g),
    )
    flat, unflat = flat_params(model)

    def reference(w: Tensor) -> Tensor:  # batch statistics, no dropout, written out
        p = unflat(w)
        h = F.conv2d(x, p["conv.weight"], p["conv.bias"])
        h = F.batch_norm(h, None, None, p["bn.weight"], p["bn.bias"], training=True)
        return F.cross_entropy(F.linear(F.relu(h).flatten(1), p["head.weight"], p["head.bias"]), y)

    lmax, lmin = dense_extremes(reference, flat)
    stats = model.bn.running_mean.clone(), int(model.bn.num_batches_tracked)
    res = hessian_spectral_norm(model, F.cross_entropy, [(x, y)], **TIGHT)
    assert_extremes(res, lmax, lmin)
    assert (
        torch.equal(model.bn.running_mean, stats[0])
        and int(model.bn.num_batches_tracked) == stats[1]
    )
    assert model.training and model.drop.training and model.bn.track_running_stats


def test_training_loss_mode_turns_functional_dropout_off() -> None:
    model = SmallCNN().to(DTYPE).train()
    x = torch.randn(8, 1, 5, 5, dtype=DTYPE)
    with training_loss_mode(model), torch.no_grad():
        assert not model.training and not model.drop.training
        assert model.bn.training and not model.bn.track_running_stats
        assert torch.equal(model(x), model(x))
    assert model.training and model.bn.training


# ------------------------------------------------------------- labels


def test_cross_entropy_labels_honour_ignore_index_and_the_class_dim() -> None:
    torch.manual_seed(0)
    conv = nn.Conv1d(4, 5, 1).to(DTYPE)  # (N, C=5, L) outputs
    x, y = torch.randn(6, 4, 7, dtype=DTYPE), torch.randint(0, 5, (6, 7))
    y[0, :3] = -100
    hessian_spectral_norm(conv, F.cross_entropy, [(x, y)], tol=1e-3)
    y[1, 1] = 5  # a sequence position of 7 is no class
    with pytest.raises(ValueError, match=r"label 5 in batch 0 .*\[0, 4\].*check_labels=False"):
        hessian_spectral_norm(conv, F.cross_entropy, [(x, y)], tol=1e-3)
    y[1, 1] = 2
    y[0, :3] = 0
    y[2, 2] = 9
    ignore_nine = nn.CrossEntropyLoss(ignore_index=9)
    hessian_spectral_norm(conv, ignore_nine, [(x, y)], tol=1e-3)
    with pytest.raises(ValueError, match="label 9"):
        hessian_spectral_norm(conv, F.cross_entropy, [(x, y)], tol=1e-3)


def test_labels_of_other_losses_and_outputs_are_not_checked() -> None:
    class Wrapped(nn.Module):  # returns a dict, like a ModelOutput
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x: Tensor) -> dict[str, Tensor]:
            return {"logits": self.lin(x)}

    model = Wrapped().to(DTYPE)
    x, y = torch.randn(5, 3, dtype=DTYPE), torch.randint(0, 2, (5,))
    res = hessian_spectral_norm(model, lambda out, t: F.cross_entropy(out["logits"], t), [(x, y)])
    assert res.value > 0
    mse = hessian_spectral_norm(
        nn.Linear(3, 1).to(DTYPE), F.mse_loss, [(x, torch.randn(5, 1, dtype=DTYPE))]
    )
    assert mse.value > 0
    bad = torch.full_like(y, 7)
    hessian_spectral_norm(nn.Linear(3, 2).to(DTYPE), F.cross_entropy, [(x, bad % 2)])
    with pytest.raises(ValueError, match="label 7"):
        hessian_spectral_norm(nn.Linear(3, 2).to(DTYPE), F.cross_entropy, [(x, bad)])


# ------------------------------------------------------------- determinism, unsupported ops


class Noisy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x + 0.1 * torch.randn_like(x))


class Counting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.lin(x) * (1 + self.calls)


@pytest.mark.parametrize("n", [6, 200])
def test_a_random_forward_pass_is_an_error_naming_the_op_and_module(n: int) -> None:
    x, y = torch.randn(n, 3), torch.randint(0, 2, (n,))
    with pytest.raises(ValueError, match=r"not a deterministic.*aten\.\w+ in .*Noisy"):
        hessian_spectral_norm(Noisy(), F.cross_entropy, [(x, y)])
    with pytest.raises(ValueError, match="no random op was seen"):
        hessian_spectral_norm(Counting(), F.cross_entropy, [(x, y)])
    res = hessian_spectral_norm(Noisy(), F.cross_entropy, [(x, y)], check_determinism=False)
    assert math.isfinite(res.value)


class Recording(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.seen: list[int] = []

    def forward(self, x: Tensor) -> Tensor:
        self.seen.append(x.shape[0])
        return self.lin(x)


def test_the_determinism_probe_runs_on_the_head_of_the_first_batch_only() -> None:
    # Its cost is a sliver of a product: no full-size forward pass beyond the solver's.
    batches = [(torch.randn(n, 3), torch.randint(0, 2, (n,))) for n in (200, 100)]
    seen = {}
    for probe in (True, False):
        model = Recording()
        hessian_spectral_norm(
            model,
            F.cross_entropy,
            batches,
            check_determinism=probe,
            generator=torch.Generator().manual_seed(0),
        )
        seen[probe] = collections.Counter(model.seen)
    extra = seen[True] - seen[False]
    assert set(extra) == {PROBE_EXAMPLES} and not seen[False] - seen[True]


class FusedAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        q = self.q(x).view(x.shape[0], 1, 2, 4)
        out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, q, q)[0]
        return out.flatten(1)


@pytest.mark.parametrize(("mode", "other"), [("forward", "reverse"), ("reverse", "forward")])
def test_an_op_without_the_needed_derivative_is_named_with_the_other_mode(
    mode: str, other: str
) -> None:
    x, y = torch.randn(3, 2, 4), torch.randint(0, 8, (3,))
    with pytest.raises(ValueError, match=rf"'{mode}'.*_scaled_dot_product_flash.*'{other}'"):
        hessian_spectral_norm(FusedAttention(), F.cross_entropy, [(x, y)], hvp_mode=mode)


# ------------------------------------------------------------- weight samples


class RawParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.scale = nn.Parameter(torch.randn(2))

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x) * self.scale


def test_a_parameter_the_default_sampler_cannot_redraw_is_an_error() -> None:
    torch.manual_seed(0)
    model = RawParameter()
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    with pytest.raises(ValueError, match=r"1 parameter\(s\) of RawParameter: scale.*make_model="):
        exactlr.suggest_lr(model, F.cross_entropy, [(x, y)], total_steps=10, num_samples=2)
    s = exactlr.suggest_lr(
        model, F.cross_entropy, [(x, y)], total_steps=10, num_samples=2, make_model=RawParameter
    )
    assert len(set(s.estimate.samples)) == 2


def test_default_samples_are_distinct_redraws() -> None:
    model = SmallCNN()
    make = default_make_model(model)
    a, b = make(), make()
    for (name, p), q, r in zip(
        a.named_parameters(), b.parameters(), model.parameters(), strict=True
    ):
        if name.endswith("conv.weight") or name.endswith("head.weight"):
            assert not torch.equal(p, q) and not torch.equal(p, r)


# ------------------------------------------------------------- Hugging Face models


def _gpt2(dropout_default: bool = True):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=1, n_head=1, n_embd=2, vocab_size=7, n_positions=6, bos_token_id=0, eos_token_id=0
    )
    assert config.attn_pdrop == 0.1 and config.resid_pdrop == 0.1  # the defaults, on
    torch.manual_seed(0)
    return transformers, transformers.GPT2LMHeadModel(config).to(DTYPE).train()


def _padded_lm_batches() -> list[dict[str, Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for n, pad_from in ((3, 4), (2, 2)):
        ids = torch.randint(1, 7, (n, 6), generator=g)
        mask = torch.ones_like(ids)
        mask[1:, pad_from:] = 0
        out.append(
            {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
        )
    return out


def hf_loss(model: nn.Module, batch: dict) -> Tensor:
    return model(**batch).loss


@pytest.mark.parametrize("hvp_mode", ["reverse", "forward"])
def test_gpt2_with_padding_and_dropout_matches_the_dense_hessian(hvp_mode: str) -> None:
    _, model = _gpt2()
    data = _padded_lm_batches()
    reference_model = copy.deepcopy(model).eval()  # no dropout: what the curvature must be
    flat, unflat = flat_params(model)

    def reference(w: Tensor) -> Tensor:
        with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.MATH]):
            terms = [
                len(b["input_ids"]) / 5 * functional_call(reference_model, unflat(w), kwargs=b).loss
                for b in data
            ]
        return sum(terms)

    lmax, lmin = dense_extremes(reference, flat)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = hessian_spectral_norm(model, batches=data, loss=hf_loss, hvp_mode=hvp_mode, **TIGHT)
    assert res.converged and res.hvp_mode == hvp_mode
    assert_extremes(res, lmax, lmin)
    assert model.training  # left in train mode, dropout and all
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # With dropout on (what the model does in train mode) the loss is random: the
    # curvature above is of the deterministic loss, not of a dropout draw.
    with torch.no_grad():
        draws = {float(hf_loss(model, data[0])) for _ in range(4)}
    assert len(draws) > 1


def test_gpt2_samples_are_its_own_initialisation() -> None:
    transformers, model = _gpt2()
    make = default_make_model(model)
    torch.manual_seed(5)
    sample = make()
    torch.manual_seed(5)
    by_hand = transformers.GPT2LMHeadModel(model.config).to(DTYPE)
    for (name, p), q in zip(sample.named_parameters(), by_hand.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert sample.lm_head.weight is sample.transformer.wte.weight  # still tied
    model.extra = nn.Parameter(torch.randn(3, dtype=DTYPE))  # not in the config: re-init
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel: extra.*make_model="):
        default_make_model(model)


def test_bert_k_hat_equals_the_hand_made_reference_with_hf_init() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=13,
        hidden_size=4,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=8,
        max_position_embeddings=8,
        num_labels=3,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).to(DTYPE).train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 13, (6, 5), generator=g)
    mask = torch.ones_like(ids)
    mask[3:, 3:] = 0
    data = [
        {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (6,), generator=g)}
    ]
    s = exactlr.suggest_lr(
        model,
        batches=data,
        loss=hf_loss,
        total_steps=100,
        num_samples=3,
        generator=torch.Generator().manual_seed(0),
        tol=1e-8,
        target="both",
        stop_below_max=False,
    )
    assert len(set(s.estimate.samples)) == 3
    for record in s.estimate.records:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(record.seed)
            by_hand = transformers.BertForSequenceClassification(config).to(DTYPE)
        ref = hessian_spectral_norm(
            by_hand,
            batches=data,
            loss=hf_loss,
            tol=1e-8,
            generator=torch.Generator().manual_seed(record.seed),
            target="both",
        )
        assert record.value == pytest.approx(ref.value, rel=1e-6)
    assert s.k_hat == max(s.estimate.samples)
    assert s.initial_loss == pytest.approx(exactlr.full_loss(model, batches=data, loss=hf_loss))


def test_readme_own_model_examples_run_as_written() -> None:
    pytest.importorskip("transformers")
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Your own model", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in section.split("```python\n")[1:]]
    assert len(blocks) >= 3
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["s"].lr > 0


def test_batch_encoding_batches_keep_their_class_and_give_the_same_curvature() -> None:
    transformers, model = _gpt2()
    data = _padded_lm_batches()
    encoded = [transformers.BatchEncoding(dict(b)) for b in data]
    moved = to_device(encoded[0], torch.device("cpu"))
    assert isinstance(moved, transformers.BatchEncoding) and moved is not encoded[0]
    kwargs = dict(loss=hf_loss, tol=1e-8, generator=torch.Generator().manual_seed(0))
    as_dicts = hessian_spectral_norm(model, batches=data, **kwargs)
    kwargs["generator"] = torch.Generator().manual_seed(0)
    as_encodings = hessian_spectral_norm(model, batches=encoded, **kwargs)
    assert as_encodings.value == as_dicts.value
