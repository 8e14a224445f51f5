"""`pipeline inspect CACHE_DIR [--json] [--verify]`: what a logit cache holds, and whether it is intact."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.cache import LogitCacheReader, load_manifest
from pipeline.errors import UserError


def summarize(cache_dir: Path) -> dict[str, Any]:
    """The facts `run` prints, as one JSON-ready dict."""
    m = load_manifest(cache_dir)
    entries = m.num_response_tokens * m.k
    return {
        "cache_dir": str(cache_dir),
        "format_version": m.format_version,
        "complete": m.is_complete,
        "samples": m.num_samples,
        "tokens": m.num_tokens,
        "response_tokens": m.num_response_tokens,
        "k": m.k,
        "bytes": m.num_bytes,
        "bytes_per_token": m.num_bytes / m.num_tokens if m.num_tokens else None,
        "bytes_per_response_token": m.num_bytes / m.num_response_tokens if m.num_response_tokens else None,
        "bytes_per_topk_entry": m.num_bytes / entries if entries else None,
        "shards": len(m.shards),
        "teacher": m.identity.get("teacher"),
        "tokenizer": m.identity.get("tokenizer"),
        "codec": m.identity.get("codec"),
        "dataset": m.identity.get("dataset"),
        "mode": m.identity.get("mode"),
        "sampling": m.identity.get("sampling"),
        "stats": m.stats,
        "parts": {
            w: {"complete": p.complete, "shards": len(p.shards), "samples": sum(s.rows for s in p.shards)}
            for w, p in sorted(m.parts.items())
        },
        "missing_parts": m.missing_parts,
    }


def _fmt(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items()) or "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def _text(info: dict[str, Any]) -> str:
    lines = [
        f"cache            {info['cache_dir']} (format {info['format_version']}, "
        f"{'complete' if info['complete'] else 'INCOMPLETE'})",
        f"samples          {info['samples']:,}",
        f"tokens           {info['tokens']:,} ({info['response_tokens']:,} response tokens)",
        f"k                {info['k']}",
        f"size             {info['bytes']:,} bytes in {info['shards']} shards: "
        f"{_fmt(info['bytes_per_token'])} B/token, "
        f"{_fmt(info['bytes_per_response_token'])} B/response token, "
        f"{_fmt(info['bytes_per_topk_entry'])} B/top-k entry",
    ]
    for key in ("teacher", "tokenizer", "codec", "dataset", "mode", "sampling", "stats"):
        lines.append(f"{key:<16} {_fmt(info[key])}")
    for writer, part in info["parts"].items():
        state = "complete" if part["complete"] else "in progress or interrupted"
        lines.append(f"part {writer:<11} {state}: {part['samples']:,} samples in {part['shards']} shards")
    lines += [f"part {writer:<11} missing" for writer in info["missing_parts"]]
    return "\n".join(lines)


def run(cache_dir: Path, *, as_json: bool, verify: bool) -> int:
    """Print the summary; with `verify`, hash every shard. Returns 0, or 2 when verification fails."""
    info = summarize(Path(cache_dir))
    problem = None
    if verify:
        try:
            LogitCacheReader(cache_dir, verify="all", allow_incomplete=True)
        except UserError as exc:
            problem = str(exc)
        info["verified"] = {"ok": problem is None, "problems": problem}
    if as_json:
        print(json.dumps(info, indent=2))
    else:
        print(_text(info))
        if verify:
            print(f"verify           {'all sha256 checksums match' if problem is None else 'FAILED'}")
            if problem:
                print(problem)
    return 0 if problem is None else 2
