//! Version, status names and the thread's last error message.

use super::consts::{
    strata_status, STRATA_VERSION_MAJOR, STRATA_VERSION_MINOR, STRATA_VERSION_PATCH,
};
use super::{boundary_value, last_error};
use crate::error::Error;
use std::ffi::c_char;
use std::fmt;

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
pub(crate) fn status_name(status: strata_status) -> &'static str {
    STATUS_NAMES
        .get(status as usize)
        .copied()
        .unwrap_or("STRATA_ERR_UNKNOWN_STATUS\0")
}

/// An error shows as the C caller sees it: its status's name, then the message.
impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = status_name(self.kind.to_abi());
        write!(f, "{}: {}", &name[..name.len() - 1], self.message)
    }
}

const fn parse_u32(s: &str) -> u32 {
    let bytes = s.as_bytes();
    let mut value = 0;
    let mut i = 0;
    while i < bytes.len() {
        value = value * 10 + (bytes[i] - b'0') as u32;
        i += 1;
    }
    value
}

// The header's version and Cargo.toml's must agree: the build fails here when they do not.
const _: () = assert!(STRATA_VERSION_MAJOR == parse_u32(env!("CARGO_PKG_VERSION_MAJOR")));
const _: () = assert!(STRATA_VERSION_MINOR == parse_u32(env!("CARGO_PKG_VERSION_MINOR")));
const _: () = assert!(STRATA_VERSION_PATCH == parse_u32(env!("CARGO_PKG_VERSION_PATCH")));

/// The library's version as `(major << 16) | (minor << 8) | patch`; compare with the header's
/// `STRATA_VERSION_*` to catch a program running against another build than it compiled with.
#[no_mangle]
pub extern "C" fn strata_version() -> u32 {
    boundary_value("strata_version", 0, || {
        (STRATA_VERSION_MAJOR << 16) | (STRATA_VERSION_MINOR << 8) | STRATA_VERSION_PATCH
    })
}

/// The name of a status, e.g. "STRATA_ERR_IO": a static string, never NULL (unknown numbers give
/// "STRATA_ERR_UNKNOWN_STATUS").
#[no_mangle]
pub extern "C" fn strata_status_name(status: strata_status) -> *const c_char {
    let name = boundary_value("strata_status_name", status_name(u32::MAX), || {
        status_name(status)
    });
    name.as_ptr() as *const c_char
}

/// Copies this thread's last error message (set by the last failed call on this thread, empty if
/// none) into `buf`, truncated to `len - 1` bytes and NUL-terminated when `len > 0`. Returns the
/// message's full length without the NUL, so `strata_last_error(NULL, 0)` asks for the size.
#[no_mangle]
pub extern "C" fn strata_last_error(buf: *mut c_char, len: usize) -> usize {
    // Not through `boundary`, which would overwrite the very message being read; nothing here
    // can panic (a thread-local read and a bounded copy).
    let message = last_error();
    if !buf.is_null() && len > 0 {
        let n = message.len().min(len - 1);
        // SAFETY: the caller gives `len` writable bytes at `buf`; we write n + 1 <= len of them.
        unsafe {
            std::ptr::copy_nonoverlapping(message.as_ptr() as *const c_char, buf, n);
            *buf.add(n) = 0;
        }
    }
    message.len()
}
