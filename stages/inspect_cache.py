"""`pipeline inspect CACHE_DIR [--json] [--verify] [--sample N]`: what a logit cache holds, whether it is
intact, and how much of the teacher its top-k carries."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

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
        "kind": m.kind,
        "tail_samples": m.identity.get("tail_samples"),
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


def teacher_coverage(cache_dir: Path, samples: int) -> dict[str, Any] | None:
    """How much of the teacher the top-k carries, over the first `samples` rows (None if none).

    The probability mass outside the top-k is what no top-k loss can pass on (the `bucket` tail
    keeps only its total); where the actual next token lies outside the top-k, `target_class` adds
    it back from its cached log-prob.
    """
    reader = LogitCacheReader(cache_dir, allow_incomplete=True)
    tail, inside, target, unique = [], [], [], []
    for i, row in enumerate(reader.iter_samples(shuffle=False, seed=0)):
        if i >= samples:
            break
        targets = row.input_ids[row.positions]
        tail.append(np.exp(row.tail_logmass.double().numpy()))
        inside.append((row.topk_ids == targets[:, None]).any(1).numpy())
        target.append(row.target_logprobs.double().numpy())
        if row.sample_counts is not None:
            unique.append((row.sample_counts > 0).sum(1).numpy())
    if not tail or not sum(len(t) for t in tail):
        return None
    tail_mass, in_topk, target_lp = (np.concatenate(x) for x in (tail, inside, target))
    sampled = {"unique_sampled_ids_per_position": float(np.concatenate(unique).mean())} if unique else {}
    return {
        **sampled,
        "samples": min(samples, reader.num_samples),
        "response_tokens": int(tail_mass.size),
        "mass_outside_topk_mean": float(tail_mass.mean()),
        "mass_outside_topk_p50": float(np.percentile(tail_mass, 50)),
        "mass_outside_topk_p90": float(np.percentile(tail_mass, 90)),
        "target_in_topk": float(in_topk.mean()),
        "teacher_nll": float(-target_lp[np.isfinite(target_lp)].mean()),
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
        f"kind             {info['kind']}: exact top-{info['k']}"
        + (f" + {info['tail_samples']['draws']} ids drawn from the tail per position (seed "
           f"{info['tail_samples']['seed']})" if info["tail_samples"] else ""),
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
    cov = info.get("coverage")
    if info.get("coverage_error"):
        lines.append(f"teacher coverage could not be read: {info['coverage_error']}")
    if cov:
        lines.append(
            f"teacher coverage first {cov['samples']:,} samples ({cov['response_tokens']:,} response tokens): "
            f"mass outside the top-{info['k']} mean {cov['mass_outside_topk_mean']:.3f} "
            f"(median {cov['mass_outside_topk_p50']:.3f}, p90 {cov['mass_outside_topk_p90']:.3f}); "
            f"actual token in the top-{info['k']} {100 * cov['target_in_topk']:.1f}%; "
            f"teacher NLL {cov['teacher_nll']:.3f} nats/token"
        )
        if "unique_sampled_ids_per_position" in cov:
            lines.append(
                f"tail samples     {cov['unique_sampled_ids_per_position']:.2f} unique sampled ids per position "
                "(they carry the tail's mass unbiasedly: the loss uses r * count / draws)"
            )
    return "\n".join(lines)


def run(cache_dir: Path, *, as_json: bool, verify: bool, sample: int = 0) -> int:
    """Print the summary; with `verify`, hash every shard; with `sample` > 0, the teacher coverage of
    the first `sample` rows. Returns 0, or 2 when verification fails."""
    info = summarize(Path(cache_dir))
    if sample > 0:
        try:
            info["coverage"] = teacher_coverage(Path(cache_dir), sample)
        except UserError as exc:  # a damaged shard must not hide the summary (or --verify's report)
            info["coverage"], info["coverage_error"] = None, str(exc)
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
