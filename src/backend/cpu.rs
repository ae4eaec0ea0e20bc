//! The CPU as a compute device: RAM is the compute tier and conversions run on the host. It is a
//! real device, not a mock: every test without a GPU drives the whole engine through it.

use super::{Backend, DeviceMemory};
use crate::convert::{Engine, TensorBytes};
use crate::error::Result;
use crate::host::{HostBuffer, PageBank, BANKED_MIN};
use crate::slot::{convert_into_slot, convert_into_slot_part, slot_contents, TensorSlot};
use crate::tiers::Device;
use std::sync::{Arc, Mutex, PoisonError};

/// Device memory is host memory: buffers of `host::BANKED_MIN` bytes and more are mappings,
/// whose pages go to a bank when a layer leaves and make the next buffers, of whatever size (a
/// fresh mapping costs a page fault per page when filled and a TLB shootdown when unmapped, for
/// every layer of every streamed pass). What the bank keeps is device memory held: with what is
/// live it stays within the cap (`vram_limit`, or the most held live since the cap was set, as the
/// CUDA pool keeps), so the memory strata holds on the device never passes the budget. Smaller
/// buffers come from the heap, which reuses its own.
#[derive(Default)]
pub struct CpuBackend {
    pool: Arc<Mutex<Pool>>,
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

struct Pool {
    bank: PageBank,
    /// Bytes (whole pages) of the mapped buffers handed out and not yet dropped.
    live: usize,
    /// The most `live` has been since the cap was last set.
    live_peak: usize,
    cap: u64,
    /// Buffers that needed fresh pages.
    allocations: u64,
}

impl Default for Pool {
    fn default() -> Pool {
        Pool {
            bank: PageBank::default(),
            live: 0,
            live_peak: 0,
            cap: u64::MAX,
            allocations: 0,
        }
    }
}

impl Pool {
    /// Gives banked pages back until live and banked fit under the cap.
    fn trim(&mut self) {
        let cap = usize::try_from(self.cap).unwrap_or(usize::MAX);
        let bound = cap.max(self.live_peak);
        self.bank.trim(bound.saturating_sub(self.live));
    }
}

fn lock(pool: &Mutex<Pool>) -> std::sync::MutexGuard<'_, Pool> {
    pool.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A buffer whose pages go back to the bank when its device copy is dropped.
struct Pooled {
    buffer: Option<HostBuffer>,
    pool: Arc<Mutex<Pool>>,
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let Some(buffer) = self.buffer.take() else {
            return;
        };
        if buffer.len() < BANKED_MIN {
            // From the heap, as `allocate` made it: not counted in the pool.
            return;
        }
        let mut pool = lock(&self.pool);
        pool.live -= buffer.held_bytes();
        pool.bank.put(buffer);
        pool.trim();
    }
}

/// All bytes of memory this backend allocated, to read.
fn bytes(memory: &DeviceMemory) -> &[u8] {
    // SAFETY: `memory` was made by `allocate` from a live HostBuffer of `memory.len` bytes, which
    // `memory` owns; nothing writes to a buffer while the engine reads from it.
    unsafe { std::slice::from_raw_parts(memory.addr as *const u8, memory.len) }
}

/// All bytes of memory this backend allocated, to fill.
fn bytes_mut(memory: &mut DeviceMemory) -> &mut [u8] {
    // SAFETY: as in `bytes`; `&mut` makes the caller the only one using `memory` (the fill that
    // owns it: no view of it is handed out until the fill is done).
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
        // A reused buffer holds old bytes: every fill writes each tensor's data and scales, and
        // nothing reads the padding between them.
        let buffer = if bytes < BANKED_MIN {
            HostBuffer::new(bytes)?
        } else {
            let mut pool = lock(&self.pool);
            let (buffer, fresh) = pool.bank.take(bytes)?;
            pool.allocations += u64::from(fresh > 0);
            pool.live += buffer.held_bytes();
            pool.live_peak = pool.live_peak.max(pool.live);
            pool.trim();
            buffer
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

    fn upload(
        &self,
        src: TensorBytes<'_>,
        dst: &mut DeviceMemory,
        slot: &TensorSlot,
    ) -> Result<()> {
        convert_into_slot(src, slot, bytes_mut(dst), self.conversions)
    }

    fn upload_part(
        &self,
        src: TensorBytes<'_>,
        dst: &mut DeviceMemory,
        slot: &TensorSlot,
        first_element: usize,
    ) -> Result<()> {
        convert_into_slot_part(src, slot, bytes_mut(dst), first_element, self.conversions)
    }

    fn host_writable<'a>(&self, dst: &'a mut DeviceMemory) -> Option<&'a mut [u8]> {
        Some(bytes_mut(dst))
    }

    fn convert(
        &self,
        src: &DeviceMemory,
        src_slot: &TensorSlot,
        dst: &mut DeviceMemory,
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

    fn set_memory_cap(&self, bytes: u64) -> Result<()> {
        let mut pool = lock(&self.pool);
        pool.cap = bytes;
        pool.live_peak = pool.live;
        pool.trim();
        Ok(())
    }

    fn release_idle(&self) -> Result<()> {
        lock(&self.pool).bank.trim(0);
        Ok(())
    }

    fn allocations(&self) -> u64 {
        lock(&self.pool).allocations
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(backend: &CpuBackend) -> (usize, usize) {
        let pool = lock(&backend.pool);
        (pool.live, pool.bank.bytes())
    }

    #[test]
    fn buffers_of_any_size_reuse_freed_pages_within_the_cap() {
        let backend = CpuBackend::default();
        let cap = 24 << 20;
        backend.set_memory_cap(cap).unwrap();
        let sizes = [2 << 20, 12 << 20, 4 << 20, 8 << 20];
        // A repeating pass with two buffers live at once, of sizes that never repeat in turn.
        let pass = |backend: &CpuBackend| {
            let mut live = std::collections::VecDeque::new();
            for &size in sizes.iter().cycle().take(12) {
                let mut memory = backend.allocate(size).unwrap();
                backend.host_writable(&mut memory).unwrap().fill(7);
                live.push_back(memory);
                if live.len() > 2 {
                    live.pop_front();
                }
                let (live_bytes, banked) = held(backend);
                assert!(
                    (live_bytes + banked) as u64 <= cap,
                    "{live_bytes} + {banked}"
                );
            }
        };
        pass(&backend);
        let warm = backend.allocations();
        pass(&backend);
        pass(&backend);
        assert_eq!(
            backend.allocations(),
            warm,
            "a warm pass maps nothing fresh"
        );
        // A lower cap gives banked pages back at once; release_idle gives back the rest.
        backend.set_memory_cap(4 << 20).unwrap();
        assert!(held(&backend).1 <= 4 << 20);
        backend.release_idle().unwrap();
        assert_eq!(held(&backend), (0, 0));
    }

    #[test]
    fn a_streamed_model_of_many_layer_sizes_maps_nothing_fresh_once_warm() {
        // The layers of a diffusion transformer of 32 blocks (its Linear weights and biases,
        // laid out as a layer: 2, 8 and 12 MiB plus a bias, and a few others), one live at a
        // time under vram_limit 0, as streaming keeps them. Splitting and gathering banked
        // ranges leaves them ever more fragmented: the bank must still hold its pages.
        let backend = CpuBackend::default();
        backend.set_memory_cap(0).unwrap();
        let mib = 1 << 20;
        let block = [
            12 * mib + 12288,
            12 * mib + 12288,
            2 * mib + 2048,
            2 * mib + 2048,
            2 * mib + 2048,
            2 * mib + 2048,
            2 * mib + 2048,
            2 * mib + 2048,
            2 * mib + 2048,
            2 * mib + 2048,
            8 * mib + 8192,
            8 * mib + 2048,
            8 * mib + 8192,
            8 * mib + 2048,
        ];
        let mut pass = vec![130 << 10, 514 << 10, 2 * mib + 2048];
        for _ in 0..32 {
            pass.extend(block);
        }
        pass.extend([4 * mib + 8192, 128 << 10]);
        let stream = || {
            for &size in &pass {
                drop(backend.allocate(size).unwrap());
            }
        };
        stream();
        stream();
        let warm = backend.allocations();
        for _ in 0..4 {
            stream();
        }
        assert_eq!(
            backend.allocations(),
            warm,
            "a warm pass maps nothing fresh"
        );
        assert!(held(&backend).1 <= 12 * mib + 12288 + 4096);
    }

    #[test]
    fn under_a_zero_cap_the_bank_keeps_at_most_the_live_peak() {
        let backend = CpuBackend::default();
        backend.set_memory_cap(0).unwrap();
        let a = backend.allocate(8 << 20).unwrap();
        let b = backend.allocate(2 << 20).unwrap();
        let small = backend.allocate(1000).unwrap();
        assert_eq!(
            held(&backend),
            (10 << 20, 0),
            "a heap buffer is not the bank's"
        );
        drop(small);
        drop(a);
        drop(b);
        assert_eq!(held(&backend), (0, 10 << 20));
        let mut c = backend.allocate(10 << 20).unwrap();
        assert_eq!(
            backend.allocations(),
            2,
            "made of the two freed buffers' pages"
        );
        assert!(backend.host_writable(&mut c).unwrap().len() == 10 << 20);
        drop(c);
        assert_eq!(held(&backend), (0, 10 << 20));
    }
}
