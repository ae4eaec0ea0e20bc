//! Statistics and the timeline.

use super::consts::strata_status;
use super::context::{context, strata_context};
use super::{boundary, str_arg, write_sized, Versioned};
use crate::error::Error;

/// A context's counters. Set `struct_size` to sizeof(strata_stats) before strata_stats_get.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct strata_stats {
    pub struct_size: u32,
    /// Bytes strata holds on the compute device now, and at most so far.
    pub vram_in_use: u64,
    pub vram_peak: u64,
    /// Bytes of host memory strata holds now (host copies, staging), and at most so far.
    pub host_in_use: u64,
    pub host_peak: u64,
    /// Bytes moved into the preparing tier on the compute device.
    pub bytes_to_device: u64,
    /// Bytes read from checkpoint files.
    pub bytes_from_disk: u64,
    pub acquires: u64,
    /// Acquires that found the layer already on the device.
    pub resident_hits: u64,
    /// Acquires that found the layer prefetched.
    pub prefetch_hits: u64,
    /// Acquires that had to bring the layer in.
    pub misses: u64,
    /// Nanoseconds acquires blocked the calling thread waiting for bytes. On CUDA an acquire
    /// returns at once and the caller's stream waits instead: that wait is not counted here.
    pub stall_ns: u64,
    /// The most bytes held above vram_limit (a single layer larger than the budget).
    pub overcommit_peak: u64,
    /// The budget in force.
    pub vram_limit: u64,
    /// Resident layers evicted to make room.
    pub evictions: u64,
    /// Groups onloaded by an acquire rather than by strata_group_onload.
    pub implicit_onloads: u64,
    /// The host memory limit in force. Added after the first release: a caller whose struct_size
    /// ends before it does not get it.
    pub host_limit: u64,
    /// Allocations strata made on the compute device (cuMemAlloc on CUDA): flat once a repeating
    /// pass is warm, since freed buffers are reused.
    pub device_allocations: u64,
}

// SAFETY: repr(C), plain data, struct_size first.
unsafe impl Versioned for strata_stats {
    /// Callers built before host_limit was added pass the size without it.
    const FIRST_RELEASED_SIZE: usize = std::mem::offset_of!(strata_stats, host_limit);
}

/// Fills `out` (whose struct_size the caller set) with the context's counters.
#[no_mangle]
pub extern "C" fn strata_stats_get(
    ctx: *mut strata_context,
    out: *mut strata_stats,
) -> strata_status {
    boundary("strata_stats_get", || {
        let s = context(ctx)?.stats();
        let stats = strata_stats {
            struct_size: 0,
            vram_in_use: s.vram_in_use,
            vram_peak: s.vram_peak,
            host_in_use: s.host_in_use,
            host_peak: s.host_peak,
            bytes_to_device: s.bytes_to_device,
            bytes_from_disk: s.bytes_from_disk,
            acquires: s.acquires,
            resident_hits: s.resident_hits,
            prefetch_hits: s.prefetch_hits,
            misses: s.misses,
            stall_ns: s.stall_ns,
            overcommit_peak: s.overcommit_peak,
            vram_limit: s.vram_limit,
            evictions: s.evictions,
            implicit_onloads: s.implicit_onloads,
            host_limit: s.host_limit,
            device_allocations: s.device_allocations,
        };
        write_sized(out, "out", stats)
    })
}

/// Writes the timeline (compute spans from acquire to release, copy spans with bytes) as Chrome
/// trace JSON, which Perfetto and chrome://tracing open.
#[no_mangle]
pub extern "C" fn strata_trace_write(
    ctx: *mut strata_context,
    path: *const std::ffi::c_char,
) -> strata_status {
    boundary("strata_trace_write", || {
        let ctx = context(ctx)?;
        let path = std::path::Path::new(str_arg(path, "path")?);
        std::fs::write(path, ctx.trace_json())
            .map_err(|e| Error::from_io(&e, "writing the trace to", path))
    })
}
