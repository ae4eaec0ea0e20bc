use super::Schedule;
use crate::registry::Key;

fn key(index: u32) -> Key {
    Key {
        index,
        generation: 1,
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
