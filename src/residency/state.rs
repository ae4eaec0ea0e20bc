//! A layer's place on the compute device, as a type: absent, being filled, resident between
//! uses, or in use. The copies and the stage are private; each transition is a method that keeps
//! them consistent: a layer in use always has the copy its views point into, a layer being filled
//! has no copy anyone else could free (the fill carries it, `begin_fill`, and puts back what it
//! made when it ends), and only a layer neither in use nor being filled can be evicted.
//!
//! The copies sit beside the stage rather than inside its variants, so that the transitions an
//! acquire and a release make on every layer of a pass (`take_for_use`, `end_use`) change a tag
//! and move no copy.

use super::Candidate;
use crate::backend::DeviceMemory;
use crate::registry::{DeviceCopy, HostCopy, Key};
use crate::trace::Stamp;
use std::sync::Arc;
use std::thread::ThreadId;

/// A layer's copies on the compute device, and where it stands.
#[derive(Default)]
pub(crate) struct OnDevice {
    /// The preparing-tier copy: resident between uses, or beside (or as) the form in use.
    prepared: Option<DeviceCopy>,
    /// The computation form, when it differs from the preparing one: converted ahead by the copy
    /// engine for the next acquire, or made for the use in progress (freed at its end).
    converted: Option<DeviceCopy>,
    stage: Stage,
}

enum Stage {
    /// Neither in use nor being filled: resident when it holds a copy, absent when not.
    Idle {
        /// The copy engine filled it ahead and no acquire has taken it yet.
        prefetched: bool,
    },
    /// A thread moves its bytes without the context lock; its copies travel with the fill
    /// (`Taken`). Others wait for it, nothing evicts it.
    Filling,
    /// Acquired and not released yet.
    InUse(InUse),
}

impl Default for Stage {
    fn default() -> Stage {
        Stage::Idle { prefetched: false }
    }
}

pub(crate) struct InUse {
    /// A host copy handed out in place (the device reads host memory), instead of a device copy.
    host: Option<Arc<HostCopy>>,
    /// The threads that acquired it and have not released it yet, one entry per acquire.
    pub holders: Holders,
    /// When the first of these acquires returned, for the trace's compute span.
    since: Stamp,
}

/// The threads holding a layer in use, one entry per acquire. The first is kept inline: an
/// acquire that starts a use allocates nothing (this runs on every acquire of a pass).
pub(crate) struct Holders {
    first: ThreadId,
    more: Vec<ThreadId>,
}

impl Holders {
    fn new(me: ThreadId) -> Holders {
        Holders {
            first: me,
            more: Vec::new(),
        }
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = ThreadId> + '_ {
        std::iter::once(self.first).chain(self.more.iter().copied())
    }

    /// Removes one entry of `me` (or, when it holds none, the first); false when none is left.
    fn remove(&mut self, me: ThreadId) -> bool {
        match self.more.iter().position(|&h| h == me) {
            Some(at) if self.first != me => {
                self.more.swap_remove(at);
            }
            _ => match self.more.pop() {
                Some(next) => self.first = next,
                None => return false,
            },
        }
        true
    }
}

/// What an acquired layer's views point into.
pub(crate) enum Computation<'a> {
    /// A host copy read in place.
    Host(&'a HostCopy),
    /// The converted copy, or the prepared one when it is also the computation form.
    Device(&'a DeviceCopy),
}

impl Computation<'_> {
    /// The device memory the views point into, if they point into device memory.
    pub(crate) fn memory(&self) -> Option<&DeviceMemory> {
        match self {
            Computation::Host(_) => None,
            Computation::Device(copy) => Some(&copy.memory),
        }
    }
}

/// What a fill took along when it began.
pub(crate) struct Taken {
    /// The resident copy, which the fill keeps and converts from instead of filling it again.
    pub prepared: Option<DeviceCopy>,
    /// The layer had been filled ahead by the copy engine.
    pub prefetched: bool,
}

/// The last use of a layer ended.
pub(crate) struct Ended {
    pub since: Stamp,
    /// Bytes of the converted copy, freed, when there was one.
    pub converted: Option<u64>,
    /// Bytes of the resident copy, freed when it may not stay.
    pub prepared: Option<u64>,
}

fn bytes(copy: &Option<DeviceCopy>) -> u64 {
    copy.as_ref().map_or(0, DeviceCopy::bytes)
}

impl OnDevice {
    /// Bytes of the copies held between uses (resident and converted ahead): what eviction frees.
    pub(crate) fn resident_bytes(&self) -> u64 {
        match self.stage {
            Stage::Idle { .. } => bytes(&self.prepared) + bytes(&self.converted),
            _ => 0,
        }
    }

    /// The resident (preparing-tier) copy, when there is one outside a use.
    pub(crate) fn prepared(&self) -> Option<&DeviceCopy> {
        match self.stage {
            Stage::Idle { .. } => self.prepared.as_ref(),
            _ => None,
        }
    }

    /// Whether the computation form is ready beside the resident copy.
    pub(crate) fn converted_ahead(&self) -> bool {
        matches!(self.stage, Stage::Idle { .. }) && self.converted.is_some()
    }

    pub(crate) fn in_use(&self) -> Option<&InUse> {
        match &self.stage {
            Stage::InUse(in_use) => Some(in_use),
            _ => None,
        }
    }

    /// What the views of a layer in use point into; `None` when it is not in use.
    pub(crate) fn computation(&self) -> Option<Computation<'_>> {
        let Stage::InUse(in_use) = &self.stage else {
            return None;
        };
        match (&in_use.host, &self.converted, &self.prepared) {
            (Some(host), _, _) => Some(Computation::Host(host)),
            (None, Some(copy), _) | (None, None, Some(copy)) => Some(Computation::Device(copy)),
            (None, None, None) => None,
        }
    }

    pub(crate) fn is_filling(&self) -> bool {
        matches!(self.stage, Stage::Filling)
    }

    /// The layer as the eviction rule sees it. `busy`: a host copy is being made for it.
    pub(crate) fn candidate(&self, key: Key, busy: bool) -> Candidate {
        let (idle, prefetched) = match self.stage {
            Stage::Idle { prefetched } => (true, prefetched),
            _ => (false, false),
        };
        Candidate {
            key,
            resident: idle && (self.prepared.is_some() || self.converted.is_some()),
            pinned: busy || !idle,
            prefetched,
        }
    }

    /// Frees the copies held between uses; returns their bytes for the budget. A layer in use
    /// or being filled keeps its copies.
    pub(crate) fn evict(&mut self) -> u64 {
        if !matches!(self.stage, Stage::Idle { .. }) {
            return 0;
        }
        let freed = self.resident_bytes();
        *self = OnDevice::default();
        freed
    }

    /// A fill begins: the layer is marked filling, and its resident copy (if any) goes with the
    /// fill. Only a layer neither in use nor being filled, without its computation form made
    /// ahead, is filled.
    pub(crate) fn begin_fill(&mut self) -> Taken {
        let Stage::Idle { prefetched } = self.stage else {
            unreachable!("a layer in use or being filled is not filled again")
        };
        debug_assert!(
            self.converted.is_none(),
            "a layer converted ahead needs no fill"
        );
        self.stage = Stage::Filling;
        Taken {
            prepared: self.prepared.take(),
            prefetched,
        }
    }

    /// The fill ended (its guard clears the mark, whatever the outcome): absent until the filler
    /// puts back what it made, under the same lock.
    pub(crate) fn end_fill(&mut self) {
        if self.is_filling() {
            self.stage = Stage::default();
        }
    }

    /// Puts back a resident copy a fill took along and did not use (`prefetched` as `Taken` said).
    pub(crate) fn restore(&mut self, prepared: Option<DeviceCopy>, prefetched: bool) {
        *self = OnDevice {
            prepared,
            converted: None,
            stage: Stage::Idle { prefetched },
        };
    }

    /// The copy engine's fill ended: the layer is resident, filled ahead.
    pub(crate) fn finish_fill_ahead(&mut self, prepared: DeviceCopy, ready: Option<DeviceCopy>) {
        *self = OnDevice {
            prepared: Some(prepared),
            converted: ready,
            stage: Stage::Idle { prefetched: true },
        };
    }

    /// An acquire's fill ended: the layer is in use by `me`, its views in `converted` when the
    /// forms differ, else in `prepared`.
    pub(crate) fn finish_fill_for_use(
        &mut self,
        prepared: DeviceCopy,
        converted: Option<DeviceCopy>,
        me: ThreadId,
    ) {
        *self = OnDevice {
            prepared: Some(prepared),
            converted,
            stage: Stage::InUse(InUse {
                host: None,
                holders: Holders::new(me),
                since: Stamp::now(),
            }),
        };
    }

    /// An acquire takes the resident copy (and the form converted ahead) without moving bytes;
    /// `needs_conversion`: the computation form differs from the preparing one. Returns whether
    /// the copy engine had filled it ahead, or `None` (unchanged) when it is not ready for use.
    pub(crate) fn take_for_use(&mut self, needs_conversion: bool, me: ThreadId) -> Option<bool> {
        let Stage::Idle { prefetched } = self.stage else {
            return None;
        };
        if self.prepared.is_none() || (needs_conversion && self.converted.is_none()) {
            return None;
        }
        self.stage = Stage::InUse(InUse {
            host: None,
            holders: Holders::new(me),
            since: Stamp::now(),
        });
        Some(prefetched)
    }

    /// Hands a host copy out in place: in use, any resident copy kept aside.
    pub(crate) fn use_in_place(&mut self, copy: Arc<HostCopy>, me: ThreadId) {
        self.stage = Stage::InUse(InUse {
            host: Some(copy),
            holders: Holders::new(me),
            since: Stamp::now(),
        });
    }

    /// Another acquire of a layer in use; false when it is not in use.
    pub(crate) fn join(&mut self, me: ThreadId) -> bool {
        match &mut self.stage {
            Stage::InUse(in_use) => {
                in_use.holders.more.push(me);
                true
            }
            _ => false,
        }
    }

    /// Ends one use by `me`. At the last, a converted copy made for the use is freed, and the
    /// resident one too unless `keep`; the layer is then resident or absent.
    pub(crate) fn end_use(&mut self, me: ThreadId, keep: bool) -> Option<Ended> {
        let Stage::InUse(in_use) = &mut self.stage else {
            return None;
        };
        if in_use.holders.remove(me) {
            return None;
        }
        let since = in_use.since;
        let in_place = in_use.host.is_some();
        self.stage = Stage::default();
        // Handed out in place, the layer used no device copy: a converted one stays as it was.
        let converted = match in_place {
            true => None,
            false => self.converted.take().map(|copy| copy.bytes()),
        };
        let prepared = match keep {
            true => None,
            false => self.prepared.take().map(|copy| copy.bytes()),
        };
        Some(Ended {
            since,
            converted,
            prepared,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::simulate::key;
    use super::*;

    fn copy(len: usize) -> DeviceCopy {
        DeviceCopy {
            memory: DeviceMemory {
                addr: 0x1000,
                len,
                _owner: Box::new(()),
            },
            slots: Vec::new(),
        }
    }

    fn device_bytes(computation: Option<Computation<'_>>) -> Option<u64> {
        match computation? {
            Computation::Device(copy) => Some(copy.bytes()),
            Computation::Host(_) => None,
        }
    }

    #[test]
    fn a_layer_filled_ahead_is_resident_until_taken_and_stays_resident_after_a_kept_use() {
        let (me, other) = (
            std::thread::current().id(),
            std::thread::spawn(|| ()).thread().id(),
        );
        let mut layer = OnDevice::default();
        assert!(!layer.candidate(key(7), false).resident);
        let taken = layer.begin_fill();
        assert!(taken.prepared.is_none() && !taken.prefetched && layer.is_filling());
        // Being filled: pinned, nothing to evict, no views.
        assert!(layer.candidate(key(7), false).pinned);
        assert_eq!(layer.evict(), 0);
        assert!(layer.computation().is_none() && layer.prepared().is_none());
        layer.finish_fill_ahead(copy(100), None);
        let candidate = layer.candidate(key(7), false);
        assert!(candidate.resident && candidate.prefetched && !candidate.pinned);
        assert!(
            layer.candidate(key(7), true).pinned,
            "a host copy being made pins it"
        );
        assert_eq!(layer.resident_bytes(), 100);

        assert_eq!(layer.take_for_use(false, me), Some(true), "filled ahead");
        assert_eq!(device_bytes(layer.computation()), Some(100));
        assert_eq!(
            (layer.evict(), layer.resident_bytes()),
            (0, 0),
            "in use: kept"
        );
        assert!(layer.join(other));
        assert!(
            layer.end_use(me, true).is_none(),
            "the other holder remains"
        );
        let ended = layer.end_use(other, true).expect("the last use ended");
        assert_eq!((ended.converted, ended.prepared), (None, None));
        assert_eq!(layer.resident_bytes(), 100);
        assert_eq!(
            layer.take_for_use(false, me),
            Some(false),
            "taken before: not ahead"
        );
        assert!(layer.end_use(me, true).is_some());
        assert_eq!(layer.evict(), 100);
        assert_eq!(
            (layer.resident_bytes(), layer.prepared().is_none()),
            (0, true)
        );
    }

    #[test]
    fn a_use_that_needs_the_computation_form_frees_it_and_the_resident_copy_unless_kept() {
        let me = std::thread::current().id();
        let mut layer = OnDevice::default();
        layer.restore(Some(copy(100)), false);
        // Resident, but the computation form is not ready: not taken, unchanged.
        assert_eq!(layer.take_for_use(true, me), None);
        assert_eq!(layer.resident_bytes(), 100);
        let taken = layer.begin_fill();
        assert_eq!(taken.prepared.as_ref().map(DeviceCopy::bytes), Some(100));
        layer.finish_fill_for_use(taken.prepared.unwrap(), Some(copy(50)), me);
        assert_eq!(
            device_bytes(layer.computation()),
            Some(50),
            "views in the converted copy"
        );
        let ended = layer.end_use(me, false).expect("the only use ended");
        assert_eq!((ended.converted, ended.prepared), (Some(50), Some(100)));
        assert_eq!(
            (layer.resident_bytes(), layer.in_use().is_none()),
            (0, true)
        );
        // Converted ahead, then taken and kept: the converted copy made for the use goes.
        layer.finish_fill_ahead(copy(100), Some(copy(50)));
        assert!(layer.converted_ahead());
        assert_eq!(layer.resident_bytes(), 150);
        assert_eq!(layer.take_for_use(true, me), Some(true));
        let ended = layer.end_use(me, true).expect("ended");
        assert_eq!((ended.converted, ended.prepared), (Some(50), None));
        assert_eq!(layer.resident_bytes(), 100);
    }

    #[test]
    fn a_failed_fill_leaves_the_layer_absent_and_a_restored_copy_keeps_its_mark() {
        let mut layer = OnDevice::default();
        layer.finish_fill_ahead(copy(64), None);
        let taken = layer.begin_fill();
        assert!(taken.prefetched && layer.resident_bytes() == 0);
        layer.end_fill();
        assert!(!layer.is_filling() && layer.prepared().is_none());
        layer.restore(taken.prepared, taken.prefetched);
        assert_eq!(layer.resident_bytes(), 64);
        assert!(layer.candidate(key(7), false).prefetched);
        // end_fill on a layer no longer filling changes nothing.
        layer.end_fill();
        assert_eq!(layer.resident_bytes(), 64);
    }

    #[test]
    fn one_thread_acquiring_twice_holds_two_uses() {
        let me = std::thread::current().id();
        let mut layer = OnDevice::default();
        layer.restore(Some(copy(8)), false);
        assert_eq!(layer.take_for_use(false, me), Some(false));
        assert!(layer.join(me));
        assert_eq!(layer.in_use().map(|u| u.holders.iter().count()), Some(2));
        assert!(layer.end_use(me, true).is_none());
        assert!(layer.end_use(me, true).is_some());
        assert!(layer.end_use(me, true).is_none(), "not in use any more");
        assert!(!layer.join(me));
    }
}
