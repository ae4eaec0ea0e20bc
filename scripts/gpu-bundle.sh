#!/usr/bin/env bash
# Builds what the GPU checks need and copies it into .gpu/ (git-ignored), for a machine that has
# an NVIDIA GPU and CUDA but no Rust toolchain. Then, there: bash scripts/gpu-checks.sh
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu && mkdir -p .gpu/bin
cargo build --release --lib
cargo test --release --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])' \
  | while read -r name exe; do
      case " abi budget cuda " in *" $name "*) cp "$exe" ".gpu/bin/$name" ;; esac
    done
# The CUDA streaming bench (benches/cuda.rs), as .gpu/bin/bench-cuda: the test binary is "cuda".
cargo bench --bench cuda --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["bench"]:
        print(m["executable"])' \
  | while read -r exe; do cp "$exe" .gpu/bin/bench-cuda; done
test -x .gpu/bin/bench-cuda
cp target/release/libstrata.so .gpu/
# Debug info is most of their size, and the device machine takes at most 64 MiB.
strip .gpu/bin/* .gpu/libstrata.so
ls -la .gpu .gpu/bin
