"""`pipeline train-student`: stream the logit cache into a LoRA (or fully trained) student.

Recipe: check config -> open the cache(s), checking the student's tokenizer against the cache's (or,
with `distillation.cross_tokenizer`, aligning the student's tokenization with the teacher's) -> student +
LoRA -> KDTrainer (transformers.Trainer driven by the `training` section) -> adapter (or full model),
tokenizer, resolved config and final metrics in `training.output_dir`; `merged_model/` on request. Works
under `torchrun` (DDP, gloo on CPU; `training.fsdp` for FSDP2, `training.deepspeed` for ZeRO, both through
accelerate): each rank reads its own slice of the cache.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch

from pipeline.cache import LogitCacheReader
from pipeline.config import Config
from pipeline.cross_tokenizer.prepare import prepare_cross_tokenizer
from pipeline.errors import UserError
from pipeline.models import check_cache_tokenizer, check_model_path, load_tokenizer, model_identity
from pipeline.student.distill import collate
from pipeline.student.kd_trainer import CacheStream, JsonlLogger, KDTrainer
from pipeline.student.lora import wrap_student
from pipeline.student.losses import KDLossSpec, check_tail_settings

log = logging.getLogger(__name__)

RESOLVED_CONFIG = "distill_config.json"
METRICS = "metrics.json"
LOG_FILE = "log.jsonl"
# Fixed by the stage: the stream does its own sharding and resume (see pipeline.student.kd_trainer).
_FIXED_ARGS = {"ignore_data_skip": True, "remove_unused_columns": False}


def run(config: Config, *, resume: bool) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, TrainingArguments, set_seed
    from transformers.trainer_utils import get_last_checkpoint

    student_path, output_dir = _check_config(config)
    tokenizer = load_tokenizer(student_path, role="student")
    readers = open_caches(config, tokenizer)
    loss_spec = KDLossSpec.from_config(config.distillation, len(readers))
    alignment = None
    if config.distillation.cross_tokenizer:  # the student's own tokens, aligned with the teacher's
        collate_fn, alignment = prepare_cross_tokenizer(config, readers[0], tokenizer)
    else:
        collate_fn = _collator(tokenizer, config.distillation.max_seq_length)
        try:  # before the model loads: a sampled cache with a loss it cannot serve fails at once
            check_tail_settings(loss_spec, [(r.manifest.kind, r.k) for r in readers])
        except ValueError as exc:
            raise UserError(f"`distillation` settings: {exc}") from None
    checkpoint = _checkpoint(output_dir, resume, get_last_checkpoint)

    training = dict(config.training)
    if training.get("gradient_checkpointing") and config.lora.enable:
        # Reentrant checkpointing needs inputs that require grad, which frozen embeddings do not give.
        training.setdefault("gradient_checkpointing_kwargs", {"use_reentrant": False})
    # Every trainable parameter takes part in the KD forward, so DDP need not search the graph for unused
    # ones each step (transformers would otherwise turn the search on).
    training.setdefault("ddp_find_unused_parameters", False)
    _check_sharding(training)
    args = TrainingArguments(**{**training, **_FIXED_ARGS})
    stream = CacheStream(
        readers,
        seed=config.dataset.seed,
        rank=args.process_index,
        world_size=args.world_size,
        batch_size=args.per_device_train_batch_size,
        collate_fn=collate_fn,
    )
    if args.max_steps <= 0:  # an endless stream: the epochs become steps (same count on every rank)
        most = math.ceil(readers[0].rank_num_samples(0, args.world_size) / args.per_device_train_batch_size)
        args.max_steps = math.ceil(args.num_train_epochs * most / args.gradient_accumulation_steps)

    set_seed(args.seed)  # LoRA init
    model = AutoModelForCausalLM.from_pretrained(student_path, dtype=torch.float32)
    model = wrap_student(model, config.lora)
    trainer = KDTrainer(
        model=model,
        args=args,
        processing_class=tokenizer,
        loss_spec=loss_spec,
        chunk_size=config.distillation.chunk_size,
        stream=stream,
        callbacks=[JsonlLogger(output_dir / LOG_FILE)],
    )
    if args.fsdp and not trainer.is_fsdp_enabled:
        # accelerate turns FSDP on only for accelerator devices; on CPU it would silently train DDP.
        raise UserError(
            f"`training.fsdp` is set, but accelerate runs FSDP only on GPUs (or other accelerators), not on "
            f"{args.device.type}: drop `training.fsdp` to train data-parallel (DDP), or run on GPUs."
        )
    if checkpoint is not None:
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
        stream.start = state["global_step"] * args.gradient_accumulation_steps
        log.info("resuming from %s (step %d)", checkpoint, state["global_step"])
    result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(str(output_dir))

    metrics = {
        **result.metrics,
        "global_step": result.global_step,
        "cache_samples": readers[0].num_samples,
        "epochs": trainer.state.epoch,
        "last_log": next((e for e in reversed(trainer.state.log_history) if "kd" in e), None),
    }
    if alignment is not None:
        metrics["cross_tokenizer_alignment"] = alignment
    summary = {"output_dir": str(output_dir), "metrics": metrics}
    if trainer.is_world_process_zero():
        (output_dir / RESOLVED_CONFIG).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        (output_dir / METRICS).write_text(json.dumps(metrics, indent=2) + "\n")
        if config.lora.enable and config.lora.save_merged_model:
            from stages import merge

            summary["merged"] = merge.run(student_path, output_dir, output_dir / "merged_model")
    log.info("student written to %s: %s", output_dir, json.dumps(metrics))
    _end_distributed()
    return summary


def _end_distributed() -> None:
    """Wait for rank 0's writes, then tear the process group down: a rank that exits with live gloo
    threads can abort ("terminate called without an active exception") and fail the whole job."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def open_caches(config: Config, tokenizer: Any) -> list[LogitCacheReader]:
    """One reader per teacher, in `models.teacher` order, each checked against the student's tokenizer.

    `dataset.logits_path` is one cache, or a folder of one cache per teacher, matched to the teachers
    by content (see `_in_teacher_order`).
    """
    root = config.dataset.logits_path
    if root is None:
        raise UserError("`dataset.logits_path` is not set: train-student reads the teacher's logit cache.")
    if (root / "manifest.json").is_file():
        dirs = [root]
    else:
        dirs = sorted(p for p in root.iterdir() if (p / "manifest.json").is_file()) if root.is_dir() else []
        if not dirs:
            raise UserError(
                f"`dataset.logits_path` {root} holds no logit cache (no manifest.json, nor in any "
                "subfolder): run gen-logits first."
            )
    readers = [LogitCacheReader(d) for d in dirs]
    cross = config.distillation.cross_tokenizer
    if cross and len(readers) > 1:
        raise UserError(
            f"`distillation.cross_tokenizer` distils from one teacher cache; {root} holds {len(readers)}."
        )
    for reader in readers:
        if not cross:  # across tokenizers the ids are never compared: the text is aligned instead
            check_cache_tokenizer(reader.cache_dir, reader.manifest.identity, tokenizer)
    teachers = [str(t) for t in config.models.teacher]
    if len(readers) > 1:
        readers = _in_teacher_order(readers, teachers, config.distillation.teacher_weights, root)
    weights = config.distillation.teacher_weights
    if weights is not None and len(weights) != len(readers):
        raise UserError(
            f"`distillation.teacher_weights` has {len(weights)} entries for {len(readers)} teacher caches."
        )
    return readers


def _in_teacher_order(
    readers: list[LogitCacheReader], teachers: list[str], weights: list[float] | None, root: Path
) -> list[LogitCacheReader]:
    """The caches in `models.teacher` order, so that `teacher_weights[w]` weighs teacher w's cache.

    A teacher folder present here is matched by its content hash (the one gen-logits recorded), wherever
    it is mounted; a teacher that is not (a hub id, or weights kept on the teacher's machine) by the
    path recorded in the cache. Without `models.teacher` the folder order is arbitrary (`Qwen2.5-14B`
    sorts before `Qwen2.5-7B`), which only equal weights make harmless.
    """
    recorded = [r.manifest.identity.get("teacher", {}) for r in readers]
    if not teachers:
        if weights is not None and len(set(weights)) > 1:
            raise UserError(
                f"`distillation.teacher_weights` {weights} are unequal, but nothing says which of the "
                f"{len(readers)} caches under {root} is which teacher: list the teachers in `models.teacher`, "
                f"in the order of the weights (the caches were made by {[t.get('path') for t in recorded]})."
            )
        return readers
    order = []
    for teacher in teachers:
        if Path(teacher).is_dir():
            digest = model_identity(teacher)["hash"]
            hits = [i for i, found in enumerate(recorded) if found.get("hash") == digest]
            how = f"content hash {digest[:12]}"
        else:
            hits = [i for i, found in enumerate(recorded) if found.get("path") == teacher]
            how = "recorded path (the folder is not on this machine)"
        if len(hits) != 1:
            made_by = [f"{r.cache_dir.name}: {t.get('path')} (hash {str(t.get('hash'))[:12]})"
                       for r, t in zip(readers, recorded, strict=True)]
            raise UserError(
                f"`models.teacher` {teacher} matches {len(hits)} of the caches under {root} by {how}; the "
                f"caches were made by {made_by}. List each teacher once: a folder with the same weights, "
                "or the path recorded in its cache."
            )
        order.append(hits[0])
    if len(order) != len(readers):
        raise UserError(
            f"`models.teacher` lists {len(teachers)} teachers, {root} holds {len(readers)} caches: "
            "list one teacher per cache."
        )
    return [readers[i] for i in order]


def _check_sharding(training: dict[str, Any]) -> None:
    """FSDP and DeepSpeed shard across processes: they need a distributed launch (torchrun, accelerate)."""
    engine = next((f"training.{key}" for key in ("fsdp", "deepspeed") if training.get(key)), None)
    if engine and "LOCAL_RANK" not in os.environ:  # set by torchrun and accelerate launch
        raise UserError(
            f"`{engine}` shards the student across processes: launch with `torchrun --nproc_per_node N -m "
            "pipeline.cli train-student ...` (or `accelerate launch`), even for one GPU."
        )


def _check_config(config: Config) -> tuple[str, Path]:
    if config.models.student is None:
        raise UserError("`models.student` is not set: train-student needs the student model.")
    output_dir = config.training.get("output_dir")
    if not output_dir:
        raise UserError("`training.output_dir` is not set: train-student writes the student there.")
    return check_model_path(config.models.student, "student"), Path(output_dir)


def _checkpoint(output_dir: Path, resume: bool, get_last_checkpoint: Any) -> str | None:
    last = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
    if resume and last is None:
        raise UserError(f"--resume: {output_dir} holds no checkpoint-* folder to resume from.")
    if not resume and last is not None:
        raise UserError(
            f"{output_dir} already holds checkpoints ({Path(last).name}): pass --resume to continue "
            "that run, or choose another `training.output_dir`."
        )
    return last


def _collator(tokenizer: Any, max_seq_length: int) -> functools.partial:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
    return functools.partial(collate, pad_id=pad_id, max_seq_length=max_seq_length)  # picklable for workers
