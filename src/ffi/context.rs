//! Contexts: one compute device, its budget and everything registered on it.

use super::{boundary, boundary_value, boundary_void, out_arg, read_sized, Handles, Versioned};
use crate::budget::STRATA_UNLIMITED;
use crate::context::{Context, Options, STRATA_FLAG_STRICT_BUDGET};
use crate::error::{strata_status, Error};
use crate::tiers::{Device, STRATA_DEVICE_CPU};
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
    /// Bytes on the compute device; STRATA_UNLIMITED; 0 = nothing resident between uses.
    pub vram_limit: u64,
    /// Bytes of host memory for disk-tier copies and staging; STRATA_UNLIMITED.
    pub host_limit: u64,
    /// Layers fetched ahead of the one being computed (at most STRATA_MAX_PREFETCH_DEPTH are used).
    pub prefetch_depth: u32,
    /// STRATA_FLAG_*: STRATA_FLAG_STRICT_BUDGET refuses a layer larger than vram_limit.
    pub flags: u32,
}

// SAFETY: repr(C), plain data, struct_size first.
unsafe impl Versioned for strata_options {
    const FIRST_RELEASED_SIZE: usize = std::mem::size_of::<strata_options>();
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

pub(crate) fn context(ctx: *const strata_context) -> crate::error::Result<Arc<Context>> {
    let token = ctx as usize;
    let cached = LAST_CONTEXT.with(|last| {
        let last = last.borrow();
        (last.0 == token).then(|| last.1.upgrade()).flatten()
    });
    if let Some(context) = cached.filter(|c| !c.is_closed()) {
        return Ok(context);
    }
    let context = CONTEXTS.get(ctx)?;
    LAST_CONTEXT.with(|last| *last.borrow_mut() = (token, Arc::downgrade(&context)));
    Ok(context)
}

/// The CPU device, no limits, prefetch depth 2, no flags.
#[no_mangle]
pub extern "C" fn strata_options_default() -> strata_options {
    boundary_value("strata_options_default", default_options(), default_options)
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
    }
}

fn options_from(raw: &strata_options) -> crate::error::Result<Options> {
    let compute = match Device::from_abi(raw.compute_device)? {
        None | Some(Device::Cpu) => Device::Cpu,
        Some(Device::Cuda) => Device::Cuda,
        Some(Device::Disk) => return Err(Error::invalid("the compute device cannot be the disk")),
    };
    if raw.flags & !STRATA_FLAG_STRICT_BUDGET != 0 {
        return Err(Error::invalid(format!(
            "unknown flags {:#x}",
            raw.flags & !STRATA_FLAG_STRICT_BUDGET
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
        *out = CONTEXTS.insert(context) as *mut strata_context;
        Ok(())
    })
}

/// Destroys a context and everything registered on it; views it handed out become invalid.
/// NULL is a no-op; a pointer already destroyed is reported through `strata_last_error` only.
#[no_mangle]
pub extern "C" fn strata_context_destroy(ctx: *mut strata_context) {
    boundary_void("strata_context_destroy", || {
        if ctx.is_null() {
            return Ok(());
        }
        // Closed first, so no thread's cached handle reaches it once it leaves the table.
        CONTEXTS.get(ctx)?.close();
        CONTEXTS.remove(ctx)
    });
}
