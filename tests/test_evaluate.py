"""`pipeline eval` against independent computations: the loss path's KL and a float64 dense reference."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train_student import HELD_OUT, SHARPEN, K, held_out_kl, write_cache
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline import cli
from pipeline.cache import LogitCacheReader, LogitCacheWriter
from pipeline.config import config_from_dict
from pipeline.data import load_samples
from pipeline.models import tokenizer_fingerprint
from pipeline.records import TeacherTopK
from stages import evaluate


@pytest.fixture(scope="module")
def cache(tmp_path_factory, tiny_tokenizer_dir, tiny_dataset_path, tiny_model_dir) -> Path:
    config = config_from_dict({"dataset": {"labeled_path": str(tiny_dataset_path)}}, Path("."))
    samples, _ = load_samples(config, AutoTokenizer.from_pretrained(tiny_tokenizer_dir), mode="score")
    return write_cache(tmp_path_factory.mktemp("eval") / "cache", samples[-HELD_OUT:], tiny_model_dir)


def dense_reference(model_dir: Path, cache: Path) -> dict[str, float]:
    """float64, full logits, plain loops: KL over top-k + tail bucket, top-1 agreement, CE."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    kl = top1 = ce = n = 0.0
    for s in LogitCacheReader(cache).iter_samples(shuffle=False, seed=0):
        with torch.no_grad():
            logq_all = torch.log_softmax(model(input_ids=s.input_ids[None]).logits[0].double(), -1)
        for j, t in enumerate(s.positions.tolist()):
            logq = logq_all[t - 1]
            ids = s.topk_ids[j]
            p = torch.cat([s.topk_logprobs[j].double(), s.tail_logmass[j:j + 1].double()]).exp()
            p = p / p.sum()
            mask = torch.ones_like(logq, dtype=torch.bool)
            mask[ids] = False
            q = torch.cat([logq[ids].exp(), logq[mask].exp().sum()[None]])
            kl += float((p * (p.log() - q.log())).sum())
            top1 += float(logq.argmax() == ids[0])
            ce -= float(logq[s.input_ids[t]])
            n += 1
    return {"kl": kl / n, "top1_agreement": top1 / n, "cross_entropy": ce / n}


def test_metrics_equal_a_float64_reference_and_the_loss_path(cache, tiny_student_dir):
    metrics = evaluate.run(tiny_student_dir, cache, batch_size=4)
    reference = dense_reference(tiny_student_dir, cache)
    for key, value in reference.items():
        assert metrics[key] == pytest.approx(value, abs=2e-5), key
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["cross_entropy"]))
    model = AutoModelForCausalLM.from_pretrained(tiny_student_dir, dtype=torch.float32)
    assert metrics["kl"] == pytest.approx(held_out_kl(model, cache), rel=1e-5)
    assert metrics["samples"] == HELD_OUT


def test_teacher_agrees_with_itself_and_limit_counts_samples(cache, tiny_model_dir):
    metrics = evaluate.run(tiny_model_dir, cache, batch_size=2, limit=3)
    assert metrics["samples"] == 3
    assert metrics["top1_agreement"] == 1.0  # the cache's top-1 is the teacher's own argmax


def test_cli_json_and_bad_adapter(cache, tiny_student_dir, tmp_path, capsys):
    assert cli.main(["eval", "--model", str(tiny_student_dir), "--cache", str(cache), "--json", "--limit", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 2
    assert cli.main(["eval", "--model", str(tiny_student_dir), "--cache", str(cache), "--limit", "2"]) == 0
    assert "lower bound of the full-vocabulary KL" in capsys.readouterr().out
    code = cli.main(["eval", "--model", str(tiny_student_dir), "--cache", str(cache), "--adapter", str(tmp_path)])
    assert code == 2 and "adapter_config.json" in capsys.readouterr().err


def test_teacher_ids_beyond_the_student_vocabulary_are_no_class(tmp_path, samples_for_padding, tiny_model_dir,
                                                                 tiny_student_dir):
    """A teacher head with more rows than the student's (Qwen2.5-7B: 152,064, the 0.5B: 151,936) can put
    ids the student lacks in its top-k. eval treats them as training does (no class; the student's mass
    stays in the tail): it equals the loss path's KL instead of failing in a gather. It also reports the
    teacher's mean tail mass, and says the KL is a lower bound."""
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    fingerprint = tokenizer_fingerprint(AutoTokenizer.from_pretrained(tiny_model_dir))
    identity = {"teacher": {"path": str(tiny_model_dir)}, "tokenizer": fingerprint, "k": K}
    cache = tmp_path / "padded"
    beyond = 0
    with LogitCacheWriter(cache, identity, rows_per_shard=8, rows_per_row_group=4, background=False) as w:
        for s in samples_for_padding:
            positions = torch.tensor(s.positions)
            with torch.no_grad():
                logits = teacher(input_ids=torch.tensor([s.input_ids])).logits[0, positions - 1] * SHARPEN
            vocab = logits.shape[1]
            # 16 padded rows whose logits rival the real ones: some land in the top-k
            logp = torch.log_softmax(torch.cat([logits, logits[:, :16] + 0.3], 1), -1)
            top, ids = logp.topk(K, -1)
            beyond += int((ids >= vocab).sum())
            tail = logp.scatter(1, ids, -float("inf")).logsumexp(1)
            target = logp.gather(1, torch.tensor(s.input_ids)[positions][:, None])[:, 0]
            w.add(TeacherTopK(
                s.sample_id, np.asarray(s.input_ids, np.int32), positions.numpy().astype(np.int32),
                ids.numpy().astype(np.int32), top.numpy(), target.numpy(), tail.numpy(),
            ))
    assert beyond > 0
    metrics = evaluate.run(tiny_student_dir, cache, batch_size=4)
    student = AutoModelForCausalLM.from_pretrained(tiny_student_dir, dtype=torch.float32)
    assert metrics["kl"] == pytest.approx(held_out_kl(student, cache), rel=1e-5)
    assert metrics["kl_is_lower_bound"] is True
    tails = [s.tail_logmass.double().exp() for s in LogitCacheReader(cache).iter_samples(shuffle=False, seed=0)]
    assert metrics["teacher_tail_mass"] == pytest.approx(float(torch.cat(tails).mean()), rel=1e-5)


@pytest.fixture(scope="module")
def samples_for_padding(tiny_tokenizer_dir, tiny_dataset_path):
    config = config_from_dict({"dataset": {"labeled_path": str(tiny_dataset_path)}}, Path("."))
    return load_samples(config, AutoTokenizer.from_pretrained(tiny_tokenizer_dir), mode="score")[0][-HELD_OUT:]


def generated_cache(tmp_path: Path, dataset: Path, teacher: Path, temperature: float) -> Path:
    """The teacher answers the dataset's prompts itself (gen-logits `generate`, hf engine, 12 new tokens)."""
    from stages import gen_logits

    raw = {
        "dataset": {"instruction_path": str(dataset), "logits_path": str(tmp_path / f"gen{temperature}")},
        "models": {"teacher": str(teacher)},
        "inference": {"engine": "hf", "mode": "generate", "top_logits_num": K, "max_new_tokens": 12,
                      "temperature": temperature, "dtype": "float32", "batch_size": 8},
    }
    config = config_from_dict(raw, Path("."))
    gen_logits.run(config)
    return config.dataset.logits_path


def test_on_the_teachers_own_samples_eval_estimates_the_sequence_kl(tmp_path, cache, tiny_dataset_path,
                                                                     tiny_model_dir, tiny_student_dir):
    """On responses the teacher sampled at T = 1, student CE - teacher CE per token estimates the
    sequence-level KL(teacher || student): 0 for the teacher itself, positive for another student. On
    other responses (labelled data, or sampling at T != 1) it is no KL, and eval reports none."""
    sampled = generated_cache(tmp_path, tiny_dataset_path, tiny_model_dir, 1.0)
    itself = evaluate.run(tiny_model_dir, sampled, batch_size=4)
    # 0 up to the cache's rounding of the teacher's log-probs (the codec's grid: <= 1/48 nat a token, and
    # rounding errors of either sign average out; measured -5e-4)
    assert itself["sequence_kl_per_token"] == pytest.approx(0.0, abs=2e-3)
    other = evaluate.run(tiny_student_dir, sampled, batch_size=4)
    assert other["sequence_kl_per_token"] == pytest.approx(
        other["cross_entropy"] - other["teacher_cross_entropy"], rel=1e-9)
    assert other["sequence_kl_per_token"] > 0.01  # measured 0.034 (two random tiny models, near-uniform)
    assert evaluate.run(tiny_student_dir, cache, batch_size=4)["sequence_kl_per_token"] is None
    cooled = generated_cache(tmp_path, tiny_dataset_path, tiny_model_dir, 0.7)
    assert evaluate.run(tiny_student_dir, cooled, batch_size=4)["sequence_kl_per_token"] is None
