//! A layer's place on the compute device, as a type: absent, being filled, resident between
//! uses, or in use. Each transition is a method that takes the copies out of one state and puts
//! them into the next, so a copy cannot be in two places, a layer in use always has the copy its
//! views point into, and a layer being filled has no copy anyone else could free: the fill
//! carries it (`begin_fill`) and installs it when it ends.

use super::Candidate;
use crate::registry::{DeviceCopy, HostCopy, Key};
use crate::trace::Stamp;
use std::sync::Arc;
use std::thread::ThreadId;

/// Where a layer stands on the compute device.
#[derive(Default)]
pub(crate) enum OnDevice {
    /// No copy on the device.
    #[default]
    Absent,
    /// A thread moves its bytes without the context lock; the copy it had travels with the fill
    /// (`Taken`), and comes back when the fill ends. Others wait for it, nothing evicts it.
    Filling,
    /// Held between uses: the preparing-tier copy, and the computation form the copy engine
    /// converted ahead for the next acquire (when the forms differ).
    Resident {
        prepared: DeviceCopy,
        ready: Option<DeviceCopy>,
        prefetched: bool,
    },
    /// Acquired and not released yet.
    InUse(InUse),
}

pub(crate) struct InUse {
    pub computation: Computation,
    /// The threads that acquired it and have not released it yet, one entry per acquire.
    pub holders: Vec<ThreadId>,
    /// When the first of these acquires returned, for the trace's compute span.
    pub since: Stamp,
}

/// What an acquired layer's views point into.
pub(crate) enum Computation {
    /// A host copy handed out in place (the device reads host memory); a resident copy made
    /// earlier stays aside.
    Host {
        copy: Arc<HostCopy>,
        resident: Option<DeviceCopy>,
    },
    /// The preparing-tier copy, which is also the computation form.
    Prepared(DeviceCopy),
    /// A converted copy beside the resident one, freed at the last release.
    Converted {
        prepared: DeviceCopy,
        converted: DeviceCopy,
    },
}

impl Computation {
    /// The device memory the views point into, if they point into device memory.
    pub(crate) fn memory(&self) -> Option<&crate::backend::DeviceMemory> {
        match self {
            Computation::Host { .. } => None,
            Computation::Prepared(copy)
            | Computation::Converted {
                converted: copy, ..
            } => Some(&copy.memory),
        }
    }

    fn into_prepared(self) -> (Option<DeviceCopy>, u64) {
        match self {
            Computation::Host { resident, .. } => (resident, 0),
            Computation::Prepared(copy) => (Some(copy), 0),
            Computation::Converted {
                prepared,
                converted,
            } => (Some(prepared), converted.bytes()),
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
    /// Device bytes freed: the converted copy, and the resident one when it may not stay.
    pub freed: u64,
}

impl OnDevice {
    /// Bytes of the copies held between uses (resident and converted ahead): what eviction frees.
    pub(crate) fn resident_bytes(&self) -> u64 {
        match self {
            OnDevice::Resident {
                prepared, ready, ..
            } => prepared.bytes() + ready.as_ref().map_or(0, DeviceCopy::bytes),
            _ => 0,
        }
    }

    /// The resident (preparing-tier) copy, when there is one outside a use.
    pub(crate) fn prepared(&self) -> Option<&DeviceCopy> {
        match self {
            OnDevice::Resident { prepared, .. } => Some(prepared),
            _ => None,
        }
    }

    /// Whether the computation form is ready beside the resident copy.
    pub(crate) fn converted_ahead(&self) -> bool {
        matches!(self, OnDevice::Resident { ready: Some(_), .. })
    }

    pub(crate) fn in_use(&self) -> Option<&InUse> {
        match self {
            OnDevice::InUse(in_use) => Some(in_use),
            _ => None,
        }
    }

    pub(crate) fn is_filling(&self) -> bool {
        matches!(self, OnDevice::Filling)
    }

    /// The layer as the eviction rule sees it. `busy`: a host copy is being made for it.
    pub(crate) fn candidate(&self, key: Key, busy: bool) -> Candidate {
        Candidate {
            key,
            resident: matches!(self, OnDevice::Resident { .. }),
            pinned: busy || matches!(self, OnDevice::Filling | OnDevice::InUse(_)),
            prefetched: matches!(
                self,
                OnDevice::Resident {
                    prefetched: true,
                    ..
                }
            ),
        }
    }

    /// Frees the copies held between uses; returns their bytes for the budget. A layer in use
    /// or being filled keeps its copies.
    pub(crate) fn evict(&mut self) -> u64 {
        if !matches!(self, OnDevice::Resident { .. }) {
            return 0;
        }
        let freed = self.resident_bytes();
        *self = OnDevice::Absent;
        freed
    }

    /// A fill begins: the layer is marked filling, and its resident copy (if any) goes with the
    /// fill. Only a layer absent or resident without its computation form ahead is filled.
    pub(crate) fn begin_fill(&mut self) -> Taken {
        match std::mem::replace(self, OnDevice::Filling) {
            OnDevice::Resident {
                prepared,
                ready,
                prefetched,
            } => {
                debug_assert!(ready.is_none(), "a layer converted ahead needs no fill");
                Taken {
                    prepared: Some(prepared),
                    prefetched,
                }
            }
            OnDevice::Absent => Taken {
                prepared: None,
                prefetched: false,
            },
            OnDevice::Filling | OnDevice::InUse(_) => {
                unreachable!("a layer in use or being filled is not filled again")
            }
        }
    }

    /// The fill ended (its guard clears the mark, whatever the outcome): absent until the filler
    /// puts back what it made, under the same lock.
    pub(crate) fn end_fill(&mut self) {
        if self.is_filling() {
            *self = OnDevice::Absent;
        }
    }

    /// Puts back a resident copy a fill took along and did not use (`prefetched` as `Taken` said).
    pub(crate) fn restore(&mut self, prepared: Option<DeviceCopy>, prefetched: bool) {
        *self = match prepared {
            Some(prepared) => OnDevice::Resident {
                prepared,
                ready: None,
                prefetched,
            },
            None => OnDevice::Absent,
        };
    }

    /// The copy engine's fill ended: the layer is resident, filled ahead.
    pub(crate) fn finish_fill_ahead(&mut self, prepared: DeviceCopy, ready: Option<DeviceCopy>) {
        *self = OnDevice::Resident {
            prepared,
            ready,
            prefetched: true,
        };
    }

    /// An acquire's fill ended: the layer is in use by `me`.
    pub(crate) fn finish_fill_for_use(&mut self, computation: Computation, me: ThreadId) {
        *self = OnDevice::InUse(InUse {
            computation,
            holders: vec![me],
            since: Stamp::now(),
        });
    }

    /// An acquire takes the resident copy (and the form converted ahead) without moving bytes;
    /// `needs_conversion`: the computation form differs from the preparing one. Returns whether
    /// the copy engine had filled it ahead, or `None` (unchanged) when it is not ready for use.
    pub(crate) fn take_for_use(&mut self, needs_conversion: bool, me: ThreadId) -> Option<bool> {
        match std::mem::take(self) {
            OnDevice::Resident {
                prepared,
                ready,
                prefetched,
            } if ready.is_some() || !needs_conversion => {
                let computation = match ready {
                    Some(converted) => Computation::Converted {
                        prepared,
                        converted,
                    },
                    None => Computation::Prepared(prepared),
                };
                self.finish_fill_for_use(computation, me);
                Some(prefetched)
            }
            other => {
                *self = other;
                None
            }
        }
    }

    /// Hands a host copy out in place: in use, any resident copy kept aside.
    pub(crate) fn use_in_place(&mut self, copy: Arc<HostCopy>, me: ThreadId) {
        let resident = match std::mem::take(self) {
            OnDevice::Resident { prepared, .. } => Some(prepared),
            _ => None,
        };
        self.finish_fill_for_use(Computation::Host { copy, resident }, me);
    }

    /// Another acquire of a layer in use; false when it is not in use.
    pub(crate) fn join(&mut self, me: ThreadId) -> bool {
        match self {
            OnDevice::InUse(in_use) => {
                in_use.holders.push(me);
                true
            }
            _ => false,
        }
    }

    /// Ends one use by `me`. At the last, the converted copy is freed, and the resident one
    /// too unless `keep`; the layer is then resident or absent.
    pub(crate) fn end_use(&mut self, me: ThreadId, keep: bool) -> Option<Ended> {
        let mut in_use = match std::mem::take(self) {
            OnDevice::InUse(in_use) => in_use,
            other => {
                *self = other;
                return None;
            }
        };
        let holder = in_use.holders.iter().position(|&h| h == me).unwrap_or(0);
        in_use.holders.swap_remove(holder);
        if !in_use.holders.is_empty() {
            *self = OnDevice::InUse(in_use);
            return None;
        }
        let (prepared, mut freed) = in_use.computation.into_prepared();
        match prepared {
            Some(prepared) if keep => {
                *self = OnDevice::Resident {
                    prepared,
                    ready: None,
                    prefetched: false,
                }
            }
            Some(prepared) => freed += prepared.bytes(),
            None => {}
        }
        Some(Ended {
            since: in_use.since,
            freed,
        })
    }
}
