//! Host copies pinned in place: a host copy large enough to be worth it is registered with the
//! driver, so uploads from it are direct DMA with no staging. `Shared::pinned_start` tells the
//! staging ring which host bytes need none.

use super::{driver, lock, Shared};
use crate::error::Error;
use std::sync::Arc;

/// Host copies smaller than this are staged: pinning costs a system call and locked pages. The
/// larger ones are mappings of their own (`host::MAP_THRESHOLD`), whole pages no other buffer
/// shares, which is what the driver pins.
pub(super) const MIN_PINNED_BYTES: usize = crate::host::MAP_THRESHOLD;
/// The most host memory one registration pins: some systems refuse larger ranges.
pub(super) const PIN_CHUNK_BYTES: usize = 1 << 30;

/// A host copy pinned in place; unpinned when dropped (before its memory is freed).
pub(super) struct PinnedHost {
    start: usize,
    chunks: Vec<*const u8>,
    shared: Arc<Shared>,
}

// SAFETY: the pointers only name registered ranges for cuMemHostUnregister.
unsafe impl Send for PinnedHost {}
// SAFETY: as above; nothing reads through them.
unsafe impl Sync for PinnedHost {}

impl Shared {
    /// Pins host copy `bytes` in place, in pieces the driver accepts; None when it is too small
    /// to be worth it, or the driver refused (logged once: uploads from it are then staged).
    pub(super) fn pin(self: &Arc<Self>, bytes: &[u8]) -> Option<PinnedHost> {
        if bytes.len() < MIN_PINNED_BYTES {
            return None;
        }
        let shared = self;
        let bound = match shared.context.bind() {
            Ok(bound) => bound,
            Err(e) => {
                shared.warn_unpinned(&e);
                return None;
            }
        };
        let start = bytes.as_ptr();
        let page = page_size();
        let len = bytes.len().div_ceil(page) * page;
        let mut chunks = Vec::new();
        for offset in (0..len).step_by(PIN_CHUNK_BYTES) {
            // SAFETY: `offset` < `len`, within the page-rounded allocation (host copies this
            // large are whole-page mappings).
            let chunk = unsafe { start.add(offset) };
            match driver::register_host(chunk, (len - offset).min(PIN_CHUNK_BYTES)) {
                Ok(true) => chunks.push(chunk),
                // Pinned by the host store's first user: used as pinned, left to it to unpin.
                Ok(false) if offset == 0 => break,
                failed => {
                    for &done in &chunks {
                        driver::unregister_host(done);
                    }
                    let e = failed.err().unwrap_or_else(|| {
                        Error::device(format!(
                            "pinning {len} bytes at {start:p}: part of the range was pinned already"
                        ))
                    });
                    shared.warn_unpinned(&e);
                    return None;
                }
            }
        }
        drop(bound);
        lock(&shared.res().pinned).insert(start as usize, start as usize + bytes.len());
        Some(PinnedHost {
            start: start as usize,
            chunks,
            shared: shared.clone(),
        })
    }

    /// Where the pinned host copy holding all of `host` starts, if one does.
    pub(super) fn pinned_start(&self, host: &[u8]) -> Option<usize> {
        let start = host.as_ptr() as usize;
        let end = start + host.len();
        lock(&self.res().pinned)
            .range(..=start)
            .next_back()
            .filter(|(_, &pinned_end)| end <= pinned_end)
            .map(|(&pinned_start, _)| pinned_start)
    }

    pub(super) fn warn_unpinned(&self, error: &Error) {
        self.warn_pageable(&format!(
            "{} (check the memlock limit, `ulimit -l`)",
            error.message
        ));
    }
}

impl Drop for PinnedHost {
    fn drop(&mut self) {
        // Forgotten first, whatever happens next: memory mapped later at the same address is not
        // pinned.
        lock(&self.shared.res().pinned).remove(&self.start);
        if let Ok(_bound) = self.shared.context.bind() {
            // A copy from this memory may still be in flight.
            let _ = self.shared.res().stream.synchronize();
            for &chunk in &self.chunks {
                driver::unregister_host(chunk);
            }
        }
    }
}

pub(super) fn page_size() -> usize {
    // SAFETY: sysconf only reads a system setting.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096).max(1)
}
