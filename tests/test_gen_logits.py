"""stages/gen_logits.py end to end: caches against a float64 reference, generate mode with two
teachers, SIGKILL and resume, parts, and every bad input (each rejected before a model loads).

vLLM starts four times in this file (one score run; generate = one generation and two scoring
engines, without torch.compile); the rest runs on the hf engine, which shares the stage and top-k
code.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline import cli
from pipeline.cache import LogitCacheReader, TopKCodec, load_manifest
from pipeline.config import load_config
from pipeline.data import load_samples
from pipeline.errors import UserError
from pipeline.records import CacheSample
from stages import gen_logits

K = 16
# The cache quantizes log-probs (|error| <= step_max / 2): a cache matches a float64 reference to
# that, and two engines' caches (1e-6 apart before coding) differ by at most one grid step.
CODEC_TOL = TopKCodec().step_max / 2 + 1e-4
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="module")
def sharp_teacher_dir(tmp_path_factory, tiny_model_dir: Path, tiny_tokenizer_dir: Path) -> Path:
    """The tiny teacher with its output head scaled 8x: confident, so top-k ids are rarely tied."""
    out = tmp_path_factory.mktemp("sharp_teacher")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_tokenizer_dir).save_pretrained(out)
    return out


@pytest.fixture
def no_engine(monkeypatch):
    """Fail the test if the stage tries to load a model."""

    def refuse(*args: Any, **kwargs: Any):
        raise AssertionError("an engine was started")

    monkeypatch.setattr(gen_logits, "make_engine", refuse)


def write_config(tmp_path: Path, dataset: Path, teachers: list[Path], cache: Path, **inference: Any) -> Path:
    raw = {
        "dataset": {
            "labeled_path": str(dataset),
            "instruction_path": str(dataset),
            "logits_path": str(cache),
        },
        "models": {"teacher": [str(t) for t in teachers]},
        "inference": {
            "engine": "hf",
            "top_logits_num": K,
            "batch_size": 4,
            "rows_per_shard": 4,
            "chunk_size": 64,
            "gpu_memory_utilization": 0.15,
            "dtype": "float32",
            "enforce_eager": True,  # vLLM starts in half the time without torch.compile
            **inference,
        },
        "distillation": {"max_seq_length": 1024},
    }
    path = tmp_path / f"config-{len(list(tmp_path.glob('config-*.json')))}.json"
    path.write_text(json.dumps(raw))
    return path


def read_rows(cache: Path) -> dict[str, CacheSample]:
    rows = list(LogitCacheReader(cache).iter_samples(shuffle=False, seed=0))
    by_id = {r.sample_id: r for r in rows}
    assert len(by_id) == len(rows), "a sample is stored twice"
    return by_id


def assert_same_rows(a: dict[str, CacheSample], b: dict[str, CacheSample]) -> None:
    assert a.keys() == b.keys()
    for sample_id, row in a.items():
        for name in (
            "input_ids",
            "positions",
            "topk_ids",
            "topk_logprobs",
            "target_logprobs",
            "tail_logmass",
        ):
            torch.testing.assert_close(getattr(row, name), getattr(b[sample_id], name), rtol=0, atol=0)


def check_against_teacher(rows: dict[str, CacheSample], teacher_dir: Path) -> None:
    """Cached top-k = float64 log_softmax of the transformers model's logits at t-1 (codec precision)."""
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    for row in rows.values():
        with torch.no_grad():
            logits = model(input_ids=row.input_ids[None]).logits[0, row.positions - 1]
        logp = torch.log_softmax(logits.double(), dim=1)
        top = logp.topk(K, dim=1).values
        torch.testing.assert_close(row.topk_logprobs.double(), top, atol=CODEC_TOL, rtol=0)
        torch.testing.assert_close(
            row.topk_logprobs.double(), logp.gather(1, row.topk_ids), atol=CODEC_TOL, rtol=0
        )
        target = logp.gather(1, row.input_ids[row.positions][:, None])[:, 0]
        torch.testing.assert_close(row.target_logprobs.double(), target, atol=CODEC_TOL, rtol=0)
        tail = logp.scatter(1, row.topk_ids, float("-inf")).logsumexp(dim=1)
        torch.testing.assert_close(row.tail_logmass.double(), tail, atol=CODEC_TOL, rtol=0)


@pytest.mark.slow
def test_vllm_and_hf_caches_agree_with_each_other_and_the_reference(
    tmp_path, tiny_dataset_path, sharp_teacher_dir
) -> None:
    caches = {}
    for engine in ("vllm", "hf"):
        cache = tmp_path / engine
        config = load_config(
            write_config(tmp_path, tiny_dataset_path, [sharp_teacher_dir], cache, engine=engine)
        )
        summary = gen_logits.run(config)
        assert summary["samples"] == 24 and summary["bytes_per_token"] > 0
        caches[engine] = read_rows(cache)
        check_against_teacher(caches[engine], sharp_teacher_dir)
    assert load_manifest(tmp_path / "vllm").identity["teacher"]["engine"] == "vllm"
    same_ids = []
    for sample_id, ours in caches["vllm"].items():
        theirs = caches["hf"][sample_id]
        torch.testing.assert_close(ours.topk_logprobs, theirs.topk_logprobs, atol=2 * CODEC_TOL, rtol=0)
        same_ids.append((ours.topk_ids == theirs.topk_ids).float().mean().item())
    assert np.mean(same_ids) > 0.99  # the rest are ties


@pytest.mark.parametrize("engine", ["hf", pytest.param("vllm", marks=pytest.mark.slow)])
def test_generate_mode_two_teachers_score_the_first_ones_sequences(
    engine, tmp_path, tiny_dataset_path, tiny_model_dir, sharp_teacher_dir, monkeypatch
) -> None:
    teachers = [tiny_model_dir, sharp_teacher_dir]
    path = write_config(
        tmp_path,
        tiny_dataset_path,
        teachers,
        tmp_path / "cache",
        engine=engine,
        mode="generate",
        max_new_tokens=12,
        temperature=1.0,
    )
    config = load_config(path)
    gen_logits.run(config)
    dirs = gen_logits.cache_dirs(config)
    assert [d.parent for d in dirs] == [tmp_path / "cache"] * 2 and dirs[0] != dirs[1]
    first, second = read_rows(dirs[0]), read_rows(dirs[1])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)  # the stage tokenizes with the first teacher's
    prompts = {s.sample_id: s.input_ids for s in load_samples(config, tokenizer, mode="generate")[0]}
    eos = set(tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))
    assert first.keys() == prompts.keys()
    for sample_id, row in first.items():
        prompt, ids = prompts[sample_id], row.input_ids.tolist()
        assert ids[: len(prompt)] == prompt
        response = ids[len(prompt) :]
        assert row.positions.tolist() == list(range(len(prompt), len(ids)))
        assert len(response) == 12 or response[-1] in eos  # the EOS the teacher emitted is kept
        assert torch.equal(second[sample_id].input_ids, row.input_ids)
        assert torch.equal(second[sample_id].positions, row.positions)
    check_against_teacher(first, tiny_model_dir)
    check_against_teacher(second, sharp_teacher_dir)
    assert load_manifest(dirs[1]).identity["sampling"]["generator"] == str(tiny_model_dir)
    # Both caches hold the first teacher's token ids, and say whose tokenizer made them.
    assert load_manifest(dirs[1]).identity["tokenizer"]["path"] == str(tiny_model_dir)
    # A complete cache is a no-op: no engine starts.
    monkeypatch.setattr(gen_logits, "make_engine", lambda *a, **k: pytest.fail("engine started"))
    assert gen_logits.run(config)["samples"] == 0


def test_generate_resumes_from_the_journal_without_sampling_again(
    tmp_path, tiny_dataset_path, tiny_model_dir, monkeypatch
) -> None:
    path = write_config(
        tmp_path, tiny_dataset_path, [tiny_model_dir], tmp_path / "cache", mode="generate", max_new_tokens=6
    )
    config = load_config(path)
    gen_logits.run(config)
    expected = read_rows(tmp_path / "cache")
    journal = tmp_path / "cache" / "generations-part-0-of-1.jsonl"
    kept = journal.read_text()
    shutil.rmtree(tmp_path / "cache")  # as if killed after generating, before the first shard
    (tmp_path / "cache").mkdir()
    journal.write_text(kept)
    with journal.open("a") as f:
        f.write('{"sample_id": "torn')  # a line cut short by the kill
    from pipeline.teacher.engines.hf_engine import HfEngine

    monkeypatch.setattr(HfEngine, "generate", lambda *a: pytest.fail("sampled again"))
    gen_logits.run(config)
    assert_same_rows(read_rows(tmp_path / "cache"), expected)


def test_sigkill_and_rerun_equals_an_uninterrupted_run(tmp_path, tiny_dataset_path, tiny_model_dir) -> None:
    cache = tmp_path / "killed"
    path = write_config(tmp_path, tiny_dataset_path, [tiny_model_dir], cache, batch_size=1, rows_per_shard=2)
    command = [sys.executable, "-m", "pipeline.cli", "gen-logits", "--config", str(path)]
    for shards_before_kill in (2, 5):  # two kills at different points, then a run to the end
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while len(list(cache.glob("shard-*.parquet"))) < shards_before_kill and process.poll() is None:
            assert time.time() < deadline, "no shards appeared"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert not load_manifest(cache).is_complete, "the run ended before it was killed"
    assert subprocess.run(command, capture_output=True).returncode == 0
    uninterrupted = tmp_path / "uninterrupted"  # same batching: the same float rounding
    gen_logits.run(
        load_config(
            write_config(
                tmp_path, tiny_dataset_path, [tiny_model_dir], uninterrupted, batch_size=1, rows_per_shard=2
            )
        )
    )
    assert load_manifest(cache).is_complete
    assert_same_rows(read_rows(cache), read_rows(uninterrupted))


def test_three_parts_fill_one_cache_like_a_single_run(tmp_path, tiny_dataset_path, tiny_model_dir) -> None:
    whole, split = tmp_path / "whole", tmp_path / "split"
    gen_logits.run(load_config(write_config(tmp_path, tiny_dataset_path, [tiny_model_dir], whole)))
    config = load_config(write_config(tmp_path, tiny_dataset_path, [tiny_model_dir], split))
    counts = [gen_logits.run(config, part=i, num_parts=3)["samples"] for i in range(3)]
    assert counts == [8, 8, 8]
    assert sorted(load_manifest(split).parts) == [f"part-{i}-of-3" for i in range(3)]
    assert_same_rows(read_rows(split), read_rows(whole))


def test_overwrite_and_identity_changes(tmp_path, tiny_dataset_path, tiny_model_dir) -> None:
    cache = tmp_path / "cache"
    gen_logits.run(load_config(write_config(tmp_path, tiny_dataset_path, [tiny_model_dir], cache)))
    other_k = load_config(
        write_config(tmp_path, tiny_dataset_path, [tiny_model_dir], cache, top_logits_num=8)
    )
    with pytest.raises(UserError, match="another identity"):
        gen_logits.run(other_k)
    assert gen_logits.run(other_k, overwrite=True)["samples"] == 24
    assert load_manifest(cache).k == 8
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    notes = load_config(write_config(tmp_path, tiny_dataset_path, [tiny_model_dir], tmp_path / "notes"))
    with pytest.raises(UserError, match="not a logit cache"):
        gen_logits.run(notes, overwrite=True)
    assert (tmp_path / "notes" / "keep.txt").exists()


def _small_tokenizer_model(tmp_path: Path) -> Path:
    from pipeline.toy.models import build_model, local_corpus, train_tokenizer

    tokenizer = train_tokenizer(
        tmp_path / "other_tok", vocab_size=300, corpus=local_corpus("student", 50_000)
    )
    return build_model(tmp_path / "other_model", tokenizer, hidden_size=64, num_layers=1, num_heads=1)


@pytest.mark.usefixtures("no_engine")
def test_bad_inputs_fail_before_any_model_loads(tmp_path, tiny_dataset_path, tiny_model_dir) -> None:
    def config(teachers=(tiny_model_dir,), dataset=tiny_dataset_path, **overrides):
        raw = json.loads(write_config(tmp_path, dataset, list(teachers), tmp_path / "c").read_text())
        for key, value in overrides.items():
            section, name = key.split("__")
            raw[section][name] = value
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(raw))
        return load_config(path)

    other = _small_tokenizer_model(tmp_path)
    no_cache = config()
    no_cache.dataset.logits_path = None
    cases = [
        (config(teachers=[tmp_path / "missing"]), "does not exist"),
        (config(teachers=[tiny_model_dir, other]), "map tokens to different ids"),
        (config(models__student=str(other)), "map tokens to different ids"),
        (config(inference__top_logits_num=2000), "larger than the teacher's vocabulary"),
        (config(dataset=tmp_path / "none.jsonl"), "does not exist"),
        (config(teachers=[]), "`models.teacher` is empty"),
        (no_cache, "`dataset.logits_path` is not set"),
        (config(inference__max_model_len=16), "max_model_len"),
    ]
    (tmp_path / "broken.jsonl").write_text('{"instruction": "x", "output": "y"}\n{not json\n')
    cases.append((config(dataset=tmp_path / "broken.jsonl"), "not valid JSON"))
    for bad, message in cases:
        with pytest.raises(UserError, match=message):
            gen_logits.run(bad)
    with pytest.raises(UserError, match="0 <= part < num-parts"):
        gen_logits.run(config(), part=3, num_parts=3)
    # Through the CLI: exit code 2 and one line, no traceback.
    bad_path = write_config(tmp_path, tiny_dataset_path, [tmp_path / "missing"], tmp_path / "c")
    assert cli.main(["gen-logits", "--config", str(bad_path)]) == 2


def test_parts_record_the_dataset_counts_once(tmp_path, tiny_dataset_path, tiny_model_dir) -> None:
    """Every part tokenizes the whole dataset; the merged manifest must not count its truncations N times."""
    def config(cache: Path):
        path = write_config(tmp_path, tiny_dataset_path, [tiny_model_dir], cache)
        raw = json.loads(path.read_text())
        raw["distillation"]["max_seq_length"] = 160  # cuts some responses
        path.write_text(json.dumps(raw))
        return load_config(path)

    gen_logits.run(config(tmp_path / "whole"))
    split = config(tmp_path / "split")
    for i in range(3):
        gen_logits.run(split, part=i, num_parts=3)
    whole, parts = load_manifest(tmp_path / "whole").stats, load_manifest(tmp_path / "split").stats
    for key in ("truncated_response", "dropped_prompt_too_long", "records"):  # none summed over parts
        assert parts.get(key) == whole.get(key), key
    assert whole["dataset"]["truncated_response"] > 0
    assert parts["dataset"] == whole["dataset"]
    assert parts["part_samples"] == whole["part_samples"] == whole["dataset"]["samples"]
