//! A context: one compute device, its budget, and every group and layer registered on it.
//!
//! One lock guards the bookkeeping; bytes move without it while the layer being filled is marked
//! busy, so threads acquiring other layers are not held up by a read or a conversion.

mod engine;
mod fill;
mod inflight;
mod limits;
mod load;
mod residents;

use crate::backend::{convert_into_slot, cpu::CpuBackend, Backend};
use crate::budget::{Budget, Limit};
use crate::checkpoint::Checkpoint;
use crate::checkpoint::ReadMode;
use crate::convert::TensorBytes;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::host::{CountedBuffer, MemoryCounter};
use crate::log::{Level, LogCallback, Logger, ProgressSink};
use crate::registry::{
    Forms, Group, HostBytes, HostCopy, Key, Layer, Layout, Registry, TensorMeta,
};
use crate::residency::{self, Computation, InUse, Window};
use crate::schedule::Schedule;
use crate::stats::{AcquireKind, Counters, Stats};
use crate::store::Store;
use crate::tiers::{Device, RawTiers, Tier, Tiers};
use crate::trace::memory_tracks;
use crate::trace::{Span, Stamp, Trace, Track};
use engine::CopyEngine;
use fill::FillFor;
pub use load::inject_fill_panics;
use load::Source;
use residents::NoRoom;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::thread::ThreadId;
use std::time::Instant;

/// Refuse layers that would exceed the budget instead of overcommitting.
pub const STRATA_FLAG_STRICT_BUDGET: u32 = 1;
/// Read the disk tier with O_DIRECT, past the page cache, so that a cold stream of a model larger
/// than RAM does not push everything else out of it (the bytes are read into aligned bounce
/// buffers, then copied). Where the file system refuses O_DIRECT (tmpfs), reads stay buffered.
pub const STRATA_FLAG_DIRECT_IO: u32 = 2;

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
    window: Window,
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
    /// The host store this context's checkpoint copies come from, once one is attached.
    store: OnceLock<Arc<Store>>,
    engine: CopyEngine,
    /// This context, for the copy engine's worker, which must not keep it alive.
    self_ref: Weak<Context>,
}

impl Drop for Context {
    fn drop(&mut self) {
        self.engine.stop();
    }
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
                window: Window::new(options.prefetch_depth),
                engine_filling: None,
                waiters: 0,
            }),
            changed: Condvar::new(),
            host,
            options,
            bytes_from_disk: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            store: OnceLock::new(),
            engine: CopyEngine::default(),
            self_ref: self_ref.clone(),
        }))
    }

    /// Takes no more calls, wakes every thread waiting inside a call (each returns
    /// STRATA_ERR_INVALID_HANDLE at once), and waits for the copy engine's worker to end. The
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

    /// Makes the host copies this context reads from checkpoints from now on come from `store`,
    /// shared with the other contexts that use it. Once per context.
    pub fn attach_store(&self, store: Arc<Store>) -> Result<()> {
        self.store
            .set(store)
            .map_err(|_| Error::state("a host store is already attached to this context"))
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
    /// or meanwhile ends the wait with STRATA_ERR_INVALID_HANDLE: `close` wakes every waiter.
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

    pub fn create_group(&self, name: &str, raw: &RawTiers) -> Result<u64> {
        let tiers = Tiers::resolve(raw, self.backend.device())?;
        let mut st = self.lock();
        let key = st.registry.groups.insert(Group {
            name: name.to_owned(),
            tiers,
            onloaded: false,
            loading: None,
            layers: Default::default(),
        });
        Ok(key.id())
    }

    fn group_key(&self, st: &State, id: u64) -> Result<Key> {
        st.registry.groups.key(id).ok_or_else(|| {
            Error::handle(format!(
                "group id {id:#x} is not a group of this context (destroyed, never created, or another context's)"
            ))
        })
    }

    /// Destroys a group and its layers; refused while any of them is in use.
    pub fn destroy_group(&self, id: u64) -> Result<()> {
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
    pub fn onload_group(&self, id: u64) -> Result<()> {
        let key = {
            let st = self.lock();
            self.group_key(&st, id)?
        };
        match self.onload(key)? {
            None => Ok(()),
            Some(first_failure) => Err(first_failure),
        }
    }

    pub fn offload_group(&self, id: u64) -> Result<()> {
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
            let freed = l.device.evict();
            st.budget.refund(freed);
        }
        self.wake(st.waiters);
        Ok(())
    }

    /// Waits until no onload runs on the group and none of its layers is being filled; returns at
    /// once when the group is gone (callers look it up again). An onload run by this very thread
    /// (a call from its progress callback) would never end while this waits: STRATA_ERR_STATE.
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

    // ----- layers -----

    /// Checks that `group` exists and `name` is free; returns the group and its tiers.
    fn check_new_layer(&self, st: &State, group: u64, name: &str) -> Result<(Key, Tiers)> {
        let key = self.group_key(st, group)?;
        if st.registry.layer_names.contains_key(name) {
            return Err(Error::invalid(format!(
                "a layer named {name:?} is already registered"
            )));
        }
        Ok((key, st.registry.groups.get(key).expect("checked").tiers))
    }

    fn insert_layer(&self, st: &mut State, layer: Layer) -> Result<u64> {
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
        Ok(key.id())
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
            device: residency::OnDevice::Absent,
            copying_host: false,
        })
    }

    /// Registers a layer from host tensors; their bytes are copied into the offload tier's form.
    pub fn register_host(
        &self,
        group: u64,
        name: &str,
        tensors: &[HostTensorIn<'_>],
    ) -> Result<u64> {
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
            pinned: self.backend.pin_host(buffer.buffer.as_slice()),
            buffer: HostBytes::Own(buffer),
            slots,
        }));
        let mut st = self.lock();
        self.group_key(&st, group)?;
        self.insert_layer(&mut st, layer)
    }

    /// Registers a layer whose tensors stay in `checkpoint` until a tier needs them.
    pub fn register_checkpoint(
        &self,
        group: u64,
        checkpoint: &Checkpoint,
        name: &str,
        tensor_names: &[&str],
    ) -> Result<u64> {
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
        group: u64,
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

    pub fn find_layer(&self, name: &str) -> Result<u64> {
        let st = self.lock();
        st.registry
            .layer_names
            .get(name)
            .map(|&key| key.id())
            .ok_or_else(|| Error::not_found(format!("no layer named {name:?}")))
    }

    fn layer_key(&self, st: &State, id: u64) -> Result<Key> {
        st.registry.layers.key(id).ok_or_else(|| {
            Error::handle(format!(
                "layer id {id:#x} is not a layer of this context (unregistered, never registered, or another context's)"
            ))
        })
    }

    pub fn tensor_count(&self, id: u64) -> Result<usize> {
        let st = self.lock();
        let key = self.layer_key(&st, id)?;
        Ok(st.registry.layers.get(key).expect("checked").tensors.len())
    }

    pub fn unregister_layer(&self, id: u64) -> Result<()> {
        let mut st = self.lock();
        let key = self.layer_key(&st, id)?;
        // As in destroy_group: a fill (a prefetch the caller cannot see) ends on its own.
        while st.registry.layers.get(key).is_some_and(|l| l.busy()) {
            st = self.wait(st)?;
        }
        let key = self.layer_key(&st, id)?;
        let layer = st.registry.layers.get(key).expect("checked");
        if layer.device.in_use().is_some() {
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
            st.budget.refund(layer.device.evict());
            st.schedule.forget(key);
            st.window.remove(key);
        }
        self.wake(st.waiters);
    }

    // ----- acquire and release -----

    /// Makes a layer available in its computation form and calls `view` for each tensor.
    /// `capacity` is how many views the caller has room for; fewer than the layer's tensors is
    /// `STRATA_ERR_BUFFER_TOO_SMALL`, and nothing is acquired.
    pub fn acquire(
        &self,
        id: u64,
        stream: usize,
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
                    crate::error::STRATA_ERR_BUFFER_TOO_SMALL,
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

    /// Counts a hit, asks the engine for what comes next, and hands out the views.
    fn finish_hit(
        &self,
        mut st: MutexGuard<'_, State>,
        key: Key,
        (me, stream): (ThreadId, usize),
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
    fn count(&self, st: &mut State, key: Key, kind: AcquireKind, started: Option<Instant>) {
        if kind == AcquireKind::PrefetchHit {
            st.window.remove(key);
        }
        let stall = started.map_or(0, |started| started.elapsed().as_nanos() as u64);
        st.counters.count_acquire(kind, stall);
    }

    /// Makes the caller's stream wait for the layer's fill, then hands out the views. If the
    /// device refuses the wait, the use just counted ends again and nothing is handed out.
    fn hand_out(
        &self,
        st: &mut State,
        key: Key,
        me: ThreadId,
        stream: usize,
        view: impl FnMut(usize, View<'_>),
    ) -> Result<usize> {
        let Some((layer, in_use)) = st
            .registry
            .layers
            .get(key)
            .and_then(|l| Some((l, l.device.in_use()?)))
        else {
            return Err(Error::state("the layer is not in use"));
        };
        let waited = in_use.computation.memory().map_or(Ok(()), |memory| {
            self.backend
                .ready_for(memory, stream)
                .map_err(|e| e.context(format!("layer {:?}", layer.name)))
        });
        if let Err(e) = waited {
            self.end_use(st, key, me);
            return Err(e);
        }
        Ok(self.emit_views(layer, in_use, view))
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

    fn emit_views(
        &self,
        layer: &Layer,
        in_use: &InUse,
        mut view: impl FnMut(usize, View<'_>),
    ) -> usize {
        let (base, slots, device) = match &in_use.computation {
            Computation::Host { copy, .. } => (
                copy.buffer.as_slice().as_ptr() as u64,
                &copy.slots,
                Device::Cpu,
            ),
            Computation::Prepared(copy)
            | Computation::Converted {
                converted: copy, ..
            } => (copy.memory.addr, &copy.slots, self.backend.device()),
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
    pub fn release(&self, id: u64, stream: usize) -> Result<()> {
        self.backend.check_stream(stream)?;
        let me = current_thread();
        let mut st = self.lock();
        let key = self.layer_key(&st, id)?;
        let Some(layer) = st.registry.layers.get(key) else {
            return Err(Error::handle(format!("layer id {id:#x} was unregistered")));
        };
        let Some(in_use) = layer.device.in_use() else {
            return Err(Error::state(format!(
                "layer {:?} is not acquired: release without acquire, or released twice",
                layer.name
            )));
        };
        if let Some(memory) = in_use.computation.memory() {
            self.backend
                .used_until(memory, stream)
                .map_err(|e| e.context(format!("layer {:?}", layer.name)))?;
        }
        self.end_use(&mut st, key, me);
        Ok(())
    }

    /// Ends one use of an acquired layer by thread `me`. At the last, the converted copy is
    /// freed, and the resident one too unless `residency::stays_after_use`.
    fn end_use(&self, st: &mut State, key: Key, me: ThreadId) {
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
        budget.refund(ended.freed);
        if keep && budget.over_cap() {
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
