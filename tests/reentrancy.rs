//! Every exported function called from inside each callback, through the C ABI: from the progress
//! callback of an explicit onload, of an onload an acquire started, and of opening a checkpoint;
//! and from the log callback. Each call must work, or return at once the status the header
//! documents (STRATA_ERR_STATE for the group whose onload is running on this very thread). Each
//! scenario runs under a watchdog, so a deadlock fails the test instead of hanging it.

mod common;
use common::*;
use safetensors::Dtype as St;
use std::collections::BTreeSet;
use std::ffi::{c_char, c_void, CStr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use strata::ffi::store::*;

/// What a probe may find: the group whose onload runs on the probing thread, or none.
#[derive(Clone, Copy, Debug, PartialEq)]
enum During {
    OnloadOf(u64),
    Nothing,
}

/// The objects a probe calls on.
struct Setup {
    ctx: usize,
    /// The group the onload scenarios onload, and one of its layers.
    group: u64,
    layer: u64,
    /// Another group, onloaded, and one of its layers.
    other_group: u64,
    other_layer: u64,
    checkpoint: PathBuf,
    trace: PathBuf,
}

/// A callback's state: what to do on its next call, and what the calls it made returned.
#[derive(Default)]
struct Probe {
    setup: OnceLock<Setup>,
    /// Taken by the next callback that runs: it probes once, then only counts.
    armed: Mutex<Option<Action>>,
    /// (what was called, its status, the statuses allowed).
    calls: Mutex<Vec<(String, strata_status, Vec<strata_status>)>>,
    callbacks: AtomicUsize,
    fresh: AtomicU32,
}

#[derive(Clone, Copy, Debug)]
enum Action {
    CallEverything(During),
    DestroyTheContext,
}

impl Probe {
    fn arm(&self, action: Action) {
        *self.armed.lock().unwrap() = Some(action);
    }

    fn fire(&self) {
        self.callbacks.fetch_add(1, Ordering::Relaxed);
        let action = self.armed.lock().unwrap().take();
        match action {
            Some(Action::CallEverything(during)) => self.call_everything(during),
            Some(Action::DestroyTheContext) => {
                strata_context_destroy(self.setup.get().unwrap().ctx as *mut strata_context)
            }
            None => {}
        }
    }

    fn record(&self, what: &str, status: strata_status, allowed: &[strata_status]) {
        let message = if status == STRATA_OK {
            String::new()
        } else {
            last_error()
        };
        self.calls
            .lock()
            .unwrap()
            .push((format!("{what} ({message})"), status, allowed.to_vec()));
    }

    /// Calls every exported function on the context, as a callback.
    fn call_everything(&self, during: During) {
        let s = self.setup.get().unwrap();
        let ctx = s.ctx as *mut strata_context;
        let onloading = during == During::OnloadOf(s.group);
        let on_group = |ok: strata_status| if onloading { STRATA_ERR_STATE } else { ok };
        let n = self.fresh.fetch_add(1, Ordering::Relaxed);

        // Acquire and release, in the group onloading and in another.
        let acquire = |layer| acquire_status(ctx, layer);
        let status = acquire(s.layer);
        self.record(
            "strata_acquire_for_compute (the group's layer)",
            status,
            &[on_group(STRATA_OK)],
        );
        if status == STRATA_OK {
            let status = strata_release(ctx, s.layer, std::ptr::null_mut());
            self.record("strata_release", status, &[STRATA_OK]);
        }
        let status = acquire(s.other_layer);
        self.record(
            "strata_acquire_for_compute (another group's layer)",
            status,
            &[STRATA_OK],
        );
        let status = strata_release(ctx, s.other_layer, std::ptr::null_mut());
        self.record("strata_release", status, &[STRATA_OK]);
        let status = strata_release(ctx, s.layer, std::ptr::null_mut());
        self.record("strata_release (not acquired)", status, &[STRATA_ERR_STATE]);

        // Options, versions, names, errors.
        let options = strata_options_default();
        self.record(
            "strata_options_default",
            if options.struct_size as usize == std::mem::size_of::<strata_options>() {
                STRATA_OK
            } else {
                STRATA_ERR_INVALID_ARGUMENT
            },
            &[STRATA_OK],
        );
        let mut options = strata_options {
            struct_size: std::mem::size_of::<strata_options>() as u32,
            ..strata_options_default()
        };
        self.record(
            "strata_options_init",
            strata_options_init(&mut options),
            &[STRATA_OK],
        );
        let tiers = strata_tiers_default();
        self.record(
            "strata_tiers_default",
            if tiers.struct_size as usize == std::mem::size_of::<strata_tiers>() {
                STRATA_OK
            } else {
                STRATA_ERR_INVALID_ARGUMENT
            },
            &[STRATA_OK],
        );
        self.record(
            "strata_version",
            if strata_version() > 0 {
                STRATA_OK
            } else {
                STRATA_ERR_STATE
            },
            &[STRATA_OK],
        );
        self.record(
            "strata_status_name",
            if name(STRATA_ERR_STATE) == "STRATA_ERR_STATE" {
                STRATA_OK
            } else {
                STRATA_ERR_STATE
            },
            &[STRATA_OK],
        );
        let _ = strata_release(ctx, s.layer, std::ptr::null_mut());
        self.record(
            "strata_last_error",
            if strata_last_error(std::ptr::null_mut(), 0) > 0 {
                STRATA_OK
            } else {
                STRATA_ERR_STATE
            },
            &[STRATA_OK],
        );

        // A second context, made and destroyed inside the callback.
        let mut second = std::ptr::null_mut();
        let status = strata_context_create(&strata_options_default(), &mut second);
        self.record("strata_context_create", status, &[STRATA_OK]);
        strata_context_destroy(second);
        let mut stats = strata_stats {
            struct_size: std::mem::size_of::<strata_stats>() as u32,
            ..Default::default()
        };
        self.record(
            "strata_context_destroy (the second context)",
            strata_stats_get(second, &mut stats),
            &[STRATA_ERR_INVALID_HANDLE],
        );

        // Limits: set_vram_limit waits for the copy engine's fill, never for this callback.
        self.record(
            "strata_context_set_vram_limit",
            strata_context_set_vram_limit(ctx, STRATA_UNLIMITED),
            &[STRATA_OK],
        );
        self.record(
            "strata_context_set_host_limit",
            strata_context_set_host_limit(ctx, STRATA_UNLIMITED),
            &[STRATA_OK],
        );

        // Groups: the one onloading refuses, others work.
        self.record(
            "strata_group_onload (the group)",
            strata_group_onload(ctx, s.group),
            &[on_group(STRATA_OK)],
        );
        if onloading {
            self.record(
                "strata_group_offload (the group)",
                strata_group_offload(ctx, s.group),
                &[STRATA_ERR_STATE],
            );
            self.record(
                "strata_group_destroy (the group)",
                strata_group_destroy(ctx, s.group),
                &[STRATA_ERR_STATE],
            );
        }
        self.record(
            "strata_group_onload (another group)",
            strata_group_onload(ctx, s.other_group),
            &[STRATA_OK],
        );
        let mut group = 0;
        let group_name = cstr(&format!("probe.{n}"));
        self.record(
            "strata_group_create",
            strata_group_create(ctx, group_name.as_ptr(), &tiers, &mut group),
            &[STRATA_OK],
        );

        // Layers: from a checkpoint opened here (one into the group onloading), from host bytes.
        let mut ckpt = std::ptr::null_mut();
        let path = cstr(s.checkpoint.to_str().unwrap());
        self.record(
            "strata_checkpoint_open",
            strata_checkpoint_open(ctx, path.as_ptr(), &mut ckpt),
            &[STRATA_OK],
        );
        let layer_name = cstr(&format!("probe.{n}.c"));
        let tensor = cstr("c.w");
        let mut id = 0;
        self.record(
            "strata_layer_register_checkpoint",
            strata_layer_register_checkpoint(
                ctx,
                s.group,
                ckpt,
                layer_name.as_ptr(),
                &tensor.as_ptr(),
                1,
                &mut id,
            ),
            &[STRATA_OK],
        );
        let mut layers = 0;
        self.record(
            "strata_group_register_checkpoint",
            strata_group_register_checkpoint(ctx, group, ckpt, cstr("d.").as_ptr(), 0, &mut layers),
            &[STRATA_OK],
        );
        strata_checkpoint_close(ckpt);
        self.record(
            "strata_checkpoint_close (a second close says the handle is gone)",
            {
                strata_checkpoint_close(ckpt);
                if last_error().contains("not live") {
                    STRATA_ERR_INVALID_HANDLE
                } else {
                    STRATA_OK
                }
            },
            &[STRATA_ERR_INVALID_HANDLE],
        );
        let values = f32_bytes(&weights(16, n as u64, 1.0));
        let host_name = cstr(&format!("probe.{n}.host"));
        let tensor_name = cstr("w");
        let shape = [4i64, 4];
        let host = strata_host_tensor {
            name: tensor_name.as_ptr(),
            dtype: STRATA_DTYPE_F32,
            ndim: 2,
            shape: shape.as_ptr(),
            data: values.as_ptr() as *const c_void,
        };
        let mut host_id = 0;
        self.record(
            "strata_layer_register_host",
            strata_layer_register_host(ctx, group, host_name.as_ptr(), &host, 1, &mut host_id),
            &[STRATA_OK],
        );
        let mut found = 0;
        self.record(
            "strata_layer_find",
            strata_layer_find(ctx, host_name.as_ptr(), &mut found),
            &[STRATA_OK],
        );
        let mut tensors = 0;
        self.record(
            "strata_layer_tensor_count",
            strata_layer_tensor_count(ctx, found, &mut tensors),
            &[STRATA_OK],
        );
        self.record(
            "strata_layer_unregister",
            strata_layer_unregister(ctx, host_id),
            &[STRATA_OK],
        );
        self.record(
            "strata_group_offload (another group)",
            strata_group_offload(ctx, group),
            &[STRATA_OK],
        );
        self.record(
            "strata_group_destroy (another group)",
            strata_group_destroy(ctx, group),
            &[STRATA_OK],
        );

        // A host store, attached to a context of its own (attaching is once per context).
        let store_options = strata_store_options_default();
        self.record(
            "strata_store_options_default",
            if store_options.struct_size as usize == std::mem::size_of::<strata_store_options>() {
                STRATA_OK
            } else {
                STRATA_ERR_INVALID_ARGUMENT
            },
            &[STRATA_OK],
        );
        let mut store = std::ptr::null_mut();
        self.record(
            "strata_store_create",
            strata_store_create(&store_options, &mut store),
            &[STRATA_OK],
        );
        let mut user = std::ptr::null_mut();
        ok(strata_context_create(&strata_options_default(), &mut user));
        self.record(
            "strata_context_attach_store",
            strata_context_attach_store(user, store),
            &[STRATA_OK],
        );
        let mut store_stats = strata_store_stats {
            struct_size: std::mem::size_of::<strata_store_stats>() as u32,
            ..Default::default()
        };
        self.record(
            "strata_store_stats_get",
            strata_store_stats_get(store, &mut store_stats),
            &[STRATA_OK],
        );
        strata_context_destroy(user);
        self.record(
            "strata_store_destroy (a second destroy says the handle is gone)",
            {
                strata_store_destroy(store);
                strata_store_destroy(store);
                if last_error().contains("not live") {
                    STRATA_ERR_INVALID_HANDLE
                } else {
                    STRATA_OK
                }
            },
            &[STRATA_ERR_INVALID_HANDLE],
        );

        // Stats and the trace.
        self.record(
            "strata_stats_get",
            strata_stats_get(ctx, &mut stats),
            &[STRATA_OK],
        );
        let trace = cstr(s.trace.to_str().unwrap());
        self.record(
            "strata_trace_write",
            strata_trace_write(ctx, trace.as_ptr()),
            &[STRATA_OK],
        );
    }

    /// Checks every recorded call, and that every exported function was among them.
    #[track_caller]
    fn check(&self, scenario: &str) {
        let calls = std::mem::take(&mut *self.calls.lock().unwrap());
        assert!(!calls.is_empty(), "{scenario}: the callback never probed");
        let mut called = BTreeSet::new();
        for (what, status, allowed) in &calls {
            assert!(
                allowed.contains(status),
                "{scenario}: {what} returned {} where {:?} are allowed",
                name(*status),
                allowed.iter().map(|&s| name(s)).collect::<Vec<_>>()
            );
            called.insert(what.split(' ').next().unwrap().to_owned());
        }
        let exported = exported_functions();
        let missing: Vec<_> = exported.difference(&called).collect();
        assert!(
            missing.is_empty(),
            "{scenario}: not called from the callback: {missing:?}"
        );
    }
}

/// Every function the header declares: `strata_NAME(` outside comments.
fn exported_functions() -> BTreeSet<String> {
    let header =
        std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("include/strata.h"))
            .unwrap();
    let mut functions = BTreeSet::new();
    for line in header.lines() {
        let code = line.trim_start();
        if code.starts_with("//") || code.starts_with('*') || code.starts_with("/*") {
            continue;
        }
        for (at, _) in code.match_indices("strata_") {
            let name: String = code[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if code[at + name.len()..].starts_with('(') {
                functions.insert(name);
            }
        }
    }
    assert!(functions.len() > 20, "{functions:?}");
    functions
}

unsafe extern "C" fn on_progress(
    user: *mut c_void,
    _phase: *const c_char,
    _done: u64,
    _total: u64,
) {
    // SAFETY: `user` is the Probe the scenario keeps alive for the context's life.
    unsafe { &*(user as *const Probe) }.fire();
}

unsafe extern "C" fn on_log(user: *mut c_void, _level: u32, message: *const c_char) {
    // SAFETY: the message is a NUL-terminated string, valid during the call.
    let _ = unsafe { CStr::from_ptr(message) };
    // SAFETY: `user` is the Probe the scenario keeps alive for the context's life.
    unsafe { &*(user as *const Probe) }.fire();
}

/// A checkpoint directory of two shards, of two 8×8 f32 tensors each: a.w, b.w and c.w, d.w.
fn write_shards(dir: &TempDir) -> PathBuf {
    let shards = dir.path("shards");
    std::fs::create_dir_all(&shards).unwrap();
    let tensor = |name: &str, seed| {
        (
            name.to_string(),
            St::F32,
            vec![8, 8],
            f32_bytes(&weights(64, seed, 1.0)),
        )
    };
    write_safetensors(
        &shards.join("a.safetensors"),
        &[tensor("a.w", 1), tensor("b.w", 2)],
    );
    write_safetensors(
        &shards.join("c.safetensors"),
        &[tensor("c.w", 3), tensor("d.w", 4)],
    );
    shards
}

/// A context whose callbacks probe, a checkpoint directory of two shards, and the groups: one
/// kept in RAM as bf16 while onloaded (so its onload reports progress), one onloaded already.
fn scenario(tag: &str, log: bool) -> (Ctx, Arc<Probe>, TempDir) {
    let dir = TempDir::new(tag);
    let shards = write_shards(&dir);
    let probe = Arc::new(Probe::default());
    // The callbacks may run until the context is destroyed, whichever is dropped first: the
    // probe is never freed.
    std::mem::forget(probe.clone());
    let user = Arc::as_ptr(&probe) as *mut c_void;
    let ctx = Ctx::with(|o| {
        o.progress_fn = Some(on_progress);
        o.progress_user = user;
        if log {
            o.log_fn = Some(on_log);
            o.log_user = user;
        }
    });
    let onload_in_ram = tiers(|t| {
        t.offload.device = STRATA_DEVICE_DISK;
        t.onload.device = STRATA_DEVICE_CPU;
        t.onload.dtype = STRATA_DTYPE_BF16;
        t.computation.dtype = STRATA_DTYPE_F32;
    });
    let group = ctx.group(&onload_in_ram);
    let layer = ctx.register_tensors(group, &shards, "a", &["a.w"]);
    ctx.register_tensors(group, &shards, "b", &["b.w"]);
    let other_group = ctx.group(&tiers(|t| t.computation.dtype = STRATA_DTYPE_BF16));
    let other_layer = ctx.register(
        other_group,
        "host",
        &[(
            "w",
            STRATA_DTYPE_F32,
            vec![4, 4],
            f32_bytes(&weights(16, 9, 1.0)),
        )],
    );
    ok(strata_group_onload(ctx.0, other_group));
    probe
        .setup
        .set(Setup {
            ctx: ctx.0 as usize,
            group,
            layer,
            other_group,
            other_layer,
            checkpoint: shards,
            trace: dir.path("trace.json"),
        })
        .ok()
        .unwrap();
    (ctx, probe, dir)
}

const WATCHDOG_SECONDS: u64 = 120;

#[test]
fn every_function_from_the_progress_callback_of_an_explicit_onload() {
    within(WATCHDOG_SECONDS, || {
        let (ctx, probe, _dir) = scenario("reenter onload", false);
        let group = probe.setup.get().unwrap().group;
        probe.arm(Action::CallEverything(During::OnloadOf(group)));
        ok(strata_group_onload(ctx.0, group));
        probe.check("explicit onload");
        // The onload finished with nothing left marked: its layers are served, offload works.
        let layer = probe.setup.get().unwrap().layer;
        assert_eq!(ctx.acquire(layer).len(), 1);
        ctx.release(layer);
        ok(strata_group_offload(ctx.0, group));
    });
}

#[test]
fn every_function_from_the_progress_callback_of_an_onload_an_acquire_started() {
    within(WATCHDOG_SECONDS, || {
        let (ctx, probe, _dir) = scenario("reenter acquire", false);
        let setup = probe.setup.get().unwrap();
        probe.arm(Action::CallEverything(During::OnloadOf(setup.group)));
        assert_eq!(ctx.acquire(setup.layer).len(), 1);
        ctx.release(setup.layer);
        probe.check("implicit onload");
    });
}

#[test]
fn every_function_from_the_progress_callback_of_opening_a_checkpoint() {
    within(WATCHDOG_SECONDS, || {
        let (ctx, probe, _dir) = scenario("reenter open", false);
        probe.arm(Action::CallEverything(During::Nothing));
        let ckpt = open_checkpoint(&ctx, &probe.setup.get().unwrap().checkpoint);
        strata_checkpoint_close(ckpt);
        probe.check("checkpoint open");
    });
}

#[test]
fn every_function_from_the_log_callback() {
    within(WATCHDOG_SECONDS, || {
        let (ctx, probe, _dir) = scenario("reenter log", true);
        probe.arm(Action::CallEverything(During::Nothing));
        // Setting a limit logs at info level: the callback runs as the call returns.
        ok(strata_context_set_vram_limit(ctx.0, 1 << 20));
        probe.check("log");
        assert!(probe.callbacks.load(Ordering::Relaxed) > 1);
    });
}

#[test]
fn the_context_destroyed_from_a_callback_ends_the_call_and_takes_no_more() {
    for log in [false, true] {
        within(WATCHDOG_SECONDS, move || {
            let (ctx, probe, _dir) = scenario("destroy from callback", log);
            let group = probe.setup.get().unwrap().group;
            probe.arm(Action::DestroyTheContext);
            let status = if log {
                strata_context_set_vram_limit(ctx.0, 1 << 20)
            } else {
                strata_group_onload(ctx.0, group)
            };
            // The call that ran the callback had done its work already, or stops at its next
            // wait: either way it returns.
            assert!(
                matches!(status, STRATA_OK | STRATA_ERR_INVALID_HANDLE),
                "{}: {}",
                name(status),
                last_error()
            );
            assert!(probe.callbacks.load(Ordering::Relaxed) > 0);
            let mut stats = strata_stats {
                struct_size: std::mem::size_of::<strata_stats>() as u32,
                ..Default::default()
            };
            expect(
                strata_stats_get(ctx.0, &mut stats),
                STRATA_ERR_INVALID_HANDLE,
            );
            expect(strata_group_onload(ctx.0, group), STRATA_ERR_INVALID_HANDLE);
        });
    }
}

/// What the holding-thread scenario's progress callback does: (context, layer to acquire), and
/// the status it got.
static HOLDING: Mutex<Option<(usize, u64)>> = Mutex::new(None);
static HOLDING_STATUS: Mutex<Option<strata_status>> = Mutex::new(None);

unsafe extern "C" fn acquire_while_another_thread_waits(
    _user: *mut c_void,
    _phase: *const c_char,
    _done: u64,
    _total: u64,
) {
    let Some((ctx, layer)) = HOLDING.lock().unwrap().take() else {
        return;
    };
    // Time for the main thread, which holds the only room, to start waiting for this onload.
    std::thread::sleep(Duration::from_millis(300));
    let status = acquire_status(ctx as *mut strata_context, layer);
    if status == STRATA_OK {
        strata_release(ctx as *mut strata_context, layer, std::ptr::null_mut());
    }
    *HOLDING_STATUS.lock().unwrap() = Some(status);
}

/// Thread A onloads a group; thread B holds the only room and waits for that onload to end (an
/// offload of the group). An acquire from A's progress callback that needs B's room would wait
/// for B forever: it is refused at once (STRATA_ERR_BUDGET), and both calls return.
#[test]
fn an_acquire_from_an_onloads_progress_callback_never_waits_for_room() {
    within(WATCHDOG_SECONDS, || {
        let dir = TempDir::new("holding");
        let shards = write_shards(&dir);
        let ctx = Ctx::with(|o| {
            o.vram_limit = 1024;
            o.prefetch_depth = 0;
            o.progress_fn = Some(acquire_while_another_thread_waits);
        });
        let onload_in_ram = tiers(|t| {
            t.offload.device = STRATA_DEVICE_DISK;
            t.onload.device = STRATA_DEVICE_CPU;
            t.onload.dtype = STRATA_DTYPE_BF16;
        });
        let group = ctx.group(&onload_in_ram);
        ctx.register_tensors(group, &shards, "a", &["a.w"]);
        let bf16 = ctx.group(&tiers(|t| t.computation.dtype = STRATA_DTYPE_BF16));
        let layer = |name: &str| {
            let tensor = ("w", STRATA_DTYPE_F32, vec![16, 16], f32_bytes(&[1.0; 256]));
            ctx.register(bf16, name, &[tensor])
        };
        let (held, wanted) = (layer("held"), layer("wanted"));
        ctx.acquire(held);
        *HOLDING.lock().unwrap() = Some((ctx.0 as usize, wanted));
        let ptr = ctx.0 as usize;
        let onload =
            std::thread::spawn(move || strata_group_onload(ptr as *mut strata_context, group));
        while HOLDING.lock().unwrap().is_some() {
            std::thread::sleep(Duration::from_millis(1));
        }
        // Waits for the onload, which runs its callback now.
        ok(strata_group_offload(ctx.0, group));
        ok(onload.join().unwrap());
        let status = HOLDING_STATUS.lock().unwrap().take();
        assert_eq!(status.map(name), Some(name(STRATA_ERR_BUDGET)));
        ctx.release(held);
    });
}
