//! Reading a checkpoint from disk: how close strata's disk tier comes to a plain sequential read
//! of the same file. Writes a generated checkpoint of bf16 blocks (256 MiB by default), then
//! measures in the same run, with the file in the page cache (warm) and after
//! `posix_fadvise(POSIX_FADV_DONTNEED)` dropped it (cold):
//!   (a) `std::fs::File::read` of the whole file, start to end, into one reused buffer as large
//!       as (b)'s (32 MiB), so both write the same memory; also with an 8 MiB buffer, which stays
//!       in the CPU cache and so shows what the page-cache copy costs when no bytes are kept;
//!   (b) strata's positioned reader (`TensorInfo::read_into`), tensor by tensor, into one reused
//!       buffer: several chunks of each tensor in flight at once;
//!   (c) strata through the C ABI: a CPU-device context whose group has disk offload and onload
//!       tiers, every layer (from `strata_group_register_checkpoint`) acquired and released once,
//!       in order, under `vram_limit` 0.
//! Each figure is the best of `ROUNDS`, the methods interleaved so drift hits them alike. Whether
//! the cold runs were cold is measured, not assumed: `mincore` counts the file's pages in the page
//! cache right after each drop.
//!
//! Run: cargo bench --bench disk
//!   STRATA_BENCH_DISK_MIB=1024   checkpoint size (rounded to whole blocks, 64..=8192 MiB)
//!   STRATA_BENCH_DIR=/mnt/nvme   where to write it (default: the system temp dir); removed after

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::ptr;
use std::time::Instant;
use strata::checkpoint::Checkpoint;
use strata::ffi::acquire::{strata_acquire_for_compute, strata_release, strata_tensor_view};
use strata::ffi::checkpoint::{strata_checkpoint_close, strata_checkpoint_open};
use strata::ffi::consts::{STRATA_DEVICE_DISK, STRATA_OK};
use strata::ffi::context::{strata_context_create, strata_context_destroy, strata_options_default};
use strata::ffi::group::{strata_group_create, strata_tiers_default};
use strata::ffi::layer::{strata_group_register_checkpoint, strata_layer_find};
use strata::ffi::stats::{strata_stats, strata_stats_get};

/// One block: a bf16 [ROWS, COLS] weight (32 MiB: four read chunks, as real DiT weights span
/// many) and an f32 [ROWS] bias.
const ROWS: usize = 4096;
const COLS: usize = 4096;
const WEIGHT_BYTES: usize = ROWS * COLS * 2;
const BIAS_BYTES: usize = ROWS * 4;
const ROUNDS: usize = 3;

fn main() {
    let mib: usize = std::env::var("STRATA_BENCH_DISK_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
        .clamp(64, 8192);
    let blocks = (mib << 20).div_ceil(WEIGHT_BYTES + BIAS_BYTES);
    let dir = std::env::var_os("STRATA_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let file = Removed(dir.join(format!(
        "strata-bench-disk-{}.safetensors",
        std::process::id()
    )));
    let started = Instant::now();
    write_checkpoint(&file.0, blocks);
    let file_len = std::fs::metadata(&file.0).unwrap().len();
    let data_bytes = (blocks * (WEIGHT_BYTES + BIAS_BYTES)) as u64;
    println!(
        "{blocks} blocks, {:.0} MiB at {} (written in {:.1} s)",
        file_len as f64 / (1 << 20) as f64,
        file.0.display(),
        started.elapsed().as_secs_f64()
    );

    let methods: [(&str, Method); 4] = [
        ("(a) File::read, 32 MiB buffer", |path| {
            sequential(path, WEIGHT_BYTES)
        }),
        ("(a8) File::read, 8 MiB buffer", |path| {
            sequential(path, 8 << 20)
        }),
        ("(b) strata positioned reader", positioned),
        ("(c) strata C ABI acquire+release", through_the_abi),
    ];
    let mut figures = Vec::new();
    let mut most_left_cached = 0.0f64;
    for cold in [false, true] {
        let mut best = [f64::INFINITY; 4];
        if !cold {
            sequential(&file.0, WEIGHT_BYTES);
        }
        for _ in 0..ROUNDS {
            for (i, (_, method)) in methods.iter().enumerate() {
                if cold {
                    drop_from_page_cache(&file.0);
                    most_left_cached = most_left_cached.max(cached_fraction(&file.0));
                }
                let started = Instant::now();
                let bytes = method(&file.0);
                let seconds = started.elapsed().as_secs_f64();
                assert!(
                    bytes == file_len || bytes == data_bytes,
                    "{bytes} bytes read"
                );
                best[i] = best[i].min(seconds / bytes as f64);
            }
        }
        let label = if cold { "cold" } else { "warm" };
        for (i, (name, _)) in methods.iter().enumerate() {
            println!(
                "{label}  {name:34} {:6.2} GB/s  {:5.2} x (a)",
                1e-9 / best[i],
                best[0] / best[i]
            );
        }
        figures.push(best);
    }
    let (warm, cold) = (figures[0][0], figures[1][0]);
    println!(
        "cold: at most {:.1}% of the file was in the page cache after POSIX_FADV_DONTNEED; \
         cold (a) took {:.1} x as long as warm (a)",
        100.0 * most_left_cached,
        cold / warm
    );
}

/// Reads the checkpoint at the path one way; returns the bytes it read.
type Method = fn(&Path) -> u64;

/// A file removed when dropped, so a failed run leaves no checkpoint behind.
struct Removed(PathBuf);

impl Drop for Removed {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Writes `blocks` blocks without holding more than one weight in memory, then syncs it: the
/// page cache drops only clean pages.
fn write_checkpoint(path: &Path, blocks: usize) {
    let mut header = serde_json::Map::new();
    let mut offset = 0;
    for b in 0..blocks {
        for (name, dtype, shape, bytes) in [
            ("weight", "BF16", vec![ROWS, COLS], WEIGHT_BYTES),
            ("bias", "F32", vec![ROWS], BIAS_BYTES),
        ] {
            header.insert(
                format!("blocks.{b}.{name}"),
                serde_json::json!({"dtype": dtype, "shape": shape,
                                   "data_offsets": [offset, offset + bytes]}),
            );
            offset += bytes;
        }
    }
    let mut header = serde_json::to_vec(&header).unwrap();
    // Padded with spaces to a multiple of 8, as the reference writer does, so data is aligned.
    header.resize(header.len().next_multiple_of(8), b' ');
    let mut out = std::io::BufWriter::with_capacity(8 << 20, File::create(path).unwrap());
    out.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
    out.write_all(&header).unwrap();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let pattern: Vec<u8> = (0..WEIGHT_BYTES)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    for _ in 0..blocks {
        out.write_all(&pattern).unwrap();
        out.write_all(&pattern[..BIAS_BYTES]).unwrap();
    }
    out.into_inner().unwrap().sync_all().unwrap();
}

fn drop_from_page_cache(path: &Path) {
    let file = File::open(path).unwrap();
    // SAFETY: posix_fadvise only reads its integer arguments; the descriptor is open.
    let status = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(status, 0, "posix_fadvise failed");
}

/// The fraction of the file's pages in the page cache.
fn cached_fraction(path: &Path) -> f64 {
    let file = File::open(path).unwrap();
    // SAFETY: the mapping is only passed to mincore, never read, so a concurrent truncation could
    // not fault; the file outlives the mapping.
    let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
    // SAFETY: sysconf only reads its argument.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    let mut resident = vec![0u8; map.len().div_ceil(page)];
    // SAFETY: the range is one live mapping; `resident` has a byte for each of its pages.
    let status = unsafe { libc::mincore(map.as_ptr() as *mut _, map.len(), resident.as_mut_ptr()) };
    assert_eq!(status, 0, "mincore failed");
    resident.iter().filter(|&&r| r & 1 == 1).count() as f64 / resident.len() as f64
}

/// (a)
fn sequential(path: &Path, buffer_bytes: usize) -> u64 {
    let mut file = File::open(path).unwrap();
    let mut buffer = vec![0u8; buffer_bytes];
    let mut total = 0;
    loop {
        match file.read(&mut buffer).unwrap() {
            0 => return total,
            n => total += n as u64,
        }
    }
}

/// (b)
fn positioned(path: &Path) -> u64 {
    let checkpoint = Checkpoint::open(path).unwrap();
    let mut buffer = vec![0u8; WEIGHT_BYTES];
    for tensor in checkpoint.tensors() {
        tensor
            .read_into(&mut buffer[..tensor.nbytes as usize])
            .unwrap();
    }
    checkpoint.total_bytes()
}

/// (c): counts the bytes the context read from disk.
fn through_the_abi(path: &Path) -> u64 {
    let check = |status| assert_eq!(status, STRATA_OK);
    let mut options = strata_options_default();
    options.vram_limit = 0;
    let mut ctx = ptr::null_mut();
    check(strata_context_create(&options, &mut ctx));
    let mut tiers = strata_tiers_default();
    tiers.offload.device = STRATA_DEVICE_DISK;
    tiers.onload.device = STRATA_DEVICE_DISK;
    let mut group = 0;
    check(strata_group_create(
        ctx,
        c"blocks".as_ptr(),
        &tiers,
        &mut group,
    ));
    let mut ckpt = ptr::null_mut();
    let path = CString::new(path.to_str().unwrap()).unwrap();
    check(strata_checkpoint_open(ctx, path.as_ptr(), &mut ckpt));
    let mut blocks = 0;
    check(strata_group_register_checkpoint(
        ctx,
        group,
        ckpt,
        c"blocks.".as_ptr(),
        2,
        &mut blocks,
    ));
    strata_checkpoint_close(ckpt);
    // SAFETY: a view is plain data (pointers, integers); all-zero is a valid value to overwrite.
    let mut views: [strata_tensor_view; 2] = unsafe { std::mem::zeroed() };
    let mut count = 0;
    for b in 0..blocks {
        let name = CString::new(format!("blocks.{b}")).unwrap();
        let mut layer = 0;
        check(strata_layer_find(ctx, name.as_ptr(), &mut layer));
        check(strata_acquire_for_compute(
            ctx,
            layer,
            ptr::null_mut(),
            views.as_mut_ptr(),
            2,
            &mut count,
        ));
        check(strata_release(ctx, layer, ptr::null_mut()));
    }
    let mut stats = strata_stats {
        struct_size: std::mem::size_of::<strata_stats>() as u32,
        ..Default::default()
    };
    check(strata_stats_get(ctx, &mut stats));
    strata_context_destroy(ctx);
    stats.bytes_from_disk
}
