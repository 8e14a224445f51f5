"""`pipeline merge`: fold a LoRA adapter into its base model, prove the result equal, save it.

Recipe: load base + adapter in float32 -> logits of the adapter model on a few sequences ->
merge_and_unload -> the merged model's logits on the same sequences must match (max abs diff <= 1e-4)
-> cast to the requested dtype -> save safetensors + tokenizer.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import UserError
from pipeline.models import check_model_path

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_ABS_DIFF = 1e-4
CHECK_SEQUENCES, CHECK_LENGTH = 3, 64


def run(base: Path, adapter: Path, output: Path, dtype: str = "float32") -> dict[str, Any]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: use one of {', '.join(DTYPES)}.")
    base_source = check_model_path(base, "student")
    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise UserError(
            f"{adapter} has no adapter_config.json: point --adapter at a LoRA train-student output "
            "(a run with `lora.enable: false` already saved a full model)."
        )
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise UserError(f"Output directory {output} exists and is not empty; choose a new one.")

    model = AutoModelForCausalLM.from_pretrained(base_source, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter)).eval()
    sequences = _check_sequences(model.config.vocab_size)
    with torch.no_grad():
        before = model(input_ids=sequences).logits
        merged = model.merge_and_unload()
        after = merged(input_ids=sequences).logits
    max_diff = (before - after).abs().max().item()
    if not max_diff <= MAX_ABS_DIFF:
        raise RuntimeError(
            f"The merged model's logits differ from the adapter model's by up to {max_diff:.3g} "
            f"(allowed {MAX_ABS_DIFF}); nothing was written."
        )

    merged = merged.to(DTYPES[dtype])
    merged.save_pretrained(output, safe_serialization=True)
    tokenizer_source = adapter if (adapter / "tokenizer_config.json").is_file() else base_source
    AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(output)
    summary = {
        "base": str(base),
        "adapter": str(adapter),
        "output": str(output),
        "dtype": dtype,
        "check": {"sequences": CHECK_SEQUENCES, "tokens": CHECK_LENGTH, "max_abs_diff": max_diff},
    }
    log.info("merged model written to %s (%s); logits match the adapter model: %s", output, dtype,
             json.dumps(summary["check"]))
    return summary


def _check_sequences(vocab_size: int) -> torch.Tensor:
    """A few fixed random token sequences: any ids exercise every merged weight equally well."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (CHECK_SEQUENCES, CHECK_LENGTH), generator=generator)
