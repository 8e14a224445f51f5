"""LogitCacheReader: identity and integrity checks, shuffling, rank/worker coverage, resume, joins."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pipeline.cache import CacheDataset, LogitCacheReader, LogitCacheWriter, iter_joined
from pipeline.errors import UserError
from tests.test_cache_writer import IDENTITY, record, write

N = 23  # samples; shards of 5 rows in row groups of 2 (uneven on purpose)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    write(path, range(N), rows_per_shard=5, rows_per_row_group=2)
    return path


def order(reader: LogitCacheReader, **kwargs) -> list[str]:
    return [s.sample_id for s in reader.iter_samples(**{"shuffle": True, "seed": 0, **kwargs})]


def test_samples_roundtrip(cache):
    reader = LogitCacheReader(cache, expect={"tokenizer_hash": "tok0", "k": 8})
    samples = list(reader.iter_samples(shuffle=False, seed=0))
    assert [s.sample_id for s in samples] == [f"s{i:03d}" for i in range(N)]
    for i, s in enumerate(samples):
        r = record(i)
        assert s.topk_ids.dtype == torch.int64 and s.input_ids.dtype == torch.int64
        assert s.topk_logprobs.dtype == torch.float32 and s.tail_logmass.dtype == torch.float32
        np.testing.assert_array_equal(s.topk_ids.numpy(), r.topk_ids)
        np.testing.assert_array_equal(s.input_ids.numpy(), r.input_ids)
        np.testing.assert_array_equal(s.positions.numpy(), r.positions)
        # float64 reference: the grid step is at most 1/8 nat
        assert (
            np.abs(s.topk_logprobs.double().numpy() - r.topk_logprobs.astype(np.float64)).max()
            <= 1 / 16 + 1e-6
        )
        assert np.abs(s.tail_logmass.numpy() - r.tail_logmass).max() <= 1 / 16 + 1e-6
    assert reader.read_sample("s007").sample_id == "s007"


def test_expectation_mismatch_names_key(cache):
    with pytest.raises(UserError, match="tokenizer_hash expected 'other', found 'tok0'"):
        LogitCacheReader(cache, expect={"tokenizer_hash": "other"})
    with pytest.raises(UserError, match="k expected 64, found 8"):
        LogitCacheReader(cache, expect={"k": 64})
    with pytest.raises(UserError, match="teacher.dtype: expected 'float32', found 'bfloat16'"):
        LogitCacheReader(cache, expect={"teacher": {**IDENTITY["teacher"], "dtype": "float32"}})


def copy_cache(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_format_version_mismatch(cache, tmp_path):
    path = copy_cache(cache, tmp_path / "c")
    fragment = path / "parts" / "part-0-of-1.json"
    data = json.loads(fragment.read_text())
    data["identity"]["format_version"] = 99
    fragment.write_text(json.dumps(data))
    with pytest.raises(UserError, match="format_version 99"):
        LogitCacheReader(path)


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_corruption_is_reported_with_the_shard(cache, tmp_path, damage):
    path = copy_cache(cache, tmp_path / "c")
    shard = path / "shard-part-0-of-1-00002.parquet"
    data = bytearray(shard.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
        shard.write_bytes(bytes(data))
        expected = "sha256 .* differs from the manifest"
    elif damage == "truncate":
        shard.write_bytes(bytes(data[:-100]))
        expected = f"is {len(data) - 100} bytes, the manifest records {len(data)}"
    else:
        shard.unlink()
        expected = "listed in the manifest but missing"
    with pytest.raises(UserError, match=expected) as err:
        LogitCacheReader(path, verify="all")
    assert "shard-part-0-of-1-00002.parquet" in str(err.value)
    reader = LogitCacheReader(path)  # verify="first_read": fails when the stream reaches the shard
    with pytest.raises(UserError, match="shard-part-0-of-1-00002.parquet"):
        list(reader.iter_samples(shuffle=False, seed=0))


def test_incomplete_cache_is_refused(tmp_path):
    writer = LogitCacheWriter(tmp_path, IDENTITY, rows_per_shard=2, background=False)
    for i in range(5):
        writer.add(record(i))
    with pytest.raises(UserError, match="incomplete .*part-0-of-1"):
        LogitCacheReader(tmp_path)
    assert LogitCacheReader(tmp_path, allow_incomplete=True).num_samples == 4


def test_shuffle_is_deterministic(cache):
    reader = LogitCacheReader(cache)
    first = order(reader, shuffle_buffer=4)
    assert first == order(reader, shuffle_buffer=4)
    assert sorted(first) == [f"s{i:03d}" for i in range(N)] and first != sorted(first)
    assert order(reader, seed=1, shuffle_buffer=4) != first
    assert order(reader, epoch=1, shuffle_buffer=4) != first


@pytest.mark.parametrize("world_size,num_workers,block", [(1, 1, 1), (3, 1, 1), (2, 3, 2), (4, 2, 3)])
def test_ranks_and_workers_cover_every_sample_once(cache, world_size, num_workers, block):
    reader = LogitCacheReader(cache)
    seen: Counter[str] = Counter()
    for rank in range(world_size):
        rank_ids = []
        for worker in range(num_workers):
            rank_ids += order(
                reader,
                rank=rank,
                world_size=world_size,
                worker_id=worker,
                num_workers=num_workers,
                worker_block=block,
                shuffle_buffer=5,
            )
        assert len(rank_ids) == reader.rank_num_samples(rank, world_size)
        seen.update(rank_ids)
    assert seen == Counter(f"s{i:03d}" for i in range(N))


def test_each_rank_reads_only_its_share_of_the_cache(cache, monkeypatch):
    """N = 23 rows in 5 shards of 5 (row groups of 2): 4 ranks each read ~1/4 of the row groups, and a
    rank's range moves with the epoch's shard order."""
    reader = LogitCacheReader(cache)
    reads: list[tuple[str, int]] = []
    original = LogitCacheReader._read_rows

    def recording(self, shard, pf, table, rg, take):
        reads.append((shard.file, rg))
        return original(self, shard, pf, table, rg, take)

    monkeypatch.setattr(LogitCacheReader, "_read_rows", recording)
    total_groups = 5 * 3 - 1  # shards of 5 rows hold 3 row groups (2 + 2 + 1); the last shard has 3 rows
    shares = {}
    for epoch in (0, 1):
        for rank in range(4):
            reads.clear()
            ids = order(reader, rank=rank, world_size=4, epoch=epoch)
            assert len(ids) == reader.rank_num_samples(rank, 4)
            assert len(reads) <= total_groups // 4 + 2  # its rows' groups, plus at most one partial at each end
            shares[epoch, rank] = frozenset(ids)
    assert shares[0, 0] != shares[1, 0]


def test_workers_do_not_change_the_rank_stream(cache):
    """Blocks dealt round-robin to workers, read back round-robin, give the single-worker stream."""
    reader = LogitCacheReader(cache)
    single = order(reader, rank=1, world_size=2)
    per_worker = [
        order(reader, rank=1, world_size=2, worker_id=w, num_workers=3, worker_block=2) for w in range(3)
    ]
    merged = [
        per_worker[b % 3][(b // 3) * 2 + j]
        for b in range(6)
        for j in range(2)
        if (b // 3) * 2 + j < len(per_worker[b % 3])
    ]
    assert merged == single


def test_skip_resumes_mid_epoch(cache):
    reader = LogitCacheReader(cache)
    full = order(reader, rank=0, world_size=2, epoch=3)
    for skip in (0, 1, 5, len(full)):
        assert order(reader, rank=0, world_size=2, epoch=3, skip=skip) == full[skip:]


def test_dataloader_with_workers_resumes_exactly(cache):
    reader = LogitCacheReader(cache)
    dataset = CacheDataset(reader, seed=7, shuffle_buffer=6, worker_block=4)
    dataset.set_epoch(2)
    full = [s.sample_id for s in dataset]
    dataset.set_epoch(2, skip=8)
    loader = DataLoader(
        dataset, batch_size=4, num_workers=2, collate_fn=lambda batch: [s.sample_id for s in batch]
    )
    assert len(dataset) == N - 8
    assert [i for batch in loader for i in batch] == full[8:]


def test_joined_caches_pair_by_sample_id(cache, tmp_path):
    # Same samples, another layout and order (a second teacher's cache).
    second = tmp_path / "second"
    write(second, range(N - 1, -1, -1), rows_per_shard=7)
    joined = list(iter_joined([LogitCacheReader(cache), LogitCacheReader(second)], shuffle=True, seed=3))
    assert len(joined) == N
    for a, b in joined:
        assert a.sample_id == b.sample_id
        assert torch.equal(a.topk_ids, b.topk_ids)
    dataset = CacheDataset(LogitCacheReader(cache), joined=[LogitCacheReader(second)], seed=3)
    assert [a.sample_id for a, _ in dataset] == [a.sample_id for a, _ in joined]


def test_second_teacher_is_read_only_where_the_rank_reads(cache, tmp_path):
    """Caches of one layout (gen-logits writes every teacher's over the same samples in the same order):
    a rank's worker opens and hashes only the second cache's shards that its own rows are in, as it
    does for the first, and builds no index of the whole cache."""
    second = tmp_path / "second"
    write(second, range(N), rows_per_shard=5, rows_per_row_group=2)
    for rank in range(4):
        readers = [LogitCacheReader(cache), LogitCacheReader(second)]
        joined = list(iter_joined(readers, shuffle=True, seed=3, epoch=1, rank=rank, world_size=4))
        assert len(joined) == readers[0].rank_num_samples(rank, 4)
        assert all(a.sample_id == b.sample_id and torch.equal(a.topk_ids, b.topk_ids) for a, b in joined)
        assert readers[1]._verified == readers[0]._verified
        assert len(readers[1]._verified) < len(readers[1].manifest.shards)


def test_joined_caches_must_hold_the_same_tokens(cache, tmp_path):
    other = tmp_path / "other"
    with LogitCacheWriter(other, IDENTITY) as writer:
        for i in range(N):
            r = record(i)
            r.input_ids = r.input_ids + 1
            writer.add(r)
        writer.close()
    with pytest.raises(UserError, match="input_ids differ between"):
        next(iter_joined([LogitCacheReader(cache), LogitCacheReader(other)], shuffle=False, seed=0))
