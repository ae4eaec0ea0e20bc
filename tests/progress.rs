//! The progress callback through the C ABI: reading a directory of shards and onloading a group
//! into RAM report done/total with a phase name, from the thread doing the work, and a callback
//! may call back into strata.

mod common;
use common::*;
use std::ffi::{c_char, c_void, CStr};
use std::sync::Mutex;

/// What the callback saw, and the context it calls back into.
struct Seen {
    reports: Mutex<Vec<(String, u64, u64)>>,
    ctx: Mutex<*mut strata_context>,
}

unsafe extern "C" fn on_progress(user: *mut c_void, phase: *const c_char, done: u64, total: u64) {
    // SAFETY: `user` is the `Seen` the test keeps alive for the context's whole life.
    let seen = unsafe { &*(user as *const Seen) };
    // SAFETY: strata passes a valid NUL-terminated phase name for the call's duration.
    let phase = unsafe { CStr::from_ptr(phase) }
        .to_string_lossy()
        .into_owned();
    let ctx = *seen.ctx.lock().unwrap();
    if !ctx.is_null() {
        // A callback calling back into the library must not deadlock.
        let mut stats = strata_stats {
            struct_size: std::mem::size_of::<strata_stats>() as u32,
            ..Default::default()
        };
        assert_eq!(strata_stats_get(ctx, &mut stats), STRATA_OK);
    }
    seen.reports.lock().unwrap().push((phase, done, total));
}

#[test]
fn reading_shards_and_onloading_into_ram_report_progress() {
    let dir = TempDir::new("progress");
    let shards = dir.path("shards");
    std::fs::create_dir_all(&shards).unwrap();
    for s in 0..3 {
        let tensors: Vec<_> = (0..2)
            .map(|b| {
                (
                    format!("blocks.{}.weight", s * 2 + b),
                    safetensors::Dtype::F32,
                    vec![16, 16],
                    f32_bytes(&vec![s as f32; 256]),
                )
            })
            .collect();
        write_safetensors(&shards.join(format!("model-{s}.safetensors")), &tensors);
    }
    let seen = Box::new(Seen {
        reports: Mutex::new(Vec::new()),
        ctx: Mutex::new(std::ptr::null_mut()),
    });
    let ctx = Ctx::with(|o| {
        o.progress_fn = Some(on_progress);
        o.progress_user = &*seen as *const Seen as *mut c_void;
    });
    *seen.ctx.lock().unwrap() = ctx.0;

    let ckpt = open_checkpoint(&ctx, &shards);
    let reports = std::mem::take(&mut *seen.reports.lock().unwrap());
    assert_eq!(
        reports.first().map(|r| (r.1, r.2)),
        Some((0, 3)),
        "{reports:?}"
    );
    assert_eq!(
        reports.last().map(|r| (r.1, r.2)),
        Some((3, 3)),
        "{reports:?}"
    );
    assert!(reports.iter().all(|r| r.0 == "reading checkpoint headers"));

    // A group kept in RAM as bf16 while onloaded: the onload reads and converts every layer.
    let group = ctx.group(&tiers(|t| {
        t.offload.device = STRATA_DEVICE_DISK;
        t.onload.device = STRATA_DEVICE_CPU;
        t.onload.dtype = STRATA_DTYPE_BF16;
    }));
    let mut n = 0;
    ok(strata_group_register_checkpoint(
        ctx.0,
        group,
        ckpt,
        cstr("blocks.").as_ptr(),
        2,
        &mut n,
    ));
    assert_eq!(n, 6);
    ok(strata_group_onload(ctx.0, group));
    let reports = std::mem::take(&mut *seen.reports.lock().unwrap());
    assert_eq!(reports.len(), 6, "{reports:?}");
    let total = reports[0].2;
    assert!(total >= 6 * 16 * 16 * 2, "{reports:?}");
    assert!(reports.windows(2).all(|w| w[0].1 < w[1].1), "{reports:?}");
    assert_eq!(reports.last().unwrap().1, total);
    assert!(reports.iter().all(|r| r.0.starts_with("onloading group")));
    strata_checkpoint_close(ckpt);
    *seen.ctx.lock().unwrap() = std::ptr::null_mut();
    drop(ctx);
}
