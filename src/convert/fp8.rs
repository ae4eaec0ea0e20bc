//! The two fp8 formats: exact decode tables, and round-to-nearest-even saturating encoders.
//!
//! The encoders are written without data-dependent branches (both roundings are computed and one
//! is selected) so that slice loops over them vectorise, and so that the CUDA kernel can mirror
//! them line by line.

use super::ieee::{round_f64_magnitude, Narrow};
use crate::dtype::DType;

/// Everything that differs between e4m3fn and e5m2, with the decode table built at compile time.
pub(crate) struct Fp8Format {
    man_bits: u32,
    bias: i32,
    /// Largest finite magnitude: everything above it, infinities included, saturates here.
    max_code: u8,
    /// The magnitude written for NaN (the sign is kept).
    nan_code: u8,
    /// e5m2 reserves 0x7C for infinity like IEEE; e4m3fn uses that code for a finite value.
    has_inf: bool,
    /// The f32 bits of every code's value.
    pub(crate) to_f32_bits: [u32; 256],
}

/// fp8 e4m3fn: bias 7, no infinities, NaN only at 0x7F/0xFF, max 448.
pub(crate) static E4M3FN: Fp8Format = Fp8Format::new(3, 7, 0x7E, 0x7F, false);
/// fp8 e5m2: IEEE-like with bias 15, infinity 0x7C, max 57344.
pub(crate) static E5M2: Fp8Format = Fp8Format::new(2, 15, 0x7B, 0x7E, true);

/// The format of an fp8 dtype; `None` for every other dtype.
pub(crate) fn format_of(dtype: DType) -> Option<&'static Fp8Format> {
    match dtype {
        DType::F8E4M3 => Some(&E4M3FN),
        DType::F8E5M2 => Some(&E5M2),
        _ => None,
    }
}

fn expect_format(dtype: DType, caller: &str) -> &'static Fp8Format {
    format_of(dtype).unwrap_or_else(|| panic!("{caller}: {dtype:?} is not an fp8 dtype"))
}

/// The exact value of an fp8 code (`dtype` F8E4M3 or F8E5M2). NaN codes decode to the quiet NaN
/// 0x7FC00000 with the code's sign.
///
/// # Panics
/// If `dtype` is not an fp8 dtype.
pub fn fp8_to_f32(bits: u8, dtype: DType) -> f32 {
    f32::from_bits(expect_format(dtype, "fp8_to_f32").to_f32_bits[bits as usize])
}

/// Rounds to the nearest fp8 value (ties to even), saturating at ±max; ±inf also gives ±max, and
/// NaN gives the format's NaN with the sign kept.
///
/// # Panics
/// If `dtype` is not an fp8 dtype.
pub fn f32_to_fp8(x: f32, dtype: DType) -> u8 {
    expect_format(dtype, "f32_to_fp8").encode_f32(x)
}

/// Like [`f32_to_fp8`], rounding straight from the f64 value (no intermediate f32 rounding).
///
/// # Panics
/// If `dtype` is not an fp8 dtype.
pub fn f64_to_fp8(x: f64, dtype: DType) -> u8 {
    expect_format(dtype, "f64_to_fp8").encode_f64(x)
}

impl Fp8Format {
    const fn new(man_bits: u32, bias: i32, max_code: u8, nan_code: u8, has_inf: bool) -> Self {
        let mut format = Fp8Format {
            man_bits,
            bias,
            max_code,
            nan_code,
            has_inf,
            to_f32_bits: [0; 256],
        };
        let mut code = 0;
        while code < 256 {
            format.to_f32_bits[code] = format.decode_to_f32_bits(code as u8);
            code += 1;
        }
        format
    }

    /// The largest finite value (448 or 57344), onto which absmax scaling maps a group's absmax.
    pub(crate) fn max_value(&self) -> f32 {
        f32::from_bits(self.to_f32_bits[self.max_code as usize])
    }

    /// Codes above this magnitude are NaN: infinity for e5m2, the max for e4m3fn.
    const fn last_non_nan(&self) -> u8 {
        if self.has_inf {
            self.inf_code()
        } else {
            self.max_code
        }
    }

    const fn inf_code(&self) -> u8 {
        self.max_code + 1
    }

    /// The f32 bits of `code`'s value (f32 holds every fp8 value exactly, as a normal number).
    /// NaN becomes the quiet NaN 0x7FC00000 with the code's sign.
    const fn decode_to_f32_bits(&self, code: u8) -> u32 {
        let sign = ((code >> 7) as u32) << 31;
        let magnitude = code & 0x7F;
        if magnitude > self.last_non_nan() {
            return sign | 0x7FC0_0000;
        }
        if self.has_inf && magnitude == self.inf_code() {
            return sign | 0x7F80_0000;
        }
        if magnitude == 0 {
            return sign;
        }
        let exponent_field = (magnitude >> self.man_bits) as i32;
        let mantissa = (magnitude & ((1 << self.man_bits) - 1)) as u32;
        // value = significand * 2^exponent, with a normalised significand of man_bits + 1 bits or a
        // subnormal one of fewer.
        let min_exponent = 1 - self.bias - self.man_bits as i32;
        let (significand, exponent) = if exponent_field == 0 {
            (mantissa, min_exponent)
        } else {
            (
                mantissa | (1 << self.man_bits),
                min_exponent + exponent_field - 1,
            )
        };
        let top = 31 - significand.leading_zeros();
        let fraction = (significand - (1 << top)) << (23 - top);
        sign | (((exponent + top as i32 + 127) as u32) << 23) | fraction
    }

    /// `code`'s value, the same bits as `to_f32_bits[code]`, computed rather than looked up:
    /// vectorised, a lookup is a gather, which is slow. The code's fields placed where f32 keeps
    /// them read as a number 2^(127 - bias) too small (subnormal codes as f32 subnormals), and the
    /// multiplication by that power of two is exact.
    #[inline(always)]
    pub(crate) fn decode_f32(&self, code: u8) -> f32 {
        let sign = ((code & 0x80) as u32) << 24;
        let magnitude = (code & 0x7F) as u32;
        let power = f32::from_bits(((127 + 127 - self.bias) as u32) << 23);
        let finite = (f32::from_bits(magnitude << (23 - self.man_bits)) * power).to_bits();
        let special = if magnitude > self.last_non_nan() as u32 {
            0x7FC0_0000
        } else {
            0x7F80_0000
        };
        f32::from_bits(
            sign | if magnitude >= self.inf_code() as u32 {
                special
            } else {
                finite
            },
        )
    }

    /// See [`f32_to_fp8`]. Inlined into slice loops, where the format's fields are loop-invariant.
    #[inline(always)]
    pub(crate) fn encode_f32(&self, x: f32) -> u8 {
        self.encode_quotient(x, x)
    }

    /// The code of `quotient`, a quotient of `dividend` by a positive scale, whose sign and
    /// NaN-ness it takes from `dividend` (the same as the quotient's own for a division; see
    /// [`ScaleDivision`] for a computed quotient that keeps neither). A NaN `quotient` of a
    /// dividend that is not NaN saturates like an infinity.
    #[inline(always)]
    pub(crate) fn encode_quotient(&self, dividend: f32, quotient: f32) -> u8 {
        // The sign stays in a 32-bit lane until the end: vectorised, one narrowing at the store.
        let sign = (dividend.to_bits() >> 24) & 0x80;
        // Saturate first: every magnitude above the max, infinity included, then rounds to the
        // max code. NaN also lands on the max here and is replaced at the end. On the bits (one
        // vector integer min, where a float compare and a blend take two): non-negative floats
        // order like their bits, and NaN bits lie above them all.
        let abs = (quotient.to_bits() & 0x7FFF_FFFF).min(self.max_value().to_bits());
        let magnitude = f32::from_bits(abs);
        // Below the smallest normal fp8 the step is fixed (the subnormal step). Adding a power of
        // two whose f32 ulp is exactly that step makes the FPU do the round-to-nearest-even; the
        // sum's low bits are then the code (reaching the smallest normal's code on a carry).
        let magic = f32::from_bits(((127 + 23 + 1 - self.bias) as u32 - self.man_bits) << 23);
        let subnormal = (magnitude + magic).to_bits().wrapping_sub(magic.to_bits());
        // Normal: rebias the exponent and round the dropped bits to nearest, ties to even (adding
        // half an ulp minus one, plus the kept lsb); a carry moves into the exponent as it should.
        let shift = 23 - self.man_bits;
        let odd = (abs >> shift) & 1;
        let rebased = abs.wrapping_sub(((127 - self.bias) as u32) << 23);
        let normal = rebased.wrapping_add((1 << (shift - 1)) - 1 + odd) >> shift;
        let smallest_normal = ((127 + 1 - self.bias) as u32) << 23;
        let code = if abs < smallest_normal {
            subnormal
        } else {
            normal
        };
        let code = if dividend.is_nan() {
            self.nan_code as u32
        } else {
            code
        };
        (sign | code) as u8
    }

    /// See [`f64_to_fp8`].
    #[inline(always)]
    pub(crate) fn encode_f64(&self, x: f64) -> u8 {
        let bits = x.to_bits();
        let sign = (bits >> 56) as u8 & 0x80;
        let abs = bits & 0x7FFF_FFFF_FFFF_FFFF;
        let target = Narrow {
            man_bits: self.man_bits,
            bias: self.bias,
            max_code: self.max_code as u32,
        };
        let magnitude = round_f64_magnitude(abs, target);
        let magnitude = if abs > 0x7FF0_0000_0000_0000 {
            self.nan_code as u32
        } else {
            magnitude
        };
        sign | magnitude as u8
    }
}
