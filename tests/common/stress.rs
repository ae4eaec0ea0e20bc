//! The stress workloads, shared by `tests/stress.rs` (seconds) and `benches/stress.rs` (a minute
//! and more): threads acquiring random layers under a tiny budget, and a long single-threaded soak
//! that watches the process's resident memory. Everything goes through the C ABI; every view is
//! compared byte for byte with bytes computed up front by the library's safe conversion API,
//! which knows nothing of budgets, eviction, prefetching or buffer layouts, so a bug in any of
//! those cannot agree with it.

use super::*;
use std::borrow::Cow;
use std::ptr;
use std::result::Result;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use strata::convert::{convert, Quant, TensorBytes};
use strata::dtype::DType;

/// A small xorshift generator: a failing run is reproduced from its seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// How a layer is stored and what acquire hands out for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// f32 host tensors stored as fp8 (e4m3, scaled per output channel), computed in bf16.
    Fp8Host,
    /// bf16 checkpoint tensors, the same fp8 group: quantized when first read.
    Fp8Checkpoint,
    /// f16 checkpoint tensors read from the file on every miss (disk offload), computed in f32.
    F16Disk,
    /// f32 host tensors with default tiers: handed out in place.
    PlainHost,
    /// f32 checkpoint tensors with default tiers: read once, then handed out in place.
    PlainCheckpoint,
}

impl Kind {
    fn prefix(self) -> &'static str {
        match self {
            Kind::Fp8Host => "fp8_host",
            Kind::Fp8Checkpoint => "fp8_ckpt",
            Kind::F16Disk => "f16_disk",
            Kind::PlainHost => "plain_host",
            Kind::PlainCheckpoint => "plain_ckpt",
        }
    }

    /// The dtype the tensors are stored in (host memory or file).
    fn stored(self) -> DType {
        match self {
            Kind::Fp8Host | Kind::PlainHost | Kind::PlainCheckpoint => DType::F32,
            Kind::Fp8Checkpoint => DType::BF16,
            Kind::F16Disk => DType::F16,
        }
    }

    fn in_checkpoint(self) -> bool {
        !matches!(self, Kind::Fp8Host | Kind::PlainHost)
    }
}

/// One tensor as acquire must hand it out.
pub struct Expected {
    pub name: String,
    pub dtype: u32,
    pub shape: Vec<i64>,
    pub bytes: Vec<u8>,
}

pub struct LayerRef {
    pub id: u64,
    pub name: String,
    pub tensors: Vec<Expected>,
}

/// Layers of each kind, each a [rows, cols] weight and a [rows] bias.
#[derive(Clone, Debug)]
pub struct ModelSpec {
    pub kinds: Vec<(Kind, usize)>,
    pub rows: usize,
    pub cols: usize,
}

impl ModelSpec {
    /// Every kind of layer, as the threaded run uses them.
    pub fn mixed() -> ModelSpec {
        ModelSpec {
            kinds: vec![
                (Kind::Fp8Host, 6),
                (Kind::Fp8Checkpoint, 6),
                (Kind::F16Disk, 6),
                (Kind::PlainHost, 3),
                (Kind::PlainCheckpoint, 3),
            ],
            rows: 64,
            cols: 48,
        }
    }

    /// 16 layers that all move and convert on the device: what the soak repeats.
    pub fn soak() -> ModelSpec {
        ModelSpec {
            kinds: vec![(Kind::Fp8Host, 8), (Kind::F16Disk, 8)],
            rows: 32,
            cols: 32,
        }
    }
}

/// Where a model's views live, and how the checks read their bytes.
#[derive(Clone, Copy, Debug)]
pub struct ViewDevice {
    /// The compute device the context is created with, and the views must name.
    pub abi: u32,
    /// The bytes of an acquired view, read so as to see everything enqueued before the acquire
    /// returned.
    pub read: fn(&strata_tensor_view) -> Cow<'_, [u8]>,
}

/// The CPU device: views are host memory, read in place.
pub const HOST: ViewDevice = ViewDevice {
    abi: STRATA_DEVICE_CPU,
    read: read_host,
};

fn read_host(view: &strata_tensor_view) -> Cow<'_, [u8]> {
    if view.nbytes == 0 {
        return Cow::Borrowed(&[]);
    }
    // SAFETY: the layer is acquired on the CPU device (checked before reading), so its views
    // point at `nbytes` readable bytes of host memory until it is released.
    Cow::Borrowed(unsafe {
        std::slice::from_raw_parts(view.data as *const u8, view.nbytes as usize)
    })
}

#[derive(Clone, Copy, Debug)]
pub struct Footprint {
    pub in_use: u64,
    pub resident: u64,
}

/// A context with a model registered in it, and the bytes each layer must show.
pub struct Model {
    pub ctx: Ctx,
    pub device: ViewDevice,
    pub groups: Vec<u64>,
    pub layers: Vec<LayerRef>,
    /// The checkpoint the disk-tier layers read on every miss: removed only after `ctx` is gone.
    _dir: TempDir,
}

/// Values with a wide spread (a few far outliers per row), so per-channel scales differ by row.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut v = weights(n, seed, 0.05);
    for (i, x) in v.iter_mut().enumerate() {
        if i % 37 == 0 {
            *x *= 40.0;
        }
    }
    v
}

fn encode(values: &[f32], dtype: DType) -> Vec<u8> {
    let f32s = f32_bytes(values);
    let mut out = vec![0u8; values.len() * dtype.size()];
    let src = TensorBytes {
        bytes: &f32s,
        dtype: DType::F32,
        scales: &[],
    };
    convert(src, 1, &mut out, dtype, Quant::None).unwrap();
    out
}

/// What acquire must hand out for a tensor of `kind` stored as `stored` with `rows` rows (1 for a
/// bias): the conversions each tier applies, made one after another on the host.
fn expected_bytes(kind: Kind, stored: &[u8], rows: usize, is_weight: bool) -> (u32, Vec<u8>) {
    let dtype = kind.stored();
    let src = TensorBytes {
        bytes: stored,
        dtype,
        scales: &[],
    };
    let numel = stored.len() / dtype.size();
    let to = |target: DType| {
        let mut out = vec![0u8; numel * target.size()];
        convert(src, rows, &mut out, target, Quant::None).unwrap();
        (target.to_abi(), out)
    };
    match kind {
        Kind::Fp8Host | Kind::Fp8Checkpoint if is_weight => {
            let mut fp8 = vec![0u8; numel];
            let scales = convert(src, rows, &mut fp8, DType::F8E4M3, Quant::PerChannel).unwrap();
            assert_eq!(scales.len(), rows);
            let quantized = TensorBytes {
                bytes: &fp8,
                dtype: DType::F8E4M3,
                scales: &scales,
            };
            let mut out = vec![0u8; numel * 2];
            convert(quantized, rows, &mut out, DType::BF16, Quant::None).unwrap();
            (STRATA_DTYPE_BF16, out)
        }
        // fp8 storage leaves 1-D tensors in their stored dtype until the computation tier.
        Kind::Fp8Host | Kind::Fp8Checkpoint => to(DType::BF16),
        Kind::F16Disk => to(DType::F32),
        Kind::PlainHost | Kind::PlainCheckpoint => (dtype.to_abi(), stored.to_vec()),
    }
}

fn safetensors_dtype(dtype: DType) -> safetensors::Dtype {
    match dtype {
        DType::F32 => safetensors::Dtype::F32,
        DType::F16 => safetensors::Dtype::F16,
        DType::BF16 => safetensors::Dtype::BF16,
        other => unreachable!("no layer is stored as {other:?}"),
    }
}

impl Model {
    /// Builds the model in a fresh context on `device` with these options: one group per kind of
    /// tiers, host layers registered from memory, the rest from one generated checkpoint.
    pub fn build(
        spec: &ModelSpec,
        device: ViewDevice,
        options: impl FnOnce(&mut strata_options),
    ) -> Model {
        let ctx = Ctx::with(|o| {
            o.compute_device = device.abi;
            options(o);
        });
        let dir = TempDir::new("stress");
        let checkpoint = dir.path("model.safetensors");
        let fp8 = ctx.group(&tiers(|t| {
            t.offload.dtype = STRATA_DTYPE_F8_E4M3FN;
            t.quantization = STRATA_QUANT_PER_CHANNEL;
            t.computation.dtype = STRATA_DTYPE_BF16;
        }));
        let f16 = ctx.group(&tiers(|t| {
            t.offload.device = STRATA_DEVICE_DISK;
            t.onload.device = STRATA_DEVICE_DISK;
            t.computation.dtype = STRATA_DTYPE_F32;
        }));
        let plain = ctx.group(&strata_tiers_default());
        let group_of = |kind| match kind {
            Kind::Fp8Host | Kind::Fp8Checkpoint => fp8,
            Kind::F16Disk => f16,
            Kind::PlainHost | Kind::PlainCheckpoint => plain,
        };
        let (rows, cols) = (spec.rows, spec.cols);

        // (kind, layer name, [(tensor name, shape, stored bytes)])
        let mut planned = Vec::new();
        let mut seed = 1;
        for &(kind, count) in &spec.kinds {
            for i in 0..count {
                let name = format!("{}.{i}", kind.prefix());
                let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = [vec![rows, cols], vec![rows]]
                    .into_iter()
                    .zip(["weight", "bias"])
                    .map(|(shape, part)| {
                        seed += 1;
                        let n = shape.iter().product();
                        let bytes = encode(&values(n, seed), kind.stored());
                        (format!("{name}.{part}"), shape, bytes)
                    })
                    .collect();
                planned.push((kind, name, tensors));
            }
        }
        let in_file: Vec<_> = planned
            .iter()
            .filter(|(kind, _, _)| kind.in_checkpoint())
            .flat_map(|(kind, _, tensors)| {
                tensors.iter().map(|(name, shape, bytes)| {
                    let dtype = safetensors_dtype(kind.stored());
                    (name.clone(), dtype, shape.clone(), bytes.clone())
                })
            })
            .collect();
        if !in_file.is_empty() {
            write_safetensors(&checkpoint, &in_file);
        }

        let layers = planned
            .into_iter()
            .map(|(kind, name, tensors)| {
                let group = group_of(kind);
                let id = if kind.in_checkpoint() {
                    let names: Vec<&str> = tensors.iter().map(|t| t.0.as_str()).collect();
                    ctx.register_tensors(group, &checkpoint, &name, &names)
                } else {
                    let host: Vec<_> = tensors
                        .iter()
                        .map(|(n, shape, bytes)| {
                            let shape = shape.iter().map(|&d| d as i64).collect();
                            (n.as_str(), kind.stored().to_abi(), shape, bytes.clone())
                        })
                        .collect();
                    ctx.register(group, &name, &host)
                };
                let tensors = tensors
                    .iter()
                    .map(|(tensor, shape, stored)| {
                        let is_weight = shape.len() == 2;
                        let rows = if is_weight { shape[0] } else { 1 };
                        let (dtype, bytes) = expected_bytes(kind, stored, rows, is_weight);
                        Expected {
                            name: tensor.clone(),
                            dtype,
                            shape: shape.iter().map(|&d| d as i64).collect(),
                            bytes,
                        }
                    })
                    .collect();
                LayerRef { id, name, tensors }
            })
            .collect();
        Model {
            ctx,
            device,
            groups: vec![fp8, f16, plain],
            layers,
            _dir: dir,
        }
    }

    /// Device bytes each layer occupies while in use and while resident between uses, found by
    /// using it alone in a context without a limit, where its bytes are checked too.
    pub fn footprints(spec: &ModelSpec, device: ViewDevice) -> Vec<Footprint> {
        let model = Model::build(spec, device, |o| {
            o.vram_limit = STRATA_UNLIMITED;
            o.prefetch_depth = 0;
        });
        model
            .layers
            .iter()
            .map(|layer| {
                let before = model.ctx.stats().vram_in_use;
                let views = model.acquire(layer).unwrap_or_else(|s| {
                    panic!(
                        "acquiring {} alone: {} {}",
                        layer.name,
                        name(s),
                        last_error()
                    )
                });
                if let Err(e) = verify(model.device, &views, layer) {
                    panic!("the reference run disagrees with the expected bytes: {e}");
                }
                let in_use = model.ctx.stats().vram_in_use - before;
                model.ctx.release(layer.id);
                Footprint {
                    in_use,
                    resident: model.ctx.stats().vram_in_use - before,
                }
            })
            .collect()
    }

    /// Acquires a layer; the views stay valid until it is released.
    pub fn acquire(&self, layer: &LayerRef) -> Result<Vec<strata_tensor_view>, strata_status> {
        let mut views = [empty_view(); 4];
        let mut count = 0;
        let status = strata_acquire_for_compute(
            self.ctx.0,
            layer.id,
            ptr::null_mut(),
            views.as_mut_ptr(),
            views.len(),
            &mut count,
        );
        if status == STRATA_OK {
            Ok(views[..count].to_vec())
        } else {
            Err(status)
        }
    }

    /// Destroys every group, and with them every layer.
    pub fn destroy_groups(&self) {
        for &group in &self.groups {
            ok(strata_group_destroy(self.ctx.0, group));
        }
    }
}

/// Checks that an acquired layer's views are exactly what `layer` expects: names, dtypes,
/// devices, shapes, sizes and every byte.
pub fn verify(
    device: ViewDevice,
    views: &[strata_tensor_view],
    layer: &LayerRef,
) -> Result<(), String> {
    if views.len() != layer.tensors.len() {
        return Err(format!(
            "{}: {} views, expected {}",
            layer.name,
            views.len(),
            layer.tensors.len()
        ));
    }
    for (view, expected) in views.iter().zip(&layer.tensors) {
        let what = format!("{} view {:?}", layer.name, expected.name);
        let shape = &view.shape[..(view.ndim as usize).min(view.shape.len())];
        if view_name(view) != expected.name
            || view.dtype != expected.dtype
            || view.device != device.abi
            || shape != expected.shape.as_slice()
            || view.nbytes != expected.bytes.len() as u64
        {
            return Err(format!(
                "{what}: got {:?} dtype {} device {} shape {shape:?} {} bytes, expected dtype {} device {} shape {:?} {} bytes",
                view_name(view),
                view.dtype,
                view.device,
                view.nbytes,
                expected.dtype,
                device.abi,
                expected.shape,
                expected.bytes.len()
            ));
        }
        let got = (device.read)(view);
        if let Some(i) = got.iter().zip(&expected.bytes).position(|(a, b)| a != b) {
            return Err(format!(
                "{what}: byte {i} is {:#04x}, expected {:#04x}",
                got[i], expected.bytes[i]
            ));
        }
    }
    Ok(())
}

#[derive(Clone, Debug)]
pub struct ThreadsConfig {
    pub device: ViewDevice,
    pub threads: usize,
    pub duration: Duration,
    /// The budget, in multiples of the largest layer's in-use footprint.
    pub layers_of_budget: f64,
    pub seed: u64,
}

#[derive(Debug)]
pub struct ThreadsReport {
    pub elapsed: Duration,
    pub threads: usize,
    pub layers: usize,
    /// Acquires whose views matched the expected bytes (checked after acquire and before release).
    pub verified: u64,
    /// Second acquires by a thread already holding a layer that the budget refused.
    pub refusals: u64,
    /// Second acquires tried at all.
    pub second_tries: u64,
    pub largest_footprint: u64,
    pub limit: u64,
    /// The most vram_in_use any check after an acquire saw.
    pub peak_seen: u64,
    pub stats: strata_stats,
}

/// Several threads acquire random layers of every kind under a budget of a few layers, for
/// `duration`. Each holds one layer at a time, sometimes two; only a thread already holding a
/// layer may be refused (STRATA_ERR_BUDGET), and the budget is never exceeded. Panics (in the
/// thread that saw it, re-raised here) on the first wrong byte, over-budget figure or unexpected
/// status.
pub fn run_threads(config: &ThreadsConfig) -> ThreadsReport {
    let spec = ModelSpec::mixed();
    let largest = Model::footprints(&spec, config.device)
        .iter()
        .map(|f| f.in_use)
        .max()
        .unwrap();
    let limit = (largest as f64 * config.layers_of_budget) as u64;
    assert!(limit >= largest, "the budget must hold the largest layer");
    let model = Arc::new(Model::build(&spec, config.device, |o| o.vram_limit = limit));
    let verified = Arc::new(AtomicU64::new(0));
    let refusals = Arc::new(AtomicU64::new(0));
    let second_tries = Arc::new(AtomicU64::new(0));
    let peak_seen = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + config.duration;

    let workers: Vec<_> = (0..config.threads as u64)
        .map(|t| {
            let model = model.clone();
            let (verified, refusals) = (verified.clone(), refusals.clone());
            let (second_tries, peak_seen) = (second_tries.clone(), peak_seen.clone());
            let seed = config.seed.wrapping_mul(0x9E37_79B9).wrapping_add(t * 7919 + 1);
            std::thread::Builder::new()
                .name(format!("stress-{t}"))
                .spawn(move || {
                    let mut rng = Rng(seed | 1);
                    let n = model.layers.len() as u64;
                    let check_budget = |what: &str| {
                        let stats = model.ctx.stats();
                        peak_seen.fetch_max(stats.vram_in_use, Ordering::Relaxed);
                        assert!(
                            stats.vram_in_use <= limit && stats.overcommit_peak == 0,
                            "{what}: vram_in_use {} (overcommit peak {}) with vram_limit {limit} and no layer larger than {largest}",
                            stats.vram_in_use,
                            stats.overcommit_peak
                        );
                    };
                    let mut held: Vec<(usize, Vec<strata_tensor_view>)> = Vec::new();
                    while Instant::now() < deadline {
                        let first = rng.below(n) as usize;
                        let layer = &model.layers[first];
                        // Holding nothing, a thread waits for room: a refusal here is a bug.
                        let views = model.acquire(layer).unwrap_or_else(|s| {
                            panic!(
                                "thread {t} holding nothing: acquiring {}: {} {}",
                                layer.name,
                                name(s),
                                last_error()
                            )
                        });
                        verify(model.device, &views, layer).unwrap_or_else(|e| panic!("thread {t}: {e}"));
                        check_budget(&layer.name);
                        held.push((first, views));
                        if rng.below(4) == 0 {
                            second_tries.fetch_add(1, Ordering::Relaxed);
                            let second = rng.below(n) as usize;
                            let layer = &model.layers[second];
                            match model.acquire(layer) {
                                Ok(views) => {
                                    verify(model.device, &views, layer)
                                        .unwrap_or_else(|e| panic!("thread {t}: {e}"));
                                    check_budget(&layer.name);
                                    held.push((second, views));
                                }
                                Err(STRATA_ERR_BUDGET) => {
                                    refusals.fetch_add(1, Ordering::Relaxed);
                                }
                                Err(s) => panic!(
                                    "thread {t}: acquiring {} while holding a layer: {} {}",
                                    layer.name,
                                    name(s),
                                    last_error()
                                ),
                            }
                        }
                        if rng.below(2) == 0 {
                            // Some compute time, so other threads' acquires and the copy engine
                            // run while these views are handed out.
                            std::thread::yield_now();
                        }
                        while !held.is_empty() {
                            let (i, views) = held.swap_remove(rng.below(held.len() as u64) as usize);
                            // Still the same bytes: nothing freed or refilled a layer in use.
                            verify(model.device, &views, &model.layers[i])
                                .unwrap_or_else(|e| panic!("thread {t} before release: {e}"));
                            verified.fetch_add(1, Ordering::Relaxed);
                            model.ctx.release(model.layers[i].id);
                        }
                    }
                })
                .expect("spawning a stress thread")
        })
        .collect();
    let mut panics = Vec::new();
    for worker in workers {
        if let Err(panic) = worker.join() {
            panics.push(panic);
        }
    }
    if let Some(panic) = panics.pop() {
        std::panic::resume_unwind(panic);
    }
    let elapsed = started.elapsed();
    let stats = model.ctx.stats();
    assert!(
        stats.vram_peak <= limit,
        "vram_peak {} > vram_limit {limit}",
        stats.vram_peak
    );
    assert_eq!(stats.overcommit_peak, 0);
    model.destroy_groups();
    let after = model.ctx.stats();
    assert_eq!(
        (after.vram_in_use, after.host_in_use),
        (0, 0),
        "bytes still held after every group was destroyed"
    );
    ThreadsReport {
        elapsed,
        threads: config.threads,
        layers: model.layers.len(),
        verified: verified.load(Ordering::Relaxed),
        refusals: refusals.load(Ordering::Relaxed),
        second_tries: second_tries.load(Ordering::Relaxed),
        largest_footprint: largest,
        limit,
        peak_seen: peak_seen.load(Ordering::Relaxed),
        stats,
    }
}

impl ThreadsReport {
    pub fn print(&self) {
        let secs = self.elapsed.as_secs_f64();
        println!(
            "threads: {:.1} s, {} threads, {} layers; {} verified acquires ({:.0}/s), {} of {} second acquires refused (STRATA_ERR_BUDGET)",
            secs,
            self.threads,
            self.layers,
            self.verified,
            self.verified as f64 / secs,
            self.refusals,
            self.second_tries,
        );
        println!(
            "threads: vram peak {} bytes of vram_limit {} ({:.2} of it; largest layer {} bytes), {} misses, {} resident hits, {} prefetch hits, {} evictions",
            self.stats.vram_peak,
            self.limit,
            self.stats.vram_peak as f64 / self.limit as f64,
            self.largest_footprint,
            self.stats.misses,
            self.stats.resident_hits,
            self.stats.prefetch_hits,
            self.stats.evictions,
        );
    }
}

#[derive(Clone, Debug)]
pub struct SoakConfig {
    /// Passes measured after warm-up.
    pub passes: usize,
    /// Passes before the first measurement, besides those that fill the trace (see `soak`).
    pub warmup: usize,
}

#[derive(Debug)]
pub struct SoakReport {
    pub layers: usize,
    /// The pass of the early RSS figure (`SoakConfig::warmup`).
    pub early_pass: usize,
    /// Passes run before the measurement started, and after it.
    pub warmup_passes: usize,
    pub passes: usize,
    pub elapsed: Duration,
    /// RSS after `SoakConfig::warmup` passes, when the trace is still filling.
    pub rss_early: u64,
    /// RSS once the trace is full: where the measurement starts.
    pub rss_warm: u64,
    pub rss_end: u64,
    pub stats: strata_stats,
    /// vram_in_use and host_in_use once the groups are destroyed.
    pub held_after_destroy: (u64, u64),
}

impl SoakReport {
    /// RSS growth over the measured passes.
    pub fn growth(&self) -> i64 {
        self.rss_end as i64 - self.rss_warm as i64
    }

    pub fn print(&self) {
        let kib = |b: u64| b >> 10;
        println!(
            "soak: {} layers, {} passes of warm-up then {} measured, {:.1} s; RSS {} KiB at pass {}, {} KiB once the trace is full, {} KiB at the end: growth {} KiB over the measured passes",
            self.layers,
            self.warmup_passes,
            self.passes,
            self.elapsed.as_secs_f64(),
            kib(self.rss_early),
            self.early_pass,
            kib(self.rss_warm),
            kib(self.rss_end),
            self.growth() / 1024,
        );
        println!(
            "soak: the trace (at most {} spans, filled by pass {}) took {} KiB of that warm-up",
            strata::Trace::max_spans(),
            self.warmup_passes,
            (self.rss_warm as i64 - self.rss_early as i64) / 1024,
        );
        println!(
            "soak: {} acquires, {} misses, {} prefetch hits, {} resident hits, {} evictions; after destroying the groups {} device and {} host bytes held",
            self.stats.acquires,
            self.stats.misses,
            self.stats.prefetch_hits,
            self.stats.resident_hits,
            self.stats.evictions,
            self.held_after_destroy.0,
            self.held_after_destroy.1,
        );
    }
}

/// The process's resident set size in bytes (VmRSS).
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("reading /proc/self/status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("/proc/self/status has VmRSS");
    kib << 10
}

/// Passes after which the context's trace holds as many spans as it ever will: every release
/// that ends a layer's use records one span, so a pass over `layers` layers records at least that
/// many, and the trace keeps the last `Trace::max_spans()`. Until then it grows by design, by about 100
/// bytes a span.
fn ring_fill_passes(layers: usize) -> usize {
    strata::Trace::max_spans().div_ceil(layers)
}

/// One thread repeats passes over 16 layers with prefetching on, under a budget that keeps only
/// some of them resident, so passes evict, read, upload and convert. Every view is verified.
/// Measures RSS after `warmup` passes, once the trace is full (the measurement's start) and after
/// `passes` more, then destroys the groups.
pub fn soak(config: &SoakConfig) -> SoakReport {
    let spec = ModelSpec::soak();
    let footprints = Model::footprints(&spec, HOST);
    let largest = footprints.iter().map(|f| f.in_use).max().unwrap();
    let resident: u64 = footprints.iter().map(|f| f.resident).sum();
    // Two layers in use (the current one and the next, prefetched) and half the model resident.
    let limit = 2 * largest + resident / 2;
    let model = Model::build(&spec, HOST, |o| {
        o.vram_limit = limit;
        o.prefetch_depth = 2;
    });
    let warmup_passes = config.warmup + ring_fill_passes(model.layers.len());
    let started = Instant::now();
    let (mut rss_early, mut rss_warm) = (0, 0);
    for pass in 0..warmup_passes + config.passes {
        if pass == config.warmup {
            rss_early = rss_bytes();
        }
        if pass == warmup_passes {
            rss_warm = rss_bytes();
        }
        for layer in &model.layers {
            let views = model.acquire(layer).unwrap_or_else(|s| {
                panic!("pass {pass}: {}: {} {}", layer.name, name(s), last_error())
            });
            verify(model.device, &views, layer).unwrap_or_else(|e| panic!("pass {pass}: {e}"));
            model.ctx.release(layer.id);
        }
    }
    let rss_end = rss_bytes();
    let elapsed = started.elapsed();
    let stats = model.ctx.stats();
    model.destroy_groups();
    let after = model.ctx.stats();
    SoakReport {
        layers: model.layers.len(),
        early_pass: config.warmup,
        warmup_passes,
        passes: config.passes,
        elapsed,
        rss_early,
        rss_warm,
        rss_end,
        stats,
        held_after_destroy: (after.vram_in_use, after.host_in_use),
    }
}
