//! Helpers shared by the integration tests: they call the library only through its C ABI.
#![allow(dead_code, unused_imports)]

use std::ffi::{c_void, CString};
use std::path::{Path, PathBuf};
use std::ptr;

pub mod programs;
pub mod stress;
pub use strata::dtype::*;
pub use strata::error::*;
pub use strata::ffi::acquire::*;
pub use strata::ffi::checkpoint::*;
pub use strata::ffi::consts::*;
pub use strata::ffi::context::*;
pub use strata::ffi::error::*;
pub use strata::ffi::group::*;
pub use strata::ffi::layer::*;
pub use strata::ffi::log::*;
pub use strata::ffi::stats::*;
pub use strata::tiers::*;

/// Fails the test with the library's own message when a call does not return `expected`.
#[track_caller]
pub fn expect(status: strata_status, expected: strata_status) {
    if status != expected {
        panic!(
            "expected {} but got {}: {}",
            name(expected),
            name(status),
            last_error()
        );
    }
}

#[track_caller]
pub fn ok(status: strata_status) {
    expect(status, STRATA_OK)
}

pub fn name(status: strata_status) -> String {
    // SAFETY: strata_status_name returns a static NUL-terminated string for every status.
    unsafe { std::ffi::CStr::from_ptr(strata_status_name(status)) }
        .to_string_lossy()
        .into_owned()
}

pub fn last_error() -> String {
    let len = strata_last_error(ptr::null_mut(), 0);
    let mut buf = vec![0u8; len + 1];
    strata_last_error(buf.as_mut_ptr() as *mut _, buf.len());
    String::from_utf8_lossy(&buf[..len]).into_owned()
}

pub fn cstr(s: &str) -> CString {
    CString::new(s).unwrap()
}

/// A context that is destroyed when dropped.
pub struct Ctx(pub *mut strata_context);

impl Ctx {
    /// A CPU context without prefetching, so every figure a test counts comes from its own
    /// acquires alone.
    pub fn new(vram_limit: u64) -> Ctx {
        Self::with(|o| {
            o.vram_limit = vram_limit;
            o.prefetch_depth = 0;
        })
    }

    pub fn with(edit: impl FnOnce(&mut strata_options)) -> Ctx {
        let mut options = strata_options_default();
        edit(&mut options);
        let mut ctx = ptr::null_mut();
        ok(strata_context_create(&options, &mut ctx));
        Ctx(ctx)
    }

    pub fn group(&self, tiers: &strata_tiers) -> u64 {
        let mut group = 0;
        ok(strata_group_create(
            self.0,
            cstr("g").as_ptr(),
            tiers,
            &mut group,
        ));
        group
    }

    pub fn stats(&self) -> strata_stats {
        let mut stats = strata_stats {
            struct_size: std::mem::size_of::<strata_stats>() as u32,
            ..Default::default()
        };
        ok(strata_stats_get(self.0, &mut stats));
        stats
    }

    /// Registers one layer of host tensors: (name, dtype, shape, bytes).
    pub fn register(
        &self,
        group: u64,
        layer: &str,
        tensors: &[(&str, u32, Vec<i64>, Vec<u8>)],
    ) -> u64 {
        let mut id = 0;
        ok(self.try_register(group, layer, tensors, &mut id));
        id
    }

    pub fn try_register(
        &self,
        group: u64,
        layer: &str,
        tensors: &[(&str, u32, Vec<i64>, Vec<u8>)],
        id: &mut u64,
    ) -> strata_status {
        let names: Vec<CString> = tensors.iter().map(|t| cstr(t.0)).collect();
        let raw: Vec<strata_host_tensor> = tensors
            .iter()
            .zip(&names)
            .map(|(t, n)| strata_host_tensor {
                name: n.as_ptr(),
                dtype: t.1,
                ndim: t.2.len() as u32,
                shape: t.2.as_ptr(),
                data: t.3.as_ptr() as *const c_void,
            })
            .collect();
        strata_layer_register_host(
            self.0,
            group,
            cstr(layer).as_ptr(),
            raw.as_ptr(),
            raw.len(),
            id,
        )
    }

    /// Acquires a layer into room for 16 views: the status and the views written.
    pub fn acquire_views(&self, layer: u64) -> (strata_status, Vec<strata_tensor_view>) {
        let mut views = vec![empty_view(); 16];
        let mut count = 0;
        let status = strata_acquire_for_compute(
            self.0,
            layer,
            ptr::null_mut(),
            views.as_mut_ptr(),
            views.len(),
            &mut count,
        );
        views.truncate(count);
        (status, views)
    }

    /// Acquires a layer and returns only the status; the layer stays acquired on success.
    pub fn try_acquire(&self, layer: u64) -> strata_status {
        self.acquire_views(layer).0
    }

    /// Acquires a layer and copies out each tensor's bytes; the layer stays acquired.
    pub fn acquire(&self, layer: u64) -> Vec<(strata_tensor_view, Vec<u8>)> {
        let (status, views) = self.acquire_views(layer);
        ok(status);
        views
            .iter()
            .map(|v| {
                // SAFETY: a view points at `nbytes` readable bytes until the layer is released,
                // which this function's caller does only after the copy below.
                let bytes =
                    unsafe { std::slice::from_raw_parts(v.data as *const u8, v.nbytes as usize) }
                        .to_vec();
                (*v, bytes)
            })
            .collect()
    }

    /// Opens a checkpoint, registers every tensor under `prefix` into `group`, closes it again.
    pub fn register_prefix(
        &self,
        group: u64,
        path: &Path,
        prefix: &str,
        keep_components: u32,
    ) -> usize {
        let ckpt = open_checkpoint(self, path);
        let mut n = 0;
        ok(strata_group_register_checkpoint(
            self.0,
            group,
            ckpt,
            cstr(prefix).as_ptr(),
            keep_components,
            &mut n,
        ));
        strata_checkpoint_close(ckpt);
        n
    }

    /// Opens a checkpoint, registers the named tensors as one layer of `group`, closes it again.
    pub fn register_tensors(&self, group: u64, path: &Path, layer: &str, tensors: &[&str]) -> u64 {
        let ckpt = open_checkpoint(self, path);
        let names: Vec<CString> = tensors.iter().map(|t| cstr(t)).collect();
        let pointers: Vec<_> = names.iter().map(|n| n.as_ptr()).collect();
        let mut id = 0;
        ok(strata_layer_register_checkpoint(
            self.0,
            group,
            ckpt,
            cstr(layer).as_ptr(),
            pointers.as_ptr(),
            pointers.len(),
            &mut id,
        ));
        strata_checkpoint_close(ckpt);
        id
    }

    pub fn find(&self, name: &str) -> u64 {
        let mut id = 0;
        ok(strata_layer_find(self.0, cstr(name).as_ptr(), &mut id));
        id
    }

    pub fn release(&self, layer: u64) {
        ok(strata_release(self.0, layer, ptr::null_mut()));
    }
}

// SAFETY: contexts are thread-safe by contract; the wrapper only holds the pointer.
unsafe impl Send for Ctx {}
// SAFETY: as for Send: any thread may call into a context at once.
unsafe impl Sync for Ctx {}

impl Drop for Ctx {
    fn drop(&mut self) {
        strata_context_destroy(self.0);
    }
}

pub fn empty_view() -> strata_tensor_view {
    strata_tensor_view {
        name: ptr::null(),
        data: ptr::null_mut(),
        dtype: 0,
        device: 0,
        device_index: 0,
        ndim: 0,
        shape: [0; 8],
        nbytes: 0,
    }
}

pub fn tiers(edit: impl FnOnce(&mut strata_tiers)) -> strata_tiers {
    let mut t = strata_tiers_default();
    edit(&mut t);
    t
}

pub fn place(device: u32, dtype: u32) -> strata_placement {
    strata_placement { device, dtype }
}

pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

pub fn f32_values(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

pub fn bf16_bytes(values: &[f32]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
        .collect()
}

/// Deterministic pseudo-random values with roughly the given standard deviation.
pub fn weights(n: usize, seed: u64, std: f32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            // Sum of uniforms: close enough to a normal for weights.
            let mut sum = 0.0;
            for _ in 0..4 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                sum += (state >> 11) as f32 / (1u64 << 53) as f32 - 0.5;
            }
            sum * std * (12.0f32 / 4.0).sqrt()
        })
        .collect()
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("strata-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes a safetensors file of (name, dtype, shape, bytes).
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, safetensors::Dtype, Vec<usize>, Vec<u8>)],
) {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

pub fn open_checkpoint(ctx: &Ctx, path: &Path) -> *mut strata_checkpoint {
    let mut ckpt = ptr::null_mut();
    ok(strata_checkpoint_open(
        ctx.0,
        cstr(path.to_str().unwrap()).as_ptr(),
        &mut ckpt,
    ));
    ckpt
}

/// The folder holding libstrata.so and libstrata.a for this build. `cargo test` leaves them in
/// target/<profile>/deps beside the test binaries; `cargo build` also copies them one level up.
pub fn library_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let deps = exe
        .parent()
        .expect("the test binary lives in target/<profile>/deps");
    let candidates = [
        deps.to_path_buf(),
        deps.parent().unwrap_or(deps).to_path_buf(),
    ];
    candidates
        .iter()
        .find(|dir| dir.join("libstrata.so").exists() && dir.join("libstrata.a").exists())
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "libstrata.so and libstrata.a are not in {candidates:?}: run cargo test --release"
            )
        })
}

/// A view's tensor name.
pub fn view_name(view: &strata_tensor_view) -> String {
    // SAFETY: a view's name is a NUL-terminated string that lives as long as its layer.
    unsafe { std::ffi::CStr::from_ptr(view.name) }
        .to_string_lossy()
        .into_owned()
}

/// Writes a sharded checkpoint's index as Hugging Face tools do: `metadata.total_size` and a
/// `weight_map` from tensor name to shard file name.
pub fn write_index(path: &Path, total_size: u64, weight_map: &[(&str, &str)]) {
    let map: serde_json::Map<String, serde_json::Value> = weight_map
        .iter()
        .map(|(tensor, shard)| (tensor.to_string(), serde_json::Value::from(*shard)))
        .collect();
    let index = serde_json::json!({"metadata": {"total_size": total_size}, "weight_map": map});
    std::fs::write(path, serde_json::to_string_pretty(&index).unwrap()).unwrap();
}

/// Says why a test did not run, past the harness's capture so that a passing run shows it.
/// Under CI (CI=true) .ci/run has installed every tool the tests use, so only a missing CUDA
/// driver or device may skip a test there: any other reason fails it.
pub fn skip(line: &str) {
    let on_ci = std::env::var("CI").is_ok_and(|value| value == "true");
    assert!(
        !on_ci || line.contains("CUDA"),
        "{line}\n(under CI=true a test may skip only for want of a CUDA driver or device: \
         .ci/run installs everything else)"
    );
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Runs `scenario` on its own thread; fails when it does not end within `seconds`, so a call that
/// hangs (a deadlock, a wait nobody ends) fails the test instead of hanging it.
pub fn within(seconds: u64, scenario: impl FnOnce() + Send + 'static) {
    let (done, ended) = std::sync::mpsc::channel();
    let worker = std::thread::spawn(move || {
        scenario();
        let _ = done.send(());
    });
    match ended.recv_timeout(std::time::Duration::from_secs(seconds)) {
        Ok(()) => worker.join().unwrap(),
        // The scenario panicked: its own message says why.
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            std::panic::resume_unwind(worker.join().unwrap_err())
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("no return within {seconds} s: a call hangs")
        }
    }
}

/// Acquires a layer through a raw context pointer (as a callback or another thread has it) into
/// room for 8 views; only the status. On success the layer stays acquired.
pub fn acquire_status(ctx: *mut strata_context, layer: u64) -> strata_status {
    let mut views = [empty_view(); 8];
    let mut count = 0;
    strata_acquire_for_compute(
        ctx,
        layer,
        ptr::null_mut(),
        views.as_mut_ptr(),
        views.len(),
        &mut count,
    )
}
