//! Residency: every decision about what is on the device. Which layer leaves when room is needed,
//! whether a request waits, is refused or overcommits instead (`make_room`), what the copy engine
//! fills next and what budget 0's window keeps (`Window`), what stays after a use
//! (`stays_after_use`). The rules read a context through `Residents` and return decisions, or ask
//! it to evict; `Context` executes them (frees the copies, refunds the budget, wakes waiters), and
//! `strata plan` replays passes through the same functions (`simulate`), so the plan's figures are
//! what a context does. Changing the policy means editing this file; `tests.rs` says whether it is
//! still optimal on a repeating pass and on a diffusion pipeline.
//!
//! A layer's place on the device is a type too (`state.rs`, `OnDevice`): absent, being filled,
//! resident, in use, its copies and stage private, changed only by transitions that keep them
//! consistent.
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
mod state;
#[cfg(test)]
mod tests;
mod window;

pub use simulate::{LayerBytes, Simulation};
pub(crate) use state::{Computation, OnDevice, Taken};
pub(crate) use window::Window;

use crate::budget::{Budget, Limit};
use crate::registry::Key;
use crate::schedule::{Distances, Schedule};

/// What the eviction rule reads of one layer.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Candidate {
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
pub(crate) struct Protect {
    /// The layer room is being made for.
    pub keep: Option<Key>,
    /// Layers predicted nearer than this many acquires stay (a prefetch evicts only later ones).
    pub nearest_allowed: u32,
    /// Layers the copy engine filled ahead stay (budget 0's window).
    pub keep_prefetched: bool,
}

/// The layer to evict among `candidates`: the evictable one whose next use is predicted furthest
/// away; `None` when none may go. Ties go to the last candidate, in the order given.
pub(crate) fn victim(
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

/// What the rules read of a context, and the one thing they ask it to do: evict.
pub(crate) trait Residents {
    fn budget(&self) -> &Budget;
    fn schedule(&self) -> &Schedule;
    /// Every layer, as the eviction rule sees it.
    fn candidates(&self) -> impl Iterator<Item = Candidate> + '_;
    /// Frees the layer's resident and converted-ahead copies, refunding the budget.
    fn evict(&mut self, key: Key);
    /// Whether the copy engine is filling a layer now. It never waits on a caller, so its fill
    /// ends, and what it filled can then be evicted: a demand may always wait for it.
    fn engine_filling(&self) -> bool;
    /// What the requesting thread and the others hold, asked only when nothing more can be
    /// evicted for a demand (it scans every layer).
    fn holdings(&self, key: Key) -> Holdings;
}

/// Who holds what, for the rule that only a thread holding nothing may wait for room.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Holdings {
    /// Layers in use by the requesting thread.
    pub held_by_me: u64,
    /// The requesting thread is onloading a group (a call from its progress callback): that
    /// counts as holding, since others may be waiting for the onload.
    pub onloading_here: bool,
    /// Another layer is in use by another thread, or being filled.
    pub others_active: bool,
}

/// Who needs the room: an acquire (which may wait, and may overcommit with one layer larger than
/// the budget) or the copy engine filling a layer at this predicted distance (which may not).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Purpose {
    Demand,
    Prefetch(u32),
}

/// A request for `bytes` more on the device for layer `key`, which holds `own` there already.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Request {
    pub key: Key,
    pub bytes: u64,
    pub own: u64,
    pub purpose: Purpose,
    /// `STRATA_FLAG_STRICT_BUDGET`: refuse a layer larger than the budget instead of overcommitting.
    pub strict: bool,
}

/// Room made: the bytes fit, or one layer larger than the whole budget is held alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Granted {
    Fits,
    Overcommit { footprint: u64 },
}

/// Why room could not be made right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum NoRoom {
    /// Other threads hold layers in use or are filling: wait for a release, then ask again.
    Wait,
    Refused(Refusal),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The layer alone (`footprint`: its copies and the request) is larger than the budget, and
    /// the request may not overcommit (strict budget, or a prefetch).
    TooLarge { footprint: u64 },
    /// A prefetch would have to evict a layer needed sooner than its own.
    NeededSooner,
    /// The room is held by layers in use or loading, and this thread, holding `held_by_me`
    /// layers itself, may not wait for them: two such threads would wait for each other forever.
    Held { held_by_me: u64 },
}

/// Makes room for `request`: evicts unused resident layers, furthest predicted use first, until
/// the bytes fit, or says why they cannot. The layer's whole footprint (`own` + `bytes`) is what
/// may exceed the cap alone. A prefetch evicts only layers predicted after its own, never waits
/// and never overcommits: the engine's depth shrinks instead.
pub(crate) fn make_room(
    residents: &mut impl Residents,
    request: Request,
) -> Result<Granted, NoRoom> {
    let footprint = request.own + request.bytes;
    let too_large = residents.budget().exceeds_cap_alone(footprint);
    if too_large && (request.strict || request.purpose != Purpose::Demand) {
        return Err(NoRoom::Refused(Refusal::TooLarge { footprint }));
    }
    if residents.budget().fits(request.bytes) {
        return Ok(Granted::Fits);
    }
    let distances = residents.schedule().distances();
    let protect = Protect {
        keep: Some(request.key),
        nearest_allowed: match request.purpose {
            Purpose::Demand => 0,
            Purpose::Prefetch(distance) => distance.saturating_add(1),
        },
        keep_prefetched: false,
    };
    while !residents.budget().fits(request.bytes) {
        if evict_one(residents, &distances, protect) {
            continue;
        }
        if request.purpose != Purpose::Demand {
            return Err(NoRoom::Refused(Refusal::NeededSooner));
        }
        if too_large && residents.budget().in_use() == request.own {
            return Ok(Granted::Overcommit { footprint });
        }
        if residents.engine_filling() {
            return Err(NoRoom::Wait);
        }
        let held = residents.holdings(request.key);
        if held.held_by_me == 0 && !held.onloading_here && held.others_active {
            return Err(NoRoom::Wait);
        }
        return Err(NoRoom::Refused(Refusal::Held {
            held_by_me: held.held_by_me,
        }));
    }
    Ok(Granted::Fits)
}

/// Evicts unused resident layers until the budget holds no more than its cap (or nothing can go);
/// returns how many went. Under budget 0 the layers the copy engine filled ahead stay: they are
/// the prefetch window the budget allows.
pub(crate) fn trim_to_cap(residents: &mut impl Residents) -> usize {
    if !residents.budget().over_cap() {
        return 0;
    }
    let distances = residents.schedule().distances();
    let protect = Protect {
        keep_prefetched: residents.budget().limit == Limit::Minimal,
        ..Protect::default()
    };
    let mut evicted = 0;
    while residents.budget().over_cap() && evict_one(residents, &distances, protect) {
        evicted += 1;
    }
    evicted
}

/// Evicts one unused layer, the furthest predicted use first, when the device itself ran out of
/// memory under the budget (another program took some); false when none is left.
pub(crate) fn evict_for_memory(residents: &mut impl Residents) -> bool {
    let distances = residents.schedule().distances();
    evict_one(residents, &distances, Protect::default())
}

fn evict_one(residents: &mut impl Residents, distances: &Distances, protect: Protect) -> bool {
    let chosen = victim(
        residents.candidates(),
        residents.schedule(),
        distances,
        protect,
    );
    match chosen {
        Some(key) => {
            residents.evict(key);
            true
        }
        None => false,
    }
}

/// Whether a layer's resident copy stays on the device after its last use ends: not under budget
/// 0, which keeps nothing between uses, nor once its group is offloaded.
pub(crate) fn stays_after_use(limit: Limit, group_onloaded: bool) -> bool {
    limit != Limit::Minimal && group_onloaded
}

/// Whether a layer predicted `distance` acquires away is converted ahead into its computation
/// form: only the next one, since that form is the larger (bf16 from fp8), and converting takes
/// little time next to moving the bytes.
pub(crate) fn converts_ahead(distance: u32) -> bool {
    distance <= 1
}

/// Whether the copy engine has work ahead for a layer predicted `distance` acquires away: bytes
/// to move, or (for the layer converted ahead) a conversion to make.
pub(crate) fn needs_fill(resident: bool, conversion_missing: bool, distance: u32) -> bool {
    !resident || (converts_ahead(distance) && conversion_missing)
}
