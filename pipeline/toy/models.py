"""Small real models for tests, benchmarks and the demo, built locally with no hub download.

The artifacts are ordinary model directories (config, safetensors, tokenizer files), so every
consumer goes through the same `AutoTokenizer` / `AutoModelForCausalLM.from_pretrained` paths
as with a hub checkout. Run `python -m pipeline.toy.models --profile demo` to build them.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from pipeline.toy.data import local_corpus, write_instruction_dataset

__all__ = [
    "CHAT_TEMPLATE",
    "PROFILES",
    "ToyAssets",
    "build_model",
    "ensure_cross_assets",
    "ensure_toy_assets",
    "heldout_stats",
    "local_corpus",
    "pretrain",
    "train_tokenizer",
    "write_instruction_dataset",
]

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
HEAD_DIM = 64  # vLLM's CPU attention rejects smaller head sizes

# ChatML as in Qwen2 (without Qwen's default system message): one block per message, any roles.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


# A second family for cross-tokenizer distillation: Llama 3's turn format and special tokens.
LLAMA_SPECIALS = ("<|end_of_text|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
LLAMA_CHAT_TEMPLATE = (
    "{{- '<|begin_of_text|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


def train_tokenizer(
    out_dir: Path, vocab_size: int = 8192, corpus: list[str] | None = None, style: str = "chatml"
) -> Path:
    """Train a byte-level BPE (deterministic for a given corpus) and save it as a HF tokenizer dir.

    style "chatml": Qwen2's special tokens and ChatML; "llama": Llama 3's special tokens and turn format.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = [ENDOFTEXT, IM_START, IM_END] if style == "chatml" else list(LLAMA_SPECIALS)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,  # ids 0, 1, 2, ...
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte stays encodable
        show_progress=False,
    )
    tok.train_from_iterator(local_corpus("teacher") if corpus is None else corpus, trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END if style == "chatml" else "<|eot_id|>",
        pad_token=ENDOFTEXT if style == "chatml" else "<|end_of_text|>",
        extra_special_tokens=[IM_START] if style == "chatml" else list(LLAMA_SPECIALS[1:4]),
        chat_template=CHAT_TEMPLATE if style == "chatml" else LLAMA_CHAT_TEMPLATE,
        model_max_length=4096,
        clean_up_tokenization_spaces=False,  # keep decode(encode(code)) == code
    )
    hf_tok.save_pretrained(out_dir)
    return Path(out_dir)


def build_model(
    out_dir: Path,
    tokenizer_dir: Path,
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    seed: int = 0,
    dtype: str = "float32",
) -> Path:
    """Save a random-init Qwen2ForCausalLM plus the tokenizer files: a complete model dir."""
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    if hidden_size != HEAD_DIM * num_heads:
        raise ValueError(f"head_dim must be {HEAD_DIM}: hidden_size {hidden_size} / num_heads {num_heads}")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    eot, eos = tokenizer.pad_token_id, tokenizer.eos_token_id  # end of text, end of turn
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        max_position_embeddings=4096,
        max_window_layers=num_layers,
        tie_word_embeddings=False,
        bos_token_id=eot,
        eos_token_id=eos,
        pad_token_id=eot,
        dtype=dtype,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(getattr(torch, dtype))
    # Chat replies end with <|im_end|>; raw text with <|endoftext|> (as Qwen2 does).
    model.generation_config = GenerationConfig(bos_token_id=eot, eos_token_id=[eos, eot], pad_token_id=eot)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    counts = parameter_counts(out_dir)
    print(
        f"[toy] built {Path(out_dir).name}: {counts['num_parameters'] / 1e6:.2f}M parameters, "
        f"output head {100 * counts['head_share']:.1f}%",
        flush=True,
    )
    return Path(out_dir)


def parameter_counts(model_dir: Path) -> dict[str, Any]:
    """Parameter count and output-head share, read from the safetensors headers (no weights loaded)."""
    from safetensors import safe_open

    total = head = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for name in f.keys():
                n = math.prod(f.get_slice(name).get_shape())
                total += n
                head += n if name.startswith("lm_head.") else 0
    return {"num_parameters": total, "head_parameters": head, "head_share": head / total}


def _packed_stream(tokenizer: Any, texts: list[str], seq_len: int) -> torch.Tensor:
    """All texts as one token stream, documents separated by <|endoftext|> (ordinary LM pre-training)."""
    eot = tokenizer.pad_token_id  # the end-of-text token
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    stream = torch.tensor([i for enc in encodings for i in (*enc.ids, eot)], dtype=torch.long)
    if len(stream) <= seq_len:
        raise ValueError(f"{len(stream)} tokens of text is too little for seq_len {seq_len}")
    return stream


def heldout_stats(model_dir: Path, *, batch_size: int = 4, seq_len: int = 256) -> dict[str, float]:
    """Loss and shape of the next-token distributions on held-out text: is the model peaked or uniform?"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    texts = local_corpus("heldout", max_chars=300_000)
    stream = _packed_stream(AutoTokenizer.from_pretrained(model_dir), texts, seq_len)
    offsets = torch.linspace(0, len(stream) - seq_len, batch_size).long().tolist()  # spread over files
    batch = torch.stack([stream[o : o + seq_len] for o in offsets])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        out = model(input_ids=batch, labels=batch)
    logp = out.logits.log_softmax(-1)
    probs = logp.exp()
    return {
        "heldout_loss": out.loss.item(),
        "heldout_entropy": -(probs * logp).sum(-1).mean().item(),
        "heldout_top1_prob": probs.max(-1).values.mean().item(),
        "heldout_top20_mass": probs.topk(20, dim=-1).values.sum(-1).mean().item(),
        "heldout_top64_mass": probs.topk(64, dim=-1).values.sum(-1).mean().item(),
    }


@contextmanager
def _polite_threads(n: int) -> Iterator[None]:
    """Cap torch at `n` threads unless the user chose a thread count (OMP_NUM_THREADS)."""
    before = torch.get_num_threads()
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(min(before, n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pretrain(
    model_dir: Path,
    texts: list[str],
    *,
    steps: int,
    batch_size: int = 8,
    seq_len: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
    log_every: int = 50,
) -> dict[str, Any]:
    """Causal-LM pre-training on random windows of the packed texts; saves the weights back in place.

    Returns {"final_loss", "first_loss", "steps", "seconds", "cpu_seconds", "tokens"}; final_loss
    is the mean over the last 10% of steps (one batch is noisy).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with _polite_threads(2):
        stream = _packed_stream(AutoTokenizer.from_pretrained(model_dir), texts, seq_len)
        saved_dtype = AutoConfig.from_pretrained(model_dir).dtype
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)  # train in fp32
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
        warmup = max(1, steps // 20)

        def lr_factor(step: int) -> float:  # linear warmup, then cosine down to 10%
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, steps - warmup)
            return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
        gen = torch.Generator().manual_seed(seed)
        losses: list[float] = []
        start, cpu_start = time.perf_counter(), time.process_time()
        for step in range(steps):
            offsets = torch.randint(0, len(stream) - seq_len, (batch_size,), generator=gen)
            batch = torch.stack([stream[o : o + seq_len] for o in offsets.tolist()])
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            losses.append(loss.item())
            if (step + 1) % log_every == 0 or step + 1 == steps:
                elapsed = time.perf_counter() - start
                print(
                    f"[pretrain {Path(model_dir).name}] step {step + 1}/{steps} loss {losses[-1]:.3f} "
                    f"lr {schedule.get_last_lr()[0]:.1e} {(step + 1) * batch.numel() / elapsed:.0f} tok/s",
                    flush=True,
                )
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        model.to(saved_dtype).save_pretrained(model_dir)
    tail = losses[-max(1, steps // 10) :]
    return {
        "final_loss": sum(tail) / len(tail),
        "first_loss": losses[0],
        "steps": steps,
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,  # all threads; depends less on other load than `seconds`
        "tokens": steps * batch_size * seq_len,
    }


@dataclass
class ToyAssets:
    tokenizer_dir: Path
    teacher_dir: Path
    student_dir: Path
    teacher_info: dict[str, Any]  # build and pre-training parameters and results of the teacher


def _tokenizer_spec(vocab_size: int, corpus_chars: int) -> dict[str, Any]:
    return {"vocab_size": vocab_size, "split": "teacher", "corpus_chars": corpus_chars}


# Each artifact is (directory name, parameters); the same name with the same parameters is shared
# between profiles, so "bench" reuses the demo's tokenizer and student. Step counts are sized by
# measurement on 2 shared cores (see ensure_toy_assets); windows of 512 tokens cover the demo's
# longest samples, so no position the demo uses is untrained.
_TOKENIZER_8K = ("tokenizer-8k", _tokenizer_spec(8192, 4_000_000))
# Brief on purpose: a student pre-trained as long as the teacher catches up with it (measured), and
# then the demo has nothing to distill.
_SMALL_STUDENT_MODEL = {"hidden_size": 128, "num_layers": 2, "num_heads": 2, "intermediate_size": 512, "seed": 1}
_SMALL_STUDENT = (
    "student-small",
    {
        "model": _SMALL_STUDENT_MODEL,
        "pretrain": {"split": "student", "corpus_chars": 1_000_000, "steps": 20, "batch_size": 4,
                     "seq_len": 512, "lr": 3e-3, "seed": 1},
    },
)
_TEACHER_8M_MODEL = {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2,
                     "intermediate_size": 1024, "seed": 0}  # 8.1M parameters, head_dim 64 (vLLM CPU)
PROFILES: dict[str, dict[str, Any]] = {
    "demo": {
        "tokenizer": _TOKENIZER_8K,
        "teacher": (
            "teacher-demo",
            {
                "model": _TEACHER_8M_MODEL,
                "pretrain": {"split": "teacher", "corpus_chars": 4_000_000, "steps": 200, "batch_size": 4,
                             "seq_len": 512, "lr": 3e-3, "seed": 0},
            },
        ),
        "student": _SMALL_STUDENT,
    },
    "bench": {
        "tokenizer": _TOKENIZER_8K,
        "teacher": (
            "teacher-bench",
            {
                "model": {"hidden_size": 512, "num_layers": 10, "num_heads": 8, "num_kv_heads": 2,
                          "intermediate_size": 2048, "seed": 0},
                "pretrain": {"split": "teacher", "corpus_chars": 4_000_000, "steps": 96, "batch_size": 2,
                             "seq_len": 512, "lr": 3e-3, "seed": 0},
            },
        ),
        "student": _SMALL_STUDENT,
        "max_head_share": 0.10,  # like a real LLM, where the output head is a small part of the work
    },
    # For bench/quality.py: a teacher trained on 8x the demo teacher's tokens, so that its next-token
    # distributions are more peaked (the demo teacher leaves ~37% of its mass outside its top 64,
    # which no top-k cache can carry), and a student with a real, if brief, pre-training of its own.
    # About 30 minutes on 2 cores, once.
    "quality": {
        "tokenizer": _TOKENIZER_8K,
        "teacher": (
            "teacher-quality",
            {
                "model": _TEACHER_8M_MODEL,
                "pretrain": {"split": "teacher", "corpus_chars": 8_000_000, "steps": 1600, "batch_size": 8,
                             "seq_len": 256, "lr": 3e-3, "seed": 0},
            },
        ),
        "student": (
            "student-quality",
            {
                "model": _SMALL_STUDENT_MODEL,
                "pretrain": {"split": "student", "corpus_chars": 2_000_000, "steps": 300, "batch_size": 8,
                             "seq_len": 256, "lr": 3e-3, "seed": 1},
            },
        ),
    },
    # Seconds to build: for tests of ensure_toy_assets itself.
    "test": {
        "tokenizer": ("tokenizer-test", _tokenizer_spec(512, 100_000)),
        "teacher": (
            "teacher-test",
            {
                "model": {"hidden_size": 64, "num_layers": 1, "num_heads": 1, "seed": 0},
                "pretrain": {"split": "teacher", "corpus_chars": 50_000, "steps": 2, "batch_size": 2,
                             "seq_len": 32, "lr": 1e-3, "seed": 0},
            },
        ),
        "student": (
            "student-test",
            {"model": {"hidden_size": 64, "num_layers": 1, "num_heads": 1, "seed": 1}, "pretrain": None},
        ),
    },
}

BUILD_INFO = "BUILD_INFO.json"


def _ensure(out_dir: Path, params: dict[str, Any], build: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """Build `out_dir` unless its BUILD_INFO holds the same params; BUILD_INFO is written last."""
    params = json.loads(json.dumps(params))  # the form it takes on disk, for the comparison
    info_path = out_dir / BUILD_INFO
    if info_path.exists():
        info = json.loads(info_path.read_text())
        if info["params"] == params:
            print(f"[toy] reusing {out_dir}", flush=True)
            return info
    if out_dir.exists():  # stale parameters or a build that was killed half way
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    print(f"[toy] building {out_dir}", flush=True)
    start = time.perf_counter()
    result = build(out_dir)
    info = {"params": params, "result": {**result, "build_seconds": time.perf_counter() - start}}
    tmp = out_dir / (BUILD_INFO + ".tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, info_path)  # atomic: a half-written BUILD_INFO never exists
    print(f"[toy] built {out_dir} in {info['result']['build_seconds']:.0f}s", flush=True)
    return info


def _ensure_model(
    out_dir: Path, spec: dict[str, Any], tokenizer_dir: Path, tok_params: dict, max_head_share: float = 1.0
) -> dict:
    def build(path: Path) -> dict[str, Any]:
        build_model(path, tokenizer_dir, **spec["model"])
        if parameter_counts(path)["head_share"] > max_head_share:  # fail before minutes of training
            raise ValueError(f"{path.name}: the output head is over {max_head_share:.0%} of the parameters")
        result: dict[str, Any] = {}
        if spec["pretrain"]:
            train = dict(spec["pretrain"])
            texts = local_corpus(train.pop("split"), max_chars=train.pop("corpus_chars"))
            result = pretrain(path, texts, **train, log_every=max(1, train["steps"] // 10))
        return {**result, **parameter_counts(path), **heldout_stats(path)}

    # The tokenizer's parameters are part of the model's: a new tokenizer means a new model.
    return _ensure(out_dir, {**spec, "tokenizer": tok_params}, build)


def _ensure_tokenizer(out_dir: Path, tok_params: dict[str, Any]) -> dict[str, Any]:
    def build(path: Path) -> dict[str, Any]:
        corpus = local_corpus(tok_params["split"], max_chars=tok_params["corpus_chars"])
        train_tokenizer(path, tok_params["vocab_size"], corpus, tok_params.get("style", "chatml"))
        return {}

    return _ensure(out_dir, tok_params, build)


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    """One builder per asset root at a time (tests and `make demo` may start together)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def ensure_toy_assets(root: Path, *, profile: str = "demo") -> ToyAssets:
    """Build (or reuse) the tokenizer, teacher and student of a profile under `root`."""
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {sorted(PROFILES)}, got {profile!r}")
    spec, root = PROFILES[profile], Path(root)
    tok_name, tok_spec = spec["tokenizer"]
    tok_params = {**tok_spec, "python": list(sys.version_info[:2])}  # the corpus is this Python's stdlib
    tokenizer_dir = root / tok_name
    with _locked(root):
        _ensure_tokenizer(tokenizer_dir, tok_params)
        (teacher_name, teacher_spec), (student_name, student_spec) = spec["teacher"], spec["student"]
        teacher = _ensure_model(
            root / teacher_name, teacher_spec, tokenizer_dir, tok_params, spec.get("max_head_share", 1.0)
        )
        _ensure_model(root / student_name, student_spec, tokenizer_dir, tok_params)
    teacher_info = {**teacher["params"]["model"], "vocab_size": tok_params["vocab_size"], **teacher["result"]}
    print(f"[toy] teacher {teacher_name}: output head {100 * teacher_info['head_share']:.1f}% of parameters")
    return ToyAssets(tokenizer_dir, root / teacher_name, root / student_name, teacher_info)


# Cross-tokenizer distillation: a student of the profile's size whose tokenizer has another vocabulary
# size, was trained on other text and writes Llama 3's turn format (the teacher's is ChatML).
CROSS_STUDENTS = {
    "demo": ("tokenizer-6k-llama", {"vocab_size": 6000, "split": "student", "corpus_chars": 2_000_000,
                                    "style": "llama"}, "student-small-llama"),
    "quality": ("tokenizer-6k-llama", {"vocab_size": 6000, "split": "student", "corpus_chars": 2_000_000,
                                       "style": "llama"}, "student-quality-llama"),
    "test": ("tokenizer-test-llama", {"vocab_size": 400, "split": "student", "corpus_chars": 100_000,
                                      "style": "llama"}, "student-test-llama"),
}


# The cross student's pre-training steps at which it starts where the profile's own student starts:
# the same NLL per character of bench/cross_tokenizer.py's teacher-sampled held-out text (demo: 72 steps,
# 1.8190 against 1.8179; measured over 20-80 steps). Its tokenizer packs fewer characters per token
# (3.29 against 3.66 there) and was trained on other text, so at equal steps it starts far behind.
MATCHED_PRETRAIN_STEPS = {"demo": 72}


def ensure_cross_assets(root: Path, *, profile: str = "demo", matched: bool = False) -> tuple[ToyAssets, Path]:
    """(the profile's assets, a student built and pre-trained like the profile's but on another tokenizer).

    matched: pre-trained for MATCHED_PRETRAIN_STEPS instead, so that both students start equal.
    """
    assets = ensure_toy_assets(root, profile=profile)
    tok_name, tok_spec, student_name = CROSS_STUDENTS[profile]
    tok_params = {**tok_spec, "python": list(sys.version_info[:2])}
    student_spec = PROFILES[profile]["student"][1]
    if matched:
        if profile not in MATCHED_PRETRAIN_STEPS:
            raise ValueError(f"no matched-start cross student for profile {profile!r}: "
                             f"one of {sorted(MATCHED_PRETRAIN_STEPS)}")
        student_name += "-matched"
        student_spec = {**student_spec,
                        "pretrain": {**student_spec["pretrain"], "steps": MATCHED_PRETRAIN_STEPS[profile]}}
    root = Path(root)
    with _locked(root):
        _ensure_tokenizer(root / tok_name, tok_params)
        _ensure_model(root / student_name, student_spec, root / tok_name, tok_params)
    return assets, root / student_name


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Build (or reuse) the toy tokenizer, teacher and student.")
    parser.add_argument("--root", type=Path, default=Path(".assets/toy"))
    parser.add_argument("--profile", choices=sorted(PROFILES), default="demo")
    args = parser.parse_args()
    assets = ensure_toy_assets(args.root, profile=args.profile)
    print(json.dumps({k: str(v) for k, v in vars(assets).items() if k != "teacher_info"}, indent=2))
    print(json.dumps(assets.teacher_info, indent=2))
