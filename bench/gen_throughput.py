"""gen-logits `score` throughput against raw vLLM prefill and the straightforward top-k capture.

One run, same machine, same teacher (the toy "bench" profile: a Qwen2 whose output head holds <= 10%
of the parameters, like a 7B-class LLM), same token sequences, same k:

  raw        vLLM prefill only: max_tokens=1, no logprobs (the head runs at the last position only)
  capture    vLLM prompt_logprobs=k, flat output: what DistillKit-style pipelines do
  pool       vLLM's pooling runner returning every token's hidden state, nothing else: the part of
             gen-logits that is vLLM's
  gen-logits our full stage with the vllm engine: hidden states, head + top-k at response positions,
             encoding and writing the cache (timed from engine ready to the last shard on disk;
             the one-time torch.compile of the top-k selection is warmed up first, like vLLM's own)
  hf         our full stage with the transformers engine (on a subset: it is the slow cross-check)

Each variant runs in its own process (vLLM's workers need a fresh start; peak memory stays separate).
Throughput counts all tokens of the sequences (prompt + response) per second.

    python bench/gen_throughput.py                     # defaults: 64 sequences x 512 tokens, k = 64
    python bench/gen_throughput.py --variant raw ...   # one variant (what the parent runs per process)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("raw+capture", "pool", "gen-logits", "hf")
sys.path.insert(0, str(ROOT))

DESIGN = """\
Design (why gen-logits is fast):
- vLLM runs the teacher as a pooling model that returns every token's final hidden state, so the
  batched, paged (and tensor-parallel) prefill stays vLLM's, but vLLM never applies the output head,
  never runs its float32 log-softmax over the vocabulary at every prompt position, and never builds
  per-position Python logprob objects (what makes `capture` slow).
- The output head (read from the checkpoint's safetensors) runs only at the rows t-1 of response
  tokens t, in chunks of rows, in the model dtype; prompt positions cost nothing beyond prefill.
- Exact top-k without torch.topk over the vocabulary (scalar code, ~3x the head matmul on CPU): the
  vocabulary is split into G strided groups; the k groups with the largest maxima hold every top-k
  logit, so two small selections (over G group maxima, then over the chosen groups' k*V/G members)
  give the exact top-k, done with NumPy's SIMD partition and sort. One fused torch.compile pass over
  the logits gives per-group maxima and exp-sums, hence log Z and the tail mass as a sum of non-top-k
  probabilities (no 1 - sum cancellation).
- On CPU, batches run one after the other (vLLM's forward already uses every core, and work beside it
  stalls vLLM's OpenMP threads); the head's chunks run in one worker thread per core with one
  intra-op thread each (no OpenMP barrier spinning when other jobs share the cores). Encoding and
  writing run in the cache writer's thread.
- Bound: raw prefill applies the head at one position per sequence, scoring at every response
  position, so scoring reaches at most ~(1 - h * response share) of raw prefill (h = head share)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variant", choices=VARIANTS, help="run one variant in this process")
    parser.add_argument("--workdir", type=Path, help="(internal) the parent's dataset and config folder")
    parser.add_argument("--assets", type=Path, default=ROOT / ".assets" / "toy")
    parser.add_argument(
        "--teacher", type=Path, help="a local teacher model dir instead of the toy bench teacher"
    )
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--seq", type=int, default=512, help="tokens per sequence (prompt + response)")
    parser.add_argument("--response-share", type=float, default=0.9, help="response tokens / all tokens")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per engine call")
    parser.add_argument("--chunk-size", type=int, default=256, help="rows per output-head chunk")
    parser.add_argument("--hf-samples", type=int, default=16, help="sequences for the slow hf engine")
    parser.add_argument("--eager", action="store_true", help="vLLM enforce_eager (no torch.compile)")
    return parser.parse_args(argv)


def build_dataset(args: argparse.Namespace, teacher_dir: Path, path: Path) -> None:
    """Records whose chat rendering is ~seq tokens, of which ~response_share are the response."""
    from transformers import AutoTokenizer

    from pipeline.toy.data import local_corpus

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    ids = tokenizer("".join(local_corpus("heldout", 2_000_000)), add_special_tokens=False)["input_ids"]
    overhead = len(
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        )
    )
    response = int(args.seq * args.response_share)
    prompt = max(1, args.seq - response - overhead)
    step = prompt + response
    with path.open("w") as f:
        for i in range(args.samples):
            start = i * step
            record = {
                "id": f"bench-{i:04d}",
                "prompt": tokenizer.decode(ids[start : start + prompt]),
                "response": tokenizer.decode(ids[start + prompt : start + step]),
            }
            f.write(json.dumps(record) + "\n")


def context_length(args: argparse.Namespace, teacher_dir: Path) -> int:
    """The engine's context: room for 4x --seq (chat-template overhead), capped at the teacher's own
    limit (vLLM refuses a max_model_len above it, e.g. 2,048 for a model with 1,024 positions)."""
    config = json.loads((teacher_dir / "config.json").read_text())
    config = config.get("text_config", config)
    keys = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length")
    limit = next((int(config[key]) for key in keys if config.get(key)), None)
    if limit is not None and limit < args.seq:
        raise SystemExit(f"--seq {args.seq} is longer than the teacher's {limit} positions: lower --seq.")
    return min(4 * args.seq, limit or 4 * args.seq)


def write_config(args: argparse.Namespace, workdir: Path, teacher_dir: Path, engine: str, cache: str) -> Path:
    raw = {
        "dataset": {"labeled_path": str(workdir / "data.jsonl"), "logits_path": str(workdir / cache)},
        "models": {"teacher": str(teacher_dir)},
        "inference": {
            "engine": engine,
            "top_logits_num": args.k,
            "dtype": args.dtype,
            "batch_size": args.batch_size,
            "chunk_size": args.chunk_size,
            "rows_per_shard": 64,
            "enforce_eager": args.eager,
            "gpu_memory_utilization": 0.3,
        },
        "distillation": {"max_seq_length": context_length(args, teacher_dir)},
    }
    path = workdir / f"config-{engine}.json"
    path.write_text(json.dumps(raw))
    return path


def run_raw_and_capture(args: argparse.Namespace, teacher_dir: Path) -> dict[str, Any]:
    """One generation engine for both baselines (they share its start)."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from pipeline.config import load_config
    from pipeline.data import load_samples

    config = load_config(args.workdir / "config-vllm.json")
    samples, _ = load_samples(config, AutoTokenizer.from_pretrained(teacher_dir), mode="score")
    prompts = [TokensPrompt(prompt_token_ids=s.input_ids) for s in samples]
    tokens = sum(len(s.input_ids) for s in samples)
    llm = LLM(
        model=str(teacher_dir),
        dtype=args.dtype,
        max_model_len=context_length(args, teacher_dir),
        max_logprobs=args.k,
        enable_prefix_caching=False,
        enforce_eager=args.eager,
        gpu_memory_utilization=0.3,
    )
    raw = SamplingParams(max_tokens=1, detokenize=False)
    capture = SamplingParams(max_tokens=1, detokenize=False, prompt_logprobs=args.k, flat_logprobs=True)
    out: dict[str, Any] = {"tokens": tokens}
    for name, params in (("raw", raw), ("capture", capture)):
        llm.generate(prompts[:4], params, use_tqdm=False)  # warm-up
        started = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        out[f"{name}_tokens_per_s"] = tokens / (time.perf_counter() - started)
    return out


def run_pool(args: argparse.Namespace, teacher_dir: Path) -> dict[str, Any]:
    """The vllm engine's hidden states alone, batch by batch as gen-logits requests them."""
    from transformers import AutoTokenizer

    from pipeline.config import load_config
    from pipeline.data import load_samples
    from pipeline.teacher.engines import make_engine

    config = load_config(args.workdir / "config-vllm.json")
    samples, _ = load_samples(config, AutoTokenizer.from_pretrained(teacher_dir), mode="score")
    batches = [samples[i : i + args.batch_size] for i in range(0, len(samples), args.batch_size)]
    with make_engine(config, teacher_dir) as engine:
        engine.hidden_states(samples[:4])  # warm-up
        started = time.perf_counter()
        for batch in batches:
            engine.hidden_states(batch)
        elapsed = time.perf_counter() - started
    return {"pool_tokens_per_s": sum(len(s.input_ids) for s in samples) / elapsed}


def run_stage(args: argparse.Namespace, teacher_dir: Path, engine: str) -> dict[str, Any]:
    import torch

    from pipeline.config import load_config
    from pipeline.teacher.topk import load_output_head, topk_from_hidden
    from stages import gen_logits

    head = load_output_head(teacher_dir)  # compile the top-k selection for this shape and dtype once
    rows = torch.zeros(args.chunk_size, head.weight.shape[1], dtype=getattr(torch, args.dtype))
    topk_from_hidden(rows, head, torch.zeros(args.chunk_size, dtype=torch.long), args.k, args.chunk_size)
    config = load_config(args.workdir / f"config-{engine}.json")
    summary = gen_logits.run(config, overwrite=True)
    teacher = summary["teachers"][0]
    return {
        "tokens": summary["tokens"],
        "response_tokens": summary["response_tokens"],
        "bytes_per_token": summary["bytes_per_token"],
        f"{engine}_tokens_per_s": teacher["tokens"] / teacher["score_s"],
    }


def child(args: argparse.Namespace) -> None:
    teacher_dir = Path(json.loads((args.workdir / "assets.json").read_text())["teacher_dir"])
    if args.variant == "raw+capture":
        result = run_raw_and_capture(args, teacher_dir)
    elif args.variant == "pool":
        result = run_pool(args, teacher_dir)
    else:
        result = run_stage(args, teacher_dir, "vllm" if args.variant == "gen-logits" else "hf")
    print("RESULT " + json.dumps(result), flush=True)


def spawn(args: argparse.Namespace, variant: str, workdir: Path) -> dict[str, Any]:
    command = [sys.executable, __file__, "--variant", variant, "--workdir", str(workdir)]
    command += [
        f"--{k.replace('_', '-')}={v}"
        for k, v in vars(args).items()
        if k not in ("variant", "workdir", "eager", "teacher")
    ]
    command += ["--eager"] if args.eager else []
    print(f"[bench] {variant} ...", flush=True)
    # vLLM on CPU: a fixed KV cache instead of a fraction of the machine's memory (ignored on GPUs).
    env = {"VLLM_CPU_KVCACHE_SPACE": "2", **os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-6000:])
        raise SystemExit(f"variant {variant} failed (exit {proc.returncode})")
    return json.loads(lines[-1][len("RESULT ") :])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.variant:
        child(args)
        return
    from pipeline.toy.models import ensure_toy_assets, parameter_counts

    teacher_dir = args.teacher or ensure_toy_assets(args.assets, profile="bench").teacher_dir
    counts = parameter_counts(teacher_dir)
    with tempfile.TemporaryDirectory(prefix="gen-bench-") as tmp:
        workdir = Path(tmp)
        (workdir / "assets.json").write_text(json.dumps({"teacher_dir": str(teacher_dir)}))
        build_dataset(args, teacher_dir, workdir / "data.jsonl")
        write_config(args, workdir, teacher_dir, "vllm", "cache-vllm")
        hf_config = write_config(args, workdir, teacher_dir, "hf", "cache-hf")
        baselines = spawn(args, "raw+capture", workdir)
        pool = spawn(args, "pool", workdir)
        ours = spawn(args, "gen-logits", workdir)
        # The hf engine on a subset of the same records.
        lines = (workdir / "data.jsonl").read_text().splitlines()[: args.hf_samples]
        (workdir / "data-hf.jsonl").write_text("\n".join(lines) + "\n")
        raw_hf = json.loads(hf_config.read_text())
        raw_hf["dataset"]["labeled_path"] = str(workdir / "data-hf.jsonl")
        hf_config.write_text(json.dumps(raw_hf))
        hf = spawn(args, "hf", workdir)
    report(args, counts, baselines, pool, ours, hf)


def report(args, counts, baselines, pool, ours, hf) -> None:
    h = counts["head_share"]
    share = ours["response_tokens"] / ours["tokens"]
    raw, capture = baselines["raw_tokens_per_s"], baselines["capture_tokens_per_s"]
    gen = ours["vllm_tokens_per_s"]
    print()
    print(
        f"teacher: {counts['num_parameters'] / 1e6:.1f}M parameters, output head {100 * h:.1f}% "
        f"(bound for scoring every position: 1 - h = {1 - h:.2f}; at this data's response share "
        f"{share:.2f}: {1 - h * share:.2f})"
    )
    print(
        f"data: {args.samples} sequences x ~{args.seq} tokens ({ours['tokens']} tokens, "
        f"{ours['response_tokens']} response tokens), k = {args.k}, dtype {args.dtype}, "
        f"{os.cpu_count()} CPU cores, vLLM {'eager' if args.eager else 'compiled'}"
    )
    rows = [
        ("raw vLLM prefill (max_tokens=1)", raw),
        ("capture: prompt_logprobs=k, flat", capture),
        ("pool: vLLM hidden states only", pool["pool_tokens_per_s"]),
        ("gen-logits (vllm engine, full path)", gen),
        (f"gen-logits (hf engine, {args.hf_samples} seq.)", hf["hf_tokens_per_s"]),
    ]
    print(f"\n{'variant':44s} {'tokens/s':>10s} {'x raw':>7s} {'x capture':>10s}")
    for name, rate in rows:
        print(f"{name:44s} {rate:10.0f} {rate / raw:7.2f} {rate / capture:10.2f}")
    print(f"\ncache: {ours['bytes_per_token']} bytes per response token")
    goal_capture, goal_raw = gen >= 3 * capture, gen >= 0.8 * raw
    bound = (1 - h * share) * raw
    note = "" if 3 * capture <= bound else f" (unreachable here: 3x capture is {3 * capture / raw:.2f}x raw)"
    print(f"goal >= 3x capture: {'MET' if goal_capture else 'NOT MET'} ({gen / capture:.2f}x){note}")
    print(f"goal >= 0.8x raw prefill: {'MET' if goal_raw else 'NOT MET'} ({gen / raw:.2f}x)")
    print()
    print(DESIGN)
    print(
        "\nJSON "
        + json.dumps(
            {
                "params": counts["num_parameters"],
                "head_share": h,
                "response_share": share,
                "raw_tokens_per_s": raw,
                "capture_tokens_per_s": capture,
                "pool_tokens_per_s": pool["pool_tokens_per_s"],
                "gen_logits_tokens_per_s": gen,
                "hf_tokens_per_s": hf["hf_tokens_per_s"],
                "x_raw": gen / raw,
                "x_capture": gen / capture,
            }
        )
    )


if __name__ == "__main__":
    main()
