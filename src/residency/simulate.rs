//! A context's residency replayed without a device: one thread acquiring and releasing layers in
//! turn, the copy engine (with `prefetch_depth > 0`) finishing its fills ahead during each use.
//! It runs the same `victim` rule and the same schedule as a context, so `strata plan` predicts
//! the bytes a real run moves and the layers it keeps.

use super::{victim, Candidate, Protect};
use crate::budget::{Budget, Limit};
use crate::registry::Key;
use crate::schedule::Schedule;

/// One layer's device bytes, as a context charges them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LayerBytes {
    /// The resident (preparing-tier) copy, alignment included.
    pub prepared: u64,
    /// The computation form while in use, when it differs from the preparing form (else 0).
    pub converted: u64,
    /// What a miss moves to the device: the tensors' bytes without padding (`bytes_to_device`).
    pub payload: u64,
}

#[derive(Clone, Copy, Debug, Default)]
struct Copies {
    resident: bool,
    /// Converted ahead by the copy engine for the next acquire.
    staged: bool,
    prefetched: bool,
}

/// The residency of one simulated context.
pub struct Simulation {
    sizes: Vec<LayerBytes>,
    copies: Vec<Copies>,
    budget: Budget,
    schedule: Schedule,
    prefetch_depth: usize,
    /// Layers filled ahead that no acquire has taken yet, in fill order.
    prefetched: Vec<usize>,
    /// The layer in use: pinned while the engine fills ahead.
    using: Option<usize>,
    moved: u64,
    overcommitted: bool,
}

fn key(index: usize) -> Key {
    Key {
        index: index as u32,
        generation: 1,
    }
}

impl Simulation {
    /// Layers `sizes` (indexed as the trace names them) under `vram_limit` (as the C ABI takes it:
    /// 0 is budget 0, `u64::MAX` unlimited).
    pub fn new(sizes: &[LayerBytes], vram_limit: u64, prefetch_depth: u32) -> Simulation {
        Simulation {
            sizes: sizes.to_vec(),
            copies: vec![Copies::default(); sizes.len()],
            budget: Budget::new(Limit::from_abi(vram_limit)),
            schedule: Schedule::default(),
            prefetch_depth: prefetch_depth as usize,
            prefetched: Vec::new(),
            using: None,
            moved: 0,
            overcommitted: false,
        }
    }

    /// Bytes moved to the device so far (`strata_stats.bytes_to_device`).
    pub fn moved(&self) -> u64 {
        self.moved
    }

    /// Device bytes held now (`strata_stats.vram_in_use`).
    pub fn held(&self) -> u64 {
        self.budget.in_use()
    }

    /// Whether a layer larger than the whole budget was held alone at some point.
    pub fn overcommitted(&self) -> bool {
        self.overcommitted
    }

    /// The layers with a copy on the device now, by index.
    pub fn resident(&self) -> Vec<usize> {
        (0..self.copies.len())
            .filter(|&i| self.copies[i].resident || self.copies[i].staged)
            .collect()
    }

    /// One acquire of layer `index`, the engine's fills ahead while it is in use, and its release.
    pub fn use_layer(&mut self, index: usize) {
        self.schedule.record(key(index));
        self.acquire(index);
        self.using = Some(index);
        self.fill_ahead();
        self.using = None;
        self.release(index);
    }

    fn acquire(&mut self, index: usize) {
        let size = self.sizes[index];
        let c = self.copies[index];
        let taken_ahead = c.staged || size.converted == 0;
        if !(c.resident && taken_ahead) {
            let bytes = if c.resident { 0 } else { size.prepared } + size.converted;
            let own = if c.resident { size.prepared } else { 0 };
            let footprint = own + bytes;
            // A demand may evict anything unused and, alone, overcommit.
            while !self.budget.fits(bytes) && self.evict(Some(index), 0, false) {}
            if !self.budget.fits(bytes) {
                self.overcommitted |= self.budget.exceeds_cap_alone(footprint);
            }
            self.budget.charge(bytes);
            if !c.resident {
                self.moved += size.payload;
            }
        }
        let c = &mut self.copies[index];
        c.resident = true;
        c.staged = false;
        if std::mem::take(&mut c.prefetched) {
            self.prefetched.retain(|&i| i != index);
        }
    }

    fn release(&mut self, index: usize) {
        self.budget.refund(self.sizes[index].converted);
        if self.budget.limit == Limit::Minimal {
            self.copies[index].resident = false;
            self.budget.refund(self.sizes[index].prepared);
        } else if self.budget.over_cap() {
            self.trim_to_cap();
        }
    }

    /// The copy engine's work for the layers predicted next, nearest first, as if each fill ended
    /// before the use did: a fill that does not fit stops the rest.
    fn fill_ahead(&mut self) {
        if self.prefetch_depth == 0 {
            return;
        }
        let upcoming: Vec<usize> = self
            .schedule
            .upcoming(self.prefetch_depth)
            .map(|k| k.index as usize)
            .collect();
        let minimal = self.budget.limit == Limit::Minimal;
        if minimal {
            self.drop_stale_prefetches(&upcoming);
        }
        for (distance, &index) in (1u32..).zip(&upcoming) {
            let size = self.sizes[index];
            let c = self.copies[index];
            let convert = distance <= 1 && size.converted > 0 && !c.staged;
            if c.resident && !convert {
                continue;
            }
            if minimal && self.prefetched.len() >= self.prefetch_depth {
                continue;
            }
            let bytes = if c.resident { 0 } else { size.prepared }
                + if convert { size.converted } else { 0 };
            let own = if c.resident { size.prepared } else { 0 }
                + if c.staged { size.converted } else { 0 };
            if self.budget.exceeds_cap_alone(own + bytes) {
                return;
            }
            while !self.budget.fits(bytes) && self.evict(Some(index), distance + 1, false) {}
            if !self.budget.fits(bytes) {
                return;
            }
            self.budget.charge(bytes);
            if !c.resident {
                self.moved += size.payload;
            }
            let c = &mut self.copies[index];
            c.resident = true;
            c.staged |= convert;
            if !std::mem::replace(&mut c.prefetched, true) {
                self.prefetched.push(index);
            }
            self.trim_to_cap();
        }
    }

    /// Under budget 0, frees what was filled ahead for layers no longer predicted next.
    fn drop_stale_prefetches(&mut self, upcoming: &[usize]) {
        let current = self.schedule.current().map(|k| k.index as usize);
        let stale: Vec<usize> = self
            .prefetched
            .iter()
            .copied()
            .filter(|i| !upcoming.contains(i) && Some(*i) != current)
            .collect();
        for index in stale {
            self.free(index);
        }
    }

    fn trim_to_cap(&mut self) {
        let keep_window = self.budget.limit == Limit::Minimal;
        while self.budget.over_cap() && self.evict(None, 0, keep_window) {}
    }

    fn evict(&mut self, keep: Option<usize>, nearest_allowed: u32, keep_prefetched: bool) -> bool {
        let distances = self.schedule.distances();
        let candidates = self.copies.iter().enumerate().map(|(i, c)| Candidate {
            key: key(i),
            resident: c.resident || c.staged,
            pinned: self.using == Some(i),
            prefetched: c.prefetched,
        });
        let protect = Protect {
            keep: keep.map(key),
            nearest_allowed,
            keep_prefetched,
        };
        match victim(candidates, &self.schedule, &distances, protect) {
            Some(k) => {
                self.free(k.index as usize);
                true
            }
            None => false,
        }
    }

    /// Frees a layer's resident and converted-ahead copies.
    fn free(&mut self, index: usize) {
        let size = self.sizes[index];
        let c = std::mem::take(&mut self.copies[index]);
        let freed =
            if c.resident { size.prepared } else { 0 } + if c.staged { size.converted } else { 0 };
        self.budget.refund(freed);
        self.prefetched.retain(|&i| i != index);
    }
}
