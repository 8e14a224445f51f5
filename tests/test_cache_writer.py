"""LogitCacheWriter: shards + manifest, identity checks, SIGKILL resume, several writers, plain pyarrow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.cache import LogitCacheReader, LogitCacheWriter, decode_row, load_manifest, read_id_table
from pipeline.errors import UserError
from pipeline.records import TeacherTopK

K = 8
IDENTITY = {
    "teacher": {
        "path": "/models/t",
        "hash": "t0",
        "dtype": "bfloat16",
        "engine": "hf",
        "engine_version": "1",
    },
    "tokenizer": {"hash": "tok0", "vocab_size": 500},
    "k": K,
    "dataset": {"path": "d.jsonl", "hash": "d0", "template_hash": "tpl", "samples": 40},
    "mode": "teacher_forcing",
    "sampling": {"temperature": 1.0},
}


def record(i: int, k: int = K, vocab: int = 500) -> TeacherTopK:
    """A deterministic sample i: L = 10 + i % 7 tokens, the second half are response positions."""
    rng = np.random.default_rng(i)
    length = 10 + i % 7
    positions = np.arange(length // 2, length, dtype=np.int32)
    logits = rng.normal(0, 3, (len(positions), vocab))
    logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    order = np.argsort(-logp, axis=1)
    ids = order[:, :k]
    tail = np.logaddexp.reduce(np.take_along_axis(logp, order[:, k:], 1), axis=1)
    return TeacherTopK(
        sample_id=f"s{i:03d}",
        input_ids=rng.integers(0, vocab, length).astype(np.int32),
        positions=positions,
        topk_ids=ids.astype(np.int32),
        topk_logprobs=np.take_along_axis(logp, ids, 1).astype(np.float32),
        target_logprobs=logp[np.arange(len(positions)), 0].astype(np.float32),
        tail_logmass=tail.astype(np.float32),
    )


def write(cache: Path, ids: range, **kwargs) -> None:
    with LogitCacheWriter(cache, IDENTITY, **kwargs) as writer:
        for i in ids:
            writer.add(record(i))
        writer.close({"truncated": 1, "skipped": 2})


@pytest.mark.parametrize("background", [True, False])
def test_shards_manifest_and_totals(tmp_path, background):
    cache = tmp_path / "cache"
    write(cache, range(10), rows_per_shard=4, rows_per_row_group=3, background=background)
    m = load_manifest(cache)
    assert [s.file for s in m.shards] == [f"shard-part-0-of-1-0000{i}.parquet" for i in range(3)]
    assert [s.rows for s in m.shards] == [4, 4, 2]
    assert m.num_samples == 10
    assert m.num_tokens == sum(len(record(i).input_ids) for i in range(10))
    assert m.num_response_tokens == sum(len(record(i).positions) for i in range(10))
    assert m.num_bytes == sum((cache / s.file).stat().st_size for s in m.shards)
    assert m.is_complete and m.stats == {"truncated": 1, "skipped": 2}
    merged = json.loads((cache / "manifest.json").read_text())
    assert merged["teacher"] == IDENTITY["teacher"] and merged["format_version"] == 1
    assert merged["codec"]["name"] == "topk-gap-zstd" and merged["totals"]["samples"] == 10
    assert merged["parts"]["part-0-of-1"]["complete"] is True
    assert not list(cache.glob(".*tmp*"))  # no temp files left behind
    assert pq.ParquetFile(cache / m.shards[0].file).num_row_groups == 2  # 3 + 1 rows


def test_plain_pyarrow_row_decodes(tmp_path):
    """The README recipe: pyarrow + decode_row, nothing else from the pipeline."""
    write(tmp_path, range(3))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    pf = pq.ParquetFile(tmp_path / manifest["shards"][0]["file"])
    row = pf.read_row_group(0).slice(1, 1).to_pylist()[0]
    sample = decode_row(row, manifest["k"], manifest["codec"], read_id_table(pf.schema_arrow.metadata))
    original = record(1)
    assert sample["sample_id"] == "s001"
    np.testing.assert_array_equal(sample["topk_ids"], original.topk_ids)
    np.testing.assert_array_equal(sample["positions"], original.positions)
    assert np.abs(sample["topk_logprobs"] - original.topk_logprobs).max() < 0.07


def test_identity_mismatch_lists_keys(tmp_path):
    write(tmp_path, range(2))
    other = {**IDENTITY, "k": K, "tokenizer": {"hash": "tok1", "vocab_size": 500}, "mode": "generate"}
    with pytest.raises(UserError) as err:
        LogitCacheWriter(tmp_path, other)
    assert "tokenizer.hash: expected 'tok0', found 'tok1'" in str(err.value)
    assert "mode: expected 'teacher_forcing', found 'generate'" in str(err.value)


def test_thread_error_reraises_in_producer(tmp_path):
    bad = record(0)
    bad.topk_ids[0, 0] = -1  # only the codec, in the writer thread, checks the id range
    writer = LogitCacheWriter(tmp_path, IDENTITY, rows_per_shard=1)
    writer.add(bad)
    with pytest.raises(ValueError, match="token ids must be in"):
        for i in range(1, 500):  # the error surfaces at a later add() or at close()
            writer.add(record(i))
        writer.close()
    assert not load_manifest(tmp_path).is_complete


@pytest.mark.parametrize("column", ["topk_logprobs", "target_logprobs", "tail_logmass"])
def test_nan_logprobs_fail_at_add_naming_the_sample_and_the_fix(tmp_path, column):
    """A float16 teacher that overflows gives NaN log-probs: the error names the sample, the positions and
    `inference.dtype`, raised by add() itself (not later, from the writer thread); earlier shards stay."""
    bad = record(5)
    getattr(bad, column)[1] = np.nan
    with pytest.raises(UserError, match=r"sample 's005' are NaN at 1 response position\(s\).*inference.dtype"):
        with LogitCacheWriter(tmp_path, IDENTITY, rows_per_shard=2) as writer:
            for i in range(5):
                writer.add(record(i))
            writer.add(bad)
    assert load_manifest(tmp_path).num_samples == 5  # the samples before it are kept


def test_exception_in_block_keeps_finished_samples_but_not_completion(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with LogitCacheWriter(tmp_path, IDENTITY, rows_per_shard=4) as writer:
            for i in range(6):
                writer.add(record(i))
            raise KeyboardInterrupt
    m = load_manifest(tmp_path)
    assert m.num_samples == 6 and not m.is_complete


def test_shape_errors_raise_at_add(tmp_path):
    with LogitCacheWriter(tmp_path, IDENTITY, background=False) as writer:
        with pytest.raises(ValueError, match="k=8"):
            writer.add(record(0, k=4))
        bad = record(0)
        bad.positions = bad.positions - bad.positions[0]  # position 0 predicts nothing
        with pytest.raises(ValueError, match="positions must ascend within"):
            writer.add(bad)


def test_resume_continues_and_reports_completed_ids(tmp_path):
    writer = LogitCacheWriter(tmp_path, IDENTITY, rows_per_shard=3, background=False)
    for i in range(7):
        writer.add(record(i))
    del writer  # never closed: the last sample is lost, shards 0-1 stay
    resumed = LogitCacheWriter(tmp_path, IDENTITY, rows_per_shard=3)
    done = resumed.completed_sample_ids()
    assert done == {f"s{i:03d}" for i in range(6)}
    assert not load_manifest(tmp_path).is_complete
    for i in range(10):
        if f"s{i:03d}" not in done:
            resumed.add(record(i))
    resumed.close()
    m = load_manifest(tmp_path)
    assert m.is_complete and m.num_samples == 10
    assert m.shards[-1].file == "shard-part-0-of-1-00003.parquet"


KILL_SCRIPT = """
import sys, time
sys.path.insert(0, {root!r})
from tests.test_cache_writer import IDENTITY, record
from pipeline.cache import LogitCacheWriter
w = LogitCacheWriter({cache!r}, IDENTITY, rows_per_shard=4, rows_per_row_group=2, background=False)
for i in range(7):  # shard 0 complete, shard 1 has one row group in its temp file
    w.add(record(i))
print("READY", flush=True)
time.sleep(60)
"""


def test_sigkill_mid_shard_leaves_resumable_cache(tmp_path):
    cache = tmp_path / "cache"
    script = KILL_SCRIPT.format(root=str(Path(__file__).parents[1]), cache=str(cache))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "READY"
        assert list(cache.glob(".shard-*.tmp"))  # killed while a shard is half written
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert [s.rows for s in load_manifest(cache).shards] == [4]  # the partial shard is not in the manifest
    with LogitCacheWriter(cache, IDENTITY, rows_per_shard=4) as writer:
        assert not list(cache.glob(".shard-*.tmp"))  # cleaned on reopening
        done = writer.completed_sample_ids()
        assert done == {f"s{i:03d}" for i in range(4)}
        for i in range(4, 9):
            writer.add(record(i))
        writer.close()
    files = sorted(p.name for p in cache.glob("shard-*.parquet"))
    ids = [i for f in files for i in pq.read_table(cache / f, columns=["sample_id"]).column(0).to_pylist()]
    assert sorted(ids) == [f"s{i:03d}" for i in range(9)]  # every sample exactly once


def forget_last_shard(cache: Path) -> str:
    """Simulate a crash between the shard's rename and the manifest update."""
    fragment_path = cache / "parts" / "part-0-of-1.json"
    fragment = json.loads(fragment_path.read_text())
    last = fragment["shards"].pop()
    fragment["complete"] = False
    fragment_path.write_text(json.dumps(fragment))
    return last["file"]


def test_unrecorded_shard_is_adopted(tmp_path):
    write(tmp_path, range(6), rows_per_shard=3)
    orphan = forget_last_shard(tmp_path)
    writer = LogitCacheWriter(tmp_path, IDENTITY, rows_per_shard=3)
    assert writer.completed_sample_ids() == {f"s{i:03d}" for i in range(6)}
    writer.close()
    m = load_manifest(tmp_path)
    assert orphan in [s.file for s in m.shards] and m.num_samples == 6


def test_corrupt_unrecorded_shard_is_quarantined(tmp_path):
    write(tmp_path, range(6), rows_per_shard=3)
    orphan = forget_last_shard(tmp_path)
    (tmp_path / orphan).write_bytes((tmp_path / orphan).read_bytes()[:-40])
    writer = LogitCacheWriter(tmp_path, IDENTITY, rows_per_shard=3)
    assert writer.completed_sample_ids() == {f"s{i:03d}" for i in range(3)}
    assert (tmp_path / "quarantine" / orphan).exists() and not (tmp_path / orphan).exists()
    writer.close()


def test_a_second_quarantine_of_the_same_shard_name_keeps_the_first(tmp_path):
    """Two crashes, each leaving a corrupt unrecorded shard of the same name (the resumed writer reuses the
    sequence number): quarantine/ keeps both for inspection."""
    write(tmp_path, range(3), rows_per_shard=3)
    orphan = tmp_path / "shard-part-0-of-1-00001.parquet"
    for crash in (b"first crash", b"second crash"):
        orphan.write_bytes(crash)
        LogitCacheWriter(tmp_path, IDENTITY, rows_per_shard=3).close()
        assert not orphan.exists()
    kept = sorted(p.read_bytes() for p in (tmp_path / "quarantine").iterdir())
    assert kept == [b"first crash", b"second crash"]


def test_manifest_temp_files_do_not_collide_across_containers(tmp_path, monkeypatch):
    """Writers in other containers share the folder and may share pid and thread id (pid 1): a manifest
    rewrite must never open another writer's temp file."""
    from pipeline.cache import manifest

    write(tmp_path, range(2))
    monkeypatch.setattr(os, "getpid", lambda: 1)
    # what another container's writer with pid 1 (and, by chance, this thread's id) is writing right now
    theirs = tmp_path / f".{manifest.MANIFEST}.tmp-1-{threading.get_ident()}"
    theirs.write_bytes(b"their half-written manifest")
    with LogitCacheWriter(tmp_path, IDENTITY, writer_id="part-1-of-2", background=False) as writer:
        writer.add(record(5))
    assert theirs.read_bytes() == b"their half-written manifest"
    assert load_manifest(tmp_path).num_samples == 3


def test_two_writers_in_one_directory(tmp_path):
    """Parts I of N written concurrently: the manifest is the union; complete only when all parts closed."""
    half = {0: range(0, 9), 1: range(9, 20)}
    writers = {
        i: LogitCacheWriter(tmp_path, IDENTITY, writer_id=f"part-{i}-of-3", rows_per_shard=2) for i in half
    }
    threads = [
        threading.Thread(target=lambda i=i: [writers[i].add(record(j)) for j in half[i]]) for i in half
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    writers[0].close()
    m = load_manifest(tmp_path)
    assert not m.is_complete and m.missing_parts == ["part-2-of-3"]
    writers[1].close()
    LogitCacheWriter(tmp_path, IDENTITY, writer_id="part-2-of-3").close()
    m = load_manifest(tmp_path)
    assert m.is_complete and m.num_samples == 20
    assert {s.file.split("-")[2] for s in m.shards} == {"0", "1"}
    merged = json.loads((tmp_path / "manifest.json").read_text())
    assert merged["totals"]["samples"] == 20 and merged["complete"] is True


def test_parts_from_machines_with_other_mount_points_share_one_cache(tmp_path):
    """Paths are provenance: a part whose teacher lives elsewhere (same hash) joins; another hash does not."""
    elsewhere = {**IDENTITY, "teacher": {**IDENTITY["teacher"], "path": "/mnt/node7/models/t"}}
    with LogitCacheWriter(tmp_path, IDENTITY, writer_id="part-0-of-2", background=False) as writer:
        writer.add(record(0))
    with LogitCacheWriter(tmp_path, elsewhere, writer_id="part-1-of-2", background=False) as writer:
        writer.add(record(1))
    reader = LogitCacheReader(tmp_path)
    assert reader.num_samples == 2 and reader.manifest.is_complete
    assert sorted(s.sample_id for s in reader.iter_samples(shuffle=False, seed=0)) == ["s000", "s001"]
    retrained = {**IDENTITY, "teacher": {**IDENTITY["teacher"], "hash": "t1"}}
    with pytest.raises(UserError, match="teacher.hash: expected"):
        LogitCacheWriter(tmp_path, retrained, writer_id="part-1-of-2")
