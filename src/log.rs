//! What strata tells the engine author: log messages (to a callback, or to stderr when `STRATA_LOG`
//! is set) and progress reports.
//!
//! Messages are often produced while the context's lock is held (an eviction, a refusal). A
//! callback run there could not call back into strata without deadlocking, so messages for a
//! callback are queued and delivered by `Logger::flush`, which the C ABI runs when each call on the
//! context returns, outside every lock. Messages for stderr are written at once.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Error,
    Warn,
    Info,
    Debug,
}

impl Level {
    fn name(self) -> &'static str {
        match self {
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
        }
    }

    /// `STRATA_LOG`'s value: a level name, any case.
    fn parse(text: &str) -> Option<Level> {
        [Level::Error, Level::Warn, Level::Info, Level::Debug]
            .into_iter()
            .find(|l| text.trim().eq_ignore_ascii_case(l.name()))
    }
}

/// A function that receives one log message.
pub type LogFn = dyn Fn(Level, &str) + Send + Sync;

/// A function that receives progress: (phase, done, total).
pub type ProgressFn = dyn Fn(&str, u64, u64) + Send + Sync;

/// Where the engine wants messages: called with every level, on a thread that is calling strata,
/// never while strata holds a lock.
#[derive(Clone)]
pub struct LogCallback(pub Arc<LogFn>);

impl fmt::Debug for LogCallback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LogCallback")
    }
}

/// Messages a callback has not been given yet; bounded, so a Rust caller that never flushes
/// cannot grow it without end.
const QUEUE_LIMIT: usize = 1024;

#[derive(Default)]
struct Queue {
    messages: VecDeque<(Level, String)>,
    dropped: u64,
}

enum Sink {
    Silent,
    Stderr(Level),
    Callback(LogCallback, Mutex<Queue>),
}

/// A context's log: a callback, else stderr up to the level `STRATA_LOG` names, else nothing.
pub(crate) struct Logger {
    sink: Sink,
    /// Whether the queue may hold messages: lets `flush` skip the queue's lock on every call.
    pending: AtomicBool,
}

impl Logger {
    pub fn new(callback: Option<LogCallback>) -> Logger {
        let level = std::env::var("STRATA_LOG").ok();
        Self::with(callback, level.as_deref().and_then(Level::parse))
    }

    fn with(callback: Option<LogCallback>, stderr: Option<Level>) -> Logger {
        let sink = match (callback, stderr) {
            (Some(callback), _) => Sink::Callback(callback, Mutex::default()),
            (None, Some(level)) => Sink::Stderr(level),
            (None, None) => Sink::Silent,
        };
        Logger {
            sink,
            pending: AtomicBool::new(false),
        }
    }

    /// Records a message; `message` is only formatted when someone will read it. Safe to call
    /// with the context's lock held.
    pub fn log(&self, level: Level, message: impl FnOnce() -> String) {
        match &self.sink {
            Sink::Silent => {}
            Sink::Stderr(max) => {
                if level <= *max {
                    eprintln!("strata {}: {}", level.name(), message());
                }
            }
            Sink::Callback(_, queue) => {
                let mut queue = queue.lock().unwrap_or_else(|p| p.into_inner());
                if queue.messages.len() < QUEUE_LIMIT {
                    queue.messages.push_back((level, message()));
                } else {
                    queue.dropped += 1;
                }
                self.pending.store(true, Ordering::Release);
            }
        }
    }

    /// Hands queued messages to the callback. Call only where no strata lock is held: the
    /// callback may call back into strata (and log more, which a nested flush delivers).
    #[inline]
    pub fn flush(&self) {
        // Every C call ends here, and nearly always with nothing queued: a plain load decides.
        if self.pending.load(Ordering::Acquire) {
            self.deliver();
        }
    }

    #[cold]
    fn deliver(&self) {
        let Sink::Callback(callback, queue) = &self.sink else {
            return;
        };
        if !self.pending.swap(false, Ordering::AcqRel) {
            return;
        }
        let Queue { messages, dropped } =
            std::mem::take(&mut *queue.lock().unwrap_or_else(|p| p.into_inner()));
        if dropped > 0 {
            (callback.0)(
                Level::Warn,
                &format!("{dropped} log messages were dropped: the queue was not flushed"),
            );
        }
        for (level, message) in messages {
            (callback.0)(level, &message);
        }
    }
}

/// Where progress of long operations goes: `report(phase, done, total)`, e.g. ("onload", 3, 40).
/// Call only where no strata lock is held, as the callback may call back into strata.
#[derive(Clone, Default)]
pub struct ProgressSink(pub Option<Arc<ProgressFn>>);

impl ProgressSink {
    pub fn report(&self, phase: &str, done: u64, total: u64) {
        if let Some(callback) = &self.0 {
            callback(phase, done, total);
        }
    }
}

impl fmt::Debug for ProgressSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "ProgressSink(callback)"
        } else {
            "ProgressSink(none)"
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Seen = Arc<Mutex<Vec<(Level, String)>>>;

    fn recording() -> (LogCallback, Seen) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let callback = LogCallback(Arc::new(move |level, message: &str| {
            sink.lock().unwrap().push((level, message.to_owned()))
        }));
        (callback, seen)
    }

    #[test]
    fn a_callback_gets_every_level_only_when_flushed() {
        let (callback, seen) = recording();
        let logger = Logger::with(Some(callback), Some(Level::Error));
        logger.log(Level::Debug, || "evicted".into());
        logger.log(Level::Warn, || "overcommit".into());
        assert!(seen.lock().unwrap().is_empty());
        logger.flush();
        assert_eq!(
            *seen.lock().unwrap(),
            [
                (Level::Debug, "evicted".to_string()),
                (Level::Warn, "overcommit".to_string())
            ]
        );
        logger.flush();
        assert_eq!(seen.lock().unwrap().len(), 2);
    }

    #[test]
    fn an_unflushed_queue_stays_bounded_and_says_what_it_dropped() {
        let (callback, seen) = recording();
        let logger = Logger::with(Some(callback), None);
        for i in 0..QUEUE_LIMIT + 5 {
            logger.log(Level::Info, || i.to_string());
        }
        logger.flush();
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), QUEUE_LIMIT + 1);
        assert_eq!(
            seen[0],
            (
                Level::Warn,
                "5 log messages were dropped: the queue was not flushed".into()
            )
        );
    }

    #[test]
    fn silent_loggers_never_format() {
        let logger = Logger::with(None, None);
        logger.log(Level::Error, || unreachable!("nobody reads it"));
        let logger = Logger::with(None, Some(Level::Warn));
        logger.log(Level::Debug, || unreachable!("below STRATA_LOG's level"));
    }

    #[test]
    fn strata_log_names_levels_in_any_case() {
        assert_eq!(Level::parse("DEBUG"), Some(Level::Debug));
        assert_eq!(Level::parse(" warn\n"), Some(Level::Warn));
        assert_eq!(Level::parse("verbose"), None);
    }
}
