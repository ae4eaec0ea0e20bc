//! An NVIDIA GPU as the compute device, through the CUDA driver API (cudarc, loaded at run time).
//!
//! - Memory: raw device buffers, handed back to a pool when a layer leaves and reused for the next
//!   buffer of the same size, so a repeating pass stops calling cuMemAlloc once warm. The pool
//!   never holds more than `vram_limit` together with what is live.
//! - Ordering: one non-blocking copy stream. Every write into a buffer (upload, conversion) is
//!   enqueued there and followed by the buffer's `ready` event; an acquire makes the caller's
//!   stream wait on it, a release records an event on the caller's stream, and a buffer is
//!   written again only after the copy stream has waited on those events. The host never waits
//!   for the caller's work, except to give memory back to the driver.
//! - Host side: host copies are pinned in place (uploads from them are direct DMA); everything
//!   else goes through a small ring of pinned staging buffers, so the next read overlaps the
//!   previous copy. Where memory cannot be pinned, the ring is pageable and a log line says so.
//! - Conversions run on the device, on the copy stream, with the PTX kernels in `kernels/`:
//!   casts, and absmax quantization into fp8 (bit for bit what the host makes). A quantization
//!   of a host tensor runs on the device or on the host by the rule at [`QuantizeOn`].

mod driver;

use super::{Backend, DeviceMemory};
use crate::convert::{Engine, TensorBytes};
use crate::dtype::DType;
use crate::error::{Error, Result, STRATA_ERR_BUDGET, STRATA_ERR_OUT_OF_MEMORY};
use crate::host::{CountedBuffer, HostBuffer, MemoryCounter};
use crate::log::{Level, Logger};
use crate::slot::{scales_to_bytes, slot_contents, write_scales, TensorSlot, SCALE_BYTES};
use crate::tiers::Device;
use driver::{Event, Function, Module, PinnedBuffer, PrimaryContext, Stream};
use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::mem::ManuallyDrop;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// The conversion kernels, generated from `kernels/convert.cu` by `scripts/gen-ptx.sh`.
const PTX: &str = concat!(include_str!("../../../kernels/convert.ptx"), "\0");

/// The most threads an absmax launch runs (1024 blocks). Each thread merges its maximum into
/// its group's word with one atomic per group it touches, and per tensor all of them hit one
/// word: a few hundred thousand atomics cost little, one per element would not.
const ABSMAX_THREADS: u64 = 1024 * 256;

/// Staging buffers in the ring: enough that a read, a copy in flight and the next read never
/// wait on each other.
const RING_SLOTS: usize = 4;
/// The largest staging buffer; a small `host_limit` gets smaller ones.
const RING_SLOT_BYTES: usize = 4 << 20;
const MIN_RING_SLOT_BYTES: usize = 64 << 10;
/// Host copies smaller than this are staged: pinning costs a system call and locked pages. The
/// larger ones are mappings of their own (`host::MAP_THRESHOLD`), whole pages no other buffer
/// shares, which is what the driver pins.
const MIN_PINNED_BYTES: usize = crate::host::MAP_THRESHOLD;
/// The most host memory one registration pins: some systems refuse larger ranges.
const PIN_CHUNK_BYTES: usize = 1 << 30;

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
    stream: Stream,
    kernels: Kernels,
    _module: Module,
    quantize_uploads: QuantizeOn,
    pool: Mutex<Pool>,
    ring: Mutex<Option<Ring>>,
    spare_events: Mutex<Vec<Event>>,
    /// Host ranges pinned in place, start → end.
    pinned: Mutex<BTreeMap<usize, usize>>,
    cap: AtomicU64,
    headroom: u64,
    host: Arc<MemoryCounter>,
    logger: Arc<Logger>,
    warned_pageable: AtomicBool,
}

/// Device buffers no layer uses, kept for reuse, and the accounting of what is held.
#[derive(Default)]
struct Pool {
    free: Vec<Pooled>,
    live: u64,
    /// The most `live` has been since the cap was last set.
    live_peak: u64,
    pooled: u64,
    allocations: u64,
}

struct Pooled {
    pointer: u64,
    len: usize,
    ready: Event,
    /// Events on the callers' streams after their last use: written again only after these.
    uses: Vec<(CallerStream, Event)>,
}

/// One device buffer a layer holds; goes back to the pool when dropped.
struct Buffer {
    pointer: u64,
    len: usize,
    /// Recorded on the copy stream after each write into the buffer.
    ready: Option<Event>,
    /// One event per caller stream that used the buffer, recorded at its release.
    uses: Mutex<Vec<(CallerStream, Event)>>,
    shared: Arc<Shared>,
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

struct Ring {
    slots: Vec<RingSlot>,
    slot_bytes: usize,
    /// The slot being filled, and how far: small copies share a slot, so a layer's biases and
    /// scales do not each take one and make the host wait for the copy stream.
    current: usize,
    filled: usize,
    _charge: CountedCharge,
}

struct RingSlot {
    memory: Staging,
    /// Recorded after the copy out of this slot; the slot is refilled only once it completes.
    copied: Event,
}

enum Staging {
    Pinned(PinnedBuffer),
    Pageable(HostBuffer),
}

impl Staging {
    fn as_mut_slice(&mut self) -> &mut [u8] {
        match self {
            Staging::Pinned(buffer) => buffer.as_mut_slice(),
            Staging::Pageable(buffer) => buffer.as_mut_slice(),
        }
    }
}

/// Host bytes charged to the context's host counter while this lives.
struct CountedCharge {
    bytes: u64,
    host: Arc<MemoryCounter>,
}

impl Drop for CountedCharge {
    fn drop(&mut self) {
        self.host.uncharge(self.bytes);
    }
}

/// A host copy pinned in place; unpinned when dropped (before its memory is freed).
struct PinnedHost {
    start: usize,
    chunks: Vec<*const u8>,
    shared: Arc<Shared>,
}

// SAFETY: the pointers only name registered ranges for cuMemHostUnregister.
unsafe impl Send for PinnedHost {}
// SAFETY: as above; nothing reads through them.
unsafe impl Sync for PinnedHost {}

/// The kernels of `kernels/convert.cu`, by the dtypes they read and write.
struct Kernels {
    /// Plain conversions, by (source, destination): into f32/f16/bf16, and casts into fp8.
    convert: HashMap<(DType, DType), Function>,
    /// The absmax quantization's steps: `absmax` by source, `scales` by fp8 format, `quantize`
    /// by (source, fp8 format).
    clear: Function,
    absmax: HashMap<DType, Function>,
    scales: HashMap<DType, Function>,
    quantize: HashMap<(DType, DType), Function>,
}

impl Kernels {
    fn load(module: &Module) -> Result<Kernels> {
        let mut kernels = Kernels {
            convert: HashMap::new(),
            clear: module.function("strata_absmax_clear")?,
            absmax: HashMap::new(),
            scales: HashMap::new(),
            quantize: HashMap::new(),
        };
        let sources = DType::floats()
            .iter()
            .filter_map(|&d| Some((d, kernel_dtype_name(d)?)));
        let targets = [
            DType::F32,
            DType::F16,
            DType::BF16,
            DType::F8E4M3,
            DType::F8E5M2,
        ];
        for (src, from) in sources {
            for dst in targets {
                let to = kernel_dtype_name(dst).expect("a kernel dtype");
                // fp8 into itself is a cast of scaled data to plain.
                if src != dst || dst.is_fp8() {
                    let name = format!("strata_convert_{from}_to_{to}");
                    kernels.convert.insert((src, dst), module.function(&name)?);
                }
                if dst.is_fp8() {
                    let name = format!("strata_quantize_{from}_to_{to}");
                    kernels.quantize.insert((src, dst), module.function(&name)?);
                }
            }
            let absmax = module.function(&format!("strata_absmax_{from}"))?;
            kernels.absmax.insert(src, absmax);
            if src.is_fp8() {
                let scales = module.function(&format!("strata_scales_{from}"))?;
                kernels.scales.insert(src, scales);
            }
        }
        Ok(kernels)
    }
}

/// Where a tensor on the host that needs absmax quantization into fp8 is quantized: the one
/// choice of the upload path (every other conversion of a host tensor, a plain cast, costs the
/// host about a copy and crosses already converted).
///
/// The rule: **on the device whenever it can be**, that is when a kernel reads the source dtype
/// (f32, f16, bf16, fp8; not f64) and the budget leaves device memory unused for the source's
/// bytes beside what is live and pooled (or a pooled buffer of that size is free): the source
/// then crosses in its own dtype into that scratch memory, and the kernels quantize it into the
/// slot. Otherwise host threads quantize it and fp8 crosses. `STRATA_CUDA_QUANTIZE=host` makes
/// every such upload quantize on the host.
///
/// Why: on the host, quantization costs CPU time for every byte (two passes, a division per
/// element: 0.44 GB/s on one core before vectorising, issue 20), while the GPU quantizes at
/// memory speed; on the device it costs bus bytes: a bf16 source crosses as 2 bytes per
/// parameter instead of 1. With the bus at B bytes/s and the host quantizing H parameters/s,
/// the host path moves min(H, B) parameters/s and the device path B / 2 (B / 4 from f32): the
/// device path is slower only when the host quantizes faster than B / 2, 12.5 G parameters/s
/// on PCIe Gen4, which no host reaches on the cores a framework leaves free; and it leaves those
/// cores alone. The host path remains where device memory is what is short: the scratch never
/// takes budget the layers need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum QuantizeOn {
    /// On the device where a kernel and device memory allow it (the default).
    Device,
    /// Always on the host (`STRATA_CUDA_QUANTIZE=host`).
    Host,
}

impl QuantizeOn {
    /// The rule as `STRATA_CUDA_QUANTIZE` sets it: "host" or "device" (the default when unset);
    /// Err with the value otherwise.
    fn from_setting(setting: Option<&str>) -> std::result::Result<QuantizeOn, String> {
        match setting.map(str::trim) {
            None | Some("") | Some("device") => Ok(QuantizeOn::Device),
            Some("host") => Ok(QuantizeOn::Host),
            Some(other) => Err(other.to_string()),
        }
    }
}

/// A tensor's data (and fp8 scales, 0 when unscaled) in device memory.
struct DeviceTensor {
    data: u64,
    dtype: DType,
    numel: usize,
    scales: u64,
    scale_count: usize,
}

fn kernel_dtype_name(dtype: DType) -> Option<&'static str> {
    Some(match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::F8E4M3 => "f8e4m3",
        DType::F8E5M2 => "f8e5m2",
        _ => return None,
    })
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
                kernels: Kernels::load(&module)?,
                _module: module,
                quantize_uploads,
                pool: Mutex::default(),
                ring: Mutex::new(None),
                spare_events: Mutex::default(),
                pinned: Mutex::default(),
                cap: AtomicU64::new(u64::MAX),
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

    /// Hands device memory back to the driver, once nothing in flight can touch it.
    fn release(&self, pool: &mut Pool, buffers: Vec<Pooled>) -> Result<()> {
        if buffers.is_empty() {
            return Ok(());
        }
        // A conversion on the copy stream may still read a buffer that left.
        let mut outcome = self.res().stream.synchronize();
        for buffer in buffers {
            pool.pooled -= buffer.len as u64;
            let done = buffer
                .uses
                .iter()
                .try_for_each(|(_, event)| event.synchronize());
            // A buffer whose last use cannot be confirmed finished is left to the driver (it
            // frees it with the context) rather than freed under a running kernel.
            let freed = done.and_then(|()| driver::free(buffer.pointer));
            outcome = outcome.and(freed);
            self.recycle(std::iter::once(buffer.ready).chain(buffer.uses.into_iter().map(|u| u.1)));
        }
        outcome
    }

    /// Frees pooled buffers, oldest first, until `bytes` more fit under the cap: the budget's
    /// limit, or the most the budget has held live since the limit was set (budget 0 holds the
    /// streaming window, and the pool may keep that much for reuse).
    fn trim(&self, pool: &mut Pool, bytes: u64) -> Result<()> {
        let cap = self.res().cap.load(Ordering::Relaxed).max(pool.live_peak);
        let mut held = pool.live + pool.pooled;
        let mut freed = Vec::new();
        while !pool.free.is_empty() && held + bytes > cap {
            let oldest = pool.free.remove(0);
            held -= oldest.len as u64;
            freed.push(oldest);
        }
        self.release(pool, freed)
    }

    /// A pooled buffer of exactly `bytes`, once the copy stream waits for the callers' last
    /// reads of it; None when the pool has none.
    fn reuse(&self, pool: &mut Pool, bytes: usize) -> Result<Option<(u64, Event)>> {
        let Some(i) = pool.free.iter().position(|b| b.len == bytes) else {
            return Ok(None);
        };
        let reused = pool.free.swap_remove(i);
        pool.pooled -= bytes as u64;
        let stream = self.res().stream.0;
        let waited: Result<()> = reused
            .uses
            .iter()
            .try_for_each(|(_, e)| e.make_wait(stream));
        if let Err(e) = waited {
            pool.pooled += bytes as u64;
            pool.free.push(reused);
            return Err(e);
        }
        self.recycle(reused.uses.into_iter().map(|u| u.1));
        Ok(Some((reused.pointer, reused.ready)))
    }

    fn live_buffer(self: &Arc<Self>, pointer: u64, len: usize, ready: Event) -> Buffer {
        Buffer {
            pointer,
            len,
            ready: Some(ready),
            uses: Mutex::default(),
            shared: self.clone(),
        }
    }

    /// Device memory for the source of a quantization, held only while the copy stream fills
    /// and reads it (it goes back to the pool when dropped, and only the copy stream, in order,
    /// uses pooled memory): a pooled buffer of that size, or new memory where the cap leaves
    /// room beside what is live and pooled. None otherwise, without trimming the pool: the
    /// layers' memory and its reuse come first, and the host can quantize instead.
    fn scratch(self: &Arc<Self>, bytes: usize) -> Result<Option<Buffer>> {
        let mut pool = lock(&self.res().pool);
        let pointer_and_ready = match self.reuse(&mut pool, bytes)? {
            Some(reused) => reused,
            None => {
                let cap = self.res().cap.load(Ordering::Relaxed).max(pool.live_peak);
                let held = pool.live + pool.pooled;
                if held.saturating_add(bytes as u64) > cap {
                    return Ok(None);
                }
                let ready = self.event()?;
                match self.fresh(&mut pool, bytes) {
                    Ok(pointer) => (pointer, ready),
                    Err(e) if e.status == STRATA_ERR_OUT_OF_MEMORY => {
                        self.recycle([ready]);
                        return Ok(None);
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        pool.live += bytes as u64;
        let (pointer, ready) = pointer_and_ready;
        Ok(Some(self.live_buffer(pointer, bytes, ready)))
    }

    /// Enqueues the absmax quantization of `src` (device memory) into `dst`, fp8 `dst_dtype`,
    /// with one scale per `groups` equal groups written at `dst_scales`: what
    /// `crate::convert::convert` makes on the host, bit for bit (see kernels/convert.cu). Call
    /// with the context bound and a kernel for `src.dtype` (see `quantizes`).
    fn quantize(
        &self,
        src: &DeviceTensor,
        dst: u64,
        dst_scales: u64,
        dst_dtype: DType,
        groups: usize,
    ) -> Result<()> {
        let kernels = &self.res().kernels;
        let missing = || {
            Error::invalid(format!(
                "no kernel quantizes {:?} into {dst_dtype:?}",
                src.dtype
            ))
        };
        let absmax = *kernels.absmax.get(&src.dtype).ok_or_else(missing)?;
        let scales = *kernels.scales.get(&dst_dtype).ok_or_else(missing)?;
        let quantize = *kernels
            .quantize
            .get(&(src.dtype, dst_dtype))
            .ok_or_else(missing)?;
        if groups == 0 {
            return Ok(());
        }
        let stream = self.res().stream.0;
        let numel = src.numel as u64;
        let row_len = numel / groups as u64;
        let src_row_len = numel.checked_div(src.scale_count as u64).unwrap_or(0);
        let groups = groups as u64;
        driver::launch(kernels.clear, groups, stream, &mut [dst_scales, groups])?;
        if numel > 0 {
            let mut params = [
                src.data,
                src.scales,
                dst_scales,
                numel,
                src_row_len,
                row_len,
            ];
            driver::launch(absmax, numel.min(ABSMAX_THREADS), stream, &mut params)?;
        }
        driver::launch(scales, groups, stream, &mut [dst_scales, groups])?;
        if numel > 0 {
            let mut params = [
                src.data,
                src.scales,
                dst,
                dst_scales,
                numel,
                src_row_len,
                row_len,
            ];
            driver::launch(quantize, numel, stream, &mut params)?;
        }
        Ok(())
    }

    /// Whether the kernels quantize `dtype` (every float dtype but f64).
    fn quantizes(&self, dtype: DType) -> bool {
        self.res().kernels.absmax.contains_key(&dtype)
    }

    /// Uploads host `src` into `slot` (scaled fp8) and quantizes it there, when the rule at
    /// [`QuantizeOn`] says so; false when the host is to quantize it instead.
    fn quantized_on_device(
        self: &Arc<Self>,
        src: TensorBytes<'_>,
        dst: u64,
        slot: &TensorSlot,
    ) -> Result<bool> {
        let groups = slot.scale_count();
        let numel = slot.numel;
        // Anything the host conversion would refuse goes there, for its message.
        let well_formed = src.bytes.len() == numel * src.dtype.size()
            && numel.is_multiple_of(groups.max(1))
            && match src.scales.len() {
                0 => true,
                n => src.dtype.is_fp8() && (n == 1 || n == slot.rows),
            };
        if self.res().quantize_uploads == QuantizeOn::Host
            || groups == 0
            || numel == 0
            || !well_formed
            || !self.quantizes(src.dtype)
        {
            return Ok(false);
        }
        let scales_at = crate::host::align_up(src.bytes.len());
        let Some(scratch) = self.scratch(scales_at + src.scales.len() * SCALE_BYTES)? else {
            return Ok(false);
        };
        self.push(src.bytes, scratch.pointer)?;
        self.push(
            &scales_to_bytes(src.scales),
            scratch.pointer + scales_at as u64,
        )?;
        let tensor = DeviceTensor {
            data: scratch.pointer,
            dtype: src.dtype,
            numel,
            scales: match src.scales.len() {
                0 => 0,
                _ => scratch.pointer + scales_at as u64,
            },
            scale_count: src.scales.len(),
        };
        let (data, scales) = (dst + slot.offset as u64, dst + slot.scales_offset as u64);
        self.quantize(&tensor, data, scales, slot.repr.dtype, groups)?;
        // The scratch goes back to the pool; only the copy stream, after these kernels, uses it.
        drop(scratch);
        Ok(true)
    }

    fn release_all(&self, pool: &mut Pool) -> Result<()> {
        let all = std::mem::take(&mut pool.free);
        self.release(pool, all)
    }

    /// New device memory: within the headroom, and after giving pooled buffers back to the
    /// driver when it is out of memory (another user of the GPU may have taken some).
    fn fresh(&self, pool: &mut Pool, bytes: usize) -> Result<u64> {
        let headroom = self.res().headroom;
        loop {
            let retry = !pool.free.is_empty();
            if headroom > 0 {
                let (free, _) = self.context.memory_info()?;
                if (free as u64) < (bytes as u64).saturating_add(headroom) {
                    if retry {
                        self.release_all(pool)?;
                        continue;
                    }
                    return Err(Error::out_of_memory(format!(
                        "{bytes} more bytes of device memory would leave less than the {headroom} bytes of headroom \
                         asked for ({free} bytes are free on the device)"
                    )));
                }
            }
            match driver::allocate(bytes) {
                Ok(pointer) => {
                    pool.allocations += 1;
                    return Ok(pointer);
                }
                Err(e) if e.status == STRATA_ERR_OUT_OF_MEMORY && retry => {
                    self.release_all(pool)?;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Copies host bytes to `dst` on the copy stream: directly from pinned host copies, else
    /// through the staging ring.
    fn push(&self, host: &[u8], dst: u64) -> Result<()> {
        if host.is_empty() {
            return Ok(());
        }
        let stream = self.res().stream.0;
        if let Some(pinned_start) = self.pinned_start(host) {
            // One copy per registered piece: a copy spanning two registrations may be taken as
            // pageable, and run synchronously.
            let mut done = 0;
            while done < host.len() {
                let at = host.as_ptr() as usize + done;
                let piece_end =
                    pinned_start + ((at - pinned_start) / PIN_CHUNK_BYTES + 1) * PIN_CHUNK_BYTES;
                let n = (piece_end - at).min(host.len() - done);
                driver::copy_to_device(dst + done as u64, &host[done..done + n], stream)?;
                done += n;
            }
            return Ok(());
        }
        let mut ring = lock(&self.res().ring);
        if ring.is_none() {
            match self.make_ring() {
                Ok(made) => *ring = Some(made),
                Err(e) if e.status == STRATA_ERR_BUDGET => {
                    // host_limit leaves no room for staging: the driver stages pageable memory
                    // itself, and has read it when the call returns.
                    self.warn_pageable(&e.message);
                    return driver::copy_to_device(dst, host, stream);
                }
                Err(e) => return Err(e),
            }
        }
        let ring = ring.as_mut().expect("made above");
        let mut done = 0;
        while done < host.len() {
            if ring.filled == ring.slot_bytes {
                ring.current = (ring.current + 1) % ring.slots.len();
                ring.filled = 0;
                // Refilled only once the copies out of it, a round ago, are done.
                ring.slots[ring.current].copied.synchronize()?;
            }
            let n = (ring.slot_bytes - ring.filled).min(host.len() - done);
            let slot = &mut ring.slots[ring.current];
            let staged = &mut slot.memory.as_mut_slice()[ring.filled..ring.filled + n];
            staged.copy_from_slice(&host[done..done + n]);
            driver::copy_to_device(dst + done as u64, staged, stream)?;
            slot.copied.record(stream)?;
            ring.filled += n;
            done += n;
        }
        Ok(())
    }

    /// Where the pinned host copy holding all of `host` starts, if one does.
    fn pinned_start(&self, host: &[u8]) -> Option<usize> {
        let start = host.as_ptr() as usize;
        let end = start + host.len();
        lock(&self.res().pinned)
            .range(..=start)
            .next_back()
            .filter(|(_, &pinned_end)| end <= pinned_end)
            .map(|(&pinned_start, _)| pinned_start)
    }

    fn make_ring(&self) -> Result<Ring> {
        let res = self.res();
        let slot_bytes = ring_slot_bytes(res.host.limit());
        let bytes = (slot_bytes * RING_SLOTS) as u64;
        res.host.try_charge(bytes)?;
        let charge = CountedCharge {
            bytes,
            host: res.host.clone(),
        };
        let mut slots = Vec::with_capacity(RING_SLOTS);
        for _ in 0..RING_SLOTS {
            let memory = match PinnedBuffer::new(slot_bytes) {
                Ok(pinned) => Staging::Pinned(pinned),
                Err(e) => {
                    self.warn_unpinned(&e);
                    Staging::Pageable(HostBuffer::new(slot_bytes)?)
                }
            };
            slots.push(RingSlot {
                memory,
                copied: self.event()?,
            });
        }
        Ok(Ring {
            slots,
            slot_bytes,
            current: 0,
            filled: 0,
            _charge: charge,
        })
    }

    /// Says once per context why copies go through pageable memory.
    fn warn_pageable(&self, why: &str) {
        if !self.res().warned_pageable.swap(true, Ordering::Relaxed) {
            self.res().logger.log(Level::Warn, || {
                format!(
                    "{why}; copies go through pageable memory instead (slower, and they cannot \
                     overlap compute as well)"
                )
            });
        }
    }

    fn warn_unpinned(&self, error: &Error) {
        self.warn_pageable(&format!(
            "{} (check the memlock limit, `ulimit -l`)",
            error.message
        ));
    }

    /// Host bytes the same size as `slot`'s data and scales, converted from `src` on the host:
    /// for uploads into another dtype (see `QuantizeOn`), and the conversions no kernel makes
    /// (from f64).
    fn converted_on_host(&self, src: TensorBytes<'_>, slot: &TensorSlot) -> Result<CountedBuffer> {
        let data = slot.data_bytes();
        let mut out = CountedBuffer::staging(data + slot.scale_bytes(), &self.res().host)?;
        let (bytes, scale_bytes) = out.buffer.as_mut_slice().split_at_mut(data);
        let scales = crate::convert::convert_with(
            src,
            slot.rows,
            bytes,
            slot.repr.dtype,
            slot.repr.quant,
            self.res().conversions,
        )?;
        write_scales(scale_bytes, &scales);
        Ok(out)
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Without a context nothing can be freed properly; the driver reclaims it at exit.
        if let Ok(_bound) = self.context.bind() {
            let _ = self.res().stream.synchronize();
            let mut pool = std::mem::take(&mut *lock(&self.res().pool));
            let _ = self.release_all(&mut pool);
            lock(&self.res().ring).take();
            // SAFETY: dropped exactly once, here, with the context current; nothing uses the
            // resources afterwards (every Buffer and PinnedHost holding this Shared is gone).
            unsafe { ManuallyDrop::drop(&mut self.resources) };
        }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        let Some(ready) = self.ready.take() else {
            return;
        };
        let uses = std::mem::take(&mut *lock(&self.uses));
        let mut pool = lock(&self.shared.res().pool);
        pool.live -= self.len as u64;
        if self.len == 0 {
            self.shared
                .recycle(std::iter::once(ready).chain(uses.into_iter().map(|u| u.1)));
            return;
        }
        pool.pooled += self.len as u64;
        // What was live is now pooled: the total held stays where it was, within the cap.
        pool.free.push(Pooled {
            pointer: self.pointer,
            len: self.len,
            ready,
            uses,
        });
    }
}

impl Drop for PinnedHost {
    fn drop(&mut self) {
        // Forgotten first, whatever happens next: memory mapped later at the same address is not
        // pinned.
        lock(&self.shared.res().pinned).remove(&self.start);
        if let Ok(_bound) = self.shared.context.bind() {
            // A copy from this memory may still be in flight.
            let _ = self.shared.res().stream.synchronize();
            for &chunk in &self.chunks {
                driver::unregister_host(chunk);
            }
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

    fn allocate(&self, bytes: usize) -> Result<DeviceMemory> {
        let shared = &self.shared;
        let _bound = shared.context.bind()?;
        let mut pool = lock(&shared.res().pool);
        let (pointer, ready) = if bytes == 0 {
            (0, shared.event()?)
        } else if let Some(reused) = shared.reuse(&mut pool, bytes)? {
            reused
        } else {
            shared.trim(&mut pool, bytes as u64)?;
            let ready = shared.event()?;
            (shared.fresh(&mut pool, bytes)?, ready)
        };
        pool.live += bytes as u64;
        pool.live_peak = pool.live_peak.max(pool.live);
        let buffer = shared.live_buffer(pointer, bytes, ready);
        Ok(DeviceMemory {
            addr: pointer,
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
        } else if !shared.quantized_on_device(src, dst.addr, slot)? {
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
        if !src.scales.is_empty() {
            return Err(Error::invalid(
                "a scaled tensor converts whole, not in parts",
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
        let shared = &self.shared;
        let _bound = shared.context.bind()?;
        let stream = shared.res().stream.0;
        let (from, to) = (src_slot.repr.dtype, dst_slot.repr.dtype);
        let scale_count = src_slot.scale_count();
        if from == to && scale_count == dst_slot.scale_count() {
            driver::copy_on_device(
                dst.addr + dst_slot.offset as u64,
                src.addr + src_slot.offset as u64,
                src_slot.data_bytes(),
                stream,
            )?;
            if scale_count > 0 {
                driver::copy_on_device(
                    dst.addr + dst_slot.scales_offset as u64,
                    src.addr + src_slot.scales_offset as u64,
                    src_slot.scale_bytes(),
                    stream,
                )?;
            }
        } else if dst_slot.scale_count() > 0 && shared.quantizes(from) {
            let source = DeviceTensor {
                data: src.addr + src_slot.offset as u64,
                dtype: from,
                numel: src_slot.numel,
                scales: match scale_count {
                    0 => 0,
                    _ => src.addr + src_slot.scales_offset as u64,
                },
                scale_count,
            };
            let (data, scales) = (
                dst.addr + dst_slot.offset as u64,
                dst.addr + dst_slot.scales_offset as u64,
            );
            shared.quantize(&source, data, scales, to, dst_slot.scale_count())?;
        } else if let Some(&kernel) = shared.res().kernels.convert.get(&(from, to)) {
            if dst_slot.scale_count() != 0 {
                return Err(Error::invalid("a kernel target is never scaled"));
            }
            let numel = src_slot.numel as u64;
            if numel > 0 {
                let scales = match scale_count {
                    0 => 0,
                    _ => src.addr + src_slot.scales_offset as u64,
                };
                let row_len = numel / scale_count.max(1) as u64;
                let mut params = [
                    src.addr + src_slot.offset as u64,
                    dst.addr + dst_slot.offset as u64,
                    scales,
                    numel,
                    row_len,
                ];
                driver::launch(kernel, numel, stream, &mut params)?;
            }
        } else {
            // A dtype no kernel reads (f64): through the host, after the copies that filled the
            // source have landed (the copies out wait for them on the stream).
            let stream = &shared.res().stream;
            // The tensor alone on the host, its scales right after it, counted in host_limit.
            let local = TensorSlot {
                offset: 0,
                scales_offset: src_slot.data_bytes(),
                ..*src_slot
            };
            let mut host = CountedBuffer::new(
                local.scales_offset + local.scale_bytes(),
                &shared.res().host,
            )?;
            let (data, scales) = host.buffer.as_mut_slice().split_at_mut(local.scales_offset);
            stream.copy_to_host(data, src.addr + src_slot.offset as u64)?;
            stream.copy_to_host(scales, src.addr + src_slot.scales_offset as u64)?;
            let (data, scales) = slot_contents(&local, host.buffer.as_slice())?;
            let source = TensorBytes {
                bytes: data,
                dtype: from,
                scales: &scales,
            };
            let converted = shared.converted_on_host(source, dst_slot)?;
            let (data, scales) = converted.buffer.as_slice().split_at(dst_slot.data_bytes());
            shared.push(data, dst.addr + dst_slot.offset as u64)?;
            shared.push(scales, dst.addr + dst_slot.scales_offset as u64)?;
        }
        buffer.written()
    }

    fn check_stream(&self, stream: usize) -> Result<()> {
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
                "the stream is being captured into a CUDA graph: acquire and release outside the \
                 capture (strata's copies and events cannot be part of a graph)",
            ));
        }
        Ok(())
    }

    fn ready_for(&self, memory: &DeviceMemory, stream: usize) -> Result<()> {
        let buffer = self.buffer(memory)?;
        let _bound = self.shared.context.bind()?;
        buffer
            .ready()
            .make_wait(stream as cudarc::driver::sys::CUstream)
    }

    fn used_until(&self, memory: &DeviceMemory, stream: usize) -> Result<()> {
        let buffer = self.buffer(memory)?;
        let _bound = self.shared.context.bind()?;
        let mut uses = lock(&buffer.uses);
        let raw = stream as cudarc::driver::sys::CUstream;
        let caller = CallerStream::of(stream);
        // A later use on the same stream covers an earlier one: keep one event per stream.
        if let Some((_, event)) = uses.iter().find(|(s, _)| *s == caller) {
            return event.record(raw);
        }
        let event = self.shared.event()?;
        event.record(raw)?;
        uses.push((caller, event));
        Ok(())
    }

    fn pin_host(&self, bytes: &[u8]) -> Option<Box<dyn Any + Send + Sync>> {
        if bytes.len() < MIN_PINNED_BYTES {
            return None;
        }
        let shared = &self.shared;
        let bound = match shared.context.bind() {
            Ok(bound) => bound,
            Err(e) => {
                shared.warn_unpinned(&e);
                return None;
            }
        };
        let start = bytes.as_ptr();
        let page = page_size();
        let len = bytes.len().div_ceil(page) * page;
        let mut chunks = Vec::new();
        for offset in (0..len).step_by(PIN_CHUNK_BYTES) {
            // SAFETY: `offset` < `len`, within the page-rounded allocation (host copies this
            // large are whole-page mappings).
            let chunk = unsafe { start.add(offset) };
            if let Err(e) = driver::register_host(chunk, (len - offset).min(PIN_CHUNK_BYTES)) {
                for &done in &chunks {
                    driver::unregister_host(done);
                }
                shared.warn_unpinned(&e);
                return None;
            }
            chunks.push(chunk);
        }
        drop(bound);
        lock(&shared.res().pinned).insert(start as usize, start as usize + bytes.len());
        Some(Box::new(PinnedHost {
            start: start as usize,
            chunks,
            shared: shared.clone(),
        }))
    }

    fn staging_host_bytes(&self, host_limit: u64) -> u64 {
        let made = lock(&self.shared.res().ring)
            .as_ref()
            .map(|ring| ring.slot_bytes);
        (made.unwrap_or_else(|| ring_slot_bytes(host_limit)) * RING_SLOTS) as u64
    }

    fn set_memory_cap(&self, bytes: u64) -> Result<()> {
        let shared = &self.shared;
        shared.res().cap.store(bytes, Ordering::Relaxed);
        let _bound = shared.context.bind()?;
        let mut pool = lock(&shared.res().pool);
        pool.live_peak = pool.live;
        shared.trim(&mut pool, 0)
    }

    fn release_idle(&self) -> Result<()> {
        let shared = &self.shared;
        let _bound = shared.context.bind()?;
        // The ring's last copies may still be reading it.
        shared.res().stream.synchronize()?;
        lock(&shared.res().ring).take();
        let mut pool = lock(&shared.res().pool);
        shared.release_all(&mut pool)
    }

    fn allocations(&self) -> u64 {
        lock(&self.shared.res().pool).allocations
    }
}

impl Buffer {
    fn ready(&self) -> &Event {
        self.ready.as_ref().expect("live buffers have their event")
    }

    /// Records that everything enqueued on the copy stream so far is part of this buffer's fill.
    fn written(&self) -> Result<()> {
        self.ready().record(self.shared.res().stream.0)
    }
}

/// The staging ring's buffers take a quarter of `host_limit` at most, within bounds that keep
/// copies large enough to run at full speed.
fn ring_slot_bytes(host_limit: u64) -> usize {
    usize::try_from(host_limit / (4 * RING_SLOTS as u64))
        .unwrap_or(usize::MAX)
        .clamp(MIN_RING_SLOT_BYTES, RING_SLOT_BYTES)
}

fn page_size() -> usize {
    // SAFETY: sysconf only reads a system setting.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096).max(1)
}

#[cfg(test)]
mod tests {
    use super::QuantizeOn;

    #[test]
    fn strata_cuda_quantize_chooses_where_uploads_quantize() {
        assert_eq!(QuantizeOn::from_setting(None), Ok(QuantizeOn::Device));
        assert_eq!(QuantizeOn::from_setting(Some("")), Ok(QuantizeOn::Device));
        assert_eq!(
            QuantizeOn::from_setting(Some("device")),
            Ok(QuantizeOn::Device)
        );
        assert_eq!(
            QuantizeOn::from_setting(Some(" host\n")),
            Ok(QuantizeOn::Host)
        );
        assert_eq!(
            QuantizeOn::from_setting(Some("gpu")),
            Err("gpu".to_string())
        );
    }
}
