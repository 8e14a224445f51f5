"""TopKCodec: lossless ids, bounded log-prob error, KL distortion against float64 references."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.cache.codec import LOGPROB_FLOOR, TopKCodec, build_id_table

CODEC = TopKCodec()


def topk_from_logits(logits: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
    """Float64 reference: top-k ids/log-probs (descending), the log-mass of the rest."""
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    order = np.argsort(-logp, axis=-1, kind="stable")
    ids = order[:, :k]
    lps = np.take_along_axis(logp, ids, -1)
    rest = np.take_along_axis(logp, order[:, k:], -1)
    tail = np.logaddexp.reduce(rest, axis=-1) if rest.shape[1] else np.full(len(logp), -np.inf)
    return ids.astype(np.int32), lps, tail


def error_bound(a: np.ndarray, codec: TopKCodec = CODEC) -> np.ndarray:
    """Half the grid step near a (the step grows as p shrinks, capped at step_max)."""
    step = np.minimum(codec.step_top * np.exp(-(np.clip(a, -100, 0) - codec.step_max) / 2), codec.step_max)
    return step / 2 + 1e-5


def roundtrip(ids, lps, target, tail, codec: TopKCodec = CODEC):
    table = build_id_table([ids])
    fields = codec.encode(ids, lps, target, tail, table)
    assert set(fields) == {"topk_ids", "topk_logprobs", "target_logprobs", "tail_logmass"}
    return codec.decode(fields, ids.shape[0], ids.shape[1], table)


@st.composite
def rows(draw):
    k = draw(st.integers(1, 256))
    vocab = draw(st.sampled_from([k, 300, 50_000, 70_000, 262_144, 300_000]))
    vocab = max(vocab, k)
    r = draw(st.sampled_from([0, 1, 2, 7, 33]))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    ids = np.array([rng.choice(vocab, size=k, replace=False) for _ in range(r)], np.int32).reshape(r, k)
    scale = draw(st.sampled_from([0.1, 2.0, 8.0, 40.0]))
    lps = np.sort(rng.normal(0, scale, (r, k)), axis=1)[:, ::-1]
    if draw(st.booleans()) and k > 1:  # ties
        lps[:, 1::2] = lps[:, 0::2][:, : lps[:, 1::2].shape[1]]
    lps = lps - np.logaddexp.reduce(lps, axis=1, keepdims=True) - draw(st.sampled_from([0.0, 1e-6, 0.5, 5.0]))
    n_inf = draw(st.integers(0, k))
    if n_inf and draw(st.booleans()):  # fewer non-zero probabilities than k
        lps[:, k - n_inf :] = -np.inf
    tail = rng.uniform(-30, 0, r)
    tail[rng.random(r) < 0.3] = -np.inf
    target = np.where(rng.random(r) < 0.5, lps[:, 0], rng.uniform(-50, 0, r))
    return ids, lps.astype(np.float32), target.astype(np.float32), tail.astype(np.float32)


@settings(max_examples=150, deadline=None)
@given(rows())
def test_roundtrip_property(row):
    ids, lps, target, tail = row
    d_ids, d_lps, d_target, d_tail = roundtrip(ids, lps, target, tail)
    assert d_ids.dtype == np.int64 and d_lps.dtype == np.float32 and d_lps.shape == ids.shape
    np.testing.assert_array_equal(d_ids, ids)  # input is sorted: order preserved, ties included
    for decoded, original in ((d_lps, lps), (d_target, target), (d_tail, tail)):
        inf = np.isneginf(original)
        np.testing.assert_array_equal(np.isneginf(decoded), inf)
        a = original[~inf]
        assert (np.abs(decoded[~inf] - a) <= error_bound(a)).all()
        assert (decoded <= 0).all()
    if lps.size:  # decoded rows stay sorted
        assert (np.diff(np.where(np.isinf(d_lps), -1e9, d_lps), axis=1) <= 0).all()


def test_empty_and_single_rows():
    for r, k in ((0, 1), (0, 64), (1, 1), (1, 256)):
        rng = np.random.default_rng(r * 1000 + k)
        ids, lps, tail = topk_from_logits(rng.normal(0, 3, (r, 300)), k)
        out = roundtrip(ids, lps.astype(np.float32), lps[:, 0].astype(np.float32), tail.astype(np.float32))
        assert out[0].shape == (r, k) and out[2].shape == (r,)
        np.testing.assert_array_equal(out[0], ids)


def test_certain_token_and_floor():
    ids = np.array([[5, 9]], np.int32)
    lps = np.array([[0.0, -5000.0]], np.float32)  # p = 1; below the floor
    d_ids, d_lps, _, d_tail = roundtrip(ids, lps, np.zeros(1, np.float32), np.array([-np.inf], np.float32))
    assert d_lps[0, 0] == 0.0 and np.isneginf(d_tail[0])
    assert abs(d_lps[0, 1] - LOGPROB_FLOOR) <= CODEC.step_max / 2  # the grid point nearest the floor


def test_unsorted_rows_are_sorted_with_their_ids():
    ids = np.array([[1, 2, 3, 4]], np.int32)
    lps = np.log(np.array([[0.1, 0.4, 0.1, 0.3]], np.float32))
    d_ids, d_lps, _, _ = roundtrip(ids, lps, lps[:, 0], np.log(np.array([0.1], np.float32)))
    np.testing.assert_array_equal(d_ids, [[2, 4, 1, 3]])  # stable among the tie 0.1
    expected = np.log([[0.4, 0.3, 0.1, 0.1]])
    assert (np.abs(d_lps - expected) <= error_bound(expected)).all()


def test_ids_outside_the_table_and_beyond_uint16():
    rng = np.random.default_rng(0)
    ids, lps, tail = topk_from_logits(rng.normal(0, 3, (20, 500)), 32)
    ids = ids + 200_000
    table = build_id_table([ids[:5]])  # later rows use ids the table never saw: escapes
    fields = CODEC.encode(ids, lps, lps[:, 0], tail, table)
    np.testing.assert_array_equal(CODEC.decode(fields, 20, 32, table)[0], ids)


def test_nan_is_rejected():
    ids = np.zeros((1, 1), np.int32)
    with pytest.raises(ValueError, match="NaN"):
        CODEC.encode(ids, np.array([[np.nan]], np.float32), np.zeros(1), np.zeros(1), build_id_table([ids]))


def test_truncated_blob_fails_to_decode():
    rng = np.random.default_rng(1)
    ids, lps, tail = topk_from_logits(rng.normal(0, 3, (8, 300)), 16)
    table = build_id_table([ids])
    fields = CODEC.encode(ids, lps, lps[:, 0], tail, table)
    fields["topk_ids"] = fields["topk_ids"][:-3]
    with pytest.raises(ValueError):
        CODEC.decode(fields, 8, 16, table)


def kl_top_k_tail(lps, tail, d_lps, d_tail) -> np.ndarray:
    """KL(p || q) per position over the top-k plus the tail class, both renormalized, in float64."""
    p = np.concatenate([lps, tail[:, None]], 1).astype(np.float64)
    q = np.concatenate([d_lps, d_tail[:, None]], 1).astype(np.float64)
    p, q = p - np.logaddexp.reduce(p, 1, keepdims=True), q - np.logaddexp.reduce(q, 1, keepdims=True)
    return np.where(np.isinf(p), 0.0, np.exp(p) * (p - q)).sum(1)


@pytest.mark.parametrize("temperature", [0.7, 1.0, 2.0])
def test_kl_distortion_within_bound(temperature):
    """LM-like distributions (peaked, heavy-tailed logits): mean KL per position <= 1e-4 at k=64."""
    rng = np.random.default_rng(2)
    logits = rng.standard_t(3, (400, 4000)) * 2.5 / temperature
    ids, lps, tail = topk_from_logits(logits, 64)
    d_ids, d_lps, _, d_tail = roundtrip(ids, lps.astype(np.float32), lps[:, 0], tail.astype(np.float32))
    kl = kl_top_k_tail(lps, tail, d_lps, d_tail)
    assert kl.mean() <= 1e-4, kl.mean()
    assert (kl >= -1e-12).all()


def test_params_roundtrip_and_unknown_codec():
    codec = TopKCodec(step_top=1 / 32, step_max=1 / 4, zstd_level=3)
    assert TopKCodec.from_params(codec.params()) == codec
    with pytest.raises(ValueError, match="not supported"):
        TopKCodec.from_params({**codec.params(), "version": 99})
