//! Residency: which layer leaves the device when room is needed. The rule lives here, as a pure
//! function over a read-only view of the layers; `Context` executes what it decides (frees the
//! copies, refunds the budget, wakes waiters), and `strata plan` replays passes through the same
//! function (`simulate`), so the plan's figures are what a context does.
//!
//! The policy:
//! - **Belady over the learned schedule.** The victim is the evictable layer whose next use the
//!   schedule predicts furthest away (`Schedule::eviction_rank`): layers off the predicted path
//!   first, the most recently used first among them; then the furthest predicted use. On a
//!   repeating pass of equal layers this is the offline optimum, Σ − B bytes per steady pass
//!   (`tests.rs`); on a diffusion pipeline it stays within 5% of it (`tests/schedule.rs`).
//! - **What counts against the budget**: every copy on the compute device: a layer's resident
//!   (preparing-tier) copy, the computation form converted ahead for the next acquire, and the
//!   converted copy of a layer in use (refunded at its release). Only unused layers holding a
//!   resident or converted-ahead copy can be evicted; a layer in use or being filled is pinned.
//! - **The prefetch window**: a fill ahead for a layer predicted `d` acquires away may evict only
//!   layers predicted after it (`nearest_allowed = d + 1`), never waits and never overcommits;
//!   when it does not fit the copy engine stops until the next acquire.
//! - **Budget 0** (`Limit::Minimal`): nothing stays resident between uses; a layer's copies go at
//!   its release. Only the prefetch window may hold layers ahead (at most `prefetch_depth`, those
//!   still predicted next), so trimming to the cap keeps the layers the engine filled ahead.

mod simulate;
#[cfg(test)]
mod tests;

pub use simulate::{LayerBytes, Simulation};

use crate::registry::Key;
use crate::schedule::{Distances, Schedule};

/// What the eviction rule reads of one layer.
#[derive(Clone, Copy, Debug)]
pub struct Candidate {
    pub key: Key,
    /// It holds a resident or converted-ahead copy on the device: something to free.
    pub resident: bool,
    /// In use, or being filled without the context lock: it may not go.
    pub pinned: bool,
    /// The copy engine filled it ahead and no acquire has taken it yet.
    pub prefetched: bool,
}

/// Which layers an eviction must leave.
#[derive(Clone, Copy, Debug, Default)]
pub struct Protect {
    /// The layer room is being made for.
    pub keep: Option<Key>,
    /// Layers predicted nearer than this many acquires stay (a prefetch evicts only later ones).
    pub nearest_allowed: u32,
    /// Layers the copy engine filled ahead stay (budget 0's window).
    pub keep_prefetched: bool,
}

/// The layer to evict among `candidates`: the evictable one whose next use is predicted furthest
/// away; `None` when none may go. Ties go to the last candidate, in the order given.
pub fn victim(
    candidates: impl IntoIterator<Item = Candidate>,
    schedule: &Schedule,
    distances: &Distances,
    protect: Protect,
) -> Option<Key> {
    candidates
        .into_iter()
        .filter(|c| {
            Some(c.key) != protect.keep
                && c.resident
                && !c.pinned
                && !(protect.keep_prefetched && c.prefetched)
        })
        .map(|c| (schedule.eviction_rank(c.key, distances), c.key))
        .filter(|(rank, _)| rank.0 >= protect.nearest_allowed)
        .max_by_key(|(rank, _)| *rank)
        .map(|(_, key)| key)
}
