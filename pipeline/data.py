"""Dataset records -> token ids + the exact positions of response tokens.

Accepted record shapes (a JSON array, JSONL, or a Parquet file with these columns; one record per object/row):
- EasyDistill: {"instruction", "input"?, "output"}   (output optional for generate mode)
- chat:        {"messages": [{"role": system|user|assistant, "content"}, ...]}  every assistant turn
               is a response
- pair:        {"prompt", "response"}                (response optional for generate mode)
An optional "id" becomes the sample id; otherwise the record's index does.

Alignment (pipeline.alignment): the whole conversation is rendered once with the chat template (the
tokenizer's, or the Jinja file `dataset.template`) and tokenized with character offsets; each assistant
turn is located in that rendering, from the end of the generation prompt through its end-of-turn token.
`positions` are the indices t of response tokens; the student predicts x_t from t-1.

`max_seq_length` policy: a sample whose prompt (tokens before its first response token) already
fills `max_seq_length` is dropped; otherwise the sequence is cut at `max_seq_length` tokens, which
truncates the response. Both are counted in DataStats. Records whose responses are all empty are
skipped and counted.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal

from pipeline.alignment import ChatRenderer, Message
from pipeline.config import Config
from pipeline.errors import UserError

ROLES = ("system", "user", "assistant")


@dataclass
class TokenizedSample:
    sample_id: str
    input_ids: list[int]
    positions: list[int]  # response token indices t (ascending, t >= 1); empty in generate mode


@dataclass
class DataStats:
    records: int = 0
    samples: int = 0
    skipped_empty_response: int = 0
    dropped_prompt_too_long: int = 0
    truncated_response: int = 0
    tokens: int = 0
    response_tokens: int = 0
    skipped_ids: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["skipped_ids"] = out["skipped_ids"][:20]  # a sample for the log, not the whole list
        return out


def dataset_path(config: Config, mode: str) -> Path:
    """The records file for a mode: generate prefers instruction_path, score needs labeled_path."""
    ds = config.dataset
    path = (ds.instruction_path or ds.labeled_path) if mode == "generate" else ds.labeled_path
    if path is None:
        key = "dataset.instruction_path" if mode == "generate" else "dataset.labeled_path"
        raise UserError(f"`{key}` is not set: point it at a JSON, JSONL or Parquet dataset file.")
    return path


def load_samples(
    config: Config, tokenizer: Any, *, mode: Literal["score", "generate"]
) -> tuple[list[TokenizedSample], DataStats]:
    """Read, validate and tokenize the whole dataset before anything is written."""
    path = dataset_path(config, mode)
    renderer = ChatRenderer(tokenizer, read_template(config.dataset.template), config.dataset.reasoning)
    max_len = config.distillation.max_seq_length
    stats = DataStats()
    samples: list[TokenizedSample] = []
    seen: dict[str, int] = {}
    for index, (where, record) in enumerate(read_records(path)):
        stats.records += 1
        sample_id, messages = to_messages(record, index, where, require_response=(mode == "score"))
        if sample_id in seen:
            raise UserError(f"{where}: sample id {sample_id!r} repeats record {seen[sample_id]}; ids must be unique.")
        seen[sample_id] = index
        if mode == "generate":
            sample = _tokenize_prompt(renderer, messages, sample_id, where)
            if len(sample.input_ids) >= max_len:
                stats.dropped_prompt_too_long += 1
                stats.skipped_ids.append(sample_id)
                continue
        else:
            if not any(m["content"].strip() for m in messages if m["role"] == "assistant"):
                stats.skipped_empty_response += 1
                stats.skipped_ids.append(sample_id)
                continue
            sample = tokenize_conversation(renderer, messages, sample_id, where)
            if sample.positions[0] >= max_len:
                stats.dropped_prompt_too_long += 1
                stats.skipped_ids.append(sample_id)
                continue
            if len(sample.input_ids) > max_len:
                stats.truncated_response += 1
                sample.input_ids = sample.input_ids[:max_len]
                sample.positions = [t for t in sample.positions if t < max_len]
        samples.append(sample)
        stats.samples += 1
        stats.tokens += len(sample.input_ids)
        stats.response_tokens += len(sample.positions)
    if not samples:
        raise UserError(f"{path}: no usable samples ({stats.records} records; see the counts: {stats.to_dict()}).")
    return samples, stats


def read_records(path: Path) -> Iterator[tuple[str, dict]]:
    """Yield (`file:line`, `file[index]` or `file:row N`, record) from a JSON array, JSONL or Parquet file."""
    if _is_parquet(path):
        yield from _read_parquet(path)
        return
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"Dataset file {path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"Dataset file {path} cannot be read: {exc}.") from None
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno}).") from None
        for i, record in enumerate(records):
            yield f"{path}[{i}]", _as_object(record, f"{path}[{i}]")
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno}).") from None
        yield f"{path}:{lineno}", _as_object(record, f"{path}:{lineno}")


def to_messages(record: dict, index: int, where: str, *, require_response: bool) -> tuple[str, list[Message]]:
    """Normalize any accepted record shape to (sample_id, chat messages)."""
    sample_id = str(record["id"]) if record.get("id") is not None else str(index)
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise UserError(f"{where}: `messages` must be a non-empty list of {{role, content}} objects.")
        for j, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise UserError(
                    f"{where}: messages[{j}] must be {{\"role\": one of {list(ROLES)}, \"content\": a string}}, "
                    f"got {json.dumps(m)[:120]}."
                )
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        if require_response and not any(m["role"] == "assistant" for m in messages):
            raise UserError(f"{where}: the conversation has no assistant turn to learn from.")
        return sample_id, messages
    if "instruction" in record:
        user = _field(record, "instruction", where)
        extra = record.get("input")
        if extra:
            user = f"{user}\n{_field(record, 'input', where)}"
        return sample_id, _pair(user, record, "output", where, require_response)
    if "prompt" in record:
        return sample_id, _pair(_field(record, "prompt", where), record, "response", where, require_response)
    raise UserError(
        f"{where}: record {index} has none of the known shapes (fields: {sorted(record)}). Use "
        '{"instruction", "input"?, "output"}, {"messages": [...]} or {"prompt", "response"}.'
    )


def tokenize_conversation(renderer: ChatRenderer, messages: list[Message], sample_id: str, where: str):
    """Token ids of the whole conversation plus the indices of every assistant turn's tokens."""
    input_ids, positions = renderer.tokenize(messages, where)
    if not positions:
        raise UserError(f"{where}: no response tokens after tokenization; is the response empty?")
    return TokenizedSample(sample_id, input_ids, positions)


def prompt_messages(messages: list[Message]) -> list[Message]:
    """The conversation a generate-mode teacher is prompted with: its trailing assistant turns dropped
    (the teacher writes the final response itself)."""
    while messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return messages


def _tokenize_prompt(renderer: ChatRenderer, messages: list[Message], sample_id: str, where: str):
    messages = prompt_messages(messages)
    if not messages:
        raise UserError(f"{where}: nothing to prompt the teacher with (only assistant turns).")
    text = renderer.render(messages, add_generation_prompt=True, where=where)
    return TokenizedSample(sample_id, list(renderer.tokenizer(text, add_special_tokens=False)["input_ids"]), [])


def read_template(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"`dataset.template` {path} cannot be read: {exc}.") from None


def dataset_identity(config: Config, mode: str, tokenizer: Any) -> dict[str, Any]:
    """What the cache records about its input: which file, which content, which rendering."""
    path = dataset_path(config, mode)
    template = read_template(config.dataset.template) or getattr(tokenizer, "chat_template", None) or ""
    return {
        "path": str(path),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "template_sha256": hashlib.sha256(template.encode()).hexdigest(),
        "reasoning": config.dataset.reasoning,
        "max_seq_length": config.distillation.max_seq_length,
    }


def _is_parquet(path: Path) -> bool:
    if path.suffix.lower() in (".parquet", ".pq"):
        return True
    try:
        with path.open("rb") as f:
            return f.read(4) == b"PAR1"
    except OSError:
        return False  # read_records reports it


def _read_parquet(path: Path) -> Iterator[tuple[str, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        row = 0
        for batch in batches:
            for record in batch.to_pylist():
                # Columns a record lacks come back as null: drop them, as if the key were absent.
                yield f"{path}:row {row}", {k: v for k, v in record.items() if v is not None}
                row += 1
    except FileNotFoundError:
        raise UserError(f"Dataset file {path} does not exist.") from None
    except (OSError, pa.ArrowException) as exc:
        raise UserError(f"Dataset file {path} cannot be read as Parquet: {exc}.") from None


def _pair(user: str, record: dict, key: str, where: str, require_response: bool) -> list[Message]:
    messages = [{"role": "user", "content": user}]
    if key in record and record[key] is not None:
        messages.append({"role": "assistant", "content": _field(record, key, where)})
    elif require_response:
        raise UserError(f"{where}: the record has no `{key}` (fields: {sorted(record)}).")
    return messages


def _field(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise UserError(f"{where}: `{key}` must be a string, got {type(value).__name__}.")
    return value


def _as_object(record: Any, where: str) -> dict:
    if not isinstance(record, dict):
        raise UserError(f"{where}: each record must be a JSON object, got {type(record).__name__}.")
    return record
