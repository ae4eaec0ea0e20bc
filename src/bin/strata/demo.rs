//! `strata demo`, the main job: a generated model streamed from its safetensors file under a
//! budget, with real work per layer, checked against an all-resident run.

use crate::{human_bytes, output_dir, Args};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use strata::checkpoint::{Checkpoint, ReadMode};
use strata::context::{Context, Options};
use strata::convert::Quant;
use strata::dtype::DType;
use strata::error::{Error, Result};
use strata::stats::Stats;
use strata::tiers::{Device, Placement, Tiers};
use strata::{GroupId, LayerId, StreamHandle};

/// A limit meaning "no limit" (`vram_limit`, `host_limit`).
const UNLIMITED: u64 = u64::MAX;

const DEMO_USAGE: &str = "strata demo: stream a generated model under a budget and check the result

Usage: strata demo [--layers N] [--width N] [--passes N] [--budget-percent P] [--direct-io]
                   [--keep DIR]

Generates a model of N square bf16 layers (width x width, plus a bias) as a safetensors file,
stores it on disk, keeps it in fp8 (per-channel scales) on the compute device and computes in
bf16, under vram_limit = P% of the fp8 model. Each pass runs x <- normalize(W x + b) through every
layer; the result must equal, bit for bit, the same passes with everything resident.

Options:
  --layers N          layers in the model (default 32)
  --width N           rows and columns of each weight (default 1024)
  --passes N          passes through the model, like denoising steps (default 4)
  --budget-percent P  vram_limit as a percentage of the fp8 model (default 30), raised to
                      one layer in use plus one resident if that is more
  --direct-io         read the checkpoint with O_DIRECT, past the page cache
  --keep DIR          write the checkpoint and timeline into DIR and keep them";

struct DemoConfig {
    layers: usize,
    width: usize,
    passes: usize,
    budget_percent: u64,
    read_mode: ReadMode,
    keep: Option<PathBuf>,
}

fn parse_demo(args: &[String]) -> Result<Option<DemoConfig>> {
    let valued = [
        "--layers",
        "--width",
        "--passes",
        "--budget-percent",
        "--keep",
    ];
    let Some(args) = Args::parse(args, &valued, &["--direct-io"], DEMO_USAGE)? else {
        return Ok(None);
    };
    if let Some(word) = args.positional.first() {
        return Err(Error::invalid(format!(
            "unexpected argument {word:?}\n\n{DEMO_USAGE}"
        )));
    }
    Ok(Some(DemoConfig {
        layers: args.number("--layers", 32)? as usize,
        width: args.number("--width", 1024)? as usize,
        passes: args.number("--passes", 4)? as usize,
        budget_percent: args.number("--budget-percent", 30)?,
        read_mode: read_mode(&args),
        keep: args.get("--keep").map(PathBuf::from),
    }))
}

/// `--direct-io`: O_DIRECT reads; else buffered.
pub(crate) fn read_mode(args: &Args) -> ReadMode {
    match args.has("--direct-io") {
        true => ReadMode::Direct,
        false => ReadMode::Buffered,
    }
}

/// Deterministic weights with a standard deviation of about `scale`.
fn synthetic_values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.46 * scale
        })
        .collect()
}

/// Writes the demo model as a safetensors file one tensor at a time, so even a model of many GiB
/// (`strata bench --layers 128 --width 4096`) never sits in memory whole. Layer `i` has
/// `rows(i)` x `width` weights and `rows(i)` biases. Returns its data bytes.
pub(crate) fn write_model(
    path: &Path,
    layers: usize,
    width: usize,
    rows: &dyn Fn(usize) -> usize,
) -> Result<u64> {
    use std::io::Write;
    let shapes = |i: usize| {
        [
            (format!("blocks.{i}.weight"), vec![rows(i), width]),
            (format!("blocks.{i}.bias"), vec![rows(i)]),
        ]
    };
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for i in 0..layers {
        for (name, shape) in shapes(i) {
            let bytes = shape.iter().product::<usize>() as u64 * 2;
            header.insert(
                name,
                serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + bytes]}),
            );
            offset += bytes;
        }
    }
    let mut header = serde_json::to_vec(&header)
        .map_err(|e| Error::invalid(format!("building the demo model's header: {e}")))?;
    // The data starts 8-byte aligned, as the format asks.
    header.resize(header.len().div_ceil(8) * 8, b' ');
    let written = |e: std::io::Error| Error::from_io(&e, "writing", path);
    let file = std::fs::File::create(path).map_err(written)?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    out.write_all(&(header.len() as u64).to_le_bytes())
        .and_then(|()| out.write_all(&header))
        .map_err(written)?;
    let scale = 1.0 / (width as f32).sqrt();
    for i in 0..layers {
        for (values, seed_scale) in [
            (rows(i) * width, (2 * i as u64 + 1, scale)),
            (rows(i), (2 * i as u64 + 2, 0.1)),
        ] {
            let bytes: Vec<u8> = synthetic_values(values, seed_scale.0, seed_scale.1)
                .into_iter()
                .flat_map(|v| half::bf16::from_f32(v).to_le_bytes())
                .collect();
            out.write_all(&bytes).map_err(written)?;
        }
    }
    out.flush().map_err(written)?;
    Ok(offset)
}

/// One pass: x <- normalize(W x + b) through every layer, reading the bf16 views strata hands out.
fn run_pass(ctx: &Context, layers: &[LayerId], width: usize, x: &mut Vec<f32>) -> Result<()> {
    for &layer in layers {
        let mut weight: &[u16] = &[];
        let mut bias: &[u16] = &[];
        ctx.acquire(layer, StreamHandle::default(), 2, |i, view| {
            // SAFETY: on the CPU device a view's bytes are host memory, valid and unchanged until
            // the release below; bf16 data is 2-byte aligned (strata aligns every tensor to 64).
            let values = unsafe {
                std::slice::from_raw_parts(view.addr as *const u16, view.nbytes as usize / 2)
            };
            if i == 0 {
                weight = values;
            } else {
                bias = values;
            }
        })?;
        let bf16 = |bits: u16| f32::from_bits((bits as u32) << 16);
        let mut y: Vec<f32> = weight
            .chunks_exact(width)
            .zip(bias)
            .map(|(row, &b)| {
                row.iter()
                    .zip(x.iter())
                    .map(|(&w, &xi)| bf16(w) * xi)
                    .sum::<f32>()
                    + bf16(b)
            })
            .collect();
        ctx.release(layer, StreamHandle::default())?;
        let norm = (y.iter().map(|v| v * v).sum::<f32>() / width as f32)
            .sqrt()
            .max(1e-6);
        y.iter_mut().for_each(|v| *v /= norm);
        *x = y;
    }
    Ok(())
}

/// A CPU context with one group, "model", that reads its layers from their checkpoint file
/// (disk offload and onload tiers), keeps them as `preparing` (per-channel scales where that is
/// fp8) and hands them out as `computation`.
pub fn streaming_context(
    vram_limit: u64,
    host_limit: u64,
    prefetch_depth: u32,
    preparing: Option<DType>,
    computation: Option<DType>,
    read_mode: ReadMode,
) -> Result<(Arc<Context>, GroupId)> {
    let ctx = Context::new(Options {
        compute: Device::Cpu,
        device_index: 0,
        vram_limit,
        host_limit,
        prefetch_depth,
        strict_budget: false,
        read_mode,
        vram_headroom: 0,
        host_threads: 0,
        log: None,
        progress: Default::default(),
    })?;
    let on = |device, dtype| Placement { device, dtype };
    let tiers = Tiers {
        offload: on(Device::Disk, None),
        onload: on(Device::Disk, None),
        preparing: on(Device::Cpu, preparing),
        computation: on(Device::Cpu, computation),
        quant: Quant::PerChannel,
    };
    let group = ctx.create_group("model", &tiers)?;
    Ok((ctx, group))
}

fn streamed_run(
    checkpoint: &Checkpoint,
    config: &DemoConfig,
    vram_limit: u64,
) -> Result<(Vec<f32>, Stats, Arc<Context>, f64)> {
    let (ctx, group) = streaming_context(
        vram_limit,
        UNLIMITED,
        2,
        Some(DType::F8E4M3),
        Some(DType::BF16),
        config.read_mode,
    )?;
    ctx.register_checkpoint_prefix(group, checkpoint, "blocks.", 2)?;
    let layers = (0..config.layers)
        .map(|i| ctx.find_layer(&format!("blocks.{i}")))
        .collect::<Result<Vec<_>>>()?;
    let mut x = synthetic_values(config.width, 12345, 1.0);
    let started = Instant::now();
    for _ in 0..config.passes {
        run_pass(&ctx, &layers, config.width, &mut x)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let stats = ctx.stats();
    Ok((x, stats, ctx, seconds))
}

pub fn demo(args: &[String]) -> Result<()> {
    let Some(config) = parse_demo(args)? else {
        return Ok(());
    };
    let dir = output_dir(config.keep.as_deref(), "demo")?;
    let model = dir.join("model.safetensors");
    let stored = write_model(&model, config.layers, config.width, &|_| config.width)?;
    let checkpoint = Checkpoint::open(&model)?;
    let fp8_model = (config.layers
        * (config.width * config.width + config.width * 4 + config.width * 2))
        as u64;
    // A layer in use holds its fp8 copy and its bf16 conversion; a budget below that plus one
    // resident layer could only overcommit, so the percentage is raised to it for tiny models.
    let fp8_layer = fp8_model / config.layers as u64;
    let bf16_layer = (config.width * config.width * 2 + config.width * 2) as u64;
    let vram_limit = (fp8_model * config.budget_percent / 100).max(2 * fp8_layer + bf16_layer);
    println!(
        "model: {} layers of {w}x{w} bf16 + bias, {} on disk at {}",
        config.layers,
        human_bytes(stored),
        model.display(),
        w = config.width
    );
    println!(
        "tiers: disk (bf16) -> device fp8 e4m3, per-channel scales ({}) -> computed in bf16",
        human_bytes(fp8_model)
    );
    println!(
        "budget: vram_limit {} ({:.0}% of the fp8 model), {} passes\n",
        human_bytes(vram_limit),
        vram_limit as f64 * 100.0 / fp8_model as f64,
        config.passes
    );

    let (streamed, stats, ctx, seconds) = streamed_run(&checkpoint, &config, vram_limit)?;
    let (resident, resident_stats, _, resident_seconds) =
        streamed_run(&checkpoint, &config, UNLIMITED)?;

    let per_pass = |s: &Stats| s.bytes_to_device / config.passes as u64;
    println!("{:<40}{:>16}{:>16}", "", "streamed", "all resident");
    println!(
        "{:<40}{:>16}{:>16}",
        "peak on device",
        human_bytes(stats.vram_peak),
        human_bytes(resident_stats.vram_peak)
    );
    println!(
        "{:<40}{:>16}{:>16}",
        "moved to device per pass",
        human_bytes(per_pass(&stats)),
        human_bytes(per_pass(&resident_stats))
    );
    println!(
        "{:<40}{:>16}{:>16}",
        "read from disk",
        human_bytes(stats.bytes_from_disk),
        human_bytes(resident_stats.bytes_from_disk)
    );
    println!(
        "{:<40}{:>16}{:>16}",
        "acquires: resident / prefetched / missed",
        format!(
            "{} / {} / {}",
            stats.resident_hits, stats.prefetch_hits, stats.misses
        ),
        format!(
            "{} / {} / {}",
            resident_stats.resident_hits, resident_stats.prefetch_hits, resident_stats.misses
        )
    );
    println!(
        "{:<40}{:>16}{:>16}",
        "evictions", stats.evictions, resident_stats.evictions
    );
    println!(
        "{:<40}{:>15.1}s{:>15.1}s",
        "time waiting for bytes",
        stats.stall_ns as f64 / 1e9,
        resident_stats.stall_ns as f64 / 1e9
    );
    println!(
        "{:<40}{:>15.2}s{:>15.2}s",
        "total time", seconds, resident_seconds
    );

    let trace = dir.join("timeline.json");
    std::fs::write(&trace, ctx.trace_json()).map_err(|e| Error::from_io(&e, "writing", &trace))?;
    let svg = dir.join("timeline.svg");
    std::fs::write(&svg, ctx.trace_svg()).map_err(|e| Error::from_io(&e, "writing", &svg))?;
    println!(
        "\ntimeline: {} (open it in https://ui.perfetto.dev) and {} (a browser shows it)",
        trace.display(),
        svg.display()
    );

    if stats.vram_peak > vram_limit {
        return Err(Error::budget(format!(
            "the budget was exceeded: peak {} > limit {}",
            stats.vram_peak, vram_limit
        )));
    }
    if streamed
        .iter()
        .map(|v| v.to_bits())
        .ne(resident.iter().map(|v| v.to_bits()))
    {
        return Err(Error::state(
            "the streamed result differs from the all-resident result",
        ));
    }
    println!("result: identical, bit for bit, to the all-resident run; the budget held. OK");
    if config.keep.is_none() {
        drop(ctx);
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}
