//! Counters a context keeps, as `strata_stats_get` reports them.

/// A snapshot of a context's counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub vram_in_use: u64,
    pub vram_peak: u64,
    pub host_in_use: u64,
    pub host_peak: u64,
    pub bytes_to_device: u64,
    pub bytes_from_disk: u64,
    pub acquires: u64,
    pub resident_hits: u64,
    pub prefetch_hits: u64,
    pub misses: u64,
    pub stall_ns: u64,
    pub overcommit_peak: u64,
    pub vram_limit: u64,
    pub device_allocations: u64,
    pub evictions: u64,
    pub implicit_onloads: u64,
    pub host_limit: u64,
}

/// The counters the engine bumps under its lock; memory figures come from the budget and the
/// host counter when a snapshot is taken.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counters {
    pub bytes_to_device: u64,
    pub acquires: u64,
    pub resident_hits: u64,
    pub prefetch_hits: u64,
    pub misses: u64,
    pub stall_ns: u64,
    pub evictions: u64,
    pub implicit_onloads: u64,
}

/// How an acquire was served: what `Counters::count_acquire` adds it to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AcquireKind {
    /// In use already, resident, or read in place: nothing moved.
    ResidentHit,
    /// The copy engine had filled it ahead.
    PrefetchHit,
    /// Its bytes moved to the device for this acquire.
    Miss,
}

impl Counters {
    /// Counts one acquire of `kind` that stalled `stall_ns`.
    pub(crate) fn count_acquire(&mut self, kind: AcquireKind, stall_ns: u64) {
        self.acquires += 1;
        self.stall_ns += stall_ns;
        match kind {
            AcquireKind::ResidentHit => self.resident_hits += 1,
            AcquireKind::PrefetchHit => self.prefetch_hits += 1,
            AcquireKind::Miss => self.misses += 1,
        }
    }
}
