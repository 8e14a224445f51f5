"""LogitCacheReader: checked, streaming, shuffled, rank/worker-split access to a logit cache.

Epoch order (deterministic for a seed):
1. Global order G: the shards in a permutation drawn from (seed, epoch) (manifest order when
   shuffle=False), each read row group by row group, rows in file order.
2. Ranks: G is cut into world_size contiguous ranges, rank r taking the r-th, of
   len(range(r, N, world_size)) rows (sample counts differ by at most one, so DDP ranks run the
   same number of steps). Each rank opens only the shards and row groups that overlap its range:
   with W ranks, each reads about 1/W of the cache per epoch, not all of it; and since the shard
   order changes every epoch, so does each rank's share.
3. The rank's rows pass through a shuffle buffer (`shuffle_buffer` rows, seeded by seed, epoch and
   rank): the result is this rank's stream S. It does not depend on the number of workers.
4. `skip` drops the first `skip` items of S (mid-epoch resume; no decoding). The rest is dealt to
   DataLoader workers in blocks of `worker_block` items: block b goes to worker b % num_workers.
   With worker_block = the DataLoader batch size, the DataLoader yields S[skip:] in order, so
   "samples consumed so far" is an exact resume point even if the worker count changes.
Every worker of a rank walks the rank's rows to keep the shuffle identical, but decodes only its
own, which is where the time goes. Memory holds one row group plus the shuffle buffer of coded
rows, whatever the cache size.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.cache import tail_codec
from pipeline.cache.codec import TopKCodec, read_id_table
from pipeline.cache.manifest import (
    READABLE_FORMAT_VERSIONS,
    Manifest,
    ShardEntry,
    identity_diff,
    load_manifest,
)
from pipeline.cache.writer import CODED_COLUMNS, file_sha256
from pipeline.errors import UserError
from pipeline.records import CacheSample

log = logging.getLogger(__name__)

VERIFY_MODES = ("first_read", "all", "none")
# Short names for `expect`; any other key is a dotted path into the identity ("teacher.hash").
EXPECT_ALIASES = {
    "tokenizer_hash": "tokenizer.hash",
    "vocab_size": "tokenizer.vocab_size",
    "teacher_hash": "teacher.hash",
    "codec": "codec.name",
}
_ROW_GROUP_CACHE = 64  # row groups kept per reader for random access by sample id (joins)


@dataclass
class _Row:
    """One sample as stored: small columns decoded, top-k columns still coded."""

    shard: str
    sample_id: str
    num_positions: int
    input_ids: np.ndarray
    positions: np.ndarray
    coded: dict[str, bytes]
    id_table: np.ndarray
    row_group: int  # where it is stored: row group and row within it, in `shard`
    row: int


class LogitCacheReader:
    """Open a cache after checking its format version, completeness and the caller's expectations.

    verify: "first_read" hashes each shard the first time this process opens it, "all" hashes every
    shard now, "none" only checks that each shard exists with the recorded size.
    """

    def __init__(
        self,
        cache_dir: Path | str,
        *,
        expect: dict[str, Any] | None = None,
        verify: str = "first_read",
        allow_incomplete: bool = False,
    ):
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
        self.cache_dir = Path(cache_dir)
        self.verify = verify
        self.manifest: Manifest = load_manifest(self.cache_dir)
        if self.manifest.format_version not in READABLE_FORMAT_VERSIONS:
            raise UserError(
                f"cache {self.cache_dir}: format_version {self.manifest.format_version}, this build reads "
                f"{' and '.join(map(str, READABLE_FORMAT_VERSIONS))}; regenerate the cache with this version"
            )
        self._check_expect(expect or {})
        if not allow_incomplete and not self.manifest.is_complete:
            parts = [
                w for w, p in self.manifest.parts.items() if not p.complete
            ] + self.manifest.missing_parts
            raise UserError(
                f"cache {self.cache_dir} is incomplete (parts not finished: {', '.join(parts)}); "
                "resume gen-logits for those parts first"
            )
        try:
            self.codec = TopKCodec.from_params(self.manifest.identity["codec"])
        except (KeyError, ValueError) as exc:
            raise UserError(f"cache {self.cache_dir}: {exc}") from None
        self.k = self.manifest.k
        self.tail_draws = self.manifest.tail_draws
        self._coded_columns = CODED_COLUMNS + ((tail_codec.COLUMN,) if self.tail_draws else ())
        self._verified: set[str] = set()
        self._index: dict[str, tuple[str, int, int]] | None = None
        self._row_groups: OrderedDict[tuple[str, int], list[_Row]] = OrderedDict()
        self._shards_by_name = {shard.file: shard for shard in self.manifest.shards}
        self._num_row_groups: dict[str, int] = {}
        self._same_layout = True  # as the primary's, in joins, until a row says otherwise
        if verify == "all":
            self.verify_all()

    @property
    def num_samples(self) -> int:
        return self.manifest.num_samples

    def rank_num_samples(self, rank: int = 0, world_size: int = 1) -> int:
        """Samples per epoch of one rank (the same for every epoch and seed)."""
        return len(range(rank, self.num_samples, world_size))

    def _check_expect(self, expect: dict[str, Any]) -> None:
        for key, expected in expect.items():
            found: Any = self.manifest.identity
            for part in EXPECT_ALIASES.get(key, key).split("."):
                found = found.get(part, "<absent>") if isinstance(found, dict) else "<absent>"
            if isinstance(expected, dict) and isinstance(found, dict):
                diffs = identity_diff(expected, found, f"{key}.")
                if diffs:
                    raise UserError(f"cache {self.cache_dir} does not match: " + "; ".join(diffs))
            elif found != expected:
                raise UserError(
                    f"cache {self.cache_dir} does not match: {key} expected {expected!r}, found {found!r}"
                )

    # -- integrity ------------------------------------------------------------------------------
    def verify_all(self) -> None:
        """Hash every shard; raise one UserError listing every missing, resized or changed shard."""
        problems = []
        for shard in self.manifest.shards:
            try:
                self._check_file(shard, hash_it=True)
            except UserError as exc:
                problems.append(str(exc))
        if problems:
            raise UserError(f"cache {self.cache_dir} failed verification:\n  " + "\n  ".join(problems))

    def _check_file(self, shard: ShardEntry, hash_it: bool) -> Path:
        path = self.cache_dir / shard.file
        if not path.exists():
            raise UserError(f"shard {path} is listed in the manifest but missing")
        size = path.stat().st_size
        if size != shard.bytes:
            raise UserError(
                f"shard {path} is {size} bytes, the manifest records {shard.bytes} (truncated or replaced)"
            )
        if hash_it:
            digest = file_sha256(path)
            if digest != shard.sha256:
                raise UserError(
                    f"shard {path}: sha256 {digest[:16]}... differs from the manifest's "
                    f"{shard.sha256[:16]}... (the file is corrupt or was changed)"
                )
            self._verified.add(shard.file)
        return path

    def _open(self, shard: ShardEntry) -> tuple[pq.ParquetFile, np.ndarray]:
        hash_it = self.verify == "first_read" and shard.file not in self._verified
        path = self._check_file(shard, hash_it)
        try:
            pf = pq.ParquetFile(path)
            table = read_id_table(pf.schema_arrow.metadata)
        except (OSError, pa.ArrowException, ValueError) as exc:
            raise UserError(f"shard {path} is unreadable: {exc}") from None
        if pf.metadata.num_rows != shard.rows:
            raise UserError(
                f"shard {path} holds {pf.metadata.num_rows} rows, the manifest records {shard.rows}"
            )
        return pf, table

    # -- rows -----------------------------------------------------------------------------------
    def _read_rows(
        self, shard: ShardEntry, pf: pq.ParquetFile, table: np.ndarray, rg: int, take: Any
    ) -> list[_Row]:
        try:
            group = pf.read_row_group(rg)
        except (OSError, pa.ArrowException) as exc:
            raise UserError(
                f"shard {self.cache_dir / shard.file}: row group {rg} is unreadable: {exc}"
            ) from None
        rows = np.arange(group.num_rows) if take is None else np.asarray(take)
        if take is not None:
            group = group.take(take)
        ids = [_offsets_values(group[name]) for name in ("input_ids", "positions")]
        coded = {name: group[name].to_pylist() for name in self._coded_columns}
        return [
            _Row(
                shard.file,
                sample_id,
                int(n),
                ids[0][1][ids[0][0][i] : ids[0][0][i + 1]].astype(
                    np.int64
                ),  # astype copies: rows own their data
                ids[1][1][ids[1][0][i] : ids[1][0][i + 1]].astype(np.int64),
                {name: coded[name][i] for name in self._coded_columns},
                table,
                rg,
                int(rows[i]),
            )
            for i, (sample_id, n) in enumerate(
                zip(group["sample_id"].to_pylist(), group["num_positions"].to_numpy(), strict=True)
            )
        ]

    def _rank_rows(self, order: list[ShardEntry], rank: int, world_size: int) -> Iterator[_Row]:
        total = sum(shard.rows for shard in order)
        lo = sum(len(range(r, total, world_size)) for r in range(rank))
        hi = lo + len(range(rank, total, world_size))
        offset = 0  # global row index of the current shard's first row
        for shard in order:
            if offset >= hi:
                break
            if offset + shard.rows > lo:  # the shard overlaps this rank's range: open (and verify) it
                pf, table = self._open(shard)
                start = offset
                for rg in range(pf.num_row_groups):
                    n = pf.metadata.row_group(rg).num_rows
                    first, last = max(lo, start) - start, min(hi, start + n) - start
                    if first < last:
                        take = None if (first, last) == (0, n) else np.arange(first, last)
                        yield from self._read_rows(shard, pf, table, rg, take)
                    start += n
            offset += shard.rows

    def _decode(self, row: _Row) -> CacheSample:
        try:
            ids, lps, target, tail = self.codec.decode(row.coded, row.num_positions, self.k, row.id_table)
            samples = None
            if self.tail_draws:
                samples = tail_codec.decode_tail_samples(
                    self.codec, row.coded[tail_codec.COLUMN], row.num_positions, tail, row.id_table
                )
        except (ValueError, KeyError) as exc:
            raise UserError(
                f"shard {self.cache_dir / row.shard}: sample {row.sample_id} cannot be decoded: {exc}"
            ) from None
        return CacheSample(
            row.sample_id,
            torch.from_numpy(row.input_ids),
            torch.from_numpy(row.positions),
            torch.from_numpy(ids),
            torch.from_numpy(lps),
            torch.from_numpy(target),
            torch.from_numpy(tail),
            *([] if samples is None else [torch.from_numpy(a) for a in samples]),
        )

    def _epoch_rows(
        self,
        *,
        shuffle: bool,
        seed: int,
        epoch: int,
        rank: int,
        world_size: int,
        worker_id: int,
        num_workers: int,
        shuffle_buffer: int,
        skip: int,
        worker_block: int,
    ) -> Iterator[_Row]:
        if not (0 <= rank < world_size and 0 <= worker_id < num_workers):
            raise ValueError(
                f"need 0 <= rank < world_size and 0 <= worker_id < num_workers, got "
                f"{rank}/{world_size}, {worker_id}/{num_workers}"
            )
        if shuffle_buffer < 1 or worker_block < 1 or skip < 0:
            raise ValueError("shuffle_buffer and worker_block must be >= 1, skip >= 0")
        order = self.manifest.shards
        if shuffle:
            order = [order[i] for i in np.random.default_rng([seed, epoch]).permutation(len(order))]
        rows = self._rank_rows(order, rank, world_size)
        if shuffle:
            rows = _shuffled(rows, np.random.default_rng([seed, epoch, rank, 1]), shuffle_buffer)
        for j, row in enumerate(rows):
            if j >= skip and ((j - skip) // worker_block) % num_workers == worker_id:
                yield row

    def iter_samples(
        self,
        *,
        shuffle: bool,
        seed: int,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        worker_id: int = 0,
        num_workers: int = 1,
        shuffle_buffer: int = 1024,
        skip: int = 0,
        worker_block: int = 1,
    ) -> Iterator[CacheSample]:
        """Stream this rank's and worker's decoded samples for one epoch (see the module docstring)."""
        for row in self._epoch_rows(
            shuffle=shuffle,
            seed=seed,
            epoch=epoch,
            rank=rank,
            world_size=world_size,
            worker_id=worker_id,
            num_workers=num_workers,
            shuffle_buffer=shuffle_buffer,
            skip=skip,
            worker_block=worker_block,
        ):
            yield self._decode(row)

    # -- random access by sample id (multi-teacher joins) ---------------------------------------
    def _build_index(self) -> dict[str, tuple[str, int, int]]:
        """sample_id -> (shard, row group, row), from the sample_id column alone: a shard is hashed
        (first_read) only when its rows are actually read."""
        index: dict[str, tuple[str, int, int]] = {}
        for shard in self.manifest.shards:
            path = self._check_file(shard, hash_it=False)
            try:
                pf = pq.ParquetFile(path)
                for rg in range(pf.num_row_groups):
                    ids = pf.read_row_group(rg, columns=["sample_id"]).column(0).to_pylist()
                    index.update((sample_id, (shard.file, rg, i)) for i, sample_id in enumerate(ids))
            except (OSError, pa.ArrowException) as exc:
                raise UserError(f"shard {path} is unreadable: {exc}") from None
        return index

    def _row_group(self, shard: ShardEntry, rg: int) -> list[_Row]:
        """One row group's rows, through a small LRU cache."""
        key = (shard.file, rg)
        if key in self._row_groups:
            self._row_groups.move_to_end(key)
        else:
            pf, table = self._open(shard)
            self._row_groups[key] = self._read_rows(shard, pf, table, rg, None)
            if len(self._row_groups) > _ROW_GROUP_CACHE:
                self._row_groups.popitem(last=False)
        return self._row_groups[key]

    def _row(self, sample_id: str) -> _Row:
        if self._index is None:
            self._index = self._build_index()  # sample_id -> (shard, row group, row): O(samples) memory
        if sample_id not in self._index:
            raise UserError(f"cache {self.cache_dir} has no sample {sample_id!r}")
        file, rg, i = self._index[sample_id]
        return self._row_group(next(s for s in self.manifest.shards if s.file == file), rg)[i]

    def _row_like(self, primary: _Row) -> _Row:
        """This cache's row of `primary`'s sample. gen-logits writes every teacher's cache over the same
        samples in the same order and shard layout, so it is first looked for at the same shard name, row
        group and row (checked by sample id): each worker then reads only the shards its own rows need,
        instead of every shard of the cache for an index. Other layouts fall back to the sample_id index."""
        shard = self._shards_by_name.get(primary.shard) if self._same_layout else None
        if shard is not None and shard.rows > 0:
            pf_groups = self._num_row_groups.get(shard.file)
            if pf_groups is None:
                pf_groups = self._num_row_groups[shard.file] = self._open(shard)[0].num_row_groups
            if primary.row_group < pf_groups:
                rows = self._row_group(shard, primary.row_group)
                if primary.row < len(rows) and rows[primary.row].sample_id == primary.sample_id:
                    return rows[primary.row]
            self._same_layout = False  # another layout: no more reads at the primary's places
        return self._row(primary.sample_id)

    def read_sample(self, sample_id: str) -> CacheSample:
        """One sample by id (builds an id index on first use; row groups are cached LRU)."""
        return self._decode(self._row(sample_id))


def iter_joined(
    readers: Sequence[LogitCacheReader],
    *,
    shuffle: bool,
    seed: int,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    worker_id: int = 0,
    num_workers: int = 1,
    shuffle_buffer: int = 1024,
    skip: int = 0,
    worker_block: int = 1,
) -> Iterator[tuple[CacheSample, ...]]:
    """Samples of several teachers' caches paired by sample_id: one tuple per sample, in readers order.

    The first reader drives the order (the arguments mean what they mean for `iter_samples`); the
    others are read at the same shard, row group and row when they share its layout (as gen-logits
    writes them), else by sample id, through a row-group cache. Token ids and response positions must
    be identical.
    """
    primary, others = readers[0], list(readers[1:])
    for other in others:
        if other.num_samples < primary.num_samples:
            raise UserError(
                f"cannot pair caches: {other.cache_dir} holds {other.num_samples} samples, "
                f"{primary.cache_dir} holds {primary.num_samples}"
            )
    rows = primary._epoch_rows(
        shuffle=shuffle,
        seed=seed,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        worker_id=worker_id,
        num_workers=num_workers,
        shuffle_buffer=shuffle_buffer,
        skip=skip,
        worker_block=worker_block,
    )
    for row in rows:
        paired = [row]
        for other in others:
            match = other._row_like(row)
            for name in ("input_ids", "positions"):
                if not np.array_equal(getattr(match, name), getattr(row, name)):
                    raise UserError(
                        f"sample {row.sample_id}: {name} differ between {primary.cache_dir / row.shard} and "
                        f"{other.cache_dir / match.shard}; the caches were not made from the same tokenized "
                        "data"
                    )
            paired.append(match)
        yield tuple(reader._decode(r) for reader, r in zip(readers, paired, strict=True))


def _offsets_values(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    array = column.combine_chunks()
    return array.offsets.to_numpy(), array.values.to_numpy()


def _shuffled(items: Iterator[Any], rng: np.random.Generator, size: int) -> Iterator[Any]:
    """Seeded shuffle buffer: emit a random resident item as each new one arrives."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = int(rng.integers(size))
        yield buffer[j]
        buffer[j] = item
    for j in rng.permutation(len(buffer)):
        yield buffer[j]
