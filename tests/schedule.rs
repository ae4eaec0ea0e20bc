//! The learned order, residency and the copy engine, measured through the C ABI against this
//! file's own offline simulations of the same traces: Belady's optimum, LRU, and DiffSynth's greedy
//! first fill.

mod common;
use common::*;
use std::collections::HashMap;
use std::time::Duration;

/// Tiers whose preparing form is the computation form (bf16 in RAM, f32 on the device), so a
/// layer in use occupies exactly its resident copy and the window is whole layers.
fn plain_tiers() -> strata_tiers {
    tiers(|t| {
        t.offload.dtype = STRATA_DTYPE_BF16;
        t.preparing.dtype = STRATA_DTYPE_F32;
        t.computation.dtype = STRATA_DTYPE_F32;
    })
}

/// Registers a layer of `rows` x 64 whose values encode `seed`: on the device, f32 in sizes that
/// need no padding, `rows * 256` bytes.
fn layer(ctx: &Ctx, group: u64, name: &str, rows: i64, seed: usize) -> u64 {
    let weight: Vec<f32> = (0..rows * 64)
        .map(|j| (seed * 100 + j as usize) as f32)
        .collect();
    ctx.register(
        group,
        name,
        &[("w", STRATA_DTYPE_F32, vec![rows, 64], f32_bytes(&weight))],
    )
}

fn check(views: &[(strata_tensor_view, Vec<u8>)], rows: i64, seed: usize) {
    let values = f32_values(&views[0].1);
    assert_eq!(values.len(), rows as usize * 64);
    for (j, &v) in values.iter().enumerate() {
        let expected = half::bf16::from_f32((seed * 100 + j) as f32).to_f32();
        assert_eq!(v, expected, "layer {seed} value {j}");
    }
}

/// A context with this budget and prefetch depth, its layers, and their sizes by index.
struct Model {
    ctx: Ctx,
    ids: Vec<u64>,
    rows: Vec<i64>,
}

impl Model {
    fn new(vram_limit: u64, depth: u32, rows: &[i64]) -> Model {
        let ctx = Ctx::with(|o| {
            o.vram_limit = vram_limit;
            o.prefetch_depth = depth;
        });
        let group = ctx.group(&plain_tiers());
        let ids = rows
            .iter()
            .enumerate()
            .map(|(i, &r)| layer(&ctx, group, &format!("layer{i}"), r, i))
            .collect();
        Model {
            ctx,
            ids,
            rows: rows.to_vec(),
        }
    }

    /// Runs `trace` (layer indices), checking every view and the budget; returns bytes moved.
    /// Each layer "computes" for `compute`, the time the copy engine has to fill the next ones.
    fn run(&self, trace: &[usize], vram_limit: u64, compute: Duration) -> u64 {
        let before = self.ctx.stats().bytes_to_device;
        for &i in trace {
            let views = self.ctx.acquire(self.ids[i]);
            check(&views, self.rows[i], i);
            std::thread::sleep(compute);
            self.ctx.release(self.ids[i]);
            let stats = self.ctx.stats();
            assert!(
                stats.vram_in_use <= vram_limit,
                "budget passed at layer {i}"
            );
        }
        self.ctx.stats().bytes_to_device - before
    }
}

/// Bytes an offline policy moves over `trace` with `capacity` bytes: the layer in use and the
/// next `ahead` ones (the prefetch window) must be resident; `victim` picks what to evict among the
/// other resident layers. It is told of every use first, with no candidates.
fn simulate(
    trace: &[usize],
    sizes: &[u64],
    capacity: u64,
    ahead: usize,
    mut victim: impl FnMut(usize, &[usize]) -> usize,
) -> u64 {
    let mut resident: Vec<usize> = Vec::new();
    let mut held = 0;
    let mut moved = 0;
    for t in 0..trace.len() {
        victim(t, &[]);
        let window = &trace[t..trace.len().min(t + ahead + 1)];
        for &layer in window {
            if resident.contains(&layer) {
                continue;
            }
            moved += sizes[layer];
            while held + sizes[layer] > capacity {
                let evictable: Vec<usize> = resident
                    .iter()
                    .copied()
                    .filter(|r| !window.contains(r))
                    .collect();
                if evictable.is_empty() {
                    break;
                }
                let out = evictable[victim(t, &evictable)];
                held -= sizes[out];
                resident.retain(|&r| r != out);
            }
            resident.push(layer);
            held += sizes[layer];
        }
    }
    moved
}

/// `pass` run `times` times in a row: the trace of a repeating workload.
fn repeated(pass: &[usize], times: usize) -> Vec<usize> {
    pass.iter()
        .copied()
        .cycle()
        .take(times * pass.len())
        .collect()
}

/// Belady's rule: evict the layer whose next use is furthest in the future (or never), with the
/// next `ahead` layers loaded before their use.
fn belady(trace: &[usize], sizes: &[u64], capacity: u64, ahead: usize) -> u64 {
    let mut next_use = vec![usize::MAX; trace.len()];
    let mut seen: HashMap<usize, usize> = HashMap::new();
    for t in (0..trace.len()).rev() {
        next_use[t] = seen.get(&trace[t]).copied().unwrap_or(usize::MAX);
        seen.insert(trace[t], t);
    }
    let mut upcoming: HashMap<usize, usize> = HashMap::new();
    simulate(trace, sizes, capacity, ahead, |t, candidates| {
        upcoming.insert(trace[t], next_use[t]);
        (0..candidates.len())
            .max_by_key(|&i| upcoming[&candidates[i]])
            .unwrap_or(0)
    })
}

/// Least recently used.
fn lru(trace: &[usize], sizes: &[u64], capacity: u64) -> u64 {
    let mut last: HashMap<usize, usize> = HashMap::new();
    simulate(trace, sizes, capacity, 0, |t, candidates| {
        last.insert(trace[t], t);
        (0..candidates.len())
            .min_by_key(|&i| last.get(&candidates[i]).copied().unwrap_or(0))
            .unwrap_or(0)
    })
}

/// DiffSynth's greedy first fill: layers stay resident in the order first used while they fit
/// beside room for the largest layer; every other layer is copied in on every use.
fn greedy_first_fill(trace: &[usize], sizes: &[u64], capacity: u64) -> u64 {
    let room = capacity.saturating_sub(*sizes.iter().max().unwrap());
    let mut kept = Vec::new();
    let mut held = 0;
    let mut moved = 0;
    for &layer in trace {
        if kept.contains(&layer) {
            continue;
        }
        moved += sizes[layer];
        if held + sizes[layer] <= room {
            kept.push(layer);
            held += sizes[layer];
        }
    }
    moved
}

#[test]
fn a_steady_repeating_pass_moves_no_more_than_the_bound() {
    // 16 equal layers, a budget of 7 of them: the bound per steady pass is Σ − (B − W), where W
    // is the layer in use plus the prefetch slots. Evicting by Belady's rule can beat it (the set
    // that stays rotates), but never the offline optimum for the whole budget.
    let rows = [64i64; 16];
    let size = 64 * 64 * 4;
    let total: u64 = size * rows.len() as u64;
    let budget = 7 * size;
    let pass: Vec<usize> = (0..rows.len()).collect();
    let passes = 6;
    let sizes = vec![size; rows.len()];
    let whole = repeated(&pass, passes);
    let optimum = (belady(&whole, &sizes, budget, 0) - total) / (passes as u64 - 1);
    for depth in [0u32, 1, 2] {
        let model = Model::new(budget, depth, &rows);
        // Time to compute each layer, in which the copy engine fills the next ones.
        let compute = Duration::from_millis(depth.min(1) as u64);
        let first = model.run(&pass, budget, compute);
        assert_eq!(
            first, total,
            "depth {depth}: the first pass moves every layer once"
        );
        let window = (depth as u64 + 1) * size;
        let bound = total - (budget - window);
        let mut steady = 0;
        for _ in 1..passes {
            steady += model.run(&pass, budget, compute);
        }
        let moved = steady / (passes as u64 - 1);
        let stats = model.ctx.stats();
        let windowed =
            (belady(&whole, &sizes, budget, depth as usize) - total) / (passes as u64 - 1);
        println!(
            "depth {depth}: {moved} bytes per steady pass; bound Σ−(B−W) {bound} ({:.3}x), offline optimum {optimum} ({:.3}x), with the same window {windowed} ({:.3}x); prefetch hits {}, stall {:.2} ms",
            moved as f64 / bound as f64,
            moved as f64 / optimum as f64,
            moved as f64 / windowed as f64,
            stats.prefetch_hits,
            stats.stall_ns as f64 / 1e6
        );
        assert!(
            moved <= bound + size,
            "depth {depth}: {moved} > bound {bound} + one layer"
        );
        assert!(
            moved >= optimum,
            "depth {depth}: {moved} beats the optimum {optimum}?"
        );
        assert!(stats.vram_peak <= budget);
        assert_eq!(stats.overcommit_peak, 0);
        if depth > 0 {
            assert!(stats.prefetch_hits > 0, "depth {depth}: no prefetch hit");
        }
    }
}

/// A text encoder once, a DiT for 20 steps, a VAE once: one prompt of a diffusion pipeline.
fn pipeline_prompt(te: &[usize], dit: &[usize], vae: &[usize], steps: usize) -> Vec<usize> {
    let mut trace = te.to_vec();
    for _ in 0..steps {
        trace.extend_from_slice(dit);
    }
    trace.extend_from_slice(vae);
    trace
}

#[test]
fn a_pipeline_moves_within_five_percent_of_the_offline_optimum() {
    // Layers of different sizes: 4 text-encoder layers, 12 DiT blocks, 3 VAE layers.
    let mut rows = vec![96i64; 4];
    rows.extend((0..12).map(|i| 48 + 16 * (i % 3)));
    rows.extend([128i64; 3]);
    let (te, dit, vae): (Vec<usize>, Vec<usize>, Vec<usize>) =
        ((0..4).collect(), (4..16).collect(), (16..19).collect());
    let prompt = pipeline_prompt(&te, &dit, &vae, 20);
    let prompts = 3;
    let sizes: Vec<u64> = rows.iter().map(|&r| r as u64 * 64 * 4).collect();
    let total: u64 = sizes.iter().sum();
    let budget = total * 2 / 5;
    let whole = repeated(&prompt, prompts);
    // Bytes moved by prompts after the first, per prompt.
    let per_prompt = |policy: &dyn Fn(&[usize]) -> u64| {
        (policy(&whole) - policy(&prompt)) / (prompts as u64 - 1)
    };
    println!(
        "pipeline: {} layers, {total} bytes, budget {budget}; per prompt after the first: LRU {} bytes, greedy first fill {} bytes",
        rows.len(),
        per_prompt(&|trace| lru(trace, &sizes, budget)),
        per_prompt(&|trace| greedy_first_fill(trace, &sizes, budget)),
    );
    let unwindowed = per_prompt(&|trace| belady(trace, &sizes, budget, 0));
    for depth in [0u32, 1, 2] {
        let model = Model::new(budget, depth, &rows);
        let compute = Duration::from_micros(300 * depth.min(1) as u64);
        model.run(&prompt, budget, compute);
        let mut moved = 0;
        for _ in 1..prompts {
            moved += model.run(&prompt, budget, compute);
        }
        moved /= prompts as u64 - 1;
        // The optimum for the same window: the layer in use and the next `depth` are resident.
        let optimum = per_prompt(&|trace| belady(trace, &sizes, budget, depth as usize));
        println!(
            "depth {depth}: strata {moved} bytes per prompt, offline optimum with the same window {optimum} ({:.3}x), with no window {unwindowed} ({:.3}x)",
            moved as f64 / optimum as f64,
            moved as f64 / unwindowed as f64
        );
        assert!(
            moved as f64 <= optimum as f64 * 1.05,
            "depth {depth}: {moved} bytes per prompt, optimum {optimum}"
        );
        assert!(model.ctx.stats().vram_peak <= budget);
    }
}

#[test]
fn the_copy_engine_fills_ahead_while_the_caller_computes() {
    // Budget 0: only the layer in use and the two after it may be on the device. With compute
    // far longer than a fill, the engine has every layer ready before its acquire.
    let rows = [64i64; 8];
    let size = 64 * 64 * 4;
    let model = Model::new(0, 2, &rows);
    let pass: Vec<usize> = (0..rows.len()).collect();
    model.run(&pass, size * 3, Duration::from_millis(3));
    let warm = model.ctx.stats();
    for _ in 0..3 {
        model.run(&pass, size * 3, Duration::from_millis(3));
    }
    let stats = model.ctx.stats();
    let acquires = stats.acquires - warm.acquires;
    let prefetched = stats.prefetch_hits - warm.prefetch_hits;
    println!(
        "{prefetched} of {acquires} steady acquires were filled ahead; stall {:.2} ms",
        (stats.stall_ns - warm.stall_ns) as f64 / 1e6
    );
    assert!(
        prefetched * 2 >= acquires,
        "only {prefetched} of {acquires} acquires were prefetched"
    );
    // Budget 0 moves every layer once per pass, nothing twice, and at the end the two layers
    // the engine filled for a next pass that does not come.
    let moved = stats.bytes_to_device - warm.bytes_to_device;
    assert!(
        (3 * 8 * size..=(3 * 8 + 2) * size).contains(&moved),
        "moved {moved} bytes, {} layers",
        moved / size
    );
    assert!(stats.vram_peak <= 3 * size);
}

#[test]
fn a_budget_with_no_room_ahead_shrinks_the_depth_to_zero() {
    // Room for the layer in use only: the engine may not evict it or go over, so it fills nothing.
    let rows = [64i64; 6];
    let size = 64 * 64 * 4;
    let model = Model::new(size, 2, &rows);
    let pass: Vec<usize> = (0..rows.len()).collect();
    for _ in 0..3 {
        model.run(&pass, size, Duration::from_millis(1));
    }
    let stats = model.ctx.stats();
    assert_eq!(stats.prefetch_hits, 0);
    assert_eq!(stats.misses, 18);
    assert_eq!(stats.overcommit_peak, 0);
    assert_eq!(stats.vram_peak, size);
}

#[test]
fn layers_the_engine_is_filling_can_be_removed_right_after_the_last_release() {
    // The caller has released everything; that the copy engine is still filling the layers it
    // predicted next is invisible to it, so removing them must not be refused as "in use".
    for round in 0..20 {
        let ctx = Ctx::with(|o| o.prefetch_depth = 4);
        let group = ctx.group(&plain_tiers());
        let ids: Vec<u64> = (0..6)
            .map(|i| layer(&ctx, group, &format!("l{i}"), 4096, i))
            .collect();
        for _ in 0..2 {
            for &id in &ids {
                ctx.acquire(id);
                ctx.release(id);
            }
        }
        // Offloading drops every device copy: the next acquire sets the engine filling the rest.
        ok(strata_group_offload(ctx.0, group));
        ctx.acquire(ids[0]);
        ctx.release(ids[0]);
        if round % 2 == 0 {
            ok(strata_layer_unregister(ctx.0, ids[1]));
        }
        ok(strata_group_destroy(ctx.0, group));
        assert_eq!(ctx.stats().vram_in_use, 0);
    }
}
