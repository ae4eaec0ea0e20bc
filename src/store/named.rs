//! A named store: a file in shared memory (`/dev/shm/strata-NAME`) that every process attaching
//! the same name maps, so that the processes of one machine hold a checkpoint's host tier once
//! and read it from disk once.
//!
//! The file is a header (version, the checkpoint files' identities, sizes), a table of layers,
//! and the layers' bytes. It is made complete under a temporary name, reserved in full with
//! `posix_fallocate` (so a /dev/shm too small fails at creation, never with a SIGBUS later), and
//! only then linked under its name: a process never sees a half-made store, and of two racing
//! to create one, one links it and the other attaches to it.
//!
//! Every attached process holds a shared `flock` on the file. A process that finds the file with
//! no holder knows its makers are gone (a crashed run): it removes it and makes a new one rather
//! than trust it. The last process out, the one that can take the lock exclusively, removes it.
//!
//! Each layer's table slot has one state word: empty, claimed, filling or ready, with the
//! process (pid and start time) that claimed or fills it. Bytes are handed out only once the
//! word says ready (stored with release, loaded with acquire), so a filler that died mid-fill
//! never hands out partial bytes: the next process to need the layer sees its filler gone and
//! fills it again. Every process maps the bytes read-only; a fill writes through a mapping of
//! its own layer's range, unmapped once written.

use super::{Got, Held, LayerKey, Lease, PinSlot, StoreOptions, StoreStats};
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use std::ffi::CString;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

const MAGIC: [u8; 8] = *b"STRATAST";
/// The file's layout; bumped with any change to it.
const LAYOUT: u32 = 1;
/// The strata version that made a store, compared at attach: another version may lay layers
/// out differently.
const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Layer slots per checkpoint tensor: room for each tensor in two forms.
const SLOTS_PER_TENSOR: u64 = 2;
/// A layer's table slot and key, beside its bytes, in a store sized from the checkpoint.
const LAYER_OVERHEAD: u64 = 4096 + 256;

#[repr(C)]
struct Header {
    magic: [u8; 8],
    layout: u32,
    identity_count: u32,
    version: [u8; 16],
    identities_offset: u64,
    table_offset: u64,
    table_slots: u64,
    data_offset: u64,
    data_capacity: u64,
    /// Bytes of the data region handed out to layers so far.
    next_free: AtomicU64,
    fills: AtomicU64,
    bytes_filled: AtomicU64,
    takeovers: AtomicU64,
    layers: AtomicU64,
}

#[repr(C)]
struct Slot {
    /// `EMPTY`, or one of `CLAIMED`, `FILLING`, `READY` with the owner's bits (see `owner_bits`).
    state: AtomicU64,
    hash: AtomicU64,
    key_len: AtomicU64,
    /// Within the data region, like `data_offset` (page-aligned).
    key_offset: AtomicU64,
    data_offset: AtomicU64,
    data_len: AtomicU64,
    _reserved: [u64; 2],
}

const EMPTY: u64 = 0;
/// Taken by a process that is writing the slot's key and reserving its bytes.
const CLAIMED: u64 = 1;
/// Key written; the bytes are being filled by the owner.
const FILLING: u64 = 2;
/// Bytes complete; they never change again.
const READY: u64 = 3;
const STATE_BITS: u64 = 3;

/// The process this one is, as a state word records it.
fn me() -> u64 {
    static ME: OnceLock<u64> = OnceLock::new();
    *ME.get_or_init(|| {
        let pid = std::process::id();
        owner_bits(pid, process_start(pid).map_or(0, |(start, _)| start))
    })
}

/// pid (22 bits: Linux's pid_max is at most 2^22) and the low 40 bits of its start time in
/// clock ticks, above the 2 state bits: pid and start time together tell a process from a later
/// one given the same pid.
fn owner_bits(pid: u32, start: u64) -> u64 {
    ((start & ((1 << 40) - 1)) << 24) | ((u64::from(pid) & ((1 << 22) - 1)) << 2)
}

/// A process's start time (clock ticks after boot) and whether it has ended (a zombie not yet
/// reaped), from /proc; None when there is no such process.
fn process_start(pid: u32) -> Option<(u64, bool)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, in parentheses, may hold spaces: fields are counted after it.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ended = matches!(fields.first(), Some(&"Z") | Some(&"X"));
    // Field 22 of stat(5), the 20th after the name.
    Some((fields.get(19)?.parse().ok()?, ended))
}

/// Whether the process a state word names is still running. Owner bits of 0 name nobody: a
/// filler that failed gives its slot up that way.
fn owner_alive(word: u64) -> bool {
    let owner = word & !STATE_BITS;
    let pid = ((owner >> 2) & ((1 << 22) - 1)) as u32;
    if pid == 0 {
        return false;
    }
    if owner == me() {
        return true;
    }
    match process_start(pid) {
        Some((start, ended)) => !ended && owner_bits(pid, start) == owner,
        None => false,
    }
}

fn page() -> u64 {
    // SAFETY: sysconf only reads a system setting.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(page).ok().filter(|&p| p > 0).unwrap_or(4096)
}

fn round_up(n: u64, to: u64) -> Option<u64> {
    n.checked_next_multiple_of(to)
}

/// A shared mapping of part of the store's file, unmapped when dropped.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory; every access to what other processes write goes
// through atomics or happens after an acquire load of the slot that published it.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(file: &File, offset: u64, len: u64, writable: bool, what: &str) -> Result<Mapping> {
        let len = usize::try_from(len)
            .map_err(|_| Error::out_of_memory(format!("{len} bytes cannot be mapped")))?;
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| Error::invalid(format!("offset {offset} is too large to map")))?;
        let protection = match writable {
            true => libc::PROT_READ | libc::PROT_WRITE,
            false => libc::PROT_READ,
        };
        // SAFETY: a new shared mapping of the file at an address the kernel picks touches no
        // existing memory; the file is at least offset + len long (reserved at creation).
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len.max(1),
                protection,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset,
            )
        };
        if addr == libc::MAP_FAILED {
            let e = std::io::Error::last_os_error();
            return Err(Error::out_of_memory(format!(
                "mapping {len} bytes of the host store ({what}): {e}"
            )));
        }
        Ok(Mapping {
            ptr: NonNull::new(addr.cast()).expect("mmap does not return null on success"),
            len,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping owns its range and unmaps it here only.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len.max(1)) };
    }
}

pub(super) struct NamedStore(Arc<Attached>);

/// This process's attachment to a store.
struct Attached {
    /// Declared first: pins go before the memory they cover is unmapped.
    pins: Vec<PinSlot>,
    /// The header and the table, read and written.
    meta: Mapping,
    /// The layers' bytes, read-only.
    data: Mapping,
    file: File,
    path: PathBuf,
    /// The checkpoint files' identities, sorted.
    identities: Vec<[u64; 5]>,
    created: bool,
}

/// A layer of a named store, leased.
struct NamedLayer {
    store: Arc<Attached>,
    index: usize,
}

impl Held for NamedLayer {
    fn bytes(&self) -> &[u8] {
        let slot = self.store.slot(self.index);
        let offset = slot.data_offset.load(Ordering::Relaxed) as usize;
        let len = slot.data_len.load(Ordering::Relaxed) as usize;
        // SAFETY: checked within the data region when the lease was made; the bytes are
        // complete (the slot was seen ready) and never written again; the mapping lives as long
        // as `store`.
        unsafe { std::slice::from_raw_parts(self.store.data.ptr.as_ptr().add(offset), len) }
    }
    fn pin_slot(&self) -> &PinSlot {
        &self.store.pins[self.index]
    }
}

/// `name` checked: what may follow "strata-" in a file name, nothing that leaves the directory.
fn check_name(name: &str) -> Result<()> {
    let fine = !name.is_empty()
        && name.len() <= 100
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    match fine {
        true => Ok(()),
        false => Err(Error::invalid(format!(
            "store name {name:?}: use 1 to 100 characters of A-Z, a-z, 0-9, '.', '_', '-', not \
             starting with '.'"
        ))),
    }
}

fn c_path(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::invalid(format!("{} holds a NUL byte", path.display())))
}

/// Whether `path` names the very file `file` is (it may have been removed or replaced since it
/// was opened).
fn still_named(file: &File, path: &Path) -> bool {
    match (file.metadata(), std::fs::symlink_metadata(path)) {
        (Ok(open), Ok(named)) => (open.dev(), open.ino()) == (named.dev(), named.ino()),
        _ => false,
    }
}

fn flock(file: &File, operation: libc::c_int) -> bool {
    // SAFETY: flock on a descriptor this process owns.
    unsafe { libc::flock(file.as_raw_fd(), operation) == 0 }
}

/// The sizes of a new store's regions: (identities, table, data) offsets and the whole file.
struct Plan {
    identities_offset: u64,
    table_offset: u64,
    table_slots: u64,
    data_offset: u64,
    data_capacity: u64,
}

impl Plan {
    fn new(identities: usize, tensors: usize, data_capacity: u64) -> Option<Plan> {
        let page = page();
        let identities_offset = round_up(std::mem::size_of::<Header>() as u64, 64)?;
        let table_offset = round_up(identities_offset + identities as u64 * 40, 64)?;
        let table_slots = (tensors as u64).checked_mul(SLOTS_PER_TENSOR)?.max(64);
        let table_bytes = table_slots.checked_mul(std::mem::size_of::<Slot>() as u64)?;
        let data_offset = round_up(table_offset.checked_add(table_bytes)?, page)?;
        Some(Plan {
            identities_offset,
            table_offset,
            table_slots,
            data_offset,
            data_capacity: round_up(data_capacity.max(1), page)?,
        })
    }

    fn file_len(&self) -> Option<u64> {
        self.data_offset.checked_add(self.data_capacity)
    }
}

impl NamedStore {
    pub(super) fn open(name: &str, options: &StoreOptions) -> Result<NamedStore> {
        check_name(name)?;
        let checkpoint_path = options.checkpoint.as_ref().ok_or_else(|| {
            Error::invalid(
                "a named store needs the checkpoint it holds (its files' identities are checked \
                 at every attach)",
            )
        })?;
        let checkpoint = Checkpoint::open(checkpoint_path)?;
        let mut identities: Vec<[u64; 5]> = checkpoint
            .files()
            .iter()
            .map(|f| f.identity_words())
            .collect();
        identities.sort_unstable();
        identities.dedup();
        let capacity = match options.host_limit {
            u64::MAX => (checkpoint.tensors().len() as u64)
                .checked_mul(LAYER_OVERHEAD)
                .and_then(|overhead| overhead.checked_add(checkpoint.total_bytes())),
            limit => Some(limit),
        };
        let plan = capacity
            .and_then(|capacity| Plan::new(identities.len(), checkpoint.tensors().len(), capacity))
            .ok_or_else(|| Error::out_of_memory("the store would be larger than 2^64 bytes"))?;
        let path = options.dir.join(format!("strata-{name}"));
        loop {
            let opened = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&path);
            let file = match opened {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    match Self::create(&path, options.mode, &plan, &identities)? {
                        Some(attached) => return Ok(NamedStore(Arc::new(attached))),
                        // Another process linked its store first: attach to that one.
                        None => continue,
                    }
                }
                Err(e) => return Err(Error::from_io(&e, "opening the host store", &path)),
                Ok(file) => file,
            };
            if flock(&file, libc::LOCK_EX | libc::LOCK_NB) {
                // Nobody holds it: what made it is gone without removing it (a crashed run).
                // One that cannot be removed (another user's, in a sticky directory) would be
                // found stale again forever: refused instead.
                if still_named(&file, &path) {
                    std::fs::remove_file(&path).map_err(|e| {
                        Error::from_io(&e, "removing the stale host store", &path)
                            .context("no process holds it, and it cannot be replaced")
                    })?;
                }
                continue;
            }
            if !flock(&file, libc::LOCK_SH) {
                let e = std::io::Error::last_os_error();
                return Err(Error::from_io(&e, "locking the host store", &path));
            }
            if !still_named(&file, &path) {
                // Removed by its last process, or replaced, since it was opened.
                continue;
            }
            return Ok(NamedStore(Arc::new(Self::attach(file, path, &identities)?)));
        }
    }

    /// Makes a store under a temporary name and links it as `path`; None when another process
    /// linked one first.
    fn create(
        path: &Path,
        mode: u32,
        plan: &Plan,
        identities: &[[u64; 5]],
    ) -> Result<Option<Attached>> {
        let dir = path.parent().unwrap_or(Path::new("."));
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let temporary = dir.join(format!(
            ".{}.{}.{nanos}",
            path.file_name().unwrap_or_default().to_string_lossy(),
            std::process::id()
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&temporary)
            .map_err(|e| Error::from_io(&e, "creating the host store", &temporary))?;
        let made = Self::make(&file, &temporary, mode, plan, identities).and_then(|attached| {
            let from = c_path(&temporary)?;
            let to = c_path(path)?;
            // SAFETY: two NUL-terminated paths that live across the call.
            if unsafe { libc::link(from.as_ptr(), to.as_ptr()) } == 0 {
                return Ok(Some(attached));
            }
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::AlreadyExists => Ok(None),
                _ => Err(Error::from_io(&e, "naming the host store", path)),
            }
        });
        let _ = std::fs::remove_file(&temporary);
        let attached = made?;
        Ok(attached.map(|(meta, data)| Attached {
            pins: Self::pin_slots(plan.table_slots),
            meta,
            data,
            file,
            path: path.to_owned(),
            identities: identities.to_vec(),
            created: true,
        }))
    }

    /// Reserves the whole file, writes its header and holds it shared: a store ready to link.
    fn make(
        file: &File,
        temporary: &Path,
        mode: u32,
        plan: &Plan,
        identities: &[[u64; 5]],
    ) -> Result<(Mapping, Mapping)> {
        // The mode asked for, whatever the umask.
        // SAFETY: fchmod on a descriptor this process owns.
        if unsafe { libc::fchmod(file.as_raw_fd(), mode as libc::mode_t) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(Error::from_io(&e, "setting the mode of", temporary));
        }
        let len = plan
            .file_len()
            .and_then(|len| libc::off_t::try_from(len).ok())
            .ok_or_else(|| Error::out_of_memory("the store would be too large a file"))?;
        // SAFETY: posix_fallocate on a descriptor this process owns.
        let reserved = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
        if reserved != 0 {
            let e = std::io::Error::from_raw_os_error(reserved);
            let dir = temporary.parent().unwrap_or(Path::new("."));
            return Err(Error::out_of_memory(format!(
                "reserving {len} bytes for the host store in {}: {e} (the store needs that much \
                 shared memory; free some, make {} larger, or lower the store's host_limit)",
                dir.display(),
                dir.display()
            )));
        }
        let meta = Mapping::new(file, 0, plan.data_offset, true, "its table")?;
        // SAFETY: the mapping starts the file and holds the header, written here before any
        // other process can open the file (it has only its temporary name).
        unsafe {
            meta.ptr.as_ptr().cast::<Header>().write(Header {
                magic: MAGIC,
                layout: LAYOUT,
                identity_count: identities.len() as u32,
                version: version_bytes(),
                identities_offset: plan.identities_offset,
                table_offset: plan.table_offset,
                table_slots: plan.table_slots,
                data_offset: plan.data_offset,
                data_capacity: plan.data_capacity,
                next_free: AtomicU64::new(0),
                fills: AtomicU64::new(0),
                bytes_filled: AtomicU64::new(0),
                takeovers: AtomicU64::new(0),
                layers: AtomicU64::new(0),
            });
            let at = meta.ptr.as_ptr().add(plan.identities_offset as usize);
            std::ptr::copy_nonoverlapping(
                identities.as_ptr().cast::<u8>(),
                at,
                identities.len() * 40,
            );
        }
        let data = Mapping::new(
            file,
            plan.data_offset,
            plan.data_capacity,
            false,
            "its layers",
        )?;
        if !flock(file, libc::LOCK_SH) {
            let e = std::io::Error::last_os_error();
            return Err(Error::from_io(&e, "locking", temporary));
        }
        Ok((meta, data))
    }

    /// Maps a store another process made, after checking it is a store of this strata and of
    /// these files.
    fn attach(file: File, path: PathBuf, identities: &[[u64; 5]]) -> Result<Attached> {
        let not_a_store = |why: &str| {
            Error::format(format!(
                "{} is not a strata host store ({why}); remove it or use another name",
                path.display()
            ))
        };
        let file_len = file
            .metadata()
            .map_err(|e| Error::from_io(&e, "reading the metadata of", &path))?
            .len();
        let header_len = std::mem::size_of::<Header>() as u64;
        if file_len < header_len {
            return Err(not_a_store("too short"));
        }
        let head = Mapping::new(&file, 0, header_len, false, "its header")?;
        // SAFETY: the mapping holds a whole Header; every bit pattern of its fields is valid.
        let header = unsafe { &*head.ptr.as_ptr().cast::<Header>() };
        if header.magic != MAGIC {
            return Err(not_a_store("no store header"));
        }
        if header.layout != LAYOUT || header.version != version_bytes() {
            let made_by = String::from_utf8_lossy(&header.version);
            return Err(Error::state(format!(
                "host store {} was made by strata {} (layout {}); this is strata {VERSION} \
                 (layout {LAYOUT}): close the processes using it, or use another name",
                path.display(),
                made_by.trim_end_matches('\0'),
                header.layout
            )));
        }
        let plan = Plan {
            identities_offset: header.identities_offset,
            table_offset: header.table_offset,
            table_slots: header.table_slots,
            data_offset: header.data_offset,
            data_capacity: header.data_capacity,
        };
        let identity_count = header.identity_count as usize;
        drop(head);
        let table_end = plan
            .table_slots
            .checked_mul(std::mem::size_of::<Slot>() as u64)
            .and_then(|t| t.checked_add(plan.table_offset));
        let consistent = plan.identities_offset >= header_len
            && (identity_count as u64)
                .checked_mul(40)
                .and_then(|n| n.checked_add(plan.identities_offset))
                .is_some_and(|end| end <= plan.table_offset)
            && table_end.is_some_and(|end| end <= plan.data_offset)
            && plan.file_len().is_some_and(|len| len <= file_len)
            && plan.table_offset.is_multiple_of(64)
            && plan.data_offset.is_multiple_of(page());
        if !consistent {
            return Err(not_a_store("its header's sizes do not fit the file"));
        }
        let meta = Mapping::new(&file, 0, plan.data_offset, true, "its table")?;
        let mut recorded = vec![[0u64; 5]; identity_count];
        // SAFETY: the identities lie within the mapping (checked above).
        unsafe {
            std::ptr::copy_nonoverlapping(
                meta.ptr.as_ptr().add(plan.identities_offset as usize),
                recorded.as_mut_ptr().cast::<u8>(),
                identity_count * 40,
            );
        }
        if recorded != identities {
            return Err(Error::state(format!(
                "host store {} holds another checkpoint's layers (its files' device, inode, size \
                 or modification time differ from these): use another name, or the same files",
                path.display()
            )));
        }
        let data = Mapping::new(
            &file,
            plan.data_offset,
            plan.data_capacity,
            false,
            "its layers",
        )?;
        Ok(Attached {
            pins: Self::pin_slots(plan.table_slots),
            meta,
            data,
            file,
            path,
            identities: recorded,
            created: false,
        })
    }

    fn pin_slots(slots: u64) -> Vec<PinSlot> {
        (0..slots).map(|_| PinSlot::default()).collect()
    }

    pub(super) fn layer(
        &self,
        key: &LayerKey,
        size: usize,
        fill: &mut dyn FnMut(&mut [u8]) -> Result<()>,
    ) -> Result<Option<Got>> {
        let store = &self.0;
        if !key
            .files()
            .iter()
            .all(|f| store.identities.binary_search(f).is_ok())
        {
            return Ok(None);
        }
        let slots = store.header().table_slots;
        let mut index = (key.hash() % slots) as usize;
        let mut probes = 0;
        let mut waited = false;
        let mut pause = Pause::default();
        loop {
            if probes == slots {
                return Err(Error::budget(format!(
                    "host store {}: its table of {slots} layers is full",
                    store.path.display()
                )));
            }
            let slot = store.slot(index);
            let word = slot.state.load(Ordering::Acquire);
            let state = word & STATE_BITS;
            if state == EMPTY {
                if slot
                    .state
                    .compare_exchange(EMPTY, CLAIMED | me(), Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
                {
                    store.claim(index, key, size)?;
                    store.fill(index, size, FILLING | me(), fill)?;
                    return Ok(Some(store.got(index, true, waited)));
                }
                continue;
            }
            if state == CLAIMED {
                if !owner_alive(word) {
                    // Its claimer died before writing the key: the slot is free again.
                    let _ = slot.state.compare_exchange(
                        word,
                        EMPTY,
                        Ordering::AcqRel,
                        Ordering::Relaxed,
                    );
                } else {
                    pause.wait();
                }
                continue;
            }
            if !store.holds(index, key, size)? {
                index = (index + 1) % slots as usize;
                probes += 1;
                continue;
            }
            if state == READY {
                return Ok(Some(store.got(index, false, waited)));
            }
            if owner_alive(word) {
                waited = true;
                pause.wait();
                continue;
            }
            // Its filler died or gave up: fill it here instead, once this process owns it.
            if slot
                .state
                .compare_exchange(word, FILLING | me(), Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                if word & !STATE_BITS != 0 {
                    store.header().takeovers.fetch_add(1, Ordering::Relaxed);
                }
                store.fill(index, size, FILLING | me(), fill)?;
                return Ok(Some(store.got(index, true, waited)));
            }
        }
    }

    pub(super) fn stats(&self) -> StoreStats {
        let header = self.0.header();
        let used = header.next_free.load(Ordering::Relaxed);
        StoreStats {
            host_in_use: used,
            host_peak: used,
            host_limit: header.data_capacity,
            layers: header.layers.load(Ordering::Relaxed),
            fills: header.fills.load(Ordering::Relaxed),
            bytes_filled: header.bytes_filled.load(Ordering::Relaxed),
            takeovers: header.takeovers.load(Ordering::Relaxed),
            created: self.0.created,
            ..StoreStats::default()
        }
    }
}

fn version_bytes() -> [u8; 16] {
    let mut bytes = [0u8; 16];
    let n = VERSION.len().min(16);
    bytes[..n].copy_from_slice(&VERSION.as_bytes()[..n]);
    bytes
}

/// Waits between looks at a slot another process is filling: short at first, then at most 2 ms.
#[derive(Default)]
struct Pause(u32);

impl Pause {
    fn wait(&mut self) {
        self.0 = (self.0 + 1).min(6);
        std::thread::sleep(Duration::from_micros(30 << self.0));
    }
}

/// Gives a slot up when its fill fails or panics: the key stays, the owner bits go, so the next
/// process that needs the layer fills it.
struct GiveUp<'a> {
    slot: &'a Slot,
    done: bool,
}

impl Drop for GiveUp<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.slot.state.store(FILLING, Ordering::Release);
        }
    }
}

impl Attached {
    fn header(&self) -> &Header {
        // SAFETY: the mapping starts with a Header, checked or written when it was made.
        unsafe { &*self.meta.ptr.as_ptr().cast::<Header>() }
    }

    fn slot(&self, index: usize) -> &Slot {
        let offset = self.header().table_offset as usize + index * std::mem::size_of::<Slot>();
        // SAFETY: index < table_slots, and the table lies within the mapping (checked at
        // attach); Slot is plain atomics, valid for any bits.
        unsafe { &*self.meta.ptr.as_ptr().add(offset).cast::<Slot>() }
    }

    /// Reserves room for a claimed slot's key and bytes and writes its key, or frees the slot
    /// again when the store is full.
    fn claim(&self, index: usize, key: &LayerKey, size: usize) -> Result<()> {
        let slot = self.slot(index);
        let header = self.header();
        let key_bytes = key.as_bytes();
        let data_len = size as u64;
        let key_offset = round_up(data_len, 8).unwrap_or(u64::MAX);
        let needed = key_offset
            .checked_add(key_bytes.len() as u64)
            .and_then(|n| round_up(n, page()));
        let reserved = needed.and_then(|needed| {
            header
                .next_free
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                    used.checked_add(needed)
                        .filter(|&end| end <= header.data_capacity)
                })
                .ok()
        });
        let Some(start) = reserved else {
            slot.state.store(EMPTY, Ordering::Release);
            return Err(Error::budget(format!(
                "host store {} has no room for a layer of {size} bytes: {} of its {} bytes are \
                 used (create it with a larger host_limit)",
                self.path.display(),
                header.next_free.load(Ordering::Relaxed),
                header.data_capacity
            )));
        };
        let at = header.data_offset + start + key_offset;
        let written = pwrite_all(&self.file, key_bytes, at);
        if let Err(e) = written {
            slot.state.store(EMPTY, Ordering::Release);
            return Err(Error::from_io(&e, "writing to the host store", &self.path));
        }
        slot.hash.store(key.hash(), Ordering::Relaxed);
        slot.key_len
            .store(key_bytes.len() as u64, Ordering::Relaxed);
        slot.key_offset.store(start + key_offset, Ordering::Relaxed);
        slot.data_offset.store(start, Ordering::Relaxed);
        slot.data_len.store(data_len, Ordering::Relaxed);
        slot.state.store(FILLING | me(), Ordering::Release);
        Ok(())
    }

    /// Whether slot `index`, whose key is published, holds `key`. A slot whose offsets leave the
    /// data region is a damaged store: `FORMAT`.
    fn holds(&self, index: usize, key: &LayerKey, size: usize) -> Result<bool> {
        let slot = self.slot(index);
        let key_bytes = key.as_bytes();
        if slot.hash.load(Ordering::Relaxed) != key.hash()
            || slot.key_len.load(Ordering::Relaxed) != key_bytes.len() as u64
        {
            return Ok(false);
        }
        let capacity = self.header().data_capacity;
        let key_offset = slot.key_offset.load(Ordering::Relaxed);
        let data_end = slot
            .data_offset
            .load(Ordering::Relaxed)
            .checked_add(slot.data_len.load(Ordering::Relaxed));
        let key_end = key_offset.checked_add(key_bytes.len() as u64);
        if data_end.is_none_or(|end| end > capacity) || key_end.is_none_or(|e| e > capacity) {
            return Err(Error::format(format!(
                "host store {} is damaged (a layer lies outside it); remove it",
                self.path.display()
            )));
        }
        // SAFETY: within the data mapping (checked above); the key was written before the slot
        // was published, and is never written again.
        let stored = unsafe {
            std::slice::from_raw_parts(
                self.data.ptr.as_ptr().add(key_offset as usize),
                key_bytes.len(),
            )
        };
        Ok(stored == key_bytes && slot.data_len.load(Ordering::Relaxed) == size as u64)
    }

    /// Fills slot `index`, owned by this process as `owned`, through a writable mapping of its
    /// bytes, then publishes it.
    fn fill(
        &self,
        index: usize,
        size: usize,
        owned: u64,
        fill: &mut dyn FnMut(&mut [u8]) -> Result<()>,
    ) -> Result<()> {
        let slot = self.slot(index);
        let mut give_up = GiveUp { slot, done: false };
        let header = self.header();
        if size > 0 {
            let offset = header.data_offset + slot.data_offset.load(Ordering::Relaxed);
            let writable = Mapping::new(&self.file, offset, size as u64, true, "a layer")?;
            // SAFETY: the mapping is `size` bytes of this slot's range, which only the owner of
            // the slot writes, and nobody reads before it is published.
            let bytes = unsafe { std::slice::from_raw_parts_mut(writable.ptr.as_ptr(), size) };
            fill(bytes)?;
            die_if_armed(bytes);
        } else {
            fill(&mut [])?;
        }
        header.fills.fetch_add(1, Ordering::Relaxed);
        header
            .bytes_filled
            .fetch_add(size as u64, Ordering::Relaxed);
        header.layers.fetch_add(1, Ordering::Relaxed);
        give_up.done = true;
        let published =
            slot.state
                .compare_exchange(owned, READY, Ordering::Release, Ordering::Relaxed);
        debug_assert!(published.is_ok(), "only the owner of a slot publishes it");
        Ok(())
    }

    fn got(self: &Arc<Self>, index: usize, filled: bool, waited: bool) -> Got {
        Got {
            lease: Lease(Arc::new(NamedLayer {
                store: self.clone(),
                index,
            })),
            filled,
            waited,
        }
    }
}

/// For tests of a filler that dies mid-fill: `STRATA_FAULT_STORE_KILL_FILL=N` makes this process
/// scribble over the bytes of its Nth fill of a named store's layer and kill itself with SIGKILL
/// before publishing them.
fn die_if_armed(bytes: &mut [u8]) {
    static FILLS: AtomicU64 = AtomicU64::new(0);
    static ARMED: OnceLock<Option<u64>> = OnceLock::new();
    let armed = ARMED.get_or_init(|| {
        let n = std::env::var("STRATA_FAULT_STORE_KILL_FILL").ok()?;
        n.parse().ok()
    });
    if *armed == Some(FILLS.fetch_add(1, Ordering::Relaxed) + 1) {
        let half = bytes.len() / 2;
        bytes[half..].fill(0xff);
        // SAFETY: signals this very process; SIGKILL ends it here.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}

fn pwrite_all(file: &File, bytes: &[u8], offset: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.write_all_at(bytes, offset)
}

impl Drop for Attached {
    fn drop(&mut self) {
        // The last process out (the one that can hold the file alone) removes it. Pins and
        // mappings go with the fields, after this.
        if flock(&self.file, libc::LOCK_EX | libc::LOCK_NB) && still_named(&self.file, &self.path) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
