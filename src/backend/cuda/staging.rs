//! The staging ring: a few pinned host buffers every upload from pageable memory goes through, so
//! the next read overlaps the previous copy. Small copies share a slot; a slot is refilled only
//! once the copy out of it is done. Counted against `host_limit`; where memory cannot be pinned
//! the ring is pageable, and where `host_limit` leaves no room the driver stages the copy itself.

use super::driver::{self, Event, PinnedBuffer};
use super::pinned::PIN_CHUNK_BYTES;
use super::{lock, Shared};
use crate::error::{ErrorKind, Result};
use crate::host::{HostBuffer, MemoryCounter};
use crate::log::Level;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Staging buffers in the ring: enough that a read, a copy in flight and the next read never
/// wait on each other.
pub(super) const RING_SLOTS: usize = 4;
/// The largest staging buffer; a small `host_limit` gets smaller ones.
pub(super) const RING_SLOT_BYTES: usize = 4 << 20;
pub(super) const MIN_RING_SLOT_BYTES: usize = 64 << 10;

pub(super) struct Ring {
    slots: Vec<RingSlot>,
    slot_bytes: usize,
    /// The slot being filled, and how far: small copies share a slot, so a layer's biases and
    /// scales do not each take one and make the host wait for the copy stream.
    current: usize,
    filled: usize,
    _charge: CountedCharge,
}

pub(super) struct RingSlot {
    memory: Staging,
    /// Recorded after the copy out of this slot; the slot is refilled only once it completes.
    copied: Event,
}

pub(super) enum Staging {
    Pinned(PinnedBuffer),
    Pageable(HostBuffer),
}

impl Staging {
    fn as_mut_slice(&mut self) -> &mut [u8] {
        match self {
            Staging::Pinned(buffer) => buffer.as_mut_slice(),
            Staging::Pageable(buffer) => buffer.as_mut_slice(),
        }
    }
}

/// Host bytes charged to the context's host counter while this lives.
pub(super) struct CountedCharge {
    bytes: u64,
    host: Arc<MemoryCounter>,
}

impl Drop for CountedCharge {
    fn drop(&mut self) {
        self.host.uncharge(self.bytes);
    }
}

impl Shared {
    /// The host memory the staging ring takes under `host_limit`: what it holds once made.
    pub(super) fn staging_host_bytes(&self, host_limit: u64) -> u64 {
        let made = lock(&self.res().ring).as_ref().map(|ring| ring.slot_bytes);
        (made.unwrap_or_else(|| ring_slot_bytes(host_limit)) * RING_SLOTS) as u64
    }

    /// Copies host bytes to `dst` on the copy stream: directly from pinned host copies, else
    /// through the staging ring.
    pub(super) fn push(&self, host: &[u8], dst: u64) -> Result<()> {
        if host.is_empty() {
            return Ok(());
        }
        let stream = self.res().stream.0;
        if let Some(pinned_start) = self.pinned_start(host) {
            // One copy per registered piece: a copy spanning two registrations may be taken as
            // pageable, and run synchronously.
            let mut done = 0;
            while done < host.len() {
                let at = host.as_ptr() as usize + done;
                let piece_end =
                    pinned_start + ((at - pinned_start) / PIN_CHUNK_BYTES + 1) * PIN_CHUNK_BYTES;
                let n = (piece_end - at).min(host.len() - done);
                driver::copy_to_device(dst + done as u64, &host[done..done + n], stream)?;
                done += n;
            }
            return Ok(());
        }
        let mut ring = lock(&self.res().ring);
        if ring.is_none() {
            match self.make_ring() {
                Ok(made) => *ring = Some(made),
                Err(e) if e.kind == ErrorKind::Budget => {
                    // host_limit leaves no room for staging: the driver stages pageable memory
                    // itself, and has read it when the call returns.
                    self.warn_pageable(&e.message);
                    return driver::copy_to_device(dst, host, stream);
                }
                Err(e) => return Err(e),
            }
        }
        let ring = ring.as_mut().expect("made above");
        let res = self.res();
        let mut done = 0;
        while done < host.len() {
            if ring.filled == ring.slot_bytes {
                ring.current = (ring.current + 1) % ring.slots.len();
                ring.filled = 0;
                // Refilled only once the copies out of it, a round ago, are done.
                ring.slots[ring.current].copied.synchronize()?;
            }
            let n = (ring.slot_bytes - ring.filled).min(host.len() - done);
            let slot = &mut ring.slots[ring.current];
            let staged = &mut slot.memory.as_mut_slice()[ring.filled..ring.filled + n];
            res.conversions.copy(staged, &host[done..done + n]);
            driver::copy_to_device(dst + done as u64, staged, stream)?;
            slot.copied.record(stream)?;
            ring.filled += n;
            done += n;
        }
        Ok(())
    }

    pub(super) fn make_ring(&self) -> Result<Ring> {
        let res = self.res();
        let slot_bytes = ring_slot_bytes(res.host.limit());
        let bytes = (slot_bytes * RING_SLOTS) as u64;
        res.host.try_charge(bytes)?;
        let charge = CountedCharge {
            bytes,
            host: res.host.clone(),
        };
        let mut slots = Vec::with_capacity(RING_SLOTS);
        for _ in 0..RING_SLOTS {
            let memory = match PinnedBuffer::new(slot_bytes) {
                Ok(pinned) => Staging::Pinned(pinned),
                Err(e) => {
                    self.warn_unpinned(&e);
                    Staging::Pageable(HostBuffer::new(slot_bytes)?)
                }
            };
            slots.push(RingSlot {
                memory,
                copied: self.event()?,
            });
        }
        Ok(Ring {
            slots,
            slot_bytes,
            current: 0,
            filled: 0,
            _charge: charge,
        })
    }

    /// Says once per context why copies go through pageable memory.
    pub(super) fn warn_pageable(&self, why: &str) {
        if !self.res().warned_pageable.swap(true, Ordering::Relaxed) {
            self.res().logger.log(Level::Warn, || {
                format!(
                    "{why}; copies go through pageable memory instead (slower, and they cannot \
                     overlap compute as well)"
                )
            });
        }
    }
}

/// copies large enough to run at full speed.
pub(super) fn ring_slot_bytes(host_limit: u64) -> usize {
    usize::try_from(host_limit / (4 * RING_SLOTS as u64))
        .unwrap_or(usize::MAX)
        .clamp(MIN_RING_SLOT_BYTES, RING_SLOT_BYTES)
}
