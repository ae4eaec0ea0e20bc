//! The compute device as the engine sees it: memory it can allocate, and the two ways bytes get
//! into that memory (an upload from host memory, a conversion already on the device). The engine,
//! the budget and the schedule use only this trait, never a concrete backend; the layout of a
//! layer in a buffer is the backend-independent `crate::slot`.
//!
//! # The contract a backend keeps
//!
//! - **Threads.** Any thread that calls into the context may call any method (several at once):
//!   the callers' threads, and the copy engine's worker, which fills layers ahead.
//! - **The context lock.** Methods that only record or look (`ready_for`, `used_until`,
//!   `set_memory_cap`, `release_idle`, `allocations`, and dropping a `DeviceMemory` at eviction)
//!   may be called with the context lock held, so they must never call back into the context.
//!   Fills (`allocate`, the transfers, `pin_host`) run without it, so a slow copy never holds up
//!   other layers. Each method's doc says which.
//! - **Blocking.** Only fills and memory give-backs may block the host, never on the caller's
//!   own work: ordering with the caller's stream goes through `ready_for`/`used_until`, which
//!   enqueue waits on the device.
//! - **One writer per fill.** The transfers take `&mut DeviceMemory`: the fill that allocated the
//!   memory owns it alone until it installs it, and no view of it is handed out before.
//! - **Errors.** `allocate`'s `OUT_OF_MEMORY` means "evict and retry"; every other error fails the
//!   one call it came from, and leaves the backend usable. Each method's doc says what the
//!   caller does.
//! - **Freeing.** Dropping a `DeviceMemory` gives it back; the backend reuses or frees it only
//!   after the work enqueued on the streams that used it (see `used_until`) has run.

pub mod cpu;
pub mod cuda;

use crate::convert::{Engine, TensorBytes};
use crate::error::{Error, Result};
use crate::slot::TensorSlot;
use crate::tiers::Device;
use std::any::Any;

/// The device memory an allocation takes from the device, which is what the budget counts. A
/// GPU's driver maps memory in pages: on an H200 (driver 580), cuMemAlloc packs allocations of up
/// to 1 MiB into shared 2 MiB pages, and takes whole 2 MiB pages for larger ones (2 MiB + 12 KiB
/// takes 4 MiB), so a budget counting the bytes asked for would be overrun by up to a page per
/// buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Footprint {
    /// The device's page; 0 where an allocation takes what it asks for.
    page: usize,
}

impl Footprint {
    /// Allocations take exactly their size (the CPU device: its pages are the kernel's concern).
    /// A function rather than an associated constant, which cbindgen would put in the C header.
    pub fn exact() -> Footprint {
        Footprint { page: 0 }
    }

    /// Allocations of more than half of `page` take whole pages.
    pub fn paged(page: usize) -> Footprint {
        Footprint { page }
    }

    /// The bytes an allocation of `bytes` takes.
    pub fn of(self, bytes: usize) -> usize {
        if self.page == 0 || bytes <= self.page / 2 {
            bytes
        } else {
            bytes.div_ceil(self.page) * self.page
        }
    }
}

/// A caller's stream, as the caller names it: on CUDA a `CUstream` (the default, NULL, is the
/// legacy default stream); the CPU ignores it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamHandle(pub usize);

/// Memory on the compute device. `addr` is what the caller's kernels receive.
pub struct DeviceMemory {
    pub addr: u64,
    pub len: usize,
    /// Keeps the allocation alive; dropping it frees the memory.
    pub _owner: Box<dyn Any + Send + Sync>,
}

pub trait Backend: Send + Sync {
    // Identity: fixed for the backend's life; cheap, never block, callable anywhere.

    fn device(&self) -> Device;
    fn device_index(&self) -> i32;
    /// True when code computing on this device can read strata's host buffers in place, so a host
    /// copy already in the computation dtype is handed out without a copy.
    fn reads_host_memory(&self) -> bool;

    // Memory.

    /// Fresh device memory of `bytes`, for one fill. Called without the context lock, from the
    /// acquiring thread or the copy engine; may block (it may wait for the device to finish with
    /// pooled memory before giving it back to the driver). `OUT_OF_MEMORY` makes the caller evict
    /// an unused resident layer (taking the context lock) and call again, until none is left;
    /// any other error fails the fill.
    fn allocate(&self, bytes: usize) -> Result<DeviceMemory>;
    /// What an allocation takes from the device: layers' device copies are sized by it at
    /// registration, so the budget counts what the device really gives. Fixed for the backend's
    /// life; never blocks.
    fn footprint(&self) -> Footprint {
        Footprint::exact()
    }
    /// The most device memory the backend may hold, in use and kept for reuse: the budget's cap
    /// (it may also keep as much as the budget has held in use since). Called once when the
    /// context is made, then by `set_vram_limit` with the context lock held, after it evicted
    /// down to the new limit; may block to give memory back. An error fails that call.
    fn set_memory_cap(&self, _bytes: u64) -> Result<()> {
        Ok(())
    }
    /// Gives back what the backend keeps for reuse beside the layers (pooled buffers, staging
    /// memory): called with the context lock held once the last group is gone, so that nothing
    /// stays held for nothing. May block. An error is only logged: the group is gone either way.
    fn release_idle(&self) -> Result<()> {
        Ok(())
    }
    /// Device allocations made from the system so far (cuMemAlloc on CUDA; on the CPU, buffers
    /// that needed fresh pages mapped): flat once a repeating pass is warm. For the statistics,
    /// with or without the context lock; never blocks.
    fn allocations(&self) -> u64;

    // Transfer: writes into memory one fill owns. Called without the context lock, from the
    // thread doing the fill (an acquiring thread or the copy engine), while the layer is marked
    // busy; `&mut` makes that fill the only writer. Each may block the host for staging (a ring
    // slot to free up, a conversion through the host). An error fails the fill: the caller drops
    // `dst` and refunds its bytes, and the acquire (or the prefetch) reports it.

    /// Writes `src` (host memory) into `dst` at `slot`, converted to `slot.repr`.
    fn upload(&self, src: TensorBytes<'_>, dst: &mut DeviceMemory, slot: &TensorSlot)
        -> Result<()>;
    /// Writes part of a tensor, whole elements from `first_element` on (see
    /// `slot::convert_into_slot_part`): how a tensor larger than the staging area arrives. Into
    /// an unscaled slot; a backend whose memory the host writes (`host_writable`) also takes
    /// whole rows of a slot scaled per row, and the others refuse scaled slots (they get those
    /// tensors whole, to quantize where their rule says).
    fn upload_part(
        &self,
        src: TensorBytes<'_>,
        dst: &mut DeviceMemory,
        slot: &TensorSlot,
        first_element: usize,
    ) -> Result<()>;
    /// The device memory as host bytes, when the host can write it directly (the CPU device):
    /// a read from the checkpoint then lands in place, with no staging at all. None otherwise.
    fn host_writable<'a>(&self, dst: &'a mut DeviceMemory) -> Option<&'a mut [u8]>;
    /// Converts a tensor already on the device into another slot on the device.
    fn convert(
        &self,
        src: &DeviceMemory,
        src_slot: &TensorSlot,
        dst: &mut DeviceMemory,
        dst_slot: &TensorSlot,
    ) -> Result<()>;
    /// Host memory the device keeps for its own staging under `host_limit` (counted against
    /// it): what a fill may stage beside it is the rest. Called during a fill, without the lock.
    fn staging_host_bytes(&self, _host_limit: u64) -> u64 {
        0
    }
    /// Pins a host copy in place, so uploads from it go straight to the device; the guard
    /// unpins it and must be dropped before the memory is freed. Called without the context lock
    /// when a host copy is made; may block. None when the device has no use for it, or pinning
    /// was refused (then uploads are staged, and the backend says so in the log).
    fn pin_host(&self, _bytes: &[u8]) -> Option<Box<dyn Any + Send + Sync>> {
        None
    }

    // Ordering with the caller's stream. A device whose fills are done when they return (the
    // CPU) ignores streams.

    /// Refuses a caller's stream the device cannot order work on (on CUDA, one of another
    /// context, or one being captured into a graph). Called first by acquire and release, from
    /// the caller's thread, without the lock: an error refuses the call before anything changes.
    fn check_stream(&self, _stream: StreamHandle) -> Result<()> {
        Ok(())
    }
    /// Makes the work the caller enqueues on `stream` from now on see `memory`'s last fill,
    /// without blocking the host. Called by acquire from the caller's thread with the context lock
    /// held; an error ends the use just begun and fails the acquire.
    fn ready_for(&self, _memory: &DeviceMemory, _stream: StreamHandle) -> Result<()> {
        Ok(())
    }
    /// Ends the caller's use of `memory` on `stream`: the memory is written again, or freed, only
    /// after the work enqueued there so far has run. Called by release from the caller's thread
    /// with the context lock held, without blocking the host; an error fails the release, and the
    /// layer stays acquired.
    fn used_until(&self, _memory: &DeviceMemory, _stream: StreamHandle) -> Result<()> {
        Ok(())
    }
}

/// The CUDA device `index`. Checks that the driver library loads before any other CUDA call:
/// without it cudarc panics, and strata must not take its host process down.
pub fn open_cuda(
    index: i32,
    headroom: u64,
    host: std::sync::Arc<crate::host::MemoryCounter>,
    logger: std::sync::Arc<crate::log::Logger>,
    conversions: Engine,
) -> Result<Box<dyn Backend>> {
    use cudarc::driver::result;
    // SAFETY: only tries to open the driver's shared library by its usual names, and closes it.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(Error::no_device(format!(
            "CUDA device {index} requested, but no CUDA driver is installed (libcuda could not be loaded)"
        )));
    }
    let count = result::init()
        .and_then(|()| result::device::get_count())
        .map_err(|e| Error::no_device(format!("the CUDA driver did not start: {e}")))?;
    if index < 0 || index >= count {
        return Err(Error::no_device(format!(
            "CUDA device {index} does not exist: this machine has {count}"
        )));
    }
    Ok(Box::new(cuda::CudaBackend::open(
        index,
        headroom,
        host,
        logger,
        conversions,
    )?))
}
