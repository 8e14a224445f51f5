"""Scoring a student whose tokenizer differs from the cache's: both sides' log-likelihood of the same text.

Token-level metrics (KL over the top-k, top-1 agreement) compare ids and have no meaning across
vocabularies. What both sides share is the text: on every aligned chunk (pipeline.cross_tokenizer.alignment)
the teacher's log-likelihood l_T(c) is the sum of its cached `target_logprobs` and the student's l_S(c) the
sum of its own, over the same characters (end-of-turn chunks included, with no characters). Per character:

    student NLL = -sum_c l_S(c) / chars,   teacher NLL = -sum_c l_T(c) / chars.

When the teacher wrote the responses (a `generate`-mode cache sampled at T = 1 without top-p), their
difference is an unbiased estimate of the sequence-level KL(teacher || student) per character (on the
aligned text): E_{y ~ p_T}[log p_T(y) - log p_S(y)] = KL. On other responses it is only a log-likelihood
ratio, lower when the student is closer to the teacher there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pipeline.student.distill import output_head, response_hidden_states

HEAD_CHUNK = 1024  # response rows per output-head chunk: bounds the [chunk, vocab] logits


@dataclass
class ChunkLikelihoods:
    """Sums over the scored samples."""

    samples: int = 0
    response_chars: int = 0  # the assistant text's characters
    aligned_chars: int = 0  # of which in aligned chunks
    chunks: int = 0
    student_tokens: int = 0  # the student's response tokens
    student_ce: float = 0.0  # -log q over all of them
    student_ll: float = 0.0  # sum_c l_S(c)
    teacher_ll: float = 0.0  # sum_c l_T(c)

    def add_batch(self, model: Any, batch: dict[str, Any], alignments: list[Any], logits_to_keep: bool) -> None:
        """One collated batch (CrossCollator) and its samples' SampleAlignments."""
        logq = student_target_logprobs(model, batch, logits_to_keep)
        cross = batch["cross"]
        in_chunk = cross.chunk >= 0
        student = torch.zeros_like(cross.chunk_logprob).index_add_(0, cross.chunk[in_chunk], logq[in_chunk])
        self.samples += len(alignments)
        self.response_chars += sum(a.response_chars for a in alignments)
        self.aligned_chars += sum(a.aligned_chars for a in alignments)
        self.chunks += len(cross.chunk_logprob)
        self.student_tokens += len(logq)
        self.student_ce -= logq.sum().item()
        self.student_ll += student.sum().item()
        self.teacher_ll += cross.chunk_logprob.sum().item()


def student_target_logprobs(model: Any, batch: dict[str, Any], logits_to_keep: bool = True) -> torch.Tensor:
    """log q(x_t) of every response row's actual token, float64 [N] (float32 logits, head in chunks)."""
    hidden = response_hidden_states(model, batch, logits_to_keep)
    head = output_head(model)
    out = []
    for start in range(0, hidden.shape[0], HEAD_CHUNK):
        rows = slice(start, start + HEAD_CHUNK)
        z = torch.nn.functional.linear(hidden[rows].float(), head.weight.float(),
                                       None if head.bias is None else head.bias.float())
        picked = z.gather(1, batch["targets"][rows, None]).squeeze(1)
        out.append((picked - torch.logsumexp(z, 1)).double())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)
