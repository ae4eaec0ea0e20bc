//! The CUDA backend on a real GPU, through the C ABI. Every test skips, saying so, where no CUDA
//! driver or device exists (CI); `scripts/gpu-checks.sh` runs them on a machine with a GPU.
//!
//! Everywhere, `every_gpu_test_passes_on_the_emulated_driver` also runs them all in a child
//! process against tests/gpu/emulated_driver.cpp, a libcuda.so that runs streams, events and
//! strata's kernels on the host and is strict about ordering and memory: the backend's own code
//! then runs in CI, though only a GPU can say it is fast or that the real driver agrees.
//!
//! The reference for every byte is the CPU device running the same tiers: the host conversions
//! are exact and tested on their own, so the GPU must reproduce them bit for bit.

mod common;

use common::programs;
use common::*;
use cudarc::driver::{result, sys};
use std::borrow::Borrow;
use std::ffi::c_void;
use std::ptr;
use std::sync::Arc;

/// The tests' own kernels (see tests/gpu/checksum.cu), launched on the caller's stream.
const CHECKSUM_PTX: &str = concat!(include_str!("gpu/checksum.ptx"), "\0");

/// Set in the child process that runs these tests against the emulated driver.
const EMULATED: &str = "STRATA_TEST_EMULATED_CUDA";

/// One GPU test at a time, whatever --test-threads says: several take the device's memory on
/// purpose, and the budget and leak checks read the driver's free memory.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// How many devices the emulated driver has in the child process that runs these tests on it.
const EMULATED_DEVICES: &str = "2";

struct Gpu {
    /// The device's ordinal, whose primary context `context` is.
    ordinal: i32,
    context: Arc<cudarc::driver::CudaContext>,
    checksum: sys::CUfunction,
    spin: sys::CUfunction,
    _module: sys::CUmodule,
    /// Held by one Gpu of a test (the last of `gpus`).
    _alone: Option<std::sync::MutexGuard<'static, ()>>,
}

/// Written past the test harness's capture, so that a passing run shows what did not run.
fn skipped(test: &str, why: &str) {
    common::skip(&format!("SKIPPED {test}: {why}"));
}

/// The GPU (device 0), or None (and a visible SKIPPED line) where there is none.
fn gpu(test: &str) -> Option<Gpu> {
    gpus(test, 1).map(|mut gpus| gpus.remove(0))
}

/// Devices 0 to `count` - 1, or None (and a visible SKIPPED line) where there are fewer.
fn gpus(test: &str, count: usize) -> Option<Vec<Gpu>> {
    // SAFETY: only tries to open the driver library.
    if !unsafe { sys::is_culib_present() } {
        skipped(test, "no CUDA driver (libcuda could not be loaded)");
        return None;
    }
    let found = if result::init().is_ok() {
        result::device::get_count().unwrap_or(0) as usize
    } else {
        0
    };
    if found < count {
        skipped(
            test,
            &format!("the CUDA driver found {found} devices, not {count}"),
        );
        return None;
    }
    let alone = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut gpus: Vec<Gpu> = (0..count as i32).map(Gpu::open).collect();
    gpus.last_mut().unwrap()._alone = Some(alone);
    Some(gpus)
}

impl Gpu {
    fn open(ordinal: i32) -> Gpu {
        let context = cudarc::driver::CudaContext::new(ordinal as usize)
            .unwrap_or_else(|e| panic!("device {ordinal}'s primary context: {e}"));
        if std::env::var_os(EMULATED).is_some() {
            let device = result::device::get(ordinal).unwrap();
            let name = result::device::get_name(device).unwrap();
            assert!(
                name.contains("emulated"),
                "LD_LIBRARY_PATH did not make the emulated driver load: device {name}"
            );
        }
        context.bind_to_thread().unwrap();
        // SAFETY: NUL-terminated PTX text that outlives the call.
        let module = unsafe { result::module::load_data(CHECKSUM_PTX.as_ptr() as *const c_void) }
            .expect("the checksum kernel loads");
        // SAFETY: a live module.
        let checksum =
            unsafe { result::module::get_function(module, cstr("strata_test_checksum")) }
                .expect("the checksum kernel is there");
        // SAFETY: a live module.
        let spin = unsafe { result::module::get_function(module, cstr("strata_test_spin")) }
            .expect("the spin kernel is there");
        Gpu {
            ordinal,
            context,
            checksum,
            spin,
            _module: module,
            _alone: None,
        }
    }
}

/// A non-blocking stream of the primary context, destroyed on drop.
struct Stream(sys::CUstream);

impl Drop for Stream {
    fn drop(&mut self) {
        // SAFETY: created by `Gpu::stream`, destroyed once.
        let destroyed = unsafe { result::stream::destroy(self.0) };
        // A test already failing may have left the driver failing every call.
        if !std::thread::panicking() {
            destroyed.unwrap();
        }
    }
}

/// Device memory the test allocated, freed on drop.
struct DeviceBytes(sys::CUdeviceptr);

impl Drop for DeviceBytes {
    fn drop(&mut self) {
        // SAFETY: allocated by `Gpu::zeroed`, freed once.
        let freed = unsafe { result::free_sync(self.0) };
        if !std::thread::panicking() {
            freed.unwrap();
        }
    }
}

impl Gpu {
    fn bind(&self) {
        self.context.bind_to_thread().unwrap();
    }

    fn stream(&self) -> Stream {
        self.bind();
        Stream(result::stream::create(result::stream::StreamKind::NonBlocking).unwrap())
    }

    fn synchronize(&self, stream: sys::CUstream) {
        self.bind();
        // SAFETY: a live stream, or a default-stream handle of the calling thread.
        unsafe { result::stream::synchronize(stream) }.unwrap();
    }

    /// Device bytes, read after everything on the legacy default stream (which acquires with a
    /// NULL stream made wait for the fill).
    fn read(&self, pointer: *mut c_void, len: usize) -> Vec<u8> {
        self.bind();
        let mut out = vec![0u8; len];
        if len > 0 {
            // SAFETY: `pointer` is a view of an acquired layer with at least `len` bytes.
            unsafe { result::memcpy_dtoh_sync(&mut out, pointer as sys::CUdeviceptr) }.unwrap();
        }
        out
    }

    fn free_memory(&self) -> usize {
        self.bind();
        result::mem_get_info().unwrap().0
    }

    fn zeroed(&self, bytes: usize) -> DeviceBytes {
        self.bind();
        // SAFETY: fresh memory, zeroed before use, freed by DeviceBytes.
        unsafe {
            let pointer = result::malloc_sync(bytes).unwrap();
            result::memset_d8_sync(pointer, 0, bytes).unwrap();
            // cuMemsetD8 on device memory may return before it is done, on the legacy stream,
            // which the tests' non-blocking streams do not wait for.
            result::ctx::synchronize().unwrap();
            DeviceBytes(pointer)
        }
    }

    /// Enqueues a kernel that keeps `stream` busy for about `cycles` GPU clock cycles.
    fn spin(&self, stream: sys::CUstream, cycles: u64) {
        self.bind();
        let mut cycles = cycles;
        let mut params = [&mut cycles as *mut u64 as *mut c_void];
        // SAFETY: the kernel takes (u64).
        unsafe { result::launch_kernel(self.spin, (1, 1, 1), (1, 1, 1), 0, stream, &mut params) }
            .unwrap();
    }

    /// Enqueues the checksum of `words` 32-bit words at `data` into the u32 at `out`.
    fn checksum(
        &self,
        stream: sys::CUstream,
        data: *mut c_void,
        words: u64,
        out: sys::CUdeviceptr,
    ) {
        self.bind();
        let mut data = data as u64;
        let mut words = words;
        let mut out = out;
        let mut params = [
            &mut data as *mut u64 as *mut c_void,
            &mut words as *mut u64 as *mut c_void,
            &mut out as *mut u64 as *mut c_void,
        ];
        let blocks = words.div_ceil(256).clamp(1, 1024) as u32;
        // SAFETY: the kernel takes (u32*, u64, u32*); the pointers are live device memory.
        unsafe {
            result::launch_kernel(
                self.checksum,
                (blocks, 1, 1),
                (256, 1, 1),
                0,
                stream,
                &mut params,
            )
        }
        .unwrap();
    }
}

/// What the emulated driver saw on one device (tests/gpu/emulated_driver.cpp).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct EmulatedCounts {
    allocations: u64,
    /// Host-to-device bytes from memory pinned for the copying context, and from memory
    /// pageable there (pinned by another context, not portably, counts as pageable).
    pinned_upload_bytes: u64,
    pageable_upload_bytes: u64,
    /// Host bytes registered (pinned in place) from the device's contexts.
    registered_bytes: u64,
}

/// Runs `work`, and returns what it returned with what each device of `gpus` counted meanwhile
/// on the emulated driver (None on a real one).
fn counting<G: Borrow<Gpu>, R>(
    gpus: &[G],
    work: impl FnOnce() -> R,
) -> (R, Option<Vec<EmulatedCounts>>) {
    let before = emulated_counts(gpus);
    let got = work();
    let during = before.zip(emulated_counts(gpus)).map(|(before, after)| {
        before
            .iter()
            .zip(&after)
            .map(|(b, a)| EmulatedCounts {
                allocations: a.allocations - b.allocations,
                pinned_upload_bytes: a.pinned_upload_bytes - b.pinned_upload_bytes,
                pageable_upload_bytes: a.pageable_upload_bytes - b.pageable_upload_bytes,
                registered_bytes: a.registered_bytes - b.registered_bytes,
            })
            .collect()
    });
    (got, during)
}

/// Each device's counts so far, from the emulated driver; None on a real driver.
fn emulated_counts<G: Borrow<Gpu>>(gpus: &[G]) -> Option<Vec<EmulatedCounts>> {
    std::env::var_os(EMULATED)?;
    type Counts = unsafe extern "C" fn(i32, *mut EmulatedCounts) -> i32;
    // SAFETY: libcuda.so is loaded already (the emulated driver, which cudarc opened by this
    // name): this takes one more reference to it, released below; the symbol has the type of
    // strata_emulated_cuda_counts.
    unsafe {
        let library = libc::dlopen(c"libcuda.so".as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD);
        assert!(!library.is_null(), "the emulated driver is not loaded");
        let symbol = libc::dlsym(library, c"strata_emulated_cuda_counts".as_ptr());
        assert!(!symbol.is_null(), "the emulated driver has no counts");
        let counts: Counts = std::mem::transmute::<*mut c_void, Counts>(symbol);
        let each = gpus
            .iter()
            .map(|gpu| {
                let mut out = EmulatedCounts::default();
                assert_eq!(counts(gpu.borrow().ordinal, &mut out), 0);
                out
            })
            .collect();
        libc::dlclose(library);
        Some(each)
    }
}

/// What the checksum kernel computes, on the host.
fn expected_checksum(bytes: &[u8]) -> u32 {
    bytes.chunks_exact(4).enumerate().fold(0u32, |sum, (i, w)| {
        let word = u32::from_le_bytes(w.try_into().unwrap());
        sum.wrapping_add(word.wrapping_mul((2 * i as u32).wrapping_add(1)))
    })
}

fn cuda_context(edit: impl FnOnce(&mut strata_options)) -> Ctx {
    Ctx::with(|o| {
        o.compute_device = STRATA_DEVICE_CUDA;
        o.device_index = 0;
        edit(o);
    })
}

/// Acquires on `stream` and returns the views (the layer stays acquired).
fn acquire_on(ctx: &Ctx, layer: u64, stream: sys::CUstream) -> Vec<strata_tensor_view> {
    let mut views = vec![empty_view(); 16];
    let mut count = 0;
    ok(strata_acquire_for_compute(
        ctx.0,
        layer,
        stream as *mut c_void,
        views.as_mut_ptr(),
        views.len(),
        &mut count,
    ));
    views.truncate(count);
    views
}

/// Every tensor's bytes of a layer acquired on the legacy default stream, then released.
fn gpu_bytes(gpu: &Gpu, ctx: &Ctx, layer: u64) -> Vec<Vec<u8>> {
    // NULL names the default stream of the thread's current context: `gpu`'s.
    gpu.bind();
    let views = acquire_on(ctx, layer, ptr::null_mut());
    let bytes = views
        .iter()
        .map(|v| {
            assert_eq!(v.device, STRATA_DEVICE_CUDA);
            assert_eq!(v.device_index, gpu.ordinal);
            gpu.read(v.data, v.nbytes as usize)
        })
        .collect();
    ctx.release(layer);
    bytes
}

/// The same layer's bytes from the CPU device.
fn cpu_bytes(ctx: &Ctx, layer: u64) -> Vec<Vec<u8>> {
    let bytes = ctx.acquire(layer).into_iter().map(|(_, b)| b).collect();
    ctx.release(layer);
    bytes
}

/// One layer's tensors: a weight of `rows` x `cols` and a bias, as f32 values.
fn layer_tensors(seed: u64, rows: usize, cols: usize) -> Vec<(String, Vec<i64>, Vec<f32>)> {
    let mut weight = weights(rows * cols, seed, 0.05);
    // Values every conversion must get right: zeros, signs, huge, tiny, subnormal, inf, NaN.
    let specials = [
        0.0,
        -0.0,
        1.0,
        -1.0,
        65504.0,
        1e30,
        -1e-30,
        1e-40,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::from_bits(0x7F80_0001),
        0.333_333_34,
        1.0 + f32::EPSILON,
    ];
    weight[..specials.len()].copy_from_slice(&specials);
    vec![
        ("weight".to_string(), vec![rows as i64, cols as i64], weight),
        (
            "bias".to_string(),
            vec![rows as i64],
            weights(rows, seed + 1, 1.0),
        ),
    ]
}

fn register_f32(
    ctx: &Ctx,
    group: u64,
    name: &str,
    tensors: &[(String, Vec<i64>, Vec<f32>)],
) -> u64 {
    let raw: Vec<(&str, u32, Vec<i64>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, shape, values)| {
            (
                n.as_str(),
                STRATA_DTYPE_F32,
                shape.clone(),
                f32_bytes(values),
            )
        })
        .collect();
    ctx.register(group, name, &raw)
}

#[test]
fn every_path_gives_the_bytes_of_the_host_conversion() {
    let Some(gpu) = gpu("every_path_gives_the_bytes_of_the_host_conversion") else {
        return;
    };
    let storages = [
        (STRATA_DTYPE_F32, STRATA_QUANT_NONE),
        (STRATA_DTYPE_F16, STRATA_QUANT_NONE),
        (STRATA_DTYPE_BF16, STRATA_QUANT_NONE),
        (STRATA_DTYPE_F8_E4M3FN, STRATA_QUANT_NONE),
        (STRATA_DTYPE_F8_E4M3FN, STRATA_QUANT_PER_TENSOR),
        (STRATA_DTYPE_F8_E4M3FN, STRATA_QUANT_PER_CHANNEL),
        (STRATA_DTYPE_F8_E5M2, STRATA_QUANT_NONE),
        (STRATA_DTYPE_F8_E5M2, STRATA_QUANT_PER_CHANNEL),
    ];
    let computations = [STRATA_DTYPE_F32, STRATA_DTYPE_F16, STRATA_DTYPE_BF16];
    // Small tensors are staged through the pinned ring; large ones (>= 1 MiB host copies) are
    // pinned in place and copied directly.
    let sizes = [("staged", 64, 96), ("pinned", 1024, 1536)];
    let mut checked = 0;
    for &(storage, quant) in &storages {
        for &computation in &computations {
            // Converted on the device (preparing keeps the stored dtype), or on the host before
            // the copy (preparing already in the computation dtype).
            for preparing in [STRATA_DTYPE_SOURCE, computation] {
                for &(path, rows, cols) in &sizes {
                    let t = tiers(|t| {
                        t.offload = place(STRATA_DEVICE_CPU, storage);
                        t.preparing.dtype = preparing;
                        t.computation.dtype = computation;
                        t.quantization = quant;
                    });
                    let tensors = layer_tensors(checked as u64, rows, cols);
                    let cpu = Ctx::new(STRATA_UNLIMITED);
                    let cpu_layer = register_f32(&cpu, cpu.group(&t), "l", &tensors);
                    let cuda = cuda_context(|o| o.vram_limit = 0);
                    let cuda_layer = register_f32(&cuda, cuda.group(&t), "l", &tensors);
                    let expected = cpu_bytes(&cpu, cpu_layer);
                    // Twice: the second fill reuses the pooled buffer of the first.
                    for pass in 0..2 {
                        assert_eq!(
                            gpu_bytes(&gpu, &cuda, cuda_layer),
                            expected,
                            "storage {storage} quant {quant} preparing {preparing} computation \
                             {computation} ({path}, pass {pass})"
                        );
                    }
                    checked += 1;
                }
            }
        }
    }
    eprintln!("every_path_gives_the_bytes_of_the_host_conversion: {checked} host paths");
}

/// A weight whose rows decide every case of absmax scaling, and a bias: row 0 the specials of
/// `layer_tensors` (NaN, infinities, subnormals), row 1 zeros, row 2 values with one NaN, row 3
/// subnormals only (a scale that underflows, replaced by 1.0), row 4 only NaNs and infinities,
/// the rest random; one value far larger than the others, so that per tensor differs.
fn quantization_tensors(seed: u64, rows: usize, cols: usize) -> Vec<(String, Vec<i64>, Vec<f32>)> {
    let mut tensors = layer_tensors(seed, rows, cols);
    let weight = &mut tensors[0].2;
    weight[cols..2 * cols].fill(0.0);
    weight[2 * cols + cols / 2] = f32::NAN;
    for (i, value) in weight[3 * cols..4 * cols].iter_mut().enumerate() {
        *value = f32::from_bits(1 + i as u32 % 5);
    }
    for (i, value) in weight[4 * cols..5 * cols].iter_mut().enumerate() {
        *value = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][i % 3];
    }
    weight[6 * cols + 1] = 3e4;
    tensors
}

/// Writes `tensors` as `layer.<name>` of a safetensors file at `path`, in `dtype` (f32, f16,
/// bf16), and registers the layer from it.
fn register_from_disk(
    ctx: &Ctx,
    group: u64,
    path: &std::path::Path,
    dtype: u32,
    tensors: &[(String, Vec<i64>, Vec<f32>)],
) -> u64 {
    let (st_dtype, encode): (safetensors::Dtype, fn(f32) -> Vec<u8>) = match dtype {
        STRATA_DTYPE_F32 => (safetensors::Dtype::F32, |v| v.to_le_bytes().to_vec()),
        STRATA_DTYPE_F16 => (safetensors::Dtype::F16, |v| {
            half::f16::from_f32(v).to_le_bytes().to_vec()
        }),
        _ => (safetensors::Dtype::BF16, |v| {
            half::bf16::from_f32(v).to_le_bytes().to_vec()
        }),
    };
    let file: Vec<_> = tensors
        .iter()
        .map(|(name, shape, values)| {
            let shape = shape.iter().map(|&d| d as usize).collect();
            let bytes = values.iter().flat_map(|&v| encode(v)).collect();
            (format!("layer.{name}"), st_dtype, shape, bytes)
        })
        .collect();
    if !path.exists() {
        write_safetensors(path, &file);
    }
    ctx.register_prefix(group, path, "layer.", 1);
    ctx.find("layer")
}

/// A tensor on the host (a host copy, or a checkpoint on disk) that the preparing tier wants in
/// scaled fp8 crosses in its own dtype and is quantized by the kernels when the budget leaves
/// device memory for it (unlimited here: the scratch is one more device allocation), and is
/// quantized by host threads when it does not (budget 0: the layer in use is all there is).
/// Both give the CPU device's bytes, dequantized to f32 and converted to bf16.
#[test]
fn host_tensors_quantize_on_the_device_or_the_host_to_the_same_bytes() {
    let Some(gpu) = gpu("host_tensors_quantize_on_the_device_or_the_host_to_the_same_bytes") else {
        return;
    };
    let dir = TempDir::new("cuda-quantize");
    let sources = [
        (STRATA_DEVICE_CPU, STRATA_DTYPE_F32),
        (STRATA_DEVICE_CPU, STRATA_DTYPE_F16),
        (STRATA_DEVICE_CPU, STRATA_DTYPE_BF16),
        // Stored as scaled e4m3 on the host (the group's quantization), requantized.
        (STRATA_DEVICE_CPU, STRATA_DTYPE_F8_E4M3FN),
        (STRATA_DEVICE_DISK, STRATA_DTYPE_BF16),
        (STRATA_DEVICE_DISK, STRATA_DTYPE_F32),
    ];
    let mut checked = 0;
    for &(device, stored) in &sources {
        for preparing in [STRATA_DTYPE_F8_E4M3FN, STRATA_DTYPE_F8_E5M2] {
            if stored == preparing {
                continue; // the same form: a copy, no quantization
            }
            for quant in [STRATA_QUANT_PER_TENSOR, STRATA_QUANT_PER_CHANNEL] {
                // Small layers go through the staging ring; a bf16 host copy of 1 MiB and more
                // is pinned in place and copied directly.
                let pinned = device == STRATA_DEVICE_CPU && stored == STRATA_DTYPE_BF16;
                let sizes: &[(usize, usize)] = if pinned {
                    &[(64, 96), (512, 1024)]
                } else {
                    &[(64, 96)]
                };
                for &(rows, cols) in sizes {
                    let t = tiers(|t| {
                        if device == STRATA_DEVICE_DISK {
                            t.offload = place(STRATA_DEVICE_DISK, STRATA_DTYPE_SOURCE);
                            t.onload = place(STRATA_DEVICE_DISK, STRATA_DTYPE_SOURCE);
                        } else {
                            t.offload = place(STRATA_DEVICE_CPU, stored);
                        }
                        t.preparing.dtype = preparing;
                        t.quantization = quant;
                    });
                    let tensors = quantization_tensors(checked as u64, rows, cols);
                    let path = dir.path(&format!("{stored}-{rows}x{cols}-{checked}.safetensors"));
                    let mut allocations = Vec::new();
                    for computation in [STRATA_DTYPE_F32, STRATA_DTYPE_BF16] {
                        let mut t = t;
                        t.computation.dtype = computation;
                        let register = |ctx: &Ctx| {
                            let group = ctx.group(&t);
                            if device == STRATA_DEVICE_DISK {
                                register_from_disk(ctx, group, &path, stored, &tensors)
                            } else {
                                register_f32(ctx, group, "layer", &tensors)
                            }
                        };
                        let cpu = Ctx::new(STRATA_UNLIMITED);
                        let cpu_layer = register(&cpu);
                        let expected = cpu_bytes(&cpu, cpu_layer);
                        for (budget, on) in [(STRATA_UNLIMITED, "device"), (0, "host")] {
                            let cuda = cuda_context(|o| o.vram_limit = budget);
                            let layer = register(&cuda);
                            for pass in 0..2 {
                                assert_eq!(
                                    gpu_bytes(&gpu, &cuda, layer),
                                    expected,
                                    "stored {stored} on {device}, preparing {preparing} quant \
                                     {quant}, computation {computation}, {rows}x{cols}, \
                                     quantized on the {on} (pass {pass})"
                                );
                            }
                            allocations.push(cuda.stats().device_allocations);
                        }
                    }
                    // Per computation: the device path allocated the prepared and computed
                    // copies and the scratch; the host path only the two copies.
                    for pair in allocations.chunks(2) {
                        assert_eq!(
                            pair[0],
                            pair[1] + 1,
                            "device allocations quantizing on the device, then on the host \
                             (stored {stored} on {device}, preparing {preparing}, quant {quant})"
                        );
                    }
                    checked += 1;
                }
            }
        }
    }
    eprintln!("host_tensors_quantize_on_the_device_or_the_host_to_the_same_bytes: {checked} cases");
}

/// The scratch that device quantization takes for a host tensor counts against the budget: with
/// layers quantized from bf16 host copies streaming through a budget of a few layers, the
/// driver's free memory never shows more taken than vram_limit, and the bytes stay exact. Every
/// buffer here is a little over a whole number of 2 MiB pages, which a GPU rounds up: strata
/// counts the pages (on an H200, before it did, the device lost 44 MiB under a 26 MiB budget).
#[test]
fn quantization_scratch_stays_within_the_budget() {
    let Some(gpu) = gpu("quantization_scratch_stays_within_the_budget") else {
        return;
    };
    let (rows, cols) = (2048, 1024);
    let t = tiers(|t| {
        t.offload = place(STRATA_DEVICE_CPU, STRATA_DTYPE_BF16);
        t.preparing.dtype = STRATA_DTYPE_F8_E4M3FN;
        t.computation.dtype = STRATA_DTYPE_BF16;
        t.quantization = STRATA_QUANT_PER_CHANNEL;
    });
    let layers: Vec<_> = (0..8)
        .map(|i| quantization_tensors(100 + i, rows, cols))
        .collect();
    let cpu = Ctx::new(STRATA_UNLIMITED);
    let cpu_ids: Vec<u64> = layers
        .iter()
        .enumerate()
        .map(|(i, l)| register_f32(&cpu, cpu.group(&t), &format!("l{i}"), l))
        .collect();
    // A layer holds 2 MiB of fp8 and 4 MiB of bf16 on the device; the scratch is 4 MiB.
    for vram_limit in [20u64 << 20, 26 << 20] {
        let cuda = cuda_context(|o| {
            o.vram_limit = vram_limit;
            o.prefetch_depth = 1;
        });
        let ids: Vec<u64> = layers
            .iter()
            .enumerate()
            .map(|(i, l)| register_f32(&cuda, cuda.group(&t), &format!("l{i}"), l))
            .collect();
        // The emulated driver charges allocations of up to 256 bytes (the scales) a whole 512;
        // a GPU may keep a page of its own.
        let slack = if std::env::var_os(EMULATED).is_some() {
            8 * 512
        } else {
            2 << 20
        };
        stream_checking_free_memory(&gpu, &cuda, &ids, 2, vram_limit, slack);
        for (&id, &cpu_id) in ids.iter().zip(&cpu_ids).step_by(3) {
            assert_eq!(
                gpu_bytes(&gpu, &cuda, id),
                cpu_bytes(&cpu, cpu_id),
                "vram_limit {vram_limit}"
            );
        }
        let stats = cuda.stats();
        assert!(stats.vram_peak <= vram_limit, "{stats:?}");
    }
}

/// A computation tier in fp8 (a plain cast, unscaled) is made on the device by the kernels from
/// every prepared form: f32, bf16, and fp8 scaled per tensor and per channel. No round trip
/// through the host remains: the bytes are the CPU device's.
#[test]
fn an_fp8_computation_tier_is_cast_on_the_device_exactly() {
    let Some(gpu) = gpu("an_fp8_computation_tier_is_cast_on_the_device_exactly") else {
        return;
    };
    let preparings = [
        (STRATA_DTYPE_SOURCE, STRATA_QUANT_NONE),
        (STRATA_DTYPE_BF16, STRATA_QUANT_NONE),
        (STRATA_DTYPE_F8_E4M3FN, STRATA_QUANT_PER_CHANNEL),
        (STRATA_DTYPE_F8_E5M2, STRATA_QUANT_PER_TENSOR),
        (STRATA_DTYPE_F8_E4M3FN, STRATA_QUANT_NONE),
    ];
    let mut checked = 0;
    for &(preparing, quant) in &preparings {
        for computation in [STRATA_DTYPE_F8_E4M3FN, STRATA_DTYPE_F8_E5M2] {
            if preparing == computation && quant == STRATA_QUANT_NONE {
                continue; // already the computation form
            }
            let t = tiers(|t| {
                t.offload = place(STRATA_DEVICE_CPU, STRATA_DTYPE_SOURCE);
                t.preparing.dtype = preparing;
                t.computation.dtype = computation;
                t.quantization = quant;
            });
            let tensors = quantization_tensors(checked, 64, 96);
            let cpu = Ctx::new(STRATA_UNLIMITED);
            let cpu_layer = register_f32(&cpu, cpu.group(&t), "l", &tensors);
            let cuda = cuda_context(|o| o.vram_limit = STRATA_UNLIMITED);
            let cuda_layer = register_f32(&cuda, cuda.group(&t), "l", &tensors);
            assert_eq!(
                gpu_bytes(&gpu, &cuda, cuda_layer),
                cpu_bytes(&cpu, cpu_layer),
                "preparing {preparing} quant {quant} computation {computation}"
            );
            checked += 1;
        }
    }
    eprintln!("an_fp8_computation_tier_is_cast_on_the_device_exactly: {checked} cases");
}

#[test]
fn disk_layers_stream_through_the_staging_ring_exactly() {
    let Some(gpu) = gpu("disk_layers_stream_through_the_staging_ring_exactly") else {
        return;
    };
    let dir = TempDir::new("cuda-disk");
    let path = dir.path("model.safetensors");
    // 3 MiB of f16 per weight: more than one staging buffer, so it crosses in pieces.
    let (rows, cols) = (1024, 1536);
    let mut file = Vec::new();
    for layer in 0..3 {
        let values = weights(rows * cols, layer, 0.05);
        let f16: Vec<u8> = values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect();
        file.push((
            format!("blocks.{layer}.weight"),
            safetensors::Dtype::F16,
            vec![rows, cols],
            f16,
        ));
    }
    write_safetensors(&path, &file);
    for computation in [STRATA_DTYPE_F16, STRATA_DTYPE_F32, STRATA_DTYPE_BF16] {
        for host_limit in [STRATA_UNLIMITED, 1 << 20] {
            let t = tiers(|t| {
                t.offload = place(STRATA_DEVICE_DISK, STRATA_DTYPE_SOURCE);
                t.onload = place(STRATA_DEVICE_DISK, STRATA_DTYPE_SOURCE);
                t.computation.dtype = computation;
            });
            let cpu = Ctx::new(STRATA_UNLIMITED);
            cpu.register_prefix(cpu.group(&t), &path, "blocks.", 2);
            let cuda = cuda_context(|o| {
                o.vram_limit = 0;
                o.host_limit = host_limit;
            });
            cuda.register_prefix(cuda.group(&t), &path, "blocks.", 2);
            for layer in 0..3 {
                let name = format!("blocks.{layer}");
                assert_eq!(
                    gpu_bytes(&gpu, &cuda, cuda.find(&name)),
                    cpu_bytes(&cpu, cpu.find(&name)),
                    "{name} computation {computation} host_limit {host_limit}"
                );
            }
            let stats = cuda.stats();
            assert!(stats.host_peak <= host_limit, "{stats:?}");
        }
    }
}

/// The race the ComfyUI fp8 path had: a kernel the caller launches right after acquire, on its
/// own stream, must see the converted bytes, while strata keeps reusing a tiny budget's buffers
/// for the next layers. The host never waits between layers, so it runs far ahead of the GPU.
#[test]
fn host_copies_that_fill_host_limit_leave_no_ring_and_upload_exactly_without_it() {
    let Some(gpu) =
        gpu("host_copies_that_fill_host_limit_leave_no_ring_and_upload_exactly_without_it")
    else {
        return;
    };
    let host_limit = 1u64 << 20;
    let cuda = cuda_context(|o| o.host_limit = host_limit);
    let cpu = Ctx::new(STRATA_UNLIMITED);
    let (group, cpu_group) = (cuda.group(&tiers(|_| {})), cpu.group(&tiers(|_| {})));
    // 64 KiB host copies (below the size that is pinned in place) until host_limit is full: what
    // is left is less than the smallest staging ring (4 x 64 KiB), so uploads go from pageable
    // memory straight to the driver.
    let mut layers = Vec::new();
    for i in 0.. {
        let tensors = layer_tensors(300 + i, 64, 256);
        let raw: Vec<(&str, u32, Vec<i64>, Vec<u8>)> = tensors
            .iter()
            .map(|(n, shape, v)| (n.as_str(), STRATA_DTYPE_F32, shape.clone(), f32_bytes(v)))
            .collect();
        let mut id = 0;
        let status = cuda.try_register(group, &format!("l{i}"), &raw, &mut id);
        if status == STRATA_ERR_BUDGET {
            break;
        }
        ok(status);
        layers.push((
            id,
            register_f32(&cpu, cpu_group, &format!("l{i}"), &tensors),
        ));
    }
    assert!(layers.len() >= 8, "{} layers fit", layers.len());
    for _pass in 0..2 {
        for &(id, cpu_id) in &layers {
            assert_eq!(gpu_bytes(&gpu, &cuda, id), cpu_bytes(&cpu, cpu_id));
        }
    }
    assert!(cuda.stats().host_peak <= host_limit, "{:?}", cuda.stats());
}

#[test]
fn a_kernel_on_the_callers_stream_right_after_acquire_reads_the_right_bytes() {
    let Some(gpu) = gpu("a_kernel_on_the_callers_stream_right_after_acquire_reads_the_right_bytes")
    else {
        return;
    };
    kernels_on_the_callers_stream_read_the_right_bytes(&gpu);
}

/// The same on device 1: strata's context allocates, uploads and converts there (the emulated
/// driver faults a kernel that reaches another device's memory), and device 0 sees none of it.
#[test]
fn a_kernel_on_the_callers_stream_of_device_1_right_after_acquire_reads_the_right_bytes() {
    let Some(gpus) = gpus(
        "a_kernel_on_the_callers_stream_of_device_1_right_after_acquire_reads_the_right_bytes",
        2,
    ) else {
        return;
    };
    let ((), counts) = counting(&gpus, || {
        kernels_on_the_callers_stream_read_the_right_bytes(&gpus[1])
    });
    if let Some(counts) = counts {
        assert_eq!(
            counts[0],
            EmulatedCounts::default(),
            "strata worked on device 0"
        );
        assert!(counts[1].allocations > 0, "{counts:?}");
    }
}

/// Acquires 24 layers on a stream of `gpu`'s device and runs the test's checksum kernel on each
/// tensor right after the acquire, over 8 passes, for two prefetch depths and budgets.
fn kernels_on_the_callers_stream_read_the_right_bytes(gpu: &Gpu) {
    let layers = 24;
    let (rows, cols) = (256, 1024);
    let t = tiers(|t| {
        t.offload = place(STRATA_DEVICE_CPU, STRATA_DTYPE_F8_E4M3FN);
        t.computation.dtype = STRATA_DTYPE_BF16;
        t.quantization = STRATA_QUANT_PER_CHANNEL;
    });
    let cpu = Ctx::new(STRATA_UNLIMITED);
    let cpu_group = cpu.group(&t);
    for prefetch_depth in [0, 2] {
        for vram_limit in [0u64, 3 * (rows * cols * 3) as u64] {
            let cuda = cuda_context(|o| {
                o.device_index = gpu.ordinal;
                o.vram_limit = vram_limit;
                o.prefetch_depth = prefetch_depth;
            });
            let group = cuda.group(&t);
            let mut ids = Vec::new();
            let mut expected = Vec::new();
            for i in 0..layers {
                let tensors = layer_tensors(100 + i as u64, rows, cols);
                let name = format!("l{i}");
                ids.push(register_f32(&cuda, group, &name, &tensors));
                let reference = if prefetch_depth == 0 && vram_limit == 0 {
                    let id = register_f32(&cpu, cpu_group, &name, &tensors);
                    cpu_bytes(&cpu, id)
                } else {
                    cpu_bytes(&cpu, cpu.find(&name))
                };
                expected.push(reference);
            }
            let stream = gpu.stream();
            let passes = 8;
            let sums = gpu.zeroed(passes * layers * 2 * 4);
            for pass in 0..passes {
                for (i, &id) in ids.iter().enumerate() {
                    let views = acquire_on(&cuda, id, stream.0);
                    if pass % 2 == 1 {
                        // The stream lags (~0.3 ms per layer) and the host runs passes ahead:
                        // memory reused before these kernels ran would show in their sums. On
                        // the other passes the kernels run as soon as the fill allows, which is
                        // what would show a missing wait for the fill.
                        gpu.spin(stream.0, 500_000);
                    }
                    for (t, view) in views.iter().enumerate() {
                        let slot = ((pass * layers + i) * 2 + t) as u64 * 4;
                        gpu.checksum(stream.0, view.data, view.nbytes / 4, sums.0 + slot);
                    }
                    ok(strata_release(cuda.0, id, stream.0 as *mut c_void));
                }
            }
            gpu.synchronize(stream.0);
            let got = gpu.read(sums.0 as *mut c_void, passes * layers * 2 * 4);
            for (slot, sum) in got.chunks_exact(4).enumerate() {
                let (pass, i, t) = (slot / (2 * layers), (slot / 2) % layers, slot % 2);
                assert_eq!(
                    u32::from_le_bytes(sum.try_into().unwrap()),
                    expected_checksum(&expected[i][t]),
                    "pass {pass} layer {i} tensor {t}: prefetch {prefetch_depth}, vram_limit \
                     {vram_limit}"
                );
            }
            // A layer is its fp8 copy and its bf16 conversion (plus scales and the bias): budget 0
            // holds the one in use and the prefetched ones.
            let layer_bytes = (rows * cols * 3 + rows * 16) as u64;
            let stats = cuda.stats();
            assert!(
                stats.vram_peak <= vram_limit.max(layer_bytes * (1 + prefetch_depth as u64)),
                "{stats:?}"
            );
        }
    }
}

/// Streams `layers` layers of `layer_bytes` through a context `passes` times, checking after
/// every acquire that the device's own free memory never dropped by more than `limit`.
/// Acquires and releases `ids` for `passes` passes, checking at each acquire that the driver's
/// free memory shows at most `limit` bytes taken, plus `slack`.
fn stream_checking_free_memory(
    gpu: &Gpu,
    ctx: &Ctx,
    ids: &[u64],
    passes: usize,
    limit: u64,
    slack: u64,
) {
    let baseline = gpu.free_memory() as i64;
    let mut worst = 0i64;
    for _ in 0..passes {
        for &id in ids {
            let views = acquire_on(ctx, id, ptr::null_mut());
            assert!(!views.is_empty());
            let taken = baseline - gpu.free_memory() as i64;
            worst = worst.max(taken);
            assert!(
                taken <= (limit + slack) as i64,
                "the device lost {taken} bytes while vram_limit is {limit}"
            );
            ctx.release(id);
        }
    }
    eprintln!("device memory taken at most {worst} bytes under vram_limit {limit}");
}

fn plain_layers(ctx: &Ctx, group: u64, count: usize, numel: usize) -> Vec<u64> {
    (0..count)
        .map(|i| {
            let values = weights(numel, i as u64, 0.05);
            ctx.register(
                group,
                &format!("l{i}"),
                &[(
                    "w",
                    STRATA_DTYPE_BF16,
                    vec![numel as i64],
                    bf16_bytes(&values),
                )],
            )
        })
        .collect()
}

#[test]
fn the_budget_holds_against_the_drivers_free_memory_and_nothing_leaks() {
    let Some(gpu) = gpu("the_budget_holds_against_the_drivers_free_memory_and_nothing_leaks")
    else {
        return;
    };
    let layer_bytes = 8usize << 20;
    let round = |vram_limit: u64| {
        let ctx = cuda_context(|o| {
            o.vram_limit = vram_limit;
            o.prefetch_depth = 2;
        });
        let group = ctx.group(&tiers(|_| {}));
        let ids = plain_layers(&ctx, group, 24, layer_bytes / 2);
        // Budget 0 holds the layer in use and the two prefetched after it.
        let limit = if vram_limit == 0 {
            3 * layer_bytes as u64
        } else {
            vram_limit
        };
        // Layers of whole 2 MiB pages; a GPU may keep a page of its own.
        stream_checking_free_memory(&gpu, &ctx, &ids, 3, limit, 2 << 20);
        let stats = ctx.stats();
        assert!(stats.vram_peak <= limit, "{stats:?}");
        // Buffers are reused: however many passes run, cuMemAlloc stops at the buffers the cap
        // holds (at budget 0, the prefetch window). How soon the window first fills depends on
        // timing, so a later pass may still add one.
        let most = limit / layer_bytes as u64;
        for &id in &ids {
            acquire_on(&ctx, id, ptr::null_mut());
            ctx.release(id);
        }
        let allocations = ctx.stats().device_allocations;
        assert!(
            allocations <= most,
            "{allocations} cuMemAlloc over 4 passes of {} layers: more buffers than the {most} \
             that vram_limit {limit} holds",
            ids.len()
        );
    };
    // One round first: what the driver keeps for good the first time (module code, event and
    // stream pools, page tables for pinned host memory) is not a leak; what grows after is.
    round(0);
    let before = gpu.free_memory();
    for vram_limit in [0u64, 32 << 20, 96 << 20] {
        round(vram_limit);
    }
    let after = gpu.free_memory();
    assert!(
        after + (2 << 20) >= before,
        "device memory was not given back: {before} free before, {after} after"
    );
}

/// Takes device memory as another program would, until less than `leave` bytes are free.
fn hog(gpu: &Gpu, leave: usize) -> Vec<sys::CUdeviceptr> {
    gpu.bind();
    let mut taken = Vec::new();
    for chunk in [256usize << 20, 8 << 20, 1 << 20] {
        while gpu.free_memory() > leave + chunk / 2 {
            // SAFETY: fresh memory, freed by `unhog`.
            match unsafe { result::malloc_sync(chunk) } {
                Ok(pointer) => taken.push(pointer),
                Err(_) => break,
            }
        }
    }
    taken
}

fn unhog(gpu: &Gpu, taken: Vec<sys::CUdeviceptr>) {
    gpu.bind();
    for pointer in taken {
        // SAFETY: allocated by `hog`, freed once.
        unsafe { result::free_sync(pointer) }.unwrap();
    }
}

fn try_acquire_on(ctx: &Ctx, layer: u64, stream: sys::CUstream) -> strata_status {
    let mut views = vec![empty_view(); 4];
    let mut count = 0;
    strata_acquire_for_compute(
        ctx.0,
        layer,
        stream as *mut c_void,
        views.as_mut_ptr(),
        views.len(),
        &mut count,
    )
}

#[test]
fn device_out_of_memory_evicts_then_fails_cleanly_and_the_context_recovers() {
    let Some(gpu) = gpu("device_out_of_memory_evicts_then_fails_cleanly_and_the_context_recovers")
    else {
        return;
    };
    let layer_bytes = 64usize << 20;
    let ctx = cuda_context(|o| o.prefetch_depth = 0);
    let group = ctx.group(&tiers(|_| {}));
    let ids = plain_layers(&ctx, group, 10, layer_bytes / 2);
    // Unlimited budget: the first 8 layers stay resident.
    for &id in &ids[..8] {
        acquire_on(&ctx, id, ptr::null_mut());
        ctx.release(id);
    }
    // Another program takes nearly all the rest: the next layer does not fit, so the context
    // evicts one of its own unused layers and retries.
    let taken = hog(&gpu, layer_bytes / 2);
    let evictions = ctx.stats().evictions;
    acquire_on(&ctx, ids[8], ptr::null_mut());
    ctx.release(ids[8]);
    assert!(ctx.stats().evictions > evictions, "{:?}", ctx.stats());
    // A context with nothing to evict gets a clean error, and keeps working.
    let mut taken = taken;
    taken.extend(hog(&gpu, layer_bytes / 2));
    let other = cuda_context(|o| o.prefetch_depth = 0);
    let other_group = other.group(&tiers(|_| {}));
    let other_ids = plain_layers(&other, other_group, 2, layer_bytes / 2);
    expect(
        try_acquire_on(&other, other_ids[0], ptr::null_mut()),
        STRATA_ERR_OUT_OF_MEMORY,
    );
    assert!(last_error().contains("out of memory"), "{}", last_error());
    assert_eq!(other.stats().vram_in_use, 0);
    unhog(&gpu, taken);
    for &id in &other_ids {
        acquire_on(&other, id, ptr::null_mut());
        other.release(id);
    }
    for &id in &ids {
        acquire_on(&ctx, id, ptr::null_mut());
        ctx.release(id);
    }
}

#[test]
fn headroom_keeps_device_memory_free_beside_the_budget() {
    let Some(gpu) = gpu("headroom_keeps_device_memory_free_beside_the_budget") else {
        return;
    };
    let layer_bytes = 64usize << 20;
    let free = gpu.free_memory() as u64;
    // Room for about three layers above the headroom.
    let headroom = free - 3 * layer_bytes as u64 - (layer_bytes as u64 / 2);
    let ctx = cuda_context(|o| {
        o.prefetch_depth = 0;
        o.vram_headroom = headroom;
    });
    let group = ctx.group(&tiers(|_| {}));
    let ids = plain_layers(&ctx, group, 8, layer_bytes / 2);
    for _ in 0..2 {
        for &id in &ids {
            acquire_on(&ctx, id, ptr::null_mut());
            assert!(
                gpu.free_memory() as u64 + (2 << 20) >= headroom,
                "free memory fell below the headroom"
            );
            ctx.release(id);
        }
    }
    assert!(
        ctx.stats().evictions > 0,
        "the headroom made room by eviction"
    );
}

#[test]
fn a_stream_of_another_context_is_refused() {
    let Some(gpu) = gpu("a_stream_of_another_context_is_refused") else {
        return;
    };
    let ctx = cuda_context(|_| {});
    let group = ctx.group(&tiers(|_| {}));
    let ids = plain_layers(&ctx, group, 1, 1024);
    // A context of its own (not the primary one), with a stream in it.
    let mut foreign = ptr::null_mut();
    let device = result::device::get(0).unwrap();
    // SAFETY: creates a context, destroyed below.
    unsafe { sys::cuCtxCreate_v2(&mut foreign, 0, device) }
        .result()
        .unwrap();
    let stream = result::stream::create(result::stream::StreamKind::NonBlocking).unwrap();
    expect(
        try_acquire_on(&ctx, ids[0], stream),
        STRATA_ERR_INVALID_ARGUMENT,
    );
    assert!(
        last_error().contains("another CUDA context"),
        "{}",
        last_error()
    );
    // NULL names the default stream of the context current on the thread: the foreign one here.
    expect(
        try_acquire_on(&ctx, ids[0], ptr::null_mut()),
        STRATA_ERR_INVALID_ARGUMENT,
    );
    // SAFETY: the stream and context created above, destroyed once.
    unsafe {
        result::stream::destroy(stream).unwrap();
        sys::cuCtxDestroy_v2(foreign).result().unwrap();
    }
    gpu.bind();
    // Nothing was acquired: a release is a state error, and a good stream works.
    expect(
        strata_release(ctx.0, ids[0], ptr::null_mut()),
        STRATA_ERR_STATE,
    );
    acquire_on(&ctx, ids[0], ptr::null_mut());
    ctx.release(ids[0]);
    // A thread with no context current at all (a C program that never touched CUDA) may pass
    // NULL: strata's own context's default stream.
    let (id, context) = (ids[0], ctx.0 as usize);
    std::thread::spawn(move || {
        let context = context as *mut strata_context;
        let mut views = vec![empty_view(); 4];
        let mut count = 0;
        let status = strata_acquire_for_compute(
            context,
            id,
            ptr::null_mut(),
            views.as_mut_ptr(),
            views.len(),
            &mut count,
        );
        expect(status, STRATA_OK);
        expect(strata_release(context, id, ptr::null_mut()), STRATA_OK);
    })
    .join()
    .unwrap();
}

/// Set in the child process `ran_in_a_child_on_a_real_driver` starts.
const ISOLATED: &str = "STRATA_TEST_ISOLATED";

/// On a real driver, runs `test` in a child process of its own and checks how it ended, then
/// returns true; false in that child and on the emulated driver, where the caller runs the test
/// itself. For tests that hand the driver a destroyed handle: to a real driver that is a freed
/// pointer. The emulated driver refuses it, and there the whole contract is checked. A real one
/// may crash on it inside the call strata makes to check it (driver 580.159.04 on an H200 does:
/// SIGSEGV in the first call that is handed the destroyed stream), which the README says; so the
/// child must either pass or end on SIGSEGV, and any other ending (a failed assertion, an
/// abort) fails this test.
fn ran_in_a_child_on_a_real_driver(test: &str) -> bool {
    use std::os::unix::process::ExitStatusExt;
    if std::env::var_os(EMULATED).is_some() || std::env::var_os(ISOLATED).is_some() {
        return false;
    }
    let dir = programs::BuildDir::new("cuda-isolated");
    let mut child = std::process::Command::new(std::env::current_exe().unwrap());
    child
        .args(["--exact", test, "--test-threads=1", "--nocapture"])
        .env(ISOLATED, "1");
    let output = programs::output_within(&mut child, dir.path(), programs::SUITE_TIMEOUT).unwrap();
    if output.status.signal() == Some(libc::SIGSEGV) {
        eprintln!(
            "{test}: this driver crashed (SIGSEGV) on the destroyed handle, as the README warns; \
             the contract for such handles holds only on drivers that report them"
        );
        return true;
    }
    assert!(
        output.status.success()
            && String::from_utf8_lossy(&output.stdout).contains("test result: ok. 1 passed"),
        "{test}, run alone on the real driver, neither passed nor ended on the driver's \
         SIGSEGV:\n{}",
        programs::describe(&output)
    );
    true
}

#[test]
fn a_destroyed_stream_gets_a_clear_status_and_the_context_keeps_working() {
    const THIS: &str = "a_destroyed_stream_gets_a_clear_status_and_the_context_keeps_working";
    let Some(gpu) = gpu(THIS) else {
        return;
    };
    if ran_in_a_child_on_a_real_driver(THIS) {
        return;
    }
    let ctx = cuda_context(|_| {});
    let group = ctx.group(&tiers(|_| {}));
    let ids = plain_layers(&ctx, group, 2, 1024);
    // Made before the other one is destroyed, so the driver cannot give it the dead one's address.
    let live = gpu.stream();
    let dead = gpu.stream();
    let dead_handle = dead.0;
    drop(dead);
    expect(
        try_acquire_on(&ctx, ids[0], dead_handle),
        STRATA_ERR_INVALID_ARGUMENT,
    );
    assert!(
        last_error().contains("not a live CUDA stream"),
        "{}",
        last_error()
    );
    assert_eq!(ctx.stats().vram_in_use, 0, "{:?}", ctx.stats());
    // Released with the dead handle, a layer stays acquired: the caller can release it right.
    acquire_on(&ctx, ids[1], live.0);
    expect(
        strata_release(ctx.0, ids[1], dead_handle as *mut c_void),
        STRATA_ERR_INVALID_ARGUMENT,
    );
    ok(strata_release(ctx.0, ids[1], live.0 as *mut c_void));
    for (seed, &id) in ids.iter().enumerate() {
        let views = acquire_on(&ctx, id, live.0);
        gpu.synchronize(live.0);
        assert_eq!(
            gpu.read(views[0].data, views[0].nbytes as usize),
            bf16_bytes(&weights(1024, seed as u64, 0.05))
        );
        ok(strata_release(ctx.0, id, live.0 as *mut c_void));
    }
}

#[test]
fn a_stream_being_captured_into_a_graph_is_refused_and_the_capture_survives() {
    let Some(gpu) = gpu("a_stream_being_captured_into_a_graph_is_refused_and_the_capture_survives")
    else {
        return;
    };
    let stream = gpu.stream();
    refused_during_a_relaxed_capture(&gpu, stream.0, stream.0);
}

#[test]
fn the_legacy_stream_while_a_blocking_stream_is_captured_is_refused_and_the_capture_survives() {
    let Some(gpu) = gpu(
        "the_legacy_stream_while_a_blocking_stream_is_captured_is_refused_and_the_capture_survives",
    ) else {
        return;
    };
    // A blocking stream (no CU_STREAM_NON_BLOCKING), which the legacy stream synchronises with:
    // work strata put on the legacy stream now would join the capture.
    gpu.bind();
    let blocking = Stream(result::stream::create(result::stream::StreamKind::Default).unwrap());
    refused_during_a_relaxed_capture(&gpu, blocking.0, ptr::null_mut());
}

/// While `captured` is being captured (relaxed mode), an acquire on `acquire_stream` is refused
/// as a capture and leaves the capture valid; once the capture is over, the same acquire works.
fn refused_during_a_relaxed_capture(
    gpu: &Gpu,
    captured: sys::CUstream,
    acquire_stream: sys::CUstream,
) {
    let ctx = cuda_context(|_| {});
    let group = ctx.group(&tiers(|_| {}));
    let ids = plain_layers(&ctx, group, 1, 1024);
    gpu.bind();
    // SAFETY: a live stream; the capture ends below.
    unsafe {
        sys::cuStreamBeginCapture_v2(
            captured,
            sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED,
        )
    }
    .result()
    .unwrap();
    expect(
        try_acquire_on(&ctx, ids[0], acquire_stream),
        STRATA_ERR_UNSUPPORTED,
    );
    assert!(last_error().contains("captured"), "{}", last_error());
    gpu.bind();
    end_capture(captured).expect("strata's refusal left the capture valid");
    // Outside the capture the same stream works.
    acquire_on(&ctx, ids[0], acquire_stream);
    ok(strata_release(ctx.0, ids[0], acquire_stream as *mut c_void));
}

#[test]
fn a_global_capture_on_another_thread_neither_refuses_strata_nor_is_invalidated_by_it() {
    let Some(gpu) =
        gpu("a_global_capture_on_another_thread_neither_refuses_strata_nor_is_invalidated_by_it")
    else {
        return;
    };
    // Everything the test itself allocates is made first: in global mode the capture forbids
    // every thread's allocations but strata's own, which are what this test is about.
    let checked = CheckedPasses::prepare(&gpu, 9, 3, PINNED_IN_PLACE_COLS);
    let captured = gpu.stream();
    let sum = gpu.zeroed(4);
    let (began, capturing) = std::sync::mpsc::channel();
    let (strata_done, done) = std::sync::mpsc::channel::<()>();
    // Raw handles and addresses cross to the capturing thread as plain integers.
    let (captured_handle, sum_address) = (captured.0 as usize, sum.0);
    let gpu = &gpu;
    std::thread::scope(|scope| {
        // Dropped if this thread panics, which lets the capturing thread end its capture.
        let strata_done = strata_done;
        let capture = scope.spawn(move || {
            let capture = GlobalCapture::begin(gpu, captured_handle as sys::CUstream, sum_address);
            began.send(()).unwrap();
            let _ = done.recv();
            capture.end()
        });
        capturing.recv().unwrap();
        // Strata allocates, pins and fills on this thread and on its copy thread meanwhile.
        checked.run(gpu);
        strata_done.send(()).unwrap();
        capture
            .join()
            .unwrap()
            .expect("strata's work on other threads left the global capture valid");
    });
    checked.verify(gpu);
}

#[test]
fn a_global_capture_on_the_calling_thread_neither_refuses_strata_nor_is_invalidated_by_it() {
    let Some(gpu) = gpu(
        "a_global_capture_on_the_calling_thread_neither_refuses_strata_nor_is_invalidated_by_it",
    ) else {
        return;
    };
    let checked = CheckedPasses::prepare(&gpu, 10, 3, PINNED_IN_PLACE_COLS);
    let captured = gpu.stream();
    let sum = gpu.zeroed(4);
    // The thread captures one stream and has strata work on another.
    let capture = GlobalCapture::begin(&gpu, captured.0, sum.0);
    checked.run(&gpu);
    capture
        .end()
        .expect("strata's work on the capturing thread left its capture valid");
    checked.verify(&gpu);
}

/// Layers of 128 x this many fp8 weights are 1 MiB on the host, the size strata pins in place
/// rather than staging.
const PINNED_IN_PLACE_COLS: usize = 8192;

/// A global-mode capture of `stream` on the calling thread, with one kernel in it; ended on drop
/// if `end` was not called, so that a failing test leaves no capture open behind it.
struct GlobalCapture(Option<sys::CUstream>);

impl GlobalCapture {
    fn begin(gpu: &Gpu, stream: sys::CUstream, sum: sys::CUdeviceptr) -> GlobalCapture {
        gpu.bind();
        // SAFETY: a live stream; the capture ends in `end` or on drop, on this same thread.
        unsafe {
            sys::cuStreamBeginCapture_v2(
                stream,
                sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_GLOBAL,
            )
        }
        .result()
        .unwrap();
        let capture = GlobalCapture(Some(stream));
        gpu.checksum(stream, sum as *mut c_void, 1, sum);
        capture
    }

    /// Ends the capture: an error if something invalidated it.
    fn end(mut self) -> std::result::Result<(), cudarc::driver::DriverError> {
        end_capture(self.0.take().unwrap())
    }
}

impl Drop for GlobalCapture {
    fn drop(&mut self) {
        if let Some(stream) = self.0.take() {
            let _ = end_capture(stream);
        }
    }
}

/// Ends a capture begun on this thread and destroys its graph: an error if something
/// invalidated the capture.
fn end_capture(stream: sys::CUstream) -> std::result::Result<(), cudarc::driver::DriverError> {
    let mut graph = ptr::null_mut();
    // SAFETY: a stream being captured on this thread.
    unsafe { sys::cuStreamEndCapture(stream, &mut graph) }.result()?;
    // SAFETY: the graph the capture made, destroyed once.
    unsafe { sys::cuGraphDestroy(graph) }.result()
}

/// Runs `passes` over its own layers in its own context on its own stream, checking every
/// tensor's checksum; used by the multi-context and per-thread tests.
fn checked_passes(gpu: &Gpu, seed: u64, passes: usize) {
    let checked = CheckedPasses::prepare(gpu, seed, passes, 512);
    checked.run(gpu);
    checked.verify(gpu);
}

/// Eight fp8 layers of 128 x `cols` in a CUDA context of their own, their expected bytes from a
/// CPU context, and a stream and device memory for the checksums of `passes` passes over them.
/// Split in three so that a test can run the passes alone while something else goes on: `run`
/// calls only strata, and enqueues only kernels.
struct CheckedPasses {
    seed: u64,
    passes: usize,
    cuda: Ctx,
    ids: Vec<u64>,
    expected: Vec<Vec<Vec<u8>>>,
    stream: Stream,
    sums: DeviceBytes,
}

impl CheckedPasses {
    fn prepare(gpu: &Gpu, seed: u64, passes: usize, cols: usize) -> CheckedPasses {
        let t = tiers(|t| {
            t.offload = place(STRATA_DEVICE_CPU, STRATA_DTYPE_F8_E5M2);
            t.computation.dtype = STRATA_DTYPE_F16;
            t.quantization = STRATA_QUANT_PER_TENSOR;
        });
        let cpu = Ctx::new(STRATA_UNLIMITED);
        let cpu_group = cpu.group(&t);
        let cuda = cuda_context(|o| o.vram_limit = 0);
        let group = cuda.group(&t);
        let mut ids = Vec::new();
        let mut expected = Vec::new();
        for i in 0..8 {
            let tensors = layer_tensors(seed * 100 + i, 128, cols);
            ids.push(register_f32(&cuda, group, &format!("l{i}"), &tensors));
            let id = register_f32(&cpu, cpu_group, &format!("l{i}"), &tensors);
            expected.push(cpu_bytes(&cpu, id));
        }
        let stream = gpu.stream();
        let sums = gpu.zeroed(passes * ids.len() * 2 * 4);
        CheckedPasses {
            seed,
            passes,
            cuda,
            ids,
            expected,
            stream,
            sums,
        }
    }

    fn run(&self, gpu: &Gpu) {
        for pass in 0..self.passes {
            for (i, &id) in self.ids.iter().enumerate() {
                let views = acquire_on(&self.cuda, id, self.stream.0);
                for (t, view) in views.iter().enumerate() {
                    let slot = ((pass * self.ids.len() + i) * 2 + t) as u64 * 4;
                    gpu.checksum(
                        self.stream.0,
                        view.data,
                        view.nbytes / 4,
                        self.sums.0 + slot,
                    );
                }
                ok(strata_release(
                    self.cuda.0,
                    id,
                    self.stream.0 as *mut c_void,
                ));
            }
        }
    }

    fn verify(&self, gpu: &Gpu) {
        gpu.synchronize(self.stream.0);
        let got = gpu.read(
            self.sums.0 as *mut c_void,
            self.passes * self.ids.len() * 2 * 4,
        );
        for (slot, sum) in got.chunks_exact(4).enumerate() {
            let (i, t) = ((slot / 2) % self.ids.len(), slot % 2);
            assert_eq!(
                u32::from_le_bytes(sum.try_into().unwrap()),
                expected_checksum(&self.expected[i][t]),
                "seed {}: slot {slot}",
                self.seed
            );
        }
    }
}

#[test]
fn several_contexts_share_one_device() {
    let Some(gpu) = gpu("several_contexts_share_one_device") else {
        return;
    };
    let first = cuda_context(|o| o.vram_limit = 0);
    let second = cuda_context(|o| o.vram_limit = 0);
    let group_a = first.group(&tiers(|_| {}));
    let group_b = second.group(&tiers(|_| {}));
    let a = plain_layers(&first, group_a, 4, 1 << 16);
    let b = plain_layers(&second, group_b, 4, 1 << 16);
    for round in 0..3 {
        for (&x, &y) in a.iter().zip(&b) {
            let bytes_a = gpu_bytes(&gpu, &first, x);
            let bytes_b = gpu_bytes(&gpu, &second, y);
            // Same registration order and seeds: the same bytes from two contexts.
            assert_eq!(bytes_a, bytes_b, "round {round}");
        }
    }
    checked_passes(&gpu, 1, 2);
}

/// Two contexts on the device over one host store: each layer is read from disk once, held and
/// pinned once (the second context finds the range registered already, portably), and both
/// stream it exactly; the copy is unpinned and freed only after both are done with it.
#[test]
fn contexts_over_one_store_stream_from_one_pinned_copy() {
    let Some(gpu) = gpu("contexts_over_one_store_stream_from_one_pinned_copy") else {
        return;
    };
    stream_over_one_store(&[&gpu, &gpu], false);
}

/// The same with a CPU context over the store too, filling each layer first: it cannot pin, so
/// the first CUDA context pins the copy for all, and that pin outlives the context (uploads from
/// the copy by the other context, after the first is gone, are still from pinned memory).
#[test]
fn contexts_over_one_store_filled_first_by_a_cpu_context_keep_its_copy_pinned() {
    let Some(gpu) =
        gpu("contexts_over_one_store_filled_first_by_a_cpu_context_keep_its_copy_pinned")
    else {
        return;
    };
    stream_over_one_store(&[&gpu, &gpu], true);
}

/// The same with the contexts on devices 0 and 1: device 1 uploads from the copy that device 0's
/// context pinned, as pinned memory (the registration is portable), into its own memory.
#[test]
fn contexts_on_two_devices_over_one_store_stream_from_one_pinned_copy() {
    let Some(gpus) = gpus(
        "contexts_on_two_devices_over_one_store_stream_from_one_pinned_copy",
        2,
    ) else {
        return;
    };
    let (layer_bytes, delta) = counting(&gpus, || {
        stream_over_one_store(&[&gpus[0], &gpus[1]], false)
    });
    let Some(delta) = delta else {
        return;
    };
    eprintln!("per device: {delta:?}");
    assert!(
        delta.iter().all(|d| d.allocations > 0),
        "both devices hold layers: {delta:?}"
    );
    if std::env::var_os("STRATA_EMULATED_CUDA_PINNABLE").is_none() {
        // Pinned once, by the context that filled each layer first (device 0's), and used as
        // pinned memory from both: each device uploaded every layer from pinned memory, none
        // from pageable (which a registration pinned for device 0's context alone would be on
        // device 1).
        assert_eq!(
            (delta[0].registered_bytes, delta[1].registered_bytes),
            (layer_bytes, 0),
            "{delta:?}"
        );
        assert!(
            delta
                .iter()
                .all(|d| d.pinned_upload_bytes >= layer_bytes && d.pageable_upload_bytes == 0),
            "{delta:?}"
        );
    }
}

/// Streams the layers of one checkpoint through a CUDA context per GPU of `gpus`, all over one
/// host store, twice, then again in the last context after the first is gone; checks the bytes,
/// one fill per layer and one read from disk, and (emulated) that the copies stay pinned after
/// the first context is gone. With `cpu_fills_first`, a CPU context over the store fills each
/// layer before the CUDA contexts need it. Returns the bytes of the layers' host copies.
fn stream_over_one_store(gpus: &[&Gpu], cpu_fills_first: bool) -> u64 {
    let dir = TempDir::new("cuda-store");
    let path = dir.path("model.safetensors");
    // 2 MiB of f32 per weight: large enough to be pinned in place.
    let (rows, cols, layers) = (1024, 512, 3);
    let file: Vec<_> = (0..layers)
        .map(|layer| {
            let values = weights(rows * cols, 40 + layer as u64, 0.05);
            let shape = vec![rows, cols];
            (
                format!("blocks.{layer}.weight"),
                safetensors::Dtype::F32,
                shape,
                f32_bytes(&values),
            )
        })
        .collect();
    write_safetensors(&path, &file);
    let t = tiers(|t| {
        t.offload = place(STRATA_DEVICE_DISK, STRATA_DTYPE_SOURCE);
        t.onload = place(STRATA_DEVICE_CPU, STRATA_DTYPE_SOURCE);
        t.computation.dtype = STRATA_DTYPE_BF16;
    });
    let cpu = Ctx::new(STRATA_UNLIMITED);
    cpu.register_prefix(cpu.group(&t), &path, "blocks.", 2);
    let options = strata::ffi::store::strata_store_options_default();
    let mut store = ptr::null_mut();
    ok(strata::ffi::store::strata_store_create(
        &options, &mut store,
    ));
    if cpu_fills_first {
        ok(strata::ffi::store::strata_context_attach_store(
            cpu.0, store,
        ));
    }
    let contexts: Vec<Ctx> = gpus
        .iter()
        .map(|gpu| {
            // No prefetch: the window counted after the first context leaves must see every
            // layer uploaded, and a copy engine could fill one ahead before it opens (it did,
            // 1 run in 40, from 7cd786e on).
            let ctx = cuda_context(|o| {
                o.device_index = gpu.ordinal;
                o.vram_limit = 0;
                o.prefetch_depth = 0;
            });
            ok(strata::ffi::store::strata_context_attach_store(
                ctx.0, store,
            ));
            ctx.register_prefix(ctx.group(&t), &path, "blocks.", 2);
            ctx
        })
        .collect();
    for round in 0..2 {
        for layer in 0..layers {
            let name = format!("blocks.{layer}");
            let reference = cpu_bytes(&cpu, cpu.find(&name));
            for (gpu, ctx) in gpus.iter().zip(&contexts) {
                let got = gpu_bytes(gpu, ctx, ctx.find(&name));
                assert!(got == reference, "{name}, round {round}");
            }
        }
    }
    let mut stats = strata::ffi::store::strata_store_stats {
        struct_size: std::mem::size_of::<strata::ffi::store::strata_store_stats>() as u32,
        ..Default::default()
    };
    ok(strata::ffi::store::strata_store_stats_get(
        store, &mut stats,
    ));
    assert_eq!((stats.fills, stats.layers), (layers as u64, layers as u64));
    let read: u64 = contexts
        .iter()
        .chain(cpu_fills_first.then_some(&cpu))
        .map(|c| c.stats().bytes_from_disk)
        .sum();
    let layer_bytes = (layers * rows * cols * 4) as u64;
    assert_eq!(read, layer_bytes, "read once");
    strata::ffi::store::strata_store_destroy(store);
    // The first context goes while the others still stream from the copy it pinned.
    let mut contexts = contexts.into_iter();
    drop(contexts.next());
    let ((), after) = counting(&gpus[1..], || {
        for (gpu, ctx) in gpus.iter().skip(1).zip(contexts) {
            for layer in 0..layers {
                let name = format!("blocks.{layer}");
                let got = gpu_bytes(gpu, &ctx, ctx.find(&name));
                assert!(
                    got == cpu_bytes(&cpu, cpu.find(&name)),
                    "{name} after the first left"
                );
            }
        }
    });
    if let Some(after) = after {
        if std::env::var_os("STRATA_EMULATED_CUDA_PINNABLE").is_none() {
            assert!(
                after
                    .iter()
                    .all(|d| d.pinned_upload_bytes >= layer_bytes && d.pageable_upload_bytes == 0),
                "the copies stay pinned after the context that pinned them left: {after:?}"
            );
        }
    }
    layer_bytes
}

#[test]
fn a_context_per_thread() {
    let Some(gpu) = gpu("a_context_per_thread") else {
        return;
    };
    let gpu = Arc::new(gpu);
    let threads: Vec<_> = (0..4)
        .map(|seed| {
            let gpu = gpu.clone();
            std::thread::spawn(move || checked_passes(&gpu, seed + 2, 4))
        })
        .collect();
    for thread in threads {
        thread.join().expect("a thread's passes");
    }
}

/// cuda.h's CU_STREAM_PER_THREAD: one handle, a different stream on each thread.
const PER_THREAD: sys::CUstream = 2 as sys::CUstream;

#[test]
fn per_thread_default_streams_each_keep_a_buffer_until_their_own_kernels_ran() {
    let Some(gpu) =
        gpu("per_thread_default_streams_each_keep_a_buffer_until_their_own_kernels_ran")
    else {
        return;
    };
    // Room for one layer: bringing in the second takes the first one's buffer.
    let numel = 256 << 10;
    let layer_bytes = numel as u64 * 2;
    let ctx = cuda_context(|o| {
        o.vram_limit = layer_bytes * 3 / 2;
        o.prefetch_depth = 0;
    });
    let group = ctx.group(&tiers(|_| {}));
    let ids = plain_layers(&ctx, group, 2, numel);
    let expected = expected_checksum(&bf16_bytes(&weights(numel, 0, 0.05)));
    // Channels, not barriers: a thread that panics drops its sender and the other one stops too.
    let (released, first_released) = std::sync::mpsc::channel();
    let (done, second_done) = std::sync::mpsc::channel::<()>();
    let (gpu, ctx, ids) = (&gpu, &ctx, &ids);
    std::thread::scope(|scope| {
        scope.spawn(move || {
            // Reads layer 0 on this thread's stream behind a long kernel (tens of ms).
            let sum = gpu.zeroed(4);
            let views = acquire_on(ctx, ids[0], PER_THREAD);
            gpu.spin(PER_THREAD, 50_000_000);
            gpu.checksum(PER_THREAD, views[0].data, views[0].nbytes / 4, sum.0);
            ok(strata_release(ctx.0, ids[0], PER_THREAD as *mut c_void));
            released.send(()).unwrap();
            // Err only when the other thread panicked, which the scope reports.
            let _ = second_done.recv();
            gpu.synchronize(PER_THREAD);
            let got = gpu.read(sum.0 as *mut c_void, 4);
            assert_eq!(
                u32::from_le_bytes(got.try_into().unwrap()),
                expected,
                "layer 0's buffer was rewritten before the kernel of the thread that released it first ran"
            );
        });
        scope.spawn(move || {
            first_released
                .recv()
                .expect("the first thread released layer 0");
            // The same handle on another thread is another, idle stream: its release event
            // completes at once and must not stand in for the first thread's.
            gpu.bind();
            acquire_on(ctx, ids[0], PER_THREAD);
            ok(strata_release(ctx.0, ids[0], PER_THREAD as *mut c_void));
            acquire_on(ctx, ids[1], PER_THREAD);
            ok(strata_release(ctx.0, ids[1], PER_THREAD as *mut c_void));
            gpu.synchronize(PER_THREAD);
            done.send(()).unwrap();
        });
    });
    assert!(
        ctx.stats().evictions > 0,
        "the second layer never took the first one's room"
    );
}

// SAFETY: (for the Arc above) the driver's handles are thread-safe; the test's kernel handle is
// only passed to launches.
unsafe impl Send for Gpu {}
// SAFETY: as for Send.
unsafe impl Sync for Gpu {}

/// The primary context, for the stress run's threads, which start with none current.
static PRIMARY: std::sync::OnceLock<usize> = std::sync::OnceLock::new();

/// Reads a view's device bytes on the legacy default stream, which the acquire (on NULL) made
/// wait for them.
fn read_device(view: &strata_tensor_view) -> std::borrow::Cow<'_, [u8]> {
    if result::ctx::get_current().unwrap().is_none() {
        let primary = *PRIMARY.get().expect("set before the threads start");
        // SAFETY: the primary context, retained by the test's Gpu for the whole run.
        unsafe { result::ctx::set_current(primary as sys::CUcontext) }.unwrap();
    }
    let mut bytes = vec![0u8; view.nbytes as usize];
    if !bytes.is_empty() {
        // SAFETY: the view is of an acquired layer, `nbytes` long.
        unsafe { result::memcpy_dtoh_sync(&mut bytes, view.data as sys::CUdeviceptr) }.unwrap();
    }
    std::borrow::Cow::Owned(bytes)
}

#[test]
fn threads_acquiring_random_layers_under_a_tiny_budget_see_exact_bytes() {
    let Some(gpu) = gpu("threads_acquiring_random_layers_under_a_tiny_budget_see_exact_bytes")
    else {
        return;
    };
    PRIMARY.get_or_init(|| gpu.context.cu_ctx() as usize);
    // Every path at once: fp8 per-channel converted by a kernel, f16 read from disk through the
    // staging ring on every miss, f32 uploaded as it is; a budget of 2.5 layers, so threads
    // evict each other's layers and reuse each other's buffers.
    let report = stress::run_threads(&stress::ThreadsConfig {
        device: stress::ViewDevice {
            abi: STRATA_DEVICE_CUDA,
            read: read_device,
        },
        threads: 4,
        duration: std::time::Duration::from_secs(3),
        layers_of_budget: 2.5,
        seed: 7,
    });
    report.print();
    assert!(report.verified > 100, "{report:?}");
    assert!(report.peak_seen <= report.limit, "{report:?}");
    assert!(
        report.stats.evictions > 0 && report.stats.misses > 0,
        "{report:?}"
    );
}

/// Runs every other test of this file in a child process whose libcuda.so is the emulated
/// driver (see the top of this file), with two devices: once as built, and once with no host
/// memory pinnable, so that every upload takes the pageable path. A test that skipped there
/// counts as a failure.
#[test]
fn every_gpu_test_passes_on_the_emulated_driver() {
    const THIS: &str = "every_gpu_test_passes_on_the_emulated_driver";
    if std::env::var_os(EMULATED).is_some() {
        return;
    }
    let dir = programs::BuildDir::new("emulated-cuda");
    if !programs::build_emulated_driver(dir.path()) {
        skipped(THIS, "no C++ compiler (c++, g++ or clang++) on PATH");
        return;
    }
    let tests = include_str!("cuda.rs")
        .lines()
        .filter(|line| line.trim() == "#[test]")
        .count();
    let others = tests - 1;
    for (label, pinnable) in [("as built", None), ("with nothing pinnable", Some("0"))] {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap());
        child
            .args([
                "--test-threads=1",
                "--show-output",
                "--exact",
                "--skip",
                THIS,
            ])
            .env("LD_LIBRARY_PATH", dir.path())
            .env(EMULATED, "1")
            .env("STRATA_EMULATED_CUDA_DEVICES", EMULATED_DEVICES)
            .env_remove("STRATA_EMULATED_CUDA_PINNABLE");
        if let Some(bytes) = pinnable {
            child.env("STRATA_EMULATED_CUDA_PINNABLE", bytes);
        }
        let output =
            programs::output_within(&mut child, dir.path(), programs::SUITE_TIMEOUT).unwrap();
        let report = programs::describe(&output);
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "on the emulated driver {label}:\n{report}"
        );
        assert!(
            !stderr.contains("SKIPPED"),
            "a test skipped on the emulated driver {label}:\n{report}"
        );
        let passed = format!("test result: ok. {others} passed");
        assert!(
            stdout.contains(&passed),
            "expected `{passed}` on the emulated driver {label}:\n{report}"
        );
        eprintln!("emulated driver {label}: {others} tests passed");
        for line in stdout.lines().filter(|l| l.starts_with("threads:")) {
            eprintln!("emulated driver {label}: {line}");
        }
    }
}
