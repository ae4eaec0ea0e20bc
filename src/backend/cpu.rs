//! The CPU as a compute device: RAM is the compute tier and conversions run on the host. It is a
//! real device, not a mock: every test without a GPU drives the whole engine through it.

use super::{convert_into_slot, slot_contents, Backend, DeviceMemory, TensorSlot};
use crate::convert::TensorBytes;
use crate::error::Result;
use crate::host::HostBuffer;
use crate::tiers::Device;

pub struct CpuBackend;

/// All bytes of memory this backend allocated, to read.
fn bytes(memory: &DeviceMemory) -> &[u8] {
    // SAFETY: `memory` was made by `allocate` from a live HostBuffer of `memory.len` bytes, which
    // `memory` owns; nothing writes to a buffer while the engine reads from it.
    unsafe { std::slice::from_raw_parts(memory.addr as *const u8, memory.len) }
}

/// All bytes of memory this backend allocated, to fill.
#[allow(clippy::mut_from_ref)]
fn bytes_mut(memory: &DeviceMemory) -> &mut [u8] {
    // SAFETY: as in `bytes`; the engine hands a buffer being filled to one writer at a time and
    // gives out no views of it until the fill is done.
    unsafe { std::slice::from_raw_parts_mut(memory.addr as *mut u8, memory.len) }
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
        convert_into_slot(src, slot, bytes_mut(dst))
    }

    fn convert(
        &self,
        src: &DeviceMemory,
        src_slot: &TensorSlot,
        dst: &DeviceMemory,
        dst_slot: &TensorSlot,
    ) -> Result<()> {
        let (data, scales) = slot_contents(src_slot, bytes(src))?;
        let src = TensorBytes {
            bytes: data,
            dtype: src_slot.repr.dtype,
            scales: &scales,
        };
        convert_into_slot(src, dst_slot, bytes_mut(dst))
    }
}
