"""Does offline top-k distillation work? The quality table, on a teacher that learned real text.

Teacher and student come from pipeline.toy.models, profile "quality" by default: the teacher
pre-trained on one part of the Python standard library for 8x the demo teacher's tokens, so its
next-token distributions are more peaked (the bench prints how much mass lies outside its top-k),
the smaller student briefly pre-trained on another part, same tokenizer; `--profile demo` runs the
demo's flatter teacher instead. Every row trains the same student with the same LoRA settings,
optimizer, batches and number of steps, through the product's loss path
(pipeline.student.distill.distillation_loss); only the teacher signal differs:

- SFT only:            kd_ratio 0 (cross-entropy on the response tokens)
- cached top-k KD:     kd_ratio 0.5 (or --kd-ratio) against a logit cache written by `gen-logits`,
                       k in {8, 32, 64}, tail `bucket`
- cached sampled KD:   the same against caches with a sampled tail (`inference.tail_samples` U):
                       purely sampled (k = 0, U in {12, 32}) and hybrids (exact top-k + U tail draws:
                       k = 8 + U = 24, k = 16 + U = 48); the draws' seed moves with --seed
- online full KD:      the same kd_ratio against the teacher run live on each batch, all V log-probs
                       (the upper bound that offline caching approximates)

Held-out metrics use the live teacher's full distribution: exact KL(teacher || student) per response
token, top-1 agreement and the student's cross-entropy.
Run: `python bench/quality.py [--steps N] [--kd-ratio R] [--teacher-scale S] [--profile demo]`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.cache import LogitCacheReader, load_manifest  # noqa: E402
from pipeline.config import config_from_dict  # noqa: E402
from pipeline.data import load_samples  # noqa: E402
from pipeline.errors import UserError  # noqa: E402
from pipeline.student.distill import collate, distillation_loss, output_head, response_hidden_states  # noqa: E402
from pipeline.student.lora import wrap_student  # noqa: E402
from pipeline.student.losses import KDLossSpec, TeacherRows  # noqa: E402
from pipeline.toy.models import ensure_toy_assets, write_instruction_dataset  # noqa: E402

WORK = REPO / ".assets" / "bench_quality"
KS = (8, 32, 64)  # for the teacher's mass outside its top-k
# Cached rows: (k, tail draws U); U = 0 is a plain top-k cache with the bucket tail.
CACHES = ((8, 0), (32, 0), (64, 0), (0, 12), (0, 32), (8, 24), (16, 48))


def cache_label(k: int, draws: int) -> str:
    if not draws:
        return f"top-{k}, tail bucket"
    return f"sampled U={draws}" if not k else f"top-{k} + {draws} tail draws"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=("quality", "demo"), default="quality")
    parser.add_argument(
        "--teacher-scale", type=float, default=1.0,
        help="multiply the teacher's logits by S (its output head scaled: the teacher at temperature 1/S). "
        "S > 1 gives the peaked distributions of an instruction-tuned LLM; the bench prints the mass left "
        "outside the top-k",
    )
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0, help="batch order and LoRA initialization")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--train-samples", type=int, default=384)
    parser.add_argument("--eval-samples", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--kd-ratio", type=float, default=0.5, help="kd_ratio of the KD rows (SFT stays at 0)")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    assets = ensure_toy_assets(REPO / ".assets" / "toy", profile=args.profile)
    work = WORK / (args.profile if args.teacher_scale == 1 else f"{args.profile}-x{args.teacher_scale:g}")
    work.mkdir(parents=True, exist_ok=True)
    teacher_dir = assets.teacher_dir
    if args.teacher_scale != 1:
        teacher_dir = scaled_teacher(assets.teacher_dir, args.teacher_scale, work / "teacher")
    train_path = write_instruction_dataset(work / "train.jsonl", args.train_samples, split="teacher", seed=0)
    eval_path = write_instruction_dataset(work / "eval.jsonl", args.eval_samples, split="heldout", seed=1)
    draw_seed = 42 + args.seed
    caches = {
        (k, u): write_cache(
            teacher_dir, assets.student_dir, train_path,
            work / (f"cache_top{k}" if not u else f"cache_top{k}_u{u}_seed{draw_seed}"), k, u, draw_seed,
        )
        for k, u in CACHES
    }

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets.student_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    vocab = teacher.config.vocab_size
    cached = {key: _rows_by_id(path) for key, path in caches.items()}
    order = sorted(cached[(64, 0)])  # one fixed sample order for every row
    rng = torch.Generator().manual_seed(args.seed)
    batches = [
        [order[i] for i in torch.randperm(len(order), generator=rng)[: args.batch_size].tolist()]
        for _ in range(args.steps)
    ]
    held_out = _held_out_batches(eval_path, tokenizer, args.batch_size)

    # (name, teacher signal, tail, target class, kd_ratio); tail "auto": bucket for top-k, sampled otherwise
    variants = [("SFT only (kd_ratio 0)", None, "bucket", False, 0.0)]
    variants += [(f"cached {cache_label(*key)}", key, "auto", False, args.kd_ratio) for key in CACHES]
    variants.append(("online full-vocabulary KD", "online", "renormalize", False, args.kd_ratio))

    with torch.no_grad():  # the teacher's held-out logits, computed once for every row's evaluation
        teacher_logits = [_logits_at_responses(teacher, batch) for batch in held_out]
    outside = teacher_mass_outside_topk(teacher_logits)
    print("teacher on held-out responses, mean probability mass outside its top-k: "
          + ", ".join(f"k={k}: {m:.3f}" for k, m in outside.items()), flush=True)
    results = []
    before = evaluate(AutoModelForCausalLM.from_pretrained(assets.student_dir).eval(), teacher_logits, held_out)
    for name, source, tail, target, kd_ratio in variants:
        start = time.perf_counter()
        spec = KDLossSpec(kd_ratio=kd_ratio, tail=tail, target_class=target)
        student = train_variant(assets.student_dir, teacher, cached, batches, source, spec, vocab, args)
        seconds = time.perf_counter() - start
        metrics = evaluate(student, teacher_logits, held_out)
        storage = _bytes_per_token(caches[source]) if isinstance(source, tuple) else None
        cached_unique = _unique_per_position(cached[source]) if isinstance(source, tuple) and source[1] else None
        results.append(
            {
                "name": name,
                "k": source[0] if isinstance(source, tuple) else source,
                "tail_draws": source[1] if isinstance(source, tuple) else None,
                "unique_sampled_per_position": cached_unique,
                "tail": tail,
                "target_class": target,
                "train_seconds": seconds,
                "bytes_per_token": storage,
                **metrics,
            }
        )
        print(
            f"  {name}: KL {metrics['kl']:.4f}, top-1 {metrics['top1']:.3f}, CE {metrics['ce']:.4f}, "
            f"{seconds:.0f} s",
            flush=True,
        )
    report(before, results, vocab, outside, args)
    out = work / f"results_kd{args.kd_ratio}_steps{args.steps}_seed{args.seed}.json"
    record = {"args": vars(args), "teacher": assets.teacher_info, "teacher_mass_outside_topk": outside,
              "before": before, "rows": results}
    out.write_text(json.dumps(record, indent=2))
    print(f"results written to {out}")
    return 0


def scaled_teacher(teacher_dir: Path, scale: float, out_dir: Path) -> Path:
    """A copy of the teacher whose output head is multiplied by `scale` (kept; rebuilt if the source changed)."""
    from transformers import AutoModelForCausalLM

    stamp = {"source": str(teacher_dir), "source_info": (teacher_dir / "BUILD_INFO.json").read_text(), "scale": scale}
    stamp_path = out_dir / "SCALED_FROM.json"
    if stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp:
        return out_dir
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    head = model.get_output_embeddings()
    if model.config.tie_word_embeddings or head.bias is not None:
        raise SystemExit("--teacher-scale needs an untied output head without bias")
    with torch.no_grad():
        head.weight.mul_(scale)
    model.save_pretrained(out_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (teacher_dir / name).is_file():
            shutil.copy(teacher_dir / name, out_dir / name)
    stamp_path.write_text(json.dumps(stamp))
    return out_dir


def write_cache(
    teacher_dir: Path, student_dir: Path, train_path: Path, cache: Path, k: int, draws: int = 0, seed: int = 42
) -> Path:
    """A real cache, written by the gen-logits stage (transformers engine: no vLLM start per k)."""
    from stages import gen_logits
    config = config_from_dict(
        {
            "dataset": {"labeled_path": str(train_path), "logits_path": str(cache)},
            "models": {"teacher": str(teacher_dir), "student": str(student_dir)},
            "inference": {"engine": "hf", "top_logits_num": k, "tail_samples": draws, "seed": seed,
                          "dtype": "float32", "batch_size": 16},
            "distillation": {"max_seq_length": 512},
        },
        REPO,
    )
    try:
        gen_logits.run(config)  # a no-op when the cache is already complete
    except UserError:  # written by an older teacher build: regenerate
        gen_logits.run(config, overwrite=True)
    return cache


def _rows_by_id(cache: Path) -> dict:
    return {s.sample_id: s for s in LogitCacheReader(cache).iter_samples(shuffle=False, seed=0)}


def _unique_per_position(rows: dict) -> float:
    counts = torch.cat([(s.sample_counts > 0).sum(1) for s in rows.values()])
    return counts.double().mean().item()


def _bytes_per_token(cache: Path) -> float:
    manifest = load_manifest(cache)
    return manifest.num_bytes / manifest.num_response_tokens


def _held_out_batches(eval_path: Path, tokenizer, batch_size: int) -> list[dict]:
    config = config_from_dict(
        {"dataset": {"labeled_path": str(eval_path)}, "distillation": {"max_seq_length": 512}}, REPO
    )
    samples, _ = load_samples(config, tokenizer, mode="score")
    from pipeline.records import CacheSample

    # collate() batches CacheSamples; held-out scoring needs only the tokens, so the teacher rows are empty.

    items = [
        [
            CacheSample(
                s.sample_id,
                torch.tensor(s.input_ids),
                torch.tensor(s.positions),
                torch.zeros(len(s.positions), 1, dtype=torch.long),
                torch.zeros(len(s.positions), 1),
                torch.zeros(len(s.positions)),
                torch.zeros(len(s.positions)),
            )
        ]
        for s in samples
    ]
    pad = tokenizer.pad_token_id
    return [collate(items[i : i + batch_size], pad, 512) for i in range(0, len(items), batch_size)]


def live_teacher_rows(teacher, batch: dict, vocab: int) -> list[TeacherRows]:
    """All V teacher log-probs at the batch's response positions: full-vocabulary KD through the same loss."""
    with torch.no_grad():
        logp = torch.log_softmax(_logits_at_responses(teacher, batch), -1)
    ids = torch.arange(vocab).expand(logp.shape[0], vocab)
    return [TeacherRows(ids, logp, torch.full((logp.shape[0],), -math.inf))]


def _logits_at_responses(model, batch: dict) -> torch.Tensor:
    head = output_head(model)
    return torch.nn.functional.linear(response_hidden_states(model, batch), head.weight, head.bias).float()


def train_variant(student_dir, teacher, cached, batches, source, spec: KDLossSpec, vocab, args):
    cache_key = source if isinstance(source, tuple) else (64, 0)

    def make_batch(ids: list[str]) -> dict:
        batch = collate([[cached[cache_key][i]] for i in ids], pad_id=0, max_seq_length=512)
        if source == "online":
            rows = live_teacher_rows(teacher, batch, vocab)
            batch = {
                **batch,
                "topk_ids": [rows[0].topk_ids],
                "topk_logprobs": [rows[0].topk_logprobs],
                "tail_logmass": [rows[0].tail_logmass],
            }
        return batch

    return train_lora(student_dir, batches, make_batch, spec, args)


def train_lora(student_dir, batches, make_batch, spec: KDLossSpec, args):
    """The quality benches' training run: LoRA r=16, AdamW at args.lr, 10 warmup steps then cosine, one
    optimizer step per batch of sample ids (`make_batch` turns them into a batch), the product's loss."""
    from transformers import AutoModelForCausalLM

    from pipeline.config import LoraConfig

    torch.manual_seed(args.seed)
    model = wrap_student(
        AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32),
        LoraConfig(r=16, alpha=32, dropout=0.0),
    )
    model.train()
    head = output_head(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / 10) * 0.5 * (1 + math.cos(math.pi * step / len(batches))),
    )
    for ids in batches:
        batch = make_batch(ids)
        parts = distillation_loss(model, head, batch, spec, batch["targets"].numel(), chunk_size=512)
        parts.loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    return model.eval()


def teacher_mass_outside_topk(teacher_logits: list[torch.Tensor]) -> dict[int, float]:
    """What a top-k cache cannot carry: the teacher's mean probability mass outside its top k, per k."""
    outside, tokens = dict.fromkeys(KS, 0.0), 0
    with torch.no_grad():
        for logits in teacher_logits:
            probs = torch.softmax(logits.double(), -1)
            top = probs.topk(max(KS), dim=-1).values.cumsum(-1)
            for k in KS:
                outside[k] += (1 - top[:, k - 1]).clamp_min(0).sum().item()
            tokens += probs.shape[0]
    return {k: v / tokens for k, v in outside.items()}


def evaluate(student, teacher_logits: list[torch.Tensor], batches: list[dict]) -> dict[str, float]:
    """Exact full-vocabulary KL(teacher || student), top-1 agreement and CE per response token."""
    kl = top1 = ce = tokens = 0.0
    with torch.no_grad():
        for logits, batch in zip(teacher_logits, batches, strict=True):
            logp = torch.log_softmax(logits.double(), -1)
            logq = torch.log_softmax(_logits_at_responses(student, batch).double(), -1)
            kl += (logp.exp() * (logp - logq)).sum().item()
            top1 += (logq.argmax(-1) == logp.argmax(-1)).sum().item()
            ce += -logq.gather(1, batch["targets"][:, None]).sum().item()
            tokens += batch["targets"].numel()
    return {"kl": kl / tokens, "top1": top1 / tokens, "ce": ce / tokens}


def report(before: dict, rows: list[dict], vocab: int, outside: dict[int, float], args) -> None:
    full_bytes = vocab * 4  # float32 full logits per token
    print(
        f"\nQuality ({args.profile} teacher, logits x{args.teacher_scale:g}): {args.steps} steps x batch "
        f"{args.batch_size}, LoRA r=16 alpha=32, "
        f"lr {args.lr}, KD rows at kd_ratio {args.kd_ratio}, vocab {vocab}; held-out metrics vs the live "
        f"teacher (exact, full vocabulary); teacher mass outside top-64: {outside[64]:.3f}"
    )
    print(f"{'row':<40}{'KL':>9}{'top-1':>8}{'CE':>8}{'B/token':>9}{'% full':>8}{'train s':>9}")
    print(f"{'student before training':<40}{before['kl']:>9.4f}{before['top1']:>8.3f}{before['ce']:>8.4f}")
    for r in rows:
        storage = (
            f"{r['bytes_per_token']:>9.1f}{100 * r['bytes_per_token'] / full_bytes:>7.2f}%"
            if r["bytes_per_token"]
            else f"{'-':>9}{'-':>8}"
        )
        print(
            f"{r['name']:<40}{r['kl']:>9.4f}{r['top1']:>8.3f}{r['ce']:>8.4f}{storage}{r['train_seconds']:>9.0f}"
        )
    sft = rows[0]["kl"]
    online = rows[-1]["kl"]
    print(
        f"\nGap closed = (KL_SFT - KL_row) / (KL_SFT - KL_online); full logits = {full_bytes} B/token (float32)"
    )
    for r in rows[1:-1]:
        r["gap_closed"] = (sft - r["kl"]) / (sft - online) if sft != online else float("nan")
        unique = f", {r['unique_sampled_per_position']:.1f} unique sampled ids" if r["tail_draws"] else ""
        print(f"  {r['name']:<38} {100 * r['gap_closed']:6.1f}% of the gap{unique}")
    top64 = next(r for r in rows if r["k"] == 64 and not r["tail_draws"])
    sampled = [r for r in rows[1:-1] if r["tail_draws"] and r["bytes_per_token"] <= top64["bytes_per_token"]]
    best = max(sampled, key=lambda r: r["gap_closed"], default=None)
    target = 0.98 if args.teacher_scale > 1 else 0.95
    verdict = "MET" if best is not None and best["gap_closed"] >= target else "NOT MET"
    print(
        f"Goal (a sampled or hybrid row closes >= {100 * target:.0f}% of the gap at no more bytes than top-64's "
        f"{top64['bytes_per_token']:.1f} B/token): {verdict}"
        + (f" (best: {best['name']}, {100 * best['gap_closed']:.1f}% at {best['bytes_per_token']:.1f} B/token; "
           f"top-64 {100 * top64['gap_closed']:.1f}%)" if best else "")
    )


if __name__ == "__main__":
    sys.exit(main())
