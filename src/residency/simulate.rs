//! A context's residency replayed without a device: one thread acquiring and releasing layers in
//! turn, the copy engine (with `prefetch_depth > 0`) finishing its fills ahead during each use.
//! It runs the same rules as a context (`make_room`, `trim_to_cap`, the `Window`), so `strata
//! plan` predicts the bytes a real run moves and the layers it keeps.

use super::{
    converts_ahead, make_room, needs_fill, stays_after_use, trim_to_cap, Candidate, Granted,
    Holdings, Purpose, Request, Residents, Window,
};
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
    window: Window,
    /// The layer in use: pinned while the engine fills ahead.
    using: Option<usize>,
    moved: u64,
    overcommitted: bool,
}

/// The key standing for layer `index` (the rule's tests name layers the same way).
pub(super) fn key(index: usize) -> Key {
    Key {
        index: index as u32,
        generation: 1,
    }
}

impl Residents for Simulation {
    fn budget(&self) -> &Budget {
        &self.budget
    }

    fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    fn candidates(&self) -> impl Iterator<Item = Candidate> + '_ {
        self.copies.iter().enumerate().map(|(i, c)| Candidate {
            key: key(i),
            resident: c.resident || c.staged,
            pinned: self.using == Some(i),
            prefetched: c.prefetched,
        })
    }

    fn evict(&mut self, key: Key) {
        self.free(key.index as usize);
    }

    fn engine_filling(&self) -> bool {
        false
    }

    fn holdings(&self, key: Key) -> Holdings {
        let held = self.using.filter(|&i| i != key.index as usize);
        Holdings {
            held_by_me: held.is_some() as u64,
            onloading_here: false,
            others_active: false,
        }
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
            window: Window::new(prefetch_depth),
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
            let request = Request {
                key: key(index),
                bytes,
                own,
                purpose: Purpose::Demand,
                strict: false,
            };
            // One thread holding nothing always gets room: it may evict every other layer, and
            // only a layer larger than the whole budget overcommits.
            let granted = make_room(self, request);
            self.overcommitted |= matches!(granted, Ok(Granted::Overcommit { .. }));
            self.budget.charge(bytes);
            if !c.resident {
                self.moved += size.payload;
            }
        }
        let c = &mut self.copies[index];
        c.resident = true;
        c.staged = false;
        c.prefetched = false;
        self.window.remove(key(index));
    }

    fn release(&mut self, index: usize) {
        self.budget.refund(self.sizes[index].converted);
        if !stays_after_use(self.budget.limit, true) {
            self.copies[index].resident = false;
            self.budget.refund(self.sizes[index].prepared);
        } else if self.budget.over_cap() {
            trim_to_cap(self);
        }
    }

    /// The copy engine's work for the layers predicted next, nearest first, as if each fill ended
    /// before the use did: a fill that does not fit stops the rest.
    fn fill_ahead(&mut self) {
        let stale = self
            .window
            .stale(self.budget.limit, &self.schedule, true, |k| {
                self.using == Some(k.index as usize)
            });
        for k in stale {
            self.free(k.index as usize);
        }
        let targets = self
            .window
            .targets(&self.schedule, |k, distance| self.needs_fill(k, distance));
        let distances = self.schedule.distances();
        // As the engine works through its queue: each layer looked at again when its turn comes.
        for k in targets {
            let Some(distance) = distances.of(k) else {
                continue;
            };
            if !self.needs_fill(k, distance)
                || !self.window.admits(self.budget.limit, &self.schedule, k)
            {
                continue;
            }
            let index = k.index as usize;
            let size = self.sizes[index];
            let c = self.copies[index];
            let convert = converts_ahead(distance) && size.converted > 0 && !c.staged;
            let bytes = if c.resident { 0 } else { size.prepared }
                + if convert { size.converted } else { 0 };
            let own = if c.resident { size.prepared } else { 0 }
                + if c.staged { size.converted } else { 0 };
            let request = Request {
                key: k,
                bytes,
                own,
                purpose: Purpose::Prefetch(distance),
                strict: false,
            };
            if make_room(self, request).is_err() {
                return;
            }
            self.budget.charge(bytes);
            if !c.resident {
                self.moved += size.payload;
            }
            let c = &mut self.copies[index];
            c.resident = true;
            c.staged |= convert;
            c.prefetched = true;
            self.window.insert(k);
            trim_to_cap(self);
        }
    }

    fn needs_fill(&self, k: Key, distance: u32) -> bool {
        let c = self.copies[k.index as usize];
        let conversion_missing = self.sizes[k.index as usize].converted > 0 && !c.staged;
        needs_fill(c.resident, conversion_missing, distance)
    }

    /// Frees a layer's resident and converted-ahead copies.
    fn free(&mut self, index: usize) {
        let size = self.sizes[index];
        let c = std::mem::take(&mut self.copies[index]);
        let freed =
            if c.resident { size.prepared } else { 0 } + if c.staged { size.converted } else { 0 };
        self.budget.refund(freed);
        self.window.remove(key(index));
    }
}
