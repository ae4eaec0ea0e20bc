//! Moving a layer's bytes between tiers, done without the context lock while the layer is marked
//! busy: reading from the checkpoint, filling host copies, uploading and converting on the device.

use super::Context;
use crate::backend::{convert_into_slot, slot_contents, TensorSlot};
use crate::checkpoint::TensorInfo;
use crate::convert::TensorBytes;
use crate::error::Result;
use crate::host::CountedBuffer;
use crate::log::Level;
use crate::registry::{DeviceCopy, HostCopy, TensorMeta};
use crate::trace::{Span, Track};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// Where a layer's bytes come from: a host copy, or the user's checkpoint.
#[derive(Clone)]
pub enum Source {
    Host(Arc<HostCopy>),
    Disk(Arc<[TensorInfo]>),
}

impl Context {
    /// Calls `consume` with each tensor's bytes from `source`, reading checkpoint tensors through
    /// a staging buffer that counts as host memory while it lives. Records spans in `spans`.
    fn for_each_source_tensor(
        &self,
        source: &Source,
        tensors: &[TensorMeta],
        spans: &mut Vec<Span>,
        mut consume: impl FnMut(usize, TensorBytes<'_>) -> Result<()>,
    ) -> Result<()> {
        for (i, meta) in tensors.iter().enumerate() {
            match source {
                Source::Host(copy) => {
                    let slot = &copy.slots[i];
                    let (bytes, scales) = slot_contents(slot, copy.buffer.buffer.as_slice())?;
                    consume(
                        i,
                        TensorBytes {
                            bytes,
                            dtype: slot.repr.dtype,
                            scales: &scales,
                        },
                    )?;
                }
                Source::Disk(infos) => {
                    let info = &infos[i];
                    let started = Instant::now();
                    let mut staging = CountedBuffer::new(meta.nbytes(), &self.host)?;
                    info.read_into(staging.buffer.as_mut_slice())
                        .inspect_err(|e| {
                            // Truncated or changed under us: the caller gets the error, and the
                            // log says which file went bad even when the caller drops it.
                            self.logger.log(Level::Warn, || {
                                format!("reading the checkpoint failed: {}", e.message)
                            });
                        })?;
                    self.bytes_from_disk
                        .fetch_add(info.nbytes, Ordering::Relaxed);
                    spans.push(Span {
                        track: Track::Copy,
                        name: info.name.as_str().into(),
                        what: "read",
                        start: started,
                        end: Instant::now(),
                        bytes: info.nbytes,
                    });
                    consume(
                        i,
                        TensorBytes {
                            bytes: staging.buffer.as_slice(),
                            dtype: meta.dtype,
                            scales: &[],
                        },
                    )?;
                }
            }
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
        let mut buffer = CountedBuffer::new(size, &self.host)?;
        self.for_each_source_tensor(source, tensors, spans, |i, src| {
            convert_into_slot(src, &slots[i], buffer.buffer.as_mut_slice())
        })?;
        Ok(HostCopy { buffer, slots })
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
        let memory = self.backend.allocate(size)?;
        let started = Instant::now();
        self.for_each_source_tensor(source, tensors, spans, |i, src| {
            self.backend.upload(src, &memory, &slots[i])
        })?;
        spans.push(Span {
            track: Track::Copy,
            name: layer_name.clone(),
            what: "upload",
            start: started,
            end: Instant::now(),
            bytes: size as u64,
        });
        Ok(DeviceCopy {
            memory,
            slots: slots.to_vec(),
        })
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
        let memory = self.backend.allocate(size)?;
        let started = Instant::now();
        for (src_slot, dst_slot) in prepared.slots.iter().zip(slots) {
            self.backend
                .convert(&prepared.memory, src_slot, &memory, dst_slot)?;
        }
        spans.push(Span {
            track: Track::Copy,
            name: layer_name.clone(),
            what: "convert",
            start: started,
            end: Instant::now(),
            bytes: size as u64,
        });
        Ok(DeviceCopy {
            memory,
            slots: slots.to_vec(),
        })
    }
}
