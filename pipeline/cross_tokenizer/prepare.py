"""Everything a cross-tokenizer run needs before training: both renderers, every sample's alignment,
the shared vocabulary and the coverage report; each check fails naming the config key or sample."""

from __future__ import annotations

import hashlib
import itertools
import logging
from pathlib import Path
from typing import Any

from pipeline.alignment import ChatRenderer
from pipeline.cache import LogitCacheReader
from pipeline.config import Config
from pipeline.cross_tokenizer.alignment import CrossAligner
from pipeline.cross_tokenizer.batches import AlignmentReport, CrossCollator, shared_tail_mass, shared_topk_mass
from pipeline.cross_tokenizer.generated import generated_encoding
from pipeline.cross_tokenizer.vocab import shared_vocab_map
from pipeline.data import dataset_path, prompt_messages, read_records, read_template, to_messages
from pipeline.errors import UserError
from pipeline.models import load_tokenizer

log = logging.getLogger(__name__)


def prepare_cross_tokenizer(
    config: Config, reader: LogitCacheReader, student_tokenizer: Any, limit: int | None = None
) -> tuple[CrossCollator, dict[str, Any]]:
    """(the collator of the student's batches, the alignment report) for one teacher cache: its first
    `limit` samples (in cache order), or all of them."""
    identity = reader.manifest.identity
    loss = config.distillation.cross_tokenizer
    generated = bool(identity.get("sampling"))  # the teacher wrote the responses (gen-logits `generate`)
    mode = "generate" if generated else "score"
    if loss in ("uld", "chunk+shared") and reader.k == 0:
        raise UserError(
            f"`distillation.cross_tokenizer: {loss}` compares the teacher's top-k, but the cache "
            f"{reader.cache_dir} is purely sampled (k = 0): use `chunk`, or a cache with top_logits_num > 0."
        )
    sampled_tail = _shared_tail(config, reader) if loss == "chunk+shared" else False
    teacher_path = _teacher_tokenizer_path(config, identity)
    teacher_tokenizer = load_tokenizer(teacher_path, role="teacher")
    records = _records(config, identity, mode)
    reasoning = identity.get("dataset", {}).get("reasoning", config.dataset.reasoning)
    teacher = ChatRenderer(teacher_tokenizer, _teacher_template(config, identity, teacher_tokenizer), reasoning)
    try:
        student = ChatRenderer(student_tokenizer, None, reasoning)
    except UserError:
        raise UserError(
            "The student's tokenizer has no chat template: cross-tokenizer training renders each conversation "
            "with the student's own template (`dataset.template` is the teacher's, the one the cache was "
            "made with). Give the student's tokenizer_config.json a chat_template."
        ) from None
    aligner = CrossAligner(teacher, student, config.distillation.max_seq_length)
    eot_pair = aligner.end_of_turn_pair()
    shared_map = shared_vocab_map(teacher_tokenizer, student_tokenizer, eot_pair, project=True)
    alignments, report = {}, AlignmentReport()
    path = dataset_path(config, mode)
    end_of_turn = {*eot_pair, *_stop_ids(teacher_path, teacher_tokenizer)}
    for sample in itertools.islice(reader.iter_samples(shuffle=False, seed=0), limit):
        where = f"{path} (sample {sample.sample_id!r})"
        messages = records.get(sample.sample_id)
        if messages is None:
            raise UserError(f"The cache holds sample {sample.sample_id!r}, which {path} lacks.")
        ids, positions = sample.input_ids.numpy(), sample.positions.numpy()
        if generated:  # the response is the cache's sampled ids; its text is what they decode to
            encoding, messages, ended = generated_encoding(
                teacher, prompt_messages(messages), [int(i) for i in ids], int(positions[0]), end_of_turn,
                sample.sample_id, where,
            )
            alignment = aligner.align(sample.sample_id, messages, ids, positions, where, teacher=encoding,
                                      ended=ended)
        else:
            alignment = aligner.align(sample.sample_id, messages, ids, positions, where)
        alignments[sample.sample_id] = alignment
        report.add(alignment, shared_topk_mass(sample, shared_map) if reader.k else None,
                   shared_tail_mass(sample, shared_map) if sampled_tail else None)
    summary = {
        "loss": loss,
        "shared_tail": "sampled" if sampled_tail else "bucket",
        "mapped_teacher_tokens": int((shared_map >= 0).sum()),
        "teacher_vocab": len(shared_map),
        **report.to_dict(),
    }
    log.info(
        "cross-tokenizer alignment (%s): %.1f%% of %d response characters in %d aligned chunks (%.2f chars "
        "each, %.1f%% of them one token on both sides); at chunk starts the teacher's top-k entries that map "
        "into the student's vocabulary carry %.1f%% of its probability, %.1f%% with the sampled tail (the "
        "shared-vocabulary term, tail %s); %d of %d teacher tokens mapped",
        loss, 100 * summary["aligned_char_share"], report.response_chars, report.chunks,
        summary["chars_per_chunk"], 100 * summary["one_to_one_chunk_share"],
        100 * summary["shared_vocab_topk_mass"], 100 * summary["shared_vocab_mass"], summary["shared_tail"],
        summary["mapped_teacher_tokens"], summary["teacher_vocab"],
    )
    pad_id = student_tokenizer.pad_token_id
    if pad_id is None:
        pad_id = student_tokenizer.eos_token_id or 0
    return CrossCollator(alignments, shared_map, pad_id, sampled_tail=sampled_tail), summary


def _shared_tail(config: Config, reader: LogitCacheReader) -> bool:
    """Whether the shared-vocabulary term takes the cache's sampled tail draws (`distillation.tail`)."""
    tail = config.distillation.tail
    if tail == "renormalize":
        raise UserError(
            "`distillation.tail: renormalize` has no cross-tokenizer form: the shared-vocabulary term keeps "
            "the teacher's unmapped and tail mass in a rest class. Use tail `auto`, `bucket` or `sampled`."
        )
    if tail == "sampled" and not reader.tail_draws:
        raise UserError(
            f"`distillation.tail: sampled` needs a cache with tail samples, but {reader.cache_dir} has none: "
            "regenerate it with `inference.tail_samples` > 0, or use tail `auto` or `bucket`."
        )
    return tail in ("auto", "sampled") and bool(reader.tail_draws)


def _stop_ids(teacher: str, tokenizer: Any) -> set[int]:
    """The ids a generation stops at: the tokenizer's eos and the model's generation_config eos ids (Qwen2
    stops at <|endoftext|> as well as <|im_end|>), so a response that ends with one of them has ended."""
    from transformers import GenerationConfig

    ids = {tokenizer.eos_token_id}
    try:
        eos = GenerationConfig.from_pretrained(teacher).eos_token_id
    except OSError:  # only the tokenizer's files are here
        eos = None
    ids.update(eos if isinstance(eos, list) else [eos])
    return ids - {None}


def _teacher_tokenizer_path(config: Config, identity: dict[str, Any]) -> str:
    """The tokenizer that made the cache's ids: `models.teacher` if it is here, else the recorded path."""
    recorded = str(identity.get("tokenizer", {}).get("path") or identity.get("teacher", {}).get("path"))
    for candidate in [*(str(t) for t in config.models.teacher), recorded]:
        if Path(candidate).is_dir():
            return candidate
    raise UserError(
        f"Cross-tokenizer training needs the teacher's tokenizer, which made the cache's token ids ({recorded}, "
        "recorded in the cache), and it is not on this machine: set `models.teacher` to a local copy of the "
        "teacher (its tokenizer files suffice)."
    )


def _records(config: Config, identity: dict[str, Any], mode: str) -> dict[str, list]:
    prompts_only = mode == "generate" and config.dataset.instruction_path
    key = "dataset.instruction_path" if prompts_only else "dataset.labeled_path"
    try:
        path = dataset_path(config, mode)
    except UserError:
        raise UserError(
            f"`{key}` is not set: cross-tokenizer training renders each cached conversation again with the "
            "student's template, from the dataset the cache was made from (its prompts, in `generate` mode)."
        ) from None
    recorded = identity.get("dataset", {}).get("sha256")
    if recorded and recorded != hashlib.sha256(Path(path).read_bytes()).hexdigest():
        raise UserError(
            f"`{key}` {path} is not the file the cache was made from (its sha256 differs from "
            f"the one recorded, {recorded[:12]}): point it at that dataset."
        )
    out = {}
    for index, (where, record) in enumerate(read_records(Path(path))):
        sample_id, messages = to_messages(record, index, where, require_response=False)
        out[sample_id] = messages
    return out


def _teacher_template(config: Config, identity: dict[str, Any], tokenizer: Any) -> str | None:
    """The chat template the cache was rendered with: `dataset.template`, else the teacher's own."""
    recorded = identity.get("dataset", {}).get("template_sha256")
    own = getattr(tokenizer, "chat_template", None) or ""
    custom = read_template(config.dataset.template)
    for template in ([custom] if custom else []) + [own]:
        if recorded is None or hashlib.sha256(template.encode()).hexdigest() == recorded:
            return template or None
    raise UserError(
        "The cache was rendered with a chat template that is neither `dataset.template` nor the teacher "
        "tokenizer's own (the recorded template_sha256 matches neither): set `dataset.template` to the template "
        "gen-logits used."
    )

