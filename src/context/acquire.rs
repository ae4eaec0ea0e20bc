//! Acquire and release: the loop that brings a layer to its computation form (waiting, onloading,
//! joining a use, taking a resident copy, or filling it through `fill.rs`), the one place an
//! acquire is counted, handing out the views, and ending a use.

use super::fill::FillFor;
use super::residents::NoRoom;
use super::transfer::{host_copy_missing, nearest_host_copy};
use super::{current_thread, Context, State, View};
use crate::backend::StreamHandle;
use crate::error::{Error, ErrorKind, Result};
use crate::registry::{HostCopy, Key, Layer, LayerId};
use crate::residency::{self, Computation};
use crate::stats::AcquireKind;
use crate::tiers::{Device, Tier};
use crate::trace::{Span, Stamp, Track};
use std::sync::{Arc, MutexGuard};
use std::thread::ThreadId;
use std::time::Instant;

impl Context {
    /// Makes a layer available in its computation form and calls `view` for each tensor.
    /// `capacity` is how many views the caller has room for; fewer than the layer's tensors is
    /// `ErrorKind::BufferTooSmall`, and nothing is acquired.
    pub fn acquire(
        &self,
        id: LayerId,
        stream: StreamHandle,
        capacity: usize,
        mut view: impl FnMut(usize, View<'_>),
    ) -> Result<usize> {
        self.backend.check_stream(stream)?;
        // Set when the acquire first has to wait or load: the time until it returns is a stall.
        let mut started: Option<Instant> = None;
        let me = current_thread();
        let mut st = self.lock();
        let key = self.layer_key(&st, id)?;
        let mut recorded = false;
        loop {
            let Some(layer) = st.registry.layers.get(key) else {
                return Err(Error::handle(format!("layer id {id:#x} was unregistered")));
            };
            if capacity < layer.tensors.len() {
                return Err(Error::new(
                    ErrorKind::BufferTooSmall,
                    format!(
                        "layer {:?} has {} tensors; the views array holds {capacity}",
                        layer.name,
                        layer.tensors.len()
                    ),
                ));
            }
            if !recorded {
                // Once per acquire, however often it retries: the learned order counts acquires.
                recorded = true;
                st.schedule.record(key);
                continue;
            }
            if layer.busy() {
                started.get_or_insert_with(Instant::now);
                st = self.wait(st)?;
                continue;
            }
            let Some(group) = st.registry.groups.get(layer.group) else {
                return Err(Error::handle(format!("layer id {id:#x} was unregistered")));
            };
            let tiers = group.tiers;
            if !group.onloaded {
                let group_key = layer.group;
                drop(st);
                // Another layer's failure is that layer's: this one's own copy is checked below.
                self.onload(group_key)?;
                st = self.lock();
                st.counters.implicit_onloads += 1;
                continue;
            }
            // A layer in use has what it needs: another acquire joins that use.
            let in_use = layer.device.in_use().is_some();
            if !in_use && tiers.offload.device == Device::Cpu && layer.offload_copy.is_none() {
                st = self.ensure_host_copy(st, key, tiers, Tier::Offload)?;
                continue;
            }
            if !in_use && host_copy_missing(layer, &tiers, Tier::Onload) {
                // The group's onload could not make this layer's copy: it tries again here, so a
                // damaged file gives its error to its own layers only, at each of their acquires.
                st = self.ensure_host_copy(st, key, tiers, Tier::Onload)?;
                continue;
            }
            let in_place = self.in_place_copy(layer).cloned();
            let needs_conversion = layer.needs_conversion();
            let Some(layer) = st.registry.layers.get_mut(key) else {
                continue;
            };
            if layer.device.join(me) {
                self.count(&mut st, key, AcquireKind::ResidentHit, started);
                return self.hand_out(&mut st, key, me, stream, &mut view);
            }
            if let Some(copy) = in_place {
                layer.device.use_in_place(copy, me);
                return self.finish_hit(
                    st,
                    key,
                    (me, stream),
                    AcquireKind::ResidentHit,
                    started,
                    &mut view,
                );
            }
            // Decided on the copies, not on bytes: a layer whose tensors are all empty has copies
            // of 0 bytes, which must still be made before views can point into them.
            if let Some(prefetched) = layer.device.take_for_use(needs_conversion, me) {
                // Resident, and converted ahead when the forms differ: a hit, nothing moves.
                let kind = if prefetched {
                    AcquireKind::PrefetchHit
                } else {
                    AcquireKind::ResidentHit
                };
                return self.finish_hit(st, key, (me, stream), kind, started, &mut view);
            }
            started.get_or_insert_with(Instant::now);
            let (guard, filled) = self.fill_layer(st, key, FillFor::Use(me));
            st = guard;
            match filled {
                Ok(kind) => {
                    self.count(&mut st, key, kind, started);
                    return self.hand_out(&mut st, key, me, stream, &mut view);
                }
                Err(NoRoom::Wait) => st = self.wait(st)?,
                Err(NoRoom::Fail(e)) => return Err(e),
            }
        }
    }

    /// The host copy a layer is handed out from in place, when the device reads host memory and
    /// no tier in between changes the bytes (an fp8 preparing tier must round through fp8 on the
    /// CPU exactly as it would on a GPU).
    pub(super) fn in_place_copy<'a>(&self, layer: &'a Layer) -> Option<&'a Arc<HostCopy>> {
        let (copy, tier) = nearest_host_copy(layer, true)?;
        let forms = &layer.forms;
        (self.backend.reads_host_memory()
            && forms.same_as_computation(tier)
            && forms.same_as_computation(Tier::Preparing))
        .then_some(copy)
    }

    /// Counts a hit, asks the engine for what comes next, and hands out the views.
    pub(super) fn finish_hit(
        &self,
        mut st: MutexGuard<'_, State>,
        key: Key,
        (me, stream): (ThreadId, StreamHandle),
        kind: AcquireKind,
        started: Option<Instant>,
        view: impl FnMut(usize, View<'_>),
    ) -> Result<usize> {
        self.count(&mut st, key, kind, started);
        self.request_prefetch(&mut st);
        self.hand_out(&mut st, key, me, stream, view)
    }

    /// The one place an acquire is counted, as `kind`, with the time since it first waited or
    /// loaded as stall. A layer the engine filled ahead leaves its window.
    pub(super) fn count(
        &self,
        st: &mut State,
        key: Key,
        kind: AcquireKind,
        started: Option<Instant>,
    ) {
        if kind == AcquireKind::PrefetchHit {
            st.window.remove(key);
        }
        let stall = started.map_or(0, |started| started.elapsed().as_nanos() as u64);
        st.counters.count_acquire(kind, stall);
    }

    /// Makes the caller's stream wait for the layer's fill, then hands out the views. If the
    /// device refuses the wait, the use just counted ends again and nothing is handed out.
    pub(super) fn hand_out(
        &self,
        st: &mut State,
        key: Key,
        me: ThreadId,
        stream: StreamHandle,
        view: impl FnMut(usize, View<'_>),
    ) -> Result<usize> {
        let Some((layer, computation)) = st
            .registry
            .layers
            .get(key)
            .and_then(|l| Some((l, l.device.computation()?)))
        else {
            return Err(Error::state("the layer is not in use"));
        };
        let waited = computation.memory().map_or(Ok(()), |memory| {
            self.backend
                .ready_for(memory, stream)
                .map_err(|e| e.context(format!("layer {:?}", layer.name)))
        });
        if let Err(e) = waited {
            self.end_use(st, key, me);
            return Err(e);
        }
        Ok(self.emit_views(layer, computation, view))
    }

    pub(super) fn emit_views(
        &self,
        layer: &Layer,
        computation: Computation<'_>,
        mut view: impl FnMut(usize, View<'_>),
    ) -> usize {
        let (base, slots, device) = match computation {
            Computation::Host(copy) => (
                copy.buffer.as_slice().as_ptr() as u64,
                &copy.slots,
                Device::Cpu,
            ),
            Computation::Device(copy) => (copy.memory.addr, &copy.slots, self.backend.device()),
        };
        let device_index = self.backend.device_index();
        for (i, (meta, slot)) in layer.tensors.iter().zip(slots).enumerate() {
            view(
                i,
                View {
                    name: &meta.name,
                    addr: base + slot.offset as u64,
                    dtype: slot.repr.dtype,
                    device,
                    device_index,
                    shape: &meta.shape,
                    nbytes: slot.data_bytes() as u64,
                },
            );
        }
        layer.tensors.len()
    }

    /// Ends one use of a layer. When the last use ends, conversion temporaries are freed, and the
    /// prepared copy too when nothing may stay resident (budget 0, or the group was offloaded).
    /// On a GPU the memory is reused only after the work enqueued on `stream` so far has run.
    pub fn release(&self, id: LayerId, stream: StreamHandle) -> Result<()> {
        self.backend.check_stream(stream)?;
        let me = current_thread();
        let mut st = self.lock();
        let key = self.layer_key(&st, id)?;
        let Some(layer) = st.registry.layers.get(key) else {
            return Err(Error::handle(format!("layer id {id:#x} was unregistered")));
        };
        let Some(computation) = layer.device.computation() else {
            return Err(Error::state(format!(
                "layer {:?} is not acquired: release without acquire, or released twice",
                layer.name
            )));
        };
        if let Some(memory) = computation.memory() {
            self.backend
                .used_until(memory, stream)
                .map_err(|e| e.context(format!("layer {:?}", layer.name)))?;
        }
        self.end_use(&mut st, key, me);
        Ok(())
    }

    /// Ends one use of an acquired layer by thread `me`. At the last, the converted copy is
    /// freed, and the resident one too unless `residency::stays_after_use`.
    pub(super) fn end_use(&self, st: &mut State, key: Key, me: ThreadId) {
        let limit = st.budget.limit;
        let State {
            registry,
            budget,
            trace,
            ..
        } = st;
        let Some(layer) = registry.layers.get_mut(key) else {
            return;
        };
        let onloaded = registry.groups.get(layer.group).is_some_and(|g| g.onloaded);
        let keep = residency::stays_after_use(limit, onloaded);
        let Some(ended) = layer.device.end_use(me, keep) else {
            return;
        };
        trace.record(Span {
            track: Track::Compute,
            name: layer.name.clone(),
            what: "compute",
            start: ended.since,
            end: Stamp::now(),
            bytes: 0,
        });
        // Each copy freed is refunded (and sampled for the timeline) on its own, as it goes.
        for freed in [ended.converted, ended.prepared].into_iter().flatten() {
            budget.refund(freed);
        }
        if keep && budget.over_cap() {
            // The cap was lowered while layers were in use: they leave as they are released.
            self.trim_to_cap(st);
        }
        self.wake(st.waiters);
    }
}
