#!/usr/bin/env bash
# The prepared GPU suite, one command on a fresh accelerator machine with no network:
#     bash benchmarks/gpu/run.sh            # writes $OUT/gpu.md, $OUT/gpu.json, $OUT/gpu.log (OUT defaults to
#                                           # benchmarks/results) and prints the table; about 8 minutes on an H200
#     bash benchmarks/gpu/run.sh --tiny     # the same code paths at toy sizes, on CPU, in seconds
# Extra arguments go to benchmarks/gpu/suite.py (e.g. --sections forward,attention; --sections knn needs
# ncut-pytorch, absent from the device image: benchmarks/gpu/carry.sh prepares .carry/ to carry there). PYTHON picks the interpreter
# (default python3: on the device image, the one with JAX, PyTorch and transformers).
#
# Install step: nothing is installed and nothing is fetched. The checkout's code is staged in a temporary folder in
# the layout an install gives it (spectral_jax/, and models/ as spectral_jax/models: pyproject's package-dir), which
# goes first on PYTHONPATH; every package index and model hub is switched off, so a missing dependency fails at the
# suite's import check (the first thing suite.py does: `suite.check_imports`) instead of reaching for the network.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
out="${OUT:-$root/benchmarks/results}"
py="${PYTHON:-python3}"

stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
cp -r "$root/spectral_jax" "$stage/spectral_jax"
cp -r "$root/models" "$stage/spectral_jax/models"
export PYTHONPATH="$stage${PYTHONPATH:+:$PYTHONPATH}"
export PIP_NO_INDEX=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=1

mkdir -p "$out"
"$py" "$root/benchmarks/gpu/suite.py" --out "$out" "$@" 2>&1 | tee "$out/gpu.log"
