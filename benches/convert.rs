//! Host conversion throughput against a plain memcpy of the same number of output bytes, 64 MiB
//! of output per case, best of 5 runs: the scalar reference (the code before the block kernels)
//! and the block kernels on one thread against a one-thread memcpy, and on the host pool (the
//! default thread count) against a memcpy split the same way on the same pool.
//!
//! Run: cargo bench --bench convert [-- SUBSTRING], which runs only the cases whose label has it.
//! `-- --cpu-time`: time the one-thread columns (reference, one thread, and their memcpy) by the
//! CPU time of the benchmark's thread instead of the wall clock, which on a machine shared with
//! other work leaves out the time the thread waited for a core (the pool columns stay on the wall
//! clock: CPU time does not show parallelism).

use std::hint::black_box;
use std::time::{Duration, Instant};
use strata::convert::{convert_with, f32_to_fp8, Engine, Quant, TensorBytes};
use strata::dtype::DType;
use strata::host_threads;

const OUTPUT_BYTES: usize = 64 << 20;
const RUNS: usize = 5;
/// Columns of the weight matrix the per-channel case pretends to be.
const ROW_LEN: usize = 8192;

/// Deterministic weight-like values (std about 0.02), without a random-number crate.
fn weights(count: usize) -> Vec<f32> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    (0..count)
        .map(|_| {
            // Sum of four uniforms: close enough to normal for timing.
            let sum: f32 = (0..4)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state >> 40) as f32 / (1u64 << 24) as f32
                })
                .sum();
            (sum - 2.0) * 0.035
        })
        .collect()
}

fn encode(values: &[f32], dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::BF16 => values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect(),
        DType::F16 => values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
        DType::F8E4M3 => values
            .iter()
            .map(|&v| f32_to_fp8(v / 0.001, dtype))
            .collect(),
        other => panic!("no bench source in {other:?}"),
    }
}

#[derive(Clone, Copy)]
enum Clock {
    Wall,
    /// CPU time of the calling thread (for work that stays on it).
    Thread,
}

impl Clock {
    fn now(self) -> Duration {
        match self {
            Clock::Wall => START.elapsed(),
            Clock::Thread => {
                let mut now = libc::timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                };
                // SAFETY: `now` is a valid timespec for the call to fill.
                let status =
                    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
                assert_eq!(status, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
                Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
            }
        }
    }
}

static START: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

fn best_of_by(clock: Clock, mut run: impl FnMut()) -> Duration {
    run();
    (0..RUNS)
        .map(|_| {
            let start = clock.now();
            run();
            clock.now() - start
        })
        .min()
        .unwrap()
}

fn gb_per_s(bytes: usize, time: Duration) -> f64 {
    bytes as f64 / time.as_secs_f64() / 1e9
}

/// `dst.copy_from_slice(src)` split into one piece per thread on the host pool.
fn parallel_copy(threads: usize, dst: &mut [u8], src: &[u8]) {
    let piece = dst.len().div_ceil(threads);
    let parts: Vec<_> = dst.chunks_mut(piece).zip(src.chunks(piece)).collect();
    host_threads::run_parts(threads, "copy", parts, |(dst, src)| {
        dst.copy_from_slice(src);
        dst.len()
    });
}

/// `dst[i]` = the first byte of the `ratio`-byte element `i` of `src`: the traffic of a
/// narrowing conversion without its arithmetic.
fn narrowing_copy(dst: &mut [u8], src: &[u8], ratio: usize) {
    match ratio {
        2 => {
            for (out, pair) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *out = u16::from_le_bytes(pair.try_into().unwrap()) as u8;
            }
        }
        _ => {
            for (out, word) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *out = u32::from_le_bytes(word.try_into().unwrap()) as u8;
            }
        }
    }
}

fn main() {
    let threads = host_threads::default_threads();
    let one_thread_clock = if std::env::args().any(|arg| arg == "--cpu-time") {
        Clock::Thread
    } else {
        Clock::Wall
    };
    let mut dst = vec![0u8; OUTPUT_BYTES];
    let memcpy_src = vec![1u8; OUTPUT_BYTES];
    let memcpy = gb_per_s(
        OUTPUT_BYTES,
        best_of_by(one_thread_clock, || {
            dst.copy_from_slice(black_box(&memcpy_src))
        }),
    );
    let pool_memcpy = gb_per_s(
        OUTPUT_BYTES,
        best_of_by(Clock::Wall, || {
            parallel_copy(threads, &mut dst, black_box(&memcpy_src))
        }),
    );
    println!(
        "memcpy: one thread {memcpy:.2} GB/s; {threads} threads on the pool {pool_memcpy:.2} GB/s"
    );
    // The memory-bound ceiling of a conversion that reads 2 or 4 bytes per byte it writes: the
    // same traffic with no arithmetic (keep the low byte of each element), one thread.
    for ratio in [2usize, 4] {
        let wide = vec![1u8; OUTPUT_BYTES * ratio];
        let narrowing = gb_per_s(
            OUTPUT_BYTES,
            best_of_by(one_thread_clock, || {
                narrowing_copy(&mut dst, black_box(&wide), ratio)
            }),
        );
        println!(
            "read {ratio} bytes, write 1 (no arithmetic): one thread {narrowing:.2} GB/s of output, {:.2}x memcpy",
            narrowing / memcpy
        );
    }
    println!(
        "{:<40} {:>15} {:>22} {:>26}",
        "conversion (GB/s of output)",
        "scalar reference",
        "one thread",
        format!("pool, {threads} threads")
    );

    let cases: [(&str, DType, DType, bool, Quant); 12] = [
        (
            "fp8 e4m3 -> bf16",
            DType::F8E4M3,
            DType::BF16,
            false,
            Quant::None,
        ),
        (
            "fp8 e4m3 (per-channel) -> bf16",
            DType::F8E4M3,
            DType::BF16,
            true,
            Quant::None,
        ),
        (
            "fp8 e4m3 (per-channel) -> f32",
            DType::F8E4M3,
            DType::F32,
            true,
            Quant::None,
        ),
        (
            "fp8 e4m3 -> f16",
            DType::F8E4M3,
            DType::F16,
            false,
            Quant::None,
        ),
        ("bf16 -> f32", DType::BF16, DType::F32, false, Quant::None),
        ("f16 -> f32", DType::F16, DType::F32, false, Quant::None),
        ("f32 -> f16", DType::F32, DType::F16, false, Quant::None),
        ("f32 -> bf16", DType::F32, DType::BF16, false, Quant::None),
        ("bf16 -> f16", DType::BF16, DType::F16, false, Quant::None),
        (
            "bf16 -> fp8 e4m3 (per-channel quant)",
            DType::BF16,
            DType::F8E4M3,
            false,
            Quant::PerChannel,
        ),
        (
            "f16 -> fp8 e4m3 (per-channel quant)",
            DType::F16,
            DType::F8E4M3,
            false,
            Quant::PerChannel,
        ),
        (
            "f32 -> fp8 e4m3 (per-tensor quant)",
            DType::F32,
            DType::F8E4M3,
            false,
            Quant::PerTensor,
        ),
    ];
    let only = std::env::args().skip(1).find(|arg| !arg.starts_with('-'));
    for (label, src_dtype, dst_dtype, scaled, quant) in cases {
        if only
            .as_ref()
            .is_some_and(|only| !label.contains(only.as_str()))
        {
            continue;
        }
        let numel = OUTPUT_BYTES / dst_dtype.size();
        let rows = numel / ROW_LEN;
        let src_bytes = encode(&weights(numel), src_dtype);
        let scales: Vec<f32> = if scaled {
            (0..rows).map(|row| 0.001 * (1 + row % 7) as f32).collect()
        } else {
            Vec::new()
        };
        let src = TensorBytes {
            bytes: &src_bytes,
            dtype: src_dtype,
            scales: &scales,
        };
        let mut rate = |engine: Engine, clock: Clock| {
            gb_per_s(
                OUTPUT_BYTES,
                best_of_by(clock, || {
                    convert_with(black_box(src), rows, &mut dst, dst_dtype, quant, engine).unwrap();
                }),
            )
        };
        let reference = rate(Engine::reference(), one_thread_clock);
        let single = rate(Engine::with_threads(1), one_thread_clock);
        let pooled = rate(Engine::with_threads(threads), Clock::Wall);
        println!(
            "{label:<40} {reference:>6.2} ({:.2}x) {single:>6.2} ({:.2}x memcpy) {pooled:>8.2} ({:.2}x pool memcpy)",
            reference / memcpy,
            single / memcpy,
            pooled / pool_memcpy
        );
    }
}
