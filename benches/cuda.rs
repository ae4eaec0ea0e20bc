//! Streaming weights to an NVIDIA GPU through the C ABI, against the host → device limits
//! measured in the same run (DESIGN.md §5: report achieved / limit).
//!
//! Limits, with the CUDA driver directly (cudarc's `result` layer, on a non-blocking stream of
//! the device's primary context), each one 256 MiB copy timed by a pair of CUDA events, after one
//! copy that is not timed:
//!
//! - pinned H2D: from `cuMemHostAlloc` memory, `PINNED_COPIES` copies: the PCIe limit;
//! - pageable H2D: from a plain `Vec`, `PAGEABLE_COPIES` copies: what unpinned copies get.
//!
//! strata, through the extern "C" functions: a CUDA context with `vram_limit` 0 (nothing stays
//! resident, every pass streams every layer) and `prefetch_depth` 2; `LAYERS` layers of one
//! [4096, 4096] tensor registered from host memory (`strata_layer_register_host`, so strata's host
//! copies are pinned in place and upload by direct DMA). Two cases:
//!
//! - bf16 stored, bf16 computation: pure transfer (32 MiB per layer crosses PCIe);
//! - fp8 e4m3fn stored, bf16 computation: 16 MiB per layer crosses as fp8 and a kernel on
//!   strata's copy stream makes the bf16 the acquire hands out.
//!
//! Each pass acquires every layer on a stream this bench created (non-blocking, primary context)
//! and releases it on that stream at once: no compute, so the copies alone set the pace. After
//! `WARMUP_PASSES` (strata learns the order in the first), `TRIALS` trials of `PASSES` passes:
//! each trial's time runs from before its first acquire to after `cuStreamSynchronize` of that
//! stream following its last release; its throughput is the `bytes_to_device` delta (bytes that
//! crossed PCIe into the preparing tier) over that time. Printed: best and median throughput, and
//! their ratios to the pinned limit's best and median (aim >= 0.90), with the counters over the
//! timed passes and `device_allocations` after the first pass, after warm-up and after each trial.
//! How full the prefetch window gets depends on timing, so a timed pass may be the first to need
//! one more buffer; but buffers are reused, so the count never passes what the window holds
//! ((prefetch_depth + 1) layers, two buffers each when converted on the GPU): the exit status is
//! 1 if it does.
//!
//! Then a bf16 checkpoint into fp8 on the device (issue 20): `QUANT_LAYERS` layers of one bf16
//! [rows, 4096] weight in a .safetensors file, a 32nd of the device's memory and at most 4 GiB,
//! written under STRATA_BENCH_DIR (else the system's temporary directory) and removed at the
//! end. Preparing tier fp8 e4m3fn with per-channel quantization, computation bf16, no budget;
//! onload from disk (positioned reads each pass, through the page cache the writing left warm)
//! and from host memory (strata's host copies), each with the CUDA backend's rule
//! (STRATA_CUDA_QUANTIZE=device: bf16 crosses and the kernels quantize) and with
//! STRATA_CUDA_QUANTIZE=host (host threads quantize, fp8 crosses). Each of `QUANT_TRIALS` trials
//! first evicts everything (vram_limit 0, then unlimited, untimed), then times one pass that
//! streams the whole checkpoint. Printed per case: the checkpoint's bf16 bytes per second and
//! their ratio to the pinned limit (aim >= 0.90), and the device allocations of each trial
//! (bytes_to_device counts the prepared fp8 bytes whichever way the quantization ran).
//!
//! Where there is no CUDA driver or no device it prints "SKIPPED: no CUDA driver" and exits 0.
//! Bounded: a few seconds on an H100 for the first cases, host memory near 1.1 GiB (strata's
//! 1 GiB of host copies in the bf16 case; the limits' buffers are freed before strata runs);
//! the checkpoint cases write up to 4 GiB and hold as much in host copies, device memory up to
//! 3 bytes per parameter of it.
//!
//! Run: cargo bench --bench cuda   (scripts/gpu-checks.sh runs the prebuilt executable)

use cudarc::driver::{result, sys};
use std::ffi::{c_void, CStr, CString};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::ptr;
use std::time::Instant;
use strata::ffi::acquire::{strata_acquire_for_compute, strata_release, strata_tensor_view};
use strata::ffi::checkpoint::{strata_checkpoint_close, strata_checkpoint_open};
use strata::ffi::consts::{
    strata_status, STRATA_DEVICE_CPU, STRATA_DEVICE_CUDA, STRATA_DEVICE_DISK, STRATA_DTYPE_BF16,
    STRATA_DTYPE_F8_E4M3FN, STRATA_OK, STRATA_QUANT_PER_CHANNEL, STRATA_UNLIMITED,
};
use strata::ffi::context::{
    strata_context, strata_context_create, strata_context_destroy, strata_context_set_vram_limit,
    strata_options_default,
};
use strata::ffi::error::{strata_last_error, strata_status_name};
use strata::ffi::group::{strata_group_create, strata_group_onload, strata_tiers_default};
use strata::ffi::layer::{
    strata_group_register_checkpoint, strata_host_tensor, strata_layer_find,
    strata_layer_register_host,
};
use strata::ffi::stats::{strata_stats, strata_stats_get};

/// The limits' copy size.
const COPY_BYTES: usize = 256 << 20;
const PINNED_COPIES: usize = 10;
const PAGEABLE_COPIES: usize = 5;

/// The streamed model: `LAYERS` layers of one [ROWS, COLS] weight (32 MiB in bf16).
const LAYERS: usize = 32;
const ROWS: usize = 4096;
const COLS: usize = 4096;
const PREFETCH_DEPTH: u32 = 2;
const WARMUP_PASSES: usize = 2;
const TRIALS: usize = 5;
const PASSES: usize = 8;

const MIB: f64 = (1u64 << 20) as f64;

fn main() {
    let Some(device) = open_device() else {
        return;
    };
    let name = result::device::get_name(device).unwrap_or_else(|_| "?".into());
    // strata works in the primary context (it pushes and pops it around its own calls); the
    // bench's stream, buffers and events live there too.
    // SAFETY: `device` came from cuDeviceGet; released at the end of main.
    let context = unsafe { result::primary_ctx::retain(device) }.expect("primary context");
    // SAFETY: a retained, live context.
    unsafe { result::ctx::set_current(context) }.expect("making the primary context current");
    println!("device 0: {name}");

    let stream = Stream::new();
    let pinned = {
        let mut host = Pinned::new(COPY_BYTES);
        fill(host.as_mut_slice());
        let device = DeviceBuffer::new(COPY_BYTES);
        copy_rates(host.as_slice(), &device, &stream, PINNED_COPIES)
    };
    let pageable = {
        let mut host = vec![0u8; COPY_BYTES];
        fill(&mut host);
        let device = DeviceBuffer::new(COPY_BYTES);
        copy_rates(&host, &device, &stream, PAGEABLE_COPIES)
    };
    println!(
        "limit: pinned H2D, {} MiB x {PINNED_COPIES} copies: best {:.2} GB/s, median {:.2} GB/s",
        COPY_BYTES >> 20,
        pinned.best,
        pinned.median
    );
    println!(
        "       pageable H2D, {} MiB x {PAGEABLE_COPIES} copies: best {:.2} GB/s, median {:.2} GB/s \
         ({:.2} of pinned)",
        COPY_BYTES >> 20,
        pageable.best,
        pageable.median,
        pageable.best / pinned.best
    );

    let cases = [
        Case {
            label: "bf16 stored -> bf16 computation (pure transfer)",
            stored: STRATA_DTYPE_BF16,
            stored_bytes: 2,
            computation: STRATA_DTYPE_BF16,
            computation_bytes: 2,
        },
        Case {
            label: "fp8 e4m3fn stored -> bf16 computation (converted on the GPU)",
            stored: STRATA_DTYPE_F8_E4M3FN,
            stored_bytes: 1,
            computation: STRATA_DTYPE_BF16,
            computation_bytes: 2,
        },
    ];
    let mut bounded = true;
    let mut summary = Vec::new();
    for case in &cases {
        let run = stream_case(case, &stream);
        bounded &= run.print(case, &pinned);
        summary.push((case.label.to_string(), run.rate.best / pinned.best));
    }
    summary.extend(quant_cases(device, &stream, &pinned));
    println!();
    for (label, ratio) in summary {
        println!("strata streaming / pinned H2D limit, {label}: {ratio:.3} (aim >= 0.90)");
    }
    drop(stream);
    // SAFETY: balances the retain above; nothing of the bench's is left in the context.
    unsafe { result::primary_ctx::release(device) }.expect("releasing the primary context");
    if !bounded {
        eprintln!("FAILED: device_allocations grew past what the prefetch window holds");
        std::process::exit(1);
    }
}

/// Device 0, with the driver initialised; None (after printing SKIPPED) where there is none.
fn open_device() -> Option<sys::CUdevice> {
    // SAFETY: only tries to load the driver library.
    if !unsafe { sys::is_culib_present() } {
        println!("SKIPPED: no CUDA driver (libcuda could not be loaded)");
        return None;
    }
    if let Err(e) = result::init() {
        println!("SKIPPED: no CUDA driver (cuInit failed: {e:?})");
        return None;
    }
    if result::device::get_count().unwrap_or(0) == 0 {
        println!("SKIPPED: no CUDA driver (it found no device)");
        return None;
    }
    Some(result::device::get(0).expect("device 0"))
}

/// Best and median of a set of rates, GB/s (1e9 bytes per second).
struct Rates {
    best: f64,
    median: f64,
}

impl Rates {
    fn of(mut rates: Vec<f64>) -> Rates {
        rates.sort_by(f64::total_cmp);
        let n = rates.len();
        let median = if n % 2 == 1 {
            rates[n / 2]
        } else {
            (rates[n / 2 - 1] + rates[n / 2]) / 2.0
        };
        Rates {
            best: rates[n - 1],
            median,
        }
    }
}

/// H2D copies of all of `src` into `dst` on `stream`, one untimed first, then `copies` timed by
/// CUDA events: GB/s of each.
fn copy_rates(src: &[u8], dst: &DeviceBuffer, stream: &Stream, copies: usize) -> Rates {
    let start = Event::timing();
    let end = Event::timing();
    // SAFETY: `dst` holds `src.len()` bytes; `src` outlives the copy (synchronized below).
    unsafe { result::memcpy_htod_async(dst.0, src, stream.0) }.expect("H2D copy");
    stream.synchronize();
    let rates = (0..copies)
        .map(|_| {
            // SAFETY: as above; live events and stream of the current context.
            let ms = unsafe {
                result::event::record(start.0, stream.0).expect("recording an event");
                result::memcpy_htod_async(dst.0, src, stream.0).expect("H2D copy");
                result::event::record(end.0, stream.0).expect("recording an event");
                result::event::synchronize(end.0).expect("waiting for an event");
                result::event::elapsed(start.0, end.0).expect("reading the elapsed time")
            };
            src.len() as f64 / (ms as f64 * 1e-3) / 1e9
        })
        .collect();
    Rates::of(rates)
}

/// Deterministic bytes, so the copies read real (not shared zero) pages.
fn fill(bytes: &mut [u8]) {
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = (i.wrapping_mul(2_654_435_761) >> 13) as u8;
    }
}

struct Case {
    label: &'static str,
    stored: u32,
    stored_bytes: usize,
    computation: u32,
    computation_bytes: usize,
}

/// What one case measured.
struct StreamRun {
    rate: Rates,
    /// Bytes that crossed PCIe per timed pass, and the layers' stored bytes.
    bytes_per_pass: f64,
    stored_per_pass: u64,
    ms_per_pass: f64,
    /// Counters over the timed passes, and at the end.
    timed: strata_stats,
    end: strata_stats,
    /// device_allocations after the first pass, after warm-up, after each trial.
    allocations_first: u64,
    allocations_warm: u64,
    allocations_trials: Vec<u64>,
}

impl StreamRun {
    /// Prints the case; false when device allocations outgrew the prefetch window.
    fn print(&self, case: &Case, pinned: &Rates) -> bool {
        let flat = self
            .allocations_trials
            .iter()
            .all(|&a| a == self.allocations_warm);
        // The stored form and the computation form each take a buffer when they differ.
        let buffers_per_layer = if case.stored == case.computation {
            1
        } else {
            2
        };
        let window = (PREFETCH_DEPTH as u64 + 1) * buffers_per_layer;
        let allocations = self.allocations_trials.last().copied().unwrap_or(0);
        let t = &self.timed;
        let passes = (TRIALS * PASSES) as f64;
        println!();
        println!(
            "strata, {}: {LAYERS} layers x [{ROWS}, {COLS}], vram_limit 0, prefetch_depth \
             {PREFETCH_DEPTH}, {TRIALS} trials x {PASSES} passes",
            case.label
        );
        println!(
            "  crossed PCIe per pass: {:.1} MiB ({:.3}x the layers' stored bytes); {:.2} ms per pass",
            self.bytes_per_pass / MIB,
            self.bytes_per_pass / self.stored_per_pass as f64,
            self.ms_per_pass
        );
        println!(
            "  throughput: best {:.2} GB/s, median {:.2} GB/s; ratio to pinned H2D: best/best {:.3}, \
             median/median {:.3} (aim >= 0.90)",
            self.rate.best,
            self.rate.median,
            self.rate.best / pinned.best,
            self.rate.median / pinned.median
        );
        println!(
            "  stats over the timed passes: acquires {}, prefetch_hits {}, resident_hits {}, misses \
             {}, host stall {:.3} ms/pass (acquire returns at once on a GPU; the caller's stream \
             waits), evictions {}",
            t.acquires,
            t.prefetch_hits,
            t.resident_hits,
            t.misses,
            t.stall_ns as f64 / 1e6 / passes,
            t.evictions
        );
        println!(
            "  at the end: vram_peak {:.1} MiB, vram_in_use {:.1} MiB, host_in_use {:.1} MiB, \
             overcommit_peak {:.1} MiB",
            self.end.vram_peak as f64 / MIB,
            self.end.vram_in_use as f64 / MIB,
            self.end.host_in_use as f64 / MIB,
            self.end.overcommit_peak as f64 / MIB
        );
        println!(
            "  device_allocations: {} after the first pass, {} after warm-up ({WARMUP_PASSES} \
             passes), {:?} after each trial: {}; the window holds at most {window} buffers",
            self.allocations_first,
            self.allocations_warm,
            self.allocations_trials,
            if flat {
                "flat"
            } else {
                "grew during the timed passes"
            }
        );
        allocations <= window
    }
}

fn stream_case(case: &Case, stream: &Stream) -> StreamRun {
    let mut options = strata_options_default();
    options.compute_device = STRATA_DEVICE_CUDA;
    options.device_index = 0;
    options.vram_limit = 0;
    options.prefetch_depth = PREFETCH_DEPTH;
    let mut raw = ptr::null_mut();
    check(
        strata_context_create(&options, &mut raw),
        "strata_context_create",
    );
    let ctx = Context(raw);

    let mut tiers = strata_tiers_default();
    tiers.computation.dtype = case.computation;
    let mut group = 0;
    let group_name = CString::new("weights").unwrap();
    check(
        strata_group_create(ctx.0, group_name.as_ptr(), &tiers, &mut group),
        "strata_group_create",
    );
    // One source buffer for every layer: strata copies it during registration.
    let mut data = vec![0u8; ROWS * COLS * case.stored_bytes];
    fill_weights(&mut data, case.stored);
    let shape = [ROWS as i64, COLS as i64];
    let tensor_name = CString::new("weight").unwrap();
    let tensor = strata_host_tensor {
        name: tensor_name.as_ptr(),
        dtype: case.stored,
        ndim: 2,
        shape: shape.as_ptr(),
        data: data.as_ptr() as *const c_void,
    };
    let layers: Vec<u64> = (0..LAYERS)
        .map(|i| {
            let name = CString::new(format!("layer.{i}")).unwrap();
            let mut id = 0;
            check(
                strata_layer_register_host(ctx.0, group, name.as_ptr(), &tensor, 1, &mut id),
                "strata_layer_register_host",
            );
            id
        })
        .collect();
    drop(data);
    check(strata_group_onload(ctx.0, group), "strata_group_onload");

    let expected_nbytes = (ROWS * COLS * case.computation_bytes) as u64;
    let timed = time_passes(&ctx, &layers, stream, (TRIALS, PASSES), &|| {}, &|view| {
        assert_eq!(view.dtype, case.computation);
        assert_eq!(view.nbytes, expected_nbytes);
    });
    let passes = (TRIALS * PASSES) as f64;
    StreamRun {
        rate: Rates::of(timed.trials.iter().map(Trial::bus_rate).collect()),
        bytes_per_pass: timed.counters.bytes_to_device as f64 / passes,
        stored_per_pass: (LAYERS * ROWS * COLS * case.stored_bytes) as u64,
        ms_per_pass: timed.seconds() * 1e3 / passes,
        timed: timed.counters,
        end: timed.end,
        allocations_first: timed.allocations_first,
        allocations_warm: timed.allocations_warm,
        allocations_trials: timed.allocations_trials,
    }
}

/// One timed trial: its seconds, the bytes that crossed PCIe into the preparing tier, and the
/// acquires that streamed their layer (not resident).
struct Trial {
    seconds: f64,
    bytes_to_device: u64,
    streamed: u64,
}

impl Trial {
    /// GB/s over the bus.
    fn bus_rate(&self) -> f64 {
        self.bytes_to_device as f64 / self.seconds / 1e9
    }
}

/// What `time_passes` measured.
struct Timed {
    trials: Vec<Trial>,
    /// Counters over the timed passes, and at the end.
    counters: strata_stats,
    end: strata_stats,
    allocations_first: u64,
    allocations_warm: u64,
    allocations_trials: Vec<u64>,
}

impl Timed {
    fn seconds(&self) -> f64 {
        self.trials.iter().map(|t| t.seconds).sum()
    }
}

/// Streams `layers` (one tensor each) through `ctx`: one pass checking every view with `verify`,
/// `WARMUP_PASSES` in all untimed, then `trials` timed trials of `passes` passes, each after an
/// untimed `before_trial`. Each pass acquires every layer on `stream` and releases it at once.
fn time_passes(
    ctx: &Context,
    layers: &[u64],
    stream: &Stream,
    (trials, passes): (usize, usize),
    before_trial: &dyn Fn(),
    verify: &dyn Fn(&strata_tensor_view),
) -> Timed {
    let pass = |check_views: bool| {
        for &layer in layers {
            let mut view = empty_view();
            let mut count = 0;
            check(
                strata_acquire_for_compute(
                    ctx.0,
                    layer,
                    stream.0 as *mut c_void,
                    &mut view,
                    1,
                    &mut count,
                ),
                "strata_acquire_for_compute",
            );
            if check_views {
                assert_eq!(count, 1);
                assert_eq!(view.device, STRATA_DEVICE_CUDA);
                assert!(!view.data.is_null());
                verify(&view);
            }
            check(
                strata_release(ctx.0, layer, stream.0 as *mut c_void),
                "strata_release",
            );
        }
    };

    pass(true);
    let allocations_first = stats(ctx).device_allocations;
    for _ in 1..WARMUP_PASSES {
        pass(false);
    }
    finish_all_work();
    let allocations_warm = stats(ctx).device_allocations;

    let first = stats(ctx);
    let mut timed = Vec::with_capacity(trials);
    let mut allocations_trials = Vec::with_capacity(trials);
    for _ in 0..trials {
        before_trial();
        finish_all_work();
        let before = stats(ctx);
        let started = Instant::now();
        for _ in 0..passes {
            pass(false);
        }
        // Also the copies strata already started for the next pass: they are counted in
        // bytes_to_device, so their time must be too.
        finish_all_work();
        let seconds = started.elapsed().as_secs_f64();
        let after = stats(ctx);
        timed.push(Trial {
            seconds,
            bytes_to_device: after.bytes_to_device - before.bytes_to_device,
            streamed: (after.acquires - after.resident_hits)
                - (before.acquires - before.resident_hits),
        });
        allocations_trials.push(after.device_allocations);
    }
    let end = stats(ctx);
    let counters = strata_stats {
        acquires: end.acquires - first.acquires,
        prefetch_hits: end.prefetch_hits - first.prefetch_hits,
        resident_hits: end.resident_hits - first.resident_hits,
        misses: end.misses - first.misses,
        stall_ns: end.stall_ns - first.stall_ns,
        evictions: end.evictions - first.evictions,
        bytes_to_device: end.bytes_to_device - first.bytes_to_device,
        ..end
    };
    Timed {
        trials: timed,
        counters,
        end,
        allocations_first,
        allocations_warm,
        allocations_trials,
    }
}

/// Where the quantization cases' bf16 checkpoint is read from while streaming.
#[derive(Clone, Copy)]
enum Onload {
    /// The file, by positioned reads each pass (through the page cache, warm after writing).
    Disk,
    /// strata's host copies, read from the file once by `strata_group_onload`.
    Host,
}

/// A bf16 checkpoint streamed into fp8 e4m3fn, per-channel quantization, bf16 computation.
struct QuantCase {
    onload: Onload,
    /// STRATA_CUDA_QUANTIZE while the context opens: "device" (the default rule) or "host".
    quantize: &'static str,
}

impl QuantCase {
    fn label(&self) -> String {
        let from = match self.onload {
            Onload::Disk => "disk",
            Onload::Host => "host memory",
        };
        format!(
            "bf16 checkpoint from {from} -> fp8 e4m3fn per-channel -> bf16, \
             STRATA_CUDA_QUANTIZE={}",
            self.quantize
        )
    }
}

/// The quantization cases' model: `QUANT_LAYERS` layers of one [rows, QUANT_COLS] bf16 weight,
/// the checkpoint a 32nd of the device's memory and at most `QUANT_MAX_BYTES` (4 GiB on an H100
/// or H200; 32 MiB on the emulated driver's 1 GiB).
const QUANT_LAYERS: usize = 32;
const QUANT_COLS: usize = 4096;
const QUANT_MAX_BYTES: usize = 4 << 30;
const QUANT_TRIALS: usize = 5;
const QUANT_PASSES: usize = 1;

fn quant_rows(device_memory: usize) -> usize {
    let bytes = (device_memory / 32).min(QUANT_MAX_BYTES);
    (bytes / (QUANT_LAYERS * QUANT_COLS * 2) / 64 * 64).max(64)
}

/// What one quantization case measured: GB/s of the checkpoint's bf16 bytes streamed (layers
/// not resident, times their bf16 bytes).
struct QuantRun {
    checkpoint: Rates,
    streamed_per_pass: f64,
    /// device_allocations made during each trial: each layer's fp8 and bf16 buffers, and the
    /// scratch that quantizing on the device takes beside them, less what the pool reused.
    allocations_per_trial: Vec<u64>,
    timed: strata_stats,
}

fn quant_case(case: &QuantCase, path: &Path, rows: usize, stream: &Stream) -> QuantRun {
    let layer_params = rows * QUANT_COLS;
    let mut options = strata_options_default();
    options.compute_device = STRATA_DEVICE_CUDA;
    options.device_index = 0;
    // No budget, so that the rule may quantize on the device (the scratch needs memory beside
    // the layers); every trial starts with nothing resident (see `evict_all`), so its pass
    // streams the whole checkpoint, as loading a model does.
    options.vram_limit = STRATA_UNLIMITED;
    options.prefetch_depth = PREFETCH_DEPTH;
    // Read by the CUDA backend when the context opens. Only this thread calls into strata or
    // the environment here; std serialises its own reads of it.
    std::env::set_var("STRATA_CUDA_QUANTIZE", case.quantize);
    let mut raw = ptr::null_mut();
    let created = strata_context_create(&options, &mut raw);
    std::env::remove_var("STRATA_CUDA_QUANTIZE");
    check(created, "strata_context_create");
    let ctx = Context(raw);

    let mut tiers = strata_tiers_default();
    tiers.offload.device = STRATA_DEVICE_DISK;
    tiers.onload.device = match case.onload {
        Onload::Disk => STRATA_DEVICE_DISK,
        Onload::Host => STRATA_DEVICE_CPU,
    };
    tiers.preparing.dtype = STRATA_DTYPE_F8_E4M3FN;
    tiers.quantization = STRATA_QUANT_PER_CHANNEL;
    tiers.computation.dtype = STRATA_DTYPE_BF16;
    let mut group = 0;
    check(
        strata_group_create(ctx.0, c"checkpoint".as_ptr(), &tiers, &mut group),
        "strata_group_create",
    );
    let mut ckpt = ptr::null_mut();
    let path = CString::new(path.to_str().expect("a UTF-8 temporary path")).unwrap();
    check(
        strata_checkpoint_open(ctx.0, path.as_ptr(), &mut ckpt),
        "strata_checkpoint_open",
    );
    let mut count = 0;
    let registered =
        strata_group_register_checkpoint(ctx.0, group, ckpt, c"layer.".as_ptr(), 2, &mut count);
    strata_checkpoint_close(ckpt);
    check(registered, "strata_group_register_checkpoint");
    assert_eq!(count, QUANT_LAYERS);
    let layers: Vec<u64> = (0..QUANT_LAYERS)
        .map(|i| {
            let name = CString::new(format!("layer.{i}")).unwrap();
            let mut id = 0;
            check(
                strata_layer_find(ctx.0, name.as_ptr(), &mut id),
                "strata_layer_find",
            );
            id
        })
        .collect();
    check(strata_group_onload(ctx.0, group), "strata_group_onload");

    let bf16_bytes = (layer_params * 2) as u64;
    let evict_all = || {
        check(
            strata_context_set_vram_limit(ctx.0, 0),
            "strata_context_set_vram_limit",
        );
        check(
            strata_context_set_vram_limit(ctx.0, STRATA_UNLIMITED),
            "strata_context_set_vram_limit",
        );
    };
    let timed = time_passes(
        &ctx,
        &layers,
        stream,
        (QUANT_TRIALS, QUANT_PASSES),
        &evict_all,
        &|view| {
            assert_eq!(view.dtype, STRATA_DTYPE_BF16);
            assert_eq!(view.nbytes, bf16_bytes);
        },
    );
    let streamed: u64 = timed.trials.iter().map(|t| t.streamed).sum();
    let allocations_per_trial = std::iter::once(timed.allocations_warm)
        .chain(timed.allocations_trials.iter().copied())
        .collect::<Vec<_>>()
        .windows(2)
        .map(|pair| pair[1] - pair[0])
        .collect();
    QuantRun {
        checkpoint: Rates::of(
            timed
                .trials
                .iter()
                .map(|t| (t.streamed * bf16_bytes) as f64 / t.seconds / 1e9)
                .collect(),
        ),
        streamed_per_pass: streamed as f64 / (QUANT_TRIALS * QUANT_PASSES) as f64,
        allocations_per_trial,
        timed: timed.counters,
    }
}

impl QuantRun {
    fn print(&self, case: &QuantCase, rows: usize, pinned: &Rates) {
        let t = &self.timed;
        println!();
        println!(
            "strata, {}: {QUANT_LAYERS} layers x [{rows}, {QUANT_COLS}], prefetch_depth \
             {PREFETCH_DEPTH}, {QUANT_TRIALS} trials x {QUANT_PASSES} pass from nothing resident",
            case.label()
        );
        println!(
            "  checkpoint (bf16 bytes streamed, {:.1} of {QUANT_LAYERS} layers per pass): best \
             {:.2} GB/s, median {:.2} GB/s; ratio to pinned H2D: best/best {:.3}, median/median \
             {:.3} (aim >= 0.90)",
            self.streamed_per_pass,
            self.checkpoint.best,
            self.checkpoint.median,
            self.checkpoint.best / pinned.best,
            self.checkpoint.median / pinned.median
        );
        println!(
            "  stats over the timed passes: acquires {}, prefetch_hits {}, resident_hits {}, misses \
             {}, host stall {:.3} ms/pass, evictions {}, vram_peak {:.1} MiB; device_allocations \
             per trial {:?} (two buffers a layer, and a scratch when quantizing on the device, \
             less what the pool reused)",
            t.acquires,
            t.prefetch_hits,
            t.resident_hits,
            t.misses,
            t.stall_ns as f64 / 1e6 / (QUANT_TRIALS * QUANT_PASSES) as f64,
            t.evictions,
            t.vram_peak as f64 / MIB,
            self.allocations_per_trial
        );
    }
}

/// Writes the quantization cases' checkpoint: `QUANT_LAYERS` tensors "layer.{i}.weight", bf16
/// [rows, QUANT_COLS], finite (see `fill_weights`), one layer's bytes in memory at a time.
fn write_bf16_checkpoint(path: &Path, rows: usize) {
    let layer_bytes = rows * QUANT_COLS * 2;
    let mut header = serde_json::Map::new();
    for i in 0..QUANT_LAYERS {
        header.insert(
            format!("layer.{i}.weight"),
            serde_json::json!({"dtype": "BF16", "shape": [rows, QUANT_COLS],
                               "data_offsets": [i * layer_bytes, (i + 1) * layer_bytes]}),
        );
    }
    let mut header = serde_json::to_vec(&header).unwrap();
    // Padded with spaces to a multiple of 8, as the reference writer does, so data is aligned.
    header.resize(header.len().next_multiple_of(8), b' ');
    let mut layer = vec![0u8; layer_bytes];
    fill_weights(&mut layer, STRATA_DTYPE_BF16);
    let mut out = std::io::BufWriter::with_capacity(8 << 20, File::create(path).unwrap());
    out.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
    out.write_all(&header).unwrap();
    for _ in 0..QUANT_LAYERS {
        out.write_all(&layer).unwrap();
    }
    out.into_inner().unwrap().sync_all().unwrap();
}

/// A directory removed with what it holds when dropped, so a failed run leaves no checkpoint.
struct TempDir(PathBuf);

impl TempDir {
    /// Under STRATA_BENCH_DIR (scripts/gpu-checks.sh makes and removes one), else the system's.
    fn new() -> TempDir {
        let parent = std::env::var_os("STRATA_BENCH_DIR")
            .filter(|dir| !dir.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        let dir = parent.join(format!("strata-bench-cuda-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("creating the checkpoint's directory");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the quantization cases, printing each; their (label, checkpoint best / pinned best).
fn quant_cases(device: sys::CUdevice, stream: &Stream, pinned: &Rates) -> Vec<(String, f64)> {
    // SAFETY: `device` came from cuDeviceGet.
    let memory = unsafe { result::device::total_mem(device) }.expect("cuDeviceTotalMem");
    let rows = quant_rows(memory);
    let dir = TempDir::new();
    let path = dir.0.join("bf16.safetensors");
    let started = Instant::now();
    write_bf16_checkpoint(&path, rows);
    println!();
    println!(
        "bf16 checkpoint: {:.1} MiB at {} (written in {:.1} s; removed at the end)",
        (QUANT_LAYERS * rows * QUANT_COLS * 2) as f64 / MIB,
        path.display(),
        started.elapsed().as_secs_f64()
    );
    let mut summary = Vec::new();
    for onload in [Onload::Disk, Onload::Host] {
        for quantize in ["device", "host"] {
            let case = QuantCase { onload, quantize };
            let run = quant_case(&case, &path, rows, stream);
            run.print(&case, rows, pinned);
            summary.push((case.label(), run.checkpoint.best / pinned.best));
        }
    }
    summary
}

/// Finite weights of the stored dtype (no NaN or infinity), so a conversion does real work.
fn fill_weights(bytes: &mut [u8], dtype: u32) {
    if dtype == STRATA_DTYPE_F8_E4M3FN {
        // Exponent fields 0..=13 of 15, either sign: never 0x7f/0xff (NaN).
        for (i, b) in bytes.iter_mut().enumerate() {
            let bits = (i.wrapping_mul(2_654_435_761) >> 13) as u8;
            *b = (bits & 0x80) | ((bits & 0x7f) % 0x70);
        }
    } else {
        // bf16 values in [2^-8, 1) of either sign.
        for (i, pair) in bytes.chunks_exact_mut(2).enumerate() {
            let bits = (i.wrapping_mul(2_654_435_761) >> 13) as u16;
            let value = (bits & 0x8000) | (0x3b80 + (bits & 0x03ff));
            pair.copy_from_slice(&value.to_le_bytes());
        }
    }
}

fn empty_view() -> strata_tensor_view {
    strata_tensor_view {
        name: ptr::null(),
        data: ptr::null_mut(),
        dtype: 0,
        device: 0,
        device_index: 0,
        ndim: 0,
        shape: [0; 8],
        nbytes: 0,
    }
}

fn stats(ctx: &Context) -> strata_stats {
    let mut out = strata_stats {
        struct_size: std::mem::size_of::<strata_stats>() as u32,
        ..Default::default()
    };
    check(strata_stats_get(ctx.0, &mut out), "strata_stats_get");
    out
}

/// Panics with strata's own message when a call failed.
#[track_caller]
fn check(status: strata_status, call: &str) {
    if status != STRATA_OK {
        let len = strata_last_error(ptr::null_mut(), 0);
        let mut buf = vec![0u8; len + 1];
        strata_last_error(buf.as_mut_ptr() as *mut _, buf.len());
        // SAFETY: a static, NUL-terminated string.
        let name = unsafe { CStr::from_ptr(strata_status_name(status)) };
        panic!(
            "{call}: {}: {}",
            name.to_string_lossy(),
            String::from_utf8_lossy(&buf[..len])
        );
    }
}

/// A strata context, destroyed on drop.
struct Context(*mut strata_context);

impl Drop for Context {
    fn drop(&mut self) {
        strata_context_destroy(self.0);
    }
}

/// A non-blocking stream of the current (primary) context.
struct Stream(sys::CUstream);

impl Stream {
    fn new() -> Stream {
        Stream(
            result::stream::create(result::stream::StreamKind::NonBlocking)
                .expect("creating a stream"),
        )
    }

    fn synchronize(&self) {
        // SAFETY: a live stream.
        unsafe { result::stream::synchronize(self.0) }.expect("synchronizing the stream");
    }
}

/// Waits for every stream of the current (primary) context: the caller's and strata's copy stream.
fn finish_all_work() {
    result::ctx::synchronize().expect("cuCtxSynchronize");
}

impl Drop for Stream {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once.
        unsafe { result::stream::destroy(self.0) }.expect("destroying the stream");
    }
}

/// An event with timing.
struct Event(sys::CUevent);

impl Event {
    fn timing() -> Event {
        Event(
            result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT).expect("creating an event"),
        )
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: created in `timing`, destroyed once.
        unsafe { result::event::destroy(self.0) }.expect("destroying an event");
    }
}

/// Pinned host memory from cuMemHostAlloc.
struct Pinned {
    pointer: *mut u8,
    len: usize,
}

impl Pinned {
    fn new(len: usize) -> Pinned {
        // SAFETY: a fresh allocation; its bytes are written before they are read.
        let pointer = unsafe { result::malloc_host(len, 0) }.expect("cuMemHostAlloc") as *mut u8;
        Pinned { pointer, len }
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: `len` bytes allocated in `new`, live until drop.
        unsafe { std::slice::from_raw_parts(self.pointer, self.len) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, borrowed mutably through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.pointer, self.len) }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // SAFETY: from cuMemHostAlloc, freed once; no copy from it is in flight (every use is
        // synchronized before it returns).
        unsafe { result::free_host(self.pointer as *mut c_void) }.expect("cuMemFreeHost");
    }
}

/// Device memory from cuMemAlloc.
struct DeviceBuffer(sys::CUdeviceptr);

impl DeviceBuffer {
    fn new(len: usize) -> DeviceBuffer {
        // SAFETY: a fresh allocation, only written by copies.
        DeviceBuffer(unsafe { result::malloc_sync(len) }.expect("cuMemAlloc"))
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        // SAFETY: from cuMemAlloc, freed once, after the copies into it completed.
        unsafe { result::free_sync(self.0) }.expect("cuMemFree");
    }
}
