//! The CUDA conversion kernels (kernels/convert.cu and kernels/convert_elem.cuh), checked without a
//! GPU:
//! - kernels/convert.ptx, the PTX the library ships, was generated from the current sources (it
//!   records their sha256), loads on the drivers strata supports (PTX ISA ≤ 7.8, sm_70), has every
//!   entry point with the 64-bit parameters the CUDA backend passes, and keeps f32 arithmetic
//!   exact (no fma, no approximate division, no flushing of subnormals);
//! - the same kernels compiled as host C++ (tests/kernel_host_check.cpp calls each entry point
//!   once per thread of an emulated grid, so the grid-stride loop and the element → scale mapping
//!   run too) write, byte for byte, what `strata::convert::convert` writes: over every f16, bf16
//!   and fp8 code (unscaled, and scaled per tensor and per channel by tiny, subnormal, huge and
//!   negative scales) and about 4.5 million f32 patterns (every rounding tie of f16 and bf16 and
//!   its neighbours, zeros, subnormals, overflow, infinities, NaNs with assorted payloads, random);
//! - the plain casts into fp8 over the same inputs (with every fp8 tie and its neighbours), and
//!   the absmax quantization (clear, absmax, scales, quantize, as the backend launches them) into
//!   both fp8 formats, per tensor and per row, data and scales byte for byte: every bf16 and f16
//!   code in rows of 256, 16 and 1 elements, f32 rows built on fp8 ties under exact power-of-two
//!   scales, random rows, rows of zeros, rows with a NaN, rows of only NaNs and infinities, rows
//!   of subnormals whose scale underflows, and fp8 sources unscaled and scaled, requantized.
//!
//! Needs `sha256sum` (or `shasum`) and a C++ compiler (`c++`, `g++` or `clang++`); a missing tool
//! skips its test with a "SKIPPED:" line. Regenerate the PTX with scripts/gen-ptx.sh.

mod common;
use common::programs::{assert_ok, compile, cxx_compiler, manifest_dir, run, BuildDir, CXX_FLAGS};
use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::process::{Command, Stdio};
use strata::convert::{convert, Quant, TensorBytes};
use strata::dtype::DType;

/// The sources the PTX is generated from, hashed in this order by scripts/gen-ptx.sh.
const KERNEL_SOURCES: [&str; 2] = ["kernels/convert.cu", "kernels/convert_elem.cuh"];
const PTX: &str = "kernels/convert.ptx";
const HASH_LINE: &str = "// strata kernels source sha256: ";

const SOURCES: [DType; 5] = [
    DType::F32,
    DType::F16,
    DType::BF16,
    DType::F8E4M3,
    DType::F8E5M2,
];
const DESTINATIONS: [DType; 5] = [
    DType::F32,
    DType::F16,
    DType::BF16,
    DType::F8E4M3,
    DType::F8E5M2,
];
const FP8: [DType; 2] = [DType::F8E4M3, DType::F8E5M2];

/// The launcher's block size (src/backend/cuda/driver.rs).
const BLOCK: u64 = 256;

/// Says why a test did not run, past the test harness's output capture.
fn skipped(why: &str) {
    common::skip(&format!("SKIPPED: {why}"));
}

fn kernel_dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::F8E4M3 => "f8e4m3",
        DType::F8E5M2 => "f8e5m2",
        other => panic!("no kernel converts {other:?}"),
    }
}

fn kernel_name(src: DType, dst: DType) -> String {
    format!(
        "strata_convert_{}_to_{}",
        kernel_dtype_name(src),
        kernel_dtype_name(dst)
    )
}

/// Whether a plain conversion kernel converts `src` into `dst`: each source into each other
/// dtype, and fp8 into the same fp8 (a scaled source cast without its scales).
fn converts(src: DType, dst: DType) -> bool {
    src != dst || dst.is_fp8()
}

/// Every kernel the CUDA backend looks up, with how many 64-bit parameters each takes.
fn kernels() -> Vec<(String, usize)> {
    let mut kernels = vec![("strata_absmax_clear".to_string(), 2)];
    for src in SOURCES {
        for dst in DESTINATIONS.into_iter().filter(|&d| converts(src, d)) {
            kernels.push((kernel_name(src, dst), 5));
        }
        kernels.push((format!("strata_absmax_{}", kernel_dtype_name(src)), 6));
        for dst in FP8 {
            let (from, to) = (kernel_dtype_name(src), kernel_dtype_name(dst));
            kernels.push((format!("strata_quantize_{from}_to_{to}"), 7));
        }
    }
    for dst in FP8 {
        kernels.push((format!("strata_scales_{}", kernel_dtype_name(dst)), 2));
    }
    kernels.sort();
    kernels
}

// ---------------------------------------------------------------------------------------------
// The PTX
// ---------------------------------------------------------------------------------------------

/// The sha256 of the kernel sources, in hex, from `sha256sum` or `shasum -a 256`; None if
/// neither runs.
fn sources_sha256() -> Option<String> {
    let mut bytes = Vec::new();
    for source in KERNEL_SOURCES {
        let path = manifest_dir().join(source);
        bytes.extend(fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display())));
    }
    let tools: [&[&str]; 2] = [&["sha256sum"], &["shasum", "-a", "256"]];
    for tool in tools {
        let Ok(mut child) = Command::new(tool[0])
            .args(&tool[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
        else {
            continue;
        };
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let input = bytes.clone();
        let writer = std::thread::spawn(move || stdin.write_all(&input));
        let output = child.wait_with_output().expect("waiting for the hash tool");
        writer
            .join()
            .expect("the writer thread panicked")
            .expect("writing to the hash tool");
        let text = String::from_utf8_lossy(&output.stdout);
        let hash = text.split_whitespace().next().unwrap_or("");
        if output.status.success()
            && hash.len() == 64
            && hash.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Some(hash.to_ascii_lowercase());
        }
    }
    None
}

fn read_ptx() -> String {
    let path = manifest_dir().join(PTX);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The value after `directive` at the start of a line, e.g. "6.0" for ".version".
fn directive<'a>(ptx: &'a str, directive: &str) -> &'a str {
    ptx.lines()
        .find_map(|line| line.trim().strip_prefix(directive))
        .map(str::trim)
        .unwrap_or_else(|| panic!("{PTX} has no {directive} line"))
}

#[test]
fn ptx_is_generated_from_the_current_sources() {
    let ptx = read_ptx();
    let recorded = ptx
        .lines()
        .next()
        .and_then(|line| line.strip_prefix(HASH_LINE))
        .map(str::trim)
        .unwrap_or_else(|| {
            panic!("{PTX} does not start with \"{HASH_LINE}<hex>\": run scripts/gen-ptx.sh")
        });
    let Some(current) = sources_sha256() else {
        skipped("the PTX source hash check: neither sha256sum nor shasum runs here");
        return;
    };
    assert_eq!(
        recorded,
        current,
        "{PTX} is stale (it records sources with sha256 {recorded}; {} hash to {current}): \
         run scripts/gen-ptx.sh and commit the result",
        KERNEL_SOURCES.join(" + ")
    );
}

#[test]
fn ptx_loads_on_supported_drivers_and_has_every_kernel() {
    let ptx = read_ptx();

    let version = directive(&ptx, ".version");
    let (major, minor) = version
        .split_once('.')
        .and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)))
        .unwrap_or_else(|| panic!("{PTX}: unreadable .version {version:?}"));
    assert!(
        (major, minor) <= (7, 8),
        "{PTX} is PTX ISA {version}: drivers of CUDA 11.8 load at most 7.8 (generate it with \
         clang, as scripts/gen-ptx.sh does)"
    );
    let target = directive(&ptx, ".target");
    let sm = target
        .strip_prefix("sm_")
        .and_then(|n| n.parse::<u32>().ok())
        .unwrap_or_else(|| panic!("{PTX}: unexpected .target {target:?}"));
    assert!(
        sm <= 70,
        "{PTX} targets {target}: PTX for sm_70 JIT-compiles on every GPU from Volta on, later \
         targets do not load on Volta"
    );
    assert_eq!(
        directive(&ptx, ".address_size"),
        "64",
        "{PTX}: 64-bit addresses"
    );

    // Entry points and their parameters: `.visible .entry NAME(` then one `.param` line each.
    let mut entries: Vec<(String, Vec<String>)> = Vec::new();
    let mut lines = ptx.lines().map(str::trim);
    while let Some(line) = lines.next() {
        let Some(rest) = line.strip_prefix(".visible .entry ") else {
            continue;
        };
        let name = rest.trim_end_matches('(').trim().to_string();
        let params = lines
            .by_ref()
            .take_while(|l| !l.starts_with(')'))
            .map(|l| l.trim_end_matches(',').to_string())
            .collect();
        entries.push((name, params));
    }
    let mut found: Vec<(String, usize)> = entries
        .iter()
        .map(|(n, params)| (n.clone(), params.len()))
        .collect();
    found.sort();
    assert_eq!(
        found,
        kernels(),
        "{PTX}: the kernels the CUDA backend launches, and their parameter counts"
    );
    for (name, params) in &entries {
        let expected: Vec<String> = (0..params.len())
            .map(|i| format!(".param .u64 {name}_param_{i}"))
            .collect();
        assert_eq!(
            params, &expected,
            "{PTX}: {name} must take only 64-bit parameters (pointers and counts)"
        );
    }

    // Float arithmetic exactly as written: every f32/f64 add, sub and mul rounds on its own
    // (.rn, which ptxas never fuses into an fma), and nothing flushes subnormals.
    for line in ptx.lines().map(str::trim) {
        let instruction = line.split_whitespace().next().unwrap_or("");
        assert!(
            !instruction.contains(".ftz") && !instruction.starts_with("fma."),
            "{PTX}: `{line}` flushes subnormals or fuses a multiply-add"
        );
        let float_op = ["add.", "sub.", "mul.", "mad.", "div."]
            .iter()
            .any(|op| instruction.starts_with(op))
            && (instruction.ends_with(".f32") || instruction.ends_with(".f64"));
        assert!(
            !float_op || instruction.contains(".rn"),
            "{PTX}: `{line}` has no explicit rounding, so ptxas may fuse it or divide \
             approximately (build with -ffp-contract=off, without fast-math)"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The kernels as host C++ against strata::convert::convert
// ---------------------------------------------------------------------------------------------

/// xorshift64*: reproducible inputs without a dependency.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }
}

/// One launch: a source tensor (with its scales, one per `rows` or one for all) converted to
/// `dst` over a grid of `blocks` × `threads`.
struct Job {
    label: String,
    src: DType,
    dst: DType,
    bytes: Vec<u8>,
    scales: Vec<f32>,
    rows: usize,
    /// Quant::None: a plain conversion kernel. Else the absmax quantization's four launches.
    quant: Quant,
    blocks: u64,
    threads: u64,
}

impl Job {
    fn numel(&self) -> usize {
        self.bytes.len() / self.src.size()
    }

    /// The quantization's groups: one per tensor, or one per row.
    fn groups(&self) -> usize {
        match self.quant {
            Quant::PerChannel => self.rows,
            _ => 1,
        }
    }

    /// The row_len the CUDA backend passes: numel / scale count.
    fn row_len(&self) -> u64 {
        self.numel() as u64 / self.scales.len().max(1) as u64
    }
}

/// The grid the CUDA backend launches for `numel` elements (src/backend/cuda/driver.rs).
fn launcher_grid(numel: usize) -> (u64, u64) {
    ((numel as u64).div_ceil(BLOCK).clamp(1, 65535), BLOCK)
}

/// Grids much smaller than the data, with odd strides, so that every thread loops and the
/// element → row mapping advances by steps that are not whole rows.
const SMALL_GRIDS: [(u64, u64); 3] = [(3, 32), (7, 13), (1, 1)];

fn f32_bytes(values: impl IntoIterator<Item = u32>) -> Vec<u8> {
    values.into_iter().flat_map(u32::to_le_bytes).collect()
}

fn u16_bytes(values: impl IntoIterator<Item = u16>) -> Vec<u8> {
    values.into_iter().flat_map(u16::to_le_bytes).collect()
}

/// f32 bit patterns that exercise rounding into f16 and bf16, from every exponent class.
fn f32_patterns() -> Vec<u32> {
    let mut patterns: Vec<u32> = Vec::new();

    // Every f16 value, every midpoint between neighbours (ties), and one ulp either side. The
    // midpoints above the largest finite f16 (65504) lead to 65520, the overflow threshold.
    let f16_value = |code: u16| half::f16::from_bits(code).to_f64();
    for code in 0..0x7C00u16 {
        let low = f16_value(code);
        let high = if code == 0x7BFF {
            65536.0
        } else {
            f16_value(code + 1)
        };
        let mid = ((low + high) / 2.0) as f32; // exact: f32 has room for one more bit
        assert_eq!(f64::from(mid), (low + high) / 2.0);
        for bits in [
            (low as f32).to_bits(),
            mid.to_bits() - 1,
            mid.to_bits(),
            mid.to_bits() + 1,
        ] {
            patterns.extend([bits, bits | 0x8000_0000]);
        }
    }
    // Every bf16 value (bf16 is f32's top half) and the same around its ties.
    for code in 0..0x7F80u32 {
        let tie = (code << 16) | 0x8000;
        for bits in [code << 16, tie - 1, tie, tie + 1, (code << 16) | 0xFFFF] {
            patterns.extend([bits, bits | 0x8000_0000]);
        }
    }
    // Each exponent (subnormals, infinities and NaNs included) with mantissas around the bits
    // f16 and bf16 drop.
    let mantissas = [
        0u32, 1, 0x0FFF, 0x1000, 0x1001, 0x1FFF, 0x2000, 0x3000, 0x7FFF, 0x8000, 0x8001, 0xFFFF,
        0x1_0000, 0x1_8000, 0x3F_FFFF, 0x40_0000, 0x40_0001, 0x40_1000, 0x40_8000, 0x7F_E000,
        0x7F_F000, 0x7F_8000, 0x7F_FFFF, 0x55_5555, 0x2A_AAAA,
    ];
    for exponent in 0..=255u32 {
        for &mantissa in &mantissas {
            let bits = (exponent << 23) | mantissa;
            patterns.extend([bits, bits | 0x8000_0000]);
        }
    }
    // NaNs: signalling and quiet, payloads in the bits f16 and bf16 keep and in those they drop.
    let mut rng = Rng(0x5EED_0F32);
    for _ in 0..4096 {
        let payload = match rng.next_u32() % 4 {
            0 => rng.next_u32() & 0x1FFF,    // only bits f16 drops
            1 => rng.next_u32() & 0xFFFF,    // only bits bf16 drops
            2 => rng.next_u32() & 0x3F_FFFF, // signalling
            _ => rng.next_u32() & 0x7F_FFFF, // anything
        };
        let bits = 0x7F80_0000 | payload.max(1);
        patterns.extend([bits, bits | 0x8000_0000]);
    }
    // Every fp8 value of both formats, every midpoint between neighbours (ties) and one ulp
    // either side, and values beyond the largest finite one (which saturate).
    for format in FP8 {
        for code in 0..0x7Fu8 {
            let low = strata::convert::fp8_to_f32(code, format);
            let high = strata::convert::fp8_to_f32(code + 1, format);
            if !low.is_finite() || !high.is_finite() {
                patterns.extend([low.to_bits(), (low * 1.25).to_bits(), (low * 1.5).to_bits()]);
                continue;
            }
            let mid = (f64::from(low) + f64::from(high)) / 2.0;
            let mid = mid as f32; // exact: fp8 has far fewer bits than f32
            for bits in [
                low.to_bits(),
                mid.to_bits() - 1,
                mid.to_bits(),
                mid.to_bits() + 1,
            ] {
                patterns.extend([bits, bits | 0x8000_0000]);
            }
        }
    }
    // Random: all of f32, and f32 near the f16 range (exponents 100..=144).
    for _ in 0..2_000_000 {
        patterns.push(rng.next_u32());
    }
    for _ in 0..1_000_000 {
        let bits = rng.next_u32();
        let exponent = 100 + (bits >> 23 & 0xFF) % 45;
        patterns.push((bits & 0x807F_FFFF) | exponent << 23);
    }
    patterns
}

/// Scales to dequantize fp8 by: those strata's quantization makes (absmax / 448 or / 57344, 1.0
/// when the absmax is 0), down to the smallest subnormal and up to f32::MAX, some with mantissas
/// that put the scaled values on f16 and bf16 rounding ties, and negative ones.
fn scales() -> Vec<f32> {
    let mut scales = vec![
        1.0,
        0.5,
        2.0,
        3.0,
        1.0 / 448.0,
        1.0 / 57344.0,
        0.1,
        0.0123,
        0.05 / 448.0,
        f32::from_bits(1),
        f32::from_bits(0x0000_0400),
        f32::from_bits(0x007F_FFFF),
        f32::MIN_POSITIVE,
        1e-30,
        2f32.powi(-20),
        2f32.powi(-24),
        2f32.powi(-30),
        3.0 * 2f32.powi(-28),
        f32::MAX / 448.0,
        f32::MAX / 57344.0,
        f32::MAX,
        1e30,
        65504.0 / 448.0,
        65536.0 / 448.0,
        2f32.powi(100),
        1.0 + 2f32.powi(-11),
        1.0 + 2f32.powi(-8),
        1.0 + 3.0 * 2f32.powi(-12),
        1.5 + 2f32.powi(-9),
        f32::from_bits(0x3F80_0FFF),
        -1.0,
        -0.37,
        -f32::MAX / 448.0,
        -f32::from_bits(1),
    ];
    let mut rng = Rng(0x5CA1E5);
    for _ in 0..16 {
        let bits = rng.next_u32() & 0x7FFF_FFFF;
        let exponent = 1 + (bits >> 23) % 254;
        scales.push(f32::from_bits((bits & 0x7F_FFFF) | exponent << 23));
    }
    for _ in 0..6 {
        scales.push(f32::from_bits((rng.next_u32() & 0x7F_FFFF).max(1)));
    }
    scales
}

/// Every job: each input set to each destination, on the launcher's grid and on small ones.
fn jobs() -> Vec<Job> {
    let mut jobs = Vec::new();
    let mut add =
        |label: &str, src: DType, bytes: &[u8], scales: &[f32], rows: usize, all_grids: bool| {
            let numel = bytes.len() / src.size();
            let mut grids = vec![launcher_grid(numel)];
            if all_grids {
                grids.extend(SMALL_GRIDS);
            } else {
                grids.push(SMALL_GRIDS[0]);
            }
            // The same fp8 dtype only from a scaled source (else the host copies the bytes).
            let targets = DESTINATIONS
                .into_iter()
                .filter(|&d| d != src || !scales.is_empty());
            for dst in targets {
                for &(blocks, threads) in &grids {
                    jobs.push(Job {
                        label: format!("{label} -> {dst:?}, grid {blocks}x{threads}"),
                        src,
                        dst,
                        bytes: bytes.to_vec(),
                        scales: scales.to_vec(),
                        rows,
                        quant: Quant::None,
                        blocks,
                        threads,
                    });
                }
            }
        };

    add(
        "every f16 code",
        DType::F16,
        &u16_bytes(0..=u16::MAX),
        &[],
        1,
        false,
    );
    add(
        "every bf16 code",
        DType::BF16,
        &u16_bytes(0..=u16::MAX),
        &[],
        1,
        false,
    );
    let patterns = f32_patterns();
    add(
        "f32 patterns",
        DType::F32,
        &f32_bytes(patterns),
        &[],
        1,
        false,
    );

    let scales = scales();
    let mut rng = Rng(0xF8F8_F8F8);
    for format in [DType::F8E4M3, DType::F8E5M2] {
        let every_code: Vec<u8> = (0..=255).collect();
        add("every fp8 code", format, &every_code, &[], 1, true);
        // Per tensor: every code by each scale.
        for (i, &scale) in scales.iter().enumerate() {
            let grids = i % 8 == 0;
            add(
                &format!("every fp8 code, per-tensor scale {scale:e}"),
                format,
                &every_code,
                &[scale],
                1,
                grids,
            );
        }
        // Per channel: a row per scale, every code in each row. The host converts rows shorter
        // than 1024 elements through f32 and longer ones through a table per row.
        for repeats in [1, 5] {
            let bytes: Vec<u8> = (0..scales.len() * repeats)
                .flat_map(|_| every_code.iter().copied())
                .collect();
            add(
                &format!("per-channel scales, rows of {}", 256 * repeats),
                format,
                &bytes,
                &scales,
                scales.len(),
                true,
            );
        }
        // Per channel with short rows: 1, 3 and 7 elements, random codes and scales.
        for row_len in [1, 3, 7] {
            let rows = 999;
            let bytes: Vec<u8> = (0..rows * row_len).map(|_| rng.next_u32() as u8).collect();
            let row_scales: Vec<f32> = (0..rows)
                .map(|_| scales[rng.next_u32() as usize % scales.len()])
                .collect();
            add(
                &format!("per-channel scales, rows of {row_len}"),
                format,
                &bytes,
                &row_scales,
                rows,
                true,
            );
        }
    }
    add_quant_jobs(&mut jobs);
    jobs
}

/// f32 rows to quantize, for `format`: rows whose absmax is the format's max times a power of
/// two (so the scale is exact and every fp8 tie and its neighbours, scaled, land on ties of
/// x / scale), random rows over all of f32 and over narrow ranges, and the rows that decide the
/// scale's special cases: zeros, a NaN among values, only NaNs and infinities, only subnormals
/// (an absmax whose scale underflows to 0, replaced by 1.0).
fn f32_quant_rows(format: DType, rng: &mut Rng, row_len: usize) -> Vec<Vec<u32>> {
    let max =
        strata::convert::fp8_to_f32(if format == DType::F8E4M3 { 0x7E } else { 0x7B }, format);
    let mut ties = Vec::new();
    for code in 0..0x7Bu8 {
        let low = strata::convert::fp8_to_f32(code, format);
        let high = strata::convert::fp8_to_f32(code + 1, format);
        let mid = ((f64::from(low) + f64::from(high)) / 2.0) as f32;
        ties.extend([
            low.to_bits(),
            mid.to_bits() - 1,
            mid.to_bits(),
            mid.to_bits() + 1,
        ]);
    }
    let mut rows = Vec::new();
    for k in [
        -149i32, -140, -127, -126, -100, -20, -9, -1, 0, 1, 7, 60, 100, 112,
    ] {
        let factor = 2f64.powi(k);
        let scaled = |bits: u32| (f64::from(f32::from_bits(bits)) * factor) as f32;
        let mut row: Vec<u32> = vec![scaled(max.to_bits()).to_bits()];
        let mut i = 0;
        while row.len() < row_len {
            let bits = scaled(ties[i % ties.len()]).to_bits();
            row.push(if i % 2 == 1 { bits | 0x8000_0000 } else { bits });
            i += 1;
        }
        rows.push(row);
    }
    for _ in 0..48 {
        rows.push((0..row_len).map(|_| rng.next_u32()).collect());
    }
    for _ in 0..48 {
        let exponent = 1 + rng.next_u32() % 250;
        rows.push(
            (0..row_len)
                .map(|_| {
                    let bits = rng.next_u32();
                    let e = (exponent + (bits >> 23 & 0xFF) % 5).min(254);
                    (bits & 0x807F_FFFF) | e << 23
                })
                .collect(),
        );
    }
    let specials: [&[u32]; 7] = [
        &[0, 0x8000_0000],
        &[0x7FC0_0000, 0x3F80_0000, 0xC2F6_E979, 0x0000_0001],
        &[0xFFC0_0001, 0x7F80_0001, 0x7F80_0000, 0xFF80_0000],
        &[0x0000_0001, 0x8000_0001, 0, 0x0000_0002],
        &[0x007F_FFFF, 0x0000_0400, 0x8040_0000],
        &[0x7F80_0000, 0xFF80_0000, 0x7F7F_FFFF],
        &[0x7FBF_FFFF, 0x4000_0000, 0xBFC0_0000, 0x3F00_0001],
    ];
    for special in specials {
        rows.push((0..row_len).map(|i| special[i % special.len()]).collect());
    }
    rows
}

/// The quantization jobs: each source into each fp8 format, per tensor and per row.
fn add_quant_jobs(jobs: &mut Vec<Job>) {
    let mut push = |label: &str,
                    src: DType,
                    dst: DType,
                    bytes: &[u8],
                    scales: &[f32],
                    rows: usize,
                    all_grids: bool| {
        let numel = bytes.len() / src.size();
        let mut grids = vec![launcher_grid(numel), SMALL_GRIDS[0]];
        if all_grids {
            grids.extend(&SMALL_GRIDS[1..]);
        }
        for quant in [Quant::PerTensor, Quant::PerChannel] {
            let src_quant = match scales.len() {
                0 => Quant::None,
                1 => Quant::PerTensor,
                _ => Quant::PerChannel,
            };
            let copied =
                src == dst && (src_quant == quant || (rows == 1 && src_quant != Quant::None));
            if copied {
                continue; // the same dtype and granularity: a byte copy, no kernel
            }
            for &(blocks, threads) in &grids {
                jobs.push(Job {
                    label: format!("{label} -> {dst:?} {quant:?}, grid {blocks}x{threads}"),
                    src,
                    dst,
                    bytes: bytes.to_vec(),
                    scales: scales.to_vec(),
                    rows,
                    quant,
                    blocks,
                    threads,
                });
            }
        }
    };
    let mut rng = Rng(0x0A85_3A40);
    for dst in FP8 {
        for (src, name) in [(DType::BF16, "bf16"), (DType::F16, "f16")] {
            let every = u16_bytes(0..=u16::MAX);
            // Rows of 256 consecutive codes (one exponent range each, NaNs and infinities in
            // their own rows), of 16, and of 1 (every value its own group).
            for rows in [256, 4096, 65536] {
                let all_grids = rows == 256;
                push(
                    &format!("every {name} code, {rows} rows"),
                    src,
                    dst,
                    &every,
                    &[],
                    rows,
                    all_grids,
                );
            }
        }
        for row_len in [1, 7, 256, 1000] {
            let rows = f32_quant_rows(dst, &mut rng, row_len);
            let count = rows.len();
            let bytes = f32_bytes(rows.into_iter().flatten());
            push(
                &format!("f32 rows of {row_len}"),
                DType::F32,
                dst,
                &bytes,
                &[],
                count,
                row_len <= 7,
            );
        }
        // The ties alone, per tensor: one scale, a power of two, for all of them.
        let ties = f32_quant_rows(dst, &mut rng, 512);
        push(
            "f32 fp8 ties, row 0",
            DType::F32,
            dst,
            &f32_bytes(ties[8].iter().copied()),
            &[],
            1,
            true,
        );
        // fp8 sources: unscaled, scaled per tensor and per channel, requantized.
        let scales = scales();
        let every_code: Vec<u8> = (0..=255).collect();
        for src in FP8 {
            push("every fp8 code", src, dst, &every_code, &[], 1, true);
            let bytes: Vec<u8> = (0..scales.len())
                .flat_map(|_| every_code.iter().copied())
                .collect();
            push(
                "every fp8 code, rows",
                src,
                dst,
                &bytes,
                &[],
                scales.len(),
                false,
            );
            let positive: Vec<f32> = scales.iter().map(|s| s.abs()).collect();
            push(
                "every fp8 code, per-channel scales",
                src,
                dst,
                &bytes,
                &positive,
                scales.len(),
                true,
            );
            for &scale in &positive[..8] {
                push(
                    &format!("every fp8 code, per-tensor scale {scale:e}"),
                    src,
                    dst,
                    &bytes,
                    &[scale],
                    scales.len(),
                    false,
                );
            }
        }
    }
}

/// Describes the differences between the kernels' output and the host's, for a failure message.
fn describe_mismatches(job: &Job, expected: &[u8], got: &[u8]) -> Option<String> {
    let (in_size, out_size) = (job.src.size(), job.dst.size());
    let differing: Vec<usize> = (0..job.numel())
        .filter(|&i| {
            expected[i * out_size..(i + 1) * out_size] != got[i * out_size..(i + 1) * out_size]
        })
        .collect();
    if differing.is_empty() {
        return None;
    }
    let hex = |bytes: &[u8]| -> String { bytes.iter().rev().map(|b| format!("{b:02x}")).collect() };
    let mut text = format!(
        "{}: {} of {} elements differ from strata::convert::convert\n",
        job.label,
        differing.len(),
        job.numel()
    );
    let row_len = job.row_len().max(1) as usize;
    for &i in differing.iter().take(12) {
        let scale = match job.scales.len() {
            0 => String::new(),
            _ => {
                let s = job.scales[i / row_len];
                format!(" scale {s:e} (0x{:08x})", s.to_bits())
            }
        };
        let _ = writeln!(
            text,
            "  element {i}: source 0x{}{scale}: host 0x{}, kernel 0x{}",
            hex(&job.bytes[i * in_size..(i + 1) * in_size]),
            hex(&expected[i * out_size..(i + 1) * out_size]),
            hex(&got[i * out_size..(i + 1) * out_size]),
        );
    }
    Some(text)
}

#[test]
fn kernels_match_the_host_conversions_bit_for_bit() {
    let Some(compiler) = cxx_compiler() else {
        skipped("the kernels' host check: no C++ compiler (c++, g++ or clang++) on PATH");
        return;
    };
    let dir = BuildDir::new("kernels");
    let exe = dir.path().join("kernel_host_check");
    let mut cxx = Command::new(compiler);
    cxx.args(CXX_FLAGS)
        // The kernels' typed loads read byte buffers; no fused multiply-adds, as in the PTX.
        .args(["-O2", "-fno-strict-aliasing", "-ffp-contract=off", "-I"])
        .arg(manifest_dir().join("kernels"))
        .arg(manifest_dir().join("tests/kernel_host_check.cpp"))
        .arg("-o")
        .arg(&exe);
    compile(cxx, "tests/kernel_host_check.cpp");

    let jobs = jobs();
    let mut lines = String::new();
    for (n, job) in jobs.iter().enumerate() {
        fs::write(dir.path().join(format!("{n}.src")), &job.bytes).unwrap();
        let scales = if job.scales.is_empty() {
            "-".to_string()
        } else {
            let bytes = f32_bytes(job.scales.iter().map(|s| s.to_bits()));
            fs::write(dir.path().join(format!("{n}.scales")), bytes).unwrap();
            format!("{n}.scales")
        };
        let _ = match job.quant {
            Quant::None => writeln!(
                lines,
                "convert {} {} {} {} {} {n}.src {scales} {n}.dst",
                kernel_name(job.src, job.dst),
                job.numel(),
                job.row_len(),
                job.blocks,
                job.threads,
            ),
            _ => writeln!(
                lines,
                "quantize {} {} {} {} {} {} {n}.src {scales} {n}.dst {n}.dst_scales",
                kernel_dtype_name(job.src),
                kernel_dtype_name(job.dst),
                job.numel(),
                job.groups(),
                job.blocks,
                job.threads,
            ),
        };
    }
    fs::write(dir.path().join("jobs.txt"), lines).unwrap();
    let output = run(&exe, &[std::path::Path::new("jobs.txt")], dir.path());
    assert_ok("kernel_host_check", &output);

    let mut failures = String::new();
    let mut elements = 0;
    let mut quantized = 0;
    for (n, job) in jobs.iter().enumerate() {
        let mut expected = vec![0u8; job.numel() * job.dst.size()];
        let source = TensorBytes {
            bytes: &job.bytes,
            dtype: job.src,
            scales: &job.scales,
        };
        let expected_scales = convert(source, job.rows, &mut expected, job.dst, job.quant)
            .unwrap_or_else(|e| panic!("{}: the host conversion failed: {e:?}", job.label));
        let got = fs::read(dir.path().join(format!("{n}.dst"))).unwrap();
        assert_eq!(got.len(), expected.len(), "{}: output size", job.label);
        if job.quant != Quant::None {
            quantized += job.numel();
            let got_scales: Vec<u32> = fs::read(dir.path().join(format!("{n}.dst_scales")))
                .unwrap()
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            let expected_scales: Vec<u32> = expected_scales.iter().map(|s| s.to_bits()).collect();
            if got_scales != expected_scales {
                let first = (0..expected_scales.len())
                    .find(|&g| got_scales.get(g) != Some(&expected_scales[g]))
                    .unwrap_or(expected_scales.len());
                let _ = writeln!(
                    failures,
                    "{}: scales differ ({} from the kernels, {} from the host); first at group \
                     {first}: host 0x{:08x}, kernel {:?}",
                    job.label,
                    got_scales.len(),
                    expected_scales.len(),
                    expected_scales.get(first).copied().unwrap_or(0),
                    got_scales.get(first).map(|b| format!("0x{b:08x}")),
                );
            }
        }
        if let Some(text) = describe_mismatches(job, &expected, &got) {
            failures.push_str(&text);
        }
        elements += job.numel();
    }
    assert!(failures.is_empty(), "{failures}");
    println!(
        "{} jobs, {elements} elements ({quantized} quantized by absmax): the kernels match the \
         host conversions",
        jobs.len()
    );
}
