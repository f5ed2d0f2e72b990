#!/usr/bin/env bash
# Idempotent install: .venv with python3, CPU torch pinned (override with LPLR_TORCH_SPEC), then this package
# editable with its extras (override with LPLR_EXTRAS, e.g. LPLR_EXTRAS=eval,plots).
set -euo pipefail
cd "$(dirname "$0")"
TORCH_SPEC="${LPLR_TORCH_SPEC:-torch==2.13.0}"
EXTRAS="${LPLR_EXTRAS:-eval,plots,dev}"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned, so that no dependency drags in a multi-GB CUDA build.
.venv/bin/python -m pip install -q "$TORCH_SPEC"
.venv/bin/python -m pip install -q -e ".[${EXTRAS}]"
echo "installed: $(.venv/bin/lplr-convert --version)"
