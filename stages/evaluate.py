"""`pipeline eval`: score a student (base, base + adapter, or merged) against a held-out teacher cache.

Per response token, at temperature 1:
- teacher KL: forward KL(teacher || student) over the teacher's top-k plus the tail bucket (the mass
  outside the top-k as one class on both sides), exactly the quantity `forward_kld` + `bucket` trains.
  It is a LOWER BOUND of the full-vocabulary KL (merging classes never raises a KL), loose where the
  teacher leaves much mass outside its top-k, so the teacher's mean tail mass is reported beside it;
  ids beyond the student's vocabulary are no class (as in training: their student mass is in the tail);
- sampled-tail caches (`inference.tail_samples`) also give `kl_estimate`, an UNBIASED estimate of the
  full-vocabulary KL: sum over the exact top-k of p (log p - log q) plus, over the sampled tail ids,
  (r c_j / U) (log p_j - log q_j) with the stored teacher log-probs (E[r c_j / U] = p_j). For a purely
  sampled cache (k = 0) it is the only KL, and top-1 agreement is not defined (no exact top-1);
- top-1 agreement: the student's argmax equals the teacher's most likely token;
- cross-entropy (and perplexity) of the actual response tokens;
- on a cache the teacher wrote (`generate` mode, T = 1, no top-p): `sequence_kl_per_token`, the student's
  minus the teacher's cross-entropy of those tokens, an unbiased estimate of the sequence-level
  KL(teacher || student) per token (the responses are the teacher's samples).
Means are over all response tokens of the scored samples. Streams the cache; batches; progress bar.

A student with another tokenizer than the cache's is scored with `config` (the config the cache was made
with: its dataset and teacher) on text, not ids: each side's NLL per character of the aligned response
text, and on teacher-written caches their difference, the sequence-level KL per character
(pipeline.cross_tokenizer.scoring).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pipeline.cache import LogitCacheReader
from pipeline.config import Config
from pipeline.errors import UserError, require
from pipeline.models import check_cache_tokenizer, check_model_path, load_tokenizer, shares_cache_tokenizer
from pipeline.student.distill import accepts_logits_to_keep, collate, output_head, response_hidden_states
from pipeline.student.losses import divergence, teacher_class_logprobs

log = logging.getLogger(__name__)
HEAD_CHUNK = 1024  # response positions per output-head chunk: bounds the [chunk, vocab] logits


def run(
    model_dir: Path,
    cache_dir: Path,
    *,
    adapter: Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    as_json: bool = False,
    config: Config | None = None,
) -> dict[str, Any]:
    """`config`: the config the cache was made with; needed (and used) only for a student whose tokenizer
    differs from the cache's."""
    tokenizer = load_tokenizer(model_dir, role="student")
    reader = LogitCacheReader(cache_dir)
    if not shares_cache_tokenizer(reader.cache_dir, reader.manifest.identity, tokenizer):
        if config is None:
            raise UserError(
                f"The cache {cache_dir} was made with another tokenizer than the student's: its token ids mean "
                "other tokens to the student. To score this student across tokenizers, pass `--config` with the "
                "config the cache was made with (its dataset and `models.teacher`): eval then compares both "
                "sides' likelihood of the same response text, per character."
            )
        return _run_cross(model_dir, reader, tokenizer, config, adapter, limit, batch_size, as_json)
    check_cache_tokenizer(reader.cache_dir, reader.manifest.identity, tokenizer)
    model = load_student(model_dir, adapter)
    total = reader.num_samples if limit is None else min(limit, reader.num_samples)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    sums = dict.fromkeys(("kl", "kl_estimate", "top1", "ce", "teacher_ce", "tail", "tokens", "samples"), 0.0)
    start = time.perf_counter()
    samples = reader.iter_samples(shuffle=False, seed=0)
    with torch.inference_mode(), tqdm(total=total, desc="eval", unit="sample", disable=as_json) as bar:
        batch: list = []
        for sample in samples:
            if sums["samples"] + len(batch) >= total:
                break
            batch.append([sample])
            if len(batch) == batch_size:
                _score_batch(model, batch, pad_id, sums)
                bar.update(len(batch))
                batch = []
        if batch:
            _score_batch(model, batch, pad_id, sums)
            bar.update(len(batch))

    if sums["tokens"] == 0:
        raise UserError(f"{cache_dir}: no response tokens to score.")
    n = sums["tokens"]
    sampled, exact_top = reader.tail_draws > 0, reader.k > 0
    metrics = {
        "model": str(model_dir),
        "adapter": str(adapter) if adapter else None,
        "cache": str(cache_dir),
        "samples": int(sums["samples"]),
        "response_tokens": int(n),
        "kl": sums["kl"] / n if exact_top else None,  # top-k + tail bucket: a lower bound of the full KL
        "kl_is_lower_bound": True,
        "kl_estimate": sums["kl_estimate"] / n if sampled else None,  # unbiased, sampled-tail caches
        "teacher_tail_mass": sums["tail"] / n,
        "top1_agreement": sums["top1"] / n if exact_top else None,
        "cross_entropy": sums["ce"] / n,
        "perplexity": math.exp(sums["ce"] / n),
        "teacher_cross_entropy": sums["teacher_ce"] / n,
        # an unbiased sequence-level KL estimate only when the responses are the teacher's own samples
        "sequence_kl_per_token": (sums["ce"] - sums["teacher_ce"]) / n if teacher_sampled(reader) else None,
        "seconds": time.perf_counter() - start,
    }
    if as_json:
        print(json.dumps(metrics, indent=2))
    else:
        parts = [f"{metrics['samples']} samples, {n} response tokens:"]
        if sampled:
            parts.append(
                f"teacher KL {metrics['kl_estimate']:.4f} nats/token (unbiased estimate of the full-vocabulary "
                f"KL from the exact top-{reader.k} and {reader.tail_draws} tail draws per token),"
            )
        if exact_top:
            parts.append(
                f"top-{reader.k} + tail bucket KL {metrics['kl']:.4f} (a lower bound of the full-vocabulary KL; "
                f"the teacher leaves {metrics['teacher_tail_mass']:.1%} of its mass outside its top-{reader.k}), "
                f"top-1 agreement {metrics['top1_agreement']:.3f},"
            )
        parts.append(
            f"cross-entropy {metrics['cross_entropy']:.4f} (perplexity {metrics['perplexity']:.2f}; teacher's own "
            f"{metrics['teacher_cross_entropy']:.4f})"
        )
        if metrics["sequence_kl_per_token"] is not None:
            parts.append(
                f"; sequence-level KL(teacher || student) {metrics['sequence_kl_per_token']:.4f} nats/token "
                "(the responses are the teacher's samples at T = 1)"
            )
        print(" ".join(parts))
    return metrics


def teacher_sampled(reader: LogitCacheReader) -> bool:
    """Whether the cache's responses are samples of the teacher's own distribution (T = 1, no top-p), so
    that likelihood differences on them estimate a KL."""
    sampling = reader.manifest.identity.get("sampling") or {}
    return sampling.get("temperature") == 1 and sampling.get("top_p", 1) == 1


def _run_cross(
    model_dir: Path, reader: LogitCacheReader, tokenizer: Any, config: Config, adapter: Path | None,
    limit: int | None, batch_size: int, as_json: bool,
) -> dict[str, Any]:
    from pipeline.cross_tokenizer.prepare import prepare_cross_tokenizer
    from pipeline.cross_tokenizer.scoring import ChunkLikelihoods

    # The chunk likelihoods need only the alignment (any cross loss's checks would be the wrong ones here).
    config = dataclasses.replace(
        config, distillation=dataclasses.replace(config.distillation, cross_tokenizer="chunk"))
    total = reader.num_samples if limit is None else min(limit, reader.num_samples)
    collate_fn, report = prepare_cross_tokenizer(config, reader, tokenizer, limit=total)
    model = load_student(model_dir, adapter)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    keep = accepts_logits_to_keep(base)
    sums = ChunkLikelihoods()
    start = time.perf_counter()
    with torch.inference_mode(), tqdm(total=total, desc="eval", unit="sample", disable=as_json) as bar:
        samples = itertools.islice(reader.iter_samples(shuffle=False, seed=0), total)
        while batch := [[sample] for sample in itertools.islice(samples, batch_size)]:
            alignments = [collate_fn.alignments[item[0].sample_id] for item in batch]
            sums.add_batch(model, collate_fn(batch), alignments, keep)
            bar.update(len(batch))
    if sums.aligned_chars == 0:
        raise UserError(f"{reader.cache_dir}: no aligned response text to score.")
    chars = sums.aligned_chars
    kl = (sums.teacher_ll - sums.student_ll) / chars if teacher_sampled(reader) else None
    metrics = {
        "model": str(model_dir),
        "adapter": str(adapter) if adapter else None,
        "cache": str(reader.cache_dir),
        "cross_tokenizer": True,
        "samples": sums.samples,
        "response_chars": sums.response_chars,
        "aligned_char_share": chars / sums.response_chars if sums.response_chars else 0.0,
        "chunks": sums.chunks,
        "student_response_tokens": sums.student_tokens,
        "cross_entropy": sums.student_ce / sums.student_tokens,  # per student token
        "perplexity": math.exp(sums.student_ce / sums.student_tokens),
        "student_nll_per_char": -sums.student_ll / chars,  # both on the aligned chunks' characters
        "teacher_nll_per_char": -sums.teacher_ll / chars,
        "sequence_kl_per_char": kl,  # the teacher's samples only: then an unbiased KL estimate
        # what the alignment covers; the loss-specific entries (loss, shared tail) do not apply to scoring
        "alignment": {k: v for k, v in report.items() if k not in ("loss", "shared_tail", "shared_vocab_mass")},
        "seconds": time.perf_counter() - start,
    }
    if as_json:
        print(json.dumps(metrics, indent=2))
    else:
        line = (
            f"{sums.samples} samples, {sums.response_chars} response characters ({metrics['aligned_char_share']:.1%} "
            f"in {sums.chunks} aligned chunks), across tokenizers: student NLL {metrics['student_nll_per_char']:.4f} "
            f"nats/char, the teacher's own {metrics['teacher_nll_per_char']:.4f}"
        )
        if kl is not None:
            line += (f"; sequence-level KL(teacher || student) {kl:.4f} nats/char (the responses are the "
                     "teacher's samples at T = 1)")
        print(line + f"; student cross-entropy {metrics['cross_entropy']:.4f} nats/token")
    return metrics


def load_student(model_dir: Path, adapter: Path | None) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(check_model_path(model_dir, "student"), dtype=torch.float32)
    if adapter is not None:
        peft = require("peft", "dev", "Loading a LoRA adapter")
        if not (Path(adapter) / "adapter_config.json").exists():
            raise UserError(f"{adapter} has no adapter_config.json: pass the train-student output directory.")
        model = peft.PeftModel.from_pretrained(model, str(adapter))
    return model.eval()


def _score_batch(model: Any, items: list, pad_id: int, sums: dict[str, float]) -> None:
    batch = collate(items, pad_id=pad_id, max_seq_length=max(len(item[0].input_ids) for item in items))
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = response_hidden_states(model, batch, accepts_logits_to_keep(base))
    head = output_head(model)
    teacher_ids, teacher_lp, teacher_tail = batch["topk_ids"][0], batch["topk_logprobs"][0], batch["tail_logmass"][0]
    target_lp = torch.cat([item[0].target_logprobs[item[0].positions < batch["input_ids"].shape[1]]
                           for item in items])
    for start in range(0, hidden.shape[0], HEAD_CHUNK):
        rows = slice(start, start + HEAD_CHUNK)
        z = torch.nn.functional.linear(hidden[rows].float(), head.weight.float(),
                                       None if head.bias is None else head.bias.float())
        lse = torch.logsumexp(z, 1)
        targets = batch["targets"][rows]
        sums["ce"] += (lse - z.gather(1, targets[:, None]).squeeze(1)).sum().item()
        if batch["sample_ids"][0] is not None:
            sums["kl_estimate"] += _sampled_kl_estimate(z, lse, batch, rows).item()
        if teacher_ids.shape[1] == 0:  # a purely sampled cache: no exact top-k, no bucket KL, no top-1
            continue
        ids, a = teacher_ids[rows], teacher_lp[rows]
        # As in training (pipeline.student.losses): -inf entries and ids past the student's vocabulary (a teacher
        # head padded further, e.g. 152,064 rows against 151,936) are no class; they point at the row's
        # first real entry so that gathers and scatters stay in range.
        in_s = torch.isfinite(a) & (ids < z.shape[1])
        first = ids.gather(1, in_s.int().argmax(1, keepdim=True)).clamp(max=z.shape[1] - 1)
        ids = torch.where(in_s, ids, first)
        z_s = z.gather(1, ids).masked_fill(~in_s, float("-inf"))
        rest = z.scatter(1, ids, float("-inf"))
        lse_rest = torch.logsumexp(rest, 1)
        has_tail = torch.isfinite(lse_rest)
        logq = torch.cat([z_s - lse[:, None], (lse_rest - lse)[:, None]], 1)
        logp = teacher_class_logprobs(a, teacher_tail[rows].masked_fill(~has_tail, float("-inf")), 1.0)
        valid = torch.cat([in_s, has_tail[:, None]], 1)
        sums["kl"] += divergence("forward_kld", logp, logq, valid).sum().item()
        sums["top1"] += (z.argmax(1) == teacher_ids[rows, 0]).sum().item()
    sums["teacher_ce"] += -target_lp.sum().item()
    sums["tail"] += teacher_tail.exp().sum().item()
    sums["tokens"] += int(batch["targets"].numel())
    sums["samples"] += len(items)


def _sampled_kl_estimate(z: torch.Tensor, lse: torch.Tensor, batch: dict, rows: slice) -> torch.Tensor:
    """Sum over the chunk's rows of the unbiased full-vocabulary KL estimate (module docstring).

    Classes the student cannot hold (ids past its vocabulary) are left out, as in training."""
    vocab = z.shape[1]
    logq_all = z - lse[:, None]
    a, ids = batch["topk_logprobs"][0][rows].double(), batch["topk_ids"][0][rows]
    head = torch.isfinite(a) & (ids < vocab)
    lq = logq_all.gather(1, ids.clamp(max=vocab - 1)).double()
    exact = torch.where(head, a.exp() * (a - lq), 0.0).sum()
    sid, counts = batch["sample_ids"][0][rows], batch["sample_counts"][0][rows].double()
    b = batch["sample_logprobs"][0][rows].double()
    real = (counts > 0) & (sid < vocab)
    draws = counts.sum(1, keepdim=True).clamp(min=1)
    weight = batch["tail_logmass"][0][rows].double().exp()[:, None] * counts / draws
    lq_s = logq_all.gather(1, sid.clamp(max=vocab - 1)).double()
    return exact + torch.where(real, weight * (b - lq_s), 0.0).sum()
