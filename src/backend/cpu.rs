//! The CPU as a compute device: RAM is the compute tier and conversions run on the host. It is a
//! real device, not a mock: every test without a GPU drives the whole engine through it.

use super::{Backend, DeviceMemory, TensorSlot};
use crate::convert::{self, TensorBytes};
use crate::error::{Error, Result};
use crate::host::HostBuffer;
use crate::tiers::Device;

pub struct CpuBackend;

/// A slot's data and scales inside memory this backend allocated, as raw ranges.
fn slot_ranges(
    memory: &DeviceMemory,
    slot: &TensorSlot,
) -> Result<(*mut u8, usize, *mut u8, usize)> {
    let data_len = slot.data_bytes();
    let scales_len = slot.scale_count() * 4;
    if slot.offset + data_len > memory.len || slot.scales_offset + scales_len > memory.len {
        return Err(Error::invalid("tensor slot lies outside its device buffer"));
    }
    let base = memory.addr as *mut u8;
    // SAFETY: both offsets were checked to lie inside the `memory.len` bytes of the allocation.
    unsafe {
        Ok((
            base.add(slot.offset),
            data_len,
            base.add(slot.scales_offset),
            scales_len,
        ))
    }
}

/// Writes converted data and its scales into a slot's two byte ranges.
fn write_converted(
    src: TensorBytes<'_>,
    slot: &TensorSlot,
    data: &mut [u8],
    scales: &mut [u8],
) -> Result<()> {
    let produced = convert::convert(src, slot.rows, data, slot.repr.dtype, slot.repr.quant)?;
    if produced.len() * 4 != scales.len() {
        return Err(Error::invalid(
            "conversion produced an unexpected number of scales",
        ));
    }
    for (out, scale) in scales.chunks_exact_mut(4).zip(produced) {
        out.copy_from_slice(&scale.to_ne_bytes());
    }
    Ok(())
}

impl Backend for CpuBackend {
    fn device(&self) -> Device {
        Device::Cpu
    }

    fn device_index(&self) -> i32 {
        0
    }

    fn reads_host_memory(&self) -> bool {
        true
    }

    fn allocate(&self, bytes: usize) -> Result<DeviceMemory> {
        let buffer = HostBuffer::new(bytes)?;
        Ok(DeviceMemory {
            addr: buffer.as_ptr() as u64,
            len: bytes,
            _owner: Box::new(buffer),
        })
    }

    fn upload(&self, src: TensorBytes<'_>, dst: &DeviceMemory, slot: &TensorSlot) -> Result<()> {
        let (data, data_len, scales, scales_len) = slot_ranges(dst, slot)?;
        // SAFETY: `dst` is a live HostBuffer from `allocate`; layout puts data and scales in disjoint
        // ranges; the engine hands a buffer being filled to one writer and gives out no views of it
        // until the fill is done.
        let (data, scales) = unsafe {
            (
                std::slice::from_raw_parts_mut(data, data_len),
                std::slice::from_raw_parts_mut(scales, scales_len),
            )
        };
        write_converted(src, slot, data, scales)
    }

    fn convert(
        &self,
        src: &DeviceMemory,
        src_slot: &TensorSlot,
        dst: &DeviceMemory,
        dst_slot: &TensorSlot,
    ) -> Result<()> {
        let (src_data, src_len, src_scales, src_scales_len) = slot_ranges(src, src_slot)?;
        // SAFETY: `src` is a live, fully written buffer from `allocate`; nothing writes to it while
        // the engine converts from it (it only reads, as the caller's kernels do).
        let (src_data, src_scales) = unsafe {
            (
                std::slice::from_raw_parts(src_data as *const u8, src_len),
                std::slice::from_raw_parts(src_scales as *const u8, src_scales_len),
            )
        };
        let scales: Vec<f32> = src_scales
            .chunks_exact(4)
            .map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let (data, data_len, out_scales, out_scales_len) = slot_ranges(dst, dst_slot)?;
        // SAFETY: as in `upload`; `dst` is a different allocation from `src`.
        let (data, out_scales) = unsafe {
            (
                std::slice::from_raw_parts_mut(data, data_len),
                std::slice::from_raw_parts_mut(out_scales, out_scales_len),
            )
        };
        let src_bytes = TensorBytes {
            bytes: src_data,
            dtype: src_slot.repr.dtype,
            scales: &scales,
        };
        write_converted(src_bytes, dst_slot, data, out_scales)
    }
}
