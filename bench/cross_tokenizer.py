"""Cross-tokenizer distillation quality: a ChatML teacher into a student with another tokenizer.

Teacher: the demo teacher (8.1M parameters, byte-level BPE of 8,192 tokens trained on one part of the
Python standard library, ChatML turns). Cross student: the demo student's architecture on a tokenizer of
6,000 tokens trained on another part, with Llama 3's turn format and special tokens
(pipeline.toy.models.ensure_cross_assets), pre-trained as briefly as the demo student (`--matched-start`:
for as many steps as it takes to start at the demo student's NLL per character, so that the gap below
measures distillation rather than the tokenizers). Reference: the demo student itself (same size, the
teacher's tokenizer), trained with same-tokenizer cached KD. `--profile quality`: the quality profile's
teacher and students.

Every row trains with the same LoRA, optimizer, batches (the same samples) and steps through the
product's loss path; the cache is written once by `gen-logits` (top-64 + 24 sampled tail draws: the
cross losses read its top-64, sampled tail and target log-probs, the reference its sampled targets).
Teacher-written rows (sequence-level KD; `--no-teacher-written` leaves them out): the same training prompts
answered by the teacher in a generate-mode cache (T = 1, as many tokens as the held-out responses), which the
cross student reads as text through the generate-mode alignment.

Metric, independent of the tokenizer: held-out prompts are answered by the teacher itself (sampled at
T = 1: its first 96 tokens, whitespace-stripped), and each student's negative log-likelihood of those
response texts per character. Its expectation is the sequence-level KL(teacher || student) per character
plus the teacher's entropy, a constant shared by all rows.
Gap closed = (NLL_SFT - NLL_row) / (NLL_SFT - NLL_reference), SFT being the cross student on CE alone.
Run: `python bench/cross_tokenizer.py [--profile demo|quality] [--matched-start] [--steps N] [--seed S]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.quality import train_lora  # noqa: E402
from pipeline.alignment import ChatRenderer  # noqa: E402
from pipeline.cache import LogitCacheReader  # noqa: E402
from pipeline.config import config_from_dict  # noqa: E402
from pipeline.cross_tokenizer.alignment import CrossAligner  # noqa: E402
from pipeline.cross_tokenizer.batches import CrossCollator, shared_topk_mass  # noqa: E402
from pipeline.cross_tokenizer.prepare import prepare_cross_tokenizer  # noqa: E402
from pipeline.cross_tokenizer.vocab import shared_vocab_map  # noqa: E402
from pipeline.data import read_records, to_messages  # noqa: E402
from pipeline.student.distill import collate  # noqa: E402
from pipeline.student.losses import KDLossSpec  # noqa: E402
from pipeline.toy.models import ensure_cross_assets, write_instruction_dataset  # noqa: E402

K, DRAWS = 64, 24


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0, help="batch order and LoRA initialization")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--train-samples", type=int, default=384)
    parser.add_argument("--eval-prompts", type=int, default=64)
    parser.add_argument("--response-tokens", type=int, default=96, help="teacher tokens per held-out response")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--kd-ratio", type=float, default=0.5)
    parser.add_argument("--profile", choices=("demo", "quality"), default="demo",
                        help="teacher and students of pipeline.toy.models (quality: longer pre-trained)")
    parser.add_argument("--no-teacher-written", dest="teacher_written", action="store_false",
                        help="leave out the rows trained on the teacher's own responses to the training prompts")
    parser.add_argument("--matched-start", action="store_true",
                        help="a cross student pre-trained to start at the same-tokenizer student's NLL/char")
    args = parser.parse_args()
    work = REPO / ".assets" / ("bench_cross" if args.profile == "demo" else f"bench_cross_{args.profile}")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    assets, cross_student = ensure_cross_assets(REPO / ".assets" / "toy", profile=args.profile,
                                                  matched=args.matched_start)
    work.mkdir(parents=True, exist_ok=True)
    train_path = write_instruction_dataset(work / "train.jsonl", args.train_samples, split="teacher", seed=0)
    cache = work / f"cache_top{K}_u{DRAWS}"
    base = {
        "dataset": {"labeled_path": str(train_path), "logits_path": str(cache)},
        "models": {"teacher": str(assets.teacher_dir), "student": str(cross_student)},
        "inference": {"engine": "hf", "top_logits_num": K, "tail_samples": DRAWS, "seed": 42, "dtype": "float32",
                      "batch_size": 16},
        "distillation": {"max_seq_length": 512, "cross_tokenizer": "chunk+shared"},  # sampled shared tail
    }
    from stages import gen_logits

    gen_logits.run(config_from_dict(base, REPO))  # a no-op once the cache is complete
    reader = LogitCacheReader(cache)
    rows_by_id = {s.sample_id: s for s in reader.iter_samples(shuffle=False, seed=0)}
    order = sorted(rows_by_id)
    rng = torch.Generator().manual_seed(args.seed)
    batches = [[order[i] for i in torch.randperm(len(order), generator=rng)[: args.batch_size].tolist()]
               for _ in range(args.steps)]

    teacher = AutoModelForCausalLM.from_pretrained(assets.teacher_dir, dtype=torch.float32).eval()
    held_out = teacher_responses(teacher, AutoTokenizer.from_pretrained(assets.teacher_dir), args, work)
    print(f"held out: {len(held_out)} teacher-sampled responses, {sum(len(m[-1]['content']) for m in held_out)} "
          "characters", flush=True)

    tokenizers = {s: AutoTokenizer.from_pretrained(s) for s in (assets.student_dir, cross_student)}
    # One alignment serves every cross-tokenizer loss: the batches carry all their signals.
    cross_collate, report = prepare_cross_tokenizer(config_from_dict(base, REPO), reader, tokenizers[cross_student])
    if not cross_collate.sampled_tail:  # the sampled row below would silently be the bucket row again
        raise SystemExit(f"{cache}: the shared term does not take the sampled tail (no tail draws?)")
    # Session 4's shared-vocabulary term, side by side: only on chunks one token on both sides, only
    # through tokens of the same text (no first-token projection).
    teacher_tok = AutoTokenizer.from_pretrained(assets.teacher_dir)
    eot = CrossAligner(ChatRenderer(teacher_tok, None), ChatRenderer(tokenizers[cross_student], None), 512)
    exact_map = shared_vocab_map(teacher_tok, tokenizers[cross_student], eot.end_of_turn_pair())
    one_to_one_collate = CrossCollator(
        {i: dataclasses.replace(a, chunk_start=a.one_to_one) for i, a in cross_collate.alignments.items()},
        exact_map, cross_collate.pad_id)
    exact_mass = _one_to_one_mass(reader, one_to_one_collate)
    print(f"alignment: {100 * report['aligned_char_share']:.1f}% of response characters in {report['chunks']} "
          f"chunks ({report['chars_per_chunk']:.2f} chars each, {100 * report['one_to_one_chunk_share']:.1f}% "
          f"one token on both sides); at chunk starts the teacher's top-64 entries that map into the student's "
          f"vocabulary carry {100 * report['shared_vocab_topk_mass']:.1f}% of its probability, "
          f"{100 * report['shared_vocab_mass']:.1f}% with the sampled tail "
          f"({report['mapped_teacher_tokens']} of {report['teacher_vocab']} teacher tokens mapped); same-text "
          f"tokens alone ({int((exact_map >= 0).sum())}) take {100 * exact_mass:.1f}% on the 1:1 chunks",
          flush=True)
    report["exact_text_topk_mass_one_to_one"] = exact_mass
    # Why the two students start apart: how many characters each tokenizer packs into a token here.
    held_out_text = [m[-1]["content"] for m in held_out]
    chars_per_token = {Path(s).name: sum(map(len, held_out_text)) / sum(
        len(ids) for ids in tokenizers[s](held_out_text, add_special_tokens=False)["input_ids"]) for s in tokenizers}
    print("characters per token of the held-out responses: "
          + ", ".join(f"{name} {value:.2f}" for name, value in chars_per_token.items()), flush=True)
    report["held_out_chars_per_token"] = chars_per_token

    same = functools.partial(collate, pad_id=tokenizers[assets.student_dir].pad_token_id, max_seq_length=512)
    kd = args.kd_ratio
    # (name, student, collate, loss spec)
    variants = [
        ("SFT only (kd_ratio 0)", cross_student, cross_collate, KDLossSpec(kd_ratio=0.0, cross_tokenizer="chunk")),
        ("ULD, sorted top-64", cross_student, cross_collate, KDLossSpec(kd_ratio=kd, cross_tokenizer="uld")),
    ]
    for tau in (1.0, 10.0, 100.0):
        variants.append((f"chunk likelihood, tau {tau:g}", cross_student, cross_collate,
                         KDLossSpec(kd_ratio=kd, cross_tokenizer="chunk", chunk_temperature=tau)))
    # Session 5's term, side by side: every chunk start, projected map, the top-64 with the tail as one
    # bucket class (what `distillation.tail: bucket` gives).
    bucket_collate = CrossCollator(cross_collate.alignments, cross_collate.shared_map.numpy(),
                                   cross_collate.pad_id, sampled_tail=False)
    shared_spec = KDLossSpec(kd_ratio=kd, cross_tokenizer="chunk+shared", chunk_temperature=10.0)
    variants += [
        ("chunk + shared on 1:1 chunks, same-text only, tau 10", cross_student, one_to_one_collate, shared_spec),
        ("chunk + shared, projected, top-64 bucket, tau 10", cross_student, bucket_collate, shared_spec),
        ("chunk + shared, projected, top-64 + sampled tail, tau 10", cross_student, cross_collate, shared_spec),
    ]
    if args.teacher_written:
        # Sequence-level KD (Kim & Rush): the same prompts answered by the teacher itself (a generate-mode
        # cache); the responses are text, so they carry over to any tokenizer.
        written_reader, written_collate = teacher_written(base, args, work, tokenizers[cross_student])
        written_rows = {s.sample_id: s for s in written_reader.iter_samples(shuffle=False, seed=0)}
        variants += [
            ("teacher-written responses: SFT only", cross_student, written_collate,
             KDLossSpec(kd_ratio=0.0, cross_tokenizer="chunk"), written_rows),
            ("teacher-written: chunk + shared, sampled tail, tau 10", cross_student, written_collate, shared_spec,
             written_rows),
            ("same-tokenizer student, teacher-written, cached KD", assets.student_dir, same,
             KDLossSpec(kd_ratio=kd), written_rows),
        ]
    variants += [
        ("same-tokenizer student, SFT only", assets.student_dir, same, KDLossSpec(kd_ratio=0.0)),
        ("same-tokenizer student, cached KD (reference)", assets.student_dir, same, KDLossSpec(kd_ratio=kd)),
    ]
    before = {s: nll_per_char(AutoModelForCausalLM.from_pretrained(s).eval(), tokenizers[s], held_out)
              for s in tokenizers}
    results = []
    for name, student_dir, collate_fn, spec, *rows in variants:
        start = time.perf_counter()
        rows = rows[0] if rows else rows_by_id
        make_batch = functools.partial(_batch, collate_fn, rows)
        model = train_lora(student_dir, [[i for i in b if i in rows] for b in batches], make_batch, spec, args)
        nll = nll_per_char(model, tokenizers[student_dir], held_out)
        results.append({"name": name, "student": str(student_dir), "nll_per_char": nll,
                        "train_seconds": time.perf_counter() - start})
        print(f"  {name}: NLL/char {nll:.4f} ({results[-1]['train_seconds']:.0f} s)", flush=True)
    sft, reference = results[0]["nll_per_char"], results[-1]["nll_per_char"]
    print(f"\nCross-tokenizer quality: {args.steps} steps x batch {args.batch_size}, LoRA r=16, lr {args.lr}, "
          f"kd_ratio {kd}; NLL per character of {len(held_out)} teacher-sampled held-out responses")
    print(f"{'row':<60}{'NLL/char':>10}{'gap closed':>12}")
    for s, value in before.items():
        print(f"{'before training: ' + Path(s).name:<60}{value:>10.4f}")
    for r in results:
        r["gap_closed"] = (sft - r["nll_per_char"]) / (sft - reference) if sft != reference else float("nan")
        print(f"{r['name']:<60}{r['nll_per_char']:>10.4f}{100 * r['gap_closed']:>11.1f}%")
    cross_rows = [r for r in results if r["student"] == str(cross_student)][1:]
    best = max(cross_rows, key=lambda r: r["gap_closed"])
    verdict = "MET" if best["gap_closed"] >= 0.8 else "NOT MET"
    print(f"Goal (the best cross-tokenizer row closes >= 80% of the SFT -> same-tokenizer-KD gap): {verdict} "
          f"(best: {best['name']}, {100 * best['gap_closed']:.1f}%)")
    # The two students start apart (their tokenizers differ): compare each KD's gain over its own SFT too.
    same_gain = results[-2]["nll_per_char"] - reference
    for r in cross_rows:
        r["share_of_same_tokenizer_kd_gain"] = (sft - r["nll_per_char"]) / same_gain if same_gain else float("nan")
    print(f"Gain over the student's own SFT, as a share of the same-tokenizer KD's gain over its SFT "
          f"({same_gain:.4f} nats/char):")
    for r in cross_rows:
        print(f"  {r['name']:<58}{100 * r['share_of_same_tokenizer_kd_gain']:>7.1f}%")
    out = work / f"results_kd{kd}_steps{args.steps}_seed{args.seed}{'_matched' if args.matched_start else ''}.json"
    record = {"args": vars(args), "alignment": report, "before": {str(k): v for k, v in before.items()},
              "rows": results}
    out.write_text(json.dumps(record, indent=2))
    print(f"results written to {out}")
    return 0


def teacher_responses(teacher, tokenizer, args, work: Path) -> list[list[dict]]:
    """Held-out prompts answered by the teacher (T = 1, the first --response-tokens tokens), as conversations.

    The toy teacher seldom ends its turn within a few hundred tokens, so a response is the text of its
    first tokens, stripped of surrounding whitespace (a token at the edge would otherwise merge with the
    template's newline in one tokenization and not in the other).
    """
    path = write_instruction_dataset(work / "eval_prompts.jsonl", args.eval_prompts, split="heldout", seed=1)
    cached = work / f"eval_teacher_responses_{args.eval_prompts}x{args.response_tokens}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    renderer = ChatRenderer(tokenizer, None)
    end = tokenizer.eos_token_id
    torch.manual_seed(1234)
    conversations = []
    for index, (where, record) in enumerate(read_records(path)):
        _, messages = to_messages(record, index, where, require_response=False)
        prompt = [m for m in messages if m["role"] != "assistant"]
        text = renderer.render(prompt, add_generation_prompt=True)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = teacher.generate(ids, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                   max_new_tokens=args.response_tokens, eos_token_id=end,
                                   pad_token_id=tokenizer.pad_token_id)
        response = tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True).strip()
        if response:
            conversations.append([*prompt, {"role": "assistant", "content": response}])
    cached.write_text(json.dumps(conversations))
    return conversations


def teacher_written(base: dict, args, work: Path, student_tokenizer):
    """(reader, cross collator) of a generate-mode cache: the training prompts answered by the teacher.

    gen-logits `generate` (T = 1, its first --response-tokens tokens, as held out) writes the responses and
    their top-64 + sampled tail; the cross student reads the text the teacher wrote from the sampled ids.
    """
    from stages import gen_logits

    config = config_from_dict({
        **base,
        "dataset": {"instruction_path": base["dataset"]["labeled_path"],
                    "logits_path": str(work / f"cache_generated{args.response_tokens}_top{K}_u{DRAWS}")},
        "inference": {**base["inference"], "mode": "generate", "max_new_tokens": args.response_tokens,
                      "temperature": 1.0},
    }, REPO)
    gen_logits.run(config)  # a no-op once the cache is complete
    reader = LogitCacheReader(config.dataset.logits_path)
    collate_fn, report = prepare_cross_tokenizer(config, reader, student_tokenizer)
    print(f"teacher-written responses: {len(collate_fn.alignments)} samples, "
          f"{100 * report['aligned_char_share']:.1f}% of their characters aligned", flush=True)
    return reader, collate_fn


def nll_per_char(model, tokenizer, conversations) -> float:
    """The model's NLL of each conversation's last assistant text per character (its end of turn left out:
    the teacher's responses are cut, not ended)."""
    renderer = ChatRenderer(tokenizer, None)
    total = chars = 0.0
    with torch.no_grad():
        for messages in conversations:
            ids, positions = renderer.tokenize(messages, "held out")
            if ids[positions[-1]] != tokenizer.eos_token_id:
                raise SystemExit(f"{tokenizer.name_or_path}: the last response token is not the end of turn")
            x = torch.tensor([ids])
            logits = model(input_ids=x).logits[0].double()
            pos = torch.tensor(positions[:-1])
            logp = torch.log_softmax(logits[pos - 1], -1).gather(1, x[0, pos][:, None])
            total += -logp.sum().item()
            chars += len(messages[-1]["content"])
    return total / chars


def _one_to_one_mass(reader, collate_fn) -> float:
    """The teacher's top-k mass that the collator's map takes, averaged over its shared-term rows."""
    mass = rows = 0.0
    for sample in reader.iter_samples(shuffle=False, seed=0):
        starts = collate_fn.alignments[sample.sample_id].chunk_start
        per_row = shared_topk_mass(sample, collate_fn.shared_map.numpy())
        mass += float(per_row[starts[starts >= 0]].sum())
        rows += int((starts >= 0).sum())
    return mass / rows if rows else 0.0


def _batch(collate_fn, rows_by_id: dict, ids: list[str]) -> dict:
    return collate_fn([[rows_by_id[i]] for i in ids])


if __name__ == "__main__":
    sys.exit(main())
