//! The budget through the C ABI: never exceeded across random call sequences and limits, the three
//! kinds of limit (unlimited, 0, N), overcommit and strict mode, and several threads at once.

mod common;
use common::*;
use std::ptr;
use std::sync::Arc;

/// A small xorshift generator, so every run of a randomised test is reproducible from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// f32 weights kept as bf16 in RAM and resident as bf16 on the device, computed in f32: a miss
/// moves bytes into the compute tier and every acquire converts them, so the budget has two
/// kinds of bytes to count (resident copies and conversion temporaries).
fn converting_tiers() -> strata_tiers {
    tiers(|t| {
        t.offload.dtype = STRATA_DTYPE_BF16;
        t.preparing.dtype = STRATA_DTYPE_BF16;
        t.computation.dtype = STRATA_DTYPE_F32;
    })
}

/// Registers `n` layers of `rows` x 64 f32 (plus a bias) whose values encode the layer index.
fn register_layers(ctx: &Ctx, group: u64, prefix: &str, n: usize, rows: i64) -> Vec<u64> {
    (0..n)
        .map(|i| {
            let weight: Vec<f32> = (0..rows * 64)
                .map(|j| (i * 1000) as f32 + j as f32)
                .collect();
            ctx.register(
                group,
                &format!("{prefix}{i}"),
                &[
                    ("w", STRATA_DTYPE_F32, vec![rows, 64], f32_bytes(&weight)),
                    (
                        "b",
                        STRATA_DTYPE_F32,
                        vec![rows],
                        f32_bytes(&vec![i as f32; rows as usize]),
                    ),
                ],
            )
        })
        .collect()
}

/// Checks that an acquired layer shows exactly the values `register_layers` gave layer `i`
/// (bf16 storage keeps small integers exact).
fn check_values(views: &[(strata_tensor_view, Vec<u8>)], i: usize) {
    let w = f32_values(&views[0].1);
    for (j, &v) in w.iter().enumerate() {
        let expected = half::bf16::from_f32((i * 1000) as f32 + j as f32).to_f32();
        assert_eq!(v, expected, "layer {i} weight {j}");
    }
    assert!(f32_values(&views[1].1).iter().all(|&b| b == i as f32));
}

/// Device bytes one of these layers occupies while in use (bf16 prepared + f32 computed), and
/// while resident between uses (the prepared copy), found by using it alone in a fresh context.
fn layer_sizes(rows: i64) -> (u64, u64) {
    let ctx = Ctx::new(STRATA_UNLIMITED);
    let group = ctx.group(&converting_tiers());
    let layer = register_layers(&ctx, group, "x", 1, rows)[0];
    ctx.acquire(layer);
    let in_use = ctx.stats().vram_in_use;
    ctx.release(layer);
    let resident = ctx.stats().vram_in_use;
    assert!(
        resident > 0 && resident < in_use,
        "in use {in_use}, resident {resident}"
    );
    (in_use, resident)
}

fn layer_footprint(rows: i64) -> u64 {
    layer_sizes(rows).0
}

#[test]
fn random_sequences_never_exceed_the_budget() {
    // The copy engine runs too, on predictions that random order keeps breaking.
    const PREFETCH_DEPTH: u64 = 2;
    let footprint = layer_footprint(16);
    for seed in 1..=40u64 {
        let mut rng = Rng(seed * 7919);
        // Limits from "less than one layer" to "everything fits", plus 0 and unlimited.
        let limit = match rng.below(6) {
            0 => 0,
            1 => STRATA_UNLIMITED,
            _ => footprint / 2 + rng.below(footprint * 8),
        };
        let strict = rng.below(3) == 0;
        let ctx = Ctx::with(|o| {
            o.vram_limit = limit;
            o.prefetch_depth = PREFETCH_DEPTH as u32;
            o.flags = if strict { STRATA_FLAG_STRICT_BUDGET } else { 0 };
        });
        let group_a = ctx.group(&converting_tiers());
        let group_b = ctx.group(&converting_tiers());
        let mut layers: Vec<(u64, usize, u64)> = Vec::new();
        let mut held: Vec<(u64, usize)> = Vec::new();
        for step in 0..300 {
            match rng.below(10) {
                0 if layers.len() < 24 => {
                    let group = if rng.below(2) == 0 { group_a } else { group_b };
                    let i = layers.len();
                    let id = register_layers(&ctx, group, &format!("s{i}_"), 1, 16)[0];
                    layers.push((id, 0, group));
                }
                1 => ok(strata_group_onload(
                    ctx.0,
                    if rng.below(2) == 0 { group_a } else { group_b },
                )),
                2 => ok(strata_group_offload(
                    ctx.0,
                    if rng.below(2) == 0 { group_a } else { group_b },
                )),
                3..=6 if !layers.is_empty() => {
                    let (id, _, _) = layers[rng.below(layers.len() as u64) as usize];
                    let mut views = [empty_view(); 4];
                    let mut n = 0;
                    let status = strata_acquire_for_compute(
                        ctx.0,
                        id,
                        ptr::null_mut(),
                        views.as_mut_ptr(),
                        4,
                        &mut n,
                    );
                    if status == STRATA_OK {
                        held.push((id, 0));
                    } else {
                        // Only the budget may refuse: strict mode, or this thread's own layers fill it.
                        expect(status, STRATA_ERR_BUDGET);
                        assert!(
                            strict || !held.is_empty(),
                            "seed {seed} step {step}: {}",
                            last_error()
                        );
                    }
                }
                _ if !held.is_empty() => {
                    let (id, _) = held.swap_remove(rng.below(held.len() as u64) as usize);
                    ctx.release(id);
                }
                _ => {}
            }
            let stats = ctx.stats();
            if limit != 0 && limit != STRATA_UNLIMITED {
                // Only a single layer larger than the whole budget may go over it, and only alone.
                if footprint > limit && !strict {
                    assert!(
                        stats.vram_in_use <= limit.max(footprint),
                        "seed {seed} step {step}"
                    );
                } else {
                    assert!(
                        stats.vram_in_use <= limit,
                        "seed {seed} step {step}: {} > {limit}",
                        stats.vram_in_use
                    );
                }
            }
            if limit == 0 {
                let distinct: std::collections::HashSet<u64> = held.iter().map(|h| h.0).collect();
                assert!(
                    stats.vram_in_use <= footprint * (distinct.len() as u64 + PREFETCH_DEPTH),
                    "seed {seed}: 0 keeps only layers in use and the prefetch window"
                );
            }
        }
        for (id, _) in held.drain(..) {
            ctx.release(id);
        }
        if limit == 0 {
            assert!(
                ctx.stats().vram_in_use <= footprint * PREFETCH_DEPTH,
                "limit 0 keeps nothing resident after release but the prefetch window"
            );
        }
        if strict || limit == 0 || limit == STRATA_UNLIMITED || footprint <= limit {
            assert_eq!(ctx.stats().overcommit_peak, 0, "seed {seed}");
        }
    }
}

#[test]
fn a_hard_cap_keeps_what_fits_and_evicts_the_rest() {
    let (footprint, prepared) = layer_sizes(32);
    // Room for the layer in use (prepared + converted) plus two more resident prepared copies.
    let limit = footprint + 2 * prepared + prepared / 2;
    let ctx = Ctx::new(limit);
    let group = ctx.group(&converting_tiers());
    let layers = register_layers(&ctx, group, "l", 6, 32);
    for pass in 0..3 {
        for (i, &layer) in layers.iter().enumerate() {
            let views = ctx.acquire(layer);
            check_values(&views, i);
            ctx.release(layer);
            let stats = ctx.stats();
            assert!(stats.vram_in_use <= limit, "pass {pass} layer {i}");
        }
    }
    let stats = ctx.stats();
    assert!(stats.vram_peak <= limit);
    assert!(stats.evictions > 0);
    assert_eq!(stats.overcommit_peak, 0);
    assert_eq!(stats.acquires, 18);
    assert_eq!(stats.misses + stats.resident_hits, 18);
}

#[test]
fn unlimited_keeps_everything_and_zero_keeps_nothing() {
    let unlimited = Ctx::new(STRATA_UNLIMITED);
    let zero = Ctx::new(0);
    for ctx in [&unlimited, &zero] {
        let group = ctx.group(&converting_tiers());
        let layers = register_layers(ctx, group, "l", 4, 8);
        for _ in 0..2 {
            for (i, &layer) in layers.iter().enumerate() {
                check_values(&ctx.acquire(layer), i);
                ctx.release(layer);
            }
        }
    }
    let (u, z) = (unlimited.stats(), zero.stats());
    assert_eq!((u.misses, u.resident_hits), (4, 4));
    assert_eq!((z.misses, z.resident_hits), (8, 0));
    assert_eq!(z.vram_in_use, 0);
    assert!(u.vram_in_use > 0);
    assert_eq!(z.bytes_to_device, 2 * u.bytes_to_device);
}

#[test]
fn a_layer_larger_than_the_budget_overcommits_or_is_refused_in_strict_mode() {
    let footprint = layer_footprint(16);
    let limit = footprint / 2;
    let lenient = Ctx::new(limit);
    let group = lenient.group(&converting_tiers());
    let layers = register_layers(&lenient, group, "l", 2, 16);
    for (i, &layer) in layers.iter().enumerate() {
        check_values(&lenient.acquire(layer), i);
        lenient.release(layer);
    }
    let stats = lenient.stats();
    assert_eq!(stats.overcommit_peak, footprint - limit);
    assert_eq!(
        stats.vram_peak, footprint,
        "one oversized layer at a time, alone"
    );

    let strict = Ctx::with(|o| {
        o.vram_limit = limit;
        o.flags = STRATA_FLAG_STRICT_BUDGET;
    });
    let group = strict.group(&converting_tiers());
    let layer = register_layers(&strict, group, "l", 1, 16)[0];
    let mut views = [empty_view(); 4];
    let mut n = 0;
    expect(
        strata_acquire_for_compute(
            strict.0,
            layer,
            ptr::null_mut(),
            views.as_mut_ptr(),
            4,
            &mut n,
        ),
        STRATA_ERR_BUDGET,
    );
    assert!(last_error().contains("vram_limit"), "{}", last_error());
    assert_eq!(strict.stats().vram_peak, 0);
    // The refusal left nothing half-done: the layer is not acquired.
    expect(
        strata_release(strict.0, layer, ptr::null_mut()),
        STRATA_ERR_STATE,
    );
}

#[test]
fn layers_this_thread_holds_that_fill_the_budget_give_a_budget_error_not_a_hang() {
    let footprint = layer_footprint(16);
    let ctx = Ctx::new(footprint + footprint / 2);
    let group = ctx.group(&converting_tiers());
    let layers = register_layers(&ctx, group, "l", 2, 16);
    ctx.acquire(layers[0]);
    let mut views = [empty_view(); 4];
    let mut n = 0;
    expect(
        strata_acquire_for_compute(
            ctx.0,
            layers[1],
            ptr::null_mut(),
            views.as_mut_ptr(),
            4,
            &mut n,
        ),
        STRATA_ERR_BUDGET,
    );
    ctx.release(layers[0]);
    check_values(&ctx.acquire(layers[1]), 1);
    ctx.release(layers[1]);
}

#[test]
fn threads_acquiring_at_once_keep_the_cap_and_see_the_right_bytes() {
    let footprint = layer_footprint(16);
    // Room for three layers in use at once, shared by four threads: some must wait for others.
    let limit = 3 * footprint;
    let ctx = Arc::new(Ctx::new(limit));
    let group = ctx.group(&converting_tiers());
    let layers = Arc::new(register_layers(&ctx, group, "l", 12, 16));
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let ctx = ctx.clone();
            let layers = layers.clone();
            std::thread::spawn(move || {
                let mut rng = Rng(t * 31 + 5);
                for _ in 0..200 {
                    let i = rng.below(layers.len() as u64) as usize;
                    let views = ctx.acquire(layers[i]);
                    check_values(&views, i);
                    assert!(ctx.stats().vram_in_use <= limit);
                    ctx.release(layers[i]);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let stats = ctx.stats();
    assert!(stats.vram_peak <= limit, "{} > {limit}", stats.vram_peak);
    assert_eq!(stats.acquires, 800);
    assert_eq!(stats.overcommit_peak, 0);
}

#[test]
fn two_threads_each_holding_a_layer_get_budget_errors_not_a_deadlock() {
    let footprint = layer_footprint(16);
    let ctx = Arc::new(Ctx::new(2 * footprint + footprint / 2));
    let group = ctx.group(&converting_tiers());
    let layers = Arc::new(register_layers(&ctx, group, "l", 3, 16));
    let barrier = Arc::new(std::sync::Barrier::new(2));
    let threads: Vec<_> = (0..2)
        .map(|t| {
            let (ctx, layers, barrier) = (ctx.clone(), layers.clone(), barrier.clone());
            std::thread::spawn(move || {
                ctx.acquire(layers[t]);
                barrier.wait();
                let mut views = [empty_view(); 4];
                let mut n = 0;
                let status = strata_acquire_for_compute(
                    ctx.0,
                    layers[2],
                    ptr::null_mut(),
                    views.as_mut_ptr(),
                    4,
                    &mut n,
                );
                expect(status, STRATA_ERR_BUDGET);
                assert!(last_error().contains("this thread"), "{}", last_error());
                barrier.wait();
                ctx.release(layers[t]);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    check_values(&ctx.acquire(layers[2]), 2);
    ctx.release(layers[2]);
}

#[test]
fn a_repeating_pass_moves_only_what_cannot_stay_resident() {
    // Budget = one layer in use (W) + k resident copies: a steady pass must miss n - k layers,
    // within one (Sigma - (B - W) in bytes); least-recently-used eviction would miss all n.
    let (footprint, resident) = layer_sizes(16);
    let (n, k) = (8u64, 3u64);
    let ctx = Ctx::new(footprint + k * resident);
    let group = ctx.group(&converting_tiers());
    let layers = register_layers(&ctx, group, "l", n as usize, 16);
    let mut before = 0;
    for pass in 0..6 {
        for (i, &layer) in layers.iter().enumerate() {
            check_values(&ctx.acquire(layer), i);
            ctx.release(layer);
        }
        let misses = ctx.stats().misses;
        if pass > 0 {
            let this_pass = misses - before;
            assert!(
                this_pass.abs_diff(n - k) <= 1,
                "pass {pass}: {this_pass} misses, bound {}",
                n - k
            );
        }
        before = misses;
    }
    assert!(ctx.stats().vram_peak <= footprint + k * resident);
}

#[test]
fn onload_and_offload_racing_with_acquires_keep_every_byte_right() {
    let footprint = layer_footprint(16);
    let ctx = Arc::new(Ctx::new(3 * footprint));
    // The onload tier is its own host copy (f16), so onload and offload really move bytes.
    let group = ctx.group(&tiers(|t| {
        t.offload.dtype = STRATA_DTYPE_BF16;
        t.onload.dtype = STRATA_DTYPE_F16;
        t.preparing.dtype = STRATA_DTYPE_BF16;
        t.computation.dtype = STRATA_DTYPE_F32;
    }));
    let layers = Arc::new(register_layers(&ctx, group, "l", 6, 16));
    let switcher = {
        let ctx = ctx.clone();
        std::thread::spawn(move || {
            for i in 0..300 {
                let status = if i % 2 == 0 {
                    strata_group_onload(ctx.0, group)
                } else {
                    strata_group_offload(ctx.0, group)
                };
                expect(status, STRATA_OK);
            }
        })
    };
    let workers: Vec<_> = (0..2u64)
        .map(|t| {
            let (ctx, layers) = (ctx.clone(), layers.clone());
            std::thread::spawn(move || {
                let mut rng = Rng(t + 99);
                for _ in 0..300 {
                    let i = rng.below(layers.len() as u64) as usize;
                    check_values(&ctx.acquire(layers[i]), i);
                    ctx.release(layers[i]);
                }
            })
        })
        .collect();
    switcher.join().unwrap();
    for w in workers {
        w.join().unwrap();
    }
    ok(strata_group_offload(ctx.0, group));
    let stats = ctx.stats();
    assert_eq!(stats.vram_in_use, 0, "offload leaves nothing resident");
    assert!(stats.vram_peak <= 3 * footprint);
}

#[test]
fn a_lowered_limit_evicts_unused_layers_at_once_and_layers_in_use_on_release() {
    let (footprint, resident) = layer_sizes(16);
    let ctx = Ctx::new(STRATA_UNLIMITED);
    let group = ctx.group(&converting_tiers());
    let layers = register_layers(&ctx, group, "l", 6, 16);
    for (i, &layer) in layers.iter().enumerate() {
        check_values(&ctx.acquire(layer), i);
        ctx.release(layer);
    }
    assert_eq!(ctx.stats().vram_in_use, 6 * resident);

    ctx.acquire(layers[0]);
    ctx.acquire(layers[1]);
    let cap = resident;
    ok(strata_context_set_vram_limit(ctx.0, cap));
    let stats = ctx.stats();
    assert_eq!(stats.vram_limit, cap);
    // Every unused layer had to go: the two in use alone are over the new cap.
    assert_eq!(stats.vram_in_use, 2 * footprint);
    ctx.release(layers[0]);
    assert_eq!(
        ctx.stats().vram_in_use,
        footprint,
        "released over the cap, so evicted"
    );
    ctx.release(layers[1]);
    assert!(ctx.stats().vram_in_use <= cap);
    // Layers acquired under the new cap see the same bytes and stay within it.
    for (i, &layer) in layers.iter().enumerate() {
        check_values(&ctx.acquire(layer), i);
        ctx.release(layer);
        assert!(ctx.stats().vram_in_use <= cap);
    }

    ok(strata_context_set_vram_limit(ctx.0, 0));
    assert_eq!(ctx.stats().vram_in_use, 0, "0 keeps nothing between uses");
    ok(strata_context_set_vram_limit(ctx.0, STRATA_UNLIMITED));
    for &layer in &layers {
        ctx.acquire(layer);
        ctx.release(layer);
    }
    let stats = ctx.stats();
    assert_eq!(stats.vram_limit, STRATA_UNLIMITED);
    assert_eq!(
        stats.vram_in_use,
        6 * resident,
        "unlimited keeps everything"
    );
}

#[test]
fn a_raised_limit_lets_a_waiting_acquire_go_on() {
    let footprint = layer_footprint(16);
    let ctx = Arc::new(Ctx::new(footprint));
    let group = ctx.group(&converting_tiers());
    let layers = register_layers(&ctx, group, "l", 2, 16);
    ctx.acquire(layers[0]);
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let waiter = {
        let ctx = ctx.clone();
        let layer = layers[1];
        std::thread::spawn(move || {
            // Holds nothing while another thread fills the budget: waits for room.
            check_values(&ctx.acquire(layer), 1);
            ctx.release(layer);
            done_tx.send(()).unwrap();
        })
    };
    let timeout = std::time::Duration::from_millis(300);
    assert!(
        done_rx.recv_timeout(timeout).is_err(),
        "the acquire should wait for room"
    );
    ok(strata_context_set_vram_limit(ctx.0, 2 * footprint));
    done_rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("a larger budget wakes the waiting acquire");
    waiter.join().unwrap();
    ctx.release(layers[0]);
    assert!(ctx.stats().vram_peak <= 2 * footprint);
}

#[test]
fn limits_changing_under_concurrent_acquires_hold_whenever_nothing_is_in_use() {
    let (footprint, resident) = layer_sizes(16);
    let ctx = Arc::new(Ctx::new(3 * footprint));
    let group = ctx.group(&converting_tiers());
    let layers = Arc::new(register_layers(&ctx, group, "l", 10, 16));
    // Workers hold the read side from acquire to release; the limit thread takes the write side
    // when it wants to check the cap with no layer in use, and sets limits without it otherwise.
    let quiet = Arc::new(std::sync::RwLock::new(()));
    let workers: Vec<_> = (0..3u64)
        .map(|t| {
            let (ctx, layers, quiet) = (ctx.clone(), layers.clone(), quiet.clone());
            std::thread::spawn(move || {
                let mut rng = Rng(t * 17 + 3);
                for _ in 0..300 {
                    let i = rng.below(layers.len() as u64) as usize;
                    let _using = quiet.read().unwrap();
                    check_values(&ctx.acquire(layers[i]), i);
                    ctx.release(layers[i]);
                }
            })
        })
        .collect();
    let mut rng = Rng(4242);
    let mut cap = 3 * footprint;
    let mut checked = 0;
    for round in 0..200 {
        // Below one layer (overcommit), a few layers, everything, 0 and unlimited.
        cap = match rng.below(8) {
            0 => 0,
            1 => STRATA_UNLIMITED,
            2 => resident / 2,
            _ => footprint + rng.below(6 * footprint),
        };
        if round % 2 == 0 {
            let _quiet = quiet.write().unwrap();
            ok(strata_context_set_vram_limit(ctx.0, cap));
            let stats = ctx.stats();
            assert_eq!(stats.vram_limit, cap);
            let allowed = if cap == STRATA_UNLIMITED {
                u64::MAX
            } else {
                cap
            };
            assert!(
                stats.vram_in_use <= allowed,
                "round {round}: {} held with no layer in use, cap {cap}",
                stats.vram_in_use
            );
            checked += 1;
        } else {
            ok(strata_context_set_vram_limit(ctx.0, cap));
        }
        std::thread::yield_now();
    }
    for w in workers {
        w.join().unwrap();
    }
    // Layers in use when the last limit was set left as they were released.
    let stats = ctx.stats();
    assert_eq!(stats.vram_limit, cap);
    assert!(cap == STRATA_UNLIMITED || stats.vram_in_use <= cap);
    assert_eq!(stats.acquires, 900);
    assert_eq!(checked, 100);
}

#[test]
fn the_host_limit_is_live_and_bad_contexts_are_refused() {
    let ctx = Ctx::with(|o| o.host_limit = 1 << 30);
    assert_eq!(ctx.stats().host_limit, 1 << 30);
    ok(strata_context_set_host_limit(ctx.0, 1 << 20));
    assert_eq!(ctx.stats().host_limit, 1 << 20);
    expect(
        strata_context_set_vram_limit(ptr::null_mut(), 0),
        STRATA_ERR_NULL_ARGUMENT,
    );
    expect(
        strata_context_set_host_limit(0x1230 as *mut strata_context, 0),
        STRATA_ERR_INVALID_HANDLE,
    );
}
