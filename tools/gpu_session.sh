#!/usr/bin/env bash
# One device-machine session (NVIDIA H100/H200 through MLX's CUDA backend):
# the op test suite with the CUDA kernels active, then the op benchmark.
#   bash tools/gpu_session.sh [tests|bench|all] [extra benchmark args...]
# Expects .device/mlx-cuda (python3 ../shared/tools/mlx_cuda_bundle.py) and $OUT.
set -o pipefail
what=${1:-all}; shift || true
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
bash .device/mlx-cuda/install.sh || exit 1
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device(), mx.cuda.is_available())"
if [ "$what" = tests ] || [ "$what" = all ]; then
  timeout ${TEST_TIMEOUT:-420} python3 -m pytest -q -p no:cacheprovider -x ${TESTS:-tests/test_ops.py} 2>&1 | tee "$OUT/pytest_gpu.log" | tail -25
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  python3 - <<'PY' 2>&1 | tee "$OUT/copy_torch.txt"
import torch, time
x = torch.randn(2**26, device="cuda"); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
torch.cuda.synchronize(); s = torch.cuda.Event(enable_timing=True); e = torch.cuda.Event(enable_timing=True)
s.record(); [y.copy_(x) for _ in range(50)]; e.record(); torch.cuda.synchronize()
print(f"torch copy 64M f32: {2 * x.numel() * 4 / (s.elapsed_time(e) / 50 * 1e-3) / 1e9:.0f} GB/s")
PY
  python3 benchmarks/ops.py --json "$OUT/bench_gpu.json" "$@" 2>/dev/null | tee "$OUT/bench_gpu.txt"
fi
