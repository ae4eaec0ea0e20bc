#!/usr/bin/env bash
# Runs every fuzz target in fuzz/ for SECONDS each (default 60), at the lowest CPU priority.
#   scripts/fuzz.sh [SECONDS]
# New inputs go to fuzz/corpus/TARGET (not committed); the committed seeds are fuzz/seeds/TARGET.
# A call that runs past 60 s counts as a crash (a hang). A crash stops the run and leaves its input in fuzz/artifacts/TARGET; replay it with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run -a TARGET fuzz/artifacts/TARGET/crash-...
set -euo pipefail
seconds=${1:-60}
cd "$(dirname "$0")/.."
fuzz=$PWD/fuzz

command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
# cargo-fuzz passes -Z flags (the sanitizer); this lets a stable toolchain accept them.
export RUSTC_BOOTSTRAP=1
# The target writes its files under TMPDIR on every run: keep them in memory, and remove them.
scratch=$(mktemp -d -p "$([ -d /dev/shm ] && echo /dev/shm || echo /tmp)" strata-fuzz.XXXXXX)
trap 'rm -rf "$scratch"' EXIT
export TMPDIR=$scratch

for target in $(cargo fuzz list); do
  mkdir -p "$fuzz/corpus/$target"
  echo "== $target for ${seconds}s"
  # -a: debug assertions, so an arithmetic overflow is a crash rather than a wrong number.
  nice -n 19 cargo fuzz run -a "$target" "$fuzz/corpus/$target" "$fuzz/seeds/$target" -- \
    -max_total_time="$seconds" -timeout=60 -print_final_stats=1
done
