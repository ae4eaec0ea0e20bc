use super::simulate::key;
use super::{
    make_room, victim, Candidate, Granted, Holdings, LayerBytes, NoRoom, Protect, Purpose, Refusal,
    Request, Residents, Simulation,
};
use crate::budget::{Budget, Limit};
use crate::registry::Key;
use crate::schedule::Schedule;
use std::collections::HashMap;

const MIB: u64 = 1 << 20;

fn resident(index: usize) -> Candidate {
    Candidate {
        key: key(index),
        resident: true,
        pinned: false,
        prefetched: false,
    }
}

/// Per steady pass over `layers` equal layers: bytes moved and the layers resident after it.
fn steady_pass(layers: usize, size: u64, budget: u64, depth: u32) -> (Vec<u64>, Vec<usize>) {
    let sizes = vec![
        LayerBytes {
            prepared: size,
            converted: 0,
            payload: size,
        };
        layers
    ];
    let mut sim = Simulation::new(&sizes, budget, depth);
    let mut per_pass = Vec::new();
    for _ in 0..6 {
        let before = sim.moved();
        for i in 0..layers {
            sim.use_layer(i);
            assert!(sim.held() <= budget, "budget passed at layer {i}");
        }
        per_pass.push(sim.moved() - before);
    }
    (per_pass, sim.resident())
}

#[test]
fn a_repeating_pass_moves_sigma_minus_b() {
    // 48 one-MiB layers under 24 MiB: Belady over the learned order keeps 23 layers beside the
    // one in use and moves Σ − B = 24 MiB per steady pass, the offline optimum.
    let (per_pass, resident) = steady_pass(48, MIB, 24 * MIB, 0);
    assert_eq!(per_pass[0], 48 * MIB, "the first pass moves every layer");
    for (pass, &moved) in per_pass.iter().enumerate().skip(1) {
        assert_eq!(moved, 24 * MIB, "pass {pass}");
    }
    assert_eq!(resident.len(), 24);
}

#[test]
fn the_victim_is_the_furthest_predicted_use() {
    let mut schedule = Schedule::default();
    for _ in 0..2 {
        for layer in 0..5 {
            schedule.record(key(layer));
        }
    }
    // At layer 4: layer 0 comes next, layer 3 last.
    let distances = schedule.distances();
    let all = (0..5).map(resident);
    assert_eq!(
        victim(all.clone(), &schedule, &distances, Protect::default()),
        Some(key(3))
    );
    // A layer off the path goes before any on it.
    let with_stranger = all.clone().chain([resident(9)]);
    assert_eq!(
        victim(with_stranger, &schedule, &distances, Protect::default()),
        Some(key(9))
    );
    // Pinned, kept and non-resident layers stay; so does the window's, when asked.
    let pinned = (0..5).map(|i| Candidate {
        pinned: i == 3,
        resident: i != 2,
        prefetched: i == 1,
        ..resident(i)
    });
    let protect = Protect {
        keep: Some(key(4)),
        ..Protect::default()
    };
    assert_eq!(
        victim(pinned.clone(), &schedule, &distances, protect),
        Some(key(1))
    );
    let protect = Protect {
        keep_prefetched: true,
        ..protect
    };
    assert_eq!(
        victim(pinned.clone(), &schedule, &distances, protect),
        Some(key(0))
    );
    // A prefetch for the layer at distance 2 may evict only layers predicted after it.
    let protect = Protect {
        keep: Some(key(1)),
        nearest_allowed: 3,
        keep_prefetched: false,
    };
    assert_eq!(victim(all, &schedule, &distances, protect), Some(key(3)));
    let near = (0..2).map(resident);
    assert_eq!(victim(near, &schedule, &distances, protect), None);
}

#[test]
fn budget_zero_keeps_only_the_prefetch_window() {
    let sizes = vec![
        LayerBytes {
            prepared: MIB,
            converted: 0,
            payload: MIB,
        };
        6
    ];
    for depth in [0u32, 2] {
        let mut sim = Simulation::new(&sizes, 0, depth);
        for _ in 0..3 {
            for i in 0..6 {
                sim.use_layer(i);
                assert!(sim.held() <= depth as u64 * MIB, "depth {depth}");
                assert!(sim.resident().len() <= depth as usize);
            }
        }
        // Every use moved its layer once, ahead or on demand; beyond that only the window the
        // last use filled ahead.
        assert_eq!(sim.moved(), 18 * MIB + sim.held(), "depth {depth}");
    }
}

#[test]
fn budget_zero_fills_the_whole_window_when_the_next_layer_is_converted_ahead() {
    // The next layer is converted ahead after it was filled two layers ahead: it must count
    // once in the window, so the layer after it is filled ahead too.
    let sizes = vec![
        LayerBytes {
            prepared: MIB,
            converted: 2 * MIB,
            payload: MIB,
        };
        6
    ];
    let depth = 2;
    let mut sim = Simulation::new(&sizes, 0, depth);
    for pass in 0..3 {
        for i in 0..6 {
            sim.use_layer(i);
            if pass > 0 {
                let ahead: Vec<usize> = sim.resident().into_iter().filter(|&r| r != i).collect();
                assert_eq!(
                    ahead.len(),
                    depth as usize,
                    "pass {pass}, layer {i}: {ahead:?}"
                );
            }
        }
    }
}

#[test]
fn a_layer_larger_than_the_budget_overcommits_alone() {
    let sizes = [
        LayerBytes {
            prepared: 3 * MIB,
            converted: MIB,
            payload: 3 * MIB,
        },
        LayerBytes {
            prepared: MIB,
            converted: 0,
            payload: MIB,
        },
    ];
    let mut sim = Simulation::new(&sizes, 2 * MIB, 0);
    sim.use_layer(1);
    sim.use_layer(0);
    assert!(sim.overcommitted());
    // Released over the cap, it leaves at once.
    assert_eq!(sim.held(), 0);
    assert!(sim.resident().is_empty());
}

/// Bytes an offline policy with the whole future moves over `trace` (Belady's rule: evict the
/// layer whose next use is furthest, or never) with `capacity` bytes, when the layer in use and
/// the next `ahead` ones (the prefetch window) must be resident. The bound the rule is held to.
fn belady(trace: &[usize], sizes: &[u64], capacity: u64, ahead: usize) -> u64 {
    let mut next_use = vec![usize::MAX; trace.len()];
    let mut seen: HashMap<usize, usize> = HashMap::new();
    for t in (0..trace.len()).rev() {
        next_use[t] = seen.get(&trace[t]).copied().unwrap_or(usize::MAX);
        seen.insert(trace[t], t);
    }
    let mut upcoming: HashMap<usize, usize> = HashMap::new();
    let mut resident: Vec<usize> = Vec::new();
    let (mut held, mut moved) = (0, 0);
    for t in 0..trace.len() {
        upcoming.insert(trace[t], next_use[t]);
        let window = &trace[t..trace.len().min(t + ahead + 1)];
        for &layer in window {
            if resident.contains(&layer) {
                continue;
            }
            moved += sizes[layer];
            while held + sizes[layer] > capacity {
                let Some(out) = resident
                    .iter()
                    .copied()
                    .filter(|r| !window.contains(r))
                    .max_by_key(|r| upcoming[r])
                else {
                    break;
                };
                held -= sizes[out];
                resident.retain(|&r| r != out);
            }
            resident.push(layer);
            held += sizes[layer];
        }
    }
    moved
}

/// Bytes the real rule moves per repetition of `pass` after the first, replayed `times` times
/// through `Simulation`, and the same for the offline optimum with the same window.
fn rule_and_optimum(pass: &[usize], sizes: &[u64], budget: u64, depth: u32) -> (u64, u64) {
    let times = 3;
    let bytes: Vec<LayerBytes> = sizes
        .iter()
        .map(|&s| LayerBytes {
            prepared: s,
            converted: 0,
            payload: s,
        })
        .collect();
    let mut sim = Simulation::new(&bytes, budget, depth);
    pass.iter().for_each(|&i| sim.use_layer(i));
    let first = sim.moved();
    for _ in 1..times {
        for &i in pass {
            sim.use_layer(i);
            assert!(sim.held() <= budget, "depth {depth}: budget passed");
        }
    }
    let moved = (sim.moved() - first) / (times as u64 - 1);
    let whole: Vec<usize> = pass
        .iter()
        .copied()
        .cycle()
        .take(times * pass.len())
        .collect();
    let ahead = depth as usize;
    let optimum = (belady(&whole, sizes, budget, ahead) - belady(pass, sizes, budget, ahead))
        / (times as u64 - 1);
    (moved, optimum)
}

#[test]
fn a_repeating_pass_is_optimal_with_every_window() {
    // 10 layers of 1 MiB under 4 MiB, and 48 under 24 MiB: with no window the rule moves the
    // offline optimum exactly (LRU would move every layer); with a window, within one layer.
    for (layers, budget) in [(10usize, 4 * MIB), (48, 24 * MIB)] {
        let pass: Vec<usize> = (0..layers).collect();
        let sizes = vec![MIB; layers];
        for depth in [0u32, 1, 2] {
            let (moved, optimum) = rule_and_optimum(&pass, &sizes, budget, depth);
            if depth == 0 {
                assert_eq!(moved, optimum, "{layers} layers");
            }
            assert!(
                moved <= optimum + MIB,
                "{layers} layers, depth {depth}: {moved} bytes per pass, optimum {optimum}"
            );
        }
    }
}

#[test]
fn a_diffusion_pipeline_moves_within_five_percent_of_the_optimum() {
    // A text encoder once (4 layers), a DiT for 20 steps (12 blocks of three sizes), a VAE once
    // (3 layers), repeated per prompt, under 2/5 of the model.
    let mut rows = vec![96u64; 4];
    rows.extend((0..12).map(|i| 48 + 16 * (i % 3)));
    rows.extend([128u64; 3]);
    let sizes: Vec<u64> = rows.iter().map(|r| r * 64 * 4).collect();
    let budget = sizes.iter().sum::<u64>() * 2 / 5;
    let mut prompt: Vec<usize> = (0..4).collect();
    for _ in 0..20 {
        prompt.extend(4..16);
    }
    prompt.extend(16..19);
    for depth in [0u32, 1, 2] {
        let (moved, optimum) = rule_and_optimum(&prompt, &sizes, budget, depth);
        assert!(
            moved as f64 <= optimum as f64 * 1.05,
            "depth {depth}: {moved} bytes per prompt, offline optimum {optimum}"
        );
    }
}

/// A context reduced to what `make_room` reads: resident layers of 1 MiB, and who holds what.
struct Fake {
    budget: Budget,
    schedule: Schedule,
    layers: Vec<Candidate>,
    engine_filling: bool,
    holdings: Holdings,
}

impl Residents for Fake {
    fn budget(&self) -> &Budget {
        &self.budget
    }
    fn schedule(&self) -> &Schedule {
        &self.schedule
    }
    fn candidates(&self) -> impl Iterator<Item = Candidate> + '_ {
        self.layers.iter().copied()
    }
    fn evict(&mut self, key: Key) {
        let layer = self.layers.iter_mut().find(|c| c.key == key).unwrap();
        assert!(layer.resident && !layer.pinned, "evicted {key:?}");
        layer.resident = false;
        self.budget.refund(MIB);
    }
    fn engine_filling(&self) -> bool {
        self.engine_filling
    }
    fn holdings(&self, _: Key) -> Holdings {
        self.holdings
    }
}

/// Four layers under a 4 MiB cap, all resident, those in `pinned` in use.
fn full(pinned: &[usize]) -> Fake {
    let mut budget = Budget::new(Limit::from_abi(4 * MIB));
    budget.charge(4 * MIB);
    let mut schedule = Schedule::default();
    for _ in 0..2 {
        for i in 0..5 {
            schedule.record(key(i));
        }
    }
    Fake {
        budget,
        schedule,
        layers: (0..4)
            .map(|i| Candidate {
                pinned: pinned.contains(&i),
                ..resident(i)
            })
            .collect(),
        engine_filling: false,
        holdings: Holdings::default(),
    }
}

fn request(bytes: u64, purpose: Purpose) -> Request {
    Request {
        key: key(4),
        bytes,
        own: 0,
        purpose,
        strict: false,
    }
}

#[test]
fn make_room_evicts_waits_refuses_or_overcommits() {
    // Evicts the furthest predicted uses (at layer 4: 3, then 2) until the bytes fit.
    let mut fake = full(&[]);
    assert_eq!(
        make_room(&mut fake, request(2 * MIB, Purpose::Demand)),
        Ok(Granted::Fits)
    );
    let left: Vec<bool> = fake.layers.iter().map(|c| c.resident).collect();
    assert_eq!(left, [true, true, false, false]);
    // A prefetch for the layer at distance 2 may not evict layers 0 and 1 (needed sooner).
    let mut fake = full(&[2, 3]);
    assert_eq!(
        make_room(&mut fake, request(MIB, Purpose::Prefetch(2))),
        Err(NoRoom::Refused(Refusal::NeededSooner))
    );
    // Everything pinned: a thread holding nothing waits for the others...
    let mut fake = full(&[0, 1, 2, 3]);
    fake.holdings.others_active = true;
    assert_eq!(
        make_room(&mut fake, request(MIB, Purpose::Demand)),
        Err(NoRoom::Wait)
    );
    // ...one holding a layer itself is refused (two such threads would wait forever)...
    fake.holdings.held_by_me = 1;
    assert_eq!(
        make_room(&mut fake, request(MIB, Purpose::Demand)),
        Err(NoRoom::Refused(Refusal::Held { held_by_me: 1 }))
    );
    // ...unless the copy engine is filling: its fill ends without waiting on anyone.
    fake.engine_filling = true;
    assert_eq!(
        make_room(&mut fake, request(MIB, Purpose::Demand)),
        Err(NoRoom::Wait)
    );
    // A layer larger than the budget overcommits alone, once everything else went; strict
    // budgets and prefetches refuse it at once.
    let mut fake = full(&[]);
    assert_eq!(
        make_room(&mut fake, request(5 * MIB, Purpose::Demand)),
        Ok(Granted::Overcommit { footprint: 5 * MIB })
    );
    assert_eq!(fake.budget.in_use(), 0);
    let strict = Request {
        strict: true,
        ..request(5 * MIB, Purpose::Demand)
    };
    let too_large = Err(NoRoom::Refused(Refusal::TooLarge { footprint: 5 * MIB }));
    assert_eq!(make_room(&mut full(&[]), strict), too_large);
    assert_eq!(
        make_room(&mut full(&[]), request(5 * MIB, Purpose::Prefetch(1))),
        too_large
    );
}
