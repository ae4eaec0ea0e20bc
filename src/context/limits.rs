//! The live budget: limits changed while layers are in use, eviction down to the cap, and what the
//! engine author is told about budget decisions.

use super::{Context, NoRoom, State};
use crate::budget::{Limit, UNLIMITED};
use crate::error::{Error, Result};
use crate::log::Level;
use crate::registry::Key;
use crate::residency::{self, Candidate, Protect};
use crate::schedule::Distances;

impl Context {
    /// Sets the device budget. Unused resident layers are evicted down to it before this returns;
    /// layers in use leave when released. A larger budget lets waiting acquires go on.
    pub fn set_vram_limit(&self, bytes: u64) -> Result<()> {
        let mut st = self.lock();
        let old = st.budget.limit;
        st.budget.limit = Limit::from_abi(bytes);
        // A fill the copy engine charged under the old cap ends soon (the engine never waits on a
        // caller); what it filled is then as evictable as any other unused layer.
        while st.engine_filling.is_some() {
            st = self.wait(st)?;
        }
        if st.budget.limit == Limit::Minimal {
            // Under the old cap the engine may have filled layers ahead that budget 0 does not
            // keep: only the next prefetch_depth may stay. An acquire waiting for one that goes
            // fills it itself.
            let depth = self.options.prefetch_depth as usize;
            let upcoming: Vec<Key> = st.schedule.upcoming(depth).collect();
            self.drop_stale_prefetches(&mut st, &upcoming, false);
        }
        let evicted = self.trim_to_cap(&mut st);
        self.backend.set_memory_cap(bytes)?;
        self.logger.log(Level::Info, || {
            format!(
                "vram_limit {old} -> {}: evicted {evicted} layers, {} bytes held",
                st.budget.limit,
                st.budget.in_use()
            )
        });
        self.wake(st.waiters);
        Ok(())
    }

    /// Sets the host memory limit for disk-tier copies and staging. The host counter holds it, so
    /// whatever bounds host memory reads the live value there.
    pub fn set_host_limit(&self, bytes: u64) -> Result<()> {
        let old = self.host.limit();
        self.host.set_limit(bytes);
        let shown = |b: u64| match b {
            UNLIMITED => "unlimited".to_string(),
            b => format!("{b} bytes"),
        };
        self.logger.log(Level::Info, || {
            format!("host_limit {} -> {}", shown(old), shown(bytes))
        });
        Ok(())
    }

    /// Hands queued log messages to the log callback. The C ABI calls this as each call on the
    /// context returns; Rust callers call it where they hold no strata lock.
    pub fn flush_log(&self) {
        self.logger.flush();
    }

    /// Evicts unused resident layers until the budget holds no more than its cap (or nothing can
    /// go); returns how many went. Called when the cap was lowered, at once and on each release.
    /// Under budget 0 the layers the copy engine filled ahead stay: they are the prefetch window
    /// the budget allows.
    pub(super) fn trim_to_cap(&self, st: &mut State) -> usize {
        if !st.budget.over_cap() {
            return 0;
        }
        let distances = st.schedule.distances();
        let keep_window = st.budget.limit == Limit::Minimal;
        let mut evicted = 0;
        while st.budget.over_cap() && self.evict_one(st, None, &distances, 0, keep_window) {
            evicted += 1;
        }
        evicted
    }

    /// Evicts the layer `residency::victim` picks (Belady: the furthest predicted use), never
    /// `keep`, one predicted nearer than `nearest_allowed`, or (with `keep_prefetched`) one the
    /// copy engine filled ahead; false when no layer can go.
    pub(super) fn evict_one(
        &self,
        st: &mut State,
        keep: Option<Key>,
        distances: &Distances,
        nearest_allowed: u32,
        keep_prefetched: bool,
    ) -> bool {
        let candidates = st.registry.layers.iter().map(|(key, l)| Candidate {
            key,
            resident: l.prepared.is_some() || l.staged.is_some(),
            pinned: l.in_use > 0 || l.busy,
            prefetched: l.prefetched,
        });
        let protect = Protect {
            keep,
            nearest_allowed,
            keep_prefetched,
        };
        let victim = residency::victim(candidates, &st.schedule, distances, protect);
        let Some(victim) = victim else {
            return false;
        };
        let layer = st.registry.layers.get_mut(victim).expect("found above");
        let freed = layer.drop_device_copies();
        st.budget.refund(freed);
        st.prefetched.retain(|&k| k != victim);
        st.counters.evictions += 1;
        let name = &st.registry.layers.get(victim).expect("found above").name;
        self.logger.log(Level::Debug, || {
            format!(
                "evicted layer {name:?} ({freed} bytes); {} of vram_limit {} held",
                st.budget.in_use(),
                st.budget.limit.to_abi()
            )
        });
        true
    }

    /// A layer larger than the whole budget is about to be held alone: warned about whenever it
    /// sets a new overcommit high-water mark, so a repeating pass warns once, not every time.
    pub(super) fn warn_overcommit(&self, st: &State, key: Key, footprint: u64) {
        let over = footprint.saturating_sub(st.budget.limit.to_abi());
        if over > st.budget.overcommit_peak() {
            let name = &st.registry.layers.get(key).expect("checked").name;
            self.logger.log(Level::Warn, || {
                format!(
                    "layer {name:?} needs {footprint} bytes on the device, {over} more than vram_limit {}: overcommitting (STRATA_FLAG_STRICT_BUDGET refuses instead)",
                    st.budget.limit.to_abi()
                )
            });
        }
    }

    /// A budget refusal, logged at info level: the caller gets the error, and a log shows why
    /// a run went slower or stopped.
    pub(super) fn refuse(&self, message: String) -> NoRoom {
        self.logger.log(Level::Info, || message.clone());
        NoRoom::Fail(Error::budget(message))
    }
}
