//! Checkpoints: safetensors files opened for lazy, positioned reads.

use super::consts::strata_status;
use super::context::{context, strata_context};
use super::{boundary, boundary_void, out_arg, str_arg, Handles};
use crate::checkpoint::Checkpoint;
use std::sync::Arc;

/// An opaque open checkpoint. Thread-safe.
pub struct strata_checkpoint {
    _private: [u8; 0],
}

pub(crate) static CHECKPOINTS: Handles<Checkpoint> = Handles::new("checkpoint");

pub(crate) fn checkpoint(ckpt: *const strata_checkpoint) -> crate::error::Result<Arc<Checkpoint>> {
    CHECKPOINTS.get(ckpt)
}

/// Opens one .safetensors file, a sharded *.safetensors.index.json, or a directory of shards.
/// Only headers are read; tensor bytes are read when a tier needs them. Every file must be a
/// regular file (symlinks followed): a FIFO, a device, a socket or a directory where a file is
/// expected is STRATA_ERR_FORMAT at once, as is an index over 100 MB or one naming a shard
/// outside its own directory (an absolute path, or through "..").
#[no_mangle]
pub extern "C" fn strata_checkpoint_open(
    ctx: *mut strata_context,
    path: *const std::ffi::c_char,
    out: *mut *mut strata_checkpoint,
) -> strata_status {
    boundary("strata_checkpoint_open", || {
        let ctx = context(ctx)?;
        let path = str_arg(path, "path")?;
        let out = out_arg(out, "out")?;
        let opened = Checkpoint::open_reporting(std::path::Path::new(path), &|done, total| {
            ctx.report_progress("reading checkpoint headers", done, total)
        })?;
        *out = CHECKPOINTS.insert(opened)? as *mut strata_checkpoint;
        Ok(())
    })
}

/// Closes a checkpoint. Layers registered from it stay valid (they keep its files open). NULL is a no-op.
#[no_mangle]
pub extern "C" fn strata_checkpoint_close(ckpt: *mut strata_checkpoint) {
    boundary_void("strata_checkpoint_close", || CHECKPOINTS.remove(ckpt));
}
