//! In-flight marks: a layer being filled, the layer the copy engine fills, a group being onloaded.
//! Others wait while one is set, so each is set by one guard and cleared when the guard ends or
//! is dropped: a panic mid-fill (caught at the C boundary, or in the copy engine) leaves no mark
//! that later acquires, offloads or `set_vram_limit` would wait on forever.
//!
//! A guard takes the context's lock guard when it begins and lets go of it, and takes the lock
//! again only to end: so while it lives this thread holds no lock of its own, and its drop, which
//! locks, cannot deadlock on one held further up the same thread.

use super::{current_thread, Context, State};
use crate::registry::Key;
use std::sync::MutexGuard;

/// A layer marked busy while its bytes move without the lock.
#[must_use = "a fill ends with `end`, which takes the lock back and clears the mark"]
pub(super) struct Filling<'a> {
    context: &'a Context,
    key: Key,
    /// Device bytes charged for this fill plus those of the resident copy it took along: what
    /// the budget gets back when the fill never ends (both copies are freed by the unwinding).
    held_bytes: u64,
    by_engine: bool,
    ended: bool,
}

/// A group whose onload runs (without the lock, and around the progress callback).
#[must_use = "an onload ends with `end`, which clears the mark"]
pub(super) struct Onloading<'a> {
    context: &'a Context,
    group: Key,
    ended: bool,
}

impl Context {
    /// Marks `key` busy (and, for the copy engine, as the engine's fill) and lets go of the lock.
    /// `held_bytes`: the device bytes this fill holds (see `Filling::held_bytes`).
    pub(super) fn begin_fill<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        key: Key,
        held_bytes: u64,
        by_engine: bool,
    ) -> Filling<'a> {
        if let Some(layer) = st.registry.layers.get_mut(key) {
            layer.busy = true;
        }
        if by_engine {
            st.engine_filling = Some(key);
        }
        drop(st);
        Filling {
            context: self,
            key,
            held_bytes,
            by_engine,
            ended: false,
        }
    }

    /// Marks `group` as onloaded by this thread and lets go of the lock.
    pub(super) fn begin_onload<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        group: Key,
    ) -> Onloading<'a> {
        if let Some(g) = st.registry.groups.get_mut(group) {
            g.loading = Some(current_thread());
        }
        drop(st);
        Onloading {
            context: self,
            group,
            ended: false,
        }
    }
}

impl<'a> Filling<'a> {
    /// Takes the lock back and clears the marks: the fill has ended, whatever its outcome.
    pub(super) fn end(mut self) -> MutexGuard<'a, State> {
        let mut st = self.context.lock();
        self.clear(&mut st);
        self.ended = true;
        st
    }

    fn clear(&self, st: &mut State) {
        if let Some(layer) = st.registry.layers.get_mut(self.key) {
            layer.busy = false;
        }
        if self.by_engine {
            st.engine_filling = None;
        }
        self.context.wake(st.waiters);
    }
}

impl Drop for Filling<'_> {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        // Unwinding from a panic mid-fill: what the fill held on the device was freed on the way.
        let mut st = self.context.lock();
        st.budget.refund(self.held_bytes);
        self.clear(&mut st);
    }
}

impl Onloading<'_> {
    /// Clears the mark; `onloaded` says whether the group now counts as onloaded.
    pub(super) fn end(mut self, st: &mut State, onloaded: bool) {
        if let Some(g) = st.registry.groups.get_mut(self.group) {
            g.loading = None;
            g.onloaded = onloaded;
        }
        self.context.wake(st.waiters);
        self.ended = true;
    }
}

impl Drop for Onloading<'_> {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        let mut st = self.context.lock();
        if let Some(g) = st.registry.groups.get_mut(self.group) {
            g.loading = None;
        }
        self.context.wake(st.waiters);
    }
}
