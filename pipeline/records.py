"""The records that flow between components: what a teacher produced for one sample.

Alignment (see README "Token alignment"): tokens x_0..x_{L-1}; `positions` holds the
indices t of response tokens, ascending, every t >= 1. Row j of the top-k arrays is the
teacher's distribution for predicting x_t from the prefix x_<t, i.e. the logits at
position t-1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class TeacherTopK:
    """One sample's teacher output as numpy arrays, R = len(positions), k = top-k size.

    topk_ids:        int32   [R, k]  token ids, sorted by descending log-prob
    topk_logprobs:   float32 [R, k]  raw log-softmax at temperature 1 (full vocabulary)
    target_logprobs: float32 [R]     log p(x_t | x_<t) of the token that actually follows
    tail_logmass:    float32 [R]     log(1 - sum(exp(topk_logprobs))), computed stably;
                                     -inf when the top-k holds all of the mass
    sample_ids:      int32   [R, m]  a sampled-tail cache's unique ids drawn from the tail (padded)
    sample_counts:   int32   [R, m]  how often each was drawn; 0 marks padding
    sample_logprobs: float32 [R, m]  their log-softmax at temperature 1; -inf on padding
    """

    sample_id: str
    input_ids: np.ndarray  # int32 [L]
    positions: np.ndarray  # int32 [R]
    topk_ids: np.ndarray
    topk_logprobs: np.ndarray
    target_logprobs: np.ndarray
    tail_logmass: np.ndarray
    sample_ids: np.ndarray | None = None
    sample_counts: np.ndarray | None = None
    sample_logprobs: np.ndarray | None = None


@dataclass
class CacheSample:
    """One decoded cache row as tensors, ready for the trainer (same layout as TeacherTopK)."""

    sample_id: str
    input_ids: torch.Tensor  # int64 [L]
    positions: torch.Tensor  # int64 [R]
    topk_ids: torch.Tensor  # int64 [R, k]
    topk_logprobs: torch.Tensor  # float32 [R, k]
    target_logprobs: torch.Tensor  # float32 [R]
    tail_logmass: torch.Tensor  # float32 [R]
    sample_ids: torch.Tensor | None = None  # int64 [R, m], a sampled-tail cache only
    sample_counts: torch.Tensor | None = None  # int32 [R, m], 0 = padding
    sample_logprobs: torch.Tensor | None = None  # float32 [R, m]
