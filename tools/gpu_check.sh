#!/usr/bin/env bash
# The GPU check: one script, one GPU, no network, within a 10-minute run. Run from anywhere:
#
#   bash tools/gpu_check.sh            # figures and logs in ${OUT:-runs/gpu_check}
#
# 1. environment: the card, versions, and every package the project imports (vLLM is not needed here);
#    missing ones are installed from ${KD_WHEELS:-.assets/wheels} when that folder exists (fill it on a
#    machine with network: `pip download -d .assets/wheels pytest zstandard tqdm`), else named and the
#    parts that need them are skipped;
# 2. the tests that need CUDA (tests/test_gpu.py: chunked head and top-k on CUDA against float64, bf16 and
#    fp16 training steps, FSDP2 through accelerate on one GPU) and tests/test_student.py (the loss path);
# 3. bench/train_step.py on CUDA (CUDA-event time, torch.cuda.max_memory_allocated) for CE, our KD and the
#    dense loss at vocabularies 32k and 152k, float32 and bf16 autocast.
# Without CUDA, steps 2 and 3 say so and skip; the script still checks the environment and the CPU tests.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-runs/gpu_check}
WHEELS=${KD_WHEELS:-.assets/wheels}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
status=0

echo "== environment"
missing=$($PY - <<'EOF'
import importlib.util
need = ["torch", "transformers", "peft", "accelerate", "pyarrow", "zstandard", "numpy", "tqdm", "tokenizers",
        "safetensors", "pytest"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
EOF
)
if [ -n "$missing" ] && [ -d "$WHEELS" ]; then
    for package in $missing; do  # one at a time: a package with no wheel there must not stop the others
        $PY -m pip install --no-index --find-links "$WHEELS" "$package" >>"$OUT/pip.log" 2>&1 \
            && echo "installed $package from $WHEELS" || echo "no wheel for $package in $WHEELS (see $OUT/pip.log)"
    done
fi
$PY - <<'EOF' | tee "$OUT/environment.txt"
import importlib, platform
print("python", platform.python_version(), platform.machine())
for name in ["torch", "transformers", "peft", "accelerate", "pyarrow", "zstandard", "numpy", "tqdm", "tokenizers",
             "safetensors", "pytest", "vllm", "deepspeed"]:
    try:
        print(f"{name:13}", getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as exc:  # noqa: BLE001 - report every kind of import failure
        print(f"{name:13} MISSING ({type(exc).__name__}: {str(exc)[:80]})")
import torch
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"cuda {torch.version.cuda}, {torch.cuda.device_count()} x {p.name}, {p.total_memory / 2**30:.0f} GiB, "
          f"sm_{p.major}{p.minor}, bf16 {torch.cuda.is_bf16_supported()}")
else:
    print("cuda: NOT AVAILABLE (torch", torch.__version__, "- CUDA tests and the CUDA bench are skipped)")
EOF
cuda=$($PY -c "import torch; print(int(torch.cuda.is_available()))")

echo "== tests (CUDA ones skip without a GPU, with the reason)"
if $PY -c "import pytest, zstandard, tqdm" 2>/dev/null; then
    timeout 300 $PY -m pytest -q -rs tests/test_gpu.py tests/test_student.py \
        -p no:cacheprovider 2>&1 | tee "$OUT/tests.txt" | tail -25
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
else
    echo "SKIPPED: pytest, zstandard or tqdm missing (see above); put their wheels in $WHEELS"; status=1
fi

echo "== bench/train_step.py on CUDA"
if [ "$cuda" = 1 ]; then
    for vocab in 32000 152064; do
        for autocast in none bfloat16; do
            echo "-- vocab $vocab, autocast $autocast"
            timeout 60 $PY bench/train_step.py --device cuda --vocab "$vocab" --autocast "$autocast" --steps 5 \
                >"$OUT/train_step_${vocab}_${autocast}.txt" 2>&1 || { echo "FAILED"; status=1; }
            head -n -1 "$OUT/train_step_${vocab}_${autocast}.txt" | tail -6
        done
    done
else
    echo "SKIPPED: no CUDA device (torch.cuda.is_available() is False)"
fi
echo "== done (status $status); logs in $OUT"
exit $status
