#!/usr/bin/env bash
# Builds what the GPU checks need and copies it into .gpu/ (git-ignored), for a machine that has
# an NVIDIA GPU and CUDA but no Rust toolchain. Then, there: bash scripts/gpu-checks.sh
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu && mkdir -p .gpu/bin
cargo build --release --lib
# cargo's own messages stay on stderr, so a build that fails says why here, not on the GPU machine.
cargo test --release --no-run --message-format=json \
  | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])' \
  | while read -r name exe; do
      case " abi budget cuda " in *" $name "*) cp "$exe" ".gpu/bin/$name" ;; esac
    done
# The CUDA streaming bench (benches/cuda.rs), as .gpu/bin/bench-cuda: the test binary is "cuda".
cargo bench --bench cuda --no-run --message-format=json \
  | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["bench"]:
        print(m["executable"])' \
  | while read -r exe; do cp "$exe" .gpu/bin/bench-cuda; done
for binary in abi budget cuda bench-cuda; do
  test -x ".gpu/bin/$binary" || { echo "gpu-bundle: .gpu/bin/$binary was not built" >&2; exit 1; }
done
cp target/release/libstrata.so .gpu/
# Debug info is most of their size, and the device machine takes at most 64 MiB.
strip .gpu/bin/* .gpu/libstrata.so
git rev-parse HEAD > .gpu/REV
git diff --quiet HEAD || echo "(with uncommitted changes)" >> .gpu/REV
# The torch bench's diffusers baseline. The GPU machine (Python 3.12, torch, accelerate,
# huggingface_hub, pillow, regex, safetensors installed; no network) lacks only these two, both
# pure Python; gpu-checks.sh installs them there. A failed download leaves that baseline out.
mkdir -p .gpu/wheels
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 -d .gpu/wheels \
  "diffusers==${DIFFUSERS_VERSION:-0.42.1}" importlib_metadata \
  || echo "no diffusers wheel: the torch bench will run without its diffusers baseline"
ls -la .gpu .gpu/bin
