"""Sparse distillation losses against a teacher's cached top-k, one chunk of student logits at a time.

Per response token t (student logits z = z_{t-1}, teacher top-k ids S with log-probs a, tail log-mass
log r; DESIGN.md "Losses"):

    student  log q = log_softmax(z / T) over the FULL vocabulary, gathered at S
             tail "bucket":      log q_tail = logsumexp(z/T without S) - logsumexp(z/T)   (exact, stable)
             tail "renormalize": log q renormalized over S, no tail class
    teacher  p ∝ exp(a / T) over S, plus the tail class exp(log r / T) for "bucket", renormalized.
             Tempering the tail as one class (r^(1/T)) is an approximation: the true tempered tail is
             sum_{j not in S} p_j^(1/T), which the cache does not hold. At T = 1 it is exact.
    sampled  (a cache with a sampled tail, pipeline.teacher.tail_sampling) the tail class is replaced by the
             sampled ids with target p_hat_j = r c_j / U, the student's mass elsewhere gets target 0;
             forward_kld only: its gradient q - p_hat is unbiased for the full-vocabulary q - p.
             At T != 1 the tempered targets are self-normalized importance weights: p_i^(1/T) on S,
             (r / U) c_j p_j^(1/T - 1) on sampled ids, normalized together (consistent, slightly biased).
    KD       forward_kld  sum p (log p - log q)      reverse_kld  sum q (log q - log p)
             jsd          (KL(p||m) + KL(q||m)) / 2, m = (p + q) / 2      tvd  sum |p - q| / 2
             over the classes (S and the tail); with several teachers KD = sum_w weight_w * KD_w.
    CE       -log_softmax(z)[x_t] at T = 1.
    loss     (1 - kd_ratio) * CE + kd_ratio * T^2 * KD, each a SUM over tokens divided once by the
             number of response tokens of the whole optimizer step (the caller's `num_tokens`).

Conventions for degenerate entries (never NaN): a top-k entry with log-prob -inf, or an id beyond the
student's vocabulary, is no class on either side (a student token it names stays in the tail); when S
covers the whole vocabulary there is no tail class; a teacher tail of exactly zero mass (float32
rounding of 1 - sum p) is floored at exp(LOG_PROB_FLOOR) in reverse_kld, whose log p would otherwise
be -inf.

`chunk_loss_and_grad` returns the values and the gradient with respect to the chunk's logits in one
pass, so the caller never keeps [positions, vocab] tensors for backward (see pipeline/student/distill.py).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import Tensor

DistillationType = Literal["forward_kld", "reverse_kld", "jsd", "tvd"]
TailMode = Literal["auto", "bucket", "renormalize", "sampled"]
LOG_PROB_FLOOR = -100.0  # reverse_kld only: a teacher class with p == 0 counts as p = e^-100
_NEG_INF = float("-inf")


@dataclass(frozen=True)
class KDLossSpec:
    """The `distillation` settings the loss needs; teacher_weights sum to 1, one per teacher."""

    kd_ratio: float = 0.5
    distillation_type: DistillationType = "forward_kld"
    temperature: float = 1.0
    tail: TailMode = "auto"
    teacher_weights: tuple[float, ...] = (1.0,)
    target_class: bool = False
    cross_tokenizer: str | None = None  # pipeline.cross_tokenizer.loss: "uld", "chunk" or "chunk+shared"
    chunk_temperature: float = 10.0

    @classmethod
    def from_config(cls, distillation, num_teachers: int) -> KDLossSpec:
        """From a `pipeline.config.DistillationConfig`; weights default to equal and are normalized."""
        weights = distillation.teacher_weights or [1.0] * num_teachers
        total = sum(weights)
        return cls(
            kd_ratio=distillation.kd_ratio,
            distillation_type=distillation.distillation_type,
            temperature=distillation.temperature,
            tail=distillation.tail,
            teacher_weights=tuple(w / total for w in weights),
            target_class=distillation.target_class,
            cross_tokenizer=distillation.cross_tokenizer,
            chunk_temperature=distillation.chunk_temperature,
        )

    def token_weights(self, num_tokens: int | Tensor) -> tuple[float | Tensor, float | Tensor]:
        """(w_ce, w_kd): loss = w_ce * CE_sum + w_kd * KD_sum for a step of `num_tokens` response tokens."""
        return (1.0 - self.kd_ratio) / num_tokens, self.kd_ratio * self.temperature**2 / num_tokens


@dataclass
class TeacherRows:
    """One teacher's cache entries for N response positions (rows aligned with the student's positions)."""

    topk_ids: Tensor  # int64 [N, k]
    topk_logprobs: Tensor  # float32 [N, k], may hold -inf
    tail_logmass: Tensor  # float32 [N], -inf when the top-k holds all the mass
    sample_ids: Tensor | None = None  # int64 [N, m]: a sampled-tail cache's unique tail ids
    sample_counts: Tensor | None = None  # int [N, m]: draws of each; 0 = padding
    sample_logprobs: Tensor | None = None  # float32 [N, m]: their teacher log-probs

    def narrow(self, start: int, length: int) -> TeacherRows:
        return TeacherRows(
            *(None if t is None else t.narrow(0, start, length) for t in dataclasses.astuple(self))
        )

    @property
    def sampled(self) -> bool:
        return self.sample_ids is not None


def tail_mode(spec_tail: TailMode, rows: TeacherRows) -> str:
    """The loss one teacher gets: `auto` is `sampled` for a sampled-tail cache, else `bucket`."""
    if spec_tail == "auto":
        return "sampled" if rows.sampled else "bucket"
    return spec_tail


def check_tail_settings(spec: KDLossSpec, kinds: Sequence[tuple[str, int]]) -> None:
    """Refuse loss settings a teacher's cache cannot serve; kinds: (cache kind, k) per teacher, the
    kind being "top-k", "hybrid" or "sampled" (pipeline.cache.Manifest.kind). Raises ValueError."""
    for index, (kind, k) in enumerate(kinds):
        has_samples = kind != "top-k"
        mode = "sampled" if spec.tail == "auto" and has_samples else ("bucket" if spec.tail == "auto" else spec.tail)
        who = f"teacher {index} ({kind} cache, k={k})"
        if mode == "sampled" and not has_samples:
            raise ValueError(
                f"`distillation.tail: sampled` needs a cache with tail samples, but {who} has none: "
                "regenerate it with `inference.tail_samples` > 0, or use tail `auto` or `bucket`."
            )
        if mode == "sampled" and spec.distillation_type != "forward_kld":
            raise ValueError(
                f"{who}: sampled targets give an unbiased gradient for forward_kld only; "
                f"`distillation_type: {spec.distillation_type}` has no such estimator from samples. Use "
                "forward_kld, or `distillation.tail: bucket` to train on the exact top-k and the tail mass alone."
            )
        if mode == "sampled" and spec.target_class:
            raise ValueError(
                f"{who}: `distillation.target_class` applies to the bucket tail only; a sampled tail already "
                "places the tail's mass on tokens. Set target_class to false."
            )
        if mode in ("bucket", "renormalize") and k == 0:
            raise ValueError(
                f"{who} has no exact top-k, so `distillation.tail: {mode}` has nothing to train on; use "
                "tail `auto` or `sampled`."
            )


def sampled_class_logprobs(rows: TeacherRows, valid: Tensor, temperature: float) -> Tensor:
    """log of the teacher targets over [S..., sampled ids...] at temperature T, normalized over `valid`.

    T = 1: p_i on S and r c_j / U on the sampled ids (U = the row's draws). T != 1: p_i^(1/T) and
    (r / U) c_j p_j^(1/T - 1), i.e. the tempered tail mass sum_j p_j^(1/T) = r E[p_j^(1/T - 1)] and its
    shape estimated by self-normalized importance weights.
    """
    counts = rows.sample_counts.double()
    draws = counts.sum(1, keepdim=True).clamp(min=1)
    log_w = rows.tail_logmass.double()[:, None] + torch.log(counts / draws)
    if temperature != 1:
        log_w = log_w + (1 / temperature - 1) * rows.sample_logprobs.double()
    logits = torch.cat([rows.topk_logprobs.double() / temperature, log_w], 1)
    return torch.log_softmax(logits.masked_fill(~valid, _NEG_INF), dim=1).float()


def with_target_class(rows: TeacherRows, targets: Tensor, target_logprobs: Tensor) -> TeacherRows:
    """The teacher's classes plus the actual next token, where it lies outside the top-k.

    The cache holds log p(x_t) for every response token. Where x_t is not in S_t, it becomes a class
    of its own (one more column; -inf, i.e. no class, where x_t is in S_t), and the tail keeps the
    rest of its mass: log(r - p(x_t)), computed as log r + log1p(-p(x_t) / r). Quantization can
    make p(x_t) reach r; the rest is then zero (-inf). A flatter teacher leaves the actual token
    outside its top-k more often, and that token is the one the data says matters.
    """
    in_topk = (rows.topk_ids == targets[:, None]).any(1)
    outside = ~in_topk & torch.isfinite(target_logprobs)
    extra = torch.where(outside, target_logprobs, _NEG_INF)
    share = torch.exp(extra - rows.tail_logmass).clamp(max=1.0)  # p(x_t) / r; 0 where no extra class
    tail = torch.where(outside, rows.tail_logmass + torch.log1p(-share), rows.tail_logmass)
    return TeacherRows(
        torch.cat([rows.topk_ids, targets[:, None]], 1),
        torch.cat([rows.topk_logprobs, extra[:, None].to(rows.topk_logprobs.dtype)], 1),
        tail.to(rows.tail_logmass.dtype),
    )


def teacher_class_logprobs(topk_logprobs: Tensor, tail_logmass: Tensor | None, temperature: float) -> Tensor:
    """log p over the classes [S..., tail] (tail_logmass given) or [S...] at temperature T, normalized."""
    logits = topk_logprobs if tail_logmass is None else torch.cat([topk_logprobs, tail_logmass[:, None]], 1)
    return torch.log_softmax(logits.float() / temperature, dim=1)


def divergence(kind: DistillationType, logp: Tensor, logq: Tensor, valid: Tensor) -> Tensor:
    """Per-row divergence between teacher log p and student log q over the classes marked valid.

    Invalid classes carry no mass on either side. logq is finite on valid classes; logp may be -inf
    on a valid class (zero teacher mass).
    """
    logq = logq.masked_fill(~valid, 0.0)
    logp = logp.masked_fill(~valid, 0.0)
    q = logq.exp() * valid
    p = logp.exp() * valid
    if kind == "forward_kld":
        terms = torch.xlogy(p, p) - p * logq
    elif kind == "reverse_kld":
        terms = q * (logq - logp.clamp(min=LOG_PROB_FLOOR))
    elif kind == "jsd":
        logm = torch.logaddexp(logp, logq) - math.log(2.0)
        terms = 0.5 * (torch.xlogy(p, p) - p * logm + q * (logq - logm))
    elif kind == "tvd":
        terms = 0.5 * (p - q).abs()
    else:
        raise ValueError(f"unknown distillation_type {kind!r}")
    return terms.sum(1)


def _divergence_and_grad(
    kind: DistillationType, logp: Tensor, logq: Tensor, valid: Tensor
) -> tuple[Tensor, Tensor]:
    """Per-row divergence and its gradient with respect to logq (small [n, classes] tensors)."""
    with torch.enable_grad():
        logq = logq.detach().requires_grad_(True)
        rows = divergence(kind, logp, logq, valid)
        (grad,) = torch.autograd.grad(rows.sum(), logq)
    return rows.detach(), grad


def _exp_rows_(buf: Tensor) -> tuple[Tensor, Tensor]:
    """In place buf <- exp(buf - rowmax). Returns (logsumexp of the original rows, 1 / row sum of buf).

    Rows of only -inf (nothing left after masking) give lse -inf and 1/sum 0, never NaN. Hand-rolled
    because torch.logsumexp allocates several [n, V] temporaries on CPU.
    """
    rowmax = buf.amax(1, keepdim=True)
    rowmax = torch.where(torch.isfinite(rowmax), rowmax, 0.0)
    buf.sub_(rowmax).exp_()
    total = buf.sum(1)
    lse = rowmax.squeeze(1) + total.log()
    return lse, torch.where(total > 0, 1.0 / total, 0.0)


def chunk_loss_and_grad(
    z: Tensor,
    targets: Tensor,
    teachers: Sequence[TeacherRows],
    spec: KDLossSpec,
    w_ce: float | Tensor,
    w_kd: float | Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """CE and KD sums over one chunk, and dz = d(w_ce * CE_sum + w_kd * KD_sum) / dz.

    z: float32 [n, V] student logits; its storage is reused for dz (the caller must not need z after).
    targets: int64 [n] actual next tokens. Returns (ce_sum, kd_sum, dz), the sums detached.
    """
    T = spec.temperature
    modes = [tail_mode(spec.tail, teacher) for teacher in teachers]
    dense = sum(mode in ("bucket", "sampled") for mode in modes)  # teachers that need a full [n, V] pass
    z_target = z.gather(1, targets[:, None]).squeeze(1)
    u = z if T == 1 else z / T
    # CE's softmax equals the student's full softmax at T = 1, so it rides on the first dense pass.
    ce_folded = dense > 0 and T == 1
    # Dense [n, V] passes left that read u; the last one may overwrite it instead of copying.
    uses_of_u = dense + (1 if (not ce_folded and u is z) else 0)
    dz: Tensor | None = None
    ce_lse: Tensor | None = None
    kd_sum = z.new_zeros(())

    def take_u() -> Tensor:
        nonlocal uses_of_u
        uses_of_u -= 1
        return u if uses_of_u == 0 else u.clone()

    def accumulate(part: Tensor) -> None:
        nonlocal dz
        dz = part if dz is None else dz.add_(part)

    sparse_ids, sparse_grads = [], []
    for teacher, weight, mode in zip(teachers, spec.teacher_weights, modes, strict=True):
        a = teacher.topk_logprobs
        # -inf entries (and ids beyond the student's vocabulary) are no class. They point at the row's
        # first real entry, so that scatters leave their own id in the tail and never go out of range.
        in_s = torch.isfinite(a) & (teacher.topk_ids < z.shape[1])
        if a.shape[1]:
            first = teacher.topk_ids.gather(1, in_s.int().argmax(1, keepdim=True)).clamp(max=z.shape[1] - 1)
        else:  # a purely sampled cache (k = 0): padding points at id 0, its gradient is masked
            first = teacher.topk_ids.new_zeros((a.shape[0], 1))
        ids = torch.where(in_s, teacher.topk_ids, first)
        u_s = u.gather(1, ids).masked_fill(~in_s, _NEG_INF)
        w = w_kd * weight / T  # d u / d z = 1 / T
        if mode == "sampled":
            # Classes: S and the sampled tail ids (disjoint), the student's full softmax on both; the
            # rest of the student's mass has target 0. dD/du_j = g_j [j a class] - G q_j, G = sum of g.
            real = teacher.sample_counts > 0
            sample_ids = torch.where(real, teacher.sample_ids, first).clamp(max=z.shape[1] - 1)
            ids = torch.cat([ids, sample_ids], 1)
            valid = torch.cat([in_s, real & (teacher.sample_ids < z.shape[1])], 1)
            u_c = u.gather(1, ids).masked_fill(~valid, _NEG_INF)
            buf = take_u()
            lse, inv_total = _exp_rows_(buf)  # buf = exp(u - rowmax)
            logq = u_c - lse[:, None]
            logp = sampled_class_logprobs(teacher, valid, T)
            rows, g = _divergence_and_grad(spec.distillation_type, logp, logq, valid)
            kd_sum = kd_sum + weight * rows.sum()
            coef = -w * g.sum(1)
            if ce_folded and ce_lse is None:
                ce_lse = lse
                coef = coef + w_ce
            accumulate(buf.mul_((coef * inv_total)[:, None]))
            sparse_ids.append(ids)
            sparse_grads.append((w * g).masked_fill(~valid, 0.0))
            continue
        if mode == "renormalize":
            logq = torch.log_softmax(u_s, 1)
            logp = teacher_class_logprobs(a, None, T)
            rows, g = _divergence_and_grad(spec.distillation_type, logp, logq, in_s)
            # d logq_i / d u_j = [i == j] - softmax_S(u)_j, within S only
            du_s = g - logq.exp() * g.sum(1, keepdim=True)
            sparse_ids.append(ids)
            sparse_grads.append((w * du_s).masked_fill(~in_s, 0.0))
            kd_sum = kd_sum + weight * rows.sum()
            continue
        buf = take_u()
        buf.scatter_(1, ids, _NEG_INF)
        lse_rest, inv_rest = _exp_rows_(buf)  # buf = exp(u - rowmax) outside S, 0 on S
        has_tail = torch.isfinite(lse_rest)
        lse = torch.logaddexp(lse_rest, torch.logsumexp(u_s, 1))
        logq = torch.cat([u_s - lse[:, None], (lse_rest - lse)[:, None]], 1)
        logp = teacher_class_logprobs(a, teacher.tail_logmass.masked_fill(~has_tail, _NEG_INF), T)
        valid = torch.cat([in_s, has_tail[:, None]], 1)
        rows, g = _divergence_and_grad(spec.distillation_type, logp, logq, valid)
        kd_sum = kd_sum + weight * rows.sum()
        # dL/du_j = g_i [j = s_i] + g_tail exp(u_j - lse_rest) [j not in S] - G q_j, G = sum of g;
        # outside S, q_j = exp(u_j - lse_rest) * q_tail, so one dense pass carries all three terms.
        q_tail = (lse_rest - lse).exp()
        q_s = logq[:, :-1].exp()
        big_g = g.sum(1)
        coef_rest = w * (g[:, -1] - big_g * q_tail)
        du_s = w * (g[:, :-1] - q_s * big_g[:, None])
        if ce_folded and ce_lse is None:
            ce_lse = lse
            coef_rest = coef_rest + w_ce * q_tail
            du_s = du_s + w_ce * q_s
        accumulate(buf.mul_((coef_rest * inv_rest)[:, None]))
        sparse_ids.append(ids)
        sparse_grads.append(du_s.masked_fill(~in_s, 0.0))

    if ce_lse is None:  # CE needs its own pass over the full vocabulary at T = 1
        buf = take_u() if u is z else z
        ce_lse, inv_total = _exp_rows_(buf)
        accumulate(buf.mul_((w_ce * inv_total)[:, None]))
    assert dz is not None  # the CE pass or the first bucket teacher always writes it
    for ids, grads in zip(sparse_ids, sparse_grads, strict=True):
        dz.scatter_add_(1, ids, grads)
    dz.scatter_add_(1, targets[:, None], (-w_ce * torch.ones_like(z_target))[:, None])
    ce_sum = (ce_lse - z_target).sum()
    return ce_sum, kd_sum, dz
