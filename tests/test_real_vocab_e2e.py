"""The whole pipeline on Qwen3's real tokenizer (151,669 tokens, its own chat template), multi-turn data:
gen-logits (vLLM CPU) -> train-student (LoRA, tied-embedding student) -> merge -> eval."""

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from pipeline.cache import LogitCacheReader, TopKCodec
from pipeline.config import config_from_dict
from pipeline.data import load_samples
from stages import evaluate, gen_logits, merge, train_student

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
K = 8

CONVERSATIONS = [
    [{"role": "system", "content": "Answer in one word."},
     {"role": "user", "content": "Colour of the sky?"},
     {"role": "assistant", "content": "<think>\nDaytime, clear.\n</think>\n\nBlue."},
     {"role": "user", "content": "And grass?"},
     {"role": "assistant", "content": "<think>\nChlorophyll.\n</think>\n\nGreen."}],
    [{"role": "assistant", "content": "Welcome! Ask me anything."},
     {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": "Say hi."},
     {"role": "assistant", "content": "Hi!"},
     {"role": "user", "content": "Louder."},
     {"role": "assistant", "content": "HI!"}],
    [{"role": "user", "content": "Name a prime."},
     {"role": "assistant", "content": "<think>\nSmallest one.\n</think>\n\n2"}],
]


def tied_student(out: Path, teacher: Path) -> Path:
    """A random-init student with tied input/output embeddings over the same 151,669-token vocabulary."""
    config = AutoConfig.from_pretrained(teacher)
    config.tie_word_embeddings = True
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(teacher).save_pretrained(out)
    return out


def sharpen(model_dir: Path, factor: float) -> None:
    """Scale the random teacher's output head: a confident teacher, so the KL has something to learn."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(factor)
    model.save_pretrained(model_dir)


@pytest.mark.slow
def test_qwen3_vocabulary_multi_turn_through_every_stage(tmp_path, real_tokenizer_dir):
    from pipeline.toy.models import build_model

    tokenizer_dir = real_tokenizer_dir("qwen3")
    teacher = build_model(tmp_path / "teacher", tokenizer_dir, hidden_size=64, num_layers=1, num_heads=1,
                          intermediate_size=128, seed=0)
    sharpen(teacher, 20.0)
    student = tied_student(tmp_path / "student", teacher)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"id": f"c{i}", "messages": m}) + "\n" for i, m in enumerate(CONVERSATIONS)))
    cache = tmp_path / "cache"
    config = config_from_dict({
        "dataset": {"labeled_path": str(data), "logits_path": str(cache), "seed": 0},
        "models": {"teacher": str(teacher), "student": str(student)},
        "inference": {"engine": "vllm", "top_logits_num": K, "max_model_len": 512, "gpu_memory_utilization": 0.1,
                      "enforce_eager": True, "dtype": "float32", "batch_size": 4, "rows_per_shard": 4},
        "distillation": {"kd_ratio": 1.0, "max_seq_length": 512},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "training": {"output_dir": str(tmp_path / "adapter"), "per_device_train_batch_size": 4, "max_steps": 20,
                     "learning_rate": 2e-2, "logging_steps": 5, "save_steps": 1000, "report_to": "none",
                     "disable_tqdm": True, "use_cpu": True, "seed": 0},
    }, tmp_path)

    assert gen_logits.run(config)["samples"] == len(CONVERSATIONS)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = {r.sample_id: r for r in LogitCacheReader(cache).iter_samples(shuffle=False, seed=0)}
    responses = {sid: tokenizer.decode(r.input_ids[r.positions]) for sid, r in rows.items()}
    assert responses == {
        "c0": "Blue.<|im_end|><think>\nChlorophyll.\n</think>\n\nGreen.<|im_end|>",
        "c1": "Welcome! Ask me anything.<|im_end|>4<|im_end|>",
        "c2": "Hi!<|im_end|>HI!<|im_end|>",
        "c3": "<think>\nSmallest one.\n</think>\n\n2<|im_end|>",
    }
    expected, _ = load_samples(config, tokenizer, mode="score")
    for sample in expected:
        assert rows[sample.sample_id].positions.tolist() == sample.positions

    # The cache holds the teacher's distribution at t-1 over the full 151,669-token vocabulary.
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    row = rows["c0"]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=row.input_ids[None]).logits[0, row.positions - 1].double(), -1)
    assert logp.shape[1] == 151_669
    tolerance = TopKCodec().step_max / 2 + 1e-4  # the codec's quantization bound
    torch.testing.assert_close(row.topk_logprobs.double(), logp.topk(K, -1).values, atol=tolerance, rtol=0)
    target = logp.gather(1, row.input_ids[row.positions][:, None])[:, 0]
    torch.testing.assert_close(row.target_logprobs.double(), target, atol=tolerance, rtol=0)

    before = evaluate.run(student, cache, as_json=True)
    train_student.run(config, resume=False)
    merged = tmp_path / "merged"
    merge.run(student, tmp_path / "adapter", merged)
    after = evaluate.run(merged, cache, as_json=True)
    print(f"teacher KL per response token: before {before['kl']:.4g}, after {after['kl']:.4g}")
    assert before["kl"] > 0.5  # a random student is far from the sharpened teacher
    assert after["kl"] < 0.97 * before["kl"], (before, after)  # measured 1.704 -> 1.601 in 20 LoRA steps
