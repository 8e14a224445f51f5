"""The run configuration: one typed model of the whole JSON file, validated at load time.

The file has the shape of EasyDistill's `kd_white_box.json` plus a `lora` section. Every error
names the key path (`lora.rank`), what is wrong and what is allowed; unknown keys get the closest
valid key as a suggestion. Relative paths resolve against the config file's folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence, Union

from pipeline.errors import UserError

SEVEN_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class DatasetConfig:
    labeled_path: Path | None = None  # records with responses (score mode)
    instruction_path: Path | None = None  # prompts only (generate mode)
    logits_path: Path | None = None  # the logit cache directory
    template: Path | None = None  # Jinja chat template file; None = the tokenizer's own
    # The <think>...</think> block of assistant turns: "train" it as rendered, or keep it as untrained
    # "context" (and render with enable_thinking=False, Qwen3's non-thinking generation prompt).
    reasoning: Literal["train", "context"] = "train"
    seed: int = 42


@dataclass
class ModelsConfig:
    teacher: list[Path] = field(default_factory=list)  # one path or a list of paths
    student: Path | None = None


@dataclass
class InferenceConfig:
    engine: Literal["vllm", "hf"] = "vllm"
    mode: Literal["score", "generate"] = "score"
    top_logits_num: int = 64
    # U ids drawn per response token from the teacher's distribution outside its top-k (0 = a plain
    # top-k cache): the stored counts make an unbiased estimate of the whole distribution.
    tail_samples: int = 0
    max_model_len: int | None = None
    max_new_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 42
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    enforce_eager: bool = False
    dtype: str = "auto"
    batch_size: int = 64  # samples handed to the engine per call
    rows_per_shard: int = 1024
    chunk_size: int = 256  # positions per output-head chunk when we compute top-k ourselves


@dataclass
class DistillationConfig:
    kd_ratio: float = 0.5
    distillation_type: Literal["forward_kld", "reverse_kld", "jsd", "tvd"] = "forward_kld"
    temperature: float = 1.0
    # auto: `sampled` for a cache with tail samples, else `bucket` (see pipeline.student.losses).
    tail: Literal["auto", "bucket", "renormalize", "sampled"] = "auto"
    # Where the response token lies outside the teacher's top-k, give it its own class with its cached
    # log-prob, taken out of the tail (pipeline.student.losses.with_target_class). Costs no storage.
    target_class: bool = False
    max_seq_length: int = 2048
    teacher_weights: list[float] | None = None
    chunk_size: int = 1024  # response positions per output-head chunk in the loss
    # A teacher whose tokenizer differs from the student's (pipeline.cross_tokenizer): which loss aligns
    # them. null = the tokenizers must match (same-tokenizer KD).
    cross_tokenizer: Literal["uld", "chunk", "chunk+shared"] | None = None
    chunk_temperature: float = 10.0  # tau of the chunk-likelihood loss (pipeline.cross_tokenizer.loss)


@dataclass
class LoraConfig:
    enable: bool = True
    r: int = 16
    alpha: int = 32
    target_modules: Union[list[str], Literal["all-linear"]] = field(
        default_factory=lambda: list(SEVEN_PROJECTIONS)
    )
    dropout: float = 0.05
    bias: Literal["none", "all", "lora_only"] = "none"
    save_merged_model: bool = False


@dataclass
class Config:
    job_type: str = "kd_white_box"
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    distillation: DistillationConfig = field(default_factory=DistillationConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    training: dict[str, Any] = field(default_factory=dict)  # transformers.TrainingArguments fields
    path: Path | None = None  # the file this was loaded from (not a setting)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as JSON-able data (paths as strings), loadable again by load_config."""
        out = _to_jsonable(dataclasses.asdict(self))
        out.pop("path")
        return out


SECTIONS = {f.name: f for f in dataclasses.fields(Config) if f.name != "path"}

# Range checks beyond the type: key path -> (predicate, what is allowed).
_RANGES: dict[str, tuple[typing.Callable[[Any], bool], str]] = {
    "inference.top_logits_num": (lambda v: 0 <= v <= 4096, "an integer from 0 to 4096 (0 needs tail_samples)"),
    "inference.tail_samples": (lambda v: 0 <= v <= 4096, "an integer from 0 to 4096"),
    "inference.max_new_tokens": (lambda v: v >= 1, "an integer >= 1"),
    "inference.temperature": (lambda v: v >= 0, "a number >= 0 (0 = greedy)"),
    "inference.top_p": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "inference.tensor_parallel_size": (lambda v: v >= 1, "an integer >= 1"),
    "inference.pipeline_parallel_size": (lambda v: v >= 1, "an integer >= 1"),
    "inference.gpu_memory_utilization": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "inference.batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "inference.rows_per_shard": (lambda v: v >= 1, "an integer >= 1"),
    "inference.chunk_size": (lambda v: v >= 1, "an integer >= 1"),
    "inference.max_model_len": (lambda v: v is None or v >= 2, "an integer >= 2 or null"),
    "distillation.kd_ratio": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "distillation.temperature": (lambda v: v > 0, "a number > 0"),
    "distillation.max_seq_length": (lambda v: v >= 2, "an integer >= 2"),
    "distillation.chunk_size": (lambda v: v >= 1, "an integer >= 1"),
    "distillation.chunk_temperature": (lambda v: v > 0, "a number > 0"),
    "distillation.teacher_weights": (
        lambda v: v is None or (len(v) > 0 and all(w >= 0 for w in v) and sum(v) > 0),
        "a list of non-negative numbers with a positive sum, one per teacher",
    ),
    "lora.r": (lambda v: v >= 1, "an integer >= 1"),
    "lora.alpha": (lambda v: v > 0, "a number > 0"),
    "lora.dropout": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "lora.target_modules": (lambda v: v == "all-linear" or len(v) > 0, 'a non-empty list of names or "all-linear"'),
}


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read, override (`section.key=value`, value parsed as JSON), validate and resolve a config file."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"Config file {path} does not exist.") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg}).") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the config must be a JSON object with sections {sorted(SECTIONS)}.")
    for override in overrides:
        _apply_override(raw, override)
    try:
        config = config_from_dict(raw, base_dir=path.resolve().parent)
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None
    config.path = path.resolve()
    return config


def config_from_dict(raw: dict[str, Any], base_dir: Path) -> Config:
    """Validate a config dict (no file involved); relative paths resolve against base_dir."""
    _reject_unknown(raw, list(SECTIONS), prefix="")
    values: dict[str, Any] = {}
    for name, value in raw.items():
        section_field = SECTIONS[name]
        if name == "job_type":
            values[name] = _check_type("job_type", value, str)
        elif name == "training":
            values[name] = _check_training(value, base_dir)
        else:
            values[name] = _build_section(name, section_field.default_factory, value, base_dir)
    config = Config(**values)
    _check_cross_section(config)
    return config


def _build_section(name: str, factory: Any, raw: Any, base_dir: Path) -> Any:
    if not isinstance(raw, dict):
        raise UserError(f"`{name}` must be a JSON object, got {_json_type(raw)}.")
    cls = type(factory())
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _reject_unknown(raw, list(fields), prefix=name + ".")
    kwargs = {}
    for key, value in raw.items():
        key_path = f"{name}.{key}"
        if key_path == "models.teacher" and isinstance(value, str):
            value = [value]  # one teacher may be given as a plain path
        value = _check_type(key_path, value, hints[key])
        check = _RANGES.get(key_path)
        if check and value is not None and not check[0](value):
            raise UserError(f"`{key_path}` = {json.dumps(_to_jsonable(value))} is out of range: use {check[1]}.")
        # Model paths that do not exist locally may be hub ids ("Qwen/Qwen2.5-7B-Instruct"): keep those.
        kwargs[key] = _resolve_paths(value, base_dir, keep_hub_ids=(name == "models"))
    return cls(**kwargs)


def _check_training(raw: Any, base_dir: Path) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise UserError(f"`training` must be a JSON object, got {_json_type(raw)}.")
    from transformers import TrainingArguments  # imported here: config errors should not wait on it

    valid = [f.name for f in dataclasses.fields(TrainingArguments) if f.init]
    training = dict(raw)
    if "warmup_ratio" in training and "warmup_ratio" not in valid:
        # transformers 5 folded warmup_ratio into warmup_steps (a float < 1 is a ratio); keep old configs working.
        if "warmup_steps" in training:
            raise UserError("Set `training.warmup_steps` or `training.warmup_ratio`, not both.")
        ratio = training.pop("warmup_ratio")
        if not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
            raise UserError(f"`training.warmup_ratio` = {json.dumps(ratio)} must be a number in [0, 1).")
        training["warmup_steps"] = float(ratio)
    _reject_unknown(training, valid, prefix="training.", what="a transformers.TrainingArguments field")
    for key in ("output_dir", "logging_dir"):
        if isinstance(training.get(key), str):
            training[key] = str(_resolve(training[key], base_dir))
    return training


def _check_cross_section(config: Config) -> None:
    inference = config.inference
    if inference.top_logits_num == 0 and inference.tail_samples == 0:
        raise UserError(
            "`inference.top_logits_num` is 0 and `inference.tail_samples` is 0: the cache would hold no "
            "teacher targets. Set top_logits_num >= 1, or tail_samples >= 1 for a purely sampled cache."
        )
    distillation = config.distillation
    if distillation.cross_tokenizer is not None:
        if distillation.temperature != 1:
            raise UserError(
                f"`distillation.temperature` is {distillation.temperature}, but the cross-tokenizer losses "
                "compare untempered likelihoods: set it to 1 (the chunk loss has `chunk_temperature`)."
            )
        if len(config.models.teacher) > 1:
            raise UserError(
                f"`distillation.cross_tokenizer` takes one teacher; `models.teacher` lists "
                f"{len(config.models.teacher)}. Distil from one teacher at a time."
            )
    weights = config.distillation.teacher_weights
    if weights is not None and config.models.teacher and len(weights) != len(config.models.teacher):
        raise UserError(
            f"`distillation.teacher_weights` has {len(weights)} entries but `models.teacher` lists "
            f"{len(config.models.teacher)} teachers: give one weight per teacher."
        )


def _check_type(key_path: str, value: Any, hint: Any) -> Any:
    """Return value if it matches the type hint (ints accepted for floats), else raise naming the key."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _check_type(key_path, value, option)
            except UserError:
                continue
        raise UserError(f"`{key_path}` = {json.dumps(value)} is not valid: expected {_describe(hint)}.")
    if hint is type(None):
        if value is None:
            return None
    elif origin is Literal:
        if value in typing.get_args(hint):
            return value
        allowed = " | ".join(json.dumps(a) for a in typing.get_args(hint))
        raise UserError(f"`{key_path}` = {json.dumps(value)} is not allowed: use one of {allowed}.")
    elif origin is list:
        if isinstance(value, list):
            (item_hint,) = typing.get_args(hint)
            return [_check_type(f"{key_path}[{i}]", item, item_hint) for i, item in enumerate(value)]
    elif hint is Path:
        if isinstance(value, str) and value:
            return Path(value)
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, hint):
        return value
    raise UserError(f"`{key_path}` = {json.dumps(value)} is not valid: expected {_describe(hint)}.")


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(option) for option in typing.get_args(hint))
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in typing.get_args(hint))
    if origin is list:
        item = _describe(typing.get_args(hint)[0]).removeprefix("a ").removeprefix("an ")
        return f"a list of {item}s"
    names = {type(None): "null", Path: "a path", float: "a number", int: "an integer",
             bool: "true or false", str: "a string"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


# Names people bring from PEFT's LoraConfig and other tools, mapped to ours.
_ALIASES = {"rank": "r", "lora_r": "r", "lora_rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
            "targets": "target_modules", "teachers": "teacher", "top_k": "top_logits_num", "k": "top_logits_num"}


def closest_key(key: str, valid: list[str]) -> str | None:
    if _ALIASES.get(key) in valid:
        return _ALIASES[key]
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        return close[0]
    prefixed = [v for v in valid if key.startswith(v) or v.startswith(key)]
    return prefixed[0] if prefixed else None


def _reject_unknown(raw: dict, valid: list[str], prefix: str, what: str = "a setting") -> None:
    for key in raw:
        if key not in valid:
            close = closest_key(key, valid)
            hint = f"; did you mean `{prefix}{close}`?" if close else f"; valid keys: {', '.join(valid)}."
            raise UserError(f"`{prefix}{key}` is not {what}{hint}")


def _apply_override(raw: dict, override: str) -> None:
    """`--set section.key=value`: value is JSON (`5e-4`, `true`, `["q_proj"]`), or a plain string."""
    key_path, sep, text = override.partition("=")
    if not sep or "." not in key_path:
        raise UserError(f"--set {override!r}: write it as section.key=value, e.g. --set lora.r=8.")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text  # unquoted strings such as paths are taken as they are
    section, key = key_path.split(".", 1)
    if section not in SECTIONS or section == "job_type":
        close = closest_key(section, list(SECTIONS))
        hint = f"; did you mean `{close}`?" if close else ""
        raise UserError(f"--set {override!r}: `{section}` is not a config section{hint}")
    target = raw.setdefault(section, {})
    if not isinstance(target, dict):
        raise UserError(f"--set {override!r}: `{section}` in the config file is not an object.")
    target[key] = value


def _resolve(value: str | Path, base_dir: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base_dir / path).resolve()


def _resolve_paths(value: Any, base_dir: Path, keep_hub_ids: bool = False) -> Any:
    if isinstance(value, Path):
        resolved = _resolve(value, base_dir)
        if keep_hub_ids and not resolved.exists() and looks_like_hub_id(str(value)):
            return value
        return resolved
    if isinstance(value, list):
        return [_resolve_paths(v, base_dir, keep_hub_ids) for v in value]
    return value


def looks_like_hub_id(text: str) -> bool:
    """`org/name` with no leading `.`, `/` or `~`: a model hub id rather than a local path."""
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text) is not None


def _to_jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_jsonable(v) for v in value]
    return value


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    return names.get(type(value), type(value).__name__)
