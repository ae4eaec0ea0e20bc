//! The C ABI's numbers: every `STRATA_*` constant of `include/strata.h`, in the order the header
//! lists them, and their conversions to and from the typed values the core works with (`DType`,
//! `Device`, `Quant`, `Level`, `ErrorKind`). The core never sees these numbers: a new device,
//! dtype or status is a number here and a variant there.
//!
//! cbindgen writes every `pub const` of the crate into the header, which is why they all live in
//! this one file: the header is decided here, and nowhere else.

use crate::convert::Quant;
use crate::dtype::DType;
use crate::error::{Error, ErrorKind, Result};
use crate::log::Level;
use crate::tiers::Device;

/// `vram_limit` meaning "no limit".
pub const STRATA_UNLIMITED: u64 = u64::MAX;

/// Refuse layers that would exceed the budget instead of overcommitting.
pub const STRATA_FLAG_STRICT_BUDGET: u32 = 1;
/// Read the disk tier with O_DIRECT, past the page cache, so that a cold stream of a model larger
/// than RAM does not push everything else out of it (the bytes are read into aligned bounce
/// buffers, then copied). Where the file system refuses O_DIRECT (tmpfs), reads stay buffered.
pub const STRATA_FLAG_DIRECT_IO: u32 = 2;

/// fp8 storage as a plain cast (what DiffSynth does).
pub const STRATA_QUANT_NONE: u32 = 0;
/// fp8 storage scaled by one absmax scale per tensor.
pub const STRATA_QUANT_PER_TENSOR: u32 = 1;
/// fp8 storage scaled by one absmax scale per output row (dimension 0): the most accurate.
pub const STRATA_QUANT_PER_CHANNEL: u32 = 2;

/// Keep the stored dtype (in a tier), so a zeroed placement means "the stored dtype".
pub const STRATA_DTYPE_SOURCE: u32 = 0;
pub const STRATA_DTYPE_F32: u32 = 1;
pub const STRATA_DTYPE_F16: u32 = 2;
pub const STRATA_DTYPE_BF16: u32 = 3;
/// fp8 with 4 exponent and 3 mantissa bits, no infinities (max 448): safetensors' `F8_E4M3`.
pub const STRATA_DTYPE_F8_E4M3FN: u32 = 4;
/// fp8 with 5 exponent and 2 mantissa bits (max 57344).
pub const STRATA_DTYPE_F8_E5M2: u32 = 5;
pub const STRATA_DTYPE_F64: u32 = 6;
pub const STRATA_DTYPE_I64: u32 = 7;
pub const STRATA_DTYPE_I32: u32 = 8;
pub const STRATA_DTYPE_I16: u32 = 9;
pub const STRATA_DTYPE_I8: u32 = 10;
pub const STRATA_DTYPE_U8: u32 = 11;
pub const STRATA_DTYPE_BOOL: u32 = 12;

pub const STRATA_VERSION_MAJOR: u32 = 0;
pub const STRATA_VERSION_MINOR: u32 = 1;
pub const STRATA_VERSION_PATCH: u32 = 0;

/// Something failed.
pub const STRATA_LOG_ERROR: u32 = 1;
/// Something works, but not as configured (overcommit, a checkpoint changed on disk).
pub const STRATA_LOG_WARN: u32 = 2;
/// A decision worth knowing about (a layer refused for the budget, a new limit).
pub const STRATA_LOG_INFO: u32 = 3;
/// Every eviction, and other detail.
pub const STRATA_LOG_DEBUG: u32 = 4;

/// Most dimensions a tensor may have (the size of `strata_tensor_view.shape`).
pub const STRATA_MAX_DIMS: usize = 8;

/// The furthest ahead the copy engine looks: a larger `prefetch_depth` is used as this.
pub const STRATA_MAX_PREFETCH_DEPTH: usize = 32;

/// The usual place: the CPU for offload and onload, the compute device for preparing and computation.
pub const STRATA_DEVICE_DEFAULT: u32 = 0;
/// The checkpoint file itself: bytes are read when a tier transition needs them.
pub const STRATA_DEVICE_DISK: u32 = 1;
pub const STRATA_DEVICE_CPU: u32 = 2;
pub const STRATA_DEVICE_CUDA: u32 = 3;

/// A status number as the C ABI returns it: `STRATA_OK` (0) or one of the `STRATA_ERR_*` below.
pub type strata_status = u32;

/// Success.
pub const STRATA_OK: strata_status = 0;
/// A pointer argument that must not be NULL was NULL.
pub const STRATA_ERR_NULL_ARGUMENT: strata_status = 1;
/// An argument is out of range: an unknown enum value, a `struct_size` below the first released size, a duplicate name.
pub const STRATA_ERR_INVALID_ARGUMENT: strata_status = 2;
/// A context, checkpoint, group or layer handle that does not exist (never created, or destroyed).
pub const STRATA_ERR_INVALID_HANDLE: strata_status = 3;
/// A file, tensor or layer name that does not exist.
pub const STRATA_ERR_NOT_FOUND: strata_status = 4;
/// Reading a file failed, or it was truncated after it was opened.
pub const STRATA_ERR_IO: strata_status = 5;
/// A file is not valid safetensors (or index JSON), or it changed after it was opened.
pub const STRATA_ERR_FORMAT: strata_status = 6;
/// A dtype, conversion or device this build does not handle.
pub const STRATA_ERR_UNSUPPORTED: strata_status = 7;
/// Host or device memory could not be allocated.
pub const STRATA_ERR_OUT_OF_MEMORY: strata_status = 8;
/// The request does not fit the budget (`STRATA_FLAG_STRICT_BUDGET`, or the layers in use fill it).
pub const STRATA_ERR_BUDGET: strata_status = 9;
/// The call does not fit the object's state: a release without an acquire, a group with layers in use.
pub const STRATA_ERR_STATE: strata_status = 10;
/// The requested compute device does not exist here (no CUDA driver, no such ordinal).
pub const STRATA_ERR_NO_DEVICE: strata_status = 11;
/// The device reported an error.
pub const STRATA_ERR_DEVICE: strata_status = 12;
/// An output array is too small; nothing was written.
pub const STRATA_ERR_BUFFER_TOO_SMALL: strata_status = 13;
/// strata hit an internal bug; the call did nothing. Please report it with `strata_last_error`.
pub const STRATA_ERR_PANIC: strata_status = 14;

// The core's own bounds are the ABI's: the build fails here when they part.
const _: () = assert!(STRATA_MAX_DIMS == crate::registry::MAX_DIMS);
const _: () = assert!(STRATA_MAX_PREFETCH_DEPTH == crate::schedule::MAX_PREFETCH_DEPTH);
const _: () = assert!(STRATA_UNLIMITED == crate::budget::UNLIMITED);

impl ErrorKind {
    /// The status the C ABI returns for this kind of failure.
    pub fn to_abi(self) -> strata_status {
        match self {
            ErrorKind::NullArgument => STRATA_ERR_NULL_ARGUMENT,
            ErrorKind::InvalidArgument => STRATA_ERR_INVALID_ARGUMENT,
            ErrorKind::InvalidHandle => STRATA_ERR_INVALID_HANDLE,
            ErrorKind::NotFound => STRATA_ERR_NOT_FOUND,
            ErrorKind::Io => STRATA_ERR_IO,
            ErrorKind::Format => STRATA_ERR_FORMAT,
            ErrorKind::Unsupported => STRATA_ERR_UNSUPPORTED,
            ErrorKind::OutOfMemory => STRATA_ERR_OUT_OF_MEMORY,
            ErrorKind::Budget => STRATA_ERR_BUDGET,
            ErrorKind::State => STRATA_ERR_STATE,
            ErrorKind::NoDevice => STRATA_ERR_NO_DEVICE,
            ErrorKind::Device => STRATA_ERR_DEVICE,
            ErrorKind::BufferTooSmall => STRATA_ERR_BUFFER_TOO_SMALL,
            ErrorKind::Panic => STRATA_ERR_PANIC,
        }
    }
}

impl DType {
    /// The ABI number (`STRATA_DTYPE_*`).
    pub fn to_abi(self) -> u32 {
        match self {
            DType::F32 => STRATA_DTYPE_F32,
            DType::F16 => STRATA_DTYPE_F16,
            DType::BF16 => STRATA_DTYPE_BF16,
            DType::F8E4M3 => STRATA_DTYPE_F8_E4M3FN,
            DType::F8E5M2 => STRATA_DTYPE_F8_E5M2,
            DType::F64 => STRATA_DTYPE_F64,
            DType::I64 => STRATA_DTYPE_I64,
            DType::I32 => STRATA_DTYPE_I32,
            DType::I16 => STRATA_DTYPE_I16,
            DType::I8 => STRATA_DTYPE_I8,
            DType::U8 => STRATA_DTYPE_U8,
            DType::Bool => STRATA_DTYPE_BOOL,
        }
    }

    /// Reads an ABI number: `Ok(None)` for `STRATA_DTYPE_SOURCE`.
    pub(crate) fn from_abi(value: u32) -> Result<Option<DType>> {
        Ok(Some(match value {
            STRATA_DTYPE_SOURCE => return Ok(None),
            STRATA_DTYPE_F32 => DType::F32,
            STRATA_DTYPE_F16 => DType::F16,
            STRATA_DTYPE_BF16 => DType::BF16,
            STRATA_DTYPE_F8_E4M3FN => DType::F8E4M3,
            STRATA_DTYPE_F8_E5M2 => DType::F8E5M2,
            STRATA_DTYPE_F64 => DType::F64,
            STRATA_DTYPE_I64 => DType::I64,
            STRATA_DTYPE_I32 => DType::I32,
            STRATA_DTYPE_I16 => DType::I16,
            STRATA_DTYPE_I8 => DType::I8,
            STRATA_DTYPE_U8 => DType::U8,
            STRATA_DTYPE_BOOL => DType::Bool,
            _ => return Err(Error::invalid(format!("unknown dtype {value}"))),
        }))
    }

    /// Like `from_abi`, but `SOURCE` is not allowed (a tensor's own dtype).
    pub(crate) fn from_abi_concrete(value: u32) -> Result<DType> {
        DType::from_abi(value)?
            .ok_or_else(|| Error::invalid("a tensor's dtype cannot be STRATA_DTYPE_SOURCE"))
    }
}

impl Device {
    pub fn to_abi(self) -> u32 {
        match self {
            Device::Disk => STRATA_DEVICE_DISK,
            Device::Cpu => STRATA_DEVICE_CPU,
            Device::Cuda => STRATA_DEVICE_CUDA,
        }
    }

    /// Reads an ABI number: `Ok(None)` for `STRATA_DEVICE_DEFAULT`.
    pub(crate) fn from_abi(value: u32) -> Result<Option<Device>> {
        match value {
            STRATA_DEVICE_DEFAULT => Ok(None),
            STRATA_DEVICE_DISK => Ok(Some(Device::Disk)),
            STRATA_DEVICE_CPU => Ok(Some(Device::Cpu)),
            STRATA_DEVICE_CUDA => Ok(Some(Device::Cuda)),
            other => Err(Error::invalid(format!("unknown device {other}"))),
        }
    }
}

impl Quant {
    pub(crate) fn from_abi(v: u32) -> Result<Quant> {
        match v {
            STRATA_QUANT_NONE => Ok(Quant::None),
            STRATA_QUANT_PER_TENSOR => Ok(Quant::PerTensor),
            STRATA_QUANT_PER_CHANNEL => Ok(Quant::PerChannel),
            _ => Err(Error::invalid(format!("unknown quantization mode {v}"))),
        }
    }

    pub fn to_abi(self) -> u32 {
        match self {
            Quant::None => STRATA_QUANT_NONE,
            Quant::PerTensor => STRATA_QUANT_PER_TENSOR,
            Quant::PerChannel => STRATA_QUANT_PER_CHANNEL,
        }
    }
}

impl Level {
    /// The ABI number (`STRATA_LOG_*`) a log callback receives.
    pub fn to_abi(self) -> u32 {
        match self {
            Level::Error => STRATA_LOG_ERROR,
            Level::Warn => STRATA_LOG_WARN,
            Level::Info => STRATA_LOG_INFO,
            Level::Debug => STRATA_LOG_DEBUG,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_numbers_match_the_header_constants() {
        assert_eq!(DType::F32.to_abi(), STRATA_DTYPE_F32);
        assert_eq!(DType::BF16.to_abi(), STRATA_DTYPE_BF16);
        assert_eq!(DType::F8E4M3.to_abi(), STRATA_DTYPE_F8_E4M3FN);
        assert_eq!(DType::F8E5M2.to_abi(), STRATA_DTYPE_F8_E5M2);
        assert_eq!(DType::F64.to_abi(), STRATA_DTYPE_F64);
        assert_eq!(DType::Bool.to_abi(), STRATA_DTYPE_BOOL);
    }

    #[test]
    fn dtype_numbers_round_trip() {
        for (i, d) in crate::dtype::ALL.into_iter().enumerate() {
            assert_eq!(d.to_abi(), i as u32 + 1, "{d:?}");
            assert_eq!(DType::from_abi(d.to_abi()).unwrap(), Some(d));
        }
        assert_eq!(DType::from_abi(STRATA_DTYPE_SOURCE).unwrap(), None);
        assert!(DType::from_abi(13).is_err());
        assert!(DType::from_abi(u32::MAX).is_err());
    }

    #[test]
    fn device_and_level_numbers_round_trip() {
        for d in [Device::Disk, Device::Cpu, Device::Cuda] {
            assert_eq!(Device::from_abi(d.to_abi()).unwrap(), Some(d));
        }
        assert_eq!(Device::from_abi(STRATA_DEVICE_DEFAULT).unwrap(), None);
        assert!(Device::from_abi(4).is_err());
        let levels = [Level::Error, Level::Warn, Level::Info, Level::Debug];
        assert_eq!(levels.map(Level::to_abi), [1, 2, 3, 4]);
    }

    #[test]
    fn every_error_kind_has_its_own_status() {
        let kinds = [
            ErrorKind::NullArgument,
            ErrorKind::InvalidArgument,
            ErrorKind::InvalidHandle,
            ErrorKind::NotFound,
            ErrorKind::Io,
            ErrorKind::Format,
            ErrorKind::Unsupported,
            ErrorKind::OutOfMemory,
            ErrorKind::Budget,
            ErrorKind::State,
            ErrorKind::NoDevice,
            ErrorKind::Device,
            ErrorKind::BufferTooSmall,
            ErrorKind::Panic,
        ];
        assert_eq!(
            kinds.map(ErrorKind::to_abi),
            std::array::from_fn(|i| i as u32 + 1)
        );
    }

    #[test]
    fn quant_numbers_round_trip() {
        for (quant, number) in [
            (Quant::None, 0),
            (Quant::PerTensor, 1),
            (Quant::PerChannel, 2),
        ] {
            assert_eq!(quant.to_abi(), number);
            assert_eq!(Quant::from_abi(number).unwrap(), quant);
        }
        assert_eq!(
            Quant::from_abi(3).unwrap_err().kind,
            ErrorKind::InvalidArgument
        );
    }
}
