"""pipeline/student/distill.py: batch layout and alignment, chunked head loss == dense autograd, any chunk size."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_losses import make_teacher, reference
from transformers import AutoModelForCausalLM

from pipeline.records import CacheSample
from pipeline.student.distill import ChunkedHeadLoss, collate, distillation_loss, output_head, teacher_rows
from pipeline.student.losses import KDLossSpec


def sample(sample_id: str, input_ids: list[int], positions: list[int], vocab: int, k: int, seed: int):
    teacher = make_teacher(len(positions), vocab, k, seed)
    return CacheSample(
        sample_id,
        torch.tensor(input_ids),
        torch.tensor(positions),
        teacher.topk_ids,
        teacher.topk_logprobs,
        torch.zeros(len(positions)),
        teacher.tail_logmass,
    )


def test_collate_alignment_by_hand():
    """Response x_3, x_4 of sample a and x_2 of b: rows predict them from positions 2, 3 and 1."""
    a = sample("a", [10, 11, 12, 13, 14], [3, 4], vocab=20, k=4, seed=0)
    b = sample("b", [20, 21, 22], [2], vocab=30, k=4, seed=1)
    batch = collate([[a], [b]], pad_id=0, max_seq_length=100)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 13, 14], [20, 21, 22, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["row_index"].tolist() == [0, 0, 1]
    assert batch["col_index"].tolist() == [2, 3, 1]
    assert batch["targets"].tolist() == [13, 14, 22]
    assert torch.equal(batch["topk_ids"][0], torch.cat([a.topk_ids, b.topk_ids]))
    cut = collate([[a], [b]], pad_id=0, max_seq_length=4)
    assert cut["input_ids"].shape == (2, 4) and cut["targets"].tolist() == [13, 22]
    assert torch.equal(cut["tail_logmass"][0], torch.cat([a.tail_logmass[:1], b.tail_logmass]))


@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_head_matches_dense_autograd(with_bias):
    n, hidden_size, vocab = 37, 16, 90
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, hidden_size, generator=gen)
    weight = torch.randn(vocab, hidden_size, generator=gen) * 0.5
    bias = torch.randn(vocab, generator=gen) if with_bias else None
    targets = torch.randint(0, vocab, (n,), generator=gen)
    teachers = [make_teacher(n, vocab, 8, seed=1), make_teacher(n, vocab, 5, seed=2)]
    spec = KDLossSpec(kd_ratio=0.7, distillation_type="jsd", temperature=1.5, teacher_weights=(0.4, 0.6))
    w_ce, w_kd = spec.token_weights(n)

    params = [t.double().requires_grad_(True) for t in (hidden, weight) + ((bias,) if with_bias else ())]
    z = params[0] @ params[1].T + (params[2] if with_bias else 0)
    ce_ref, kd_ref = reference(z, targets, teachers, spec)
    (w_ce * ce_ref + w_kd * kd_ref).backward()

    for chunk_size in (1, 8, 37, 1000):
        leaves = [t.clone().requires_grad_(True) for t in (hidden, weight) + ((bias,) if with_bias else ())]
        head_bias = leaves[2] if with_bias else None
        loss, ce, kd = ChunkedHeadLoss.apply(
            leaves[0], leaves[1], head_bias, targets, teachers, spec, w_ce, w_kd, chunk_size
        )
        (2.0 * loss).backward()  # backward scales the gradients computed in forward
        torch.testing.assert_close(ce.double(), ce_ref.detach(), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(kd.double(), kd_ref.detach(), rtol=1e-4, atol=1e-4)
        for leaf, param in zip(leaves, params, strict=True):
            torch.testing.assert_close(leaf.grad.double(), 2.0 * param.grad, rtol=1e-4, atol=1e-5)


def test_student_forward_uses_logits_at_t_minus_1(tiny_student_dir):
    """The loss from hidden states at response positions equals the loss on the model's own logits."""
    model = AutoModelForCausalLM.from_pretrained(tiny_student_dir, dtype=torch.float32)
    vocab = model.config.vocab_size
    a = sample("a", list(range(5, 17)), [6, 7, 11], vocab=vocab, k=16, seed=3)
    b = sample("b", list(range(40, 47)), [3, 4, 5, 6], vocab=vocab, k=16, seed=4)
    batch = collate([[a], [b]], pad_id=0, max_seq_length=64)
    spec = KDLossSpec()
    parts = distillation_loss(model, output_head(model), batch, spec, num_tokens=7, chunk_size=3)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    rows = torch.cat([logits[0, [5, 6, 10]], logits[1, [2, 3, 4, 5]]]).double()
    ce, kd = reference(rows, batch["targets"], teacher_rows(batch), spec)
    assert parts.tokens == 7
    torch.testing.assert_close(parts.ce_sum.double(), ce, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(parts.kd_sum.double(), kd, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(parts.loss.double(), (0.5 * ce + 0.5 * kd) / 7, rtol=1e-5, atol=1e-5)


def test_target_class_reaches_the_loss(tiny_student_dir):
    """`distillation.target_class` -> KDLossSpec -> the actual token joins the teacher's classes in the loss."""
    from pipeline.config import config_from_dict
    from pipeline.student.losses import with_target_class

    config = config_from_dict({"distillation": {"target_class": True}}, Path("."))
    spec = KDLossSpec.from_config(config.distillation, 1)
    assert spec.target_class
    model = AutoModelForCausalLM.from_pretrained(tiny_student_dir, dtype=torch.float32)
    vocab = model.config.vocab_size
    a = sample("a", list(range(5, 17)), [6, 7, 11], vocab=vocab, k=16, seed=3)
    a.target_logprobs = a.tail_logmass - 1.0  # the actual tokens hold e^-1 of each row's tail
    batch = collate([[a]], pad_id=0, max_seq_length=64)
    assert not (a.topk_ids == batch["targets"][:, None]).any()  # every target lies outside the top-k
    with_class = distillation_loss(model, output_head(model), batch, spec, num_tokens=3, chunk_size=2)
    without = distillation_loss(
        model, output_head(model), batch, KDLossSpec(target_class=False), num_tokens=3, chunk_size=2
    )
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits[0, [5, 6, 10]].double()
    rows = [with_target_class(teacher_rows(batch)[0], batch["targets"], batch["target_logprobs"][0])]
    _, kd = reference(logits, batch["targets"], rows, spec)
    torch.testing.assert_close(with_class.kd_sum.double(), kd, rtol=1e-5, atol=1e-4)
    assert abs(with_class.kd_sum.item() - without.kd_sum.item()) > 1e-3


@pytest.mark.parametrize("hidden_dtype", [torch.float16, torch.float32])
def test_fp16_mixed_precision_step_matches_float64(hidden_dtype):
    """`training.fp16`: autocast float16 with a GradScaler at its initial scale 65536, and a step's worth of
    tokens (65,536) in the loss weights, so per-entry gradients w_ce * q_j lie below float16's range.
    The unscaled gradients must match float64 (no underflow) and the scaler must find no inf (no NaN
    first step). The hidden states come from a float32 layer run under autocast: float16 output, like
    a float16 network; float32 where the model keeps its residual stream in float32 (Qwen2 under AMP)."""
    n, width, vocab = 512, 64, 4096
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, width, generator=gen)
    proj = torch.nn.Linear(width, width, bias=False)
    head = torch.nn.Linear(width, vocab, bias=False)
    with torch.no_grad():
        proj.weight.copy_(torch.randn(width, width, generator=gen) / width**0.5)
        head.weight.copy_(torch.randn(vocab, width, generator=gen) * 0.3)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    teachers = [make_teacher(n, vocab, 16, seed=1)]
    spec = KDLossSpec(kd_ratio=0.5)
    w_ce, w_kd = spec.token_weights(65536)

    params64 = [p.detach().double().requires_grad_(True) for p in (proj.weight, head.weight)]
    ce_ref, kd_ref = reference((x.double() @ params64[0].T) @ params64[1].T, targets, teachers, spec)
    (w_ce * ce_ref + w_kd * kd_ref).backward()

    optimizer = torch.optim.SGD([proj.weight, head.weight], lr=0.0)
    scaler = torch.amp.GradScaler("cpu")
    with torch.autocast("cpu", dtype=torch.float16):
        hidden = proj(x).to(hidden_dtype)
        assert hidden.dtype == hidden_dtype
        loss, _, _ = ChunkedHeadLoss.apply(hidden, head.weight, None, targets, teachers, spec, w_ce, w_kd, 128)
    assert torch.isfinite(scaler.scale(loss)), "the scaled loss overflowed"
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 65536.0, "the scaler found inf/NaN gradients and skipped the step"
    for param, ref in zip((proj.weight, head.weight), params64, strict=True):
        error = (param.grad.double() - ref.grad).norm() / ref.grad.norm()
        assert error < 5e-3, f"relative gradient error {error:.2e}"
