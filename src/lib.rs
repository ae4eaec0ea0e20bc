//! strata: run models larger than GPU memory. Layers are registered with four tiers (offload,
//! onload, preparing, computation); strata moves and converts their bytes under a hard budget.
//! The C ABI is in `ffi` and `include/strata.h`; the rest is the safe Rust underneath it.

pub mod backend;
pub mod budget;
pub mod checkpoint;
pub mod context;
pub mod convert;
pub mod dtype;
pub mod error;
pub mod ffi;
pub mod host;
pub mod host_threads;
pub mod log;
pub mod registry;
pub mod residency;
pub mod schedule;
pub mod slot;
pub mod stats;
pub mod tiers;
pub mod trace;

pub use backend::StreamHandle;
pub use registry::{GroupId, LayerId};
