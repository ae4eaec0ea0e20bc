//! The compute device as the engine sees it: memory it can allocate, and the two ways bytes get
//! into that memory (an upload from host memory, a conversion already on the device). The engine,
//! the budget and the schedule use only this trait, never a concrete backend.

pub mod cpu;
pub mod cuda;

use crate::convert::{Engine, TensorBytes};
use crate::error::{Error, Result};
use crate::tiers::{Device, Repr};
use std::any::Any;

/// Where one tensor sits inside a buffer (host copy or device memory), and in which form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorSlot {
    pub offset: usize,
    pub repr: Repr,
    pub numel: usize,
    /// Size of dimension 0 for tensors of two or more dimensions, else 1: the per-channel groups.
    pub rows: usize,
    /// Where the `repr.scale_count(rows)` f32 scales start (only meaningful when there are some).
    pub scales_offset: usize,
}

impl TensorSlot {
    pub fn data_bytes(&self) -> usize {
        self.numel * self.repr.dtype.size()
    }
    pub fn scale_count(&self) -> usize {
        self.repr.scale_count(self.rows)
    }
}

/// Lays tensors out one after another in one buffer, each part aligned; returns the slots and the
/// total size. `shapes` gives (numel, rows, repr) per tensor.
pub fn layout(shapes: impl IntoIterator<Item = (usize, usize, Repr)>) -> (Vec<TensorSlot>, usize) {
    let mut offset = 0;
    let mut slots = Vec::new();
    for (numel, rows, repr) in shapes {
        let data_offset = offset;
        offset = crate::host::align_up(offset + numel * repr.dtype.size());
        let scales_offset = offset;
        offset = crate::host::align_up(offset + repr.scale_count(rows) * 4);
        slots.push(TensorSlot {
            offset: data_offset,
            repr,
            numel,
            rows,
            scales_offset,
        });
    }
    (slots, offset)
}

/// Converts `src` into `slot`'s form inside `buffer` (the whole buffer the slot lies in), writing
/// the data and, for scaled fp8, the scales after it.
pub fn convert_into_slot(
    src: TensorBytes<'_>,
    slot: &TensorSlot,
    buffer: &mut [u8],
    engine: Engine,
) -> Result<()> {
    let scales_end = slot.scales_offset + slot.scale_count() * 4;
    if slot.offset + slot.data_bytes() > slot.scales_offset || scales_end > buffer.len() {
        return Err(Error::invalid("tensor slot lies outside its buffer"));
    }
    let (data, rest) = buffer.split_at_mut(slot.scales_offset);
    let data = &mut data[slot.offset..slot.offset + slot.data_bytes()];
    let scales = crate::convert::convert_with(
        src,
        slot.rows,
        data,
        slot.repr.dtype,
        slot.repr.quant,
        engine,
    )?;
    if scales.len() != slot.scale_count() {
        return Err(Error::invalid(
            "conversion produced an unexpected number of scales",
        ));
    }
    for (out, scale) in rest.chunks_exact_mut(4).zip(scales) {
        out.copy_from_slice(&scale.to_ne_bytes());
    }
    Ok(())
}

/// Converts a run of whole elements of an unscaled source into `slot`'s data, starting at element
/// `first_element`: a tensor streamed through a staging area smaller than itself. Only for slots
/// without scales, whose conversion is element by element.
pub fn convert_into_slot_part(
    src: TensorBytes<'_>,
    slot: &TensorSlot,
    buffer: &mut [u8],
    first_element: usize,
    engine: Engine,
) -> Result<()> {
    if slot.scale_count() != 0 || !src.scales.is_empty() {
        return Err(Error::invalid(
            "a scaled tensor converts whole, not in parts",
        ));
    }
    let size = slot.repr.dtype.size();
    let count = src.bytes.len() / src.dtype.size();
    let start = slot.offset + first_element * size;
    if first_element + count > slot.numel || start + count * size > buffer.len() {
        return Err(Error::invalid("tensor part lies outside its slot"));
    }
    crate::convert::convert_with(
        src,
        1,
        &mut buffer[start..start + count * size],
        slot.repr.dtype,
        crate::convert::Quant::None,
        engine,
    )?;
    Ok(())
}

/// A slot's data bytes and its scales, read from the buffer the slot lies in.
pub fn slot_contents<'a>(slot: &TensorSlot, buffer: &'a [u8]) -> Result<(&'a [u8], Vec<f32>)> {
    let scales_end = slot.scales_offset + slot.scale_count() * 4;
    if slot.offset + slot.data_bytes() > buffer.len() || scales_end > buffer.len() {
        return Err(Error::invalid("tensor slot lies outside its buffer"));
    }
    let scales = buffer[slot.scales_offset..scales_end]
        .chunks_exact(4)
        .map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok((
        &buffer[slot.offset..slot.offset + slot.data_bytes()],
        scales,
    ))
}

/// Memory on the compute device. `addr` is what the caller's kernels receive.
pub struct DeviceMemory {
    pub addr: u64,
    pub len: usize,
    /// Keeps the allocation alive; dropping it frees the memory.
    pub _owner: Box<dyn Any + Send + Sync>,
}

pub trait Backend: Send + Sync {
    fn device(&self) -> Device;
    fn device_index(&self) -> i32;
    /// True when code computing on this device can read strata's host buffers in place, so a host
    /// copy already in the computation dtype is handed out without a copy.
    fn reads_host_memory(&self) -> bool;
    fn allocate(&self, bytes: usize) -> Result<DeviceMemory>;
    /// Writes `src` (host memory) into `dst` at `slot`, converted to `slot.repr`.
    fn upload(&self, src: TensorBytes<'_>, dst: &DeviceMemory, slot: &TensorSlot) -> Result<()>;
    /// Writes part of an unscaled tensor, whole elements from `first_element` on (see
    /// `convert_into_slot_part`): how a tensor larger than the staging area arrives.
    fn upload_part(
        &self,
        src: TensorBytes<'_>,
        dst: &DeviceMemory,
        slot: &TensorSlot,
        first_element: usize,
    ) -> Result<()>;
    /// The device memory as host bytes, when the host can write it directly (the CPU device):
    /// a read from the checkpoint then lands in place, with no staging at all. The engine fills a
    /// buffer from one thread at a time and hands out no views of it until the fill is done.
    #[allow(clippy::mut_from_ref)]
    fn host_writable<'a>(&self, dst: &'a DeviceMemory) -> Option<&'a mut [u8]>;
    /// Converts a tensor already on the device into another slot on the device.
    fn convert(
        &self,
        src: &DeviceMemory,
        src_slot: &TensorSlot,
        dst: &DeviceMemory,
        dst_slot: &TensorSlot,
    ) -> Result<()>;

    /// Refuses a caller's stream the device cannot order work on (on CUDA, one of another
    /// context), before anything changes. A device whose fills are done when they return (the
    /// CPU) ignores streams.
    fn check_stream(&self, _stream: usize) -> Result<()> {
        Ok(())
    }
    /// Makes the work the caller enqueues on `stream` from now on see `memory`'s last fill,
    /// without blocking the host.
    fn ready_for(&self, _memory: &DeviceMemory, _stream: usize) -> Result<()> {
        Ok(())
    }
    /// Ends the caller's use of `memory` on `stream`: the memory is written again, or freed, only
    /// after the work enqueued there so far has run.
    fn used_until(&self, _memory: &DeviceMemory, _stream: usize) -> Result<()> {
        Ok(())
    }
    /// Pins a host copy in place, so uploads from it go straight to the device; the guard
    /// unpins it and must be dropped before the memory is freed. None when the device has no use
    /// for it, or pinning was refused (then uploads are staged).
    fn pin_host(&self, _bytes: &[u8]) -> Option<Box<dyn Any + Send + Sync>> {
        None
    }
    /// Host memory the device keeps for its own staging under `host_limit` (counted against
    /// it): what a fill may stage beside it is the rest.
    fn staging_host_bytes(&self, _host_limit: u64) -> u64 {
        0
    }
    /// The most device memory the backend may hold, in use and kept for reuse: the budget's cap
    /// (it may also keep as much as the budget has held in use since).
    fn set_memory_cap(&self, _bytes: u64) -> Result<()> {
        Ok(())
    }
    /// Gives back what the backend keeps for reuse beside the layers (pooled buffers, staging
    /// memory): called once the last group is gone, so that nothing stays held for nothing.
    fn release_idle(&self) -> Result<()> {
        Ok(())
    }
    /// Device allocations made from the system so far (cuMemAlloc on CUDA; on the CPU, buffers
    /// that needed fresh pages mapped): flat once a repeating pass is warm.
    fn allocations(&self) -> u64;
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
