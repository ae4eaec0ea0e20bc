//! The Rust error type: what kind of failure, and a message naming what failed. The C ABI maps
//! each kind to its `strata_status` number (`ffi::consts`).

/// What kind of failure, one per `STRATA_ERR_*` status (their docs say when each is used).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A pointer argument that must not be NULL was NULL.
    NullArgument,
    /// An argument is out of range.
    InvalidArgument,
    /// A handle or id that names nothing (any more).
    InvalidHandle,
    /// A file, tensor or layer name that does not exist.
    NotFound,
    /// Reading a file failed.
    Io,
    /// A file is not what it should be, or changed after it was opened.
    Format,
    /// Something this build does not handle.
    Unsupported,
    /// Host or device memory could not be allocated.
    OutOfMemory,
    /// The request does not fit a limit the user set.
    Budget,
    /// The call does not fit the object's state.
    State,
    /// The requested compute device does not exist here.
    NoDevice,
    /// The device reported an error.
    Device,
    /// An output array is too small; nothing was written.
    BufferTooSmall,
    /// strata hit an internal bug.
    Panic,
}

/// A failure: its kind (the status the C ABI returns) and the message `strata_last_error` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
        }
    }
    pub fn null(what: &str) -> Self {
        Self::new(ErrorKind::NullArgument, format!("{what} must not be NULL"))
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }
    pub fn handle(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidHandle, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }
    pub fn io(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Io, message)
    }
    pub fn format(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Format, message)
    }
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, message)
    }
    pub fn out_of_memory(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::OutOfMemory, message)
    }
    pub fn budget(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Budget, message)
    }
    pub fn state(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::State, message)
    }
    pub fn no_device(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NoDevice, message)
    }
    pub fn device(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Device, message)
    }

    /// An I/O error on `path`, keeping the OS's reason; a missing file is `NotFound`.
    pub fn from_io(err: &std::io::Error, doing: &str, path: &std::path::Path) -> Self {
        let kind = match err.kind() {
            std::io::ErrorKind::NotFound => ErrorKind::NotFound,
            std::io::ErrorKind::OutOfMemory => ErrorKind::OutOfMemory,
            _ => ErrorKind::Io,
        };
        Self::new(kind, format!("{doing} {}: {err}", path.display()))
    }

    /// The same error with `context` put in front of its message.
    pub fn context(mut self, context: impl std::fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }
}

impl std::error::Error for Error {}

/// What a caught panic said: its message when it carried one (`panic!` with text or a format).
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
