"""`make demo`: the whole pipeline on a small built-in example, on CPU, with nothing from a model hub.

Builds (once, then reuses) a tokenizer trained on the Python standard library's sources, a small
teacher pre-trained for a few minutes and a smaller student; writes an instruction dataset; then
runs the real CLI: gen-logits (vLLM) -> eval (student before) -> train-student (LoRA) -> merge ->
eval (student after), and prints a table.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # pipeline/toy/demo.py -> the repository
CONFIG = REPO / "configs" / "demo.json"
ASSETS = REPO / ".assets"
DEMO = ASSETS / "demo"
TRAIN_SAMPLES, EVAL_SAMPLES = 384, 64


def run_stage(name: str, *args: str, timings: dict[str, float], capture_json: bool = False) -> dict | None:
    """Run one `pipeline` command as a user would, stream its output, and time it."""
    command = [sys.executable, "-m", "pipeline.cli", *args]
    print(f"\n=== {name}: pipeline {' '.join(args)}", flush=True)
    start = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE if capture_json else None, text=True)
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"demo: `pipeline {args[0]}` failed with exit code {result.returncode}")
    return json.loads(result.stdout) if capture_json else None


def _overwrite_if_stale(cache_dir: Path, teacher_dir: Path) -> list[str]:
    """["--overwrite"] when a cache left by an earlier demo came from another teacher build, codec or
    target layout (k, tail samples)."""
    from pipeline.cache.codec import TopKCodec
    from pipeline.config import load_config
    from pipeline.models import model_identity

    manifest = cache_dir / "manifest.json"
    if not manifest.exists():
        return []
    recorded = json.loads(manifest.read_text())
    inference = load_config(CONFIG).inference
    same_teacher = recorded.get("teacher", {}).get("hash") == model_identity(teacher_dir)["hash"]
    same_codec = recorded.get("codec") == TopKCodec().params()
    same_layout = recorded.get("k") == inference.top_logits_num and (recorded.get("tail_samples") or {}).get(
        "draws", 0
    ) == inference.tail_samples
    return [] if same_teacher and same_codec and same_layout else ["--overwrite"]


def main() -> int:
    from pipeline.toy.models import ensure_toy_assets, write_instruction_dataset

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    timings: dict[str, float] = {}
    start = time.perf_counter()
    assets = ensure_toy_assets(ASSETS / "toy", profile="demo")
    timings["build models (cached)"] = time.perf_counter() - start

    data = DEMO / "data"
    data.mkdir(parents=True, exist_ok=True)
    train, held_out = data / "train.jsonl", data / "eval.jsonl"
    write_instruction_dataset(train, TRAIN_SAMPLES, split="teacher", seed=0)
    write_instruction_dataset(held_out, EVAL_SAMPLES, split="heldout", seed=1)

    runs = DEMO / "runs"
    eval_cache = runs / "cache_eval"
    adapter = runs / "student_lora"
    merged = runs / "student_merged"
    config = ["--config", str(CONFIG)]
    # A finished cache is reused (gen-logits resumes or does nothing); one from an older teacher or codec is redone.
    run_stage("gen-logits", "gen-logits", *config, *_overwrite_if_stale(runs / "cache_train", assets.teacher_dir),
              timings=timings)
    run_stage("gen-logits", "gen-logits", *config, "--set", f"dataset.labeled_path={held_out}",
              "--set", f"dataset.logits_path={eval_cache}", *_overwrite_if_stale(eval_cache, assets.teacher_dir),
              timings=timings)
    cache_info = run_stage("inspect", "inspect", str(runs / "cache_train"), "--json", timings=timings,
                           capture_json=True)
    before = run_stage("eval (before)", "eval", "--model", str(assets.student_dir), "--cache", str(eval_cache),
                       "--json", timings=timings, capture_json=True)
    for previous in (adapter, merged):  # each demo run trains a fresh student
        shutil.rmtree(previous, ignore_errors=True)
    run_stage("train-student", "train-student", *config, timings=timings)
    run_stage("merge", "merge", "--base", str(assets.student_dir), "--adapter", str(adapter),
              "--output", str(merged), timings=timings)
    after = run_stage("eval (after)", "eval", "--model", str(merged), "--cache", str(eval_cache), "--json",
                      timings=timings, capture_json=True)
    print_summary(cache_info, before, after, timings, time.perf_counter() - start)
    return 0


def print_summary(cache: dict, before: dict, after: dict, timings: dict[str, float], total: float) -> None:
    print("\n=== demo summary")
    draws = (cache.get("tail_samples") or {}).get("draws", 0)
    layout = f"k={cache['k']}" + (f" + {draws} tail draws" if draws else "")
    print(f"cache: {cache['samples']} samples, {cache['response_tokens']} response tokens, {layout}, "
          f"{cache['bytes'] / 1e6:.2f} MB, {cache['bytes_per_response_token']:.1f} bytes/response token")
    coverage = cache.get("coverage")
    if coverage:  # what a top-k alone cannot carry (the briefly trained toy teacher is flat)
        k = cache["k"]
        print(f"teacher: {coverage['mass_outside_topk_mean']:.1%} of its probability mass outside its top-{k}, "
              f"actual token in its top-{k} {coverage['target_in_topk']:.1%}"
              + (f"; {coverage['unique_sampled_ids_per_position']:.1f} unique sampled tail ids per position"
                 if "unique_sampled_ids_per_position" in coverage else ""))
    rows = [("teacher KL, unbiased est.", "kl_estimate"), ("teacher KL, bucket bound", "kl"),
            ("top-1 agreement", "top1_agreement"), ("response cross-entropy", "cross_entropy")]
    print(f"\n{'held-out metric':<26}{'student before':>16}{'student after':>16}")
    for label, key in rows:
        if before.get(key) is not None:
            print(f"{label:<26}{before[key]:>16.4f}{after[key]:>16.4f}")
    print(f"\n{'stage':<26}{'wall time (s)':>16}")
    for name, seconds in timings.items():
        print(f"{name:<26}{seconds:>16.1f}")
    print(f"{'total':<26}{total:>16.1f}")


if __name__ == "__main__":
    sys.exit(main())
