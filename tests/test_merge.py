"""stages/merge.py: merged model equals the adapter model; saved as a plain loadable checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.config import LoraConfig
from pipeline.errors import UserError
from pipeline.student.lora import wrap_student
from stages import merge


@pytest.fixture(scope="module")
def adapter_dir(tiny_student_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter with non-zero B (a fresh one would merge to the base model unchanged)."""
    model = wrap_student(AutoModelForCausalLM.from_pretrained(tiny_student_dir), LoraConfig(r=4, alpha=8))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_student_dir).save_pretrained(out)
    return out


def test_merge_matches_adapter_model(tiny_student_dir, adapter_dir, tmp_path):
    summary = merge.run(tiny_student_dir, adapter_dir, tmp_path / "merged")
    assert summary["check"]["max_abs_diff"] <= 1e-4
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert (tmp_path / "merged" / "tokenizer_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    base = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_student_dir), adapter_dir
    )
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        assert (base(input_ids=ids).logits - want).abs().max() > 1e-3  # the adapter does change the model
        torch.testing.assert_close(merged(input_ids=ids).logits, want, atol=1e-4, rtol=0)


def test_merge_to_bfloat16(tiny_student_dir, adapter_dir, tmp_path):
    merge.run(tiny_student_dir, adapter_dir, tmp_path / "bf16", dtype="bfloat16")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")
    assert merged.dtype == torch.bfloat16


def test_merge_refuses_a_non_adapter_directory(tiny_student_dir, tmp_path):
    with pytest.raises(UserError, match="adapter_config.json"):
        merge.run(tiny_student_dir, tiny_student_dir, tmp_path / "out")
