//! A bounded timeline of compute and copy spans, written as Chrome-trace JSON (Perfetto opens it).

use once_cell::sync::{Lazy, OnceCell};
use std::fmt::Write as _;
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Track {
    /// From acquire to release: the caller computing with a layer.
    Compute,
    /// Bytes moving into a tier (reads, uploads, conversions).
    Copy,
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

    /// The timeline as Chrome trace-event JSON: one process, a thread per track.
    pub fn to_chrome_json(&self) -> String {
        let mut out = String::from("{\"displayTimeUnit\":\"ms\",\"traceEvents\":[\n");
        out.push_str(
            "{\"name\":\"process_name\",\"ph\":\"M\",\"pid\":1,\"args\":{\"name\":\"strata\"}},\n",
        );
        for (tid, name) in [(1, "compute"), (2, "copy")] {
            let _ = writeln!(
                out,
                "{{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":1,\"tid\":{tid},\"args\":{{\"name\":\"{name}\"}}}},"
            );
        }
        let micros = |t: Stamp| t.seconds_since(self.origin) * 1e6;
        for span in &self.spans {
            let tid = match span.track {
                Track::Compute => 1,
                Track::Copy => 2,
            };
            let start = micros(span.start);
            let duration = (micros(span.end) - start).max(0.0);
            let _ = writeln!(
                out,
                "{{\"name\":{},\"cat\":\"{}\",\"ph\":\"X\",\"pid\":1,\"tid\":{tid},\"ts\":{start:.3},\"dur\":{duration:.3},\"args\":{{\"bytes\":{}}}}},",
                json_string(&span.name),
                span.what,
                span.bytes
            );
        }
        let _ = write!(
            out,
            "{{\"name\":\"dropped_spans\",\"ph\":\"M\",\"pid\":1,\"args\":{{\"count\":{}}}}}\n]}}\n",
            self.dropped
        );
        out
    }
}

impl Trace {
    /// The timeline as an SVG a browser shows: a compute track and a copy track on a time axis,
    /// and the stalls (time between two compute spans while a copy was running) marked in red.
    pub fn to_svg(&self) -> String {
        const WIDTH: f64 = 1200.0;
        const LEFT: f64 = 80.0;
        const ROW: f64 = 28.0;
        let (Some(first), Some(last)) = (
            self.spans.iter().map(|s| s.start).min(),
            self.spans.iter().map(|s| s.end).max(),
        ) else {
            return format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"40\"><text x=\"10\" y=\"25\">no spans recorded</text></svg>\n");
        };
        let total = last.seconds_since(first).max(1e-9);
        let x = |t: Stamp| LEFT + t.seconds_since(first) / total * (WIDTH - LEFT - 10.0);
        let mut out = String::new();
        let _ = writeln!(
            out,
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"11\">",
            4.0 * ROW + 30.0
        );
        for (row, label) in ["compute", "copy", "stalls"].iter().enumerate() {
            let _ = writeln!(
                out,
                "<text x=\"4\" y=\"{}\">{label}</text>",
                10.0 + row as f64 * ROW + ROW / 2.0 + 4.0
            );
        }
        let mut compute: Vec<&Span> = self
            .spans
            .iter()
            .filter(|s| s.track == Track::Compute)
            .collect();
        compute.sort_by_key(|s| s.start);
        for span in &self.spans {
            let (row, color) = match span.track {
                Track::Compute => (0.0, "#4878d0"),
                Track::Copy => (1.0, "#6acc64"),
            };
            let _ = writeln!(
                out,
                "<rect x=\"{:.2}\" y=\"{}\" width=\"{:.2}\" height=\"{}\" fill=\"{color}\"><title>{} {} ({} bytes)</title></rect>",
                x(span.start),
                10.0 + row * ROW,
                (x(span.end) - x(span.start)).max(0.5),
                ROW - 6.0,
                xml_escape(&span.name),
                span.what,
                span.bytes
            );
        }
        for pair in compute.windows(2) {
            let (gap_start, gap_end) = (pair[0].end, pair[1].start);
            let copying = self
                .spans
                .iter()
                .any(|s| s.track == Track::Copy && s.start < gap_end && s.end > gap_start);
            if gap_end > gap_start && copying {
                let _ = writeln!(
                    out,
                    "<rect x=\"{:.2}\" y=\"{}\" width=\"{:.2}\" height=\"{}\" fill=\"#d65f5f\"><title>stall before {}</title></rect>",
                    x(gap_start),
                    10.0 + 2.0 * ROW,
                    (x(gap_end) - x(gap_start)).max(0.5),
                    ROW - 6.0,
                    xml_escape(&pair[1].name)
                );
            }
        }
        let axis_y = 10.0 + 3.0 * ROW;
        let _ = writeln!(
            out,
            "<line x1=\"{LEFT}\" y1=\"{axis_y}\" x2=\"{}\" y2=\"{axis_y}\" stroke=\"black\"/>",
            WIDTH - 10.0
        );
        for tick in 0..=10 {
            let tx = LEFT + tick as f64 / 10.0 * (WIDTH - LEFT - 10.0);
            let _ = writeln!(
                out,
                "<line x1=\"{tx:.2}\" y1=\"{axis_y}\" x2=\"{tx:.2}\" y2=\"{}\" stroke=\"black\"/><text x=\"{tx:.2}\" y=\"{}\" text-anchor=\"middle\">{:.1} ms</text>",
                axis_y + 5.0,
                axis_y + 18.0,
                total * 1000.0 * tick as f64 / 10.0
            );
        }
        out.push_str("</svg>\n");
        out
    }
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
    fn the_svg_shows_both_tracks_and_marks_a_stall() {
        let mut trace = Trace::default();
        let t0 = trace.origin;
        trace.record(span(Track::Compute, "a<1>", 0, 10, t0));
        trace.record(span(Track::Copy, "b", 8, 20, t0));
        // Compute waits from 10 to 20 ms for b's copy: a stall.
        trace.record(span(Track::Compute, "b", 20, 30, t0));
        let svg = trace.to_svg();
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert_eq!(svg.matches("#4878d0").count(), 2, "two compute spans");
        assert_eq!(svg.matches("#6acc64").count(), 1, "one copy span");
        assert_eq!(svg.matches("stall before b").count(), 1);
        assert!(svg.contains("a&lt;1&gt;"), "names are escaped");
        assert!(svg.contains("30.0 ms"), "the axis spans the whole run");
        assert!(Trace::default().to_svg().contains("no spans recorded"));
    }
}
