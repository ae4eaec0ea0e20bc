use super::Schedule;
use crate::registry::Key;

fn key(index: u32) -> Key {
    Key {
        index,
        generation: 1,
    }
}

/// Replays `trace` against a cache of `capacity` equal layers evicting by the schedule's rank;
/// returns the misses per pass of `pass_len` acquires.
fn misses_per_pass(trace: &[u32], capacity: usize, pass_len: usize) -> Vec<usize> {
    let mut schedule = Schedule::default();
    let mut resident: Vec<Key> = Vec::new();
    let mut misses = vec![0; trace.len().div_ceil(pass_len)];
    for (tick, &layer) in trace.iter().enumerate() {
        let layer = key(layer);
        schedule.record(layer);
        if resident.contains(&layer) {
            continue;
        }
        misses[tick / pass_len] += 1;
        if resident.len() == capacity {
            let distances = schedule.distances();
            let victim = (0..resident.len())
                .filter(|&i| resident[i] != layer)
                .max_by_key(|&i| schedule.eviction_rank(resident[i], &distances))
                .unwrap();
            resident.swap_remove(victim);
        }
        resident.push(layer);
    }
    misses
}

#[test]
fn a_repeating_pass_misses_only_what_cannot_stay() {
    // 10 layers, room for 4 (one of them the layer in use): the bound for a repeating pass is
    // layers - (capacity - 1) misses per pass, within one layer; LRU would miss all 10.
    let (layers, capacity, passes) = (10u32, 4, 6);
    let trace: Vec<u32> = (0..passes).flat_map(|_| 0..layers).collect();
    let misses = misses_per_pass(&trace, capacity, layers as usize);
    assert_eq!(misses[0], layers as usize);
    let bound = layers as usize - (capacity - 1);
    for (pass, &m) in misses.iter().enumerate().skip(1) {
        assert!(
            m.abs_diff(bound) <= 1,
            "pass {pass}: {m} misses, bound {bound}"
        );
    }
}

#[test]
fn upcoming_follows_the_learned_cycle() {
    let mut schedule = Schedule::default();
    for _ in 0..2 {
        for layer in 0..5 {
            schedule.record(key(layer));
        }
    }
    assert_eq!(
        schedule.upcoming(3).collect::<Vec<_>>(),
        vec![key(0), key(1), key(2)]
    );
    // The whole cycle, never the current layer itself.
    assert_eq!(
        schedule.upcoming(10).collect::<Vec<_>>(),
        (0..4).map(key).collect::<Vec<_>>()
    );
    let distances = schedule.distances();
    assert_eq!(distances.of(key(0)), Some(1));
    assert_eq!(
        distances.of(key(3)),
        Some(4),
        "the layer used before the current one is last"
    );
    assert_eq!(
        distances.of(key(4)),
        Some(0),
        "the current layer is needed now"
    );
}

#[test]
fn a_rare_exit_does_not_unseat_the_common_successor() {
    // DiT blocks 0..4 for 20 steps, then a VAE layer 9, then a text encoder layer 8, repeated.
    let mut schedule = Schedule::default();
    for _prompt in 0..3 {
        schedule.record(key(8));
        for _step in 0..20 {
            for block in 0..4 {
                schedule.record(key(block));
            }
        }
        schedule.record(key(9));
    }
    // Mid-step at the last block: the first block comes next, not the VAE.
    schedule.record(key(8));
    for block in 0..4 {
        schedule.record(key(block));
    }
    assert_eq!(
        schedule.upcoming(2).collect::<Vec<_>>(),
        vec![key(0), key(1)]
    );
    let distances = schedule.distances();
    assert_eq!(
        distances.of(key(9)),
        None,
        "the VAE is off the predicted path"
    );
    assert_eq!(distances.of(key(8)), None);
}

#[test]
fn the_prediction_adapts_when_a_block_is_skipped_for_good() {
    let mut schedule = Schedule::default();
    for _ in 0..10 {
        for layer in 0..6 {
            schedule.record(key(layer));
        }
    }
    for pass in 0..3 {
        for layer in [0, 1, 2, 4, 5] {
            schedule.record(key(layer));
            if layer == 2 && pass == 2 {
                assert_eq!(schedule.upcoming(1).collect::<Vec<_>>(), vec![key(4)]);
            }
        }
    }
}

#[test]
fn one_off_layers_go_before_layers_on_the_path() {
    let mut schedule = Schedule::default();
    schedule.record(key(7));
    for _ in 0..2 {
        for layer in 0..3 {
            schedule.record(key(layer));
        }
    }
    let distances = schedule.distances();
    let once = schedule.eviction_rank(key(7), &distances);
    let repeating = schedule.eviction_rank(key(1), &distances);
    assert!(once > repeating);
}

#[test]
fn forgotten_layers_end_the_path() {
    let mut schedule = Schedule::default();
    for _ in 0..2 {
        for layer in 0..4 {
            schedule.record(key(layer));
        }
    }
    schedule.forget(key(1));
    assert_eq!(
        schedule.upcoming(4).collect::<Vec<_>>(),
        vec![key(0), key(1)]
    );
    // A new layer in the forgotten slot (another generation) inherits nothing.
    let reused = Key {
        index: 1,
        generation: 2,
    };
    schedule.record(reused);
    assert_eq!(schedule.upcoming(2).count(), 0);
}
