//! The C ABI. One file per concept; every exported function is a thin shell that hands a closure
//! to `boundary`, which checks nothing itself but catches panics and records the last error.

// C names (strata_context, strata_options) are the contract.
#![allow(non_camel_case_types)]
// Exported functions take raw pointers from C by nature; each dereference is checked and commented.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

pub mod consts;

pub mod acquire;
pub mod checkpoint;
pub mod context;
pub mod error;
pub mod group;
pub mod layer;
pub mod log;
pub mod stats;
pub mod store;

use crate::error::{panic_message, Error, Result};
use consts::{strata_status, STRATA_ERR_PANIC, STRATA_OK};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ffi::{c_char, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, RwLock};

thread_local! {
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

pub(crate) fn last_error() -> String {
    LAST_ERROR.with(|e| e.borrow().clone())
}

fn set_last_error(message: String) {
    LAST_ERROR.with(|e| *e.borrow_mut() = message);
}

/// Runs the body of exported function `function`: a panic becomes `STRATA_ERR_PANIC`, an error its
/// status; either way this thread's last error names the function and says what went wrong.
pub(crate) fn boundary(function: &str, body: impl FnOnce() -> Result<()>) -> strata_status {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => STRATA_OK,
        Ok(Err(error)) => {
            set_last_error(format!("{function}: {}", error.message));
            error.kind.to_abi()
        }
        Err(payload) => {
            let reason = panic_message(&*payload);
            set_last_error(format!("{function}: internal error (panic): {reason}"));
            STRATA_ERR_PANIC
        }
    }
}

/// For the functions that cannot fail and return a value: a panic (a bug) gives `fallback`.
pub(crate) fn boundary_value<T>(function: &str, fallback: T, body: impl FnOnce() -> T) -> T {
    let mut value = None;
    let status = boundary(function, || {
        value = Some(body());
        Ok(())
    });
    match value {
        Some(value) if status == STRATA_OK => value,
        _ => fallback,
    }
}

/// Like `boundary` for functions that return no status (destructors): failures are only recorded.
pub(crate) fn boundary_void(function: &str, body: impl FnOnce() -> Result<()>) {
    let _ = boundary(function, body);
}

/// Live objects behind opaque C pointers. The pointer values are tokens, never addresses, drawn
/// from the serial that numbers groups and layers, so never reused, not even by a handle of
/// another kind: a stale, made-up or foreign pointer (a checkpoint passed as a context) is
/// `STRATA_ERR_INVALID_HANDLE`, not a use after free.
pub(crate) struct Handles<T> {
    live: RwLock<BTreeMap<usize, Arc<T>>>,
    kind: &'static str,
}

impl<T> Handles<T> {
    pub const fn new(kind: &'static str) -> Handles<T> {
        Handles {
            live: RwLock::new(BTreeMap::new()),
            kind,
        }
    }

    fn live(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<usize, Arc<T>>> {
        self.live.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn insert(&self, value: impl Into<Arc<T>>) -> Result<usize> {
        // Tokens are multiples of 16, like real allocations, so they never look like small ints.
        // Where a pointer is narrower than the serial (32-bit targets), running out is refused
        // rather than wrapped onto a token that may still be live or held.
        let token = usize::try_from(crate::registry::next_id())
            .ok()
            .and_then(|serial| serial.checked_mul(16))
            .ok_or_else(|| {
                Error::new(
                    crate::error::ErrorKind::OutOfMemory,
                    format!("no {} handle is left to hand out", self.kind),
                )
            })?;
        self.live
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(token, value.into());
        Ok(token)
    }

    pub fn get<P>(&self, pointer: *const P) -> Result<Arc<T>> {
        if pointer.is_null() {
            return Err(Error::null(self.kind));
        }
        self.live()
            .get(&(pointer as usize))
            .cloned()
            .ok_or_else(|| {
                Error::handle(format!(
                    "{} {pointer:p} is not live (destroyed, or never created)",
                    self.kind
                ))
            })
    }

    /// Forgets a handle; the object is dropped once no call still uses it. NULL is a no-op.
    pub fn remove<P>(&self, pointer: *const P) -> Result<()> {
        if pointer.is_null() {
            return Ok(());
        }
        let removed = self
            .live
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(pointer as usize));
        removed.map(drop).ok_or_else(|| {
            Error::handle(format!(
                "{} {pointer:p} is not live (destroyed twice?)",
                self.kind
            ))
        })
    }
}

/// A NUL-terminated UTF-8 string argument.
pub(crate) fn str_arg<'a>(pointer: *const c_char, what: &str) -> Result<&'a str> {
    if pointer.is_null() {
        return Err(Error::null(what));
    }
    // SAFETY: the C caller promises a NUL-terminated string that outlives the call.
    unsafe { CStr::from_ptr(pointer) }
        .to_str()
        .map_err(|_| Error::invalid(format!("{what} is not valid UTF-8")))
}

/// An output pointer, checked for NULL. Write through it only once the call has succeeded.
pub(crate) fn out_arg<'a, T>(pointer: *mut T, what: &str) -> Result<&'a mut T> {
    // SAFETY: non-NULL output pointers point to writable storage for a T (the C contract).
    unsafe { pointer.as_mut() }.ok_or_else(|| Error::null(what))
}

/// A read-only array argument of `len` elements; NULL is allowed only when `len` is 0.
pub(crate) fn slice_arg<'a, T>(pointer: *const T, len: usize, what: &str) -> Result<&'a [T]> {
    if len == 0 {
        return Ok(&[]);
    }
    if pointer.is_null() {
        return Err(Error::null(what));
    }
    // SAFETY: the C caller promises `len` readable elements at `pointer` for the call.
    Ok(unsafe { std::slice::from_raw_parts(pointer, len) })
}

/// Structs that start with `uint32_t struct_size`, so they can grow without breaking old callers.
/// # Safety
/// Implementors are `repr(C)`, plain data with `struct_size: u32` as their first field.
pub(crate) unsafe trait Versioned {
    /// The size of the struct as first released: smaller `struct_size`s are refused.
    const FIRST_RELEASED_SIZE: usize;
}

/// How many bytes of a caller's versioned struct this library knows: its `struct_size` checked
/// against the first released size, capped at this library's size of the struct.
fn known_size<T: Versioned>(pointer: *const T, what: &str) -> Result<usize> {
    if pointer.is_null() {
        return Err(Error::null(what));
    }
    // SAFETY: every such struct starts with a u32 struct_size (trait contract), readable per C contract.
    let declared = unsafe { *(pointer as *const u32) } as usize;
    if declared < T::FIRST_RELEASED_SIZE {
        return Err(Error::invalid(format!(
            "{what}.struct_size is {declared}; it must be at least {} (set it to sizeof the struct)",
            T::FIRST_RELEASED_SIZE
        )));
    }
    Ok(declared.min(std::mem::size_of::<T>()))
}

/// Reads an input struct: `struct_size` below the first released size is refused; a larger one
/// (a newer caller) is accepted and the fields this library does not know are ignored.
pub(crate) fn read_sized<T: Versioned + Copy>(
    pointer: *const T,
    what: &str,
    defaults: T,
) -> Result<T> {
    let known = known_size(pointer, what)?;
    let mut value = defaults;
    // SAFETY: the caller's struct has at least `known` readable bytes; `value` has
    // size_of::<T>() >= known bytes; T is plain data, so any bytes it is given form a valid T.
    unsafe {
        std::ptr::copy_nonoverlapping(pointer as *const u8, &mut value as *mut T as *mut u8, known);
    }
    Ok(value)
}

/// Writes an output struct whose caller set `struct_size`: only the bytes it has room for, and
/// never `struct_size` itself.
pub(crate) fn write_sized<T: Versioned + Copy>(
    pointer: *mut T,
    what: &str,
    value: T,
) -> Result<()> {
    let known = known_size(pointer, what)?;
    // SAFETY: the caller's struct has room for `known` bytes, of which we skip the first four.
    unsafe {
        std::ptr::copy_nonoverlapping(
            (&value as *const T as *const u8).add(4),
            (pointer as *mut u8).add(4),
            known - 4,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_a_status_and_a_message() {
        let status = boundary("strata_test", || panic!("deliberate"));
        assert_eq!(status, STRATA_ERR_PANIC);
        assert_eq!(
            last_error(),
            "strata_test: internal error (panic): deliberate"
        );
        let status = boundary("strata_test", || panic!("with {}", "a format"));
        assert_eq!(status, STRATA_ERR_PANIC);
        assert!(last_error().ends_with("with a format"));
        assert_eq!(boundary_value("strata_test", 7, || panic!("again")), 7);
        assert_eq!(boundary_value("strata_test", 7, || 3), 3);
    }
}
