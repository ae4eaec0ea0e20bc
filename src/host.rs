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
        // SAFETY: the layout has a non-zero size (at least ALIGN bytes).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
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
        // SAFETY: allocated in `new` with this same layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len).unwrap()) }
    }
}

/// Bytes in use, their high-water mark and the limit they are held to, updated from any thread.
#[derive(Debug)]
pub struct MemoryCounter {
    in_use: AtomicU64,
    peak: AtomicU64,
    /// `host_limit` as the C ABI spells it (`STRATA_UNLIMITED`: none); it can change at any time.
    limit: AtomicU64,
}

impl MemoryCounter {
    pub fn with_limit(limit: u64) -> MemoryCounter {
        MemoryCounter {
            in_use: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            limit: AtomicU64::new(limit),
        }
    }

    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }

    pub fn set_limit(&self, limit: u64) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    pub fn add(&self, bytes: u64) {
        let now = self.in_use.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    pub fn sub(&self, bytes: u64) {
        self.in_use.fetch_sub(bytes, Ordering::Relaxed);
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
    pub fn new(len: usize, counter: &std::sync::Arc<MemoryCounter>) -> Result<CountedBuffer> {
        let buffer = HostBuffer::new(len)?;
        counter.add(len as u64);
        Ok(CountedBuffer {
            buffer,
            counter: counter.clone(),
        })
    }
}

impl Drop for CountedBuffer {
    fn drop(&mut self) {
        self.counter.sub(self.buffer.len() as u64);
    }
}
