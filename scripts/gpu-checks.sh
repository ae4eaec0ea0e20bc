#!/usr/bin/env bash
# Every check that needs an NVIDIA GPU, in one call, on a machine with CUDA but no Rust: it runs
# the prebuilt binaries that scripts/gpu-bundle.sh put in .gpu/. Prints a table last.
# Arguments, if any, pick the checks whose names contain one of them (a device call is limited in
# time): `bash scripts/gpu-checks.sh backend bench` runs "cuda backend" and the benchmarks.
set -uo pipefail
cd "$(dirname "$0")/.."
export LD_LIBRARY_PATH="$PWD/.gpu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi failed"
echo "bundle built from $(tr '\n' ' ' < .gpu/REV 2>/dev/null || echo '(no .gpu/REV: run scripts/gpu-bundle.sh)')"
# Baselines the machine lacks travel as wheels (gpu-bundle.sh); installed beside, not into, its
# environment.
if ls .gpu/wheels/*.whl >/dev/null 2>&1 && ! python3 -c 'import diffusers' 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/strata-site .gpu/wheels/*.whl \
    && export PYTHONPATH="/tmp/strata-site${PYTHONPATH:+:$PYTHONPATH}"
fi

results=()
picks=("$@")
wanted() { # name: picked by the arguments, or no arguments
  [ ${#picks[@]} -eq 0 ] && return 0
  local pick; for pick in "${picks[@]}"; do [[ $1 == *"$pick"* ]] && return 0; done
  return 1
}
check() { # name, command...
  local name=$1; shift
  wanted "$name" || return 0
  echo "=== $name"
  local log; log=$(mktemp)
  # A test that found no driver says SKIPPED and passes: the table must not call that a pass.
  if "$@" 2>&1 | tee "$log"; then
    local skipped; skipped=$(grep -c "SKIPPED" "$log")
    if [ "$skipped" -gt 0 ]; then results+=("$name|skipped ($skipped)"); else results+=("$name|pass"); fi
  else
    results+=("$name|FAIL")
  fi
  rm -f "$log"
}

# The CUDA request paths through the C ABI: a real driver, an existing and a missing ordinal.
check "cuda requests (abi)" .gpu/bin/abi cuda --nocapture
# The CUDA backend (tests/cuda.rs): exact bytes on every path, the caller-stream race, the budget
# against the driver's free memory, leaks, out-of-memory, headroom, destroyed and foreign streams,
# several contexts, a context per thread, per-thread default streams, 4 threads under a tiny
# budget. One test at a time: some take the GPU's memory on purpose. The emulated-driver run of
# the same tests needs the source tree, and is CI's.
check "cuda backend" .gpu/bin/cuda --test-threads=1 --nocapture \
  --exact --skip every_gpu_test_passes_on_the_emulated_driver
# The whole ABI and budget suites also run there, on the CPU device, beside a live driver.
check "abi suite" .gpu/bin/abi
check "budget suite" .gpu/bin/budget
# The binding on the GPU (python/tests/test_cuda.py): device views, streams, DLPack's rules.
check "python binding on cuda" env STRATA_LIBRARY=.gpu/libstrata.so PYTHONPATH=python \
  python3 -m unittest discover -v -s python/tests -p test_cuda.py
if python3 -c 'import torch' 2>/dev/null; then check "torch offload bench" env STRATA_LIBRARY=.gpu/libstrata.so python3 python/benchmarks/torch_offload_bench.py; else echo "SKIPPED: torch offload bench (no torch)"; fi
# Streaming throughput through the C ABI against the pinned H2D limit measured in the same run
# (bf16 pure transfer, fp8 -> bf16 converted on the GPU; a bf16 checkpoint, a 32nd of the GPU's
# memory and at most 4 GiB, from disk and from host memory into fp8 per-channel, quantized on the
# device and with STRATA_CUDA_QUANTIZE=host), and a bf16 nn.Linear stack under several budgets
# against max(compute, transfer): benches/cuda.rs, cuda_linear_stack.py. The checkpoint is
# written in a directory of its own, removed on exit; df shows what "disk" is there.
if wanted "cuda streaming bench"; then
  bench_dir=$(mktemp -d "${TMPDIR:-/tmp}/strata-gpu-bench.XXXXXX")
  trap 'rm -rf "$bench_dir"' EXIT
  df -hT "$bench_dir" | tail -n 1
fi
check "cuda streaming bench" env STRATA_BENCH_DIR="${bench_dir:-}" .gpu/bin/bench-cuda
if python3 -c 'import torch' 2>/dev/null; then check "cuda linear stack bench" env STRATA_LIBRARY=.gpu/libstrata.so python3 python/benchmarks/cuda_linear_stack.py; else echo "SKIPPED: cuda linear stack bench (no torch)"; fi

echo
printf '%-28s %s\n' "check" "result"
for r in "${results[@]}"; do printf '%-28s %s\n' "${r%%|*}" "${r##*|}"; done
for r in "${results[@]}"; do [ "${r##*|}" != FAIL ] || exit 1; done
