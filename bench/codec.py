"""TopKCodec on a real (toy) teacher's distributions: size, distortion and speed, next to reference layouts.

The teacher is the toy "bench" model (`pipeline.toy.models`, pre-trained on stdlib code); its top-k
comes from a plain transformers forward (log_softmax, float32) over held-out text windows. For each
k: bytes per top-k entry (ids + log-probs + target + tail, stream headers included) and per token,
mean KL(original top-k+tail || decoded) per position in float64 (T=1, and T=2 for reference), max
|log-prob error|, and encode/decode speed per core (thread CPU time; decode ends in torch tensors).
References: int32 ids + float32 log-probs (8 B/entry), and EasyDistill's JSON list of {id: prob}
dicts per position (measured). Sampled-tail layouts (`inference.tail_samples`: k exact + U ids drawn
from the tail, stored as unique ids, counts and log-probs) are reported per position beside top-k.

    python bench/codec.py                      # toy bench teacher, 24 windows of 256 tokens
    python bench/codec.py --teacher DIR        # any local causal LM directory
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.cache.codec import TopKCodec, build_id_table
from pipeline.cache.tail_codec import decode_tail_samples, encode_tail_samples
from pipeline.teacher.tail_sampling import draw_tail, tail_uniforms

KS = (8, 20, 64, 128)
SAMPLED = ((0, 12), (0, 32), (8, 24), (16, 48))  # (k, U) layouts of sampled-tail caches
GOAL_K, GOAL_BYTES, GOAL_KL, GOAL_DECODE = 64, 1.2, 1e-4, 500_000
ROWS_PER_TABLE = 32  # the writer builds a shard's id table from its first row group (32 samples)


def teacher_topk(teacher_dir: Path, windows: int, seq_len: int, k_max: int) -> dict[str, np.ndarray]:
    """Top-k_max ids/log-probs, target log-probs and tail log-mass for every k <= k_max, per window."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.toy.models import local_corpus

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    stream = [t for text in local_corpus("heldout") for t in tokenizer(text)["input_ids"]]
    if len(stream) < windows * seq_len:
        raise SystemExit(f"held-out text has {len(stream)} tokens, need {windows * seq_len}")
    stride = len(stream) // windows  # windows spread over the whole held-out split
    out: dict[str, list] = {"ids": [], "lps": [], "target": [], "tails": [], "samples": []}
    with torch.no_grad():
        for w in range(windows):
            x = torch.tensor(stream[w * stride : w * stride + seq_len])[None]
            logp = torch.log_softmax(model(x).logits[0, :-1].float(), -1)  # row t-1 predicts x_t
            srt, idx = logp.sort(-1, descending=True)
            out["samples"].append({
                (k, u): draw_tail(logp, idx[:, :k], torch.from_numpy(tail_uniforms(0, str(w), len(logp), u)))
                for k, u in SAMPLED
            })
            tails = torch.logcumsumexp(srt.flip(-1), -1).flip(-1)  # tails[:, j] = log sum_{i >= j} p_(i)
            out["ids"].append(idx[:, :k_max].int().numpy())
            out["lps"].append(srt[:, :k_max].numpy())
            out["target"].append(logp.gather(1, x[0, 1:, None])[:, 0].numpy())
            out["tails"].append(tails[:, 1 : k_max + 1].numpy())
    samples = out.pop("samples")
    return {**{key: np.stack(v) for key, v in out.items()}, "samples": samples}


def kl_per_position(lps, tail, d_lps, d_tail, temperature: float = 1.0) -> np.ndarray:
    """KL(p || q) over the top-k plus the tail class, both tempered and renormalized, float64."""
    p = np.concatenate([lps, tail[:, None]], 1).astype(np.float64) / temperature
    q = np.concatenate([d_lps, d_tail[:, None]], 1).astype(np.float64) / temperature
    p, q = p - np.logaddexp.reduce(p, 1, keepdims=True), q - np.logaddexp.reduce(q, 1, keepdims=True)
    return np.where(np.isinf(p), 0.0, np.exp(p) * (p - q)).sum(1)


def easydistill_json_bytes(ids: np.ndarray, lps: np.ndarray) -> int:
    """EasyDistill stores, per position, a dict {token_id: prob} as JSON (full float repr)."""
    rows = [
        {str(int(i)): float(p) for i, p in zip(r_ids, np.exp(r_lps.astype(np.float64)), strict=True)}
        for r_ids, r_lps in zip(ids, lps, strict=True)
    ]
    return len(json.dumps(rows).encode())


def cpu_seconds(fn, repeat: int = 3) -> float:
    """Best of `repeat` runs in this thread's CPU time (robust to other jobs on shared cores)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.thread_time()
        fn()
        best = min(best, time.thread_time() - start)
    return best


def measure(data: dict[str, np.ndarray], k: int, codec: TopKCodec) -> dict[str, float]:
    windows, rows = data["ids"].shape[:2]
    ids, lps, target = data["ids"][:, :, :k], data["lps"][:, :, :k], data["target"]
    tail = data["tails"][:, :, k - 1]
    table = build_id_table([ids[i] for i in range(min(windows, ROWS_PER_TABLE))])
    coded = [codec.encode(ids[i], lps[i], target[i], tail[i], table) for i in range(windows)]

    def decode_all():
        return [tuple(torch.from_numpy(a) for a in codec.decode(c, rows, k, table)) for c in coded]

    encode_s = cpu_seconds(
        lambda: [codec.encode(ids[i], lps[i], target[i], tail[i], table) for i in range(windows)]
    )
    decode_s = cpu_seconds(decode_all)
    decoded = decode_all()
    kl1, kl2, err, target_err = [], [], 0.0, 0.0
    for i, (d_ids, d_lps, d_target, d_tail) in enumerate(decoded):
        if not np.array_equal(d_ids.numpy(), ids[i]):
            raise AssertionError("token ids changed in the round trip")
        kl1.append(kl_per_position(lps[i], tail[i], d_lps.numpy(), d_tail.numpy()))
        kl2.append(kl_per_position(lps[i], tail[i], d_lps.numpy(), d_tail.numpy(), 2.0))
        err = max(err, float(np.abs(d_lps.numpy() - lps[i]).max()))
        target_err = max(target_err, float(np.abs(d_target.numpy() - target[i]).max()))
    tokens, entries = windows * rows, windows * rows * k
    size = {f: sum(len(c[f]) for c in coded) for f in coded[0]}
    total = sum(size.values())
    return {
        "k": k,
        "bytes_per_entry": total / entries,
        "ids_bytes_per_entry": size["topk_ids"] / entries,
        "logprob_bytes_per_entry": size["topk_logprobs"] / entries,
        "target_tail_bytes_per_token": (size["target_logprobs"] + size["tail_logmass"]) / tokens,
        "bytes_per_token": total / tokens,
        "kl_mean": float(np.concatenate(kl1).mean()),
        "kl_mean_t2": float(np.concatenate(kl2).mean()),
        "max_abs_logprob_error": err,
        "max_abs_target_error": target_err,
        "encode_tokens_per_s": tokens / encode_s,
        "decode_tokens_per_s": tokens / decode_s,
        "easydistill_json_bytes_per_entry": easydistill_json_bytes(ids[0], lps[0]) / (rows * k),
        "raw_int32_float32_bytes_per_entry": 8.0,
    }


def measure_sampled(data: dict, k: int, draws: int, codec: TopKCodec) -> dict[str, float]:
    """Bytes per position of a sampled-tail layout (top-k columns + the tail_samples column)."""
    windows, rows = data["ids"].shape[:2]
    ids, lps, target = data["ids"][:, :, :k], data["lps"][:, :, :k], data["target"]
    tail = data["tails"][:, :, k - 1] if k else np.zeros((windows, rows), np.float32)
    samples = [data["samples"][i][(k, draws)] for i in range(windows)]
    table = build_id_table(
        [ids[i] for i in range(min(windows, ROWS_PER_TABLE))]
        + [samples[i].ids.numpy() for i in range(min(windows, ROWS_PER_TABLE))]
    )
    coded = [
        {**codec.encode(ids[i], lps[i], target[i], tail[i], table),
         "tail_samples": encode_tail_samples(codec, samples[i].ids.numpy(), samples[i].counts.numpy(),
                                             samples[i].logprobs.numpy(), tail[i], table)}
        for i in range(windows)
    ]

    def decode_all():
        out = []
        for c in coded:
            d_ids, d_lps, d_target, d_tail = codec.decode(c, rows, k, table)
            out.append(decode_tail_samples(codec, c["tail_samples"], rows, d_tail, table))
        return out

    decode_s = cpu_seconds(decode_all)
    for i, (d_ids, d_counts, _) in enumerate(decode_all()):
        real = samples[i].counts.numpy() > 0
        if sorted(zip(samples[i].ids.numpy()[real].tolist(), samples[i].counts.numpy()[real].tolist(), strict=True)) \
                != sorted(zip(d_ids[d_counts > 0].tolist(), d_counts[d_counts > 0].tolist(), strict=True)):
            raise AssertionError("sampled ids or counts changed in the round trip")
    positions = windows * rows
    unique = np.mean([(s.counts > 0).sum(1).double().mean().item() for s in samples])
    sample_bytes = sum(len(c["tail_samples"]) for c in coded)
    total = sum(len(v) for c in coded for v in c.values())
    return {
        "k": k,
        "draws": draws,
        "unique_per_position": float(unique),
        "bytes_per_position": total / positions,
        "sample_bytes_per_position": sample_bytes / positions,
        "bytes_per_unique_sample": sample_bytes / positions / unique,
        "decode_tokens_per_s": positions / decode_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--teacher", type=Path, help="a local model dir (default: the toy profile's teacher)")
    parser.add_argument(
        "--profile", choices=("bench", "quality"), default="bench",
        help="toy teacher when --teacher is not given: 'bench' (46M, barely trained) or 'quality' (8M, "
        "trained 8x longer, more peaked: ids compress worse)",
    )
    parser.add_argument("--windows", type=int, default=24)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    teacher_dir, info = args.teacher, {}
    if teacher_dir is None:
        from pipeline.toy.models import ensure_toy_assets

        assets = ensure_toy_assets(Path(".assets/toy"), profile=args.profile)
        teacher_dir, info = assets.teacher_dir, assets.teacher_info
    elif (teacher_dir / "BUILD_INFO.json").is_file():  # a toy model: report its pre-training loss
        info = json.loads((teacher_dir / "BUILD_INFO.json").read_text())["result"]
    data = teacher_topk(teacher_dir, args.windows, args.seq_len, max(KS))
    p = np.exp(data["lps"].astype(np.float64))
    print(
        f"teacher {teacher_dir} (pre-training loss {info.get('final_loss', float('nan')):.2f}, held-out loss "
        f"{info.get('heldout_loss', float('nan')):.2f}); "
        f"{data['ids'].shape[0] * data['ids'].shape[1]} positions; mean top-1 p {p[..., 0].mean():.3f}, "
        f"mean mass outside top-64 {np.exp(data['tails'][..., 63]).mean():.3f}"
    )
    codec = TopKCodec()
    print(f"codec {codec.params()}")
    results = [measure(data, k, codec) for k in KS]
    header = (
        f"{'k':>4} {'B/entry':>8} {'ids':>6} {'lps':>6} {'B/token':>8} {'KL T=1':>9} {'KL T=2':>9} "
        f"{'max|err|':>8} "
        f"{'enc tok/s':>10} {'dec tok/s':>10} {'int32+f32':>9} {'EasyDistill':>11}"
    )
    print(header)
    for r in results:
        print(
            f"{r['k']:>4} {r['bytes_per_entry']:>8.3f} {r['ids_bytes_per_entry']:>6.3f} "
            f"{r['logprob_bytes_per_entry']:>6.3f} {r['bytes_per_token']:>8.1f} {r['kl_mean']:>9.2e} "
            f"{r['kl_mean_t2']:>9.2e} {r['max_abs_logprob_error']:>8.4f} {r['encode_tokens_per_s']:>10,.0f} "
            f"{r['decode_tokens_per_s']:>10,.0f} {r['raw_int32_float32_bytes_per_entry']:>9.1f} "
            f"{r['easydistill_json_bytes_per_entry']:>11.1f}"
        )
    sampled = [measure_sampled(data, k, u, codec) for k, u in SAMPLED]
    print("\nsampled-tail layouts (k exact + U tail draws; ids and counts lossless, log-probs on the same grid)")
    print(f"{'layout':>12} {'unique/pos':>10} {'B/position':>10} {'tail B/pos':>10} {'B/unique':>8} {'dec tok/s':>10}")
    for r in sampled:
        print(
            f"{'k=' + str(r['k']) + ' U=' + str(r['draws']):>12} {r['unique_per_position']:>10.1f} "
            f"{r['bytes_per_position']:>10.1f} {r['sample_bytes_per_position']:>10.1f} "
            f"{r['bytes_per_unique_sample']:>8.2f} {r['decode_tokens_per_s']:>10,.0f}"
        )
    print("top-k B/position for comparison: " + ", ".join(f"k={r['k']}: {r['bytes_per_token']:.1f}" for r in results))
    goal = next(r for r in results if r["k"] == GOAL_K)
    verdicts = [
        (f"k={GOAL_K}: <= {GOAL_BYTES} bytes per top-k entry", goal["bytes_per_entry"] <= GOAL_BYTES),
        (f"k={GOAL_K}: mean KL <= {GOAL_KL:g} nats per position", goal["kl_mean"] <= GOAL_KL),
        (
            f"k={GOAL_K}: decode >= {GOAL_DECODE:,} tokens/s per core",
            goal["decode_tokens_per_s"] >= GOAL_DECODE,
        ),
    ]
    for text, ok in verdicts:
        print(f"goal {text}: {'PASS' if ok else 'FAIL'}")
    if args.json:
        args.json.write_text(
            json.dumps({"teacher": str(teacher_dir), "codec": codec.params(), "results": results,
                        "sampled": sampled}, indent=2)
        )
    return 0 if all(ok for _, ok in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
