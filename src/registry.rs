//! Groups, layers and their tensors, behind generation-checked ids: a stale, made-up or foreign id
//! is an error, never a wrong object.

use crate::backend::{DeviceMemory, TensorSlot};
use crate::checkpoint::TensorInfo;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::host::CountedBuffer;
use crate::tiers::{Tier, Tiers};
use crate::trace::Stamp;
use std::collections::HashMap;
use std::ffi::CString;
use std::sync::Arc;
use std::thread::ThreadId;

/// Slots with a generation each; an id is (context tag, generation, index), so an id from another
/// context, a removed object or thin air does not resolve.
pub struct Arena<T> {
    slots: Vec<(u32, Option<T>)>,
    free: Vec<u32>,
    /// Generations wrap inside the bits an id has room for.
    generation_mask: u32,
}

/// A decoded id: which slot, and which generation of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    pub index: u32,
    pub generation: u32,
}

impl<T> Arena<T> {
    pub fn new(generation_bits: u32) -> Arena<T> {
        Arena {
            slots: Vec::new(),
            free: Vec::new(),
            generation_mask: (1 << generation_bits) - 1,
        }
    }

    pub fn insert(&mut self, value: T) -> Key {
        if let Some(index) = self.free.pop() {
            let slot = &mut self.slots[index as usize];
            slot.1 = Some(value);
            Key {
                index,
                generation: slot.0,
            }
        } else {
            self.slots.push((1, Some(value)));
            Key {
                index: self.slots.len() as u32 - 1,
                generation: 1,
            }
        }
    }

    pub fn get(&self, key: Key) -> Option<&T> {
        match self.slots.get(key.index as usize) {
            Some((generation, Some(value))) if *generation == key.generation => Some(value),
            _ => None,
        }
    }

    pub fn get_mut(&mut self, key: Key) -> Option<&mut T> {
        match self.slots.get_mut(key.index as usize) {
            Some((generation, Some(value))) if *generation == key.generation => Some(value),
            _ => None,
        }
    }

    pub fn remove(&mut self, key: Key) -> Option<T> {
        let slot = self.slots.get_mut(key.index as usize)?;
        if slot.0 != key.generation || slot.1.is_none() {
            return None;
        }
        // Generation 0 is never handed out, so wrapping cannot make an old id valid again soon.
        slot.0 = ((slot.0 + 1) & self.generation_mask).max(1);
        self.free.push(key.index);
        slot.1.take()
    }

    pub fn iter(&self) -> impl Iterator<Item = (Key, &T)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(index, (generation, value))| {
                value.as_ref().map(|v| {
                    (
                        Key {
                            index: index as u32,
                            generation: *generation,
                        },
                        v,
                    )
                })
            })
    }
}

/// Packs and unpacks the ids the C ABI hands out. Layer ids are `tag:16 | generation:16 | index:32`,
/// group ids `tag:8 | generation:8 | index:16`; 0 is never a valid id.
#[derive(Clone, Copy, Debug)]
pub struct IdCodec {
    pub tag: u16,
}

impl IdCodec {
    pub fn layer_id(&self, key: Key) -> u64 {
        ((self.tag as u64) << 48) | ((key.generation as u64) << 32) | key.index as u64
    }

    pub fn layer_key(&self, id: u64) -> Result<Key> {
        if (id >> 48) as u16 != self.tag {
            return Err(Error::handle(format!(
                "layer id {id:#x} does not belong to this context"
            )));
        }
        Ok(Key {
            index: id as u32,
            generation: ((id >> 32) & 0xFFFF) as u32,
        })
    }

    pub fn group_id(&self, key: Key) -> u32 {
        ((self.tag as u32 & 0xFF) << 24) | (key.generation << 16) | (key.index & 0xFFFF)
    }

    pub fn group_key(&self, id: u32) -> Result<Key> {
        if (id >> 24) != (self.tag as u32 & 0xFF) {
            return Err(Error::handle(format!(
                "group id {id:#x} does not belong to this context"
            )));
        }
        Ok(Key {
            index: id & 0xFFFF,
            generation: (id >> 16) & 0xFF,
        })
    }
}

/// Most dimensions a tensor may have (the size of `strata_tensor_view.shape`).
pub const STRATA_MAX_DIMS: usize = 8;

/// One tensor of a layer as registered: its name, stored dtype and shape.
pub struct TensorMeta {
    pub name: CString,
    pub dtype: DType,
    pub shape: Vec<i64>,
    pub numel: usize,
    /// Size of dimension 0 for tensors of two or more dimensions, else 1; 0 for an empty tensor,
    /// which has no row to scale: per-channel scales are one per row, so a [2^24, 0] tensor must
    /// not claim 2^24 of them (64 MiB for no data). Every scale count derives from this.
    pub rows: usize,
}

impl TensorMeta {
    pub fn new(name: &str, dtype: DType, shape: Vec<i64>) -> Result<TensorMeta> {
        let name = CString::new(name)
            .map_err(|_| Error::invalid(format!("tensor name {name:?} contains a NUL byte")))?;
        if shape.len() > STRATA_MAX_DIMS {
            return Err(Error::invalid(format!(
                "tensor {name:?} has {} dimensions; at most {} are supported",
                shape.len(),
                STRATA_MAX_DIMS
            )));
        }
        let mut numel: usize = 1;
        for &dim in &shape {
            let dim = usize::try_from(dim).map_err(|_| {
                Error::invalid(format!("tensor {name:?} has a negative dimension {dim}"))
            })?;
            numel = numel
                .checked_mul(dim)
                .filter(|n| {
                    n.checked_mul(dtype.size())
                        .is_some_and(|b| b <= isize::MAX as usize)
                })
                .ok_or_else(|| Error::invalid(format!("tensor {name:?} is too large")))?;
        }
        let rows = if numel == 0 {
            0
        } else if shape.len() >= 2 {
            shape[0] as usize
        } else {
            1
        };
        Ok(TensorMeta {
            name,
            dtype,
            shape,
            numel,
            rows,
        })
    }

    pub fn nbytes(&self) -> usize {
        self.numel * self.dtype.size()
    }
}

/// A copy of a layer in host memory (the offload or onload tier).
pub struct HostCopy {
    /// Keeps the buffer pinned for direct uploads (a GPU); declared first, so it unpins before
    /// the buffer is freed.
    pub pinned: Option<Box<dyn std::any::Any + Send + Sync>>,
    pub buffer: CountedBuffer,
    pub slots: Vec<TensorSlot>,
}

/// A copy of a layer on the compute device, charged to the budget while it lives.
pub struct DeviceCopy {
    pub memory: DeviceMemory,
    pub slots: Vec<TensorSlot>,
}

impl DeviceCopy {
    pub fn bytes(&self) -> u64 {
        self.memory.len as u64
    }
}

/// What `acquire_for_compute` handed out for a layer in use.
pub enum Computation {
    /// A host copy already in the computation form, read in place (CPU device).
    Host(Arc<HostCopy>),
    /// The prepared copy itself: preparing and computation forms are the same.
    Prepared,
    /// A conversion of the prepared copy into the computation form, freed at release.
    Converted(DeviceCopy),
}

/// Where each tensor sits, and in which form, in a buffer holding the layer in one tier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub slots: Vec<TensorSlot>,
    pub size: usize,
}

/// A layer's layout in each of its group's tiers, fixed at registration.
pub struct Forms {
    pub offload: Layout,
    pub onload: Layout,
    pub preparing: Layout,
    pub computation: Layout,
    /// Per tier, whether its layout is the computation tier's: fixed at registration, so compared
    /// once here rather than slot by slot on every acquire.
    same_as_computation: [bool; 4],
}

impl Forms {
    pub fn new(tensors: &[TensorMeta], tiers: &Tiers) -> Forms {
        let of = |tier| {
            let (slots, size) = crate::backend::layout(
                tensors
                    .iter()
                    .map(|t| (t.numel, t.rows, tiers.repr(tier, t.dtype, t.shape.len()))),
            );
            Layout { slots, size }
        };
        let [offload, onload, preparing, computation] = [
            Tier::Offload,
            Tier::Onload,
            Tier::Preparing,
            Tier::Computation,
        ]
        .map(of);
        let same_as_computation = [&offload, &onload, &preparing, &computation]
            .map(|layout| layout.slots == computation.slots);
        Forms {
            offload,
            onload,
            preparing,
            computation,
            same_as_computation,
        }
    }

    /// Whether `tier` holds the layer in its computation form, byte for byte.
    pub fn same_as_computation(&self, tier: Tier) -> bool {
        self.same_as_computation[tier as usize]
    }

    pub fn get(&self, tier: Tier) -> &Layout {
        match tier {
            Tier::Offload => &self.offload,
            Tier::Onload => &self.onload,
            Tier::Preparing => &self.preparing,
            Tier::Computation => &self.computation,
        }
    }

    /// Bytes a miss moves into the preparing tier: each tensor's data and scales, no padding.
    pub fn preparing_payload(&self) -> u64 {
        self.preparing
            .slots
            .iter()
            .map(|s| (s.data_bytes() + s.scale_count() * 4) as u64)
            .sum()
    }
}

pub struct Layer {
    pub name: Arc<str>,
    pub forms: Forms,
    pub group: Key,
    pub tensors: Arc<[TensorMeta]>,
    /// Where each tensor lives in the user's checkpoint, when the layer came from one.
    pub checkpoint: Option<Arc<[TensorInfo]>>,
    /// The offload tier in host memory: the registered copy, or a checkpoint's layer once read.
    pub offload_copy: Option<Arc<HostCopy>>,
    /// The onload tier in host memory while the group is onloaded, when it differs from offload.
    pub onload_copy: Option<Arc<HostCopy>>,
    /// The preparing tier on the compute device.
    pub prepared: Option<DeviceCopy>,
    /// The computation form, converted ahead by the copy engine for the next acquire to take.
    pub staged: Option<DeviceCopy>,
    /// The copy engine filled this layer ahead of its use and no acquire has taken it yet.
    pub prefetched: bool,
    /// Set while the layer is in use.
    pub computation: Option<Computation>,
    pub in_use: u32,
    /// Threads that acquired the layer and have not released it yet (one entry per acquire).
    pub holders: Vec<ThreadId>,
    /// A thread is moving this layer's bytes without the context lock; others wait for it.
    pub busy: bool,
    /// When the first of the current acquires returned, for the trace's compute span.
    pub acquired_at: Option<Stamp>,
}

impl Layer {
    /// Bytes of the tensors as stored.
    pub fn source_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.nbytes() as u64).sum()
    }

    /// Whether the computation form differs from the preparing one, so using the layer needs a
    /// converted copy beside the resident one.
    pub fn needs_conversion(&self) -> bool {
        !self.forms.same_as_computation(Tier::Preparing)
    }

    /// Whether that converted copy is still to be made before the layer can be used.
    pub fn conversion_missing(&self) -> bool {
        self.needs_conversion() && self.staged.is_none()
    }

    /// Frees the copies on the compute device that are not in use (resident and staged); returns
    /// their bytes for the budget to refund.
    pub fn drop_device_copies(&mut self) -> u64 {
        self.prefetched = false;
        [self.prepared.take(), self.staged.take()]
            .into_iter()
            .flatten()
            .map(|copy| copy.bytes())
            .sum()
    }
}

pub struct Group {
    pub name: String,
    pub tiers: Tiers,
    pub onloaded: bool,
    /// An onload is making host copies (without the lock): offloads and other onloads wait.
    pub loading: bool,
    pub layers: Vec<Key>,
}

/// Everything registered in a context.
pub struct Registry {
    pub groups: Arena<Group>,
    pub layers: Arena<Layer>,
    pub layer_names: HashMap<String, Key>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            groups: Arena::new(8),
            layers: Arena::new(16),
            layer_names: HashMap::new(),
        }
    }
}
