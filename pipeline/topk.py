"""Output head + top-k + target log-prob + tail log-mass, in chunked torch ops.

The teacher's final hidden states at positions t-1 (one row per response token t) go through the
output head chunk by chunk, so no [positions, vocab] float32 tensor of a whole batch ever exists.
Per row we return the top-k ids and log-probs (full-vocabulary log-softmax at temperature 1, sorted
descending), the log-prob of the target token and the log of the probability mass outside the top-k,
summed over the non-top-k probabilities themselves (never 1 - sum p_topk, which cancels).

Why not torch.topk on the whole row: on CPU it costs ~2x the head matmul of a 512-wide model (the
matmul runs on AMX/tensor cores, topk is scalar code at ~6 ns per element). Two smaller top-k calls
select exactly the same ids: split the vocabulary into G strided groups (group g = ids g, g+G, ...)
and take the k groups with the largest maxima. Every top-k logit lies in one of them (ties aside):
a logit outside them is <= the k-th largest group max, and those k groups already hold k logits at
least that large. So topk runs over G group maxima and then over the k * V/G members of the chosen
groups instead of over V logits; G ~ sqrt(k V) balances the two.
"""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.errors import UserError


@dataclass
class TopKResult:
    """Tensors for n rows: ids int32 [n, k], logprobs float32 [n, k], target/tail float32 [n]."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    target_logprobs: torch.Tensor
    tail_logmass: torch.Tensor

    @staticmethod
    def cat(parts: list[TopKResult]) -> TopKResult:
        return TopKResult(
            *(torch.cat(tensors) for tensors in zip(*(p.astuple() for p in parts), strict=True))
        )

    def astuple(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.ids, self.logprobs, self.target_logprobs, self.tail_logmass


class OutputHead:
    """The teacher's output projection, padded with zero rows to a multiple of the group count G.

    `logit_scale` and `softcap` reproduce architectures that transform the logits after the matmul
    (Cohere/Granite scale them, Gemma 2 soft-caps them); both are monotonic, so only the log-sum-exp
    sees them.
    """

    def __init__(self, weight: torch.Tensor, *, logit_scale: float = 1.0, softcap: float | None = None):
        self.weight = weight
        self.vocab_size = weight.shape[0]
        self.logit_scale = logit_scale
        self.softcap = softcap
        self._padded: dict[tuple[torch.dtype, torch.device, int], torch.Tensor] = {}

    def to(self, device: torch.device | str) -> OutputHead:
        self.weight = self.weight.to(device)
        self._padded.clear()
        return self

    def padded_weight(self, like: torch.Tensor, groups: int) -> torch.Tensor:
        """The weight in `like`'s dtype and device, padded to a multiple of `groups` rows."""
        key = (like.dtype, like.device, groups)
        if key not in self._padded:  # converted and padded once, not per chunk
            pad = -self.vocab_size % groups
            weight = self.weight.to(device=like.device, dtype=like.dtype)
            self._padded[key] = torch.cat([weight, weight.new_zeros(pad, weight.shape[1])]) if pad else weight
        return self._padded[key]

    def logits(self, hidden: torch.Tensor, groups: int) -> torch.Tensor:
        """[n, V padded to a multiple of `groups`] logits in the hidden states' dtype; padding is -inf."""
        logits = hidden @ self.padded_weight(hidden, groups).T
        if self.logit_scale != 1.0:
            logits.mul_(self.logit_scale)
        if self.softcap is not None:
            logits.div_(self.softcap).tanh_().mul_(self.softcap)
        logits[:, self.vocab_size :] = float("-inf")
        return logits


def load_output_head(model_dir: Path) -> OutputHead:
    """Read only the output head (or the tied input embedding) from a model's safetensors files."""
    from safetensors import safe_open

    config = json.loads((model_dir / "config.json").read_text())
    text_config = config.get("text_config", config)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UserError(
            f"{model_dir} holds no *.safetensors weights; the vllm engine reads the output head from them."
        )
    keys: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            keys.update(dict.fromkeys(handle.keys(), file))
    name = next((key for key in keys if key.endswith("lm_head.weight")), None)
    if name is None:  # tied embeddings: the checkpoint stores only the input embedding
        name = next((key for key in keys if key.endswith("embed_tokens.weight")), None)
    if name is None:
        raise UserError(
            f"Cannot find the output head (lm_head.weight) in {model_dir}; try `inference.engine: hf`."
        )
    with safe_open(str(keys[name]), framework="pt") as handle:
        weight = handle.get_tensor(name)
    return OutputHead(weight, **head_transforms(text_config))


def head_transforms(config: dict) -> dict:
    """Logit transforms a transformers config applies after the output matmul."""
    scale = float(config.get("logit_scale") or 1.0)  # Cohere multiplies
    if config.get("logits_scaling"):  # Granite divides
        scale /= float(config["logits_scaling"])
    return {"logit_scale": scale, "softcap": config.get("final_logit_softcapping")}


def topk_from_hidden(
    hidden: torch.Tensor, head: OutputHead, targets: torch.Tensor, k: int, chunk_size: int, workers: int = 1
) -> TopKResult:
    """Top-k of softmax(head(hidden)) for each row; hidden [n, H] holds the states at positions t-1.

    `workers` > 1 runs chunks in that many threads with one intra-op thread each: chunks share
    nothing, so a thread the OS deschedules delays only its own chunk, while OpenMP threads spin at
    every op's barrier (10x slower than one thread on a busy 2-core host, measured).
    """
    groups = num_groups(head.vocab_size, k)
    targets = targets.to(hidden.device)
    head.padded_weight(hidden, groups)  # converted once, before any worker thread needs it

    def chunk(start: int) -> TopKResult:
        rows = slice(start, start + chunk_size)
        return _select(head.logits(hidden[rows], groups), head.vocab_size, targets[rows], k)

    starts = range(0, hidden.shape[0], chunk_size)
    if workers > 1 and len(starts) > 1:
        with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            parts = list(pool.map(chunk, starts))
    else:
        parts = [chunk(start) for start in starts]
    return TopKResult.cat(parts) if len(parts) != 1 else parts[0]


def topk_from_logits(logits: torch.Tensor, targets: torch.Tensor, k: int) -> TopKResult:
    """The same for ready-made logits [n, V] (any float dtype)."""
    vocab = logits.shape[1]
    pad = -vocab % num_groups(vocab, k)
    if pad:
        logits = torch.cat([logits, logits.new_full((logits.shape[0], pad), float("-inf"))], dim=1)
    return _select(logits, vocab, targets, k)


def num_groups(vocab: int, k: int) -> int:
    """G: a power of two near sqrt(k V), at least k (k groups are chosen) and at most V."""
    if k > vocab:
        raise UserError(f"top_logits_num {k} is larger than the vocabulary ({vocab}).")
    return min(max(k, 2 ** round(math.log2(math.sqrt(k * vocab)))), vocab)


def _select(logits: torch.Tensor, vocab: int, targets: torch.Tensor, k: int) -> TopKResult:
    """logits [n, G * R], padded with -inf past `vocab`; see the module docstring for the method."""
    n = logits.shape[0]
    groups = num_groups(vocab, k)
    rows_per_group = logits.shape[1] // groups
    # One fused float32 pass (bf16 logits are exact in float32); gives log Z and the tail terms.
    probs = torch.softmax(logits, dim=1, dtype=torch.float32)
    xg = logits.view(n, rows_per_group, groups)  # xg[:, r, g] = logit of id r * G + g
    _, chosen = torch.topk(xg.amax(dim=1), k, dim=1, sorted=False)  # [n, k] group indices
    member_index = chosen[:, None, :].expand(n, rows_per_group, k)
    members = xg.gather(2, member_index).reshape(n, rows_per_group * k).float()
    top_vals, top_slots = torch.topk(members, k, dim=1)  # sorted descending
    offsets = groups * torch.arange(rows_per_group, device=logits.device)
    member_ids = (chosen[:, None, :] + offsets[None, :, None]).reshape(n, -1)
    top_ids = member_ids.gather(1, top_slots)

    # Mass outside the top-k = the groups not chosen + the chosen groups' members outside the top-k.
    group_mass = probs.view(n, rows_per_group, groups).sum(dim=1).scatter_(1, chosen, 0.0)
    member_mass = probs.view(n, rows_per_group, groups).gather(2, member_index).reshape(n, -1)
    tail = group_mass.sum(dim=1) + member_mass.scatter_(1, top_slots, 0.0).sum(dim=1)
    # log Z from the top-1 entry: p_max = exp(x_max - log Z), and p_max >= 1/V keeps it precise.
    log_z = top_vals[:, 0] - torch.log(probs.gather(1, top_ids[:, :1])[:, 0])
    return TopKResult(
        ids=top_ids.to(torch.int32),
        logprobs=top_vals - log_z[:, None],
        target_logprobs=logits.gather(1, targets.view(-1, 1).long())[:, 0].float() - log_z,
        tail_logmass=torch.log(tail),
    )
