"""Cross-tokenizer distillation losses, fused with the student's CE over one chunk of its logits.

Per student response row r (logits z_r, softmax q_r over the student's vocabulary, actual next token t_r):

    CE       -log q_r(t_r), as in same-tokenizer training.
    chunk    (ALM-style, from the cached target log-probs) for each aligned chunk c
             (pipeline.cross_tokenizer.alignment): l_T(c) = sum of the teacher's log p(x) over its tokens of
             c (the cache's target_logprobs), l_S(c) = sum of log q_r(t_r) over the student's rows of c. With
             a = l_T / tau, b = l_S / tau (tau = `chunk_temperature`), P = e^a, Q = e^b, the binarised KL
                 D(c) = P (a - b) + (1 - P) (log(1 - P) - log(1 - Q)),
             the KL between "the chunk's text follows" and "it does not" under teacher and student; the
             term is tau D(c), whose derivative by l_S is dD/db = (Q - P) / (1 - Q), and d l_S / dz_r =
             e_{t_r} - q_r for every row r of the chunk. Why tau: at tau = 1 an unlikely chunk (P, Q << 1, as
             for most chunks of a flat teacher) gives dD/db ~ Q - P ~ 0, no signal at all; as tau grows,
             dD/db -> l_T / l_S - 1, a signal of the same size for every chunk, likely or not.
    shared   (GOLD-style) at the start of every aligned chunk, where the student's first token of the chunk
             and the teacher's begin at the same character: forward KL between the teacher's targets there,
             their ids mapped into the student's vocabulary (same text, else the student's first token of
             that text: pipeline.cross_tokenizer.vocab; teacher tokens mapped to one student token are one
             class with their summed mass), and the student over the same classes S plus one class for the
             rest of each vocabulary: sum_{i in S} p_i log(p_i / q_i) + p_rest log(p_rest / q_rest). The
             targets (pipeline.cross_tokenizer.batches.shared_targets) are the exact top-k plus, from a cache
             with tail samples (`distillation.tail` auto or sampled), each sampled tail token j at
             r c_j / U: then p_rest is only the mass of entries without a student token, and where every
             teacher token maps, E[p] is the teacher's distribution projected onto the student's tokens,
             so the gradient q - p is unbiased, as in same-tokenizer sampled KD. Without samples (tail
             bucket) p_rest also holds the whole tail mass r, as in the top-k bucket loss.
    uld      (Boizard et al. 2024) sum_{i <= k} |p_(i) - q_(i)| between the teacher's k largest probabilities
             (the cached top-k of the teacher row whose token holds the student token's first character)
             and the student's k largest: no ids are compared, so no alignment of vocabularies is needed.
    loss     (1 - kd_ratio) CE + kd_ratio KD, KD the sum of the selected terms; every sum over chunks or rows
             is divided once by the optimizer step's response tokens (the student's), as in
             pipeline.student.losses.

All terms are differentiated by hand and share one dense pass over the chunk's [n, V] logits (the head's
matmul dominates); `chunk_bounds` cuts the rows so that no aligned chunk is split between head chunks.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from pipeline.student.losses import _divergence_and_grad, _exp_rows_

CrossTokenizerLoss = Literal["uld", "chunk", "chunk+shared"]
CROSS_TOKENIZER_LOSSES = ("uld", "chunk", "chunk+shared")
_NEG_INF = float("-inf")


@dataclass
class CrossRows:
    """The teacher signal of a cross-tokenizer batch, row for row with the student's response rows."""

    chunk: Tensor  # int64 [N] the row's aligned chunk (an index into chunk_logprob), -1 in none
    chunk_logprob: Tensor  # float64 [C] l_T(c): the teacher's log-probability of each chunk
    shared_ids: Tensor  # int64 [N, k] teacher top-k in student ids, each once; where shared_logprobs is finite
    shared_logprobs: Tensor  # float32 [N, k] their teacher log-probs; -inf = no class (unmapped, or no chunk start)
    shared_rest: Tensor  # float32 [N] log p_rest; NaN on rows without the shared term
    uld_probs: Tensor  # float32 [N, k] the paired teacher row's top-k probabilities, descending; NaN row = unpaired

    def narrow(self, start: int, length: int) -> CrossRows:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return CrossRows(**{
            name: value if name == "chunk_logprob" else value.narrow(0, start, length)
            for name, value in fields.items()
        })

    def chunk_bounds(self, chunk_size: int) -> list[tuple[int, int]]:
        """Row ranges of about `chunk_size` rows that never split an aligned chunk."""
        n = self.chunk.shape[0]
        starts_chunk = torch.ones(n, dtype=torch.bool)
        if n > 1:
            same = (self.chunk[1:] == self.chunk[:-1]) & (self.chunk[1:] >= 0)
            starts_chunk[1:] = ~same
        cuts = torch.nonzero(starts_chunk).squeeze(1).tolist() + [n]
        bounds, start = [], 0
        while start < n:
            limit = start + chunk_size
            end = max((c for c in cuts if start < c <= limit), default=None)
            if end is None:  # a chunk longer than chunk_size rows: take it whole
                end = next(c for c in cuts if c > start)
            bounds.append((start, end))
            start = end
        return bounds


def binary_kl(teacher_logprob: Tensor, student_logprob: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """Per chunk tau D(c) and its derivative by l_S(c) (float64), the binarised KL of the module docstring."""
    a = (teacher_logprob.double() / tau).clamp(max=0.0)
    # Q = 1 would make log(1 - Q) infinite; a float32 student can round a sure chunk to exactly 1.
    b = (student_logprob.double() / tau).clamp(max=-1e-12)
    p, q = a.exp(), b.exp()
    d = p * (a - b) + torch.xlogy(1 - p, (-torch.expm1(a)).clamp(min=0.0)) - (1 - p) * _log1mexp(b)
    grad_b = (q - p) / (-torch.expm1(b))
    return tau * d, grad_b  # tau D: d(tau D) / d l_S = dD / db


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - e^x) for x < 0, accurate on both sides of -log 2."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def cross_loss_and_grad(
    z: Tensor,
    targets: Tensor,
    rows: CrossRows,
    loss: CrossTokenizerLoss,
    chunk_temperature: float,
    w_ce: float | Tensor,
    w_kd: float | Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """(CE sum, KD sum, dz) over one head chunk: dz = d(w_ce CE_sum + w_kd KD_sum) / dz, in z's storage.

    Every aligned chunk must lie wholly inside the rows given (see `CrossRows.chunk_bounds`).
    """
    n, vocab = z.shape
    z_target = z.gather(1, targets[:, None]).squeeze(1)
    use_shared = loss == "chunk+shared"
    if use_shared:
        valid_s = torch.isfinite(rows.shared_logprobs) & (rows.shared_ids >= 0) & (rows.shared_ids < vocab)
        has_valid = valid_s.any(1, keepdim=True)
        # Entries that are no class point at the row's first class (written 0 like it) or, in rows with no
        # class at all, at the target (rewritten with its own value): scatters never disturb anything else.
        first = rows.shared_ids.gather(1, valid_s.int().argmax(1, keepdim=True)).clamp(0, vocab - 1)
        fallback = torch.where(has_valid, first, targets[:, None])
        ids_s = torch.where(valid_s, rows.shared_ids, fallback)
        u_s = z.gather(1, ids_s)
    if loss == "uld":
        k = rows.uld_probs.shape[1]
        top_z, top_ids = z.topk(min(k, vocab), dim=1)

    buf = z
    lse, inv_total = _exp_rows_(buf)  # buf = exp(z - rowmax); q = buf * inv_total
    logq_t = z_target - lse
    ce_sum = -logq_t.sum()
    kd_sum = z.new_zeros((), dtype=torch.float64)
    coef_all = torch.full((n,), 1.0, dtype=torch.float32) * w_ce  # dz_j += coef_all q_j, for every j
    at_target = coef_all.clone()  # dz_t -= at_target (CE's and the chunk term's e_t)
    sparse: list[tuple[Tensor, Tensor]] = []

    if loss in ("chunk", "chunk+shared"):
        in_chunk = rows.chunk >= 0
        if in_chunk.any():
            chunks, local = torch.unique(rows.chunk[in_chunk], return_inverse=True)
            l_s = torch.zeros(len(chunks), dtype=torch.float64).index_add_(0, local, logq_t[in_chunk].double())
            d, grad = binary_kl(rows.chunk_logprob[chunks], l_s, chunk_temperature)
            kd_sum = kd_sum + d.sum()
            g = torch.zeros(n, dtype=torch.float32)
            g[in_chunk] = grad[local].float()
            coef_all = coef_all - w_kd * g  # d l_S / dz_r = e_t - q_r
            at_target = at_target - w_kd * g

    if loss == "uld":
        paired = torch.isfinite(rows.uld_probs).all(1)
        q_top = (top_z - lse[:, None]).exp()
        p_top = torch.nan_to_num(rows.uld_probs[:, : q_top.shape[1]], nan=0.0)
        sign = torch.sign(q_top - p_top) * paired[:, None]
        kd_sum = kd_sum + ((q_top - p_top).abs() * paired[:, None]).sum().double()
        weighted = w_kd * sign * q_top  # d q_(i) / dz_j = q_(i) ([j = j_i] - q_j)
        coef_all = coef_all - weighted.sum(1)
        sparse.append((top_ids, weighted))

    coef_rest = None
    if use_shared:
        active = torch.isfinite(rows.shared_rest) | valid_s.any(1)
        q_s = (u_s - lse[:, None]).exp() * valid_s
        saved = buf.gather(1, ids_s)
        buf.scatter_(1, ids_s, torch.where(has_valid, torch.zeros_like(saved), saved))  # buf now excludes S
        rest = buf.sum(1) * inv_total  # q_rest, summed outside S: exact, no 1 - sum(q_S) cancellation
        has_rest = rest > 0
        logq = torch.cat([torch.log(q_s.clamp(min=1e-45)), rest.clamp(min=1e-45).log()[:, None]], 1)
        p_rest = torch.nan_to_num(rows.shared_rest, nan=_NEG_INF)
        logp = torch.cat([rows.shared_logprobs, p_rest[:, None]], 1)
        valid = torch.cat([valid_s, (has_rest & torch.isfinite(p_rest))[:, None]], 1) & active[:, None]
        kl, g = _divergence_and_grad("forward_kld", logp, logq, valid)
        kd_sum = kd_sum + kl.sum().double()
        big_g = g.sum(1)
        # dKL/dz_j = g_j [j in S] + g_rest q_j / q_rest [j not in S] - G q_j
        coef_all = coef_all - w_kd * big_g
        coef_rest = torch.where(has_rest, w_kd * g[:, -1] / rest.clamp(min=1e-45), 0.0)
        sparse.append((ids_s, (w_kd * g[:, :-1] + q_s * coef_all[:, None]).masked_fill(~valid_s, 0.0)))

    total = coef_all if coef_rest is None else coef_all + coef_rest
    dz = buf.mul_((total * inv_total)[:, None])
    for ids, values in sparse:
        dz.scatter_add_(1, ids, values)
    dz.scatter_add_(1, targets[:, None], -at_target[:, None])
    return ce_sum, kd_sum.float(), dz
