#!/usr/bin/env bash
# The gpu-marked tests that need no vLLM, on a CUDA machine whose Python has torch but not this project's stack and
# no package index (this workplace's lent GPU: torch 2.11+cu130, Python 3.12). Ray, DeepSpeed, peft and what they
# need beyond that image travel in .devcarry/ (made by .ci/device_carry.sh). A GPU machine with an index runs
# `./setup.sh && .venv/bin/python -m pytest tests -m gpu` instead (the CUDA vLLM build too).
# Usage there: bash .ci/device_gpu_tests.sh [pytest node ids...]; logs and junit under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/rlhf_ray_gpu}; mkdir -p "$OUT"
python3 -V; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; command -v g++ nvcc ninja
if [ ! -d /tmp/site/deepspeed ]; then  # once per machine
  mkdir -p /tmp/site
  for t in .devcarry/*.tar.xz; do tar -xJf "$t" -C /tmp/site || exit 1; done
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .devcarry/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
python3 -c "import torch, transformers, peft, ray, deepspeed
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), '| transformers',
      transformers.__version__, '| peft', peft.__version__, '| ray', ray.__version__, '| deepspeed', deepspeed.__version__)"
if [ $# -eq 0 ]; then
  set -- tests/test_gpu.py::test_auto_dtype_is_bf16_on_gpu \
    tests/test_device_choice.py::test_a_rank_with_a_gpu_picks_cuda_and_one_without_the_cpu_on_a_gpu_node \
    tests/test_learner.py::test_lora_actor_scores_the_reference_with_its_adapters_disabled_under_zero3_on_gpu \
    tests/test_weight_sync.py::test_gpu_sync_keeps_buckets_and_checksums_on_the_device \
    tests/test_learner.py::test_policy_on_gpu_bf16_zero3_offload \
    tests/test_gpu.py::test_zero_plus_plus_quantized_weights_and_gradients_train_on_gpus
fi
timeout "${GPU_TESTS_TIMEOUT_S:-450}" python3 -m pytest -m gpu -v -rA --durations=0 --junitxml="$OUT/junit.xml" "$@" \
  2>&1 | tee "$OUT/pytest.log"
