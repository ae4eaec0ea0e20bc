//! acquire + release of a resident layer through the C ABI, single-threaded: the overhead a
//! forward hook pays per layer when nothing has to move. Target: <= 150 ns. Measured three ways:
//! one layer over and over (read in place, and from its prepared copy), and a pass over 16
//! resident layers, where the learned order predicts the next ones and the copy engine is asked
//! about them on every acquire, as in a real forward pass.
//!
//! Run: cargo bench --bench acquire [-- ITERATIONS]

use std::ffi::{c_void, CString};
use std::hint::black_box;
use std::ptr;
use std::time::Instant;
use strata::ffi::acquire::{strata_acquire_for_compute, strata_release, strata_tensor_view};
use strata::ffi::consts::{STRATA_DTYPE_BF16, STRATA_DTYPE_F32, STRATA_OK, STRATA_UNLIMITED};
use strata::ffi::context::{strata_context_create, strata_context_destroy, strata_options_default};
use strata::ffi::group::{strata_group_create, strata_tiers_default};
use strata::ffi::layer::{strata_host_tensor, strata_layer_register_host};

fn main() {
    let mut options = strata_options_default();
    options.vram_limit = STRATA_UNLIMITED;
    let mut ctx = ptr::null_mut();
    assert_eq!(strata_context_create(&options, &mut ctx), STRATA_OK);
    let mut results = Vec::new();
    for (label, computation, layer_count) in [
        ("in place (host copy is the computation form)", 0, 1),
        (
            "resident on the device (a prepared bf16 copy)",
            STRATA_DTYPE_BF16,
            1,
        ),
        (
            "a pass over 16 resident layers (prepared bf16 copies)",
            STRATA_DTYPE_BF16,
            16,
        ),
    ] {
        let mut tiers = strata_tiers_default();
        // The host tiers keep the source (f32): a bf16 preparing tier makes a device copy, which
        // stays resident, as on a GPU.
        tiers.preparing.dtype = computation;
        tiers.computation.dtype = computation;
        let mut group = 0;
        let name = CString::new(label).unwrap();
        assert_eq!(
            strata_group_create(ctx, name.as_ptr(), &tiers, &mut group),
            STRATA_OK
        );
        let data = vec![0u8; 256 * 256 * 4];
        let shape = [256i64, 256];
        let tensor_names = [
            CString::new("weight").unwrap(),
            CString::new("bias").unwrap(),
        ];
        let tensors: Vec<strata_host_tensor> = tensor_names
            .iter()
            .enumerate()
            .map(|(i, n)| strata_host_tensor {
                name: n.as_ptr(),
                dtype: STRATA_DTYPE_F32,
                ndim: 2 - i as u32,
                shape: shape.as_ptr(),
                data: data.as_ptr() as *const c_void,
            })
            .collect();
        let layers: Vec<u64> = (0..layer_count)
            .map(|i| {
                let mut layer = 0;
                let layer_name = CString::new(format!("{label} {i}")).unwrap();
                assert_eq!(
                    strata_layer_register_host(
                        ctx,
                        group,
                        layer_name.as_ptr(),
                        tensors.as_ptr(),
                        2,
                        &mut layer
                    ),
                    STRATA_OK
                );
                layer
            })
            .collect();
        let mut next = 0;
        // SAFETY: a view is plain integers and pointers, for which all-zero bytes are valid.
        let mut views: [strata_tensor_view; 2] = unsafe { std::mem::zeroed() };
        let mut count = 0;
        let mut cycle = || {
            let layer = layers[next];
            next = (next + 1) % layers.len();
            assert_eq!(
                strata_acquire_for_compute(
                    ctx,
                    layer,
                    ptr::null_mut(),
                    views.as_mut_ptr(),
                    2,
                    &mut count
                ),
                STRATA_OK
            );
            black_box(&views);
            assert_eq!(strata_release(ctx, layer, ptr::null_mut()), STRATA_OK);
        };
        for _ in 0..10_000 {
            cycle();
        }
        // An argument lowers the count, e.g. to count instructions under callgrind.
        let iterations = std::env::args()
            .find_map(|n| n.parse().ok())
            .unwrap_or(1_000_000);
        let best = (0..5)
            .map(|_| {
                let started = Instant::now();
                for _ in 0..iterations {
                    cycle();
                }
                started.elapsed().as_nanos() as f64 / iterations as f64
            })
            .fold(f64::INFINITY, f64::min);
        results.push((label, best));
    }
    for (label, ns) in results {
        println!(
            "acquire+release, {label}: {ns:.0} ns (target <= 150 ns: ratio {:.2})",
            ns / 150.0
        );
    }
    strata_context_destroy(ctx);
}
