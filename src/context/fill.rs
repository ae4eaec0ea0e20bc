//! The one fill path, for an acquire's miss and for the copy engine alike: plan what the layer
//! lacks on the device, make room (`residency::make_room` decides), charge the budget, mark the
//! layer filling (its resident copy travels with the fill), move the bytes without the lock, then
//! install the copies (in use for an acquire, resident ahead for the engine) or refund them.

use super::inflight::Filling;
use super::residents::NoRoom;
use super::transfer::{nearest_source, Source};
use super::{Context, State};
use crate::error::Error;
use crate::registry::{DeviceCopy, Key, Layout, TensorMeta};
use crate::residency::{self, Purpose};
use crate::stats::AcquireKind;
use crate::trace::Span;
use std::sync::{Arc, MutexGuard};
use std::thread::ThreadId;

/// Who a fill is for: an acquire by thread `me` (the layer ends in use by it), or the copy engine
/// filling ahead a layer predicted this many acquires away (the layer ends resident).
#[derive(Clone, Copy, Debug)]
pub(super) enum FillFor {
    Use(ThreadId),
    Ahead(u32),
}

/// What a fill must add on the device: the prepared copy unless resident, and a converted copy
/// when the computation form differs from the preparing one and none was made ahead.
struct Plan {
    prepared: Layout,
    resident: bool,
    converted: Option<Layout>,
}

impl Plan {
    fn bytes(&self) -> u64 {
        let prepared = if self.resident { 0 } else { self.prepared.size };
        (prepared + self.converted.as_ref().map_or(0, |l| l.size)) as u64
    }
}

impl Context {
    /// Fills layer `key` for `purpose` (see the module doc). Returns how the acquire counts
    /// (for a fill ahead, `PrefetchHit`: what the acquire that takes it will count), or
    /// `NoRoom::Wait` when it must wait for room and try again.
    pub(super) fn fill_layer<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        key: Key,
        purpose: FillFor,
    ) -> (MutexGuard<'a, State>, Result<AcquireKind, NoRoom>) {
        let Some(layer) = st.registry.layers.get(key) else {
            let gone = Error::handle("the layer was unregistered");
            return (st, Err(NoRoom::Fail(gone)));
        };
        let converts = match purpose {
            FillFor::Use(_) => true,
            FillFor::Ahead(distance) => residency::converts_ahead(distance),
        };
        let plan = Plan {
            prepared: layer.forms.preparing.clone(),
            resident: layer.device.prepared().is_some(),
            converted: (converts && layer.conversion_missing())
                .then(|| layer.forms.computation.clone()),
        };
        let bytes = plan.bytes();
        let source = nearest_source(layer, true);
        let payload = layer.forms.preparing_payload();
        let tensors = layer.tensors.clone();
        let name = layer.name.clone();
        let (me, wanted) = match purpose {
            FillFor::Use(me) => (me, Purpose::Demand),
            FillFor::Ahead(distance) => (super::current_thread(), Purpose::Prefetch(distance)),
        };
        if let Err(no_room) = self.make_room(&mut st, key, bytes, me, wanted) {
            return (st, Err(no_room));
        }
        st.budget.charge(bytes);
        let by_engine = matches!(purpose, FillFor::Ahead(_));
        let (filling, taken) = self.begin_fill(st, key, (bytes, by_engine), |st| {
            if !by_engine {
                // The engine works on the layers after this one while this one is filled. This
                // one is marked filling already: nothing the engine is asked can take its copy.
                self.request_prefetch(st);
            }
        });
        let was_resident = taken.prepared.is_some();
        let resident_bytes = taken.prepared.as_ref().map_or(0, DeviceCopy::bytes);

        let mut spans = Vec::new();
        let result = self.fill_device(&source, &tensors, taken.prepared, plan, &name, &mut spans);
        // Before the lock: once it is taken the group may be destroyed, and its host copies
        // must then be gone with it rather than kept a moment longer by this thread.
        drop(source);
        let mut st = self.end_fill(filling, spans);

        let State {
            registry,
            budget,
            counters,
            window,
            ..
        } = &mut *st;
        let Some(layer) = registry.layers.get_mut(key) else {
            // Layers being filled are not removed, but no panic is worth that promise: what this
            // fill charged and the resident copy it took along go back with the copies.
            budget.refund(bytes + resident_bytes);
            let gone = Error::handle(format!("layer {name:?} was removed during its fill"));
            return (st, Err(NoRoom::Fail(gone)));
        };
        let (prepared, converted) = match result {
            Ok(filled) => filled,
            Err((prepared, e)) => {
                // `bytes` paid for what this fill made; a copy made here goes with it, and only a
                // copy that was resident before stays.
                layer
                    .device
                    .restore(prepared.filter(|_| was_resident), taken.prefetched);
                budget.refund(bytes);
                return (st, Err(NoRoom::Fail(e.context(format!("layer {name:?}")))));
            }
        };
        if !was_resident {
            counters.bytes_to_device += payload;
        }
        let kind = match purpose {
            FillFor::Use(me) => {
                layer.device.finish_fill_for_use(prepared, converted, me);
                // Filled ahead without its conversion (a layer further than the next): the bytes
                // moved early, and only the conversion was left to this acquire.
                if taken.prefetched {
                    AcquireKind::PrefetchHit
                } else if was_resident {
                    AcquireKind::ResidentHit
                } else {
                    AcquireKind::Miss
                }
            }
            FillFor::Ahead(_) => {
                layer.device.finish_fill_ahead(prepared, converted);
                // A layer filled ahead earlier and now only converted is in the window once.
                window.insert(key);
                AcquireKind::PrefetchHit
            }
        };
        (st, Ok(kind))
    }

    /// Ends a fill: takes the lock back, clears the marks, records the fill's spans.
    fn end_fill<'a>(&'a self, filling: Filling<'a>, spans: Vec<Span>) -> MutexGuard<'a, State> {
        let mut st = filling.end();
        for span in spans {
            st.trace.record(span);
        }
        st
    }

    /// Fills the prepared copy (unless `resident` brings it) and the converted one (if planned).
    /// On failure hands back the prepared copy, so nothing resident is lost.
    fn fill_device(
        &self,
        source: &Source,
        tensors: &[TensorMeta],
        resident: Option<DeviceCopy>,
        plan: Plan,
        layer_name: &Arc<str>,
        spans: &mut Vec<Span>,
    ) -> Filled {
        let prepared = match resident {
            Some(copy) => copy,
            None => {
                let Layout { slots, size } = plan.prepared;
                self.make_prepared(source, tensors, &slots, size, layer_name, spans)
                    .map_err(|e| (None, e))?
            }
        };
        let converted = match plan.converted {
            Some(Layout { slots, size }) => {
                match self.make_converted(&prepared, &slots, size, layer_name, spans) {
                    Ok(copy) => Some(copy),
                    Err(e) => return Err((Some(prepared), e)),
                }
            }
            None => None,
        };
        Ok((prepared, converted))
    }
}

/// A device fill's outcome: the prepared copy and the converted one (when planned), or the error
/// with the prepared copy the fill was given back, so nothing resident is lost.
type Filled = std::result::Result<(DeviceCopy, Option<DeviceCopy>), (Option<DeviceCopy>, Error)>;
