use super::{victim, Candidate, LayerBytes, Protect, Simulation};
use crate::registry::Key;
use crate::schedule::Schedule;

const MIB: u64 = 1 << 20;

fn key(index: u32) -> Key {
    Key {
        index,
        generation: 1,
    }
}

fn resident(index: u32) -> Candidate {
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
fn a_repeating_pass_moves_the_offline_optimum() {
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
