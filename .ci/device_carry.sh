#!/usr/bin/env bash
# Fills .devcarry/ (git-ignored) with what .ci/device_gpu_tests.sh installs on a CUDA image without a package index:
# Ray 2.60 (its wheel without the Java jars and the dashboard's source maps, xz: 27 MB instead of 79), DeepSpeed
# 0.19.8 as installed in .venv (pure Python; ops are JIT-built there), peft and the dependencies that image lacks,
# all for CPython 3.12 on x86-64.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .devcarry && rm -f .devcarry/* && tmp=$(mktemp -d) && dest=$PWD/.devcarry
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$tmp" \
  ray==2.60.0 peft==0.21.2 hjson pydantic pydantic-core annotated-types typing-inspection jsonschema \
  jsonschema-specifications referencing rpds-py
mv "$tmp"/*.whl .devcarry/ && mv .devcarry/ray-*.whl "$tmp"/
(cd "$tmp" && mkdir ray && cd ray && unzip -q ../ray-*.whl && rm -rf ray/jars ray/dashboard/client/build/static/js/*.map \
  && tar -cf - . | xz -9 -T2 > "$dest/ray_site.tar.xz")
site=$(.venv/bin/python -c "import importlib.util as u, os; print(os.path.dirname(os.path.dirname(u.find_spec('deepspeed').origin)))")
tar --exclude=__pycache__ -C "$site" -cf - deepspeed deepspeed-0.19.8.dist-info | xz -6 -T2 > .devcarry/deepspeed.tar.xz
rm -rf "$tmp"; du -sh .devcarry
