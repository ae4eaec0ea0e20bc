#!/usr/bin/env bash
# Installs strata for C, C++ and CMake users under a prefix:
#   PREFIX/lib/libstrata.so.X.Y.Z (+ libstrata.so.X and libstrata.so links), PREFIX/lib/libstrata.a
#   PREFIX/include/strata.h, PREFIX/include/strata.hpp
#   PREFIX/lib/pkgconfig/strata.pc            pkg-config --cflags --libs strata
#   PREFIX/lib/cmake/strata/strataConfig.cmake find_package(strata) -> strata::strata, strata::strata_static
#
# Usage: scripts/install.sh [--prefix DIR] [--lib-dir DIR]
#   --prefix DIR   where to install (default: /usr/local)
#   --lib-dir DIR  install the libstrata.so and libstrata.a found in DIR instead of building them
#                  with `cargo build --release` (the tests use it: cargo cannot run inside cargo)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

prefix=/usr/local
libs=
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix="${2:?--prefix needs a directory}"; shift 2 ;;
    --prefix=*) prefix="${1#*=}"; shift ;;
    --lib-dir) libs="${2:?--lib-dir needs a directory}"; shift 2 ;;
    --lib-dir=*) libs="${1#*=}"; shift ;;
    -h | --help) sed -n '2,/^set /{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
if [ "$(uname -s)" != Linux ]; then
  echo "install.sh: only Linux is supported so far (the soname layout is Linux's)" >&2
  exit 1
fi

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$root/Cargo.toml" | head -n 1)
major=${version%%.*}
if [ -z "$libs" ]; then
  (cd "$root" && cargo build --release --lib)
  libs="$root/target/release"
fi
for f in libstrata.so libstrata.a; do
  [ -f "$libs/$f" ] || { echo "install.sh: $libs/$f is missing" >&2; exit 1; }
done

mkdir -p "$prefix/lib/pkgconfig" "$prefix/lib/cmake/strata" "$prefix/include"
prefix="$(cd "$prefix" && pwd)"
lib="$prefix/lib"

install -m 755 "$libs/libstrata.so" "$lib/libstrata.so.$version"
ln -sfn "libstrata.so.$version" "$lib/libstrata.so.$major"
ln -sfn "libstrata.so.$major" "$lib/libstrata.so"
install -m 644 "$libs/libstrata.a" "$lib/libstrata.a"
install -m 644 "$root/include/strata.h" "$root/include/strata.hpp" "$prefix/include/"

# Libs.private: what the Rust standard library inside libstrata.a needs from the system.
cat > "$lib/pkgconfig/strata.pc" <<PC
prefix=$prefix
libdir=\${prefix}/lib
includedir=\${prefix}/include

Name: strata
Description: Run models larger than GPU memory: tiered weight streaming with a C ABI
Version: $version
Libs: -L\${libdir} -lstrata
Libs.private: -lpthread -ldl -lm
Cflags: -I\${includedir}
PC

# The CMake package finds its files relative to itself, so the prefix can move.
sed -e "s/@VERSION@/$version/g" -e "s/@MAJOR@/$major/g" > "$lib/cmake/strata/strataConfig.cmake" <<'CMAKE'
# find_package(strata) gives strata::strata (the shared library) and strata::strata_static.
if(TARGET strata::strata)
  return()
endif()
get_filename_component(_strata_prefix "${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)
include(CMakeFindDependencyMacro)
find_dependency(Threads)

add_library(strata::strata SHARED IMPORTED)
set_target_properties(strata::strata PROPERTIES
  IMPORTED_LOCATION "${_strata_prefix}/lib/libstrata.so.@VERSION@"
  IMPORTED_SONAME "libstrata.so.@MAJOR@"
  INTERFACE_INCLUDE_DIRECTORIES "${_strata_prefix}/include")

add_library(strata::strata_static STATIC IMPORTED)
set_target_properties(strata::strata_static PROPERTIES
  IMPORTED_LOCATION "${_strata_prefix}/lib/libstrata.a"
  INTERFACE_INCLUDE_DIRECTORIES "${_strata_prefix}/include"
  INTERFACE_LINK_LIBRARIES "Threads::Threads;${CMAKE_DL_LIBS};m")
unset(_strata_prefix)
CMAKE

# Any version with the same major number satisfies find_package(strata X.Y), if not older.
sed -e "s/@VERSION@/$version/g" -e "s/@MAJOR@/$major/g" > "$lib/cmake/strata/strataConfigVersion.cmake" <<'CMAKE'
set(PACKAGE_VERSION "@VERSION@")
if(PACKAGE_FIND_VERSION VERSION_GREATER PACKAGE_VERSION OR NOT PACKAGE_FIND_VERSION_MAJOR STREQUAL "@MAJOR@")
  set(PACKAGE_VERSION_COMPATIBLE FALSE)
else()
  set(PACKAGE_VERSION_COMPATIBLE TRUE)
  if(PACKAGE_FIND_VERSION STREQUAL PACKAGE_VERSION)
    set(PACKAGE_VERSION_EXACT TRUE)
  endif()
endif()
if(NOT CMAKE_SIZEOF_VOID_P STREQUAL "8")
  set(PACKAGE_VERSION_UNSUITABLE TRUE)
endif()
CMAKE

echo "installed strata $version under $prefix"
