#!/usr/bin/env bash
# The checks that need a CUDA device, in one run: the CUDA tests, the CUDA throughput benchmark
# (bench/bench_cuda.py) and the digits chain on the GPU (corrupt, em-train at the preset budget,
# reconstruct, train-uncond, sample). Usage: bench/cuda_check.sh OUTDIR [CHAIN_SECONDS]
# Expects a Python whose torch sees a GPU and whose path holds diffem (installed, or the checkout
# plus its entry points); writes speed-cuda.{json,md}, log.txt and chain.tar.gz under OUTDIR.
set -u
out=${1:?usage: bench/cuda_check.sh OUTDIR [CHAIN_SECONDS]}
chain_s=${2:-120}
py=${PYTHON:-python3}
mkdir -p "$out"
log="$out/log.txt"
stage() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$log"; }

stage "device"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv >>"$log" 2>&1
$py -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(0))" >>"$log" 2>&1

stage "CUDA tests"
timeout 180 $py -m pytest -q -p no:cacheprovider -p no:warnings -m "slow or not slow" \
  tests/diffusion/test_compiled.py tests/gaussian/test_fit.py -k "cuda or compiled" >>"$log" 2>&1
echo "rc $?" >>"$log"

stage "bench_cuda"
timeout 240 $py -m bench.bench_cuda --deadline 90 --commit "${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}" \
  --out "$out" >>"$log" 2>&1
echo "rc $?" >>"$log"

stage "digits chain on CUDA (preset budget, mask 0.5)"
w=$(mktemp -d)
d() { $py -m diffem_cli "$@" >>"$log" 2>&1; }
d corrupt digits "$w/obs" --channel mask -p rho=0.5 --seed 0 --clean-out "$w/clean"
s0=$(date +%s)
timeout "$chain_s" $py -m diffem_cli em-train "$w/obs" "$w/run" --config digits --eval-clean "$w/clean" \
  --device cuda >>"$log" 2>&1
echo "em-train rc $? in $(($(date +%s) - s0)) s" | tee -a "$log"
last=$(ls "$w/run/checkpoints"/lap_*.safetensors 2>/dev/null | tail -1)
if [ -n "$last" ]; then
  s0=$(date +%s)
  d reconstruct "$last" "$w/obs" "$w/recon" --device cuda
  d train-uncond "$w/recon" "$w/uncond" --config digits --set train.epochs=10 --device cuda
  d sample "$w/uncond/checkpoints/uncond.safetensors" "$w/samples" -n 512 --device cuda
  d evaluate "$w/samples" --reference "$w/clean" --json "$w/uncond-eval.json"
  echo "reconstruct..evaluate in $(($(date +%s) - s0)) s" | tee -a "$log"
fi
tar -czf "$out/chain.tar.gz" -C "$w" --exclude='*.safetensors' --exclude='*.arrow' . 2>>"$log"
stage "done"
