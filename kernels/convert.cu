// strata's dtype conversion kernels: one per (source, destination) pair, source in {f32, f16,
// bf16, f8e4m3, f8e5m2}, destination in {f32, f16, bf16}, source != destination, named
// strata_convert_<src>_to_<dst>. src/backend/cuda launches them with cuLaunchKernel: blocks of
// 256 threads, min(ceil(numel / 256), 65535) blocks, and five 64-bit parameters:
//
//   src      the source tensor's first element (element-aligned device memory)
//   dst      the destination's first element
//   scales   NULL for plain data and unscaled fp8; for scaled fp8, element i is
//            f32(src[i]) * scales[i / row_len] (per tensor: row_len = numel; per channel:
//            row_len = numel / rows)
//   numel    the number of elements
//   row_len  elements per scale (ignored without scales)
//
// Every element comes out bit for bit as strata::convert::convert makes it on the host (see
// convert_elem.cuh). The PTX that ships in the library, kernels/convert.ptx, is generated from
// this file and convert_elem.cuh by scripts/gen-ptx.sh; tests/kernels.rs fails when it is stale,
// and runs these same kernels compiled as host C++ (a loop over the grid stands in for the GPU)
// against the Rust conversions.

#include "convert_elem.cuh"

#if defined(STRATA_CUDA)
#ifndef __global__
#define __global__ __attribute__((global))
#endif
#else
// Host C++ (tests/kernel_host_check.cpp): a kernel is a plain function, and the caller sets the
// position in the grid before each call.
#define __global__
struct strata_host_grid {
  unsigned block_idx, block_dim, grid_dim, thread_idx;
};
static strata_host_grid strata_host_grid_now;
#endif

// The source, destination and scales never overlap: const data may go through the read-only
// cache.
#define STRATA_RESTRICT __restrict__

// This thread's index in the grid, and the number of threads in the grid.
#if defined(__CUDA_ARCH__) && defined(__clang__)
#define STRATA_THREAD_INDEX()                                                                      \
  ((strata_u64)__nvvm_read_ptx_sreg_ctaid_x() * (strata_u64)__nvvm_read_ptx_sreg_ntid_x() +       \
   (strata_u64)__nvvm_read_ptx_sreg_tid_x())
#define STRATA_GRID_THREADS()                                                                      \
  ((strata_u64)__nvvm_read_ptx_sreg_nctaid_x() * (strata_u64)__nvvm_read_ptx_sreg_ntid_x())
#elif defined(__CUDA_ARCH__)
#define STRATA_THREAD_INDEX()                                                                      \
  ((strata_u64)blockIdx.x * (strata_u64)blockDim.x + (strata_u64)threadIdx.x)
#define STRATA_GRID_THREADS() ((strata_u64)gridDim.x * (strata_u64)blockDim.x)
#elif defined(STRATA_CUDA)
// The host side of a CUDA build, which compiles the kernels' bodies but never runs them.
#define STRATA_THREAD_INDEX() ((strata_u64)0)
#define STRATA_GRID_THREADS() ((strata_u64)1)
#else
#define STRATA_THREAD_INDEX()                                                                      \
  ((strata_u64)strata_host_grid_now.block_idx * strata_host_grid_now.block_dim +                  \
   strata_host_grid_now.thread_idx)
#define STRATA_GRID_THREADS()                                                                      \
  ((strata_u64)strata_host_grid_now.grid_dim * strata_host_grid_now.block_dim)
#endif

// Sources: load element i as f32 bits. `fp8` says whether scales apply.

struct strata_src_f32 {
  static const bool fp8 = false;
  static STRATA_HD strata_u32 load(const unsigned char *src, strata_u64 i) {
    return ((const strata_u32 *)src)[i];
  }
};

struct strata_src_f16 {
  static const bool fp8 = false;
  static STRATA_HD strata_u32 load(const unsigned char *src, strata_u64 i) {
    return strata_f16_to_f32_bits(((const strata_u16 *)src)[i]);
  }
};

struct strata_src_bf16 {
  static const bool fp8 = false;
  static STRATA_HD strata_u32 load(const unsigned char *src, strata_u64 i) {
    return strata_bf16_to_f32_bits(((const strata_u16 *)src)[i]);
  }
};

struct strata_src_f8e4m3 {
  static const bool fp8 = true;
  static STRATA_HD strata_u32 load(const unsigned char *src, strata_u64 i) {
    return strata_f8e4m3_to_f32_bits(src[i]);
  }
};

struct strata_src_f8e5m2 {
  static const bool fp8 = true;
  static STRATA_HD strata_u32 load(const unsigned char *src, strata_u64 i) {
    return strata_f8e5m2_to_f32_bits(src[i]);
  }
};

// Destinations: store f32 bits as element i, rounded.

struct strata_dst_f32 {
  static STRATA_HD void store(unsigned char *dst, strata_u64 i, strata_u32 bits) {
    ((strata_u32 *)dst)[i] = bits;
  }
};

struct strata_dst_f16 {
  static STRATA_HD void store(unsigned char *dst, strata_u64 i, strata_u32 bits) {
    ((strata_u16 *)dst)[i] = strata_f32_bits_to_f16(bits);
  }
};

struct strata_dst_bf16 {
  static STRATA_HD void store(unsigned char *dst, strata_u64 i, strata_u32 bits) {
    ((strata_u16 *)dst)[i] = strata_f32_bits_to_bf16(bits);
  }
};

// The grid-stride loop of one thread: elements first, first + stride, ... below numel.
template <class Src, class Dst>
static inline STRATA_HD void strata_convert_loop(const unsigned char *STRATA_RESTRICT src,
                                                 unsigned char *STRATA_RESTRICT dst,
                                                 const float *STRATA_RESTRICT scales,
                                                 strata_u64 numel, strata_u64 row_len,
                                                 strata_u64 first, strata_u64 stride) {
  if (!Src::fp8 || scales == 0) {
    for (strata_u64 i = first; i < numel; i += stride) {
      Dst::store(dst, i, Src::load(src, i));
    }
    return;
  }
  if (row_len == 0) {
    row_len = numel; // never launched so (row_len = numel / scale count); read as per tensor
  }
  // Element i's row, i / row_len, kept up to date without a 64-bit division per element: a step
  // of `stride` elements is whole_rows rows and extra elements more.
  strata_u64 row = first / row_len;
  strata_u64 column = first % row_len;
  const strata_u64 whole_rows = stride / row_len;
  const strata_u64 extra = stride % row_len;
  for (strata_u64 i = first; i < numel; i += stride) {
    Dst::store(dst, i, strata_scale_f32_bits(Src::load(src, i), scales[row]));
    row += whole_rows;
    column += extra;
    if (column >= row_len) {
      column -= row_len;
      row += 1;
    }
  }
}

#define STRATA_CONVERT_KERNEL(SRC, DST)                                                            \
  extern "C" __global__ void strata_convert_##SRC##_to_##DST(                                      \
      const unsigned char *STRATA_RESTRICT src, unsigned char *STRATA_RESTRICT dst,                \
      const float *STRATA_RESTRICT scales, strata_u64 numel, strata_u64 row_len) {                                                                        \
    strata_convert_loop<strata_src_##SRC, strata_dst_##DST>(                                       \
        src, dst, scales, numel, row_len, STRATA_THREAD_INDEX(), STRATA_GRID_THREADS());           \
  }

STRATA_CONVERT_KERNEL(f16, f32)
STRATA_CONVERT_KERNEL(bf16, f32)
STRATA_CONVERT_KERNEL(f8e4m3, f32)
STRATA_CONVERT_KERNEL(f8e5m2, f32)

STRATA_CONVERT_KERNEL(f32, f16)
STRATA_CONVERT_KERNEL(bf16, f16)
STRATA_CONVERT_KERNEL(f8e4m3, f16)
STRATA_CONVERT_KERNEL(f8e5m2, f16)

STRATA_CONVERT_KERNEL(f32, bf16)
STRATA_CONVERT_KERNEL(f16, bf16)
STRATA_CONVERT_KERNEL(f8e4m3, bf16)
STRATA_CONVERT_KERNEL(f8e5m2, bf16)
