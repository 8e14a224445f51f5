"""Stage one, `pipeline gen-logits`: run the teacher(s) over the dataset and write one logit cache each.

Recipe: check tokenizers, k and inputs before any model loads; tokenize; take this process's part of
the samples; then per teacher open its cache writer, skip the samples its complete shards already
hold, and stream engine batches into the writer (which encodes and writes in its own thread).

`score` mode scores the dataset's responses. `generate` mode lets the first teacher write the
responses (sampled per sample with a seed derived from `inference.seed` and the sample id, so a
resumed or split run samples the same), appends them to `generations-<part>.jsonl` in its cache
directory as they come (a killed run does not sample them again), and then scores them like `score`
mode; the other teachers score the exact sequences stored in the first teacher's cache.

Resume: rerunning continues after the last complete shard of each cache; shards are whole and
atomic, so a SIGKILL at any moment loses at most the unfinished shard and never duplicates a row.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.cache import LogitCacheReader, LogitCacheWriter, load_manifest
from pipeline.config import Config
from pipeline.data import TokenizedSample, dataset_identity, load_samples
from pipeline.errors import UserError
from pipeline.models import (
    check_model_path,
    check_same_vocab,
    load_tokenizer,
    model_identity,
    tokenizer_fingerprint,
)
from pipeline.teacher.engines import GenerationRequest, engine_version, make_engine, sample_seed

log = logging.getLogger(__name__)


def run(config: Config, *, part: int = 0, num_parts: int = 1, overwrite: bool = False) -> dict[str, Any]:
    """Fill this part of every teacher's cache; returns the run summary (also logged)."""
    started = time.time()
    _check_config(config, part, num_parts)
    inference, teachers = config.inference, config.models.teacher
    tokenizer = _checked_tokenizer(config)
    fingerprint = tokenizer_fingerprint(tokenizer)
    samples, data_stats = load_samples(config, tokenizer, mode=inference.mode)
    _check_lengths(config, samples)
    mine = samples[part * len(samples) // num_parts : (part + 1) * len(samples) // num_parts]
    writer_id = f"part-{part}-of-{num_parts}"
    dirs = cache_dirs(config)
    if overwrite:
        for cache_dir in dirs:
            _remove_part(cache_dir, writer_id, whole=num_parts == 1)

    base_identity = {
        # The first teacher's tokenizer made every cache's token ids; its path lets readers compare vocabularies.
        "tokenizer": {**fingerprint, "path": str(teachers[0])},
        "k": inference.top_logits_num,
        **_tail_identity(config),
        "dataset": dataset_identity(config, inference.mode, tokenizer),
        "mode": inference.mode,
        "sampling": _sampling_identity(config),
    }
    # The data counts describe the whole dataset file (every part tokenizes all of it): kept apart from
    # this part's own count, so that the manifest takes them once instead of summing them over parts.
    stats = {"dataset": data_stats.to_dict(), "part_samples": len(mine)}
    per_teacher = []
    for index, (teacher, cache_dir) in enumerate(zip(teachers, dirs, strict=True)):
        identity = {**base_identity, "teacher": _teacher_identity(config, teacher)}
        with LogitCacheWriter(
            cache_dir, identity, writer_id=writer_id, rows_per_shard=inference.rows_per_shard
        ) as writer:
            done = writer.completed_sample_ids()
            if inference.mode == "score":
                todo = [s for s in mine if s.sample_id not in done]
            elif index == 0:
                todo = _generate(config, teacher, cache_dir / f"generations-{writer_id}.jsonl", mine, done)
            else:
                todo = _sequences_from(dirs[0], [s.sample_id for s in mine if s.sample_id not in done])
            counts = _score(config, teacher, todo, writer, stats, label=cache_dir.name or str(cache_dir))
        per_teacher.append(
            {"teacher": str(teacher), "cache": str(cache_dir), "skipped_done": len(done), **counts}
        )

    wall = time.time() - started
    summary = _summary(per_teacher, dirs, wall)
    log.info("gen-logits summary: %s", json.dumps(summary))
    return summary


def cache_dirs(config: Config) -> list[Path]:
    """One teacher: `dataset.logits_path`; several: one subdirectory per teacher, named after its
    directory (with the teacher's index when two names collide)."""
    root, teachers = config.dataset.logits_path, config.models.teacher
    if len(teachers) == 1:
        return [root]
    names = [re.sub(r"[^A-Za-z0-9._-]+", "_", Path(t).name) or "teacher" for t in teachers]
    return [root / (f"{i}-{n}" if names.count(n) > 1 else n) for i, n in enumerate(names)]


def _check_config(config: Config, part: int, num_parts: int) -> None:
    """What load_config cannot check alone (types and ranges it does check)."""
    if not config.models.teacher:
        raise UserError("`models.teacher` is empty: name at least one teacher model directory.")
    if config.dataset.logits_path is None:
        raise UserError("`dataset.logits_path` is not set: it is where gen-logits writes the cache.")
    if num_parts < 1 or not 0 <= part < num_parts:
        raise UserError(f"--part {part} --num-parts {num_parts}: need 0 <= part < num-parts.")


def max_length(config: Config) -> int:
    """The longest sequence the engine must take: the student's max_seq_length, or less if the
    engine's `inference.max_model_len` is smaller."""
    return min(config.distillation.max_seq_length, config.inference.max_model_len or 1 << 62)


def _check_lengths(config: Config, samples: list[TokenizedSample]) -> None:
    longest = max(len(s.input_ids) for s in samples)
    limit = max_length(config)
    # Generation needs room for at least one new token after the prompt.
    if longest + (config.inference.mode == "generate") > limit:
        raise UserError(
            f"A sample has {longest} tokens but `inference.max_model_len` is {limit}: raise it, or lower "
            "`distillation.max_seq_length` so that samples are cut to fit."
        )


def _checked_tokenizer(config: Config) -> Any:
    """The first teacher's tokenizer, after checking every teacher and the student against it."""
    teachers = config.models.teacher
    for teacher in teachers:
        check_model_path(teacher, "teacher")
    reference = load_tokenizer(teachers[0], "teacher")
    for teacher in teachers[1:]:
        check_same_vocab(reference, str(teachers[0]), load_tokenizer(teacher, "teacher"), str(teacher))
    if config.models.student is not None and not config.distillation.cross_tokenizer:
        student = load_tokenizer(config.models.student, "student")
        check_same_vocab(reference, str(teachers[0]), student, str(config.models.student))
    k, vocab = config.inference.top_logits_num, len(reference)
    if k >= vocab and config.inference.tail_samples:
        raise UserError(
            f"`inference.top_logits_num` {k} covers the teacher's whole vocabulary ({vocab} tokens): there is "
            "no tail to sample; set `inference.tail_samples` to 0."
        )
    if k > vocab:
        raise UserError(
            f"`inference.top_logits_num` {k} is larger than the teacher's vocabulary ({vocab} tokens)."
        )
    return reference


def _teacher_identity(config: Config, teacher: Path) -> dict[str, Any]:
    engine = config.inference.engine
    return {
        **model_identity(teacher),
        "engine": engine,
        "engine_version": engine_version(engine),
        "engine_dtype": config.inference.dtype,
    }


def _tail_identity(config: Config) -> dict[str, Any]:
    """A sampled-tail cache records its draws and their seed; a top-k cache's identity is unchanged."""
    inference = config.inference
    if not inference.tail_samples:
        return {}
    return {"tail_samples": {"draws": inference.tail_samples, "seed": inference.seed}}


def _sampling_identity(config: Config) -> dict[str, Any]:
    inference = config.inference
    if inference.mode == "score":
        return {}
    return {
        "generator": str(config.models.teacher[0]),
        "temperature": inference.temperature,
        "top_p": inference.top_p,
        "max_new_tokens": inference.max_new_tokens,
        "seed": inference.seed,
    }


def _batches(samples: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(samples), size):
        yield samples[start : start + size]


def _score(
    config: Config,
    teacher: Path,
    todo: list[TokenizedSample],
    writer: LogitCacheWriter,
    stats: dict[str, Any],
    label: str,
) -> dict[str, Any]:
    """Score `todo` with a freshly loaded teacher into the writer and close it; no engine start when
    there is nothing to do. `score_s` runs from the engine being ready to the last shard on disk."""
    counts: dict[str, Any] = {"samples": len(todo), "tokens": 0, "response_tokens": 0, "score_s": 0.0}
    if not todo:
        writer.close(stats)
        return counts
    with (
        make_engine(config, teacher, task="score") as engine,
        tqdm(
            total=sum(len(s.input_ids) for s in todo), unit="tok", unit_scale=True, desc=f"score {label}"
        ) as bar,
    ):
        started = time.time()
        for records in engine.score(_batches(todo, config.inference.batch_size)):
            for record in records:
                writer.add(record)
            tokens = sum(len(r.input_ids) for r in records)
            counts["tokens"] += tokens
            counts["response_tokens"] += sum(len(r.positions) for r in records)
            bar.update(tokens)
        writer.close(stats)  # the last shard, before the engine shuts down
        counts["score_s"] = round(time.time() - started, 3)
    return counts


def _generate(
    config: Config, teacher: Path, journal: Path, prompts: list[TokenizedSample], done: set[str]
) -> list[TokenizedSample]:
    """Prompt + sampled response for every prompt not in `done`; responses already in the journal
    (from a killed run) are reused, new ones are appended to it batch by batch."""
    inference = config.inference
    written = _read_journal(journal)
    todo = [p for p in prompts if p.sample_id not in done and p.sample_id not in written]
    if todo:
        max_len = max_length(config)
        with (
            make_engine(config, teacher, task="generate") as engine,
            open(journal, "a", encoding="utf-8") as out,
            tqdm(total=len(todo), unit="sample", desc=f"generate {Path(teacher).name}") as bar,
        ):
            for batch in _batches(todo, inference.batch_size):
                requests = [
                    GenerationRequest(
                        list(p.input_ids),
                        min(inference.max_new_tokens, max_len - len(p.input_ids)),
                        sample_seed(inference.seed, p.sample_id),
                    )
                    for p in batch
                ]
                for prompt, response in zip(batch, engine.generate(requests), strict=True):
                    written[prompt.sample_id] = response
                    out.write(json.dumps({"sample_id": prompt.sample_id, "response": response}) + "\n")
                out.flush()
                os.fsync(out.fileno())
                bar.update(len(batch))
    return [
        TokenizedSample(
            p.sample_id,
            list(p.input_ids) + written[p.sample_id],
            list(range(len(p.input_ids), len(p.input_ids) + len(written[p.sample_id]))),
        )
        for p in prompts
        if p.sample_id not in done
    ]


def _read_journal(journal: Path) -> dict[str, list[int]]:
    """sample_id -> response ids; a torn last line (killed mid-write) is ignored."""
    written: dict[str, list[int]] = {}
    if journal.exists():
        for line in journal.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            written[entry["sample_id"]] = entry["response"]
    return written


def _sequences_from(first_cache: Path, sample_ids: list[str]) -> list[TokenizedSample]:
    """The first teacher's generated sequences, read back from its cache, so every teacher scores them."""
    if not sample_ids:
        return []
    reader = LogitCacheReader(first_cache, allow_incomplete=True, verify="none")
    rows = [reader.read_sample(sample_id) for sample_id in sample_ids]
    return [TokenizedSample(r.sample_id, r.input_ids.tolist(), r.positions.tolist()) for r in rows]


def _remove_part(cache_dir: Path, writer_id: str, *, whole: bool) -> None:
    """--overwrite: delete the cache (one part) or this part's files (several parts share the dir)."""
    if not cache_dir.exists():
        return
    is_cache = (cache_dir / "parts").is_dir() or (cache_dir / "manifest.json").exists()
    if not is_cache and any(cache_dir.iterdir()):
        raise UserError(
            f"--overwrite: {cache_dir} is not a logit cache (no manifest); refusing to delete it."
        )
    if whole:
        shutil.rmtree(cache_dir)
        return
    for path in [
        *cache_dir.glob(f"shard-{writer_id}-*.parquet"),
        *cache_dir.glob(f".shard-{writer_id}-*.tmp"),
        cache_dir / "parts" / f"{writer_id}.json",
        cache_dir / f"generations-{writer_id}.jsonl",
    ]:
        path.unlink(missing_ok=True)


def _summary(per_teacher: list[dict[str, Any]], dirs: list[Path], wall: float) -> dict[str, Any]:
    tokens = sum(t["tokens"] for t in per_teacher)
    score_s = sum(t["score_s"] for t in per_teacher)
    manifests = [load_manifest(d) for d in dirs]
    stored_bytes = sum(m.num_bytes for m in manifests)
    stored_tokens = sum(m.num_response_tokens for m in manifests)
    return {
        "samples": sum(t["samples"] for t in per_teacher),
        "tokens": tokens,
        "response_tokens": sum(t["response_tokens"] for t in per_teacher),
        "bytes_per_token": round(stored_bytes / stored_tokens, 2) if stored_tokens else None,
        "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 1) if wall > 0 else None,
        # Without model loading and tokenizing: what a long run converges to.
        "score_tokens_per_s": round(tokens / score_s, 1) if score_s > 0 else None,
        "teachers": per_teacher,
    }
