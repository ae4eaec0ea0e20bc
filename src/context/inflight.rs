//! In-flight marks: a layer being filled on the device (`OnDevice::begin_fill`), the layer
//! the copy engine fills, a host copy being made, a group being onloaded. Others wait while one is
//! set, so each is set by one guard and cleared when the guard ends or is dropped: a panic
//! mid-fill (caught at the C boundary, or in the copy engine) leaves no mark that later acquires,
//! offloads or `set_vram_limit` would wait on forever.
//!
//! A fill's guard holds the context's lock while `begin_fill` runs what the caller does before the
//! bytes move (asking the copy engine for the next layers, which then sees the layer filling), lets
//! go of it, and takes it again only to end: its drop uses the lock it holds, or locks, so it
//! cannot deadlock on a lock held further up the same thread.

use super::{current_thread, Context, State};
use crate::registry::Key;
use crate::residency::Taken;
use std::sync::MutexGuard;

/// What a fill is making.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Making {
    /// The layer's device copies, by an acquire or (`by_engine`) by the copy engine.
    Device { by_engine: bool },
    /// A host copy (offload or onload tier).
    Host,
}

/// A layer whose bytes move without the lock.
#[must_use = "a fill ends with `end`, which takes the lock back and clears the mark"]
pub(super) struct Filling<'a> {
    context: &'a Context,
    /// The lock, until `unlock`.
    locked: Option<MutexGuard<'a, State>>,
    key: Key,
    making: Making,
    /// Device bytes charged for this fill plus those of the resident copy it took along: what
    /// the budget gets back when the fill never ends (both copies are freed by the unwinding).
    held_bytes: u64,
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
    /// Marks `key` filling on the device (and, for the copy engine, as the engine's fill), with
    /// `charged` bytes paid for it; its resident copy comes out with the returned `Taken`. Runs
    /// `while_locked` with the mark set, then lets go of the lock.
    pub(super) fn begin_fill<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        key: Key,
        (charged, by_engine): (u64, bool),
        while_locked: impl FnOnce(&mut State),
    ) -> (Filling<'a>, Taken) {
        let taken = match st.registry.layers.get_mut(key) {
            Some(layer) => layer.device.begin_fill(),
            None => Taken {
                prepared: None,
                prefetched: false,
            },
        };
        if by_engine {
            st.engine_filling = Some(key);
        }
        let resident = taken.prepared.as_ref().map_or(0, |copy| copy.bytes());
        let mut filling = Filling {
            context: self,
            locked: Some(st),
            key,
            making: Making::Device { by_engine },
            held_bytes: charged + resident,
            ended: false,
        };
        if let Some(st) = filling.locked.as_deref_mut() {
            while_locked(st);
        }
        filling.locked = None;
        (filling, taken)
    }

    /// Marks `key` as having a host copy made, and lets go of the lock.
    pub(super) fn begin_host_copy<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        key: Key,
    ) -> Filling<'a> {
        if let Some(layer) = st.registry.layers.get_mut(key) {
            layer.copying_host = true;
        }
        drop(st);
        Filling {
            context: self,
            locked: None,
            key,
            making: Making::Host,
            held_bytes: 0,
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
    /// Takes the lock back and clears the marks: the fill has ended, whatever its outcome. A
    /// device fill's layer is absent until the caller puts back what it made, under this lock.
    pub(super) fn end(mut self) -> MutexGuard<'a, State> {
        let mut st = self.locked.take().unwrap_or_else(|| self.context.lock());
        self.clear(&mut st);
        self.ended = true;
        st
    }

    fn clear(&self, st: &mut State) {
        let layer = st.registry.layers.get_mut(self.key);
        match self.making {
            Making::Host => {
                if let Some(layer) = layer {
                    layer.copying_host = false;
                }
            }
            Making::Device { by_engine } => {
                if let Some(layer) = layer {
                    layer.device.end_fill();
                }
                if by_engine {
                    st.engine_filling = None;
                }
            }
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
        let mut st = self.locked.take().unwrap_or_else(|| self.context.lock());
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
