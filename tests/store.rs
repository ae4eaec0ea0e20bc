//! Host stores through the C ABI: contexts of one process sharing one copy of each layer, named
//! stores shared by processes (this test binary, run again as a child, plays the processes), and
//! the bad cases: racing creators, a filler killed mid-fill, a stale store, a store of other
//! files or another version, a directory too small.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::ptr;
use strata::ffi::store::*;

/// Layers of the test model and the floats of each of their two tensors.
const LAYERS: usize = 8;
const WEIGHT: usize = 256 * 256;
const BIAS: usize = 256;

fn layer_bytes() -> u64 {
    ((WEIGHT + BIAS) * 4) as u64
}

fn model_bytes() -> u64 {
    layer_bytes() * LAYERS as u64
}

/// The model: blocks.{i}.weight [256, 256] and blocks.{i}.bias [256], f32, distinct values.
fn expected() -> BTreeMap<String, Vec<u8>> {
    let mut tensors = BTreeMap::new();
    for i in 0..LAYERS {
        tensors.insert(
            format!("blocks.{i}.weight"),
            f32_bytes(&weights(WEIGHT, 2 * i as u64 + 1, 0.02)),
        );
        tensors.insert(
            format!("blocks.{i}.bias"),
            f32_bytes(&weights(BIAS, 2 * i as u64 + 2, 0.02)),
        );
    }
    tensors
}

fn write_model(path: &Path) {
    let tensors: Vec<_> = expected()
        .into_iter()
        .map(|(name, bytes)| {
            let shape = match name.ends_with("weight") {
                true => vec![256, 256],
                false => vec![256],
            };
            (name, safetensors::Dtype::F32, shape, bytes)
        })
        .collect();
    write_safetensors(path, &tensors);
}

struct Store(*mut strata_store);

impl Store {
    fn try_open(
        edit: impl FnOnce(&mut strata_store_options),
    ) -> std::result::Result<Store, strata_status> {
        let mut options = strata_store_options_default();
        edit(&mut options);
        let mut store = ptr::null_mut();
        match strata_store_create(&options, &mut store) {
            STRATA_OK => Ok(Store(store)),
            status => Err(status),
        }
    }

    fn open(edit: impl FnOnce(&mut strata_store_options)) -> Store {
        Self::try_open(edit).unwrap_or_else(|status| {
            panic!("strata_store_create: {}: {}", name(status), last_error())
        })
    }

    fn stats(&self) -> strata_store_stats {
        let mut stats = strata_store_stats {
            struct_size: std::mem::size_of::<strata_store_stats>() as u32,
            ..Default::default()
        };
        ok(strata_store_stats_get(self.0, &mut stats));
        stats
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        strata_store_destroy(self.0);
    }
}

// SAFETY: stores are thread-safe by contract.
unsafe impl Send for Store {}
// SAFETY: as above.
unsafe impl Sync for Store {}

/// A CPU context over `store` with the model registered in one group streamed from disk through
/// the onload tier in RAM; returns it with the group.
fn context_over(store: &Store, model: &Path) -> (Ctx, u64) {
    let ctx = Ctx::new(0);
    ok(strata_context_attach_store(ctx.0, store.0));
    let group = ctx.group(&tiers(|t| {
        t.offload = place(STRATA_DEVICE_DISK, STRATA_DTYPE_SOURCE);
        t.onload = place(STRATA_DEVICE_CPU, STRATA_DTYPE_SOURCE);
    }));
    assert_eq!(ctx.register_prefix(group, model, "blocks.", 2), LAYERS);
    (ctx, group)
}

/// One pass over every layer, checking each tensor's bytes exactly; returns the address of each
/// layer's first view.
fn pass(ctx: &Ctx, expected: &BTreeMap<String, Vec<u8>>) -> Vec<usize> {
    (0..LAYERS)
        .map(|i| {
            let layer = ctx.find(&format!("blocks.{i}"));
            let views = ctx.acquire(layer);
            assert_eq!(views.len(), 2);
            for (view, bytes) in &views {
                let name = view_name(view);
                assert!(expected[&name] == *bytes, "{name}: bytes differ");
            }
            let first = views[0].0.data as usize;
            ctx.release(layer);
            first
        })
        .collect()
}

#[test]
fn two_contexts_in_one_process_share_one_copy_read_once() {
    let dir = TempDir::new("store-two");
    let model = dir.path("model.safetensors");
    write_model(&model);
    let expected = expected();
    let store = Store::open(|_| {});
    let (a, group_a) = context_over(&store, &model);
    let (b, group_b) = context_over(&store, &model);
    // Both at once, so that some layers are wanted by both while one fills them.
    let (first_a, first_b) = std::thread::scope(|scope| {
        let run_a = scope.spawn(|| pass(&a, &expected));
        let run_b = scope.spawn(|| pass(&b, &expected));
        (run_a.join().unwrap(), run_b.join().unwrap())
    });
    assert_eq!(first_a, first_b, "the views of both point into one copy");
    assert_eq!(pass(&a, &expected), first_a);
    let (sa, sb, ss) = (a.stats(), b.stats(), store.stats());
    assert_eq!(
        sa.bytes_from_disk + sb.bytes_from_disk,
        model_bytes(),
        "the checkpoint is read once"
    );
    assert_eq!((ss.fills, ss.bytes_filled), (LAYERS as u64, model_bytes()));
    assert_eq!(
        ss.shared, LAYERS as u64,
        "each layer filled once, shared once"
    );
    assert_eq!((ss.host_in_use, ss.layers), (model_bytes(), LAYERS as u64));
    assert_eq!(ss.host_peak, model_bytes(), "host bytes are counted once");
    assert_eq!(
        (sa.host_in_use, sb.host_in_use),
        (0, 0),
        "the contexts hold no copy of their own"
    );
    // Freed with the last user: one context offloading keeps the copies, both free them.
    ok(strata_group_offload(a.0, group_a));
    assert_eq!(store.stats().host_in_use, model_bytes());
    ok(strata_group_offload(b.0, group_b));
    assert_eq!((store.stats().host_in_use, store.stats().layers), (0, 0));
    // And filled again, once, when needed again.
    pass(&b, &expected);
    let ss = store.stats();
    assert_eq!(
        (ss.fills, ss.host_in_use),
        (2 * LAYERS as u64, model_bytes())
    );
}

#[test]
fn a_store_limit_is_its_own_and_refuses_with_budget() {
    let dir = TempDir::new("store-limit");
    let model = dir.path("model.safetensors");
    write_model(&model);
    let store = Store::open(|o| o.host_limit = 3 * layer_bytes());
    let (ctx, group) = context_over(&store, &model);
    let status = strata_group_onload(ctx.0, group);
    expect(status, STRATA_ERR_BUDGET);
    assert!(last_error().contains("host store"), "{}", last_error());
    let stats = store.stats();
    assert_eq!(stats.host_in_use, 3 * layer_bytes());
    assert!(stats.host_peak <= 3 * layer_bytes());
}

#[test]
fn bad_store_arguments_get_a_status_and_a_message() {
    let mut store = ptr::null_mut();
    expect(
        strata_store_create(ptr::null(), &mut store),
        STRATA_ERR_NULL_ARGUMENT,
    );
    let options = strata_store_options_default();
    expect(
        strata_store_create(&options, ptr::null_mut()),
        STRATA_ERR_NULL_ARGUMENT,
    );
    let mut short = strata_store_options_default();
    short.struct_size = 4;
    expect(
        strata_store_create(&short, &mut store),
        STRATA_ERR_INVALID_ARGUMENT,
    );
    assert!(last_error().contains("struct_size"), "{}", last_error());
    let bad = |edit: &dyn Fn(&mut strata_store_options), needle: &str| {
        let status = Store::try_open(edit).err().expect("refused");
        assert_eq!(status, STRATA_ERR_INVALID_ARGUMENT, "{}", last_error());
        assert!(last_error().contains(needle), "{}", last_error());
    };
    let outside = cstr("../escape");
    bad(&|o| o.name = outside.as_ptr(), "store name");
    let empty = cstr("");
    bad(&|o| o.name = empty.as_ptr(), "store name");
    let fine = cstr("fine");
    bad(&|o| o.name = fine.as_ptr(), "needs the checkpoint");
    bad(&|o| o.mode = 0o4700, "mode");
    let missing = cstr("/nonexistent/model.safetensors");
    let status = Store::try_open(|o| {
        o.name = fine.as_ptr();
        o.checkpoint = missing.as_ptr();
    })
    .err()
    .expect("refused");
    assert_eq!(status, STRATA_ERR_NOT_FOUND, "{}", last_error());

    let store = Store::open(|_| {});
    let ctx = Ctx::new(0);
    ok(strata_context_attach_store(ctx.0, store.0));
    expect(
        strata_context_attach_store(ctx.0, store.0),
        STRATA_ERR_STATE,
    );
    expect(
        strata_context_attach_store(ctx.0, ptr::null_mut()),
        STRATA_ERR_NULL_ARGUMENT,
    );
    expect(
        strata_context_attach_store(ctx.0, ctx.0 as *mut strata_store),
        STRATA_ERR_INVALID_HANDLE,
    );
    let mut stats = strata_store_stats::default();
    expect(
        strata_store_stats_get(store.0, &mut stats),
        STRATA_ERR_INVALID_ARGUMENT,
    );
    let gone = Store::open(|_| {});
    let stale = gone.0;
    drop(gone);
    let ctx = Ctx::new(0);
    expect(
        strata_context_attach_store(ctx.0, stale),
        STRATA_ERR_INVALID_HANDLE,
    );
    strata_store_destroy(ptr::null_mut());
}
