"""Loading tokenizers, fingerprinting them and the models, so caches can prove what produced them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pipeline.config import looks_like_hub_id
from pipeline.errors import UserError


def check_model_path(path: Path | str, role: str) -> str:
    """A local model directory, or a hub id left for transformers/vLLM to fetch; else a UserError."""
    text = str(path)
    if Path(text).is_dir():
        if not (Path(text) / "config.json").exists():
            raise UserError(f"{role} model directory {text} has no config.json: is it a model checkout?")
        return text
    if Path(text).exists():
        raise UserError(f"{role} model path {text} is a file; point it at the model's directory.")
    if looks_like_hub_id(text):
        return text
    raise UserError(f"{role} model directory {text} does not exist. Check `models.{role}` in the config.")


def load_tokenizer(path: Path | str, role: str = "teacher") -> Any:
    from transformers import AutoTokenizer

    source = check_model_path(path, role)
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise UserError(f"Cannot load the {role} tokenizer from {source}: {exc}") from None


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """sha256 over the token->id map and the special tokens: equal hashes mean identical token ids."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    special = {name: str(value) for name, value in sorted(tokenizer.special_tokens_map.items())}
    digest = hashlib.sha256()
    digest.update(json.dumps(vocab, ensure_ascii=False).encode())
    digest.update(json.dumps(special, ensure_ascii=False).encode())
    return {"hash": digest.hexdigest(), "vocab_size": len(tokenizer)}


def check_same_vocab(reference: Any, reference_name: str, other: Any, other_name: str) -> None:
    """Fail with the first differing tokens unless every token of `reference` has the same id in `other`.

    `other` may hold extra tokens beyond the reference's (a padded vocabulary); ids of shared tokens
    must agree, because the cache stores ids, not strings.
    """
    ref_vocab, other_vocab = reference.get_vocab(), other.get_vocab()
    diffs = [
        f"{token!r}: {ref_id} in {reference_name}, {other_vocab.get(token, 'missing')} in {other_name}"
        for token, ref_id in sorted(ref_vocab.items(), key=lambda item: item[1])
        if other_vocab.get(token) != ref_id
    ]
    if diffs:
        raise UserError(
            f"The tokenizers of {reference_name} and {other_name} map tokens to different ids "
            f"({len(diffs)} differ), so a cache of one cannot teach the other token by token (to distil "
            "across tokenizers, set `distillation.cross_tokenizer`; see the README). First differences: "
            + "; ".join(diffs[:5])
        )


def check_cache_tokenizer(cache_dir: Path | str, identity: dict[str, Any], tokenizer: Any) -> None:
    """A cache's token ids must mean the same tokens to this model: equal tokenizer hashes, or (as
    gen-logits accepts) the cache's tokenizer's vocabulary contained id for id in this one's.

    The cache's tokenizer is the one recorded as `tokenizer.path` (the first teacher's, whose ids every
    teacher's cache holds), else the cache's own teacher.
    """
    found = identity.get("tokenizer", {})
    fingerprint = tokenizer_fingerprint(tokenizer)
    if found.get("hash") == fingerprint["hash"]:
        return
    source = str(found.get("path") or identity.get("teacher", {}).get("path"))
    if Path(source).is_dir():  # the hash also covers special-token names: compare the vocabularies
        recorded = load_tokenizer(source, role="teacher")
        if tokenizer_fingerprint(recorded)["hash"] == found.get("hash"):
            check_same_vocab(recorded, source, tokenizer, "the student")
            return
    raise UserError(
        f"The cache {cache_dir} was made with a different tokenizer than the student's "
        f"(vocabulary {found.get('vocab_size')} vs {fingerprint['vocab_size']} tokens, hash "
        f"{str(found.get('hash'))[:12]} vs {fingerprint['hash'][:12]}): its token ids would mean other "
        "tokens to the student. Use a student that shares the teacher's tokenizer, or distil across "
        "tokenizers with `distillation.cross_tokenizer` (chunk, chunk+shared or uld; see the README)."
    )


def shares_cache_tokenizer(cache_dir: Path | str, identity: dict[str, Any], tokenizer: Any) -> bool:
    """Whether the cache's token ids mean the same tokens to this model (check_cache_tokenizer passes)."""
    try:
        check_cache_tokenizer(cache_dir, identity, tokenizer)
    except UserError:
        return False
    return True


def model_identity(model_dir: Path | str) -> dict[str, Any]:
    """Path, dtype and a hash of config.json plus every weight file's size and first and last MiB.

    Sampling the weights keeps this cheap for a 100 GB teacher, yet a retrained model (same shapes, same
    sizes) hashes differently; a copy of the same weights on another machine hashes the same.
    """
    path = Path(model_dir)
    digest = hashlib.sha256()
    dtype = None
    if path.is_dir():
        config_bytes = (path / "config.json").read_bytes()
        digest.update(config_bytes)
        config = json.loads(config_bytes)
        dtype = config.get("torch_dtype") or config.get("dtype")
        for weight in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
            size = weight.stat().st_size
            digest.update(f"{weight.name}:{size}".encode())
            with weight.open("rb") as f:
                digest.update(f.read(_SAMPLE_BYTES))
                f.seek(max(0, size - _SAMPLE_BYTES))
                digest.update(f.read(_SAMPLE_BYTES))
    else:
        digest.update(str(model_dir).encode())  # a hub id: the name is all we know before loading
    return {"path": str(model_dir), "hash": digest.hexdigest(), "dtype": dtype}


_SAMPLE_BYTES = 1 << 20
