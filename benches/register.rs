//! Registering a checkpoint of many tensors: how the time grows with the tensor count. A hostile
//! (or merely huge) checkpoint must not make `strata_checkpoint_open` or
//! `strata_group_register_checkpoint` quadratic.
//!
//! For each count N, writes a safetensors file of N empty f32 tensors named `blocks.{i}.weight`,
//! then times, through the C ABI: opening it, registering it with `keep_components` 2 (N layers
//! of one tensor each), and registering it again into a fresh context with `keep_components` 1
//! (one layer of N tensors), then destroying the context. Prints each time, and the time per
//! tensor of the largest N against the smallest's: a linear (or N log N) registration keeps that
//! ratio near 1, a quadratic one makes it grow with N.
//!
//! Run: cargo bench --bench register
//!   STRATA_BENCH_REGISTER_COUNTS=10000,80000,200000   the tensor counts (default)

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::ptr;
use std::time::{Duration, Instant};
use strata::ffi::checkpoint::{strata_checkpoint_close, strata_checkpoint_open};
use strata::ffi::consts::STRATA_OK;
use strata::ffi::context::{strata_context_create, strata_context_destroy, strata_options_default};
use strata::ffi::group::{strata_group_create, strata_tiers_default};
use strata::ffi::layer::strata_group_register_checkpoint;

/// Per tensor, the largest count may cost at most this many times the smallest's before the
/// benchmark calls the growth superlinear: generous, since allocators and caches do not scale
/// perfectly, but far below what a quadratic step gives over a 20x range.
const PER_TENSOR_LIMIT: f64 = 3.0;

fn main() {
    let counts: Vec<usize> = std::env::var("STRATA_BENCH_REGISTER_COUNTS")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![10_000, 80_000, 200_000]);
    assert!(!counts.is_empty(), "no tensor counts to measure");
    let dir = std::env::temp_dir();
    let mut per_tensor = Vec::new();
    println!(
        "{:>9}  {:>9}  {:>16}  {:>16}  {:>9}",
        "tensors", "open", "register N layers", "register 1 layer", "destroy"
    );
    for &count in &counts {
        let file = Removed(dir.join(format!(
            "strata-bench-register-{}-{count}.safetensors",
            std::process::id()
        )));
        write_empty_tensors(&file.0, count);
        let times = register(&file.0, count);
        println!(
            "{count:>9}  {:>7.3} s  {:>14.3} s  {:>14.3} s  {:>7.3} s",
            times.open.as_secs_f64(),
            times.many_layers.as_secs_f64(),
            times.one_layer.as_secs_f64(),
            times.destroy.as_secs_f64()
        );
        per_tensor.push(times.total().as_secs_f64() / count as f64);
    }
    if counts.len() < 2 {
        return;
    }
    let (first, last) = (per_tensor[0], per_tensor[per_tensor.len() - 1]);
    let ratio = last / first;
    println!(
        "time per tensor at {} tensors / at {}: {ratio:.2} (limit {PER_TENSOR_LIMIT}): {}",
        counts[counts.len() - 1],
        counts[0],
        if ratio <= PER_TENSOR_LIMIT {
            "linear"
        } else {
            "SUPERLINEAR"
        }
    );
}

struct Times {
    open: Duration,
    many_layers: Duration,
    one_layer: Duration,
    destroy: Duration,
}

impl Times {
    fn total(&self) -> Duration {
        self.open + self.many_layers + self.one_layer + self.destroy
    }
}

fn register(path: &Path, count: usize) -> Times {
    let check = |status| assert_eq!(status, STRATA_OK);
    let options = strata_options_default();
    let mut contexts = [ptr::null_mut(), ptr::null_mut()];
    for ctx in &mut contexts {
        check(strata_context_create(&options, ctx));
    }
    let started = Instant::now();
    let mut ckpt = ptr::null_mut();
    let path = CString::new(path.to_str().unwrap()).unwrap();
    check(strata_checkpoint_open(
        contexts[0],
        path.as_ptr(),
        &mut ckpt,
    ));
    let open = started.elapsed();

    let mut registered = [Duration::ZERO; 2];
    for ((ctx, keep), time) in contexts.iter().zip([2, 1]).zip(&mut registered) {
        let mut group = 0;
        check(strata_group_create(
            *ctx,
            c"blocks".as_ptr(),
            &strata_tiers_default(),
            &mut group,
        ));
        let started = Instant::now();
        let mut layers = 0;
        check(strata_group_register_checkpoint(
            *ctx,
            group,
            ckpt,
            c"blocks.".as_ptr(),
            keep,
            &mut layers,
        ));
        *time = started.elapsed();
        assert_eq!(layers, if keep == 2 { count } else { 1 });
    }
    strata_checkpoint_close(ckpt);
    let started = Instant::now();
    for ctx in contexts {
        strata_context_destroy(ctx);
    }
    Times {
        open,
        many_layers: registered[0],
        one_layer: registered[1],
        destroy: started.elapsed(),
    }
}

fn write_empty_tensors(path: &Path, count: usize) {
    let names: Vec<String> = (0..count).map(|i| format!("blocks.{i}.weight")).collect();
    let views: Vec<(&str, safetensors::tensor::TensorView)> = names
        .iter()
        .map(|name| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![0], &[])
                .unwrap();
            (name.as_str(), view)
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// A file removed when dropped, so an interrupted run leaves nothing behind.
struct Removed(PathBuf);

impl Drop for Removed {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
