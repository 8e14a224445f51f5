"""The cross-tokenizer losses against a float64 reference written straight from their formulas."""

import math

import pytest
import torch

from pipeline.cross_tokenizer.loss import CrossRows, binary_kl, cross_loss_and_grad
from pipeline.student.distill import ChunkedHeadLoss
from pipeline.student.losses import KDLossSpec

V, K = 40, 6


def make_rows(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, CrossRows]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, V, generator=g) * 2
    targets = torch.randint(0, V, (n,), generator=g)
    # chunks: rows 0-1 one chunk, 2 alone, 3 none, 4-6 one chunk, then singles, some rows none
    chunk = torch.tensor([0, 0, 1, -1, 2, 2, 2] + [3 + i if i % 3 else -1 for i in range(n - 7)])
    num_chunks = int(chunk.max()) + 1
    chunk_logprob = -torch.rand(num_chunks, generator=g, dtype=torch.float64) * 4 - 0.01
    teacher = torch.log_softmax(torch.randn(n, V, generator=g) * 2, 1)
    top_lp, top_ids = teacher.topk(K, 1)
    mapped = torch.randperm(V, generator=g)[top_ids]  # teacher ids -> student ids
    unmapped = torch.rand(n, K, generator=g) < 0.3
    shared_lp = top_lp.masked_fill(unmapped, -math.inf)
    one_to_one = (chunk >= 0) & (torch.rand(n, generator=g) < 0.7)
    shared_lp[~one_to_one] = -math.inf
    rest = torch.log1p(-shared_lp.double().exp().sum(1)).float()
    rest[~one_to_one] = math.nan
    uld = top_lp.exp()
    uld[torch.rand(n, generator=g) < 0.25] = math.nan
    return z, targets, CrossRows(chunk, chunk_logprob, mapped, shared_lp, rest, uld)


def reference(z, targets, rows: CrossRows, loss: str, tau: float, w_ce: float, w_kd: float):
    z = z.double().requires_grad_(True)
    logq = torch.log_softmax(z, 1)
    q = logq.exp()
    ce = -logq.gather(1, targets[:, None]).sum()
    kd = z.new_zeros(())
    if loss in ("chunk", "chunk+shared"):
        for c in range(len(rows.chunk_logprob)):
            members = (rows.chunk == c).nonzero().squeeze(1)
            if not len(members):
                continue
            l_s = logq[members, targets[members]].sum()
            p = torch.exp(rows.chunk_logprob[c] / tau)
            qq = torch.exp(l_s / tau)
            kd = kd + tau * (p * torch.log(p / qq) + (1 - p) * torch.log((1 - p) / (1 - qq)))
    if loss == "chunk+shared":
        for r in range(z.shape[0]):
            if math.isnan(rows.shared_rest[r]):
                continue
            valid = torch.isfinite(rows.shared_logprobs[r])
            ids = rows.shared_ids[r][valid]
            p = rows.shared_logprobs[r][valid].double().exp()
            p_rest = 1 - p.sum()
            q_s = q[r, ids]
            q_rest = 1 - q_s.sum()
            kd = kd + (p * (p.log() - q_s.log())).sum() + p_rest * (p_rest.log() - q_rest.log())
    if loss == "uld":
        for r in range(z.shape[0]):
            if torch.isnan(rows.uld_probs[r]).any():
                continue
            q_sorted = q[r].sort(descending=True).values[:K]
            kd = kd + (rows.uld_probs[r].double() - q_sorted).abs().sum()
    total = w_ce * ce + w_kd * kd
    (grad,) = torch.autograd.grad(total, z)
    return ce.item(), kd.item(), grad


@pytest.mark.parametrize("loss", ["chunk", "chunk+shared", "uld"])
@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_values_and_gradients_match_the_float64_reference(loss, tau):
    z, targets, rows = make_rows(20)
    w_ce, w_kd = 0.3, 0.7
    ce_ref, kd_ref, grad_ref = reference(z, targets, rows, loss, tau, w_ce, w_kd)
    ce, kd, dz = cross_loss_and_grad(z.clone(), targets, rows, loss, tau, w_ce, w_kd)
    assert ce.item() == pytest.approx(ce_ref, rel=1e-5)
    assert kd.item() == pytest.approx(kd_ref, rel=1e-4, abs=1e-6)
    assert kd_ref > 0
    torch.testing.assert_close(dz.double(), grad_ref, rtol=1e-4, atol=1e-6)


def test_binary_kl_is_zero_only_where_the_chunk_likelihoods_agree():
    teacher = torch.tensor([-0.5, -0.5, -3.0, -1e-9], dtype=torch.float64)
    student = torch.tensor([-0.5, -2.0, -0.1, -1e-9], dtype=torch.float64)
    d, grad = binary_kl(teacher, student, 1.0)
    # Large tau: the derivative tends to l_T / l_S - 1 whatever the chunk's probability.
    _, far = binary_kl(torch.tensor([-8.0], dtype=torch.float64), torch.tensor([-4.0], dtype=torch.float64), 1e4)
    assert far.item() == pytest.approx(8.0 / 4.0 - 1, rel=1e-3)
    assert d[0].item() == pytest.approx(0.0, abs=1e-12) and grad[0].item() == pytest.approx(0.0, abs=1e-12)
    assert d[1] > 0 and grad[1] < 0  # student too unlikely: raising l_S lowers the loss
    assert d[2] > 0 and grad[2] > 0
    assert torch.isfinite(d).all() and torch.isfinite(grad).all()  # a chunk the student is sure of


def test_the_head_never_splits_an_aligned_chunk_and_matches_one_pass():
    """ChunkedHeadLoss with a tiny chunk_size gives the same loss and gradients as one big chunk."""
    n, hidden = 20, 8
    _, targets, rows = make_rows(n, seed=3)
    bounds = rows.chunk_bounds(3)
    for start, _ in bounds:
        assert start == 0 or rows.chunk[start] < 0 or rows.chunk[start] != rows.chunk[start - 1]
    assert bounds[-1][1] == n and all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))
    g = torch.Generator().manual_seed(5)
    h = torch.randn(n, hidden, generator=g, requires_grad=True)
    w = torch.randn(V, hidden, generator=g, requires_grad=True)
    spec = KDLossSpec(kd_ratio=0.6, cross_tokenizer="chunk+shared", chunk_temperature=2.0)
    grads = []
    for chunk_size in (3, 1000):
        loss, ce, kd = ChunkedHeadLoss.apply(h, w, None, targets, rows, spec, 0.4 / n, 0.6 / n, chunk_size)
        grads.append((loss.item(), *torch.autograd.grad(loss, (h, w))))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-5)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[0][2], grads[1][2], rtol=1e-4, atol=1e-6)


def test_teacher_tokens_sent_to_one_student_token_make_one_class():
    """The shared-vocabulary KL needs each student class once: the mass of teacher tokens that map to the
    same student id is summed (compared with a float64 sum by id), unmapped entries stay out."""
    from pipeline.cross_tokenizer.batches import merge_classes

    g = torch.Generator().manual_seed(3)
    ids = torch.tensor([[3, 5, 3, 7, 5, 2], [1, 1, 1, 4, 0, 0], [9, 8, 7, 6, 5, 4]])
    logprobs = torch.log_softmax(torch.randn(3, 8, generator=g), 1)[:, :6].contiguous()
    logprobs[0, 4] = -math.inf  # unmapped: its id (5) must not collect its mass
    merged = merge_classes(ids, logprobs)
    for r in range(3):
        expected: dict[int, float] = {}
        for i, lp in zip(ids[r].tolist(), logprobs[r].double().tolist(), strict=True):
            if math.isfinite(lp):
                expected[i] = expected.get(i, 0.0) + math.exp(lp)
        kept = torch.isfinite(merged[r])
        got = dict(zip(ids[r][kept].tolist(), merged[r][kept].double().exp().tolist(), strict=True))
        assert len(got) == kept.sum()  # each id once
        assert got.keys() == expected.keys()
        assert all(math.isclose(got[i], expected[i], rel_tol=1e-6) for i in expected)
    assert torch.equal(merged[2], logprobs[2])  # no duplicates: unchanged


def _teacher_rows(vocab: int, rows: int, k: int, draws: int, trials: int, seed: int):
    """A CacheSample of `trials` independent tail draws for each of `rows` teacher distributions."""
    from pipeline.records import CacheSample
    from pipeline.teacher.tail_sampling import draw_tail
    from pipeline.teacher.topk import topk_from_logits

    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=g, dtype=torch.float64) * 1.5).repeat(trials, 1)
    n = logits.shape[0]
    top = topk_from_logits(logits.float(), torch.zeros(n, dtype=torch.long), k)
    tail = draw_tail(logits.float(), top.ids, torch.rand(n, draws, generator=g, dtype=torch.float64))
    sample = CacheSample("s", torch.zeros(n + 1, dtype=torch.long), torch.arange(1, n + 1), top.ids.long(),
                         top.logprobs, top.logprobs[:, 0], top.tail_logmass, tail.ids, tail.counts, tail.logprobs)
    return sample, torch.softmax(logits[:rows], 1)


def _shared_gradient(z, sample, shared_map, sampled_tail: bool) -> torch.Tensor:
    from pipeline.cross_tokenizer.batches import shared_targets

    n = z.shape[0]
    ids, logprobs, rest = shared_targets(sample, torch.arange(n), shared_map, sampled_tail)
    rows = CrossRows(torch.full((n,), -1), torch.zeros(0, dtype=torch.float64), ids, logprobs, rest,
                     torch.full((n, 1), math.nan))
    _, _, dz = cross_loss_and_grad(z.clone(), torch.zeros(n, dtype=torch.long), rows, "chunk+shared", 10.0, 0.0, 1.0)
    return dz.double()


def test_sampled_shared_targets_give_an_unbiased_gradient_of_the_projected_teacher():
    """Every teacher token maps (many to one) into a smaller student vocabulary: the shared term's mean
    gradient over independent tail draws is q - P, P the teacher's distribution summed per student token,
    within the standard error the draws predict; the top-k with a bucket rest fails the same check."""
    t_vocab, s_vocab, k, draws, trials, rows = 48, 20, 4, 8, 3000, 3
    shared_map = torch.randperm(t_vocab, generator=torch.Generator().manual_seed(1)) % s_vocab
    sample, p = _teacher_rows(t_vocab, rows, k, draws, trials, seed=0)
    z = torch.randn(rows, s_vocab, generator=torch.Generator().manual_seed(2))
    projected = torch.zeros(rows, s_vocab, dtype=torch.float64).index_add_(1, shared_map, p)
    exact = torch.softmax(z.double(), 1) - projected
    mean = _shared_gradient(z.repeat(trials, 1), sample, shared_map, True).view(trials, rows, s_vocab).mean(0)
    # Var(p_hat_s) = r^2 pi_s (1 - pi_s) / U, pi_s the tail's share that lands on student token s.
    tail_p = p.scatter(1, torch.topk(p, k, dim=1).indices, 0.0)
    r = tail_p.sum(1, keepdim=True)
    pi = torch.zeros(rows, s_vocab, dtype=torch.float64).index_add_(1, shared_map, tail_p) / r
    sigma = torch.sqrt(r**2 * pi * (1 - pi) / draws / trials).clamp(min=1e-6)
    z_scores = ((mean - exact) / sigma).abs()
    assert z_scores.max() < 5.0, z_scores.max()
    bucket = _shared_gradient(z, _teacher_rows(t_vocab, rows, k, draws, 1, seed=0)[0], shared_map, False)
    assert ((bucket - exact) / sigma).abs().max() > 20.0


def test_shared_targets_sum_each_student_class_and_keep_the_unmapped_mass_apart():
    """float64 by hand: per student id the summed mass of its teacher entries (top-k exact, draws at
    r c_j / U); the rest is the unmapped entries' mass, plus the tail r when the draws are not used."""
    from pipeline.cross_tokenizer.batches import shared_targets

    t_vocab, s_vocab = 30, 12
    sample, _ = _teacher_rows(t_vocab, 5, 3, 6, 1, seed=4)
    shared_map = torch.randperm(t_vocab, generator=torch.Generator().manual_seed(5)) % s_vocab
    shared_map[torch.arange(0, t_vocab, 4)] = -1  # every fourth teacher token has no student token
    starts = torch.tensor([0, -1, 2, 3, 4])
    for sampled in (True, False):
        ids, logprobs, rest = shared_targets(sample, starts, shared_map, sampled)
        assert torch.isnan(rest[1]) and torch.isinf(logprobs[1]).all()
        for row in (0, 2, 3, 4):
            r = math.exp(sample.tail_logmass[row].item())
            entries = list(zip(sample.topk_ids[row].tolist(), sample.topk_logprobs[row].double().exp().tolist(),
                               strict=True))
            if sampled:
                counts = sample.sample_counts[row].double()
                entries += [(i, r * c / counts.sum().item()) for i, c in
                            zip(sample.sample_ids[row].tolist(), counts.tolist(), strict=True) if c > 0]
            expected, unmapped = {}, 0.0 if sampled else r
            for teacher_id, mass in entries:
                student_id = int(shared_map[teacher_id])
                if student_id < 0:
                    unmapped += mass
                else:
                    expected[student_id] = expected.get(student_id, 0.0) + mass
            kept = torch.isfinite(logprobs[row])
            got = dict(zip(ids[row][kept].tolist(), logprobs[row][kept].double().exp().tolist(), strict=True))
            assert len(got) == int(kept.sum())
            assert got.keys() == expected.keys()
            assert all(math.isclose(got[i], expected[i], rel_tol=1e-5) for i in expected)
            assert math.exp(rest[row].item()) == pytest.approx(unmapped, rel=1e-5)
            assert sum(got.values()) + unmapped == pytest.approx(1.0, rel=1e-5)
