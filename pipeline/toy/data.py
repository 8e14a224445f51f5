"""Local text for the toy models: Python standard library sources, split into disjoint subsets.

Nothing here downloads anything: the corpus is the `.py` files of the running interpreter's
standard library, so tests, benchmarks and the demo work offline and deterministically (for a
given Python version).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import sysconfig
from functools import lru_cache
from pathlib import Path

SPLITS = ("teacher", "student", "heldout")
# Buckets of sha1(relative path) % 10: 70% teacher, 20% student, 10% held out.
_SPLIT_BUCKETS = {"teacher": range(0, 7), "student": range(7, 9), "heldout": range(9, 10)}
# Test suites, third-party packages, bytecode and the codec tables (repetitive data, not code).
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "encodings"}
_MAX_FILE_BYTES = 200_000  # generated files like pydoc_data/topics.py would dominate a split
# Byte-level BPE cost follows UTF-8 bytes (non-ASCII text costs more tokens than its characters).
_BYTES_PER_TOKEN = 3.5  # rough figure for code under the toy BPE; only used to size records
_PROMPT_BYTES = (80, 1200)
_MAX_PROMPT_BYTES = 1500  # bounds the overshoot of the last whole line


@lru_cache(maxsize=1)
def _stdlib_files() -> tuple[tuple[str, str], ...]:
    """(relative posix path, text) of every usable stdlib source file, sorted by path, no duplicate texts."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files, seen = [], set()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in _SKIP_DIRS or part.startswith("test_") for part in rel.parts):
            continue
        if path.stat().st_size > _MAX_FILE_BYTES:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        if text.strip() and text not in seen:  # a few stub files are identical; splits must stay disjoint
            seen.add(text)
            files.append((rel.as_posix(), text))
    return tuple(files)


def _split_of(rel_path: str) -> str:
    bucket = hashlib.sha1(rel_path.encode()).digest()[0] % 10
    return next(name for name, buckets in _SPLIT_BUCKETS.items() if bucket in buckets)


def local_corpus(split: str = "teacher", max_chars: int = 4_000_000) -> list[str]:
    """Stdlib source files of one split in path order, at most `max_chars` (the last one cut at a line end).

    The splits are disjoint sets of files, so a student pre-trained on "student" has seen other
    text than the teacher, and "heldout" is unseen by both.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    texts: list[str] = []
    total = 0
    for rel, text in _stdlib_files():
        if _split_of(rel) != split:
            continue
        if total + len(text) > max_chars:
            head = text[: text.rfind("\n", 0, max_chars - total) + 1]  # fill the budget with whole lines
            texts += [head] if head.strip() else []
            break
        texts.append(text)
        total += len(text)
    return texts


def _take_lines(lines: list[str], start: int, target_bytes: int) -> tuple[str, int]:
    """Whole lines from `start` until at least `target_bytes` of UTF-8; returns (text, next index)."""
    end, size = start, 0
    while end < len(lines) and size < target_bytes:
        size += len(lines[end].encode())
        end += 1
    return "".join(lines[start:end]), end


def _log_uniform(rng: random.Random, lo: float, hi: float) -> int:
    return int(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def write_instruction_dataset(
    path: Path,
    n: int,
    *,
    split: str = "heldout",
    seed: int = 0,
    fmt: str = "jsonl",
    response_tokens: tuple[int, int] = (16, 200),
) -> Path:
    """Write `n` EasyDistill-shaped records: continue a snippet of stdlib code with the lines that follow.

    Prompt and response lengths are drawn log-uniformly (responses within `response_tokens`,
    approximated from UTF-8 bytes), so a dataset holds both short and long samples.
    `fmt` is "jsonl" (one record a line) or "json" (one list).
    """
    if fmt not in ("jsonl", "json"):
        raise ValueError(f"fmt must be 'jsonl' or 'json', got {fmt!r}")
    rng = random.Random(seed)
    # Files long enough to hold a prompt and a long response.
    sources = [text.splitlines(keepends=True) for text in local_corpus(split, max_chars=10**9)]
    sources = [lines for lines in sources if len(lines) >= 80]
    lo, hi = (t * _BYTES_PER_TOKEN for t in response_tokens)
    records = []
    while len(records) < n:
        lines = rng.choice(sources)
        start = rng.randrange(len(lines) - 40)
        prompt, cut = _take_lines(lines, start, _log_uniform(rng, *_PROMPT_BYTES))
        response, _ = _take_lines(lines, cut, _log_uniform(rng, lo, hi))
        too_long = len(prompt.encode()) > _MAX_PROMPT_BYTES or len(response.encode()) > hi
        if too_long or not prompt.strip() or not response.strip():
            continue  # a long last line would overshoot the length range; blank snippets teach nothing
        records.append(
            {
                "id": f"{split}-{seed}-{len(records):06d}",
                "instruction": "Continue this Python code.",
                "input": prompt,
                "output": response,
            }
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        if fmt == "json":
            json.dump(records, f, ensure_ascii=False, indent=1)
        else:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return path
