"""TopKCodec: pure encode/decode of one sample's teacher top-k arrays (no file I/O).

Row layout (one Parquet row per sample; R response positions, k entries each)
-----------------------------------------------------------------------------
Each of the four coded columns is one `binary` value: a list of streams, each stream stored as
`method:u8, length:u32le, payload` (method 0 = raw bytes, 1 = one zstd frame; whichever is smaller).

- ``topk_ids`` (3 streams). Ids are replaced by their rank in the shard's *id table* (the shard's
  distinct ids by descending frequency, kept in the shard's Parquet metadata): an LM's top-k lists
  concentrate on a few thousand frequent tokens, so most ranks fit in one byte.
  Stream 0: one byte b per entry (row-major [R, k]): b < 192 is the rank itself; 192 <= b < 255 is
  a two-byte rank 192 + (b - 192) * 256 + (next byte of stream 1); b == 255: the raw id is the next
  uint32 of stream 2 (ids outside the table, any vocabulary size). Token ids are lossless.
- ``topk_logprobs`` (2 streams). Log-probs are quantized on an integer grid U = round(f(a)),
  f increasing with f(0) = 0, whose step in nats is ``step_top * exp(-a/2)`` capped at ``step_max``:
  the KL cost of an error d in log p_i is about p_i * d^2 / 2, so large probabilities get fine
  steps and tiny ones coarse steps (optimal for KL at temperature 1), and the cap bounds the
  absolute error (|error| <= step_max / 2) for tempered or reverse-KL losses. A row, sorted by
  descending log-prob, becomes non-negative gaps (-U_0, U_0 - U_1, ...): stream 0 holds them as
  one byte each, rank-major ([k, R], so equal ranks sit together), 255 = escape to the next
  uint32 of stream 1. -inf (k larger than the number of non-zero probabilities) has its own code
  below the grid; finite log-probs below -1000 are stored as -1000 (exp(-1000) is 0 even in float64).
- ``target_logprobs`` (3 streams), same grid: per position the index j of the first top-k entry
  with the target's code (the target token is usually among the top-k), one byte each with 255 =
  escape to a uint32 of stream 1; j == k means "no such entry": the code -U is the next uint32 of
  stream 2.
- ``tail_logmass`` (2 streams), same grid: zigzag(-U_tail - (-U of the row's last entry)), one byte
  each with 255 = escape to a uint32 of stream 1 (the tail is near the last entry's log-prob;
  -inf, when the top-k holds all the mass, has its own code).

Decoding is a zstd decompress, a cumulative sum and table look-ups: no per-position Python loop.
"""

from __future__ import annotations

import math
import struct
import threading
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import zstandard

CODEC_NAME = "topk-gap-zstd"
CODEC_VERSION = 1
LOGPROB_FLOOR = -1000.0
ID_TABLE_MAX = 192 + 63 * 256  # ranks that fit in one or two bytes
_ONE_BYTE, _ESCAPE = 192, 255
_HEADER = struct.Struct("<BI")


@dataclass(frozen=True)
class TopKCodec:
    """Quantization and compression parameters; `params()` goes into the cache manifest."""

    # Rounding errors are uniform, so KL(p || decoded) per position is about sum_i p_i step_i^2 / 24
    # <= step_max^2 / 24 = 7.2e-5 nats for any distribution; measured 4-5e-5 on LM distributions.
    step_top: float = 1 / 32  # grid step (nats) at p = 1
    step_max: float = 1 / 24  # coarsest step (nats): |log-prob error| <= step_max / 2
    # Level 1, measured at k=64 (bench/codec.py): 2.5-2.8x the encode speed of level 9 (270-310k vs
    # 105-110k tokens/s/core) for -0.4% to +3.6% bytes, so the writer thread keeps up with fast
    # teachers; level 12 saves another 3-4% at 0.7x level 9's speed.
    zstd_level: int = 1

    def __post_init__(self) -> None:
        if not 0 < self.step_top <= self.step_max:
            raise ValueError(f"need 0 < step_top <= step_max, got {self.step_top}, {self.step_max}")

    def params(self) -> dict[str, Any]:
        return {
            "name": CODEC_NAME,
            "version": CODEC_VERSION,
            "step_top": self.step_top,
            "step_max": self.step_max,
            "zstd_level": self.zstd_level,
        }

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> TopKCodec:
        if params.get("name") != CODEC_NAME or params.get("version") != CODEC_VERSION:
            raise ValueError(
                f"codec {params.get('name')} v{params.get('version')} is not supported "
                f"(this build reads {CODEC_NAME} v{CODEC_VERSION})"
            )
        return cls(params["step_top"], params["step_max"], params["zstd_level"])

    # -- the log-prob grid ----------------------------------------------------------------------
    @cached_property
    def _knee(self) -> tuple[float, float]:
        """(a_c, f(a_c)): below log-prob a_c the step is capped at step_max and f is linear."""
        a_c = -2.0 * math.log(self.step_max / self.step_top)
        return a_c, 2.0 * (math.exp(a_c / 2) - 1.0) / self.step_top

    def _grid(self, a: np.ndarray) -> np.ndarray:
        """Float64 grid coordinate f(a) <= 0 of log-probs a (finite, <= 0)."""
        a_c, f_c = self._knee
        a = np.maximum(a.astype(np.float64), LOGPROB_FLOOR)
        smooth = 2.0 * np.expm1(np.maximum(a, a_c) / 2) / self.step_top
        return np.where(a >= a_c, smooth, f_c + (a - a_c) / self.step_max)

    @cached_property
    def _neg_inf_code(self) -> int:
        """-U of -inf: one past the grid point of LOGPROB_FLOOR."""
        return int(-np.round(self._grid(np.array([LOGPROB_FLOOR]))[0])) + 1

    @cached_property
    def _lut(self) -> np.ndarray:
        """float32 log-prob of every -U in [0, neg_inf_code]: decoding is one gather."""
        a_c, f_c = self._knee
        u = -np.arange(self._neg_inf_code + 1, dtype=np.float64)
        smooth = 2.0 * np.log1p(np.maximum(u, f_c) * self.step_top / 2)
        a = np.where(u >= f_c, smooth, a_c + (u - f_c) * self.step_max)
        a[-1] = -np.inf
        return np.maximum(a, np.where(np.isinf(a), -np.inf, LOGPROB_FLOOR)).astype(np.float32)

    def quantize(self, logprobs: np.ndarray) -> np.ndarray:
        """-U (int64 >= 0) of log-probs; -inf maps to its own code. NaN is rejected."""
        a = np.asarray(logprobs, dtype=np.float32)
        if np.isnan(a).any():
            raise ValueError("log-probs contain NaN")
        a = np.minimum(a, 0.0)  # float rounding may give +1e-7 for p = 1
        finite = np.isfinite(a)
        code = -np.round(self._grid(np.where(finite, a, 0.0))).astype(np.int64)
        return np.where(finite, code, self._neg_inf_code)

    def dequantize(self, codes: np.ndarray) -> np.ndarray:
        return self._lut[np.minimum(codes, self._neg_inf_code)]

    # -- rows -----------------------------------------------------------------------------------
    def encode(
        self,
        topk_ids: np.ndarray,
        topk_logprobs: np.ndarray,
        target_logprobs: np.ndarray,
        tail_logmass: np.ndarray,
        id_table: np.ndarray,
    ) -> dict[str, bytes]:
        """Encode one sample ([R, k] ids and log-probs, [R] target and tail) into column values.

        Rows are stored in descending log-prob order; a stable sort keeps the caller's order among
        equal log-probs, so ids sorted as TeacherTopK requires come back in the same order.
        """
        ids = np.asarray(topk_ids)
        lps = np.asarray(topk_logprobs, dtype=np.float32)
        if ids.ndim != 2 or ids.shape != lps.shape:
            raise ValueError(f"topk_ids {ids.shape} and topk_logprobs {lps.shape} must be equal [R, k]")
        if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(np.uint32).max):
            raise ValueError("token ids must be in [0, 2^32)")
        rows = ids.shape[0]
        if np.shape(target_logprobs) != (rows,) or np.shape(tail_logmass) != (rows,):
            raise ValueError(f"target_logprobs and tail_logmass must have shape ({rows},)")
        order = np.argsort(-lps, axis=1, kind="stable")
        ids = np.take_along_axis(ids, order, axis=1).astype(np.int64)
        codes = self.quantize(np.take_along_axis(lps, order, axis=1))
        gaps = np.diff(codes, axis=1, prepend=0)  # codes ascend along a row: -U grows as p shrinks
        # The target token is usually one of the top-k: point at the first entry with its code.
        target = self.quantize(target_logprobs)
        match = codes == target[:, None]
        first = match.argmax(axis=1) if codes.shape[1] else np.zeros(rows, np.int64)  # k = 0: none match
        where = np.where(match.any(axis=1), first, codes.shape[1])
        # The tail sits near the last entry's log-prob: store the zigzag difference.
        tail = self.quantize(tail_logmass) - (codes[:, -1] if codes.shape[1] else 0)
        return {
            "topk_ids": self._pack(_encode_ids(ids.ravel(), id_table)),
            "topk_logprobs": self._pack(_split_escapes(np.ascontiguousarray(gaps.T).ravel())),
            "target_logprobs": self._pack(
                _split_escapes(where) + [target[where == codes.shape[1]].astype("<u4").tobytes()]
            ),
            "tail_logmass": self._pack(_split_escapes(np.where(tail >= 0, 2 * tail, -2 * tail - 1))),
        }

    def decode(
        self, fields: dict[str, bytes], rows: int, k: int, id_table: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(topk_ids int64 [R, k], topk_logprobs float32 [R, k], target float32 [R], tail float32 [R])."""
        n = rows * k
        b0, b1, esc = _unpack(fields["topk_ids"], 3)
        ids = _decode_ids(np.frombuffer(b0, np.uint8), b1, esc, id_table, n).reshape(rows, k)
        g0, gesc = _unpack(fields["topk_logprobs"], 2)
        gaps = _join_escapes(np.frombuffer(g0, np.uint8), gesc, n).reshape(k, rows)
        codes = np.cumsum(gaps, axis=0, dtype=np.int32).T
        w0, wesc, explicit = _unpack(fields["target_logprobs"], 3)
        where = _join_escapes(np.frombuffer(w0, np.uint8), wesc, rows)
        if rows and where.max() > k:
            raise ValueError(f"target index {int(where.max())} > k = {k}")
        outside = where == k
        target = np.empty(rows, np.int32)
        target[~outside] = codes[np.flatnonzero(~outside), where[~outside]]
        target[outside] = _checked(np.frombuffer(explicit, "<u4"), np.count_nonzero(outside), "target")
        t0, tesc = _unpack(fields["tail_logmass"], 2)
        zigzag = _join_escapes(np.frombuffer(t0, np.uint8), tesc, rows)
        tail = (zigzag >> 1) ^ -(zigzag & 1)
        if k:
            tail += codes[:, -1]
        return ids, self.dequantize(codes), self.dequantize(target), self.dequantize(tail)

    def _pack(self, streams: list[bytes]) -> bytes:
        out = bytearray()
        compressor = _compressor(self.zstd_level)
        for raw in streams:
            packed = compressor.compress(raw) if raw else b""
            method, payload = (1, packed) if len(packed) < len(raw) else (0, raw)
            out += _HEADER.pack(method, len(payload)) + payload
        return bytes(out)


def build_id_table(topk_ids: list[np.ndarray]) -> np.ndarray:
    """The distinct ids of a shard's rows by descending count (ties: smaller id first), int64."""
    flat = np.concatenate(
        [np.asarray(a, dtype=np.int64).ravel() for a in topk_ids] or [np.zeros(0, np.int64)]
    )
    values, counts = np.unique(flat, return_counts=True)
    return values[np.argsort(-counts, kind="stable")][:ID_TABLE_MAX]


def decode_row(
    row: dict[str, Any], k: int, codec_params: dict[str, Any], id_table: np.ndarray
) -> dict[str, np.ndarray]:
    """Decode one Parquet row (a dict, as from `pyarrow.Table.to_pylist()`) into numpy arrays.

    `k` and `codec_params` are the manifest's "k" and "codec"; `id_table` is the shard's:
    `read_id_table(pyarrow.parquet.ParquetFile(path).schema_arrow.metadata)`.
    """
    codec = TopKCodec.from_params(codec_params)
    ids, lps, target, tail = codec.decode(row, row["num_positions"], k, id_table)
    out = {
        "sample_id": row["sample_id"],
        "input_ids": np.asarray(row["input_ids"], dtype=np.int64),
        "positions": np.asarray(row["positions"], dtype=np.int64),
        "topk_ids": ids,
        "topk_logprobs": lps,
        "target_logprobs": target,
        "tail_logmass": tail,
    }
    if row.get("tail_samples") is not None:  # a sampled-tail cache (format 2)
        from pipeline.cache.tail_codec import decode_tail_samples

        names = ("sample_ids", "sample_counts", "sample_logprobs")
        out.update(zip(names, decode_tail_samples(codec, row["tail_samples"], row["num_positions"], tail, id_table),
                       strict=True))
    return out


ID_TABLE_KEY = b"topk_id_table"


def id_table_metadata(id_table: np.ndarray) -> dict[bytes, bytes]:
    """Parquet key-value metadata holding the id table (zstd of uint32 little-endian)."""
    return {ID_TABLE_KEY: zstandard.ZstdCompressor(level=19).compress(id_table.astype("<u4").tobytes())}


def read_id_table(metadata: dict[bytes, bytes] | None) -> np.ndarray:
    if not metadata or ID_TABLE_KEY not in metadata:
        raise ValueError("the shard's Parquet metadata has no id table")
    raw = zstandard.ZstdDecompressor().decompress(metadata[ID_TABLE_KEY])
    return np.frombuffer(raw, "<u4").astype(np.int64)


# -- streams --------------------------------------------------------------------------------------
_local = threading.local()  # zstd contexts are not thread-safe; reuse one per thread (creation is costly)


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache = _local.__dict__.setdefault("compressors", {})
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level)
    return cache[level]


def _decompress(payload: bytes) -> bytes:
    if not hasattr(_local, "decompressor"):
        _local.decompressor = zstandard.ZstdDecompressor()
    return _local.decompressor.decompress(payload)


def _unpack(blob: bytes, count: int) -> list[bytes]:
    streams, offset = [], 0
    for _ in range(count):
        if offset + _HEADER.size > len(blob):
            raise ValueError("truncated stream header")
        method, length = _HEADER.unpack_from(blob, offset)
        offset += _HEADER.size
        payload = blob[offset : offset + length]
        offset += length
        if len(payload) != length or method not in (0, 1):
            raise ValueError("truncated or malformed stream")
        try:
            streams.append(_decompress(payload) if method == 1 else payload)
        except zstandard.ZstdError as exc:
            raise ValueError(f"corrupt zstd frame: {exc}") from None
    if offset != len(blob):
        raise ValueError(f"{len(blob) - offset} trailing bytes after the last stream")
    return streams


def _split_escapes(values: np.ndarray) -> list[bytes]:
    """Non-negative ints -> (one byte each, 255 = escape; the escaped values as uint32)."""
    small = np.minimum(values, _ESCAPE).astype(np.uint8)
    return [small.tobytes(), values[values >= _ESCAPE].astype("<u4").tobytes()]


def _checked(values: np.ndarray, expected: int, what: str) -> np.ndarray:
    if values.size != expected:
        raise ValueError(f"expected {expected} {what} values, found {values.size}")
    return values


def _join_escapes(small: np.ndarray, escaped: bytes, n: int) -> np.ndarray:
    values = _checked(small, n, "byte").astype(np.int32)
    mask = small == _ESCAPE
    values[mask] = _checked(np.frombuffer(escaped, "<u4"), np.count_nonzero(mask), "escaped")
    return values


def _encode_ids(ids: np.ndarray, id_table: np.ndarray) -> list[bytes]:
    lookup = np.full(int(max(id_table.max(initial=-1), ids.max(initial=-1))) + 1, -1, dtype=np.int64)
    lookup[id_table] = np.arange(id_table.size)
    rank = lookup[ids] if ids.size else np.zeros(0, np.int64)
    two = rank >= _ONE_BYTE
    escape = rank < 0
    high = np.where(two, _ONE_BYTE + (rank - _ONE_BYTE) // 256, rank)
    b0 = np.where(escape, _ESCAPE, high).astype(np.uint8)
    b1 = ((rank[two] - _ONE_BYTE) % 256).astype(np.uint8)
    return [b0.tobytes(), b1.tobytes(), ids[escape].astype("<u4").tobytes()]


def _decode_ids(b0: np.ndarray, b1: bytes, escaped: bytes, id_table: np.ndarray, n: int) -> np.ndarray:
    if b0.size != n:
        raise ValueError(f"expected {n} id bytes, found {b0.size}")
    rank = b0.astype(np.int64)
    two = (b0 >= _ONE_BYTE) & (b0 != _ESCAPE)
    low = np.frombuffer(b1, np.uint8)
    if low.size != np.count_nonzero(two):
        raise ValueError("two-byte id count does not match")
    rank[two] = _ONE_BYTE + (rank[two] - _ONE_BYTE) * 256 + low
    escape = b0 == _ESCAPE
    rank[escape] = 0
    if rank.size and rank.max() >= id_table.size:
        raise ValueError(f"id rank {int(rank.max())} outside the shard's id table ({id_table.size} ids)")
    ids = id_table[rank] if id_table.size else rank
    extra = np.frombuffer(escaped, "<u4")
    if extra.size != np.count_nonzero(escape):
        raise ValueError("escaped id count does not match")
    ids[escape] = extra
    return ids
