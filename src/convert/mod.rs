//! Host dtype conversions and fp8 quantization.
//!
//! Every float conversion rounds to nearest, ties to even, directly from the source value, and
//! fp8 saturates (see [`convert`]). The rules are exact because the CUDA kernel must produce the
//! same bits: where a choice had to be made (NaN bits, f64 sources of quantization, scales that
//! underflow) it is written down at the function that makes it.
//!
//! Data is little-endian, as safetensors stores it, and may sit at any byte alignment.
//!
//! Where conversions happen (the first three through this module, on the host):
//! 1. Registering host tensors, into the offload tier's form: `Context::register_host`
//!    (`context/register.rs`), on the caller's thread, without the context lock.
//! 2. Making a host copy (offload or onload tier, from the checkpoint or another host copy):
//!    `HostSink` in `context/transfer.rs`, on the thread that needs it (an onload, an acquire),
//!    without the lock; a large tensor is split over the context's host threads (`Engine`).
//! 3. Uploading to the compute device (`Backend::upload`, `upload_part`), on the thread that
//!    fills (an acquire, or the copy engine's worker), without the lock. On the CPU device the
//!    conversion writes straight into the device buffer; on CUDA, when the preparing dtype
//!    differs from the source, the tensor is converted on the host into pinned staging, then copied.
//! 4. Preparing form to computation form, on the device (`Backend::convert`, called by
//!    `context/transfer.rs` `make_converted`, same thread): on CUDA a PTX kernel, a
//!    device-to-device copy when the forms match, the quantize kernel into scaled fp8, or a round
//!    trip through the host for a dtype no kernel reads (f64); on the CPU device, this module.

mod float_env;
mod fp8;
mod ieee;
mod simd;
#[cfg(test)]
mod simd_tests;
#[cfg(test)]
mod tests;

use std::ops::Range;
use std::sync::Mutex;

use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::host_threads;
use float_env::DefaultFloatEnvironment;
use fp8::Fp8Format;
use ieee::{bf16_bits_to_f32, f32_to_bf16_bits, f64_to_bf16_bits, f64_to_f16_bits};
use simd::{Isa, ScaleDivision};

pub use fp8::{f32_to_fp8, f64_to_fp8, fp8_to_f32};

/// fp8 storage mode (`STRATA_QUANT_*` in the C ABI).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Quant {
    None,
    PerTensor,
    PerChannel,
}

/// A tensor's bytes in `dtype`. `scales` is empty for plain data, has 1 entry when the fp8 data was
/// quantized per tensor, or `rows` entries when quantized per output row (dim 0); real value =
/// f32(stored) * scale.
#[derive(Clone, Copy)]
pub struct TensorBytes<'a> {
    pub bytes: &'a [u8],
    pub dtype: DType,
    pub scales: &'a [f32],
}

/// Elements converted per step when going through f32: the buffers stay in L1.
const CHUNK: usize = 4096;

/// Converts `src` into `dst` (exactly numel * dst_dtype.size() bytes) as `dst_dtype`.
///
/// `rows` is the size of the tensor's first dimension (1 for 0-D/1-D tensors); numel =
/// src.bytes.len() / src.dtype.size(), and must be a multiple of `rows` (0 only when numel is 0).
/// `quant` applies only when dst_dtype is fp8 (ignored otherwise): Quant::None = plain cast
/// (returns no scales); PerTensor/PerChannel = absmax scaling, returns the scales (1 or `rows`).
/// A scaled src is dequantized first (value * scale in f32). If src is already scaled fp8 of the
/// same dtype with the same granularity as requested, bytes and scales are copied unchanged (with
/// one row, a single scale is both granularities).
///
/// Non-float dtypes (ints, bool) only pass through: the same dtype is a byte copy, anything else
/// is `INVALID_ARGUMENT`, as are mismatched lengths and scales on non-fp8 data.
///
/// Quantization, per group (the whole tensor, or each row): absmax = the largest |x| over the
/// finite values x, where x is the source value as f32 (an f64 source is rounded to f32 first, so
/// "finite" means finite in f32); scale = absmax / FP8_MAX in f32 (448 or 57344); stored =
/// fp8(x / scale) with an f32 division. A scale of 0 (all zeros, no finite values, or an absmax
/// so small that the division underflows) is replaced by 1.0, so that zeros never become 0/0.
///
/// Runs as [`Engine::default`]: see [`convert_with`] to choose the threads.
pub fn convert(
    src: TensorBytes<'_>,
    rows: usize,
    dst: &mut [u8],
    dst_dtype: DType,
    quant: Quant,
) -> Result<Vec<f32>> {
    convert_with(src, rows, dst, dst_dtype, quant, Engine::default())
}

/// How a conversion runs. Every engine writes the same bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Engine {
    /// `None`: the scalar reference, one element at a time (and no threads).
    isa: Option<Isa>,
    threads: usize,
    /// Work below this many bytes stays on the calling thread.
    min_parallel_bytes: usize,
}

impl Engine {
    /// The widest instruction set this CPU has, on up to `threads` host threads (see
    /// [`host_threads`]); tensors below 1 MiB stay on the calling thread.
    pub fn with_threads(threads: usize) -> Engine {
        Engine {
            isa: Some(Isa::best()),
            threads: threads.max(1),
            min_parallel_bytes: host_threads::PARALLEL_MIN_BYTES,
        }
    }

    /// The scalar code every faster path must match bit for bit.
    pub fn reference() -> Engine {
        Engine {
            isa: None,
            threads: 1,
            min_parallel_bytes: usize::MAX,
        }
    }
}

impl Default for Engine {
    /// [`host_threads::default_threads`] threads.
    fn default() -> Engine {
        Engine::with_threads(host_threads::default_threads())
    }
}

impl Engine {
    /// Copies `src` into `dst` (as long), split across the engine's threads like a conversion:
    /// how the CUDA backend fills its pinned staging buffers, which one thread fills at about a
    /// sixth of what PCIe Gen5 takes.
    pub fn copy(self, dst: &mut [u8], src: &[u8]) {
        let parts = part_count(self, src.len(), src.len());
        let per_part = src.len().div_ceil(parts).max(1);
        let pieces: Vec<_> = dst.chunks_mut(per_part).zip(src.chunks(per_part)).collect();
        host_threads::run_parts(self.threads, "copy", pieces, |(out, bytes)| {
            out.copy_from_slice(bytes);
            bytes.len()
        });
    }
}

/// [`convert`], run by `engine`.
pub fn convert_with(
    src: TensorBytes<'_>,
    rows: usize,
    dst: &mut [u8],
    dst_dtype: DType,
    quant: Quant,
    engine: Engine,
) -> Result<Vec<f32>> {
    let _default_environment = DefaultFloatEnvironment::enter();
    let numel = src.bytes.len() / src.dtype.size();
    if !src.bytes.len().is_multiple_of(src.dtype.size()) {
        return Err(Error::invalid(format!(
            "{} source bytes are not a whole number of {} elements",
            src.bytes.len(),
            src.dtype.name()
        )));
    }
    if numel.checked_mul(dst_dtype.size()) != Some(dst.len()) {
        return Err(Error::invalid(format!(
            "{numel} elements need {} bytes as {}; the destination has {}",
            numel.saturating_mul(dst_dtype.size()),
            dst_dtype.name(),
            dst.len()
        )));
    }
    let rows_fit = if rows == 0 {
        numel == 0
    } else {
        numel.is_multiple_of(rows)
    };
    if !rows_fit {
        return Err(Error::invalid(format!(
            "{numel} elements do not split into {rows} rows"
        )));
    }
    let src_quant = match src.scales.len() {
        0 => Quant::None,
        _ if !src.dtype.is_fp8() => {
            return Err(Error::invalid(format!(
                "{} data cannot carry scales",
                src.dtype.name()
            )));
        }
        1 => Quant::PerTensor,
        n if n == rows => Quant::PerChannel,
        n => {
            return Err(Error::invalid(format!(
                "{n} scales for {rows} rows: expected 1 (per tensor) or {rows} (per channel)"
            )));
        }
    };

    let (Some(src_float), Some(dst_float)) = (Float::of(src.dtype), Float::of(dst_dtype)) else {
        if src.dtype == dst_dtype {
            dst.copy_from_slice(src.bytes);
            return Ok(Vec::new());
        }
        return Err(Error::invalid(format!(
            "cannot convert {} to {}: only float dtypes convert",
            src.dtype.name(),
            dst_dtype.name()
        )));
    };

    let quant = if dst_dtype.is_fp8() {
        quant
    } else {
        Quant::None
    };
    let same_granularity =
        src_quant == quant || (rows == 1 && src_quant != Quant::None && quant != Quant::None);
    if src.dtype == dst_dtype && same_granularity {
        dst.copy_from_slice(src.bytes);
        return Ok(src.scales.to_vec());
    }

    let source = Source {
        bytes: src.bytes,
        dtype: src_float,
        scales: src.scales,
        row_len: numel.checked_div(rows).unwrap_or(0),
    };
    let groups = match (quant, dst_float) {
        (Quant::PerTensor, Float::Fp8(_)) => 1,
        (Quant::PerChannel, Float::Fp8(_)) => rows,
        _ => {
            match engine.isa {
                None => cast(&source, dst, dst_float),
                Some(isa) => cast_blocks(&source, dst, dst_float, isa, engine),
            }
            return Ok(Vec::new());
        }
    };
    let Float::Fp8(format) = dst_float else {
        unreachable!("only fp8 is quantized")
    };
    match engine.isa {
        None => quantize(&source, groups, dst, format),
        Some(isa) => quantize_blocks(&source, groups, dst, format, isa, engine),
    }
}

/// How many parts to split `elements` elements (of `bytes` bytes read or written, whichever is
/// more) into: one below the engine's parallel threshold, else a few per thread (see
/// [`host_threads::run_parts`]: whichever thread is free takes the next), none under
/// `MIN_PART_BYTES`.
fn part_count(engine: Engine, elements: usize, bytes: usize) -> usize {
    if bytes < engine.min_parallel_bytes || engine.threads == 1 {
        1
    } else {
        (engine.threads * PARTS_PER_THREAD)
            .min(bytes / MIN_PART_BYTES)
            .min(elements)
            .max(1)
    }
}

/// [`host_threads::run_parts`], each part in the default floating-point environment: the caller
/// is already in it (see [`convert_with`]), a worker may have inherited another.
fn run_parts<T: Send>(
    threads: usize,
    label: &'static str,
    parts: Vec<T>,
    work: impl Fn(T) -> usize + Sync,
) {
    host_threads::run_parts(threads, label, parts, |part| {
        let _default_environment = DefaultFloatEnvironment::enter();
        work(part)
    })
}

/// Parts per host thread of a parallel conversion: a thread that starts late (a worker waking)
/// still finds some left.
const PARTS_PER_THREAD: usize = 4;
/// Smallest part worth handing to another thread.
const MIN_PART_BYTES: usize = 256 << 10;

/// [`cast`] by the block kernels, split across threads by element ranges.
fn cast_blocks(src: &Source, dst: &mut [u8], dst_dtype: Float, isa: Isa, engine: Engine) {
    let threads = engine.threads;
    let numel = src.numel();
    let parts = part_count(engine, numel, src.bytes.len().max(dst.len()));
    let per_part = numel.div_ceil(parts).max(1);
    let pieces: Vec<_> = dst
        .chunks_mut(per_part * dst_dtype.size())
        .enumerate()
        .map(|(index, out)| (index * per_part, out))
        .collect();
    run_parts(threads, "cast", pieces, |(start, out)| {
        let range = start..start + out.len() / dst_dtype.size();
        match src.dtype {
            // Rows of fewer than 16 codes (one kernel step) per scale go to the block kernels.
            Float::Fp8(format)
                if simd::widens_e4m3(isa, format, dst_dtype)
                    && (src.scales.len() <= 1 || src.row_len >= 16) =>
            {
                let first = range.start;
                src.for_each_scale_run(range.clone(), |run, scale| {
                    let out = &mut out[(run.start - first) * 2..(run.end - first) * 2];
                    match scale.is_nan() {
                        false => simd::widen_e4m3(isa, &src.bytes[run], out, scale, dst_dtype),
                        true => cast_fp8_by_table(src, run, format, out, dst_dtype),
                    }
                })
            }
            // Elsewhere table lookups beat decoding the codes (which vectorised is a gather or
            // arithmetic).
            Float::Fp8(format) if src.fp8_by_table() => {
                cast_fp8_by_table(src, range, format, out, dst_dtype)
            }
            // Where the kernels have no F16C (other architectures, whose own f16 instructions
            // half uses), half's slice conversions do aligned f16 <-> f32; with it, the kernels'
            // F16C measured as fast.
            Float::F16 | Float::F32
                if !isa.f16c() && half_in_place(src, range.clone(), out, dst_dtype) => {}
            _ => match simd::Narrowing::of(src.dtype, dst_dtype) {
                Some(narrowing) => {
                    let size = src.dtype.size();
                    let bytes = &src.bytes[range.start * size..range.end * size];
                    simd::narrow(isa, bytes, out, narrowing)
                }
                None => simd::cast(isa, src, range, out, dst_dtype),
            },
        }
        out.len()
    });
}

/// Converts elements `range` of an f16 source to f32, or of an f32 source to f16, with `half`'s
/// slice conversions if both sides are aligned; returns whether it did.
fn half_in_place(src: &Source, range: Range<usize>, dst: &mut [u8], dst_dtype: Float) -> bool {
    let bytes = &src.bytes[range.start * src.dtype.size()..range.end * src.dtype.size()];
    match (src.dtype, dst_dtype) {
        (Float::F16, Float::F32) => match (as_aligned::<f16>(bytes), as_aligned_mut::<f32>(dst)) {
            (Some(halves), Some(floats)) => halves.convert_to_f32_slice(floats),
            _ => return false,
        },
        (Float::F32, Float::F16) => match (as_aligned::<f32>(bytes), as_aligned_mut::<f16>(dst)) {
            (Some(floats), Some(halves)) => halves.convert_from_f32_slice(floats),
            _ => return false,
        },
        _ => return false,
    }
    true
}

/// [`quantize`] by the block kernels: one group is split across threads by element ranges
/// (absmax, then encode), several are split by groups.
fn quantize_blocks(
    src: &Source,
    groups: usize,
    dst: &mut [u8],
    format: &Fp8Format,
    isa: Isa,
    engine: Engine,
) -> Result<Vec<f32>> {
    let threads = engine.threads;
    let numel = src.numel();
    let group_len = numel.checked_div(groups).unwrap_or(0);
    let mut scales = Vec::new();
    scales
        .try_reserve_exact(groups)
        .map_err(|_| Error::out_of_memory(format!("no memory for {groups} scales")))?;
    scales.resize(groups, 0.0);
    let bytes = src.bytes.len().max(dst.len());
    if groups == 1 {
        let parts = part_count(engine, numel, bytes);
        let per_part = numel.div_ceil(parts).max(1);
        let part_absmax = Mutex::new(0.0f32);
        let ranges: Vec<_> = (0..numel)
            .step_by(per_part)
            .map(|start| start..(start + per_part).min(numel))
            .collect();
        let size = src.dtype.size();
        run_parts(threads, "absmax", ranges, |range| {
            let read = range.len() * size;
            let absmax = simd::absmax(isa, src, range);
            let mut largest = part_absmax.lock().unwrap_or_else(|p| p.into_inner());
            *largest = largest.max(absmax);
            read
        });
        let scale = scale_for(part_absmax.into_inner().unwrap_or(0.0), format);
        let pieces: Vec<_> = dst
            .chunks_mut(per_part)
            .enumerate()
            .map(|(index, out)| (index * per_part, out))
            .collect();
        let division = ScaleDivision::new(scale, isa);
        run_parts(threads, "quantize", pieces, |(start, out)| {
            let range = start..start + out.len();
            simd::quantize(isa, src, range, out, format, division, false);
            out.len()
        });
        scales[0] = scale;
        return Ok(scales);
    }
    let parts = part_count(engine, groups, bytes);
    let groups_per_part = groups.div_ceil(parts).max(1);
    // An empty tensor may claim any number of rows: its parts have no bytes but still scales.
    let mut dst_parts: Vec<&mut [u8]> = if group_len == 0 {
        Vec::new()
    } else {
        dst.chunks_mut(groups_per_part * group_len).collect()
    };
    dst_parts.resize_with(groups.div_ceil(groups_per_part), Default::default);
    let pieces: Vec<_> = scales
        .chunks_mut(groups_per_part)
        .zip(dst_parts)
        .enumerate()
        .map(|(index, (scales, out))| (index * groups_per_part, scales, out))
        .collect();
    run_parts(
        threads,
        "quantize rows",
        pieces,
        |(first_group, scales, out)| {
            let part_groups = scales.len();
            for (index, scale) in scales.iter_mut().enumerate() {
                let start = (first_group + index) * group_len;
                let range = start..start + group_len;
                *scale = scale_for(simd::absmax(isa, src, range.clone()), format);
                let out = &mut out[index * group_len..(index + 1) * group_len];
                // Fetching the next row pays while it stays cached until its absmax pass.
                let prefetch_next = index + 1 < part_groups
                    && group_len * src.dtype.size() <= PREFETCH_MAX_ROW_BYTES;
                let division = ScaleDivision::new(*scale, isa);
                simd::quantize(isa, src, range, out, format, division, prefetch_next);
            }
            out.len()
        },
    );
    Ok(scales)
}

/// Largest row whose bytes quantization fetches ahead (see `simd::prefetch`): a quarter of a
/// typical 1-2 MiB L2 cache, so that the row is still there when its absmax pass reads it.
const PREFETCH_MAX_ROW_BYTES: usize = 256 << 10;

/// The scale that maps `absmax` onto the format's largest value; 1.0 where that is 0 (see
/// [`convert`]).
fn scale_for(absmax: f32, format: &Fp8Format) -> f32 {
    let scale = absmax / format.max_value();
    if scale > 0.0 {
        scale
    } else {
        1.0
    }
}

/// A float dtype, with the fp8 format resolved so that the loops below match exhaustively.
#[derive(Clone, Copy)]
enum Float {
    F32,
    F16,
    BF16,
    Fp8(&'static Fp8Format),
    F64,
}

impl Float {
    fn of(dtype: DType) -> Option<Float> {
        match dtype {
            DType::F32 => Some(Float::F32),
            DType::F16 => Some(Float::F16),
            DType::BF16 => Some(Float::BF16),
            DType::F64 => Some(Float::F64),
            _ => fp8::format_of(dtype).map(Float::Fp8),
        }
    }

    fn size(self) -> usize {
        match self {
            Float::F64 => 8,
            Float::F32 => 4,
            Float::F16 | Float::BF16 => 2,
            Float::Fp8(_) => 1,
        }
    }
}

/// The validated source: `scales` has 0, 1 or one-per-row entries (rows of `row_len` elements).
struct Source<'a> {
    bytes: &'a [u8],
    dtype: Float,
    scales: &'a [f32],
    row_len: usize,
}

/// Stack space for one chunk on its way through f32. Bytes are first copied into typed buffers
/// (any alignment is allowed, and these copies vectorise), so that the conversions themselves run
/// over typed slices, which LLVM vectorises where it does not over byte chunks.
struct Scratch {
    values: [f32; CHUNK],
    halves: [u16; CHUNK],
}

impl Scratch {
    fn new() -> Self {
        Scratch {
            values: [0.0; CHUNK],
            halves: [0; CHUNK],
        }
    }
}

/// Below this many elements per row, building a 256-entry table for each row's scale costs more
/// than it saves, and per-channel fp8 goes through f32 instead.
const MIN_ROW_LEN_FOR_TABLES: usize = 1024;

impl Source<'_> {
    fn numel(&self) -> usize {
        self.bytes.len() / self.dtype.size()
    }

    /// Whether an fp8 source casts faster by a 256-entry table per scale than element by element.
    fn fp8_by_table(&self) -> bool {
        self.scales.len() <= 1 || self.row_len >= MIN_ROW_LEN_FOR_TABLES
    }

    /// Calls `visit` with each piece of `range` whose elements share one scale (1.0 for
    /// unscaled data): all of it, or its part in each row.
    fn for_each_scale_run(&self, range: Range<usize>, mut visit: impl FnMut(Range<usize>, f32)) {
        match self.scales {
            [] => visit(range, 1.0),
            &[scale] => visit(range, scale),
            row_scales => {
                let mut start = range.start;
                while start < range.end {
                    let row = start / self.row_len;
                    let end = ((row + 1) * self.row_len).min(range.end);
                    visit(start..end, row_scales[row]);
                    start = end;
                }
            }
        }
    }

    /// Writes elements `start..start + out.len()` as f32 into `out`, dequantized; an f64 source
    /// is rounded to f32. `halves` must be at least as long as `out`.
    fn decode(&self, start: usize, out: &mut [f32], halves: &mut [u16]) {
        let size = self.dtype.size();
        let bytes = &self.bytes[start * size..(start + out.len()) * size];
        let halves = &mut halves[..out.len()];
        match self.dtype {
            Float::F32 => read_elements(bytes, out, f32::from_le_bytes),
            Float::F64 => read_elements(bytes, out, |le| f64::from_le_bytes(le) as f32),
            Float::F16 => {
                read_elements(bytes, halves, u16::from_le_bytes);
                halves.reinterpret_cast::<f16>().convert_to_f32_slice(out);
            }
            Float::BF16 => {
                read_elements(bytes, halves, u16::from_le_bytes);
                for (value, &bits) in out.iter_mut().zip(halves.iter()) {
                    *value = bf16_bits_to_f32(bits);
                }
            }
            Float::Fp8(format) => {
                // Times 1.0 for unscaled data, which changes no value (the table's NaNs are quiet).
                self.for_each_scale_run(start..start + out.len(), |run, scale| {
                    let codes = &bytes[run.start - start..run.end - start];
                    let out = &mut out[run.start - start..run.end - start];
                    for (value, &code) in out.iter_mut().zip(codes) {
                        *value = f32::from_bits(format.to_f32_bits[code as usize]) * scale;
                    }
                });
            }
        }
    }
}

/// Writes `values` into `out` as `dtype`, rounding to nearest even. `halves` must be at least as
/// long as `values`.
fn encode(values: &[f32], dtype: Float, out: &mut [u8], halves: &mut [u16]) {
    let halves = &mut halves[..values.len()];
    match dtype {
        Float::F32 => write_elements(values, out, f32::to_le_bytes),
        Float::F64 => write_elements(values, out, |value| (value as f64).to_le_bytes()),
        Float::F16 => {
            halves
                .reinterpret_cast_mut::<f16>()
                .convert_from_f32_slice(values);
            write_elements(halves, out, u16::to_le_bytes);
        }
        Float::BF16 => {
            for (bits, &value) in halves.iter_mut().zip(values) {
                *bits = f32_to_bf16_bits(value);
            }
            write_elements(halves, out, u16::to_le_bytes);
        }
        Float::Fp8(format) => {
            for (code, &value) in out.iter_mut().zip(values) {
                *code = format.encode_f32(value);
            }
        }
    }
}

/// A plain cast (no quantization of the destination).
fn cast(src: &Source, dst: &mut [u8], dst_dtype: Float) {
    match src.dtype {
        Float::F64 => cast_from_f64(src.bytes, dst, dst_dtype),
        Float::Fp8(format) if src.fp8_by_table() => {
            cast_fp8_by_table(src, 0..src.numel(), format, dst, dst_dtype)
        }
        Float::F16 if matches!(dst_dtype, Float::F32) => {
            match (as_aligned::<f16>(src.bytes), as_aligned_mut::<f32>(dst)) {
                (Some(halves), Some(floats)) => halves.convert_to_f32_slice(floats),
                _ => cast_through_f32(src, dst, dst_dtype),
            }
        }
        Float::F32 if matches!(dst_dtype, Float::F16) => {
            match (as_aligned::<f32>(src.bytes), as_aligned_mut::<f16>(dst)) {
                (Some(floats), Some(halves)) => halves.convert_from_f32_slice(floats),
                _ => cast_through_f32(src, dst, dst_dtype),
            }
        }
        // The pairs that are one bit operation per element skip the f32 buffer.
        Float::BF16 if matches!(dst_dtype, Float::F32) => map_elements(src.bytes, dst, |le| {
            bf16_bits_to_f32(u16::from_le_bytes(le)).to_le_bytes()
        }),
        Float::F32 if matches!(dst_dtype, Float::BF16) => map_elements(src.bytes, dst, |le| {
            f32_to_bf16_bits(f32::from_le_bytes(le)).to_le_bytes()
        }),
        _ => cast_through_f32(src, dst, dst_dtype),
    }
}

fn cast_through_f32(src: &Source, dst: &mut [u8], dst_dtype: Float) {
    let mut scratch = Scratch::new();
    let out_size = dst_dtype.size();
    for start in (0..src.numel()).step_by(CHUNK) {
        let values = &mut scratch.values[..CHUNK.min(src.numel() - start)];
        src.decode(start, values, &mut scratch.halves);
        let out = &mut dst[start * out_size..(start + values.len()) * out_size];
        encode(values, dst_dtype, out, &mut scratch.halves);
    }
}

/// fp8 has only 256 values: convert each once per scale, then look every element of `range` up
/// (`dst` holds exactly those elements).
fn cast_fp8_by_table(
    src: &Source,
    range: Range<usize>,
    format: &Fp8Format,
    dst: &mut [u8],
    dst_dtype: Float,
) {
    match dst_dtype.size() {
        1 => cast_fp8_by_table_into::<1>(src, range, format, dst, dst_dtype),
        2 => cast_fp8_by_table_into::<2>(src, range, format, dst, dst_dtype),
        4 => cast_fp8_by_table_into::<4>(src, range, format, dst, dst_dtype),
        _ => cast_fp8_by_table_into::<8>(src, range, format, dst, dst_dtype),
    }
}

/// [`cast_fp8_by_table`] into `N`-byte outputs.
fn cast_fp8_by_table_into<const N: usize>(
    src: &Source,
    range: Range<usize>,
    format: &Fp8Format,
    dst: &mut [u8],
    dst_dtype: Float,
) {
    let first = range.start;
    src.for_each_scale_run(range, |run, scale| {
        let mut values = [0.0f32; 256];
        for (value, &bits) in values.iter_mut().zip(&format.to_f32_bits) {
            *value = f32::from_bits(bits) * scale;
        }
        let mut table = [[0u8; N]; 256];
        encode(&values, dst_dtype, table.as_flattened_mut(), &mut [0; 256]);
        look_up(
            &src.bytes[run.clone()],
            &table,
            &mut dst[(run.start - first) * N..(run.end - first) * N],
        );
    });
}

/// `dst[i] = table[codes[i]]`, `N` bytes per entry.
fn look_up<const N: usize>(codes: &[u8], table: &[[u8; N]; 256], dst: &mut [u8]) {
    // Entries are gathered into 8-byte words: one store per word rather than one per element,
    // which is what limits a plain loop (about 1.2x faster for 2-byte entries).
    const WORD: usize = 8;
    let per_word = (WORD / N).max(1);
    let mut dst_words = dst.chunks_exact_mut(per_word * N);
    let mut code_groups = codes.chunks_exact(per_word);
    for (out, codes) in (&mut dst_words).zip(&mut code_groups) {
        let mut word = [0u8; WORD];
        for (i, &code) in codes.iter().enumerate() {
            word[i * N..(i + 1) * N].copy_from_slice(&table[code as usize]);
        }
        out.copy_from_slice(&word[..per_word * N]);
    }
    let tail = dst_words.into_remainder().chunks_exact_mut(N);
    for (out, &code) in tail.zip(code_groups.remainder()) {
        out.copy_from_slice(&table[code as usize]);
    }
}

/// Every cast from f64 rounds straight from the f64 value.
#[inline(always)]
fn cast_from_f64(bytes: &[u8], dst: &mut [u8], dst_dtype: Float) {
    match dst_dtype {
        Float::F64 => dst.copy_from_slice(bytes),
        Float::F32 => map_elements(bytes, dst, |le| {
            (f64::from_le_bytes(le) as f32).to_le_bytes()
        }),
        Float::F16 => map_elements(bytes, dst, |le| {
            f64_to_f16_bits(f64::from_le_bytes(le)).to_le_bytes()
        }),
        Float::BF16 => map_elements(bytes, dst, |le| {
            f64_to_bf16_bits(f64::from_le_bytes(le)).to_le_bytes()
        }),
        Float::Fp8(format) => {
            map_elements(bytes, dst, |le| [format.encode_f64(f64::from_le_bytes(le))])
        }
    }
}

/// Absmax-scales each of `groups` equal groups into fp8 (see [`convert`]); returns their scales.
fn quantize(src: &Source, groups: usize, dst: &mut [u8], format: &Fp8Format) -> Result<Vec<f32>> {
    let group_len = src.numel().checked_div(groups).unwrap_or(0);
    let mut scales = Vec::new();
    // An empty tensor may claim any number of rows, each of which gets a scale.
    scales
        .try_reserve_exact(groups)
        .map_err(|_| Error::out_of_memory(format!("no memory for {groups} scales")))?;
    let mut scratch = Scratch::new();
    for group in 0..groups {
        let group_start = group * group_len;
        let chunk_starts = (group_start..group_start + group_len).step_by(CHUNK);
        let chunk_len = |start: usize| CHUNK.min(group_start + group_len - start);

        let mut absmax = 0.0f32;
        for start in chunk_starts.clone() {
            let values = &mut scratch.values[..chunk_len(start)];
            src.decode(start, values, &mut scratch.halves);
            absmax = absmax.max(finite_absmax(values));
        }
        let scale = scale_for(absmax, format);

        for start in chunk_starts {
            let values = &mut scratch.values[..chunk_len(start)];
            src.decode(start, values, &mut scratch.halves);
            let out = &mut dst[start..start + values.len()];
            write_elements(values, out, |value| [format.encode_f32(value / scale)]);
        }
        scales.push(scale);
    }
    Ok(scales)
}

/// The largest magnitude among the finite `values` (0 if there are none).
fn finite_absmax(values: &[f32]) -> f32 {
    // Finite magnitudes order like their bit patterns, and these fit in i32: an i32 max reduction
    // vectorises (SSE2 has a signed compare), where a float one with NaN rules does not.
    let largest = values
        .iter()
        .map(|value| {
            let magnitude = (value.to_bits() & 0x7FFF_FFFF) as i32;
            if magnitude < f32::INFINITY.to_bits() as i32 {
                magnitude
            } else {
                0
            }
        })
        .max()
        .unwrap_or(0);
    f32::from_bits(largest as u32)
}

/// Element types that any bit pattern of the right size is a valid value of.
///
/// # Safety
/// Implement only for such types.
unsafe trait PlainBits: Copy {}
// SAFETY: f16 is a u16 wrapper, and every u16 is an f16 value (some of them NaN).
unsafe impl PlainBits for f16 {}
// SAFETY: every u32 bit pattern is an f32 value (some of them NaN).
unsafe impl PlainBits for f32 {}

/// `bytes` as a slice of `T`, if it is aligned for `T` and this host is little-endian (the
/// layout safetensors uses). This lets `half` run its F16C conversions in place, about 1.7x the
/// speed of copying through aligned buffers.
fn as_aligned<T: PlainBits>(bytes: &[u8]) -> Option<&[T]> {
    // SAFETY: every bit pattern is a valid `T` (PlainBits), and `align_to` only puts whole,
    // aligned `T`s in the middle part.
    let (head, middle, tail) = unsafe { bytes.align_to::<T>() };
    (cfg!(target_endian = "little") && head.is_empty() && tail.is_empty()).then_some(middle)
}

/// [`as_aligned`] for a destination.
fn as_aligned_mut<T: PlainBits>(bytes: &mut [u8]) -> Option<&mut [T]> {
    // SAFETY: as in `as_aligned`; also, any value written through the result is valid bytes.
    let (head, middle, tail) = unsafe { bytes.align_to_mut::<T>() };
    (cfg!(target_endian = "little") && head.is_empty() && tail.is_empty()).then_some(middle)
}

/// `dst[i] = convert(src[i])` over `IN`-byte source and `OUT`-byte destination elements.
#[inline(always)]
fn map_elements<const IN: usize, const OUT: usize>(
    src: &[u8],
    dst: &mut [u8],
    convert: impl Fn([u8; IN]) -> [u8; OUT],
) {
    for (src, dst) in src.chunks_exact(IN).zip(dst.chunks_exact_mut(OUT)) {
        dst.copy_from_slice(&convert(src.try_into().unwrap()));
    }
}

/// `out[i] = read(src[i])` over `IN`-byte source elements.
#[inline(always)]
fn read_elements<T, const IN: usize>(src: &[u8], out: &mut [T], read: impl Fn([u8; IN]) -> T) {
    for (src, out) in src.chunks_exact(IN).zip(out) {
        *out = read(src.try_into().unwrap());
    }
}

/// `dst[i] = write(values[i])` into `OUT`-byte destination elements.
#[inline(always)]
fn write_elements<T: Copy, const OUT: usize>(
    values: &[T],
    dst: &mut [u8],
    write: impl Fn(T) -> [u8; OUT],
) {
    for (&value, dst) in values.iter().zip(dst.chunks_exact_mut(OUT)) {
        dst.copy_from_slice(&write(value));
    }
}
