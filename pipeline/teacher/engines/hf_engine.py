"""The transformers teacher engine: for architectures vLLM lacks, and as an independent cross-check.

The model's base network gives the final hidden states (after the final norm); the output head and
top-k then run with the same chunked code as the vllm engine, at response positions only. One
sample per forward pass: no padding, so no attention-mask subtleties, and it is the slow path anyway.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch

from pipeline.config import Config
from pipeline.data import TokenizedSample
from pipeline.errors import UserError
from pipeline.records import TeacherTopK
from pipeline.teacher.engines import GenerationRequest, TeacherEngine, engine_version, records_from_hidden
from pipeline.teacher.topk import OutputHead, head_transforms


class HfEngine(TeacherEngine):
    name = "hf"

    def __init__(self, config: Config, teacher_path: Path):
        from transformers import AutoModelForCausalLM

        self.version = engine_version("hf")
        self.inference = config.inference
        dtype = (
            self.inference.dtype if self.inference.dtype == "auto" else getattr(torch, self.inference.dtype)
        )
        # On the GPU when there is one (as the vllm engine's head): the forward, the head and the top-k.
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            self.model = AutoModelForCausalLM.from_pretrained(str(teacher_path), dtype=dtype).eval()
        except (OSError, ValueError) as exc:
            raise UserError(f"Cannot load the teacher {teacher_path} with transformers: {exc}") from None
        self.model.to(self.device)
        head = self.model.get_output_embeddings()
        transforms = head_transforms(self.model.config.get_text_config().to_dict())
        self.head = OutputHead(head.weight.detach(), getattr(head, "bias", None), **transforms).to(self.device)

    @torch.inference_mode()
    def score(self, batches: Iterable[Sequence[TokenizedSample]]) -> Iterator[list[TeacherTopK]]:
        for batch in batches:
            hidden = [
                self.model.base_model(input_ids=torch.tensor([s.input_ids], device=self.device)).last_hidden_state[0]
                for s in batch
            ]
            yield records_from_hidden(
                batch, hidden, self.head, self.inference.top_logits_num, self.inference.chunk_size,
                self.inference.tail_samples, self.inference.seed,
            )

    @torch.inference_mode()
    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[int]]:
        sample = self.inference.temperature > 0
        responses = []
        for r in requests:
            torch.manual_seed(r.seed)
            prompt = torch.tensor([r.prompt_ids], device=self.device)
            out = self.model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=sample,
                temperature=self.inference.temperature if sample else None,
                top_p=self.inference.top_p if sample else None,
                top_k=0 if sample else None,  # vLLM's default: no top-k filter
                max_new_tokens=r.max_new_tokens,
            )
            responses.append(out[0, prompt.shape[1] :].tolist())
        return responses

    def close(self) -> None:
        self.__dict__.pop("model", None)
