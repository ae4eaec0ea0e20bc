//! A context: one compute device, its budget, and every group and layer registered on it.
//!
//! One lock guards the bookkeeping; bytes move without it while the layer being filled is marked
//! busy, so threads acquiring other layers are not held up by a read or a conversion.

mod engine;
mod inflight;
mod limits;
mod load;

use crate::backend::{cpu::CpuBackend, Backend, StreamHandle};
use crate::budget::{Budget, Limit};
use crate::checkpoint::Checkpoint;
use crate::checkpoint::ReadMode;
use crate::convert::TensorBytes;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::host::{CountedBuffer, MemoryCounter};
use crate::log::{Level, LogCallback, Logger, ProgressSink};
use crate::registry::{
    Computation, DeviceCopy, Forms, Group, GroupId, HostCopy, Key, Layer, LayerId, Layout,
    Registry, TensorMeta,
};
use crate::schedule::Schedule;
use crate::slot::convert_into_slot;
use crate::stats::{Counters, Stats};
use crate::tiers::{Device, Tier, Tiers};
use crate::trace::memory_tracks;
use crate::trace::{Span, Stamp, Trace, Track};
use engine::CopyEngine;
pub use load::inject_fill_panics;
use load::Source;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::ThreadId;
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct Options {
    pub compute: Device,
    pub device_index: i32,
    /// The limits at creation; `set_vram_limit` and `set_host_limit` change the live ones, which
    /// the budget and the host counter hold.
    pub vram_limit: u64,
    pub host_limit: u64,
    pub prefetch_depth: u32,
    pub strict_budget: bool,
    /// How the disk tier reads the checkpoint (`STRATA_FLAG_DIRECT_IO`).
    pub read_mode: ReadMode,
    /// Device bytes to keep free beside the budget, as the driver reports free memory (CUDA).
    pub vram_headroom: u64,
    /// Threads for host conversions (see `host_threads::resolve`); 0 = the default.
    pub host_threads: u32,
    /// Where log messages go; without one, stderr when `STRATA_LOG` names a level.
    pub log: Option<LogCallback>,
    pub progress: ProgressSink,
}

/// A host tensor handed to `register_host`: its bytes are copied.
pub struct HostTensorIn<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub shape: Vec<i64>,
    pub data: &'a [u8],
}

/// One tensor of an acquired layer as the caller sees it.
pub struct View<'a> {
    pub name: &'a std::ffi::CStr,
    pub addr: u64,
    pub dtype: DType,
    pub device: Device,
    pub device_index: i32,
    pub shape: &'a [i64],
    pub nbytes: u64,
}

struct State {
    registry: Registry,
    budget: Budget,
    counters: Counters,
    trace: Trace,
    /// The learned order of acquires.
    schedule: Schedule,
    /// Layers the copy engine filled ahead that no acquire has taken yet.
    prefetched: Vec<Key>,
    /// The layer the copy engine is filling right now, if any: a thread that needs room may
    /// always wait for it, since the engine never waits on a caller.
    engine_filling: Option<Key>,
    /// Threads blocked in `wait`: waking nobody costs a syscall, so releases skip it when 0.
    waiters: usize,
}

pub struct Context {
    backend: Box<dyn Backend>,
    options: Options,
    logger: Arc<Logger>,
    state: Mutex<State>,
    /// Signalled whenever a layer stops being busy or in use, or memory is freed.
    changed: Condvar,
    host: Arc<MemoryCounter>,
    bytes_from_disk: AtomicU64,
    /// Set by `strata_context_destroy`: the context takes no more calls.
    closed: AtomicBool,
    engine: CopyEngine,
    /// This context, for the copy engine's worker, which must not keep it alive.
    self_ref: Weak<Context>,
}

impl Drop for Context {
    fn drop(&mut self) {
        self.engine.stop();
    }
}

/// What the budget has to hold for a layer in use, beyond what it holds already.
struct DevicePlan {
    prepared: Option<Layout>,
    converted: Option<Layout>,
}

impl DevicePlan {
    fn bytes(&self) -> u64 {
        [&self.prepared, &self.converted]
            .into_iter()
            .flatten()
            .map(|l| l.size as u64)
            .sum()
    }
}

/// Who needs the room: an acquire (which may wait, and may overcommit with one layer larger than
/// the budget) or the copy engine filling a layer at this predicted distance (which may not).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Purpose {
    Demand,
    Prefetch(u32),
}

/// Why room could not be made right now.
enum NoRoom {
    /// Other threads hold layers in use or are loading: wait for a release.
    Wait,
    Fail(Error),
}

/// How this context's host conversions run: its `host_threads`.
pub(crate) fn conversions(options: &Options) -> crate::convert::Engine {
    crate::convert::Engine::with_threads(crate::host_threads::resolve(options.host_threads))
}

impl Context {
    pub fn new(options: Options) -> Result<Arc<Context>> {
        let logger = Arc::new(Logger::new(options.log.clone()));
        let host = Arc::new(MemoryCounter::with_limit(options.host_limit));
        let backend: Box<dyn Backend> = match options.compute {
            Device::Cpu => Box::new(CpuBackend::with_conversions(conversions(&options))),
            Device::Cuda => crate::backend::open_cuda(
                options.device_index,
                options.vram_headroom,
                host.clone(),
                logger.clone(),
                conversions(&options),
            )?,
            Device::Disk => return Err(Error::invalid("the compute device cannot be the disk")),
        };
        backend.set_memory_cap(options.vram_limit)?;
        Ok(Arc::new_cyclic(|self_ref| Context {
            backend,
            logger,
            state: Mutex::new(State {
                registry: Registry::default(),
                budget: Budget::new(Limit::from_abi(options.vram_limit)),
                counters: Counters::default(),
                trace: Trace::default(),
                schedule: Schedule::default(),
                prefetched: Vec::new(),
                engine_filling: None,
                waiters: 0,
            }),
            changed: Condvar::new(),
            host,
            options,
            bytes_from_disk: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            engine: CopyEngine::default(),
            self_ref: self_ref.clone(),
        }))
    }

    /// Takes no more calls, wakes every thread waiting inside a call (each returns
    /// ErrorKind::InvalidHandle at once), and waits for the copy engine's worker to end. The
    /// worker may hold the context mid-fill, and the last handle dropped there would leave it
    /// running unjoined after destroy returned: a host that unloads the library next would unmap
    /// its code. Calls running without waiting (a fill, an onload) end as they would have.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        // Taken once, so that a thread between its look at `closed` and its wait is waiting now.
        drop(self.lock());
        self.changed.notify_all();
        self.engine.stop();
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    pub fn options(&self) -> &Options {
        &self.options
    }

    /// Tells the progress callback how far a long operation is. Callers hold no strata lock.
    pub fn report_progress(&self, phase: &str, done: u64, total: u64) {
        self.options.progress.report(phase, done, total);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is caught at the FFI boundary; the bookkeeping it left is
        // still the best there is, so keep serving rather than failing every later call.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits for a layer to stop being busy or in use, or for memory. A context destroyed before
    /// or meanwhile ends the wait with ErrorKind::InvalidHandle: `close` wakes every waiter.
    fn wait<'a>(&self, mut guard: MutexGuard<'a, State>) -> Result<MutexGuard<'a, State>> {
        let destroyed = || Error::handle("the context was destroyed while this call waited");
        if self.is_closed() {
            return Err(destroyed());
        }
        guard.waiters += 1;
        let mut guard = self
            .changed
            .wait(guard)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        guard.waiters -= 1;
        if self.is_closed() {
            return Err(destroyed());
        }
        Ok(guard)
    }

    /// Wakes the threads waiting for a layer to stop being busy or in use, or for memory.
    fn wake(&self, waiters: usize) {
        if waiters > 0 {
            self.changed.notify_all();
        }
    }

    // ----- groups -----

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

    fn group_key(&self, st: &State, id: GroupId) -> Result<Key> {
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
            if l.in_use > 0 {
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
            if l.in_use == 0 {
                let freed = l.drop_device_copies();
                st.budget.refund(freed);
            }
        }
        self.wake(st.waiters);
        Ok(())
    }

    /// Waits until no onload runs on the group and none of its layers is being filled; returns at
    /// once when the group is gone (callers look it up again). An onload run by this very thread
    /// (a call from its progress callback) would never end while this waits: ErrorKind::State.
    fn wait_until_group_idle<'a>(
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
                    .any(|&l| st.registry.layers.get(l).is_some_and(|l| l.busy));
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
    fn onload(&self, group: Key) -> Result<Option<Error>> {
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
    fn ensure_host_copy<'a>(
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
            if layer.busy {
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
            let filling = self.begin_fill(st, key, 0, false);
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

    // ----- layers -----

    /// Checks that `group` exists and `name` is free; returns the group and its tiers.
    fn check_new_layer(&self, st: &State, group: GroupId, name: &str) -> Result<(Key, Tiers)> {
        let key = self.group_key(st, group)?;
        if st.registry.layer_names.contains_key(name) {
            return Err(Error::invalid(format!(
                "a layer named {name:?} is already registered"
            )));
        }
        Ok((key, st.registry.groups.get(key).expect("checked").tiers))
    }

    fn insert_layer(&self, st: &mut State, layer: Layer) -> Result<LayerId> {
        if st.registry.layer_names.contains_key(&*layer.name) {
            return Err(Error::invalid(format!(
                "a layer named {:?} is already registered",
                layer.name
            )));
        }
        let group = layer.group;
        let name = layer.name.clone();
        let key = st.registry.layers.insert(layer);
        st.registry.layer_names.insert(name.to_string(), key);
        let group = st
            .registry
            .groups
            .get_mut(group)
            .expect("checked by caller");
        group.layers.insert(key.id(), key);
        // The group's onload made copies for the layers it had; this one has none yet. The next
        // acquire onloads again (only this layer has work to do) rather than reading around the
        // onload tier from the offload one.
        group.onloaded = false;
        Ok(LayerId(key.id()))
    }

    fn new_layer(name: &str, group: Key, tiers: &Tiers, tensors: Vec<TensorMeta>) -> Result<Layer> {
        if tensors.is_empty() {
            return Err(Error::invalid(format!("layer {name:?} has no tensors")));
        }
        let mut seen = HashSet::with_capacity(tensors.len());
        if let Some(twice) = tensors.iter().find(|t| !seen.insert(&t.name)) {
            return Err(Error::invalid(format!(
                "layer {name:?} lists tensor {:?} twice",
                twice.name
            )));
        }
        Ok(Layer {
            name: name.into(),
            forms: Forms::new(&tensors, tiers),
            group,
            tensors: tensors.into(),
            checkpoint: None,
            offload_copy: None,
            onload_copy: None,
            prepared: None,
            staged: None,
            prefetched: false,
            computation: None,
            in_use: 0,
            holders: Vec::new(),
            busy: false,
            acquired_at: None,
        })
    }

    /// Registers a layer from host tensors; their bytes are copied into the offload tier's form.
    pub fn register_host(
        &self,
        group: GroupId,
        name: &str,
        tensors: &[HostTensorIn<'_>],
    ) -> Result<LayerId> {
        let (group_key, tiers) = self.check_new_layer(&self.lock(), group, name)?;
        if tiers.offload.device == Device::Disk || tiers.onload.device == Device::Disk {
            return Err(Error::invalid(
                "host tensors have no file behind them: register them in a group whose offload and onload tiers are on the cpu",
            ));
        }
        let mut metas = Vec::with_capacity(tensors.len());
        for t in tensors {
            let meta = TensorMeta::new(t.name, t.dtype, t.shape.clone())?;
            if t.data.len() != meta.nbytes() {
                return Err(Error::invalid(format!(
                    "tensor {:?}: {} bytes given, its dtype and shape need {}",
                    t.name,
                    t.data.len(),
                    meta.nbytes()
                )));
            }
            metas.push(meta);
        }
        let mut layer = Self::new_layer(name, group_key, &tiers, metas)?;
        let Layout { slots, size } = layer.forms.offload.clone();
        let mut buffer = CountedBuffer::new(size, &self.host)?;
        for (t, slot) in tensors.iter().zip(&slots) {
            let src = TensorBytes {
                bytes: t.data,
                dtype: t.dtype,
                scales: &[],
            };
            convert_into_slot(
                src,
                slot,
                buffer.buffer.as_mut_slice(),
                conversions(&self.options),
            )?;
        }
        layer.offload_copy = Some(Arc::new(HostCopy {
            _pinned: self.backend.pin_host(buffer.buffer.as_slice()),
            buffer,
            slots,
        }));
        let mut st = self.lock();
        self.group_key(&st, group)?;
        self.insert_layer(&mut st, layer)
    }

    /// Registers a layer whose tensors stay in `checkpoint` until a tier needs them.
    pub fn register_checkpoint(
        &self,
        group: GroupId,
        checkpoint: &Checkpoint,
        name: &str,
        tensor_names: &[&str],
    ) -> Result<LayerId> {
        let layer = {
            let st = self.lock();
            let (key, tiers) = self.check_new_layer(&st, group, name)?;
            checkpoint_layer(checkpoint, key, &tiers, name, tensor_names)?
        };
        let mut st = self.lock();
        self.group_key(&st, group)?;
        self.insert_layer(&mut st, layer)
    }

    /// Registers every tensor under `prefix`, grouped into layers by name (see `layer_name_of`).
    /// All or nothing: a name clash registers no layer. Returns the number of layers.
    pub fn register_checkpoint_prefix(
        &self,
        group: GroupId,
        checkpoint: &Checkpoint,
        prefix: &str,
        keep_components: u32,
    ) -> Result<usize> {
        // Layers in the order their first tensor comes; found by name through `position`, so a
        // checkpoint of many layers takes linear time, not a scan of the layers per tensor.
        let mut layers: Vec<(String, Vec<&str>)> = Vec::new();
        let mut position: HashMap<String, usize> = HashMap::new();
        for info in checkpoint.tensors() {
            if info.name.starts_with(prefix) {
                let layer = layer_name_of(&info.name, keep_components);
                match position.get(&layer) {
                    Some(&at) => layers[at].1.push(&info.name),
                    None => {
                        position.insert(layer.clone(), layers.len());
                        layers.push((layer, vec![&info.name]));
                    }
                }
            }
        }
        if layers.is_empty() {
            return Err(Error::not_found(format!(
                "no tensor name starts with {prefix:?}"
            )));
        }
        let mut st = self.lock();
        let mut built = Vec::with_capacity(layers.len());
        for (name, tensors) in &layers {
            let (key, tiers) = self.check_new_layer(&st, group, name)?;
            built.push(checkpoint_layer(checkpoint, key, &tiers, name, tensors)?);
        }
        for layer in built {
            self.insert_layer(&mut st, layer)?;
        }
        Ok(layers.len())
    }

    pub fn find_layer(&self, name: &str) -> Result<LayerId> {
        let st = self.lock();
        st.registry
            .layer_names
            .get(name)
            .map(|&key| LayerId(key.id()))
            .ok_or_else(|| Error::not_found(format!("no layer named {name:?}")))
    }

    fn layer_key(&self, st: &State, id: LayerId) -> Result<Key> {
        st.registry.layers.key(id.0).ok_or_else(|| {
            Error::handle(format!(
                "layer id {id:#x} is not a layer of this context (unregistered, never registered, or another context's)"
            ))
        })
    }

    pub fn tensor_count(&self, id: LayerId) -> Result<usize> {
        let st = self.lock();
        let key = self.layer_key(&st, id)?;
        Ok(st.registry.layers.get(key).expect("checked").tensors.len())
    }

    pub fn unregister_layer(&self, id: LayerId) -> Result<()> {
        let mut st = self.lock();
        let key = self.layer_key(&st, id)?;
        // As in destroy_group: a fill (a prefetch the caller cannot see) ends on its own.
        while st.registry.layers.get(key).is_some_and(|l| l.busy) {
            st = self.wait(st)?;
        }
        let key = self.layer_key(&st, id)?;
        let layer = st.registry.layers.get(key).expect("checked");
        if layer.in_use > 0 {
            return Err(Error::state(format!(
                "layer {:?} is in use; release it first",
                layer.name
            )));
        }
        self.remove_layer(&mut st, key);
        Ok(())
    }

    fn remove_layer(&self, st: &mut State, key: Key) {
        if let Some(mut layer) = st.registry.layers.remove(key) {
            st.registry.layer_names.remove(&*layer.name);
            if let Some(group) = st.registry.groups.get_mut(layer.group) {
                group.layers.remove(&key.id());
            }
            st.budget.refund(layer.drop_device_copies());
            st.schedule.forget(key);
            st.prefetched.retain(|&k| k != key);
        }
        self.wake(st.waiters);
    }

    // ----- acquire and release -----

    /// Makes a layer available in its computation form and calls `view` for each tensor.
    /// `capacity` is how many views the caller has room for; fewer than the layer's tensors is
    /// `STRATA_ERR_BUFFER_TOO_SMALL`, and nothing is acquired.
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
                    crate::error::ErrorKind::BufferTooSmall,
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
            if layer.busy {
                started.get_or_insert_with(Instant::now);
                st = self.wait(st)?;
                continue;
            }
            let group = st
                .registry
                .groups
                .get(layer.group)
                .expect("layers belong to live groups");
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
            if layer.in_use > 0 {
                let layer = st.registry.layers.get_mut(key).expect("checked");
                layer.in_use += 1;
                layer.holders.push(me);
                st.counters.acquires += 1;
                st.counters.resident_hits += 1;
                add_stall(&mut st.counters, started);
                return self.hand_out(&mut st, key, me, stream, &mut view);
            }
            if tiers.offload.device == Device::Cpu && layer.offload_copy.is_none() {
                st = self.ensure_host_copy(st, key, tiers, Tier::Offload)?;
                continue;
            }
            if host_copy_missing(layer, &tiers, Tier::Onload) {
                // The group's onload could not make this layer's copy: it tries again here, so a
                // damaged file gives its error to its own layers only, at each of their acquires.
                st = self.ensure_host_copy(st, key, tiers, Tier::Onload)?;
                continue;
            }
            if let Some(copy) = self.in_place_copy(layer).cloned() {
                let layer = st.registry.layers.get_mut(key).expect("checked");
                layer.computation = Some(Computation::Host(copy));
                self.mark_acquired(layer, me);
                return self.finish_hit(st, key, (me, stream), false, started, &mut view);
            }
            // Decided on the copies, not on bytes: a layer whose tensors are all empty has copies
            // of 0 bytes, which must still be made before views can point into them.
            if layer.prepared.is_some() && !layer.conversion_missing() {
                // Resident, and converted ahead when the forms differ: a hit, nothing moves.
                let layer = st.registry.layers.get_mut(key).expect("checked");
                let prefetched = std::mem::take(&mut layer.prefetched);
                layer.computation = Some(match layer.staged.take() {
                    Some(copy) => Computation::Converted(copy),
                    None => Computation::Prepared,
                });
                self.mark_acquired(layer, me);
                return self.finish_hit(st, key, (me, stream), prefetched, started, &mut view);
            }
            let plan = device_plan(layer);
            let bytes = plan.bytes();
            let source = nearest_source(layer, true);
            let was_resident = layer.prepared.is_some();
            let payload = layer.forms.preparing_payload();
            let layer_name = layer.name.clone();
            match self.make_room(&mut st, key, bytes, me, Purpose::Demand) {
                Ok(()) => {}
                Err(NoRoom::Wait) => {
                    started.get_or_insert_with(Instant::now);
                    st = self.wait(st)?;
                    continue;
                }
                Err(NoRoom::Fail(e)) => return Err(e),
            }
            started.get_or_insert_with(Instant::now);
            st.budget.charge(bytes);
            // The engine works on the layers after this one while this one is filled.
            self.request_prefetch(&mut st, Some(key));
            let (mut st, result) =
                self.fill_unlocked(st, key, source, plan, &layer_name, (bytes, Purpose::Demand));
            let (prepared, converted) = match result {
                Ok(filled) => filled,
                Err((prepared, e)) => {
                    // `bytes` paid for what this acquire made; a copy made here goes with it, and
                    // only a copy that was resident before stays.
                    if let Some(layer) = st.registry.layers.get_mut(key) {
                        layer.prepared = prepared.filter(|_| was_resident);
                    }
                    st.budget.refund(bytes);
                    return Err(e.context(format!("layer {layer_name:?}")));
                }
            };
            let layer = st
                .registry
                .layers
                .get_mut(key)
                .expect("fill_unlocked checked it");
            layer.prepared = Some(prepared);
            layer.computation = Some(match converted {
                Some(copy) => Computation::Converted(copy),
                None => Computation::Prepared,
            });
            self.mark_acquired(layer, me);
            // Filled ahead without its conversion (a layer further than the next): the bytes
            // moved early, and only the conversion was left to this acquire.
            let prefetched = std::mem::take(&mut layer.prefetched);
            st.counters.acquires += 1;
            if prefetched {
                st.counters.prefetch_hits += 1;
                st.prefetched.retain(|&k| k != key);
            } else if was_resident {
                st.counters.resident_hits += 1;
            } else {
                st.counters.misses += 1;
                st.counters.bytes_to_device += payload;
            }
            add_stall(&mut st.counters, started);
            return self.hand_out(&mut st, key, me, stream, &mut view);
        }
    }

    /// The host copy a layer is handed out from in place, when the device reads host memory and
    /// no tier in between changes the bytes (an fp8 preparing tier must round through fp8 on the
    /// CPU exactly as it would on a GPU).
    fn in_place_copy<'a>(&self, layer: &'a Layer) -> Option<&'a Arc<HostCopy>> {
        let (copy, tier) = nearest_host_copy(layer, true)?;
        let forms = &layer.forms;
        (self.backend.reads_host_memory()
            && forms.same_as_computation(tier)
            && forms.same_as_computation(Tier::Preparing))
        .then_some(copy)
    }

    /// Whether the copy engine has work to do ahead for a layer predicted `distance` acquires
    /// away: bytes to move, or (for the next layer only) a conversion to make.
    fn needs_device_work(&self, st: &State, layer: &Layer, distance: u32) -> bool {
        // First what answers for a resident layer, which every acquire of a pass asks about.
        let missing = layer.prepared.is_none() || (distance <= 1 && layer.conversion_missing());
        if !missing {
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

    /// Counts a hit, asks the engine for what comes next, and hands out the views.
    fn finish_hit(
        &self,
        mut st: MutexGuard<'_, State>,
        key: Key,
        (me, stream): (ThreadId, StreamHandle),
        prefetched: bool,
        started: Option<Instant>,
        view: impl FnMut(usize, View<'_>),
    ) -> Result<usize> {
        st.counters.acquires += 1;
        if prefetched {
            st.counters.prefetch_hits += 1;
            st.prefetched.retain(|&k| k != key);
        } else {
            st.counters.resident_hits += 1;
        }
        add_stall(&mut st.counters, started);
        self.request_prefetch(&mut st, None);
        self.hand_out(&mut st, key, me, stream, view)
    }

    /// Makes the caller's stream wait for the layer's fill, then hands out the views. If the
    /// device refuses the wait, the use just counted ends again and nothing is handed out.
    fn hand_out(
        &self,
        st: &mut State,
        key: Key,
        me: ThreadId,
        stream: StreamHandle,
        view: impl FnMut(usize, View<'_>),
    ) -> Result<usize> {
        let layer = st.registry.layers.get(key).expect("checked");
        let waited = computation_memory(layer).map_or(Ok(()), |memory| {
            self.backend
                .ready_for(memory, stream)
                .map_err(|e| e.context(format!("layer {:?}", layer.name)))
        });
        if let Err(e) = waited {
            self.end_use(st, key, me);
            return Err(e);
        }
        Ok(self.emit_views(layer, view))
    }

    /// Fills a layer predicted to be used soon, as the copy engine: its resident copy and its
    /// computation form, if room can be made without evicting anything needed sooner. Returns
    /// false when it did not fit (the engine then stops prefetching until the next acquire).
    pub(super) fn prefetch(&self, key: Key) -> bool {
        let me = current_thread();
        let mut st = self.lock();
        let Some(layer) = st.registry.layers.get(key) else {
            return true;
        };
        let Some(distance) = st.schedule.distances().of(key) else {
            return true;
        };
        if layer.in_use > 0 || layer.busy || !self.needs_device_work(&st, layer, distance) {
            return true;
        }
        if st.budget.limit == Limit::Minimal {
            // Budget 0 holds at most prefetch_depth layers ahead, this fill included.
            let depth = self.options.prefetch_depth as usize;
            let upcoming: Vec<Key> = st.schedule.upcoming(depth).collect();
            self.drop_stale_prefetches(&mut st, &upcoming, true);
            let wanted = upcoming.contains(&key) || st.schedule.current() == Some(key);
            if !wanted || st.prefetched.len() >= depth {
                return true;
            }
        }
        let Some(layer) = st.registry.layers.get(key) else {
            return true;
        };
        let mut plan = device_plan(layer);
        if distance > 1 {
            // Only the next layer is converted ahead: the computation form is the larger one
            // (bf16 from fp8), and converting takes little time next to moving the bytes.
            plan.converted = None;
        }
        let bytes = plan.bytes();
        let source = nearest_source(layer, true);
        let was_resident = layer.prepared.is_some();
        let payload = layer.forms.preparing_payload();
        let layer_name = layer.name.clone();
        if self
            .make_room(&mut st, key, bytes, me, Purpose::Prefetch(distance))
            .is_err()
        {
            return false;
        }
        st.budget.charge(bytes);
        let purpose = Purpose::Prefetch(distance);
        let (mut st, result) =
            self.fill_unlocked(st, key, source, plan, &layer_name, (bytes, purpose));
        match result {
            Ok((prepared, converted)) => {
                let layer = st
                    .registry
                    .layers
                    .get_mut(key)
                    .expect("fill_unlocked checked it");
                layer.prepared = Some(prepared);
                layer.staged = converted;
                // A layer filled ahead earlier and now only converted is in the window once.
                if !std::mem::replace(&mut layer.prefetched, true) {
                    st.prefetched.push(key);
                }
                if !was_resident {
                    st.counters.bytes_to_device += payload;
                }
                // The cap may have been lowered during the fill; under budget 0 the prediction
                // may have moved past this layer, which then may not stay.
                self.trim_to_cap(&mut st);
                if st.budget.limit == Limit::Minimal {
                    let depth = self.options.prefetch_depth as usize;
                    let upcoming: Vec<Key> = st.schedule.upcoming(depth).collect();
                    self.drop_stale_prefetches(&mut st, &upcoming, true);
                }
                true
            }
            Err((prepared, _)) => {
                // The acquire that needs this layer tries again and reports the error.
                if let Some(layer) = st.registry.layers.get_mut(key) {
                    layer.prepared = prepared.filter(|_| was_resident);
                }
                st.budget.refund(bytes);
                false
            }
        }
    }

    fn mark_acquired(&self, layer: &mut Layer, me: ThreadId) {
        layer.in_use = 1;
        layer.holders.push(me);
        layer.acquired_at = Some(Stamp::now());
    }

    /// Fills a layer the caller paid `charged` bytes for without holding the lock: marks it busy
    /// (and as the copy engine's fill, for a prefetch), takes its resident copy
    /// along, fills, then takes the lock back, clears the marks, wakes the waiters and records the
    /// spans. On `Ok` the layer is still registered; a layer gone meanwhile (busy layers are not
    /// removed, but no panic is worth that promise) is an error, its resident copy refunded here.
    fn fill_unlocked<'a>(
        &'a self,
        mut st: MutexGuard<'a, State>,
        key: Key,
        source: Source,
        plan: DevicePlan,
        layer_name: &Arc<str>,
        (charged, purpose): (u64, Purpose),
    ) -> (MutexGuard<'a, State>, Filled) {
        let layer = st
            .registry
            .layers
            .get_mut(key)
            .expect("checked by the caller");
        let tensors = layer.tensors.clone();
        let prepared = layer.prepared.take();
        let resident = prepared.as_ref().map_or(0, DeviceCopy::bytes);
        let by_engine = purpose != Purpose::Demand;
        let filling = self.begin_fill(st, key, charged + resident, by_engine);

        let mut spans = Vec::new();
        let result = self.fill_device(&source, &tensors, prepared, plan, layer_name, &mut spans);
        // Before the lock: once it is taken the group may be destroyed, and its host copies
        // must then be gone with it rather than kept a moment longer by this thread.
        drop(source);

        let mut st = filling.end();
        for span in spans {
            st.trace.record(span);
        }
        if st.registry.layers.get(key).is_none() {
            st.budget.refund(resident);
            let gone = Error::handle(format!("layer {layer_name:?} was removed during its fill"));
            return (st, Err((None, gone)));
        }
        (st, result)
    }

    /// Fills the prepared copy (unless it is resident) and the converted one (if the forms differ).
    /// On failure hands back the prepared copy it was given, so nothing resident is lost.
    fn fill_device(
        &self,
        source: &Source,
        tensors: &[TensorMeta],
        prepared: Option<DeviceCopy>,
        plan: DevicePlan,
        layer_name: &Arc<str>,
        spans: &mut Vec<Span>,
    ) -> Filled {
        let prepared = match (prepared, plan.prepared) {
            (Some(copy), _) => copy,
            (None, Some(Layout { slots, size })) => self
                .make_prepared(source, tensors, &slots, size, layer_name, spans)
                .map_err(|e| (None, e))?,
            (None, None) => unreachable!("a layer without a prepared copy plans one"),
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

    /// Evicts unused resident layers until `bytes` more fit, or says why they cannot. The layer's
    /// whole footprint (its resident copies, if any, plus `bytes`) is what may exceed the cap alone.
    /// A prefetch evicts only layers whose next use is predicted after its own, never waits and
    /// never overcommits: the engine's depth shrinks instead.
    fn make_room(
        &self,
        st: &mut State,
        key: Key,
        bytes: u64,
        me: ThreadId,
        purpose: Purpose,
    ) -> std::result::Result<(), NoRoom> {
        let own = st.registry.layers.get(key).map_or(0, |l| {
            [&l.prepared, &l.staged]
                .into_iter()
                .flatten()
                .map(|c| c.bytes())
                .sum()
        });
        let footprint = own + bytes;
        let too_large = st.budget.exceeds_cap_alone(footprint);
        if too_large && (self.options.strict_budget || purpose != Purpose::Demand) {
            let name = &st.registry.layers.get(key).expect("checked").name;
            return Err(self.refuse(format!(
                "layer {name:?} needs {footprint} bytes on the device, more than vram_limit {} (STRATA_FLAG_STRICT_BUDGET)",
                st.budget.limit.to_abi()
            )));
        }
        if st.budget.fits(bytes) {
            return Ok(());
        }
        let distances = st.schedule.distances();
        let nearest_allowed = match purpose {
            Purpose::Demand => 0,
            Purpose::Prefetch(distance) => distance.saturating_add(1),
        };
        loop {
            if st.budget.fits(bytes) {
                return Ok(());
            }
            if self.evict_one(st, Some(key), &distances, nearest_allowed, false) {
                continue;
            }
            if purpose != Purpose::Demand {
                return Err(NoRoom::Fail(Error::budget(
                    "no room for a prefetch without evicting a layer needed sooner",
                )));
            }
            if too_large && st.budget.in_use() == own {
                // One layer larger than the whole budget: allowed alone, reported as overcommit.
                self.warn_overcommit(st, key, footprint);
                return Ok(());
            }
            if st.engine_filling.is_some() {
                // The copy engine never waits on a caller, so its fill ends and can be evicted.
                return Err(NoRoom::Wait);
            }
            // Waiting is safe only for a thread that holds nothing: two threads that each hold a
            // layer and wait for the other's would wait forever. A group this thread is onloading
            // (an acquire from its progress callback) counts as held: others may wait for it.
            let onloading_here = st
                .registry
                .groups
                .iter()
                .any(|(_, g)| g.loading == Some(me));
            let held_by_me: u64 = st
                .registry
                .layers
                .iter()
                .filter(|(_, l)| l.in_use > 0 && l.holders.contains(&me))
                .count() as u64;
            let others_active = st.registry.layers.iter().any(|(k, l)| {
                k != key && (l.busy || (l.in_use > 0 && l.holders.iter().any(|&h| h != me)))
            });
            if held_by_me == 0 && !onloading_here && others_active {
                return Err(NoRoom::Wait);
            }
            let name = &st.registry.layers.get(key).expect("checked").name;
            return Err(self.refuse(format!(
                "layer {name:?} needs {bytes} more bytes on the device, but {} of vram_limit {} are held by layers in use or loading ({held_by_me} in use by this thread); release some first",
                st.budget.in_use(),
                st.budget.limit.to_abi()
            )));
        }
    }

    fn emit_views(&self, layer: &Layer, mut view: impl FnMut(usize, View<'_>)) -> usize {
        let (base, slots, device) = match layer.computation.as_ref().expect("layer is in use") {
            Computation::Host(copy) => {
                (copy.buffer.buffer.as_ptr() as u64, &copy.slots, Device::Cpu)
            }
            Computation::Prepared => {
                let copy = layer
                    .prepared
                    .as_ref()
                    .expect("in-use layers keep their prepared copy");
                (copy.memory.addr, &copy.slots, self.backend.device())
            }
            Computation::Converted(copy) => (copy.memory.addr, &copy.slots, self.backend.device()),
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
        let layer = st.registry.layers.get(key).expect("checked");
        if layer.in_use == 0 {
            return Err(Error::state(format!(
                "layer {:?} is not acquired: release without acquire, or released twice",
                layer.name
            )));
        }
        if let Some(memory) = computation_memory(layer) {
            self.backend
                .used_until(memory, stream)
                .map_err(|e| e.context(format!("layer {:?}", layer.name)))?;
        }
        self.end_use(&mut st, key, me);
        Ok(())
    }

    /// Ends one use of an acquired layer by thread `me`.
    fn end_use(&self, st: &mut State, key: Key, me: ThreadId) {
        let minimal = st.budget.limit == Limit::Minimal;
        let State {
            registry,
            budget,
            trace,
            ..
        } = st;
        let layer = registry.layers.get_mut(key).expect("checked");
        layer.in_use -= 1;
        let holder = layer.holders.iter().position(|&h| h == me).unwrap_or(0);
        layer.holders.swap_remove(holder);
        if layer.in_use > 0 {
            return;
        }
        if let Some(start) = layer.acquired_at.take() {
            trace.record(Span {
                track: Track::Compute,
                name: layer.name.clone(),
                what: "compute",
                start,
                end: Stamp::now(),
                bytes: 0,
            });
        }
        if let Some(Computation::Converted(copy)) = layer.computation.take() {
            budget.refund(copy.bytes());
        }
        let onloaded = registry.groups.get(layer.group).is_some_and(|g| g.onloaded);
        if minimal || !onloaded {
            if let Some(copy) = layer.prepared.take() {
                budget.refund(copy.bytes());
            }
        } else if budget.over_cap() {
            // The cap was lowered while layers were in use: they leave as they are released.
            self.trim_to_cap(st);
        }
        self.wake(st.waiters);
    }

    // ----- stats and trace -----

    pub fn stats(&self) -> Stats {
        let st = self.lock();
        let c = st.counters;
        Stats {
            vram_in_use: st.budget.in_use(),
            vram_peak: st.budget.peak(),
            host_in_use: self.host.in_use(),
            host_peak: self.host.peak(),
            bytes_to_device: c.bytes_to_device,
            bytes_from_disk: self.bytes_from_disk.load(Ordering::Relaxed),
            acquires: c.acquires,
            resident_hits: c.resident_hits,
            prefetch_hits: c.prefetch_hits,
            misses: c.misses,
            stall_ns: c.stall_ns,
            overcommit_peak: st.budget.overcommit_peak(),
            vram_limit: st.budget.limit.to_abi(),
            device_allocations: self.backend.allocations(),
            evictions: c.evictions,
            implicit_onloads: c.implicit_onloads,
            host_limit: self.host.limit(),
        }
    }

    pub fn trace_json(&self) -> String {
        let host = self.host.samples();
        let st = self.lock();
        let memory = memory_tracks(&st.budget, &host, self.host.limit());
        st.trace.to_chrome_json(&memory)
    }

    pub fn trace_svg(&self) -> String {
        let host = self.host.samples();
        let st = self.lock();
        let memory = memory_tracks(&st.budget, &host, self.host.limit());
        st.trace.to_svg(&memory)
    }
}

/// The device memory an acquired layer's views point into, if they point into device memory.
fn computation_memory(layer: &Layer) -> Option<&crate::backend::DeviceMemory> {
    match layer.computation.as_ref()? {
        Computation::Host(_) => None,
        Computation::Prepared => layer.prepared.as_ref().map(|copy| &copy.memory),
        Computation::Converted(copy) => Some(&copy.memory),
    }
}

/// The nearest host copy of a layer, and the tier whose form it holds: its onload copy (when
/// `onload_first`), else its offload copy.
fn nearest_host_copy(layer: &Layer, onload_first: bool) -> Option<(&Arc<HostCopy>, Tier)> {
    let onload = layer.onload_copy.as_ref().filter(|_| onload_first);
    onload.map(|copy| (copy, Tier::Onload)).or_else(|| {
        layer
            .offload_copy
            .as_ref()
            .map(|copy| (copy, Tier::Offload))
    })
}

/// Whether the layer lacks the host copy `tier` (Offload or Onload) asks for: that tier is in RAM,
/// and for Onload, the offload copy is not already in its form.
fn host_copy_missing(layer: &Layer, tiers: &Tiers, tier: Tier) -> bool {
    tiers.placement(tier).device == Device::Cpu
        && match tier {
            Tier::Offload => layer.offload_copy.is_none(),
            _ => {
                layer.onload_copy.is_none()
                    && !layer
                        .offload_copy
                        .as_ref()
                        .is_some_and(|c| c.slots == layer.forms.get(tier).slots)
            }
        }
}

/// The nearest host-side source of a layer's bytes: its onload copy, its offload copy, or the file.
fn nearest_source(layer: &Layer, onload_first: bool) -> Source {
    match (nearest_host_copy(layer, onload_first), &layer.checkpoint) {
        (Some((copy, _)), _) => Source::Host(copy.clone()),
        (None, Some(infos)) => Source::Disk(infos.clone()),
        (None, None) => unreachable!("host layers always keep their offload copy"),
    }
}

/// A device fill's outcome: the prepared copy and the converted one (when the forms differ), or
/// the error with the prepared copy the fill was given back, so nothing resident is lost.
type Filled = std::result::Result<(DeviceCopy, Option<DeviceCopy>), (Option<DeviceCopy>, Error)>;

/// What using a layer must add on the device: the prepared copy unless resident, and a converted
/// copy when the computation form differs from the preparing one and none was staged ahead.
fn device_plan(layer: &Layer) -> DevicePlan {
    let forms = &layer.forms;
    let converted = layer
        .conversion_missing()
        .then(|| forms.computation.clone());
    DevicePlan {
        prepared: layer.prepared.is_none().then(|| forms.preparing.clone()),
        converted,
    }
}

/// Counts the time since an acquire first waited or loaded as stall.
fn add_stall(counters: &mut Counters, started: Option<Instant>) {
    if let Some(started) = started {
        counters.stall_ns += started.elapsed().as_nanos() as u64;
    }
}

/// This thread's id, without the reference counting `thread::current()` does on every call.
fn current_thread() -> ThreadId {
    thread_local! {
        static ME: ThreadId = std::thread::current().id();
    }
    ME.with(|me| *me)
}

fn checkpoint_layer(
    checkpoint: &Checkpoint,
    group: Key,
    tiers: &Tiers,
    name: &str,
    tensor_names: &[&str],
) -> Result<Layer> {
    let mut infos = Vec::with_capacity(tensor_names.len());
    let mut metas = Vec::with_capacity(tensor_names.len());
    for &tensor in tensor_names {
        let info = checkpoint
            .tensor(tensor)
            .ok_or_else(|| Error::not_found(format!("the checkpoint has no tensor {tensor:?}")))?;
        let dtype = info.dtype.ok_or_else(|| {
            Error::unsupported(format!(
                "tensor {tensor:?} has dtype {}, which strata does not handle",
                info.dtype_name
            ))
        })?;
        let shape = info
            .shape
            .iter()
            .map(|&d| {
                i64::try_from(d).map_err(|_| {
                    Error::format(format!("tensor {tensor:?} has a dimension too large"))
                })
            })
            .collect::<Result<Vec<_>>>()?;
        metas.push(TensorMeta::new(tensor, dtype, shape)?);
        infos.push(info.clone());
    }
    let mut layer = Context::new_layer(name, group, tiers, metas)?;
    layer.checkpoint = Some(infos.into());
    Ok(layer)
}

/// The layer a tensor belongs to: its name cut to the first `keep` dot-separated parts, or with only
/// its last part dropped when `keep` is 0 (or the name has no more than `keep` parts).
pub fn layer_name_of(tensor: &str, keep: u32) -> String {
    let parts: Vec<&str> = tensor.split('.').collect();
    let drop_last = parts.len().saturating_sub(1).max(1);
    let take = if keep == 0 {
        drop_last
    } else {
        (keep as usize).min(drop_last)
    };
    parts[..take].join(".")
}

#[cfg(test)]
mod tests {
    use super::layer_name_of;

    #[test]
    fn layer_names_follow_keep_components() {
        assert_eq!(
            layer_name_of("blocks.3.attn.to_q.weight", 0),
            "blocks.3.attn.to_q"
        );
        assert_eq!(
            layer_name_of("blocks.3.attn.to_q.bias", 0),
            "blocks.3.attn.to_q"
        );
        assert_eq!(layer_name_of("blocks.3.attn.to_q.weight", 2), "blocks.3");
        assert_eq!(layer_name_of("norm.weight", 2), "norm");
        assert_eq!(layer_name_of("scale", 0), "scale");
        assert_eq!(layer_name_of("scale", 3), "scale");
    }
}
