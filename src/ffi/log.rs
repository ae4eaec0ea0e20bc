//! Log and progress callbacks: the C function pointers in `strata_options`, adapted to the
//! closures the library calls.

use crate::log::{LogCallback, ProgressSink};
use std::ffi::{c_char, c_void, CString};
use std::sync::Arc;

/// Receives one log message: `level` is STRATA_LOG_ERROR, _WARN, _INFO or _DEBUG (every level is
/// delivered; filter as you like), `message` a NUL-terminated string valid during the call. Called
/// on a thread that is calling strata, as that call returns and after strata has dropped its locks:
/// it may call any strata function on the same context, destroy included.
pub type strata_log_fn =
    Option<unsafe extern "C" fn(user: *mut c_void, level: u32, message: *const c_char)>;

/// Receives progress of a long operation: `phase` names it (NUL-terminated, valid during the
/// call), `done` of `total` units are finished. Called without any strata lock held: any strata
/// function may be called from it. During a group's onload, calls that would wait for that onload
/// (onloading, offloading or destroying the group, acquiring its layers) return STRATA_ERR_STATE.
pub type strata_progress_fn =
    Option<unsafe extern "C" fn(user: *mut c_void, phase: *const c_char, done: u64, total: u64)>;

/// The caller's `user` pointer, passed back to its callbacks untouched.
#[derive(Clone, Copy)]
struct UserData(*mut c_void);

// SAFETY: strata never dereferences the pointer; it only hands it back to the caller's callback,
// from whichever thread calls strata, which the header documents for callers to allow for.
unsafe impl Send for UserData {}
// SAFETY: as above: shared references only copy the pointer value.
unsafe impl Sync for UserData {}

/// A C string for a callback: interior NULs (never in strata's own text, but names come from
/// files) are shown as `\0` rather than cutting the message short.
fn c_text(text: &str) -> CString {
    CString::new(text.replace('\0', "\\0")).expect("NULs were replaced")
}

pub(crate) fn log_callback(function: strata_log_fn, user: *mut c_void) -> Option<LogCallback> {
    let function = function?;
    let user = UserData(user);
    Some(LogCallback(Arc::new(move |level, message| {
        // Names the whole UserData, so the closure captures it and not its raw (!Send) field.
        let user = user;
        let message = c_text(message);
        // SAFETY: the caller registered this function for exactly these arguments; the message
        // outlives the call.
        unsafe { function(user.0, level.to_abi(), message.as_ptr()) }
    })))
}

pub(crate) fn progress_sink(function: strata_progress_fn, user: *mut c_void) -> ProgressSink {
    let Some(function) = function else {
        return ProgressSink::default();
    };
    let user = UserData(user);
    ProgressSink(Some(Arc::new(move |phase, done, total| {
        let user = user;
        let phase = c_text(phase);
        // SAFETY: as for the log callback.
        unsafe { function(user.0, phase.as_ptr(), done, total) }
    })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;
    use std::sync::Mutex;

    unsafe extern "C" fn record(user: *mut c_void, phase: *const c_char, done: u64, total: u64) {
        // SAFETY: the test passes a Mutex<Vec<..>> as user.
        let seen = unsafe { &*(user as *const Mutex<Vec<(String, u64, u64)>>) };
        // SAFETY: phase is a NUL-terminated string, valid during the call.
        let phase = unsafe { CStr::from_ptr(phase) }
            .to_string_lossy()
            .into_owned();
        seen.lock().unwrap().push((phase, done, total));
    }

    #[test]
    fn progress_reaches_the_c_callback_with_its_user_pointer() {
        let seen: Mutex<Vec<(String, u64, u64)>> = Mutex::new(Vec::new());
        let sink = progress_sink(Some(record), &seen as *const _ as *mut c_void);
        sink.report("onload", 3, 40);
        sink.report("a\0b", 0, 1);
        assert_eq!(
            *seen.lock().unwrap(),
            [("onload".into(), 3, 40), ("a\\0b".into(), 0, 1)]
        );
        progress_sink(None, std::ptr::null_mut()).report("nobody", 1, 1);
    }
}
