// strata's dtype conversion kernels: one per (source, destination) pair, source in {f32, f16,
// bf16, f8e4m3, f8e5m2}, destination in {f32, f16, bf16} (source != destination) or fp8 (a plain
// cast), named strata_convert_<src>_to_<dst>; and the absmax quantization into fp8 (below).
// src/backend/cuda launches them with cuLaunchKernel: blocks of 256 threads,
// min(ceil(numel / 256), 65535) blocks, and 64-bit parameters; the conversions take five:
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

struct strata_dst_f8e4m3 {
  static STRATA_HD void store(unsigned char *dst, strata_u64 i, strata_u32 bits) {
    dst[i] = strata_f32_bits_to_f8e4m3(bits);
  }
};

struct strata_dst_f8e5m2 {
  static STRATA_HD void store(unsigned char *dst, strata_u64 i, strata_u32 bits) {
    dst[i] = strata_f32_bits_to_f8e5m2(bits);
  }
};

// Element i's row, i / row_len, for the elements first, first + stride, ... of one thread, kept
// up to date without a 64-bit division per element: a step of `stride` elements is whole_rows
// rows and extra elements more.
struct strata_rows {
  strata_u64 row, column, whole_rows, extra, row_len;
};

static inline STRATA_HD strata_rows strata_rows_at(strata_u64 first, strata_u64 stride,
                                                   strata_u64 row_len, strata_u64 numel) {
  if (row_len == 0) {
    row_len = numel > 0 ? numel : 1; // never launched so (row_len = numel / groups)
  }
  strata_rows rows = {first / row_len, first % row_len, stride / row_len, stride % row_len,
                      row_len};
  return rows;
}

static inline STRATA_HD void strata_rows_advance(strata_rows *rows) {
  rows->row += rows->whole_rows;
  rows->column += rows->extra;
  if (rows->column >= rows->row_len) {
    rows->column -= rows->row_len;
    rows->row += 1;
  }
}

// Element i of a source as the f32 bits the host's Source::decode gives: for scaled fp8,
// f32(code) * scales[i / row_len]. `rows` follows i.
template <class Src>
static inline STRATA_HD strata_u32 strata_load_scaled(const unsigned char *STRATA_RESTRICT src,
                                                      const float *STRATA_RESTRICT scales,
                                                      strata_u64 i, const strata_rows &rows) {
  strata_u32 bits = Src::load(src, i);
  return Src::fp8 && scales != 0 ? strata_scale_f32_bits(bits, scales[rows.row]) : bits;
}

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
  strata_rows rows = strata_rows_at(first, stride, row_len, numel);
  for (strata_u64 i = first; i < numel; i += stride) {
    Dst::store(dst, i, strata_load_scaled<Src>(src, scales, i, rows));
    strata_rows_advance(&rows);
  }
}

#define STRATA_CONVERT_KERNEL(SRC, DST)                                                            \
  extern "C" __global__ void strata_convert_##SRC##_to_##DST(                                      \
      const unsigned char *STRATA_RESTRICT src, unsigned char *STRATA_RESTRICT dst,                \
      const float *STRATA_RESTRICT scales, strata_u64 numel, strata_u64 row_len) {                 \
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

// Plain casts into fp8 (STRATA_QUANT_NONE): each element rounded and saturated on its own. An
// fp8 source may be the same dtype when it is scaled (the cast drops the scales).
STRATA_CONVERT_KERNEL(f32, f8e4m3)
STRATA_CONVERT_KERNEL(f16, f8e4m3)
STRATA_CONVERT_KERNEL(bf16, f8e4m3)
STRATA_CONVERT_KERNEL(f8e4m3, f8e4m3)
STRATA_CONVERT_KERNEL(f8e5m2, f8e4m3)

STRATA_CONVERT_KERNEL(f32, f8e5m2)
STRATA_CONVERT_KERNEL(f16, f8e5m2)
STRATA_CONVERT_KERNEL(bf16, f8e5m2)
STRATA_CONVERT_KERNEL(f8e4m3, f8e5m2)
STRATA_CONVERT_KERNEL(f8e5m2, f8e5m2)

// ---------------------------------------------------------------------------------------------
// Absmax quantization into fp8, per tensor (groups = 1) or per row (groups = rows), in four
// launches on one stream, as strata::convert::convert does it on the host:
//
//   strata_absmax_clear(absmax, groups)
//       zeroes the groups' absmax words (the destination's scales, used as u32 until step 3);
//   strata_absmax_<src>(src, src_scales, absmax, numel, src_row_len, row_len)
//       absmax[g] = the largest finite |x| of group g (elements g * row_len ... ), as f32 bits,
//       where x is the source value as f32 (scaled fp8: f32(code) * src_scales[i / src_row_len];
//       src_scales NULL for unscaled data). Order-independent: an atomic max of bit patterns;
//   strata_scales_<fp8>(absmax, groups)
//       turns each absmax into its scale in place: absmax / FP8_MAX, 1.0 when that is 0;
//   strata_quantize_<src>_to_<fp8>(src, src_scales, dst, scales, numel, src_row_len, row_len)
//       dst[i] = fp8(x / scales[i / row_len]), one f32 division, rounded to nearest even and
//       saturated.
// ---------------------------------------------------------------------------------------------

// atomicMax on a u32 in global memory; the host build runs one thread at a time.
static inline STRATA_HD void strata_atomic_max_u32(strata_u32 *address, strata_u32 value) {
#if defined(__CUDA_ARCH__) && defined(__clang__)
  __nvvm_atom_max_gen_ui(address, value);
#elif defined(__CUDA_ARCH__)
  atomicMax(address, value);
#else
  *address = *address > value ? *address : value;
#endif
}

extern "C" __global__ void strata_absmax_clear(strata_u32 *STRATA_RESTRICT absmax,
                                               strata_u64 groups) {
  for (strata_u64 g = STRATA_THREAD_INDEX(); g < groups; g += STRATA_GRID_THREADS()) {
    absmax[g] = 0;
  }
}

// The absmax pass walks the elements in tiles of STRATA_ABSMAX_LANES x STRATA_ABSMAX_STEPS, one
// tile per warp at a time: at each step the warp's lanes read consecutive elements (coalesced),
// and each lane keeps the largest magnitude of its current group across the steps, merging it
// into the group's word when it moves on to another group or ends the tile. A plain grid-stride
// loop merged after almost every element, one atomic per element, all of a row's on one word.
#define STRATA_ABSMAX_LANES 32
#define STRATA_ABSMAX_STEPS 32

template <class Src>
static inline STRATA_HD void strata_absmax_loop(const unsigned char *STRATA_RESTRICT src,
                                                const float *STRATA_RESTRICT src_scales,
                                                strata_u32 *STRATA_RESTRICT absmax,
                                                strata_u64 numel, strata_u64 src_row_len,
                                                strata_u64 row_len, strata_u64 first,
                                                strata_u64 stride) {
  // Launches are of whole warps; a grid of another shape makes each thread a warp of its own.
  const strata_u64 lanes = stride % STRATA_ABSMAX_LANES == 0 ? STRATA_ABSMAX_LANES : 1;
  const strata_u64 tile = lanes * STRATA_ABSMAX_STEPS;
  const strata_u64 tiles_stride = stride / lanes * tile;
  for (strata_u64 start = first / lanes * tile; start < numel; start += tiles_stride) {
    const strata_u64 end = numel - start < tile ? numel : start + tile;
    strata_u64 i = start + first % lanes;
    strata_rows src_rows = strata_rows_at(i, lanes, src_row_len, numel);
    strata_rows rows = strata_rows_at(i, lanes, row_len, numel);
    strata_u32 largest = 0;
    for (; i < end; i += lanes) {
      strata_u32 magnitude =
          strata_finite_magnitude_bits(strata_load_scaled<Src>(src, src_scales, i, src_rows));
      largest = largest > magnitude ? largest : magnitude;
      strata_u64 row = rows.row;
      strata_rows_advance(&src_rows);
      strata_rows_advance(&rows);
      if (rows.row != row || i + lanes >= end) {
        if (largest != 0) {
          strata_atomic_max_u32(&absmax[row], largest);
        }
        largest = 0;
      }
    }
  }
}

template <class Src, class Dst>
static inline STRATA_HD void strata_quantize_loop(const unsigned char *STRATA_RESTRICT src,
                                                  const float *STRATA_RESTRICT src_scales,
                                                  unsigned char *STRATA_RESTRICT dst,
                                                  const float *STRATA_RESTRICT scales,
                                                  strata_u64 numel, strata_u64 src_row_len,
                                                  strata_u64 row_len, strata_u64 first,
                                                  strata_u64 stride) {
  strata_rows src_rows = strata_rows_at(first, stride, src_row_len, numel);
  strata_rows rows = strata_rows_at(first, stride, row_len, numel);
  for (strata_u64 i = first; i < numel; i += stride) {
    strata_u32 bits = strata_load_scaled<Src>(src, src_scales, i, src_rows);
    Dst::store(dst, i, strata_unscale_f32_bits(bits, scales[rows.row]));
    strata_rows_advance(&src_rows);
    strata_rows_advance(&rows);
  }
}

#define STRATA_ABSMAX_KERNEL(SRC)                                                                  \
  extern "C" __global__ void strata_absmax_##SRC(                                                  \
      const unsigned char *STRATA_RESTRICT src, const float *STRATA_RESTRICT src_scales,           \
      strata_u32 *STRATA_RESTRICT absmax, strata_u64 numel, strata_u64 src_row_len,                \
      strata_u64 row_len) {                                                                        \
    strata_absmax_loop<strata_src_##SRC>(src, src_scales, absmax, numel, src_row_len, row_len,     \
                                         STRATA_THREAD_INDEX(), STRATA_GRID_THREADS());            \
  }

#define STRATA_SCALES_KERNEL(FP8, MAN_BITS, BIAS, MAX_CODE, HAS_INF)                               \
  extern "C" __global__ void strata_scales_##FP8(strata_u32 *STRATA_RESTRICT absmax,              \
                                                 strata_u64 groups) {                              \
    const strata_u32 max_bits =                                                                    \
        strata_fp8_to_f32_bits(MAX_CODE, MAN_BITS, BIAS, MAX_CODE, HAS_INF);                       \
    for (strata_u64 g = STRATA_THREAD_INDEX(); g < groups; g += STRATA_GRID_THREADS()) {          \
      absmax[g] = strata_scale_of_absmax(absmax[g], max_bits);                                     \
    }                                                                                              \
  }

#define STRATA_QUANTIZE_KERNEL(SRC, DST)                                                           \
  extern "C" __global__ void strata_quantize_##SRC##_to_##DST(                                     \
      const unsigned char *STRATA_RESTRICT src, const float *STRATA_RESTRICT src_scales,           \
      unsigned char *STRATA_RESTRICT dst, const float *STRATA_RESTRICT scales, strata_u64 numel,   \
      strata_u64 src_row_len, strata_u64 row_len) {                                                \
    strata_quantize_loop<strata_src_##SRC, strata_dst_##DST>(src, src_scales, dst, scales, numel,  \
                                                             src_row_len, row_len,                 \
                                                             STRATA_THREAD_INDEX(),                \
                                                             STRATA_GRID_THREADS());               \
  }

STRATA_ABSMAX_KERNEL(f32)
STRATA_ABSMAX_KERNEL(f16)
STRATA_ABSMAX_KERNEL(bf16)
STRATA_ABSMAX_KERNEL(f8e4m3)
STRATA_ABSMAX_KERNEL(f8e5m2)

STRATA_SCALES_KERNEL(f8e4m3, 3, 7, 0x7E, false)
STRATA_SCALES_KERNEL(f8e5m2, 2, 15, 0x7B, true)

STRATA_QUANTIZE_KERNEL(f32, f8e4m3)
STRATA_QUANTIZE_KERNEL(f16, f8e4m3)
STRATA_QUANTIZE_KERNEL(bf16, f8e4m3)
STRATA_QUANTIZE_KERNEL(f8e4m3, f8e4m3)
STRATA_QUANTIZE_KERNEL(f8e5m2, f8e4m3)

STRATA_QUANTIZE_KERNEL(f32, f8e5m2)
STRATA_QUANTIZE_KERNEL(f16, f8e5m2)
STRATA_QUANTIZE_KERNEL(bf16, f8e5m2)
STRATA_QUANTIZE_KERNEL(f8e4m3, f8e5m2)
STRATA_QUANTIZE_KERNEL(f8e5m2, f8e5m2)
