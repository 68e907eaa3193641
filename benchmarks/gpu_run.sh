#!/usr/bin/env bash
# Everything the GPU notes report, in one go, on a machine with CuPy and one or more CUDA GPUs:
#   bash benchmarks/gpu_run.sh [OUTDIR]
# GPU tests (marked gpu), GPU parity with the simulator, the calibration file, the parity/timing report
# with it, the 4-ranks-sharing-one-GPU bandwidth table, and the multi-GPU script when there are >= 2 GPUs.
# Every spin kernel is bounded by its collective deadline; NVLink multicast stays off.
set -uo pipefail
out=${1:-gpu-run}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
py=${PYTHON:-python3}
nvidia-smi -L | tee "$out/gpus.txt"
echo "== GPU tests"
timeout 900 $py -m pytest -m gpu -q -p no:cacheprovider -rs tests 2>&1 | tee "$out/gpu-tests.txt"
echo "== GPU scenarios, real mode"
for s in lazy-kernel-load-1gpu lazy-kernel-load-1gpu-fixed host-region-gpu-label-1gpu \
         host-region-gpu-label-1gpu-fixed cuda-collectives-1gpu; do
  timeout 180 $py -m mooncake_real.cli run "$s" 2>&1 | tee -a "$out/real-gpu-scenarios.txt"
done
echo "== calibration"
timeout 300 $py -m mooncake_real.cli calibrate -o "$out/calibration.json" 2>&1 | tail -30 | tee "$out/calibrate.txt"
echo "== parity and timing"
timeout 1500 $py benchmarks/parity_report.py --gpu --repeat 3 --calibration "$out/calibration.json" 2>&1 | tee "$out/parity-report.txt"
echo "== bandwidth, 4 ranks sharing GPU 0"
timeout 600 $py benchmarks/bench_real.py --gpu-only --gpu-sizes 1,4,16,64,256 --gpu-reps 3 2>&1 | tee "$out/bench-real-gpu.txt"
n=$($py -c "import cupy; print(cupy.cuda.runtime.getDeviceCount())" 2>/dev/null || echo 0)
if [ "${n:-0}" -ge 2 ]; then
  echo "== several GPUs: one rank per GPU"
  timeout 1200 $py benchmarks/bench_multigpu.py --out "$out/multigpu" 2>&1 | tee "$out/multigpu.txt"
fi
