#!/usr/bin/env bash
# Builds the C examples (examples-c/*.c, stress.c among them) and the C++ ones (examples-cpp/*.cpp)
# against libstrata.so and runs each
#   (a) under valgrind memcheck: invalid reads and writes, uses of uninitialised memory, and
#       memory definitely or indirectly lost at exit are errors;
#   (b) built with clang -fsanitize=address,undefined: AddressSanitizer (with LeakSanitizer) and
#       UndefinedBehaviorSanitizer, halting on the first report.
# The library itself is not instrumented (it is the ordinary release build): ASan still replaces
# malloc and free for the whole process, so the library's leaks, double frees and frees of bad
# pointers are caught, as are bad memcpy/memset/memmove ranges, but its own loads and stores are
# checked only by valgrind. Prints one line per program and tool, then exits non-zero if any
# run reported an error or did not end with "<program>: OK".
#
#   scripts/sanitize.sh [all|valgrind|asan] [SOURCE.c|SOURCE.cpp ...]   (default: all, every example)
#   STRATA_LIB_DIR=DIR   use the libstrata.so in DIR instead of building one (cargo build --release)
#   STRESS_SECONDS=N     how long stress.c runs under each tool (default 1)
# A tool that is not installed is reported as "skipped: ... not found", not as a failure.
set -uo pipefail
mode=${1:-all}
case "$mode" in all | valgrind | asan) ;; *)
  echo "usage: $0 [all|valgrind|asan] [SOURCE ...]" >&2
  exit 2
  ;;
esac
shift $(($# > 0 ? 1 : 0))
programs=()
for source in "$@"; do
  programs+=("$(realpath "$source")")
done
cd "$(dirname "$0")/.."
root=$PWD
if [ ${#programs[@]} -eq 0 ]; then
  programs=("$root"/examples-c/*.c "$root"/examples-cpp/*.cpp)
fi
stress_seconds=${STRESS_SECONDS:-1}

if [ -n "${STRATA_LIB_DIR:-}" ]; then
  lib_dir=$STRATA_LIB_DIR
else
  cargo build --release --lib || exit 1
  lib_dir=${CARGO_TARGET_DIR:-$root/target}/release
fi
if [ ! -f "$lib_dir/libstrata.so" ]; then
  echo "no libstrata.so in $lib_dir" >&2
  exit 1
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/strata-sanitize.XXXXXX")
trap 'rm -rf "$work"' EXIT
# Programs load the library by its soname (libstrata.so.<major>); cargo leaves only libstrata.so.
soname=$(grep -m1 -ao 'libstrata\.so\.[0-9]*' "$lib_dir/libstrata.so" || echo libstrata.so.0)
ln -s "$lib_dir/libstrata.so" "$work/$soname"

# The arguments each program takes, relative to the folder it runs in.
args_for() {
  case "$1" in
    stream_checkpoint) echo "model.safetensors trace.json" ;;
    shared_store) echo "model.safetensors" ;;
    stress) echo "$stress_seconds 4" ;;
    *) echo "" ;;
  esac
}

# compile SOURCE EXE CC CXX [FLAGS...]
compile() {
  local source=$1 exe=$2 cc=$3 cxx=$4
  shift 4
  local std=(-std=c11) compiler=$cc
  if [[ $source == *.cpp ]]; then
    std=(-std=c++17)
    compiler=$cxx
  fi
  "$compiler" "${std[@]}" -Wall -Wextra -Werror -pedantic -g -pthread "$@" -I "$root/include" "$source" \
    -o "$exe" -L "$lib_dir" -lstrata -Wl,-rpath,"$work" -lm >"$exe.build.log" 2>&1
}

# The last non-empty line a program printed is "<name>: OK".
ended_ok() {
  local name=$1 out=$2
  [ "$(grep -v '^[[:space:]]*$' "$out" | tail -n 1)" = "$name: OK" ]
}

summary=()
failed=0
note() { # program, tool, result, ok(0/1)
  summary+=("$(printf '%-20s %-16s %s' "$1" "$2" "$3")")
  [ "$4" -eq 0 ] || failed=1
}

# Bytes in "definitely lost: 1,234 bytes in 5 blocks" (0 when valgrind printed no such line).
leak_bytes() {
  local kind=$1 log=$2
  local n
  n=$(grep -E "$kind lost: [0-9,]+ bytes" "$log" | tail -n 1 | sed -E "s/.*$kind lost: ([0-9,]+) bytes.*/\1/" | tr -d ,)
  echo "${n:-0}"
}

run_valgrind() {
  if ! command -v valgrind >/dev/null 2>&1; then
    note "(all)" valgrind "skipped: valgrind not found" 0
    return
  fi
  for source in "${programs[@]}"; do
    local name dir exe
    name=$(basename "${source%.*}")
    dir="$work/valgrind-$name"
    mkdir -p "$dir"
    exe="$dir/$name"
    if ! compile "$source" "$exe" cc c++; then
      cat "$exe.build.log"
      note "$name" valgrind "FAILED to compile" 1
      continue
    fi
    local log="$dir/valgrind.log" out="$dir/stdout.txt"
    # --fair-sched: threads take turns as on real cores, so stress.c's threads interleave.
    # "possibly lost" is shown but is no error: in these programs it is the 48 bytes of Rust std's
    # handle for the main thread, which std reaches through a pointer into the middle of the
    # allocation and which no destructor frees at exit (threads that end free theirs).
    # shellcheck disable=SC2046
    (cd "$dir" && valgrind --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite,indirect \
      --fair-sched=yes --log-file="$log" "./$name" $(args_for "$name") >"$out" 2>"$dir/stderr.txt")
    local status=$?
    local errors definite indirect possibly
    errors=$(sed -nE 's/.*ERROR SUMMARY: ([0-9,]+) errors.*/\1/p' "$log" | tail -n 1 | tr -d ,)
    definite=$(leak_bytes definitely "$log")
    indirect=$(leak_bytes indirectly "$log")
    possibly=$(leak_bytes possibly "$log")
    local result="${errors:-?} errors, definitely lost ${definite} B, indirectly lost ${indirect} B, possibly lost ${possibly} B"
    local bad=0
    if [ "$status" -ne 0 ] || [ "${errors:-1}" != 0 ] || ! ended_ok "$name" "$out"; then
      bad=1
      result="$result, exit $status: FAILED"
      echo "=== valgrind $name: exit $status"
      cat "$dir/stderr.txt" "$log"
    fi
    note "$name" valgrind "$result" "$bad"
  done
}

run_asan() {
  if ! command -v clang >/dev/null 2>&1 || ! command -v clang++ >/dev/null 2>&1; then
    note "(all)" "asan+ubsan" "skipped: clang not found" 0
    return
  fi
  local flags=(-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined)
  # The sanitizer runtime comes with libclang-rt-*-dev: without it clang cannot link.
  if ! echo 'int main(void){return 0;}' | clang -x c - "${flags[@]}" -o "$work/probe" >/dev/null 2>&1; then
    note "(all)" "asan+ubsan" "skipped: clang cannot link -fsanitize=address,undefined (install libclang-rt-dev)" 0
    return
  fi
  for source in "${programs[@]}"; do
    local name dir exe
    name=$(basename "${source%.*}")
    dir="$work/asan-$name"
    mkdir -p "$dir"
    exe="$dir/$name"
    if ! compile "$source" "$exe" clang clang++ "${flags[@]}"; then
      cat "$exe.build.log"
      note "$name" "asan+ubsan" "FAILED to compile" 1
      continue
    fi
    local out="$dir/stdout.txt" err="$dir/stderr.txt"
    # shellcheck disable=SC2046
    (cd "$dir" && ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:exitcode=1 \
      UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 "./$name" $(args_for "$name") >"$out" 2>"$err")
    local status=$?
    local reports
    reports=$(grep -cE 'ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:' "$err")
    local result="sanitizer reports: $reports"
    local bad=0
    if [ "$status" -ne 0 ] || [ "$reports" -ne 0 ] || ! ended_ok "$name" "$out"; then
      bad=1
      result="$result, exit $status: FAILED"
      echo "=== asan+ubsan $name: exit $status"
      cat "$err"
    fi
    note "$name" "asan+ubsan" "$result" "$bad"
  done
}

case "$mode" in
  all)
    run_valgrind
    run_asan
    ;;
  valgrind) run_valgrind ;;
  asan) run_asan ;;
esac

echo
printf '%-20s %-16s %s\n' program tool result
for line in "${summary[@]}"; do echo "$line"; done
if [ "$failed" -ne 0 ]; then
  echo "sanitize: FAILED"
  exit 1
fi
echo "sanitize: OK"
