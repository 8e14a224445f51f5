"""The vLLM teacher engine.

Scoring does not use vLLM's `prompt_logprobs`: that path applies the output head and a float32
log-softmax at every prompt position and builds Python objects per position and top-k entry, which
costs most of the time on CPU. Instead vLLM runs as a pooling model that returns the final hidden
states of every token (`runner="pooling"`, token_embed with ALL pooling, no normalization; they are
taken after the model's final norm), and pipeline.teacher.topk applies the output head, read from the
checkpoint's safetensors, only at the rows t-1 of response tokens. vLLM still does the batched,
paged, tensor/pipeline-parallel prefill. The head runs on the GPU when there is one.

Batches run one after the other, not overlapped: on CPU, vLLM's forward already keeps every core
busy, and head work running beside it preempts vLLM's OpenMP threads, whose barriers then stall
(measured on 2 cores: 13 s overlapped vs 7.6 s serial for the same batches).

Generation uses a second, ordinary vLLM engine (`task="generate"`); the stage then scores the
written sequences with the scoring engine, so both modes share one top-k path.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from pipeline.config import Config
from pipeline.data import TokenizedSample
from pipeline.errors import require
from pipeline.records import TeacherTopK
from pipeline.teacher.engines import GenerationRequest, TeacherEngine, engine_version, records_from_hidden
from pipeline.teacher.topk import load_output_head


class VllmEngine(TeacherEngine):
    name = "vllm"

    def __init__(self, config: Config, teacher_path: Path, *, task: str = "score"):
        gpu = torch.cuda.is_available()
        require("vllm", "gpu" if gpu else "cpu", "The vllm teacher engine")
        from vllm import LLM
        from vllm.config import PoolerConfig

        self.version = engine_version("vllm")
        inference = self.inference = config.inference
        self.k = inference.top_logits_num
        self.chunk_size = inference.chunk_size
        common: dict[str, Any] = dict(
            model=str(teacher_path),
            dtype=inference.dtype,
            # No sequence is longer than the student's max_seq_length (data.py cuts them).
            max_model_len=inference.max_model_len or config.distillation.max_seq_length,
            tensor_parallel_size=inference.tensor_parallel_size,
            pipeline_parallel_size=inference.pipeline_parallel_size,
            gpu_memory_utilization=inference.gpu_memory_utilization,
            enforce_eager=inference.enforce_eager,
            seed=inference.seed,
        )
        if task == "score":
            self.llm = LLM(
                runner="pooling",
                pooler_config=PoolerConfig(task="token_embed", pooling_type="ALL", use_activation=False),
                # Hidden states in the model dtype, as vLLM's own lm_head would see them (default: float32).
                hf_overrides={"head_dtype": "model"},
                # Every request needs every position's hidden state, so cached prefixes would not help.
                enable_prefix_caching=False,
                **common,
            )
            try:  # after the engine: a hub id is then already in the local cache
                self.head = load_output_head(teacher_path).to("cuda" if gpu else "cpu")
            except Exception:
                self.close()
                raise
        else:
            self.llm = LLM(runner="generate", **common)

    def score(self, batches: Iterable[Sequence[TokenizedSample]]) -> Iterator[list[TeacherTopK]]:
        for batch in batches:
            yield records_from_hidden(
                batch, self.hidden_states(batch), self.head, self.k, self.chunk_size,
                self.inference.tail_samples, self.inference.seed,
            )

    def hidden_states(self, batch: Sequence[TokenizedSample]) -> list[torch.Tensor]:
        """Final (normed) hidden states [L, H] of every token of each sample, in the model dtype."""
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=list(s.input_ids)) for s in batch]
        outputs = self.llm.encode(prompts, pooling_task="token_embed", use_tqdm=False)
        return [o.outputs.data for o in outputs]

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[int]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [
            SamplingParams(
                temperature=self.inference.temperature,
                top_p=self.inference.top_p,
                max_tokens=r.max_new_tokens,
                seed=r.seed,
                detokenize=False,
            )
            for r in requests
        ]
        prompts = [TokensPrompt(prompt_token_ids=r.prompt_ids) for r in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outputs]

    def close(self) -> None:
        llm = self.__dict__.pop("llm", None)
        if llm is not None:  # stop the engine-core and worker processes now, not at garbage collection
            llm.llm_engine.engine_core.shutdown()
