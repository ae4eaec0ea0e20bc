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

/// Runs `work` on every item of `parts`, on up to `threads` threads of the shared pool of that
/// size; with one thread or one part, on the calling thread. Returns when all are done.
pub fn run_parts<T: Send>(threads: usize, parts: Vec<T>, work: impl Fn(T) + Sync) {
    if threads <= 1 || parts.len() <= 1 {
        parts.into_iter().for_each(work);
        return;
    }
    let Some(pool) = pool(threads) else {
        parts.into_iter().for_each(work);
        return;
    };
    let work = &work;
    pool.scope(|scope| {
        for part in parts {
            scope.spawn(move |_| work(part));
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
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn the_option_replaces_the_default_within_bounds() {
        assert!(default_threads() >= 1);
        assert_eq!(resolve(0), default_threads());
        assert_eq!(resolve(3), 3);
        assert_eq!(resolve(100_000), MAX_THREADS);
    }

    #[test]
    fn every_part_runs_once_on_the_pool_and_the_pool_persists() {
        let runs: Vec<AtomicUsize> = (0..10).map(|_| AtomicUsize::new(0)).collect();
        let names = Mutex::new(Vec::new());
        run_parts(3, runs.iter().collect(), |count| {
            count.fetch_add(1, Ordering::Relaxed);
            let name = std::thread::current().name().map(str::to_owned);
            names.lock().unwrap().push(name);
        });
        assert!(runs.iter().all(|count| count.load(Ordering::Relaxed) == 1));
        assert!(names.into_inner().unwrap().iter().all(|name| name
            .as_deref()
            .is_some_and(|n| n.starts_with("strata-host-"))));
        let first = pool(3).unwrap();
        assert!(Arc::ptr_eq(&first, &pool(3).unwrap()));
    }

    #[test]
    fn one_thread_or_one_part_stays_on_the_calling_thread() {
        let caller = std::thread::current().id();
        run_parts(1, vec![(); 4], |()| {
            assert_eq!(std::thread::current().id(), caller)
        });
        run_parts(4, vec![()], |()| {
            assert_eq!(std::thread::current().id(), caller)
        });
    }
}
