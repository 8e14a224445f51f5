"""LoRA wrapping of the student through PEFT, with target modules checked against the model first."""

from __future__ import annotations

from typing import Any

import torch

from pipeline.config import LoraConfig
from pipeline.errors import UserError


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Distinct short names of the model's linear layers (q_proj, ..., W_pack, lm_head), in model order."""
    from transformers.pytorch_utils import Conv1D  # GPT-2 style linears

    names: dict[str, None] = {}
    for full_name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)):
            names[full_name.rsplit(".", 1)[-1]] = None
    return list(names)


def check_target_modules(model: torch.nn.Module, target_modules: list[str] | str) -> None:
    """UserError naming the targets the model lacks, and the linear layers it has, before any training."""
    linear = linear_module_names(model)
    if target_modules == "all-linear":
        return
    module_names = [name for name, _ in model.named_modules()]
    missing = [
        target
        for target in target_modules
        if not any(name == target or name.endswith("." + target) for name in module_names)
    ]
    if missing:
        raise UserError(
            f"`lora.target_modules` names modules this student does not have: {', '.join(missing)}. "
            f"Its linear layers are: {', '.join(linear)} (or use \"all-linear\")."
        )
    output_layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if module is output_layer}
    if head_names & set(target_modules):
        raise UserError(
            f"`lora.target_modules` includes the output layer ({', '.join(sorted(head_names))}); the "
            "distillation loss applies the output head itself, so it cannot be a LoRA target."
        )


def wrap_student(model: Any, lora: LoraConfig) -> Any:
    """PEFT LoRA model per the `lora` section, or the model itself with every parameter trainable."""
    if not lora.enable:
        model.requires_grad_(True)
        return model
    check_target_modules(model, lora.target_modules)
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        target_modules=lora.target_modules,
        lora_dropout=lora.dropout,
        bias=lora.bias,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)
