"""pipeline/student/lora.py: target-module validation and PEFT wrapping of a tiny Qwen2 student."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.config import SEVEN_PROJECTIONS, LoraConfig
from pipeline.errors import UserError
from pipeline.student.lora import check_target_modules, linear_module_names, wrap_student


@pytest.fixture
def student(tiny_student_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_student_dir, dtype=torch.float32)


def test_linear_names_of_qwen2(student):
    assert linear_module_names(student) == SEVEN_PROJECTIONS + ["lm_head"]


def test_linear_names_of_baichuan_layout():
    """Baichuan fuses q/k/v into W_pack."""

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.W_pack = torch.nn.Linear(4, 12)
            self.o_proj = torch.nn.Linear(4, 4)
            self.mlp = torch.nn.ModuleDict(
                {n: torch.nn.Linear(4, 4) for n in ("gate_proj", "up_proj", "down_proj")}
            )

    names = linear_module_names(torch.nn.ModuleList([Layer(), Layer()]))
    assert names == ["W_pack", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_missing_target_modules_fail_with_the_linear_names(student):
    with pytest.raises(UserError) as err:
        check_target_modules(student, ["q_proj", "W_pack", "c_attn"])
    message = str(err.value)
    assert "W_pack, c_attn" in message
    assert "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj" in message


def test_output_layer_is_not_a_target(student):
    with pytest.raises(UserError, match="output layer"):
        check_target_modules(student, ["q_proj", "lm_head"])


def test_wrap_seven_projections_and_all_linear(student):
    model = wrap_student(student, LoraConfig(r=4, alpha=8))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    wrapped = {n.split(".")[-4] for n in trainable}
    assert wrapped == set(SEVEN_PROJECTIONS)
    assert type(model.get_output_embeddings()) is torch.nn.Linear


def test_all_linear_leaves_the_head_alone(tiny_student_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_student_dir, dtype=torch.float32)
    model = wrap_student(model, LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    wrapped = {n.split(".")[-4] for n, p in model.named_parameters() if p.requires_grad}
    assert wrapped == set(SEVEN_PROJECTIONS)


def test_disabled_lora_trains_everything(student):
    model = wrap_student(student, LoraConfig(enable=False))
    assert model is student
    assert all(p.requires_grad for p in model.parameters())
