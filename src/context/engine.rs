//! The copy engine: a worker thread that brings the layers predicted next into their computation
//! form while the caller computes the current one. It reads (from the checkpoint or a host copy),
//! uploads and converts through the same backend calls an acquire on a miss would make, so the
//! handoff is a hit when the prediction was right and the fill finished, and a wait (stall) only
//! when it has not finished yet.
//!
//! The worker is one thread on every device: it runs the fill path (`fill.rs`) for each layer in
//! turn; on a GPU the bytes it moves go through the backend's copy stream and its events, so an
//! acquire of a layer it filled waits on the device, not on this thread. The worker holds the
//! context only while it fills a layer, so dropping the last handle to a context stops it even
//! when it is idle.
//!
//! Its queue holds only what `Window::targets` picked (`crate::residency`); its body, `prefetch`,
//! is below with the loop.

use super::fill::FillFor;
use super::{Context, State};
use crate::error::panic_message;
use crate::log::Level;
use crate::registry::Key;
use crate::registry::Layer;
use crate::residency;
use crate::tiers::Device;
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::thread::{JoinHandle, ThreadId};

#[derive(Default)]
struct Tasks {
    /// Layers to fill, nearest predicted use first. Replaced by each new prediction.
    pending: VecDeque<Key>,
    stop: bool,
}

#[derive(Default)]
struct Queue {
    tasks: Mutex<Tasks>,
    ready: Condvar,
}

impl Queue {
    fn tasks(&self) -> std::sync::MutexGuard<'_, Tasks> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Default)]
pub(super) struct CopyEngine {
    queue: Arc<Queue>,
    worker: Mutex<Option<(ThreadId, JoinHandle<()>)>>,
}

impl CopyEngine {
    /// Replaces the pending work with `keys` (nearest first), starting the worker on first use.
    /// Callers hold the context lock; the queue's lock is only ever taken after it, or alone.
    pub(super) fn submit(&self, context: &Weak<Context>, keys: &[Key]) {
        {
            let mut tasks = self.queue.tasks();
            if tasks.stop || tasks.pending.iter().eq(keys.iter()) {
                return;
            }
            tasks.pending.clear();
            tasks.pending.extend(keys);
        }
        self.queue.ready.notify_one();
        let mut worker = self.worker.lock().unwrap_or_else(|p| p.into_inner());
        if worker.is_none() {
            let queue = self.queue.clone();
            let context = context.clone();
            let spawned = std::thread::Builder::new()
                .name("strata-copy".into())
                .spawn(move || run(&queue, &context));
            // Without a worker every layer is still fetched on demand: prefetching is only ever
            // an optimisation, so a refused thread is not an error.
            if let Ok(handle) = spawned {
                *worker = Some((handle.thread().id(), handle));
            }
        }
    }

    /// Stops the worker and waits for it, unless this is the worker itself (it can drop the last
    /// handle to its context when the user destroyed it during a fill).
    pub(super) fn stop(&self) {
        self.queue.tasks().stop = true;
        self.queue.ready.notify_all();
        let worker = self.worker.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some((id, handle)) = worker {
            if id != std::thread::current().id() {
                let _ = handle.join();
            }
        }
    }
}

fn run(queue: &Queue, context: &Weak<Context>) {
    loop {
        let key = {
            let mut tasks = queue.tasks();
            loop {
                if tasks.stop {
                    return;
                }
                if let Some(key) = tasks.pending.pop_front() {
                    break key;
                }
                tasks = queue.ready.wait(tasks).unwrap_or_else(|p| p.into_inner());
            }
        };
        let Some(context) = context.upgrade() else {
            return;
        };
        // A panic mid-fill (a bug) must not end the worker or leave the layer marked busy: the
        // fill's guard clears its marks and refunds its bytes as it unwinds, and the acquires
        // waiting on it wake and fill the layer themselves.
        let filled = catch_unwind(AssertUnwindSafe(|| context.prefetch(key)));
        let fitted = filled.unwrap_or_else(|panic| {
            context.logger.log(Level::Error, || {
                format!(
                    "the copy engine panicked filling a layer ahead ({}); acquires fill it themselves",
                    panic_message(&*panic)
                )
            });
            false
        });
        if !fitted {
            // The nearest layer did not fit: those after it would not either. The next acquire
            // predicts again with the room its releases made.
            queue.tasks().pending.clear();
        }
    }
}

impl Context {
    /// Asks the copy engine for the layers predicted after the one just acquired that are not
    /// ready yet (`Window::targets`). Under budget 0, prefetched layers the prediction has moved
    /// past are dropped first; a layer an acquire is filling is not among them, whatever the
    /// prediction says (other threads may have moved it past), since its fill holds its copy.
    pub(super) fn request_prefetch(&self, st: &mut State) {
        if self.options.prefetch_depth == 0 {
            return;
        }
        self.drop_stale_prefetches(st, true);
        let wanted = st.window.targets(&st.schedule, |key, distance| {
            st.registry.layers.get(key).is_some_and(|layer| {
                layer.device.in_use().is_none()
                    && !layer.busy()
                    && self.needs_device_work(st, layer, distance)
            })
        });
        if !wanted.is_empty() {
            self.engine.submit(&self.self_ref, &wanted);
        }
    }

    /// Whether the copy engine has work to do ahead for a layer predicted `distance` acquires
    /// away: bytes to move, or (for the next layer only) a conversion to make.
    pub(super) fn needs_device_work(&self, st: &State, layer: &Layer, distance: u32) -> bool {
        // First what answers for a resident layer, which every acquire of a pass asks about.
        let conversion_missing = layer.conversion_missing();
        let resident = layer.device.prepared().is_some();
        if !residency::needs_fill(resident, conversion_missing, distance) {
            return false;
        }
        let Some(group) = st.registry.groups.get(layer.group) else {
            return false;
        };
        // A host offload tier is read from the file once, by the acquire that needs it; the
        // engine does not read around it.
        let host_ready = group.tiers.offload.device != Device::Cpu || layer.offload_copy.is_some();
        group.onloaded && host_ready && self.in_place_copy(layer).is_none()
    }

    /// Fills a layer predicted to be used soon, as the copy engine: its resident copy and its
    /// computation form, if room can be made without evicting anything needed sooner. Returns
    /// false when it did not fit (the engine then stops prefetching until the next acquire).
    pub(super) fn prefetch(&self, key: Key) -> bool {
        let mut st = self.lock();
        let Some(layer) = st.registry.layers.get(key) else {
            return true;
        };
        let Some(distance) = st.schedule.distances().of(key) else {
            return true;
        };
        if layer.device.in_use().is_some()
            || layer.busy()
            || !self.needs_device_work(&st, layer, distance)
        {
            return true;
        }
        // Budget 0 holds at most prefetch_depth layers ahead, this fill included.
        self.drop_stale_prefetches(&mut st, true);
        if !st.window.admits(st.budget.limit, &st.schedule, key) {
            return true;
        }
        let (mut st, filled) = self.fill_layer(st, key, FillFor::Ahead(distance));
        if filled.is_err() {
            // The acquire that needs this layer tries again and reports the error.
            return false;
        }
        // The cap may have been lowered during the fill; under budget 0 the prediction may have
        // moved past this layer, which then may not stay.
        self.trim_to_cap(&mut st);
        self.drop_stale_prefetches(&mut st, true);
        true
    }
}
