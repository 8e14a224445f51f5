"""Sampled teacher tails: exact, reproducible draws; an unbiased forward-KL gradient; the loss against float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.cache.codec import TopKCodec
from pipeline.cache.tail_codec import decode_tail_samples, encode_tail_samples
from pipeline.student.losses import KDLossSpec, TeacherRows, check_tail_settings, chunk_loss_and_grad
from pipeline.teacher.tail_sampling import draw_tail, tail_uniforms
from pipeline.teacher.topk import topk_from_logits


def _teacher(n: int, vocab: int, seed: int, scale: float = 2.0) -> torch.Tensor:
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def test_draws_follow_the_tail_distribution_exactly():
    """Empirical frequencies of many draws match p_j / r outside the top-k (chi-square), never a top-k id."""
    logits = _teacher(1, 40, 0)
    k, draws = 5, 200_000
    out = topk_from_logits(logits.float(), torch.zeros(1, dtype=torch.long), k)
    uniforms = torch.from_numpy(np.random.default_rng(0).random((1, draws)))
    samples = draw_tail(logits.float(), out.ids, uniforms)
    p = torch.softmax(logits[0], 0)
    tail = p.clone()
    tail[out.ids[0].long()] = 0
    expected = tail / tail.sum() * draws
    counts = torch.zeros(40, dtype=torch.float64)
    real = samples.counts[0] > 0
    counts[samples.ids[0][real]] = samples.counts[0][real].double()
    assert counts[out.ids[0].long()].sum() == 0
    assert counts.sum() == draws
    seen = expected > 0
    chi2 = ((counts[seen] - expected[seen]) ** 2 / expected[seen]).sum().item()
    dof = int(seen.sum()) - 1
    assert chi2 < dof + 6 * math.sqrt(2 * dof), (chi2, dof)  # ~6 sigma of the chi-square distribution
    # the stored log-probs are the teacher's full-vocabulary log-softmax
    torch.testing.assert_close(
        samples.logprobs[0][real].double(), torch.log_softmax(logits[0], 0)[samples.ids[0][real]], atol=1e-5, rtol=0
    )


def test_uniforms_are_keyed_by_seed_and_sample_not_by_batch():
    a = tail_uniforms(42, "sample-7", 5, 12)
    np.testing.assert_array_equal(a, tail_uniforms(42, "sample-7", 5, 12))
    assert not np.array_equal(a, tail_uniforms(43, "sample-7", 5, 12))
    assert not np.array_equal(a, tail_uniforms(42, "sample-8", 5, 12))
    # a longer request extends rather than reshuffles: row j's draws do not depend on how many rows follow
    np.testing.assert_array_equal(tail_uniforms(42, "s", 3, 4), tail_uniforms(42, "s", 6, 4)[:3])
    assert ((a >= 0) & (a < 1)).all()


def test_a_row_without_tail_mass_draws_nothing():
    logits = torch.tensor([[0.0, 1.0, float("-inf"), float("-inf")]])
    out = topk_from_logits(logits, torch.zeros(1, dtype=torch.long), 2)
    samples = draw_tail(logits, out.ids, torch.rand(1, 8, dtype=torch.float64))
    assert samples.counts.sum() == 0
    assert torch.isinf(samples.logprobs).all()


def _sampled_rows(logits: torch.Tensor, k: int, draws: int, gen: torch.Generator) -> TeacherRows:
    n = logits.shape[0]
    out = topk_from_logits(logits.float(), torch.zeros(n, dtype=torch.long), k)
    samples = draw_tail(logits.float(), out.ids, torch.rand(n, draws, generator=gen, dtype=torch.float64))
    return TeacherRows(out.ids.long(), out.logprobs, out.tail_logmass, samples.ids, samples.counts, samples.logprobs)


def _kd_gradient(z: torch.Tensor, rows: TeacherRows, tail: str = "auto") -> torch.Tensor:
    spec = KDLossSpec(kd_ratio=1.0, tail=tail)
    _, _, dz = chunk_loss_and_grad(z.clone(), torch.zeros(z.shape[0], dtype=torch.long), [rows], spec, 0.0, 1.0)
    return dz.double()


@pytest.mark.parametrize("k", [0, 4])
def test_mean_gradient_converges_to_the_full_vocabulary_gradient(k):
    """Average q - p_hat over many independent draws: within the standard error the counts predict of
    q - p. The same check rejects renormalized top-k and the top-k bucket, whose targets are biased."""
    vocab, draws, trials = 48, 8, 3000
    logits = _teacher(3, vocab, 1)
    z = _teacher(3, vocab, 2, scale=1.0).float()
    p = torch.softmax(logits, 1)
    exact = torch.softmax(z.double(), 1) - p  # d KL(p || q) / dz
    gen = torch.Generator().manual_seed(0)
    # every trial is an independent draw for the same rows: stack the trials as rows of one chunk
    grads = _kd_gradient(z.repeat(trials, 1), _sampled_rows(logits.repeat(trials, 1), k, draws, gen))
    mean = grads.view(trials, *exact.shape).mean(0)
    # Var(p_hat_j) = r^2 pi_j (1 - pi_j) / U with pi_j = p_j / r on the tail, 0 on the exact top-k.
    top = torch.topk(logits, k, dim=1).indices if k else torch.zeros(3, 0, dtype=torch.long)
    tail_p = p.scatter(1, top, 0.0)
    r = tail_p.sum(1, keepdim=True)
    sigma = torch.sqrt(r**2 * (tail_p / r) * (1 - tail_p / r) / draws / trials).clamp(min=1e-6)
    z_scores = ((mean - exact) / sigma).abs()
    assert z_scores.max() < 5.0, z_scores.max()

    if k:  # biased targets fail the same test
        out = topk_from_logits(logits.float(), torch.zeros(3, dtype=torch.long), k)
        rows = TeacherRows(out.ids.long(), out.logprobs, out.tail_logmass)
        for tail in ("renormalize", "bucket"):
            biased = ((_kd_gradient(z, rows, tail) - exact) / sigma).abs()
            assert biased.max() > 20.0, (tail, biased.max())


def _reference_sampled_kd(z, rows_list, weights, temperature, kd_ratio, targets):
    """float64: explicit dense p_hat per teacher (importance-weighted at T != 1), forward KL, CE; autograd."""
    z = z.double().requires_grad_(True)
    n, vocab = z.shape
    logq = torch.log_softmax(z / temperature, 1)
    kd = z.new_zeros(())
    for rows, weight in zip(rows_list, weights, strict=True):
        if rows.sample_ids is None:  # bucket: [S..., tail]
            a = rows.topk_logprobs.double()
            logp = torch.log_softmax(torch.cat([a, rows.tail_logmass.double()[:, None]], 1) / temperature, 1)
            ids = rows.topk_ids
            lq_s = logq.gather(1, ids)
            lq_tail = torch.logsumexp(logq.scatter(1, ids, float("-inf")), 1, keepdim=True)
            lq = torch.cat([lq_s, lq_tail], 1)
            kd = kd + weight * (logp.exp() * (logp - lq)).sum()
            continue
        weights_dense = torch.zeros(n, vocab, dtype=torch.float64)
        weights_dense.scatter_(1, rows.topk_ids, rows.topk_logprobs.double().exp() ** (1 / temperature))
        c = rows.sample_counts.double()
        u = c.sum(1, keepdim=True)
        tail_r = rows.tail_logmass.double().exp()[:, None]
        b = rows.sample_logprobs.double().exp()
        w_s = torch.where(c > 0, tail_r * c / u * b.clamp(min=1e-300) ** (1 / temperature - 1), 0.0)
        weights_dense.scatter_add_(1, rows.sample_ids, w_s)
        p_hat = weights_dense / weights_dense.sum(1, keepdim=True)
        kd = kd + weight * (torch.xlogy(p_hat, p_hat) - p_hat * logq).sum()
    ce = -torch.log_softmax(z, 1).gather(1, targets[:, None]).sum()
    loss = ((1 - kd_ratio) * ce + kd_ratio * temperature**2 * kd) / n
    (grad,) = torch.autograd.grad(loss, z)
    return ce.item(), kd.item(), grad


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("k", [0, 3])
def test_sampled_loss_value_and_gradient_match_float64(temperature, k):
    vocab, n = 30, 7
    gen = torch.Generator().manual_seed(3)
    logits = _teacher(n, vocab, 4)
    z = _teacher(n, vocab, 5, scale=1.5).float()
    targets = torch.randint(0, vocab, (n,), generator=gen)
    sampled = _sampled_rows(logits, k, 6, gen)
    other = topk_from_logits(_teacher(n, vocab, 6).float(), targets, 5)  # a second, top-k teacher
    bucket = TeacherRows(other.ids.long(), other.logprobs, other.tail_logmass)
    for rows_list, weights in (([sampled], (1.0,)), ([sampled, bucket], (0.7, 0.3))):
        spec = KDLossSpec(kd_ratio=0.6, temperature=temperature, teacher_weights=weights)
        w_ce, w_kd = spec.token_weights(n)
        ce, kd, dz = chunk_loss_and_grad(z.clone(), targets, rows_list, spec, w_ce, w_kd)
        ref_ce, ref_kd, ref_grad = _reference_sampled_kd(z, rows_list, weights, temperature, 0.6, targets)
        assert ce.item() == pytest.approx(ref_ce, rel=1e-5)
        assert kd.item() == pytest.approx(ref_kd, rel=1e-4, abs=1e-5)
        torch.testing.assert_close(dz.double(), ref_grad, atol=2e-6, rtol=1e-4)


def test_tail_settings_are_checked_against_the_caches():
    check_tail_settings(KDLossSpec(), [("hybrid", 8), ("top-k", 64)])
    check_tail_settings(KDLossSpec(tail="bucket", distillation_type="jsd"), [("hybrid", 8)])
    with pytest.raises(ValueError, match="forward_kld only"):
        check_tail_settings(KDLossSpec(distillation_type="reverse_kld"), [("sampled", 0)])
    with pytest.raises(ValueError, match="needs a cache with tail samples"):
        check_tail_settings(KDLossSpec(tail="sampled"), [("top-k", 64)])
    with pytest.raises(ValueError, match="no exact top-k"):
        check_tail_settings(KDLossSpec(tail="bucket"), [("sampled", 0)])
    with pytest.raises(ValueError, match="target_class"):
        check_tail_settings(KDLossSpec(target_class=True), [("hybrid", 4)])


def test_tail_codec_round_trip_is_lossless_for_ids_and_counts():
    codec = TopKCodec()
    rng = np.random.default_rng(0)
    rows, width = 9, 40
    ids = rng.integers(0, 200_000, (rows, width))
    counts = rng.integers(1, 300, (rows, width)).astype(np.int32)  # > 255: escapes
    counts[2] = 0  # a row without samples
    counts[5, 10:] = 0  # padding
    tail = np.log(rng.uniform(0.01, 0.5, rows)).astype(np.float32)
    lps = (tail[:, None] - rng.uniform(0, 12, (rows, width))).astype(np.float32)
    lps[counts == 0] = -np.inf
    table = np.unique(ids[:, :5])
    blob = encode_tail_samples(codec, ids, counts, lps, tail, table)
    got_ids, got_counts, got_lps = decode_tail_samples(codec, blob, rows, codec.dequantize(codec.quantize(tail)), table)
    for r in range(rows):
        real = counts[r] > 0
        want = sorted(zip(ids[r][real], counts[r][real], strict=True))
        got_real = got_counts[r] > 0
        assert sorted(zip(got_ids[r][got_real], got_counts[r][got_real], strict=True)) == want
        # log-probs on the top-k grid (<= step_max / 2), in descending order
        order = np.argsort(ids[r][real])
        got_order = np.argsort(got_ids[r][got_real])
        np.testing.assert_allclose(got_lps[r][got_real][got_order], lps[r][real][order], atol=codec.step_max / 2 + 1e-6)
        assert (np.diff(got_lps[r][got_real]) <= 0).all()
    assert got_ids.shape[1] == width
