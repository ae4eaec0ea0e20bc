//! Host memory that strata owns: aligned, fallible allocations, and counters of bytes held.

use crate::error::{Error, Result};
use crate::trace::{MemorySamples, Stamp};
use once_cell::sync::Lazy;
use std::alloc::{self, Layout};
use std::collections::VecDeque;
use std::mem::ManuallyDrop;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

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

/// Buffers that are made from a `PageBank` from this size on (16 pages); smaller ones come from the
/// heap. Freed heap memory stays with the allocator's arena of the thread that allocated it (each
/// thread that allocates gets one, up to 8 per CPU), so buffers of tens or hundreds of KiB
/// freed on the copy engine's thread were held there, uncounted: 18.6 MiB for a 3 MiB model of
/// 32-192 KiB layers in `strata bench --mixed --width 256`. Banked, they are counted.
pub(crate) const BANKED_MIN: usize = 64 << 10;

/// A zero-initialised, `ALIGN`-aligned byte buffer whose allocation failure is an error, not an abort.
/// (One taken from a `PageBank` holds old bytes instead.)
pub struct HostBuffer {
    ptr: NonNull<u8>,
    len: usize,
    /// A mapped buffer's pages, in order, as ranges that each lie within one kernel mapping:
    /// what `mremap` needs to move them again once banked. Empty for a heap buffer.
    segments: Vec<usize>,
}

// SAFETY: HostBuffer owns its allocation exclusively, like a Box<[u8]>.
unsafe impl Send for HostBuffer {}
// SAFETY: shared access only reads through `as_slice`; writes need `&mut self`.
unsafe impl Sync for HostBuffer {}

impl HostBuffer {
    pub fn new(len: usize) -> Result<HostBuffer> {
        let layout = Self::layout(len)?;
        if len >= MAP_THRESHOLD {
            return Self::mapped(len);
        }
        // SAFETY: the layout has a non-zero size (at least ALIGN bytes).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or_else(|| refused(len))?;
        Ok(HostBuffer {
            ptr,
            len,
            segments: Vec::new(),
        })
    }

    /// A fresh mapping of `len` bytes, whatever its size.
    fn mapped(len: usize) -> Result<HostBuffer> {
        let pages = page_round(len).ok_or_else(|| refused(len))?;
        let ptr = NonNull::new(map_zeroed(pages)).ok_or_else(|| refused(len))?;
        Ok(HostBuffer {
            ptr,
            len,
            segments: vec![pages],
        })
    }

    fn is_mapped(&self) -> bool {
        !self.segments.is_empty()
    }

    /// Bytes of memory the buffer holds: whole pages for a mapped one.
    pub fn held_bytes(&self) -> usize {
        match self.is_mapped() {
            true => self.segments.iter().sum(),
            false => self.len,
        }
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
        if self.is_mapped() {
            // SAFETY: the buffer owns every page of its segments, which lie end to end from
            // `ptr`, and unmaps them only here (one munmap may span several mappings). munmap of
            // a live range does not fail.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.held_bytes()) };
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

/// Why a buffer of `len` bytes could not be had.
fn refused(len: usize) -> Error {
    Error::out_of_memory(format!("could not allocate {len} bytes of host memory"))
}

/// The system's page size.
fn page_size() -> usize {
    static PAGE: Lazy<usize> = Lazy::new(|| {
        // SAFETY: sysconf only reads a system setting.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        usize::try_from(page)
            .ok()
            .filter(|&p| p > 0)
            .unwrap_or(4096)
    });
    *PAGE
}

/// `len` rounded up to whole pages (at least one); None on overflow.
fn page_round(len: usize) -> Option<usize> {
    len.max(1).checked_next_multiple_of(page_size())
}

/// Banked ranges at most: each is a kernel mapping or part of one, and a process may have only so
/// many mappings (vm.max_map_count, 65530 by default). Splitting and gathering ranges for buffers
/// of many sizes fragments them: streaming a diffusion transformer of 583 layers of 2 to 12 MiB
/// (plus biases) under vram_limit 0 levels off at about 1,800 ranges. At 256, the oldest ranges
/// were unmapped every pass, and their pages faulted in again (52,000 faults and 153 fresh
/// buffers per steady pass of `strata bench` on that model).
const MAX_BANKED_RANGES: usize = 4096;

/// Pages of freed mappings, kept to make the next buffers from. A fresh mapping costs a page
/// fault per page at its first touch (the kernel zeroes each page then) and a TLB shootdown when
/// unmapped: a streamed pass would pay that for every layer. Any size is made from any banked
/// pages, so layers of many sizes share one bank: a banked range at least as large is used in
/// place; else banked ranges are moved into one fresh range with `mremap`, which moves page
/// tables and faults nothing in, and only what the bank lacks arrives fresh.
///
/// Banked pages are memory held: the owner counts `bytes()` under its limit and trims the bank
/// when the limit needs room.
#[derive(Default)]
pub struct PageBank {
    /// (address, length), oldest first; each lies within one kernel mapping, as `mremap` needs.
    ranges: VecDeque<(usize, usize)>,
    bytes: usize,
}

impl PageBank {
    /// Bytes of memory the bank holds.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Keeps a buffer's pages for later; a heap buffer is simply freed.
    pub fn put(&mut self, mut buffer: HostBuffer) {
        let segments = std::mem::take(&mut buffer.segments);
        if segments.is_empty() {
            return;
        }
        let mut addr = buffer.ptr.as_ptr() as usize;
        // The pages now belong to the bank; the buffer, left without segments, owns nothing.
        std::mem::forget(buffer);
        for len in segments {
            self.ranges.push_back((addr, len));
            self.bytes += len;
            addr += len;
        }
        self.trim(usize::MAX);
    }

    /// A mapped buffer of `len` bytes made of banked pages as far as they go (they hold old
    /// bytes), and of fresh zeroed pages for the rest; with the bytes that arrived fresh.
    pub fn take(&mut self, len: usize) -> Result<(HostBuffer, usize)> {
        let pages = page_round(len).ok_or_else(|| refused(len))?;
        let smallest_that_fits = (0..self.ranges.len())
            .filter(|&i| self.ranges[i].1 >= pages)
            .min_by_key(|&i| self.ranges[i].1);
        if let Some(i) = smallest_that_fits {
            let (addr, held) = self.ranges[i];
            if held == pages {
                self.ranges.remove(i);
            } else {
                self.ranges[i] = (addr + pages, held - pages);
            }
            self.bytes -= pages;
            let ptr = NonNull::new(addr as *mut u8).expect("banked ranges are mapped memory");
            let segments = vec![pages];
            return Ok((HostBuffer { ptr, len, segments }, 0));
        }
        let mut buffer = HostBuffer::mapped(len)?;
        let fresh = self.move_into(&mut buffer);
        Ok((buffer, fresh))
    }

    /// Moves banked ranges, largest first, over the start of a fresh buffer; returns the bytes
    /// left fresh.
    #[cfg(target_os = "linux")]
    fn move_into(&mut self, buffer: &mut HostBuffer) -> usize {
        let pages = buffer.held_bytes();
        let start = buffer.ptr.as_ptr() as usize;
        let mut segments = Vec::new();
        let mut filled = 0;
        while filled < pages {
            let largest = (0..self.ranges.len()).max_by_key(|&i| self.ranges[i].1);
            let Some(i) = largest else {
                break;
            };
            let (addr, held) = self.ranges[i];
            let n = held.min(pages - filled);
            // SAFETY: the bank owns [addr, addr + n), which lies within one mapping; the buffer
            // owns [start + filled, + n), which MREMAP_FIXED unmaps and replaces. Nothing else
            // refers to either range.
            let moved = unsafe {
                libc::mremap(
                    addr as *mut libc::c_void,
                    n,
                    n,
                    libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                    (start + filled) as *mut libc::c_void,
                )
            };
            if moved == libc::MAP_FAILED {
                // Out of mappings, say: the rest of the buffer stays fresh.
                break;
            }
            if n == held {
                self.ranges.remove(i);
            } else {
                self.ranges[i] = (addr + n, held - n);
            }
            self.bytes -= n;
            segments.push(n);
            filled += n;
        }
        if filled < pages {
            segments.push(pages - filled);
        }
        buffer.segments = segments;
        pages - filled
    }

    #[cfg(not(target_os = "linux"))]
    fn move_into(&mut self, buffer: &mut HostBuffer) -> usize {
        buffer.held_bytes()
    }

    /// Unmaps banked ranges, oldest first, until at most `keep` bytes (and `MAX_BANKED_RANGES`
    /// ranges) are left.
    pub fn trim(&mut self, keep: usize) {
        while self.bytes > keep || self.ranges.len() > MAX_BANKED_RANGES {
            let Some((addr, len)) = self.ranges.pop_front() else {
                break;
            };
            // SAFETY: the bank owns the range, a whole number of pages within one mapping, and
            // forgets it here.
            unsafe { libc::munmap(addr as *mut libc::c_void, len) };
            self.bytes -= len;
        }
    }
}

impl Drop for PageBank {
    fn drop(&mut self) {
        self.trim(0);
    }
}

/// Bytes in use, their high-water mark, and an optional hard limit, updated from any thread.
#[derive(Debug)]
pub struct MemoryCounter {
    in_use: AtomicU64,
    peak: AtomicU64,
    /// `u64::MAX` (`STRATA_UNLIMITED`): no limit.
    limit: AtomicU64,
    /// Pages of staging buffers kept for the next fills: held memory, so counted under the limit
    /// beside `in_use` (and given back first when a charge needs room).
    staging: Mutex<Staging>,
    /// `staging.bank.bytes()`, read without the lock by every charge.
    banked: AtomicU64,
    /// In use and banked after each change, for the timeline's host-memory track.
    samples: Mutex<MemorySamples>,
}

/// Staging buffers (`CountedBuffer::staging`): the bank of their pages, what they hold now, and
/// the most they held at once, which is what the bank may keep.
#[derive(Default)]
struct Staging {
    bank: PageBank,
    held: usize,
    peak: usize,
}

impl std::fmt::Debug for Staging {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Staging {{ banked: {}, held: {} }}",
            self.bank.bytes(),
            self.held
        )
    }
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
            staging: Mutex::default(),
            banked: AtomicU64::new(0),
            samples: Mutex::default(),
        }
    }

    /// Counts `bytes` more as held, unless that would take the total over the limit.
    ///
    /// Over the limit is `STRATA_ERR_BUDGET`, not `OUT_OF_MEMORY`: the limit is one the user set
    /// (`host_limit`), as `vram_limit` is for the device, and the cure is to raise it or to hold
    /// less, not to free memory on the machine. `OUT_OF_MEMORY` stays for allocations the system
    /// refuses. Charges are atomic: threads charging at once never take the total over the limit.
    /// Banked staging pages count too, and are given back when a charge needs their room.
    pub fn try_charge(&self, bytes: u64) -> Result<()> {
        let mut held = self.in_use.load(Ordering::Relaxed);
        loop {
            let limit = self.limit();
            let banked = self.banked.load(Ordering::Relaxed);
            let total = held.checked_add(bytes).filter(|&total| total <= limit);
            let Some(total) = total else {
                return Err(Error::budget(format!(
                    "{bytes} more bytes of host memory would go over host_limit ({limit} bytes): \
                     {held} bytes are held"
                )));
            };
            if total.saturating_add(banked) > limit {
                self.trim_staging(total);
                held = self.in_use.load(Ordering::Relaxed);
                continue;
            }
            match self.in_use.compare_exchange_weak(
                held,
                total,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    self.peak.fetch_max(total, Ordering::Relaxed);
                    self.sample();
                    return Ok(());
                }
                Err(now) => held = now,
            }
        }
    }

    /// Gives back banked staging pages until they fit under the limit beside `held` bytes, and
    /// beside what staging buffers hold now within the most they held at once.
    fn trim_staging(&self, held: u64) {
        let mut staging = self.staging.lock().unwrap_or_else(PoisonError::into_inner);
        let room = self.limit().saturating_sub(held);
        let keep = staging.peak.saturating_sub(staging.held);
        staging
            .bank
            .trim(keep.min(usize::try_from(room).unwrap_or(usize::MAX)));
        self.banked
            .store(staging.bank.bytes() as u64, Ordering::Relaxed);
    }

    /// Gives every banked staging page back to the system, and the heap's free pages with them:
    /// what the allocator's per-thread arenas keep of the small buffers and vectors strata freed
    /// (the copy engine's thread has an arena of its own) is counted nowhere.
    pub fn release_banked(&self) {
        let mut staging = self.staging.lock().unwrap_or_else(PoisonError::into_inner);
        staging.bank.trim(0);
        self.banked.store(0, Ordering::Relaxed);
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim only returns free heap pages to the system; any thread may call it.
        unsafe {
            libc::malloc_trim(0);
        }
    }

    /// Bytes of staging pages kept for reuse, counted under the limit but not in `in_use`.
    pub fn banked(&self) -> u64 {
        self.banked.load(Ordering::Relaxed)
    }

    /// Counts `bytes` as no longer held; they must have been charged.
    pub fn uncharge(&self, bytes: u64) {
        self.in_use.fetch_sub(bytes, Ordering::Relaxed);
        self.sample();
    }

    /// Records what is held now, in use and banked, on the host-memory track.
    fn sample(&self) {
        let held = self.in_use() + self.banked();
        let mut samples = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        samples.record(Stamp::now(), held);
    }

    /// What was held (in use and banked) over time.
    pub fn samples(&self) -> MemorySamples {
        self.samples
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
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
    /// Taken out only by `drop`.
    pub buffer: ManuallyDrop<HostBuffer>,
    counter: Arc<MemoryCounter>,
    /// Made from the counter's bank, and given back to it when dropped.
    staged: bool,
}

impl CountedBuffer {
    /// Charges `len` bytes to `counter` (`BUDGET` over its limit), then allocates them.
    pub fn new(len: usize, counter: &Arc<MemoryCounter>) -> Result<CountedBuffer> {
        counter.try_charge(len as u64)?;
        let buffer = HostBuffer::new(len).inspect_err(|_| counter.uncharge(len as u64))?;
        Ok(CountedBuffer {
            buffer: ManuallyDrop::new(buffer),
            counter: counter.clone(),
            staged: false,
        })
    }

    /// A buffer for one fill, which the next fills reuse: its pages come from the counter's bank
    /// and go back to it, so a repeating pass stops mapping fresh memory once warm. It holds old
    /// bytes: the caller writes it before reading it. Buffers under `BANKED_MIN` come from the
    /// heap.
    pub fn staging(len: usize, counter: &Arc<MemoryCounter>) -> Result<CountedBuffer> {
        if len < BANKED_MIN {
            return Self::new(len, counter);
        }
        counter.try_charge(len as u64)?;
        let taken = {
            let mut staging = counter
                .staging
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let taken = staging.bank.take(len);
            if let Ok((buffer, _)) = &taken {
                staging.held += buffer.held_bytes();
                staging.peak = staging.peak.max(staging.held);
            }
            counter
                .banked
                .store(staging.bank.bytes() as u64, Ordering::Relaxed);
            counter.sample();
            taken
        };
        let (buffer, _) = taken.inspect_err(|_| counter.uncharge(len as u64))?;
        Ok(CountedBuffer {
            buffer: ManuallyDrop::new(buffer),
            counter: counter.clone(),
            staged: true,
        })
    }
}

impl Drop for CountedBuffer {
    fn drop(&mut self) {
        // SAFETY: `buffer` is taken here only, and never used again.
        let buffer = unsafe { ManuallyDrop::take(&mut self.buffer) };
        let len = buffer.len() as u64;
        if self.staged {
            let counter = &self.counter;
            let mut staging = counter
                .staging
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            staging.held -= buffer.held_bytes();
            staging.bank.put(buffer);
            counter.uncharge(len);
            let room = counter.limit().saturating_sub(counter.in_use());
            let keep = staging.peak.saturating_sub(staging.held);
            staging
                .bank
                .trim(keep.min(usize::try_from(room).unwrap_or(usize::MAX)));
            counter
                .banked
                .store(staging.bank.bytes() as u64, Ordering::Relaxed);
            counter.sample();
        } else {
            drop(buffer);
            self.counter.uncharge(len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

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
        assert_eq!(error.kind, ErrorKind::Budget, "{error}");
        assert!(error.message.contains("host_limit (100 bytes)"), "{error}");
        assert!(error.message.contains("100 bytes are held"), "{error}");
        assert_eq!(counter.in_use(), 100, "a refused charge holds nothing");
        counter.uncharge(60);
        counter.try_charge(50).unwrap();
        assert_eq!((counter.in_use(), counter.peak()), (90, 100));
        // A charge whose sum overflows is over any limit, even "unlimited".
        let unlimited = MemoryCounter::default();
        unlimited.try_charge(u64::MAX).unwrap();
        assert_eq!(unlimited.try_charge(1).unwrap_err().kind, ErrorKind::Budget);
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
        assert_eq!(error.kind, ErrorKind::Budget);
        assert_eq!(counter.in_use(), 3000);
        drop(first);
        let second = CountedBuffer::new(4096, &counter).unwrap();
        assert_eq!((counter.in_use(), counter.peak()), (4096, 4096));
        drop(second);
        assert_eq!(counter.in_use(), 0);
        // An allocation the system refuses gives its charge back.
        counter.set_limit(u64::MAX);
        let error = CountedBuffer::new(usize::MAX, &counter).err().unwrap();
        assert_eq!(error.kind, ErrorKind::OutOfMemory);
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

    /// Minor page faults of the whole process so far.
    fn minor_faults() -> i64 {
        // SAFETY: rusage is plain data; getrusage fills it for this process.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: RUSAGE_SELF with a pointer to a live rusage.
        assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) }, 0);
        usage.ru_minflt
    }

    #[test]
    fn a_bank_makes_any_size_from_freed_pages_which_keep_their_bytes_and_fault_nothing() {
        let page = page_size();
        let mut bank = PageBank::default();
        let sizes = [2 << 20, 5 << 20, (3 << 20) + 100];
        let mut expected = Vec::new();
        let mut buffers = Vec::new();
        for (i, &len) in sizes.iter().enumerate() {
            let (mut buffer, fresh) = bank.take(len).unwrap();
            assert_eq!(
                fresh,
                page_round(len).unwrap(),
                "an empty bank has only fresh pages"
            );
            assert!(buffer.as_slice().iter().all(|&b| b == 0));
            buffer.as_mut_slice().fill(i as u8 + 1);
            expected.push((i as u8 + 1, len));
            if buffer.held_bytes() > len {
                // The rest of the last page, never written.
                expected.push((0, buffer.held_bytes() - len));
            }
            buffers.push(buffer);
        }
        buffers.into_iter().for_each(|buffer| bank.put(buffer));
        let banked = bank.bytes();
        assert_eq!(banked, expected.iter().map(|(_, n)| n).sum::<usize>());
        // Larger than any banked range: the ranges are moved in, largest first, then the fresh rest.
        let len = banked + 3 * page;
        let (mut whole, fresh) = bank.take(len).unwrap();
        assert_eq!((fresh, bank.bytes()), (3 * page, 0));
        // Largest first: the 5 MiB buffer, the 3 MiB one with its last page's tail, the 2 MiB one.
        let largest_first = [expected[1], expected[2], expected[3], expected[0]];
        let runs = |bytes: &[u8]| {
            let mut runs: Vec<(u8, usize)> = Vec::new();
            for &b in bytes {
                match runs.last_mut() {
                    Some((value, n)) if *value == b => *n += 1,
                    _ => runs.push((b, 1)),
                }
            }
            runs
        };
        assert_eq!(
            runs(&whole.as_slice()[..banked]),
            largest_first,
            "moved pages keep their bytes"
        );
        assert!(whole.as_slice()[banked..].iter().all(|&b| b == 0));
        let faults = minor_faults();
        whole.as_mut_slice()[..banked].fill(0x5a);
        // Other threads of the test binary may fault a few pages meanwhile; a fresh buffer of this
        // size would fault every one of its (banked / page) pages.
        assert!(
            minor_faults() - faults < (banked / page / 4) as i64,
            "moved pages are mapped"
        );
        bank.put(whole);
        // A smaller buffer is cut from a banked range in place, with no fresh page.
        let (small, fresh) = bank.take(1 << 20).unwrap();
        assert_eq!(fresh, 0);
        assert!(small.as_slice().iter().all(|&b| b == 0x5a));
        assert_eq!(bank.bytes(), page_round(len).unwrap() - (1 << 20));
        bank.put(small);
        bank.trim(1 << 20);
        assert!(bank.bytes() <= 1 << 20);
        bank.trim(0);
        assert_eq!(bank.bytes(), 0);
    }

    #[test]
    fn banked_staging_counts_under_the_limit_and_makes_room_for_charges() {
        let counter = Arc::new(MemoryCounter::with_limit(16 << 20));
        let staging = CountedBuffer::staging(6 << 20, &counter).unwrap();
        assert_eq!((counter.in_use(), counter.banked()), (6 << 20, 0));
        drop(staging);
        assert_eq!((counter.in_use(), counter.banked()), (0, 6 << 20));
        // The next staging buffer reuses the pages, whatever its size.
        let again = CountedBuffer::staging(4 << 20, &counter).unwrap();
        assert_eq!((counter.in_use(), counter.banked()), (4 << 20, 2 << 20));
        drop(again);
        // A charge that needs the banked room gets it: held and banked never pass the limit.
        let copy = CountedBuffer::new(12 << 20, &counter).unwrap();
        assert_eq!(counter.in_use(), 12 << 20);
        assert!(counter.in_use() + counter.banked() <= 16 << 20);
        assert_eq!(
            CountedBuffer::new(5 << 20, &counter).err().unwrap().kind,
            ErrorKind::Budget
        );
        drop(copy);
        counter.release_banked();
        assert_eq!((counter.in_use(), counter.banked()), (0, 0));
        // Small staging buffers come from the heap and bank nothing.
        drop(CountedBuffer::staging(1000, &counter).unwrap());
        assert_eq!((counter.in_use(), counter.banked()), (0, 0));
    }
}
