//! Bit-level roundings that `half` does not do directly or fast enough: f32↔bf16 (branch-free, so
//! slice loops vectorise) and f64→f16/bf16/fp8 rounded straight from the f64 value.
//!
//! `half`'s `from_f64` is not usable for the latter: its software path drops the low 32 mantissa
//! bits before rounding, and its F16C path goes through f32; both round a value just above a tie
//! as if it were the tie.

/// A narrower binary format to round into (its exponent width is implied by `max_code`).
#[derive(Clone, Copy)]
pub(crate) struct Narrow {
    pub(crate) man_bits: u32,
    pub(crate) bias: i32,
    /// Magnitudes that round above this code become this code: the largest finite value for a
    /// saturating format, the infinity code for an IEEE one.
    pub(crate) max_code: u32,
}

const F16: Narrow = Narrow {
    man_bits: 10,
    bias: 15,
    max_code: 0x7C00,
};

const BF16: Narrow = Narrow {
    man_bits: 7,
    bias: 127,
    max_code: 0x7F80,
};

const F64_ABS_MASK: u64 = 0x7FFF_FFFF_FFFF_FFFF;
const F64_INF: u64 = 0x7FF0_0000_0000_0000;
const F64_MANTISSA: u64 = 0x000F_FFFF_FFFF_FFFF;

/// The magnitude code of the non-NaN f64 whose bits without the sign are `abs`, rounded to
/// nearest, ties to even, in `target`, clamped to `target.max_code`. The same two-way scheme as
/// the fp8 encoder: an FPU add for the subnormal range, integer rounding for the normal range.
#[inline(always)]
pub(crate) fn round_f64_magnitude(abs: u64, target: Narrow) -> u32 {
    let shift = 52 - target.man_bits;
    let magic =
        f64::from_bits(((1023 + 52 + 1 - target.bias) as u64 - target.man_bits as u64) << 52);
    let subnormal = (f64::from_bits(abs) + magic)
        .to_bits()
        .wrapping_sub(magic.to_bits());
    let odd = (abs >> shift) & 1;
    let rebased = abs.wrapping_sub(((1023 - target.bias) as u64) << 52);
    let normal =
        (rebased.wrapping_add((1 << (shift - 1)) - 1 + odd) >> shift).min(target.max_code as u64);
    let smallest_normal = ((1023 + 1 - target.bias) as u64) << 52;
    (if abs < smallest_normal {
        subnormal
    } else {
        normal
    }) as u32
}

/// f64 → f16 bits, rounded directly; NaN keeps its sign and top payload bits, quieted, exactly as
/// `half::f16::from_f64` does.
#[inline(always)]
pub(crate) fn f64_to_f16_bits(x: f64) -> u16 {
    let bits = x.to_bits();
    let sign = (bits >> 48) as u16 & 0x8000;
    let abs = bits & F64_ABS_MASK;
    let nan = 0x7E00 | ((bits & F64_MANTISSA) >> 42) as u16;
    let magnitude = if abs > F64_INF {
        nan
    } else {
        round_f64_magnitude(abs, F16) as u16
    };
    sign | magnitude
}

/// f64 → bf16 bits, rounded directly; NaN as `half::bf16::from_f64` makes it.
#[inline(always)]
pub(crate) fn f64_to_bf16_bits(x: f64) -> u16 {
    let bits = x.to_bits();
    let sign = (bits >> 48) as u16 & 0x8000;
    let abs = bits & F64_ABS_MASK;
    let nan = 0x7FC0 | ((bits & F64_MANTISSA) >> 45) as u16;
    let magnitude = if abs > F64_INF {
        nan
    } else {
        round_f64_magnitude(abs, BF16) as u16
    };
    sign | magnitude
}

/// f32 → bf16 bits, round to nearest even; NaN keeps its sign and top payload bits and is quieted
/// (as `half::bf16::from_f32`). bf16 is f32's top half, so rounding is one add: half an ulp minus
/// one, plus the kept lsb; overflow carries into the infinity code.
#[inline(always)]
pub(crate) fn f32_to_bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    let rounded = bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) >> 16;
    let quiet_nan = (bits >> 16) | 0x40;
    (if bits & 0x7FFF_FFFF > 0x7F80_0000 {
        quiet_nan
    } else {
        rounded
    }) as u16
}

/// bf16 bits → f32, exact; NaN is quieted as `half::bf16::to_f32` does.
#[inline(always)]
pub(crate) fn bf16_bits_to_f32(bits: u16) -> f32 {
    let widened = (bits as u32) << 16;
    f32::from_bits(if bits & 0x7FFF > 0x7F80 {
        widened | 0x0040_0000
    } else {
        widened
    })
}

/// f16 bits → f32, exact, branch-free so that block loops vectorise (`half`'s slice conversion
/// runs F16C 4 lanes a call, behind a feature check per call). The same bits as `half` and F16C.
/// Normal codes rebias by an integer add; subnormal codes are their mantissa (an exact integer
/// conversion) times 2^-24, so no arithmetic ever sees an f32 subnormal, which costs x86 a
/// microcode assist per vector. NaN keeps its payload, quieted.
#[inline(always)]
pub(crate) fn f16_bits_to_f32(bits: u16) -> f32 {
    let sign = ((bits & 0x8000) as u32) << 16;
    let magnitude = (bits & 0x7FFF) as u32;
    let normal = (magnitude << 13) + ((127 - 15) << 23);
    let subnormal = (magnitude as i32 as f32 * f32::from_bits((127 - 24) << 23)).to_bits();
    let quiet = if magnitude > 0x7C00 { 0x0040_0000 } else { 0 };
    let special = 0x7F80_0000 | (magnitude << 13) | quiet;
    let finite = if magnitude < 0x0400 {
        subnormal
    } else {
        normal
    };
    f32::from_bits(sign | if magnitude >= 0x7C00 { special } else { finite })
}

/// f32 → f16 bits, round to nearest even, overflow to infinity; NaN keeps its sign and top
/// payload bits, quieted. The same bits as `half` (F16C or its software path), branch-free: the
/// fp8 encoder's scheme (an FPU add for the subnormal range, integer rounding above it).
#[inline(always)]
pub(crate) fn f32_to_f16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    let sign = (bits >> 16) & 0x8000;
    let abs = bits & 0x7FFF_FFFF;
    // 0.5: its f32 ulp is 2^-24, the f16 subnormal step.
    let magic = f32::from_bits(126 << 23);
    let subnormal = (f32::from_bits(abs) + magic)
        .to_bits()
        .wrapping_sub(magic.to_bits());
    let odd = (abs >> 13) & 1;
    let rebased = abs.wrapping_sub((127 - 15) << 23);
    let normal = (rebased.wrapping_add(0xFFF + odd) >> 13).min(0x7C00);
    let smallest_normal = (127 - 14) << 23;
    let magnitude = if abs < smallest_normal {
        subnormal
    } else {
        normal
    };
    let nan = 0x7E00 | ((abs & 0x007F_FFFF) >> 13);
    (sign | if abs > 0x7F80_0000 { nan } else { magnitude }) as u16
}
