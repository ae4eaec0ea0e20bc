//! `strata inspect` and `strata plan`: a checkpoint seen as layers, and what a budget does to it.
//! The plan sizes each layer with the engine's own layouts (`registry::Forms`), so its figures are
//! the bytes a context would charge.

use crate::{human_bytes, parse_bytes, Args};
use serde_json::json;
use std::path::Path;
use strata::checkpoint::{Checkpoint, TensorInfo};
use strata::context::layer_name_of;
use strata::convert::Quant;
use strata::dtype::DType;
use strata::error::{Error, Result};
use strata::residency::{LayerBytes, Simulation};
use strata::tiers::{Device, Placement, Tiers};
use strata::{Forms, TensorMeta};

const INSPECT_USAGE: &str = "strata inspect: a checkpoint's layers, tensors, dtypes and bytes

Usage: strata inspect CHECKPOINT [--prefix P] [--keep N] [--all] [--json]

CHECKPOINT is a .safetensors file, a *.safetensors.index.json or a directory of shards. Tensors are
grouped into layers as strata_group_register_checkpoint does: a tensor's name cut to its first N
dot-separated parts (0, the default: drop only the last part).

Options:
  --prefix P   only tensors whose name starts with P
  --keep N     dot-separated parts that name a layer (default 0)
  --all        list every layer (default: the first 40)
  --json       machine-readable output";

const PLAN_USAGE: &str = "strata plan: which layers stay resident under a budget, and what streams

Usage: strata plan CHECKPOINT --vram-limit SIZE [options]

For a model run as a repeating pass over its layers (a DiT's blocks once per step), streamed from
disk: the layers that stay resident on the device, the bytes streamed per pass, and the pass time
the bandwidth allows. Sizes are the bytes a strata context would charge (alignment included), and
the passes are replayed through the context's own residency rule (src/residency), so the figures
are what a context with this budget and prefetch depth moves and keeps.

Options:
  --vram-limit SIZE     device budget, e.g. 8GiB (required)
  --prefix P, --keep N  layer grouping, as for inspect (default: every tensor, N = 0)
  --preparing DTYPE     resident dtype: source, bf16, f16, f32, fp8 (e4m3), e5m2 (default source)
  --computation DTYPE   dtype handed to the kernels (default source)
  --quant MODE          fp8 storage: none, per-tensor, per-channel (default per-channel)
  --prefetch N          layers fetched ahead of the one computing (default 2)
  --bandwidth RATE      host-to-device bandwidth, e.g. 25GB/s (default 25GB/s)
  --steps N             passes, e.g. denoising steps (default 20)
  --json                machine-readable output";

/// The tensors of a checkpoint grouped into layers, in the checkpoint's order.
pub(crate) fn layers_of<'a>(
    checkpoint: &'a Checkpoint,
    prefix: &str,
    keep: u32,
) -> Vec<(String, Vec<&'a TensorInfo>)> {
    let mut layers: Vec<(String, Vec<&TensorInfo>)> = Vec::new();
    let mut index = std::collections::HashMap::new();
    for tensor in checkpoint
        .tensors()
        .iter()
        .filter(|t| t.name.starts_with(prefix))
    {
        let name = layer_name_of(&tensor.name, keep);
        let slot = *index.entry(name.clone()).or_insert_with(|| {
            layers.push((name, Vec::new()));
            layers.len() - 1
        });
        layers[slot].1.push(tensor);
    }
    layers
}

fn open(args: &Args, usage: &str) -> Result<Checkpoint> {
    let [path] = args.positional.as_slice() else {
        return Err(Error::invalid(format!(
            "expected one CHECKPOINT\n\n{usage}"
        )));
    };
    crate::open_checkpoint(Path::new(path), args.has("--json"))
}

pub fn inspect(args: &[String]) -> Result<()> {
    let Some(args) = Args::parse(
        args,
        &["--prefix", "--keep"],
        &["--all", "--json"],
        INSPECT_USAGE,
    )?
    else {
        return Ok(());
    };
    let checkpoint = open(&args, INSPECT_USAGE)?;
    let keep = args.count("--keep", 0)? as u32;
    let layers = layers_of(&checkpoint, args.get("--prefix").unwrap_or(""), keep);
    let bytes = |tensors: &[&TensorInfo]| tensors.iter().map(|t| t.nbytes).sum::<u64>();
    let dtypes = |tensors: &[&TensorInfo]| {
        let mut names: Vec<&str> = tensors.iter().map(|t| t.dtype_name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        names.join(",")
    };
    if args.has("--json") {
        let out = json!({
            "files": checkpoint.files().len(),
            "tensors": checkpoint.tensors().len(),
            "bytes": checkpoint.total_bytes(),
            "layers": layers.iter().map(|(name, tensors)| json!({
                "name": name,
                "tensors": tensors.len(),
                "bytes": bytes(tensors),
                "dtypes": dtypes(tensors),
            })).collect::<Vec<_>>(),
        });
        println!("{out:#}");
        return Ok(());
    }
    println!(
        "{} file(s), {} tensors, {}",
        checkpoint.files().len(),
        checkpoint.tensors().len(),
        human_bytes(checkpoint.total_bytes())
    );
    let largest = layers.iter().map(|(_, t)| bytes(t)).max().unwrap_or(0);
    println!(
        "{} layers (--keep {keep}), the largest {}\n",
        layers.len(),
        human_bytes(largest)
    );
    println!("{:<48} {:>8} {:>12}  dtypes", "layer", "tensors", "bytes");
    let shown = if args.has("--all") {
        layers.len()
    } else {
        layers.len().min(40)
    };
    for (name, tensors) in &layers[..shown] {
        println!(
            "{name:<48} {:>8} {:>12}  {}",
            tensors.len(),
            human_bytes(bytes(tensors)),
            dtypes(tensors)
        );
    }
    if shown < layers.len() {
        println!("... {} more (--all lists them)", layers.len() - shown);
    }
    Ok(())
}

/// A tier dtype by name; None for "source" (the stored dtype).
pub(crate) fn parse_dtype(text: &str) -> Result<Option<DType>> {
    Ok(Some(match text.to_ascii_lowercase().as_str() {
        "source" => return Ok(None),
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        "fp8" | "e4m3" | "f8_e4m3fn" => DType::F8E4M3,
        "e5m2" | "f8_e5m2" => DType::F8E5M2,
        other => {
            return Err(Error::invalid(format!(
                "unknown dtype {other:?}: source, bf16, f16, f32, fp8, e5m2"
            )))
        }
    }))
}

fn parse_quant(text: &str) -> Result<Quant> {
    match text {
        "none" => Ok(Quant::None),
        "per-tensor" => Ok(Quant::PerTensor),
        "per-channel" => Ok(Quant::PerChannel),
        other => Err(Error::invalid(format!(
            "unknown quantization {other:?}: none, per-tensor, per-channel"
        ))),
    }
}

/// One layer's device bytes: its resident (preparing) copy and, while in use, the conversion to
/// the computation dtype when that differs.
struct LayerSize {
    name: String,
    prepared: u64,
    bytes: LayerBytes,
}

/// Passes simulated: the first learns the order, the last is reported as the steady one.
const PLANNED_PASSES: usize = 4;

pub fn plan(args: &[String]) -> Result<()> {
    let valued = [
        "--vram-limit",
        "--prefix",
        "--keep",
        "--preparing",
        "--computation",
        "--quant",
        "--prefetch",
        "--bandwidth",
        "--steps",
    ];
    let Some(args) = Args::parse(args, &valued, &["--json"], PLAN_USAGE)? else {
        return Ok(());
    };
    let checkpoint = open(&args, PLAN_USAGE)?;
    let vram_limit = parse_bytes(
        args.get("--vram-limit")
            .ok_or_else(|| Error::invalid(format!("--vram-limit is required\n\n{PLAN_USAGE}")))?,
    )?;
    let bandwidth = parse_bytes(args.get("--bandwidth").unwrap_or("25GB/s"))?.max(1);
    let steps = args.number("--steps", 20)?;
    let prefetch = args.count("--prefetch", 2)?;
    let keep = args.count("--keep", 0)? as u32;
    let on = |device, dtype| Placement { device, dtype };
    let tiers = Tiers {
        offload: on(Device::Disk, None),
        onload: on(Device::Disk, None),
        preparing: on(
            Device::Cuda,
            parse_dtype(args.get("--preparing").unwrap_or("source"))?,
        ),
        computation: on(
            Device::Cuda,
            parse_dtype(args.get("--computation").unwrap_or("source"))?,
        ),
        quant: parse_quant(args.get("--quant").unwrap_or("per-channel"))?,
    };

    let mut sized = Vec::new();
    for (name, tensors) in layers_of(&checkpoint, args.get("--prefix").unwrap_or(""), keep) {
        let metas = tensors
            .iter()
            .map(|t| {
                let dtype = t.dtype.ok_or_else(|| {
                    Error::unsupported(format!("tensor {:?} has dtype {}", t.name, t.dtype_name))
                })?;
                let shape = t.shape.iter().map(|&d| d as i64).collect();
                TensorMeta::new(&t.name, dtype, shape)
            })
            .collect::<Result<Vec<_>>>()?;
        let forms = Forms::on_a_gpu(&metas, &tiers);
        let converts = forms.preparing.slots != forms.computation.slots;
        sized.push(LayerSize {
            name,
            prepared: forms.preparing.size as u64,
            bytes: LayerBytes {
                prepared: forms.preparing.size as u64,
                converted: if converts {
                    forms.computation.size as u64
                } else {
                    0
                },
                payload: forms.preparing_payload(),
            },
        });
    }
    if sized.is_empty() {
        return Err(Error::not_found("no tensor matches the prefix"));
    }
    let total: u64 = sized.iter().map(|l| l.prepared).sum();
    // The passes run through the context's own residency rule; after a few the learned order is
    // steady, and the last pass is what every later one moves.
    let bytes: Vec<LayerBytes> = sized.iter().map(|l| l.bytes).collect();
    let mut sim = Simulation::new(&bytes, vram_limit, prefetch.min(u32::MAX as u64) as u32);
    let mut streamed = 0;
    for _ in 0..PLANNED_PASSES {
        let before = sim.moved();
        (0..sized.len()).for_each(|i| sim.use_layer(i));
        streamed = sim.moved() - before;
    }
    let resident: Vec<&LayerSize> = sim.resident().into_iter().map(|i| &sized[i]).collect();
    let resident_bytes = sim.held();
    let pass_seconds = streamed as f64 / bandwidth as f64;

    if args.has("--json") {
        let out = json!({
            "layers": sized.len(),
            "model_bytes": total,
            "vram_limit": vram_limit,
            "prefetch_depth": prefetch,
            "resident_layers": resident.iter().map(|l| l.name.as_str()).collect::<Vec<_>>(),
            "resident_bytes": resident_bytes,
            "streamed_bytes_per_pass": streamed,
            "bandwidth_bytes_per_s": bandwidth,
            "seconds_per_pass": pass_seconds,
            "steps": steps,
            "seconds_total": pass_seconds * steps as f64,
        });
        println!("{out:#}");
        return Ok(());
    }
    println!(
        "{} layers, {} on the device in the preparing dtype",
        sized.len(),
        human_bytes(total)
    );
    println!(
        "budget {}, {prefetch} layers fetched ahead: passes replayed through the context's residency rule",
        human_bytes(vram_limit),
    );
    if sim.overcommitted() {
        println!("note: a layer is larger than the budget: it overcommits alone (STRATA_FLAG_STRICT_BUDGET refuses it)");
    }
    println!(
        "resident between passes: {} layers, {}",
        resident.len(),
        human_bytes(resident_bytes)
    );
    println!(
        "streamed per steady pass: {} (what a context moves when each fill ends within a use)",
        human_bytes(streamed)
    );
    println!(
        "at {:.1} GB/s: {:.3} s per pass, {:.2} s for {steps} passes (transfer only; compute overlaps it)",
        bandwidth as f64 / 1e9,
        pass_seconds,
        pass_seconds * steps as f64
    );
    Ok(())
}
