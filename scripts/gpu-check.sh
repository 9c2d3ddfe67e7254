#!/usr/bin/env bash
# The executor's CUDA path on a machine with an NVIDIA GPU, from a clean
# checkout, in one go (about 5 minutes with 16 cores):
#   1. fetches the model and NVIDIA's run-time libraries the path loads
#      (NVRTC, and cuBLAS when the system has none) into .venv-nvrtc;
#   2. runs the executor's tests with a GPU required: each kernel against
#      the CPU path, synthetic models of every weight type against a plain
#      reference, the real model against the llama.cpp reference vectors,
#      then the engine's own tests (batching, cancellation, stops) on the
#      GPU;
#   3. measures decode tokens per second at batch 1, 8, 32 and 128 on the
#      GPU and the CPU, and prints the table.
# Output is also written to gpu-check.log (and $OUT/gpu-check.log when
# $OUT is set). Needs: the Rust toolchain, python3, the NVIDIA driver.
set -euo pipefail
cd "$(dirname "$0")/.."
log=gpu-check.log
exec > >(tee "$log") 2>&1
# The log reaches $OUT however the run ends.
trap 'if [ -n "${OUT:-}" ]; then cp "$log" "$OUT/"; fi' EXIT

echo "== the GPU"
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
else
    echo "nvidia-smi not found; the driver's libcuda must still be loadable"
fi

echo "== model and libraries"
make model nvrtc
site=$(ls -d "$PWD"/.venv-nvrtc/lib/python3*/site-packages)
libs="$site/nvidia/cuda_nvrtc/lib"
if ! ldconfig -p 2>/dev/null | grep -q 'libcublas\.so\.12'; then
    echo "no system cuBLAS 12: installing nvidia-cublas-cu12 into .venv-nvrtc"
    .venv-nvrtc/bin/pip install --quiet --disable-pip-version-check \
        'nvidia-cublas-cu12==12.4.5.8'
    libs="$libs:$site/nvidia/cublas/lib"
fi
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export SWITCHYARD_REQUIRE_GPU=1 SWITCHYARD_REQUIRE_NVRTC=1 SWITCHYARD_REQUIRE_MODEL=1

echo "== executor tests (CPU and GPU)"
# Every test's name and result, the reference comparison's figures, and
# any failure; a failed test stops the script (pipefail).
cargo test -p switchyard-executor -- --nocapture 2>&1 \
    | grep -E '^test |test result|reference:|panicked|skipping|^failures'

echo "== engine tests on the GPU"
SWITCHYARD_TEST_DEVICE=cuda cargo test -p switchyard-executor --quiet engine::

echo "== decode tokens per second, GPU and CPU"
cargo bench -p switchyard-executor --bench devices -- --batch 1,8,32,128

