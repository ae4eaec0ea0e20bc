//! How a context carries out the residency decisions (`crate::residency`): it shows the rules
//! its layers (`Layers`), evicts what they pick, and turns their refusals into errors and log
//! lines. Nothing here decides.

use super::{current_thread, Context, State};
use crate::budget::Budget;
use crate::error::Error;
use crate::log::Level;
use crate::registry::Key;
use crate::residency::{self, Candidate, Granted, Holdings, Purpose, Refusal, Request};
use crate::schedule::Schedule;
use std::thread::ThreadId;

/// Why room could not be made right now, as the acquire loop acts on it.
pub(super) enum NoRoom {
    /// Other threads hold layers in use or are loading: wait for a release.
    Wait,
    Fail(Error),
}

/// A context's layers as the residency rules read them, for the calling thread.
struct Layers<'a> {
    context: &'a Context,
    st: &'a mut State,
    me: ThreadId,
}

impl residency::Residents for Layers<'_> {
    fn budget(&self) -> &Budget {
        &self.st.budget
    }

    fn schedule(&self) -> &Schedule {
        &self.st.schedule
    }

    fn candidates(&self) -> impl Iterator<Item = Candidate> + '_ {
        self.st
            .registry
            .layers
            .iter()
            .map(|(key, l)| l.device.candidate(key, l.copying_host))
    }

    fn evict(&mut self, victim: Key) {
        let st = &mut *self.st;
        let Some(layer) = st.registry.layers.get_mut(victim) else {
            return;
        };
        let freed = layer.device.evict();
        st.budget.refund(freed);
        st.window.remove(victim);
        st.counters.evictions += 1;
        let name = &layer.name;
        self.context.logger.log(Level::Debug, || {
            format!(
                "evicted layer {name:?} ({freed} bytes); {} of vram_limit {} held",
                st.budget.in_use(),
                st.budget.limit.to_abi()
            )
        });
    }

    fn engine_filling(&self) -> bool {
        self.st.engine_filling.is_some()
    }

    fn holdings(&self, key: Key) -> Holdings {
        let me = self.me;
        let registry = &self.st.registry;
        Holdings {
            held_by_me: registry
                .layers
                .iter()
                .filter(|(_, l)| {
                    l.device
                        .in_use()
                        .is_some_and(|u| u.holders.iter().any(|h| h == me))
                })
                .count() as u64,
            onloading_here: registry.groups.iter().any(|(_, g)| g.loading == Some(me)),
            others_active: registry.layers.iter().any(|(k, l)| {
                k != key
                    && (l.busy()
                        || l.device
                            .in_use()
                            .is_some_and(|u| u.holders.iter().any(|h| h != me)))
            }),
        }
    }
}

impl Context {
    fn layers<'a>(&'a self, st: &'a mut State, me: ThreadId) -> Layers<'a> {
        Layers {
            context: self,
            st,
            me,
        }
    }

    /// Makes room for `bytes` more for layer `key` as `residency::make_room` decides, logging an
    /// overcommit or a refusal.
    pub(super) fn make_room(
        &self,
        st: &mut State,
        key: Key,
        bytes: u64,
        me: ThreadId,
        purpose: Purpose,
    ) -> Result<(), NoRoom> {
        let own = st
            .registry
            .layers
            .get(key)
            .map_or(0, |l| l.device.resident_bytes());
        let request = Request {
            key,
            bytes,
            own,
            purpose,
            strict: self.options.strict_budget,
        };
        let decided = residency::make_room(&mut self.layers(st, me), request);
        let name = st.registry.layers.get(key).map_or("", |l| &*l.name);
        let limit = st.budget.limit.to_abi();
        match decided {
            Ok(Granted::Fits) => Ok(()),
            Ok(Granted::Overcommit { footprint }) => {
                self.warn_overcommit(st, name, footprint);
                Ok(())
            }
            Err(residency::NoRoom::Wait) => Err(NoRoom::Wait),
            Err(residency::NoRoom::Refused(Refusal::NeededSooner)) => Err(NoRoom::Fail(
                Error::budget("no room for a prefetch without evicting a layer needed sooner"),
            )),
            Err(residency::NoRoom::Refused(Refusal::TooLarge { footprint })) => Err(self.refuse(format!(
                "layer {name:?} needs {footprint} bytes on the device, more than vram_limit {limit} (STRATA_FLAG_STRICT_BUDGET)"
            ))),
            Err(residency::NoRoom::Refused(Refusal::Held { held_by_me })) => Err(self.refuse(format!(
                "layer {name:?} needs {bytes} more bytes on the device, but {} of vram_limit {limit} are held by layers in use or loading ({held_by_me} in use by this thread); release some first",
                st.budget.in_use(),
            ))),
        }
    }

    /// Evicts down to the cap as `residency::trim_to_cap` decides; returns how many layers went.
    /// Called when the cap was lowered, at once and on each release.
    pub(super) fn trim_to_cap(&self, st: &mut State) -> usize {
        residency::trim_to_cap(&mut self.layers(st, current_thread()))
    }

    /// Evicts one unused layer because the device ran out of memory; false when none is left.
    pub(super) fn evict_for_memory(&self, st: &mut State) -> bool {
        residency::evict_for_memory(&mut self.layers(st, current_thread()))
    }

    /// Frees what the engine filled ahead that budget 0 may no longer keep (`Window::stale`).
    pub(super) fn drop_stale_prefetches(&self, st: &mut State, keep_current: bool) {
        let registry = &st.registry;
        let stale = st
            .window
            .stale(st.budget.limit, &st.schedule, keep_current, |key| {
                registry
                    .layers
                    .get(key)
                    .is_some_and(|l| l.device.in_use().is_some() || l.busy())
            });
        for key in stale {
            if let Some(layer) = st.registry.layers.get_mut(key) {
                st.budget.refund(layer.device.evict());
            }
            st.window.remove(key);
        }
    }

    /// A layer larger than the whole budget is about to be held alone: warned about whenever it
    /// sets a new overcommit high-water mark, so a repeating pass warns once, not every time.
    fn warn_overcommit(&self, st: &State, name: &str, footprint: u64) {
        let over = footprint.saturating_sub(st.budget.limit.to_abi());
        if over > st.budget.overcommit_peak() {
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
    fn refuse(&self, message: String) -> NoRoom {
        self.logger.log(Level::Info, || message.clone());
        NoRoom::Fail(Error::budget(message))
    }
}
