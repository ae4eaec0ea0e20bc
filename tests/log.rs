//! Log callbacks through the C ABI: what an engine author is told and at which level, a callback
//! that calls back into strata, callers built before the callback fields existed, and STRATA_LOG
//! printing to stderr when no callback is set.

mod common;
use common::*;
use std::ffi::{c_char, c_void, CStr};
use std::ptr;
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

/// What a callback saw; `ctx` is the context it calls back into.
#[derive(Default)]
struct Recorder {
    ctx: AtomicPtr<strata_context>,
    messages: Mutex<Vec<(u32, String)>>,
    /// strata_stats_get calls made from inside the callback, and how many of them failed.
    reentrant_calls: AtomicU64,
    reentrant_failures: AtomicU64,
}

impl Recorder {
    fn has(&self, level: u32, text: &str) -> bool {
        let messages = self.messages.lock().unwrap();
        messages
            .iter()
            .any(|(l, m)| *l == level && m.contains(text))
    }

    fn dump(&self) -> String {
        format!("{:#?}", self.messages.lock().unwrap())
    }
}

/// Records the message, then reads the stats of the same context: strata must not hold the
/// context's lock while it calls us. Never panics (it is called from C's side of the ABI).
unsafe extern "C" fn record(user: *mut c_void, level: u32, message: *const c_char) {
    // SAFETY: `user` is the Recorder the test passed, alive for the context's life.
    let recorder = unsafe { &*(user as *const Recorder) };
    // SAFETY: `message` is a NUL-terminated string valid for this call.
    let text = unsafe { CStr::from_ptr(message) }
        .to_string_lossy()
        .into_owned();
    if let Ok(mut messages) = recorder.messages.lock() {
        messages.push((level, text));
    }
    let ctx = recorder.ctx.load(Ordering::Acquire);
    if !ctx.is_null() {
        let mut stats = strata_stats {
            struct_size: std::mem::size_of::<strata_stats>() as u32,
            ..Default::default()
        };
        recorder.reentrant_calls.fetch_add(1, Ordering::Relaxed);
        if strata_stats_get(ctx, &mut stats) != STRATA_OK {
            recorder.reentrant_failures.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn logged_context(recorder: &Arc<Recorder>, vram_limit: u64) -> Ctx {
    let ctx = Ctx::with(|o| {
        o.vram_limit = vram_limit;
        o.log_fn = Some(record);
        o.log_user = Arc::as_ptr(recorder) as *mut c_void;
    });
    recorder.ctx.store(ctx.0, Ordering::Release);
    ctx
}

/// f32 kept as bf16 on the device and handed out as f32, so every layer holds device bytes.
fn device_tiers() -> strata_tiers {
    tiers(|t| {
        t.preparing.dtype = STRATA_DTYPE_BF16;
        t.computation.dtype = STRATA_DTYPE_F32;
    })
}

fn register(ctx: &Ctx, group: u64, name: &str, rows: i64) -> u64 {
    let values: Vec<f32> = (0..rows * 64).map(|i| i as f32).collect();
    ctx.register(
        group,
        name,
        &[("w", STRATA_DTYPE_F32, vec![rows, 64], f32_bytes(&values))],
    )
}

/// Runs `body` on another thread and fails the test if it has not finished in time: a deadlock
/// fails instead of hanging the test run.
fn within_a_minute(body: impl FnOnce() + Send + 'static) {
    let (done_tx, done_rx) = mpsc::channel();
    let worker = std::thread::spawn(move || {
        body();
        let _ = done_tx.send(());
    });
    match done_rx.recv_timeout(Duration::from_secs(60)) {
        Ok(()) => worker.join().unwrap(),
        Err(mpsc::RecvTimeoutError::Disconnected) => worker.join().unwrap(),
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("still running after a minute: a log callback deadlocked")
        }
    }
}

#[test]
fn an_engine_hears_about_evictions_overcommit_refusals_and_new_limits() {
    let recorder = Arc::new(Recorder::default());
    let seen = recorder.clone();
    within_a_minute(move || {
        // Measure one layer's footprint, then allow exactly one in use at a time.
        let probe = Ctx::new(STRATA_UNLIMITED);
        let group = probe.group(&device_tiers());
        let layer = register(&probe, group, "probe", 16);
        probe.acquire(layer);
        let footprint = probe.stats().vram_in_use;
        probe.release(layer);

        let ctx = logged_context(&recorder, footprint);
        let group = ctx.group(&device_tiers());
        let small: Vec<u64> = (0..3)
            .map(|i| register(&ctx, group, &format!("l{i}"), 16))
            .collect();
        let big = register(&ctx, group, "big", 64);
        for &layer in &small {
            ctx.acquire(layer);
            ctx.release(layer);
        }
        ctx.acquire(big);
        ctx.release(big);
        // This thread holds a layer that fills the budget and asks for another: refused.
        ctx.acquire(small[0]);
        let mut views = [empty_view(); 4];
        let mut n = 0;
        expect(
            strata_acquire_for_compute(
                ctx.0,
                small[1],
                ptr::null_mut(),
                views.as_mut_ptr(),
                4,
                &mut n,
            ),
            STRATA_ERR_BUDGET,
        );
        ctx.release(small[0]);
        ok(strata_context_set_vram_limit(ctx.0, 0));
        recorder.ctx.store(ptr::null_mut(), Ordering::Release);
    });
    let recorder = seen;
    assert!(
        recorder.has(STRATA_LOG_DEBUG, "evicted layer \"l0\""),
        "{}",
        recorder.dump()
    );
    assert!(
        recorder.has(STRATA_LOG_WARN, "layer \"big\" needs"),
        "{}",
        recorder.dump()
    );
    assert!(
        recorder.has(STRATA_LOG_WARN, "overcommitting"),
        "{}",
        recorder.dump()
    );
    assert!(
        recorder.has(STRATA_LOG_INFO, "layer \"l1\" needs"),
        "a refusal is info: {}",
        recorder.dump()
    );
    assert!(
        recorder.has(STRATA_LOG_INFO, "-> 0 (nothing resident): evicted"),
        "{}",
        recorder.dump()
    );
    let messages = recorder.messages.lock().unwrap();
    assert!(
        messages
            .iter()
            .all(|(l, _)| (STRATA_LOG_ERROR..=STRATA_LOG_DEBUG).contains(l)),
        "{messages:#?}"
    );
    assert_eq!(
        messages
            .iter()
            .filter(|(_, m)| m.contains("overcommitting"))
            .count(),
        1,
        "overcommit is warned about once per new high-water mark"
    );
    let calls = recorder.reentrant_calls.load(Ordering::Relaxed);
    assert!(
        calls >= messages.len() as u64 - 1,
        "{calls} calls back into strata"
    );
    assert_eq!(recorder.reentrant_failures.load(Ordering::Relaxed), 0);
}

#[test]
fn a_checkpoint_changed_under_us_is_a_warning() {
    let dir = TempDir::new("log-changed");
    let path = dir.path("model.safetensors");
    let values: Vec<f32> = (0..64).map(|i| i as f32).collect();
    write_safetensors(
        &path,
        &[(
            "l.w".into(),
            safetensors::Dtype::F32,
            vec![64],
            f32_bytes(&values),
        )],
    );
    let recorder = Arc::new(Recorder::default());
    let ctx = logged_context(&recorder, STRATA_UNLIMITED);
    let group = ctx.group(&tiers(|t| {
        t.offload.device = STRATA_DEVICE_DISK;
        t.onload.device = STRATA_DEVICE_DISK;
    }));
    let layer = ctx.register_tensors(group, &path, "l", &["l.w"]);

    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let opened = file.metadata().unwrap().modified().unwrap();
    file.set_modified(opened + Duration::from_secs(2)).unwrap();
    let mut views = [empty_view(); 4];
    let mut n = 0;
    expect(
        strata_acquire_for_compute(ctx.0, layer, ptr::null_mut(), views.as_mut_ptr(), 4, &mut n),
        STRATA_ERR_FORMAT,
    );
    assert!(
        recorder.has(STRATA_LOG_WARN, "changed since it was opened"),
        "{}",
        recorder.dump()
    );
    assert!(
        recorder.has(STRATA_LOG_WARN, "model.safetensors"),
        "{}",
        recorder.dump()
    );
}

#[test]
fn callers_built_before_the_callback_fields_keep_working() {
    let recorder = Arc::new(Recorder::default());
    let mut options = strata_options_default();
    options.vram_limit = 0;
    // A caller compiled against the first header: its struct ends at `flags`. Whatever lies
    // beyond (here a callback that would record) is not read.
    options.struct_size = std::mem::offset_of!(strata_options, log_fn) as u32;
    options.log_fn = Some(record);
    options.log_user = Arc::as_ptr(&recorder) as *mut c_void;
    let mut raw = ptr::null_mut();
    ok(strata_context_create(&options, &mut raw));
    let ctx = Ctx(raw);
    let group = ctx.group(&device_tiers());
    let layer = register(&ctx, group, "l", 16);
    ctx.acquire(layer);
    ctx.release(layer);
    ok(strata_context_set_vram_limit(ctx.0, 1));
    assert!(
        recorder.messages.lock().unwrap().is_empty(),
        "{}",
        recorder.dump()
    );

    options.struct_size -= 1;
    let mut refused = ptr::null_mut();
    expect(
        strata_context_create(&options, &mut refused),
        STRATA_ERR_INVALID_ARGUMENT,
    );
    assert!(refused.is_null());

    // strata_options_init fills an old caller's struct without writing past its end.
    #[repr(C)]
    struct OldOptions {
        struct_size: u32,
        compute_device: u32,
        device_index: i32,
        vram_limit: u64,
        host_limit: u64,
        prefetch_depth: u32,
        flags: u32,
        after: [u64; 4],
    }
    let mut old = OldOptions {
        struct_size: std::mem::offset_of!(OldOptions, after) as u32,
        compute_device: 99,
        device_index: -1,
        vram_limit: 1,
        host_limit: 1,
        prefetch_depth: 99,
        flags: 99,
        after: [0xA5A5; 4],
    };
    assert_eq!(
        old.struct_size as usize,
        std::mem::offset_of!(strata_options, log_fn)
    );
    ok(strata_options_init(
        &mut old as *mut OldOptions as *mut strata_options,
    ));
    let defaults = strata_options_default();
    assert_eq!(
        (
            old.compute_device,
            old.vram_limit,
            old.host_limit,
            old.prefetch_depth,
            old.flags
        ),
        (
            defaults.compute_device,
            defaults.vram_limit,
            defaults.host_limit,
            defaults.prefetch_depth,
            defaults.flags
        )
    );
    assert_eq!(old.after, [0xA5A5; 4], "nothing written past struct_size");
    let mut created = ptr::null_mut();
    ok(strata_context_create(
        &old as *const OldOptions as *const strata_options,
        &mut created,
    ));
    strata_context_destroy(created);

    // The same for strata_stats: an old caller's struct ends before host_limit, which is left alone.
    let mut stats = strata_stats {
        struct_size: std::mem::offset_of!(strata_stats, host_limit) as u32,
        host_limit: 7,
        ..Default::default()
    };
    ok(strata_stats_get(ctx.0, &mut stats));
    assert_eq!(stats.vram_limit, 1);
    assert_eq!(stats.acquires, 1);
    assert_eq!(stats.host_limit, 7);
    stats.struct_size -= 1;
    expect(
        strata_stats_get(ctx.0, &mut stats),
        STRATA_ERR_INVALID_ARGUMENT,
    );
}

#[test]
fn strata_log_prints_to_stderr_when_no_callback_is_set() {
    let run = |level: &str| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
            .args(["demo", "--layers", "8", "--width", "128", "--passes", "2"])
            .env("STRATA_LOG", level)
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let debug = run("debug");
    assert!(
        debug.contains("strata debug: evicted layer \"blocks."),
        "{debug}"
    );
    let warn = run("warn");
    assert!(!warn.contains("strata debug"), "{warn}");
}
