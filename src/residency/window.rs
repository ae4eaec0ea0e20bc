//! The copy engine's window: which layers it fills ahead, nearest predicted use first, and under
//! budget 0 which of the layers it filled ahead may stay (at most `prefetch_depth`, those still
//! predicted next: budget 0 keeps nothing else between uses).

use crate::budget::Limit;
use crate::registry::Key;
use crate::schedule::Schedule;

/// The layers the copy engine filled ahead that no acquire has taken yet, in fill order.
#[derive(Debug, Default)]
pub(crate) struct Window {
    depth: usize,
    filled: Vec<Key>,
}

impl Window {
    pub(crate) fn new(prefetch_depth: u32) -> Window {
        Window {
            depth: prefetch_depth as usize,
            filled: Vec::new(),
        }
    }

    /// The layers the engine should bring ahead now, nearest first: those predicted within
    /// `prefetch_depth` that `work(key, distance)` says have something missing (see
    /// `super::needs_fill`), or nothing without a depth.
    pub(crate) fn targets(
        &self,
        schedule: &Schedule,
        mut work: impl FnMut(Key, u32) -> bool,
    ) -> Vec<Key> {
        if self.depth == 0 {
            return Vec::new();
        }
        // A plain loop: this runs on every acquire, and over resident layers finds nothing.
        let mut wanted = Vec::new();
        for (distance, key) in (1..).zip(schedule.upcoming(self.depth)) {
            if work(key, distance) {
                wanted.push(key);
            }
        }
        wanted
    }

    /// Under budget 0, the layers filled ahead that may no longer stay: those no longer predicted
    /// within the depth, unless the current layer when `keep_current` (an acquire may be waiting
    /// for the engine to fill it), or `pinned` (in use or being filled: a fill holds the copy).
    /// Nothing under any other limit.
    pub(crate) fn stale(
        &self,
        limit: Limit,
        schedule: &Schedule,
        keep_current: bool,
        pinned: impl Fn(Key) -> bool,
    ) -> Vec<Key> {
        if limit != Limit::Minimal || self.filled.is_empty() {
            return Vec::new();
        }
        let current = schedule.current().filter(|_| keep_current);
        let keep: Vec<Key> = schedule.upcoming(self.depth).collect();
        self.filled
            .iter()
            .copied()
            .filter(|&key| !keep.contains(&key) && Some(key) != current && !pinned(key))
            .collect()
    }

    /// Whether the engine may fill `key` ahead now. Under budget 0 only a layer still predicted
    /// within the depth (or the current one, which an acquire may be waiting for) while the
    /// window has room; any layer under other limits, where the budget alone bounds the window.
    pub(crate) fn admits(&self, limit: Limit, schedule: &Schedule, key: Key) -> bool {
        if limit != Limit::Minimal {
            return true;
        }
        let wanted =
            schedule.upcoming(self.depth).any(|k| k == key) || schedule.current() == Some(key);
        wanted && self.filled.len() < self.depth
    }

    /// A fill ahead ended: the layer is in the window (once, however often it was filled).
    pub(crate) fn insert(&mut self, key: Key) {
        if !self.filled.contains(&key) {
            self.filled.push(key);
        }
    }

    /// An acquire took the layer, or its copies went: it leaves the window. Returns whether it
    /// was there (a prefetch hit, for an acquire).
    pub(crate) fn remove(&mut self, key: Key) -> bool {
        let before = self.filled.len();
        self.filled.retain(|&k| k != key);
        self.filled.len() != before
    }
}
