"""What needs CUDA: the chunked head and the teacher's top-k on the GPU against float64, bf16 and fp16
training steps, and FSDP2 through accelerate on a real GPU (no CPU gate to lift). Skipped without CUDA;
tools/gpu_check.sh runs them on a GPU machine.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from test_fsdp import FSDP, torchrun, write_config
from test_losses import make_teacher, reference
from test_train_student import caches, make_config, samples  # noqa: F401 - fixtures

from pipeline.student.distill import ChunkedHeadLoss
from pipeline.student.losses import KDLossSpec, TeacherRows
from pipeline.teacher.topk import OutputHead, topk_from_hidden
from stages import train_student

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (run tools/gpu_check.sh on a GPU machine)"
)

# Relative error of the loss sums and of the gradients against float64: float32 sums over ~1e5 terms, and
# bf16 / fp16 matmuls (8 / 11 mantissa bits) in the head under autocast, the loss itself in float32.
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 5e-3}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double().cpu() - want).norm() / want.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_chunked_head_on_cuda_matches_float64(dtype):
    n, hidden_size, vocab, k = 300, 256, 32000, 64
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, hidden_size, generator=gen)
    weight = torch.randn(vocab, hidden_size, generator=gen) * 0.1
    targets = torch.randint(0, vocab, (n,), generator=gen)
    teachers = [make_teacher(n, vocab, k, seed=1)]
    spec = KDLossSpec(kd_ratio=0.5)
    w_ce, w_kd = spec.token_weights(n)

    h64, w64 = (t.double().requires_grad_(True) for t in (hidden, weight))
    ce_ref, kd_ref = reference(h64 @ w64.T, targets, teachers, spec)
    (w_ce * ce_ref + w_kd * kd_ref).backward()

    h, w = (t.cuda().requires_grad_(True) for t in (hidden, weight))
    cuda_teachers = [TeacherRows(*(x.cuda() for x in (t.topk_ids, t.topk_logprobs, t.tail_logmass))) for t in teachers]
    with torch.autocast("cuda", dtype=getattr(torch, dtype), enabled=dtype != "float32"):
        loss, ce, kd = ChunkedHeadLoss.apply(h, w, None, targets.cuda(), cuda_teachers, spec, w_ce, w_kd, 128)
    loss.backward()
    tolerance = TOLERANCE[dtype]
    assert torch.isfinite(loss).all()
    assert relative_error(ce, ce_ref.detach()) < tolerance
    assert relative_error(kd, kd_ref.detach()) < tolerance
    assert relative_error(h.grad, h64.grad) < 10 * tolerance
    assert relative_error(w.grad, w64.grad) < 10 * tolerance


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_teacher_topk_on_cuda_matches_float64(dtype):
    """The top-k the vllm engine computes on the GPU (pipeline.teacher.topk), against a float64 reference."""
    n, hidden_size, vocab, k = 257, 256, 32000, 64
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(n, hidden_size, generator=gen).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=gen) * 0.2).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    result = topk_from_hidden(hidden.cuda(), OutputHead(weight.cuda()), targets.cuda(), k, chunk_size=64)
    logp = torch.log_softmax(hidden.double() @ weight.double().T, dim=1)
    atol = 1e-4 if dtype == torch.float32 else 5e-2  # bf16 logits carry ~3 significant digits
    chosen = logp.gather(1, result.ids.long().cpu())
    assert torch.allclose(result.logprobs.double().cpu(), chosen, atol=atol, rtol=0)
    assert torch.allclose(result.logprobs.double().cpu(), logp.topk(k, dim=1).values, atol=atol, rtol=0)
    target = logp.gather(1, targets[:, None])[:, 0]
    assert torch.allclose(result.target_logprobs.double().cpu(), target, atol=atol, rtol=0)


def lora_b(path) -> torch.Tensor:
    adapter = load_file(path / "adapter_model.safetensors")
    return torch.cat([adapter[key].flatten().float() for key in sorted(adapter) if "lora_B" in key])


def test_bf16_and_fp16_training_steps_on_cuda(tmp_path, caches, tiny_student_dir):  # noqa: F811
    moved = {}
    for name, extra in (("fp32", {}), ("bf16", {"bf16": True}), ("fp16", {"fp16": True})):
        config = make_config(tmp_path / name, caches["train"], tiny_student_dir, max_steps=3, learning_rate=1e-2,
                             use_cpu=False, **extra)
        metrics = train_student.run(config, resume=False)["metrics"]
        assert math.isfinite(metrics["train_loss"]), name
        moved[name] = lora_b(tmp_path / name)
        assert moved[name].abs().sum() > 0, name  # it trained (fp16: the loss scaler did not skip every step)
    for name in ("bf16", "fp16"):
        assert torch.nn.functional.cosine_similarity(moved[name], moved["fp32"], dim=0) > 0.9, name


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_fsdp2_through_accelerate_on_one_gpu(tmp_path, caches, tiny_student_dir, bf16):  # noqa: F811
    """The real accelerate FSDP2 path (on CUDA nothing is patched): 1 rank == 1 process without FSDP."""
    settings = {"max_steps": 3, "learning_rate": 1e-2, "per_device_train_batch_size": 6, "use_cpu": False,
                "bf16": bf16}
    train_student.run(make_config(tmp_path / "plain", caches["train"], tiny_student_dir, **settings), resume=False)
    fsdp = {**FSDP, "ddp_backend": "nccl"}
    raw = make_config(tmp_path / "fsdp", caches["train"], tiny_student_dir, **settings, **fsdp)
    proc = torchrun(tmp_path, write_config(tmp_path / "fsdp.json", raw), nproc=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "params0.json").read_text())["all_dtensor"]
    want, got = lora_b(tmp_path / "plain"), lora_b(tmp_path / "fsdp")
    if bf16:  # FSDP2 computes in bf16 parameters (MixedPrecisionPolicy), the plain run under bf16 autocast
        assert torch.nn.functional.cosine_similarity(got, want, dim=0) > 0.9
    else:
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("tail_samples", [0, 16])
def test_hf_engine_writes_a_cache_on_cuda(tmp_path, tiny_dataset_path, tiny_model_dir, tail_samples):
    """gen-logits with the hf engine runs the teacher, head, top-k and tail draws on the GPU; the cache
    matches the float64 reference like the CPU one."""
    from test_gen_logits import check_against_teacher, read_rows
    from test_gen_logits import write_config as gen_config
    from test_sampled_cache import check_samples_against_teacher

    from pipeline.config import load_config
    from stages import gen_logits

    cache = tmp_path / "cache"
    config = load_config(gen_config(tmp_path, tiny_dataset_path, [tiny_model_dir], cache, tail_samples=tail_samples))
    gen_logits.run(config)
    rows = read_rows(cache)
    check_against_teacher(rows, tiny_model_dir)
    if tail_samples:
        check_samples_against_teacher(rows, tiny_model_dir, config.inference.top_logits_num, tail_samples)
