"""Sampled-tail caches end to end: gen-logits (vLLM and hf) against float64, reproducible draws across
parts and reruns, plain-pyarrow decoding, inspect, and train-student's loss checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from test_gen_logits import CODEC_TOL, read_rows, write_config
from transformers import AutoModelForCausalLM

from pipeline import cli
from pipeline.cache import decode_row, load_manifest, read_id_table
from pipeline.config import load_config
from stages import gen_logits
from stages.inspect_cache import run as inspect_run

K, DRAWS = 4, 16


def check_samples_against_teacher(rows, teacher_dir: Path, k: int, draws: int) -> float:
    """Top-k and sampled log-probs = the float64 log-softmax; sampled ids outside the top-k, counts sum to U.
    Returns the mean number of unique sampled ids per position."""
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    unique = []
    for row in rows.values():
        with torch.no_grad():
            logits = model(input_ids=row.input_ids[None]).logits[0, row.positions - 1]
        logp = torch.log_softmax(logits.double(), dim=1)
        if k:
            torch.testing.assert_close(row.topk_logprobs.double(), logp.topk(k, dim=1).values, atol=CODEC_TOL, rtol=0)
        tail = torch.zeros(len(logp), dtype=torch.float64)  # k = 0: the whole mass is the tail
        if k:
            tail = logp.scatter(1, row.topk_ids, float("-inf")).logsumexp(dim=1)
        torch.testing.assert_close(row.tail_logmass.double(), tail, atol=CODEC_TOL, rtol=0)
        real = row.sample_counts > 0
        assert (row.sample_counts.sum(1) == draws).all()
        for j in range(len(row.positions)):
            ids = row.sample_ids[j][real[j]]
            assert not np.isin(ids.numpy(), row.topk_ids[j].numpy()).any()
            assert len(set(ids.tolist())) == len(ids)
            torch.testing.assert_close(
                row.sample_logprobs[j][real[j]].double(), logp[j, ids], atol=CODEC_TOL, rtol=0
            )
        unique.append(real.sum(1).double())
    return torch.cat(unique).mean().item()


def assert_same_samples(a, b) -> None:
    assert a.keys() == b.keys()
    for sample_id, row in a.items():
        for name in ("topk_ids", "topk_logprobs", "tail_logmass", "sample_ids", "sample_counts", "sample_logprobs"):
            torch.testing.assert_close(getattr(row, name), getattr(b[sample_id], name), rtol=0, atol=0)


@pytest.mark.parametrize("k", [K, 0])
def test_hf_engine_writes_a_reproducible_sampled_cache(tmp_path, tiny_dataset_path, tiny_model_dir, k, capsys):
    one = tmp_path / "one"
    config = load_config(write_config(tmp_path, tiny_dataset_path, [tiny_model_dir], one,
                                      top_logits_num=k, tail_samples=DRAWS))
    gen_logits.run(config)
    manifest = load_manifest(one)
    assert manifest.format_version == 2 and manifest.kind == ("hybrid" if k else "sampled")
    assert manifest.identity["tail_samples"] == {"draws": DRAWS, "seed": 42}
    rows = read_rows(one)
    unique = check_samples_against_teacher(rows, tiny_model_dir, k, DRAWS)
    assert 1 < unique < DRAWS  # a nearly uniform random-init teacher: few repeats, but some

    # Two parts and a rerun draw the same ids: the draws are keyed by seed and sample id only.
    split = tmp_path / "split"
    config = load_config(write_config(tmp_path, tiny_dataset_path, [tiny_model_dir], split,
                                      top_logits_num=k, tail_samples=DRAWS, batch_size=3))
    for part in (1, 0):
        gen_logits.run(config, part=part, num_parts=2)
    assert_same_samples(rows, read_rows(split))

    # Another seed draws other ids (and is another cache identity).
    other = tmp_path / "other"
    gen_logits.run(load_config(write_config(tmp_path, tiny_dataset_path, [tiny_model_dir], other,
                                            top_logits_num=k, tail_samples=DRAWS, seed=7)))
    first = next(iter(rows))
    assert not torch.equal(read_rows(other)[first].sample_ids, rows[first].sample_ids)

    # Plain pyarrow + decode_row, as the README shows, returns the samples too.
    shard = one / manifest.shards[0].file
    pf = pq.ParquetFile(shard)
    row = pf.read_row_group(0).slice(0, 1).to_pylist()[0]
    decoded = decode_row(row, manifest.k, manifest.identity["codec"], read_id_table(pf.schema_arrow.metadata))
    np.testing.assert_array_equal(decoded["sample_counts"], rows[row["sample_id"]].sample_counts.numpy())

    capsys.readouterr()
    assert inspect_run(one, as_json=False, verify=True, sample=8) == 0
    out = capsys.readouterr().out
    assert f"kind             {manifest.kind}: exact top-{k} + {DRAWS} ids drawn from the tail" in out
    assert "unique sampled ids per position" in out


def test_config_refuses_a_cache_without_targets(tmp_path, tiny_dataset_path, tiny_model_dir):
    path = write_config(tmp_path, tiny_dataset_path, [tiny_model_dir], tmp_path / "c", top_logits_num=0)
    assert cli.main(["gen-logits", "--config", str(path)]) == 2


@pytest.mark.slow
def test_vllm_engine_sampled_cache_matches_the_reference_and_trains(
    tmp_path, tiny_dataset_path, tiny_model_dir, tiny_student_dir, capsys
):
    cache = tmp_path / "cache"
    config = load_config(write_config(tmp_path, tiny_dataset_path, [tiny_model_dir], cache, engine="vllm",
                                      top_logits_num=K, tail_samples=DRAWS))
    gen_logits.run(config)
    check_samples_against_teacher(read_rows(cache), tiny_model_dir, K, DRAWS)

    def train_config(name: str, **distillation) -> Path:
        raw = {
            "dataset": {"logits_path": str(cache)},
            "models": {"student": str(tiny_student_dir)},
            "distillation": {"kd_ratio": 0.9, **distillation},
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
            "training": {"output_dir": str(tmp_path / name), "per_device_train_batch_size": 4, "max_steps": 4,
                         "logging_steps": 1, "learning_rate": 1e-3, "report_to": "none", "use_cpu": True,
                         "disable_tqdm": True},
        }
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(raw))
        return path

    assert cli.main(["train-student", "--config", str(train_config("sampled"))]) == 0
    metrics = json.loads((tmp_path / "sampled" / "metrics.json").read_text())
    assert metrics["global_step"] == 4 and np.isfinite(metrics["last_log"]["kd"])
    assert (tmp_path / "sampled" / "adapter_model.safetensors").is_file()
    capsys.readouterr()
    assert cli.main(["train-student", "--config", str(train_config("rkl", distillation_type="reverse_kld"))]) == 2
    assert "forward_kld only" in capsys.readouterr().err
    assert not (tmp_path / "rkl").exists()


def test_eval_on_a_sampled_cache_estimates_the_full_kl_without_bias(
    tmp_path, tiny_dataset_path, tiny_model_dir, tiny_student_dir
):
    """eval's kl_estimate equals a float64 loop over the cache rows, and lands near the exact full-vocabulary
    KL against the live teacher, while the bucket KL stays below it (a lower bound)."""
    from stages import evaluate

    cache = tmp_path / "held_out"
    gen_logits.run(load_config(write_config(tmp_path, tiny_dataset_path, [tiny_model_dir], cache,
                                            top_logits_num=K, tail_samples=64)))
    metrics = evaluate.run(tiny_student_dir, cache, as_json=True)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    student = AutoModelForCausalLM.from_pretrained(tiny_student_dir, dtype=torch.float64).eval()
    estimate = exact = tokens = variance = 0.0
    for row in read_rows(cache).values():
        with torch.no_grad():
            logp = torch.log_softmax(teacher(input_ids=row.input_ids[None]).logits[0, row.positions - 1], -1)
            logq = torch.log_softmax(student(input_ids=row.input_ids[None]).logits[0, row.positions - 1], -1)
        exact += (logp.exp() * (logp - logq)).sum().item()
        for j in range(len(row.positions)):
            for i, a in zip(row.topk_ids[j].tolist(), row.topk_logprobs[j].double().tolist(), strict=True):
                estimate += math.exp(a) * (a - logq[j, i].item())
            real = row.sample_counts[j] > 0
            counts = row.sample_counts[j][real].double()
            draws = counts.sum().item()
            # the tail term is the mean over U draws of r (log p_j - log q_j)
            terms = math.exp(row.tail_logmass[j].item()) * (
                row.sample_logprobs[j][real].double() - logq[j, row.sample_ids[j][real]]
            )
            mean = (counts * terms).sum().item() / draws
            estimate += mean
            variance += (counts * (terms - mean) ** 2).sum().item() / (draws - 1) / draws
        tokens += len(row.positions)
    assert metrics["kl_estimate"] == pytest.approx(estimate / tokens, rel=1e-4)
    # unbiased: within 4 standard errors (from the draws' own spread) of the exact KL, plus 1e-3 for the
    # codec's log-prob rounding (zero-mean; its KL distortion measures ~5e-5 nats per position)
    standard_error = math.sqrt(variance) / tokens
    assert abs(metrics["kl_estimate"] - exact / tokens) < 4 * standard_error + 1e-3, (standard_error,)
    assert metrics["kl"] < exact / tokens


def test_eval_on_a_purely_sampled_cache_reports_no_top1(tmp_path, tiny_dataset_path, tiny_model_dir, tiny_student_dir):
    from stages import evaluate

    cache = tmp_path / "held_out"
    gen_logits.run(load_config(write_config(tmp_path, tiny_dataset_path, [tiny_model_dir], cache,
                                            top_logits_num=0, tail_samples=32)))
    metrics = evaluate.run(tiny_student_dir, cache, as_json=True, limit=6)
    assert metrics["kl"] is None and metrics["top1_agreement"] is None
    assert metrics["kl_estimate"] > 0 and np.isfinite(metrics["cross_entropy"])
