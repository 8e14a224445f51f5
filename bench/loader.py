"""LogitCacheReader streaming: peak RSS for a cache and for one 10x larger, and decode throughput.

Two caches (k = 64) are written from the toy bench teacher's top-k over held-out windows (each
sample a window with a random-length response; the larger cache repeats the windows under other
sample ids). Each cache is then streamed for one shuffled epoch in its own subprocess, so the peak
RSS (VmHWM) is that stream's alone. Goal: the 10x cache's peak RSS within 10% of the small
one's. Throughput is decoded samples and response tokens per second of this process's CPU time.

    python bench/loader.py                     # 300 and 3000 samples
    python bench/loader.py --stream DIR        # stream one cache and print JSON (what each subprocess runs)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

K = 64
SHUFFLE_BUFFER = 256


def memory_mb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process. Not ru_maxrss: Linux carries that over from the
    parent across fork + exec, so a subprocess would report the teacher-loading parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def stream(cache_dir: Path) -> dict[str, float]:
    """One shuffled epoch; RSS before (imports, manifest) and peak, CPU-time throughput."""
    from pipeline.cache import LogitCacheReader

    reader = LogitCacheReader(cache_dir)
    rss_before = memory_mb("VmRSS")
    samples = tokens = 0
    start, wall = time.process_time(), time.perf_counter()
    for sample in reader.iter_samples(shuffle=True, seed=0, shuffle_buffer=SHUFFLE_BUFFER):
        samples += 1
        tokens += sample.positions.numel()
    cpu = time.process_time() - start
    return {
        "samples": samples,
        "response_tokens": tokens,
        "cache_bytes": reader.manifest.num_bytes,
        "decoded_bytes": tokens * K * (8 + 4) + tokens * 8,  # int64 ids + float32 log-probs, target, tail
        "rss_before_mb": rss_before,
        "peak_rss_mb": memory_mb("VmHWM"),
        "samples_per_s": samples / cpu,
        "tokens_per_s": tokens / cpu,
        "wall_s": time.perf_counter() - wall,
    }


def build_caches(root: Path, sizes: list[int], windows: int, seq_len: int) -> list[Path]:
    """Caches of `sizes` samples from the toy bench teacher's top-k (windows reused across samples)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from codec import teacher_topk

    from pipeline.cache import LogitCacheWriter
    from pipeline.records import TeacherTopK
    from pipeline.toy.models import ensure_toy_assets

    assets = ensure_toy_assets(Path(".assets/toy"), profile="bench")
    data = teacher_topk(assets.teacher_dir, windows, seq_len + 1, K)
    rng = np.random.default_rng(0)
    identity = {"teacher": {"path": str(assets.teacher_dir)}, "tokenizer": {"vocab_size": 8192}, "k": K}
    caches = []
    for size in sizes:
        path = root / f"cache-{size}"
        start = time.perf_counter()
        with LogitCacheWriter(path, identity) as writer:
            for i in range(size):
                w = i % windows
                response = int(rng.integers(32, seq_len))  # the last `response` positions
                rows = slice(seq_len - response, seq_len)
                writer.add(
                    TeacherTopK(
                        sample_id=f"sample-{i:07d}",
                        input_ids=rng.integers(0, 8192, seq_len + 1).astype(np.int32),
                        positions=np.arange(seq_len - response + 1, seq_len + 1, dtype=np.int32),
                        topk_ids=data["ids"][w, rows],
                        topk_logprobs=data["lps"][w, rows],
                        target_logprobs=data["target"][w, rows],
                        tail_logmass=data["tails"][w, rows, K - 1],
                    )
                )
            writer.close()
        print(f"wrote {path} ({size} samples) in {time.perf_counter() - start:.1f}s", flush=True)
        caches.append(path)
    return caches


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stream", type=Path, help="stream this cache and print JSON (subprocess mode)")
    parser.add_argument("--samples", type=int, default=300, help="size of the small cache (the large is 10x)")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args(argv)
    if args.stream:
        print(json.dumps(stream(args.stream)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        caches = build_caches(Path(tmp), [args.samples, 10 * args.samples], args.windows, args.seq_len)
        results = []
        for cache in caches:
            out = subprocess.run(
                [sys.executable, __file__, "--stream", str(cache)], check=True, capture_output=True, text=True
            )
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(
        f"{'samples':>8} {'cache MB':>9} {'decoded MB':>10} {'RSS start MB':>12} {'peak RSS MB':>11} "
        f"{'samples/s':>10} {'tokens/s':>10}"
    )
    for r in results:
        print(
            f"{r['samples']:>8} {r['cache_bytes'] / 2**20:>9.1f} {r['decoded_bytes'] / 2**20:>10.1f} "
            f"{r['rss_before_mb']:>12.0f} {r['peak_rss_mb']:>11.0f} {r['samples_per_s']:>10,.0f} "
            f"{r['tokens_per_s']:>10,.0f}"
        )
    small, large = results
    ratio = large["peak_rss_mb"] / small["peak_rss_mb"]
    growth = [r["peak_rss_mb"] - r["rss_before_mb"] for r in results]
    print(
        f"peak RSS, 10x cache / cache: {ratio:.3f} (peak {growth[0]:.0f} MB vs {growth[1]:.0f} MB above "
        "the RSS after imports and manifest)"
    )
    ok = ratio <= 1.10
    print(f"goal peak RSS of the 10x cache within 10%: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
