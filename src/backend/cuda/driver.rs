//! The CUDA driver calls the backend makes, each wrapped once: results become strata errors that
//! name what was being done, and handles strata creates are owned values that free themselves.
//!
//! Everything goes through cudarc's `sys`/`result` layers rather than its safe `CudaContext`:
//! that one makes its context current on every call without restoring the caller's, and tracks
//! events per slice; strata needs the caller's context left as it was and its own event discipline.

use crate::error::{Error, Result};
use cudarc::driver::result::{self, DriverError};
use cudarc::driver::sys;
use std::ffi::c_void;
use std::marker::PhantomData;

/// Turns a driver result into a strata error that says what failed. Out of memory keeps its own
/// status: the context evicts and retries on it.
pub(super) fn check(result: std::result::Result<(), DriverError>, doing: &str) -> Result<()> {
    result.map_err(|e| driver_error(e, doing))
}

pub(super) fn driver_error(error: DriverError, doing: &str) -> Error {
    let name = error
        .error_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("{:?}", error.0));
    let text = error
        .error_string()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let message = format!("{doing}: {name} ({text})");
    if error.0 == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        Error::out_of_memory(message)
    } else {
        Error::device(message)
    }
}

/// The device's primary context, retained for as long as this lives: the one the CUDA runtime
/// (PyTorch, cuBLAS) uses, so pointers and streams pass between them freely. Released, never
/// destroyed: strata did not create it.
pub(super) struct PrimaryContext {
    pub(super) device: sys::CUdevice,
    pub(super) raw: sys::CUcontext,
}

// SAFETY: a CUcontext handle may be used from any thread; the driver serialises what needs it.
unsafe impl Send for PrimaryContext {}
// SAFETY: as above; strata only passes the handle to driver calls.
unsafe impl Sync for PrimaryContext {}

impl PrimaryContext {
    pub(super) fn retain(ordinal: i32) -> Result<PrimaryContext> {
        let device =
            result::device::get(ordinal).map_err(|e| driver_error(e, "finding the device"))?;
        // SAFETY: `device` came from cuDeviceGet; the retain is balanced by the release in Drop.
        let raw = unsafe { result::primary_ctx::retain(device) }
            .map_err(|e| driver_error(e, "retaining the device's primary context"))?;
        Ok(PrimaryContext { device, raw })
    }

    /// Makes the context current on this thread until the guard drops, then restores whatever
    /// the calling thread had current before (the host may use its own contexts).
    ///
    /// While bound, the thread's stream-capture mode is relaxed. Strata's allocations, pinning
    /// and synchronisations never belong in a graph, and a capture in global mode on any other
    /// thread (PyTorch's `torch.cuda.graph` default) would otherwise refuse them and be
    /// invalidated by them.
    pub(super) fn bind(&self) -> Result<Bound> {
        check(
            // SAFETY: `raw` is a retained, live context.
            unsafe { sys::cuCtxPushCurrent_v2(self.raw) }.result(),
            "making the device's context current",
        )?;
        let mut previous_mode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED;
        // SAFETY: swaps this thread's mode through a valid pointer; Bound's drop swaps it back.
        let relaxed = unsafe { sys::cuThreadExchangeStreamCaptureMode(&mut previous_mode) };
        if let Err(e) = relaxed.result() {
            pop_current();
            return Err(driver_error(
                e,
                "relaxing this thread's stream-capture mode",
            ));
        }
        Ok(Bound {
            previous_mode,
            not_send: PhantomData,
        })
    }

    pub(super) fn memory_info(&self) -> Result<(usize, usize)> {
        let _bound = self.bind()?;
        result::mem_get_info().map_err(|e| driver_error(e, "reading the device's free memory"))
    }
}

impl Drop for PrimaryContext {
    fn drop(&mut self) {
        // SAFETY: balances the retain in `retain`; the handle is not used afterwards.
        let _ = unsafe { result::primary_ctx::release(self.device) };
    }
}

/// Strata's context is current on this thread, with capture mode relaxed, while this lives. Not
/// `Send`: both are per thread.
pub(super) struct Bound {
    previous_mode: sys::CUstreamCaptureMode,
    not_send: PhantomData<*const ()>,
}

impl Drop for Bound {
    fn drop(&mut self) {
        // SAFETY: restores the mode `bind` swapped out, on this same thread.
        let _ = unsafe { sys::cuThreadExchangeStreamCaptureMode(&mut self.previous_mode) };
        pop_current();
    }
}

/// Pops the context `bind` pushed; call on the thread that pushed it.
fn pop_current() {
    let mut popped = std::ptr::null_mut();
    // SAFETY: pops exactly the context `bind` pushed on this same thread.
    let _ = unsafe { sys::cuCtxPopCurrent_v2(&mut popped) };
}

/// A stream strata created, destroyed with it. Non-blocking: work the caller puts on the legacy
/// default stream does not serialise with strata's copies; events order them instead.
pub(super) struct Stream(pub(super) sys::CUstream);

// SAFETY: stream handles may be used from any thread.
unsafe impl Send for Stream {}
// SAFETY: as above.
unsafe impl Sync for Stream {}

impl Stream {
    /// Call with the context bound.
    pub(super) fn new() -> Result<Stream> {
        result::stream::create(result::stream::StreamKind::NonBlocking)
            .map(Stream)
            .map_err(|e| driver_error(e, "creating the copy stream"))
    }

    /// Blocks the calling thread until everything enqueued so far has run.
    pub(super) fn synchronize(&self) -> Result<()> {
        // SAFETY: a live stream strata created.
        check(
            unsafe { result::stream::synchronize(self.0) },
            "waiting for the copy stream",
        )
    }

    /// Copies device memory to the host after the work enqueued so far, and waits for it. On
    /// this stream rather than the legacy one, which a graph captured on a blocking stream
    /// would forbid.
    pub(super) fn copy_to_host(&self, dst: &mut [u8], src: sys::CUdeviceptr) -> Result<()> {
        check(
            // SAFETY: `dst` is writable for its length and outlives the copy (waited for below);
            // `src` is live device memory at least as long.
            unsafe { result::memcpy_dtoh_async(dst, src, self.0) },
            "copying from the device",
        )?;
        self.synchronize()
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once; the owner binds the context around drops.
        let _ = unsafe { result::stream::destroy(self.0) };
    }
}

/// An event without timing (the cheap kind), destroyed with it.
pub(super) struct Event(pub(super) sys::CUevent);

// SAFETY: event handles may be used from any thread.
unsafe impl Send for Event {}
// SAFETY: as above.
unsafe impl Sync for Event {}

impl Event {
    /// Call with the context bound.
    pub(super) fn new() -> Result<Event> {
        result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
            .map(Event)
            .map_err(|e| driver_error(e, "creating an event"))
    }

    /// Marks the point `stream` has reached: the event completes when the work before it has run.
    pub(super) fn record(&self, stream: sys::CUstream) -> Result<()> {
        // SAFETY: a live event; the stream is strata's or one the caller vouched for.
        check(
            unsafe { result::event::record(self.0, stream) },
            "recording an event",
        )
    }

    /// Makes `stream` wait, on the device, for the work before the event's last record.
    pub(super) fn make_wait(&self, stream: sys::CUstream) -> Result<()> {
        // SAFETY: as in `record`.
        check(
            unsafe {
                result::stream::wait_event(
                    stream,
                    self.0,
                    sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                )
            },
            "making a stream wait for an event",
        )
    }

    /// Blocks the calling thread until the event completes (at once when never recorded).
    pub(super) fn synchronize(&self) -> Result<()> {
        // SAFETY: a live event.
        check(
            unsafe { result::event::synchronize(self.0) },
            "waiting for an event",
        )
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once. An event destroyed before it completes has
        // its resources released when it does; waits already enqueued on it are unaffected.
        let _ = unsafe { result::event::destroy(self.0) };
    }
}

/// The context a stream belongs to (the current one for the legacy default stream, NULL). A
/// handle the driver does not know (a destroyed stream, say) is the caller's error.
pub(super) fn stream_context(stream: sys::CUstream) -> Result<sys::CUcontext> {
    let mut context = std::ptr::null_mut();
    // SAFETY: writes one handle into `context`; the driver checks the stream handle.
    let found = unsafe { sys::cuStreamGetCtx(stream, &mut context) }.result();
    match found {
        Ok(()) => Ok(context),
        Err(e)
            if matches!(
                e.0,
                sys::CUresult::CUDA_ERROR_INVALID_HANDLE
                    | sys::CUresult::CUDA_ERROR_CONTEXT_IS_DESTROYED
            ) =>
        {
            let cause = driver_error(e, "checking the caller's stream");
            Err(Error::invalid(format!(
                "the stream is not a live CUDA stream (destroyed, or not a stream handle): {}",
                cause.message
            )))
        }
        Err(e) => Err(driver_error(e, "checking the caller's stream")),
    }
}

/// The context current on the calling thread (null when there is none).
pub(super) fn current_context() -> Result<sys::CUcontext> {
    let mut context = std::ptr::null_mut();
    check(
        // SAFETY: writes one handle into `context`.
        unsafe { sys::cuCtxGetCurrent(&mut context) }.result(),
        "reading the calling thread's CUDA context",
    )?;
    Ok(context)
}

/// Whether work on `stream` is being captured into a CUDA graph, or, for the legacy default
/// stream, would join a capture (the driver's CUDA_ERROR_STREAM_CAPTURE_IMPLICIT: a blocking
/// stream it synchronises with is being captured). Call with the context bound.
pub(super) fn is_capturing(stream: sys::CUstream) -> Result<bool> {
    let mut status = sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
    // SAFETY: writes one status into `status`; the driver checks the stream handle.
    match unsafe { sys::cuStreamIsCapturing(stream, &mut status) }.result() {
        Ok(()) => Ok(status != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE),
        Err(e) if e.0 == sys::CUresult::CUDA_ERROR_STREAM_CAPTURE_IMPLICIT => Ok(true),
        Err(e) => Err(driver_error(
            e,
            "checking whether the caller's stream is being captured",
        )),
    }
}

/// Device memory from cuMemAlloc. Call with the context bound.
pub(super) fn allocate(bytes: usize) -> Result<sys::CUdeviceptr> {
    // SAFETY: allocates fresh memory; the caller frees it with `free` exactly once.
    unsafe { result::malloc_sync(bytes) }
        .map_err(|e| driver_error(e, &format!("allocating {bytes} bytes of device memory")))
}

/// The page device `ordinal` maps its memory in (cuMemGetAllocationGranularity, at its
/// minimum: 2 MiB on current GPUs).
pub(super) fn allocation_page(ordinal: i32) -> Result<usize> {
    let properties = sys::CUmemAllocationProp {
        type_: sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED,
        requestedHandleTypes: sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_NONE,
        location: sys::CUmemLocation {
            type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
            id: ordinal,
        },
        win32HandleMetaData: std::ptr::null_mut(),
        allocFlags: sys::CUmemAllocationProp_st__bindgen_ty_1 {
            compressionType: 0,
            gpuDirectRDMACapable: 0,
            usage: 0,
            reserved: [0; 4],
        },
    };
    let mut page = 0usize;
    check(
        // SAFETY: reads `properties` and writes one size into `page`.
        unsafe {
            sys::cuMemGetAllocationGranularity(
                &mut page,
                &properties,
                sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_MINIMUM,
            )
        }
        .result(),
        "reading the device's allocation granularity",
    )?;
    Ok(page)
}

/// Frees memory from `allocate`. Call with the context bound and no work left that touches it.
pub(super) fn free(pointer: sys::CUdeviceptr) -> Result<()> {
    // SAFETY: the caller passes a pointer from `allocate`, once, with nothing in flight on it.
    check(
        unsafe { result::free_sync(pointer) },
        "freeing device memory",
    )
}

/// Enqueues a host → device copy on `stream`. The host bytes must stay unchanged until the copy
/// has run: pinned memory is read by the copy engine later, pageable memory is staged by the
/// driver before the call returns.
pub(super) fn copy_to_device(
    dst: sys::CUdeviceptr,
    src: &[u8],
    stream: sys::CUstream,
) -> Result<()> {
    // SAFETY: `src` is readable for its length (and kept alive by the caller, see above); `dst`
    // is device memory of at least that length (checked by the callers' slot bounds).
    check(
        unsafe { result::memcpy_htod_async(dst, src, stream) },
        "copying to the device",
    )
}

/// Enqueues a device → device copy on `stream`.
pub(super) fn copy_on_device(
    dst: sys::CUdeviceptr,
    src: sys::CUdeviceptr,
    bytes: usize,
    stream: sys::CUstream,
) -> Result<()> {
    // SAFETY: both ranges lie in live device buffers (the callers check slot bounds).
    check(
        unsafe { result::memcpy_dtod_async(dst, src, bytes, stream) },
        "copying on the device",
    )
}

/// Page-locked host memory from cuMemHostAlloc, freed with it.
pub(super) struct PinnedBuffer {
    pointer: *mut u8,
    len: usize,
}

// SAFETY: owns its allocation exclusively, like a Box<[u8]>.
unsafe impl Send for PinnedBuffer {}
// SAFETY: shared access only reads.
unsafe impl Sync for PinnedBuffer {}

impl PinnedBuffer {
    /// Call with the context bound.
    pub(super) fn new(len: usize) -> Result<PinnedBuffer> {
        // SAFETY: allocates fresh pinned memory, freed once in Drop.
        let pointer = unsafe { result::malloc_host(len, 0) }
            .map_err(|e| driver_error(e, &format!("allocating {len} bytes of pinned memory")))?;
        Ok(PinnedBuffer {
            pointer: pointer.cast(),
            len,
        })
    }

    pub(super) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `len` bytes allocated in `new`, exclusively ours through &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.pointer, self.len) }
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `new`, freed once; owners wait for copies from it first.
        let _ = unsafe { result::free_host(self.pointer.cast::<c_void>()) };
    }
}

/// Registers existing host memory as page-locked, in place, for every CUDA context of the
/// process (portable). Call with the context bound. `Ok(false)`: the range was registered
/// already (a host store's layer another context pinned), and stays so until its registrant
/// unregisters it. Memory mapped read-only (a named host store) is registered as such.
pub(super) fn register_host(start: *const u8, len: usize) -> Result<bool> {
    let register = |flags| {
        // SAFETY: the range is a live allocation of the caller's, which unregisters it before
        // freeing it.
        unsafe { sys::cuMemHostRegister_v2(start as *mut c_void, len, flags) }
    };
    let mut result = register(sys::CU_MEMHOSTREGISTER_PORTABLE);
    if result == sys::CUresult::CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED {
        return Ok(false);
    }
    if result != sys::CUresult::CUDA_SUCCESS {
        let read_only = sys::CU_MEMHOSTREGISTER_PORTABLE | sys::CU_MEMHOSTREGISTER_READ_ONLY;
        if register(read_only) == sys::CUresult::CUDA_SUCCESS {
            result = sys::CUresult::CUDA_SUCCESS;
        }
    }
    check(
        result.result(),
        &format!("pinning {len} bytes of host memory"),
    )?;
    Ok(true)
}

/// Undoes `register_host` for the range starting at `start`. Call with the context bound.
pub(super) fn unregister_host(start: *const u8) {
    // SAFETY: `start` begins a range registered by `register_host`, unregistered once.
    let _ = unsafe { sys::cuMemHostUnregister(start as *mut c_void) };
}

/// A module loaded from PTX text, unloaded with it.
pub(super) struct Module(sys::CUmodule);

// SAFETY: module and function handles may be used from any thread.
unsafe impl Send for Module {}
// SAFETY: as above.
unsafe impl Sync for Module {}

impl Module {
    /// Loads NUL-terminated PTX; the driver compiles it for the device. Call with the context
    /// bound.
    pub(super) fn load(ptx: &std::ffi::CStr) -> Result<Module> {
        // SAFETY: `ptx` is a NUL-terminated image that outlives the call.
        unsafe { result::module::load_data(ptx.as_ptr().cast()) }
            .map(Module)
            .map_err(|e| driver_error(e, "loading strata's conversion kernels (PTX)"))
    }

    pub(super) fn function(&self, name: &str) -> Result<Function> {
        let c_name = std::ffi::CString::new(name).expect("kernel names have no NUL");
        // SAFETY: a live module; the function handle lives as long as it.
        unsafe { result::module::get_function(self.0, c_name) }
            .map(Function)
            .map_err(|e| driver_error(e, &format!("finding kernel {name}")))
    }
}

impl Drop for Module {
    fn drop(&mut self) {
        // SAFETY: loaded in `load`, unloaded once; the owner binds the context and waits for
        // launched kernels first.
        let _ = unsafe { result::module::unload(self.0) };
    }
}

/// A kernel of a loaded module, valid while the module is.
#[derive(Clone, Copy)]
pub(super) struct Function(sys::CUfunction);

// SAFETY: function handles may be used from any thread.
unsafe impl Send for Function {}
// SAFETY: as above.
unsafe impl Sync for Function {}

/// Launches `function` over `threads` threads in blocks of 256 on `stream`, with 64-bit params.
pub(super) fn launch(
    function: Function,
    threads: u64,
    stream: sys::CUstream,
    params: &mut [u64],
) -> Result<()> {
    const BLOCK: u64 = 256;
    // The kernels loop over a grid stride, so the grid need not cover every element.
    let blocks = threads.div_ceil(BLOCK).clamp(1, 65535) as u32;
    let mut pointers: Vec<*mut c_void> = params
        .iter_mut()
        .map(|p| p as *mut u64 as *mut c_void)
        .collect();
    // SAFETY: `function` is a kernel of a live module whose parameters are all 64-bit values,
    // matching `params`; the launch copies the parameter values before returning.
    check(
        unsafe {
            result::launch_kernel(
                function.0,
                (blocks, 1, 1),
                (BLOCK as u32, 1, 1),
                0,
                stream,
                &mut pointers,
            )
        },
        "launching a conversion kernel",
    )
}
