//! Every fault the Reliability issue names, driven through the C ABI. Each must give a clear
//! status and a message that names what failed; the context must keep serving everything else
//! (a healthy group beside the faulty one is acquired and checked byte for byte afterwards); and
//! once the groups are destroyed no device or host byte may be held.
//! `cargo test --release --test faults -- --nocapture` prints the table the closing notes quote.

mod common;
use common::*;
use safetensors::Dtype as St;
use std::path::Path;

/// What a fault produced, for the printed table.
struct Outcome {
    fault: &'static str,
    status: strata_status,
    message: String,
}

/// A host group beside the faulty one: two f32 layers computed as bf16.
struct Healthy {
    group: u64,
    layers: Vec<(u64, Vec<u8>)>,
}

impl Healthy {
    fn new(ctx: &Ctx) -> Healthy {
        let group = ctx.group(&tiers(|t| t.computation.dtype = STRATA_DTYPE_BF16));
        let layers = (0..2)
            .map(|i| {
                let values = weights(256, 40 + i, 1.0);
                let id = ctx.register(
                    group,
                    &format!("healthy.{i}"),
                    &[("w", STRATA_DTYPE_F32, vec![16, 16], f32_bytes(&values))],
                );
                (id, bf16_bytes(&values))
            })
            .collect();
        Healthy { group, layers }
    }

    /// The context still serves the healthy layers, with exact bytes.
    #[track_caller]
    fn still_served(&self, ctx: &Ctx) {
        for (id, expected) in &self.layers {
            assert_eq!(&ctx.acquire(*id)[0].1, expected);
            ctx.release(*id);
        }
    }
}

/// Destroys the groups and checks that nothing is held any more.
#[track_caller]
fn destroy_and_check_empty(ctx: &Ctx, groups: &[u64]) {
    for &group in groups {
        ok(strata_group_destroy(ctx.0, group));
    }
    let s = ctx.stats();
    assert_eq!(
        (s.vram_in_use, s.host_in_use),
        (0, 0),
        "bytes held after every group was destroyed"
    );
}

fn disk_tiers() -> strata_tiers {
    tiers(|t| {
        t.offload = place(STRATA_DEVICE_DISK, 0);
        t.onload = place(STRATA_DEVICE_DISK, 0);
        t.computation.dtype = STRATA_DTYPE_F32;
    })
}

/// A one-tensor f32 checkpoint "w" of 64×64 values; returns its bytes.
fn write_weight(path: &Path, seed: u64) -> Vec<u8> {
    let bytes = f32_bytes(&weights(64 * 64, seed, 0.02));
    write_safetensors(path, &[("w".into(), St::F32, vec![64, 64], bytes.clone())]);
    bytes
}

/// A status and the message it left, then the checks every fault shares.
fn outcome(fault: &'static str, status: strata_status) -> Outcome {
    let message = if status == STRATA_OK {
        String::new()
    } else {
        last_error()
    };
    Outcome {
        fault,
        status,
        message,
    }
}

/// A checkpoint layer whose file is then broken by `break_file`: the acquire after it must give
/// `expected`, with a message naming the file; `recovers` says whether the next acquire works.
fn file_fault(
    fault: &'static str,
    break_file: impl FnOnce(&Path),
    expected: strata_status,
    recovers: bool,
) -> Outcome {
    let dir = TempDir::new(&format!("fault {fault}"));
    let path = dir.path("weights.safetensors");
    let bytes = write_weight(&path, 7);
    let ctx = Ctx::new(0);
    let healthy = Healthy::new(&ctx);
    let group = ctx.group(&disk_tiers());
    let layer = ctx.register_tensors(group, &path, "disk.w", &["w"]);
    // The mtime check works at the file system's resolution: let the change be seen.
    std::thread::sleep(std::time::Duration::from_millis(20));
    break_file(&path);

    let status = ctx.try_acquire(layer);
    let result = outcome(fault, status);
    expect(status, expected);
    if status == STRATA_OK {
        assert_eq!(ctx.acquire(layer)[0].1, bytes, "{fault}: wrong bytes");
        ctx.release(layer);
        ctx.release(layer);
    } else {
        assert!(
            result.message.contains("weights.safetensors"),
            "{fault}: the message does not name the file: {}",
            result.message
        );
        let again = ctx.try_acquire(layer);
        if recovers {
            expect(again, STRATA_OK);
            ctx.release(layer);
        } else {
            expect(again, expected);
        }
    }
    healthy.still_served(&ctx);
    destroy_and_check_empty(&ctx, &[healthy.group, group]);
    result
}

fn read_error() -> Outcome {
    file_fault(
        "read fails with EIO twice in a row (injected)",
        |path| {
            let dir = path
                .parent()
                .unwrap()
                .file_name()
                .unwrap()
                .to_str()
                .unwrap();
            strata::checkpoint::inject_read_faults(dir, 2);
        },
        STRATA_ERR_IO,
        true,
    )
}

fn truncated() -> Outcome {
    file_fault(
        "file truncated after open",
        |path| {
            let len = std::fs::metadata(path).unwrap().len();
            let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
            file.set_len(len / 2).unwrap();
        },
        STRATA_ERR_IO,
        false,
    )
}

fn rewritten() -> Outcome {
    file_fault(
        "file rewritten in place (same size)",
        |path| {
            let mut bytes = std::fs::read(path).unwrap();
            let end = bytes.len();
            bytes[end - 4..].copy_from_slice(&f32_bytes(&[9.0]));
            std::fs::write(path, bytes).unwrap();
        },
        STRATA_ERR_FORMAT,
        false,
    )
}

/// `cp -p`, `rsync -t --inplace`, tar over the file: new bytes, same size, the old mtime put
/// back. Only the ctime tells.
fn rewritten_with_its_mtime_put_back() -> Outcome {
    file_fault(
        "file rewritten in place, mtime put back",
        |path| {
            use std::io::Write;
            let mtime = std::fs::metadata(path).unwrap().modified().unwrap();
            let mut bytes = std::fs::read(path).unwrap();
            let end = bytes.len();
            bytes[end - 4..].copy_from_slice(&f32_bytes(&[9.0]));
            let mut file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
            file.write_all(&bytes).unwrap();
            file.set_modified(mtime).unwrap();
        },
        STRATA_ERR_FORMAT,
        false,
    )
}

fn deleted() -> Outcome {
    file_fault(
        "file deleted after open",
        |path| std::fs::remove_file(path).unwrap(),
        STRATA_OK,
        true,
    )
}

fn replaced() -> Outcome {
    file_fault(
        "file replaced by rename after open",
        |path| {
            let fresh = path.with_file_name("fresh.safetensors");
            write_weight(&fresh, 99);
            std::fs::rename(&fresh, path).unwrap();
        },
        STRATA_OK,
        true,
    )
}

/// host_limit below one layer's host copy: onloading is refused, and works once raised.
fn host_limit_below_a_layer() -> Outcome {
    let dir = TempDir::new("fault host limit");
    let path = dir.path("weights.safetensors");
    let bytes = write_weight(&path, 8);
    let ctx = Ctx::new(0);
    let healthy = Healthy::new(&ctx);
    let group = ctx.group(&tiers(|t| {
        t.offload = place(STRATA_DEVICE_DISK, 0);
        t.onload = place(STRATA_DEVICE_CPU, STRATA_DTYPE_F16);
        t.computation.dtype = STRATA_DTYPE_F32;
    }));
    let layer = ctx.register_tensors(group, &path, "host.w", &["w"]);
    let held = ctx.stats().host_in_use;
    ok(strata_context_set_host_limit(ctx.0, held + 1000));

    let status = strata_group_onload(ctx.0, group);
    let result = outcome("host_limit below one layer (onload)", status);
    expect(status, STRATA_ERR_BUDGET);
    assert!(result.message.contains("host_limit"), "{}", result.message);
    expect(ctx.try_acquire(layer), STRATA_ERR_BUDGET);
    assert_eq!(
        ctx.stats().host_in_use,
        held,
        "a refused onload keeps nothing"
    );

    ok(strata_context_set_host_limit(ctx.0, STRATA_UNLIMITED));
    ok(strata_group_onload(ctx.0, group));
    let f16_rounded: Vec<f32> = f32_values(&bytes)
        .iter()
        .map(|&v| half::f16::from_f32(v).to_f32())
        .collect();
    assert_eq!(f32_values(&ctx.acquire(layer)[0].1), f16_rounded);
    ctx.release(layer);
    healthy.still_served(&ctx);
    destroy_and_check_empty(&ctx, &[healthy.group, group]);
    result
}

/// vram_limit below one layer in strict mode: refused, never overcommitted.
fn strict_budget_below_a_layer() -> Outcome {
    let ctx = Ctx::with(|o| {
        o.vram_limit = 4096;
        o.prefetch_depth = 0;
        o.flags = STRATA_FLAG_STRICT_BUDGET;
    });
    let healthy = Healthy::new(&ctx);
    // A conversion, so the layer needs device bytes (the CPU device hands plain host layers out
    // in place).
    let group = ctx.group(&tiers(|t| t.computation.dtype = STRATA_DTYPE_BF16));
    let big = ctx.register(
        group,
        "big",
        &[(
            "w",
            STRATA_DTYPE_F32,
            vec![64, 64],
            f32_bytes(&weights(4096, 9, 1.0)),
        )],
    );
    let status = ctx.try_acquire(big);
    let result = outcome("vram_limit below one layer, strict mode", status);
    expect(status, STRATA_ERR_BUDGET);
    assert!(result.message.contains("vram_limit"), "{}", result.message);
    let s = ctx.stats();
    assert_eq!(s.overcommit_peak, 0);
    assert!(s.vram_peak <= 4096, "peak {} over the limit", s.vram_peak);
    healthy.still_served(&ctx);
    destroy_and_check_empty(&ctx, &[healthy.group, group]);
    result
}

/// A thread holding one layer asks for another that does not fit beside it: BUDGET at once
/// rather than waiting for a release that only it could make.
fn no_room_while_holding() -> Outcome {
    let ctx = Ctx::new(4000);
    let group = ctx.group(&tiers(|t| t.computation.dtype = STRATA_DTYPE_F16));
    let layer = |name: &str, seed| {
        let values = weights(512, seed, 1.0);
        ctx.register(
            group,
            name,
            &[("w", STRATA_DTYPE_F32, vec![512], f32_bytes(&values))],
        )
    };
    let (a, b) = (layer("a", 1), layer("b", 2));
    ctx.acquire(a);
    let status = ctx.try_acquire(b);
    let result = outcome("no room for a second layer while holding one", status);
    expect(status, STRATA_ERR_BUDGET);
    assert!(result.message.contains("in use"), "{}", result.message);
    ctx.release(a);
    ctx.acquire(b);
    ctx.release(b);
    destroy_and_check_empty(&ctx, &[group]);
    result
}

#[test]
fn every_fault_gives_a_clear_status_and_leaves_the_context_usable_and_empty_after_destroy() {
    let outcomes = [
        read_error(),
        truncated(),
        rewritten(),
        rewritten_with_its_mtime_put_back(),
        deleted(),
        replaced(),
        host_limit_below_a_layer(),
        strict_budget_below_a_layer(),
        no_room_while_holding(),
    ];
    println!("| fault | status | message |\n|---|---|---|");
    for o in &outcomes {
        println!("| {} | {} | {} |", o.fault, name(o.status), o.message);
    }
    println!(
        "| CUDA out of memory, destroyed stream | STRATA_ERR_OUT_OF_MEMORY, STRATA_ERR_INVALID_ARGUMENT | tests/cuda.rs: \
         on a GPU, and in CI on the emulated driver |"
    );
}

// ----- found by the abi_sequence fuzz target -----

/// A layer registered into a group that was already onloaded gets its onload copy too: its
/// bytes go through the onload tier's rounding (f16, then bf16 to prepare), not around it.
#[test]
fn a_layer_registered_after_its_group_was_onloaded_goes_through_the_onload_tier() {
    let ctx = Ctx::new(STRATA_UNLIMITED);
    let group = ctx.group(&tiers(|t| {
        t.onload = place(STRATA_DEVICE_CPU, STRATA_DTYPE_F16);
        t.preparing.dtype = STRATA_DTYPE_BF16;
        t.computation.dtype = STRATA_DTYPE_F32;
    }));
    let register = |name: &str, values: &[f32]| {
        ctx.register(
            group,
            name,
            &[("w", STRATA_DTYPE_F32, vec![64], f32_bytes(values))],
        )
    };
    let first = register("first", &weights(64, 1, 1.0));
    ok(strata_group_onload(ctx.0, group));
    // Small values: f16 loses their low bits (subnormals) before bf16 would.
    let late_values = weights(64, 2, 1e-5);
    let late = register("late", &late_values);
    let bf16 = |v: f32| half::bf16::from_f32(v).to_f32();
    let through_f16: Vec<f32> = late_values
        .iter()
        .map(|&v| bf16(half::f16::from_f32(v).to_f32()))
        .collect();
    let around_f16: Vec<f32> = late_values.iter().map(|&v| bf16(v)).collect();
    assert_ne!(through_f16, around_f16, "the test needs values f16 rounds");
    assert_eq!(f32_values(&ctx.acquire(late)[0].1), through_f16);
    ctx.release(late);
    ctx.acquire(first);
    ctx.release(first);
    destroy_and_check_empty(&ctx, &[group]);
}

/// Tier dtypes are float ones: an integer one would ask for float tensors cast to integers.
#[test]
fn an_integer_tier_dtype_is_refused_when_the_group_is_created() {
    let ctx = Ctx::new(STRATA_UNLIMITED);
    for dtype in [
        STRATA_DTYPE_I32,
        STRATA_DTYPE_I64,
        STRATA_DTYPE_U8,
        STRATA_DTYPE_BOOL,
    ] {
        let tiers = tiers(|t| t.onload = place(STRATA_DEVICE_CPU, dtype));
        let mut group = 0xA5;
        expect(
            strata_group_create(ctx.0, cstr("g").as_ptr(), &tiers, &mut group),
            STRATA_ERR_INVALID_ARGUMENT,
        );
        assert!(
            last_error().contains("not a float dtype"),
            "{}",
            last_error()
        );
        assert_eq!(group, 0xA5, "output written on failure");
    }
}

// ----- reliability round 2: one bad file, panics mid-fill -----

/// With the default tiers (host copies in RAM), a group whose layers come from two files, one of
/// them truncated: the other file's layers keep working with exact bytes, the damaged one fails
/// its own acquires with STRATA_ERR_IO, and an explicit onload returns that error with the
/// intact layers onloaded.
#[test]
fn one_damaged_file_fails_only_its_own_layers() {
    let dir = TempDir::new("one bad file");
    let (intact, damaged) = (
        dir.path("intact.safetensors"),
        dir.path("damaged.safetensors"),
    );
    let bytes = write_weight(&intact, 11);
    write_weight(&damaged, 12);
    let ctx = Ctx::new(STRATA_UNLIMITED);
    let group = ctx.group(&tiers(|t| t.computation.dtype = STRATA_DTYPE_F32));
    let good = ctx.register_tensors(group, &intact, "good", &["w"]);
    let bad = ctx.register_tensors(group, &damaged, "bad", &["w"]);
    let len = std::fs::metadata(&damaged).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&damaged)
        .unwrap()
        .set_len(len / 2)
        .unwrap();

    // The implicit onload of the first acquire meets the damaged file: not this layer's.
    assert_eq!(ctx.acquire(good)[0].1, bytes);
    ctx.release(good);
    for _ in 0..2 {
        expect(ctx.try_acquire(bad), STRATA_ERR_IO);
        assert!(
            last_error().contains("damaged.safetensors"),
            "{}",
            last_error()
        );
    }
    assert_eq!(ctx.acquire(good)[0].1, bytes);
    ctx.release(good);

    // Explicit: the first error comes back, and the intact layers are onloaded all the same.
    ok(strata_group_offload(ctx.0, group));
    expect(strata_group_onload(ctx.0, group), STRATA_ERR_IO);
    assert!(
        last_error().contains("damaged.safetensors"),
        "{}",
        last_error()
    );
    let before = ctx.stats();
    assert_eq!(ctx.acquire(good)[0].1, bytes);
    ctx.release(good);
    assert_eq!(
        ctx.stats().implicit_onloads,
        before.implicit_onloads,
        "the group counts as onloaded"
    );
    expect(ctx.try_acquire(bad), STRATA_ERR_IO);
    destroy_and_check_empty(&ctx, &[group]);
}

/// What the log callback received, for the engine's panic report.
static LOGGED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

unsafe extern "C" fn keep_log(
    _user: *mut std::ffi::c_void,
    _level: u32,
    message: *const std::ffi::c_char,
) {
    // SAFETY: strata passes a NUL-terminated message valid during the call.
    let message = unsafe { std::ffi::CStr::from_ptr(message) };
    LOGGED
        .lock()
        .unwrap()
        .push(message.to_string_lossy().into_owned());
}

/// A panic in strata mid-fill (the test hook) leaves nothing marked: in an acquire's fill it is
/// STRATA_ERR_PANIC for that acquire and the next one works; in the copy engine's fill the
/// engine survives and the acquire fills the layer itself; in an onload's host copy the onload
/// is STRATA_ERR_PANIC and the next one works. set_vram_limit returns, and once the groups are
/// destroyed no byte is held (what the fills had charged was given back).
#[test]
fn a_panic_mid_fill_leaves_no_stuck_state() {
    within(60, || {
        let ctx = Ctx::with(|o| {
            o.prefetch_depth = 1;
            o.log_fn = Some(keep_log);
        });
        let group = ctx.group(&tiers(|t| t.computation.dtype = STRATA_DTYPE_BF16));
        let layers: Vec<(u64, Vec<u8>)> = ["panic.demand", "panic.engine.a", "panic.engine.b"]
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let values = weights(64 * 64, 60 + i as u64, 1.0);
                let tensor = (*name, STRATA_DTYPE_F32, vec![64, 64], f32_bytes(&values));
                (ctx.register(group, name, &[tensor]), bf16_bytes(&values))
            })
            .collect();
        let [(demand, demand_bytes), (a, a_bytes), (b, b_bytes)] = &layers[..] else {
            unreachable!()
        };

        // In an acquire's own fill.
        strata::context::inject_fill_panics("panic.demand", 1);
        expect(ctx.try_acquire(*demand), STRATA_ERR_PANIC);
        assert!(
            last_error().contains("injected fill panic"),
            "{}",
            last_error()
        );
        assert_eq!(&ctx.acquire(*demand)[0].1, demand_bytes);
        ctx.release(*demand);
        ok(strata_context_set_vram_limit(ctx.0, 0));
        ok(strata_context_set_vram_limit(ctx.0, STRATA_UNLIMITED));

        // In the copy engine's fill: learn a, b, then drop the device copies; acquiring a sets
        // the engine filling b, which panics.
        for _ in 0..2 {
            for (id, bytes) in [(a, a_bytes), (b, b_bytes)] {
                assert_eq!(&ctx.acquire(*id)[0].1, bytes);
                ctx.release(*id);
            }
        }
        ok(strata_group_offload(ctx.0, group));
        strata::context::inject_fill_panics("panic.engine.b", 1);
        assert_eq!(&ctx.acquire(*a)[0].1, a_bytes);
        let started = std::time::Instant::now();
        // The engine's report reaches the log callback as a later call returns.
        while !LOGGED
            .lock()
            .unwrap()
            .iter()
            .any(|m| m.contains("copy engine panicked"))
        {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(20),
                "the engine never reported its panic"
            );
            std::thread::sleep(std::time::Duration::from_millis(2));
            ctx.stats();
        }
        ok(strata_context_set_vram_limit(ctx.0, 1 << 20));
        assert_eq!(&ctx.acquire(*b)[0].1, b_bytes);
        ctx.release(*b);
        ctx.release(*a);
        ok(strata_context_set_vram_limit(ctx.0, STRATA_UNLIMITED));

        // In an onload's host copy (the onload tier in RAM as f16).
        let onload_group = ctx.group(&tiers(|t| {
            t.onload = place(STRATA_DEVICE_CPU, STRATA_DTYPE_F16);
            t.computation.dtype = STRATA_DTYPE_F16;
        }));
        let values = weights(64, 70, 1.0);
        let tensor = (
            "panic.onload",
            STRATA_DTYPE_F32,
            vec![64],
            f32_bytes(&values),
        );
        let layer = ctx.register(onload_group, "panic.onload", &[tensor]);
        strata::context::inject_fill_panics("panic.onload", 1);
        expect(strata_group_onload(ctx.0, onload_group), STRATA_ERR_PANIC);
        ok(strata_group_onload(ctx.0, onload_group));
        let f16: Vec<u8> = values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect();
        assert_eq!(ctx.acquire(layer)[0].1, f16);
        ctx.release(layer);
        ok(strata_group_offload(ctx.0, onload_group));
        destroy_and_check_empty(&ctx, &[group, onload_group]);
    });
}
