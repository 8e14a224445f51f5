"""stages/train_student.py end to end on tiny models: learning, normalization, outputs, resume, DDP."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.cache import LogitCacheReader, LogitCacheWriter
from pipeline.config import config_from_dict, load_config
from pipeline.data import load_samples
from pipeline.errors import UserError
from pipeline.models import check_cache_tokenizer, model_identity, tokenizer_fingerprint
from pipeline.records import TeacherTopK
from pipeline.student.distill import collate, distillation_loss, output_head
from pipeline.student.losses import KDLossSpec
from stages import train_student

K = 16
SHARPEN = 8.0  # a random-init teacher is nearly uniform; scaled logits make it a confident one
HELD_OUT = 6


def write_cache(cache_dir: Path, samples, teacher_dir: Path, sharpen: float = SHARPEN) -> Path:
    """Top-k of the teacher exactly as gen-logits stores it: float32 log_softmax, top-k, exact tail."""
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    fingerprint = tokenizer_fingerprint(AutoTokenizer.from_pretrained(teacher_dir))
    identity = {"teacher": model_identity(teacher_dir), "tokenizer": fingerprint, "k": K}  # as gen-logits
    with LogitCacheWriter(cache_dir, identity, rows_per_shard=8, rows_per_row_group=4, background=False) as w:
        for s in samples:
            positions = torch.tensor(s.positions)
            with torch.no_grad():
                logits = teacher(input_ids=torch.tensor([s.input_ids])).logits[0, positions - 1]
            logp = torch.log_softmax(logits * sharpen, -1)
            top, ids = logp.topk(K, -1)
            tail = logp.scatter(1, ids, -float("inf")).logsumexp(1)
            target = logp.gather(1, torch.tensor(s.input_ids)[positions][:, None])[:, 0]
            w.add(TeacherTopK(
                s.sample_id, np.asarray(s.input_ids, np.int32), positions.numpy().astype(np.int32),
                ids.numpy().astype(np.int32), top.numpy(), target.numpy(), tail.numpy(),
            ))
        w.close()
    return cache_dir


@pytest.fixture(scope="module")
def samples(tiny_tokenizer_dir, tiny_dataset_path):
    config = config_from_dict({"dataset": {"labeled_path": str(tiny_dataset_path)}}, Path("."))
    tokenized, _ = load_samples(config, AutoTokenizer.from_pretrained(tiny_tokenizer_dir), mode="score")
    return tokenized


@pytest.fixture(scope="module")
def caches(tmp_path_factory, samples, tiny_model_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("caches")
    return {
        "train": write_cache(root / "train", samples[:-HELD_OUT], tiny_model_dir),
        "held_out": write_cache(root / "held_out", samples[-HELD_OUT:], tiny_model_dir),
    }


def make_config(out: Path, cache: Path, student: Path, *, distillation=None, lora=None, **training):
    raw = {
        "dataset": {"logits_path": str(cache), "seed": 0},
        "models": {"student": str(student)},
        "distillation": {"chunk_size": 64, **(distillation or {})},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, **(lora or {})},
        "training": {
            "output_dir": str(out), "per_device_train_batch_size": 4, "learning_rate": 5e-3,
            "max_steps": 30, "logging_steps": 5, "save_steps": 1000, "report_to": "none",
            "disable_tqdm": True, "use_cpu": True, "seed": 0, **training,
        },
    }
    return config_from_dict(raw, Path("."))


def held_out_kl(model, cache: Path) -> float:
    """Mean forward KL(teacher || student) per response token (top-k + tail bucket, T = 1)."""
    items = [[s] for s in LogitCacheReader(cache).iter_samples(shuffle=False, seed=0)]
    batch = collate(items, pad_id=0, max_seq_length=4096)
    tokens = batch["targets"].numel()
    with torch.no_grad():
        parts = distillation_loss(model, output_head(model), batch, KDLossSpec(kd_ratio=1.0), tokens, 256)
    return parts.kd_sum.item() / tokens


def load_adapter(student: Path, out: Path):
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(student), str(out)).eval()


def test_kd_lowers_held_out_kl_more_than_ce_only(tmp_path, caches, tiny_student_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_student_dir).eval()
    before = held_out_kl(base, caches["held_out"])
    after, summary_kd = {}, None
    for name, kd_ratio in (("kd", 0.9), ("ce", 0.0)):
        out = tmp_path / name
        config = make_config(
            out, caches["train"], tiny_student_dir, distillation={"kd_ratio": kd_ratio}, learning_rate=2e-2,
            lora={"save_merged_model": name == "kd"},
        )
        summary = train_student.run(config, resume=False)
        assert summary["metrics"]["global_step"] == 30
        after[name] = held_out_kl(load_adapter(tiny_student_dir, out), caches["held_out"])
        summary_kd = summary if name == "kd" else summary_kd
    # A random-init student's small output head limits how far LoRA can move it in 30 steps (~0.93 -> 0.90
    # nats); CE on the dataset's own tokens moves away from the teacher.
    assert after["kd"] < before - 0.015, (before, after)
    assert after["kd"] < after["ce"] - 0.02, (before, after)

    out = tmp_path / "kd"  # what a user finds in the output directory
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json",
                 train_student.RESOLVED_CONFIG, train_student.METRICS, train_student.LOG_FILE):
        assert (out / name).is_file(), name
    assert json.loads((out / train_student.RESOLVED_CONFIG).read_text())["distillation"]["kd_ratio"] == 0.9
    logs = [json.loads(line) for line in (out / train_student.LOG_FILE).read_text().splitlines()]
    train_logs = [e for e in logs if "kd" in e]
    assert [e["step"] for e in train_logs] == [5, 10, 15, 20, 25, 30]
    assert summary_kd["merged"]["check"]["max_abs_diff"] <= 1e-4
    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
        assert (out / "merged_model" / name).is_file(), name
    assert train_logs[-1]["kd"] < train_logs[0]["kd"]
    # loss = 0.1 CE + 0.9 KD per token, up to the Trainer averaging steps of different token counts
    assert abs(train_logs[-1]["loss"] - (0.1 * train_logs[-1]["ce"] + 0.9 * train_logs[-1]["kd"])) < 0.2
    assert 5 < train_logs[-1]["epoch"] < 8  # 30 steps x 4 samples over 18 samples


def test_gradient_accumulation_normalizes_once(tmp_path, caches, tiny_student_dir):
    """4 micro-batches of 1 sample == 1 batch of 4: one mean over the step's tokens, not a mean of means."""
    adapters = []
    for name, batch, accumulation in (("micro", 1, 4), ("whole", 4, 1)):
        out = tmp_path / name
        # adam_epsilon: Adam turns a float-rounding difference in a near-zero gradient into a full step of
        # either sign; a larger epsilon keeps such entries' steps proportional to their gradient.
        config = make_config(out, caches["train"], tiny_student_dir, max_steps=3, learning_rate=1e-2,
                             per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                             adam_epsilon=1e-3)
        train_student.run(config, resume=False)
        adapters.append(load_file(out / "adapter_model.safetensors"))
    assert adapters[0].keys() == adapters[1].keys()
    for key in adapters[0]:
        torch.testing.assert_close(adapters[0][key], adapters[1][key], atol=2e-5, rtol=1e-4)


def test_gradient_checkpointing_is_exact_and_bf16_trains(tmp_path, caches, tiny_student_dir):
    """Recomputing activations must not change a float32 step; bf16 autocast must still train the adapter."""
    adapters = {}
    for name, extra in (
        ("plain", {}),
        ("checkpointed", {"gradient_checkpointing": True}),
        ("bf16", {"gradient_checkpointing": True, "bf16": True}),
    ):
        out = tmp_path / name
        config = make_config(out, caches["train"], tiny_student_dir, max_steps=3, learning_rate=1e-2, **extra)
        metrics = train_student.run(config, resume=False)["metrics"]
        assert math.isfinite(metrics["train_loss"]), name
        adapters[name] = load_file(out / "adapter_model.safetensors")
    for key in adapters["plain"]:
        torch.testing.assert_close(adapters["checkpointed"][key], adapters["plain"][key], atol=1e-6, rtol=1e-5)
        assert adapters["bf16"][key].dtype == adapters["plain"][key].dtype
    lora_b = [k for k in adapters["bf16"] if "lora_B" in k]
    assert lora_b and all(adapters["bf16"][k].abs().sum() > 0 for k in lora_b)  # it trained
    # bf16 autocast did run (the result moved), but not far: the same direction of travel.
    flat = {n: torch.cat([a[k].flatten().float() for k in lora_b]) for n, a in adapters.items()}
    assert not torch.equal(flat["bf16"], flat["plain"])
    assert torch.nn.functional.cosine_similarity(flat["bf16"], flat["plain"], dim=0) > 0.9


KILL_AT_STEP = """
import os, signal, sys
from transformers import TrainerCallback
import pipeline.student.kd_trainer as kd_trainer
from pipeline.cli import main

class KillAt(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == {step}:
            os.kill(os.getpid(), signal.SIGKILL)

init = kd_trainer.KDTrainer.__init__
def patched(self, *a, **k):
    init(self, *a, **k)
    self.add_callback(KillAt())
kd_trainer.KDTrainer.__init__ = patched
sys.exit(main(sys.argv[1:]))
"""


def run_cli(args: list[str], script: str | None = None) -> subprocess.CompletedProcess:
    code = ["-c", script] if script else ["-m", "pipeline.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, *code, *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_resume_after_sigkill_reaches_the_same_adapter(tmp_path, caches, tiny_student_dir):
    """Killed at step 12 (checkpoint 10, mid-epoch), resumed with a DataLoader worker: same final adapter."""
    settings = {"max_steps": 16, "save_steps": 5, "per_device_train_batch_size": 2,
                "gradient_accumulation_steps": 2, "dataloader_num_workers": 1}
    config = {}
    for name in ("straight", "killed"):
        config[name] = tmp_path / f"{name}.json"
        raw = make_config(
            tmp_path / name, caches["train"], tiny_student_dir, lora={"dropout": 0.1}, **settings
        )
        config[name].write_text(json.dumps(raw.to_dict()))

    killed = run_cli(["train-student", "--config", str(config["killed"])], KILL_AT_STEP.format(step=12))
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (tmp_path / "killed" / "checkpoint-10").is_dir()
    assert not (tmp_path / "killed" / "adapter_model.safetensors").exists()
    with pytest.raises(UserError, match="--resume"):  # never silently restarts over checkpoints
        train_student.run(load_config(config["killed"]), resume=False)
    resumed = run_cli(["train-student", "--config", str(config["killed"]), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    train_student.run(load_config(config["straight"]), resume=False)

    want = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    got = load_file(tmp_path / "killed" / "adapter_model.safetensors")
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=1e-5, rtol=1e-4)


RECORD_RANK_SAMPLES = """
import json, os, sys
import stages.train_student as stage
from pipeline.config import load_config
from pipeline.student.distill import collate

rank = os.environ["RANK"]
def recording(items, **kwargs):
    with open(os.path.join(sys.argv[2], f"rank{rank}.jsonl"), "a") as f:
        f.write(json.dumps([item[0].sample_id for item in items]) + "\\n")
    return collate(items, **kwargs)

trainers = []
class Recording(stage.KDTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        trainers.append(self)

stage.collate, stage.KDTrainer = recording, Recording
stage.run(load_config(sys.argv[1]), resume=False)
params = trainers[0].model.named_parameters()
sums = {n: p.detach().double().abs().sum().item() for n, p in params if p.requires_grad}
with open(os.path.join(sys.argv[2], f"weights{rank}.json"), "w") as f:
    json.dump(sums, f)
os._exit(0)  # as `pipeline.cli.entry` leaves a rank: gloo's threads can abort the interpreter's teardown
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_torchrun_two_ranks_read_disjoint_slices(tmp_path, caches, tiny_student_dir):
    """Two gloo ranks on CPU: each trains on its own half of every epoch, and both end with one model."""
    config_path = tmp_path / "ddp.json"
    raw = make_config(tmp_path / "out", caches["train"], tiny_student_dir, max_steps=6,
                      per_device_train_batch_size=3, ddp_backend="gloo")
    config_path.write_text(json.dumps(raw.to_dict()))
    script = tmp_path / "record.py"
    script.write_text(RECORD_RANK_SAMPLES)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         str(script), str(config_path), str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    per_rank = [
        [json.loads(line) for line in (tmp_path / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)
    ]
    assert [len(batches) for batches in per_rank] == [6, 6]
    epoch0 = [set(sum(batches[:3], [])) for batches in per_rank]  # 9 samples per rank and epoch
    assert len(epoch0[0]) == len(epoch0[1]) == 9 and not epoch0[0] & epoch0[1]
    weights = [json.loads((tmp_path / f"weights{r}.json").read_text()) for r in (0, 1)]
    assert weights[0] == weights[1]  # DDP kept the ranks in step
    assert any(v > 0 for k, v in weights[0].items() if "lora_B" in k)  # and they did train
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_full_finetune_and_two_teachers(tmp_path, samples, tiny_model_dir, tiny_student_dir):
    """lora.enable false saves a full model; two caches under one folder are joined by sample id."""
    write_cache(tmp_path / "caches" / "a", samples[:8], tiny_model_dir)
    write_cache(tmp_path / "caches" / "b", samples[:8], tiny_student_dir, sharpen=1.0)
    config = make_config(tmp_path / "out", tmp_path / "caches", tiny_student_dir, max_steps=3,
                         lora={"enable": False}, distillation={"teacher_weights": [3, 1]})
    config.models.teacher = [tiny_student_dir, tiny_model_dir]
    summary = train_student.run(config, resume=False)
    assert summary["metrics"]["global_step"] == 3
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    base = AutoModelForCausalLM.from_pretrained(tiny_student_dir)
    assert not torch.equal(model.lm_head.weight, base.lm_head.weight)  # the head trains too


def test_teacher_caches_are_matched_by_content_not_by_path(tmp_path, samples, tiny_model_dir, tiny_student_dir,
                                                          tiny_tokenizer_dir):
    """Caches made where the teachers lived at other paths: listed teachers are matched by their weights'
    hash, in `models.teacher` order (not the folders' sorted order). Without `models.teacher`, unequal
    weights cannot be paired with caches: refused."""
    import shutil

    # folder names sort the other way round from the teacher order below
    write_cache(tmp_path / "caches" / "a-small", samples[:4], tiny_student_dir, sharpen=1.0)
    write_cache(tmp_path / "caches" / "b-large", samples[:4], tiny_model_dir)
    mounted = {name: tmp_path / "node7" / name for name in ("large", "small")}
    shutil.copytree(tiny_model_dir, mounted["large"])
    shutil.copytree(tiny_student_dir, mounted["small"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    config = make_config(tmp_path / "out", tmp_path / "caches", tiny_student_dir,
                         distillation={"teacher_weights": [3, 1]})
    config.models.teacher = [mounted["large"], mounted["small"]]
    readers = train_student.open_caches(config, tokenizer)
    assert [r.cache_dir.name for r in readers] == ["b-large", "a-small"]
    config.models.teacher = [Path("/gone/large")]  # neither here nor recorded
    with pytest.raises(UserError, match="matches 0 of the caches"):
        train_student.open_caches(config, tokenizer)
    config.models.teacher = []
    with pytest.raises(UserError, match="unequal"):
        train_student.open_caches(config, tokenizer)
    config.distillation.teacher_weights = [1, 1]
    assert len(train_student.open_caches(config, tokenizer)) == 2


def test_tokenizer_mismatch_fails_before_training(tmp_path, caches, tiny_student_dir):
    cache = tmp_path / "other_tokenizer"
    identity = {"teacher": {"path": "t"}, "tokenizer": {"hash": "0" * 64, "vocab_size": 151665}, "k": K}
    with LogitCacheWriter(cache, identity, background=False) as writer:
        writer.add(TeacherTopK("s0", np.arange(4, dtype=np.int32), np.array([3], np.int32),
                               np.arange(K, dtype=np.int32)[None], np.full((1, K), -3.0, np.float32),
                               np.array([-3.0], np.float32), np.array([-1.0], np.float32)))
        writer.close()
    with pytest.raises(UserError, match="different tokenizer"):
        train_student.run(make_config(tmp_path / "out", cache, tiny_student_dir), resume=False)
    assert not (tmp_path / "out").exists()


def test_tokenizer_hash_differs_but_ids_agree(caches, tiny_tokenizer_dir):
    """Same token ids, other special-token names (so another hash): accepted, as gen-logits accepts it."""
    reader = LogitCacheReader(caches["train"])
    check_cache_tokenizer(reader.cache_dir, reader.manifest.identity, AutoTokenizer.from_pretrained(tiny_tokenizer_dir))


def test_second_teachers_cache_is_checked_against_the_recorded_tokenizer(tmp_path, samples, tiny_model_dir,
                                                                           tiny_tokenizer_dir):
    """Every teacher's cache holds the first teacher's token ids and tokenizer hash. A second teacher whose
    tokenizer hashes differently (other special-token names) must not make the check fail: the recorded
    `tokenizer.path` is the one compared, for train-student and eval alike."""
    import shutil

    cache = write_cache(tmp_path / "b", samples[:2], tiny_model_dir)  # ids and hash of the first teacher
    identity = LogitCacheReader(cache).manifest.identity
    student = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)  # same ids, another hash
    teacher_b = tmp_path / "teacher_b"  # the same vocabulary, another pad token: another hash
    shutil.copytree(tiny_model_dir, teacher_b)
    settings = json.loads((teacher_b / "tokenizer_config.json").read_text())
    (teacher_b / "tokenizer_config.json").write_text(json.dumps({**settings, "pad_token": "<|im_end|>"}))
    second_teacher = {**identity, "teacher": {"path": str(teacher_b)}}
    with pytest.raises(UserError, match="different tokenizer"):  # no recorded path: the teacher's is compared
        check_cache_tokenizer(cache, second_teacher, student)
    recorded = {**second_teacher, "tokenizer": {**identity["tokenizer"], "path": str(tiny_model_dir)}}
    check_cache_tokenizer(cache, recorded, student)


def test_missing_target_modules_fail_before_training(tmp_path, caches, tiny_student_dir):
    lora = {"target_modules": ["W_pack"]}
    config = make_config(tmp_path / "out", caches["train"], tiny_student_dir, lora=lora)
    with pytest.raises(UserError, match="W_pack"):
        train_student.run(config, resume=False)
    assert not list((tmp_path / "out").glob("checkpoint-*"))
