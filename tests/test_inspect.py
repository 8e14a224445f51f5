"""`pipeline inspect`: the summary a person reads, the JSON a script reads, and --verify."""

from __future__ import annotations

import json

import pytest

from stages.inspect_cache import run
from tests.test_cache_writer import write


def test_text_summary(tmp_path, capsys):
    write(tmp_path, range(12), rows_per_shard=5)
    assert run(tmp_path, as_json=False, verify=True) == 0
    out = capsys.readouterr().out
    for expected in (
        "samples          12",
        "kind             top-k: exact top-8",
        "in 3 shards",
        "B/response token",
        "path=/models/t",
        "hash=tok0",
        "topk-gap-zstd",
        "truncated=1",
        "part part-0-of-1 complete: 12 samples",
        "all sha256 checksums match",
    ):
        assert expected in out, expected


def test_json_and_failed_verification(tmp_path, capsys):
    write(tmp_path, range(12), rows_per_shard=5)
    shard = tmp_path / "shard-part-0-of-1-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert run(tmp_path, as_json=True, verify=True, sample=12) == 2  # coverage reads the damaged shard too
    info = json.loads(capsys.readouterr().out)
    assert info["coverage"] is None and "shard-part-0-of-1-00001.parquet" in info["coverage_error"]
    assert info["samples"] == 12 and info["shards"] == 3 and info["complete"] is True
    assert info["tokenizer"] == {"hash": "tok0", "vocab_size": 500}
    assert info["bytes_per_response_token"] > 0 and info["stats"] == {"truncated": 1, "skipped": 2}
    assert (
        info["verified"]["ok"] is False and "shard-part-0-of-1-00001.parquet" in info["verified"]["problems"]
    )


def test_incomplete_parts_are_shown(tmp_path, capsys):
    from pipeline.cache import LogitCacheWriter
    from tests.test_cache_writer import IDENTITY, record

    writer = LogitCacheWriter(tmp_path, IDENTITY, writer_id="part-1-of-2", rows_per_shard=2, background=False)
    for i in range(3):
        writer.add(record(i))
    assert run(tmp_path, as_json=False, verify=False) == 0
    out = capsys.readouterr().out
    assert "INCOMPLETE" in out and "part-1-of-2 in progress or interrupted: 2 samples" in out
    assert "part-0-of-2 missing" in out


def test_teacher_coverage_matches_the_records(tmp_path, capsys):
    """--sample N: mass outside the top-k, actual token in the top-k, teacher NLL over the first N rows."""
    import numpy as np

    from pipeline.cache import LogitCacheWriter
    from tests.test_cache_writer import IDENTITY, record

    rows = [record(i) for i in range(8)]
    for r in rows:  # every other response token is the teacher's second choice
        r.input_ids[r.positions[::2]] = r.topk_ids[::2, 1]
    with LogitCacheWriter(tmp_path, IDENTITY, rows_per_shard=3) as writer:
        for r in rows:
            writer.add(r)
    assert run(tmp_path, as_json=True, verify=False, sample=5) == 0
    cov = json.loads(capsys.readouterr().out)["coverage"]
    rows = rows[:5]
    tail = np.concatenate([np.exp(r.tail_logmass.astype(np.float64)) for r in rows])
    inside = np.concatenate([(r.topk_ids == r.input_ids[r.positions][:, None]).any(1) for r in rows])
    nll = -np.concatenate([r.target_logprobs for r in rows]).astype(np.float64).mean()
    assert cov["samples"] == 5 and cov["response_tokens"] == tail.size
    assert cov["mass_outside_topk_mean"] == pytest.approx(tail.mean(), rel=0.02)  # log-probs are quantized
    assert cov["mass_outside_topk_p90"] == pytest.approx(np.percentile(tail, 90), rel=0.03)
    assert 0.5 <= inside.mean() < 1 and cov["target_in_topk"] == pytest.approx(inside.mean())
    assert cov["teacher_nll"] == pytest.approx(nll, abs=0.01)
    assert run(tmp_path, as_json=False, verify=False, sample=5) == 0
    assert "teacher coverage first 5 samples" in capsys.readouterr().out
