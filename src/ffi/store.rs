//! Host stores: one host copy of each layer read from a checkpoint, shared by the contexts of a
//! process, or (named) by the processes of a machine.

use super::consts::{strata_status, STRATA_UNLIMITED};
use super::context::{context, strata_context};
use super::{boundary, boundary_value, boundary_void, out_arg, read_sized, str_arg, write_sized};
use super::{Handles, Versioned};
use crate::error::{Error, Result};
use crate::store::{Store, StoreOptions, DEFAULT_DIR};
use std::ffi::c_char;
use std::path::PathBuf;
use std::sync::Arc;

/// Options for `strata_store_create`. Start from `strata_store_options_default()`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct strata_store_options {
    /// sizeof(strata_store_options): lets the struct grow without breaking old callers.
    pub struct_size: u32,
    /// Permissions of a named store's file when this call creates it; 0 = 0600 (this user only).
    pub mode: u32,
    /// Bytes of host memory the store may hold; STRATA_UNLIMITED. A named store reserves this
    /// much in shared memory when it is created (STRATA_UNLIMITED: the checkpoint's size plus a
    /// page per tensor); an attach uses the size its creator chose.
    pub host_limit: u64,
    /// NULL: a store within this process. Else a named store, shared by every process that
    /// creates one by this name (1 to 100 of A-Z a-z 0-9 . _ -): the first creates it, the
    /// others attach to it.
    pub name: *const c_char,
    /// Named stores: the checkpoint they hold layers of (a path as strata_checkpoint_open takes).
    /// Its files' device, inode, size and modification time are recorded at creation; an attach
    /// with other files is STRATA_ERR_STATE. Ignored by a store within a process.
    pub checkpoint: *const c_char,
    /// Named stores: the directory of their files; NULL = /dev/shm.
    pub dir: *const c_char,
}

// SAFETY: repr(C), plain data, struct_size first.
unsafe impl Versioned for strata_store_options {
    const FIRST_RELEASED_SIZE: usize = std::mem::size_of::<strata_store_options>();
}

/// A store's counters. Set `struct_size` to sizeof(strata_store_stats) first.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct strata_store_stats {
    pub struct_size: u32,
    /// 1 when this call's process created the named store, 0 when it attached to one (and for
    /// a store within a process, 1).
    pub created: u32,
    /// Bytes of layers the store holds now (a named store: for every process), at most so far,
    /// and its limit. A layer's bytes are its host copy's: each tensor from a 64-byte boundary.
    pub host_in_use: u64,
    pub host_peak: u64,
    pub host_limit: u64,
    /// Layers held now.
    pub layers: u64,
    /// Layers filled from the checkpoint (a named store: by every process), and their bytes (as
    /// host_in_use counts them).
    pub fills: u64,
    pub bytes_filled: u64,
    /// Copies this process got from the store without filling them.
    pub shared: u64,
    /// Times a context of this process waited for another user's fill.
    pub waits: u64,
    /// Fills taken over from a process that died while filling (named stores).
    pub takeovers: u64,
}

// SAFETY: repr(C), plain data, struct_size first.
unsafe impl Versioned for strata_store_stats {
    const FIRST_RELEASED_SIZE: usize = std::mem::size_of::<strata_store_stats>();
}

/// An opaque host store. Thread-safe: any thread may use it, and any number of contexts.
pub struct strata_store {
    _private: [u8; 0],
}

pub(crate) static STORES: Handles<Store> = Handles::new("store");

/// A store within this process, unlimited; the named-store fields empty, mode 0600.
#[no_mangle]
pub extern "C" fn strata_store_options_default() -> strata_store_options {
    boundary_value(
        "strata_store_options_default",
        default_options(),
        default_options,
    )
}

fn default_options() -> strata_store_options {
    strata_store_options {
        struct_size: std::mem::size_of::<strata_store_options>() as u32,
        mode: 0,
        host_limit: STRATA_UNLIMITED,
        name: std::ptr::null(),
        checkpoint: std::ptr::null(),
        dir: std::ptr::null(),
    }
}

fn optional_str(pointer: *const c_char, what: &str) -> Result<Option<String>> {
    match pointer.is_null() {
        true => Ok(None),
        false => str_arg(pointer, what).map(|s| Some(s.to_owned())),
    }
}

fn options_from(raw: &strata_store_options) -> Result<StoreOptions> {
    if raw.mode & !0o777 != 0 {
        return Err(Error::invalid(format!(
            "mode {:#o} has bits beyond the permission bits 0777",
            raw.mode
        )));
    }
    let dir = optional_str(raw.dir, "opts->dir")?.unwrap_or_else(|| DEFAULT_DIR.to_owned());
    Ok(StoreOptions {
        host_limit: raw.host_limit,
        name: optional_str(raw.name, "opts->name")?,
        checkpoint: optional_str(raw.checkpoint, "opts->checkpoint")?.map(PathBuf::from),
        dir: PathBuf::from(dir),
        mode: match raw.mode {
            0 => 0o600,
            mode => mode,
        },
    })
}

/// Creates a store, or attaches to the named store of that name. Named: a store whose processes
/// have all gone (a crashed run) is replaced, never trusted; one made for other checkpoint files
/// or by another strata version is STRATA_ERR_STATE; a directory without room for the whole
/// store is STRATA_ERR_OUT_OF_MEMORY here, never a crash later.
#[no_mangle]
pub extern "C" fn strata_store_create(
    opts: *const strata_store_options,
    out: *mut *mut strata_store,
) -> strata_status {
    boundary("strata_store_create", || {
        let raw = read_sized(opts, "opts", default_options())?;
        let out = out_arg(out, "out")?;
        let store = Store::open(&options_from(&raw)?)?;
        *out = STORES.insert(store)? as *mut strata_store;
        Ok(())
    })
}

/// Gives up the caller's handle. The store lives on while contexts attached to it hold its
/// layers; a named store's file goes with the last process that used it. NULL is a no-op.
#[no_mangle]
pub extern "C" fn strata_store_destroy(store: *mut strata_store) {
    boundary_void("strata_store_destroy", || STORES.remove(store));
}

/// Makes the host copies `ctx` reads from checkpoints from now on come from `store`, shared with
/// the other contexts using it (copies made before stay the context's own). The context keeps
/// the store alive. Once per context: a second attach is STRATA_ERR_STATE. Views of layers whose
/// host copy is the store's are shared with other contexts: read them, never write them.
#[no_mangle]
pub extern "C" fn strata_context_attach_store(
    ctx: *mut strata_context,
    store: *mut strata_store,
) -> strata_status {
    boundary("strata_context_attach_store", || {
        let ctx = context(ctx)?;
        let store: Arc<Store> = STORES.get(store)?;
        ctx.attach_store(store)
    })
}

/// Fills `out` (whose struct_size the caller set) with the store's counters.
#[no_mangle]
pub extern "C" fn strata_store_stats_get(
    store: *mut strata_store,
    out: *mut strata_store_stats,
) -> strata_status {
    boundary("strata_store_stats_get", || {
        let s = STORES.get(store)?.stats();
        let stats = strata_store_stats {
            struct_size: 0,
            created: u32::from(s.created),
            host_in_use: s.host_in_use,
            host_peak: s.host_peak,
            host_limit: s.host_limit,
            layers: s.layers,
            fills: s.fills,
            bytes_filled: s.bytes_filled,
            shared: s.shared,
            waits: s.waits,
            takeovers: s.takeovers,
        };
        write_sized(out, "out", stats)
    })
}
