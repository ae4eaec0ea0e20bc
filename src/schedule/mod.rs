//! The order in which layers are used, learned from the sequence of acquires alone, and what it
//! predicts: which layers come next (for prefetching) and how far away each layer's next use is
//! (for eviction by Belady's rule: the resident layer used furthest in the future goes first).
//!
//! Each layer remembers the layers that followed it, with a small saturating confidence per
//! candidate, like a branch predictor: a DiT's last block is followed by its first block on every
//! step but one (the VAE after the last step), and the common successor keeps winning; when the
//! order changes for good (a skipped block, a new component) the new successor takes over after
//! two or three passes. Following the most likely successors from the layer in use gives the
//! predicted future; a layer not on that path has no predicted use and is evicted first.

use crate::registry::Key;

/// Candidate successors remembered per layer.
const CANDIDATES: usize = 4;
/// Saturation of a candidate's confidence: how many contrary observations it takes to unseat it.
const MAX_CONFIDENCE: u8 = 3;

#[derive(Clone, Copy, Debug)]
struct Successor {
    key: Key,
    confidence: u8,
    /// Logical time it was last observed: breaks ties toward the most recent.
    seen: u64,
}

#[derive(Clone, Debug, Default)]
struct Entry {
    generation: u64,
    last_use: u64,
    successors: [Option<Successor>; CANDIDATES],
    /// The most likely successor, kept by `learn`: predictions read it several times per acquire.
    successor: Option<Key>,
}

impl Entry {
    fn learn(&mut self, next: Key, now: u64) {
        let mut found = false;
        for candidate in self.successors.iter_mut().flatten() {
            if candidate.key == next {
                candidate.confidence = (candidate.confidence + 1).min(MAX_CONFIDENCE);
                candidate.seen = now;
                found = true;
            } else {
                candidate.confidence = candidate.confidence.saturating_sub(1);
            }
        }
        if !found {
            self.add_candidate(next, now);
        }
        // The observed successor only gained and the others only lost: if it led, it still does.
        if self.successor == Some(next) {
            return;
        }
        self.successor = self
            .successors
            .iter()
            .flatten()
            .max_by_key(|c| (c.confidence, c.seen))
            .map(|c| c.key);
    }

    /// Puts `next` in place of the weakest candidate (an empty slot first).
    fn add_candidate(&mut self, next: Key, now: u64) {
        let fresh = Successor {
            key: next,
            confidence: 1,
            seen: now,
        };
        let slot = self
            .successors
            .iter_mut()
            .min_by_key(|c| c.map_or((0, 0), |c| (c.confidence as u64 + 1, c.seen)))
            .expect("CANDIDATES > 0");
        *slot = Some(fresh);
    }

    fn successor(&self) -> Option<Key> {
        self.successor
    }
}

/// The learned order of one context's acquires. Keys are the registry's; an entry whose slot was
/// reused by another layer (a new generation) starts afresh.
#[derive(Debug, Default)]
pub struct Schedule {
    /// Logical time: one tick per recorded acquire.
    clock: u64,
    /// The layer acquired last: where predictions start.
    current: Option<Key>,
    entries: Vec<Entry>,
}

/// The furthest ahead the copy engine looks: a larger `prefetch_depth` is used as this.
pub(crate) const MAX_PREFETCH_DEPTH: usize = 32;

/// The layers predicted next: see `Schedule::upcoming`.
pub struct Upcoming<'a> {
    schedule: &'a Schedule,
    start: Option<Key>,
    at: Option<Key>,
    count: usize,
    depth: usize,
}

impl Upcoming<'_> {
    /// Whether `key` was yielded already: the path walked again from the start, at most
    /// `MAX_PREFETCH_DEPTH` steps of one lookup each, which is cheaper than carrying a
    /// list of them in every iterator.
    fn yielded(&self, key: Key) -> bool {
        let mut at = self.start;
        (0..self.count).any(|_| {
            at = at.and_then(|k| self.schedule.successor(k));
            at == Some(key)
        })
    }
}

impl Iterator for Upcoming<'_> {
    type Item = Key;

    fn next(&mut self) -> Option<Key> {
        if self.count >= self.depth {
            return None;
        }
        let next = self.schedule.successor(self.at?)?;
        if Some(next) == self.start || self.yielded(next) {
            self.count = self.depth;
            return None;
        }
        self.count += 1;
        self.at = Some(next);
        Some(next)
    }
}

/// How far away each layer's next use is predicted to be, in acquires, from the layer in use.
/// Indexed like the schedule's entries: the copy engine builds one per fill, and a dense table
/// costs a memset where a map hashed every layer of the path.
pub struct Distances(Vec<Option<(Key, u32)>>);

impl Distances {
    pub fn of(&self, key: Key) -> Option<u32> {
        match self.0.get(key.index as usize) {
            Some(&Some((k, distance))) if k == key => Some(distance),
            _ => None,
        }
    }

    fn insert(&mut self, key: Key, distance: u32) {
        let index = key.index as usize;
        if index >= self.0.len() {
            self.0.resize(index + 1, None);
        }
        self.0[index] = Some((key, distance));
    }
}

impl Schedule {
    fn entry(&self, key: Key) -> Option<&Entry> {
        self.entries
            .get(key.index as usize)
            .filter(|e| e.generation == key.generation)
    }

    fn successor(&self, key: Key) -> Option<Key> {
        self.entry(key).and_then(Entry::successor)
    }

    fn entry_mut(&mut self, key: Key) -> &mut Entry {
        let index = key.index as usize;
        if index >= self.entries.len() {
            self.entries.resize_with(index + 1, Entry::default);
        }
        let entry = &mut self.entries[index];
        if entry.generation != key.generation {
            *entry = Entry {
                generation: key.generation,
                ..Entry::default()
            };
        }
        entry
    }

    /// Records an acquire of `key`; returns its logical time.
    pub fn record(&mut self, key: Key) -> u64 {
        self.clock += 1;
        let now = self.clock;
        // A second acquire of the layer in use (reference counting) is no step in the order.
        if let Some(previous) = self.current.filter(|&p| p != key) {
            self.entry_mut(previous).learn(key, now);
        }
        self.entry_mut(key).last_use = now;
        self.current = Some(key);
        now
    }

    /// The layer acquired last: being used, or about to be by an acquire that waits for it.
    pub fn current(&self) -> Option<Key> {
        self.current
    }

    /// Forgets a layer that was unregistered, so predictions stop at it.
    pub fn forget(&mut self, key: Key) {
        if let Some(entry) = self.entries.get_mut(key.index as usize) {
            if entry.generation == key.generation {
                *entry = Entry::default();
            }
        }
        if self.current == Some(key) {
            self.current = None;
        }
    }

    /// The layers predicted to be acquired after the current one, nearest first, at most `depth`
    /// (and at most `MAX_PREFETCH_DEPTH`), each once; stops where the learned order stops or comes back
    /// to the current layer. Allocates nothing: it runs on every acquire.
    pub fn upcoming(&self, depth: usize) -> Upcoming<'_> {
        Upcoming {
            schedule: self,
            start: self.current,
            at: self.current,
            count: 0,
            depth: depth.min(MAX_PREFETCH_DEPTH),
        }
    }

    /// The predicted distance to every layer on the learned path ahead of the current one.
    pub fn distances(&self) -> Distances {
        let Some(start) = self.current else {
            return Distances(Vec::new());
        };
        let mut distances = Distances(vec![None; self.entries.len()]);
        // The current layer is needed now: an acquire records it before it may have to wait for
        // it, and the engine must not evict it from under that acquire.
        distances.insert(start, 0);
        let mut at = start;
        let mut distance = 0;
        while let Some(next) = self.successor(at) {
            if distances.of(next).is_some() {
                // Back on the path already walked: the rest repeats.
                break;
            }
            distance += 1;
            distances.insert(next, distance);
            at = next;
        }
        distances
    }

    /// Larger means evict sooner: layers off the predicted path first, most recently used first
    /// among them (in a repeating pass it is needed last); then the furthest predicted use.
    pub fn eviction_rank(&self, key: Key, distances: &Distances) -> (u32, u64) {
        let last_use = self.entry(key).map_or(0, |e| e.last_use);
        (distances.of(key).unwrap_or(u32::MAX), last_use)
    }
}

#[cfg(test)]
mod tests;
