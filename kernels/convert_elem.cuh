// strata's per-element dtype conversions, bit-identical to the host conversions in
// src/convert/ (mod.rs, ieee.rs, fp8.rs and the `half` crate they call).
//
// This header compiles both as CUDA device code (kernels/convert.cu, built to PTX by
// scripts/gen-ptx.sh) and as plain host C++ (tests/kernel_host_check.cpp, which tests/kernels.rs
// compares with the Rust conversions over every f16, bf16 and fp8 code and millions of f32s).
// So it uses only integer and bit operations plus the two f32 operations that IEEE 754 defines
// exactly (a rounded add and a rounded multiply), and nothing whose result differs between x86
// and a GPU:
// - no fused multiply-add: the PTX is built with -ffp-contract=off, which makes clang write every
//   f32 add and multiply with an explicit .rn, which ptxas never fuses;
// - no NaN through arithmetic: a GPU gives the canonical NaN 0x7FFFFFFF for any NaN result, where
//   x86 keeps the operand's bits, so NaNs are found and built with bit tests;
// - no flushing of subnormals: no -ffast-math, no ftz (tests/kernels.rs rejects .ftz in the PTX).
//
// No headers are included: the PTX build passes -nocudainc.

#ifndef STRATA_CONVERT_ELEM_CUH
#define STRATA_CONVERT_ELEM_CUH

// Compiling as CUDA: nvcc defines __CUDACC__; clang defines __CUDA__ (and __CUDACC__ only in the
// CUDA headers, which -nocudainc leaves out).
#if defined(__CUDACC__) || defined(__CUDA__)
#define STRATA_CUDA 1
#endif

#if defined(STRATA_CUDA)
#ifndef __host__
#define __host__ __attribute__((host))
#endif
#ifndef __device__
#define __device__ __attribute__((device))
#endif
#define STRATA_HD __host__ __device__
#else
#define STRATA_HD
#endif

typedef unsigned char strata_u8;
typedef unsigned short strata_u16;
typedef unsigned int strata_u32;
typedef unsigned long long strata_u64;

// ---------------------------------------------------------------------------------------------
// Bit casts and counting
// ---------------------------------------------------------------------------------------------

static inline STRATA_HD strata_u32 strata_f32_to_bits(float x) {
#if defined(__CUDA_ARCH__) && !defined(__clang__)
  return __float_as_uint(x);
#else
  strata_u32 bits;
  __builtin_memcpy(&bits, &x, sizeof bits);
  return bits;
#endif
}

static inline STRATA_HD float strata_f32_from_bits(strata_u32 bits) {
#if defined(__CUDA_ARCH__) && !defined(__clang__)
  return __uint_as_float(bits);
#else
  float x;
  __builtin_memcpy(&x, &bits, sizeof x);
  return x;
#endif
}

// Leading zero bits of a non-zero x (Rust's u32::leading_zeros).
static inline STRATA_HD strata_u32 strata_leading_zeros(strata_u32 x) {
#if defined(__CUDA_ARCH__) && !defined(__clang__)
  return (strata_u32)__clz((int)x);
#else
  return (strata_u32)__builtin_clz(x);
#endif
}

// An f32 add and multiply, rounded to nearest even. Kept as functions so that each is one
// operation that the compiler may not merge with another (the PTX build also forbids contraction).
static inline STRATA_HD float strata_add_f32(float a, float b) { return a + b; }
static inline STRATA_HD float strata_mul_f32(float a, float b) { return a * b; }

// ---------------------------------------------------------------------------------------------
// bf16 (src/convert/ieee.rs)
// ---------------------------------------------------------------------------------------------

// ieee::f32_to_bf16_bits: round to nearest even by one add; NaN keeps its sign and top payload
// bits and is quieted; overflow carries into the infinity code.
static inline STRATA_HD strata_u16 strata_f32_bits_to_bf16(strata_u32 bits) {
  strata_u32 rounded = (bits + (0x7FFFu + ((bits >> 16) & 1u))) >> 16;
  strata_u32 quiet_nan = (bits >> 16) | 0x40u;
  return (strata_u16)((bits & 0x7FFFFFFFu) > 0x7F800000u ? quiet_nan : rounded);
}

// ieee::bf16_bits_to_f32: exact; NaN is quieted.
static inline STRATA_HD strata_u32 strata_bf16_to_f32_bits(strata_u16 bits) {
  strata_u32 widened = (strata_u32)bits << 16;
  return (bits & 0x7FFFu) > 0x7F80u ? (widened | 0x00400000u) : widened;
}

// ---------------------------------------------------------------------------------------------
// f16 (the `half` crate: F16C vcvtph2ps / vcvtps2ph on x86, or its software fallback, which give
// the same bits)
// ---------------------------------------------------------------------------------------------

// f16 → f32, exact; NaN keeps its payload and is quieted (half's f16_to_f32_fallback, and what
// vcvtph2ps does).
static inline STRATA_HD strata_u32 strata_f16_to_f32_bits(strata_u16 h) {
  strata_u32 sign = (strata_u32)(h & 0x8000u) << 16;
  strata_u32 exponent = h & 0x7C00u;
  strata_u32 mantissa = h & 0x03FFu;
  if (exponent == 0x7C00u) {
    return mantissa == 0 ? (sign | 0x7F800000u) : (sign | 0x7FC00000u | (mantissa << 13));
  }
  if (exponent == 0) {
    if (mantissa == 0) {
      return sign;
    }
    // Subnormal: mantissa * 2^-24, normalised. e = the shift that brings the mantissa's top bit
    // to bit 10 (half's leading_zeros_u16(mantissa) - 6).
    strata_u32 e = strata_leading_zeros(mantissa) - 16 - 6;
    return sign | ((127 - 15 - e) << 23) | ((mantissa << (14 + e)) & 0x007FFFFFu);
  }
  return sign | (((exponent >> 10) + (127 - 15)) << 23) | (mantissa << 13);
}

// f32 → f16, round to nearest even, overflow to infinity; NaN keeps its sign and top 9 payload
// bits and is quieted (half's f32_to_f16_fallback, and what vcvtps2ph does). The rounding is the
// two-way scheme of ieee::round_f64_magnitude, in f32: an f32 add for the subnormal range,
// integer rounding for the normal range.
static inline STRATA_HD strata_u16 strata_f32_bits_to_f16(strata_u32 bits) {
  const strata_u32 man_bits = 10;
  const strata_u32 bias = 15;
  const strata_u32 max_code = 0x7C00u;
  strata_u32 sign = (bits >> 16) & 0x8000u;
  strata_u32 abs = bits & 0x7FFFFFFFu;
  strata_u32 nan = 0x7E00u | ((bits & 0x007FFFFFu) >> 13);
  // Below the smallest normal f16 the step is 2^-24, the f32 ulp of 0.5: adding 0.5 rounds to
  // that step (nearest even), and the sum's low bits are the code (0x400, the smallest normal's,
  // on a carry).
  const strata_u32 shift = 23 - man_bits;
  float magic = strata_f32_from_bits((127 + 23 + 1 - bias - man_bits) << 23);
  strata_u32 subnormal =
      strata_f32_to_bits(strata_add_f32(strata_f32_from_bits(abs), magic)) -
      strata_f32_to_bits(magic);
  strata_u32 odd = (abs >> shift) & 1u;
  strata_u32 rebased = abs - ((127 - bias) << 23);
  strata_u32 normal = (rebased + ((1u << (shift - 1)) - 1u + odd)) >> shift;
  normal = normal < max_code ? normal : max_code;
  const strata_u32 smallest_normal = (127 + 1 - bias) << 23;
  strata_u32 magnitude = abs < smallest_normal ? subnormal : normal;
  magnitude = abs > 0x7F800000u ? nan : magnitude;
  return (strata_u16)(sign | magnitude);
}

// ---------------------------------------------------------------------------------------------
// fp8 (src/convert/fp8.rs)
// ---------------------------------------------------------------------------------------------

// Fp8Format::decode_to_f32_bits: the exact f32 of `code`; NaN codes give the quiet NaN
// 0x7FC00000 with the code's sign. e4m3fn: man_bits 3, bias 7, max_code 0x7E, no infinity;
// e5m2: man_bits 2, bias 15, max_code 0x7B, infinity 0x7C.
static inline STRATA_HD strata_u32 strata_fp8_to_f32_bits(strata_u8 code, strata_u32 man_bits,
                                                          int bias, strata_u32 max_code,
                                                          bool has_inf) {
  strata_u32 sign = (strata_u32)(code >> 7) << 31;
  strata_u32 magnitude = code & 0x7Fu;
  strata_u32 inf_code = max_code + 1;
  strata_u32 last_non_nan = has_inf ? inf_code : max_code;
  if (magnitude > last_non_nan) {
    return sign | 0x7FC00000u;
  }
  if (has_inf && magnitude == inf_code) {
    return sign | 0x7F800000u;
  }
  if (magnitude == 0) {
    return sign;
  }
  int exponent_field = (int)(magnitude >> man_bits);
  strata_u32 mantissa = magnitude & ((1u << man_bits) - 1u);
  // value = significand * 2^exponent, with a normalised significand of man_bits + 1 bits or a
  // subnormal one of fewer.
  int min_exponent = 1 - bias - (int)man_bits;
  strata_u32 significand;
  int exponent;
  if (exponent_field == 0) {
    significand = mantissa;
    exponent = min_exponent;
  } else {
    significand = mantissa | (1u << man_bits);
    exponent = min_exponent + exponent_field - 1;
  }
  strata_u32 top = 31 - strata_leading_zeros(significand);
  strata_u32 fraction = (significand - (1u << top)) << (23 - top);
  return sign | ((strata_u32)(exponent + (int)top + 127) << 23) | fraction;
}

static inline STRATA_HD strata_u32 strata_f8e4m3_to_f32_bits(strata_u8 code) {
  return strata_fp8_to_f32_bits(code, 3, 7, 0x7E, false);
}

static inline STRATA_HD strata_u32 strata_f8e5m2_to_f32_bits(strata_u8 code) {
  return strata_fp8_to_f32_bits(code, 2, 15, 0x7B, true);
}

// A scaled fp8 value: f32(code) * scale, one f32 multiply (Source::decode). A NaN code stays the
// decoded quiet NaN with its sign, which is what x86 gives for NaN * a number; the GPU would give
// 0x7FFFFFFF. Scales come from strata's quantization, so they are positive and finite; for those
// no other NaN can arise.
static inline STRATA_HD strata_u32 strata_scale_f32_bits(strata_u32 bits, float scale) {
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) {
    return bits;
  }
  return strata_f32_to_bits(strata_mul_f32(strata_f32_from_bits(bits), scale));
}

// Fp8Format::encode_f32: round to nearest even, saturating at ±max (infinities too); NaN gives
// `nan_code` with the sign kept. Saturation is an integer min on the magnitude's bits, which
// orders every non-NaN magnitude as the float compare does and sends NaN (and infinity) to the
// max, as the host's float compare does; the NaN is replaced at the end.
static inline STRATA_HD strata_u8 strata_f32_bits_to_fp8(strata_u32 bits, strata_u32 man_bits,
                                                         int bias, strata_u32 max_code,
                                                         strata_u32 nan_code, bool has_inf) {
  strata_u32 sign = (bits >> 24) & 0x80u;
  strata_u32 max_bits = strata_fp8_to_f32_bits((strata_u8)max_code, man_bits, bias, max_code,
                                               has_inf);
  strata_u32 abs = bits & 0x7FFFFFFFu;
  abs = abs < max_bits ? abs : max_bits;
  // Below the smallest normal fp8 the step is fixed: adding a power of two whose f32 ulp is that
  // step makes the FPU round to nearest even, and the sum's low bits are the code.
  float magic = strata_f32_from_bits((strata_u32)(127 + 23 + 1 - bias - (int)man_bits) << 23);
  strata_u32 subnormal =
      strata_f32_to_bits(strata_add_f32(strata_f32_from_bits(abs), magic)) -
      strata_f32_to_bits(magic);
  // Normal: rebias, and round the dropped bits to nearest even; a carry moves into the exponent.
  strata_u32 shift = 23 - man_bits;
  strata_u32 odd = (abs >> shift) & 1u;
  strata_u32 rebased = abs - ((strata_u32)(127 - bias) << 23);
  strata_u32 normal = (rebased + ((1u << (shift - 1)) - 1u + odd)) >> shift;
  strata_u32 smallest_normal = (strata_u32)(127 + 1 - bias) << 23;
  strata_u32 code = abs < smallest_normal ? subnormal : normal;
  code = (bits & 0x7FFFFFFFu) > 0x7F800000u ? nan_code : code;
  return (strata_u8)(sign | (code & 0xFFu));
}

static inline STRATA_HD strata_u8 strata_f32_bits_to_f8e4m3(strata_u32 bits) {
  return strata_f32_bits_to_fp8(bits, 3, 7, 0x7E, 0x7F, false);
}

static inline STRATA_HD strata_u8 strata_f32_bits_to_f8e5m2(strata_u32 bits) {
  return strata_f32_bits_to_fp8(bits, 2, 15, 0x7B, 0x7E, true);
}

// ---------------------------------------------------------------------------------------------
// Absmax quantization (src/convert/mod.rs, `quantize`)
// ---------------------------------------------------------------------------------------------

// An f32 division, rounded to nearest even (PTX div.rn.f32, which handles subnormals exactly).
static inline STRATA_HD float strata_div_f32(float a, float b) { return a / b; }

// What a value adds to its group's absmax, as bits: its magnitude when finite, else 0. Finite
// magnitudes order like their bit patterns, so the group's absmax is the largest of these
// (finite_absmax).
static inline STRATA_HD strata_u32 strata_finite_magnitude_bits(strata_u32 bits) {
  strata_u32 magnitude = bits & 0x7FFFFFFFu;
  return magnitude < 0x7F800000u ? magnitude : 0u;
}

// A group's scale from its absmax: absmax / FP8_MAX in f32, and 1.0 when that is 0 (all zeros,
// no finite value, or an absmax so small that the division underflows).
static inline STRATA_HD strata_u32 strata_scale_of_absmax(strata_u32 absmax_bits,
                                                          strata_u32 max_bits) {
  float scale = strata_div_f32(strata_f32_from_bits(absmax_bits), strata_f32_from_bits(max_bits));
  return strata_f32_to_bits(scale) != 0u ? strata_f32_to_bits(scale) : 0x3F800000u;
}

// The value quantization encodes: x / scale with one f32 division. A NaN stays as it is (x86
// keeps the operand's sign, a GPU would give 0x7FFFFFFF); only its sign and NaN-ness are used.
static inline STRATA_HD strata_u32 strata_unscale_f32_bits(strata_u32 bits, float scale) {
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) {
    return bits;
  }
  return strata_f32_to_bits(strata_div_f32(strata_f32_from_bits(bits), scale));
}

#endif // STRATA_CONVERT_ELEM_CUH
