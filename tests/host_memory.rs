//! A checkpoint 8x larger than `host_limit` streamed from disk, every value verified, with the
//! process's peak RSS held under baseline + host_limit + vram_limit + 32 MiB. Its own test binary
//! with a single test, so no other test's memory counts in the peak.

mod common;
use common::*;
use std::io::Write;

const LAYERS: usize = 32;
/// Each layer one f32 weight of ROWS x COLS: 16 MiB stored, 8 MiB on the device as bf16.
const ROWS: usize = 2048;
const COLS: usize = 2048;
const MIB: u64 = 1 << 20;

fn value(layer: usize, i: usize) -> f32 {
    ((layer * 7919 + i * 31) % 65_521) as f32 / 1024.0 - 32.0
}

/// Writes the checkpoint a tensor at a time, so writing it does not raise the test's own peak.
fn write_streamed(path: &std::path::Path) {
    let bytes = (ROWS * COLS * 4) as u64;
    let mut header = serde_json::Map::new();
    for layer in 0..LAYERS {
        let start = layer as u64 * bytes;
        header.insert(
            format!("blocks.{layer}.weight"),
            serde_json::json!({
                "dtype": "F32",
                "shape": [ROWS, COLS],
                "data_offsets": [start, start + bytes],
            }),
        );
    }
    let mut header = serde_json::to_vec(&header).unwrap();
    header.resize(header.len().div_ceil(8) * 8, b' ');
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    file.write_all(&(header.len() as u64).to_le_bytes())
        .unwrap();
    file.write_all(&header).unwrap();
    let mut row = Vec::with_capacity(COLS * 4);
    for layer in 0..LAYERS {
        for r in 0..ROWS {
            row.clear();
            for c in 0..COLS {
                row.extend_from_slice(&value(layer, r * COLS + c).to_le_bytes());
            }
            file.write_all(&row).unwrap();
        }
    }
    file.flush().unwrap();
}

fn peak_rss() -> u64 {
    // SAFETY: getrusage writes into the zeroed struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer.
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) }, 0);
    usage.ru_maxrss as u64 * 1024
}

#[test]
fn a_checkpoint_eight_times_the_host_limit_streams_under_the_limits() {
    let dir = TempDir::new("host-memory");
    let path = dir.path("model.safetensors");
    write_streamed(&path);
    let (host_limit, vram_limit) = (64 * MIB, 64 * MIB);
    let baseline = peak_rss();
    let ctx = Ctx::with(|o| {
        o.vram_limit = vram_limit;
        o.host_limit = host_limit;
    });
    // On disk as f32, resident and computed as bf16: the conversion needs host staging.
    let group = ctx.group(&tiers(|t| {
        t.offload.device = STRATA_DEVICE_DISK;
        t.onload.device = STRATA_DEVICE_DISK;
        t.preparing.dtype = STRATA_DTYPE_BF16;
        t.computation.dtype = STRATA_DTYPE_BF16;
    }));
    assert_eq!(ctx.register_prefix(group, &path, "blocks.", 2), LAYERS);
    let ids: Vec<u64> = (0..LAYERS)
        .map(|l| ctx.find(&format!("blocks.{l}")))
        .collect();
    for pass in 0..2 {
        for (layer, &id) in ids.iter().enumerate() {
            let views = ctx.acquire(id);
            let (view, bytes) = &views[0];
            assert_eq!(view.dtype, STRATA_DTYPE_BF16);
            for (i, pair) in bytes.chunks_exact(2).enumerate() {
                let got = u16::from_le_bytes([pair[0], pair[1]]);
                let expected = half::bf16::from_f32(value(layer, i)).to_bits();
                assert_eq!(got, expected, "pass {pass} layer {layer} element {i}");
            }
            ctx.release(id);
            let stats = ctx.stats();
            assert!(
                stats.host_peak <= host_limit,
                "host peak {}",
                stats.host_peak
            );
            assert!(
                stats.vram_peak <= vram_limit,
                "device peak {}",
                stats.vram_peak
            );
        }
    }
    let stats = ctx.stats();
    let peak = peak_rss();
    let allowed = baseline + host_limit + vram_limit + 32 * MIB;
    println!(
        "streamed {} MiB twice from disk (host_limit {} MiB, vram_limit {} MiB): peak RSS {} MiB over a {} MiB baseline, allowed {} MiB; strata's host peak {:.1} MiB, device peak {:.1} MiB",
        stats.bytes_from_disk / 2 / MIB,
        host_limit / MIB,
        vram_limit / MIB,
        peak / MIB,
        baseline / MIB,
        allowed / MIB,
        stats.host_peak as f64 / MIB as f64,
        stats.vram_peak as f64 / MIB as f64,
    );
    assert!(stats.bytes_from_disk >= 2 * (LAYERS * ROWS * COLS * 4) as u64 * 3 / 4);
    assert!(peak <= allowed, "peak RSS {peak} > {allowed}");
}
