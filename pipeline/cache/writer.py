"""LogitCacheWriter: teacher records -> immutable Parquet shards + manifest, encoded in a background thread.

Shard schema (one row per sample; see `pipeline.cache.codec` for the coded columns)::

    sample_id        string
    num_positions    int32          R, the number of response positions
    input_ids        list<int32>    the full token ids x_0 .. x_{L-1}
    positions        list<int32>    response positions t (ascending, t >= 1); row j predicts x_t from x_<t
    topk_ids         binary         TopKCodec: ids [R, k], lossless
    topk_logprobs    binary         TopKCodec: log-probs [R, k], quantized, descending per row
    target_logprobs  binary         TopKCodec: log p(x_t | x_<t) [R]
    tail_logmass     binary         TopKCodec: log of the mass outside the top-k [R] (-inf if none)
    tail_samples     binary         sampled-tail caches only (identity "tail_samples" > 0): the unique ids
                                    drawn from the tail, their counts and log-probs (see tail_codec)

Parquet key-value metadata: ``topk_id_table`` (the shard's id table, see codec), ``cache_identity``
(sha256 of the cache identity JSON) and ``writer_id``. The coded columns are stored uncompressed by
Parquet (each value already holds zstd frames, so a reader decompresses only the rows it uses);
the small columns use Parquet's zstd.

Crash safety: a shard is written as ``.shard-*.parquet.tmp``, fsynced, renamed, and then recorded in
the writer's fragment (see `pipeline.cache.manifest`). On reopening, a writer deletes its own
temp files and *adopts* its own shards that were renamed but not recorded (killed between rename
and manifest update) after re-reading them in full and checking their identity hash; shards that
fail this check move to ``quarantine/``. Rows are never duplicated: a recorded or adopted shard's
sample ids are in `completed_sample_ids()`, which the caller skips.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import shutil
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.cache import tail_codec
from pipeline.cache.codec import TopKCodec, build_id_table, id_table_metadata
from pipeline.cache.manifest import (
    QUARANTINE_DIR,
    SAMPLED_FORMAT_VERSION,
    TOPK_FORMAT_VERSION,
    WRITER_ID,
    PartState,
    ShardEntry,
    comparable_identity,
    fsync_dir,
    identity_diff,
    load_manifest,
    read_fragments,
    shard_name,
    shard_seq,
    write_fragment,
)
from pipeline.errors import UserError
from pipeline.records import TeacherTopK

log = logging.getLogger(__name__)

SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("num_positions", pa.int32()),
        ("input_ids", pa.list_(pa.int32())),
        ("positions", pa.list_(pa.int32())),
        ("topk_ids", pa.binary()),
        ("topk_logprobs", pa.binary()),
        ("target_logprobs", pa.binary()),
        ("tail_logmass", pa.binary()),
    ]
)
CODED_COLUMNS = ("topk_ids", "topk_logprobs", "target_logprobs", "tail_logmass")
# A sampled-tail cache's shards carry one more coded column; top-k caches keep the original schema.
SAMPLED_SCHEMA = SCHEMA.append(pa.field(tail_codec.COLUMN, pa.binary()))
IDENTITY_KEY = b"cache_identity"
_COMPRESSION = {
    name: ("none" if name in (*CODED_COLUMNS, tail_codec.COLUMN) else "zstd") for name in SAMPLED_SCHEMA.names
}
_STOP = object()


def identity_hash(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(comparable_identity(identity), sort_keys=True).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class LogitCacheWriter:
    """Append TeacherTopK records to a cache directory as one writer ("part") of possibly several.

    `writer_id` must be unique among writers running at the same time on one directory (e.g.
    "part-I-of-N"); a rerun with the same id resumes that part.
    """

    def __init__(
        self,
        cache_dir: Path,
        identity: dict[str, Any],
        *,
        writer_id: str = "part-0-of-1",
        rows_per_shard: int = 256,
        background: bool = True,
        rows_per_row_group: int = 32,
        codec: TopKCodec | None = None,
        queue_size: int = 128,
    ):
        if not WRITER_ID.fullmatch(writer_id):
            raise ValueError(f"writer_id {writer_id!r} must match {WRITER_ID.pattern}")
        if rows_per_shard < 1 or rows_per_row_group < 1:
            raise ValueError("rows_per_shard and rows_per_row_group must be >= 1")
        self.cache_dir = Path(cache_dir)
        self.writer_id = writer_id
        self.rows_per_shard = rows_per_shard
        self.rows_per_row_group = min(rows_per_row_group, rows_per_shard)
        self.codec = codec or TopKCodec()
        # identity["tail_samples"] = {"draws": U, "seed": s} marks a sampled-tail cache (format 2).
        draws = (identity.get("tail_samples") or {}).get("draws", 0)
        version = SAMPLED_FORMAT_VERSION if draws else TOPK_FORMAT_VERSION
        try:
            full = {**identity, "format_version": version, "codec": self.codec.params()}
            self.identity: dict[str, Any] = json.loads(json.dumps(full))
        except TypeError as exc:
            raise ValueError(f"identity must be JSON-serializable: {exc}") from None
        if not isinstance(self.identity.get("k"), int) or self.identity["k"] < (0 if draws else 1):
            raise ValueError(
                f"identity['k'] must be an int >= 1 (>= 0 with tail samples), got {self.identity.get('k')!r}"
            )
        self.k = self.identity["k"]
        self.tail_draws = int(draws)
        self.schema = SAMPLED_SCHEMA if draws else SCHEMA
        self._identity_hash = identity_hash(self.identity)

        self.cache_dir.mkdir(parents=True, exist_ok=True)
        fragments = read_fragments(self.cache_dir)
        for other_id, (other, _) in fragments.items():
            diffs = identity_diff(other, self.identity)
            if diffs:
                raise UserError(
                    f"cache {self.cache_dir} holds data of another identity (part {other_id}); "
                    "differing keys: "
                    + "; ".join(diffs)
                    + ". Write to a new directory, or overwrite the cache."
                )
        self._part = fragments[writer_id][1] if writer_id in fragments else PartState(writer_id)
        self._recover()
        write_fragment(self.cache_dir, self.identity, self._part)
        self._next_seq = 1 + max((shard_seq(writer_id, s.file) or 0 for s in self._part.shards), default=-1)

        self._pending: list[TeacherTopK] = []
        self._shard: pq.ParquetWriter | None = None
        self._shard_stats = [0, 0, 0]  # rows, tokens, response tokens of the open shard
        self._id_table = np.zeros(0, np.int64)
        self._closed = False
        self._error: BaseException | None = None
        self._queue: queue.Queue | None = None
        if background:
            self._queue = queue.Queue(maxsize=queue_size)
            self._thread = threading.Thread(target=self._run, name=f"cache-writer-{writer_id}", daemon=True)
            self._thread.start()

    # -- producer side --------------------------------------------------------------------------
    def completed_sample_ids(self) -> set[str]:
        """Sample ids in complete (recorded) shards of every writer of this directory."""
        ids: set[str] = set()
        for shard in load_manifest(self.cache_dir).shards:
            path = self.cache_dir / shard.file
            try:
                ids.update(pq.read_table(path, columns=["sample_id"]).column(0).to_pylist())
            except (OSError, pa.ArrowException) as exc:
                raise UserError(
                    f"cache shard {path} is unreadable ({exc}); verify with `pipeline inspect`"
                ) from None
        return ids

    def add(self, record: TeacherTopK) -> None:
        """Queue one sample; returns at once unless the queue is full. Re-raises a writer-thread error."""
        self._raise_pending_error()
        if self._closed:
            raise RuntimeError("add() on a closed LogitCacheWriter")
        self._check(record)
        if self._queue is not None:
            self._queue.put(record)
        else:
            self._consume(record)

    def close(self, stats: dict[str, Any] | None = None) -> None:
        """Flush the last shard and mark this writer's part complete, with its truncation/skip counts."""
        if self._closed:
            return
        self._closed = True
        self._stop()
        self._raise_pending_error()
        self._part.complete = True
        self._part.stats = json.loads(json.dumps(stats or {}))
        write_fragment(self.cache_dir, self.identity, self._part)

    def __enter__(self) -> LogitCacheWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        elif not self._closed:
            # Keep the finished samples (they are whole rows), but leave the part incomplete.
            self._closed = True
            try:
                self._stop()
            except Exception:  # the caller's exception is the one to report
                log.exception("logit cache writer %s: flushing after an error failed", self.writer_id)

    def _check(self, r: TeacherTopK) -> None:
        rows = len(r.positions)
        shapes = {"topk_ids": np.shape(r.topk_ids), "topk_logprobs": np.shape(r.topk_logprobs)}
        if any(shape != (rows, self.k) for shape in shapes.values()):
            raise ValueError(
                f"sample {r.sample_id}: expected [R={rows}, k={self.k}] top-k arrays, got {shapes}"
            )
        if np.shape(r.target_logprobs) != (rows,) or np.shape(r.tail_logmass) != (rows,):
            raise ValueError(
                f"sample {r.sample_id}: target_logprobs and tail_logmass must have shape ({rows},)"
            )
        if np.ndim(r.input_ids) != 1:
            raise ValueError(f"sample {r.sample_id}: input_ids must be 1-D")
        if self.tail_draws and (r.sample_ids is None or np.shape(r.sample_ids)[0] != rows):
            raise ValueError(f"sample {r.sample_id}: a sampled-tail cache needs [R={rows}, m] tail samples")
        # Here, in the producer's thread, so that the error names the sample (the codec, in the writer
        # thread, would only say that some row holds NaN).
        nan_rows = np.isnan(r.topk_logprobs).any(1) | np.isnan(r.target_logprobs) | np.isnan(r.tail_logmass)
        if r.sample_logprobs is not None:
            nan_rows |= np.isnan(r.sample_logprobs).any(1)
        if nan_rows.any():
            where = np.asarray(r.positions)[nan_rows][:5].tolist()
            raise UserError(
                f"cache {self.cache_dir}: the teacher's log-probs for sample {r.sample_id!r} are NaN at "
                f"{int(nan_rows.sum())} response position(s) (t = {where}...), usually a float16 overflow "
                "in the teacher. Set `inference.dtype` to `bfloat16` or `float32` and rerun: the shards "
                "already written are kept, and this sample would be NaN again in float16."
            )
        positions = np.asarray(r.positions)
        if rows and (
            positions[0] < 1 or positions[-1] >= len(r.input_ids) or (np.diff(positions) <= 0).any()
        ):
            raise ValueError(f"sample {r.sample_id}: positions must ascend within [1, {len(r.input_ids)})")

    def _raise_pending_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _stop(self) -> None:
        if self._queue is not None:
            self._queue.put(_STOP)
            self._thread.join()
        else:
            self._flush()

    # -- writer side (background thread, or inline) ---------------------------------------------
    def _run(self) -> None:
        assert self._queue is not None
        while (item := self._queue.get()) is not _STOP:
            if self._error is None:  # after an error keep draining, so the producer never blocks
                try:
                    self._consume(item)
                except BaseException as exc:  # re-raised in the producer
                    self._error = exc
        if self._error is None:
            try:
                self._flush()
            except BaseException as exc:
                self._error = exc

    def _consume(self, record: TeacherTopK) -> None:
        self._pending.append(record)
        if len(self._pending) == self.rows_per_row_group or (
            self._shard_stats[0] + len(self._pending) == self.rows_per_shard
        ):
            self._write_row_group()

    def _flush(self) -> None:
        if self._pending:
            self._write_row_group()
        if self._shard is not None:
            self._finish_shard()

    def _tmp_path(self, seq: int) -> Path:
        return self.cache_dir / f".{shard_name(self.writer_id, seq)}.tmp"

    def _write_row_group(self) -> None:
        rows, self._pending = self._pending, []
        if self._shard is None:
            # The shard's id table comes from its first row group (later ids outside it are escaped).
            self._id_table = build_id_table(
                [r.topk_ids for r in rows] + ([r.sample_ids for r in rows] if self.tail_draws else [])
            )
            metadata = {
                **id_table_metadata(self._id_table),
                IDENTITY_KEY: self._identity_hash.encode(),
                b"writer_id": self.writer_id.encode(),
            }
            self._shard = pq.ParquetWriter(
                self._tmp_path(self._next_seq),
                self.schema.with_metadata(metadata),
                compression=_COMPRESSION,
                use_dictionary=False,
                write_statistics=False,
            )
        coded = [
            self.codec.encode(r.topk_ids, r.topk_logprobs, r.target_logprobs, r.tail_logmass, self._id_table)
            for r in rows
        ]
        columns: dict[str, Any] = {
            "sample_id": pa.array([str(r.sample_id) for r in rows], pa.string()),
            "num_positions": pa.array([len(r.positions) for r in rows], pa.int32()),
            "input_ids": _list_array([r.input_ids for r in rows]),
            "positions": _list_array([r.positions for r in rows]),
        }
        columns.update({name: pa.array([c[name] for c in coded], pa.binary()) for name in CODED_COLUMNS})
        if self.tail_draws:
            columns[tail_codec.COLUMN] = pa.array(
                [
                    tail_codec.encode_tail_samples(
                        self.codec, r.sample_ids, r.sample_counts, r.sample_logprobs, r.tail_logmass, self._id_table
                    )
                    for r in rows
                ],
                pa.binary(),
            )
        self._shard.write_table(pa.table(columns, schema=self._shard.schema), row_group_size=len(rows))
        self._shard_stats[0] += len(rows)
        self._shard_stats[1] += sum(len(r.input_ids) for r in rows)
        self._shard_stats[2] += sum(len(r.positions) for r in rows)
        if self._shard_stats[0] >= self.rows_per_shard:
            self._finish_shard()

    def _finish_shard(self) -> None:
        assert self._shard is not None
        self._shard.close()
        tmp, final = (
            self._tmp_path(self._next_seq),
            self.cache_dir / shard_name(self.writer_id, self._next_seq),
        )
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        entry = ShardEntry(final.name, *self._shard_stats, tmp.stat().st_size, file_sha256(tmp))
        os.replace(tmp, final)
        fsync_dir(self.cache_dir)
        self._part.shards.append(entry)
        self._part.complete = False  # a reopened complete part that grows is incomplete until close()
        write_fragment(self.cache_dir, self.identity, self._part)
        self._shard, self._shard_stats, self._next_seq = None, [0, 0, 0], self._next_seq + 1

    # -- resume ---------------------------------------------------------------------------------
    def _recover(self) -> None:
        """Delete this writer's temp files; adopt or quarantine its renamed-but-unrecorded shards."""
        for tmp in self.cache_dir.glob(f".shard-{self.writer_id}-*.parquet.tmp"):
            log.warning("logit cache: removing partial shard %s left by a killed writer", tmp)
            tmp.unlink()
        known = {s.file for s in self._part.shards}
        for path in sorted(self.cache_dir.glob(f"shard-{self.writer_id}-*.parquet")):
            if shard_seq(self.writer_id, path.name) is None or path.name in known:
                continue
            try:
                entry = self._verify_orphan(path)
            except (OSError, pa.ArrowException, ValueError) as exc:
                quarantine = self.cache_dir / QUARANTINE_DIR
                quarantine.mkdir(exist_ok=True)
                target = quarantine / path.name
                if target.exists():  # an earlier quarantine of the same shard name: keep both
                    target = quarantine / f"{path.name}.{uuid.uuid4().hex[:12]}"
                shutil.move(path, target)
                log.warning(
                    "logit cache: unrecorded shard %s failed verification (%s); moved to %s",
                    path,
                    exc,
                    target,
                )
                continue
            log.warning("logit cache: adopting shard %s (written, but not recorded before a crash)", path)
            self._part.shards.append(entry)
            self._part.complete = False

    def _verify_orphan(self, path: Path) -> ShardEntry:
        pf = pq.ParquetFile(path)
        found = (pf.schema_arrow.metadata or {}).get(IDENTITY_KEY, b"").decode()
        if found != self._identity_hash:
            raise ValueError(f"identity hash {found or '<none>'} is not this cache's {self._identity_hash}")
        table = pf.read()  # reads and checks every page
        tokens = pc.sum(pc.list_value_length(table["input_ids"])).as_py() or 0
        response = pc.sum(table["num_positions"]).as_py() or 0
        return ShardEntry(path.name, table.num_rows, tokens, response, path.stat().st_size, file_sha256(path))


def _list_array(arrays: list[np.ndarray]) -> pa.Array:
    lengths = np.array([len(a) for a in arrays], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32)
    values = (
        np.concatenate([np.asarray(a, dtype=np.int32) for a in arrays]) if arrays else np.zeros(0, np.int32)
    )
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
