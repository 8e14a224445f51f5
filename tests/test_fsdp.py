"""Sharded training (FSDP2 through the Trainer and accelerate) on CPU with gloo, and the head loss it needs.

Two FSDP2 ranks must reach what one process reaches with the same global batch: each optimizer step covers
the whole cache (18 samples: 9 per rank, or 18 in one process), so both see the same samples per step, and
only the order of float32 sums differs (per-rank partial sums, then a reduce-scatter, against one sum).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_student import sample
from test_train_student import _free_port, caches, make_config, samples  # noqa: F401 - fixtures
from transformers import AutoModelForCausalLM

from pipeline.config import LoraConfig
from pipeline.errors import UserError
from pipeline.student.distill import collate, distillation_loss, output_head
from pipeline.student.head_loss import DistillationHead, install_distillation_head
from pipeline.student.lora import wrap_student
from pipeline.student.losses import KDLossSpec
from stages import train_student

ROOT = Path(__file__).resolve().parents[1]
FSDP = {"fsdp": True, "fsdp_config": {"version": 2}, "ddp_backend": "gloo"}
# Float32 sums in another order differ by ~1e-7 relative per step; AdamW divides each update by the
# gradient's own RMS, which can amplify that for entries whose gradient is near zero. Same tolerance as
# the gradient-accumulation equivalence test (tests/test_train_student.py), which faces the same reordering.
# Measured (3 steps, lr 1e-2): max abs difference 2.6e-6 for LoRA (weights up to 0.13), 3.1e-6 for full
# fine-tuning (weights up to 1.02).
ATOL, RTOL = 2e-5, 1e-4

# Runs the CLI in a torchrun rank; records after step 1 how the parameters are held; SIGKILLs at a step.
# accelerate (1.15) turns FSDP on only for accelerator devices: on CPU it keeps DistributedType.MULTI_CPU,
# drops the FSDP plugin and trains DDP. The probe lifts that one device gate, as accelerate does on GPUs;
# everything after it (fully_shard, the Trainer's FSDP saving, checkpointing and loading) is the real path.
PROBE = """
import atexit, json, os, signal, sys
import accelerate.state
from accelerate.utils import DistributedType
from torch.distributed.tensor import DTensor
from transformers import TrainerCallback
import pipeline.student.kd_trainer as kd_trainer
from pipeline.cli import entry

kill_at, record = int(sys.argv[1]), sys.argv[2]
# Runs only if the rank went through the interpreter's teardown, which `entry` skips in a rank.
atexit.register(lambda: open(os.path.join(record, f"teardown{os.environ['RANK']}"), "w").close())

init_state = accelerate.state.AcceleratorState.__init__
def fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    init_state(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        if self._mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(self._mixed_precision)
        self.fsdp_plugin = fsdp_plugin
accelerate.state.AcceleratorState.__init__ = fsdp_on_cpu


class Probe(TrainerCallback):
    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1:
            params = list(model.parameters())
            local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
            held = {"all_dtensor": all(isinstance(p, DTensor) for p in params), "local": local,
                    "total": sum(p.numel() for p in params)}
            with open(os.path.join(record, f"params{os.environ['RANK']}.json"), "w") as f:
                json.dump(held, f)
        if state.global_step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

init = kd_trainer.KDTrainer.__init__
def patched(self, *a, **k):
    init(self, *a, **k)
    self.add_callback(Probe())
kd_trainer.KDTrainer.__init__ = patched
entry(sys.argv[3:])
"""


def torchrun(
    tmp_path: Path, config: Path, *cli: str, kill_at: int = 0, nproc: int = 2, probe: bool = True
) -> subprocess.CompletedProcess:
    script = tmp_path / "probe.py"
    script.write_text(PROBE if probe else "import sys\nfrom pipeline.cli import entry\nentry(sys.argv[3:])\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
         str(_free_port()), str(script), str(kill_at), str(tmp_path), "train-student", "--config", str(config), *cli],
        capture_output=True, text=True, env=env, timeout=300,
    )


def write_config(path: Path, config) -> Path:
    path.write_text(json.dumps(config.to_dict()))
    return path


def train_logs(out: Path) -> list[dict]:
    return [e for e in map(json.loads, (out / train_student.LOG_FILE).read_text().splitlines()) if "kd" in e]


def test_head_loss_inside_the_forward_equals_the_loss_after_it(tiny_student_dir):
    """The DistillationHead path (what the trainer runs) == hidden states then the head: value and gradients."""
    model = AutoModelForCausalLM.from_pretrained(tiny_student_dir, dtype=torch.float32)
    model = wrap_student(model, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "up_proj"]))
    vocab = model.config.vocab_size
    batch = collate([[sample("a", list(range(5, 17)), [6, 7, 11], vocab, 16, 3)],
                     [sample("b", list(range(40, 47)), [3, 4, 5, 6], vocab, 16, 4)]], pad_id=0, max_seq_length=64)
    spec = KDLossSpec(kd_ratio=0.7, distillation_type="jsd")
    ids = torch.tensor([[3, 9, 27]])
    logits_before = model(input_ids=ids).logits

    results = []
    for install in (False, True):
        head = install_distillation_head(model) if install else output_head(model.get_base_model())
        model.zero_grad()
        parts = distillation_loss(model, head, batch, spec, num_tokens=9, chunk_size=2)
        parts.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((parts, grads))
    (direct, direct_grads), (inside, inside_grads) = results
    assert isinstance(model.get_base_model().lm_head, DistillationHead)
    torch.testing.assert_close(inside.loss, direct.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(inside.kd_sum, direct.kd_sum, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(inside.ce_sum, direct.ce_sum, rtol=1e-6, atol=1e-6)
    assert direct_grads.keys() == inside_grads.keys() and any(g.abs().sum() > 0 for g in inside_grads.values())
    for name in direct_grads:
        torch.testing.assert_close(inside_grads[name], direct_grads[name], rtol=1e-5, atol=1e-7)
    # With no request pending it is the Linear it replaced (generation, eval, merge), under the same names.
    torch.testing.assert_close(model(input_ids=ids).logits, logits_before)
    assert "base_model.model.lm_head.weight" in dict(model.named_parameters())
    assert install_distillation_head(model) is model.get_base_model().lm_head  # idempotent


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_two_fsdp2_ranks_match_one_process(tmp_path, caches, tiny_student_dir, lora):  # noqa: F811
    """2 gloo ranks with FSDP2 (parameters sharded as DTensors) == 1 process, same 18-sample global batch."""
    # adam_epsilon: keeps Adam from turning rounding noise in near-zero gradients into full steps
    settings = {"max_steps": 3, "learning_rate": 1e-2, "logging_steps": 1, "adam_epsilon": 1e-3,
                "lora": {"enable": lora}}
    one = make_config(tmp_path / "one", caches["train"], tiny_student_dir, per_device_train_batch_size=18, **settings)
    train_student.run(one, resume=False)
    two = make_config(tmp_path / "two", caches["train"], tiny_student_dir, per_device_train_batch_size=9,
                      **settings, **FSDP)
    proc = torchrun(tmp_path, write_config(tmp_path / "two.json", two))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not list(tmp_path.glob("teardown*"))  # each rank left with os._exit after its work

    held = [json.loads((tmp_path / f"params{r}.json").read_text()) for r in (0, 1)]
    assert all(h["all_dtensor"] for h in held)  # FSDP2 did shard every parameter
    assert held[0]["total"] == held[1]["total"] and held[0]["local"] + held[1]["local"] >= held[0]["total"]
    assert max(h["local"] for h in held) < 0.6 * held[0]["total"]  # each rank holds about half
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    want, got = load_file(tmp_path / "one" / weights), load_file(tmp_path / "two" / weights)
    assert want.keys() == got.keys()  # the same layout as one process writes
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=ATOL, rtol=RTOL)
    base = AutoModelForCausalLM.from_pretrained(tiny_student_dir).state_dict()
    if not lora:  # consolidated, from_pretrained-loadable, and trained
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "two")
        assert not torch.equal(model.lm_head.weight, base["lm_head.weight"])
    else:
        assert any(got[k].abs().sum() > 0 for k in got if "lora_B" in k)
    # CE and KD per token are summed over ranks before they are logged: the same figures as one process.
    for a, b in zip(train_logs(tmp_path / "one"), train_logs(tmp_path / "two"), strict=True):
        assert a["response_tokens"] == b["response_tokens"]
        assert a["ce"] == pytest.approx(b["ce"], rel=1e-5) and a["kd"] == pytest.approx(b["kd"], rel=1e-5)


def test_fsdp2_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path, caches, tiny_student_dir):  # noqa: F811
    """Full fine-tuning, killed at step 4 (checkpoint 3, mid-epoch: 5 micro-batches per epoch), resumed."""
    settings = {"max_steps": 6, "save_steps": 3, "per_device_train_batch_size": 2, "lora": {"enable": False}}
    configs = {}
    for name in ("straight", "killed"):
        raw = make_config(tmp_path / name, caches["train"], tiny_student_dir, **settings, **FSDP)
        configs[name] = write_config(tmp_path / f"{name}.json", raw)
    killed = torchrun(tmp_path, configs["killed"], kill_at=4)
    assert killed.returncode != 0
    assert (tmp_path / "killed" / "checkpoint-3").is_dir()
    assert not (tmp_path / "killed" / "model.safetensors").exists()
    resumed = torchrun(tmp_path, configs["killed"], "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = torchrun(tmp_path, configs["straight"])
    assert straight.returncode == 0, straight.stderr[-3000:]

    want = load_file(tmp_path / "straight" / "model.safetensors")
    got = load_file(tmp_path / "killed" / "model.safetensors")
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=1e-5)  # measured: bit-identical
    assert json.loads((tmp_path / "killed" / train_student.METRICS).read_text())["global_step"] == 6


def test_fsdp_without_a_distributed_launch_is_refused(tmp_path, caches, tiny_student_dir):  # noqa: F811
    config = make_config(tmp_path / "out", caches["train"], tiny_student_dir, **FSDP)
    with pytest.raises(UserError, match="training.fsdp.*torchrun"):
        train_student.run(config, resume=False)


def test_fsdp_on_cpu_ranks_is_refused_not_silently_ddp(tmp_path, caches, tiny_student_dir):  # noqa: F811
    """Without the probe's gate, accelerate would train DDP under `training.fsdp` on CPU: refused instead."""
    raw = make_config(tmp_path / "out", caches["train"], tiny_student_dir, max_steps=1, **FSDP)
    proc = torchrun(tmp_path, write_config(tmp_path / "cpu.json", raw), probe=False)
    assert proc.returncode != 0
    assert "accelerate runs FSDP only on GPUs" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()
