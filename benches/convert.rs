//! Host conversion throughput against a plain memcpy of the same number of output bytes, one
//! thread, 64 MiB of output per case, best of 5 runs.
//!
//! Run: cargo bench --bench convert

use std::hint::black_box;
use std::time::{Duration, Instant};
use strata::convert::{convert, f32_to_fp8, Quant, TensorBytes};
use strata::dtype::DType;

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
        DType::F8E4M3 => values
            .iter()
            .map(|&v| f32_to_fp8(v / 0.001, dtype))
            .collect(),
        other => panic!("no bench source in {other:?}"),
    }
}

fn best_of(mut run: impl FnMut()) -> Duration {
    run();
    (0..RUNS)
        .map(|_| {
            let start = Instant::now();
            run();
            start.elapsed()
        })
        .min()
        .unwrap()
}

fn gb_per_s(bytes: usize, time: Duration) -> f64 {
    bytes as f64 / time.as_secs_f64() / 1e9
}

fn main() {
    let mut dst = vec![0u8; OUTPUT_BYTES];
    let memcpy_src = vec![1u8; OUTPUT_BYTES];
    let memcpy = best_of(|| dst.copy_from_slice(black_box(&memcpy_src)));
    let memcpy_rate = gb_per_s(OUTPUT_BYTES, memcpy);
    println!(
        "{:<36} {:>8.2} GB/s of output",
        "memcpy (copy_from_slice)", memcpy_rate
    );

    let cases: [(&str, DType, DType, bool, Quant); 6] = [
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
        ("bf16 -> f32", DType::BF16, DType::F32, false, Quant::None),
        ("f32 -> f16", DType::F32, DType::F16, false, Quant::None),
        ("f32 -> bf16", DType::F32, DType::BF16, false, Quant::None),
        (
            "bf16 -> fp8 e4m3 (per-channel quant)",
            DType::BF16,
            DType::F8E4M3,
            false,
            Quant::PerChannel,
        ),
    ];
    for (label, src_dtype, dst_dtype, scaled, quant) in cases {
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
        let time = best_of(|| {
            convert(black_box(src), rows, &mut dst, dst_dtype, quant).unwrap();
        });
        let rate = gb_per_s(OUTPUT_BYTES, time);
        println!(
            "{label:<36} {rate:>8.2} GB/s of output  ({:.2}x memcpy)",
            rate / memcpy_rate
        );
    }
}
