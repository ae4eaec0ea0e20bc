//! An NVIDIA GPU as the compute device, through the CUDA driver API (cudarc, loaded at run time).
//! One file per mechanism:
//!
//! - `pool.rs`, memory: raw device buffers, handed back to a pool when a layer leaves and reused
//!   for the next buffer of the same size, so a repeating pass stops calling cuMemAlloc once warm.
//!   The pool never holds more than `vram_limit` together with what is live.
//! - Ordering (here): two non-blocking streams. Every upload, quantization and copy is enqueued
//!   on the copy stream; a cast kernel from one device copy into another runs on the convert
//!   stream, after the copy stream's work so far, so the copy engine goes on with the next
//!   upload meanwhile. Every write into a buffer is followed by its `ready` event; an acquire
//!   makes the caller's stream wait on it, a release (or a cast that read the buffer) records an
//!   event on its stream, and a buffer is written again only after the copy stream has waited on
//!   its `ready` and those events. The host never waits for the caller's work, except to give
//!   memory back to the driver.
//! - `pinned.rs` and `staging.rs`, the host side: host copies are pinned in place (uploads from
//!   them are direct DMA); everything else goes through a small ring of pinned staging buffers,
//!   so the next read overlaps the previous copy. Where memory cannot be pinned, the ring is
//!   pageable and a log line says so.
//! - `kernels.rs`, conversions on the device, with the PTX kernels in
//!   `kernels/`: casts, and absmax quantization into fp8 (bit for bit what the host makes). A
//!   quantization of a host tensor runs on the device or on the host by the rule at
//!   [`QuantizeOn`].
//! - `driver.rs`: one safe wrapper per driver call.
//!
//! Locks: `pool`, `ring` and `Buffer::uses` may each be held while taking `spare_events` (freeing
//! or reusing a buffer recycles its events); `pinned` is taken alone.

mod driver;
mod kernels;
mod pinned;
mod pool;
mod staging;

use super::{Backend, DeviceMemory, Footprint, StreamHandle};
use crate::convert::{Engine, TensorBytes};
use crate::error::{Error, Result};
use crate::host::MemoryCounter;
use crate::log::{Level, Logger};
use crate::slot::{scales_to_bytes, TensorSlot};
use crate::tiers::Device;
use driver::{Event, Module, PrimaryContext, Stream};
use kernels::{Kernels, QuantizeOn, WrittenOn, PTX};
use pool::{Buffer, Pool};
use staging::Ring;
use std::any::Any;
use std::collections::BTreeMap;
use std::mem::ManuallyDrop;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

pub struct CudaBackend {
    shared: Arc<Shared>,
    ordinal: i32,
}

/// What the backend, its buffers and its pinned host copies share: all of it lives until the last
/// of them is gone.
struct Shared {
    resources: ManuallyDrop<Resources>,
    /// Dropped after the resources, which need it current to be freed.
    context: PrimaryContext,
}

struct Resources {
    /// How host conversions run (the context's host_threads).
    conversions: Engine,
    /// Where every upload, quantization and pooled-memory write runs, in order.
    stream: Stream,
    /// Where the conversion kernels of device copies run, after the copy stream's work that filled
    /// their source, so the copy engine goes on with the next upload meanwhile.
    convert_stream: Stream,
    kernels: Kernels,
    _module: Module,
    quantize_uploads: QuantizeOn,
    pool: Mutex<Pool>,
    ring: Mutex<Option<Ring>>,
    spare_events: Mutex<Vec<Event>>,
    /// Host ranges pinned in place, start → end.
    pinned: Mutex<BTreeMap<usize, usize>>,
    cap: AtomicU64,
    /// What each cuMemAlloc takes from the device, which the budget and the pool count.
    footprint: Footprint,
    headroom: u64,
    host: Arc<MemoryCounter>,
    logger: Arc<Logger>,
    warned_pageable: AtomicBool,
}

/// cuda.h's CU_STREAM_PER_THREAD, which cudarc does not define.
const CU_STREAM_PER_THREAD: usize = 2;

/// A caller's stream as strata tells them apart: CU_STREAM_PER_THREAD is one handle for a
/// different stream on each thread.
#[derive(Clone, Copy, PartialEq, Eq)]
struct CallerStream {
    handle: usize,
    thread: Option<std::thread::ThreadId>,
}

impl CallerStream {
    fn of(handle: usize) -> CallerStream {
        let per_thread = handle == CU_STREAM_PER_THREAD;
        CallerStream {
            handle,
            thread: per_thread.then(|| std::thread::current().id()),
        }
    }
}

impl CudaBackend {
    /// Opens device `ordinal` (the driver is loaded and initialised, and the ordinal exists).
    /// `headroom` bytes are kept free on the device beside the budget, as cuMemGetInfo reads.
    pub fn open(
        ordinal: i32,
        headroom: u64,
        host: Arc<MemoryCounter>,
        logger: Arc<Logger>,
        conversions: Engine,
    ) -> Result<CudaBackend> {
        let context = PrimaryContext::retain(ordinal)?;
        let resources = {
            let _bound = context.bind()?;
            let ptx = std::ffi::CStr::from_bytes_with_nul(PTX.as_bytes())
                .expect("the PTX text has no NUL inside");
            let module = Module::load(ptx)?;
            let setting = std::env::var("STRATA_CUDA_QUANTIZE").ok();
            let quantize_uploads =
                QuantizeOn::from_setting(setting.as_deref()).unwrap_or_else(|value| {
                    logger.log(Level::Warn, || {
                        format!(
                            "STRATA_CUDA_QUANTIZE={value:?} is neither \"host\" nor \"device\": \
                         quantizing on the device where it can be"
                        )
                    });
                    QuantizeOn::Device
                });
            Resources {
                conversions,
                stream: Stream::new()?,
                convert_stream: Stream::new()?,
                kernels: Kernels::load(&module)?,
                _module: module,
                quantize_uploads,
                pool: Mutex::default(),
                ring: Mutex::new(None),
                spare_events: Mutex::default(),
                pinned: Mutex::default(),
                cap: AtomicU64::new(u64::MAX),
                footprint: Footprint::paged(driver::allocation_page(ordinal)?),
                headroom,
                host,
                logger,
                warned_pageable: AtomicBool::new(false),
            }
        };
        Ok(CudaBackend {
            shared: Arc::new(Shared {
                resources: ManuallyDrop::new(resources),
                context,
            }),
            ordinal,
        })
    }

    fn buffer<'a>(&self, memory: &'a DeviceMemory) -> Result<&'a Buffer> {
        memory
            ._owner
            .downcast_ref::<Buffer>()
            .ok_or_else(|| Error::invalid("device memory from another backend"))
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn res(&self) -> &Resources {
        &self.resources
    }

    fn event(&self) -> Result<Event> {
        match lock(&self.res().spare_events).pop() {
            Some(event) => Ok(event),
            None => Event::new(),
        }
    }

    fn recycle(&self, events: impl IntoIterator<Item = Event>) {
        lock(&self.res().spare_events).extend(events);
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Without a context nothing can be freed properly; the driver reclaims it at exit.
        if let Ok(_bound) = self.context.bind() {
            let _ = self.res().stream.synchronize();
            let _ = self.res().convert_stream.synchronize();
            let mut pool = std::mem::take(&mut *lock(&self.res().pool));
            let _ = self.release_all(&mut pool);
            lock(&self.res().ring).take();
            // SAFETY: dropped exactly once, here, with the context current; nothing uses the
            // resources afterwards (every Buffer and PinnedHost holding this Shared is gone).
            unsafe { ManuallyDrop::drop(&mut self.resources) };
        }
    }
}

impl Backend for CudaBackend {
    fn device(&self) -> Device {
        Device::Cuda
    }

    fn device_index(&self) -> i32 {
        self.ordinal
    }

    fn reads_host_memory(&self) -> bool {
        false
    }

    fn footprint(&self) -> Footprint {
        self.shared.res().footprint
    }

    fn allocate(&self, bytes: usize) -> Result<DeviceMemory> {
        let _bound = self.shared.context.bind()?;
        let buffer = self.shared.allocate(bytes)?;
        Ok(DeviceMemory {
            addr: buffer.pointer,
            len: bytes,
            _owner: Box::new(buffer),
        })
    }

    fn upload(
        &self,
        src: TensorBytes<'_>,
        dst: &mut DeviceMemory,
        slot: &TensorSlot,
    ) -> Result<()> {
        let buffer = self.buffer(dst)?;
        slot.check_in(dst.len)?;
        let shared = &self.shared;
        let _bound = shared.context.bind()?;
        // Bytes cross in the preparing tier's form, converted on the host first when the host
        // form differs (a preparing dtype other than the stored one), which needs no device
        // memory beside the slot; except an absmax quantization, which crosses in the source
        // dtype and runs on the device where the rule at `QuantizeOn` says so.
        if src.dtype == slot.repr.dtype && src.scales.len() == slot.scale_count() {
            if src.bytes.len() != slot.data_bytes() {
                return Err(Error::invalid("tensor bytes do not fill their slot"));
            }
            shared.push(src.bytes, dst.addr + slot.offset as u64)?;
            let scales = scales_to_bytes(src.scales);
            shared.push(&scales, dst.addr + slot.scales_offset as u64)?;
        } else if shared.quantized_on_device(src, dst.addr, slot)? {
            return buffer.written_by_convert_stream();
        } else {
            let converted = shared.converted_on_host(src, slot)?;
            let (data, scales) = converted.buffer.as_slice().split_at(slot.data_bytes());
            shared.push(data, dst.addr + slot.offset as u64)?;
            shared.push(scales, dst.addr + slot.scales_offset as u64)?;
        }
        buffer.written()
    }

    fn upload_part(
        &self,
        src: TensorBytes<'_>,
        dst: &mut DeviceMemory,
        slot: &TensorSlot,
        first_element: usize,
    ) -> Result<()> {
        let buffer = self.buffer(dst)?;
        if !src.scales.is_empty() || slot.scale_count() != 0 {
            return Err(Error::invalid(
                "a scaled tensor goes to the device whole, not in parts",
            ));
        }
        let count = src.bytes.len() / src.dtype.size();
        slot.check_part(dst.len, first_element, count)?;
        let shared = &self.shared;
        let _bound = shared.context.bind()?;
        let at = dst.addr + slot.part_range(first_element, count).start as u64;
        if src.dtype == slot.repr.dtype {
            shared.push(src.bytes, at)?;
        } else {
            let part = TensorSlot {
                offset: 0,
                numel: count,
                rows: 1,
                scales_offset: count * slot.repr.dtype.size(),
                ..*slot
            };
            let converted = shared.converted_on_host(src, &part)?;
            shared.push(converted.buffer.as_slice(), at)?;
        }
        buffer.written()
    }

    fn host_writable<'a>(&self, _dst: &'a mut DeviceMemory) -> Option<&'a mut [u8]> {
        None
    }

    fn convert(
        &self,
        src: &DeviceMemory,
        src_slot: &TensorSlot,
        dst: &mut DeviceMemory,
        dst_slot: &TensorSlot,
    ) -> Result<()> {
        let buffer = self.buffer(dst)?;
        src_slot.check_in(src.len)?;
        dst_slot.check_in(dst.len)?;
        if src_slot.numel != dst_slot.numel || src_slot.rows != dst_slot.rows {
            return Err(Error::invalid(
                "conversion between slots of different shapes",
            ));
        }
        let source = self.buffer(src)?;
        let _bound = self.shared.context.bind()?;
        // The source may have been written on the convert stream (an upload quantized there):
        // the copy stream's reads of it (a copy, a quantization, the f64 round trip) wait for
        // that, and a kernel on the convert stream waits for the copy stream in turn.
        source.ready().make_wait(self.shared.res().stream.0)?;
        match self
            .shared
            .convert(src.addr, src_slot, dst.addr, dst_slot)?
        {
            WrittenOn::ConvertStream => {
                // The source is written again only after the kernel read it, as after a
                // caller's use.
                source.used_until(self.shared.res().convert_stream.0 as usize)?;
                buffer.written_by_convert_stream()
            }
            WrittenOn::CopyStream => buffer.written(),
        }
    }

    fn check_stream(&self, stream: StreamHandle) -> Result<()> {
        let stream = stream.0;
        let raw = stream as cudarc::driver::sys::CUstream;
        let ours = self.shared.context.raw;
        // NULL, CU_STREAM_LEGACY (1) and CU_STREAM_PER_THREAD (2) name a default stream of the
        // context current on the calling thread: that context must be ours (or there is none,
        // and the caller enqueued nothing anywhere). Read it before binding ours.
        let owner = if stream <= CU_STREAM_PER_THREAD {
            Some(driver::current_context()?).filter(|c| !c.is_null())
        } else {
            let _bound = self.shared.context.bind()?;
            Some(driver::stream_context(raw)?)
        };
        if owner.is_some_and(|owner| owner != ours) {
            return Err(Error::invalid(format!(
                "the stream belongs to another CUDA context; strata works in the primary context of \
                 device {} (the one the CUDA runtime and PyTorch use)",
                self.ordinal
            )));
        }
        let _bound = self.shared.context.bind()?;
        // The events strata records and waits on cannot join a graph being captured, and
        // waiting on them from outside the capture would invalidate it.
        if driver::is_capturing(raw)? {
            return Err(Error::unsupported(
                "the stream is being captured into a CUDA graph (or it is the legacy default \
                 stream while a blocking stream it waits for is): acquire and release outside the \
                 capture (strata's copies and events cannot be part of a graph)",
            ));
        }
        Ok(())
    }

    fn ready_for(&self, memory: &DeviceMemory, stream: StreamHandle) -> Result<()> {
        let buffer = self.buffer(memory)?;
        let _bound = self.shared.context.bind()?;
        buffer
            .ready()
            .make_wait(stream.0 as cudarc::driver::sys::CUstream)
    }

    fn used_until(&self, memory: &DeviceMemory, stream: StreamHandle) -> Result<()> {
        let buffer = self.buffer(memory)?;
        let _bound = self.shared.context.bind()?;
        buffer.used_until(stream.0)
    }

    fn pin_host(&self, bytes: &[u8]) -> Option<Box<dyn Any + Send + Sync>> {
        let pinned = self.shared.pin(bytes)?;
        Some(Box::new(pinned))
    }

    fn staging_host_bytes(&self, host_limit: u64) -> u64 {
        self.shared.staging_host_bytes(host_limit)
    }

    fn set_memory_cap(&self, bytes: u64) -> Result<()> {
        let shared = &self.shared;
        shared.res().cap.store(bytes, Ordering::Relaxed);
        let _bound = shared.context.bind()?;
        shared.restart_peak()
    }

    fn release_idle(&self) -> Result<()> {
        let shared = &self.shared;
        let _bound = shared.context.bind()?;
        // The ring's last copies may still be reading it.
        shared.res().stream.synchronize()?;
        lock(&shared.res().ring).take();
        shared.release_pooled()
    }

    fn allocations(&self) -> u64 {
        self.shared.allocations()
    }
}
