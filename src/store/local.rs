//! A store within one process: each layer's copy lives for as long as some context holds it,
//! charged once to the store's own host limit.

use super::{Got, Held, LayerKey, Lease, PinSlot, StoreStats};
use crate::error::Result;
use crate::host::{CountedBuffer, MemoryCounter};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError, Weak};

pub(super) struct LocalStore(Arc<Shared>);

struct Shared {
    host: Arc<MemoryCounter>,
    /// Every layer some user holds or is filling. Weak: a layer is freed with its last lease,
    /// and then takes its entry out of the map.
    layers: Mutex<HashMap<LayerKey, Weak<Entry>>>,
    fills: AtomicU64,
    bytes_filled: AtomicU64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Fill {
    Running,
    Ready,
    /// The filler failed or panicked: its entry left the map, and waiters try again.
    Failed,
}

struct Entry {
    /// Declared before `bytes`, so the pin goes before the memory it covers.
    pin: PinSlot,
    bytes: OnceLock<CountedBuffer>,
    fill: Mutex<Fill>,
    done: Condvar,
    key: LayerKey,
    store: Weak<Shared>,
}

impl Held for Entry {
    fn bytes(&self) -> &[u8] {
        self.bytes
            .get()
            .expect("leases are made of filled entries only")
            .buffer
            .as_slice()
    }
    fn pin_slot(&self) -> &PinSlot {
        &self.pin
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        if let Some(store) = self.store.upgrade() {
            let mut layers = store.lock();
            // A new entry for the same key, made once this one's last lease went, stays.
            if layers.get(&self.key).is_some_and(|w| w.strong_count() == 0) {
                layers.remove(&self.key);
            }
        }
    }
}

/// Ends a fill: Ready when `succeeded`, else (an error or a panic) Failed, after taking the
/// entry out of the map so that the next user starts afresh.
struct Filling<'a> {
    entry: &'a Arc<Entry>,
    store: &'a Shared,
    succeeded: bool,
}

impl Drop for Filling<'_> {
    fn drop(&mut self) {
        if !self.succeeded {
            let mut layers = self.store.lock();
            if layers
                .get(&self.entry.key)
                .is_some_and(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(self.entry)))
            {
                layers.remove(&self.entry.key);
            }
        }
        let mut fill = self
            .entry
            .fill
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *fill = match self.succeeded {
            true => Fill::Ready,
            false => Fill::Failed,
        };
        self.entry.done.notify_all();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, HashMap<LayerKey, Weak<Entry>>> {
        self.layers.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl LocalStore {
    pub(super) fn new(host_limit: u64) -> LocalStore {
        LocalStore(Arc::new(Shared {
            host: Arc::new(MemoryCounter::with_limit(host_limit)),
            layers: Mutex::new(HashMap::new()),
            fills: AtomicU64::new(0),
            bytes_filled: AtomicU64::new(0),
        }))
    }

    pub(super) fn layer(
        &self,
        key: &LayerKey,
        size: usize,
        fill: &mut dyn FnMut(&mut [u8]) -> Result<()>,
    ) -> Result<Got> {
        let store = &self.0;
        let mut waited = false;
        loop {
            let mut layers = store.lock();
            if let Some(entry) = layers.get(key).and_then(Weak::upgrade) {
                drop(layers);
                let mut state = entry.fill.lock().unwrap_or_else(PoisonError::into_inner);
                while *state == Fill::Running {
                    waited = true;
                    state = entry
                        .done
                        .wait(state)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                if *state == Fill::Ready {
                    drop(state);
                    return Ok(Got {
                        lease: Lease(entry),
                        filled: false,
                        waited,
                    });
                }
                // Failed: gone from the map; this call fills it instead.
                continue;
            }
            let mut buffer = CountedBuffer::new(size, &store.host)
                .map_err(|e| e.context("the host store has no room for the layer"))?;
            let entry = Arc::new(Entry {
                pin: PinSlot::default(),
                bytes: OnceLock::new(),
                fill: Mutex::new(Fill::Running),
                done: Condvar::new(),
                key: key.clone(),
                store: Arc::downgrade(store),
            });
            layers.insert(key.clone(), Arc::downgrade(&entry));
            drop(layers);
            let mut filling = Filling {
                entry: &entry,
                store,
                succeeded: false,
            };
            fill(buffer.buffer.as_mut_slice())?;
            store.fills.fetch_add(1, Ordering::Relaxed);
            store.bytes_filled.fetch_add(size as u64, Ordering::Relaxed);
            if entry.bytes.set(buffer).is_err() {
                unreachable!("only the entry's filler sets its bytes");
            }
            filling.succeeded = true;
            drop(filling);
            return Ok(Got {
                lease: Lease(entry),
                filled: true,
                waited,
            });
        }
    }

    pub(super) fn stats(&self) -> StoreStats {
        let store = &self.0;
        let layers = store
            .lock()
            .values()
            .filter(|w| w.strong_count() > 0)
            .count();
        StoreStats {
            host_in_use: store.host.in_use(),
            host_peak: store.host.peak(),
            host_limit: store.host.limit(),
            layers: layers as u64,
            fills: store.fills.load(Ordering::Relaxed),
            bytes_filled: store.bytes_filled.load(Ordering::Relaxed),
            created: true,
            ..StoreStats::default()
        }
    }
}
