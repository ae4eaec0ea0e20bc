//! Moving a layer's bytes between tiers, done without the context lock while the layer is marked
//! (`inflight.rs`): where the bytes come from (`Source`: a host copy or the checkpoint), where they
//! go (`Sink`: a host buffer or device memory), host copies, and the device copies with their
//! memory. One exception to "without the lock": when the device itself runs out of memory under
//! the budget, `allocate_device` takes the lock to evict a layer and tries again.

use super::Context;
use crate::backend::{Backend, DeviceMemory};
use crate::checkpoint::{ReadMode, TensorInfo, MAX_STREAM_AREAS};
use crate::convert::TensorBytes;
use crate::error::{ErrorKind, Result};
use crate::host::CountedBuffer;
use crate::log::Level;
use crate::registry::{DeviceCopy, HostBytes, HostCopy, Layer, TensorMeta};
use crate::slot::{convert_into_slot, convert_into_slot_part, slot_contents, TensorSlot};
use crate::store::LayerKey;
use crate::tiers::{Device, Tier, Tiers};
use crate::trace::{Span, Stamp, Track};
use once_cell::sync::Lazy;
use std::ffi::CStr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};

/// Where a layer's bytes come from: a host copy, or the user's checkpoint.
#[derive(Clone)]
pub enum Source {
    Host(Arc<HostCopy>),
    Disk(Arc<[TensorInfo]>),
}

/// Largest staging area one fill holds for a tensor read from a checkpoint: a larger tensor
/// streams through it in pieces, so host memory stays bounded whatever the model's tensors.
const STAGING_CHUNK: usize = 8 << 20;
/// Largest piece when reads with O_DIRECT overlap a conversion: up to `MAX_STREAM_AREAS` such
/// pieces go round, one converted while the next ones are read. Small enough that the first
/// piece (read before any conversion starts) and the last (converted after every read) are a
/// small part of a large tensor; large enough to be one efficient request.
///
/// Buffered reads take turns with the conversion instead, through one area: out of a warm page
/// cache a read is a copy on the CPU, which competes with the conversion's threads for the same
/// cores, where a direct read leaves the CPU to them. Per-row quantization of 8 MiB tensors on 2
/// vCPUs (`strata bench --preparing fp8 --computation fp8`, medians, against a plain read of the
/// same file in the same run): with O_DIRECT, overlapped in 2 MiB pieces 0.63x (8 runs), read
/// whole then converted 0.50x (11 runs); buffered, overlapped 116 ms per pass, in turn 102 ms.
const OVERLAPPED_PIECE: usize = 2 << 20;
/// Smallest staging area, whatever `host_limit` says: below it reads get too small to be fast.
const MIN_STAGING: usize = 64 << 10;

/// Where a fill puts each tensor it reads: a host copy's buffer, or device memory.
trait Sink {
    fn slot(&self, i: usize) -> &TensorSlot;
    /// Converts a whole tensor into slot `i`.
    fn whole(&mut self, i: usize, src: TensorBytes<'_>) -> Result<()>;
    /// Converts a run of unscaled elements into slot `i`, from element `first` on.
    fn part(&mut self, i: usize, src: TensorBytes<'_>, first: usize) -> Result<()>;
    /// Slot `i`'s data bytes, when the host can write them in place.
    fn raw(&mut self, i: usize) -> Option<&mut [u8]>;
}

struct HostSink<'a> {
    buffer: &'a mut [u8],
    slots: &'a [TensorSlot],
    conversions: crate::convert::Engine,
}

impl Sink for HostSink<'_> {
    fn slot(&self, i: usize) -> &TensorSlot {
        &self.slots[i]
    }
    fn whole(&mut self, i: usize, src: TensorBytes<'_>) -> Result<()> {
        convert_into_slot(src, &self.slots[i], self.buffer, self.conversions)
    }
    fn part(&mut self, i: usize, src: TensorBytes<'_>, first: usize) -> Result<()> {
        convert_into_slot_part(src, &self.slots[i], self.buffer, first, self.conversions)
    }
    fn raw(&mut self, i: usize) -> Option<&mut [u8]> {
        let slot = &self.slots[i];
        self.buffer
            .get_mut(slot.offset..slot.offset + slot.data_bytes())
    }
}

struct DeviceSink<'a> {
    backend: &'a dyn Backend,
    memory: &'a mut DeviceMemory,
    slots: &'a [TensorSlot],
}

impl Sink for DeviceSink<'_> {
    fn slot(&self, i: usize) -> &TensorSlot {
        &self.slots[i]
    }
    fn whole(&mut self, i: usize, src: TensorBytes<'_>) -> Result<()> {
        self.backend.upload(src, self.memory, &self.slots[i])
    }
    fn part(&mut self, i: usize, src: TensorBytes<'_>, first: usize) -> Result<()> {
        self.backend
            .upload_part(src, self.memory, &self.slots[i], first)
    }
    fn raw(&mut self, i: usize) -> Option<&mut [u8]> {
        let slot = &self.slots[i];
        self.backend
            .host_writable(self.memory)?
            .get_mut(slot.offset..slot.offset + slot.data_bytes())
    }
}

impl Context {
    /// Brings every tensor of `source` into `sink`. Checkpoint tensors are read in place when the
    /// target keeps the stored bytes and the host can write it; else through one staging area,
    /// counted as host memory, of at most `STAGING_CHUNK` bytes for tensors that convert in parts
    /// (element by element, or by rows into per-row scales the host writes); a tensor scaled as a
    /// whole, or handed whole to a device that may quantize it itself, is staged whole. Records
    /// spans in `spans`.
    fn fill_from_source(
        &self,
        source: &Source,
        tensors: &[TensorMeta],
        sink: &mut dyn Sink,
        spans: &mut Vec<Span>,
    ) -> Result<()> {
        let infos = match source {
            Source::Host(copy) => {
                for (i, (meta, slot)) in tensors.iter().zip(&copy.slots).enumerate() {
                    let (bytes, scales) = slot_contents(slot, copy.buffer.as_slice())?;
                    let src = TensorBytes {
                        bytes,
                        dtype: slot.repr.dtype,
                        scales: &scales,
                    };
                    sink.whole(i, src)?;
                    panic_if_armed(&meta.name);
                }
                return Ok(());
            }
            Source::Disk(infos) => infos,
        };
        let mut staging: Option<CountedBuffer> = None;
        for (i, (meta, info)) in tensors.iter().zip(infos.iter()).enumerate() {
            let started = Stamp::now();
            let slot = *sink.slot(i);
            let unscaled = slot.scale_count() == 0;
            let result = if unscaled && slot.repr.dtype == meta.dtype && sink.raw(i).is_some() {
                info.read_into_with(sink.raw(i).expect("checked"), self.options.read_mode)
            } else if unscaled || (slot.converts_in_parts() && sink.raw(i).is_some()) {
                // Converted on the host piece by piece as the pieces arrive: element by element,
                // or by whole rows when scaled per row. A small host_limit gets a small staging
                // area: half of what the device's own staging leaves, so the engine and a caller
                // can each stage at once, but never less than a useful read.
                let element = meta.dtype.size().max(1);
                let unit = element * if unscaled { 1 } else { slot.row_len() };
                let limit = self.host.limit();
                let left = limit.saturating_sub(self.backend.staging_host_bytes(limit));
                let room = usize::try_from(left / 2)
                    .unwrap_or(usize::MAX)
                    .clamp(MIN_STAGING, STAGING_CHUNK);
                let overlapped = self.options.read_mode == ReadMode::Direct;
                let piece = if overlapped {
                    (room / MAX_STREAM_AREAS).min(OVERLAPPED_PIECE)
                } else {
                    room
                };
                let piece = (meta.nbytes().min(piece) / unit).max(1) * unit;
                let area = if overlapped && piece < meta.nbytes() {
                    // At least two areas, even for a row larger than a quarter of the room.
                    let areas = (room / piece).clamp(2, MAX_STREAM_AREAS);
                    piece * areas.min(meta.nbytes().div_ceil(piece))
                } else {
                    piece
                };
                if staging.as_ref().is_none_or(|s| s.buffer.len() < area) {
                    // The smaller area goes first, so the two are never held at once.
                    drop(staging.take());
                    staging = Some(CountedBuffer::staging(area, &self.host)?);
                }
                let area = &mut staging.as_mut().expect("made above").buffer.as_mut_slice()[..area];
                info.read_chunks(area, piece, self.options.read_mode, |offset, piece| {
                    let src = TensorBytes {
                        bytes: piece,
                        dtype: meta.dtype,
                        scales: &[],
                    };
                    sink.part(i, src, offset as usize / element)
                })
            } else {
                drop(staging.take());
                let mut whole = CountedBuffer::staging(meta.nbytes(), &self.host)?;
                info.read_into_with(whole.buffer.as_mut_slice(), self.options.read_mode)
                    .and_then(|()| {
                        let src = TensorBytes {
                            bytes: whole.buffer.as_slice(),
                            dtype: meta.dtype,
                            scales: &[],
                        };
                        sink.whole(i, src)
                    })
            };
            result.inspect_err(|e| {
                // Truncated or changed under us: the caller gets the error, and the log says
                // which file went bad even when the caller drops it.
                self.logger.log(Level::Warn, || {
                    format!("reading the checkpoint failed: {}", e.message)
                });
            })?;
            panic_if_armed(&meta.name);
            self.bytes_from_disk
                .fetch_add(info.nbytes, Ordering::Relaxed);
            spans.push(Span {
                track: Track::Copy,
                name: info.name.as_str().into(),
                what: "read",
                start: started,
                end: Stamp::now(),
                bytes: info.nbytes,
            });
        }
        Ok(())
    }

    /// A host copy of the layer in the form `slots` describe, made from `source`.
    pub(super) fn make_host_copy(
        &self,
        source: &Source,
        tensors: &[TensorMeta],
        slots: Vec<TensorSlot>,
        size: usize,
        spans: &mut Vec<Span>,
    ) -> Result<HostCopy> {
        let fill = |buffer: &mut [u8], spans: &mut Vec<Span>| {
            let mut sink = HostSink {
                buffer,
                slots: &slots,
                conversions: super::conversions(self.options()),
            };
            self.fill_from_source(source, tensors, &mut sink, spans)
        };
        // With a host store, a copy read from the checkpoint is the store's: the first context
        // to need it fills it, the others wait for that fill and share it.
        if let (Some(store), Source::Disk(infos)) = (self.store.get(), source) {
            let key = LayerKey::new(infos, tensors, &slots, size);
            if let Some(lease) = store.layer(&key, size, |buffer| fill(buffer, spans))? {
                return Ok(HostCopy {
                    _pinned: lease.pin_for(&*self.backend),
                    buffer: HostBytes::Store(lease),
                    slots,
                });
            }
        }
        let mut buffer = CountedBuffer::new(size, &self.host)?;
        fill(buffer.buffer.as_mut_slice(), spans)?;
        Ok(HostCopy {
            _pinned: self.backend.pin_host(buffer.buffer.as_slice()),
            buffer: HostBytes::Own(buffer),
            slots,
        })
    }

    /// Device memory for a fill. When the device itself is out of memory (another program took
    /// some since the budget was set), unused resident layers are evicted, furthest next use
    /// first, until the allocation succeeds or none is left.
    fn allocate_device(&self, bytes: usize) -> Result<DeviceMemory> {
        loop {
            match self.backend.allocate(bytes) {
                Err(e) if e.kind == ErrorKind::OutOfMemory => {
                    if !self.evict_for_memory(&mut self.lock()) {
                        return Err(e.context(
                            "the device is out of memory (another program may be using it) and \
                             no unused layer is left to evict",
                        ));
                    }
                    self.logger.log(Level::Warn, || {
                        format!(
                            "the device ran out of memory ({}): evicted a layer and retrying",
                            e.message
                        )
                    });
                }
                other => return other,
            }
        }
    }

    /// The preparing-tier copy on the compute device, uploaded from `source`.
    pub(super) fn make_prepared(
        &self,
        source: &Source,
        tensors: &[TensorMeta],
        slots: &[TensorSlot],
        size: usize,
        layer_name: &Arc<str>,
        spans: &mut Vec<Span>,
    ) -> Result<DeviceCopy> {
        self.make_device_copy(
            slots,
            size,
            (layer_name, "upload"),
            spans,
            |memory, spans| {
                let mut sink = DeviceSink {
                    backend: &*self.backend,
                    memory,
                    slots,
                };
                self.fill_from_source(source, tensors, &mut sink, spans)
            },
        )
    }

    /// The computation-tier copy, converted on the device from the prepared one.
    pub(super) fn make_converted(
        &self,
        prepared: &DeviceCopy,
        slots: &[TensorSlot],
        size: usize,
        layer_name: &Arc<str>,
        spans: &mut Vec<Span>,
    ) -> Result<DeviceCopy> {
        self.make_device_copy(slots, size, (layer_name, "convert"), spans, |memory, _| {
            for (src_slot, dst_slot) in prepared.slots.iter().zip(slots) {
                self.backend
                    .convert(&prepared.memory, src_slot, memory, dst_slot)?;
            }
            Ok(())
        })
    }

    /// A device copy of `size` bytes laid out as `slots`, written by `write`, recorded as one span
    /// on the copy track named after the layer and `what` was done.
    fn make_device_copy(
        &self,
        slots: &[TensorSlot],
        size: usize,
        (layer_name, what): (&Arc<str>, &'static str),
        spans: &mut Vec<Span>,
        write: impl FnOnce(&mut DeviceMemory, &mut Vec<Span>) -> Result<()>,
    ) -> Result<DeviceCopy> {
        let mut memory = self.allocate_device(size)?;
        let started = Stamp::now();
        write(&mut memory, spans)?;
        spans.push(Span {
            track: Track::Copy,
            name: layer_name.clone(),
            what,
            start: started,
            end: Stamp::now(),
            bytes: size as u64,
        });
        Ok(DeviceCopy {
            memory,
            slots: slots.to_vec(),
        })
    }
}

/// Panics armed for tests: (tensor name substring, panics left). Seeded once from the environment
/// variable `STRATA_FAULT_PANIC_FILL=SUBSTRING:COUNT`, so a program driving the C library can arm
/// them too. They stand for a bug in strata striking mid-fill, after a tensor's bytes moved.
static FILL_PANICS: Lazy<Mutex<Vec<(String, u32)>>> = Lazy::new(|| {
    let armed = std::env::var("STRATA_FAULT_PANIC_FILL")
        .ok()
        .and_then(|spec| {
            let (substring, count) = spec.rsplit_once(':')?;
            Some((substring.to_owned(), count.parse().ok()?))
        });
    Mutex::new(armed.into_iter().collect())
});

/// Makes the next `count` fills (by an acquire or by the copy engine, into host or device memory)
/// of a tensor whose name contains `tensor_substring` panic right after the tensor was written,
/// for tests that a panic mid-fill leaves no layer marked busy and no byte charged.
#[doc(hidden)]
pub fn inject_fill_panics(tensor_substring: &str, count: u32) {
    let mut panics = FILL_PANICS.lock().unwrap_or_else(PoisonError::into_inner);
    panics.retain(|(substring, _)| substring != tensor_substring);
    panics.push((tensor_substring.to_owned(), count));
}

fn panic_if_armed(tensor: &CStr) {
    let armed = {
        let mut panics = FILL_PANICS.lock().unwrap_or_else(PoisonError::into_inner);
        let name = tensor.to_string_lossy();
        panics
            .iter_mut()
            .find(|(substring, left)| *left > 0 && name.contains(substring.as_str()))
            .map(|(_, left)| *left -= 1)
            .is_some()
    };
    if armed {
        panic!("injected fill panic after tensor {tensor:?} (STRATA_FAULT_PANIC_FILL)");
    }
}

/// The nearest host copy of a layer, and the tier whose form it holds: its onload copy (when
/// `onload_first`), else its offload copy.
pub(super) fn nearest_host_copy(
    layer: &Layer,
    onload_first: bool,
) -> Option<(&Arc<HostCopy>, Tier)> {
    let onload = layer.onload_copy.as_ref().filter(|_| onload_first);
    onload.map(|copy| (copy, Tier::Onload)).or_else(|| {
        layer
            .offload_copy
            .as_ref()
            .map(|copy| (copy, Tier::Offload))
    })
}

/// Whether the layer lacks the host copy `tier` (Offload or Onload) asks for: that tier is in RAM,
/// and for Onload, the offload copy is not already in its form.
pub(super) fn host_copy_missing(layer: &Layer, tiers: &Tiers, tier: Tier) -> bool {
    tiers.placement(tier).device == Device::Cpu
        && match tier {
            Tier::Offload => layer.offload_copy.is_none(),
            _ => {
                layer.onload_copy.is_none()
                    && !layer
                        .offload_copy
                        .as_ref()
                        .is_some_and(|c| c.slots == layer.forms.get(tier).slots)
            }
        }
}

/// The nearest host-side source of a layer's bytes: its onload copy, its offload copy, or the file.
pub(super) fn nearest_source(layer: &Layer, onload_first: bool) -> Source {
    match (nearest_host_copy(layer, onload_first), &layer.checkpoint) {
        (Some((copy, _)), _) => Source::Host(copy.clone()),
        (None, Some(infos)) => Source::Disk(infos.clone()),
        (None, None) => unreachable!("host layers always keep their offload copy"),
    }
}
