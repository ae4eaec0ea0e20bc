//! Opens arbitrary bytes as a checkpoint, in each of the three layouts strata accepts, and reads
//! every tensor of what opens. Bad input must give an error, never a panic or an abort; and what
//! opened must read back, whole and streamed alike, since nothing changes the files meanwhile.
//! Then through the C ABI, as a user shares one host copy: two CPU contexts attached to one
//! host store register every tensor as a layer (offload on disk, onload in RAM), and each
//! acquires them all. Every status must be a documented one; what acquires must hold the bytes
//! read above; the store must have filled each layer once and shared it once, and hold nothing
//! once both contexts are gone.
//!
//! The first byte picks the layout (its value modulo 3); the rest is cut into files by
//! little-endian u16 lengths:
//!   0: [file]                          one `model.safetensors`
//!   1: [len][index][len][a][b]         `model.safetensors.index.json` beside `a.safetensors`
//!                                      and `b.safetensors`, opened as the index and as the folder
//!   2: [len][a][b]                     a folder of `a.safetensors` and `b.safetensors`
//! Run it with scripts/fuzz.sh; the seeds (fuzz/seeds/checkpoint_open) come from seeds.py.

#![no_main]

use libfuzzer_sys::fuzz_target;
use once_cell::sync::Lazy;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::ptr;
use strata::checkpoint::{Checkpoint, ReadMode};
use strata::ffi::acquire::*;
use strata::ffi::checkpoint::*;
use strata::ffi::consts::*;
use strata::ffi::context::*;
use strata::ffi::error::*;
use strata::ffi::group::*;
use strata::ffi::layer::*;
use strata::ffi::store::*;

/// One folder per process under the temp dir (scripts/fuzz.sh points TMPDIR at memory and removes
/// it after): the files are rewritten on every run.
static DIR: Lazy<PathBuf> = Lazy::new(|| {
    let dir = std::env::temp_dir().join(format!("strata-fuzz-{}", std::process::id()));
    for layout in ["single", "index", "shards"] {
        std::fs::create_dir_all(dir.join(layout)).unwrap();
    }
    dir
});

/// The next `[u16 length][bytes]` piece of `data`, cut short where `data` ends.
fn take<'a>(data: &mut &'a [u8]) -> &'a [u8] {
    let len = match data {
        [low, high, ..] => u16::from_le_bytes([*low, *high]) as usize,
        _ => 0,
    };
    let rest = data.get(2..).unwrap_or(&[]);
    let (piece, rest) = rest.split_at(len.min(rest.len()));
    *data = rest;
    piece
}

fn write(path: &Path, bytes: &[u8]) -> PathBuf {
    std::fs::write(path, bytes).unwrap();
    path.to_path_buf()
}

fn open_and_read_all(path: &Path) {
    let Ok(checkpoint) = Checkpoint::open(path) else {
        return;
    };
    let mut tensors = Vec::new();
    let mut total = 0u64;
    for tensor in checkpoint.tensors() {
        // Validation put every tensor inside a file no larger than the input.
        let mut whole = vec![0u8; tensor.nbytes as usize];
        tensor
            .read_into(&mut whole)
            .expect("an opened tensor reads");
        // Streamed in small pieces with O_DIRECT (buffered where refused), two areas in turn:
        // every unaligned offset and length reads the bytes the buffered read did.
        let mut streamed = Vec::with_capacity(whole.len());
        tensor
            .read_chunks(&mut [0u8; 122], 61, ReadMode::Direct, |offset, piece| {
                assert_eq!(offset, streamed.len() as u64);
                streamed.extend_from_slice(piece);
                Ok(())
            })
            .expect("an opened tensor streams");
        assert!(streamed == whole, "{}: streamed bytes differ", tensor.name);
        total += tensor.nbytes;
        tensors.push((tensor.name.clone(), whole));
    }
    assert_eq!(total, checkpoint.total_bytes());
    share_through_a_store(path, &tensors);
}

fn status_name(status: strata_status) -> String {
    // SAFETY: strata_status_name returns a static NUL-terminated string for every number.
    unsafe { std::ffi::CStr::from_ptr(strata_status_name(status)) }
        .to_string_lossy()
        .into_owned()
}

/// Fails the input unless `status` is STRATA_OK.
fn ok(status: strata_status, call: &str) {
    assert_eq!(status, STRATA_OK, "{call}: {}", status_name(status));
}

/// One CPU context attached to `store`, `tensors` registered one layer each from the checkpoint
/// at `path`: the context and the layers that registered, with their tensors' bytes.
fn context_over<'a>(
    store: *mut strata_store,
    path: &Path,
    tensors: &'a [(String, Vec<u8>)],
) -> (*mut strata_context, Vec<(u64, &'a [u8])>) {
    let options = strata_options_default();
    let mut ctx = ptr::null_mut();
    ok(
        strata_context_create(&options, &mut ctx),
        "strata_context_create",
    );
    ok(
        strata_context_attach_store(ctx, store),
        "strata_context_attach_store",
    );
    let path = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let mut ckpt = ptr::null_mut();
    // The same files opened above, unchanged since: the ABI opens them too.
    ok(
        strata_checkpoint_open(ctx, path.as_ptr(), &mut ckpt),
        "strata_checkpoint_open",
    );
    let mut tiers = strata_tiers_default();
    tiers.offload = strata_placement {
        device: STRATA_DEVICE_DISK,
        dtype: STRATA_DTYPE_SOURCE,
    };
    tiers.onload = strata_placement {
        device: STRATA_DEVICE_CPU,
        dtype: STRATA_DTYPE_SOURCE,
    };
    let mut group = 0;
    ok(
        strata_group_create(ctx, c"g".as_ptr(), &tiers, &mut group),
        "strata_group_create",
    );
    let mut layers = Vec::new();
    for (index, (name, bytes)) in tensors.iter().enumerate() {
        // A name with a NUL in it cannot be passed through C.
        let Ok(name) = CString::new(name.as_str()) else {
            continue;
        };
        let layer_name = CString::new(format!("layer {index}")).unwrap();
        let mut layer = 0;
        match strata_layer_register_checkpoint(
            ctx,
            group,
            ckpt,
            layer_name.as_ptr(),
            &name.as_ptr(),
            1,
            &mut layer,
        ) {
            STRATA_OK => layers.push((layer, bytes.as_slice())),
            // A tensor strata does not manage (an integer dtype, say) is refused as such.
            STRATA_ERR_UNSUPPORTED | STRATA_ERR_INVALID_ARGUMENT | STRATA_ERR_FORMAT => {}
            status => panic!("strata_layer_register_checkpoint: {}", status_name(status)),
        }
    }
    strata_checkpoint_close(ckpt);
    (ctx, layers)
}

/// Acquires every layer, checks its one view's bytes, releases it.
fn acquire_all(ctx: *mut strata_context, layers: &[(u64, &[u8])]) {
    for &(layer, expected) in layers {
        // SAFETY: a zeroed view is a valid value of this plain C struct (NULL pointers, zeros).
        let mut view: strata_tensor_view = unsafe { std::mem::zeroed() };
        let mut count = 0;
        let status =
            strata_acquire_for_compute(ctx, layer, ptr::null_mut(), &mut view, 1, &mut count);
        ok(status, "strata_acquire_for_compute");
        assert_eq!((count, view.nbytes), (1, expected.len() as u64));
        if !expected.is_empty() {
            // SAFETY: an acquired view points at `nbytes` readable bytes until the release below.
            let got = unsafe { std::slice::from_raw_parts(view.data as *const u8, expected.len()) };
            assert!(
                got == expected,
                "layer {layer}: acquired bytes differ from the file's"
            );
        }
        ok(
            strata_release(ctx, layer, ptr::null_mut()),
            "strata_release",
        );
    }
}

fn store_stats(store: *mut strata_store) -> strata_store_stats {
    let mut stats = strata_store_stats {
        struct_size: std::mem::size_of::<strata_store_stats>() as u32,
        ..Default::default()
    };
    ok(
        strata_store_stats_get(store, &mut stats),
        "strata_store_stats_get",
    );
    stats
}

fn share_through_a_store(path: &Path, tensors: &[(String, Vec<u8>)]) {
    let options = strata_store_options_default();
    let mut store = ptr::null_mut();
    ok(
        strata_store_create(&options, &mut store),
        "strata_store_create",
    );
    let (a, layers_a) = context_over(store, path, tensors);
    let (b, layers_b) = context_over(store, path, tensors);
    assert_eq!(
        layers_a.len(),
        layers_b.len(),
        "both contexts register the same layers"
    );
    acquire_all(a, &layers_a);
    acquire_all(b, &layers_b);
    let stats = store_stats(store);
    let count = layers_a.len() as u64;
    assert_eq!(
        (stats.fills, stats.shared, stats.layers),
        (count, count, count),
        "each layer filled once, by the first context, and shared once, with the second"
    );
    // A host copy holds its tensor from a 64-byte boundary, rounded up to the next one.
    let held: u64 = layers_a
        .iter()
        .map(|(_, bytes)| bytes.len().div_ceil(64) as u64 * 64)
        .sum();
    assert_eq!(
        (stats.bytes_filled, stats.host_in_use),
        (held, held),
        "the store filled and holds each copy once"
    );
    strata_context_destroy(a);
    strata_context_destroy(b);
    let stats = store_stats(store);
    assert_eq!(
        (stats.host_in_use, stats.layers),
        (0, 0),
        "the store holds nothing once its contexts are gone"
    );
    strata_store_destroy(store);
}

fuzz_target!(|data: &[u8]| {
    let Some((&layout, mut rest)) = data.split_first() else {
        return;
    };
    match layout % 3 {
        0 => open_and_read_all(&write(&DIR.join("single/model.safetensors"), rest)),
        1 => {
            let dir = DIR.join("index");
            let index = write(&dir.join("model.safetensors.index.json"), take(&mut rest));
            write(&dir.join("a.safetensors"), take(&mut rest));
            write(&dir.join("b.safetensors"), rest);
            open_and_read_all(&index);
            open_and_read_all(&dir);
        }
        _ => {
            let dir = DIR.join("shards");
            write(&dir.join("a.safetensors"), take(&mut rest));
            write(&dir.join("b.safetensors"), rest);
            open_and_read_all(&dir);
        }
    }
});
