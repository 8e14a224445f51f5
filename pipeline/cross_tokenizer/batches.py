"""Cache rows (the teacher's tokens) + alignments -> the student's batches for the cross-tokenizer losses."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from pipeline.cross_tokenizer.alignment import SampleAlignment
from pipeline.cross_tokenizer.loss import CrossRows
from pipeline.records import CacheSample
from pipeline.student.distill import token_batch


@dataclass
class AlignmentReport:
    """What the alignment covers, summed over the cache: printed at the start and kept in metrics.json."""

    samples: int = 0
    response_chars: int = 0
    aligned_chars: int = 0
    chunks: int = 0
    one_to_one_chunks: int = 0
    student_rows: int = 0
    rows_in_chunks: int = 0
    shared_mass: float = 0.0  # sum over chunk starts of the teacher top-k mass the vocabulary map covers
    shared_tail_mass: float = 0.0  # the same for the sampled tail's estimated mass (0 without samples)

    def add(self, a: SampleAlignment, teacher_row_mass: np.ndarray | None,
            teacher_row_tail_mass: np.ndarray | None = None) -> None:
        self.samples += 1
        self.response_chars += a.response_chars
        self.aligned_chars += a.aligned_chars
        self.chunks += a.num_chunks
        self.one_to_one_chunks += int((a.one_to_one >= 0).sum())
        self.student_rows += len(a.positions)
        self.rows_in_chunks += int((a.chunk_of_row >= 0).sum())
        if teacher_row_mass is not None:
            self.shared_mass += float(teacher_row_mass[a.chunk_start[a.chunk_start >= 0]].sum())
        if teacher_row_tail_mass is not None:
            self.shared_tail_mass += float(teacher_row_tail_mass[a.chunk_start[a.chunk_start >= 0]].sum())

    def to_dict(self) -> dict[str, Any]:
        def share(part: float, whole: float) -> float:
            return part / whole if whole else 0.0

        return {
            "samples": self.samples,
            "aligned_char_share": share(self.aligned_chars, self.response_chars),
            "chunks": self.chunks,
            "chars_per_chunk": share(self.aligned_chars, self.chunks),
            "one_to_one_chunk_share": share(self.one_to_one_chunks, self.chunks),
            "shared_vocab_topk_mass": share(self.shared_mass, self.chunks),
            # top-k + sampled tail: the share of the teacher's whole distribution the shared term can place
            "shared_vocab_mass": share(self.shared_mass + self.shared_tail_mass, self.chunks),
            "student_rows_in_chunks": share(self.rows_in_chunks, self.student_rows),
        }


class CrossCollator:
    """collate() for a cross-tokenizer run: the student's tokens and a CrossRows teacher signal.

    items: per sample, its CacheSample from the one teacher. Picklable (DataLoader workers).
    """

    def __init__(self, alignments: dict[str, SampleAlignment], shared_map: np.ndarray, pad_id: int,
                 sampled_tail: bool = False):
        self.alignments = alignments
        self.shared_map = torch.from_numpy(shared_map)
        self.pad_id = pad_id
        # The shared-vocabulary term's targets: the cache's top-k plus its sampled tail draws (unbiased,
        # see shared_targets), or the top-k alone with the tail's mass in the rest class.
        self.sampled_tail = sampled_tail

    def __call__(self, items: Sequence[Sequence[CacheSample]]) -> dict[str, Any]:
        aligned = [self.alignments[item[0].sample_id] for item in items]
        tokens = token_batch([torch.from_numpy(a.input_ids) for a in aligned],
                             [torch.from_numpy(a.positions) for a in aligned], self.pad_id)
        chunks, chunk_logprobs, shared, uld = [], [], [], []
        chunk_base = 0
        for item, a in zip(items, aligned, strict=True):
            teacher = item[0]
            chunk = torch.from_numpy(a.chunk_of_row)
            chunks.append(torch.where(chunk >= 0, chunk + chunk_base, chunk))
            logprob = torch.zeros(a.num_chunks, dtype=torch.float64)
            chunk_ids, teacher_rows = torch.from_numpy(a.chunk_teacher)
            logprob.index_add_(0, chunk_ids, teacher.target_logprobs.double()[teacher_rows])
            chunk_logprobs.append(logprob)
            chunk_base += a.num_chunks
            shared.append(shared_targets(teacher, torch.from_numpy(a.chunk_start), self.shared_map,
                                         self.sampled_tail))
            uld.append(_paired_probs(teacher, torch.from_numpy(a.paired)))
        cross = CrossRows(
            chunk=torch.cat(chunks),
            chunk_logprob=torch.cat(chunk_logprobs),
            shared_ids=torch.cat([s[0] for s in shared]),
            shared_logprobs=torch.cat([s[1] for s in shared]),
            shared_rest=torch.cat([s[2] for s in shared]),
            uld_probs=torch.cat(uld),
        )
        return {**tokens, "cross": cross}


def shared_targets(
    teacher: CacheSample, teacher_row: torch.Tensor, shared_map: torch.Tensor, sampled_tail: bool
) -> tuple[torch.Tensor, ...]:
    """The teacher's targets at each chunk start, in student ids: [n, k (+ m)] ids and log-probs, and
    the log of the rest mass (float32; NaN where the row has no shared term).

    Entries are the exact top-k and, with `sampled_tail`, the m unique tail draws with the importance
    weight r c_j / U (r the tail mass, c_j draws of j, U the row's draws), whose expectation is the tail
    token's p_j, as in same-tokenizer sampled KD (pipeline.student.losses.sampled_class_logprobs). Teacher
    tokens mapped to one student token make one class with their summed mass; the rest is the mass of
    entries without a student token (plus, without samples, the whole tail), summed directly, not as
    1 - mapped mass, so that a nearly fully mapped row keeps its small rest exactly.
    """
    ids_t, lp_t = teacher.topk_ids, teacher.topk_logprobs
    sampled = sampled_tail and teacher.sample_ids is not None and teacher.sample_ids.shape[1] > 0
    if sampled:
        counts = teacher.sample_counts.double()
        draws = counts.sum(1, keepdim=True).clamp(min=1)
        weight = teacher.tail_logmass.double()[:, None] + torch.log(counts / draws)  # -inf on padding
        ids_t = torch.cat([ids_t, teacher.sample_ids], 1)
        lp_t = torch.cat([lp_t, weight.float()], 1)
    n, width = len(teacher_row), ids_t.shape[1]
    has = teacher_row >= 0
    ids = torch.zeros((n, width), dtype=torch.long)
    logprobs = torch.full((n, width), -math.inf)
    rest = torch.full((n,), math.nan)
    if has.any() and width:
        source = teacher_row[has]
        mapped = shared_map[ids_t[source].clamp(min=0, max=len(shared_map) - 1)]
        entry_lp = lp_t[source]
        lp = merge_classes(mapped, entry_lp.masked_fill(mapped < 0, -math.inf))
        ids[has] = mapped.clamp(min=0)
        logprobs[has] = lp
        unmapped = entry_lp.double().exp().masked_fill(mapped >= 0, 0.0).sum(1)
        if not sampled:
            unmapped = unmapped + teacher.tail_logmass[source].double().exp()
        rest[has] = unmapped.log().float()
    return ids, logprobs, rest


def merge_classes(ids: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """logprobs [m, k] with the mass of entries that share an id summed into the first of them (the
    others -inf): the shared-vocabulary KL needs each student class once."""
    valid = torch.isfinite(logprobs)
    same = (ids[:, :, None] == ids[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    first = same.int().argmax(1)  # [m, k]: the first entry with entry j's id (j itself if it is first)
    mass = torch.zeros(logprobs.shape, dtype=torch.float64).scatter_add_(
        1, first, logprobs.double().exp().masked_fill(~valid, 0.0))
    is_first = valid & (first == torch.arange(ids.shape[1]))
    return torch.where(is_first, mass.log(), -math.inf).to(logprobs.dtype)


def _paired_probs(teacher: CacheSample, teacher_row: torch.Tensor) -> torch.Tensor:
    """The paired teacher row's top-k probabilities (descending, as cached); NaN rows where unpaired."""
    k = teacher.topk_logprobs.shape[1]
    out = torch.full((len(teacher_row), k), math.nan)
    has = teacher_row >= 0
    if has.any():
        out[has] = teacher.topk_logprobs[teacher_row[has]].exp()
    return out


def shared_topk_mass(sample: CacheSample, shared_map: np.ndarray) -> np.ndarray:
    """Per teacher row, the top-k probability mass on tokens that the student's vocabulary has too."""
    ids = sample.topk_ids.numpy()
    mapped = shared_map[np.clip(ids, 0, len(shared_map) - 1)] >= 0
    return (np.exp(sample.topk_logprobs.numpy().astype(np.float64)) * mapped).sum(1)


def shared_tail_mass(sample: CacheSample, shared_map: np.ndarray) -> np.ndarray:
    """Per teacher row, the sampled tail's estimated mass (r c_j / U summed) on tokens the student has too."""
    if sample.sample_ids is None or sample.sample_ids.shape[1] == 0:
        return np.zeros(len(sample.positions))
    counts = sample.sample_counts.numpy().astype(np.float64)
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    mapped = shared_map[np.clip(sample.sample_ids.numpy(), 0, len(shared_map) - 1)] >= 0
    return np.exp(sample.tail_logmass.numpy().astype(np.float64)) * (share * mapped).sum(1)
