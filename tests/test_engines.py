"""Teacher engines against a float64 reference from the transformers model's own logits.

The vLLM checks share one engine start (module fixture): the pooled hidden states are the model's
final (normed) hidden states, and scored records match the reference and the hf engine.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.config import config_from_dict
from pipeline.data import TokenizedSample, load_samples
from pipeline.errors import UserError
from pipeline.records import TeacherTopK
from pipeline.teacher.engines import GenerationRequest, make_engine, records_from_hidden, sample_seed
from pipeline.teacher.topk import OutputHead

K = 16
ATOL = 1e-4
# vLLM on CPU: a fixed 1 GiB KV cache instead of a fraction of the machine's memory.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def make_config(dataset: Path, engine: str, **inference):
    raw = {
        "dataset": {"labeled_path": str(dataset)},
        "inference": {
            "engine": engine,
            "top_logits_num": K,
            "chunk_size": 32,
            "gpu_memory_utilization": 0.15,
            "dtype": "float32",
            "enforce_eager": True,
            **inference,
        },
        "distillation": {"max_seq_length": 1024},
    }
    return config_from_dict(raw, Path("."))


@pytest.fixture(scope="module")
def samples(tiny_tokenizer_dir: Path, tiny_dataset_path: Path) -> list[TokenizedSample]:
    config = make_config(tiny_dataset_path, "hf")
    return load_samples(config, AutoTokenizer.from_pretrained(tiny_tokenizer_dir), mode="score")[0][:10]


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def check_against_model(records: list[TeacherTopK], samples: list[TokenizedSample], model) -> None:
    """Each record equals float64 log_softmax of the model's logits at t-1 (ties may swap ids)."""
    assert [r.sample_id for r in records] == [s.sample_id for s in samples]
    for record, sample in zip(records, samples, strict=True):
        positions = torch.tensor(sample.positions)
        np.testing.assert_array_equal(record.positions, sample.positions)
        np.testing.assert_array_equal(record.input_ids, sample.input_ids)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([sample.input_ids])).logits[0, positions - 1]
        logp = torch.log_softmax(logits.double(), dim=1)
        top = logp.topk(K, dim=1)
        ids = torch.from_numpy(record.topk_ids).long()
        np.testing.assert_allclose(record.topk_logprobs, top.values.numpy(), atol=ATOL, rtol=0)
        np.testing.assert_allclose(record.topk_logprobs, logp.gather(1, ids).numpy(), atol=ATOL, rtol=0)
        target = logp.gather(1, torch.tensor(sample.input_ids)[positions][:, None])[:, 0]
        np.testing.assert_allclose(record.target_logprobs, target.numpy(), atol=ATOL, rtol=0)
        tail = logp.scatter(1, ids, float("-inf")).logsumexp(dim=1)
        np.testing.assert_allclose(record.tail_logmass, tail.numpy(), atol=ATOL, rtol=0)


def test_hf_engine_scores_like_the_model(tiny_dataset_path, tiny_model_dir, samples, model) -> None:
    config = make_config(tiny_dataset_path, "hf")
    with make_engine(config, tiny_model_dir) as engine:
        batches = list(engine.score([samples[:3], samples[3:4], samples[4:]]))
    assert [len(b) for b in batches] == [3, 1, 6]
    check_against_model([r for b in batches for r in b], samples, model)


def test_hf_generation_is_seeded_and_stops_at_eos(tiny_dataset_path, tiny_model_dir, tiny_tokenizer_dir):
    config = make_config(tiny_dataset_path, "hf", temperature=1.0, top_p=0.9)
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    eos = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    prompt = [5, 6, 7, 8]
    with make_engine(config, tiny_model_dir, task="generate") as engine:
        requests = [GenerationRequest(prompt, 12, seed) for seed in (1, 1, 2)]
        first, again, other = engine.generate(requests)
    assert first == again and first != other
    for response in (first, other):
        assert 1 <= len(response) <= 12
        assert len(response) == 12 or response[-1] in eos
        assert all(token not in eos for token in response[:-1])


def test_records_take_rows_t_minus_1_and_targets_x_t() -> None:
    # Hidden state of position i is the one-hot of i, the head is the identity: the logits at row
    # t-1 peak at id t-1, which pins down which rows and targets a record uses.
    sample = TokenizedSample("s", [0, 3, 5, 1, 2, 4], [2, 3, 5])
    hidden = torch.eye(6) * 30
    (record,) = records_from_hidden([sample], [hidden], OutputHead(torch.eye(6)), k=1, chunk_size=2)
    assert record.topk_ids[:, 0].tolist() == [1, 2, 4]
    # Targets x_t = 5, 1, 4: only the last one is the peak of its row.
    assert record.target_logprobs[:2].max() < -20 and record.target_logprobs[2] > -1e-6


def test_sample_seeds_are_stable_per_sample() -> None:
    assert sample_seed(42, "a") == sample_seed(42, "a")
    assert len({sample_seed(42, "a"), sample_seed(42, "b"), sample_seed(43, "a")}) == 3


def test_unknown_engine_is_a_user_error(tiny_dataset_path, tiny_model_dir) -> None:
    config = make_config(tiny_dataset_path, "hf")
    config.inference.engine = "tgi"
    with pytest.raises(UserError, match="inference.engine"):
        make_engine(config, tiny_model_dir)


@pytest.fixture(scope="module")
def vllm_engine(tiny_dataset_path, tiny_model_dir):
    pytest.importorskip("vllm")
    with make_engine(make_config(tiny_dataset_path, "vllm"), tiny_model_dir) as engine:
        yield engine


@pytest.mark.slow
def test_vllm_hidden_states_are_the_final_normed_states(vllm_engine, samples, model) -> None:
    hidden = vllm_engine.hidden_states(samples[:3])
    for states, sample in zip(hidden, samples[:3], strict=True):
        with torch.no_grad():
            expected = model.model(input_ids=torch.tensor([sample.input_ids])).last_hidden_state[0]
        assert states.shape == expected.shape
        torch.testing.assert_close(states, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_vllm_engine_scores_like_the_model_and_the_hf_engine(
    vllm_engine, samples, model, tiny_dataset_path, tiny_model_dir
) -> None:
    batches = list(vllm_engine.score([samples[:4], samples[4:5], samples[5:]]))
    assert [len(b) for b in batches] == [4, 1, 5]
    records = [r for b in batches for r in b]
    check_against_model(records, samples, model)
    with make_engine(make_config(tiny_dataset_path, "hf"), tiny_model_dir) as hf:
        hf_records = [r for b in hf.score([samples]) for r in b]
    for ours, theirs in zip(records, hf_records, strict=True):
        np.testing.assert_allclose(ours.topk_logprobs, theirs.topk_logprobs, atol=ATOL, rtol=0)
        np.testing.assert_allclose(ours.tail_logmass, theirs.tail_logmass, atol=ATOL, rtol=0)
        same = (ours.topk_ids == theirs.topk_ids).mean()
        assert same > 0.9, f"{ours.sample_id}: only {same:.0%} of the top-k ids agree"


@pytest.fixture(scope="module")
def biased_teacher_dir(tmp_path_factory, tiny_tokenizer_dir: Path) -> Path:
    """A random-init Phi (its lm_head has a bias, as Phi-2's and GPT-J's do) with the tiny tokenizer; the
    bias is large enough to reorder the top-k."""
    from transformers import PhiConfig, PhiForCausalLM

    out = tmp_path_factory.mktemp("biased_teacher")
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    config = PhiConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=2048, dtype="float32",
    )
    torch.manual_seed(0)
    model = PhiForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.bias.normal_(0, 3.0)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_a_biased_output_head_scores_like_the_model(engine, biased_teacher_dir, tiny_dataset_path, samples) -> None:
    """Both engines apply lm_head.bias (the vllm engine reads it from the safetensors beside the weight)."""
    if engine == "vllm":
        pytest.importorskip("vllm")
    model = AutoModelForCausalLM.from_pretrained(biased_teacher_dir, dtype=torch.float32).eval()
    with make_engine(make_config(tiny_dataset_path, engine), biased_teacher_dir) as teacher:
        records = [r for b in teacher.score([samples[:5], samples[5:]]) for r in b]
    check_against_model(records, samples, model)
