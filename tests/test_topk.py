"""pipeline/teacher/topk.py against float64 references: ids, log-probs, target, stable tail, head loading."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import UserError
from pipeline.teacher.topk import OutputHead, head_transforms, load_output_head, topk_from_hidden, topk_from_logits


def reference(logits: torch.Tensor, targets: torch.Tensor, k: int):
    """float64 log_softmax, its top-k, the target log-prob and the tail as a masked log-sum-exp."""
    logp = torch.log_softmax(logits.double(), dim=1)
    values, ids = logp.topk(k, dim=1)
    tail = logp.scatter(1, ids, float("-inf")).logsumexp(dim=1)
    return values, ids, logp.gather(1, targets[:, None])[:, 0], tail, logp


def assert_matches(result, logits: torch.Tensor, targets: torch.Tensor, k: int, atol: float = 1e-5) -> None:
    values, _, target, tail, logp = reference(logits, targets, k)
    ids = result.ids.long()
    assert result.ids.dtype == torch.int32 and result.logprobs.dtype == torch.float32
    # Ties may pick other ids; every chosen id must still be a top-k member at the reference.
    assert (ids.sort(dim=1).values.diff(dim=1) > 0).all(), "ids repeat within a row"
    chosen = logp.gather(1, ids)
    assert torch.allclose(result.logprobs.double(), chosen, atol=atol, rtol=0)
    assert torch.allclose(result.logprobs.double(), values, atol=atol, rtol=0)
    assert (result.logprobs[:, 1:] <= result.logprobs[:, :-1]).all(), "not sorted descending"
    assert torch.allclose(result.target_logprobs.double(), target, atol=atol, rtol=0)
    finite = torch.isfinite(tail)
    assert torch.equal(torch.isfinite(result.tail_logmass), finite)
    assert torch.allclose(result.tail_logmass.double()[finite], tail[finite], atol=atol, rtol=1e-5)


@pytest.mark.parametrize(
    "vocab,k,scale",
    [
        (1024, 64, 4.0),
        (1000, 64, 8.0),
        (8192, 64, 3.0),
        (130, 64, 2.0),
        (97, 5, 4.0),
        (64, 64, 1.0),
        (50, 1, 6.0),
    ],
)
def test_matches_float64_reference(vocab: int, k: int, scale: float) -> None:
    gen = torch.Generator().manual_seed(vocab + k)
    logits = torch.randn(200, vocab, generator=gen) * scale
    targets = torch.randint(0, vocab, (200,), generator=gen)
    assert_matches(topk_from_logits(logits, targets, k), logits, targets, k)


def test_all_of_the_vocabulary_leaves_no_tail() -> None:
    logits = torch.randn(5, 40)
    result = topk_from_logits(logits, torch.zeros(5, dtype=torch.long), 40)
    assert torch.isneginf(result.tail_logmass).all()
    assert torch.allclose(result.logprobs.exp().sum(dim=1), torch.ones(5))


def test_tail_is_exact_where_one_minus_sum_cancels() -> None:
    # 64 logits at 60 and the rest at 0: 1 - sum(p_topk) is ~1e-25, far below float32 epsilon.
    logits = torch.zeros(2, 1000)
    logits[:, :64] = 60.0
    logits[1, 500] = 30.0
    result = topk_from_logits(logits, torch.tensor([3, 500]), 64)
    expected = [math.log(936) - math.log(64) - 60, math.log(935 + math.exp(30)) - math.log(64 * math.exp(60))]
    assert result.tail_logmass.tolist() == pytest.approx(expected, abs=1e-4)
    assert result.target_logprobs[1].item() == pytest.approx(30 - math.log(64 * math.exp(60)), abs=1e-4)


def test_bfloat16_logits_are_softmaxed_in_float32() -> None:
    logits = (torch.randn(64, 8192) * 4).bfloat16()
    targets = torch.randint(0, 8192, (64,))
    assert_matches(topk_from_logits(logits, targets, 64), logits.float(), targets, 64)


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1000])
def test_hidden_states_in_chunks_equal_the_full_logits(chunk_size: int) -> None:
    gen = torch.Generator().manual_seed(1)
    weight, hidden = torch.randn(1000, 32, generator=gen), torch.randn(70, 32, generator=gen)
    targets = torch.randint(0, 1000, (70,), generator=gen)
    result = topk_from_hidden(hidden, OutputHead(weight), targets, 16, chunk_size)
    assert_matches(result, hidden.double() @ weight.double().T, targets, 16)


def test_logit_scale_and_softcap_follow_the_config() -> None:
    gen = torch.Generator().manual_seed(2)
    weight, hidden = torch.randn(300, 16, generator=gen), torch.randn(20, 16, generator=gen) * 3
    targets = torch.randint(0, 300, (20,), generator=gen)
    transforms = head_transforms({"logit_scale": 0.5, "logits_scaling": 2.0, "final_logit_softcapping": 5.0})
    assert transforms == {"logit_scale": 0.25, "softcap": 5.0}
    result = topk_from_hidden(hidden, OutputHead(weight, **transforms), targets, 8, 8)
    logits = torch.tanh(hidden.double() @ weight.double().T * 0.25 / 5.0) * 5.0
    assert_matches(result, logits, targets, 8)


def test_k_larger_than_the_vocabulary_is_a_user_error() -> None:
    with pytest.raises(UserError, match="larger than the vocabulary"):
        topk_from_logits(torch.randn(2, 10), torch.zeros(2, dtype=torch.long), 11)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 9),
    vocab=st.integers(2, 400),
    k_frac=st.floats(0.0, 1.0),
    scale=st.floats(0.0, 50.0),
    seed=st.integers(0, 2**16),
)
def test_mass_is_conserved_and_ids_are_valid(rows: int, vocab: int, k_frac: float, scale: float, seed: int):
    k = max(1, round(k_frac * vocab))
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=gen) * scale
    result = topk_from_logits(logits, torch.randint(0, vocab, (rows,), generator=gen), k)
    assert ((result.ids >= 0) & (result.ids < vocab)).all()
    mass = torch.logaddexp(result.logprobs.double().logsumexp(dim=1), result.tail_logmass.double())
    assert torch.allclose(mass, torch.zeros(rows, dtype=torch.float64), atol=1e-5)


def _save_qwen2(path: Path, *, tie: bool) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
        tie_word_embeddings=tie,
    )
    model = Qwen2ForCausalLM(config).eval()
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("tie", [False, True])
def test_output_head_is_read_from_safetensors(tmp_path: Path, tie: bool) -> None:
    model = _save_qwen2(tmp_path, tie=tie)
    head = load_output_head(tmp_path)
    assert torch.equal(head.weight, model.lm_head.weight.detach())
    ids = torch.arange(12)[None]
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state[0]
        logits = model(input_ids=ids).logits[0]
    targets = torch.arange(1, 13) % 300
    assert_matches(topk_from_hidden(hidden, head, targets, 10, 5), logits, targets, 10)


def test_missing_weights_are_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="safetensors"):
        load_output_head(tmp_path)
    from safetensors.numpy import save_file

    save_file({"model.norm.weight": np.ones(4, np.float32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match="output head"):
        load_output_head(tmp_path)


def test_bfloat16_head_logits_are_float32_and_the_weight_is_held_once() -> None:
    """A bfloat16 teacher: logits of 16 to 32 would be rounded to multiples of 0.125 nat in bfloat16 (up
    to 1/16 nat of error, 3x the codec's bound). The head's logits must be float32-exact for the bfloat16
    inputs, and the head must hold one copy of its weight (the padded one), not two."""
    gen = torch.Generator().manual_seed(3)
    vocab, width = 1000, 64
    weight = (torch.randn(vocab, width, generator=gen) / width**0.5).bfloat16()
    hidden = (torch.randn(40, width, generator=gen) * 4).bfloat16()
    hidden[:, 0] = 60.0
    weight[:, 0] = 0.4  # lifts every logit by 24: the top ones lie in [16, 32)
    logits = hidden.double() @ weight.double().T
    assert logits.max(1).values.min() > 16
    targets = torch.randint(0, vocab, (40,), generator=gen)
    head = OutputHead(weight)
    assert_matches(topk_from_hidden(hidden, head, targets, 16, 16), logits, targets, 16, atol=1e-4)
    assert head.weight.untyped_storage().data_ptr() == head._weight.untyped_storage().data_ptr()
    torch.testing.assert_close(head.weight.double(), weight.double(), rtol=0, atol=0)


def _save_phi(path: Path) -> torch.nn.Module:
    from transformers import PhiConfig, PhiForCausalLM

    torch.manual_seed(0)
    config = PhiConfig(
        vocab_size=300, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
    )
    model = PhiForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.bias.normal_(0, 2.0)  # a bias that reorders the top-k
    model.save_pretrained(path)
    return model


def test_output_head_bias_is_read_and_applied(tmp_path: Path) -> None:
    """Phi, GPT-J and others add a bias to the logits: it comes with the head from the safetensors."""
    model = _save_phi(tmp_path)
    head = load_output_head(tmp_path)
    assert head.bias is not None and torch.equal(head.bias, model.lm_head.bias.detach())
    ids = torch.arange(12)[None]
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state[0]
        logits = model(input_ids=ids).logits[0]
    targets = torch.arange(1, 13) % 300
    assert_matches(topk_from_hidden(hidden, head, targets, 10, 5), logits, targets, 10)
