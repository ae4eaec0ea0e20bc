//! A bounded timeline of compute and copy spans, written as Chrome-trace JSON (Perfetto opens it).

use std::fmt::Write as _;
use std::time::Instant;

/// Spans kept at most; older ones are dropped first so a long run cannot grow without bound.
const MAX_SPANS: usize = 1 << 18;

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
    pub start: Instant,
    pub end: Instant,
    pub bytes: u64,
}

pub struct Trace {
    origin: Instant,
    spans: std::collections::VecDeque<Span>,
    dropped: u64,
}

impl Default for Trace {
    fn default() -> Self {
        Trace {
            origin: Instant::now(),
            spans: Default::default(),
            dropped: 0,
        }
    }
}

impl Trace {
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
        let micros =
            |t: Instant| t.saturating_duration_since(self.origin).as_nanos() as f64 / 1000.0;
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

/// A JSON string literal for `s`.
pub fn json_string(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}
