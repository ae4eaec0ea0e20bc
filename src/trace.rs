//! A bounded timeline of compute and copy spans, written as Chrome-trace JSON (Perfetto opens it).

use once_cell::sync::{Lazy, OnceCell};
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Spans kept at most; older ones are dropped first so a long run cannot grow without bound.
const MAX_SPANS: usize = 1 << 16;

/// A point on the timeline. Every acquire+release takes two, so they must be cheap: where the
/// kernel itself keeps time by the CPU's time-stamp counter (Linux on x86-64 with clocksource
/// "tsc", which it picks only when the counter is invariant and in step across CPUs), a stamp is
/// one RDTSC instruction, 15 ns here against 32 ns for `Instant::now` (clock_gettime) on a VM.
/// Elsewhere it counts nanoseconds from the process's first stamp.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Stamp(u64);

struct Clock {
    origin: Instant,
    origin_ticks: u64,
    tsc: bool,
    nanos_per_tick: OnceCell<f64>,
}

static CLOCK: Lazy<Clock> = Lazy::new(|| {
    let tsc = kernel_keeps_time_by_tsc();
    let origin = Instant::now();
    Clock {
        origin,
        origin_ticks: if tsc { read_tsc() } else { 0 },
        tsc,
        nanos_per_tick: OnceCell::new(),
    }
});

fn kernel_keeps_time_by_tsc() -> bool {
    cfg!(all(target_arch = "x86_64", target_os = "linux"))
        && std::fs::read_to_string(
            "/sys/devices/system/clocksource/clocksource0/current_clocksource",
        )
        .is_ok_and(|source| source.trim() == "tsc")
}

fn read_tsc() -> u64 {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: RDTSC exists on every x86-64 CPU and only reads the counter.
    return unsafe { core::arch::x86_64::_rdtsc() };
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("the TSC clock is chosen on x86-64 only")
}

impl Clock {
    fn ticks(&self) -> u64 {
        if self.tsc {
            read_tsc()
        } else {
            self.origin.elapsed().as_nanos() as u64
        }
    }

    /// The counter's period, measured once against the monotonic clock over at least 10 ms
    /// since the first stamp (waiting out the rest, once per process, if a trace is written
    /// sooner): the error is then the two clocks' reading jitter over 10 ms, a few parts per
    /// million.
    fn nanos_per_tick(&self) -> f64 {
        if !self.tsc {
            return 1.0;
        }
        *self.nanos_per_tick.get_or_init(|| {
            const SPAN: Duration = Duration::from_millis(10);
            if let Some(rest) = SPAN.checked_sub(self.origin.elapsed()) {
                std::thread::sleep(rest);
            }
            let (ticks, now) = (read_tsc(), Instant::now());
            let ticks = ticks.saturating_sub(self.origin_ticks).max(1);
            (now - self.origin).as_nanos() as f64 / ticks as f64
        })
    }
}

impl Stamp {
    pub fn now() -> Stamp {
        Stamp(CLOCK.ticks())
    }

    /// Seconds from `earlier` to this stamp; 0 if `earlier` is later.
    pub fn seconds_since(self, earlier: Stamp) -> f64 {
        self.0.saturating_sub(earlier.0) as f64 * CLOCK.nanos_per_tick() / 1e9
    }

    /// The stamp `duration` after this one.
    pub fn after(self, duration: Duration) -> Stamp {
        Stamp(self.0 + (duration.as_nanos() as f64 / CLOCK.nanos_per_tick()).round() as u64)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Track {
    /// From acquire to release: the caller computing with a layer.
    Compute,
    /// Bytes moving into a tier (reads, uploads, conversions).
    Copy,
    /// Conversion work on one thread of the host conversion pool (its index): a pool records its
    /// spans here, each worker a track of its own.
    Convert(u16),
}

/// Memory held over time: (when, bytes held from then on), oldest first, bounded like the spans.
#[derive(Clone, Debug, Default)]
pub struct MemorySamples {
    points: std::collections::VecDeque<(Stamp, u64)>,
}

impl MemorySamples {
    pub fn record(&mut self, at: Stamp, bytes: u64) {
        if self.points.len() == MAX_SPANS {
            self.points.pop_front();
        }
        self.points.push_back((at, bytes));
    }

    pub fn points(&self) -> impl Iterator<Item = &(Stamp, u64)> {
        self.points.iter()
    }
}

/// A memory track the timeline draws under the spans: the bytes held against their limit.
pub struct MemoryTrack<'a> {
    /// "device memory", "host memory".
    pub name: &'static str,
    pub samples: &'a MemorySamples,
    /// The line drawn across the track, where the limit is a number of bytes.
    pub limit: Option<u64>,
    /// How the legend names the limit, e.g. "vram_limit 512.0 MiB".
    pub limit_label: String,
}

/// Colours of the span kinds, the stalls and the memory tracks, as the legend shows them.
const COMPUTE_COLOR: &str = "#4878d0";
const STALL_COLOR: &str = "#d62728";
const LIMIT_COLOR: &str = "#d62728";
const DEVICE_COLOR: &str = "#8172b3";
const HOST_COLOR: &str = "#937860";
const PASS_COLOR: &str = "#555555";

/// The colour of a copy span of kind `what`.
fn copy_color(what: &str) -> &'static str {
    match what {
        "read" => "#ee854a",
        "upload" => "#6acc64",
        "convert" => "#c44e52",
        _ => "#8c8c8c",
    }
}

/// Spans of the host conversion pool's workers. The pool is process-wide, shared by every
/// context (see `host_threads`), so its work is recorded here, once, and each trace shows the
/// part of it that falls in its own time.
static POOL_SPANS: Mutex<VecDeque<Span>> = Mutex::new(VecDeque::new());

/// Records work one conversion pool worker did (a span on a `Track::Convert` row), for every
/// trace whose time it falls in. Bounded like a trace: the oldest spans go first.
pub fn record_pool_span(span: Span) {
    let mut spans = POOL_SPANS.lock().unwrap_or_else(PoisonError::into_inner);
    if spans.len() == MAX_SPANS {
        spans.pop_front();
    }
    spans.push_back(span);
}

#[derive(Clone, Debug)]
pub struct Span {
    pub track: Track,
    pub name: std::sync::Arc<str>,
    pub what: &'static str,
    pub start: Stamp,
    pub end: Stamp,
    pub bytes: u64,
}

pub struct Trace {
    origin: Stamp,
    spans: std::collections::VecDeque<Span>,
    dropped: u64,
}

impl Default for Trace {
    fn default() -> Self {
        Trace {
            origin: Stamp::now(),
            spans: Default::default(),
            dropped: 0,
        }
    }
}

impl Trace {
    /// The most spans a trace keeps (what it costs in memory once full is for a soak to measure).
    pub fn max_spans() -> usize {
        MAX_SPANS
    }

    pub fn record(&mut self, span: Span) {
        if self.spans.len() == MAX_SPANS {
            self.spans.pop_front();
            self.dropped += 1;
        }
        self.spans.push_back(span);
    }

    pub fn spans(&self) -> impl Iterator<Item = &Span> {
        self.spans.iter()
    }

    /// This trace with the host conversion pool's spans since it began (see
    /// [`record_pool_span`]): what the timeline shows.
    fn with_pool_spans(&self) -> Trace {
        let mut merged = Trace {
            origin: self.origin,
            spans: self.spans.clone(),
            dropped: self.dropped,
        };
        let pool = POOL_SPANS.lock().unwrap_or_else(PoisonError::into_inner);
        for span in pool.iter().filter(|span| span.start >= self.origin) {
            merged.record(span.clone());
        }
        merged
    }

    /// Tracks that have spans, in display order.
    fn tracks(&self) -> Vec<Track> {
        let mut tracks: Vec<Track> = self.spans.iter().map(|s| s.track).collect();
        tracks.extend([Track::Compute, Track::Copy]);
        tracks.sort();
        tracks.dedup();
        tracks
    }

    /// The compute spans in the order they started.
    fn compute_spans(&self) -> Vec<&Span> {
        let mut compute: Vec<&Span> = self
            .spans
            .iter()
            .filter(|s| s.track == Track::Compute)
            .collect();
        compute.sort_by_key(|s| s.start);
        compute
    }

    /// Where each pass starts: the first layer computed, each time it is computed again.
    fn pass_starts(&self) -> Vec<Stamp> {
        let compute = self.compute_spans();
        let Some(first) = compute.first() else {
            return Vec::new();
        };
        compute
            .iter()
            .filter(|s| s.name == first.name)
            .map(|s| s.start)
            .collect()
    }

    /// The timeline as Chrome trace-event JSON: one process, a thread per track, a counter per
    /// memory track (and one for its limit), and an instant event where each pass starts.
    pub fn to_chrome_json(&self, memory: &[MemoryTrack<'_>]) -> String {
        self.with_pool_spans().chrome_json(memory)
    }

    fn chrome_json(&self, memory: &[MemoryTrack<'_>]) -> String {
        let mut out = String::from("{\"displayTimeUnit\":\"ms\",\"traceEvents\":[\n");
        out.push_str(
            "{\"name\":\"process_name\",\"ph\":\"M\",\"pid\":1,\"args\":{\"name\":\"strata\"}},\n",
        );
        for track in self.tracks() {
            let _ = writeln!(
                out,
                "{{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":1,\"tid\":{},\"args\":{{\"name\":\"{}\"}}}},",
                track_id(track),
                track_name(track)
            );
        }
        let micros = |t: Stamp| t.seconds_since(self.origin) * 1e6;
        for span in &self.spans {
            let start = micros(span.start);
            let duration = (micros(span.end) - start).max(0.0);
            let _ = writeln!(
                out,
                "{{\"name\":{},\"cat\":\"{}\",\"ph\":\"X\",\"pid\":1,\"tid\":{},\"ts\":{start:.3},\"dur\":{duration:.3},\"args\":{{\"bytes\":{}}}}},",
                json_string(&span.name),
                span.what,
                track_id(span.track),
                span.bytes
            );
        }
        for track in memory {
            for &(at, bytes) in track.samples.points() {
                let _ = writeln!(
                    out,
                    "{{\"name\":\"{}\",\"ph\":\"C\",\"pid\":1,\"ts\":{:.3},\"args\":{{\"bytes\":{bytes}}}}},",
                    track.name,
                    micros(at).max(0.0)
                );
            }
            if let (Some(limit), Some(&(first, _))) = (track.limit, track.samples.points().next()) {
                let _ = writeln!(
                    out,
                    "{{\"name\":\"{} limit\",\"ph\":\"C\",\"pid\":1,\"ts\":{:.3},\"args\":{{\"bytes\":{limit}}}}},",
                    track.name,
                    micros(first).max(0.0)
                );
            }
        }
        for (pass, start) in self.pass_starts().into_iter().enumerate() {
            let _ = writeln!(
                out,
                "{{\"name\":\"pass {}\",\"ph\":\"i\",\"s\":\"g\",\"pid\":1,\"tid\":1,\"ts\":{:.3}}},",
                pass + 1,
                micros(start)
            );
        }
        let _ = write!(
            out,
            "{{\"name\":\"dropped_spans\",\"ph\":\"M\",\"pid\":1,\"args\":{{\"count\":{}}}}}\n]}}\n",
            self.dropped
        );
        out
    }

    /// The stalls: gaps between two compute spans while a copy ran, each with the copy span that
    /// overlaps it most (what the pass was waiting for).
    fn stalls(&self) -> Vec<(Stamp, Stamp, &Span, Option<&Span>)> {
        let compute = self.compute_spans();
        let overlap =
            |s: &Span, from: Stamp, to: Stamp| to.min(s.end).seconds_since(from.max(s.start));
        compute
            .windows(2)
            .filter_map(|pair| {
                let (from, to) = (pair[0].end, pair[1].start);
                if to <= from {
                    return None;
                }
                let mut copies: Vec<&Span> = self
                    .spans
                    .iter()
                    .filter(|s| s.track != Track::Compute && s.start < to && s.end > from)
                    .collect();
                let most = copies
                    .iter()
                    .map(|s| overlap(s, from, to))
                    .fold(0.0, f64::max);
                // An upload spans the reads of its tensors: the narrowest span that covers most
                // of the gap names the work waited for.
                copies.sort_by_key(|s| s.end.0 - s.start.0.min(s.end.0));
                let cause = copies
                    .into_iter()
                    .find(|s| overlap(s, from, to) >= most / 2.0)?;
                Some((from, to, pair[1], Some(cause)))
            })
            .collect()
    }
}

/// The JSON thread id of a track.
fn track_id(track: Track) -> u32 {
    match track {
        Track::Compute => 1,
        Track::Copy => 2,
        Track::Convert(worker) => 10 + worker as u32,
    }
}

fn track_name(track: Track) -> String {
    match track {
        Track::Compute => "compute".into(),
        Track::Copy => "copy".into(),
        Track::Convert(worker) => format!("convert {worker}"),
    }
}

/// Bytes as the timeline labels them.
fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

impl Trace {
    /// The timeline as an SVG a browser shows: a row per span track (compute, copy and conversion
    /// workers, copies coloured by kind), the stalls (time between two compute spans while a copy
    /// ran) in red, labelled with what they waited for, then a step chart per memory track against
    /// its limit line, pass boundaries across all rows, a time axis and a legend.
    pub fn to_svg(&self, memory: &[MemoryTrack<'_>]) -> String {
        self.with_pool_spans().svg(memory)
    }

    fn svg(&self, memory: &[MemoryTrack<'_>]) -> String {
        const WIDTH: f64 = 1400.0;
        const LEFT: f64 = 110.0;
        const RIGHT: f64 = 20.0;
        const ROW: f64 = 28.0;
        const CHART: f64 = 80.0;
        const TOP: f64 = 34.0;
        let (Some(first), Some(last)) = (
            self.spans.iter().map(|s| s.start).min(),
            self.spans.iter().map(|s| s.end).max(),
        ) else {
            return format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"40\"><text x=\"10\" y=\"25\">no spans recorded</text></svg>\n");
        };
        let total = last.seconds_since(first).max(1e-9);
        let plot = WIDTH - LEFT - RIGHT;
        let x = |t: Stamp| LEFT + t.seconds_since(first).min(total) / total * plot;
        let tracks = self.tracks();
        let stall_row = tracks.len() as f64;
        let charts_top = TOP + (stall_row + 1.0) * ROW + 8.0;
        let axis_y = charts_top + memory.len() as f64 * (CHART + 14.0);
        let legend_y = axis_y + 34.0;
        let height = legend_y + 30.0;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>"
        );

        // What the passes waited for, in total, at the top: the answer to "why is it slow".
        let stalls = self.stalls();
        let mut waits: Vec<(&str, f64)> = Vec::new();
        for (from, to, _, cause) in &stalls {
            let what = cause.map_or("?", |c| c.what);
            let seconds = to.seconds_since(*from);
            match waits.iter_mut().find(|(w, _)| *w == what) {
                Some((_, total)) => *total += seconds,
                None => waits.push((what, seconds)),
            }
        }
        let summary = match waits.is_empty() {
            true => "no stalls: compute never waited for a copy".to_owned(),
            false => {
                let parts: Vec<String> = waits
                    .iter()
                    .map(|(what, s)| format!("{:.1} ms waiting for {what}", s * 1e3))
                    .collect();
                format!("stalls: {} ({} gaps)", parts.join(", "), stalls.len())
            }
        };
        let _ = writeln!(
            out,
            "<text x=\"{LEFT}\" y=\"14\" font-size=\"13\" font-weight=\"bold\">{}</text>",
            xml_escape(&summary)
        );

        let labels = tracks.iter().map(|&t| track_name(t));
        for (row, label) in labels.chain(["stalls".to_owned()]).enumerate() {
            let _ = writeln!(
                out,
                "<text x=\"4\" y=\"{:.1}\">{label}</text>",
                TOP + row as f64 * ROW + ROW / 2.0 + 2.0
            );
        }
        // Longest first, so that the reads inside an upload are drawn over it.
        let mut spans: Vec<&Span> = self.spans.iter().collect();
        spans.sort_by_key(|s| std::cmp::Reverse(s.end.0.saturating_sub(s.start.0)));
        for span in spans {
            let row = tracks.iter().position(|&t| t == span.track).unwrap_or(0) as f64;
            let color = match span.track {
                Track::Compute => COMPUTE_COLOR,
                _ => copy_color(span.what),
            };
            let _ = writeln!(
                out,
                "<rect x=\"{:.2}\" y=\"{}\" width=\"{:.2}\" height=\"{}\" fill=\"{color}\"><title>{} {} ({} bytes)</title></rect>",
                x(span.start),
                TOP + row * ROW,
                (x(span.end) - x(span.start)).max(0.5),
                ROW - 6.0,
                xml_escape(&span.name),
                span.what,
                span.bytes
            );
        }
        for (from, to, next, cause) in &stalls {
            let why = cause.map_or(String::new(), |c| format!(": {} {}", c.what, c.name));
            let (left, width) = (x(*from), (x(*to) - x(*from)).max(0.5));
            let _ = writeln!(
                out,
                "<rect x=\"{left:.2}\" y=\"{}\" width=\"{width:.2}\" height=\"{}\" fill=\"{STALL_COLOR}\"><title>stall before {}{}</title></rect>",
                TOP + stall_row * ROW,
                ROW - 6.0,
                xml_escape(&next.name),
                xml_escape(&why)
            );
            if let Some(cause) = cause {
                // The kind waited for, under the stall, in its copy colour.
                let _ = writeln!(
                    out,
                    "<rect x=\"{left:.2}\" y=\"{}\" width=\"{width:.2}\" height=\"5\" fill=\"{}\"/>",
                    TOP + stall_row * ROW + ROW - 6.0,
                    copy_color(cause.what)
                );
                if width > 34.0 {
                    let _ = writeln!(
                        out,
                        "<text x=\"{:.2}\" y=\"{}\" fill=\"white\" font-size=\"10\">{}</text>",
                        left + 2.0,
                        TOP + stall_row * ROW + 14.0,
                        cause.what
                    );
                }
            }
        }

        for (i, track) in memory.iter().enumerate() {
            let top = charts_top + i as f64 * (CHART + 14.0);
            let peak = track.samples.points().map(|&(_, b)| b).max().unwrap_or(0);
            let scale = peak.max(track.limit.unwrap_or(0)).max(1) as f64 * 1.05;
            let y = |bytes: u64| top + CHART - bytes as f64 / scale * CHART;
            let color = match i {
                0 => DEVICE_COLOR,
                _ => HOST_COLOR,
            };
            let _ = writeln!(
                out,
                "<text x=\"4\" y=\"{:.1}\">{}</text><text x=\"4\" y=\"{:.1}\" fill=\"#666\">peak {}</text>",
                top + 14.0,
                track.name,
                top + 28.0,
                mib(peak)
            );
            let _ = writeln!(
                out,
                "<line x1=\"{LEFT}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#ccc\"/>",
                top + CHART,
                WIDTH - RIGHT,
                top + CHART
            );
            // A step chart: each sample holds until the next.
            let mut path = format!("M{LEFT:.2},{:.2}", y(0));
            let mut held = 0;
            for &(at, bytes) in track.samples.points() {
                if at > last {
                    break;
                }
                let px = x(at.max(first));
                let _ = write!(path, " L{px:.2},{:.2} L{px:.2},{:.2}", y(held), y(bytes));
                held = bytes;
            }
            let _ = write!(
                path,
                " L{:.2},{:.2} L{:.2},{:.2} Z",
                WIDTH - RIGHT,
                y(held),
                WIDTH - RIGHT,
                y(0)
            );
            let _ = writeln!(
                out,
                "<path d=\"{path}\" fill=\"{color}\" fill-opacity=\"0.45\" stroke=\"{color}\"/>"
            );
            match track.limit {
                Some(limit) => {
                    let ly = y(limit);
                    let _ = writeln!(
                        out,
                        "<line x1=\"{LEFT}\" y1=\"{ly:.2}\" x2=\"{:.1}\" y2=\"{ly:.2}\" stroke=\"{LIMIT_COLOR}\" stroke-width=\"1.5\" stroke-dasharray=\"6 3\"/><text x=\"{:.1}\" y=\"{:.2}\" text-anchor=\"end\" fill=\"{LIMIT_COLOR}\">{}</text>",
                        WIDTH - RIGHT,
                        WIDTH - RIGHT - 4.0,
                        ly - 3.0,
                        xml_escape(&track.limit_label),
                    );
                }
                None => {
                    let _ = writeln!(
                        out,
                        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" fill=\"#666\">{}</text>",
                        WIDTH - RIGHT - 4.0,
                        top + 10.0,
                        xml_escape(&track.limit_label)
                    );
                }
            }
        }

        for (pass, start) in self.pass_starts().into_iter().enumerate() {
            let px = x(start);
            let _ = writeln!(
                out,
                "<line x1=\"{px:.2}\" y1=\"{}\" x2=\"{px:.2}\" y2=\"{axis_y}\" stroke=\"{PASS_COLOR}\" stroke-dasharray=\"3 3\"/><text x=\"{:.2}\" y=\"{}\" fill=\"{PASS_COLOR}\">pass {}</text>",
                TOP - 8.0,
                px + 3.0,
                TOP - 2.0,
                pass + 1
            );
        }

        let _ = writeln!(
            out,
            "<line x1=\"{LEFT}\" y1=\"{axis_y}\" x2=\"{}\" y2=\"{axis_y}\" stroke=\"black\"/>",
            WIDTH - RIGHT
        );
        for tick in 0..=10 {
            let tx = LEFT + tick as f64 / 10.0 * plot;
            let _ = writeln!(
                out,
                "<line x1=\"{tx:.2}\" y1=\"{axis_y}\" x2=\"{tx:.2}\" y2=\"{}\" stroke=\"black\"/><text x=\"{tx:.2}\" y=\"{}\" text-anchor=\"middle\">{:.1} ms</text>",
                axis_y + 5.0,
                axis_y + 18.0,
                total * 1000.0 * tick as f64 / 10.0
            );
        }
        let legend = [
            (COMPUTE_COLOR, "compute (acquire to release)"),
            (
                copy_color("read"),
                "read from disk (and convert on the host)",
            ),
            (copy_color("upload"), "upload to the device"),
            (copy_color("convert"), "convert"),
            (STALL_COLOR, "stall: compute waiting for bytes"),
            (DEVICE_COLOR, "device memory held"),
            (HOST_COLOR, "host memory held"),
        ];
        let mut lx = LEFT;
        for (color, label) in legend {
            let _ = writeln!(
                out,
                "<rect x=\"{lx:.1}\" y=\"{legend_y}\" width=\"12\" height=\"12\" fill=\"{color}\"/><text x=\"{:.1}\" y=\"{}\">{label}</text>",
                lx + 16.0,
                legend_y + 10.0
            );
            lx += 24.0 + label.len() as f64 * 5.8;
        }
        let _ = writeln!(
            out,
            "<line x1=\"{lx:.1}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"{LIMIT_COLOR}\" stroke-dasharray=\"6 3\"/><text x=\"{:.1}\" y=\"{}\">limit</text>",
            lx + 20.0,
            lx + 24.0,
            legend_y + 10.0,
            y = legend_y + 6.0
        );
        lx += 60.0;
        let _ = writeln!(
            out,
            "<line x1=\"{lx:.1}\" y1=\"{legend_y}\" x2=\"{lx:.1}\" y2=\"{}\" stroke=\"{PASS_COLOR}\" stroke-dasharray=\"3 3\"/><text x=\"{:.1}\" y=\"{}\">pass boundary</text>",
            legend_y + 12.0,
            lx + 4.0,
            legend_y + 10.0
        );
        out.push_str("</svg>\n");
        out
    }
}

/// The memory tracks of a context: the device budget against `vram_limit`, and the host memory
/// held (in use and banked) against `host_limit`.
pub fn memory_tracks<'a>(
    budget: &'a crate::budget::Budget,
    host: &'a MemorySamples,
    host_limit: u64,
) -> [MemoryTrack<'a>; 2] {
    use crate::budget::{Limit, UNLIMITED};
    let device_limit = match budget.limit {
        Limit::Bytes(n) => Some(n),
        Limit::Unlimited | Limit::Minimal => None,
    };
    [
        MemoryTrack {
            name: "device memory",
            samples: budget.samples(),
            limit: device_limit,
            limit_label: match budget.limit {
                Limit::Bytes(n) => format!("vram_limit {}", mib(n)),
                other => format!("vram_limit {other}"),
            },
        },
        MemoryTrack {
            name: "host memory",
            samples: host,
            limit: (host_limit != UNLIMITED).then_some(host_limit),
            limit_label: match host_limit {
                UNLIMITED => "host_limit unlimited".to_owned(),
                n => format!("host_limit {}", mib(n)),
            },
        },
    ]
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A JSON string literal for `s`.
pub fn json_string(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(track: Track, name: &str, start_ms: u64, end_ms: u64, origin: Stamp) -> Span {
        Span {
            track,
            name: name.into(),
            what: if track == Track::Compute {
                "compute"
            } else {
                "upload"
            },
            start: origin.after(Duration::from_millis(start_ms)),
            end: origin.after(Duration::from_millis(end_ms)),
            bytes: 10,
        }
    }

    #[test]
    fn the_timeline_shows_tracks_stalls_and_their_cause_memory_against_limits_and_passes() {
        let mut trace = Trace::default();
        let t0 = trace.origin;
        trace.record(span(Track::Compute, "a<1>", 0, 10, t0));
        let mut read = span(Track::Copy, "b", 8, 20, t0);
        read.what = "read";
        trace.record(read);
        // An upload spanning the read: the read, narrower, is what the stall waited for.
        trace.record(span(Track::Copy, "b", 6, 21, t0));
        // Compute waits from 10 to 20 ms for b's read: a stall.
        trace.record(span(Track::Compute, "b", 20, 30, t0));
        trace.record(span(Track::Convert(1), "b", 12, 14, t0));
        // The first layer again: a second pass, and no copy under the gap, so no stall.
        trace.record(span(Track::Compute, "a<1>", 40, 50, t0));
        let mut device = MemorySamples::default();
        for (ms, bytes) in [(1, 100), (5, 300), (25, 50)] {
            device.record(t0.after(Duration::from_millis(ms)), bytes);
        }
        let host = MemorySamples::default();
        let memory = [
            MemoryTrack {
                name: "device memory",
                samples: &device,
                limit: Some(400),
                limit_label: "vram_limit 400 B".into(),
            },
            MemoryTrack {
                name: "host memory",
                samples: &host,
                limit: None,
                limit_label: "host_limit unlimited".into(),
            },
        ];
        let svg = trace.to_svg(&memory);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert_eq!(svg.matches("stall before").count(), 1, "{svg}");
        assert!(svg.contains("stall before b: read b"));
        assert!(svg.contains("stalls: 10.0 ms waiting for read (1 gaps)"));
        assert!(
            svg.contains(">convert 1</text>"),
            "a row per conversion worker"
        );
        assert!(svg.contains(">pass 1</text>") && svg.contains(">pass 2</text>"));
        assert!(!svg.contains(">pass 3</text>"));
        assert!(svg.contains("vram_limit 400 B") && svg.contains("host_limit unlimited"));
        assert!(
            svg.contains("peak 0.0 MiB"),
            "the device track's peak is labelled"
        );
        assert_eq!(
            svg.matches(&format!("fill=\"{DEVICE_COLOR}\" fill-opacity"))
                .count(),
            1
        );
        for item in [
            "stall: compute waiting for bytes",
            "device memory held",
            "pass boundary",
        ] {
            assert!(svg.contains(item), "the legend names {item}");
        }
        assert!(svg.contains("a&lt;1&gt;"), "names are escaped");
        assert!(svg.contains("50.0 ms"), "the axis spans the whole run");
        assert!(Trace::default().to_svg(&[]).contains("no spans recorded"));

        let json = trace.to_chrome_json(&memory);
        serde_json::from_str::<serde_json::Value>(&json).expect("valid JSON");
        assert!(json.contains("\"tid\":11,\"args\":{\"name\":\"convert 1\"}"));
        assert_eq!(
            json.matches("\"name\":\"device memory\",\"ph\":\"C\"")
                .count(),
            3
        );
        assert!(json.contains("\"name\":\"device memory limit\",\"ph\":\"C\""));
        assert!(json.contains("\"args\":{\"bytes\":400}"));
        assert!(json.contains("\"name\":\"pass 2\",\"ph\":\"i\""));
    }
}
