//! Block kernels: the conversions of the scalar reference, rewritten over fixed blocks of
//! [`BLOCK`] elements with branch-free per-element code, and compiled once per instruction set
//! (the baseline, SSE2 on x86_64; AVX2 with FMA and F16C) with `#[target_feature]`, chosen at run
//! time.
//!
//! An AVX-512 copy too (F/BW/VL/DQ, stable in `#[target_feature]` from Rust 1.89, hence the
//! crate's minimum): twice the lanes for the quantizer's division and fp8 encoder, and narrowing
//! stores of one instruction.
//!
//! Why almost no intrinsics and no crate: every step (fp8 decode, f16/bf16 rounding, the fp8
//! encoder, the absmax reduction) is integer and plain f32 arithmetic without data-dependent
//! branches, so LLVM vectorises it at the full width of whichever instruction set the function is
//! compiled for. The exceptions are in [`f16c`]: F16C's f16 conversions, one instruction per 8
//! elements where the arithmetic takes a dozen, which LLVM does not recognise in it (f16 ->
//! fp8 quantization 1.9x faster, bf16 -> f16 2.1x); and e4m3 -> bf16/f16, whose NaN codes are
//! handled in 16-bit lanes after the pack, which LLVM does not arrange. Rust never contracts or reassociates float
//! operations, so each compiled copy computes exactly what the scalar reference computes; the
//! tests check that exhaustively. `half`'s slice conversions cover only f16↔f32, behind a
//! feature check per call, 4 F16C lanes at a time (`cast_blocks` uses them for aligned whole
//! f16↔f32 casts where these kernels have no F16C); `pulp` and `multiversion` would do the
//! dispatch below, which is three `match` arms.
//!
//! Per-element work differs from the reference in three places, checked bit for bit over every
//! code: fp8 codes are decoded by arithmetic rather than by the 256-entry table (a table lookup
//! becomes a gather, which is slow on current x86); f16 is decoded by F16C's `vcvtph2ps` where
//! the instruction set has it (see [`decode_f16_block`]), else, and rounded, by the branch-free
//! `ieee::f16_bits_to_f32` / `f32_to_f16_bits` instead of `half` (the same bits); the quantizer
//! divides by the reciprocal with two fused multiply-adds (see [`ScaleDivision`]).
//! Other fp8 casts use the reference's per-scale tables (see `cast_blocks`); e4m3 into bf16 or
//! f16 is computed on the AVX2 tiers ([`widen_e4m3`]).

use std::ops::Range;
use std::sync::OnceLock;

use super::fp8::{Fp8Format, E4M3FN, E5M2};
use super::ieee::{bf16_bits_to_f32, f16_bits_to_f32, f32_to_bf16_bits, f32_to_f16_bits};
use super::{cast_from_f64, map_elements, Float, Source};

/// Elements per block: fixed-size arrays, which LLVM vectorises without bounds checks.
const BLOCK: usize = 256;
/// The widest element (f64), for the padded tail block.
const MAX_SIZE: usize = 8;

/// An instruction set the block kernels are compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    /// The target's baseline (SSE2 on x86_64); also every non-x86 target.
    Baseline,
    /// AVX2 with FMA and F16C (every AVX2 CPU has both).
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX-512 F/BW/VL/DQ: twice the lanes, and one-instruction narrowings (`vpmovdb`,
    /// `vpmovdw`) where AVX2 needs pack-and-permute sequences.
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Isa {
    /// The widest instruction set this CPU runs, detected once.
    pub(crate) fn best() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| *Isa::available().last().unwrap())
    }

    /// Every instruction set this CPU runs, narrowest first (the tests run them all).
    pub(crate) fn available() -> Vec<Isa> {
        #[allow(unused_mut)]
        let mut isas = vec![Isa::Baseline];
        #[cfg(target_arch = "x86_64")]
        {
            if !is_x86_feature_detected!("fma") || !is_x86_feature_detected!("f16c") {
                return isas;
            }
            if is_x86_feature_detected!("avx2") {
                isas.push(Isa::Avx2);
            }
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512dq")
                && is_x86_feature_detected!("avx2")
            {
                isas.push(Isa::Avx512);
            }
        }
        isas
    }

    /// Whether F16C's f16 conversions (`vcvtph2ps`, `vcvtps2ph`) may be used.
    #[inline(always)]
    pub(crate) fn f16c(self) -> bool {
        match self {
            Isa::Baseline => false,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 | Isa::Avx512 => true,
        }
    }

    /// Whether this is the AVX2 tier (not AVX-512).
    #[inline(always)]
    fn is_avx2(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => true,
            _ => false,
        }
    }

    /// Whether `f32::mul_add` is one instruction in this set's kernels (elsewhere it is a
    /// library call, far slower than a division).
    fn fused_multiply_add(self) -> bool {
        match self {
            Isa::Baseline => cfg!(target_feature = "fma") || cfg!(target_arch = "aarch64"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 | Isa::Avx512 => true,
        }
    }
}

/// Instantiates `$kernel` (an `#[inline(always)]` function) once per instruction set as
/// `$name`, which dispatches on its first argument. Each copy passes its instruction set on to
/// the kernel as a constant, for code that only some sets can run (F16C's conversions).
macro_rules! per_isa {
    ($name:ident => $kernel:ident ($($arg:ident: $ty:ty),*) $(-> $ret:ty)?) => {
        pub(crate) fn $name(isa: Isa, $($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma,f16c,bmi1,bmi2,lzcnt,popcnt")]
            unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                $kernel(Isa::Avx2, $($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi1,bmi2,lzcnt,popcnt")]
            unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                $kernel(Isa::Avx512, $($arg),*)
            }
            match isa {
                Isa::Baseline => $kernel(Isa::Baseline, $($arg),*),
                // SAFETY: an `Isa` other than Baseline comes from `Isa::available`, which
                // detected these features on this CPU.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => unsafe { avx2($($arg),*) },
                // SAFETY: as above.
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => unsafe { avx512($($arg),*) },
            }
        }
    };
}

per_isa!(cast => cast_kernel(src: &Source, range: Range<usize>, dst: &mut [u8], dst_dtype: Float));
per_isa!(narrow => narrow_kernel(src: &[u8], dst: &mut [u8], narrowing: Narrowing));
per_isa!(absmax => absmax_kernel(src: &Source, range: Range<usize>) -> f32);
per_isa!(quantize => quantize_kernel(src: &Source, range: Range<usize>, dst: &mut [u8], format: &Fp8Format, division: ScaleDivision, prefetch_next: bool));

/// Runs `$body` with `$known` bound to the static behind `$format` (one of the two fp8 formats),
/// so that after inlining the format's fields are constants: shifts by a constant instead of a
/// vector of counts, and fewer live registers.
macro_rules! with_known_format {
    ($format:expr, |$known:ident| $body:expr) => {{
        if std::ptr::eq($format, &E4M3FN) {
            let $known: &Fp8Format = &E4M3FN;
            $body
        } else {
            debug_assert!(std::ptr::eq($format, &E5M2));
            let $known: &Fp8Format = &E5M2;
            $body
        }
    }};
}

/// Writes `$convert` of each of the first `$out.len() / $size` of `$values` (a block) into
/// `$out`, `$size` bytes each. A macro, not a function taking a closure: the closure would be
/// compiled on its own, for the baseline instruction set, instead of inside the kernel.
macro_rules! store {
    ($values:expr, $out:expr, $size:literal, |$value:ident| $convert:expr) => {{
        let out: &mut [u8] = $out;
        if let Ok(out) = <&mut [u8; BLOCK * $size]>::try_from(&mut *out) {
            // Groups of 32 lanes: several independent vectors in flight per step.
            for (words, values) in out
                .chunks_exact_mut(32 * $size)
                .zip($values.chunks_exact(32))
            {
                let words: &mut [u8; 32 * $size] = words.try_into().unwrap();
                let values: &[_; 32] = values.try_into().unwrap();
                for (word, &$value) in words.chunks_exact_mut($size).zip(values.iter()) {
                    word.copy_from_slice(&$convert);
                }
            }
        } else {
            let mut block = [0u8; BLOCK * $size];
            for (word, &$value) in block.chunks_exact_mut($size).zip($values.iter()) {
                word.copy_from_slice(&$convert);
            }
            out.copy_from_slice(&block[..out.len()]);
        }
    }};
}

/// Elements `range` of `src` into `dst` (the destination of exactly those elements) as
/// `dst_dtype`: the reference's `cast`.
#[inline(always)]
fn cast_kernel(isa: Isa, src: &Source, range: Range<usize>, dst: &mut [u8], dst_dtype: Float) {
    if let Float::F64 = src.dtype {
        let size = src.dtype.size();
        return cast_from_f64(
            &src.bytes[range.start * size..range.end * size],
            dst,
            dst_dtype,
        );
    }
    let out_size = dst_dtype.size();
    let mut blocks = Blocks::new(isa, src, range.clone());
    let values = &mut AlignedBlock::new().0;
    while let Some((start, len)) = blocks.next(values) {
        let at = (start - range.start) * out_size;
        let out = &mut dst[at..at + len * out_size];
        match dst_dtype {
            Float::F32 => store!(values, out, 4, |value| value.to_le_bytes()),
            Float::F64 => store!(values, out, 8, |value| (value as f64).to_le_bytes()),
            Float::F16 => store!(values, out, 2, |value| f32_to_f16_bits(value).to_le_bytes()),
            Float::BF16 => store!(values, out, 2, |value| f32_to_bf16_bits(value)
                .to_le_bytes()),
            Float::Fp8(format) => with_known_format!(format, |format| {
                store!(values, out, 1, |value| [format.encode_f32(value)])
            }),
        }
    }
}

/// Whether [`widen_e4m3`] casts fp8 e4m3fn into `dst_dtype` on this instruction set: into bf16
/// or f16, on the AVX2 tiers.
pub(crate) fn widens_e4m3(isa: Isa, format: &Fp8Format, dst_dtype: Float) -> bool {
    isa.f16c() && std::ptr::eq(format, &E4M3FN) && matches!(dst_dtype, Float::BF16 | Float::F16)
}

/// fp8 e4m3fn `codes` times `scale` into `dst` as bf16 or f16 (where [`widens_e4m3`]): the bits
/// of the reference's table, each code's value times `scale` in f32 and rounded to nearest even,
/// computed 16 codes at a time instead of looked up one by one (see `f16c::e4m3_to_halves`). A NaN `scale` is the table's: its payload would survive
/// the multiplication, which the kernel's rounding does not reproduce.
pub(crate) fn widen_e4m3(isa: Isa, codes: &[u8], dst: &mut [u8], scale: f32, dst_dtype: Float) {
    debug_assert!(!scale.is_nan());
    let to_f16 = matches!(dst_dtype, Float::F16);
    // Where the kernel cannot run, everything goes through the element loop below.
    let whole = match widens_e4m3(isa, &E4M3FN, dst_dtype) {
        true => codes.len() / 16 * 16,
        false => 0,
    };
    let (codes_lanes, codes_tail) = codes.split_at(whole);
    let (dst_lanes, dst_tail) = dst.split_at_mut(whole * 2);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `widens_e4m3`, checked above (else the slices are empty), means F16C and AVX2
    // were detected (Isa::available); the slices hold the same whole number of 16-element
    // groups.
    unsafe {
        f16c::e4m3_to_halves(codes_lanes, dst_lanes, scale, to_f16)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (codes_lanes, dst_lanes);
    map_elements(codes_tail, dst_tail, |[code]| {
        let value = E4M3FN.decode_f32(code) * scale;
        match to_f16 {
            true => f32_to_f16_bits(value),
            false => f32_to_bf16_bits(value),
        }
        .to_le_bytes()
    });
}

/// The narrowing casts that are one bit operation per element: straight from source to
/// destination bytes, without the block of f32 the other casts go through.
#[derive(Clone, Copy)]
pub(crate) enum Narrowing {
    F32ToF16,
    F32ToBf16,
    Bf16ToF16,
}

impl Narrowing {
    pub(crate) fn of(src: Float, dst: Float) -> Option<Narrowing> {
        match (src, dst) {
            (Float::F32, Float::F16) => Some(Narrowing::F32ToF16),
            (Float::F32, Float::BF16) => Some(Narrowing::F32ToBf16),
            (Float::BF16, Float::F16) => Some(Narrowing::Bf16ToF16),
            _ => None,
        }
    }
}

/// `src` (whole elements) narrowed into `dst`, as the reference's `cast`. Into f16 by F16C's
/// `vcvtps2ph` (round to nearest even; the same bits as `f32_to_f16_bits`) where the instruction
/// set has it, 8 elements an instruction; what is left over below.
#[inline(always)]
fn narrow_kernel(isa: Isa, src: &[u8], dst: &mut [u8], narrowing: Narrowing) {
    let (src, dst) = narrow_to_f16_by_f16c(isa, src, dst, narrowing);
    match narrowing {
        Narrowing::F32ToF16 => map_elements(src, dst, |le| {
            f32_to_f16_bits(f32::from_le_bytes(le)).to_le_bytes()
        }),
        Narrowing::F32ToBf16 => map_elements(src, dst, |le| {
            f32_to_bf16_bits(f32::from_le_bytes(le)).to_le_bytes()
        }),
        Narrowing::Bf16ToF16 => map_elements(src, dst, |le| {
            f32_to_f16_bits(bf16_bits_to_f32(u16::from_le_bytes(le))).to_le_bytes()
        }),
    }
}

/// The part of a narrowing into f16 that F16C does, 8 elements an instruction, where the
/// instruction set has it; returns what is left for the element loop (everything otherwise).
#[inline(always)]
fn narrow_to_f16_by_f16c<'s, 'd>(
    isa: Isa,
    src: &'s [u8],
    dst: &'d mut [u8],
    narrowing: Narrowing,
) -> (&'s [u8], &'d mut [u8]) {
    let (in_size, bf16) = match narrowing {
        Narrowing::F32ToF16 => (4, false),
        Narrowing::Bf16ToF16 => (2, true),
        Narrowing::F32ToBf16 => return (src, dst),
    };
    if !isa.f16c() {
        return (src, dst);
    }
    let whole = src.len() / (8 * in_size) * 8;
    let (src_lanes, src_tail) = src.split_at(whole * in_size);
    let (dst_lanes, dst_tail) = dst.split_at_mut(whole * 2);
    let eights = src_lanes
        .chunks_exact(8 * in_size)
        .zip(dst_lanes.chunks_exact_mut(16));
    #[cfg(target_arch = "x86_64")]
    for (src, dst) in eights {
        // SAFETY: `isa.f16c()` means F16C and AVX2 were detected (Isa::available); `src` is 8
        // elements, `dst` their 16 bytes.
        unsafe { f16c::narrow_to_f16x8(src, dst.try_into().unwrap(), bf16) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (eights, bf16);
    (src_tail, dst_tail)
}

/// The largest finite magnitude among elements `range` of `src`, as the reference's `quantize`
/// finds it.
#[inline(always)]
fn absmax_kernel(isa: Isa, src: &Source, range: Range<usize>) -> f32 {
    match src.dtype {
        Float::BF16 => return bf16_bits_to_f32(halves_absmax(isa, src, range, 0x7F80)),
        Float::F16 => return f16_bits_to_f32(halves_absmax(isa, src, range, 0x7C00)),
        _ => {}
    }
    let mut largest = [0; MAX_LANES];
    let mut blocks = Blocks::new(isa, src, range);
    let values = &mut AlignedBlock::new().0;
    // The padding of a tail block is zeros, which never raise the maximum.
    while blocks.next(values).is_some() {
        fold_finite_magnitudes(&mut largest, values);
    }
    f32::from_bits(largest.into_iter().max().unwrap_or(0) as u32)
}

/// Elements `range` of `src` divided by a scale and encoded as fp8 into `dst`, as the
/// reference's `quantize`; if `prefetch_next`, the same number of elements after `range` are
/// fetched into the cache meanwhile (see [`prefetch`]).
#[inline(always)]
fn quantize_kernel(
    isa: Isa,
    src: &Source,
    range: Range<usize>,
    dst: &mut [u8],
    format: &Fp8Format,
    division: ScaleDivision,
    prefetch_next: bool,
) {
    with_known_format!(format, |format| {
        if division.by_reciprocal {
            quantize_range::<true>(isa, src, range, dst, format, division, prefetch_next)
        } else {
            quantize_range::<false>(isa, src, range, dst, format, division, prefetch_next)
        }
    })
}

/// [`quantize_kernel`] with the way of dividing fixed, so that the loops hold no branch on it.
#[inline(always)]
fn quantize_range<const BY_RECIPROCAL: bool>(
    isa: Isa,
    src: &Source,
    range: Range<usize>,
    dst: &mut [u8],
    format: &Fp8Format,
    division: ScaleDivision,
    prefetch_next: bool,
) {
    let size = src.dtype.size();
    let ahead = range.len() * size;
    // bf16 and f16 into e4m3fn on the AVX2 tier: 32 elements a step (see
    // `f16c::quantize_halves_to_e4m3`); what is left of the range below. Not on the AVX-512
    // tier, whose 16 lanes of the code below measured 4.17 GB/s for bf16 on an Intel VM where
    // this 8-lane kernel has not run.
    let (range, dst) = match src.dtype {
        Float::BF16 | Float::F16 if isa.is_avx2() && std::ptr::eq(format, &E4M3FN) => {
            let whole = range.len() / 32 * 32;
            // The table costs about as much to build as a few hundred elements to quantize.
            #[cfg(target_arch = "x86_64")]
            let table = match src.dtype {
                Float::BF16 if whole >= TABLE_MIN_ELEMENTS => {
                    f16c::Bf16ToE4m3Table::new(division.scale)
                }
                _ => None,
            };
            let bytes = &src.bytes[range.start * 2..(range.start + whole) * 2];
            let pieces = bytes.chunks(BLOCK * 2).zip(dst[..whole].chunks_mut(BLOCK));
            for (index, (bytes, out)) in pieces.enumerate() {
                if prefetch_next {
                    prefetch(
                        src.bytes,
                        (range.start + index * BLOCK) * 2 + ahead,
                        bytes.len(),
                    );
                }
                let f16 = matches!(src.dtype, Float::F16);
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the AVX2 tier means AVX2, FMA and F16C were detected
                // (Isa::available); `bytes` is a whole number of 32-element groups, `out` one
                // byte for each.
                unsafe {
                    match &table {
                        Some(table) => f16c::quantize_bf16_to_e4m3_by_table::<BY_RECIPROCAL>(
                            bytes, out, table, division,
                        ),
                        None => f16c::quantize_halves_to_e4m3::<BY_RECIPROCAL>(
                            bytes, out, division, f16,
                        ),
                    }
                };
                #[cfg(not(target_arch = "x86_64"))]
                let _ = (out, f16);
            }
            (range.start + whole..range.end, &mut dst[whole..])
        }
        _ => (range, dst),
    };
    let quantize =
        |value: f32| format.encode_quotient(value, division.divide::<BY_RECIPROCAL>(value));
    let first = range.start;
    // 16- and 32-bit sources are quantized straight from their bytes: without the block of
    // decoded f32 (a store and a load per element) per-channel bf16 quantization measured 1.19x
    // faster. A bf16 NaN is not quieted on the way: only its sign and NaN-ness count, and both
    // come from the dividend. f16 is the exception where F16C decodes it, 8 elements an
    // instruction: through the block, its arithmetic decode costs more than the store and load.
    macro_rules! straight {
        ($size:literal, |$le:ident| $decode:expr) => {{
            let bytes = &src.bytes[first * $size..range.end * $size];
            let pieces = bytes.chunks(BLOCK * $size).zip(dst.chunks_mut(BLOCK));
            for (index, (bytes, out)) in pieces.enumerate() {
                if prefetch_next {
                    prefetch(
                        src.bytes,
                        (first + index * BLOCK) * $size + ahead,
                        bytes.len(),
                    );
                }
                map_elements(bytes, out, |$le: [u8; $size]| [quantize($decode)]);
            }
        }};
    }
    match src.dtype {
        Float::BF16 => straight!(2, |le| f32::from_bits(
            (u16::from_le_bytes(le) as u32) << 16
        )),
        Float::F16 if !isa.f16c() => straight!(2, |le| f16_bits_to_f32(u16::from_le_bytes(le))),
        Float::F32 => straight!(4, |le| f32::from_le_bytes(le)),
        Float::F16 | Float::F64 | Float::Fp8(_) => {
            let mut blocks = Blocks::new(isa, src, range);
            let values = &mut AlignedBlock::new().0;
            while let Some((start, len)) = blocks.next(values) {
                if prefetch_next {
                    prefetch(src.bytes, start * size + ahead, len * size);
                }
                let at = start - first;
                store!(values, &mut dst[at..at + len], 1, |value| [quantize(value)]);
            }
        }
    }
}

/// The fewest bf16 elements quantized by one scale for which the AVX2 kernel builds that
/// scale's table (`f16c::Bf16ToE4m3Table`) rather than dividing each.
const TABLE_MIN_ELEMENTS: usize = 1024;

/// Division by a quantization scale, giving exactly the bits of `value / scale`.
///
/// Where the scale allows and the instruction set has fused multiply-add, by the reciprocal:
/// with r = RN(1/s) and q = RN(x·r), within an ulp of x/s, the remainder x − q·s is exact in
/// one FMA and RN(q + remainder·r) is RN(x/s) (Markstein's theorem). Per-channel bf16
/// quantization measured 1.10x faster than with the divider. The theorem needs every step in
/// the normal range: the scale between 2^-80 and 2^125 keeps the reciprocal normal, and keeps
/// the remainder exact for every dividend whose quotient reaches the smallest fp8 subnormal's
/// half (2^-17); smaller quotients round to zero either way. Infinite dividends give a NaN
/// quotient, which [`Fp8Format::encode_quotient`] saturates like the infinity the division
/// gives.
#[derive(Clone, Copy)]
pub(crate) struct ScaleDivision {
    scale: f32,
    reciprocal: f32,
    by_reciprocal: bool,
}

impl ScaleDivision {
    pub(crate) fn new(scale: f32, isa: Isa) -> ScaleDivision {
        let normal_range = f32::from_bits((127 - 80) << 23)..=f32::from_bits((127 + 125) << 23);
        ScaleDivision {
            scale,
            reciprocal: 1.0 / scale,
            by_reciprocal: isa.fused_multiply_add() && normal_range.contains(&scale),
        }
    }

    #[inline(always)]
    fn divide<const BY_RECIPROCAL: bool>(self, value: f32) -> f32 {
        if BY_RECIPROCAL {
            let quotient = value * self.reciprocal;
            let remainder = (-quotient).mul_add(self.scale, value);
            remainder.mul_add(self.reciprocal, quotient)
        } else {
            value / self.scale
        }
    }
}

/// Asks the CPU to bring `bytes[start..start + len]` (clamped to `bytes`) into its L2 cache ahead
/// of use. Per-channel quantization reads each row twice, the absmax pass first: while one row is
/// encoded (arithmetic on bytes already cached) the next row is fetched, so that its absmax pass
/// does not wait for memory (which the hardware prefetcher, seeing no new addresses during the
/// encoding, does not do). A no-op on other architectures.
#[inline(always)]
fn prefetch(bytes: &[u8], start: usize, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
        const LINE: usize = 64;
        let end = (start + len).min(bytes.len());
        for at in (start..end).step_by(LINE) {
            // SAFETY: SSE is part of the x86_64 baseline, and a prefetch never faults or changes
            // memory; the address is inside `bytes` anyway.
            unsafe { _mm_prefetch::<_MM_HINT_T1>(bytes.as_ptr().add(at).cast()) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (bytes, start, len);
}

/// A block of f32 on a cache-line boundary. A plain array is 4-byte aligned, and then most
/// AVX-512 loads and stores of it straddle two cache lines (aligning it made per-channel
/// quantization about a fifth faster).
#[repr(align(64))]
struct AlignedBlock([f32; BLOCK]);

impl AlignedBlock {
    #[inline(always)]
    fn new() -> AlignedBlock {
        AlignedBlock([0.0; BLOCK])
    }
}

/// Consecutive blocks of a range of a source, decoded to f32 and dequantized.
struct Blocks<'a, 'b> {
    isa: Isa,
    src: &'b Source<'a>,
    start: usize,
    end: usize,
}

impl<'a, 'b> Blocks<'a, 'b> {
    #[inline(always)]
    fn new(isa: Isa, src: &'b Source<'a>, range: Range<usize>) -> Self {
        Blocks {
            isa,
            src,
            start: range.start,
            end: range.end,
        }
    }

    /// Decodes the next block into `values` and returns `(start, len)`: `values[..len]` are
    /// elements `start..start + len`. A block never spans two scales; the rest of a block that
    /// ends a row or the range is zeros.
    #[inline(always)]
    fn next(&mut self, values: &mut [f32; BLOCK]) -> Option<(usize, usize)> {
        let src = self.src;
        let start = self.start;
        if start >= self.end {
            return None;
        }
        let (run_end, scale) = match src.scales {
            [] => (self.end, 1.0),
            &[scale] => (self.end, scale),
            row_scales => {
                let row = start / src.row_len;
                (((row + 1) * src.row_len).min(self.end), row_scales[row])
            }
        };
        let len = (run_end - start).min(BLOCK);
        let size = src.dtype.size();
        let bytes = &src.bytes[start * size..(start + len) * size];
        if len == BLOCK {
            decode_block(self.isa, src.dtype, bytes, scale, values);
        } else {
            let mut padded = [0u8; BLOCK * MAX_SIZE];
            padded[..bytes.len()].copy_from_slice(bytes);
            decode_block(self.isa, src.dtype, &padded[..BLOCK * size], scale, values);
        }
        self.start = start + len;
        Some((start, len))
    }
}

/// `BLOCK` elements of `dtype` (little-endian `bytes`) as f32, times `scale` for fp8, exactly as
/// the reference's `Source::decode`.
#[inline(always)]
fn decode_block(isa: Isa, dtype: Float, bytes: &[u8], scale: f32, out: &mut [f32; BLOCK]) {
    match dtype {
        Float::F32 => {
            let bytes: &[u8; BLOCK * 4] = bytes.try_into().unwrap();
            for (value, word) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *value = f32::from_le_bytes(word.try_into().unwrap());
            }
        }
        Float::F64 => {
            let bytes: &[u8; BLOCK * 8] = bytes.try_into().unwrap();
            for (value, word) in out.iter_mut().zip(bytes.chunks_exact(8)) {
                *value = f64::from_le_bytes(word.try_into().unwrap()) as f32;
            }
        }
        Float::F16 => decode_f16_block(isa, bytes.try_into().unwrap(), out),
        Float::BF16 => {
            let bytes: &[u8; BLOCK * 2] = bytes.try_into().unwrap();
            for (value, word) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *value = bf16_bits_to_f32(u16::from_le_bytes(word.try_into().unwrap()));
            }
        }
        Float::Fp8(format) => {
            let codes: &[u8; BLOCK] = bytes.try_into().unwrap();
            with_known_format!(format, |format| {
                for (value, &code) in out.iter_mut().zip(codes) {
                    *value = format.decode_f32(code) * scale;
                }
            })
        }
    }
}

/// `BLOCK` f16 (little-endian `bytes`) as f32: by F16C's `vcvtph2ps` where the instruction set
/// has it, 8 an instruction, else by `f16_bits_to_f32`. The same bits either way: both are exact,
/// and both quiet a NaN keeping its payload.
#[inline(always)]
fn decode_f16_block(isa: Isa, bytes: &[u8; BLOCK * 2], out: &mut [f32; BLOCK]) {
    if isa.f16c() {
        #[cfg(target_arch = "x86_64")]
        for (halves, values) in bytes.chunks_exact(16).zip(out.chunks_exact_mut(8)) {
            // SAFETY: `isa.f16c()` means F16C and AVX2 were detected (Isa::available); the
            // slices are exactly 8 elements of each side.
            unsafe { f16c::f16x8_to_f32(halves.try_into().unwrap(), values.try_into().unwrap()) };
        }
        return;
    }
    for (value, word) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        *value = f16_bits_to_f32(u16::from_le_bytes(word.try_into().unwrap()));
    }
}

/// F16C's conversions, 8 lanes at a time. Compiled for F16C and AVX2, so that they inline into
/// the kernels' copies for the instruction sets that have them; unsafe to call where the CPU
/// lacks them.
#[cfg(target_arch = "x86_64")]
mod f16c {
    use super::{ScaleDivision, E4M3FN};
    use std::arch::x86_64::*;

    /// Eight little-endian f16 as f32.
    ///
    /// # Safety
    /// The CPU must have F16C and AVX2.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn f16x8_to_f32(halves: &[u8; 16], values: &mut [f32; 8]) {
        // SAFETY: unaligned 16-byte load and 32-byte store, within the arrays.
        unsafe {
            let halves = _mm_loadu_si128(halves.as_ptr().cast());
            _mm256_storeu_ps(values.as_mut_ptr(), _mm256_cvtph_ps(halves));
        }
    }

    /// fp8 e4m3fn codes times `scale`, rounded to nearest even into little-endian bf16
    /// (`to_f16`: f16), 16 at a time: each code's value times `scale` in f32, as the
    /// reference's table computes it, then rounded as `f32_to_bf16_bits` (or `vcvtps2ph`) does.
    ///
    /// A code's bits shifted into place (sign to bit 31, exponent and mantissa under f32's) read
    /// as its value times 2^-120, subnormal codes as f32 subnormals; times 2^120 that is exact.
    /// The NaN codes (0x7F, 0xFF) would read as ±480: their outputs are replaced, in 16-bit
    /// lanes, by the quiet NaN of their sign, as the reference's NaN times a scale rounds. The
    /// multiplication by a scale that is not NaN makes no other NaN but from 0 times infinity,
    /// the default NaN, which both roundings treat like the reference.
    ///
    /// # Safety
    /// The CPU must have F16C and AVX2; `codes.len()` is a multiple of 16 and `dst` holds twice
    /// as many bytes.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn e4m3_to_halves(codes: &[u8], dst: &mut [u8], scale: f32, to_f16: bool) {
        debug_assert!(codes.len().is_multiple_of(16) && dst.len() == 2 * codes.len());
        let field = _mm256_set1_epi32(0x87F0_0000_u32 as i32);
        let to_value = f32::from_bits((127 + 120) << 23);
        // One multiplication by scale x 2^120 where that is finite: exact (a power of two), and
        // the product, rounded once, is the same.
        let combined = scale * to_value;
        let (first, second) = match combined.is_finite() {
            true => (_mm256_set1_ps(combined), None),
            false => (_mm256_set1_ps(to_value), Some(_mm256_set1_ps(scale))),
        };
        let quiet_nan = _mm256_set1_epi16(if to_f16 { 0x7E00 } else { 0x7FC0 });
        let nan_code = _mm256_set1_epi16(0xFE00_u16 as i16);
        let sign = _mm256_set1_epi16(0x8000_u16 as i16);
        let round_half = _mm256_set1_epi32(0x7FFF);
        let one = _mm256_set1_epi32(1);
        // Eight sign-extended codes as f32 values times the scale.
        let scaled = |codes: __m128i| {
            let bits =
                _mm256_and_si256(_mm256_slli_epi32::<20>(_mm256_cvtepi8_epi32(codes)), field);
            let product = _mm256_mul_ps(_mm256_castsi256_ps(bits), first);
            match second {
                None => product,
                Some(scale) => _mm256_mul_ps(product, scale),
            }
        };
        // Eight f32 rounded to bf16 as `f32_to_bf16_bits` rounds what is not NaN, each in the low
        // half of its 32-bit lane.
        let to_bf16 = |values: __m256| {
            let bits = _mm256_castps_si256(values);
            let odd = _mm256_and_si256(_mm256_srli_epi32::<16>(bits), one);
            _mm256_srli_epi32::<16>(_mm256_add_epi32(bits, _mm256_add_epi32(round_half, odd)))
        };
        for (codes, dst) in codes.chunks_exact(16).zip(dst.chunks_exact_mut(32)) {
            // SAFETY: 16-byte load and 32-byte store within the chunks.
            unsafe {
                let codes = _mm_loadu_si128(codes.as_ptr().cast());
                let low = scaled(codes);
                let high = scaled(_mm_unpackhi_epi64(codes, codes));
                let halves = if to_f16 {
                    _mm256_set_m128i(
                        _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(high),
                        _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(low),
                    )
                } else {
                    // The pack interleaves the 128-bit lanes of its two sources; the permutation
                    // puts the 16 results back in order.
                    let packed = _mm256_packus_epi32(to_bf16(low), to_bf16(high));
                    _mm256_permute4x64_epi64::<0b11_01_10_00>(packed)
                };
                // Sign-extended to 16 bits, a NaN code shifted left by 9 is 0xFE00, its sign
                // bit 15.
                let codes = _mm256_cvtepi8_epi16(codes);
                let nan = _mm256_cmpeq_epi16(_mm256_slli_epi16::<9>(codes), nan_code);
                let nan_bits = _mm256_or_si256(_mm256_and_si256(codes, sign), quiet_nan);
                let halves = _mm256_blendv_epi8(halves, nan_bits, nan);
                _mm256_storeu_si256(dst.as_mut_ptr().cast(), halves);
            }
        }
    }

    /// Little-endian bf16 (`f16`: f16) divided by `division`'s scale and encoded as fp8
    /// e4m3fn, 32 at a time: the codes `Fp8Format::encode_quotient` gives for the quotients
    /// `ScaleDivision::divide` gives.
    ///
    /// The encoding takes fewer steps than `encode_quotient`'s two roundings: below 448 (the
    /// saturated magnitude), adding 2^(e + 20), where 2^e is the magnitude's power of two (2^-6,
    /// the smallest normal's, for smaller ones), rounds it to a multiple of its fp8 step 2^(e - 3)
    /// (to nearest even, by the FPU), and the sum's low bits count the steps: 8 + the mantissa
    /// for a normal number (16 on a carry into the next power), the code itself for a subnormal.
    /// The code is then the steps plus 8 x (e + 6). Sign and NaN come from the source's 16-bit
    /// lanes after the pack to 16 bits: one operation for 16 elements.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C; `src` holds a multiple of 32 elements, `dst` one
    /// byte each.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quantize_halves_to_e4m3<const BY_RECIPROCAL: bool>(
        src: &[u8],
        dst: &mut [u8],
        division: ScaleDivision,
        f16: bool,
    ) {
        debug_assert!(src.len().is_multiple_of(64) && src.len() == 2 * dst.len());
        let scale = _mm256_set1_ps(division.scale);
        let reciprocal = _mm256_set1_ps(division.reciprocal);
        let magnitude = _mm256_set1_epi32(0x7FFF_FFFF);
        let saturated = _mm256_set1_epi32(E4M3FN.max_value().to_bits() as i32);
        let power = _mm256_set1_epi32(0x7F80_0000);
        let smallest_normal = _mm256_set1_epi32((127 - 6) << 23);
        let magic = _mm256_set1_epi32(20 << 23);
        // 8 x (e + 6) is the power's exponent field shifted right by 20, less this.
        let code_offset = _mm256_set1_epi16((127 - 6) << 3);
        let half_magnitude = _mm256_set1_epi16(0x7FFF);
        let infinity = _mm256_set1_epi16(if f16 { 0x7C00 } else { 0x7F80 });
        let nan_code = _mm256_set1_epi16(0x7F);
        let sign = _mm256_set1_epi16(0x80);
        // Eight values: their codes plus `code_offset`, in 32-bit lanes.
        let encode = |values: __m256| {
            let quotient = if BY_RECIPROCAL {
                let quotient = _mm256_mul_ps(values, reciprocal);
                let remainder = _mm256_fnmadd_ps(quotient, scale, values);
                _mm256_fmadd_ps(remainder, reciprocal, quotient)
            } else {
                _mm256_div_ps(values, scale)
            };
            // NaN quotients (of infinite dividends) saturate too: their bits lie above.
            let abs = _mm256_and_si256(_mm256_castps_si256(quotient), magnitude);
            let abs = _mm256_min_epi32(abs, saturated);
            let power = _mm256_max_epi32(_mm256_and_si256(abs, power), smallest_normal);
            let magic = _mm256_add_epi32(power, magic);
            let sum = _mm256_add_ps(_mm256_castsi256_ps(abs), _mm256_castsi256_ps(magic));
            let steps = _mm256_sub_epi32(_mm256_castps_si256(sum), magic);
            _mm256_add_epi32(steps, _mm256_srli_epi32::<20>(power))
        };
        // Sixteen elements: their codes in 16-bit lanes.
        let codes = |halves: __m256i| {
            let codes = if f16 {
                // Elements 0-7 and 8-15: the pack (per 128-bit lane) interleaves their halves,
                // which the permutation puts back in order.
                let low = _mm256_cvtph_ps(_mm256_castsi256_si128(halves));
                let high = _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(halves));
                let codes = _mm256_packus_epi32(encode(low), encode(high));
                _mm256_permute4x64_epi64::<0b11_01_10_00>(codes)
            } else {
                // Elements 0-3 and 8-11, then 4-7 and 12-15, which the pack puts in order.
                let zero = _mm256_setzero_si256();
                let low = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, halves));
                let high = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, halves));
                _mm256_packus_epi32(encode(low), encode(high))
            };
            let codes = _mm256_sub_epi16(codes, code_offset);
            let nan = _mm256_cmpgt_epi16(_mm256_and_si256(halves, half_magnitude), infinity);
            let codes = _mm256_blendv_epi8(codes, nan_code, nan);
            _mm256_or_si256(
                codes,
                _mm256_and_si256(_mm256_srli_epi16::<8>(halves), sign),
            )
        };
        for (src, dst) in src.chunks_exact(64).zip(dst.chunks_exact_mut(32)) {
            // SAFETY: two 32-byte loads and a 32-byte store within the chunks.
            unsafe {
                let first = codes(_mm256_loadu_si256(src.as_ptr().cast()));
                let second = codes(_mm256_loadu_si256(src.as_ptr().add(32).cast()));
                // The pack interleaves the 128-bit lanes; the permutation restores the order.
                let bytes = _mm256_packus_epi16(first, second);
                let bytes = _mm256_permute4x64_epi64::<0b11_01_10_00>(bytes);
                _mm256_storeu_si256(dst.as_mut_ptr().cast(), bytes);
            }
        }
    }

    /// The e4m3fn codes of bf16 values divided by one scale, as a table of that scale's 128
    /// quotients of bf16 mantissas: the division and rounding of each element become table
    /// lookups and byte arithmetic (see [`quantize_bf16_to_e4m3_by_table`]).
    ///
    /// A bf16 is 2^(E - 127) x (1 + m/128), m one of 128 mantissas. Where the quotient by scale
    /// s is a normal f32, RN(x / s) = 2^(E - 127) x RN((1 + m/128) / s), exactly; and rounded to
    /// an fp8 normal (4 significant bits) the power of two only moves the exponent. So the code
    /// is 8E + Q[m] less a constant, Q[m] = 8 k + t for the rounded quotient of the mantissa,
    /// 2^k x (1 + t/8): wherever that code is an fp8 normal's. Below that (fp8 subnormals round
    /// to a fixed step) and at the top (saturation, infinity, NaN) the kernel divides instead.
    ///
    /// Q grows by at most 1 every 8 mantissas (a quotient grows by at most 1/128 of itself a
    /// mantissa, an fp8 step is at least 1/16 of the value), so each run of 16 mantissas with
    /// the same top 3 bits is its first Q and at most two steps up: three 16-byte tables that
    /// `vpshufb` looks up by the top bits.
    #[derive(Clone, Copy)]
    pub(super) struct Bf16ToE4m3Table {
        /// Per top 3 mantissa bits j: Q of the run's first mantissa, less j (the kernel's
        /// exponent term carries the top bits), plus 7 (to keep it non-negative) and 2 (the
        /// two compares below add -1 where a step is not reached).
        first: [i8; 16],
        /// Per top 3 bits: the low 4 bits from which Q is one more than the run's first (16:
        /// never).
        one_up: [i8; 16],
        /// Likewise for two more.
        two_up: [i8; 16],
        /// Subtracted from 8E + the top 3 mantissa bits to give the code's exponent term.
        exponent_offset: i16,
    }

    impl Bf16ToE4m3Table {
        /// The table for dividing by `scale`; `None` where a quotient of the mantissas is not a
        /// normal f32, or where zeros and bf16 subnormals (E = 0) would not fall below the
        /// fp8 subnormals and infinities and NaN (E = 255) above the largest code, so that the
        /// kernel would misclassify them.
        pub(super) fn new(scale: f32) -> Option<Bf16ToE4m3Table> {
            let mut rounded = [0u32; 128];
            for (mantissa, rounded) in rounded.iter_mut().enumerate() {
                let quotient = (1.0 + mantissa as f32 / 128.0) / scale;
                if !quotient.is_normal() {
                    return None;
                }
                // Rounded to 3 mantissa bits, to nearest even, as `encode_quotient` rounds a
                // normal: 8 x the biased exponent + the mantissa, a carry moving into the
                // exponent.
                let bits = quotient.to_bits();
                *rounded = (bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20;
            }
            let lowest = rounded[0] & !7;
            // The code of 2^(E - 127) x (1 + m/128) is 8E + rounded[m] - 8 x (127 + 120):
            // 8 (E - exponent_base) + (rounded[m] - lowest).
            let exponent_base = (127 + 120) - (lowest as i32 >> 3);
            // E = 0 must give at most -25 (below every code the kernel keeps), E = 255 at least
            // 127 (Q is at most 16 + 7).
            if !(6..=239).contains(&exponent_base) {
                return None;
            }
            let mut table = Bf16ToE4m3Table {
                first: [0; 16],
                one_up: [16; 16],
                two_up: [16; 16],
                exponent_offset: (8 * exponent_base + 7) as i16,
            };
            for (top, run) in rounded.chunks_exact(16).enumerate() {
                let first = run[0] - lowest;
                // Never taken for a normal scale (the test below tries every f32 mantissa);
                // kept so that a wrong table can only mean the slower kernel.
                if run[15] - lowest > first + 2 {
                    return None;
                }
                let below = |limit: u32| run.iter().filter(|&&q| q - lowest < limit).count();
                table.first[top] = (first as i32 - top as i32 + 9) as i8;
                table.one_up[top] = below(first + 1) as i8;
                table.two_up[top] = below(first + 2) as i8;
            }
            Some(table)
        }
    }

    /// Little-endian bf16 divided by `division`'s scale and encoded as fp8 e4m3fn, 32 at a
    /// time, by `table` (built for that scale): the codes of [`quantize_halves_to_e4m3`], which
    /// computes the 32 elements where one of them is not an fp8 normal's (see
    /// [`Bf16ToE4m3Table`]).
    ///
    /// In byte lanes: the mantissa's top 3 bits look up the run's first Q and the two step
    /// positions, which its low 4 bits are compared with; the exponent term 8E + top bits less
    /// the offset is packed to bytes with signed saturation, so that tiny elements stay far
    /// below code 0 and huge ones reach 127.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C; `src` holds a multiple of 32 elements, `dst` one
    /// byte each.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quantize_bf16_to_e4m3_by_table<const BY_RECIPROCAL: bool>(
        src: &[u8],
        dst: &mut [u8],
        table: &Bf16ToE4m3Table,
        division: ScaleDivision,
    ) {
        debug_assert!(src.len().is_multiple_of(64) && src.len() == 2 * dst.len());
        // SAFETY: 16-byte loads of the table's arrays.
        let (first, one_up, two_up) = unsafe {
            (
                _mm256_broadcastsi128_si256(_mm_loadu_si128(table.first.as_ptr().cast())),
                _mm256_broadcastsi128_si256(_mm_loadu_si128(table.one_up.as_ptr().cast())),
                _mm256_broadcastsi128_si256(_mm_loadu_si128(table.two_up.as_ptr().cast())),
            )
        };
        let exponent_offset = _mm256_set1_epi16(table.exponent_offset);
        let mantissa = _mm256_set1_epi16(0x7F);
        let three_bits = _mm256_set1_epi8(7);
        let four_bits = _mm256_set1_epi8(0x0F);
        let sign = _mm256_set1_epi8(0x80_u8 as i8);
        let below_subnormals = _mm256_set1_epi8(-25);
        let normal = _mm256_set1_epi8(8);
        let top = _mm256_set1_epi8(127);
        let zero = _mm256_setzero_si256();
        // 8E + the top 3 mantissa bits (the sign shifted out), less the offset.
        let exponent_term = |halves: __m256i| {
            let shifted = _mm256_srli_epi16::<5>(_mm256_slli_epi16::<1>(halves));
            _mm256_sub_epi16(shifted, exponent_offset)
        };
        for (src, dst) in src.chunks_exact(64).zip(dst.chunks_exact_mut(32)) {
            // SAFETY: two 32-byte loads and a 32-byte store within the chunks.
            unsafe {
                let low = _mm256_loadu_si256(src.as_ptr().cast());
                let high = _mm256_loadu_si256(src.as_ptr().add(32).cast());
                // The packs interleave the 128-bit lanes of `low` and `high` alike; the
                // permutation before the store restores the order.
                let mantissas = _mm256_packus_epi16(
                    _mm256_and_si256(low, mantissa),
                    _mm256_and_si256(high, mantissa),
                );
                let top_bits = _mm256_and_si256(_mm256_srli_epi16::<4>(mantissas), three_bits);
                let low_bits = _mm256_and_si256(mantissas, four_bits);
                let steps = _mm256_add_epi8(
                    _mm256_shuffle_epi8(first, top_bits),
                    _mm256_add_epi8(
                        _mm256_cmpgt_epi8(_mm256_shuffle_epi8(one_up, top_bits), low_bits),
                        _mm256_cmpgt_epi8(_mm256_shuffle_epi8(two_up, top_bits), low_bits),
                    ),
                );
                let exponents = _mm256_packs_epi16(exponent_term(low), exponent_term(high));
                let codes = _mm256_adds_epi8(exponents, steps);
                let subnormal = _mm256_and_si256(
                    _mm256_cmpgt_epi8(codes, below_subnormals),
                    _mm256_cmpgt_epi8(normal, codes),
                );
                let divide = _mm256_or_si256(subnormal, _mm256_cmpeq_epi8(codes, top));
                if _mm256_testz_si256(divide, divide) == 0 {
                    quantize_halves_to_e4m3::<BY_RECIPROCAL>(src, dst, division, false);
                    continue;
                }
                let signs = _mm256_and_si256(_mm256_packs_epi16(low, high), sign);
                let bytes = _mm256_or_si256(_mm256_max_epi8(codes, zero), signs);
                let bytes = _mm256_permute4x64_epi64::<0b11_01_10_00>(bytes);
                _mm256_storeu_si256(dst.as_mut_ptr().cast(), bytes);
            }
        }
    }

    /// Eight little-endian f32 (`bf16`: bf16) rounded to f16, to nearest even.
    ///
    /// # Safety
    /// The CPU must have F16C and AVX2; `src` holds 8 elements (32 bytes, 16 for bf16).
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn narrow_to_f16x8(src: &[u8], dst: &mut [u8; 16], bf16: bool) {
        // SAFETY: unaligned loads of 16 or 32 bytes within `src` (8 elements, checked by the
        // caller's chunking) and a 16-byte store within `dst`. A bf16 is the top half of the
        // f32 of the same value.
        unsafe {
            let values = if bf16 {
                let halves = _mm_loadu_si128(src.as_ptr().cast());
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(halves)))
            } else {
                _mm256_loadu_ps(src.as_ptr().cast())
            };
            let rounded = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(values);
            _mm_storeu_si128(dst.as_mut_ptr().cast(), rounded);
        }
    }

    /// `halves_absmax` over whole bf16 or f16 `bytes`, 64 halves a step. Each magnitude m gets
    /// 0x8000 - `infinity` added: the finite ones then lie from that offset up to 0x7FFF, the
    /// others wrap to negative 16-bit integers, so a signed maximum keeps the largest finite one
    /// with no compare and blend (the loop LLVM made of the portable code rebuilt each half from
    /// bytes, and blended).
    ///
    /// # Safety
    /// The CPU must have AVX2.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn halves_absmax(bytes: &[u8], infinity: u16) -> u16 {
        let offset = 0x8000u16.wrapping_sub(infinity) as i16;
        let biased = |m: u16| m.wrapping_add(offset as u16) as i16;
        let (magnitudes, shift) = (_mm256_set1_epi16(0x7FFF), _mm256_set1_epi16(offset));
        let mut largest = [_mm256_set1_epi16(offset); 4];
        let mut steps = bytes.chunks_exact(128);
        for step in &mut steps {
            for (i, largest) in largest.iter_mut().enumerate() {
                // SAFETY: 32 of the step's 128 bytes; unaligned loads.
                let halves = unsafe { _mm256_loadu_si256(step.as_ptr().add(32 * i).cast()) };
                let biased = _mm256_add_epi16(_mm256_and_si256(halves, magnitudes), shift);
                *largest = _mm256_max_epi16(*largest, biased);
            }
        }
        let both = _mm256_max_epi16(
            _mm256_max_epi16(largest[0], largest[1]),
            _mm256_max_epi16(largest[2], largest[3]),
        );
        let mut lanes = [0i16; 16];
        // SAFETY: 32 bytes into `lanes`.
        unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), both) };
        let tail = steps
            .remainder()
            .chunks_exact(2)
            .map(|pair| biased(u16::from_le_bytes([pair[0], pair[1]]) & 0x7FFF));
        let most = lanes.into_iter().chain(tail).max().unwrap_or(offset);
        (most as u16).wrapping_sub(offset as u16)
    }

    #[cfg(test)]
    mod tests {
        use super::Bf16ToE4m3Table;

        /// Steps of Q over a run of 16 mantissas depend on the scale's mantissa alone (its
        /// exponent shifts every quotient alike): every one of them gets a table, so the kernel
        /// never falls back for a run's shape. Every 97th mantissa in a debug build.
        #[test]
        fn every_scale_mantissa_gets_a_bf16_to_e4m3_table() {
            let stride = if cfg!(debug_assertions) { 97 } else { 1 };
            for mantissa in (0..1u32 << 23).step_by(stride) {
                let scale = f32::from_bits(0x3F80_0000 | mantissa);
                assert!(
                    Bf16ToE4m3Table::new(scale).is_some(),
                    "no table for scale {scale:e} ({:#010x})",
                    scale.to_bits()
                );
            }
        }
    }
}

/// The largest finite magnitude among elements `range` of a bf16 or f16 `src`, as its 16 bits
/// (`infinity`: the format's infinity, the smallest magnitude that is not finite). Finite
/// magnitudes of one format order like their bits, and each decodes to the f32 of the same
/// order, so the maximum of the decoded values is the decoded maximum: found on the stored
/// halves, 32 to an AVX-512 register, with no decode and no store of decoded values.
#[inline(always)]
fn halves_absmax(isa: Isa, src: &Source, range: Range<usize>, infinity: u16) -> u16 {
    let bytes = &src.bytes[range.start * 2..range.end * 2];
    #[cfg(target_arch = "x86_64")]
    if isa.is_avx2() {
        // SAFETY: `is_avx2` means AVX2 was detected (Isa::available).
        return unsafe { f16c::halves_absmax(bytes, infinity) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = isa;
    let mut largest = [0u16; 2 * MAX_LANES];
    let mut fold = |pairs: &[u8]| {
        for (largest, pair) in largest.iter_mut().zip(pairs.chunks_exact(2)) {
            let magnitude = u16::from_le_bytes([pair[0], pair[1]]) & 0x7FFF;
            let finite = if magnitude < infinity { magnitude } else { 0 };
            *largest = (*largest).max(finite);
        }
    };
    let mut chunks = bytes.chunks_exact(4 * MAX_LANES);
    for chunk in &mut chunks {
        fold(chunk);
    }
    fold(chunks.remainder());
    largest.into_iter().max().unwrap_or(0)
}

/// Lanes of the absmax accumulator: two AVX-512 registers (four AVX2 ones).
const MAX_LANES: usize = 32;

/// Folds the reference's `finite_absmax` of a block into `largest`, lane by lane, as bits (the
/// caller reduces the lanes once at the end). A per-block array of magnitudes reduced in place
/// went through the stack, 4-byte aligned, and its loads missed store forwarding: the absmax
/// pass took 40% of per-channel quantization.
#[inline(always)]
fn fold_finite_magnitudes(largest: &mut [i32; MAX_LANES], values: &[f32; BLOCK]) {
    for lanes in values.chunks_exact(MAX_LANES) {
        for (largest, value) in largest.iter_mut().zip(lanes) {
            let magnitude = (value.to_bits() & 0x7FFF_FFFF) as i32;
            let finite = if magnitude < f32::INFINITY.to_bits() as i32 {
                magnitude
            } else {
                0
            };
            *largest = (*largest).max(finite);
        }
    }
}
