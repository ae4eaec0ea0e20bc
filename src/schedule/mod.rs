//! Which resident layer to evict: the one whose next use is predicted furthest away (Belady's
//! rule), predicted from the sequence of acquires alone. A layer's next use is expected one
//! interval after its last, the interval being the distance between its last two uses: in a
//! repeating pass every layer's interval is the pass length, so the layer used most recently is
//! the one needed last, and keeping the others moves the fewest bytes. A layer used only once so
//! far (a one-off component, or the first pass) has no predicted next use and goes first.

/// When a layer was used, in the context's logical time (one tick per acquire).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UseHistory {
    last: u64,
    previous: Option<u64>,
}

impl UseHistory {
    pub fn record(&mut self, now: u64) {
        if self.last != 0 {
            self.previous = Some(self.last);
        }
        self.last = now;
    }

    pub fn predicted_next(&self) -> Option<u64> {
        self.previous
            .map(|previous| self.last + (self.last - previous))
    }

    /// Larger means evict sooner: no predicted use first, then the furthest predicted use; ties
    /// (a first pass) go to the most recently used, as in a repeating pass it is needed last.
    pub fn eviction_rank(&self) -> (u64, u64) {
        (self.predicted_next().unwrap_or(u64::MAX), self.last)
    }
}

#[cfg(test)]
mod tests {
    use super::UseHistory;

    /// Replays a trace against a cache of `capacity` layers with this policy; returns the misses.
    fn misses(trace: &[usize], capacity: usize, layers: usize) -> usize {
        let mut history = vec![UseHistory::default(); layers];
        let mut resident: Vec<usize> = Vec::new();
        let mut misses = 0;
        for (tick, &layer) in trace.iter().enumerate() {
            history[layer].record(tick as u64 + 1);
            if resident.contains(&layer) {
                continue;
            }
            misses += 1;
            if resident.len() == capacity {
                let victim = (0..resident.len())
                    .max_by_key(|&i| history[resident[i]].eviction_rank())
                    .unwrap();
                resident.swap_remove(victim);
            }
            resident.push(layer);
        }
        misses
    }

    #[test]
    fn a_repeating_pass_misses_only_what_cannot_stay() {
        // 10 layers, room for 4 (one of them the layer in use). The bound for a repeating pass is
        // layers - (capacity - 1) misses per pass, within one layer; LRU would miss all 10.
        let (layers, capacity, passes) = (10, 4, 6);
        let trace: Vec<usize> = (0..passes).flat_map(|_| 0..layers).collect();
        let mut previous = 0;
        for pass in 1..=passes {
            let total = misses(&trace[..pass * layers], capacity, layers);
            let this_pass = total - previous;
            previous = total;
            if pass == 1 {
                assert_eq!(this_pass, layers);
            } else {
                let bound = layers - (capacity - 1);
                assert!(
                    this_pass.abs_diff(bound) <= 1,
                    "pass {pass}: {this_pass} misses, bound {bound}"
                );
            }
        }
    }

    #[test]
    fn one_off_layers_go_before_repeating_ones() {
        let mut once = UseHistory::default();
        once.record(1);
        let mut repeating = UseHistory::default();
        repeating.record(2);
        repeating.record(12);
        assert!(once.eviction_rank() > repeating.eviction_rank());
        assert_eq!(repeating.predicted_next(), Some(22));
    }
}
