//! Groups: creating and destroying them, onloading and offloading, and the host copies of the
//! offload and onload tiers that an onload (or an acquire) makes.

use super::transfer::{host_copy_missing, nearest_source};
use super::{current_thread, Context, State};
use crate::error::{Error, Result};
use crate::log::Level;
use crate::registry::{Group, GroupId, Key, Layout};
use crate::tiers::{Device, Tier, Tiers};
use std::sync::{Arc, MutexGuard};

impl Context {
    pub fn create_group(&self, name: &str, tiers: &Tiers) -> Result<GroupId> {
        tiers.check(self.backend.device())?;
        let mut st = self.lock();
        let key = st.registry.groups.insert(Group {
            name: name.to_owned(),
            tiers: *tiers,
            onloaded: false,
            loading: None,
            layers: Default::default(),
        });
        Ok(GroupId(key.id()))
    }

    pub(super) fn group_key(&self, st: &State, id: GroupId) -> Result<Key> {
        st.registry.groups.key(id.0).ok_or_else(|| {
            Error::handle(format!(
                "group id {id:#x} is not a group of this context (destroyed, never created, or another context's)"
            ))
        })
    }

    /// Destroys a group and its layers; refused while any of them is in use.
    pub fn destroy_group(&self, id: GroupId) -> Result<()> {
        let mut st = self.lock();
        let key = self.group_key(&st, id)?;
        // An onload is a call still running (perhaps the very one whose progress callback is
        // calling this): refuse rather than wait on it.
        if st
            .registry
            .groups
            .get(key)
            .is_some_and(|g| g.loading.is_some())
        {
            return Err(Error::state(
                "the group is being onloaded; destroy it once that returns",
            ));
        }
        // A layer being filled (by the copy engine ahead of its use, or by an acquire) is not a
        // use by the caller: wait for the fill to end, then decide. Refusing instead made the
        // outcome depend on the engine's timing.
        st = self.wait_until_group_idle(st, key)?;
        let key = self.group_key(&st, id)?;
        let layers = st
            .registry
            .groups
            .get(key)
            .map(|g| g.layers.values().copied().collect::<Vec<_>>())
            .unwrap_or_default();
        for &layer in &layers {
            let l = &st
                .registry
                .layers
                .get(layer)
                .expect("group lists live layers");
            if l.device.in_use().is_some() {
                return Err(Error::state(format!(
                    "group {:?} has layer {:?} in use; release it first",
                    st.registry.groups.get(key).map_or("", |g| g.name.as_str()),
                    l.name
                )));
            }
        }
        // Emptied first, so that removing each layer does not search the group's list for it:
        // destroying a group of N layers stays linear.
        if let Some(group) = st.registry.groups.get_mut(key) {
            group.layers.clear();
        }
        for layer in layers {
            self.remove_layer(&mut st, layer);
        }
        st.registry.groups.remove(key);
        if st.registry.groups.iter().next().is_none() {
            // The group is gone either way: a failure to give memory back is only worth a word.
            self.host.release_banked();
            if let Err(e) = self.backend.release_idle() {
                self.logger.log(Level::Warn, || {
                    format!(
                        "giving back pooled memory after the last group: {}",
                        e.message
                    )
                });
            }
        }
        Ok(())
    }

    /// Onloads a group. A layer whose copy cannot be made (its file damaged, host memory short)
    /// does not hold the others back: they are onloaded, the group counts as onloaded, the first
    /// such error is returned, and each failed layer tries again at its own acquire.
    pub fn onload_group(&self, id: GroupId) -> Result<()> {
        let key = {
            let st = self.lock();
            self.group_key(&st, id)?
        };
        match self.onload(key)? {
            None => Ok(()),
            Some(first_failure) => Err(first_failure),
        }
    }

    pub fn offload_group(&self, id: GroupId) -> Result<()> {
        let mut st = self.lock();
        let key = self.group_key(&st, id)?;
        st = self.wait_until_group_idle(st, key)?;
        // Destroyed by another thread during the wait: that is a stale id now.
        let key = self.group_key(&st, id)?;
        let group = st.registry.groups.get_mut(key).expect("checked just above");
        group.onloaded = false;
        let layers = group.layers.values().copied().collect::<Vec<_>>();
        for layer in layers {
            let l = st
                .registry
                .layers
                .get_mut(layer)
                .expect("group lists live layers");
            l.onload_copy = None;
            // A layer in use keeps its copies until its release, which frees them.
            if l.device.in_use().is_none() {
                let freed = l.device.evict();
                st.budget.refund(freed);
            }
        }
        self.wake(st.waiters);
        Ok(())
    }

    /// Waits until no onload runs on the group and none of its layers is being filled; returns at
    /// once when the group is gone (callers look it up again). An onload run by this very thread
    /// (a call from its progress callback) would never end while this waits: ErrorKind::State.
    pub(super) fn wait_until_group_idle<'a>(
        &self,
        mut st: MutexGuard<'a, State>,
        key: Key,
    ) -> Result<MutexGuard<'a, State>> {
        let me = current_thread();
        loop {
            let Some(group) = st.registry.groups.get(key) else {
                return Ok(st);
            };
            if group.loading == Some(me) {
                return Err(Error::state(format!(
                    "group {:?} is being onloaded by this thread (a call from the progress callback): call again once the onload returns",
                    group.name
                )));
            }
            let busy = group.loading.is_some()
                || group
                    .layers
                    .values()
                    .any(|&l| st.registry.layers.get(l).is_some_and(|l| l.busy()));
            if !busy {
                return Ok(st);
            }
            st = self.wait(st)?;
        }
    }

    /// Brings every layer of a group to its onload tier: host copies are made where the onload
    /// tier is in RAM in a form the offload tier does not already hold. A layer whose copy fails
    /// does not stop the others (one damaged file fails only its own layers): the group counts as
    /// onloaded, that layer makes its copy at its own acquire, and the first such error comes back
    /// as `Ok(Some(error))`. `Err` when the onload could not run: the group or the context gone, or
    /// a call from this thread's own progress callback.
    pub(super) fn onload(&self, group: Key) -> Result<Option<Error>> {
        let st = self.lock();
        let st = self.wait_until_group_idle(st, group)?;
        let Some(g) = st.registry.groups.get(group) else {
            return Err(Error::handle("group was destroyed during onload"));
        };
        if g.onloaded {
            return Ok(None);
        }
        let tiers = g.tiers;
        let layers = g.layers.values().copied().collect::<Vec<_>>();
        let phase = format!("onloading group {:?}", g.name);
        let host_bytes = |st: &State, key: Key| {
            let in_ram = tiers.onload.device == Device::Cpu;
            st.registry.layers.get(key).map_or(0, |l| {
                if in_ram {
                    l.forms.onload.size as u64
                } else {
                    0
                }
            })
        };
        let total: u64 = layers.iter().map(|&l| host_bytes(&st, l)).sum();
        let loading = self.begin_onload(st, group);
        let mut st = self.lock();
        let mut done = 0;
        let mut first_failure = None;
        for &layer in &layers {
            match self.ensure_host_copy(st, layer, tiers, Tier::Onload) {
                Ok(guard) => st = guard,
                Err(e) if self.is_closed() => return Err(e),
                Err(e) => {
                    st = self.lock();
                    first_failure.get_or_insert(e);
                }
            }
            if total > 0 {
                done += host_bytes(&st, layer);
                // Never under the lock: the callback may call back into strata.
                drop(st);
                self.report_progress(&phase, done, total);
                st = self.lock();
            }
        }
        // A layer registered meanwhile (from the progress callback) has no copy yet: the next
        // acquire onloads again. A set, so that onloading a group of N layers stays linear.
        let onloaded: std::collections::HashSet<Key> = layers.into_iter().collect();
        let complete = st
            .registry
            .groups
            .get(group)
            .is_some_and(|g| g.layers.values().all(|l| onloaded.contains(l)));
        loading.end(&mut st, complete);
        Ok(first_failure)
    }

    /// Makes sure the layer has its host copy for `tier` (Offload or Onload) when that tier is in
    /// RAM and needs one; fills it without the lock. A layer unregistered meanwhile needs nothing.
    pub(super) fn ensure_host_copy<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        key: Key,
        tiers: Tiers,
        tier: Tier,
    ) -> Result<MutexGuard<'a, State>> {
        loop {
            let Some(layer) = st.registry.layers.get(key) else {
                return Ok(st);
            };
            if layer.busy() {
                st = self.wait(st)?;
                continue;
            }
            if tier == Tier::Onload
                && tiers.offload.device == Device::Cpu
                && layer.offload_copy.is_none()
            {
                // The offload copy comes first, and may already be the onload form.
                st = self.ensure_host_copy(st, key, tiers, Tier::Offload)?;
                continue;
            }
            if !host_copy_missing(layer, &tiers, tier) {
                return Ok(st);
            }
            let Layout { slots, size } = layer.forms.get(tier).clone();
            let source = nearest_source(layer, false);
            let tensors = layer.tensors.clone();
            let filling = self.begin_host_copy(st, key);
            let mut spans = Vec::new();
            let made = self.make_host_copy(&source, &tensors, slots, size, &mut spans);
            let mut st = filling.end();
            for span in spans {
                st.trace.record(span);
            }
            let copy = Arc::new(made?);
            if let Some(layer) = st.registry.layers.get_mut(key) {
                match tier {
                    Tier::Offload => layer.offload_copy = Some(copy),
                    _ => layer.onload_copy = Some(copy),
                }
            }
            return Ok(st);
        }
    }
}
