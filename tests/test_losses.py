"""pipeline/student/losses.py against an independent float64 dense reference (values and gradients)."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.student.losses import KDLossSpec, TeacherRows, chunk_loss_and_grad, divergence, with_target_class

KINDS = ["forward_kld", "reverse_kld", "jsd", "tvd"]


def make_teacher(n: int, vocab: int, k: int, seed: int, sharp: float = 3.0) -> TeacherRows:
    """Top-k of a random teacher, exactly as gen-logits stores it (float32 log_softmax, topk, tail)."""
    gen = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(torch.randn(n, vocab, generator=gen, dtype=torch.float64) * sharp, 1)
    top, ids = logp.topk(k, 1)
    tail = torch.log1p(-top.exp().sum(1).clamp(max=1.0))  # -inf when the top-k holds all the mass
    return TeacherRows(ids, top.float(), tail.float())


def reference(z: torch.Tensor, targets, teachers, spec: KDLossSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense float64 CE and KD sums straight from DESIGN.md (q_tail = 1 - sum q is fine in float64)."""
    T = spec.temperature
    logq_full = torch.log_softmax(z / T, 1)
    ce = -torch.log_softmax(z, 1).gather(1, targets[:, None]).sum()
    kd = z.new_zeros(())
    for teacher, weight in zip(teachers, spec.teacher_weights, strict=True):
        a = teacher.topk_logprobs.double()
        q_s = logq_full.gather(1, teacher.topk_ids).exp()
        if spec.tail in ("auto", "bucket"):  # auto is bucket for a top-k teacher
            p = torch.cat([(a / T).exp(), (teacher.tail_logmass.double() / T).exp()[:, None]], 1)
            q = torch.cat([q_s, (1 - q_s.sum(1, keepdim=True)).clamp(min=0)], 1)
        else:
            p, q = (a / T).exp(), q_s / q_s.sum(1, keepdim=True)
        p = p / p.sum(1, keepdim=True)
        if spec.distillation_type == "forward_kld":
            rows = (torch.xlogy(p, p) - p * q.log()).sum(1)
        elif spec.distillation_type == "reverse_kld":
            rows = (q * (q.log() - p.log())).sum(1)
        elif spec.distillation_type == "jsd":
            m = (p + q) / 2
            rows = 0.5 * ((torch.xlogy(p, p) - p * m.log()).sum(1) + (q * (q.log() - m.log())).sum(1))
        else:
            rows = 0.5 * (p - q).abs().sum(1)
        kd = kd + weight * rows.sum()
    return ce, kd


def run_fused(z64: torch.Tensor, targets, teachers, spec, w_ce=0.3, w_kd=0.7):
    ce, kd, dz = chunk_loss_and_grad(z64.float().clone(), targets, teachers, spec, w_ce, w_kd)
    return ce.double(), kd.double(), dz.double()


def run_reference(z64: torch.Tensor, targets, teachers, spec, w_ce=0.3, w_kd=0.7):
    z = z64.clone().requires_grad_(True)
    ce, kd = reference(z, targets, teachers, spec)
    (w_ce * ce + w_kd * kd).backward()
    return ce.detach(), kd.detach(), z.grad


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_matches_dense_reference(kind, tail, temperature):
    n, vocab, k = 24, 300, 16
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(n, vocab, generator=gen, dtype=torch.float64) * 2
    targets = torch.randint(0, vocab, (n,), generator=gen)
    teachers = [make_teacher(n, vocab, k, seed=2)]
    spec = KDLossSpec(distillation_type=kind, temperature=temperature, tail=tail)
    ce, kd, dz = run_fused(z, targets, teachers, spec)
    ce_ref, kd_ref, dz_ref = run_reference(z, targets, teachers, spec)
    torch.testing.assert_close(ce, ce_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(kd, kd_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dz, dz_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_two_teachers_weighted_sum(kind):
    n, vocab = 16, 200
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(n, vocab, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    teachers = [make_teacher(n, vocab, 8, seed=4), make_teacher(n, vocab, 12, seed=5, sharp=1.0)]
    spec = KDLossSpec(distillation_type=kind, teacher_weights=(0.25, 0.75))
    fused, ref = run_fused(z, targets, teachers, spec), run_reference(z, targets, teachers, spec)
    for got, want in zip(fused, ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_full_vocab_topk_is_exact_kl():
    """k = V: no tail class on either side, forward_kld is the exact KL(p || q) over the vocabulary."""
    n, vocab = 8, 50
    gen = torch.Generator().manual_seed(6)
    z = torch.randn(n, vocab, generator=gen, dtype=torch.float64) * 2
    teacher_logp = torch.log_softmax(torch.randn(n, vocab, generator=gen, dtype=torch.float64) * 2, 1)
    top, ids = teacher_logp.topk(vocab, 1)
    # Whatever float rounding leaves as tail mass, the student has no tail to match it with.
    teacher = TeacherRows(ids, top.float(), torch.full((n,), -20.0))
    spec = KDLossSpec(kd_ratio=1.0)
    _, kd, dz = run_fused(z, torch.zeros(n, dtype=torch.long), [teacher], spec, w_ce=0.0, w_kd=1.0)
    zr = z.clone().requires_grad_(True)
    exact = (teacher_logp.exp() * (teacher_logp - torch.log_softmax(zr, 1))).sum()
    exact.backward()
    torch.testing.assert_close(kd, exact.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dz, zr.grad, rtol=1e-4, atol=1e-6)
    assert torch.isfinite(dz).all()


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


def test_bucket_tail_by_hand():
    """Vocab of 4: z = log([0.4, 0.3, 0.2, 0.1]), teacher top-2 = {0: 0.5, 1: 0.25}, tail 0.25."""
    z = torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log()
    teacher = TeacherRows(
        torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.25]]).log(), torch.tensor([0.25]).log()
    )
    _, kd, _ = chunk_loss_and_grad(z.clone(), torch.tensor([2]), [teacher], KDLossSpec(), 0.0, 1.0)
    # student tail = 0.2 + 0.1
    assert kd.item() == pytest.approx(kl([0.5, 0.25, 0.25], [0.4, 0.3, 0.3]), rel=1e-5)
    _, kd_r, _ = chunk_loss_and_grad(
        z.clone(), torch.tensor([2]), [teacher], KDLossSpec(tail="renormalize"), 0.0, 1.0
    )
    assert kd_r.item() == pytest.approx(kl([2 / 3, 1 / 3], [4 / 7, 3 / 7]), rel=1e-5)


def test_tail_stable_when_topk_holds_almost_all_mass():
    """Student tail mass e^-60: log(1 - sum q) is log(0) in float32, the masked logsumexp is exact."""
    z = torch.tensor([[30.0, 30.0, -30.0, -30.0]])
    teacher = TeacherRows(
        torch.tensor([[0, 1]]), torch.tensor([[0.5, 0.5]]).log(), torch.tensor([-float("inf")])
    )
    ce, kd, dz = chunk_loss_and_grad(z.clone(), torch.tensor([2]), [teacher], KDLossSpec(), 0.5, 0.5)
    assert kd.item() == pytest.approx(0.0, abs=1e-6)  # p = q over {0, 1}, both tails ~0
    assert ce.item() == pytest.approx(60.0 + math.log(2), rel=1e-5)
    assert torch.isfinite(dz).all()
    for kind in KINDS:
        _, kd, dz = chunk_loss_and_grad(
            z.clone(), torch.tensor([2]), [teacher], KDLossSpec(distillation_type=kind), 0.5, 0.5
        )
        assert torch.isfinite(kd) and torch.isfinite(dz).all(), kind


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_minus_inf_topk_entries_are_no_class(kind, tail):
    """-inf entries (padding: id 0 twice, an id beyond the vocabulary) change nothing and give no NaN."""
    n, vocab = 6, 40
    gen = torch.Generator().manual_seed(7)
    z = torch.randn(n, vocab, generator=gen, dtype=torch.float64)
    full = make_teacher(n, vocab, 5, seed=8)
    padded = TeacherRows(
        torch.cat([full.topk_ids, torch.tensor([[0, 0, vocab + 7]]).expand(n, 3)], 1),
        torch.cat([full.topk_logprobs, torch.full((n, 3), -float("inf"))], 1),
        full.tail_logmass,
    )
    spec = KDLossSpec(distillation_type=kind, tail=tail)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    got, want = run_fused(z, targets, [padded], spec), run_fused(z, targets, [full], spec)
    for a, b in zip(got, want, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_temperature_scaling():
    """At T the loss is KD of the tempered distributions; identical teacher and student give zero."""
    n, vocab, k = 4, 30, 30
    gen = torch.Generator().manual_seed(9)
    z = torch.randn(n, vocab, generator=gen) * 3
    logp = torch.log_softmax(z, 1)
    top, ids = logp.topk(k, 1)
    teacher = TeacherRows(ids, top, torch.full((n,), -float("inf")))
    for T in (0.5, 1.0, 4.0):
        _, kd, dz = chunk_loss_and_grad(z.clone(), ids[:, 0], [teacher], KDLossSpec(temperature=T), 0.0, 1.0)
        assert kd.item() == pytest.approx(0.0, abs=1e-5)
        assert dz.abs().max().item() < 1e-5
    # T^2 factor lives in the token weights: w_kd = kd_ratio * T^2 / N
    assert KDLossSpec(kd_ratio=0.5, temperature=2.0).token_weights(10) == (0.05, 0.2)


def test_divergence_nonnegative_and_zero_on_equal():
    gen = torch.Generator().manual_seed(10)
    logp = torch.log_softmax(torch.randn(5, 7, generator=gen), 1)
    logq = torch.log_softmax(torch.randn(5, 7, generator=gen), 1)
    valid = torch.ones(5, 7, dtype=torch.bool)
    for kind in KINDS:
        assert (divergence(kind, logp, logq, valid) >= -1e-6).all()
        assert divergence(kind, logp, logp, valid).abs().max() < 1e-6


def _target_class_reference(z, teacher_logp, k, targets):
    """Dense float64 forward KL over the classes [top-k..., x_t where outside the top-k, rest], each row
    built straight from the full teacher distribution (no cache arithmetic)."""
    logq = torch.log_softmax(z, 1)
    rows = []
    for i in range(z.shape[0]):
        top = set(teacher_logp[i].topk(k).indices.tolist())
        named = sorted(top) + ([targets[i].item()] if targets[i].item() not in top else [])
        p = teacher_logp[i].exp()
        q = logq[i].exp()
        rest = torch.ones(z.shape[1], dtype=torch.bool)
        rest[named] = False
        p_classes = torch.cat([p[named], p[rest].sum()[None]])
        q_classes = torch.cat([q[named], q[rest].sum()[None]])
        rows.append((torch.xlogy(p_classes, p_classes) - p_classes * q_classes.log()).sum())
    return torch.stack(rows).sum()


def test_target_class_matches_dense_reference():
    n, vocab, k = 32, 200, 8
    gen = torch.Generator().manual_seed(5)
    teacher_logp = torch.log_softmax(torch.randn(n, vocab, generator=gen, dtype=torch.float64) * 1.5, 1)
    top, ids = teacher_logp.topk(k, 1)
    tail = torch.log1p(-top.exp().sum(1))
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[:8] = ids[:8, 3]  # some targets inside the top-k: no extra class there
    rows = TeacherRows(ids, top.float(), tail.float())
    target_lp = teacher_logp.gather(1, targets[:, None]).squeeze(1).float()
    augmented = with_target_class(rows, targets, target_lp)
    assert augmented.topk_ids.shape == (n, k + 1)
    assert torch.isinf(augmented.topk_logprobs[:8, -1]).all() and torch.isfinite(augmented.topk_logprobs[8:, -1]).all()

    z = torch.randn(n, vocab, generator=gen, dtype=torch.float64) * 2
    spec = KDLossSpec(kd_ratio=1.0)
    _, kd, dz = run_fused(z, targets, [augmented], spec, w_ce=0.0, w_kd=1.0)
    zr = z.clone().requires_grad_(True)
    kd_ref = _target_class_reference(zr, teacher_logp, k, targets)
    kd_ref.backward()
    torch.testing.assert_close(kd, kd_ref.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dz, zr.grad, rtol=1e-4, atol=1e-6)
    # Rows whose target is in the top-k lose nothing and gain nothing.
    _, kd_plain, _ = run_fused(z[:8], targets[:8], [rows.narrow(0, 8)], spec, w_ce=0.0, w_kd=1.0)
    _, kd_aug, _ = run_fused(z[:8], targets[:8], [augmented.narrow(0, 8)], spec, w_ce=0.0, w_kd=1.0)
    torch.testing.assert_close(kd_aug, kd_plain, rtol=1e-6, atol=1e-6)


def test_target_class_when_quantization_gives_the_target_all_the_tail():
    """p(x_t) >= r (both quantized): the rest of the tail is empty (-inf), and the loss stays finite."""
    ids = torch.tensor([[0, 1]])
    rows = TeacherRows(ids, torch.tensor([[-0.5, -1.5]]), torch.tensor([-2.0]))
    augmented = with_target_class(rows, torch.tensor([5]), torch.tensor([-1.99]))
    assert augmented.tail_logmass.item() == float("-inf")
    assert augmented.topk_logprobs[0, -1].item() == pytest.approx(-1.99)
    for kind in KINDS:
        ce, kd, dz = chunk_loss_and_grad(
            torch.randn(1, 10), torch.tensor([5]), [augmented], KDLossSpec(distillation_type=kind), 0.5, 0.5
        )
        assert torch.isfinite(kd) and torch.isfinite(dz).all()
