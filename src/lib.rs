//! strata: run models larger than GPU memory. Layers are registered with four tiers (offload,
//! onload, preparing, computation); strata moves and converts their bytes under a hard budget.
//! The C ABI is in `ffi` and `include/strata.h`; the rest is the safe Rust underneath it.
//!
//! # The Rust facade
//!
//! What code outside the library (the `strata` command line, the benchmarks, the tests and the
//! fuzz targets) uses besides the C ABI, the public modules below:
//!
//! - [`context::Context`] with its [`context::Options`]: create groups ([`tiers::Tiers`]) and
//!   register layers ([`GroupId`], [`LayerId`]), acquire and release them on a [`StreamHandle`],
//!   read [`stats::Stats`]; [`checkpoint::Checkpoint`] opens the safetensors files layers come
//!   from.
//! - The vocabulary those take: [`dtype::DType`], [`tiers`], [`convert::Quant`],
//!   [`error::Error`], [`log`] callbacks.
//! - Host conversions ([`convert`]) and the threads they run on ([`host_threads`]), which the
//!   benchmarks and the conversion tests drive directly.
//! - [`residency`], the eviction policy `strata plan` simulates.
//! - For tests only: fault injection (`checkpoint::inject_read_faults`,
//!   `context::inject_fill_panics`), and the few internals below the facade they measure.
//!
//! Everything else (backends, budget, host memory, registry, schedule, slot layout, host stores,
//! trace) is internal to the crate.

pub(crate) mod backend;
pub(crate) mod budget;
pub mod checkpoint;
pub mod context;
pub mod convert;
pub mod dtype;
pub mod error;
pub mod ffi;
pub(crate) mod host;
pub mod host_threads;
pub mod log;
pub(crate) mod registry;
pub mod residency;
pub(crate) mod schedule;
pub(crate) mod slot;
pub mod stats;
pub(crate) mod store;
pub mod tiers;
pub(crate) mod trace;

pub use backend::StreamHandle;
pub use registry::{GroupId, LayerId};

/// For `strata plan`, which lays a checkpoint's layers out as a context would.
#[doc(hidden)]
pub use registry::{Forms, TensorMeta};

/// Aligned host memory, for the tests and `strata bench` reading as strata reads; and the trace,
/// whose size a soak test measures.
#[doc(hidden)]
pub use {host::HostBuffer, trace::Trace};
