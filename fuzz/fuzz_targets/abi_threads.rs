//! Several threads drive one context through the C ABI at once, so the fuzzer can find races: a
//! group destroyed while another thread offloads it, a layer unregistered while the copy engine
//! fills it, the budget lowered while threads wait for room, the context destroyed while threads
//! wait inside calls. What the contract promises whatever the interleaving:
//!   - no crash, no hang (libFuzzer's -timeout), never STRATA_ERR_PANIC; each call returns one of
//!     the statuses its documentation allows for what other threads may have done meanwhile, and
//!     a failure leaves a message;
//!   - a release of a layer this thread acquired succeeds (nothing else may take it away);
//!   - every acquired view holds the registered bytes in the group's computation dtype;
//!   - once a destroy of the context has returned, every call is STRATA_ERR_INVALID_HANDLE;
//!   - when the threads are done nothing is stuck: with the budget lifted every layer still
//!     registered is acquired at once, the counters agree, and with every group destroyed no device
//!     or host byte is held.
//!
//! The input: a header byte (thread count 2 to 4, the budget, prefetch depth, strict mode), then
//! operations, dealt to the threads in turn: one byte picks the operation, the next its argument.
//! Run it with scripts/fuzz.sh; the seeds are fuzz/seeds/abi_threads.

#![no_main]

use libfuzzer_sys::fuzz_target;
use std::ffi::{c_void, CString};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Mutex, RwLock};
use strata::ffi::consts::*;
use strata::ffi::acquire::*;
use strata::ffi::context::*;
use strata::ffi::error::*;
use strata::ffi::group::*;
use strata::ffi::layer::*;
use strata::ffi::stats::*;

/// Elements per tensor: 1 KiB of f32, so a few layers fill the small budgets the header picks.
const ELEMENTS: usize = 256;
const MAX_OPS_PER_THREAD: usize = 64;

/// A layer some thread registered: its id and the bytes an acquire must hand out.
#[derive(Clone)]
struct LayerInfo {
    id: u64,
    expected: Vec<u8>,
}

#[derive(Default)]
struct Registered {
    /// Each group's id and whether it computes in bf16.
    groups: Vec<(u64, bool)>,
    layers: Vec<LayerInfo>,
}

/// The context pointer behind a pointer-sized integer, so the threads can share it.
#[derive(Clone, Copy)]
struct Shared(usize);

impl Shared {
    fn ptr(self) -> *mut strata_context {
        self.0 as *mut strata_context
    }
}

struct World {
    ctx: Shared,
    registered: Mutex<Registered>,
    /// Readers look at views; the destroyer takes it for writing, so no view is read while the
    /// memory behind it goes (views become invalid at destroy: that is the contract).
    views: RwLock<bool>,
    /// Set as `strata_context_destroy` is called, and once it has returned.
    destroy_began: AtomicBool,
    destroyed: AtomicBool,
    names: AtomicU32,
}

fn last_error() -> String {
    let len = strata_last_error(ptr::null_mut(), 0);
    let mut buf = vec![0u8; len + 1];
    strata_last_error(buf.as_mut_ptr() as *mut _, buf.len());
    String::from_utf8_lossy(&buf[..len]).into_owned()
}

impl World {
    /// Checks a status against those `call` may return now. A destroy that returned before the
    /// call began leaves only STRATA_ERR_INVALID_HANDLE; one that raced it, that too besides.
    fn check(
        &self,
        call: &str,
        destroyed_before: bool,
        status: strata_status,
        allowed: &[strata_status],
    ) {
        assert_ne!(status, STRATA_ERR_PANIC, "{call}: {}", last_error());
        if status != STRATA_OK {
            assert!(
                !last_error().is_empty(),
                "{call} failed with {status} and no message"
            );
        }
        if destroyed_before {
            assert_eq!(
                status,
                STRATA_ERR_INVALID_HANDLE,
                "{call} after the context was destroyed: {}",
                last_error()
            );
            return;
        }
        let raced =
            self.destroy_began.load(Ordering::Acquire) && status == STRATA_ERR_INVALID_HANDLE;
        assert!(
            allowed.contains(&status) || raced,
            "{call}: status {status} is not one of {allowed:?}: {}",
            last_error()
        );
    }

    fn pick_layer(&self, arg: u8) -> Option<LayerInfo> {
        let r = self.registered.lock().unwrap();
        (!r.layers.is_empty()).then(|| r.layers[arg as usize % r.layers.len()].clone())
    }

    fn pick_group(&self, arg: u8) -> Option<(u64, bool)> {
        let r = self.registered.lock().unwrap();
        (!r.groups.is_empty()).then(|| r.groups[arg as usize % r.groups.len()])
    }

    /// Creates a group computing in bf16 (filled on the device) or f32 (handed out in place).
    fn create_group(&self, bf16: bool) -> strata_status {
        let mut tiers = strata_tiers_default();
        tiers.computation.dtype = if bf16 {
            STRATA_DTYPE_BF16
        } else {
            STRATA_DTYPE_F32
        };
        let name = CString::new(if bf16 { "bf16" } else { "f32" }).unwrap();
        let mut group = 0;
        let status = strata_group_create(self.ctx.ptr(), name.as_ptr(), &tiers, &mut group);
        if status == STRATA_OK {
            self.registered.lock().unwrap().groups.push((group, bf16));
        }
        status
    }

    /// Registers a one-tensor layer of f32 values into `group`; `seed` picks the values.
    fn register(&self, group: u64, seed: u8, bf16: bool) -> strata_status {
        let values: Vec<f32> = (0..ELEMENTS)
            .map(|i| (i as f32 * 0.37 + seed as f32).sin() * 3.0)
            .collect();
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let expected = if bf16 {
            values
                .iter()
                .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                .collect()
        } else {
            bytes.clone()
        };
        let n = self.names.fetch_add(1, Ordering::Relaxed);
        let layer_name = CString::new(format!("layer.{n}")).unwrap();
        let tensor_name = CString::new("w").unwrap();
        let shape = [16i64, 16];
        let tensor = strata_host_tensor {
            name: tensor_name.as_ptr(),
            dtype: STRATA_DTYPE_F32,
            ndim: 2,
            shape: shape.as_ptr(),
            data: bytes.as_ptr() as *const c_void,
        };
        let mut id = 0;
        let status = strata_layer_register_host(
            self.ctx.ptr(),
            group,
            layer_name.as_ptr(),
            &tensor,
            1,
            &mut id,
        );
        if status == STRATA_OK {
            self.registered
                .lock()
                .unwrap()
                .layers
                .push(LayerInfo { id, expected });
        }
        status
    }

    /// Acquires a layer; on success checks its bytes and returns true (the layer stays acquired).
    fn acquire(
        &self,
        layer: &LayerInfo,
        destroyed_before: bool,
        allowed: &[strata_status],
    ) -> bool {
        let mut views = [empty_view(); 2];
        let mut count = 0;
        let status = strata_acquire_for_compute(
            self.ctx.ptr(),
            layer.id,
            ptr::null_mut(),
            views.as_mut_ptr(),
            views.len(),
            &mut count,
        );
        self.check(
            "strata_acquire_for_compute",
            destroyed_before,
            status,
            allowed,
        );
        if status != STRATA_OK {
            return false;
        }
        let destroying = self.views.read().unwrap();
        if !*destroying {
            assert_eq!(count, 1);
            let view = views[0];
            // SAFETY: a successful acquire hands out `nbytes` readable bytes at `data` until the
            // release or the context's destroy, which the read lock holds off.
            let bytes =
                unsafe { std::slice::from_raw_parts(view.data as *const u8, view.nbytes as usize) };
            assert!(
                bytes == layer.expected.as_slice(),
                "layer {:#x}: wrong bytes",
                layer.id
            );
        }
        true
    }

    fn release(&self, id: u64) {
        let destroyed_before = self.destroyed.load(Ordering::Acquire);
        let status = strata_release(self.ctx.ptr(), id, ptr::null_mut());
        self.check("strata_release", destroyed_before, status, &[STRATA_OK]);
    }

    fn destroy(&self) {
        let mut destroying = self.views.write().unwrap();
        *destroying = true;
        self.destroy_began.store(true, Ordering::Release);
        strata_context_destroy(self.ctx.ptr());
        self.destroyed.store(true, Ordering::Release);
    }

    /// One thread's operations; it releases what it still holds at the end.
    fn run(&self, ops: &[(u8, u8)]) {
        let mut held: Vec<u64> = Vec::new();
        for &(op, arg) in ops {
            let destroyed_before = self.destroyed.load(Ordering::Acquire);
            let ctx = self.ctx.ptr();
            match op % 12 {
                0 | 1 | 2 => {
                    if let Some(layer) = self.pick_layer(arg) {
                        let allowed = [STRATA_OK, STRATA_ERR_BUDGET, STRATA_ERR_INVALID_HANDLE];
                        if self.acquire(&layer, destroyed_before, &allowed) {
                            held.push(layer.id);
                        }
                    }
                }
                3 | 4 => {
                    if !held.is_empty() {
                        let id = held.swap_remove(arg as usize % held.len());
                        self.release(id);
                    }
                }
                5 => {
                    if let Some((group, _)) = self.pick_group(arg) {
                        let status = strata_group_onload(ctx, group);
                        self.check(
                            "strata_group_onload",
                            destroyed_before,
                            status,
                            &[STRATA_OK, STRATA_ERR_INVALID_HANDLE],
                        );
                    }
                }
                6 => {
                    if let Some((group, _)) = self.pick_group(arg) {
                        let status = strata_group_offload(ctx, group);
                        self.check(
                            "strata_group_offload",
                            destroyed_before,
                            status,
                            &[STRATA_OK, STRATA_ERR_INVALID_HANDLE],
                        );
                    }
                }
                7 => {
                    if let Some((group, _)) = self.pick_group(arg) {
                        let status = strata_group_destroy(ctx, group);
                        self.check(
                            "strata_group_destroy",
                            destroyed_before,
                            status,
                            &[STRATA_OK, STRATA_ERR_INVALID_HANDLE, STRATA_ERR_STATE],
                        );
                    }
                }
                8 => {
                    if let Some(layer) = self.pick_layer(arg) {
                        let status = strata_layer_unregister(ctx, layer.id);
                        self.check(
                            "strata_layer_unregister",
                            destroyed_before,
                            status,
                            &[STRATA_OK, STRATA_ERR_INVALID_HANDLE, STRATA_ERR_STATE],
                        );
                    }
                }
                9 => {
                    let bytes = match arg % 4 {
                        0 => 0,
                        1 => STRATA_UNLIMITED,
                        n => n as u64 * 1024,
                    };
                    let status = strata_context_set_vram_limit(ctx, bytes);
                    self.check(
                        "strata_context_set_vram_limit",
                        destroyed_before,
                        status,
                        &[STRATA_OK],
                    );
                }
                10 => {
                    let status = match self.pick_group(arg >> 2).filter(|_| arg & 2 == 0) {
                        Some((group, bf16)) => self.register(group, arg, bf16),
                        None => self.create_group(arg & 1 == 1),
                    };
                    self.check(
                        "register or create",
                        destroyed_before,
                        status,
                        &[STRATA_OK, STRATA_ERR_INVALID_HANDLE],
                    );
                }
                _ => {
                    if arg == 0xFF {
                        self.destroy();
                    } else {
                        let mut stats = strata_stats {
                            struct_size: std::mem::size_of::<strata_stats>() as u32,
                            ..Default::default()
                        };
                        let status = strata_stats_get(ctx, &mut stats);
                        self.check("strata_stats_get", destroyed_before, status, &[STRATA_OK]);
                    }
                }
            }
        }
        for id in held {
            self.release(id);
        }
    }
}

fn empty_view() -> strata_tensor_view {
    strata_tensor_view {
        name: ptr::null(),
        data: ptr::null_mut(),
        dtype: 0,
        device: 0,
        device_index: 0,
        ndim: 0,
        shape: [0; STRATA_MAX_DIMS],
        nbytes: 0,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&header, rest)) = data.split_first() else {
        return;
    };
    let threads = 2 + (header & 3) as usize % 3;
    let mut options = strata_options_default();
    options.vram_limit = match (header >> 2) & 3 {
        0 => 0,
        1 => STRATA_UNLIMITED,
        n => n as u64 * 2048,
    };
    options.prefetch_depth = ((header >> 4) & 3) as u32;
    if header & 0x40 != 0 {
        options.flags = STRATA_FLAG_STRICT_BUDGET;
    }
    let mut ctx = ptr::null_mut();
    assert_eq!(strata_context_create(&options, &mut ctx), STRATA_OK);
    let world = World {
        ctx: Shared(ctx as usize),
        registered: Mutex::default(),
        views: RwLock::new(false),
        destroy_began: AtomicBool::new(false),
        destroyed: AtomicBool::new(false),
        names: AtomicU32::new(0),
    };
    // A small model to start from: an f32 group and a bf16 group of two layers each.
    for bf16 in [false, true] {
        assert_eq!(world.create_group(bf16), STRATA_OK);
        let (group, _) = *world.registered.lock().unwrap().groups.last().unwrap();
        for seed in 0..2 {
            assert_eq!(
                world.register(group, seed + bf16 as u8 * 2, bf16),
                STRATA_OK
            );
        }
    }
    let mut ops: Vec<Vec<(u8, u8)>> = vec![Vec::new(); threads];
    for (i, pair) in rest.chunks(2).enumerate() {
        let list = &mut ops[i % threads];
        if list.len() < MAX_OPS_PER_THREAD {
            list.push((pair[0], pair.get(1).copied().unwrap_or(0)));
        }
    }
    std::thread::scope(|scope| {
        let workers: Vec<_> = ops
            .iter()
            .map(|list| {
                let world = &world;
                scope.spawn(move || world.run(list))
            })
            .collect();
        // Joined one by one: the scope's own end does not wait for each thread's thread-local
        // destructors (its last error message), which the leak check would then count.
        for worker in workers {
            if let Err(panic) = worker.join() {
                std::panic::resume_unwind(panic);
            }
        }
    });
    if world.destroyed.load(Ordering::Acquire) {
        return;
    }
    // Nothing is left marked busy or loading: with the budget lifted, every layer is served now.
    assert_eq!(
        strata_context_set_vram_limit(ctx, STRATA_UNLIMITED),
        STRATA_OK
    );
    let layers = world.registered.lock().unwrap().layers.clone();
    for layer in &layers {
        if world.acquire(layer, false, &[STRATA_OK, STRATA_ERR_INVALID_HANDLE]) {
            world.release(layer.id);
        }
    }
    let mut stats = strata_stats {
        struct_size: std::mem::size_of::<strata_stats>() as u32,
        ..Default::default()
    };
    assert_eq!(strata_stats_get(ctx, &mut stats), STRATA_OK);
    assert_eq!(
        stats.acquires,
        stats.resident_hits + stats.prefetch_hits + stats.misses,
        "{stats:?}"
    );
    let groups = world.registered.lock().unwrap().groups.clone();
    for (group, _) in groups {
        let status = strata_group_destroy(ctx, group);
        assert!(
            matches!(status, STRATA_OK | STRATA_ERR_INVALID_HANDLE),
            "strata_group_destroy with nothing in use: {status}: {}",
            last_error()
        );
    }
    assert_eq!(strata_stats_get(ctx, &mut stats), STRATA_OK);
    assert_eq!(
        (stats.vram_in_use, stats.host_in_use),
        (0, 0),
        "bytes held with every group destroyed: {stats:?}"
    );
    strata_context_destroy(ctx);
});
