//! The Rust error type and its mapping to `strata_status`.
//!
//! strata_status numbers are part of the C ABI: they are fixed once released and never renumbered
//! or reused. New statuses take the next free number.

use std::fmt;

/// A status number as the C ABI returns it: `STRATA_OK` (0) or one of the `STRATA_ERR_*` below.
#[allow(non_camel_case_types)]
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

/// Every status with its C name, indexed by number.
const STATUS_NAMES: [&str; 15] = [
    "STRATA_OK\0",
    "STRATA_ERR_NULL_ARGUMENT\0",
    "STRATA_ERR_INVALID_ARGUMENT\0",
    "STRATA_ERR_INVALID_HANDLE\0",
    "STRATA_ERR_NOT_FOUND\0",
    "STRATA_ERR_IO\0",
    "STRATA_ERR_FORMAT\0",
    "STRATA_ERR_UNSUPPORTED\0",
    "STRATA_ERR_OUT_OF_MEMORY\0",
    "STRATA_ERR_BUDGET\0",
    "STRATA_ERR_STATE\0",
    "STRATA_ERR_NO_DEVICE\0",
    "STRATA_ERR_DEVICE\0",
    "STRATA_ERR_BUFFER_TOO_SMALL\0",
    "STRATA_ERR_PANIC\0",
];

/// The C name of a status, NUL-terminated; unknown numbers get a fixed placeholder.
pub fn status_name(status: strata_status) -> &'static str {
    STATUS_NAMES
        .get(status as usize)
        .copied()
        .unwrap_or("STRATA_ERR_UNKNOWN_STATUS\0")
}

/// A failure: the status the C ABI returns and the message `strata_last_error` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub status: strata_status,
    pub message: String,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn new(status: strata_status, message: impl Into<String>) -> Self {
        Error {
            status,
            message: message.into(),
        }
    }
    pub fn null(what: &str) -> Self {
        Self::new(STRATA_ERR_NULL_ARGUMENT, format!("{what} must not be NULL"))
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(STRATA_ERR_INVALID_ARGUMENT, message)
    }
    pub fn handle(message: impl Into<String>) -> Self {
        Self::new(STRATA_ERR_INVALID_HANDLE, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(STRATA_ERR_NOT_FOUND, message)
    }
    pub fn io(message: impl Into<String>) -> Self {
        Self::new(STRATA_ERR_IO, message)
    }
    pub fn format(message: impl Into<String>) -> Self {
        Self::new(STRATA_ERR_FORMAT, message)
    }
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(STRATA_ERR_UNSUPPORTED, message)
    }
    pub fn out_of_memory(message: impl Into<String>) -> Self {
        Self::new(STRATA_ERR_OUT_OF_MEMORY, message)
    }
    pub fn budget(message: impl Into<String>) -> Self {
        Self::new(STRATA_ERR_BUDGET, message)
    }
    pub fn state(message: impl Into<String>) -> Self {
        Self::new(STRATA_ERR_STATE, message)
    }
    pub fn no_device(message: impl Into<String>) -> Self {
        Self::new(STRATA_ERR_NO_DEVICE, message)
    }
    pub fn device(message: impl Into<String>) -> Self {
        Self::new(STRATA_ERR_DEVICE, message)
    }

    /// An I/O error on `path`, keeping the OS's reason; a missing file is `NOT_FOUND`.
    pub fn from_io(err: &std::io::Error, doing: &str, path: &std::path::Path) -> Self {
        let status = match err.kind() {
            std::io::ErrorKind::NotFound => STRATA_ERR_NOT_FOUND,
            std::io::ErrorKind::OutOfMemory => STRATA_ERR_OUT_OF_MEMORY,
            _ => STRATA_ERR_IO,
        };
        Self::new(status, format!("{doing} {}: {err}", path.display()))
    }

    /// The same error with `context` put in front of its message.
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = status_name(self.status);
        write!(f, "{}: {}", &name[..name.len() - 1], self.message)
    }
}

impl std::error::Error for Error {}

/// What a caught panic said: its message when it carried one (`panic!` with text or a format).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
