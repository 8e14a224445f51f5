"""The student side of distillation: cache rows -> batches, final hidden states at the response positions,
and the output head applied chunk by chunk with the fused sparse loss of pipeline.student.losses.

Only response positions ever reach the head, and no [positions, vocab] tensor outlives its chunk: the
forward pass computes each chunk's gradient with respect to the hidden states right away (the loss
is a scalar, so backward only scales it), which is cheaper than recomputing the head in backward.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from pipeline.cross_tokenizer.loss import CrossRows, cross_loss_and_grad
from pipeline.errors import UserError
from pipeline.records import CacheSample
from pipeline.student.head_loss import DistillationHead, HeadRequest
from pipeline.student.losses import KDLossSpec, TeacherRows, chunk_loss_and_grad, with_target_class

# Config attributes of architectures whose logits are not a plain linear map of the hidden states.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def collate(items: Sequence[Sequence[CacheSample]], pad_id: int, max_seq_length: int) -> dict[str, Any]:
    """Pad the token ids of a batch and flatten every response row into [N] / [N, k] tensors.

    items: per sample, its CacheSample from each teacher (same token ids and positions). Sequences
    longer than max_seq_length are cut, with the response rows beyond the cut.
    """
    lengths = [min(len(item[0].input_ids), max_seq_length) for item in items]
    keeps = [item[0].positions < length for item, length in zip(items, lengths, strict=True)]
    tokens = token_batch(
        [item[0].input_ids[:length] for item, length in zip(items, lengths, strict=True)],
        [item[0].positions[keep] for item, keep in zip(items, keeps, strict=True)],
        pad_id,
    )
    num_teachers = len(items[0])

    def stack(field: str, w: int) -> Tensor:
        return torch.cat([getattr(item[w], field)[keep] for item, keep in zip(items, keeps, strict=True)])

    def stack_padded(field: str, w: int, fill: float) -> Tensor | None:
        """Sampled-tail fields: rows of different samples hold different numbers of unique ids."""
        parts = [getattr(item[w], field) for item in items]
        if parts[0] is None:
            return None
        width = max(p.shape[1] for p in parts)
        return torch.cat(
            [
                torch.nn.functional.pad(p[keep], (0, width - p.shape[1]), value=fill)
                for p, keep in zip(parts, keeps, strict=True)
            ]
        )

    return {
        **tokens,
        "topk_ids": [stack("topk_ids", w) for w in range(num_teachers)],
        "topk_logprobs": [stack("topk_logprobs", w) for w in range(num_teachers)],
        "tail_logmass": [stack("tail_logmass", w) for w in range(num_teachers)],
        "target_logprobs": [stack("target_logprobs", w) for w in range(num_teachers)],
        "sample_ids": [stack_padded("sample_ids", w, 0) for w in range(num_teachers)],
        "sample_counts": [stack_padded("sample_counts", w, 0) for w in range(num_teachers)],
        "sample_logprobs": [stack_padded("sample_logprobs", w, float("-inf")) for w in range(num_teachers)],
    }


def token_batch(sequences: Sequence[Tensor], positions: Sequence[Tensor], pad_id: int) -> dict[str, Tensor]:
    """Padded token ids and attention mask, and where each response row's logits are: x_t is predicted
    from position t - 1 (`col_index`) of sequence `row_index`; `targets` are the x_t."""
    input_ids = torch.full((len(sequences), max(len(s) for s in sequences)), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    rows, cols = [], []
    for b, (ids, pos) in enumerate(zip(sequences, positions, strict=True)):
        input_ids[b, : len(ids)] = ids
        attention_mask[b, : len(ids)] = 1
        rows.append(torch.full_like(pos, b))
        cols.append(pos - 1)
    row_index, col_index = torch.cat(rows), torch.cat(cols)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "row_index": row_index,
        "col_index": col_index,
        "targets": input_ids[row_index, col_index + 1],
    }


def teacher_rows(batch: dict[str, Any], target_class: bool = False) -> list[TeacherRows]:
    """One TeacherRows per teacher; with `target_class`, the actual next token joins each teacher's classes."""
    num = len(batch["topk_ids"])
    fields = ("sample_ids", "sample_counts", "sample_logprobs")
    samples = zip(*(batch.get(f, [None] * num) for f in fields), strict=True)
    rows = [
        TeacherRows(ids, logprobs, tail, *sampled)
        for ids, logprobs, tail, sampled in zip(
            batch["topk_ids"], batch["topk_logprobs"], batch["tail_logmass"], samples, strict=True
        )
    ]
    if target_class:
        rows = [
            with_target_class(r, batch["targets"], target)
            for r, target in zip(rows, batch["target_logprobs"], strict=True)
        ]
    return rows


def output_head(model: Any) -> torch.nn.Linear:
    """The student's output layer, checked to be a plain linear map we may apply ourselves."""
    head = model.get_output_embeddings()
    if type(head) not in (torch.nn.Linear, DistillationHead):
        raise UserError(
            f"The student's output layer is a {type(head).__name__}, not a plain Linear (is `lm_head` a LoRA "
            "target?). The distillation loss applies the output head itself: leave lm_head out of "
            "`lora.target_modules`."
        )
    config = getattr(model, "config", None)
    for name in _LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            raise UserError(f"Students whose logits use `{name}` ({value}) are not supported yet.")
    return head


def accepts_logits_to_keep(model: Any) -> bool:
    """Whether forward() takes `logits_to_keep` (transformers >= 4.50 causal LMs)."""
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def response_hidden_states(model: Any, batch: dict[str, Any], logits_to_keep: bool = True) -> Tensor:
    """Final (normed) hidden states at positions t - 1 for every response row: [N, hidden].

    `model` may be wrapped (PEFT, DDP): the call goes through its forward so DDP sees it.
    """
    extra = {"logits_to_keep": 1} if logits_to_keep else {}  # the head runs on one position only
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        output_hidden_states=True,
        use_cache=False,
        **extra,
    )
    return out.hidden_states[-1][batch["row_index"], batch["col_index"]]


@dataclass
class LossParts:
    loss: Tensor  # w_ce * CE_sum + w_kd * KD_sum: this batch's share of the optimizer step's loss
    ce_sum: Tensor  # detached sums over this batch's response tokens
    kd_sum: Tensor
    tokens: int


def distillation_loss(
    model: Any,
    head: torch.nn.Linear,
    batch: dict[str, Any],
    spec: KDLossSpec,
    num_tokens: int | Tensor,
    chunk_size: int,
    logits_to_keep: bool = True,
) -> LossParts:
    """Student forward + sparse KD/CE loss, normalized by `num_tokens` (the whole optimizer step's count).

    With `head` a DistillationHead (installed by the trainer) the loss runs inside the head's forward, so
    under FSDP2 or ZeRO-3 it reads the gathered weight; a plain Linear is applied after the forward.
    """
    w_ce, w_kd = spec.token_weights(num_tokens)
    teachers = batch["cross"] if "cross" in batch else teacher_rows(batch, spec.target_class)

    def loss_fn(rows: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        return ChunkedHeadLoss.apply(rows, weight, bias, batch["targets"], teachers, spec, w_ce, w_kd, chunk_size)

    if isinstance(head, DistillationHead):
        head.request = request = HeadRequest(batch, loss_fn)
        try:  # logits_to_keep stays at its default (all positions): the head picks the response rows
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        finally:
            head.request = None
        ce_sum, kd_sum = request.ce_sum, request.kd_sum
    else:
        hidden = response_hidden_states(model, batch, logits_to_keep)
        loss, ce_sum, kd_sum = loss_fn(hidden, head.weight, head.bias)
    return LossParts(loss.reshape(()), ce_sum, kd_sum, int(batch["targets"].numel()))


class ChunkedHeadLoss(torch.autograd.Function):
    """loss = w_ce * CE_sum + w_kd * KD_sum over rows of `hidden`, with logits = hidden @ weight.T + bias
    formed `chunk_size` rows at a time. Gradients are computed during forward and only scaled in backward.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        teachers: list[TeacherRows] | CrossRows,
        spec: KDLossSpec,
        w_ce: float | Tensor,
        w_kd: float | Tensor,
        chunk_size: int,
    ) -> tuple[Tensor, Tensor, Tensor]:
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_bias = bias is not None and ctx.needs_input_grad[2]
        # float32 whatever the hidden dtype: these are the unscaled gradients, whose entries (about
        # w_ce * q_j) lie below float16's range; backward's grad_loss carries a GradScaler's factor.
        grad_hidden = torch.empty_like(hidden, dtype=torch.float32) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if need_bias else None
        ce_total = hidden.new_zeros((), dtype=torch.float32)
        kd_total = hidden.new_zeros((), dtype=torch.float32)
        # The head's matmuls run in the autocast dtype when mixed precision is on (out= escapes autocast).
        device = hidden.device.type
        mm_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        w = weight.to(mm_dtype)
        b = None if bias is None else bias.to(mm_dtype)
        # One logits buffer for all chunks: each chunk's logits become its gradient in place and are
        # dead after the two matmuls, and a fresh [chunk, vocab] allocation costs page faults each time.
        bounds = _row_chunks(hidden.shape[0], chunk_size, teachers)
        workspace = hidden.new_empty((max((e - s for s, e in bounds), default=0), weight.shape[0]), dtype=mm_dtype)
        for start, end in bounds:
            rows = end - start
            h = hidden.narrow(0, start, rows).to(mm_dtype)
            z = workspace.narrow(0, 0, rows)
            if b is None:
                torch.matmul(h, w.t(), out=z)
            else:
                torch.addmm(b, h, w.t(), out=z)
            if isinstance(teachers, CrossRows):
                ce, kd, dz = cross_loss_and_grad(
                    z.float(), targets.narrow(0, start, rows), teachers.narrow(start, rows),
                    spec.cross_tokenizer, spec.chunk_temperature, w_ce, w_kd,
                )
            else:
                ce, kd, dz = chunk_loss_and_grad(
                    z.float(), targets.narrow(0, start, rows), [t.narrow(start, rows) for t in teachers], spec,
                    w_ce, w_kd,
                )
            ce_total += ce
            kd_total += kd
            if grad_hidden is not None:
                grad_hidden.narrow(0, start, rows).copy_(_matmul_scaled(dz, w))
            if grad_weight is not None:
                grad_weight.addmm_(dz.t(), h.float())
            if grad_bias is not None:
                grad_bias += dz.sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.weight_dtype = weight.dtype
        ctx.mark_non_differentiable(ce_total, kd_total)
        return w_ce * ce_total + w_kd * kd_total, ce_total, kd_total

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
        grad_hidden, grad_weight, grad_bias = (
            None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors
        )
        if grad_weight is not None:
            grad_weight = grad_weight.to(ctx.weight_dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(ctx.weight_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None


def _row_chunks(n: int, chunk_size: int, teachers: list[TeacherRows] | CrossRows) -> list[tuple[int, int]]:
    """The head's row ranges: `chunk_size` rows each, except that an aligned cross-tokenizer chunk is never split."""
    if isinstance(teachers, CrossRows):
        return teachers.chunk_bounds(chunk_size)
    return [(start, min(start + chunk_size, n)) for start in range(0, n, chunk_size)]


def _matmul_scaled(dz: Tensor, w: Tensor) -> Tensor:
    """float32 dz @ w with the matmul in w's dtype: in float16, dz's entries (a loss weight of 1 / tokens
    times q_j) would flush to zero, so each row is scaled by a power of two to a maximum in [1, 2) first
    (exact) and scaled back after, in float32."""
    if w.dtype == torch.float32:
        return dz @ w
    row_max = dz.abs().amax(1, keepdim=True)
    scale = torch.exp2(torch.floor(torch.log2(row_max))).masked_fill_(row_max == 0, 1.0)
    return ((dz / scale).to(w.dtype) @ w).float().mul_(scale)
