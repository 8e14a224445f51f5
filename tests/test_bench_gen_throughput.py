"""bench/gen_throughput.py: the context length it asks vLLM for fits the teacher (vLLM's own check)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("gen_throughput", ROOT / "bench" / "gen_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_context_length_fits_a_teacher_with_1024_positions(tmp_path, tiny_model_dir):
    from vllm.config import ModelConfig

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_model_dir, teacher)
    config = json.loads((teacher / "config.json").read_text())
    config["max_position_embeddings"] = 1024
    (teacher / "config.json").write_text(json.dumps(config))
    bench = load_bench()
    args = bench.parse_args(["--teacher", str(teacher)])  # --seq 512: 4x would be 2,048
    length = bench.context_length(args, teacher)
    assert length == 1024
    ModelConfig(model=str(teacher), max_model_len=length, skip_tokenizer_init=True)  # vLLM accepts it
    assert bench.context_length(bench.parse_args(["--seq", "128"]), teacher) == 512
    with pytest.raises(SystemExit, match="lower --seq"):
        bench.context_length(bench.parse_args(["--seq", "2048"]), teacher)
