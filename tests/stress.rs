//! Short runs of the stress workloads (`cargo bench --bench stress` runs them for a minute and
//! more): threads acquiring random layers of every kind under a budget of a few layers, every
//! byte verified; and a soak whose resident memory must stop growing after warm-up.

mod common;
use common::stress::*;
use common::*;
use std::sync::Mutex;
use std::time::Duration;

/// The soak measures the whole process's memory: nothing else may run beside it.
static ALONE: Mutex<()> = Mutex::new(());

fn alone() -> std::sync::MutexGuard<'static, ()> {
    ALONE.lock().unwrap_or_else(|p| p.into_inner())
}

#[test]
fn eight_threads_under_a_budget_of_a_few_layers_see_exact_bytes() {
    let _alone = alone();
    let report = run_threads(&ThreadsConfig {
        device: HOST,
        threads: 8,
        duration: Duration::from_secs(3),
        layers_of_budget: 2.5,
        seed: 1,
    });
    report.print();
    assert!(report.verified > 1000, "{report:?}");
    assert!(report.peak_seen <= report.limit);
    // The budget was tight: layers were evicted and brought back, and some second acquires had
    // no room.
    assert!(
        report.stats.evictions > 0 && report.stats.misses > 0,
        "{report:?}"
    );
    assert!(report.refusals > 0, "{report:?}");
}

#[test]
fn a_soak_keeps_its_memory_flat_and_gives_everything_back() {
    let _alone = alone();
    let report = soak(&SoakConfig {
        passes: 500,
        warmup: 100,
    });
    report.print();
    assert_eq!(report.held_after_destroy, (0, 0));
    assert_eq!(
        report.stats.acquires,
        (report.warmup_passes + report.passes) as u64 * 16
    );
    assert!(
        report.stats.misses > 0 && report.stats.prefetch_hits > 0,
        "{report:?}"
    );
    assert!(
        report.growth() <= 1 << 20,
        "RSS grew by {} KiB after warm-up",
        report.growth() / 1024
    );
}

#[test]
fn a_wrong_byte_or_shape_is_caught() {
    let _alone = alone();
    let spec = ModelSpec {
        kinds: vec![(Kind::Fp8Host, 1), (Kind::F16Disk, 1)],
        rows: 4,
        cols: 8,
    };
    let mut model = Model::build(&spec, HOST, |o| o.vram_limit = STRATA_UNLIMITED);
    for i in 0..model.layers.len() {
        let views = model.acquire(&model.layers[i]).unwrap();
        verify(HOST, &views, &model.layers[i]).unwrap();
        let layer = &mut model.layers[i];
        layer.tensors[0].bytes[5] ^= 1;
        assert!(verify(HOST, &views, layer).unwrap_err().contains("byte 5"));
        layer.tensors[0].bytes[5] ^= 1;
        layer.tensors[1].shape[0] += 1;
        assert!(verify(HOST, &views, layer).is_err());
        layer.tensors[1].shape[0] -= 1;
        let id = layer.id;
        model.ctx.release(id);
    }
}

/// Threads of this process running a copy engine, which names its thread as it starts.
fn copy_engine_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter(|task| {
            let comm = task.as_ref().unwrap().path().join("comm");
            std::fs::read_to_string(comm).is_ok_and(|name| name.trim() == "strata-copy")
        })
        .count()
}

#[test]
fn destroy_returns_once_the_copy_engine_thread_has_ended() {
    // Alone in this process, so every copy engine thread counted is this test's.
    let _alone = alone();
    for round in 0..50 {
        let ctx = Ctx::with(|o| o.prefetch_depth = 4);
        let group = ctx.group(&tiers(|t| {
            t.offload.dtype = STRATA_DTYPE_BF16;
            t.preparing.dtype = STRATA_DTYPE_F32;
        }));
        let data = f32_bytes(&weights(4096 * 64, round, 1.0));
        let ids: Vec<u64> = (0..6)
            .map(|i| {
                let tensor = ("w", STRATA_DTYPE_F32, vec![4096, 64], data.clone());
                ctx.register(group, &format!("l{i}"), &[tensor])
            })
            .collect();
        for _ in 0..2 {
            for &id in &ids {
                ctx.acquire(id);
                ctx.release(id);
            }
        }
        // With every device copy gone, an acquire sets the engine filling the next layers: the
        // first time starts its thread, the second destroys the context while it fills, when
        // the engine may hold the last handle.
        for time in 0..2 {
            ok(strata_group_offload(ctx.0, group));
            ctx.acquire(ids[0]);
            ctx.release(ids[0]);
            let started = std::time::Instant::now();
            while time == 0 && copy_engine_threads() != 1 {
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "round {round}: {} copy engine threads",
                    copy_engine_threads()
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        drop(ctx);
        assert_eq!(
            copy_engine_threads(),
            0,
            "round {round}: the copy engine outlived strata_context_destroy"
        );
    }
}

/// A host group computed as bf16, so each acquire fills device memory: `n` layers of `side`²
/// f32 values.
fn bf16_group(ctx: &Ctx, n: usize, side: i64, seed: u64) -> (u64, Vec<(u64, Vec<u8>)>) {
    let group = ctx.group(&tiers(|t| t.computation.dtype = STRATA_DTYPE_BF16));
    let layers = (0..n)
        .map(|i| {
            let values = weights((side * side) as usize, seed + i as u64, 1.0);
            let tensor = ("w", STRATA_DTYPE_F32, vec![side, side], f32_bytes(&values));
            let id = ctx.register(group, &format!("l{seed}.{i}"), &[tensor]);
            (id, bf16_bytes(&values))
        })
        .collect();
    (group, layers)
}

#[test]
fn destroy_wakes_every_thread_waiting_for_room_and_each_gets_invalid_handle() {
    let _alone = alone();
    within(60, || {
        // Room for one layer in use: the main thread holds it, three threads wait for room.
        let ctx = Ctx::new(64 * 64 * 2);
        let (_, layers) = bf16_group(&ctx, 2, 64, 1);
        let (held, _) = layers[0];
        let (wanted, _) = layers[1];
        ctx.acquire(held);
        let ptr = ctx.0 as usize;
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                std::thread::spawn(move || {
                    let status = acquire_status(ptr as *mut strata_context, wanted);
                    (status, last_error())
                })
            })
            .collect();
        // Long enough for the threads to be waiting inside the call (not needed for the
        // status: one that had not started yet gets the same).
        std::thread::sleep(Duration::from_millis(300));
        strata_context_destroy(ctx.0);
        for waiter in waiters {
            let (status, message) = waiter.join().unwrap();
            assert_eq!(
                name(status),
                name(STRATA_ERR_INVALID_HANDLE),
                "a waiter woken by destroy: {message}"
            );
        }
        // Destroyed: the guard's destroy finds nothing more to do.
        std::mem::forget(ctx);
    });
}

#[test]
fn offload_racing_destroy_of_the_same_group_with_the_engine_filling_ends_in_statuses() {
    let _alone = alone();
    within(120, || {
        for round in 0..40 {
            let ctx = Ctx::with(|o| o.prefetch_depth = 3);
            // 4 MiB layers: the engine's fills take long enough for both calls to wait on one.
            let (group, layers) = bf16_group(&ctx, 4, 1024, round);
            // Learn the order, then drop every device copy: the next acquire sets the engine
            // filling the layers after it while the two calls race.
            for _ in 0..2 {
                for (id, bytes) in &layers {
                    assert_eq!(&ctx.acquire(*id)[0].1, bytes);
                    ctx.release(*id);
                }
            }
            ok(strata_group_offload(ctx.0, group));
            ctx.acquire(layers[0].0);
            ctx.release(layers[0].0);
            let ptr = ctx.0 as usize;
            let offload = std::thread::spawn(move || {
                let status = strata_group_offload(ptr as *mut strata_context, group);
                (status, last_error())
            });
            let destroyed = strata_group_destroy(ctx.0, group);
            let (offloaded, message) = offload.join().unwrap();
            assert_eq!(name(destroyed), name(STRATA_OK), "{}", last_error());
            assert!(
                matches!(offloaded, STRATA_OK | STRATA_ERR_INVALID_HANDLE),
                "round {round}: offload racing destroy: {}: {message}",
                name(offloaded)
            );
            let s = ctx.stats();
            assert_eq!((s.vram_in_use, s.host_in_use), (0, 0), "round {round}");
        }
    });
}

#[test]
fn threads_in_opposite_orders_under_budget_zero_never_lose_a_layer_filled_ahead() {
    let _alone = alone();
    within(120, || {
        // Budget 0 keeps only the layers predicted next; f32 converted to bf16, so a layer two
        // ahead is filled without its conversion and an acquire plans from that copy. Threads
        // walking opposite ways keep moving the prediction past a layer one of them is about to
        // fill: that copy must stay for its fill (it was once dropped, and the fill panicked).
        const ROUNDS: u64 = 1000;
        let ctx = Ctx::with(|o| {
            o.vram_limit = 0;
            o.prefetch_depth = 2;
        });
        let (_, layers) = bf16_group(&ctx, 6, 256, 7);
        std::thread::scope(|scope| {
            for backwards in [false, true, false, true] {
                let (ctx, layers) = (&ctx, &layers);
                scope.spawn(move || {
                    for round in 0..ROUNDS {
                        for i in 0..layers.len() {
                            let (id, bytes) =
                                &layers[if backwards { layers.len() - 1 - i } else { i }];
                            let (status, views) = ctx.acquire_views(*id);
                            assert_eq!(
                                name(status),
                                name(STRATA_OK),
                                "round {round}: {}",
                                last_error()
                            );
                            // SAFETY: the view points at `nbytes` bytes until the release below.
                            let got = unsafe {
                                std::slice::from_raw_parts(
                                    views[0].data as *const u8,
                                    views[0].nbytes as usize,
                                )
                            };
                            assert_eq!(got, &bytes[..], "round {round}");
                            ctx.release(*id);
                        }
                    }
                });
            }
        });
        let s = ctx.stats();
        assert_eq!(s.acquires, 4 * ROUNDS * 6);
    });
}
