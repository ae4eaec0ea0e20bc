//! The strata command line as a user runs it: help for every command, the demo (the main job),
//! and inspect/plan on a generated checkpoint, in human and JSON form.

mod common;
use common::*;
use std::process::Command;

fn strata(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(args)
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn every_command_has_help_and_bad_input_gets_a_message() {
    for args in [
        &["--help"][..],
        &["demo", "--help"],
        &["inspect", "--help"],
        &["plan", "--help"],
        &["bench", "--help"],
    ] {
        let (code, out, _) = strata(args);
        assert_eq!(code, 0, "{args:?}");
        assert!(out.contains("Usage"), "{args:?}: {out}");
    }
    let (code, _, err) = strata(&["demo", "--layers", "0"]);
    assert_eq!(code, 2);
    assert!(err.contains("--layers takes a positive number"), "{err}");
    let (code, _, err) = strata(&["demo", "--layers", "zero"]);
    assert_eq!(code, 2);
    assert!(err.contains("--layers takes a positive number"), "{err}");
    let (code, _, err) = strata(&["frobnicate"]);
    assert_eq!((code, err.contains("unknown command")), (2, true), "{err}");
    let (code, _, err) = strata(&["inspect", "/no/such/model.safetensors"]);
    assert_eq!(code, 2);
    assert!(err.contains("/no/such/model.safetensors"), "{err}");
}

#[test]
fn the_demo_streams_under_its_budget_and_matches_the_resident_run() {
    let (code, out, err) = strata(&["demo", "--layers", "8", "--width", "128", "--passes", "3"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("identical, bit for bit"), "{out}");
    assert!(out.contains("the budget held. OK"), "{out}");
}

#[test]
fn bench_measures_a_generated_model_against_its_limits() {
    let dir = TempDir::new("cli-bench");
    let out_dir = dir.path("out");
    let args = [
        "bench",
        "--layers",
        "6",
        "--width",
        "128",
        "--passes",
        "6",
        "--vram-limit",
        "50%",
        "--compute-ms",
        "0.2",
        "--json",
        "--out",
    ];
    let mut args: Vec<&str> = args.to_vec();
    args.push(out_dir.to_str().unwrap());
    let (code, out, err) = strata(&args);
    assert_eq!(code, 0, "{out}\n{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["layers"], 6);
    let model = report["model_bytes"].as_u64().unwrap();
    assert_eq!(
        model,
        6 * (128 * 128 + 128) * 2,
        "bf16 weights and biases, no padding"
    );
    assert_eq!(report["vram_limit"].as_u64().unwrap(), model / 2);
    let runs = report["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2);
    // Each layer moves at most once per pass, but a pass may start with layers the one before
    // left resident and end having filled layers ahead for the next: averaged over the 4 timed
    // passes (after 2 warm-ups), at most what the budget holds comes on top of the model.
    let timed_passes = 4;
    for run in runs {
        let moved = run["bytes_per_pass"].as_u64().unwrap();
        let bound = run["bytes_lower_bound"].as_u64().unwrap();
        assert!(
            moved > 0 && moved <= model + model / 2 / timed_passes,
            "{run}"
        );
        assert!(bound <= model, "{run}");
        assert!(run["vram_peak"].as_u64().unwrap() <= model / 2, "{run}");
        assert!(run["overlap"].as_f64().unwrap() > 0.0, "{run}");
    }
    for file in ["timeline.json", "timeline.svg"] {
        let text = std::fs::read_to_string(out_dir.join(file)).unwrap();
        assert!(text.contains("blocks.0"), "{file} names the layers");
    }
    let (code, _, err) = strata(&["bench", "--passes", "2"]);
    assert_eq!((code, err.contains("at least 3")), (2, true), "{err}");
}

#[test]
fn inspect_and_plan_describe_a_checkpoint() {
    let dir = TempDir::new("cli");
    let path = dir.path("model.safetensors");
    let tensors: Vec<_> = (0..4)
        .flat_map(|b| {
            [
                (
                    format!("blocks.{b}.weight"),
                    safetensors::Dtype::BF16,
                    vec![64, 128],
                    bf16_bytes(&weights(64 * 128, b, 0.02)),
                ),
                (
                    format!("blocks.{b}.bias"),
                    safetensors::Dtype::BF16,
                    vec![64],
                    bf16_bytes(&weights(64, b + 10, 0.02)),
                ),
            ]
        })
        .collect();
    write_safetensors(&path, &tensors);
    let path = path.to_str().unwrap();

    let (code, out, err) = strata(&["inspect", path, "--keep", "2", "--json"]);
    assert_eq!(code, 0, "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["tensors"], 8);
    let layers = json["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 4);
    assert!(layers
        .iter()
        .all(|l| l["bytes"] == 64 * 128 * 2 + 64 * 2 && l["tensors"] == 2));
    let (code, out, _) = strata(&["inspect", path, "--keep", "2"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("4 layers") && out.contains("blocks.3"),
        "{out}"
    );

    // --keep 0 (the default) is a valid count: each module's tensors form a layer.
    let (code, out, err) = strata(&["inspect", path, "--keep", "0", "--json"]);
    assert_eq!(code, 0, "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["layers"].as_array().unwrap().len(), 4);

    let plan = |limit: &str, prefetch: &str| {
        let (code, out, err) = strata(&[
            "plan",
            path,
            "--keep",
            "2",
            "--vram-limit",
            limit,
            "--preparing",
            "fp8",
            "--computation",
            "bf16",
            "--prefetch",
            prefetch,
            "--json",
        ]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()
    };
    // fp8 weight + per-channel scales + the bf16 bias (1-D tensors keep their dtype), 64-aligned.
    let prepared = (64 * 128 + 64 * 4 + 64 * 2) as u64;
    let everything = plan("1GiB", "2");
    assert_eq!(everything["model_bytes"], 4 * prepared);
    assert_eq!(everything["streamed_bytes_per_pass"], 0);
    let nothing = plan("0", "2");
    assert_eq!(nothing["streamed_bytes_per_pass"], 4 * prepared);
    // Without prefetching, budget 0 holds nothing between passes.
    let depth0 = |limit: &str| plan(limit, "0");
    assert_eq!(depth0("0")["resident_bytes"], 0);
    // Room for two resident layers beside one in use (its copy and its bf16 conversion): a steady
    // pass keeps one of them throughout and streams the other three layers (Σ − B).
    let converted = (64 * 128 * 2 + 64 * 2) as u64;
    let two = depth0(&(2 * prepared + converted).to_string());
    assert_eq!(two["resident_layers"].as_array().unwrap().len(), 2);
    assert_eq!(two["streamed_bytes_per_pass"], 3 * prepared);
}

#[test]
fn plan_predicts_what_a_context_moves_and_keeps() {
    // 48 layers of 16 KiB under a budget of 24 of them, read from a checkpoint on disk.
    let dir = TempDir::new("cli-plan-vs-context");
    let path = dir.path("model.safetensors");
    let layers = 48;
    let size = 64 * 64 * 4u64;
    let tensors: Vec<_> = (0..layers)
        .map(|b| {
            let values: Vec<f32> = (0..64 * 64).map(|j| (b * 10_000 + j) as f32).collect();
            (
                format!("blocks.{b:02}.weight"),
                safetensors::Dtype::F32,
                vec![64, 64],
                f32_bytes(&values),
            )
        })
        .collect();
    write_safetensors(&path, &tensors);
    let budget = 24 * size;
    let (code, out, err) = strata(&[
        "plan",
        path.to_str().unwrap(),
        "--keep",
        "2",
        "--vram-limit",
        &budget.to_string(),
        "--prefetch",
        "0",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let plan: serde_json::Value = serde_json::from_str(&out).unwrap();
    let planned_pass = plan["streamed_bytes_per_pass"].as_u64().unwrap();
    assert_eq!(planned_pass, layers as u64 * size - budget, "Σ − B");

    let ctx = Ctx::with(|o| {
        o.vram_limit = budget;
        o.prefetch_depth = 0;
    });
    let group = ctx.group(&tiers(|t| {
        t.offload = place(STRATA_DEVICE_DISK, STRATA_DTYPE_SOURCE);
        t.onload = place(STRATA_DEVICE_DISK, STRATA_DTYPE_SOURCE);
    }));
    assert_eq!(ctx.register_prefix(group, &path, "blocks.", 2), layers);
    let ids: Vec<u64> = (0..layers)
        .map(|b| ctx.find(&format!("blocks.{b:02}")))
        .collect();
    let mut pass = 0;
    for _ in 0..4 {
        let before = ctx.stats().bytes_to_device;
        for &id in &ids {
            ctx.acquire(id);
            ctx.release(id);
        }
        pass = ctx.stats().bytes_to_device - before;
    }
    assert_eq!(pass, planned_pass, "bytes per steady pass");
    // The planned residents are all hits (nothing moves), and they are all the context holds.
    let held = ctx.stats().vram_in_use;
    assert_eq!(held, plan["resident_bytes"].as_u64().unwrap());
    let resident = plan["resident_layers"].as_array().unwrap();
    assert_eq!(resident.len(), 24);
    let before = ctx.stats().bytes_to_device;
    for name in resident {
        let id = ctx.find(name.as_str().unwrap());
        ctx.acquire(id);
        ctx.release(id);
    }
    assert_eq!(
        ctx.stats().bytes_to_device,
        before,
        "a planned resident was not resident"
    );
}
