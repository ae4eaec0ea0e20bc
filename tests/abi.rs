//! The C ABI's manners: statuses for bad input, checked handles, struct sizes, last errors,
//! reference counting, states, stats and the trace. Everything goes through the exported functions.

mod common;
use common::*;
use std::ffi::c_void;
use std::ptr;

fn small_layer(ctx: &Ctx, group: u64, name: &str) -> u64 {
    ctx.register(
        group,
        name,
        &[
            (
                "weight",
                STRATA_DTYPE_F32,
                vec![2, 3],
                f32_bytes(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
            ),
            ("bias", STRATA_DTYPE_F32, vec![2], f32_bytes(&[0.5, -0.5])),
        ],
    )
}

#[test]
fn null_pointers_are_refused_with_a_message() {
    let ctx = Ctx::new(STRATA_UNLIMITED);
    let group = ctx.group(&strata_tiers_default());
    let layer = small_layer(&ctx, group, "l");
    let mut out_ctx = ptr::null_mut();
    let options = strata_options_default();
    let tiers = strata_tiers_default();
    let name = cstr("x");
    let mut group_id = 0u64;
    let mut id64 = 0u64;
    let mut n = 0usize;
    let mut views = [empty_view(); 4];

    expect(
        strata_context_create(ptr::null(), &mut out_ctx),
        STRATA_ERR_NULL_ARGUMENT,
    );
    assert!(last_error().contains("opts"), "{}", last_error());
    expect(
        strata_context_create(&options, ptr::null_mut()),
        STRATA_ERR_NULL_ARGUMENT,
    );
    expect(
        strata_group_create(ptr::null_mut(), name.as_ptr(), &tiers, &mut group_id),
        STRATA_ERR_NULL_ARGUMENT,
    );
    expect(
        strata_group_create(ctx.0, ptr::null(), &tiers, &mut group_id),
        STRATA_ERR_NULL_ARGUMENT,
    );
    expect(
        strata_group_create(ctx.0, name.as_ptr(), ptr::null(), &mut group_id),
        STRATA_ERR_NULL_ARGUMENT,
    );
    expect(
        strata_group_create(ctx.0, name.as_ptr(), &tiers, ptr::null_mut()),
        STRATA_ERR_NULL_ARGUMENT,
    );
    expect(
        strata_group_onload(ptr::null_mut(), group),
        STRATA_ERR_NULL_ARGUMENT,
    );
    expect(
        strata_group_offload(ptr::null_mut(), group),
        STRATA_ERR_NULL_ARGUMENT,
    );
    expect(
        strata_layer_register_host(ctx.0, group, ptr::null(), ptr::null(), 0, &mut id64),
        STRATA_ERR_NULL_ARGUMENT,
    );
    expect(
        strata_layer_register_host(ctx.0, group, name.as_ptr(), ptr::null(), 1, &mut id64),
        STRATA_ERR_NULL_ARGUMENT,
    );
    let null_data = strata_host_tensor {
        name: name.as_ptr(),
        dtype: STRATA_DTYPE_F32,
        ndim: 0,
        shape: ptr::null(),
        data: ptr::null(),
    };
    expect(
        strata_layer_register_host(ctx.0, group, name.as_ptr(), &null_data, 1, &mut id64),
        STRATA_ERR_NULL_ARGUMENT,
    );
    let null_name = strata_host_tensor {
        name: ptr::null(),
        ..null_data
    };
    expect(
        strata_layer_register_host(ctx.0, group, name.as_ptr(), &null_name, 1, &mut id64),
        STRATA_ERR_NULL_ARGUMENT,
    );
    let null_shape = strata_host_tensor {
        ndim: 1,
        data: [0u8; 4].as_ptr() as *const c_void,
        ..null_data
    };
    expect(
        strata_layer_register_host(ctx.0, group, name.as_ptr(), &null_shape, 1, &mut id64),
        STRATA_ERR_NULL_ARGUMENT,
    );
    expect(
        strata_layer_find(ctx.0, ptr::null(), &mut id64),
        STRATA_ERR_NULL_ARGUMENT,
    );
    expect(
        strata_layer_find(ctx.0, name.as_ptr(), ptr::null_mut()),
        STRATA_ERR_NULL_ARGUMENT,
    );
    expect(
        strata_layer_tensor_count(ctx.0, layer, ptr::null_mut()),
        STRATA_ERR_NULL_ARGUMENT,
    );
    expect(
        strata_acquire_for_compute(ctx.0, layer, ptr::null_mut(), ptr::null_mut(), 4, &mut n),
        STRATA_ERR_NULL_ARGUMENT,
    );
    expect(
        strata_acquire_for_compute(
            ctx.0,
            layer,
            ptr::null_mut(),
            views.as_mut_ptr(),
            4,
            ptr::null_mut(),
        ),
        STRATA_ERR_NULL_ARGUMENT,
    );
    expect(
        strata_acquire_for_compute(
            ptr::null_mut(),
            layer,
            ptr::null_mut(),
            views.as_mut_ptr(),
            4,
            &mut n,
        ),
        STRATA_ERR_NULL_ARGUMENT,
    );
    expect(
        strata_release(ptr::null_mut(), layer, ptr::null_mut()),
        STRATA_ERR_NULL_ARGUMENT,
    );
    expect(
        strata_stats_get(ctx.0, ptr::null_mut()),
        STRATA_ERR_NULL_ARGUMENT,
    );
    expect(
        strata_stats_get(ptr::null_mut(), &mut strata_stats::default()),
        STRATA_ERR_NULL_ARGUMENT,
    );
    expect(
        strata_trace_write(ctx.0, ptr::null()),
        STRATA_ERR_NULL_ARGUMENT,
    );
    let mut ckpt = ptr::null_mut();
    expect(
        strata_checkpoint_open(ctx.0, ptr::null(), &mut ckpt),
        STRATA_ERR_NULL_ARGUMENT,
    );
    expect(
        strata_checkpoint_open(ctx.0, name.as_ptr(), ptr::null_mut()),
        STRATA_ERR_NULL_ARGUMENT,
    );
    expect(
        strata_layer_register_checkpoint(
            ctx.0,
            group,
            ptr::null_mut(),
            name.as_ptr(),
            ptr::null(),
            0,
            &mut id64,
        ),
        STRATA_ERR_NULL_ARGUMENT,
    );
    expect(
        strata_group_register_checkpoint(ctx.0, group, ptr::null_mut(), name.as_ptr(), 0, &mut n),
        STRATA_ERR_NULL_ARGUMENT,
    );
    // Destroy and close accept NULL.
    strata_context_destroy(ptr::null_mut());
    strata_checkpoint_close(ptr::null_mut());
    // Outputs untouched by every failure above.
    assert_eq!((group_id, id64, n), (0, 0, 0));
    assert!(out_ctx.is_null() && ckpt.is_null());
    // The string helpers cope with anything.
    assert_eq!(strata_last_error(ptr::null_mut(), 0), last_error().len());
    assert_eq!(common::name(999), "STRATA_ERR_UNKNOWN_STATUS");
}

#[test]
fn last_error_is_per_thread_and_truncates_safely() {
    let mut id = 0u64;
    let ctx = Ctx::new(STRATA_UNLIMITED);
    expect(
        strata_layer_find(ctx.0, cstr("nope").as_ptr(), &mut id),
        STRATA_ERR_NOT_FOUND,
    );
    let message = last_error();
    assert!(
        message.contains("strata_layer_find") && message.contains("nope"),
        "{message}"
    );
    std::thread::spawn(|| assert_eq!(last_error(), ""))
        .join()
        .unwrap();
    let mut small = [0x7Fu8; 5];
    let full = strata_last_error(small.as_mut_ptr() as *mut _, small.len());
    assert_eq!(full, message.len());
    assert_eq!(&small[..4], &message.as_bytes()[..4]);
    assert_eq!(small[4], 0);
}

#[test]
fn struct_sizes_are_checked() {
    let mut ctx = ptr::null_mut();
    let mut options = strata_options_default();
    options.struct_size = 8;
    expect(
        strata_context_create(&options, &mut ctx),
        STRATA_ERR_INVALID_ARGUMENT,
    );
    assert!(last_error().contains("struct_size"));
    options.struct_size = 0;
    expect(
        strata_context_create(&options, &mut ctx),
        STRATA_ERR_INVALID_ARGUMENT,
    );

    // A newer caller's larger struct: accepted, the unknown tail ignored.
    #[repr(C)]
    struct Newer {
        known: strata_options,
        future: [u64; 4],
    }
    let mut newer = Newer {
        known: strata_options_default(),
        future: [u64::MAX; 4],
    };
    newer.known.struct_size = std::mem::size_of::<Newer>() as u32;
    ok(strata_context_create(&newer.known, &mut ctx));
    let c = Ctx(ctx);

    let mut tiers = strata_tiers_default();
    tiers.struct_size = 4;
    let mut group = 0;
    expect(
        strata_group_create(c.0, cstr("g").as_ptr(), &tiers, &mut group),
        STRATA_ERR_INVALID_ARGUMENT,
    );

    let mut stats = strata_stats::default();
    expect(
        strata_stats_get(c.0, &mut stats),
        STRATA_ERR_INVALID_ARGUMENT,
    );
    // Larger output struct: only the known part is written, the tail left alone.
    #[repr(C)]
    struct NewerStats {
        known: strata_stats,
        future: u64,
    }
    let mut newer_stats = NewerStats {
        known: strata_stats::default(),
        future: 77,
    };
    newer_stats.known.struct_size = std::mem::size_of::<NewerStats>() as u32;
    newer_stats.known.acquires = 99;
    ok(strata_stats_get(c.0, &mut newer_stats.known));
    assert_eq!(newer_stats.known.acquires, 0);
    assert_eq!(
        newer_stats.known.struct_size as usize,
        std::mem::size_of::<NewerStats>()
    );
    assert_eq!(newer_stats.future, 77);
}

#[test]
fn out_of_range_enums_and_flags_are_refused() {
    let mut ctx = ptr::null_mut();
    for edit in [
        (|o: &mut strata_options| o.compute_device = 42) as fn(&mut strata_options),
        |o| o.compute_device = STRATA_DEVICE_DISK,
        |o| o.flags = 0x80,
        |o| o.device_index = -1,
    ] {
        let mut options = strata_options_default();
        edit(&mut options);
        expect(
            strata_context_create(&options, &mut ctx),
            STRATA_ERR_INVALID_ARGUMENT,
        );
    }
    assert!(ctx.is_null());

    let c = Ctx::new(STRATA_UNLIMITED);
    let mut group = 0;
    for edit in [
        (|t: &mut strata_tiers| t.offload.dtype = 13) as fn(&mut strata_tiers),
        |t| t.computation.dtype = u32::MAX,
        |t| t.onload.device = 9,
        |t| t.quantization = 3,
        |t| t.computation.device = STRATA_DEVICE_DISK,
        |t| t.preparing.device = STRATA_DEVICE_CUDA,
        |t| t.offload.device = STRATA_DEVICE_CUDA,
        |t| {
            t.offload.device = STRATA_DEVICE_CPU;
            t.onload.device = STRATA_DEVICE_DISK;
        },
    ] {
        let t = tiers(edit);
        expect(
            strata_group_create(c.0, cstr("g").as_ptr(), &t, &mut group),
            STRATA_ERR_INVALID_ARGUMENT,
        );
    }
    assert_eq!(group, 0);
    let g = c.group(&strata_tiers_default());
    let mut id = 0;
    for dtype in [STRATA_DTYPE_SOURCE, 13, 1000] {
        let status = c.try_register(g, "l", &[("t", dtype, vec![1], vec![0; 4])], &mut id);
        expect(status, STRATA_ERR_INVALID_ARGUMENT);
    }
    // Wrong byte count for the dtype and shape, negative and too many dims.
    expect(
        c.try_register(
            g,
            "l",
            &[("t", STRATA_DTYPE_F32, vec![-1], vec![])],
            &mut id,
        ),
        STRATA_ERR_INVALID_ARGUMENT,
    );
    expect(
        c.try_register(
            g,
            "l",
            &[("t", STRATA_DTYPE_F32, vec![1; 9], vec![0; 4])],
            &mut id,
        ),
        STRATA_ERR_INVALID_ARGUMENT,
    );
    expect(
        c.try_register(g, "l", &[], &mut id),
        STRATA_ERR_INVALID_ARGUMENT,
    );
    expect(
        c.try_register(
            g,
            "l",
            &[
                ("t", STRATA_DTYPE_F32, vec![1], vec![0; 4]),
                ("t", STRATA_DTYPE_F32, vec![1], vec![0; 4]),
            ],
            &mut id,
        ),
        STRATA_ERR_INVALID_ARGUMENT,
    );
    assert_eq!(id, 0);
}

#[test]
fn stale_made_up_and_foreign_ids_are_refused() {
    let ctx = Ctx::new(STRATA_UNLIMITED);
    let other = Ctx::new(STRATA_UNLIMITED);
    let group = ctx.group(&strata_tiers_default());
    let layer = small_layer(&ctx, group, "l");
    let mut views = [empty_view(); 4];
    let mut n = 0;
    for bogus in [0u64, 1, u64::MAX, layer ^ (1 << 32), layer + 1] {
        expect(
            strata_acquire_for_compute(
                ctx.0,
                bogus,
                ptr::null_mut(),
                views.as_mut_ptr(),
                4,
                &mut n,
            ),
            STRATA_ERR_INVALID_HANDLE,
        );
    }
    // An id from another context does not resolve there.
    expect(
        strata_acquire_for_compute(
            other.0,
            layer,
            ptr::null_mut(),
            views.as_mut_ptr(),
            4,
            &mut n,
        ),
        STRATA_ERR_INVALID_HANDLE,
    );
    expect(
        strata_group_onload(other.0, group),
        STRATA_ERR_INVALID_HANDLE,
    );
    for bogus in [0u64, 1, u64::MAX, group ^ (1 << 16), group + 1, group - 1] {
        expect(strata_group_onload(ctx.0, bogus), STRATA_ERR_INVALID_HANDLE);
    }
    // Stale ids: unregistered layer, destroyed group, even when the slot is reused.
    ok(strata_layer_unregister(ctx.0, layer));
    expect(
        strata_release(ctx.0, layer, ptr::null_mut()),
        STRATA_ERR_INVALID_HANDLE,
    );
    let reused = small_layer(&ctx, group, "l");
    assert_ne!(reused, layer);
    expect(
        strata_acquire_for_compute(ctx.0, layer, ptr::null_mut(), views.as_mut_ptr(), 4, &mut n),
        STRATA_ERR_INVALID_HANDLE,
    );
    ok(strata_group_destroy(ctx.0, group));
    expect(
        strata_group_offload(ctx.0, group),
        STRATA_ERR_INVALID_HANDLE,
    );
    expect(
        strata_acquire_for_compute(
            ctx.0,
            reused,
            ptr::null_mut(),
            views.as_mut_ptr(),
            4,
            &mut n,
        ),
        STRATA_ERR_INVALID_HANDLE,
    );
    let mut id = 0;
    expect(
        strata_layer_find(ctx.0, cstr("l").as_ptr(), &mut id),
        STRATA_ERR_NOT_FOUND,
    );
    assert_eq!(n, 0);
}

#[test]
fn stale_and_made_up_context_pointers_are_refused() {
    let mut ctx = ptr::null_mut();
    ok(strata_context_create(&strata_options_default(), &mut ctx));
    strata_context_destroy(ctx);
    let mut stats = strata_stats {
        struct_size: std::mem::size_of::<strata_stats>() as u32,
        ..Default::default()
    };
    expect(strata_stats_get(ctx, &mut stats), STRATA_ERR_INVALID_HANDLE);
    expect(
        strata_stats_get(0x1234usize as *mut strata_context, &mut stats),
        STRATA_ERR_INVALID_HANDLE,
    );
    strata_context_destroy(ctx); // a second destroy is harmless
    assert!(last_error().contains("not live"));
    strata_checkpoint_close(0x40usize as *mut strata_checkpoint);
}

/// Every call that takes a group id, each expected to say INVALID_HANDLE for `group`.
fn expect_group_invalid(ctx: &Ctx, group: u64, ckpt: *mut strata_checkpoint) {
    let mut id = 0u64;
    let mut n = 0usize;
    expect(strata_group_onload(ctx.0, group), STRATA_ERR_INVALID_HANDLE);
    expect(
        strata_group_offload(ctx.0, group),
        STRATA_ERR_INVALID_HANDLE,
    );
    expect(
        ctx.try_register(group, "probe", &one_float(), &mut id),
        STRATA_ERR_INVALID_HANDLE,
    );
    let names = [cstr("w")];
    let name_ptrs: Vec<_> = names.iter().map(|n| n.as_ptr()).collect();
    expect(
        strata_layer_register_checkpoint(
            ctx.0,
            group,
            ckpt,
            cstr("probe").as_ptr(),
            name_ptrs.as_ptr(),
            1,
            &mut id,
        ),
        STRATA_ERR_INVALID_HANDLE,
    );
    expect(
        strata_group_register_checkpoint(ctx.0, group, ckpt, cstr("").as_ptr(), 0, &mut n),
        STRATA_ERR_INVALID_HANDLE,
    );
    expect(
        strata_group_destroy(ctx.0, group),
        STRATA_ERR_INVALID_HANDLE,
    );
    assert_eq!((id, n), (0, 0));
}

/// Every call that takes a layer id, each expected to say INVALID_HANDLE for `layer`.
fn expect_layer_invalid(ctx: &Ctx, layer: u64) {
    let mut views = [empty_view(); 4];
    let mut n = 0usize;
    expect(
        strata_acquire_for_compute(ctx.0, layer, ptr::null_mut(), views.as_mut_ptr(), 4, &mut n),
        STRATA_ERR_INVALID_HANDLE,
    );
    expect(
        strata_release(ctx.0, layer, ptr::null_mut()),
        STRATA_ERR_INVALID_HANDLE,
    );
    expect(
        strata_layer_tensor_count(ctx.0, layer, &mut n),
        STRATA_ERR_INVALID_HANDLE,
    );
    expect(
        strata_layer_unregister(ctx.0, layer),
        STRATA_ERR_INVALID_HANDLE,
    );
    assert_eq!(n, 0);
}

/// A context with a group, a layer in it, and an open checkpoint: what the id tests probe.
struct Probe {
    ctx: Ctx,
    ckpt: *mut strata_checkpoint,
    group: u64,
    layer: u64,
    dir: TempDir,
}

impl Probe {
    fn new(tag: &str) -> Probe {
        let ctx = Ctx::new(STRATA_UNLIMITED);
        let dir = TempDir::new(tag);
        let ckpt = tiny_checkpoint(&ctx, &dir);
        let group = ctx.group(&strata_tiers_default());
        let layer = small_layer(&ctx, group, "l");
        Probe {
            ctx,
            ckpt,
            group,
            layer,
            dir,
        }
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        strata_checkpoint_close(self.ckpt);
    }
}

/// One f32 tensor of one element: the cheapest layer to register.
fn one_float() -> [(&'static str, u32, Vec<i64>, Vec<u8>); 1] {
    [("t", STRATA_DTYPE_F32, vec![1], vec![0; 4])]
}

/// A one-tensor checkpoint ("w", f32 [1]) to register from, and to pass where a context is asked.
fn tiny_checkpoint(ctx: &Ctx, dir: &TempDir) -> *mut strata_checkpoint {
    let path = dir.path("tiny.safetensors");
    write_safetensors(
        &path,
        &[(
            "w".into(),
            safetensors::Dtype::F32,
            vec![1],
            f32_bytes(&[1.0]),
        )],
    );
    open_checkpoint(ctx, &path)
}

#[test]
fn a_destroyed_groups_id_never_resolves_again() {
    // Group ids once had 8 bits of generation: the 255th group made in a freed slot took the
    // first one's id. 300 cycles pass that point; the first id is checked after every one.
    let Probe {
        ref ctx,
        ckpt,
        group: first,
        layer: first_layer,
        ..
    } = Probe::new("ids-groups");
    ok(strata_group_destroy(ctx.0, first));
    let mut seen = std::collections::HashSet::from([first, first_layer]);
    for cycle in 0..300 {
        let group = ctx.group(&strata_tiers_default());
        let layer = small_layer(ctx, group, "l");
        assert!(seen.insert(group), "group id {group:#x} handed out twice");
        assert!(seen.insert(layer), "layer id {layer:#x} handed out twice");
        expect(strata_group_onload(ctx.0, first), STRATA_ERR_INVALID_HANDLE);
        assert!(
            ctx.try_acquire(first_layer) == STRATA_ERR_INVALID_HANDLE,
            "cycle {cycle}"
        );
        ok(strata_group_destroy(ctx.0, group));
    }
    expect_group_invalid(ctx, first, ckpt);
    expect_layer_invalid(ctx, first_layer);
}

#[test]
fn an_unregistered_layers_id_never_resolves_again() {
    // Layer ids once had 16 bits of generation: the 65,535th layer registered in a freed slot took
    // the first one's id. 70,000 cycles pass that point; the first id is checked after every one.
    let ctx = Ctx::new(STRATA_UNLIMITED);
    let group = ctx.group(&strata_tiers_default());
    let first = ctx.register(group, "l", &one_float());
    ok(strata_layer_unregister(ctx.0, first));
    let mut n = 0usize;
    let mut last = first;
    for cycle in 0..70_000 {
        let layer = ctx.register(group, "l", &one_float());
        assert!(layer > last, "cycle {cycle}: id {layer:#x} after {last:#x}");
        last = layer;
        if strata_layer_tensor_count(ctx.0, first, &mut n) != STRATA_ERR_INVALID_HANDLE {
            panic!("cycle {cycle}: the first layer's id {first:#x} resolves again");
        }
        ok(strata_layer_unregister(ctx.0, layer));
    }
    expect_layer_invalid(&ctx, first);
    expect_layer_invalid(&ctx, last);
    // The group stays usable, and an id made now is a new one.
    let layer = small_layer(&ctx, group, "l");
    assert_eq!(ctx.acquire(layer).len(), 2);
    ctx.release(layer);
}

#[test]
fn ids_of_another_context_never_resolve() {
    // Contexts once told their ids apart by a tag of 8 bits in group ids and 16 in layer ids: the
    // 255th context made after another accepted its group ids, the 65,280th its layer ids. Each
    // context here holds a group and a layer in the same slots as the first one's.
    let Probe {
        ctx: ref first,
        ckpt,
        group,
        layer,
        ..
    } = Probe::new("ids-contexts");
    let mut n = 0usize;
    for made in 0..65_300 {
        let other = Ctx::new(STRATA_UNLIMITED);
        let other_group = other.group(&strata_tiers_default());
        let other_layer = other.register(other_group, "l", &one_float());
        let refused = [
            strata_group_onload(other.0, group),
            strata_layer_tensor_count(other.0, layer, &mut n),
            strata_group_onload(first.0, other_group),
            strata_layer_tensor_count(first.0, other_layer, &mut n),
        ];
        if refused != [STRATA_ERR_INVALID_HANDLE; 4] {
            panic!("context {made}: another context's id resolves: {refused:?}");
        }
        if made == 0 {
            expect_group_invalid(&other, group, ckpt);
            expect_layer_invalid(&other, layer);
        }
    }
    // The first context's own ids still work.
    ok(strata_group_onload(first.0, group));
    assert_eq!(first.acquire(layer).len(), 2);
    first.release(layer);
}

#[test]
fn made_up_ids_never_resolve() {
    let Probe {
        ref ctx,
        ckpt,
        group,
        layer,
        ..
    } = Probe::new("ids-made-up");
    // A layer's id is no group's, and a group's no layer's.
    expect_group_invalid(ctx, layer, ckpt);
    expect_layer_invalid(ctx, group);
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut random = || {
        // xorshift64
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let made_up: Vec<u64> = [0, u64::MAX, u64::MAX - 1, 1 << 63, u32::MAX as u64]
        .into_iter()
        .chain((0..64).map(|_| random()))
        .filter(|&id| id != group && id != layer)
        .collect();
    for id in made_up {
        expect_group_invalid(ctx, id, ckpt);
        expect_layer_invalid(ctx, id);
    }
    assert_eq!(ctx.acquire(layer).len(), 2);
    ctx.release(layer);
}

#[test]
fn stale_and_foreign_handles_never_resolve() {
    // Context and checkpoint handles are tokens from the serial ids come from: a destroyed one
    // stays dead however many are made after it, and one kind never passes for the other.
    let Probe {
        ref ctx,
        ckpt,
        group,
        ref dir,
        ..
    } = Probe::new("ids-handles");
    let mut stale_ctx = ptr::null_mut();
    ok(strata_context_create(
        &strata_options_default(),
        &mut stale_ctx,
    ));
    strata_context_destroy(stale_ctx);
    let stale_ckpt = tiny_checkpoint(ctx, dir);
    strata_checkpoint_close(stale_ckpt);
    let mut stats = strata_stats {
        struct_size: std::mem::size_of::<strata_stats>() as u32,
        ..Default::default()
    };
    let mut id = 0u64;
    let names = [cstr("w")];
    let name_ptrs: Vec<_> = names.iter().map(|n| n.as_ptr()).collect();
    let mut seen = std::collections::HashSet::from([stale_ctx as usize, stale_ckpt as usize]);
    for made in 0..300 {
        let mut fresh = ptr::null_mut();
        ok(strata_context_create(&strata_options_default(), &mut fresh));
        let opened = tiny_checkpoint(ctx, dir);
        assert!(
            seen.insert(fresh as usize),
            "context handle reused ({made})"
        );
        assert!(
            seen.insert(opened as usize),
            "checkpoint handle reused ({made})"
        );
        for not_a_context in [
            stale_ctx,
            stale_ckpt as *mut strata_context,
            opened as *mut _,
        ] {
            expect(
                strata_stats_get(not_a_context, &mut stats),
                STRATA_ERR_INVALID_HANDLE,
            );
        }
        for not_a_checkpoint in [
            stale_ckpt,
            stale_ctx as *mut strata_checkpoint,
            fresh as *mut _,
        ] {
            expect(
                strata_layer_register_checkpoint(
                    ctx.0,
                    group,
                    not_a_checkpoint,
                    cstr("probe").as_ptr(),
                    name_ptrs.as_ptr(),
                    1,
                    &mut id,
                ),
                STRATA_ERR_INVALID_HANDLE,
            );
        }
        strata_checkpoint_close(opened);
        strata_context_destroy(fresh);
    }
    assert_eq!(id, 0);
    // The live ones still work.
    ok(strata_stats_get(ctx.0, &mut stats));
    ok(strata_layer_register_checkpoint(
        ctx.0,
        group,
        ckpt,
        cstr("w").as_ptr(),
        name_ptrs.as_ptr(),
        1,
        &mut id,
    ));
    assert_eq!(ctx.acquire(id).len(), 1);
    ctx.release(id);
}

#[test]
fn cuda_requests_never_abort_and_say_why() {
    // SAFETY: only tries to open the driver library.
    let driver = unsafe { cudarc::driver::sys::is_culib_present() };
    let create = |index: i32| {
        let mut ctx = ptr::null_mut();
        let mut options = strata_options_default();
        options.compute_device = STRATA_DEVICE_CUDA;
        options.device_index = index;
        let status = strata_context_create(&options, &mut ctx);
        if status == STRATA_OK {
            strata_context_destroy(ctx);
        } else {
            assert!(ctx.is_null());
        }
        (status, last_error())
    };
    if !driver {
        eprintln!("cuda_requests_never_abort_and_say_why: no CUDA driver here; checking STRATA_ERR_NO_DEVICE");
        let (status, message) = create(0);
        expect(status, STRATA_ERR_NO_DEVICE);
        assert!(message.contains("no CUDA driver"), "{message}");
        return;
    }
    eprintln!("cuda_requests_never_abort_and_say_why: a CUDA driver is present; checking ordinals");
    let (status, message) = create(999);
    expect(status, STRATA_ERR_NO_DEVICE);
    assert!(message.contains("does not exist"), "{message}");
    let (status, message) = create(0);
    assert_eq!(status, STRATA_OK, "{}: {message}", common::name(status));
}

#[test]
fn acquire_is_reference_counted_and_release_checks_state() {
    let ctx = Ctx::new(STRATA_UNLIMITED);
    let group = ctx.group(&tiers(|t| t.computation.dtype = STRATA_DTYPE_F64));
    let layer = small_layer(&ctx, group, "l");
    expect(
        strata_release(ctx.0, layer, ptr::null_mut()),
        STRATA_ERR_STATE,
    );
    assert!(last_error().contains("not acquired"));
    let first = ctx.acquire(layer);
    let second = ctx.acquire(layer);
    assert_eq!(
        first[0].0.data, second[0].0.data,
        "a second acquire shares the first one's bytes"
    );
    expect(strata_layer_unregister(ctx.0, layer), STRATA_ERR_STATE);
    expect(strata_group_destroy(ctx.0, group), STRATA_ERR_STATE);
    ctx.release(layer);
    ctx.release(layer);
    expect(
        strata_release(ctx.0, layer, ptr::null_mut()),
        STRATA_ERR_STATE,
    );
    let stats = ctx.stats();
    assert_eq!(
        (stats.acquires, stats.misses, stats.resident_hits),
        (2, 1, 1)
    );
    ok(strata_group_destroy(ctx.0, group));
    assert_eq!(ctx.stats().vram_in_use, 0);
}

#[test]
fn too_small_a_views_array_acquires_nothing() {
    let ctx = Ctx::new(STRATA_UNLIMITED);
    let group = ctx.group(&strata_tiers_default());
    let layer = small_layer(&ctx, group, "l");
    let mut count = 0usize;
    ok(strata_layer_tensor_count(ctx.0, layer, &mut count));
    assert_eq!(count, 2);
    let mut views = [empty_view(); 1];
    let mut n = 0;
    expect(
        strata_acquire_for_compute(ctx.0, layer, ptr::null_mut(), views.as_mut_ptr(), 1, &mut n),
        STRATA_ERR_BUFFER_TOO_SMALL,
    );
    expect(
        strata_acquire_for_compute(ctx.0, layer, ptr::null_mut(), ptr::null_mut(), 0, &mut n),
        STRATA_ERR_BUFFER_TOO_SMALL,
    );
    assert_eq!(n, 0);
    assert!(views[0].data.is_null());
    expect(
        strata_release(ctx.0, layer, ptr::null_mut()),
        STRATA_ERR_STATE,
    );
}

#[test]
fn duplicate_layer_names_are_refused() {
    let ctx = Ctx::new(STRATA_UNLIMITED);
    let group = ctx.group(&strata_tiers_default());
    small_layer(&ctx, group, "same");
    let mut id = 0;
    let status = ctx.try_register(group, "same", &one_float(), &mut id);
    expect(status, STRATA_ERR_INVALID_ARGUMENT);
    assert!(last_error().contains("already registered"));
    let mut found = 0;
    ok(strata_layer_find(ctx.0, cstr("same").as_ptr(), &mut found));
    assert_ne!(found, 0);
}

#[test]
fn register_host_copies_the_callers_bytes_and_default_tiers_hand_them_out_in_place() {
    let ctx = Ctx::new(STRATA_UNLIMITED);
    let group = ctx.group(&strata_tiers_default());
    let mut data = f32_bytes(&[1.0, 2.0, 3.0]);
    let layer = ctx.register(
        group,
        "l",
        &[("w", STRATA_DTYPE_F32, vec![3], data.clone())],
    );
    data.fill(0);
    let views = ctx.acquire(layer);
    assert_eq!(f32_values(&views[0].1), [1.0, 2.0, 3.0]);
    let view = views[0].0;
    assert_eq!(
        (
            view.dtype,
            view.device,
            view.ndim,
            view.shape[0],
            view.nbytes
        ),
        (STRATA_DTYPE_F32, STRATA_DEVICE_CPU, 1, 3, 12)
    );
    assert_eq!(
        // SAFETY: a view's name is NUL-terminated and lives as long as its layer.
        unsafe { std::ffi::CStr::from_ptr(view.name) }
            .to_str()
            .unwrap(),
        "w"
    );
    ctx.release(layer);
    let stats = ctx.stats();
    // The bytes were already on the CPU in the computation dtype: nothing moved, nothing charged.
    assert_eq!(
        (
            stats.bytes_to_device,
            stats.vram_peak,
            stats.misses,
            stats.implicit_onloads
        ),
        (0, 0, 0, 1)
    );
    assert!(stats.host_in_use >= 12);
}

#[test]
fn integer_and_bool_tensors_pass_through_every_tier() {
    let ctx = Ctx::new(STRATA_UNLIMITED);
    let all_bf16 = tiers(|t| {
        t.offload.dtype = STRATA_DTYPE_F8_E4M3FN;
        t.preparing.dtype = STRATA_DTYPE_F16;
        t.computation.dtype = STRATA_DTYPE_BF16;
        t.quantization = STRATA_QUANT_PER_CHANNEL;
    });
    let group = ctx.group(&all_bf16);
    let ints: Vec<u8> = [-5i64, 7, i64::MAX]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let layer = ctx.register(
        group,
        "l",
        &[
            ("ids", STRATA_DTYPE_I64, vec![3], ints.clone()),
            ("mask", STRATA_DTYPE_BOOL, vec![2, 2], vec![1, 0, 0, 1]),
            ("small", STRATA_DTYPE_I8, vec![2], vec![0x80, 0x7F]),
        ],
    );
    let views = ctx.acquire(layer);
    assert_eq!((views[0].0.dtype, &views[0].1), (STRATA_DTYPE_I64, &ints));
    assert_eq!(
        (views[1].0.dtype, &views[1].1[..]),
        (STRATA_DTYPE_BOOL, &[1u8, 0, 0, 1][..])
    );
    assert_eq!(
        (views[2].0.dtype, &views[2].1[..]),
        (STRATA_DTYPE_I8, &[0x80u8, 0x7F][..])
    );
    ctx.release(layer);
}

#[test]
fn stats_and_trace_report_what_happened() {
    let dir = TempDir::new("trace");
    let ctx = Ctx::new(STRATA_UNLIMITED);
    let group = ctx.group(&tiers(|t| t.computation.dtype = STRATA_DTYPE_BF16));
    let a = small_layer(&ctx, group, "layer_a");
    let b = small_layer(&ctx, group, "layer_b");
    for _ in 0..3 {
        for layer in [a, b] {
            ctx.acquire(layer);
            ctx.release(layer);
        }
    }
    let stats = ctx.stats();
    // Each layer moves once (6 f32 + 2 f32 kept f32 in preparing = 32 bytes), then stays resident.
    assert_eq!(stats.acquires, 6);
    assert_eq!(stats.misses, 2);
    assert_eq!(stats.resident_hits, 4);
    assert_eq!(stats.bytes_to_device, 2 * 32);
    assert!(stats.vram_in_use > 0 && stats.vram_peak >= stats.vram_in_use);
    let path = dir.path("trace.json");
    ok(strata_trace_write(
        ctx.0,
        cstr(path.to_str().unwrap()).as_ptr(),
    ));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let events = json["traceEvents"].as_array().unwrap();
    let spans = |cat: &str| events.iter().filter(|e| e["cat"] == cat).count();
    assert_eq!(spans("compute"), 6);
    assert!(spans("upload") >= 2 && spans("convert") >= 6);
    assert!(events.iter().any(|e| e["name"] == "layer_a"
        && e["cat"] == "upload"
        && e["args"]["bytes"].as_u64().unwrap() > 0));
    expect(
        strata_trace_write(ctx.0, cstr("/nonexistent-dir/x.json").as_ptr()),
        STRATA_ERR_NOT_FOUND,
    );
}

#[test]
fn fp8_per_channel_loses_less_than_per_tensor_and_the_plain_cast() {
    // Realistic weights: std 0.02, with a few output channels 20x larger (outlier channels).
    let (rows, cols) = (256usize, 512usize);
    let mut w = weights(rows * cols, 42, 0.02);
    for row in [3, 77, 200] {
        w[row * cols..(row + 1) * cols]
            .iter_mut()
            .for_each(|v| *v *= 20.0);
    }
    let ctx = Ctx::new(STRATA_UNLIMITED);
    let mse = |quant: u32| {
        let group = ctx.group(&tiers(|t| {
            t.offload.dtype = STRATA_DTYPE_F8_E4M3FN;
            t.computation.dtype = STRATA_DTYPE_F32;
            t.quantization = quant;
        }));
        let layer = ctx.register(
            group,
            &format!("w{quant}"),
            &[(
                "w",
                STRATA_DTYPE_F32,
                vec![rows as i64, cols as i64],
                f32_bytes(&w),
            )],
        );
        let got = f32_values(&ctx.acquire(layer)[0].1);
        ctx.release(layer);
        got.iter()
            .zip(&w)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum::<f64>()
            / w.len() as f64
    };
    let (plain, per_tensor, per_channel) = (
        mse(STRATA_QUANT_NONE),
        mse(STRATA_QUANT_PER_TENSOR),
        mse(STRATA_QUANT_PER_CHANNEL),
    );
    eprintln!("fp8 e4m3 MSE on std-0.02 weights with outlier rows: plain {plain:.3e}, per-tensor {per_tensor:.3e}, per-channel {per_channel:.3e}");
    assert!(
        per_channel < per_tensor,
        "per-channel {per_channel} vs per-tensor {per_tensor}"
    );
    assert!(
        per_channel < plain,
        "per-channel {per_channel} vs plain {plain}"
    );
}

#[test]
fn an_fp8_preparing_tier_rounds_through_fp8_on_the_cpu_too() {
    let ctx = Ctx::new(STRATA_UNLIMITED);
    let group = ctx.group(&tiers(|t| {
        t.preparing.dtype = STRATA_DTYPE_F8_E4M3FN;
        t.computation.dtype = STRATA_DTYPE_F32;
    }));
    // 1.0 + 2^-6 is exact in f32 but not in e4m3 (3 mantissa bits): it must come back as 1.0.
    let layer = ctx.register(
        group,
        "l",
        &[(
            "w",
            STRATA_DTYPE_F32,
            vec![1, 2],
            f32_bytes(&[1.015625, 2.0]),
        )],
    );
    assert_eq!(f32_values(&ctx.acquire(layer)[0].1), [1.0, 2.0]);
    ctx.release(layer);
    let stats = ctx.stats();
    assert_eq!(
        (stats.misses, stats.bytes_to_device),
        (1, 2),
        "the fp8 copy was made on the device"
    );
}
