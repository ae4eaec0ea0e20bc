//! `strata bench`: streams a checkpoint (or a generated one) under a budget with a synthetic
//! compute time per layer, and measures what the copy engine achieves against the limits measured
//! in the same run: pass time against max(Σcompute, Σtransfer), bytes per pass against the lower
//! bound Σ − (B − W), and the time the compute waited for bytes.

use crate::demo::{streaming_context, write_model};
use crate::inspect::{layers_of, parse_dtype};
use crate::{human_bytes, output_dir, parse_bytes, Args, Progress};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use strata::checkpoint::Checkpoint;
use strata::checkpoint::ReadMode;
use strata::context::Context;
use strata::dtype::DType;
use strata::error::{Error, Result};
use strata::StreamHandle;

const BENCH_USAGE: &str = "strata bench: stream a checkpoint under a budget and measure the overlap

Usage: strata bench [CHECKPOINT] [options]

Streams every layer of CHECKPOINT (a .safetensors file, a *.safetensors.index.json or a directory
of shards) from disk to the compute device (the CPU), pass after pass, with a synthetic compute
time per layer. Without CHECKPOINT a model of --layers square bf16 layers is generated first.
It measures, in the same run:
  transfer   a pass with nothing overlapped (no prefetch, nothing resident): the time to move and
             convert each layer, Σtransfer. The caller keeps the last N layers acquired, so the
             bytes land in N + 1 buffers in turn, as they must when the engine fills N ahead (one
             buffer reused every time stays in the CPU cache and copies faster than a pipeline can)
  depth 0    the budget with no prefetch: every miss waits for its bytes
  depth N    the budget with the copy engine N layers ahead
and prints pass time against max(Σcompute, Σtransfer) (1.00 = full overlap), bytes moved per pass
against the lower bound Σ − (B − W), and stall time. The timeline of the depth-N run is written as
JSON (Perfetto) and SVG.

Options:
  --vram-limit SIZE    device budget: bytes (512MiB) or a percentage of the model (25%); default 0
                       (nothing resident between uses, everything streams)
  --host-limit SIZE    host memory for staging and host copies (default unlimited)
  --prefetch N         layers fetched ahead (default 2)
  --passes N           passes per run, the first two warm-ups (default 6): the first pass teaches
                       the order, the second allocates the buffers the copy engine fills ahead
  --compute-ms X       synthetic compute per layer in ms (default: the measured transfer time per
                       layer, so compute and transfer are equal)
  --preparing DTYPE    resident dtype: source, bf16, f16, f32, fp8, e5m2 (default source)
  --computation DTYPE  dtype handed to the kernels (default source)
  --prefix P, --keep N layer grouping, as for inspect (default: every tensor, N = 0)
  --layers N, --width N  the generated model (default 48 layers of 2048 x 2048 bf16, 8 MiB each:
                       at 2 MiB a layer, thread wake-ups of tens of µs are a tenth of its copy)
  --mixed              generate layers of several sizes instead: width/4, width/2, width and
                       3 x width/2 rows in turn (2, 4, 8 and 12 MiB at the default width), as
                       a real model's layers differ
  --direct-io          read the checkpoint with O_DIRECT (STRATA_FLAG_DIRECT_IO)
  --out DIR            where the timeline (and a generated model) go (default: a temporary folder)
  --json               machine-readable output";

/// Passes before the timed ones: a new buffer costs a page fault per page on its first fill (7 ms
/// for 8 MiB here), a one-off that the second pass pays for the copy engine's buffers.
const WARM_UP_PASSES: usize = 2;

struct BenchConfig {
    checkpoint: Option<PathBuf>,
    vram_limit: String,
    host_limit: u64,
    depth: u32,
    passes: usize,
    compute: Option<Duration>,
    preparing: Option<DType>,
    computation: Option<DType>,
    prefix: String,
    keep: u32,
    layers: usize,
    width: usize,
    mixed: bool,
    read_mode: ReadMode,
    out: Option<PathBuf>,
    json: bool,
}

fn parse_bench(args: &[String]) -> Result<Option<BenchConfig>> {
    let valued = [
        "--vram-limit",
        "--host-limit",
        "--prefetch",
        "--passes",
        "--compute-ms",
        "--preparing",
        "--computation",
        "--prefix",
        "--keep",
        "--layers",
        "--width",
        "--out",
    ];
    let Some(args) = Args::parse(
        args,
        &valued,
        &["--json", "--mixed", "--direct-io"],
        BENCH_USAGE,
    )?
    else {
        return Ok(None);
    };
    if args.positional.len() > 1 {
        return Err(Error::invalid(format!(
            "expected at most one CHECKPOINT\n\n{BENCH_USAGE}"
        )));
    }
    let compute = match args.get("--compute-ms") {
        None => None,
        Some(text) => Some(
            text.parse::<f64>()
                .ok()
                .filter(|ms| ms.is_finite() && *ms >= 0.0)
                .map(|ms| Duration::from_secs_f64(ms / 1e3))
                .ok_or_else(|| {
                    Error::invalid(format!("--compute-ms takes milliseconds, not {text:?}"))
                })?,
        ),
    };
    let passes = args.number("--passes", 6)? as usize;
    if passes <= WARM_UP_PASSES {
        return Err(Error::invalid(format!(
            "--passes needs at least {}: the first {WARM_UP_PASSES} passes are warm-ups",
            WARM_UP_PASSES + 1
        )));
    }
    Ok(Some(BenchConfig {
        checkpoint: args.positional.first().map(PathBuf::from),
        vram_limit: args.get("--vram-limit").unwrap_or("0").to_owned(),
        host_limit: match args.get("--host-limit") {
            Some(size) => parse_bytes(size)?,
            None => u64::MAX,
        },
        depth: args.count("--prefetch", 2)? as u32,
        passes,
        compute,
        preparing: parse_dtype(args.get("--preparing").unwrap_or("source"))?,
        computation: parse_dtype(args.get("--computation").unwrap_or("source"))?,
        prefix: args.get("--prefix").unwrap_or("").to_owned(),
        keep: args.count("--keep", 0)? as u32,
        layers: args.number("--layers", 48)? as usize,
        width: args.number("--width", 2048)? as usize,
        mixed: args.has("--mixed"),
        read_mode: crate::demo::read_mode(&args),
        out: args.get("--out").map(PathBuf::from),
        json: args.has("--json"),
    }))
}

/// One run of passes over the model under one setting.
struct Run {
    ctx: Arc<Context>,
    /// Wall time of each pass after the warm-ups.
    pass_seconds: Vec<f64>,
    /// Time spent computing per pass after the warm-ups (the synthetic work as it really took).
    compute_seconds: f64,
    bytes_per_pass: u64,
    /// Checkpoint bytes read per timed pass.
    disk_bytes_per_pass: u64,
    stall_seconds_per_pass: f64,
    prefetch_hits: u64,
    /// Device buffers allocated (not reused) in the timed passes.
    allocations: u64,
    peak: u64,
    host_peak: u64,
    /// The most device memory one acquire added, in the first pass: the largest layer's footprint
    /// where nothing is fetched ahead.
    largest_acquire: u64,
    /// Minor page faults and system CPU seconds of the whole process per timed pass.
    faults_per_pass: f64,
    system_seconds_per_pass: f64,
}

impl Run {
    fn pass_time(&self) -> f64 {
        self.pass_seconds.iter().sum::<f64>() / self.pass_seconds.len() as f64
    }
}

/// Waits `compute` the way a caller waits for a kernel on an accelerator: asleep, leaving the CPU
/// to the copy engine, then spinning through the last stretch, which a wake-up could overshoot.
fn synthetic_compute(compute: Duration) {
    const SPIN: Duration = Duration::from_micros(150);
    let until = Instant::now() + compute;
    if let Some(sleep) = compute.checked_sub(SPIN) {
        std::thread::sleep(sleep);
    }
    while Instant::now() < until {
        std::hint::spin_loop();
    }
}

/// What one run varies: the budget, the prefetch depth, the synthetic compute per layer, and how
/// many layers the caller keeps acquired after the current one.
struct Setting {
    vram_limit: u64,
    depth: u32,
    compute: Duration,
    held: usize,
}

fn run(
    checkpoint: &Checkpoint,
    config: &BenchConfig,
    layer_names: &[(String, Vec<&str>)],
    setting: Setting,
    progress: &mut Progress,
    phase: &str,
) -> Result<Run> {
    let compute = setting.compute;
    let (ctx, group) = streaming_context(
        setting.vram_limit,
        config.host_limit,
        setting.depth,
        config.preparing,
        config.computation,
        config.read_mode,
    )?;
    let ids = layer_names
        .iter()
        .map(|(name, tensors)| ctx.register_checkpoint(group, checkpoint, name, tensors))
        .collect::<Result<Vec<_>>>()?;
    ctx.onload_group(group)?;
    let mut pass_seconds = Vec::new();
    let mut compute_seconds = 0.0;
    let mut warm = ctx.stats();
    let mut warm_usage = Usage::now();
    let mut held = std::collections::VecDeque::new();
    let mut largest_acquire = 0;
    for pass in 0..config.passes {
        let started = Instant::now();
        let mut computing = Duration::ZERO;
        for &id in &ids {
            let before = (pass == 0).then(|| ctx.stats().vram_in_use);
            ctx.acquire(id, StreamHandle::default(), usize::MAX, |_, _| {})?;
            if let Some(before) = before {
                largest_acquire = largest_acquire.max(ctx.stats().vram_in_use - before);
            }
            let t = Instant::now();
            synthetic_compute(compute);
            computing += t.elapsed();
            held.push_back(id);
            if held.len() > setting.held {
                ctx.release(
                    held.pop_front().expect("just pushed"),
                    StreamHandle::default(),
                )?;
            }
        }
        if pass < WARM_UP_PASSES {
            warm = ctx.stats();
            warm_usage = Usage::now();
        } else {
            pass_seconds.push(started.elapsed().as_secs_f64());
            compute_seconds += computing.as_secs_f64();
        }
        progress.update(phase, pass as u64 + 1, config.passes as u64);
    }
    for id in held {
        ctx.release(id, StreamHandle::default())?;
    }
    let stats = ctx.stats();
    let usage = Usage::now();
    let steady = (config.passes - WARM_UP_PASSES) as u64;
    Ok(Run {
        pass_seconds,
        compute_seconds: compute_seconds / steady as f64,
        bytes_per_pass: (stats.bytes_to_device - warm.bytes_to_device) / steady,
        disk_bytes_per_pass: (stats.bytes_from_disk - warm.bytes_from_disk) / steady,
        stall_seconds_per_pass: (stats.stall_ns - warm.stall_ns) as f64 / 1e9 / steady as f64,
        prefetch_hits: stats.prefetch_hits,
        allocations: stats.device_allocations - warm.device_allocations,
        peak: stats.vram_peak,
        host_peak: stats.host_peak,
        largest_acquire,
        faults_per_pass: (usage.minor_faults - warm_usage.minor_faults) as f64 / steady as f64,
        system_seconds_per_pass: (usage.system_seconds - warm_usage.system_seconds) / steady as f64,
        ctx,
    })
}

pub fn bench(args: &[String]) -> Result<()> {
    let Some(config) = parse_bench(args)? else {
        return Ok(());
    };
    let out = output_dir(config.out.as_deref(), "bench")?;
    let mut progress = Progress::new(config.json);
    let path = match &config.checkpoint {
        Some(path) => path.clone(),
        None => {
            let path = out.join("model.safetensors");
            progress.update("writing a generated model", 0, 1);
            let width = config.width;
            let rows = |i: usize| match config.mixed {
                true => [width / 4, width / 2, width, width * 3 / 2][i % 4].max(1),
                false => width,
            };
            write_model(&path, config.layers, width, &rows)?;
            progress.update("writing a generated model", 1, 1);
            path
        }
    };
    let result = measure(&config, &path, &out, &mut progress);
    progress.finish();
    if config.checkpoint.is_none() && config.out.is_none() {
        // The generated model goes; the timeline stays for the reader.
        let _ = std::fs::remove_file(&path);
    }
    result
}

fn measure(config: &BenchConfig, path: &Path, out: &Path, progress: &mut Progress) -> Result<()> {
    let checkpoint = crate::open_checkpoint(path, config.json)?;
    let layers = layers_of(&checkpoint, &config.prefix, config.keep);
    if layers.is_empty() {
        return Err(Error::not_found(format!(
            "no tensor name starts with {:?}",
            config.prefix
        )));
    }
    let layer_names: Vec<(String, Vec<&str>)> = layers
        .iter()
        .map(|(name, tensors)| {
            (
                name.clone(),
                tensors.iter().map(|t| t.name.as_str()).collect(),
            )
        })
        .collect();

    // The host's limit for reading this file, measured just before the pass that reads it.
    progress.update("measuring a plain parallel pread", 0, 1);
    let plain_rounds = || {
        (0..PLAIN_ROUNDS)
            .map(|_| plain_parallel_read(path, config.read_mode))
            .try_fold(0.0f64, |best, rate| rate.map(|rate| best.max(rate)))
    };
    let plain_before = plain_rounds()?;
    progress.update("measuring a plain parallel pread", 1, 1);
    // Σtransfer: every layer moved in turn, nothing resident, nothing overlapped, into as many
    // buffers in turn as the prefetching run fills.
    let transfer = run(
        &checkpoint,
        config,
        &layer_names,
        Setting {
            vram_limit: 0,
            depth: 0,
            compute: Duration::ZERO,
            held: config.depth as usize,
        },
        progress,
        "measuring transfer",
    )?;
    // Rounds on both sides of the transfer run, so that a quieter moment favours neither.
    let plain_read = plain_before.max(plain_rounds()?);
    let transfer_seconds = transfer.pass_time();
    let read_rate = transfer.disk_bytes_per_pass as f64 / transfer_seconds;
    let model_bytes = transfer.bytes_per_pass;
    // With nothing resident and nothing ahead, an acquire adds exactly its own layer.
    let largest_layer = transfer.largest_acquire;
    let n = layer_names.len();
    let compute = config
        .compute
        .unwrap_or_else(|| Duration::from_secs_f64(transfer_seconds / n as f64));
    let vram_limit = match config.vram_limit.strip_suffix('%') {
        Some(percent) => {
            let p: f64 = percent.trim().parse().map_err(|_| {
                Error::invalid(format!(
                    "--vram-limit {:?} is not a percentage",
                    config.vram_limit
                ))
            })?;
            (model_bytes as f64 * p / 100.0) as u64
        }
        None => parse_bytes(&config.vram_limit)?,
    };
    let seconds_per_byte = transfer_seconds / model_bytes.max(1) as f64;

    let mut rows = Vec::new();
    let mut timeline = None;
    for depth in [0, config.depth] {
        let phase = format!("prefetch depth {depth}");
        let r = run(
            &checkpoint,
            config,
            &layer_names,
            Setting {
                vram_limit,
                depth,
                compute,
                held: 0,
            },
            progress,
            &phase,
        )?;
        // W: the layer in use and the prefetch slots, each as large as the largest layer.
        let window = (depth as u64 + 1) * largest_layer;
        let bound = match vram_limit {
            0 => model_bytes,
            limit => model_bytes.saturating_sub(limit.saturating_sub(window.min(limit))),
        };
        let transfer_limit = r.bytes_per_pass as f64 * seconds_per_byte;
        let limit = r.compute_seconds.max(transfer_limit);
        rows.push(json!({
            "prefetch_depth": depth,
            "pass_seconds": r.pass_time(),
            "compute_seconds": r.compute_seconds,
            "transfer_seconds": transfer_limit,
            "overlap": limit / r.pass_time(),
            "bytes_per_pass": r.bytes_per_pass,
            "bytes_lower_bound": bound,
            "bytes_ratio": r.bytes_per_pass as f64 / bound.max(1) as f64,
            "stall_seconds_per_pass": r.stall_seconds_per_pass,
            "prefetch_hits": r.prefetch_hits,
            "device_allocations": r.allocations,
            "minor_faults_per_pass": r.faults_per_pass,
            "system_seconds_per_pass": r.system_seconds_per_pass,
            "vram_peak": r.peak,
            "host_peak": r.host_peak,
        }));
        if depth == config.depth {
            timeline = Some(r.ctx);
        }
    }
    let ctx = timeline.expect("the depth run is the last");
    let json_path = out.join("timeline.json");
    std::fs::write(&json_path, ctx.trace_json())
        .map_err(|e| Error::from_io(&e, "writing", &json_path))?;
    let svg_path = out.join("timeline.svg");
    std::fs::write(&svg_path, ctx.trace_svg())
        .map_err(|e| Error::from_io(&e, "writing", &svg_path))?;
    progress.finish();

    let peak_rss = peak_rss_bytes();
    if config.json {
        let report = json!({
            "peak_rss": peak_rss,
            "host_limit": config.host_limit,
            "checkpoint": path.display().to_string(),
            "layers": n,
            "model_bytes": model_bytes,
            "vram_limit": vram_limit,
            "transfer_seconds_per_pass": transfer_seconds,
            "transfer_bytes_per_second": model_bytes as f64 / transfer_seconds,
            "read_convert_bytes_per_second": read_rate,
            "plain_parallel_pread_bytes_per_second": plain_read,
            "read_mode": format!("{:?}", config.read_mode),
            "compute_seconds_per_layer": compute.as_secs_f64(),
            "runs": rows,
            "timeline": [json_path.display().to_string(), svg_path.display().to_string()],
        });
        println!("{report:#}");
        return Ok(());
    }
    println!(
        "model: {n} layers, {} per pass on the device, from {}",
        human_bytes(model_bytes),
        path.display()
    );
    println!(
        "transfer: {:.1} ms per pass with nothing overlapped ({:.2} GB/s); compute {:.2} ms per layer",
        transfer_seconds * 1e3,
        model_bytes as f64 / transfer_seconds / 1e9,
        compute.as_secs_f64() * 1e3
    );
    println!(
        "read+convert: {:.2} GB/s of checkpoint bytes in that pass, against a plain parallel pread \
         of the same file {:.2} GB/s ({:?} reads): {:.2}x",
        read_rate / 1e9,
        plain_read / 1e9,
        config.read_mode,
        read_rate / plain_read
    );
    println!("budget: vram_limit {}\n", human_bytes(vram_limit));
    println!(
        "{:<10}{:>11}{:>20}{:>10}{:>14}{:>14}{:>9}{:>11}",
        "prefetch",
        "pass",
        "max(comp, xfer)",
        "overlap",
        "moved/pass",
        "lower bound",
        "ratio",
        "stall"
    );
    for row in &rows {
        let f = |k: &str| row[k].as_f64().unwrap_or(0.0);
        println!(
            "{:<10}{:>9.1}ms{:>18.1}ms{:>10.3}{:>14}{:>14}{:>9.3}{:>9.1}ms",
            row["prefetch_depth"],
            f("pass_seconds") * 1e3,
            f("compute_seconds").max(f("transfer_seconds")) * 1e3,
            f("overlap"),
            human_bytes(row["bytes_per_pass"].as_u64().unwrap_or(0)),
            human_bytes(row["bytes_lower_bound"].as_u64().unwrap_or(0)),
            f("bytes_ratio"),
            f("stall_seconds_per_pass") * 1e3,
        );
    }
    println!(
        "\noverlap = max(Σcompute, Σtransfer) / pass time (1.00: the pass takes only the longer of the two)"
    );
    println!(
        "per steady pass (getrusage, whole process): transfer run {:.0} minor faults, {:.1} ms system",
        transfer.faults_per_pass,
        transfer.system_seconds_per_pass * 1e3
    );
    for row in &rows {
        println!(
            "  prefetch {}: {:.0} minor faults, {:.1} ms system, {} new device buffers",
            row["prefetch_depth"],
            row["minor_faults_per_pass"].as_f64().unwrap_or(0.0),
            row["system_seconds_per_pass"].as_f64().unwrap_or(0.0) * 1e3,
            row["device_allocations"]
        );
    }
    let host_peak = rows.iter().filter_map(|r| r["host_peak"].as_u64()).max();
    println!(
        "memory: peak RSS of this process {}; strata's host peak {} (host_limit {}), device peak {} (vram_limit {})",
        human_bytes(peak_rss),
        human_bytes(host_peak.unwrap_or(0)),
        match config.host_limit {
            u64::MAX => "unlimited".to_owned(),
            limit => human_bytes(limit),
        },
        human_bytes(rows.iter().filter_map(|r| r["vram_peak"].as_u64()).max().unwrap_or(0)),
        human_bytes(vram_limit)
    );
    println!("heap: {}", heap_report());
    println!(
        "timeline: {} (Perfetto) and {} (a browser)",
        json_path.display(),
        svg_path.display()
    );
    Ok(())
}

/// Threads and chunk size of the plain read: as many reads in flight as strata keeps.
const PLAIN_READERS: usize = 4;
const PLAIN_CHUNK: usize = 2 << 20;
/// The plain read's figure is the best of this many rounds before the transfer run and as many
/// after it: this kind of machine is noisy.
const PLAIN_ROUNDS: usize = 3;

/// The whole file read by `PLAIN_READERS` threads, chunk k by thread k mod `PLAIN_READERS`, each
/// into one reused aligned buffer (with O_DIRECT in `ReadMode::Direct`, where the file system
/// allows it): the rate, in bytes per second, that nothing but reading reaches here.
fn plain_parallel_read(path: &Path, mode: ReadMode) -> Result<f64> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let open = |flags: i32| {
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(flags)
            .open(path)
    };
    let file = match mode {
        ReadMode::Direct => open(libc::O_DIRECT).or_else(|_| open(0)),
        ReadMode::Buffered => open(0),
    }
    .map_err(|e| Error::from_io(&e, "opening", path))?;
    let len = file
        .metadata()
        .map_err(|e| Error::from_io(&e, "reading the metadata of", path))?
        .len();
    let chunks = len.div_ceil(PLAIN_CHUNK as u64);
    let started = Instant::now();
    std::thread::scope(|scope| {
        let readers: Vec<_> = (0..PLAIN_READERS as u64)
            .map(|first| {
                let file = &file;
                scope.spawn(move || -> Result<()> {
                    let mut buffer = strata::HostBuffer::new(PLAIN_CHUNK)?;
                    for chunk in (first..chunks).step_by(PLAIN_READERS) {
                        let offset = chunk * PLAIN_CHUNK as u64;
                        let mut done = 0;
                        // The last chunk ends at the end of the file, whole blocks or not.
                        while done < PLAIN_CHUNK && offset + (done as u64) < len {
                            match file
                                .read_at(&mut buffer.as_mut_slice()[done..], offset + done as u64)
                            {
                                Ok(0) => break,
                                Ok(n) => done += n,
                                Err(e) => return Err(Error::from_io(&e, "reading", path)),
                            }
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        readers
            .into_iter()
            .try_for_each(|r| r.join().expect("a reader panicked"))
    })?;
    Ok(len as f64 / started.elapsed().as_secs_f64())
}

/// What getrusage says of the whole process so far.
struct Usage {
    minor_faults: u64,
    system_seconds: f64,
}

impl Usage {
    fn now() -> Usage {
        let usage = rusage();
        Usage {
            minor_faults: usage.ru_minflt as u64,
            system_seconds: usage.ru_stime.tv_sec as f64 + usage.ru_stime.tv_usec as f64 / 1e6,
        }
    }
}

/// getrusage(RUSAGE_SELF); all zero if it fails.
fn rusage() -> libc::rusage {
    // SAFETY: rusage is plain data; all-zero is a valid value for getrusage to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a pointer to a live rusage; on failure it stays zeroed.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    usage
}

/// The process's peak resident memory so far (getrusage), in bytes.
fn peak_rss_bytes() -> u64 {
    rusage().ru_maxrss as u64 * 1024
}

/// What the process holds beside strata's counters, from /proc and glibc's malloc: memory the
/// allocator keeps free in its arenas is counted nowhere.
fn heap_report() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let anon = status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kib| kib * 1024);
    let mut report = format!("RssAnon {}", human_bytes(anon));
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 only reads malloc's statistics (glibc 2.33 and later).
        let info = unsafe { libc::mallinfo2() };
        report += &format!(
            "; malloc: {} in use, {} free but held in its arenas",
            human_bytes((info.uordblks + info.hblkhd) as u64),
            human_bytes(info.fordblks as u64),
        );
    }
    report
}
