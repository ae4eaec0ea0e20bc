//! Contexts: one compute device, its budget and everything registered on it.

use super::consts::{
    strata_status, STRATA_DEVICE_CPU, STRATA_FLAG_DIRECT_IO, STRATA_FLAG_STRICT_BUDGET,
    STRATA_UNLIMITED,
};
use super::log::{log_callback, progress_sink, strata_log_fn, strata_progress_fn};
use super::{
    boundary, boundary_value, boundary_void, out_arg, read_sized, write_sized, Handles, Versioned,
};
use crate::checkpoint::ReadMode;
use crate::context::{Context, Options};
use crate::error::Error;
use crate::tiers::Device;
use std::ffi::c_void;
use std::sync::{Arc, Weak};

/// Options for `strata_context_create`. Start from `strata_options_default()`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct strata_options {
    /// sizeof(strata_options): lets the struct grow without breaking old callers.
    pub struct_size: u32,
    /// STRATA_DEVICE_CPU or STRATA_DEVICE_CUDA.
    pub compute_device: u32,
    /// CUDA ordinal.
    pub device_index: i32,
    /// Bytes on the compute device, as the device takes them (a GPU gives a buffer over 1 MiB
    /// whole 2 MiB pages, and strata counts them); STRATA_UNLIMITED; 0 = nothing resident
    /// between uses.
    pub vram_limit: u64,
    /// Bytes of host memory for disk-tier copies and staging; STRATA_UNLIMITED.
    pub host_limit: u64,
    /// Layers fetched ahead of the one being computed (at most STRATA_MAX_PREFETCH_DEPTH are used).
    pub prefetch_depth: u32,
    /// STRATA_FLAG_*: STRATA_FLAG_STRICT_BUDGET refuses a layer larger than vram_limit;
    /// STRATA_FLAG_DIRECT_IO reads the disk tier with O_DIRECT, past the page cache.
    pub flags: u32,
    /// Receives log messages (NULL: none; then STRATA_LOG=error|warn|info|debug prints them to
    /// stderr). Fields from here on are optional: a caller whose struct_size ends before them
    /// gets NULL callbacks.
    pub log_fn: strata_log_fn,
    /// Passed back to log_fn.
    pub log_user: *mut c_void,
    /// Receives progress of long operations (NULL: none).
    pub progress_fn: strata_progress_fn,
    /// Passed back to progress_fn.
    pub progress_user: *mut c_void,
    /// CUDA: bytes to keep free on the device beside vram_limit, as cuMemGetInfo reports free
    /// memory (for GPUs shared with other programs); 0 = none. Ignored on the CPU.
    pub vram_headroom: u64,
    /// Host threads that convert and quantize tensors of 1 MiB or more (STRATA_HOST_THREADS
    /// otherwise; by default the CPUs this process may use, affinity and cgroup quota honoured);
    /// 0 = that default. The threads are process-wide, shared by contexts asking for the same
    /// number.
    pub host_threads: u32,
}

// SAFETY: repr(C), plain data, struct_size first.
unsafe impl Versioned for strata_options {
    /// Callers built before the callbacks were added pass the size without them.
    const FIRST_RELEASED_SIZE: usize = std::mem::offset_of!(strata_options, log_fn);
}

/// An opaque context. Thread-safe: any thread may use it; several may acquire and release at once.
pub struct strata_context {
    _private: [u8; 0],
}

pub(crate) static CONTEXTS: Handles<Context> = Handles::new("context");

thread_local! {
    /// The context this thread used last: a forward hook calls with the same one every time, and
    /// this skips the global table's lock. Weak, so it never keeps a destroyed context alive.
    static LAST_CONTEXT: std::cell::RefCell<(usize, Weak<Context>)> = const { std::cell::RefCell::new((0, Weak::new())) };
}

/// A live context for the length of one call. When the call is done with it, and so holds no
/// strata lock, it hands the log messages the call produced to the log callback, which may then
/// call back into strata without deadlocking.
pub(crate) struct ContextRef(Arc<Context>);

impl std::ops::Deref for ContextRef {
    type Target = Arc<Context>;

    fn deref(&self) -> &Arc<Context> {
        &self.0
    }
}

impl Drop for ContextRef {
    fn drop(&mut self) {
        self.0.flush_log();
    }
}

pub(crate) fn context(ctx: *const strata_context) -> crate::error::Result<ContextRef> {
    let token = ctx as usize;
    let cached = LAST_CONTEXT.with(|last| {
        let last = last.borrow();
        (last.0 == token).then(|| last.1.upgrade()).flatten()
    });
    if let Some(context) = cached.filter(|c| !c.is_closed()) {
        return Ok(ContextRef(context));
    }
    let context = CONTEXTS.get(ctx)?;
    LAST_CONTEXT.with(|last| *last.borrow_mut() = (token, Arc::downgrade(&context)));
    Ok(ContextRef(context))
}

/// The CPU device, no limits, prefetch depth 2, no flags, no callbacks. Returned by value, whole:
/// a binding that declares an older, smaller strata_options uses strata_options_init instead.
#[no_mangle]
pub extern "C" fn strata_options_default() -> strata_options {
    boundary_value("strata_options_default", default_options(), default_options)
}

/// Fills `*opts` with the same defaults, writing only the `opts->struct_size` bytes the caller
/// has (set it first). Unlike strata_options_default, which returns the whole struct by value,
/// this is safe for a program or binding built against an older, smaller strata_options.
#[no_mangle]
pub extern "C" fn strata_options_init(opts: *mut strata_options) -> strata_status {
    boundary("strata_options_init", || {
        write_sized(opts, "opts", default_options())
    })
}

fn default_options() -> strata_options {
    strata_options {
        struct_size: std::mem::size_of::<strata_options>() as u32,
        compute_device: STRATA_DEVICE_CPU,
        device_index: 0,
        vram_limit: STRATA_UNLIMITED,
        host_limit: STRATA_UNLIMITED,
        prefetch_depth: 2,
        flags: 0,
        log_fn: None,
        log_user: std::ptr::null_mut(),
        progress_fn: None,
        progress_user: std::ptr::null_mut(),
        vram_headroom: 0,
        host_threads: 0,
    }
}

fn options_from(raw: &strata_options) -> crate::error::Result<Options> {
    let compute = match Device::from_abi(raw.compute_device)? {
        None | Some(Device::Cpu) => Device::Cpu,
        Some(Device::Cuda) => Device::Cuda,
        Some(Device::Disk) => return Err(Error::invalid("the compute device cannot be the disk")),
    };
    let known = STRATA_FLAG_STRICT_BUDGET | STRATA_FLAG_DIRECT_IO;
    if raw.flags & !known != 0 {
        return Err(Error::invalid(format!(
            "unknown flags {:#x}",
            raw.flags & !known
        )));
    }
    if raw.device_index < 0 {
        return Err(Error::invalid(format!(
            "device_index {} is negative",
            raw.device_index
        )));
    }
    Ok(Options {
        compute,
        device_index: raw.device_index,
        vram_limit: raw.vram_limit,
        host_limit: raw.host_limit,
        prefetch_depth: raw.prefetch_depth,
        strict_budget: raw.flags & STRATA_FLAG_STRICT_BUDGET != 0,
        read_mode: match raw.flags & STRATA_FLAG_DIRECT_IO {
            0 => ReadMode::Buffered,
            _ => ReadMode::Direct,
        },
        log: log_callback(raw.log_fn, raw.log_user),
        progress: progress_sink(raw.progress_fn, raw.progress_user),
        vram_headroom: raw.vram_headroom,
        host_threads: raw.host_threads,
    })
}

/// Creates a context. `opts` must have `struct_size` set (use `strata_options_default()`).
/// Asking for STRATA_DEVICE_CUDA where no driver exists is STRATA_ERR_NO_DEVICE.
#[no_mangle]
pub extern "C" fn strata_context_create(
    opts: *const strata_options,
    out: *mut *mut strata_context,
) -> strata_status {
    boundary("strata_context_create", || {
        let raw = read_sized(opts, "opts", default_options())?;
        let out = out_arg(out, "out")?;
        let context = Context::new(options_from(&raw)?)?;
        *out = CONTEXTS.insert(context)? as *mut strata_context;
        Ok(())
    })
}

/// Destroys a context and everything registered on it; views it handed out become invalid.
/// Returns once the context's copy engine thread has ended, so the library may be unloaded next.
/// NULL is a no-op; a pointer already destroyed is reported through `strata_last_error` only.
/// Other threads may be inside calls on the context: each one waiting (for room, for a fill, for
/// an onload) wakes and returns STRATA_ERR_INVALID_HANDLE at once; one moving bytes finishes that
/// step first; every call that begins after destroy is STRATA_ERR_INVALID_HANDLE. It may be called
/// from the context's own log or progress callback: the call that ran the callback returns.
#[no_mangle]
pub extern "C" fn strata_context_destroy(ctx: *mut strata_context) {
    boundary_void("strata_context_destroy", || {
        if ctx.is_null() {
            return Ok(());
        }
        // Closed first, so no thread's cached handle reaches it once it leaves the table.
        let context = CONTEXTS.get(ctx)?;
        context.close();
        CONTEXTS.remove(ctx)?;
        context.flush_log();
        Ok(())
    });
}

/// Sets the device budget at once (STRATA_UNLIMITED; 0 = nothing resident between uses; N bytes).
/// Layers not in use are evicted down to the new cap before this returns; layers in use leave
/// when they are released. strata_stats' vram_limit shows the cap in force.
#[no_mangle]
pub extern "C" fn strata_context_set_vram_limit(
    ctx: *mut strata_context,
    bytes: u64,
) -> strata_status {
    boundary("strata_context_set_vram_limit", || {
        context(ctx)?.set_vram_limit(bytes)
    })
}

/// Sets host_limit, the bytes of host memory for disk-tier copies and staging (STRATA_UNLIMITED:
/// none), at once. strata_stats' host_limit shows the limit in force.
#[no_mangle]
pub extern "C" fn strata_context_set_host_limit(
    ctx: *mut strata_context,
    bytes: u64,
) -> strata_status {
    boundary("strata_context_set_host_limit", || {
        context(ctx)?.set_host_limit(bytes)
    })
}
