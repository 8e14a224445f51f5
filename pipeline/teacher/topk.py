"""Output head + top-k + target log-prob + tail log-mass, in chunked torch ops.

The teacher's final hidden states at positions t-1 (one row per response token t) go through the
output head chunk by chunk, so no [positions, vocab] float32 tensor of a whole batch ever exists.
Per row we return the top-k ids and log-probs (full-vocabulary log-softmax at temperature 1, sorted
descending), the log-prob of the target token and the log of the probability mass outside the top-k,
summed over the non-top-k probabilities themselves (never 1 - sum p_topk, which cancels).

Why not torch.topk and log_softmax on the whole row: on CPU torch.topk alone costs ~3x the head
matmul of a 512-wide model (the matmul runs on AMX, topk is scalar code at ~4 ns per element), and
each eager op is another pass over [rows, V] floats. Instead, one fused pass (torch.compile) gives
per-group maxima and exp-sums, and two small selections find exactly the top-k ids: split the
vocabulary into G strided groups (group g = ids g, g+G, ...) and take the k groups with the largest
maxima. Every top-k logit lies in one of them (ties aside): a logit outside them is <= the k-th
largest group max, and those k groups already hold k logits at least that large. So selection runs
over G group maxima and then over the k * V/G members of the chosen groups instead of over V logits;
G ~ sqrt(k V) balances the two. On CPU both selections use NumPy's SIMD partition and sort.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import UserError
from pipeline.teacher.tail_sampling import TailSamples, draw_tail

log = logging.getLogger(__name__)


@dataclass
class TopKResult:
    """Tensors for n rows: ids int32 [n, k], logprobs float32 [n, k], target/tail float32 [n], and the
    sampled tail (pipeline.teacher.tail_sampling) when draws were asked for."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    target_logprobs: torch.Tensor
    tail_logmass: torch.Tensor
    samples: TailSamples | None = None

    @staticmethod
    def cat(parts: list[TopKResult]) -> TopKResult:
        samples = None
        if parts[0].samples is not None:
            samples = TailSamples(
                *(torch.cat([getattr(p.samples, f) for p in parts]) for f in ("ids", "counts", "logprobs"))
            )
        return TopKResult(
            *(torch.cat(tensors) for tensors in zip(*(p.astuple() for p in parts), strict=True)), samples
        )

    def astuple(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.ids, self.logprobs, self.target_logprobs, self.tail_logmass


class OutputHead:
    """The teacher's output projection (weight [V, H], optional bias [V]), padded with zero rows to a
    multiple of the group count G.

    Logits are float32 whatever the hidden states' dtype: in bfloat16 a logit in [16, 32) would be
    rounded to a multiple of 0.125 nat, three times the codec's 1/48 nat bound. On a GPU the matmul
    reads the checkpoint's dtype and accumulates and writes float32 (`torch.mm(..., out_dtype=)`); on
    CPU, which lacks that kernel, the weight is held in float32. Only one copy of the weight is held:
    it is padded (and converted) where it is, once, before it moves to `device`.

    `logit_scale` and `softcap` reproduce architectures that transform the logits after the matmul
    (Cohere/Granite scale them, Gemma 2 soft-caps them); both are monotonic, so only the log-sum-exp
    sees them.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        logit_scale: float = 1.0,
        softcap: float | None = None,
    ):
        self.vocab_size = weight.shape[0]
        self.device = weight.device
        self._weight = weight.detach()
        self.bias = None if bias is None else bias.detach().float()
        self.logit_scale = logit_scale
        self.softcap = softcap
        self._float32_matmul = False  # set where this torch build lacks mm(..., out_dtype=float32)

    @property
    def weight(self) -> torch.Tensor:
        """[V, H]: a view of the one (padded) copy held."""
        return self._weight[: self.vocab_size]

    def to(self, device: torch.device | str) -> OutputHead:
        """Run the head on `device`; the weight moves there when it is first padded, so that the device
        never holds an unpadded copy beside the padded one."""
        self.device = torch.device(device)
        return self

    def padded_weight(self, like: torch.Tensor, groups: int) -> torch.Tensor:
        """The weight padded to a multiple of `groups` rows, on `device`, in the dtype its matmul reads:
        `like`'s on a GPU, float32 on CPU. Converted and padded once, replacing the copy held before."""
        on_cpu = self.device.type == "cpu"
        dtype = torch.float32 if on_cpu or self._float32_matmul else like.dtype
        rows = self.vocab_size + (-self.vocab_size % groups)
        held = self._weight
        if held.shape[0] != rows or held.dtype != dtype or held.device != self.device:
            real = held[: self.vocab_size]
            pad = rows - self.vocab_size
            padded = torch.cat([real, real.new_zeros(pad, real.shape[1])]) if pad else real
            self._weight = padded.to(device=self.device, dtype=dtype)
        if self.bias is not None and self.bias.device != self.device:
            self.bias = self.bias.to(self.device)
        return self._weight

    def logits(self, hidden: torch.Tensor, groups: int) -> torch.Tensor:
        """float32 [n, V padded to a multiple of `groups`] logits; padding is -inf."""
        weight = self.padded_weight(hidden, groups)
        if weight.dtype == torch.float32:
            logits = hidden.float() @ weight.T
        else:
            try:  # float32 accumulation and output from the checkpoint's dtype, at its speed
                logits = torch.mm(hidden.to(weight.dtype), weight.T, out_dtype=torch.float32)
            except (RuntimeError, TypeError, NotImplementedError) as exc:
                log.warning("no float32-output matmul for %s (%s); holding the head in float32", weight.dtype, exc)
                self._float32_matmul = True
                return self.logits(hidden, groups)
        if self.bias is not None:
            logits[:, : self.vocab_size] += self.bias
        if self.logit_scale != 1.0:
            logits.mul_(self.logit_scale)
        if self.softcap is not None:
            logits.div_(self.softcap).tanh_().mul_(self.softcap)
        logits[:, self.vocab_size :] = float("-inf")
        return logits


def load_output_head(model: Path | str) -> OutputHead:
    """Read only the output head (or the tied input embedding), and its bias if any, from a model's
    safetensors files.

    `model` is a local directory or a hub id, resolved through the Hugging Face cache (where vLLM
    downloads the same files).
    """
    from safetensors import safe_open

    model_dir = Path(model)
    if not model_dir.is_dir():
        from huggingface_hub import snapshot_download

        model_dir = Path(snapshot_download(str(model), allow_patterns=["*.json", "*.safetensors"]))
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
    if name is None and text_config.get("tie_word_embeddings", True):  # transformers' default: tied
        name = next((key for key in keys if key.endswith("embed_tokens.weight")), None)
    if name is None:
        raise UserError(
            f"Cannot find the output head (lm_head.weight) in {model_dir}; try `inference.engine: hf`."
        )
    bias_name = name.removesuffix("weight") + "bias" if name.endswith("lm_head.weight") else None
    with safe_open(str(keys[name]), framework="pt") as handle:
        weight = handle.get_tensor(name)
    bias = None
    if bias_name in keys:  # Phi, GPT-J and others add a bias to the logits
        with safe_open(str(keys[bias_name]), framework="pt") as handle:
            bias = handle.get_tensor(bias_name)
    return OutputHead(weight, bias, **head_transforms(text_config))


def head_transforms(config: dict) -> dict:
    """Logit transforms a transformers config applies after the output matmul."""
    scale = float(config.get("logit_scale") or 1.0)  # Cohere multiplies
    if config.get("logits_scaling"):  # Granite divides
        scale /= float(config["logits_scaling"])
    return {"logit_scale": scale, "softcap": config.get("final_logit_softcapping")}


def topk_from_hidden(
    hidden: torch.Tensor,
    head: OutputHead,
    targets: torch.Tensor,
    k: int,
    chunk_size: int,
    workers: int = 1,
    uniforms: torch.Tensor | None = None,
) -> TopKResult:
    """Top-k of softmax(head(hidden)) for each row; hidden [n, H] holds the states at positions t-1.

    With `uniforms` (float64 [n, U]), each row also draws U ids from its tail in the same pass over
    the chunk's logits (pipeline.teacher.tail_sampling.draw_tail).

    The group statistics run torch.compile'd (one fused pass over each chunk's logits instead of ~5
    eager ones), on chunks padded to `chunk_size` rows so that one static shape compiles.
    Chunks run in `workers` threads with one intra-op thread each: chunks share nothing, so a thread
    the OS deschedules delays only its own chunk, while OpenMP threads spin at every op's barrier
    (8-10x slower than one thread on a busy 2-core host, measured).
    """
    groups = num_groups(head.vocab_size, k)
    targets = targets.to(hidden.device)
    head.padded_weight(hidden, groups)  # converted once, before any worker thread needs it

    def chunk(start: int) -> TopKResult:
        rows, row_targets = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        real = rows.shape[0]
        if real < chunk_size:
            rows = torch.cat([rows, rows.new_zeros(chunk_size - real, rows.shape[1])])
            row_targets = torch.cat([row_targets, row_targets.new_zeros(chunk_size - real)])
        logits = head.logits(rows, groups)
        out = TopKResult(*(t[:real] for t in _select(logits, row_targets, k, groups, compiled=True)))
        if uniforms is not None:
            out.samples = draw_tail(logits[:real], out.ids, uniforms[start : start + real])
        return out

    starts = list(range(0, hidden.shape[0], chunk_size))
    # Always in threads with one intra-op thread: torch.compile guards on the thread count.
    with ThreadPoolExecutor(max(1, workers), initializer=torch.set_num_threads, initargs=(1,)) as pool:
        parts = [pool.submit(chunk, starts[0]).result()]  # compiles, if needed, before others call it
        parts += pool.map(chunk, starts[1:])
    return TopKResult.cat(parts) if len(parts) != 1 else parts[0]


def topk_from_logits(
    logits: torch.Tensor, targets: torch.Tensor, k: int, uniforms: torch.Tensor | None = None
) -> TopKResult:
    """The same for ready-made logits [n, V] (any float dtype), run eagerly (any shape, no compile)."""
    vocab = logits.shape[1]
    groups = num_groups(vocab, k)
    pad = -vocab % groups
    if pad:
        logits = torch.cat([logits, logits.new_full((logits.shape[0], pad), float("-inf"))], dim=1)
    out = TopKResult(*_select(logits, targets, k, groups, compiled=False))
    if uniforms is not None:
        out.samples = draw_tail(logits, out.ids, uniforms)
    return out


def num_groups(vocab: int, k: int) -> int:
    """G: a power of two near sqrt(k V), at least k (k groups are chosen) and at most V; 1 for k = 0."""
    if k > vocab:
        raise UserError(f"top_logits_num {k} is larger than the vocabulary ({vocab}).")
    if k == 0:
        return 1
    return min(max(k, 2 ** round(math.log2(math.sqrt(k * vocab)))), vocab)


def _select(
    logits: torch.Tensor, targets: torch.Tensor, k: int, groups: int, compiled: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [n, G * R] (-inf past the vocabulary) -> ids, log-probs, target log-probs, tail log-mass.

    See the module docstring for the group method; `compiled` runs the two float passes fused.
    """
    run = _run_compiled if compiled else _run_eager
    n = logits.shape[0]
    if k == 0:  # a purely sampled cache: no head, the whole mass is the tail
        log_z = torch.logsumexp(logits.float(), dim=1)
        target = logits.gather(1, targets.view(-1, 1).long())[:, 0].float() - log_z
        empty = logits.new_zeros((n, 0))
        return empty.to(torch.int32), empty.float(), target, torch.zeros_like(target)
    rows_per_group = logits.shape[1] // groups
    group_max, group_sum = run(_group_stats, logits, groups)
    chosen = _top_indices(group_max, k, descending=False)  # [n, k] group indices
    xg = logits.view(n, rows_per_group, groups)  # xg[:, r, g] = logit of id r * G + g
    members = xg.gather(2, chosen[:, None, :].expand(n, rows_per_group, k)).reshape(n, -1).float()
    top_slots = _top_indices(members, k, descending=True)
    offsets = groups * torch.arange(rows_per_group, device=logits.device)
    top_ids = (chosen[:, None, :] + offsets[None, :, None]).reshape(n, -1).gather(1, top_slots)
    target_logits = logits.gather(1, targets.view(-1, 1).long())[:, 0].float()
    logprobs, target_logprobs, tail_logmass = run(
        _normalize, group_max, group_sum, members, chosen, top_slots, target_logits
    )
    return top_ids.to(torch.int32), logprobs, target_logprobs, tail_logmass


def _group_stats(logits: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per strided group: max, and sum of exp(logit - max), both float32 [n, G]."""
    xg = logits.view(logits.shape[0], -1, groups).float()
    group_max = xg.amax(dim=1)
    return group_max, torch.exp(xg - group_max[:, None, :]).sum(dim=1)


def _normalize(
    group_max: torch.Tensor,
    group_sum: torch.Tensor,
    members: torch.Tensor,
    chosen: torch.Tensor,
    top_slots: torch.Tensor,
    target_logits: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probs from per-group sums, each shifted by its group's max and rescaled to the row max m:
    every sum is of positive terms (no cancellation); only terms below e^-88 of the max flush to 0."""
    top_vals = members.gather(1, top_slots)
    row_max = top_vals[:, :1]
    group_mass = group_sum * torch.exp(group_max - row_max)  # sum of exp(logit - m) per group
    z = group_mass.sum(dim=1)
    # Mass outside the top-k = the groups not chosen + the chosen groups' members outside the top-k.
    tail = group_mass.scatter(1, chosen, 0.0).sum(dim=1)
    tail = tail + torch.exp(members - row_max).scatter(1, top_slots, 0.0).sum(dim=1)
    log_z = row_max[:, 0] + torch.log(z)
    return top_vals - log_z[:, None], target_logits - log_z, torch.log(tail / z)


def _top_indices(x: torch.Tensor, k: int, *, descending: bool) -> torch.Tensor:
    """Column indices of each row's k largest values of a float32 [n, w] tensor, sorted if `descending`.

    On CPU through NumPy, whose SIMD partition and sort are 3-4x faster than torch.topk (and release
    the GIL, so worker threads overlap).
    """
    if x.device.type != "cpu":
        return torch.topk(x, k, dim=1, sorted=descending).indices
    values = x.numpy()
    index = np.argpartition(values, values.shape[1] - k, axis=1)[:, values.shape[1] - k :]
    if descending:
        order = np.argsort(-np.take_along_axis(values, index, axis=1), axis=1)
        index = np.take_along_axis(index, order, axis=1)
    return torch.from_numpy(index)


def _run_eager(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


def _run_compiled(fn: Callable[..., Any], *args: Any) -> Any:
    """fn as fused torch.compile kernels; eager (after one warning) where compiling fails, e.g. on a
    host without a C++ compiler."""
    global _compile_failed
    if not _compile_failed:
        try:
            return _compiled(fn)(*args)
        except Exception as exc:  # any backend error: the eager function computes the same
            _compile_failed = True
            log.warning("torch.compile of %s failed (%s); running the top-k math eagerly", fn.__name__, exc)
    return fn(*args)


_compile_failed = False


@functools.cache
def _compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    import torch._inductor.config

    # Inductor's CPU kernels then size their OpenMP team per call (1 in the worker threads).
    torch._inductor.config.cpp.dynamic_threads = True
    return torch.compile(fn, dynamic=False)
