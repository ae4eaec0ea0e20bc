//! Expected values here never come from the code under test: they are hand-checked bit patterns,
//! the `half` crate, Rust's own `as` casts, or a brute-force nearest-value search over every
//! finite value of the target format (decoded from the format's fields by the helpers below).

use super::*;
use crate::error::ErrorKind;
use half::bf16;

const NON_FLOATS: [DType; 6] = [
    DType::I64,
    DType::I32,
    DType::I16,
    DType::I8,
    DType::U8,
    DType::Bool,
];

// ---------------------------------------------------------------------------------------------
// Reference model
// ---------------------------------------------------------------------------------------------

/// The value of an fp8 code from its sign, exponent and mantissa fields.
fn fp8_reference_value(code: u8, dtype: DType) -> f64 {
    let (man_bits, bias) = match dtype {
        DType::F8E4M3 => (3, 7),
        DType::F8E5M2 => (2, 15),
        other => panic!("{other:?} is not fp8"),
    };
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let exponent = ((code & 0x7F) >> man_bits) as i32;
    let mantissa = (code & ((1 << man_bits) - 1)) as f64;
    let all_ones = (1 << (7 - man_bits)) - 1;
    match dtype {
        DType::F8E4M3 if exponent == all_ones && mantissa == 7.0 => return f64::NAN.copysign(sign),
        DType::F8E5M2 if exponent == all_ones && mantissa == 0.0 => return sign * f64::INFINITY,
        DType::F8E5M2 if exponent == all_ones => return f64::NAN.copysign(sign),
        _ => {}
    }
    let unit = f64::from(1 << man_bits);
    if exponent == 0 {
        sign * mantissa / unit * 2f64.powi(1 - bias)
    } else {
        sign * (1.0 + mantissa / unit) * 2f64.powi(exponent - bias)
    }
}

/// The exact value of one element stored as `dtype` (`bits` holds its little-endian bytes).
fn reference_value(bits: u64, dtype: DType) -> f64 {
    match dtype {
        DType::F64 => f64::from_bits(bits),
        DType::F32 => f32::from_bits(bits as u32) as f64,
        DType::F16 => f16::from_bits(bits as u16).to_f64(),
        DType::BF16 => bf16::from_bits(bits as u16).to_f64(),
        _ => fp8_reference_value(bits as u8, dtype),
    }
}

/// A 1-/2-byte float format as a sorted list of its finite non-negative values, for rounding by
/// search.
struct Format {
    dtype: DType,
    /// (value, code), ascending.
    finite: Vec<(f64, u16)>,
    sign_bit: u16,
    quiet_nan: u16,
    /// IEEE formats overflow to infinity; fp8 saturates at the max.
    inf: Option<u16>,
}

impl Format {
    fn new(dtype: DType) -> Format {
        let (last_finite, sign_bit, quiet_nan, inf) = match dtype {
            DType::F16 => (0x7BFF, 0x8000, 0x7E00, Some(0x7C00)),
            DType::BF16 => (0x7F7F, 0x8000, 0x7FC0, Some(0x7F80)),
            DType::F8E4M3 => (0x7E, 0x80, 0x7F, None),
            DType::F8E5M2 => (0x7B, 0x80, 0x7E, None),
            other => panic!("no search format for {other:?}"),
        };
        let finite = (0..=last_finite)
            .map(|code| (reference_value(code as u64, dtype), code))
            .collect();
        Format {
            dtype,
            finite,
            sign_bit,
            quiet_nan,
            inf,
        }
    }

    /// Round to nearest, ties to even code, by searching the two neighbours of `value`.
    fn round(&self, value: f64) -> u16 {
        let sign = if value.is_sign_negative() {
            self.sign_bit
        } else {
            0
        };
        if value.is_nan() {
            return sign | self.quiet_nan;
        }
        let magnitude = value.abs();
        let (max, max_code) = *self.finite.last().unwrap();
        if magnitude > max {
            let Some(inf) = self.inf else {
                return sign | max_code;
            };
            let ulp = max - self.finite[self.finite.len() - 2].0;
            // The tie between max (odd code) and the next power of two (infinity) goes to infinity.
            return sign
                | if magnitude >= max + ulp / 2.0 {
                    inf
                } else {
                    max_code
                };
        }
        let above = self.finite.partition_point(|&(v, _)| v < magnitude);
        let (high, high_code) = self.finite[above];
        if high == magnitude {
            return sign | high_code;
        }
        let (low, low_code) = self.finite[above - 1];
        // Both differences are exact (Sterbenz: the neighbours are within a factor of 2).
        let (to_low, to_high) = (magnitude - low, high - magnitude);
        let code = if to_low < to_high || (to_low == to_high && low_code % 2 == 0) {
            low_code
        } else {
            high_code
        };
        sign | code
    }
}

/// The reference model of every float conversion: the bits of exact `value` rounded to `dtype`.
struct Reference {
    formats: Vec<Format>,
}

impl Reference {
    fn new() -> Reference {
        let formats = [DType::F16, DType::BF16, DType::F8E4M3, DType::F8E5M2]
            .map(Format::new)
            .into();
        Reference { formats }
    }

    fn round(&self, value: f64, dtype: DType) -> u64 {
        match dtype {
            DType::F64 => value.to_bits(),
            DType::F32 if value.is_nan() => 0x7FC0_0000 | (value.is_sign_negative() as u64) << 31,
            DType::F32 => (value as f32).to_bits() as u64,
            _ => self
                .formats
                .iter()
                .find(|f| f.dtype == dtype)
                .unwrap()
                .round(value) as u64,
        }
    }
}

fn to_bytes(bits: &[u64], dtype: DType) -> Vec<u8> {
    bits.iter()
        .flat_map(|b| b.to_le_bytes()[..dtype.size()].to_vec())
        .collect()
}

fn from_bytes(bytes: &[u8], dtype: DType) -> Vec<u64> {
    bytes
        .chunks_exact(dtype.size())
        .map(|le| {
            let mut word = [0u8; 8];
            word[..le.len()].copy_from_slice(le);
            u64::from_le_bytes(word)
        })
        .collect()
}

fn convert_bits(
    src: &[u64],
    src_dtype: DType,
    scales: &[f32],
    rows: usize,
    dst_dtype: DType,
    quant: Quant,
) -> (Vec<u64>, Vec<f32>) {
    let bytes = to_bytes(src, src_dtype);
    let mut out = vec![0u8; src.len() * dst_dtype.size()];
    let src = TensorBytes {
        bytes: &bytes,
        dtype: src_dtype,
        scales,
    };
    let scales = convert(src, rows, &mut out, dst_dtype, quant).unwrap();
    (from_bytes(&out, dst_dtype), scales)
}

/// SplitMix64 with Box-Muller normals: deterministic test data without a dependency.
struct Random(u64);

impl Random {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn normal(&mut self) -> f64 {
        let (u, v) = (1.0 - self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

fn pow2(exponent: i32) -> f64 {
    2f64.powi(exponent)
}

/// Boundary values of every format, ties of the fp8 formats both ways, and random normals at
/// several scales (in f64, so that an f64 source carries bits below f32's precision).
fn interesting_values() -> Vec<f64> {
    let mut values = vec![
        0.0,
        pow2(-9),
        0.5 * pow2(-9),
        0.75 * pow2(-9),
        1.5 * pow2(-9),
        2.5 * pow2(-9),
        7.0 * pow2(-9),
        7.5 * pow2(-9),
        pow2(-6),
        pow2(-16),
        pow2(-17),
        1.5 * pow2(-16),
        3.5 * pow2(-16),
        pow2(-14),
        pow2(-24),
        pow2(-25),
        1.5 * pow2(-24),
        pow2(-126),
        pow2(-133),
        pow2(-134),
        pow2(-149),
        1e-40,
        1e-300,
        1.0,
        1.0625,
        1.1875,
        1.125,
        1.375,
        1.0 + pow2(-8),
        1.0 + pow2(-8) + pow2(-9),
        1.0 + pow2(-11),
        1.0 + pow2(-11) + pow2(-40),
        1.0 + pow2(-8) + pow2(-40),
        1.0 + pow2(-4) + pow2(-40),
        0.1,
        240.0,
        256.0,
        448.0,
        464.0,
        465.0,
        480.0,
        57344.0,
        61440.0,
        65504.0,
        65519.99,
        65520.0,
        1e9,
        f32::MAX as f64,
        f32::MAX as f64 * 1.5,
        1e300,
        f64::INFINITY,
        f64::NAN,
    ];
    let mut random = Random(7);
    for scale in [1.0, 0.02, 1e-3, 300.0, 1e-6] {
        values.extend((0..40).map(|_| random.normal() * scale));
    }
    let negated: Vec<f64> = values.iter().map(|v| -v).collect();
    values.extend(negated);
    values
}

// ---------------------------------------------------------------------------------------------
// Hand-checked fp8 tables
// ---------------------------------------------------------------------------------------------

/// (value, e4m3fn code) pairs, each worked out by hand from sign | exponent (bias 7) | mantissa.
const E4M3FN_ENCODE: &[(f32, u8)] = &[
    (0.0, 0x00),
    (-0.0, 0x80),
    (1.0, 0x38),   // 0 0111 000
    (-2.0, 0xC0),  // 1 1000 000
    (0.1, 0x1D),   // 1.6 * 2^-4: mantissa 4.8 rounds to 5: 0 0011 101
    (240.0, 0x77), // 1.875 * 2^7: 0 1110 111
    (256.0, 0x78), // 2^8: 0 1111 000
    (448.0, 0x7E), // 1.75 * 2^8: the max
    (-448.0, 0xFE),
    (464.0, 0x7E), // tie between 448 (0x7E, even) and 480 (would be 0x7F): even
    (465.0, 0x7E), // rounds towards 480, which does not exist: saturates
    (480.0, 0x7E),
    (1e9, 0x7E),
    (f32::MAX, 0x7E),
    (f32::INFINITY, 0x7E), // saturating, like __NV_SATFINITE
    (f32::NEG_INFINITY, 0xFE),
    (1.0 / 512.0, 0x01),  // 2^-9, the smallest subnormal
    (0.5 / 512.0, 0x00),  // 0.5 * 2^-9: tie between 0 and 1: even
    (0.75 / 512.0, 0x01), // 0.75 * 2^-9: nearer 1
    (1.5 / 512.0, 0x02),  // 1.5 * 2^-9: tie between 1 and 2: even
    (2.5 / 512.0, 0x02),  // 2.5 * 2^-9: tie between 2 and 3: even
    (-1.5 / 512.0, 0x82),
    (7.0 / 512.0, 0x07), // 7 * 2^-9, the largest subnormal
    (7.5 / 512.0, 0x08), // 7.5 * 2^-9: tie between 7 and 8 (2^-6): even
    (1.0 / 64.0, 0x08),  // 2^-6, the smallest normal: 0 0001 000
    (1.0625, 0x38),      // tie between 1.0 (mantissa 000) and 1.125 (001): even
    (1.0625001, 0x39),   // the next f32 above that tie
    (1.1875, 0x3A),      // tie between 1.125 (001) and 1.25 (010): even
    (1e-30, 0x00),
    (-1e-30, 0x80),
];

/// (value, e5m2 code) pairs: sign | exponent (bias 15) | mantissa.
const E5M2_ENCODE: &[(f32, u8)] = &[
    (0.0, 0x00),
    (-0.0, 0x80),
    (1.0, 0x3C),     // 0 01111 00
    (-2.0, 0xC0),    // 1 10000 00
    (0.1, 0x2E),     // 1.6 * 2^-4: mantissa 2.4 rounds to 2: 0 01011 10
    (57344.0, 0x7B), // 1.75 * 2^15: the max
    (-57344.0, 0xFB),
    (61440.0, 0x7B), // tie between the max (odd) and 2^16 (infinity's code): saturates
    (65536.0, 0x7B),
    (1e9, 0x7B),
    (f32::INFINITY, 0x7B),
    (f32::NEG_INFINITY, 0xFB),
    (1.0 / 65536.0, 0x01), // 2^-16, the smallest subnormal
    (0.5 / 65536.0, 0x00), // 2^-17: tie between 0 and 1: even
    (1.5 / 65536.0, 0x02), // 1.5 * 2^-16: tie between 1 and 2: even
    (3.5 / 65536.0, 0x04), // 3.5 * 2^-16: tie between 3 and 4 (2^-14): even
    (1.0 / 16384.0, 0x04), // 2^-14, the smallest normal: 0 00001 00
    (1.125, 0x3C),         // tie between 1.0 (00) and 1.25 (01): even
    (1.375, 0x3E),         // tie between 1.25 (01) and 1.5 (10): even
    (1.1250001, 0x3D),     // the next f32 above the 1.125 tie
];

/// (code, value) pairs decoded by hand.
const E4M3FN_DECODE: &[(u8, f32)] = &[
    (0x00, 0.0),
    (0x01, 1.0 / 512.0),
    (0x07, 7.0 / 512.0),
    (0x08, 1.0 / 64.0),
    (0x1D, 1.625 / 16.0),
    (0x38, 1.0),
    (0x77, 240.0),
    (0x78, 256.0),
    (0x7E, 448.0),
    (0xFE, -448.0),
    (0xC0, -2.0),
];

const E5M2_DECODE: &[(u8, f32)] = &[
    (0x00, 0.0),
    (0x01, 1.0 / 65536.0),
    (0x03, 3.0 / 65536.0),
    (0x04, 1.0 / 16384.0),
    (0x2E, 1.5 / 16.0),
    (0x3C, 1.0),
    (0x7B, 57344.0),
    (0xC0, -2.0),
    (0x7C, f32::INFINITY),
    (0xFC, f32::NEG_INFINITY),
];

#[test]
fn fp8_encodes_hand_checked_values() {
    for (dtype, table) in [(DType::F8E4M3, E4M3FN_ENCODE), (DType::F8E5M2, E5M2_ENCODE)] {
        for &(value, code) in table {
            assert_eq!(f32_to_fp8(value, dtype), code, "{dtype:?} f32 {value:e}");
            assert_eq!(
                f64_to_fp8(value as f64, dtype),
                code,
                "{dtype:?} f64 {value:e}"
            );
            let (converted, _) = convert_bits(
                &[value.to_bits() as u64],
                DType::F32,
                &[],
                1,
                dtype,
                Quant::None,
            );
            assert_eq!(converted, [code as u64], "{dtype:?} convert {value:e}");
        }
    }
}

#[test]
fn fp8_nan_encodes_to_the_canonical_nan_with_its_sign() {
    for (dtype, nan) in [(DType::F8E4M3, 0x7F), (DType::F8E5M2, 0x7E)] {
        assert_eq!(f32_to_fp8(f32::NAN, dtype), nan);
        assert_eq!(f32_to_fp8(-f32::NAN, dtype), 0x80 | nan);
        assert_eq!(
            f32_to_fp8(f32::from_bits(0x7F80_0001), dtype),
            nan,
            "signalling NaN"
        );
        assert_eq!(f64_to_fp8(f64::NAN, dtype), nan);
        assert_eq!(f64_to_fp8(-f64::NAN, dtype), 0x80 | nan);
    }
}

#[test]
fn fp8_decodes_hand_checked_codes() {
    for (dtype, table) in [(DType::F8E4M3, E4M3FN_DECODE), (DType::F8E5M2, E5M2_DECODE)] {
        for &(code, value) in table {
            assert_eq!(
                fp8_to_f32(code, dtype).to_bits(),
                value.to_bits(),
                "{dtype:?} {code:#04x}"
            );
        }
        assert_eq!(fp8_to_f32(0x80, dtype).to_bits(), (-0.0f32).to_bits());
    }
    for code in [0x7F, 0xFF] {
        assert!(fp8_to_f32(code, DType::F8E4M3).is_nan());
    }
    for code in [0x7D, 0x7E, 0x7F, 0xFD, 0xFE, 0xFF] {
        assert!(fp8_to_f32(code, DType::F8E5M2).is_nan());
    }
    assert_eq!(fp8_to_f32(0xFF, DType::F8E4M3).to_bits(), 0xFFC0_0000);
    assert_eq!(fp8_to_f32(0x7D, DType::F8E5M2).to_bits(), 0x7FC0_0000);
}

#[test]
fn fp8_max_values() {
    assert_eq!(fp8::E4M3FN.max_value(), 448.0);
    assert_eq!(fp8::E5M2.max_value(), 57344.0);
}

// ---------------------------------------------------------------------------------------------
// Exhaustive checks
// ---------------------------------------------------------------------------------------------

#[test]
fn every_fp8_code_decodes_to_its_field_value_and_round_trips() {
    for dtype in [DType::F8E4M3, DType::F8E5M2] {
        for code in 0..=255u8 {
            let expected = fp8_reference_value(code, dtype);
            let decoded = fp8_to_f32(code, dtype);
            if expected.is_nan() {
                assert!(decoded.is_nan(), "{dtype:?} {code:#04x}");
                assert_eq!(decoded.is_sign_negative(), code & 0x80 != 0);
                let nan = if dtype == DType::F8E4M3 { 0x7F } else { 0x7E };
                assert_eq!(f32_to_fp8(decoded, dtype), (code & 0x80) | nan);
                continue;
            }
            assert_eq!(decoded as f64, expected, "{dtype:?} {code:#04x}");
            assert_eq!(
                decoded.is_sign_negative(),
                code & 0x80 != 0,
                "{dtype:?} {code:#04x}"
            );
            // e5m2's infinities decode exactly but encode saturated.
            let back = if expected.is_infinite() {
                (code & 0x80) | 0x7B
            } else {
                code
            };
            assert_eq!(f32_to_fp8(decoded, dtype), back, "{dtype:?} {code:#04x}");
            assert_eq!(
                f64_to_fp8(decoded as f64, dtype),
                back,
                "{dtype:?} {code:#04x}"
            );
        }
    }
}

#[test]
fn f32_to_fp8_at_every_midpoint_and_its_neighbours() {
    for dtype in [DType::F8E4M3, DType::F8E5M2] {
        let max_code = if dtype == DType::F8E4M3 { 0x7Eu8 } else { 0x7B };
        for low_code in 0..max_code {
            let high_code = low_code + 1;
            let (low, high) = (
                fp8_reference_value(low_code, dtype),
                fp8_reference_value(high_code, dtype),
            );
            let midpoint = (low + high) / 2.0;
            let midpoint32 = midpoint as f32;
            assert_eq!(
                midpoint32 as f64, midpoint,
                "fp8 midpoints are exact in f32"
            );
            let even = if low_code % 2 == 0 {
                low_code
            } else {
                high_code
            };
            let below = f32::from_bits(midpoint32.to_bits() - 1);
            let above = f32::from_bits(midpoint32.to_bits() + 1);
            for sign in [0u8, 0x80] {
                let signed = |x: f32| if sign == 0 { x } else { -x };
                assert_eq!(
                    f32_to_fp8(signed(midpoint32), dtype),
                    sign | even,
                    "{dtype:?} {midpoint}"
                );
                assert_eq!(
                    f32_to_fp8(signed(below), dtype),
                    sign | low_code,
                    "{dtype:?} below {midpoint}"
                );
                assert_eq!(
                    f32_to_fp8(signed(above), dtype),
                    sign | high_code,
                    "{dtype:?} above {midpoint}"
                );
                assert_eq!(f64_to_fp8(signed(midpoint32) as f64, dtype), sign | even);
                assert_eq!(f64_to_fp8(signed(below) as f64, dtype), sign | low_code);
                assert_eq!(f64_to_fp8(signed(above) as f64, dtype), sign | high_code);
            }
        }
    }
}

#[test]
fn every_f16_and_bf16_code_widens_like_half() {
    let codes: Vec<u64> = (0..=u16::MAX as u64).collect();
    for dtype in [DType::F16, DType::BF16] {
        let expected: Vec<u64> = codes
            .iter()
            .map(|&c| match dtype {
                DType::F16 => f16::from_bits(c as u16).to_f32().to_bits() as u64,
                _ => bf16::from_bits(c as u16).to_f32().to_bits() as u64,
            })
            .collect();
        assert_eq!(
            convert_bits(&codes, dtype, &[], 1, DType::F32, Quant::None).0,
            expected,
            "{dtype:?}"
        );
        let expected64: Vec<u64> = expected
            .iter()
            .map(|&b| (f32::from_bits(b as u32) as f64).to_bits())
            .collect();
        assert_eq!(
            convert_bits(&codes, dtype, &[], 1, DType::F64, Quant::None).0,
            expected64,
            "{dtype:?}"
        );
    }
}

#[test]
fn every_f16_and_bf16_code_survives_f32_and_back() {
    let codes: Vec<u64> = (0..=u16::MAX as u64).collect();
    for dtype in [DType::F16, DType::BF16] {
        let (floats, _) = convert_bits(&codes, dtype, &[], 1, DType::F32, Quant::None);
        let (back, _) = convert_bits(&floats, DType::F32, &[], 1, dtype, Quant::None);
        for (&code, &back) in codes.iter().zip(&back) {
            let value = reference_value(code, dtype);
            if value.is_nan() {
                // Quieted, sign and top payload bits kept, as `half` does.
                let quiet = if dtype == DType::F16 { 0x0200 } else { 0x0040 };
                assert_eq!(back, code | quiet, "{dtype:?} {code:#06x}");
            } else {
                assert_eq!(back, code, "{dtype:?} {code:#06x}");
            }
        }
    }
}

#[test]
fn f32_to_f16_and_bf16_match_half_on_random_bit_patterns() {
    let mut random = Random(11);
    let bits: Vec<u64> = (0..200_000)
        .map(|_| random.next_u64() as u32 as u64)
        .collect();
    let (halves, _) = convert_bits(&bits, DType::F32, &[], 1, DType::F16, Quant::None);
    let (brains, _) = convert_bits(&bits, DType::F32, &[], 1, DType::BF16, Quant::None);
    for ((&b, &h), &bb) in bits.iter().zip(&halves).zip(&brains) {
        let x = f32::from_bits(b as u32);
        assert_eq!(h, f16::from_f32(x).to_bits() as u64, "{b:#010x}");
        assert_eq!(bb, bf16::from_f32(x).to_bits() as u64, "{b:#010x}");
    }
}

// ---------------------------------------------------------------------------------------------
// Every pair of float dtypes
// ---------------------------------------------------------------------------------------------

/// `values` stored as `dtype` (each rounded by the reference model).
fn stored(reference: &Reference, values: &[f64], dtype: DType) -> Vec<u64> {
    values.iter().map(|&v| reference.round(v, dtype)).collect()
}

#[test]
fn every_pair_of_float_dtypes_rounds_like_the_reference() {
    let reference = Reference::new();
    let values = interesting_values();
    for src_dtype in DType::floats().iter().copied() {
        let src = stored(&reference, &values, src_dtype);
        for dst_dtype in DType::floats().iter().copied() {
            let (converted, scales) = convert_bits(&src, src_dtype, &[], 1, dst_dtype, Quant::None);
            assert!(scales.is_empty());
            for ((&value, &bits), &got) in values.iter().zip(&src).zip(&converted) {
                let exact = reference_value(bits, src_dtype);
                let expected = if src_dtype == dst_dtype {
                    bits
                } else {
                    reference.round(exact, dst_dtype)
                };
                assert_eq!(
                    got, expected,
                    "{src_dtype:?} -> {dst_dtype:?}: {value:e} stored as {bits:#x} ({exact:e}) gave {got:#x}, expected {expected:#x}"
                );
            }
        }
    }
}

#[test]
fn long_tensors_cross_chunk_boundaries_unchanged() {
    let reference = Reference::new();
    let mut random = Random(3);
    let values: Vec<f64> = (0..3 * CHUNK + 17)
        .map(|_| random.normal() * 0.05)
        .collect();
    for src_dtype in DType::floats().iter().copied() {
        let src = stored(&reference, &values, src_dtype);
        for dst_dtype in DType::floats().iter().copied() {
            let (converted, _) = convert_bits(&src, src_dtype, &[], 1, dst_dtype, Quant::None);
            let expected: Vec<u64> = src
                .iter()
                .map(|&b| reference.round(reference_value(b, src_dtype), dst_dtype))
                .collect();
            assert_eq!(converted, expected, "{src_dtype:?} -> {dst_dtype:?}");
        }
    }
}

#[test]
fn unaligned_buffers_convert_the_same() {
    let reference = Reference::new();
    let values = interesting_values();
    for (src_dtype, dst_dtype) in [
        (DType::F16, DType::F32),
        (DType::F32, DType::F16),
        (DType::BF16, DType::F32),
        (DType::F32, DType::BF16),
    ] {
        let src = to_bytes(&stored(&reference, &values, src_dtype), src_dtype);
        let mut aligned = vec![0u8; values.len() * dst_dtype.size()];
        let tensor = TensorBytes {
            bytes: &src,
            dtype: src_dtype,
            scales: &[],
        };
        convert(tensor, 1, &mut aligned, dst_dtype, Quant::None).unwrap();
        // The same bytes one byte into a buffer: neither side aligned for its type.
        let mut shifted_src = vec![0u8; src.len() + 1];
        shifted_src[1..].copy_from_slice(&src);
        let mut shifted_dst = vec![0u8; aligned.len() + 1];
        let tensor = TensorBytes {
            bytes: &shifted_src[1..],
            dtype: src_dtype,
            scales: &[],
        };
        convert(tensor, 1, &mut shifted_dst[1..], dst_dtype, Quant::None).unwrap();
        assert_eq!(
            shifted_dst[1..],
            aligned[..],
            "{src_dtype:?} -> {dst_dtype:?}"
        );
    }
}

#[test]
fn nan_keeps_its_sign_and_becomes_each_formats_canonical_nan() {
    let canonical = |dtype: DType| -> u64 {
        match dtype {
            DType::F64 => 0x7FF8_0000_0000_0000,
            DType::F32 => 0x7FC0_0000,
            DType::F16 => 0x7E00,
            DType::BF16 => 0x7FC0,
            DType::F8E4M3 => 0x7F,
            _ => 0x7E,
        }
    };
    let sign_bit = |dtype: DType| 1u64 << (dtype.size() * 8 - 1);
    for src_dtype in DType::floats().iter().copied() {
        for dst_dtype in DType::floats().iter().copied() {
            let src = [
                canonical(src_dtype),
                canonical(src_dtype) | sign_bit(src_dtype),
            ];
            let (converted, _) = convert_bits(&src, src_dtype, &[], 1, dst_dtype, Quant::None);
            let expected = [
                canonical(dst_dtype),
                canonical(dst_dtype) | sign_bit(dst_dtype),
            ];
            assert_eq!(converted, expected, "{src_dtype:?} -> {dst_dtype:?}");
        }
    }
}

#[test]
fn f64_rounds_directly_not_through_f32() {
    // Each value sits just off an exact tie of the target by less than f32 can hold, so rounding
    // through f32 would land on the tie and go to even; direct rounding must not.
    let cases: [(f64, DType, u64); 6] = [
        (1.0 + pow2(-11) + pow2(-40), DType::F16, 0x3C01), // via f32: 0x3C00
        (1.0 + pow2(-10) + pow2(-11) - pow2(-40), DType::F16, 0x3C01), // via f32: 0x3C02
        (1.0 + pow2(-8) + pow2(-40), DType::BF16, 0x3F81), // via f32: 0x3F80
        (1.0 + pow2(-4) + pow2(-40), DType::F8E4M3, 0x39), // via f32: 0x38
        (1.0 + pow2(-3) + pow2(-40), DType::F8E5M2, 0x3D), // via f32: 0x3C
        (1.5 * pow2(-9) - pow2(-60), DType::F8E4M3, 0x01), // subnormal range; via f32: 0x02
    ];
    for (value, dtype, expected) in cases {
        let (converted, _) =
            convert_bits(&[value.to_bits()], DType::F64, &[], 1, dtype, Quant::None);
        assert_eq!(converted, [expected], "{value:e} -> {dtype:?}");
        let via_f32 = convert_bits(
            &[(value as f32).to_bits() as u64],
            DType::F32,
            &[],
            1,
            dtype,
            Quant::None,
        )
        .0;
        assert_ne!(
            via_f32,
            [expected],
            "the case must exercise double rounding: {value:e} {dtype:?}"
        );
    }
    // `half`'s own from_f64 rounds the bf16 case through a truncated mantissa.
    assert_eq!(bf16::from_f64(1.0 + pow2(-8) + pow2(-40)).to_bits(), 0x3F80);
}

// ---------------------------------------------------------------------------------------------
// Pass-through dtypes and errors
// ---------------------------------------------------------------------------------------------

fn convert_result(
    src: &[u8],
    src_dtype: DType,
    scales: &[f32],
    rows: usize,
    dst: &mut [u8],
    dst_dtype: DType,
    quant: Quant,
) -> Result<Vec<f32>> {
    let tensor = TensorBytes {
        bytes: src,
        dtype: src_dtype,
        scales,
    };
    convert(tensor, rows, dst, dst_dtype, quant)
}

fn assert_invalid(result: Result<Vec<f32>>) {
    assert_eq!(result.unwrap_err().kind, ErrorKind::InvalidArgument);
}

#[test]
fn non_float_dtypes_pass_through_byte_exact() {
    let bytes: Vec<u8> = (0..48u8).map(|b| b.wrapping_mul(37)).collect();
    for dtype in NON_FLOATS {
        for quant in [Quant::None, Quant::PerTensor, Quant::PerChannel] {
            let mut out = vec![0u8; bytes.len()];
            let scales = convert_result(&bytes, dtype, &[], 1, &mut out, dtype, quant).unwrap();
            assert!(scales.is_empty());
            assert_eq!(out, bytes, "{dtype:?}");
        }
    }
}

#[test]
fn conversions_involving_non_floats_are_invalid() {
    let bytes = [1u8; 48];
    for non_float in NON_FLOATS {
        for other in DType::floats()
            .iter()
            .copied()
            .chain(NON_FLOATS)
            .filter(|&d| d != non_float)
        {
            let mut out = vec![0u8; 48 / non_float.size() * other.size()];
            assert_invalid(convert_result(
                &bytes,
                non_float,
                &[],
                1,
                &mut out,
                other,
                Quant::None,
            ));
            let mut out = vec![0u8; 48 / other.size() * non_float.size()];
            assert_invalid(convert_result(
                &bytes,
                other,
                &[],
                1,
                &mut out,
                non_float,
                Quant::None,
            ));
        }
    }
}

#[test]
fn mismatched_lengths_and_shapes_are_invalid() {
    let bytes = [0u8; 16];
    let mut out = [0u8; 16];
    // Destination too short and too long.
    assert_invalid(convert_result(
        &bytes,
        DType::F32,
        &[],
        1,
        &mut out[..7],
        DType::F16,
        Quant::None,
    ));
    assert_invalid(convert_result(
        &bytes,
        DType::F32,
        &[],
        1,
        &mut out[..9],
        DType::F16,
        Quant::None,
    ));
    assert_invalid(convert_result(
        &bytes,
        DType::I32,
        &[],
        1,
        &mut out[..15],
        DType::I32,
        Quant::None,
    ));
    // A partial source element.
    assert_invalid(convert_result(
        &bytes[..15],
        DType::F32,
        &[],
        1,
        &mut out[..6],
        DType::F16,
        Quant::None,
    ));
    // Rows that do not divide the elements, and zero rows for a non-empty tensor.
    assert_invalid(convert_result(
        &bytes,
        DType::F32,
        &[],
        3,
        &mut out[..8],
        DType::F16,
        Quant::None,
    ));
    assert_invalid(convert_result(
        &bytes,
        DType::F32,
        &[],
        0,
        &mut out[..8],
        DType::F16,
        Quant::None,
    ));
    // Scales on non-fp8 data, and a count that is neither 1 nor `rows`.
    assert_invalid(convert_result(
        &bytes,
        DType::F32,
        &[1.0],
        1,
        &mut out[..8],
        DType::F16,
        Quant::None,
    ));
    assert_invalid(convert_result(
        &bytes,
        DType::I8,
        &[1.0],
        1,
        &mut out,
        DType::I8,
        Quant::None,
    ));
    assert_invalid(convert_result(
        &bytes,
        DType::F8E4M3,
        &[1.0, 1.0, 1.0],
        4,
        &mut out[..],
        DType::F8E4M3,
        Quant::PerChannel,
    ));
}

#[test]
fn empty_tensors_convert_and_get_unit_scales() {
    let mut out = [0u8; 0];
    assert!(
        convert_result(&[], DType::F32, &[], 1, &mut out, DType::BF16, Quant::None)
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        convert_result(
            &[],
            DType::F32,
            &[],
            1,
            &mut out,
            DType::F8E4M3,
            Quant::PerTensor
        )
        .unwrap(),
        [1.0]
    );
    assert_eq!(
        convert_result(
            &[],
            DType::F32,
            &[],
            3,
            &mut out,
            DType::F8E4M3,
            Quant::PerChannel
        )
        .unwrap(),
        [1.0; 3]
    );
    assert!(convert_result(
        &[],
        DType::F32,
        &[],
        0,
        &mut out,
        DType::F8E4M3,
        Quant::PerChannel
    )
    .unwrap()
    .is_empty());
}

#[test]
fn an_impossible_number_of_scales_is_an_error_not_a_panic() {
    let result = convert_result(
        &[],
        DType::F32,
        &[],
        usize::MAX,
        &mut [],
        DType::F8E4M3,
        Quant::PerChannel,
    );
    assert_eq!(
        result.unwrap_err().kind,
        crate::error::ErrorKind::OutOfMemory
    );
}

#[test]
fn quant_is_ignored_for_non_fp8_destinations() {
    let reference = Reference::new();
    let values = interesting_values();
    let src = stored(&reference, &values, DType::F32);
    for quant in [Quant::PerTensor, Quant::PerChannel] {
        let (converted, scales) = convert_bits(&src, DType::F32, &[], 1, DType::BF16, quant);
        assert!(scales.is_empty());
        assert_eq!(
            converted,
            convert_bits(&src, DType::F32, &[], 1, DType::BF16, Quant::None).0
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Quantization
// ---------------------------------------------------------------------------------------------

fn f32_bits(values: &[f32]) -> Vec<u64> {
    values.iter().map(|v| v.to_bits() as u64).collect()
}

/// The spec of one group, written out: absmax over finite values, scale, x / scale rounded.
fn reference_quantize(reference: &Reference, group: &[f32], dtype: DType) -> (Vec<u64>, f32) {
    let max = if dtype == DType::F8E4M3 {
        448.0f32
    } else {
        57344.0
    };
    let absmax = group
        .iter()
        .filter(|x| x.is_finite())
        .fold(0.0f32, |m, x| m.max(x.abs()));
    let scale = if absmax / max > 0.0 {
        absmax / max
    } else {
        1.0
    };
    let codes = group
        .iter()
        .map(|&x| reference.round((x / scale) as f64, dtype))
        .collect();
    (codes, scale)
}

#[test]
fn per_tensor_quantization_scales_by_the_absmax() {
    let reference = Reference::new();
    let values = [
        1.0f32,
        -3.5,
        0.5,
        0.001,
        -0.0,
        f32::INFINITY,
        f32::NAN,
        2.75,
    ];
    for dtype in [DType::F8E4M3, DType::F8E5M2] {
        let (codes, scales) = convert_bits(
            &f32_bits(&values),
            DType::F32,
            &[],
            1,
            dtype,
            Quant::PerTensor,
        );
        let max = if dtype == DType::F8E4M3 {
            448.0f32
        } else {
            57344.0
        };
        assert_eq!(
            scales,
            [3.5f32 / max],
            "{dtype:?}: infinity and NaN do not count"
        );
        let (expected, _) = reference_quantize(&reference, &values, dtype);
        assert_eq!(codes, expected, "{dtype:?}");
        let max_code = if dtype == DType::F8E4M3 { 0x7E } else { 0x7B };
        assert_eq!(codes[1], 0x80 | max_code, "the absmax maps onto -max");
        assert_eq!(codes[5], max_code, "infinity saturates");
    }
}

#[test]
fn per_channel_quantization_scales_each_row() {
    let reference = Reference::new();
    let rows: [[f32; 5]; 5] = [
        [0.1, -0.2, 0.05, 0.0, 0.15],
        [0.0, 0.0, -0.0, 0.0, 0.0], // all zeros: scale 1
        [100.0, -250.0, 3.0, 1e-3, 7.0],
        [f32::NAN, f32::INFINITY, 2.0, -4.0, 1.0], // absmax over the finite values only
        [
            f32::NAN,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::INFINITY,
            f32::NAN,
        ], // none finite: scale 1
    ];
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    for dtype in [DType::F8E4M3, DType::F8E5M2] {
        let (codes, scales) = convert_bits(
            &f32_bits(&flat),
            DType::F32,
            &[],
            rows.len(),
            dtype,
            Quant::PerChannel,
        );
        let max = if dtype == DType::F8E4M3 {
            448.0f32
        } else {
            57344.0
        };
        assert_eq!(
            scales,
            [0.2f32 / max, 1.0, 250.0 / max, 4.0 / max, 1.0],
            "{dtype:?}"
        );
        for (row, values) in rows.iter().enumerate() {
            let (expected, _) = reference_quantize(&reference, values, dtype);
            assert_eq!(
                codes[row * 5..row * 5 + 5],
                expected[..],
                "{dtype:?} row {row}"
            );
        }
        assert_eq!(
            codes[5..10],
            [0, 0, 0x80, 0, 0],
            "zeros stay (signed) zeros"
        );
    }
}

#[test]
fn a_scale_that_underflows_is_replaced_by_one() {
    let tiny = f32::from_bits(1); // 2^-149: tiny / 448 rounds to 0
    let (codes, scales) = convert_bits(
        &f32_bits(&[tiny, 0.0]),
        DType::F32,
        &[],
        1,
        DType::F8E4M3,
        Quant::PerTensor,
    );
    assert_eq!(scales, [1.0]);
    assert_eq!(codes, [0, 0]);
}

#[test]
fn f64_sources_are_rounded_to_f32_before_quantization() {
    let reference = Reference::new();
    let mut random = Random(5);
    let values: Vec<f64> = (0..64)
        .map(|_| random.normal() * 0.3)
        .chain([1e300, -1e-300])
        .collect();
    let as_f32: Vec<f32> = values.iter().map(|&v| v as f32).collect();
    let bits: Vec<u64> = values.iter().map(|v| v.to_bits()).collect();
    let (codes, scales) = convert_bits(&bits, DType::F64, &[], 1, DType::F8E4M3, Quant::PerTensor);
    // 1e300 is infinite as f32, so it does not count towards the absmax and saturates.
    let (expected, scale) = reference_quantize(&reference, &as_f32, DType::F8E4M3);
    assert_eq!(scales, [scale]);
    assert_eq!(codes, expected);
}

#[test]
fn scaled_fp8_dequantizes_as_value_times_scale() {
    let reference = Reference::new();
    let codes: Vec<u64> = (0..=255).collect();
    // Two rows of all 256 codes, each with its own scale; both per-tensor and per-channel.
    let two_rows: Vec<u64> = codes.iter().chain(&codes).copied().collect();
    for fp8 in [DType::F8E4M3, DType::F8E5M2] {
        for scales in [&[0.0123f32][..], &[0.75f32, 3.0e-5][..]] {
            for dst_dtype in DType::floats().iter().copied() {
                let (converted, out_scales) =
                    convert_bits(&two_rows, fp8, scales, 2, dst_dtype, Quant::None);
                assert!(out_scales.is_empty());
                for (i, (&code, &got)) in two_rows.iter().zip(&converted).enumerate() {
                    let scale = scales[if scales.len() == 1 { 0 } else { i / 256 }];
                    let value = (fp8_reference_value(code as u8, fp8) as f32 * scale) as f64;
                    let expected = reference.round(value, dst_dtype);
                    assert_eq!(
                        got, expected,
                        "{fp8:?} {code:#04x} * {scale} -> {dst_dtype:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn per_channel_scaled_sources_are_right_across_rows_and_chunks() {
    // Short rows go through f32 in chunks that straddle rows, long rows through per-row tables.
    let reference = Reference::new();
    let mut random = Random(9);
    for row_len in [3, 1000, 1500, MIN_ROW_LEN_FOR_TABLES, CHUNK + 5] {
        let rows = 2 * CHUNK / row_len + 3;
        let codes: Vec<u64> = (0..rows * row_len)
            .map(|_| random.next_u64() % 256)
            .collect();
        let scales: Vec<f32> = (0..rows).map(|_| (random.uniform() * 0.1) as f32).collect();
        for dst_dtype in [DType::BF16, DType::F32, DType::F8E5M2] {
            let (converted, _) =
                convert_bits(&codes, DType::F8E4M3, &scales, rows, dst_dtype, Quant::None);
            for (i, (&code, &got)) in codes.iter().zip(&converted).enumerate() {
                let value =
                    fp8_reference_value(code as u8, DType::F8E4M3) as f32 * scales[i / row_len];
                assert_eq!(
                    got,
                    reference.round(value as f64, dst_dtype),
                    "row_len {row_len} element {i}"
                );
            }
        }
    }
}

#[test]
fn a_scaled_source_of_the_same_dtype_and_granularity_is_copied() {
    let codes: Vec<u64> = (0..12).map(|c| c * 19 % 256).collect();
    let per_row = [0.123f32, 4.5, 7e-3];
    for (scales, quant) in [
        (&per_row[..], Quant::PerChannel),
        (&per_row[..1], Quant::PerTensor),
    ] {
        let (copied, out_scales) =
            convert_bits(&codes, DType::F8E4M3, scales, 3, DType::F8E4M3, quant);
        assert_eq!(copied, codes);
        assert_eq!(out_scales, scales);
    }
    // With one row a single scale is both granularities.
    for quant in [Quant::PerTensor, Quant::PerChannel] {
        let (copied, out_scales) =
            convert_bits(&codes, DType::F8E5M2, &[0.5], 1, DType::F8E5M2, quant);
        assert_eq!((copied, out_scales), (codes.clone(), vec![0.5]));
    }
}

#[test]
fn a_granularity_or_format_change_requantizes() {
    let reference = Reference::new();
    let codes: Vec<u64> = (0..12).map(|c| c * 19 % 120).collect();
    let per_row = [0.123f32, 4.5, 7e-3];
    let dequantized: Vec<f32> = codes
        .iter()
        .enumerate()
        .map(|(i, &c)| fp8_reference_value(c as u8, DType::F8E4M3) as f32 * per_row[i / 4])
        .collect();
    // Per channel -> per tensor.
    let (requantized, scales) = convert_bits(
        &codes,
        DType::F8E4M3,
        &per_row,
        3,
        DType::F8E4M3,
        Quant::PerTensor,
    );
    let (expected, scale) = reference_quantize(&reference, &dequantized, DType::F8E4M3);
    assert_eq!((requantized, scales), (expected, vec![scale]));
    // Per channel e4m3 -> per channel e5m2.
    let (requantized, scales) = convert_bits(
        &codes,
        DType::F8E4M3,
        &per_row,
        3,
        DType::F8E5M2,
        Quant::PerChannel,
    );
    for row in 0..3 {
        let (expected, scale) = reference_quantize(
            &reference,
            &dequantized[row * 4..row * 4 + 4],
            DType::F8E5M2,
        );
        assert_eq!(requantized[row * 4..row * 4 + 4], expected[..]);
        assert_eq!(scales[row], scale);
    }
    // Scaled -> unscaled fp8 of the same format: a plain cast of the dequantized values.
    let (cast, scales) = convert_bits(
        &codes,
        DType::F8E4M3,
        &per_row,
        3,
        DType::F8E4M3,
        Quant::None,
    );
    assert!(scales.is_empty());
    let expected: Vec<u64> = dequantized
        .iter()
        .map(|&v| reference.round(v as f64, DType::F8E4M3))
        .collect();
    assert_eq!(cast, expected);
}

#[test]
fn per_channel_beats_per_tensor_beats_a_plain_cast_on_weights_with_outlier_rows() {
    let (rows, row_len) = (256, 1024);
    let mut random = Random(42);
    let weights: Vec<f32> = (0..rows * row_len)
        .map(|i| {
            let outlier_row = (i / row_len) % 37 == 5;
            (random.normal() * 0.02 * if outlier_row { 20.0 } else { 1.0 }) as f32
        })
        .collect();
    let bits = f32_bits(&weights);
    let mse = |quant: Quant| {
        let (codes, scales) = convert_bits(&bits, DType::F32, &[], rows, DType::F8E4M3, quant);
        let (back, _) = convert_bits(
            &codes,
            DType::F8E4M3,
            &scales,
            rows,
            DType::F32,
            Quant::None,
        );
        let squared: f64 = back
            .iter()
            .zip(&weights)
            .map(|(&b, &w)| (f32::from_bits(b as u32) as f64 - w as f64).powi(2))
            .sum();
        squared / weights.len() as f64
    };
    let (per_channel, per_tensor, plain) = (
        mse(Quant::PerChannel),
        mse(Quant::PerTensor),
        mse(Quant::None),
    );
    println!("fp8 e4m3 mean squared error: per-channel {per_channel:.3e}, per-tensor {per_tensor:.3e}, plain cast {plain:.3e}");
    assert!(per_channel < per_tensor, "{per_channel} vs {per_tensor}");
    assert!(per_tensor < plain, "{per_tensor} vs {plain}");
}
