//! The CPU as a compute device: RAM is the compute tier and conversions run on the host. It is a
//! real device, not a mock: every test without a GPU drives the whole engine through it.

use super::{
    convert_into_slot, convert_into_slot_part, slot_contents, Backend, DeviceMemory, TensorSlot,
};
use crate::convert::{Engine, TensorBytes};
use crate::error::Result;
use crate::host::HostBuffer;
use crate::tiers::Device;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Freed buffers kept for the next allocation of the same size, at most this many and this many
/// bytes: a repeating pass frees and allocates the same sizes over and over, and a fresh mapping
/// costs a page fault per page when filled and a TLB shootdown when unmapped. The bound keeps the
/// memory held beside the budget small.
const POOL_BUFFERS: usize = 3;
const POOL_BYTES: usize = 32 << 20;

type Pool = Arc<Mutex<Vec<HostBuffer>>>;

#[derive(Default)]
pub struct CpuBackend {
    pool: Pool,
    allocations: AtomicU64,
    conversions: Engine,
}

impl CpuBackend {
    /// A CPU device whose uploads and conversions run as `conversions`.
    pub fn with_conversions(conversions: Engine) -> CpuBackend {
        CpuBackend {
            conversions,
            ..CpuBackend::default()
        }
    }
}

/// A buffer that goes back to the pool, room permitting, when its device copy is dropped.
struct Pooled {
    buffer: Option<HostBuffer>,
    pool: Pool,
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let Some(buffer) = self.buffer.take() else {
            return;
        };
        let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
        let pooled: usize = pool.iter().map(HostBuffer::len).sum();
        if pool.len() < POOL_BUFFERS && pooled + buffer.len() <= POOL_BYTES {
            pool.push(buffer);
        }
    }
}

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
        let reused = {
            let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
            let found = pool.iter().position(|b| b.len() == bytes);
            found.map(|i| pool.swap_remove(i))
        };
        // A reused buffer holds old bytes: every fill writes each tensor's data and scales, and
        // nothing reads the padding between them.
        let buffer = match reused {
            Some(buffer) => buffer,
            None => {
                self.allocations.fetch_add(1, Ordering::Relaxed);
                HostBuffer::new(bytes)?
            }
        };
        Ok(DeviceMemory {
            addr: buffer.as_ptr() as u64,
            len: bytes,
            _owner: Box::new(Pooled {
                buffer: Some(buffer),
                pool: self.pool.clone(),
            }),
        })
    }

    fn upload(&self, src: TensorBytes<'_>, dst: &DeviceMemory, slot: &TensorSlot) -> Result<()> {
        convert_into_slot(src, slot, bytes_mut(dst), self.conversions)
    }

    fn upload_part(
        &self,
        src: TensorBytes<'_>,
        dst: &DeviceMemory,
        slot: &TensorSlot,
        first_element: usize,
    ) -> Result<()> {
        convert_into_slot_part(src, slot, bytes_mut(dst), first_element, self.conversions)
    }

    fn host_writable<'a>(&self, dst: &'a DeviceMemory) -> Option<&'a mut [u8]> {
        Some(bytes_mut(dst))
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
        convert_into_slot(src, dst_slot, bytes_mut(dst), self.conversions)
    }

    fn release_idle(&self) -> Result<()> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner()).clear();
        Ok(())
    }

    fn allocations(&self) -> u64 {
        self.allocations.load(Ordering::Relaxed)
    }
}
