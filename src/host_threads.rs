//! The host threads that convert and quantize large tensors.
//!
//! One persistent pool per thread count, process-wide: contexts asking for the same count (the
//! usual case: all of them take the default) share one, so a process never runs more conversion
//! threads than the CPUs it may use, however many contexts it opens. A pool is built on first
//! use and lives until the process ends; no call spawns a thread.
//!
//! The default count is the CPUs this process may use: `std::thread::available_parallelism`,
//! which on Linux honours the affinity mask (sched_getaffinity) and a cgroup v2 `cpu.max` or v1
//! `cpu.cfs_quota_us` quota. `STRATA_HOST_THREADS` replaces it, and a context's `host_threads`
//! option replaces both.
//!
//! rayon provides the pools: its scoped spawns let the workers borrow the caller's slices, which
//! a pool of our own could only do with unsafe lifetime erasure.

use std::sync::{Arc, Mutex, OnceLock};

use crate::trace::{self, Span, Stamp, Track};

/// Work smaller than this (bytes read or written, whichever is larger) stays on the calling
/// thread: waking a worker costs more than converting it.
pub(crate) const PARALLEL_MIN_BYTES: usize = 1 << 20;

/// Most threads a pool may have, whatever the option or variable asks.
const MAX_THREADS: usize = 256;

/// The thread count a context gets for its `host_threads` option (0 = the default).
pub fn resolve(option: u32) -> usize {
    match option {
        0 => default_threads(),
        n => (n as usize).min(MAX_THREADS),
    }
}

/// `STRATA_HOST_THREADS` if set to a positive number, else the CPUs this process may use.
pub fn default_threads() -> usize {
    static DEFAULT: OnceLock<usize> = OnceLock::new();
    *DEFAULT.get_or_init(|| {
        let from_env = std::env::var("STRATA_HOST_THREADS")
            .ok()
            .and_then(|value| value.trim().parse::<usize>().ok())
            .filter(|&n| n > 0);
        from_env
            .or_else(|| std::thread::available_parallelism().ok().map(usize::from))
            .unwrap_or(1)
            .min(MAX_THREADS)
    })
}

/// Runs `work` on every item of `parts`, on the calling thread and up to `threads - 1` workers of
/// the shared pool of `threads`; with one thread or one part, on the calling thread alone.
/// Returns when all are done.
///
/// Each thread takes the next part until none is left, the caller from the start: a worker
/// asleep when the call comes (the pool idles between layers) takes a while to wake, up to a
/// millisecond on a VM, and meanwhile the caller works instead of waiting; parts split finer than
/// one per thread go to whoever is free. With one part per worker and the caller waiting, the two
/// 4 MiB halves of a cast ran one after the other on one worker, 1.7 ms instead of 0.85, whenever
/// the disk had kept the pool idle before it.
///
/// Each part run on a pool worker is a span of the timeline on that worker's `Track::Convert`
/// row (see [`trace::record_pool_span`]), named `label`, with the bytes `work` returns (what it
/// wrote, or read if it writes nothing). Parts run on the calling thread are inside the caller's
/// own span.
pub fn run_parts<T: Send>(
    threads: usize,
    label: &'static str,
    parts: Vec<T>,
    work: impl Fn(T) -> usize + Sync,
) {
    if threads <= 1 || parts.len() <= 1 {
        for part in parts {
            work(part);
        }
        return;
    }
    let helpers = (threads - 1).min(parts.len() - 1);
    let queue = Mutex::new(parts.into_iter());
    // Taking the next part cannot panic, so the lock is never poisoned.
    let next = || queue.lock().unwrap_or_else(|p| p.into_inner()).next();
    let Some(pool) = pool(threads) else {
        while let Some(part) = next() {
            work(part);
        }
        return;
    };
    let (work, next) = (&work, &next);
    pool.in_place_scope(|scope| {
        for _ in 0..helpers {
            scope.spawn(move |_| {
                while let Some(part) = next() {
                    let start = Stamp::now();
                    let bytes = work(part);
                    let worker = rayon::current_thread_index().unwrap_or(0);
                    trace::record_pool_span(Span {
                        track: Track::Convert(u16::try_from(worker).unwrap_or(u16::MAX)),
                        name: label.into(),
                        what: "convert",
                        start,
                        end: Stamp::now(),
                        bytes: bytes as u64,
                    });
                }
            });
        }
        while let Some(part) = next() {
            work(part);
        }
    });
}

/// The process-wide pool of `threads` workers, built on first use; `None` if the system refused
/// the threads (the caller then does the work itself).
fn pool(threads: usize) -> Option<Arc<rayon::ThreadPool>> {
    static POOLS: Mutex<Vec<(usize, Arc<rayon::ThreadPool>)>> = Mutex::new(Vec::new());
    let mut pools = POOLS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((_, pool)) = pools.iter().find(|(size, _)| *size == threads) {
        return Some(pool.clone());
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|index| format!("strata-host-{index}"))
        .build()
        .ok()?;
    let pool = Arc::new(pool);
    pools.push((threads, pool.clone()));
    Some(pool)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    #[test]
    fn the_option_replaces_the_default_within_bounds() {
        assert!(default_threads() >= 1);
        assert_eq!(resolve(0), default_threads());
        assert_eq!(resolve(3), 3);
        assert_eq!(resolve(100_000), MAX_THREADS);
    }

    /// Waits (up to 10 s, however loaded the machine) until `flag` is set.
    fn wait_for(flag: &AtomicBool) {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !flag.load(Ordering::Relaxed) && std::time::Instant::now() < until {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    #[test]
    fn every_part_runs_once_on_the_caller_or_the_pool_and_the_pool_persists() {
        let runs: Vec<AtomicUsize> = (0..10).map(|_| AtomicUsize::new(0)).collect();
        let threads = Mutex::new(Vec::new());
        let caller = std::thread::current().id();
        let (caller_took_one, worker_took_one) = (AtomicBool::new(false), AtomicBool::new(false));
        run_parts(3, "count", runs.iter().collect(), |count| {
            count.fetch_add(1, Ordering::Relaxed);
            let thread = std::thread::current();
            let on_caller = thread.id() == caller;
            let on_pool = thread.name().is_some_and(|n| n.starts_with("strata-host-"));
            threads.lock().unwrap().push((on_caller, on_pool));
            // Each side, having taken a part, waits for the other to take one: both do, if
            // both take parts at all, however slowly a worker wakes.
            let (mine, theirs) = match on_caller {
                true => (&caller_took_one, &worker_took_one),
                false => (&worker_took_one, &caller_took_one),
            };
            mine.store(true, Ordering::Relaxed);
            wait_for(theirs);
            0
        });
        assert!(runs.iter().all(|count| count.load(Ordering::Relaxed) == 1));
        let threads = threads.into_inner().unwrap();
        assert!(threads.iter().all(|&(caller, pool)| caller != pool));
        assert!(threads.iter().any(|&(caller, _)| caller));
        assert!(threads.iter().any(|&(_, pool)| pool));
        let first = pool(3).unwrap();
        assert!(Arc::ptr_eq(&first, &pool(3).unwrap()));
    }

    #[test]
    fn each_part_run_on_the_pool_is_a_span_on_its_workers_row_of_the_timeline() {
        let trace = trace::Trace::default();
        let sizes = vec![1000usize, 2000, 3000, 4000, 5000, 6000];
        let caller = std::thread::current().id();
        let off_caller = Mutex::new(Vec::new());
        let worker_took_one = AtomicBool::new(false);
        run_parts(2, "timeline test part", sizes.clone(), |bytes| {
            if std::thread::current().id() == caller {
                // A worker gets some, however slowly it wakes.
                wait_for(&worker_took_one);
            } else {
                off_caller.lock().unwrap().push(bytes);
                worker_took_one.store(true, Ordering::Relaxed);
            }
            bytes
        });
        let json = trace.to_chrome_json(&[]);
        let parts: Vec<&str> = json
            .lines()
            .filter(|line| line.contains("\"name\":\"timeline test part\",\"cat\":\"convert\""))
            .collect();
        // Exactly the parts a worker ran, each with its bytes; the caller's are not pool spans.
        let off_caller = off_caller.into_inner().unwrap();
        assert!(!off_caller.is_empty());
        assert_eq!(parts.len(), off_caller.len(), "{json}");
        for bytes in off_caller {
            let args = format!("\"args\":{{\"bytes\":{bytes}}}");
            assert!(parts.iter().any(|line| line.contains(&args)), "{json}");
        }
        // Workers 0 and 1 of the pool are tracks 10 and 11, named for the timeline.
        assert!(parts
            .iter()
            .all(|line| line.contains("\"tid\":10,") || line.contains("\"tid\":11,")));
        assert!(
            json.contains("\"args\":{\"name\":\"convert 0\"}")
                || json.contains("\"args\":{\"name\":\"convert 1\"}")
        );
        assert!(trace.to_svg(&[]).contains("timeline test part"));
        // A trace begun later shows none of it; work on the calling thread is no pool span.
        let later = trace::Trace::default();
        run_parts(1, "timeline test part", vec![10usize], |bytes| bytes);
        assert!(!later.to_chrome_json(&[]).contains("timeline test part"));
    }

    #[test]
    fn one_thread_or_one_part_stays_on_the_calling_thread() {
        let caller = std::thread::current().id();
        let on_caller = |()| {
            assert_eq!(std::thread::current().id(), caller);
            0
        };
        run_parts(1, "caller", vec![(); 4], on_caller);
        run_parts(4, "caller", vec![()], on_caller);
    }
}
