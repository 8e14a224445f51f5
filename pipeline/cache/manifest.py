"""The cache directory's bookkeeping: per-writer fragments, the merged manifest, atomic file writes.

Layout of a cache directory::

    manifest.json                        merged view of all parts (for people and plain tools)
    parts/{writer_id}.json               one fragment per writer: identity, shards, completion, stats
    shard-{writer_id}-{seq:05d}.parquet  immutable shards, named by the writer that wrote them
    quarantine/                          orphan shards that failed verification on resume

Each writer rewrites only its own fragment (temp file + fsync + rename), so writers on different
machines sharing one directory never lose each other's entries; `manifest.json` is rewritten the
same way after every shard from all fragments and may lag behind a concurrent writer, which is why
`load_manifest` merges the fragments (it falls back to `manifest.json` only when `parts/` is absent,
e.g. a copy made with plain tools).

A fragment::

    {"format_version": 1, "writer_id": "part-0-of-2", "identity": {...}, "complete": false,
     "stats": {"dataset": {"truncated_response": 3, ...}, "part_samples": 12},
     "shards": [{"file": ..., "rows": ..., "tokens": ..., "response_tokens": ..., "bytes": ...,
                 "sha256": ...}, ...]}

`identity` is the caller's dict (teacher, tokenizer, k, dataset, mode, sampling) plus
"format_version" and "codec" (name and parameters).
"""

from __future__ import annotations

import json
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import UserError

# Format 1: top-k caches (unchanged since the first release); format 2: caches with a sampled tail,
# whose shards add the `tail_samples` column. Readers take both.
TOPK_FORMAT_VERSION = 1
SAMPLED_FORMAT_VERSION = 2
FORMAT_VERSION = TOPK_FORMAT_VERSION
READABLE_FORMAT_VERSIONS = (TOPK_FORMAT_VERSION, SAMPLED_FORMAT_VERSION)
MANIFEST = "manifest.json"
PARTS_DIR = "parts"
QUARANTINE_DIR = "quarantine"
WRITER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_PART_OF = re.compile(r"part-(\d+)-of-(\d+)")


def shard_name(writer_id: str, seq: int) -> str:
    return f"shard-{writer_id}-{seq:05d}.parquet"


def shard_seq(writer_id: str, file_name: str) -> int | None:
    """The sequence number of `file_name` if `writer_id` wrote it, else None."""
    match = re.fullmatch(rf"shard-{re.escape(writer_id)}-(\d{{5,}})\.parquet", file_name)
    return int(match.group(1)) if match else None


@dataclass
class ShardEntry:
    file: str
    rows: int
    tokens: int
    response_tokens: int
    bytes: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class PartState:
    writer_id: str
    complete: bool = False
    stats: dict[str, Any] = field(default_factory=dict)
    shards: list[ShardEntry] = field(default_factory=list)

    def fragment(self, identity: dict[str, Any]) -> dict[str, Any]:
        return {
            "format_version": identity["format_version"],
            "writer_id": self.writer_id,
            "identity": identity,
            "complete": self.complete,
            "stats": self.stats,
            "shards": [s.to_json() for s in self.shards],
        }


@dataclass
class Manifest:
    identity: dict[str, Any]
    parts: dict[str, PartState]

    @property
    def shards(self) -> list[ShardEntry]:
        return sorted((s for p in self.parts.values() for s in p.shards), key=lambda s: s.file)

    @property
    def format_version(self) -> int:
        return self.identity.get("format_version", -1)

    @property
    def k(self) -> int:
        return int(self.identity["k"])

    @property
    def tail_draws(self) -> int:
        """U, the ids drawn per position from the teacher's tail; 0 for a top-k cache."""
        return int((self.identity.get("tail_samples") or {}).get("draws", 0))

    @property
    def kind(self) -> str:
        """"top-k", "hybrid" (exact top-k + sampled tail) or "sampled" (k = 0)."""
        if not self.tail_draws:
            return "top-k"
        return "hybrid" if self.k else "sampled"

    @property
    def num_samples(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def num_tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    @property
    def num_response_tokens(self) -> int:
        return sum(s.response_tokens for s in self.shards)

    @property
    def num_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    @property
    def stats(self) -> dict[str, Any]:
        """Numeric close(stats) values summed over parts; a `dataset` entry (counts over the whole dataset
        file, which every part records alike: truncation and skip counts) taken once, not summed."""
        total: dict[str, Any] = {}
        for _, part in sorted(self.parts.items()):
            for key, value in part.stats.items():
                if key == "dataset" and isinstance(value, dict):
                    total.setdefault(key, value)
                elif isinstance(value, (int, float)) and not isinstance(value, bool):
                    total[key] = total.get(key, 0) + value
        return total

    @property
    def missing_parts(self) -> list[str]:
        """Writer ids named "part-I-of-N" promise N parts; the ones not seen yet."""
        expected = {int(m.group(2)) for w in self.parts if (m := _PART_OF.fullmatch(w))}
        return [
            f"part-{i}-of-{n}"
            for n in sorted(expected)
            for i in range(n)
            if f"part-{i}-of-{n}" not in self.parts
        ]

    @property
    def is_complete(self) -> bool:
        """Every part seen has closed, and every part promised by a "part-I-of-N" id is present."""
        return bool(self.parts) and all(p.complete for p in self.parts.values()) and not self.missing_parts

    def to_json(self) -> dict[str, Any]:
        """The merged manifest.json: identity at the top level, then parts, shards and totals."""
        shard_writer = {s.file: p.writer_id for p in self.parts.values() for s in p.shards}
        return {
            **self.identity,
            "complete": self.is_complete,
            "parts": {
                w: {"complete": p.complete, "stats": p.stats, "shards": len(p.shards)}
                for w, p in sorted(self.parts.items())
            },
            "missing_parts": self.missing_parts,
            "totals": {
                "samples": self.num_samples,
                "tokens": self.num_tokens,
                "response_tokens": self.num_response_tokens,
                "bytes": self.num_bytes,
                "shards": len(self.shards),
                "stats": self.stats,
            },
            "shards": [{**s.to_json(), "writer": shard_writer[s.file]} for s in self.shards],
        }


def _parse_part(data: dict[str, Any]) -> PartState:
    return PartState(
        writer_id=data["writer_id"],
        complete=bool(data["complete"]),
        stats=dict(data.get("stats", {})),
        shards=[ShardEntry(**s) for s in data["shards"]],
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read cache manifest {path}: {exc}") from None


def read_fragments(cache_dir: Path) -> dict[str, tuple[dict[str, Any], PartState]]:
    """{writer_id: (identity, state)} of every fragment in cache_dir/parts."""
    out = {}
    for path in sorted((Path(cache_dir) / PARTS_DIR).glob("*.json")):
        data = _read_json(path)
        try:
            out[data["writer_id"]] = (data["identity"], _parse_part(data))
        except (KeyError, TypeError) as exc:
            raise UserError(f"cache manifest fragment {path} is malformed (missing {exc})") from None
    return out


def load_manifest(cache_dir: Path | str) -> Manifest:
    """Merge the writers' fragments (or read manifest.json when there are none) into one Manifest."""
    cache_dir = Path(cache_dir)
    fragments = read_fragments(cache_dir)
    if fragments:
        items = list(fragments.items())
        first_writer, (identity, _) = items[0]
        for writer_id, (other, _) in items[1:]:
            diffs = identity_diff(identity, other)
            if diffs:
                raise UserError(
                    f"cache {cache_dir}: parts {first_writer} and {writer_id} were written with different "
                    "identities: " + "; ".join(diffs)
                )
        return Manifest(identity, {w: state for w, (_, state) in fragments.items()})
    path = cache_dir / MANIFEST
    if not path.exists():
        raise UserError(
            f"{cache_dir} is not a logit cache: it has no {MANIFEST} and no {PARTS_DIR}/ fragments"
        )
    data = _read_json(path)
    try:
        identity = {
            k: v
            for k, v in data.items()
            if k not in ("complete", "parts", "missing_parts", "totals", "shards")
        }
        parts = {
            w: PartState(w, bool(p["complete"]), dict(p.get("stats", {}))) for w, p in data["parts"].items()
        }
        for s in data["shards"]:
            parts[s.pop("writer")].shards.append(ShardEntry(**s))
    except (KeyError, TypeError) as exc:
        raise UserError(f"cache manifest {path} is malformed (missing {exc})") from None
    return Manifest(identity, parts)


# Where a teacher or dataset lives is provenance, not identity: parts written on machines that mount
# the same model or data at other paths belong to the same cache (their content hashes must agree).
PROVENANCE_KEYS = frozenset({"path"})


def comparable_identity(identity: dict[str, Any]) -> dict[str, Any]:
    """The identity without provenance keys (at any depth): what two writers of one cache must share."""
    return {
        key: comparable_identity(value) if isinstance(value, dict) else value
        for key, value in identity.items()
        if key not in PROVENANCE_KEYS
    }


def identity_diff(expected: dict[str, Any], found: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable differences between two identity dicts, one entry per differing (dotted) key.

    Provenance keys (paths) are not compared."""
    diffs = []
    for key in sorted((set(expected) | set(found)) - PROVENANCE_KEYS):
        name = f"{prefix}{key}"
        a, b = expected.get(key, "<absent>"), found.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += identity_diff(a, b, f"{name}.")
        elif a != b:
            diffs.append(f"{name}: expected {a!r}, found {b!r}")
    return diffs


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so readers see the old or the new file, never a partial one."""
    # A random name: writers on other machines (or containers, where every pid may be 1) share the folder.
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    with open(tmp, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename durable (the directory entry itself must reach the disk)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_fragment(cache_dir: Path, identity: dict[str, Any], part: PartState) -> None:
    """Rewrite this writer's fragment, then the merged manifest.json from all fragments."""
    cache_dir = Path(cache_dir)
    (cache_dir / PARTS_DIR).mkdir(exist_ok=True)
    write_atomic(cache_dir / PARTS_DIR / f"{part.writer_id}.json", _dump(part.fragment(identity)))
    write_atomic(cache_dir / MANIFEST, _dump(load_manifest(cache_dir).to_json()))


def _dump(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=1, sort_keys=False) + "\n").encode()
