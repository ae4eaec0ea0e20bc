//! Device memory: raw buffers, handed back to a pool when a layer leaves and reused for the next
//! buffer of the same size, so a repeating pass stops calling cuMemAlloc once warm. The pool never
//! holds more than the cap (`vram_limit`, or the most held live since it was set) together with
//! what is live. A buffer is written again, or freed, only after the callers' streams that used it
//! have run past their use (`CallerStream` events).

use super::driver::{self, Event};
use super::{lock, CallerStream, Shared};
use crate::error::{Error, ErrorKind, Result};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Device buffers no layer uses, kept for reuse, and the accounting of what is held.
#[derive(Default)]
pub(super) struct Pool {
    free: Vec<Pooled>,
    live: u64,
    /// The most `live` has been since the cap was last set.
    live_peak: u64,
    pooled: u64,
    allocations: u64,
}

pub(super) struct Pooled {
    pointer: u64,
    len: usize,
    ready: Event,
    /// Events on the callers' streams after their last use: written again only after these.
    uses: Vec<(CallerStream, Event)>,
}

/// One device buffer a layer holds; goes back to the pool when dropped.
pub(super) struct Buffer {
    pub(super) pointer: u64,
    len: usize,
    /// Recorded on the copy stream after each write into the buffer.
    ready: Option<Event>,
    /// One event per caller stream that used the buffer, recorded at its release.
    uses: Mutex<Vec<(CallerStream, Event)>>,
    /// Whether a kernel on the convert stream wrote into it: then `ready` is recorded there,
    /// after the copy stream's work, to cover both.
    convert_stream_wrote: AtomicBool,
    shared: Arc<Shared>,
}

impl Buffer {
    pub(super) fn ready(&self) -> &Event {
        self.ready.as_ref().expect("live buffers have their event")
    }

    /// Ends a caller's use of the buffer on `stream`: records an event there, which the copy
    /// stream waits on before it writes the buffer again. Call with the context bound.
    pub(super) fn used_until(&self, stream: usize) -> Result<()> {
        let mut uses = lock(&self.uses);
        let raw = stream as cudarc::driver::sys::CUstream;
        let caller = CallerStream::of(stream);
        // A later use on the same stream covers an earlier one: keep one event per stream.
        if let Some((_, event)) = uses.iter().find(|(s, _)| *s == caller) {
            return event.record(raw);
        }
        let event = self.shared.event()?;
        event.record(raw)?;
        uses.push((caller, event));
        Ok(())
    }

    /// Records that everything enqueued on the copy stream so far is part of this buffer's fill
    /// (and on the convert stream, when it wrote into the buffer too).
    pub(super) fn written(&self) -> Result<()> {
        if self.convert_stream_wrote.load(Ordering::Relaxed) {
            let side = self.shared.convert_stream_after_copies()?;
            self.ready().record(side)
        } else {
            self.ready().record(self.shared.res().stream.0)
        }
    }

    /// Records that a kernel enqueued on the convert stream (after the copy stream's work, see
    /// `convert_stream_after_copies`) completes this buffer's fill so far.
    pub(super) fn written_by_convert_stream(&self) -> Result<()> {
        self.convert_stream_wrote.store(true, Ordering::Relaxed);
        self.ready().record(self.shared.res().convert_stream.0)
    }
}

impl Shared {
    /// A buffer of `bytes` for one fill: a pooled one of that size, else new memory after trimming
    /// the pool to leave room for it under the cap. Call with the context bound.
    pub(super) fn allocate(self: &Arc<Self>, bytes: usize) -> Result<Buffer> {
        let mut pool = lock(&self.res().pool);
        let (pointer, ready) = if bytes == 0 {
            (0, self.event()?)
        } else if let Some(reused) = self.reuse(&mut pool, bytes)? {
            reused
        } else {
            self.trim(&mut pool, bytes as u64)?;
            let ready = self.event()?;
            (self.fresh(&mut pool, bytes)?, ready)
        };
        pool.live += bytes as u64;
        pool.live_peak = pool.live_peak.max(pool.live);
        Ok(self.live_buffer(pointer, bytes, ready))
    }

    /// Trims the pool to the cap just set, counting the peak of live memory from now. Call with
    /// the context bound.
    pub(super) fn restart_peak(&self) -> Result<()> {
        let mut pool = lock(&self.res().pool);
        pool.live_peak = pool.live;
        self.trim(&mut pool, 0)
    }

    /// Frees every pooled buffer. Call with the context bound.
    pub(super) fn release_pooled(&self) -> Result<()> {
        let mut pool = lock(&self.res().pool);
        self.release_all(&mut pool)
    }

    /// Device allocations made from the driver so far.
    pub(super) fn allocations(&self) -> u64 {
        lock(&self.res().pool).allocations
    }

    /// Hands device memory back to the driver, once nothing in flight can touch it.
    pub(super) fn release(&self, pool: &mut Pool, buffers: Vec<Pooled>) -> Result<()> {
        if buffers.is_empty() {
            return Ok(());
        }
        // A conversion on the copy stream may still read a buffer that left; one on the convert
        // stream may still write it (its `ready`) or read it (its `uses`).
        let mut outcome = self.res().stream.synchronize();
        for buffer in buffers {
            pool.pooled -= buffer.len as u64;
            let done = buffer.ready.synchronize().and_then(|()| {
                buffer
                    .uses
                    .iter()
                    .try_for_each(|(_, event)| event.synchronize())
            });
            // A buffer whose last use cannot be confirmed finished is left to the driver (it
            // frees it with the context) rather than freed under a running kernel.
            let freed = done.and_then(|()| driver::free(buffer.pointer));
            outcome = outcome.and(freed);
            self.recycle(std::iter::once(buffer.ready).chain(buffer.uses.into_iter().map(|u| u.1)));
        }
        outcome
    }

    /// Frees pooled buffers, oldest first, until `bytes` more fit under the cap: the budget's
    /// limit, or the most the budget has held live since the limit was set (budget 0 holds the
    /// streaming window, and the pool may keep that much for reuse).
    pub(super) fn trim(&self, pool: &mut Pool, bytes: u64) -> Result<()> {
        let cap = self.res().cap.load(Ordering::Relaxed).max(pool.live_peak);
        let mut held = pool.live + pool.pooled;
        let mut freed = Vec::new();
        while !pool.free.is_empty() && held + bytes > cap {
            let oldest = pool.free.remove(0);
            held -= oldest.len as u64;
            freed.push(oldest);
        }
        self.release(pool, freed)
    }

    /// A pooled buffer of exactly `bytes`, once the copy stream waits for its last write and the
    /// last reads of it; None when the pool has none.
    pub(super) fn reuse(&self, pool: &mut Pool, bytes: usize) -> Result<Option<(u64, Event)>> {
        let Some(i) = pool.free.iter().position(|b| b.len == bytes) else {
            return Ok(None);
        };
        let reused = pool.free.swap_remove(i);
        pool.pooled -= bytes as u64;
        // After its last write (on the convert stream, for a conversion's copy) and its last
        // reads.
        let stream = self.res().stream.0;
        let waited: Result<()> = std::iter::once(&reused.ready)
            .chain(reused.uses.iter().map(|(_, e)| e))
            .try_for_each(|e| e.make_wait(stream));
        if let Err(e) = waited {
            pool.pooled += bytes as u64;
            pool.free.push(reused);
            return Err(e);
        }
        self.recycle(reused.uses.into_iter().map(|u| u.1));
        Ok(Some((reused.pointer, reused.ready)))
    }

    pub(super) fn live_buffer(self: &Arc<Self>, pointer: u64, len: usize, ready: Event) -> Buffer {
        Buffer {
            pointer,
            len,
            ready: Some(ready),
            uses: Mutex::default(),
            convert_stream_wrote: AtomicBool::new(false),
            shared: self.clone(),
        }
    }

    /// Device memory for the source of a quantization, held only while the copy stream fills it
    /// and the convert stream reads it (it goes back to the pool when dropped, with that read
    /// among its uses): a pooled buffer of that size, or new memory where the cap leaves
    /// room beside what is live and pooled. None otherwise, without trimming the pool: the
    /// layers' memory and its reuse come first, and the host can quantize instead.
    pub(super) fn scratch(self: &Arc<Self>, bytes: usize) -> Result<Option<Buffer>> {
        // Counted as the device pages it takes, as the layers' copies are.
        let bytes = self.res().footprint.of(bytes);
        let mut pool = lock(&self.res().pool);
        let pointer_and_ready = match self.reuse(&mut pool, bytes)? {
            Some(reused) => reused,
            None => {
                let cap = self.res().cap.load(Ordering::Relaxed).max(pool.live_peak);
                let held = pool.live + pool.pooled;
                if held.saturating_add(bytes as u64) > cap {
                    return Ok(None);
                }
                let ready = self.event()?;
                match self.fresh(&mut pool, bytes) {
                    Ok(pointer) => (pointer, ready),
                    Err(e) if e.kind == ErrorKind::OutOfMemory => {
                        self.recycle([ready]);
                        return Ok(None);
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        pool.live += bytes as u64;
        let (pointer, ready) = pointer_and_ready;
        Ok(Some(self.live_buffer(pointer, bytes, ready)))
    }

    pub(super) fn release_all(&self, pool: &mut Pool) -> Result<()> {
        let all = std::mem::take(&mut pool.free);
        self.release(pool, all)
    }

    /// New device memory: within the headroom, and after giving pooled buffers back to the
    /// driver when it is out of memory (another user of the GPU may have taken some).
    pub(super) fn fresh(&self, pool: &mut Pool, bytes: usize) -> Result<u64> {
        let headroom = self.res().headroom;
        loop {
            let retry = !pool.free.is_empty();
            if headroom > 0 {
                let (free, _) = self.context.memory_info()?;
                if (free as u64) < (bytes as u64).saturating_add(headroom) {
                    if retry {
                        self.release_all(pool)?;
                        continue;
                    }
                    return Err(Error::out_of_memory(format!(
                        "{bytes} more bytes of device memory would leave less than the {headroom} bytes of headroom \
                         asked for ({free} bytes are free on the device)"
                    )));
                }
            }
            match driver::allocate(bytes) {
                Ok(pointer) => {
                    pool.allocations += 1;
                    return Ok(pointer);
                }
                Err(e) if e.kind == ErrorKind::OutOfMemory && retry => {
                    self.release_all(pool)?;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        let Some(ready) = self.ready.take() else {
            return;
        };
        let uses = std::mem::take(&mut *lock(&self.uses));
        let mut pool = lock(&self.shared.res().pool);
        pool.live -= self.len as u64;
        if self.len == 0 {
            self.shared
                .recycle(std::iter::once(ready).chain(uses.into_iter().map(|u| u.1)));
            return;
        }
        pool.pooled += self.len as u64;
        // What was live is now pooled: the total held stays where it was, within the cap.
        pool.free.push(Pooled {
            pointer: self.pointer,
            len: self.len,
            ready,
            uses,
        });
    }
}
