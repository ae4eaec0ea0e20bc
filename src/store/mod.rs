//! A host store: one copy in host memory of each layer's host-tier bytes, shared by every context
//! that uses it, so that N contexts (one per GPU, say) over one checkpoint hold the host tier
//! once, read it from disk once and pin it once.
//!
//! A store within one process (`local`) keeps each copy for as long as a context holds it,
//! counted against the store's own `host_limit`. A named store (`named`) lives in a shared-memory
//! file that every process on the machine attaching the same name maps; its layers stay until
//! the last process detaches, which removes it.
//!
//! The first user of a layer fills it (reads the checkpoint, converts into the tier's form); a
//! user arriving meanwhile waits for that fill, never starts a second one. A layer's bytes are
//! handed out only once complete, and never change afterwards.

mod key;
mod local;
mod named;
#[cfg(test)]
mod tests;

pub use key::LayerKey;

use crate::backend::Backend;
use crate::error::Result;
use std::any::Any;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// What pinning a host range returned (`Backend::pin_host`): unpins when dropped.
pub type PinGuard = Box<dyn Any + Send + Sync>;
/// Where a layer's lasting pin is kept: empty until a user whose backend pins comes.
pub type PinSlot = Mutex<Option<PinGuard>>;

/// Where named stores live unless the caller says otherwise.
pub const DEFAULT_DIR: &str = "/dev/shm";

#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Bytes of host memory the store may hold (`u64::MAX`: no limit). A named store reserves
    /// this much when it is created; unlimited there means the checkpoint's size.
    pub host_limit: u64,
    /// None: a store within this process. Some: a named store shared by processes.
    pub name: Option<String>,
    /// The checkpoint a named store holds layers of: its files' identities are recorded at
    /// creation and compared at every attach.
    pub checkpoint: Option<PathBuf>,
    /// The directory of named stores' files.
    pub dir: PathBuf,
    /// Permissions of a named store's file when this process creates it.
    pub mode: u32,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            host_limit: u64::MAX,
            name: None,
            checkpoint: None,
            dir: PathBuf::from(DEFAULT_DIR),
            mode: 0o600,
        }
    }
}

/// A snapshot of a store's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Bytes of layers held now (a named store: by every process together), and at most so far.
    pub host_in_use: u64,
    pub host_peak: u64,
    pub host_limit: u64,
    /// Layers held now.
    pub layers: u64,
    /// Layers filled from the checkpoint (a named store: by every process), and their bytes.
    pub fills: u64,
    pub bytes_filled: u64,
    /// Layers this process got from the store without filling them.
    pub shared: u64,
    /// Times a user in this process waited for another's fill.
    pub waits: u64,
    /// Fills taken over from a process that died while filling (named stores).
    pub takeovers: u64,
    /// Whether this process created the named store (false: it attached to one).
    pub created: bool,
}

/// Counters a store keeps within this process.
#[derive(Default)]
struct ProcessCounters {
    shared: AtomicU64,
    waits: AtomicU64,
}

/// A store, within this process or named. Thread-safe.
pub struct Store {
    kind: Kind,
    counters: ProcessCounters,
}

enum Kind {
    Local(local::LocalStore),
    Named(named::NamedStore),
}

/// One layer's bytes in a store, complete and unchanging for as long as the lease lives.
pub struct Lease(Arc<dyn Held>);

/// What a lease keeps alive: a layer's bytes, and the slot for the pin that covers them.
trait Held: Send + Sync {
    fn bytes(&self) -> &[u8];
    /// The pin made by the first user that could pin the bytes, kept while the bytes live.
    fn pin_slot(&self) -> &PinSlot;
}

impl Lease {
    pub fn as_slice(&self) -> &[u8] {
        self.0.bytes()
    }

    /// Pins the bytes for `backend`'s uploads. The range is registered once, portably, for every
    /// CUDA context of the process, by the first user whose backend pins; that pin lives with the
    /// bytes, not with its context, so no context unpins a range another still uploads from.
    /// Users before it (a CPU context, a refused pin) leave the slot empty for the next to try.
    /// What this returns is the caller's own record of that pin, dropped before its lease; None
    /// while there is none (the caller stages its uploads). Both are made under the slot's lock,
    /// so a record never owns a registration: one made beside an empty slot would, and its
    /// context would unregister the range when it left, under the others' uploads.
    pub fn pin_for(&self, backend: &dyn Backend) -> Option<PinGuard> {
        let bytes = self.0.bytes();
        let mut lasting = self
            .0
            .pin_slot()
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if lasting.is_none() {
            *lasting = backend.pin_host(bytes);
        }
        lasting.as_ref()?;
        backend.pin_host(bytes)
    }
}

impl Store {
    pub fn open(options: &StoreOptions) -> Result<Arc<Store>> {
        let kind = match &options.name {
            None => Kind::Local(local::LocalStore::new(options.host_limit)),
            Some(name) => Kind::Named(named::NamedStore::open(name, options)?),
        };
        Ok(Arc::new(Store {
            kind,
            counters: ProcessCounters::default(),
        }))
    }

    /// The layer `key` names, `size` bytes: held already, or filled now by `fill` (which writes
    /// every byte of the buffer it is given), or filled by another user meanwhile, whose fill this
    /// waits for. None when the store does not hold layers of the key's files (a named store made
    /// for another checkpoint): the caller keeps a copy of its own.
    pub fn layer(
        &self,
        key: &LayerKey,
        size: usize,
        fill: impl FnOnce(&mut [u8]) -> Result<()>,
    ) -> Result<Option<Lease>> {
        let mut fill = Some(fill);
        let mut run_fill = |buffer: &mut [u8]| {
            let fill = fill
                .take()
                .expect("a store fills a layer at most once per call");
            fill(buffer)
        };
        let got = match &self.kind {
            Kind::Local(store) => Some(store.layer(key, size, &mut run_fill)?),
            Kind::Named(store) => store.layer(key, size, &mut run_fill)?,
        };
        if let Some(got) = &got {
            if !got.filled {
                self.counters.shared.fetch_add(1, Ordering::Relaxed);
            }
            if got.waited {
                self.counters.waits.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(got.map(|got| got.lease))
    }

    pub fn stats(&self) -> StoreStats {
        let mut stats = match &self.kind {
            Kind::Local(store) => store.stats(),
            Kind::Named(store) => store.stats(),
        };
        stats.shared = self.counters.shared.load(Ordering::Relaxed);
        stats.waits = self.counters.waits.load(Ordering::Relaxed);
        stats
    }
}

/// What one request for a layer got.
struct Got {
    lease: Lease,
    /// This call filled it.
    filled: bool,
    /// This call waited for another user's fill.
    waited: bool,
}
