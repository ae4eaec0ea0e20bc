//! Every block kernel (each instruction set this CPU has, on one thread and split across the
//! pool) against the scalar reference, bit for bit: exhaustively over every f16, bf16 and fp8
//! code, and over random f32/f64 bit patterns rich in NaN payloads, infinities, subnormals and
//! ties, at lengths that leave every size of tail, from unaligned buffers.

use super::ieee;
use super::simd;
use super::*;

const FLOATS: [DType; 6] = [
    DType::F64,
    DType::F32,
    DType::F16,
    DType::BF16,
    DType::F8E4M3,
    DType::F8E5M2,
];

/// Lengths around the 64-element block and the 8/16-lane vectors inside it.
const LENGTHS: [usize; 16] = [
    0, 1, 7, 8, 9, 15, 16, 17, 31, 33, 63, 64, 65, 127, 129, 1000,
];

/// Every engine but the reference: each instruction set, alone and on 3 threads with no
/// threshold (so that even short tensors are split, at uneven points).
fn engines() -> Vec<Engine> {
    Isa::available()
        .into_iter()
        .flat_map(|isa| {
            [1, 3].map(|threads| Engine {
                isa: Some(isa),
                threads,
                min_parallel_bytes: if threads > 1 { 0 } else { usize::MAX },
            })
        })
        .collect()
}

#[test]
fn this_cpu_runs_the_kernels_it_detected() {
    let isas = Isa::available();
    assert_eq!(isas[0], Isa::Baseline);
    assert_eq!(Isa::best(), *isas.last().unwrap());
}

/// Converts with the reference and with every engine (from a source and into a destination one
/// byte off alignment) and asserts the same bytes and scales.
fn assert_engines_match(
    src: &[u8],
    src_dtype: DType,
    scales: &[f32],
    rows: usize,
    dst_dtype: DType,
    quant: Quant,
) {
    let numel = src.len() / src_dtype.size();
    let tensor = |bytes| TensorBytes {
        bytes,
        dtype: src_dtype,
        scales,
    };
    let mut expected = vec![0u8; numel * dst_dtype.size()];
    let expected_scales = convert_with(
        tensor(src),
        rows,
        &mut expected,
        dst_dtype,
        quant,
        Engine::reference(),
    )
    .unwrap();
    // From and into buffers as the allocator aligns them (f16/f32 then convert in place), and one
    // byte off.
    let mut shifted = vec![0u8; src.len() + 1];
    shifted[1..].copy_from_slice(src);
    for (engine, offset) in engines().into_iter().flat_map(|e| [(e, 0), (e, 1)]) {
        let mut out = vec![0x5Au8; expected.len() + 1];
        let (source, out_range) = if offset == 0 {
            (src, 0..expected.len())
        } else {
            (&shifted[1..], 1..expected.len() + 1)
        };
        let got_scales = convert_with(
            tensor(source),
            rows,
            &mut out[out_range],
            dst_dtype,
            quant,
            engine,
        )
        .unwrap();
        let out = &out[offset..];
        let context = || {
            format!("{src_dtype:?} -> {dst_dtype:?}, {quant:?}, {numel} elements in {rows} rows, {} scales, {engine:?}, offset {offset}", scales.len())
        };
        if let Some(at) = (0..expected.len()).find(|&i| out[i] != expected[i]) {
            let element = at / dst_dtype.size();
            let size = src_dtype.size();
            panic!(
                "{}: element {element} (source bytes {:02x?}) became {:02x?}, the reference {:02x?}",
                context(),
                &src[element * size..(element + 1) * size],
                &out[element * dst_dtype.size()..][..dst_dtype.size()],
                &expected[element * dst_dtype.size()..][..dst_dtype.size()],
            );
        }
        assert_eq!(
            out[expected.len()..],
            [0x5A][..1 - offset],
            "{}: wrote past the destination",
            context()
        );
        let bits = |scales: &[f32]| scales.iter().map(|s| s.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got_scales), bits(&expected_scales), "{}", context());
    }
}

/// Deterministic bit patterns without a random-number crate.
struct Bits(u64);

impl Bits {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// f32 patterns: uniform bits (many NaN payloads), values near the f16/bf16/fp8 rounding ties and
/// subnormal ranges, exact ties, infinities, zeros, the largest and smallest values.
fn f32_patterns(count: usize) -> Vec<f32> {
    let mut bits = Bits(0x2545_F491_4F6C_DD1D);
    let specials = [
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,
        f32::MIN_POSITIVE,
        f32::from_bits(1),
        f32::from_bits(0x7FC0_0001),
        f32::from_bits(0xFF80_0001),
        f32::from_bits(0x7FBF_FFFF),
        448.0,
        464.0,
        57344.0,
        61440.0,
        65504.0,
        65520.0,
    ];
    (0..count)
        .map(|i| {
            let random = bits.next();
            let word = random as u32;
            match i % 6 {
                0 => f32::from_bits(word),
                // Exponents where f16, bf16 and fp8 have their normal and subnormal ranges.
                1 => {
                    f32::from_bits((word & 0x807F_FFFF) | ((96 + (random >> 32) % 60) as u32) << 23)
                }
                // An exact tie for bf16 (low 16 bits 0x8000) or f16 (low 13 bits 0x1000).
                2 => f32::from_bits((word & 0xFFFF_0000) | 0x8000),
                3 => f32::from_bits(
                    (word & 0x807F_E000 | ((100 + (random >> 32) % 30) as u32) << 23) | 0x1000,
                ),
                4 => specials[(random >> 40) as usize % specials.len()],
                _ => f32::from_bits(word & 0x807F_FFFF),
            }
        })
        .collect()
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// `values` stored as `dtype`, by the reference.
fn values_as(values: &[f32], dtype: DType) -> Vec<u8> {
    let mut stored = vec![0u8; values.len() * dtype.size()];
    let f32_source = TensorBytes {
        bytes: &f32_bytes(values),
        dtype: DType::F32,
        scales: &[],
    };
    convert_with(
        f32_source,
        1,
        &mut stored,
        dtype,
        Quant::None,
        Engine::reference(),
    )
    .unwrap();
    stored
}

/// Every 16-bit pattern, little-endian.
fn all_16_bit_codes() -> Vec<u8> {
    (0..=u16::MAX).flat_map(u16::to_le_bytes).collect()
}

#[test]
fn every_f16_and_bf16_code_converts_like_the_reference() {
    let codes = all_16_bit_codes();
    for src_dtype in [DType::F16, DType::BF16] {
        for dst_dtype in FLOATS {
            assert_engines_match(&codes, src_dtype, &[], 1, dst_dtype, Quant::None);
        }
    }
}

#[test]
fn every_fp8_code_converts_like_the_reference_with_and_without_scales() {
    let codes: Vec<u8> = (0..=255).collect();
    // Scales that leave values exact, round them, push them into the subnormal range or past the
    // largest finite values, and a negative one.
    let scales = [1.0, 0.001, 3.0, -0.75, 1e-39, 1e-30, 1e30, 3.4e38];
    for src_dtype in [DType::F8E4M3, DType::F8E5M2] {
        for dst_dtype in FLOATS {
            assert_engines_match(&codes, src_dtype, &[], 1, dst_dtype, Quant::None);
            for scale in scales {
                assert_engines_match(&codes, src_dtype, &[scale], 1, dst_dtype, Quant::None);
            }
            // Each row of 32 codes its own scale; the rows also end inside blocks.
            for rows in [8, 256] {
                let row_scales: Vec<f32> =
                    (0..rows).map(|row| scales[row % scales.len()]).collect();
                assert_engines_match(&codes, src_dtype, &row_scales, rows, dst_dtype, Quant::None);
            }
        }
    }
}

#[test]
fn random_f32_and_f64_convert_like_the_reference_at_every_tail_length() {
    let values = f32_patterns(20_000);
    let f32_source = f32_bytes(&values);
    let mut bits = Bits(0x9E37_79B9_7F4A_7C15);
    let f64_source: Vec<u8> = values
        .iter()
        .enumerate()
        .flat_map(|(i, &v)| {
            // Widened f32 values, and f64 patterns with low bits (just off the ties) and NaN payloads.
            let x = if i % 2 == 0 {
                v as f64
            } else {
                f64::from_bits(((v as f64).to_bits()) ^ (bits.next() & 0x000F_FFFF_FFFF))
            };
            x.to_le_bytes()
        })
        .collect();
    for dst_dtype in FLOATS {
        assert_engines_match(&f32_source, DType::F32, &[], 1, dst_dtype, Quant::None);
        assert_engines_match(&f64_source, DType::F64, &[], 1, dst_dtype, Quant::None);
        for length in LENGTHS {
            assert_engines_match(
                &f32_source[4 * 3..][..4 * length],
                DType::F32,
                &[],
                1,
                dst_dtype,
                Quant::None,
            );
            assert_engines_match(
                &f64_source[8 * 5..][..8 * length],
                DType::F64,
                &[],
                1,
                dst_dtype,
                Quant::None,
            );
        }
    }
}

#[test]
fn short_tensors_of_every_pair_convert_like_the_reference() {
    let values = f32_patterns(2000);
    for src_dtype in FLOATS {
        let source = values_as(&values, src_dtype);
        let size = src_dtype.size();
        for dst_dtype in FLOATS {
            for length in LENGTHS {
                assert_engines_match(
                    &source[size * 11..][..size * length],
                    src_dtype,
                    &[],
                    1,
                    dst_dtype,
                    Quant::None,
                );
            }
        }
    }
}

#[test]
fn quantization_matches_the_reference_for_every_source_and_shape() {
    let values = f32_patterns(8192);
    for src_dtype in [DType::F64, DType::F32, DType::F16, DType::BF16] {
        let source = values_as(&values, src_dtype);
        let size = src_dtype.size();
        for dst_dtype in [DType::F8E4M3, DType::F8E5M2] {
            for quant in [Quant::PerTensor, Quant::PerChannel] {
                // One row, a few long rows, many short rows (ending inside blocks), and rows of one.
                for (numel, rows) in [
                    (8192, 1),
                    (8192, 4),
                    (8190, 90),
                    (1000, 1000),
                    (7, 7),
                    (0, 5),
                ] {
                    let part = &source[..numel * size];
                    assert_engines_match(part, src_dtype, &[], rows, dst_dtype, quant);
                }
            }
        }
    }
}

#[test]
fn quantization_of_every_16_bit_code_matches_the_reference() {
    let codes = all_16_bit_codes();
    for src_dtype in [DType::F16, DType::BF16] {
        for dst_dtype in [DType::F8E4M3, DType::F8E5M2] {
            assert_engines_match(&codes, src_dtype, &[], 1, dst_dtype, Quant::PerTensor);
            assert_engines_match(&codes, src_dtype, &[], 256, dst_dtype, Quant::PerChannel);
        }
    }
}

#[test]
fn requantizing_scaled_fp8_matches_the_reference() {
    let codes: Vec<u8> = (0..=255).cycle().take(256 * 9).collect();
    let row_scales: Vec<f32> = (0..9).map(|row| 0.001 * (row + 1) as f32).collect();
    for src_dtype in [DType::F8E4M3, DType::F8E5M2] {
        for dst_dtype in [DType::F8E4M3, DType::F8E5M2] {
            assert_engines_match(
                &codes,
                src_dtype,
                &row_scales,
                9,
                dst_dtype,
                Quant::PerTensor,
            );
            assert_engines_match(&codes, src_dtype, &[0.01], 9, dst_dtype, Quant::PerChannel);
        }
    }
}

#[test]
fn large_tensors_split_across_the_pool_match_the_reference() {
    // Over the default threshold, through the default engine: 1.5 MiB of f32 in 3 rows of odd
    // length, so that parts end inside blocks and rows.
    let values = f32_patterns(393_219);
    let source = f32_bytes(&values);
    for (dst_dtype, quant) in [
        (DType::BF16, Quant::None),
        (DType::F16, Quant::None),
        (DType::F8E4M3, Quant::PerTensor),
        (DType::F8E4M3, Quant::PerChannel),
    ] {
        let mut expected = vec![0u8; values.len() * dst_dtype.size()];
        let mut got = vec![0u8; expected.len()];
        let tensor = TensorBytes {
            bytes: &source,
            dtype: DType::F32,
            scales: &[],
        };
        let expected_scales = convert_with(
            tensor,
            3,
            &mut expected,
            dst_dtype,
            quant,
            Engine::reference(),
        )
        .unwrap();
        let got_scales = convert_with(
            tensor,
            3,
            &mut got,
            dst_dtype,
            quant,
            Engine::with_threads(2),
        )
        .unwrap();
        assert!(got == expected, "{dst_dtype:?} {quant:?}");
        assert_eq!(got_scales, expected_scales);
    }
}

#[test]
fn the_kernels_f16_decode_matches_half_for_every_code() {
    for bits in 0..=u16::MAX {
        let expected = half::f16::from_bits(bits).to_f32().to_bits();
        let got = ieee::f16_bits_to_f32(bits).to_bits();
        assert_eq!(got, expected, "f16 {bits:#06x}");
    }
}

#[test]
fn the_kernels_f16_rounding_matches_half_for_every_sign_exponent_and_top_mantissa() {
    // Every combination of the top 19 bits (sign, exponent, the 10 mantissa bits f16 keeps) with
    // low 13 bits at and around the tie, zero, all ones and random: every rounding case of every
    // binade, subnormal results, overflow, infinities and NaN payloads.
    let mut random = Bits(0x9E37_79B9_7F4A_7C15);
    for top in 0..1u32 << 19 {
        for low in [
            0,
            1,
            0x0FFF,
            0x1000,
            0x1001,
            0x1FFF,
            random.next() as u32 & 0x1FFF,
        ] {
            let x = f32::from_bits(top << 13 | low);
            let expected = half::f16::from_f32(x).to_bits();
            assert_eq!(
                ieee::f32_to_f16_bits(x),
                expected,
                "f32 {:#010x}",
                x.to_bits()
            );
        }
    }
}

/// Scales of every size the quantizer meets: absmax / max for a spread of f16 and bf16 values
/// (every 257th positive finite code), and scales that are not: powers of two, ones that round
/// every quotient, the smallest normal and subnormal, the largest, and those on either side of
/// the range where the kernel divides by the reciprocal (see `ScaleDivision`).
fn quantization_scales() -> Vec<f32> {
    let below = |x: f32| f32::from_bits(x.to_bits() - 1);
    let above = |x: f32| f32::from_bits(x.to_bits() + 1);
    let (lowest, highest) = (2f32.powi(-80), 2f32.powi(125));
    let mut scales = vec![
        below(lowest),
        lowest,
        above(lowest),
        1.5 * lowest,
        below(highest),
        highest,
        above(highest),
        1.5 * highest,
        1.0,
        2f32.powi(-83),
        2f32.powi(100),
        3.0,
        0.1,
        1.0 / 448.0,
        1.0 / 57344.0,
        f32::MIN_POSITIVE,
        f32::from_bits(1),
        1e-40,
        f32::MAX,
    ];
    // The positive finite codes end at 0x7C00 (f16) and 0x7F80 (bf16).
    let f16_values = (1..0x7C00u16).step_by(257).map(ieee::f16_bits_to_f32);
    let bf16_values = (1..0x7F80u16).step_by(257).map(ieee::bf16_bits_to_f32);
    for absmax in f16_values.chain(bf16_values) {
        for format in [&fp8::E4M3FN, &fp8::E5M2] {
            scales.push(absmax / format.max_value());
        }
    }
    scales
}

#[test]
fn the_quantize_kernel_divides_like_the_reference_for_every_16_bit_dividend_and_many_scales() {
    // The other tests reach the kernel only with the scales of their data.
    let codes = all_16_bit_codes();
    let scales = quantization_scales();
    for src_dtype in [DType::F16, DType::BF16] {
        let source = Source {
            bytes: &codes,
            dtype: Float::of(src_dtype).unwrap(),
            scales: &[],
            row_len: 1 << 16,
        };
        let mut values = vec![0.0f32; 1 << 16];
        source.decode(0, &mut values, &mut vec![0; 1 << 16]);
        for format in [&fp8::E4M3FN, &fp8::E5M2] {
            for &scale in &scales {
                let expected: Vec<u8> = values
                    .iter()
                    .map(|&x| format.encode_f32(x / scale))
                    .collect();
                for isa in Isa::available() {
                    let mut got = vec![0x5Au8; 1 << 16];
                    let division = ScaleDivision::new(scale, isa);
                    simd::quantize(isa, &source, 0..1 << 16, &mut got, format, division, false);
                    if let Some(at) = (0..got.len()).find(|&i| got[i] != expected[i]) {
                        panic!(
                            "{src_dtype:?} {:#06x} / {scale:e} ({:#010x}) on {isa:?}: code {:#04x}, the division gives {:#04x}",
                            at,
                            scale.to_bits(),
                            got[at],
                            expected[at]
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn the_absmax_of_16_bit_halves_is_the_reference_absmax_of_their_decoded_values() {
    // Each code alone (NaN payloads and infinities count as nothing), every code at once, runs of
    // a few codes from anywhere (shorter than the kernel's 64 lanes, and longer), with either sign.
    let codes = all_16_bit_codes();
    let mut random = Bits(0x2545_F491_4F6C_DD1D);
    let mut ranges: Vec<Range<usize>> = (0..1 << 16).map(|i| i..i + 1).collect();
    ranges.push(0..1 << 16);
    ranges.extend((0..2000).map(|_| {
        let start = random.next() as usize % (1 << 16);
        start..(start + random.next() as usize % 300).min(1 << 16)
    }));
    for dtype in [DType::F16, DType::BF16] {
        let source = Source {
            bytes: &codes,
            dtype: Float::of(dtype).unwrap(),
            scales: &[],
            row_len: 1 << 16,
        };
        let mut values = vec![0.0f32; 1 << 16];
        source.decode(0, &mut values, &mut vec![0; 1 << 16]);
        for range in &ranges {
            let expected = finite_absmax(&values[range.clone()]).to_bits();
            for isa in Isa::available() {
                let got = simd::absmax(isa, &source, range.clone()).to_bits();
                assert_eq!(got, expected, "{dtype:?} {range:?} on {isa:?}");
            }
        }
    }
}

#[test]
#[cfg(target_arch = "x86_64")]
fn conversions_compute_in_the_default_float_environment_whatever_the_callers() {
    use super::float_env::{read_mxcsr, write_mxcsr};
    // DAZ and FTZ on, as torch.set_flush_denormal(True) leaves a thread: the kernels' fp8 decode
    // passes the smallest codes through f32 subnormals, which DAZ reads as zero.
    const FLUSHING: u32 = 0x1F80 | 0x8040;
    let rows = 2048;
    let codes: Vec<u8> = (0..1 << 21).map(|i| (i * 7) as u8).collect();
    let scales: Vec<f32> = (0..rows).map(|row| 0.25 + row as f32 / 64.0).collect();
    let src = TensorBytes {
        bytes: &codes,
        dtype: DType::F8E4M3,
        scales: &scales,
    };
    let convert = |dst_dtype: DType, engine: Engine| {
        let mut dst = vec![0u8; codes.len() * dst_dtype.size()];
        let dst_scales = convert_with(src, rows, &mut dst, dst_dtype, Quant::None, engine);
        (dst, dst_scales.unwrap())
    };
    let expected = [DType::BF16, DType::F16].map(|dtype| convert(dtype, Engine::reference()));
    let tiny = values_as(&[1e-37, -3e-38, 2e-39, 0.0], DType::BF16);
    let quantize = |engine: Engine| {
        let mut dst = vec![0u8; 4];
        let src = TensorBytes {
            bytes: &tiny,
            dtype: DType::BF16,
            scales: &[],
        };
        let scales = convert_with(src, 1, &mut dst, DType::F8E4M3, Quant::PerTensor, engine);
        (dst, scales.unwrap())
    };
    let expected_tiny_scale = quantize(Engine::reference());
    assert!(expected_tiny_scale.1[0] < f32::MIN_POSITIVE);
    let (got, tiny_scale, after) = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                write_mxcsr(FLUSHING);
                // A thread count no other test uses: its pool is built here, by a thread that
                // flushes, and its workers inherit that.
                host_threads::run_parts(7, "a pool that flushes", vec![(); 7], |()| 0);
                let got = [DType::BF16, DType::F16].map(|dtype| {
                    let one_thread = convert(dtype, Engine::with_threads(1));
                    let pool = convert(dtype, Engine::with_threads(7));
                    assert!(
                        one_thread == pool,
                        "{dtype:?}: one thread and the pool differ"
                    );
                    pool
                });
                // Values so small that the scale (absmax / 448) is an f32 subnormal, which FTZ
                // would flush to zero (and the scale then be 1.0).
                let tiny_scale = quantize(Engine::with_threads(1));
                (got, tiny_scale, read_mxcsr())
            })
            .join()
            .unwrap()
    });
    assert!(got == expected, "converted differently under DAZ and FTZ");
    assert_eq!(tiny_scale, expected_tiny_scale);
    assert_eq!(after, FLUSHING, "the caller's environment was not restored");
}
