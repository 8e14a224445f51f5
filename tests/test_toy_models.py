from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.toy.models import (
    BUILD_INFO,
    build_model,
    ensure_toy_assets,
    local_corpus,
    pretrain,
    train_tokenizer,
    write_instruction_dataset,
)


def test_corpus_splits_are_disjoint_deterministic_and_bounded():
    splits = {name: local_corpus(name, max_chars=10**9) for name in ("teacher", "student", "heldout")}
    assert all(splits.values())
    assert not set(splits["teacher"]) & set(splits["student"])
    assert not set(splits["heldout"]) & (set(splits["teacher"]) | set(splits["student"]))
    small = local_corpus("student", max_chars=200_000)
    assert small[:-1] == splits["student"][: len(small) - 1] and 199_000 < sum(map(len, small)) <= 200_000
    assert splits["student"][len(small) - 1].startswith(small[-1])
    with pytest.raises(ValueError, match="split"):
        local_corpus("train")


def test_tokenizer_round_trips_text_and_keeps_special_tokens_whole(tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    code = 'def f(x):\n\tif x:  # ünïcödé, emoji 🙂\n        return "  spaced  "\r\n\n'
    assert tok.decode(tok(code)["input_ids"]) == code
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert tok("<|im_start|>user\nx<|im_end|>")["input_ids"][0] == 1
    assert tok("x<|im_end|><|endoftext|>")["input_ids"][-2:] == [2, 0]
    assert (tok.eos_token, tok.pad_token, len(tok)) == ("<|im_end|>", "<|endoftext|>", 1024)


def test_chat_template_renders_qwen2_chatml(tiny_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Add 1+1"},
        {"role": "assistant", "content": "2"},
    ]
    assert tok.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\nAdd 1+1<|im_end|>\n"
        "<|im_start|>assistant\n2<|im_end|>\n"
    )
    prompt = tok.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_tokenizer_training_is_deterministic(tmp_path):
    corpus = local_corpus("student", max_chars=60_000)
    a = train_tokenizer(tmp_path / "a", vocab_size=400, corpus=corpus)
    b = train_tokenizer(tmp_path / "b", vocab_size=400, corpus=corpus)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


def test_model_dir_loads_like_a_hub_checkout(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = model.config
    assert type(model).__name__ == "Qwen2ForCausalLM" and (tiny_model_dir / "model.safetensors").exists()
    assert config.hidden_size // config.num_attention_heads == 64
    assert config.vocab_size == len(tok) and not config.tie_word_embeddings
    assert config.max_position_embeddings == 4096 and model.dtype == torch.float32
    assert model.generation_config.eos_token_id == [tok.eos_token_id, tok.pad_token_id]
    assert model.generation_config.pad_token_id == tok.pad_token_id
    ids = tok("import os\n", return_tensors="pt")["input_ids"]
    assert model(input_ids=ids).logits.shape == (1, ids.shape[1], len(tok))


def test_build_model_requires_head_dim_64(tmp_path, tiny_tokenizer_dir):
    with pytest.raises(ValueError, match="head_dim must be 64"):
        build_model(tmp_path, tiny_tokenizer_dir, hidden_size=64, num_layers=1, num_heads=4)


def _lm_loss(model_dir: Path, text: str) -> float:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tok(text, return_tensors="pt", truncation=True, max_length=512)["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def test_pretraining_lowers_the_held_out_loss(tmp_path, tiny_tokenizer_dir):
    model_dir = build_model(tmp_path / "m", tiny_tokenizer_dir, hidden_size=64, num_layers=1, num_heads=1)
    held_out = "".join(local_corpus("heldout", max_chars=20_000))
    before = _lm_loss(model_dir, held_out)
    texts = local_corpus("teacher", 200_000)
    result = pretrain(model_dir, texts, steps=30, batch_size=4, seq_len=64, lr=3e-3)
    after = _lm_loss(model_dir, held_out)
    assert result["steps"] == 30 and result["final_loss"] < result["first_loss"]
    assert after < before - 0.5, (before, after)


def test_pretraining_keeps_the_saved_dtype(tmp_path, tiny_tokenizer_dir):
    model_dir = build_model(
        tmp_path / "m", tiny_tokenizer_dir, hidden_size=64, num_layers=1, num_heads=1, dtype="bfloat16"
    )
    pretrain(model_dir, local_corpus("teacher", 50_000), steps=2, batch_size=2, seq_len=32)
    assert AutoModelForCausalLM.from_pretrained(model_dir).dtype == torch.bfloat16


def test_ensure_builds_once_then_reuses_and_redoes_a_killed_build(tmp_path):
    assets = ensure_toy_assets(tmp_path, profile="test")
    dirs = (assets.tokenizer_dir, assets.teacher_dir, assets.student_dir)
    AutoModelForCausalLM.from_pretrained(assets.teacher_dir)
    AutoModelForCausalLM.from_pretrained(assets.student_dir)
    assert {"head_share", "final_loss", "heldout_top1_prob", "hidden_size"} <= set(assets.teacher_info)

    def stamps() -> list[int]:
        return [(d / name).stat().st_mtime_ns for d in dirs for name in (BUILD_INFO, "tokenizer.json")]

    first = stamps()
    again = ensure_toy_assets(tmp_path, profile="test")
    assert stamps() == first and again == assets

    (assets.teacher_dir / BUILD_INFO).unlink()  # what a build killed before its last write leaves
    ensure_toy_assets(tmp_path, profile="test")
    now = stamps()
    assert now[:2] == first[:2] and now[4:] == first[4:]  # tokenizer and student reused
    assert now[2] != first[2] and (assets.teacher_dir / BUILD_INFO).exists()


def test_instruction_dataset_is_deterministic_and_easydistill_shaped(tmp_path):
    a = write_instruction_dataset(tmp_path / "a.jsonl", 40, seed=3)
    b = write_instruction_dataset(tmp_path / "b.jsonl", 40, seed=3)
    c = write_instruction_dataset(tmp_path / "c.json", 40, seed=4, fmt="json")
    assert a.read_bytes() == b.read_bytes()
    records = [json.loads(line) for line in a.read_text().splitlines()]
    assert len(records) == 40 and len({r["id"] for r in records}) == 40
    assert all(set(r) == {"id", "instruction", "input", "output"} for r in records)
    assert all(r["input"].strip() and r["output"].strip() for r in records)
    lengths = sorted(len(r["output"]) for r in records)
    assert lengths[0] < 200 < 400 < lengths[-1] <= 200 * 3.5  # a mix of short and long answers
    assert json.loads(c.read_text()) != records
