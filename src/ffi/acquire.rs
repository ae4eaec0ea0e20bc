//! Acquire and release: the calls a forward hook makes around each layer.

use super::consts::{strata_status, STRATA_MAX_DIMS};
use super::context::{context, strata_context};
use super::{boundary, out_arg};
use crate::backend::StreamHandle;
use crate::error::Error;
use crate::registry::LayerId;
use std::ffi::{c_char, c_void};

/// One tensor of an acquired layer, valid from acquire to release.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct strata_tensor_view {
    /// The tensor's name; valid while the layer is registered.
    pub name: *const c_char,
    /// The tensor's bytes in the computation tier (device memory on a GPU).
    pub data: *mut c_void,
    pub dtype: u32,
    pub device: u32,
    pub device_index: i32,
    pub ndim: u32,
    pub shape: [i64; STRATA_MAX_DIMS],
    pub nbytes: u64,
}

/// Makes a layer available in its computation tier and describes its tensors in `views`
/// (`capacity` entries; too few is STRATA_ERR_BUFFER_TOO_SMALL and nothing is acquired: see
/// strata_layer_tensor_count). Blocks until the bytes are there on the CPU device; on CUDA, makes
/// `stream` wait for them instead. Acquiring a layer already acquired counts one more use.
/// A thread that holds no layer waits for room other threads hold; strata_context_destroy ends
/// that wait with STRATA_ERR_INVALID_HANDLE. From the progress callback of its group's onload,
/// STRATA_ERR_STATE at once. A layer whose file is damaged fails with STRATA_ERR_IO or
/// STRATA_ERR_FORMAT on its own acquires only; the other layers of its group keep working.
#[no_mangle]
pub extern "C" fn strata_acquire_for_compute(
    ctx: *mut strata_context,
    layer: u64,
    stream: *mut c_void,
    views: *mut strata_tensor_view,
    capacity: usize,
    count_out: *mut usize,
) -> strata_status {
    boundary("strata_acquire_for_compute", || {
        let ctx = context(ctx)?;
        let count_out = out_arg(count_out, "count_out")?;
        if views.is_null() && capacity > 0 {
            return Err(Error::null("views"));
        }
        let count = ctx.acquire(LayerId(layer), stream_of(stream), capacity, |i, view| {
            // Element by element over the fixed length, which compiles to a few moves where a
            // copy of the slice's own length calls memcpy.
            let shape: [i64; STRATA_MAX_DIMS] =
                std::array::from_fn(|d| view.shape.get(d).copied().unwrap_or(0));
            let out = strata_tensor_view {
                name: view.name.as_ptr(),
                data: view.addr as *mut c_void,
                dtype: view.dtype.to_abi(),
                device: view.device.to_abi(),
                device_index: view.device_index,
                ndim: view.shape.len() as u32,
                shape,
                nbytes: view.nbytes,
            };
            // SAFETY: acquire only calls back for i < capacity entries, which `views` holds.
            unsafe { views.add(i).write(out) };
        })?;
        *count_out = count;
        Ok(())
    })
}

/// Ends one use of a layer. The views of the last use become invalid; the layer may stay resident.
/// A release without an acquire is STRATA_ERR_STATE.
#[no_mangle]
pub extern "C" fn strata_release(
    ctx: *mut strata_context,
    layer: u64,
    stream: *mut c_void,
) -> strata_status {
    boundary("strata_release", || {
        context(ctx)?.release(LayerId(layer), stream_of(stream))
    })
}

/// The caller's `CUstream` as strata carries it (the pointer's value; ignored on the CPU).
fn stream_of(stream: *mut c_void) -> StreamHandle {
    StreamHandle(stream as usize)
}
