//! Host memory that strata owns: aligned, fallible allocations, and counters of bytes held.

use crate::error::{Error, Result};
use std::alloc::{self, Layout};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

/// Alignment of every buffer and of every tensor inside one: enough for any dtype and for
/// 64-byte vector loads, on the host and on a GPU.
pub(crate) const ALIGN: usize = 64;

/// Rounds `n` up to a multiple of `ALIGN`.
pub fn align_up(n: usize) -> usize {
    n.div_ceil(ALIGN) * ALIGN
}

/// Buffers at least this large are mapped straight from the kernel. Its pages arrive zeroed on
/// first touch, so zero-initialising costs nothing until a byte is written; the allocator's path
/// for `ALIGN` alignment instead writes every byte with memset, which doubles the memory traffic
/// of a buffer that a read or a copy fills next. No MADV_HUGEPAGE: where the kernel defragments
/// for such mappings, a page fault may compact memory synchronously, which stalled single fills
/// by 20-30 ms in `strata bench`; the CPU device reuses its buffers instead (`backend::cpu`).
/// Unmapping gives the memory back to the system at once, so what the
/// process holds follows what `MemoryCounter` counts.
pub(crate) const MAP_THRESHOLD: usize = 1 << 20;

/// A zero-initialised, `ALIGN`-aligned byte buffer whose allocation failure is an error, not an abort.
pub struct HostBuffer {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: HostBuffer owns its allocation exclusively, like a Box<[u8]>.
unsafe impl Send for HostBuffer {}
// SAFETY: shared access only reads through `as_slice`; writes need `&mut self`.
unsafe impl Sync for HostBuffer {}

impl HostBuffer {
    pub fn new(len: usize) -> Result<HostBuffer> {
        let layout = Self::layout(len)?;
        let raw = if len >= MAP_THRESHOLD {
            map_zeroed(len)
        } else {
            // SAFETY: the layout has a non-zero size (at least ALIGN bytes).
            unsafe { alloc::alloc_zeroed(layout) }
        };
        let ptr = NonNull::new(raw).ok_or_else(|| {
            Error::out_of_memory(format!("could not allocate {len} bytes of host memory"))
        })?;
        Ok(HostBuffer { ptr, len })
    }

    fn layout(len: usize) -> Result<Layout> {
        Layout::from_size_align(len.max(1), ALIGN)
            .map_err(|_| Error::out_of_memory(format!("{len} bytes is too large an allocation")))
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised bytes for as long as self lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and &mut self makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        if self.len >= MAP_THRESHOLD {
            // SAFETY: mapped in `new` with this same length, and unmapped only here. munmap of a
            // live mapping does not fail.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        } else {
            // SAFETY: allocated in `new` with this same layout.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len).unwrap()) }
        }
    }
}

/// A fresh private anonymous mapping of `len` bytes (page-aligned, so `ALIGN`-aligned, and
/// zero-filled by the kernel), or null when the system refuses it.
fn map_zeroed(len: usize) -> *mut u8 {
    // SAFETY: an anonymous mapping at an address the kernel picks touches no existing memory.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        return std::ptr::null_mut();
    }
    addr.cast()
}

/// Bytes in use, their high-water mark, and an optional hard limit, updated from any thread.
#[derive(Debug)]
pub struct MemoryCounter {
    in_use: AtomicU64,
    peak: AtomicU64,
    /// `u64::MAX` (`STRATA_UNLIMITED`): no limit.
    limit: AtomicU64,
}

impl Default for MemoryCounter {
    fn default() -> Self {
        Self::with_limit(u64::MAX)
    }
}

impl MemoryCounter {
    pub fn with_limit(limit: u64) -> MemoryCounter {
        MemoryCounter {
            in_use: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            limit: AtomicU64::new(limit),
        }
    }

    /// Counts `bytes` more as held, unless that would take the total over the limit.
    ///
    /// Over the limit is `STRATA_ERR_BUDGET`, not `OUT_OF_MEMORY`: the limit is one the user set
    /// (`host_limit`), as `vram_limit` is for the device, and the cure is to raise it or to hold
    /// less, not to free memory on the machine. `OUT_OF_MEMORY` stays for allocations the system
    /// refuses. Charges are atomic: threads charging at once never take the total over the limit.
    pub fn try_charge(&self, bytes: u64) -> Result<()> {
        let mut held = self.in_use.load(Ordering::Relaxed);
        loop {
            let limit = self.limit();
            let total = held.checked_add(bytes).filter(|&total| total <= limit);
            let Some(total) = total else {
                return Err(Error::budget(format!(
                    "{bytes} more bytes of host memory would go over host_limit ({limit} bytes): \
                     {held} bytes are held"
                )));
            };
            match self.in_use.compare_exchange_weak(
                held,
                total,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    self.peak.fetch_max(total, Ordering::Relaxed);
                    return Ok(());
                }
                Err(now) => held = now,
            }
        }
    }

    /// Counts `bytes` as no longer held; they must have been charged.
    pub fn uncharge(&self, bytes: u64) {
        self.in_use.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Changes the limit from now on. A limit below what is held takes nothing back: charges fail
    /// until enough has been given back.
    pub fn set_limit(&self, limit: u64) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }

    pub fn in_use(&self) -> u64 {
        self.in_use.load(Ordering::Relaxed)
    }

    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

/// A host buffer whose bytes count in a `MemoryCounter` for exactly as long as it lives.
pub struct CountedBuffer {
    pub buffer: HostBuffer,
    counter: std::sync::Arc<MemoryCounter>,
}

impl CountedBuffer {
    /// Charges `len` bytes to `counter` (`BUDGET` over its limit), then allocates them.
    pub fn new(len: usize, counter: &std::sync::Arc<MemoryCounter>) -> Result<CountedBuffer> {
        counter.try_charge(len as u64)?;
        let buffer = HostBuffer::new(len).inspect_err(|_| counter.uncharge(len as u64))?;
        Ok(CountedBuffer {
            buffer,
            counter: counter.clone(),
        })
    }
}

impl Drop for CountedBuffer {
    fn drop(&mut self) {
        self.counter.uncharge(self.buffer.len() as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{STRATA_ERR_BUDGET, STRATA_ERR_OUT_OF_MEMORY};
    use std::sync::Arc;

    #[test]
    fn buffers_small_and_mapped_are_zeroed_aligned_and_writable() {
        for len in [
            0,
            1,
            100,
            MAP_THRESHOLD - 1,
            MAP_THRESHOLD,
            5 * MAP_THRESHOLD + 3,
        ] {
            let mut buffer = HostBuffer::new(len).unwrap();
            assert_eq!(buffer.len(), len);
            assert_eq!(buffer.as_ptr() as usize % ALIGN, 0, "{len}");
            assert!(buffer.as_slice().iter().all(|&b| b == 0), "{len}");
            buffer.as_mut_slice().fill(0xa5);
            assert!(buffer.as_slice().iter().all(|&b| b == 0xa5), "{len}");
        }
    }

    #[test]
    fn charges_stop_at_the_limit_and_name_it() {
        let counter = MemoryCounter::with_limit(100);
        counter.try_charge(60).unwrap();
        counter.try_charge(40).unwrap();
        let error = counter.try_charge(1).unwrap_err();
        assert_eq!(error.status, STRATA_ERR_BUDGET, "{error}");
        assert!(error.message.contains("host_limit (100 bytes)"), "{error}");
        assert!(error.message.contains("100 bytes are held"), "{error}");
        assert_eq!(counter.in_use(), 100, "a refused charge holds nothing");
        counter.uncharge(60);
        counter.try_charge(50).unwrap();
        assert_eq!((counter.in_use(), counter.peak()), (90, 100));
        // A charge whose sum overflows is over any limit, even "unlimited".
        let unlimited = MemoryCounter::default();
        unlimited.try_charge(u64::MAX).unwrap();
        assert_eq!(
            unlimited.try_charge(1).unwrap_err().status,
            STRATA_ERR_BUDGET
        );
    }

    #[test]
    fn a_live_limit_below_what_is_held_blocks_new_charges_only() {
        let counter = MemoryCounter::default();
        assert_eq!(counter.limit(), u64::MAX);
        counter.try_charge(1 << 40).unwrap();
        counter.set_limit(1 << 20);
        assert_eq!(counter.in_use(), 1 << 40);
        assert!(counter.try_charge(1).is_err());
        counter.uncharge((1 << 40) - 1000);
        counter.try_charge((1 << 20) - 1000).unwrap();
        assert!(counter.try_charge(1).is_err());
        counter.set_limit(u64::MAX);
        counter.try_charge(1).unwrap();
        assert_eq!(counter.peak(), 1 << 40);
    }

    #[test]
    fn counted_buffers_charge_while_they_live_and_refuse_over_the_limit() {
        let counter = Arc::new(MemoryCounter::with_limit(4096));
        let first = CountedBuffer::new(3000, &counter).unwrap();
        assert_eq!(first.buffer.len(), 3000);
        let error = CountedBuffer::new(2000, &counter).err().unwrap();
        assert_eq!(error.status, STRATA_ERR_BUDGET);
        assert_eq!(counter.in_use(), 3000);
        drop(first);
        let second = CountedBuffer::new(4096, &counter).unwrap();
        assert_eq!((counter.in_use(), counter.peak()), (4096, 4096));
        drop(second);
        assert_eq!(counter.in_use(), 0);
        // An allocation the system refuses gives its charge back.
        counter.set_limit(u64::MAX);
        let error = CountedBuffer::new(usize::MAX, &counter).err().unwrap();
        assert_eq!(error.status, STRATA_ERR_OUT_OF_MEMORY);
        assert_eq!(counter.in_use(), 0);
    }

    #[test]
    fn threads_charging_at_once_never_pass_the_limit() {
        let counter = Arc::new(MemoryCounter::with_limit(1000));
        let granted: u64 = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..4)
                .map(|_| {
                    scope.spawn(|| {
                        (0..1000).filter(|_| counter.try_charge(7).is_ok()).count() as u64
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).sum()
        });
        assert_eq!(granted, 1000 / 7);
        assert_eq!(counter.in_use(), granted * 7);
        assert!(counter.peak() <= 1000);
    }
}
