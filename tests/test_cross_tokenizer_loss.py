"""The cross-tokenizer losses against a float64 reference written straight from their formulas."""

import math

import pytest
import torch

from pipeline.cross_tokenizer.loss import CrossRows, binary_kl, cross_loss_and_grad
from pipeline.losses import KDLossSpec
from pipeline.student import ChunkedHeadLoss

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
