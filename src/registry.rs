//! Groups, layers and their tensors, behind ids that are never reused: a stale, made-up or foreign
//! id is an error, never a wrong object.

use crate::backend::{DeviceMemory, Footprint};
use crate::checkpoint::TensorInfo;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::host::CountedBuffer;
use crate::residency::OnDevice;
use crate::slot::TensorSlot;
use crate::tiers::{Tier, Tiers};
use std::collections::HashMap;
use std::ffi::CString;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::ThreadId;

/// Hands out the ids of groups and layers (and the tokens of context and checkpoint handles): one
/// process-wide 64-bit serial, so no id is ever handed out twice in a process, whatever the
/// context or kind of object. A stale, made-up or foreign id therefore names nothing: it cannot
/// alias a later object, as ids built from a slot index and a narrow generation did once that
/// generation wrapped. 0 is never an id; at one id a nanosecond, the serial lasts 584 years.
pub fn next_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// A group's id, as `Context::create_group` hands it out: never reused in the process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GroupId(pub u64);

/// A layer's id, as registration hands it out: never reused in the process, nor shared with a
/// group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LayerId(pub u64);

/// Ids show as the number they wrap (`{id:#x}` in messages).
impl std::fmt::LowerHex for GroupId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::LowerHex::fmt(&self.0, f)
    }
}

impl std::fmt::LowerHex for LayerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::LowerHex::fmt(&self.0, f)
    }
}

/// Hashes ids, which are sequential: one multiply by an odd constant spreads them over every bit
/// (consecutive ids land in distinct buckets), where the default SipHash costs more than the
/// rest of an acquire's lookup.
#[derive(Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.write_u64(self.0.rotate_left(8) ^ byte as u64);
        }
    }

    fn write_u64(&mut self, id: u64) {
        self.0 = id.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// Slots for the objects of one kind in one context, and which slot each live id names. A slot's
/// generation is the id of the object it holds, so a key kept past its object's removal never
/// matches the slot's next occupant.
pub struct Arena<T> {
    slots: Vec<(u64, Option<T>)>,
    free: Vec<u32>,
    /// Live ids only: the one way from an id the caller gives to a slot.
    slot_of: HashMap<u64, u32, BuildHasherDefault<IdHasher>>,
}

/// A live object's slot, and its id (the slot's generation while it lives).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Key {
    pub index: u32,
    pub generation: u64,
}

impl Key {
    /// The id the C ABI hands out for this object.
    pub fn id(self) -> u64 {
        self.generation
    }
}

impl<T> Default for Arena<T> {
    fn default() -> Arena<T> {
        Arena {
            slots: Vec::new(),
            free: Vec::new(),
            slot_of: HashMap::default(),
        }
    }
}

impl<T> Arena<T> {
    pub fn insert(&mut self, value: T) -> Key {
        let generation = next_id();
        let index = match self.free.pop() {
            Some(index) => {
                self.slots[index as usize] = (generation, Some(value));
                index
            }
            None => {
                self.slots.push((generation, Some(value)));
                self.slots.len() as u32 - 1
            }
        };
        self.slot_of.insert(generation, index);
        Key { index, generation }
    }

    /// The key of the live object with id `id`; None for any other id (removed, of another
    /// context or kind, or never handed out).
    pub fn key(&self, id: u64) -> Option<Key> {
        self.slot_of.get(&id).map(|&index| Key {
            index,
            generation: id,
        })
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
        self.slot_of.remove(&key.generation);
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

/// Most dimensions a tensor may have (the size of `strata_tensor_view.shape`).
pub(crate) const MAX_DIMS: usize = 8;

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
        if shape.len() > MAX_DIMS {
            return Err(Error::invalid(format!(
                "tensor {name:?} has {} dimensions; at most {} are supported",
                shape.len(),
                MAX_DIMS
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
    pub _pinned: Option<Box<dyn std::any::Any + Send + Sync>>,
    pub buffer: HostBytes,
    pub slots: Vec<TensorSlot>,
}

/// Where a host copy's bytes are: a buffer of the context's own, or a layer of a host store that
/// other contexts (and processes) share, read-only.
pub enum HostBytes {
    Own(CountedBuffer),
    Store(crate::store::Lease),
}

impl HostBytes {
    pub fn as_slice(&self) -> &[u8] {
        match self {
            HostBytes::Own(buffer) => buffer.buffer.as_slice(),
            HostBytes::Store(lease) => lease.as_slice(),
        }
    }
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
    /// The layouts of `tensors` in each tier; the device tiers' buffers are sized as the device
    /// gives memory (`footprint`), so that the budget counts what a copy really takes.
    pub(crate) fn new(tensors: &[TensorMeta], tiers: &Tiers, footprint: Footprint) -> Forms {
        let of = |tier| {
            let (slots, size) = crate::slot::layout(
                tensors
                    .iter()
                    .map(|t| (t.numel, t.rows, tiers.repr(tier, t.dtype, t.shape.len()))),
            );
            let size = match tier {
                Tier::Preparing | Tier::Computation => footprint.of(size),
                Tier::Offload | Tier::Onload => size,
            };
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

    /// The layouts a context on a GPU gives: whole 2 MiB pages for buffers over 1 MiB, as an
    /// H200 maps them. For `strata plan`, which has no device to ask.
    pub fn on_a_gpu(tensors: &[TensorMeta], tiers: &Tiers) -> Forms {
        Forms::new(tensors, tiers, Footprint::paged(2 << 20))
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
    /// Its copies on the compute device, and whether it is being filled or in use.
    pub(crate) device: OnDevice,
    /// A host copy (offload or onload tier) is being made for it without the context lock: a
    /// mark of its own, since one can be made while the device copy is in use.
    pub(crate) copying_host: bool,
}

impl Layer {
    /// Whether the computation form differs from the preparing one, so using the layer needs a
    /// converted copy beside the resident one.
    pub fn needs_conversion(&self) -> bool {
        !self.forms.same_as_computation(Tier::Preparing)
    }

    /// Whether that converted copy is still to be made before the layer can be used.
    pub fn conversion_missing(&self) -> bool {
        self.needs_conversion() && !self.device.converted_ahead()
    }

    /// A thread moves this layer's bytes without the context lock: others wait for it.
    pub fn busy(&self) -> bool {
        self.copying_host || self.device.is_filling()
    }
}

pub struct Group {
    pub name: String,
    pub tiers: Tiers,
    pub onloaded: bool,
    /// The thread whose onload is making host copies (without the lock): offloads and other
    /// onloads wait for it, and that thread's own calls from the progress callback are refused.
    pub loading: Option<ThreadId>,
    /// By id, so in registration order, and a layer unregistered alone leaves in O(log N).
    pub layers: std::collections::BTreeMap<u64, Key>,
}

/// Everything registered in a context.
#[derive(Default)]
pub struct Registry {
    pub groups: Arena<Group>,
    pub layers: Arena<Layer>,
    pub layer_names: HashMap<String, Key>,
}
