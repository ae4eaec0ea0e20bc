//! Drives the C ABI with arbitrary sequences of calls and checks, after every call, what the
//! contract (DESIGN.md section 3, include/strata.h) promises:
//!   - no crash and no STRATA_ERR_PANIC; every status is a documented one and a failure leaves a
//!     message; outputs are written only on success, and stats only up to `struct_size`;
//!   - the exact status where the contract names one (NULL, stale or made-up ids, a release
//!     without an acquire, destroying what is in use);
//!   - the budget: with no layer in use the device bytes stay within a hard cap; above it only one
//!     layer in use alone (never in strict mode), unless the cap was lowered while layers were in
//!     use; under budget 0 only the layers in use and the prefetch window;
//!   - every acquired view equals a conversion of the registered bytes through the group's tiers
//!     computed here, independently of the library (`Form::step`, plain IEEE rounding on f64);
//!   - the counters agree (acquires == hits + prefetch hits + misses == acquires that succeeded);
//!   - nothing is left behind: with every group destroyed no device or host byte is held, a fresh
//!     context counts zero, and the process allocates no more than before the input.
//!
//! The input is a list of operations: one byte picks the operation, the bytes after it its
//! arguments; reading past the end gives zeros. Shapes stay small (dimensions up to 6); ids are
//! created without bound, since none is ever reused, and made-up ones are often small numbers,
//! which name other contexts' objects or objects of the other kind. The copy-engine thread runs as
//! in production, so the checks hold at every moment.
//! Run it with scripts/fuzz.sh; the seeds (fuzz/seeds/abi_sequence) come from seeds.py. Replaying
//! a crash input with STRATA_FUZZ_TRACE=1 set prints every call on the way.

#![no_main]

use libfuzzer_sys::fuzz_target;
use std::alloc::{GlobalAlloc, Layout, System};
use std::ffi::{c_void, CStr, CString};
use std::ptr;
use std::sync::atomic::{AtomicIsize, Ordering};
use strata::ffi::consts::*;
use strata::ffi::acquire::*;
use strata::ffi::context::*;
use strata::ffi::error::*;
use strata::ffi::group::*;
use strata::ffi::layer::*;
use strata::ffi::stats::*;

/// Counts the bytes the process holds through Rust's allocator, so an input that leaves memory
/// behind after destroying its contexts (reachable or not) is caught.
struct Counting;

static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; only a counter is added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        System.dealloc(p, layout)
    }
    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        System.realloc(p, layout, new_size)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Bytes a context may leave allocated after it is destroyed: this thread's last error message
/// and its cached (weak) handle to the last context it used.
const ALLOWED_RESIDUE: isize = 16 << 10;
const MAX_CONTEXTS_PER_INPUT: usize = 8;
const MAX_DIM: u8 = 6;

// ----- reading the input -----

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.byte(), self.byte(), self.byte(), self.byte()])
    }
    fn u64(&mut self) -> u64 {
        (self.u32() as u64) | ((self.u32() as u64) << 32)
    }
    /// A number below `n` (n > 0).
    fn below(&mut self, n: usize) -> usize {
        self.byte() as usize % n
    }
    /// A byte budget: 0, unlimited, or sizes around those of the layers here.
    fn limit(&mut self) -> u64 {
        match self.byte() % 6 {
            0 => 0,
            1 => STRATA_UNLIMITED,
            2 => self.u16() as u64,
            3 => self.u16() as u64 * 8,
            4 => self.u32() as u64,
            _ => self.u64(),
        }
    }
}

// ----- the reference: dtypes, rounding, and the tier rules, written from the documentation -----

/// A float format: mantissa bits, the exponent of its smallest normal, its largest finite value,
/// and whether it saturates (fp8) rather than overflowing to infinity (IEEE).
#[derive(Clone, Copy)]
struct Format {
    man_bits: i32,
    min_exp: i32,
    max: f64,
    saturates: bool,
}

const F32: Format = Format {
    man_bits: 23,
    min_exp: -126,
    max: f32::MAX as f64,
    saturates: false,
};
const F16: Format = Format {
    man_bits: 10,
    min_exp: -14,
    max: 65504.0,
    saturates: false,
};
const BF16: Format = Format {
    man_bits: 7,
    min_exp: -126,
    max: 3.3895313892515355e38,
    saturates: false,
};
const E4M3: Format = Format {
    man_bits: 3,
    min_exp: -6,
    max: 448.0,
    saturates: true,
};
const E5M2: Format = Format {
    man_bits: 2,
    min_exp: -14,
    max: 57344.0,
    saturates: true,
};

fn pow2(e: i32) -> f64 {
    f64::from_bits(((e + 1023) as u64) << 52)
}

impl Format {
    /// `x` rounded to nearest, ties to even, straight from its exact value; NaN keeps its sign.
    fn round(self, x: f64) -> f64 {
        if x.is_nan() {
            return f64::NAN.copysign(x);
        }
        if x.is_infinite() {
            return if self.saturates {
                self.max.copysign(x)
            } else {
                x
            };
        }
        let a = x.abs();
        if a == 0.0 {
            return x;
        }
        let field = ((a.to_bits() >> 52) & 0x7FF) as i32;
        let exponent = if field == 0 { -1075 } else { field - 1023 };
        let quantum = pow2(exponent.max(self.min_exp) - self.man_bits);
        let rounded = (a / quantum).round_ties_even() * quantum;
        let rounded = match rounded > self.max {
            true if self.saturates => self.max,
            true => f64::INFINITY,
            false => rounded,
        };
        rounded.copysign(x)
    }
}

/// An fp8 code's value: e4m3fn has no infinities and NaN only at magnitude 0x7F; e5m2 is IEEE-like.
fn fp8_value(code: u8, e4m3: bool) -> f64 {
    let (man_bits, bias) = if e4m3 { (3, 7) } else { (2, 15) };
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let magnitude = code & 0x7F;
    let exponent = (magnitude >> man_bits) as i32;
    let mantissa = (magnitude & ((1 << man_bits) - 1)) as f64;
    if e4m3 && magnitude == 0x7F {
        return f64::NAN.copysign(sign);
    }
    if !e4m3 && exponent == 31 {
        return if mantissa == 0.0 {
            f64::INFINITY * sign
        } else {
            f64::NAN.copysign(sign)
        };
    }
    let value = if exponent == 0 {
        mantissa * pow2(1 - bias - man_bits)
    } else {
        (1.0 + mantissa / (1 << man_bits) as f64) * pow2(exponent - bias)
    };
    sign * value
}

/// The ABI dtype numbers (STRATA_DTYPE_F32 = 1 ... STRATA_DTYPE_BOOL = 12).
fn dtype_size(dtype: u32) -> usize {
    [0, 4, 2, 2, 1, 1, 8, 8, 4, 2, 1, 1, 1][dtype as usize]
}
fn is_float(dtype: u32) -> bool {
    (1..=6).contains(&dtype)
}
fn is_fp8(dtype: u32) -> bool {
    dtype == 4 || dtype == 5
}
fn format(dtype: u32) -> Option<Format> {
    [
        None,
        Some(F32),
        Some(F16),
        Some(BF16),
        Some(E4M3),
        Some(E5M2),
    ]
    .get(dtype as usize)
    .copied()
    .flatten()
}

fn decode(bytes: &[u8], dtype: u32) -> Vec<f64> {
    let size = dtype_size(dtype);
    bytes
        .chunks_exact(size)
        .map(|b| match dtype {
            1 => f32::from_le_bytes(b.try_into().unwrap()) as f64,
            2 => half::f16::from_le_bytes([b[0], b[1]]).to_f64(),
            3 => half::bf16::from_le_bytes([b[0], b[1]]).to_f64(),
            4 => fp8_value(b[0], true),
            5 => fp8_value(b[0], false),
            _ => f64::from_le_bytes(b.try_into().unwrap()),
        })
        .collect()
}

/// Equal values, bit for bit (so the sign of zero counts); any NaN equals a NaN of its sign.
fn same(expected: f64, actual: f64) -> bool {
    if expected.is_nan() {
        actual.is_nan() && actual.is_sign_negative() == expected.is_sign_negative()
    } else {
        expected.to_bits() == actual.to_bits()
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Quant {
    None,
    PerTensor,
    PerChannel,
}

/// How a tensor is held in one tier.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Repr {
    dtype: u32,
    quant: Quant,
}

/// A tensor in one tier: integer bytes as they are, or float values (the stored values, before
/// scaling) and the scales of scaled fp8.
#[derive(Clone)]
struct Form {
    repr: Repr,
    values: Vec<f64>,
    raw: Vec<u8>,
    scales: Vec<f32>,
}

impl Form {
    fn source(dtype: u32, bytes: &[u8]) -> Form {
        Form {
            repr: Repr {
                dtype,
                quant: Quant::None,
            },
            values: if is_float(dtype) {
                decode(bytes, dtype)
            } else {
                Vec::new()
            },
            raw: bytes.to_vec(),
            scales: Vec::new(),
        }
    }

    /// The same tensor in `to`, as the header documents conversions: integers only pass through;
    /// scaled fp8 is dequantized (value * scale in f32) before anything else; fp8 storage takes
    /// absmax scales per tensor or per row (scale = absmax / max in f32, 1 where that is 0, stored
    /// = fp8(x / scale) in f32); a tensor already in the requested form is copied.
    fn step(&self, to: Repr, rows: usize) -> Option<Form> {
        if !is_float(self.repr.dtype) || !is_float(to.dtype) {
            return (self.repr.dtype == to.dtype).then(|| self.clone());
        }
        let scaled = |q: Quant| q != Quant::None;
        let same_granularity = self.repr.quant == to.quant
            || (rows == 1 && scaled(self.repr.quant) && scaled(to.quant));
        if self.repr.dtype == to.dtype && same_granularity {
            return Some(Form {
                repr: to,
                ..self.clone()
            });
        }
        let n = self.values.len();
        let row_len = n.checked_div(rows).unwrap_or(0);
        let dequantized: Vec<f64> = match self.scales.len() {
            0 => self.values.clone(),
            1 => self
                .values
                .iter()
                .map(|&v| (v as f32 * self.scales[0]) as f64)
                .collect(),
            _ => (0..n)
                .map(|i| (self.values[i] as f32 * self.scales[i / row_len]) as f64)
                .collect(),
        };
        let mut out = Form {
            repr: to,
            values: Vec::new(),
            raw: Vec::new(),
            scales: Vec::new(),
        };
        let Some(fmt) = format(to.dtype) else {
            out.values = dequantized; // f64 holds every value exactly
            return Some(out);
        };
        let groups = match to.quant {
            Quant::None => {
                out.values = dequantized.iter().map(|&v| fmt.round(v)).collect();
                return Some(out);
            }
            Quant::PerTensor => 1,
            Quant::PerChannel => rows,
        };
        let group_len = n.checked_div(groups).unwrap_or(0);
        for g in 0..groups {
            let xs: Vec<f32> = dequantized[g * group_len..(g + 1) * group_len]
                .iter()
                .map(|&v| v as f32)
                .collect();
            let absmax = xs
                .iter()
                .filter(|x| x.is_finite())
                .fold(0.0f32, |m, x| m.max(x.abs()));
            let scale = absmax / fmt.max as f32;
            let scale = if scale > 0.0 { scale } else { 1.0 };
            out.values
                .extend(xs.iter().map(|&x| fmt.round((x / scale) as f64)));
            out.scales.push(scale);
        }
        Some(out)
    }

    /// Whether `bytes`, in this form's dtype, are exactly this tensor.
    fn matches(&self, bytes: &[u8]) -> bool {
        if !is_float(self.repr.dtype) {
            return bytes == self.raw.as_slice();
        }
        let actual = decode(bytes, self.repr.dtype);
        actual.len() == self.values.len()
            && self.values.iter().zip(&actual).all(|(&e, &a)| same(e, a))
    }
}

/// A group's four dtypes as the caller wrote them, its quantization, and whether a host tier is
/// the disk (host tensors have no file to live in, so such a group refuses them).
#[derive(Clone, Copy)]
struct Tiers {
    dtypes: [u32; 4],
    quant: Quant,
    on_disk: bool,
}

const OFFLOAD: usize = 0;
const ONLOAD: usize = 1;
const PREPARING: usize = 2;
const COMPUTATION: usize = 3;

impl Tiers {
    /// Whether a CPU context must accept these tiers: known devices, float dtypes or SOURCE,
    /// offload and onload on the disk or the CPU (not the disk after the CPU), preparing and
    /// computation on the CPU.
    fn valid(raw: &strata_tiers) -> Option<Tiers> {
        let placements = [raw.offload, raw.onload, raw.preparing, raw.computation];
        for (i, p) in placements.iter().enumerate() {
            let host_tier = i < 2;
            let device_ok = match p.device {
                0 | 2 => true,
                1 => host_tier,
                _ => false,
            };
            if !device_ok || (p.dtype != 0 && !is_float(p.dtype)) {
                return None;
            }
        }
        if raw.offload.device != 1 && raw.onload.device == 1 {
            return None;
        }
        let quant = match raw.quantization {
            0 => Quant::None,
            1 => Quant::PerTensor,
            2 => Quant::PerChannel,
            _ => return None,
        };
        Some(Tiers {
            dtypes: placements.map(|p| p.dtype),
            quant,
            on_disk: raw.offload.device == 1 || raw.onload.device == 1,
        })
    }

    /// How a tensor stored as `source` with `ndim` dimensions is held in `tier`: SOURCE keeps the
    /// tier before's form (stored for offload and computation); a float dtype applies to float
    /// tensors only; fp8 storage to tensors of 2+ dimensions, scaled as the group says, except in
    /// the computation tier, which is exactly the dtype asked for.
    fn repr(&self, tier: usize, source: u32, ndim: usize) -> Repr {
        let stored = Repr {
            dtype: source,
            quant: Quant::None,
        };
        let inherited = match tier {
            ONLOAD | PREPARING => self.repr(tier - 1, source, ndim),
            _ => stored,
        };
        let dtype = self.dtypes[tier];
        let computation = tier == COMPUTATION;
        if dtype == 0 {
            inherited
        } else if !is_float(source) || (is_fp8(dtype) && !computation && ndim < 2) {
            stored
        } else if is_fp8(dtype) && !computation {
            Repr {
                dtype,
                quant: self.quant,
            }
        } else {
            Repr {
                dtype,
                quant: Quant::None,
            }
        }
    }
}

fn align(n: usize) -> u64 {
    n.div_ceil(64) as u64 * 64
}

// ----- the model of what the library holds -----

struct TensorSpec {
    name: CString,
    dtype: u32,
    shape: Vec<i64>,
    data: Vec<u8>,
}

struct LayerModel {
    id: u64,
    name: String,
    group: u64,
    /// Per tensor: its name, shape and computation form; None when a tier conversion is impossible.
    expected: Option<Vec<(CString, Vec<i64>, Form)>>,
    /// The most device bytes the layer occupies in use: its preparing and computation copies.
    footprint: u64,
}

struct CtxModel {
    ptr: *mut strata_context,
    limit: u64,
    host_limit: u64,
    strict: bool,
    depth: u64,
    groups: Vec<(u64, Tiers)>,
    layers: Vec<LayerModel>,
    /// Layer ids acquired and not yet released (one entry per use).
    held: Vec<u64>,
    acquires: u64,
    /// The cap was lowered or set while layers were in use: they may stay above it until released.
    lowered_while_held: bool,
}

#[derive(Default)]
struct World {
    live: Vec<CtxModel>,
    stale_contexts: Vec<*mut strata_context>,
    stale_groups: Vec<u64>,
    stale_layers: Vec<u64>,
    contexts_made: usize,
}

const NAMES: [&str; 6] = ["a", "b", "c", "blocks.0", "blocks.1", "é"];

/// With STRATA_FUZZ_TRACE set, prints each call and its outcome: replaying a crash input with it
/// shows the sequence that led there.
fn trace(line: impl FnOnce() -> String) {
    static ON: once_cell::sync::Lazy<bool> =
        once_cell::sync::Lazy::new(|| std::env::var_os("STRATA_FUZZ_TRACE").is_some());
    if *ON {
        eprintln!("trace: {}", line());
    }
}

fn last_error() -> String {
    let len = strata_last_error(ptr::null_mut(), 0);
    let mut buf = vec![0u8; len + 1];
    strata_last_error(buf.as_mut_ptr().cast(), buf.len());
    String::from_utf8_lossy(&buf[..len]).into_owned()
}

/// Every status is a documented one other than PANIC; a failure names itself and leaves a message.
#[track_caller]
fn check_status(status: strata_status, call: &str) -> strata_status {
    trace(|| {
        let message = if status == STRATA_OK {
            String::new()
        } else {
            last_error()
        };
        format!("{call} -> {status} {message}")
    });
    assert!(
        status <= STRATA_ERR_BUFFER_TOO_SMALL,
        "{call}: status {status}: {}",
        last_error()
    );
    // SAFETY: strata_status_name returns a static NUL-terminated string.
    let name = unsafe { CStr::from_ptr(strata_status_name(status)) }
        .to_str()
        .unwrap();
    assert!(name.starts_with("STRATA_"), "{call}: {name}");
    if status != STRATA_OK {
        assert!(
            !last_error().is_empty(),
            "{call} failed with {name} and no message"
        );
    }
    status
}

#[track_caller]
fn expect(status: strata_status, expected: strata_status, call: &str) {
    check_status(status, call);
    assert_eq!(status, expected, "{call}: {}", last_error());
}

fn stats(ctx: *mut strata_context) -> strata_stats {
    let mut s = strata_stats {
        struct_size: std::mem::size_of::<strata_stats>() as u32,
        ..Default::default()
    };
    expect(strata_stats_get(ctx, &mut s), STRATA_OK, "strata_stats_get");
    s
}

/// Which context a call goes to.
enum Target {
    Live(usize),
    Gone(*mut strata_context),
}

impl Target {
    fn ptr(&self, world: &World) -> *mut strata_context {
        match *self {
            Target::Live(i) => world.live[i].ptr,
            Target::Gone(p) => p,
        }
    }
    /// The status any call on a context that is not live must give.
    fn dead_status(&self) -> Option<strata_status> {
        match *self {
            Target::Live(_) => None,
            Target::Gone(p) if p.is_null() => Some(STRATA_ERR_NULL_ARGUMENT),
            Target::Gone(_) => Some(STRATA_ERR_INVALID_HANDLE),
        }
    }
}

impl World {
    fn target(&self, input: &mut Input) -> Target {
        match input.byte() % 8 {
            n @ 0..=5 if !self.live.is_empty() => Target::Live(n as usize % self.live.len()),
            6 if !self.stale_contexts.is_empty() => {
                Target::Gone(self.stale_contexts[input.below(self.stale_contexts.len())])
            }
            7 => Target::Gone(usize::MAX as *mut strata_context),
            _ => Target::Gone(ptr::null_mut()),
        }
    }

    fn group_id(&self, input: &mut Input, t: &Target) -> u64 {
        match (input.byte() % 5, t) {
            (0 | 1, Target::Live(i)) if !self.live[*i].groups.is_empty() => {
                let groups = &self.live[*i].groups;
                groups[input.below(groups.len())].0
            }
            (2, _) if !self.stale_groups.is_empty() => {
                self.stale_groups[input.below(self.stale_groups.len())]
            }
            // Ids are small serials shared by every context and kind: a small number is often
            // another context's group, or a layer.
            (3, _) => input.u16() as u64,
            _ => input.u64(),
        }
    }

    fn layer_id(&self, input: &mut Input, t: &Target) -> u64 {
        match (input.byte() % 5, t) {
            (0 | 1, Target::Live(i)) if !self.live[*i].layers.is_empty() => {
                let layers = &self.live[*i].layers;
                layers[input.below(layers.len())].id
            }
            (2, _) if !self.stale_layers.is_empty() => {
                self.stale_layers[input.below(self.stale_layers.len())]
            }
            (3, _) => input.u16() as u64,
            _ => input.u64(),
        }
    }
}

// ----- the invariants checked after every call -----

fn check_context(c: &CtxModel) {
    let s = stats(c.ptr);
    trace(|| {
        format!(
            "stats: vram {} of limit {} (peak {}, overcommit peak {}), held {:?}, depth {}",
            s.vram_in_use, c.limit, s.vram_peak, s.overcommit_peak, c.held, c.depth
        )
    });
    assert_eq!(s.acquires, c.acquires, "acquires counted");
    assert_eq!(
        s.acquires,
        s.resident_hits + s.prefetch_hits + s.misses,
        "every acquire is a hit, a prefetch hit or a miss: {s:?}"
    );
    assert!(
        s.vram_peak >= s.vram_in_use && s.host_peak >= s.host_in_use,
        "{s:?}"
    );
    assert_eq!((s.vram_limit, s.host_limit), (c.limit, c.host_limit));
    if c.strict {
        assert_eq!(s.overcommit_peak, 0, "strict mode never overcommits");
    }
    let mut held: Vec<u64> = c.held.clone();
    held.sort_unstable();
    held.dedup();
    let footprint = |id: &u64| {
        c.layers
            .iter()
            .find(|l| l.id == *id)
            .map_or(0, |l| l.footprint)
    };
    match c.limit {
        STRATA_UNLIMITED => {}
        0 => {
            let widest = c.layers.iter().map(|l| l.footprint).max().unwrap_or(0);
            let allowed = held.iter().map(footprint).sum::<u64>() + c.depth * widest;
            assert!(
                s.vram_in_use <= allowed,
                "budget 0 holds {} bytes; layers in use and the prefetch window allow {allowed}",
                s.vram_in_use
            );
        }
        cap if s.vram_in_use > cap => {
            assert!(
                !held.is_empty(),
                "{} bytes held over the cap {cap} with no layer in use",
                s.vram_in_use
            );
            if !c.lowered_while_held {
                assert!(
                    !c.strict,
                    "strict mode over the cap: {} > {cap}",
                    s.vram_in_use
                );
                // One layer alone may pass the cap; others in use beside it (say, integer
                // tensors viewed in place) may not add device bytes to the excess.
                let largest = held.iter().map(footprint).max().unwrap_or(0);
                assert!(
                    s.vram_in_use <= largest,
                    "{} bytes over the cap {cap}, more than the largest layer in use ({largest})",
                    s.vram_in_use
                );
                assert!(s.overcommit_peak >= s.vram_in_use - cap, "{s:?}");
            }
        }
        _ => {}
    }
}

// ----- the operations -----

fn create_context(world: &mut World, input: &mut Input) {
    let mut options = strata_options_default();
    options.vram_limit = input.limit();
    options.host_limit = match input.byte() % 4 {
        0 => input.u16() as u64 * 16,
        _ => STRATA_UNLIMITED,
    };
    options.prefetch_depth = match input.byte() % 4 {
        0 => 0,
        1 => input.u32(),
        _ => input.byte() as u32 % 4,
    };
    let valid_flags = match input.byte() % 8 {
        0..=3 => {
            options.flags = 0;
            true
        }
        4..=5 => {
            options.flags = STRATA_FLAG_STRICT_BUDGET;
            true
        }
        6 => {
            // Direct reads change how bytes arrive, never which: the same model holds.
            options.flags =
                STRATA_FLAG_DIRECT_IO | (input.byte() as u32 & STRATA_FLAG_STRICT_BUDGET);
            true
        }
        _ => {
            options.flags = input.u32() | 4;
            false
        }
    };
    options.compute_device = [0, 2, 2, 2, 1, 3, 99][input.below(7)];
    let first_size = std::mem::offset_of!(strata_options, log_fn) as u32;
    options.struct_size = match input.byte() % 8 {
        0 => first_size,
        1 => first_size - 1,
        2 => 0,
        3 => 4096, // a newer caller: fields past ours are ignored, not read
        _ => options.struct_size,
    };
    let null = input.byte() % 16;
    let mut out = 0x5a5a_5a50usize as *mut strata_context;
    let status = check_status(
        strata_context_create(
            if null == 1 { ptr::null() } else { &options },
            if null == 2 { ptr::null_mut() } else { &mut out },
        ),
        "strata_context_create",
    );
    let valid = valid_flags
        && !(1..=2).contains(&null)
        && matches!(options.compute_device, 0 | 2)
        && options.struct_size >= first_size;
    if status != STRATA_OK {
        assert_eq!(out as usize, 0x5a5a_5a50, "output written on failure");
        assert!(!valid, "valid options refused: {}", last_error());
        return;
    }
    assert!(
        valid || options.compute_device == 3,
        "invalid options accepted: {options:?}"
    );
    if options.compute_device == 3 || world.contexts_made >= MAX_CONTEXTS_PER_INPUT {
        // A CUDA device exists here: its views are device memory, which this target cannot read.
        strata_context_destroy(out);
        world.stale_contexts.push(out);
        return;
    }
    world.contexts_made += 1;
    world.live.push(CtxModel {
        ptr: out,
        limit: options.vram_limit,
        host_limit: options.host_limit,
        strict: options.flags & STRATA_FLAG_STRICT_BUDGET != 0,
        depth: options.prefetch_depth.min(32) as u64,
        groups: Vec::new(),
        layers: Vec::new(),
        held: Vec::new(),
        acquires: 0,
        lowered_while_held: false,
    });
}

fn destroy_context(world: &mut World, t: Target) {
    let ptr = t.ptr(world);
    strata_context_destroy(ptr);
    if let Target::Live(i) = t {
        let c = world.live.swap_remove(i);
        world.stale_groups.extend(c.groups.iter().map(|g| g.0));
        world.stale_layers.extend(c.layers.iter().map(|l| l.id));
        world.stale_contexts.push(c.ptr);
    }
}

fn placement(input: &mut Input) -> strata_placement {
    strata_placement {
        device: [0, 0, 0, 1, 2, 3, 7][input.below(7)],
        dtype: match input.byte() % 16 {
            n @ 0..=12 => n as u32,
            13 => 0,
            _ => input.u32(),
        },
    }
}

fn create_group(world: &mut World, input: &mut Input, t: Target) {
    let mut tiers = strata_tiers_default();
    tiers.offload = placement(input);
    tiers.onload = placement(input);
    tiers.preparing = placement(input);
    tiers.computation = placement(input);
    tiers.quantization = [0, 1, 2, 2, 9][input.below(5)];
    let size_ok = match input.byte() % 8 {
        0 => {
            tiers.struct_size = 3;
            false
        }
        1 => {
            tiers.struct_size = 1 << 20;
            true
        }
        _ => true,
    };
    let null = input.byte() % 16;
    let name = CString::new(NAMES[input.below(NAMES.len())]).unwrap();
    let mut out = 0xA5A5_A5A5_A5A5_A5A5u64;
    let status = check_status(
        strata_group_create(
            t.ptr(world),
            if null == 1 {
                ptr::null()
            } else {
                name.as_ptr()
            },
            if null == 2 { ptr::null() } else { &tiers },
            if null == 3 { ptr::null_mut() } else { &mut out },
        ),
        "strata_group_create",
    );
    trace(|| format!("group tiers {tiers:?}"));
    if let Some(dead) = t.dead_status() {
        if null == 0 && size_ok {
            assert_eq!(status, dead, "{}", last_error());
        }
        assert_ne!(status, STRATA_OK);
        return;
    }
    let Target::Live(i) = t else { unreachable!() };
    let c = &mut world.live[i];
    let valid = Tiers::valid(&tiers).filter(|_| size_ok && (1..=3).all(|n| n != null));
    if status != STRATA_OK {
        assert_eq!(out, 0xA5A5_A5A5_A5A5_A5A5, "output written on failure");
        assert!(valid.is_none(), "valid tiers refused: {}", last_error());
        return;
    }
    let tiers = valid.expect("invalid tiers accepted");
    c.groups.push((out, tiers));
}

fn tensor_specs(input: &mut Input) -> Vec<TensorSpec> {
    let n = input.byte() % 4;
    (0..n)
        .map(|_| {
            let name = CString::new(NAMES[input.below(NAMES.len())]).unwrap();
            let dtype = match input.byte() % 16 {
                n @ 1..=12 => n as u32,
                13..=14 => [1, 3][input.below(2)],
                _ => 0, // SOURCE is not a tensor's dtype
            };
            let ndim = input.byte() % 4;
            let shape: Vec<i64> = (0..ndim)
                .map(|_| (input.byte() % (MAX_DIM + 1)) as i64)
                .collect();
            let numel: i64 = shape.iter().product();
            let len = numel as usize * dtype_size(dtype);
            let data = (0..len).map(|_| input.byte()).collect();
            TensorSpec {
                name,
                dtype,
                shape,
                data,
            }
        })
        .collect()
}

/// Whether registering these tensors must succeed on a valid group: at least one, unique names,
/// concrete dtypes, and the offload form reachable from each.
fn expected_forms(specs: &[TensorSpec], tiers: &Tiers) -> Option<Vec<(CString, Vec<i64>, Form)>> {
    specs
        .iter()
        .map(|t| {
            let rows = if t.shape.len() >= 2 {
                t.shape[0] as usize
            } else {
                1
            };
            let mut form = Form::source(t.dtype, &t.data);
            for tier in [OFFLOAD, ONLOAD, PREPARING, COMPUTATION] {
                form = form.step(tiers.repr(tier, t.dtype, t.shape.len()), rows)?;
            }
            Some((t.name.clone(), t.shape.clone(), form))
        })
        .collect()
}

fn footprint(specs: &[TensorSpec], tiers: &Tiers) -> u64 {
    specs
        .iter()
        .map(|t| {
            let numel = t.shape.iter().product::<i64>() as usize;
            let rows = if t.shape.len() >= 2 {
                t.shape[0] as usize
            } else {
                1
            };
            [PREPARING, COMPUTATION]
                .iter()
                .map(|&tier| {
                    let r = tiers.repr(tier, t.dtype, t.shape.len());
                    let scales = match r.quant {
                        Quant::None => 0,
                        Quant::PerTensor => 1,
                        Quant::PerChannel => rows,
                    };
                    align(numel * dtype_size(r.dtype)) + align(scales * 4)
                })
                .sum::<u64>()
        })
        .sum()
}

fn register(world: &mut World, input: &mut Input, t: Target) {
    let group = world.group_id(input, &t);
    let name = NAMES[input.below(NAMES.len())];
    let specs = tensor_specs(input);
    let null = input.byte() % 16;
    let raw: Vec<strata_host_tensor> = specs
        .iter()
        .map(|s| strata_host_tensor {
            name: s.name.as_ptr(),
            dtype: s.dtype,
            ndim: s.shape.len() as u32,
            shape: s.shape.as_ptr(),
            data: s.data.as_ptr().cast(),
        })
        .collect();
    let cname = CString::new(name).unwrap();
    let mut out = 0xA5A5u64;
    let status = check_status(
        strata_layer_register_host(
            t.ptr(world),
            group,
            if null == 1 {
                ptr::null()
            } else {
                cname.as_ptr()
            },
            if null == 2 && !raw.is_empty() {
                ptr::null()
            } else {
                raw.as_ptr()
            },
            raw.len(),
            if null == 3 { ptr::null_mut() } else { &mut out },
        ),
        "strata_layer_register_host",
    );
    trace(|| {
        let tensors: Vec<_> = specs.iter().map(|s| (&s.name, s.dtype, &s.shape)).collect();
        format!("register {name:?} into group {group:#x}: {tensors:?}")
    });
    let Target::Live(i) = t else {
        assert_ne!(status, STRATA_OK);
        return;
    };
    let c = &mut world.live[i];
    if status != STRATA_OK {
        assert_eq!(out, 0xA5A5, "output written on failure");
        let Some(&(_, tiers)) = c.groups.iter().find(|g| g.0 == group) else {
            return;
        };
        let mut names: Vec<&CString> = specs.iter().map(|s| &s.name).collect();
        names.sort();
        names.dedup();
        let must_work = null == 0
            && !specs.is_empty()
            && names.len() == specs.len()
            && specs.iter().all(|s| s.dtype != 0)
            && !tiers.on_disk
            && !c.layers.iter().any(|l| l.name == name)
            && c.host_limit == STRATA_UNLIMITED
            && specs.iter().all(|s| {
                let rows = if s.shape.len() >= 2 {
                    s.shape[0] as usize
                } else {
                    1
                };
                Form::source(s.dtype, &s.data)
                    .step(tiers.repr(OFFLOAD, s.dtype, s.shape.len()), rows)
                    .is_some()
            });
        assert!(!must_work, "registration refused: {}", last_error());
        return;
    }
    let &(_, tiers) = c
        .groups
        .iter()
        .find(|g| g.0 == group)
        .expect("registered into a group that does not exist");
    assert!(
        !c.layers.iter().any(|l| l.name == name),
        "duplicate layer name accepted"
    );
    c.layers.push(LayerModel {
        id: out,
        name: name.to_string(),
        group,
        expected: expected_forms(&specs, &tiers),
        footprint: footprint(&specs, &tiers),
    });
}

/// Acquires a layer with a views array of arbitrary capacity; on success checks every view.
fn acquire(world: &mut World, input: &mut Input, t: Target, layer: u64) -> bool {
    let capacity_choice = input.byte() % 8;
    let null = input.byte() % 16;
    let index = match t {
        Target::Live(i) => world.live[i].layers.iter().position(|l| l.id == layer),
        Target::Gone(_) => None,
    };
    let n_tensors = match (&t, index) {
        (Target::Live(i), Some(l)) => world.live[*i].layers[l].expected.as_ref().map(|e| e.len()),
        _ => None,
    };
    let capacity = match capacity_choice {
        0 => 0,
        1 => n_tensors.unwrap_or(1).saturating_sub(1),
        2 => 9,
        _ => n_tensors.unwrap_or(4),
    };
    let sentinel = strata_tensor_view {
        name: ptr::null(),
        data: 0x1357usize as *mut c_void,
        dtype: 99,
        device: 99,
        device_index: -7,
        ndim: 99,
        shape: [-1; 8],
        nbytes: 7,
    };
    let mut views = vec![sentinel; capacity.max(1)];
    let mut count = 0xA5A5usize;
    let status = check_status(
        strata_acquire_for_compute(
            t.ptr(world),
            layer,
            // The CPU device ignores the stream: any value is accepted.
            input.u64() as usize as *mut c_void,
            if null == 1 {
                ptr::null_mut()
            } else {
                views.as_mut_ptr()
            },
            capacity,
            if null == 2 {
                ptr::null_mut()
            } else {
                &mut count
            },
        ),
        "strata_acquire_for_compute",
    );
    trace(|| {
        let name = match (&t, index) {
            (Target::Live(i), Some(l)) => world.live[*i].layers[l].name.clone(),
            _ => "(no live layer)".into(),
        };
        format!("acquired layer {layer} {name:?}")
    });
    let (Target::Live(i), Some(l)) = (&t, index) else {
        if let Some(dead) = t.dead_status() {
            if null == 0 {
                assert_eq!(status, dead, "{}", last_error());
            }
        } else if null == 0 {
            assert_eq!(status, STRATA_ERR_INVALID_HANDLE, "{}", last_error());
        }
        assert_ne!(status, STRATA_OK);
        return false;
    };
    let c = &mut world.live[*i];
    let model = &c.layers[l];
    if status != STRATA_OK {
        assert_eq!(count, 0xA5A5, "count written on failure");
        assert!(
            views.iter().all(|v| v.dtype == 99),
            "views written on failure"
        );
        match status {
            STRATA_ERR_BUDGET => assert!(
                c.strict || !c.held.is_empty() || c.host_limit != STRATA_UNLIMITED,
                "a budget refusal with nothing in use outside strict mode: {}",
                last_error()
            ),
            STRATA_ERR_BUFFER_TOO_SMALL => {
                assert!(
                    capacity < n_tensors.unwrap_or(usize::MAX),
                    "{}",
                    last_error()
                )
            }
            STRATA_ERR_NULL_ARGUMENT => assert!(null != 0, "{}", last_error()),
            STRATA_ERR_INVALID_ARGUMENT => assert!(
                model.expected.is_none(),
                "a possible conversion refused: {}; expected {:?}",
                last_error(),
                model.expected.as_ref().map(|e| e
                    .iter()
                    .map(|(n, s, f)| (n.clone(), s.clone(), f.repr.dtype, f.values.len()))
                    .collect::<Vec<_>>())
            ),
            _ => panic!("acquire failed: {}", last_error()),
        }
        return false;
    }
    let expected = model.expected.as_ref().unwrap_or_else(|| {
        panic!(
            "layer {:?} acquired, but its tiers cannot convert",
            model.name
        )
    });
    assert_eq!(count, expected.len());
    for (view, (name, shape, form)) in views.iter().zip(expected) {
        // SAFETY: a successful acquire hands out names valid while the layer is registered and
        // `nbytes` readable bytes at `data` until the release (the CPU device: host memory).
        let (view_name, bytes) = unsafe {
            (
                CStr::from_ptr(view.name),
                std::slice::from_raw_parts(view.data as *const u8, view.nbytes as usize),
            )
        };
        assert_eq!(view_name, name.as_c_str());
        assert_eq!(view.dtype, form.repr.dtype, "{name:?}");
        assert_eq!((view.device, view.device_index), (2, 0));
        assert_eq!(&view.shape[..view.ndim as usize], shape.as_slice());
        let numel = shape.iter().product::<i64>() as usize;
        assert_eq!(view.nbytes as usize, numel * dtype_size(form.repr.dtype));
        assert!(
            form.matches(bytes),
            "{name:?} in layer {:?}: wrong bytes: dtype {}, expected {:?}, got {:?}",
            model.name,
            form.repr.dtype,
            form.values,
            decode(bytes, form.repr.dtype)
        );
    }
    c.held.push(layer);
    c.acquires += 1;
    true
}

fn release(world: &mut World, t: Target, layer: u64) {
    let status = check_status(
        strata_release(t.ptr(world), layer, ptr::null_mut()),
        "strata_release",
    );
    let Target::Live(i) = t else {
        assert_eq!(Some(status), t.dead_status());
        return;
    };
    let c = &mut world.live[i];
    match c.held.iter().position(|&h| h == layer) {
        Some(p) => {
            expect(status, STRATA_OK, "strata_release");
            c.held.swap_remove(p);
            if c.held.is_empty() {
                c.lowered_while_held = false;
            }
        }
        None if c.layers.iter().any(|l| l.id == layer) => {
            expect(status, STRATA_ERR_STATE, "strata_release")
        }
        None => expect(status, STRATA_ERR_INVALID_HANDLE, "strata_release"),
    }
}

/// Acquires and releases every layer in order, `passes` times: the pattern prefetch learns.
fn passes(world: &mut World, i: usize, passes: u8) {
    for _ in 0..passes {
        let ids: Vec<u64> = world.live[i].layers.iter().map(|l| l.id).collect();
        for id in ids {
            let mut exact = Input(&[3, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
            if acquire(world, &mut exact, Target::Live(i), id) {
                release(world, Target::Live(i), id);
            }
            check_context(&world.live[i]);
        }
    }
}

fn group_call(world: &mut World, input: &mut Input, t: Target, which: u8) {
    let group = world.group_id(input, &t);
    let ptr = t.ptr(world);
    let (status, call) = match which {
        0 => (strata_group_onload(ptr, group), "strata_group_onload"),
        1 => (strata_group_offload(ptr, group), "strata_group_offload"),
        _ => (strata_group_destroy(ptr, group), "strata_group_destroy"),
    };
    check_status(status, call);
    let Target::Live(i) = t else {
        assert_eq!(Some(status), t.dead_status());
        return;
    };
    let c = &mut world.live[i];
    let Some(g) = c.groups.iter().position(|g| g.0 == group) else {
        expect(status, STRATA_ERR_INVALID_HANDLE, call);
        return;
    };
    let in_use = c
        .layers
        .iter()
        .any(|l| l.group == group && c.held.contains(&l.id));
    match which {
        0 => {
            // Onloading makes host copies: the host limit or an impossible tier may refuse it.
            if status != STRATA_OK {
                assert!(
                    matches!(status, STRATA_ERR_BUDGET | STRATA_ERR_INVALID_ARGUMENT),
                    "{call}: {}",
                    last_error()
                );
            }
        }
        1 => expect(status, STRATA_OK, call),
        _ if in_use => expect(status, STRATA_ERR_STATE, call),
        _ => {
            expect(status, STRATA_OK, call);
            c.groups.swap_remove(g);
            let (gone, kept): (Vec<_>, Vec<_>) = c.layers.drain(..).partition(|l| l.group == group);
            c.layers = kept;
            world.stale_groups.push(group);
            world.stale_layers.extend(gone.iter().map(|l| l.id));
        }
    }
}

fn unregister(world: &mut World, input: &mut Input, t: Target) {
    let layer = world.layer_id(input, &t);
    let status = check_status(
        strata_layer_unregister(t.ptr(world), layer),
        "strata_layer_unregister",
    );
    let Target::Live(i) = t else {
        assert_eq!(Some(status), t.dead_status());
        return;
    };
    let c = &mut world.live[i];
    match c.layers.iter().position(|l| l.id == layer) {
        None => expect(status, STRATA_ERR_INVALID_HANDLE, "strata_layer_unregister"),
        Some(_) if c.held.contains(&layer) => {
            expect(status, STRATA_ERR_STATE, "strata_layer_unregister")
        }
        Some(l) => {
            expect(status, STRATA_OK, "strata_layer_unregister");
            c.layers.swap_remove(l);
            world.stale_layers.push(layer);
        }
    }
}

fn set_limit(world: &mut World, input: &mut Input, t: Target, host: bool) {
    let bytes = input.limit();
    let ptr = t.ptr(world);
    let status = if host {
        strata_context_set_host_limit(ptr, bytes)
    } else {
        strata_context_set_vram_limit(ptr, bytes)
    };
    check_status(status, "set limit");
    trace(|| {
        format!(
            "{} limit set to {bytes}",
            if host { "host" } else { "vram" }
        )
    });
    let Target::Live(i) = t else {
        assert_eq!(Some(status), t.dead_status());
        return;
    };
    expect(status, STRATA_OK, "set limit");
    let c = &mut world.live[i];
    if host {
        c.host_limit = bytes;
    } else {
        c.limit = bytes;
        c.lowered_while_held |= !c.held.is_empty();
    }
}

/// strata_stats_get into a struct whose `struct_size` may be short, long or invalid: bytes past
/// `struct_size` are never written.
fn odd_stats(world: &World, input: &mut Input, t: Target) {
    #[repr(C)]
    struct Padded {
        stats: strata_stats,
        after: [u8; 64],
    }
    let full = std::mem::size_of::<strata_stats>();
    let first = std::mem::offset_of!(strata_stats, host_limit);
    let size = match input.byte() % 4 {
        0 => first,
        1 => first - 8,
        2 => 4096,
        _ => full,
    };
    let mut padded = Padded {
        stats: Default::default(),
        after: [0xEE; 64],
    };
    let base = &mut padded as *mut Padded as *mut u8;
    // SAFETY: `padded` is size_of::<Padded>() bytes; these writes stay inside it.
    unsafe {
        ptr::write_bytes(base, 0xEE, std::mem::size_of::<Padded>());
        ptr::write_unaligned(base as *mut u32, size as u32);
    }
    let status = check_status(
        strata_stats_get(t.ptr(world), &mut padded.stats),
        "strata_stats_get",
    );
    // SAFETY: as above: reads inside `padded`.
    let bytes = unsafe { std::slice::from_raw_parts(base, std::mem::size_of::<Padded>()) };
    let untouched_from = if status == STRATA_OK {
        size.min(full)
    } else {
        4
    };
    assert!(
        bytes[untouched_from..].iter().all(|&b| b == 0xEE),
        "strata_stats_get wrote past struct_size {size} (status {status})"
    );
    match t {
        Target::Live(_) if size >= first => expect(status, STRATA_OK, "strata_stats_get"),
        Target::Live(_) => expect(status, STRATA_ERR_INVALID_ARGUMENT, "strata_stats_get"),
        _ => assert_eq!(Some(status), t.dead_status()),
    }
}

fn find(world: &World, input: &mut Input, t: Target) {
    let name = CString::new(NAMES[input.below(NAMES.len())]).unwrap();
    let mut out = 0xA5A5u64;
    let status = check_status(
        strata_layer_find(t.ptr(world), name.as_ptr(), &mut out),
        "strata_layer_find",
    );
    let Target::Live(i) = t else {
        assert_eq!(Some(status), t.dead_status());
        return;
    };
    let c = &world.live[i];
    match c
        .layers
        .iter()
        .find(|l| l.name.as_bytes() == name.as_bytes())
    {
        Some(l) => {
            expect(status, STRATA_OK, "strata_layer_find");
            assert_eq!(out, l.id);
            let mut count = 0;
            expect(
                strata_layer_tensor_count(c.ptr, l.id, &mut count),
                STRATA_OK,
                "strata_layer_tensor_count",
            );
            if let Some(e) = &l.expected {
                assert_eq!(count, e.len());
            }
        }
        None => {
            expect(status, STRATA_ERR_NOT_FOUND, "strata_layer_find");
            assert_eq!(out, 0xA5A5, "output written on failure");
        }
    }
}

/// Releases everything, destroys every group, and checks that nothing is held any more.
fn drain_and_destroy(world: &mut World, i: usize) {
    let c = &world.live[i];
    for &layer in &c.held.clone() {
        expect(
            strata_release(c.ptr, layer, ptr::null_mut()),
            STRATA_OK,
            "strata_release",
        );
    }
    for &(group, _) in &c.groups {
        expect(
            strata_group_destroy(c.ptr, group),
            STRATA_OK,
            "strata_group_destroy",
        );
    }
    let s = stats(c.ptr);
    assert_eq!(
        (s.vram_in_use, s.host_in_use),
        (0, 0),
        "bytes held with every group destroyed: {s:?}"
    );
    world.live[i].held.clear();
    destroy_context(world, Target::Live(i));
}

fuzz_target!(|data: &[u8]| {
    let before = LIVE_BYTES.load(Ordering::Relaxed);
    {
        let mut input = Input(data);
        let mut world = World::default();
        while !input.0.is_empty() {
            let op = input.byte() % 16;
            if op == 0 {
                create_context(&mut world, &mut input);
                continue;
            }
            let t = world.target(&mut input);
            match op {
                1 => destroy_context(&mut world, t),
                2 => create_group(&mut world, &mut input, t),
                3 | 4 => register(&mut world, &mut input, t),
                5 | 6 => {
                    let layer = world.layer_id(&mut input, &t);
                    acquire(&mut world, &mut input, t, layer);
                }
                7 | 8 => {
                    let layer = world.layer_id(&mut input, &t);
                    release(&mut world, t, layer);
                }
                9 => {
                    let which = input.byte() % 3;
                    group_call(&mut world, &mut input, t, which);
                }
                10 => unregister(&mut world, &mut input, t),
                11 => {
                    let host = input.byte() % 4 == 0;
                    set_limit(&mut world, &mut input, t, host);
                }
                12 => odd_stats(&world, &mut input, t),
                13 => find(&world, &mut input, t),
                _ => {
                    if let Target::Live(i) = t {
                        let n = input.byte() % 3 + 1;
                        passes(&mut world, i, n);
                    }
                }
            }
            for c in &world.live {
                check_context(c);
            }
        }
        while !world.live.is_empty() {
            drain_and_destroy(&mut world, 0);
        }
        for &gone in &world.stale_contexts {
            let mut s = strata_stats {
                struct_size: std::mem::size_of::<strata_stats>() as u32,
                ..Default::default()
            };
            expect(
                strata_stats_get(gone, &mut s),
                STRATA_ERR_INVALID_HANDLE,
                "stale context",
            );
        }
        // A fresh context starts from zero.
        let mut fresh = ptr::null_mut();
        expect(
            strata_context_create(&strata_options_default(), &mut fresh),
            STRATA_OK,
            "strata_context_create",
        );
        let s = stats(fresh);
        assert_eq!(
            (
                s.vram_in_use,
                s.vram_peak,
                s.host_in_use,
                s.host_peak,
                s.acquires,
                s.bytes_to_device
            ),
            (0, 0, 0, 0, 0, 0)
        );
        strata_context_destroy(fresh);
    }
    // A context's copy engine may drop the last handle to it a moment after destroy returns.
    for _ in 0..200 {
        if LIVE_BYTES.load(Ordering::Relaxed) - before <= ALLOWED_RESIDUE {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    panic!(
        "{} bytes still allocated after every context was destroyed",
        LIVE_BYTES.load(Ordering::Relaxed) - before
    );
});
