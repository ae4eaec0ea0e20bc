//! A context: one compute device, its budget, and every group and layer registered on it.
//!
//! One lock (`Context::state`) guards the bookkeeping; bytes move without it while the layer being
//! filled is marked (`inflight.rs`), so threads acquiring other layers are not held up by a read
//! or a conversion. What stays on the device is decided in `crate::residency`; this module carries
//! the decisions out. One concept per file:
//!
//! | file | what it holds |
//! |---|---|
//! | `mod.rs` | the context, its lock and condition variable, stats, trace, log flushing |
//! | `groups.rs` | groups: create, destroy, onload, offload; host copies of the onload tier |
//! | `register.rs` | registering layers (host tensors, checkpoint names, a prefix), find, unregister |
//! | `acquire.rs` | acquire and release, counting an acquire, handing out views |
//! | `fill.rs` | the one fill path, for an acquire and the copy engine alike |
//! | `transfer.rs` | moving bytes: sources, sinks, host copies, device copies and their memory |
//! | `engine.rs` | the copy engine: its worker's loop and its body (`prefetch`), what it is asked |
//! | `residents.rs` | residency decisions carried out: evictions, refusals and their messages |
//! | `inflight.rs` | the guards that set and clear in-flight marks |
//! | `limits.rs` | the live limits (`set_vram_limit`, `set_host_limit`) |
//!
//! One acquire (`strata_acquire_for_compute`, `ffi/acquire.rs`), step by step:
//!
//! 1. `acquire.rs` `acquire`: check the caller's stream (backend), take the lock, look the id
//!    up (`register.rs` `layer_key`), record the use in the learned order (`schedule/`).
//! 2. The layer is being filled (by the copy engine or another thread): wait (`mod.rs` `wait`),
//!    counted as stall.
//! 3. Its group is offloaded: onload it without the lock (`groups.rs` `onload`). Its host copy is
//!    missing: make it (`groups.rs` `ensure_host_copy` → `transfer.rs`).
//! 4. A hit, nothing moves: join a use in progress, read a host copy in place, or take the
//!    resident copy and the form converted ahead (`residency/state.rs` `OnDevice::take_for_use`);
//!    then ask the copy engine for the next layers (`engine.rs` `request_prefetch`).
//! 5. A miss (`fill.rs` `fill_layer`): plan what is missing; make room (`residents.rs` →
//!    `residency::make_room`: evict, wait, refuse or overcommit); charge the budget; mark the
//!    layer filling and ask the engine for the next layers (`inflight.rs` `begin_fill`); unlock;
//!    read, upload and convert (`transfer.rs` → the backend); lock; install the copies in use,
//!    or refund them.
//! 6. Count the acquire, once (`acquire.rs` `count` → `stats.rs`), make the caller's stream wait
//!    for the copy (backend `ready_for`) and hand out the views.
//!
//! Release (`acquire.rs` `release`) records the stream's use (backend `used_until`) and ends the
//! use (`OnDevice::end_use`): the converted copy goes, the resident one too under budget 0 or once
//! the group is offloaded (`residency::stays_after_use`), then the budget is trimmed to its cap.
//! The copy engine (`engine.rs`) runs step 5 for the layers predicted next, as `FillFor::Ahead`.
//!
//! Lock order: a lock may be taken while holding the ones before it on its line, never the reverse.
//!
//! | first | then |
//! |---|---|
//! | `Context::state` | the engine's task queue, then its worker handle (`engine.rs` `submit`) |
//! | `Context::state` | the logger's queue (messages are queued, delivered outside every lock) |
//! | `Context::state` | the backend's buffer pool (evicting frees buffers), then its spare events |
//! | the CUDA staging ring, or a buffer's uses | the spare events |
//! | the in-process host store's layer map (`store/local.rs`) | the store's host-memory counter (charging a new layer's buffer) |
//!
//! Taken alone: the C handle tables (`ffi/`), the pinned-memory registrations, the injected fill
//! panics, a host store entry's fill state (a fill waits there for another context's fill of the
//! same layer, holding no other strata lock), and the named store's file locks (`flock`). No
//! strata lock is held while a log or progress callback runs, so a callback may call back into
//! strata.

mod acquire;
mod engine;
mod fill;
mod groups;
mod inflight;
mod limits;
mod register;
mod residents;
mod transfer;

use crate::backend::{cpu::CpuBackend, Backend};
use crate::budget::{Budget, Limit};
use crate::checkpoint::ReadMode;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::host::MemoryCounter;
use crate::log::{LogCallback, Logger, ProgressSink};
use crate::registry::{Key, Registry};
use crate::residency::Window;
use crate::schedule::Schedule;
use crate::stats::{Counters, Stats};
use crate::store::Store;
use crate::tiers::Device;
use crate::trace::memory_tracks;
use crate::trace::Trace;
use engine::CopyEngine;
pub use register::layer_name_of;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::thread::ThreadId;
pub use transfer::inject_fill_panics;

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

    /// Makes the host copies this context reads from checkpoints from now on come from `store`,
    /// shared with the other contexts that use it. Once per context.
    pub(crate) fn attach_store(&self, store: Arc<Store>) -> Result<()> {
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

    /// Hands queued log messages to the log callback. The C ABI calls this as each call on the
    /// context returns; Rust callers call it where they hold no strata lock.
    pub fn flush_log(&self) {
        self.logger.flush();
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

/// This thread's id, without the reference counting `thread::current()` does on every call.
fn current_thread() -> ThreadId {
    thread_local! {
        static ME: ThreadId = std::thread::current().id();
    }
    ME.with(|me| *me)
}
