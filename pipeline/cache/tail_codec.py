"""Pure encode/decode of one sample's sampled tail (pipeline.teacher.tail_sampling) into the `tail_samples` column.

Per response position r the cache holds m_r unique ids drawn from the teacher's tail, how often each
was drawn, and their log-probs. The column is one `binary` value of 9 streams in TopKCodec's stream
format (`method:u8, length:u32le, payload`, raw or one zstd frame):

- m_r per position: one byte, 255 = escape to a uint32 (streams 0, 1);
- the ids, row-major: ranks in the shard's id table (the same table and 1/2-byte/raw layout as
  `topk_ids`, streams 2-4), lossless;
- count - 1 per id: one byte, 255 = escape (streams 5, 6), lossless;
- log-probs on the top-k grid: a row's entries in descending log-prob order, each stored as the
  zigzag of its code minus the previous one, the first minus the code of the row's tail log-mass
  (a tail id's probability never exceeds the tail's), one byte with escapes (streams 7, 8).

A row's entries come back sorted by descending log-prob (ties: ascending id), padded to the
sample's largest m_r with count 0, id 0 and log-prob -inf.
"""

from __future__ import annotations

import numpy as np

from pipeline.cache.codec import (
    TopKCodec,
    _decode_ids,
    _encode_ids,
    _join_escapes,
    _split_escapes,
    _unpack,
)

COLUMN = "tail_samples"


def _zigzag(values: np.ndarray) -> np.ndarray:
    return np.where(values >= 0, 2 * values, -2 * values - 1)


def _unzigzag(values: np.ndarray) -> np.ndarray:
    return (values >> 1) ^ -(values & 1)


def encode_tail_samples(
    codec: TopKCodec,
    ids: np.ndarray,
    counts: np.ndarray,
    logprobs: np.ndarray,
    tail_logmass: np.ndarray,
    id_table: np.ndarray,
) -> bytes:
    """ids/counts/logprobs [R, m] (count 0 = padding), tail_logmass [R] -> the column's value."""
    ids, counts = np.asarray(ids, dtype=np.int64), np.asarray(counts, dtype=np.int64)
    lps = np.asarray(logprobs, dtype=np.float32)
    rows = len(tail_logmass)
    if ids.shape != counts.shape or ids.shape != lps.shape or ids.ndim != 2 or ids.shape[0] != rows:
        raise ValueError(
            f"tail sample ids {ids.shape}, counts {counts.shape}, log-probs {lps.shape} must be [R={rows}, m]"
        )
    real = counts > 0
    if np.isnan(lps[real]).any() or np.isinf(lps[real]).any():
        raise ValueError("sampled tail log-probs must be finite")
    # Real entries first, then by descending log-prob, then ascending id: the decoder's order.
    order = np.lexsort((ids, -np.where(real, lps, -np.inf), ~real), axis=1)
    ids, counts, lps, real = (np.take_along_axis(a, order, 1) for a in (ids, counts, lps, real))
    per_row = real.sum(1)
    codes = codec.quantize(lps[real])
    row_of = np.repeat(np.arange(rows), per_row)
    starts = np.cumsum(per_row) - per_row
    previous = np.empty_like(codes)
    previous[1:] = codes[:-1]
    first = np.zeros(codes.size, bool)
    first[starts[per_row > 0]] = True
    previous[first] = codec.quantize(tail_logmass)[row_of[first]]
    return codec._pack(
        _split_escapes(per_row)
        + _encode_ids(ids[real], id_table)
        + _split_escapes(counts[real] - 1)
        + _split_escapes(_zigzag(codes - previous))
    )


def decode_tail_samples(
    codec: TopKCodec, blob: bytes, rows: int, tail_logmass: np.ndarray, id_table: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids int64 [R, m], counts int32 [R, m], log-probs float32 [R, m]), m = the largest m_r."""
    n0, n1, i0, i1, i2, c0, c1, g0, g1 = _unpack(blob, 9)
    per_row = _join_escapes(np.frombuffer(n0, np.uint8), n1, rows).astype(np.int64)
    total = int(per_row.sum())
    flat_ids = _decode_ids(np.frombuffer(i0, np.uint8), i1, i2, id_table, total)
    flat_counts = _join_escapes(np.frombuffer(c0, np.uint8), c1, total) + 1
    gaps = _unzigzag(_join_escapes(np.frombuffer(g0, np.uint8), g1, total).astype(np.int64))
    row_of = np.repeat(np.arange(rows), per_row)
    starts = np.cumsum(per_row) - per_row
    running = np.cumsum(gaps)
    # codes = the row's tail code + the running sum of its own gaps
    base = codec.quantize(tail_logmass).astype(np.int64)
    filled = per_row > 0
    base[filled] -= running[starts[filled]] - gaps[starts[filled]]
    codes = running + base[row_of]
    width = int(per_row.max(initial=0))
    column = np.arange(total) - starts[row_of]
    ids = np.zeros((rows, width), np.int64)
    counts = np.zeros((rows, width), np.int32)
    lps = np.full((rows, width), -np.inf, np.float32)
    ids[row_of, column] = flat_ids
    counts[row_of, column] = flat_counts
    lps[row_of, column] = codec.dequantize(np.maximum(codes, 0))
    return ids, counts, lps
