"""Session-wide tiny real models: built in seconds into pytest's tmp dir, random init, no pre-training."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The Rust tokenizer's thread pool and forked workers (DataLoader, vLLM) do not mix; it also keeps
# test runs on the shared 2 cores quiet.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Byte-level BPE, vocab 1024, ChatML template (same recipe as the demo's tokenizer)."""
    from pipeline.toy.models import local_corpus, train_tokenizer

    return train_tokenizer(
        tmp_path_factory.mktemp("tiny_tokenizer"), vocab_size=1024, corpus=local_corpus("teacher", 300_000)
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """Random-init float32 Qwen2: hidden 128, 2 heads (head_dim 64), 2 layers, intermediate 256."""
    from pipeline.toy.models import build_model

    return build_model(
        tmp_path_factory.mktemp("tiny_model"), tiny_tokenizer_dir,
        hidden_size=128, num_layers=2, num_heads=2, intermediate_size=256, seed=0,
    )


@pytest.fixture(scope="session")
def tiny_student_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """A smaller random-init Qwen2 with the same tokenizer: hidden 64, 1 head, 1 layer."""
    from pipeline.toy.models import build_model

    return build_model(
        tmp_path_factory.mktemp("tiny_student"), tiny_tokenizer_dir,
        hidden_size=64, num_layers=1, num_heads=1, intermediate_size=128, seed=1,
    )


@pytest.fixture(scope="session")
def tiny_dataset_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 EasyDistill records (instruction/input/output) from held-out stdlib code, short responses."""
    from pipeline.toy.models import write_instruction_dataset

    return write_instruction_dataset(
        tmp_path_factory.mktemp("tiny_dataset") / "train.jsonl", 24, seed=0, response_tokens=(8, 48)
    )


@pytest.fixture(scope="session")
def real_tokenizer_dir():
    """name -> cached directory of a production tokenizer (pipeline.real_tokenizers); skips if unfetchable."""
    from pipeline.real_tokenizers import FetchError, fetch

    def get(name: str) -> Path:
        try:
            return fetch(name)
        except FetchError as exc:
            pytest.skip(f"real tokenizer {name!r} unavailable: {exc}")

    return get
