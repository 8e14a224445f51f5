"""Sampled teacher tails: U ids drawn from the teacher's distribution outside its top-k, with counts.

A top-k cache keeps the top-k log-probs exactly and only the total mass r of the rest. Drawing U ids
j_1..j_U with replacement from the tail, p_j / r for j outside the top-k S, and counting each unique
id (c_j) gives the target

    p_hat_i = p_i            for i in S           (exact)
    p_hat_j = r * c_j / U    for each sampled j   (E[c_j] = U p_j / r, so E[p_hat_j] = p_j)

and zero elsewhere: E[p_hat] = p for every id, so the forward-KL gradient in the student's logits,
q - p_hat, is an unbiased estimate of the full-vocabulary gradient q - p. With k = 0 it is plain
random-sampling KD; keeping the exact head lowers the variance, since only the tail is estimated.

The draws are exact (inverse-CDF sampling of the float64 tail probabilities of one head chunk) and
reproducible: the uniforms come from a counter-based generator (Philox) keyed by the seed and the
sample id, row j of a sample taking block j, so resumed runs, `--part`s and reruns draw the same ids
whatever batch or machine a sample lands on. The uniforms are made on the host (R x U doubles per
sample) and the search runs wherever the head chunk's logits are (the GPU on a GPU machine).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

_NEG_INF = float("-inf")


@dataclass
class TailSamples:
    """Unique sampled ids per row, padded to U columns: count 0 marks padding (id 0, log-prob -inf)."""

    ids: torch.Tensor  # int64 [n, U], ascending among the real entries
    counts: torch.Tensor  # int32 [n, U]
    logprobs: torch.Tensor  # float32 [n, U]: the teacher's full-vocabulary log p of each id


def tail_uniforms(seed: int, sample_id: str, rows: int, draws: int) -> np.ndarray:
    """float64 [rows, draws] uniforms in [0, 1) for one sample, the same in every run."""
    key = int.from_bytes(hashlib.sha256(f"{seed}:tail:{sample_id}".encode()).digest()[:16], "little")
    return np.random.Generator(np.random.Philox(key=key)).random((rows, draws))


def draw_tail(logits: torch.Tensor, top_ids: torch.Tensor, uniforms: torch.Tensor) -> TailSamples:
    """Draw U ids per row from softmax(logits) restricted to the ids outside `top_ids`.

    logits: [n, V'] (any float dtype; -inf on padding columns, which are never drawn);
    top_ids: int [n, k] (k may be 0); uniforms: float64 [n, U]. Rows whose tail has no mass get no
    draws (all padding). Only [n, V'] float64 temporaries of this chunk exist.
    """
    n, vocab = logits.shape
    log_z = torch.logsumexp(logits.double(), dim=1)
    cdf = logits.to(torch.float64, copy=True)  # becomes the tail's cumulative (unnormalized) probabilities, in place
    if top_ids.shape[1]:
        cdf.scatter_(1, top_ids.long(), _NEG_INF)
    row_max = cdf.amax(1, keepdim=True)
    has_tail = torch.isfinite(row_max[:, 0])
    cdf.sub_(torch.where(torch.isfinite(row_max), row_max, 0.0)).exp_().cumsum_(1)
    total = cdf[:, -1:]
    # cdf[i-1] <= u * total < cdf[i]: id i, with probability (cdf[i] - cdf[i-1]) / total; ids with zero
    # probability (the top-k, padding) have cdf[i] == cdf[i-1] and are never hit.
    drawn = torch.searchsorted(cdf, uniforms.to(cdf.device) * total, right=True).clamp_(max=vocab - 1)
    drawn, _ = drawn.sort(1)
    first = torch.ones_like(drawn, dtype=torch.bool)
    first[:, 1:] = drawn[:, 1:] != drawn[:, :-1]
    slot = first.long().cumsum(1) - 1  # the unique id's column
    counts = torch.zeros_like(drawn, dtype=torch.int32).scatter_add_(1, slot, torch.ones_like(slot, dtype=torch.int32))
    ids = torch.zeros_like(drawn).scatter_(1, slot, drawn)
    counts = torch.where(has_tail[:, None], counts, 0)
    real = counts > 0
    ids = torch.where(real, ids, 0)
    logprobs = torch.where(real, logits.gather(1, ids).double() - log_z[:, None], _NEG_INF).float()
    return TailSamples(ids, counts, logprobs)

