#!/usr/bin/env bash
# Every check that needs an NVIDIA GPU, on a machine with CUDA but no Rust: it runs the prebuilt
# binaries that scripts/gpu-bundle.sh put in .gpu/. Each check has a time limit, prints its
# result as it ends, and a table comes last; with $OUT set (the device tool's folder that comes
# back), every check's output is also kept in $OUT/gpu-checks.log and the table in
# $OUT/results.txt, so a call cut short still returns what finished.
# Arguments, if any, pick the checks whose name or group contains one of them: the groups are
# "correctness" (about 5 minutes on the emulated driver's numbers) and "benchmarks"; so a device
# call of at most 10 minutes runs `bash scripts/gpu-checks.sh correctness`, then another
# `bash scripts/gpu-checks.sh benchmarks`; `bash scripts/gpu-checks.sh backend` runs one check.
set -uo pipefail
cd "$(dirname "$0")/.."
export LD_LIBRARY_PATH="$PWD/.gpu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# Python's output reaches the log as it is printed, not when a buffer fills.
export PYTHONUNBUFFERED=1
log_all=${OUT:+$OUT/gpu-checks.log}
say() { echo "$@"; [ -z "$log_all" ] || echo "$@" >> "$log_all"; }
say "$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi failed")"
# cudarc loads libcuda.so before libcuda.so.1: a toolkit's stub under that name makes every test
# say SKIPPED (CUDA_ERROR_STUB_LIBRARY), which this line explains.
say "libcuda: $(ldconfig -p 2>/dev/null | grep -o 'libcuda\.so[.0-9]* => [^ ]*' | tr '\n' ' ')"
say "bundle built from $(tr '\n' ' ' < .gpu/REV 2>/dev/null || echo '(no .gpu/REV: run scripts/gpu-bundle.sh)')"
# Baselines the machine lacks travel as wheels (gpu-bundle.sh); installed beside, not into, its
# environment.
if ls .gpu/wheels/*.whl >/dev/null 2>&1 && ! python3 -c 'import diffusers' 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/strata-site .gpu/wheels/*.whl \
    && export PYTHONPATH="/tmp/strata-site${PYTHONPATH:+:$PYTHONPATH}"
fi

results=()
picks=("$@")
wanted() { # name, group: picked by the arguments, or no arguments
  [ ${#picks[@]} -eq 0 ] && return 0
  local pick; for pick in "${picks[@]}"; do [[ "$1 $2" == *"$pick"* ]] && return 0; done
  return 1
}
check() { # name, group, seconds, command...
  local name=$1 group=$2 seconds=$3; shift 3
  wanted "$name" "$group" || return 0
  say "=== $name (at most ${seconds}s)"
  local log; log=$(mktemp)
  timeout -k 10 "$seconds" "$@" 2>&1 | tee "$log"
  local status=${PIPESTATUS[0]} result
  [ -z "$log_all" ] || cat "$log" >> "$log_all"
  if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
    result="TIMEOUT (${seconds}s)"
  elif [ "$status" -ne 0 ]; then
    result="FAIL"
  else
    # A test that found no driver says SKIPPED and passes: the table must not call that a pass.
    local skipped; skipped=$(grep -c "SKIPPED" "$log")
    if [ "$skipped" -gt 0 ]; then result="skipped ($skipped)"; else result="pass"; fi
  fi
  rm -f "$log"
  results+=("$name|$result")
  say "=== $name: $result"
}
torch_check() { # as check, for a check that runs torch: SKIPPED where python3 lacks it
  wanted "$1" "$2" || return 0
  python3 -c 'import torch' 2>/dev/null || { say "SKIPPED: $1 (no torch)"; return 0; }
  check "$@"
}

# The CUDA request paths through the C ABI: a real driver, an existing and a missing ordinal.
check "cuda requests (abi)" correctness 120 .gpu/bin/abi cuda --nocapture
# The CUDA backend (tests/cuda.rs): exact bytes on every path, the caller-stream race, the budget
# against the driver's free memory, leaks, out-of-memory, headroom, destroyed and foreign streams,
# several contexts, a context per thread, per-thread default streams, 4 threads under a tiny
# budget. One test at a time: some take the GPU's memory on purpose. The emulated-driver run of
# the same tests needs the source tree, and is CI's.
check "cuda backend" correctness 300 .gpu/bin/cuda --test-threads=1 --nocapture \
  --exact --skip every_gpu_test_passes_on_the_emulated_driver
# The whole ABI and budget suites also run there, on the CPU device, beside a live driver.
check "abi suite" correctness 180 .gpu/bin/abi
check "budget suite" correctness 120 .gpu/bin/budget
# The binding on the GPU (python/tests/test_cuda.py): device views, streams, DLPack's rules.
check "python binding on cuda" correctness 180 env STRATA_LIBRARY=.gpu/libstrata.so PYTHONPATH=python \
  python3 -m unittest discover -v -s python/tests -p test_cuda.py
torch_check "torch offload bench" benchmarks 420 \
  env STRATA_LIBRARY=.gpu/libstrata.so python3 python/benchmarks/torch_offload_bench.py
# Streaming throughput through the C ABI against the pinned H2D limit measured in the same run
# (bf16 pure transfer, fp8 -> bf16 converted on the GPU; a bf16 checkpoint, a 32nd of the GPU's
# memory and at most 4 GiB, from disk and from host memory into fp8 per-channel, quantized on the
# device and with STRATA_CUDA_QUANTIZE=host), and a bf16 nn.Linear stack under several budgets
# against max(compute, transfer): benches/cuda.rs, cuda_linear_stack.py. The checkpoint is
# written in a directory of its own, removed on exit; df shows what "disk" is there.
if wanted "cuda streaming bench" benchmarks; then
  bench_dir=$(mktemp -d "${TMPDIR:-/tmp}/strata-gpu-bench.XXXXXX")
  trap 'rm -rf "$bench_dir"' EXIT
  df -hT "$bench_dir" | tail -n 1
fi
check "cuda streaming bench" benchmarks 420 env STRATA_BENCH_DIR="${bench_dir:-}" .gpu/bin/bench-cuda
torch_check "cuda linear stack bench" benchmarks 300 \
  env STRATA_LIBRARY=.gpu/libstrata.so python3 python/benchmarks/cuda_linear_stack.py

table=$(printf '%-28s %s\n' "check" "result"; for r in "${results[@]}"; do printf '%-28s %s\n' "${r%%|*}" "${r##*|}"; done)
echo; echo "$table"
[ -z "${OUT:-}" ] || echo "$table" > "$OUT/results.txt"
for r in "${results[@]}"; do case "${r##*|}" in FAIL|TIMEOUT*) exit 1 ;; esac; done
