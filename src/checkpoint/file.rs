//! The one way strata opens a file it is given: without blocking, regular files only, and every
//! whole-file read bounded in size. A path can name anything: a FIFO nobody writes to (opening it
//! for reading blocks until a writer comes, reading it until the writer writes), a character
//! device that never ends (`/dev/zero`), a directory, a socket. None of these must hang a call or
//! make strata read gigabytes; each is refused at once.

use crate::error::{Error, Result};
use std::fs::{File, Metadata, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Opens `path` for reading; `Ok` only for a regular file (symlinks followed), with what `fstat`
/// said of it.
///
/// Anything else is `STRATA_ERR_FORMAT` naming what it is: the path exists and was reachable, so
/// nothing failed to read (`STRATA_ERR_IO` would suggest trying again); what it names is simply
/// not a checkpoint file, as a file of garbage is not. A missing path is `STRATA_ERR_NOT_FOUND`,
/// another failure to open `STRATA_ERR_IO`.
///
/// The path is checked with `stat` before it is opened, because opening a device can act (a tape
/// rewinds, a terminal becomes the controlling one), and again with `fstat` after, because the
/// path may have been swapped in between. The open itself cannot block: `O_NONBLOCK` makes a FIFO
/// open at once, and `O_NOCTTY` keeps a terminal from becoming the process's. For a regular file
/// `O_NONBLOCK` changes nothing, so it is left set.
pub(crate) fn open_regular(path: &Path) -> Result<(File, Metadata)> {
    let before = std::fs::metadata(path).map_err(|e| Error::from_io(&e, "opening", path))?;
    if !before.is_file() {
        return Err(not_a_regular_file(path, &before));
    }
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| Error::from_io(&e, "opening", path))?;
    let metadata = file
        .metadata()
        .map_err(|e| Error::from_io(&e, "reading the metadata of", path))?;
    if !metadata.is_file() {
        return Err(not_a_regular_file(path, &metadata));
    }
    Ok((file, metadata))
}

/// Reads all of the regular file at `path`, which may hold at most `limit` bytes: a larger one
/// is `STRATA_ERR_FORMAT` before any byte is read. A file that grows while it is read stops
/// being read one byte past `limit`, and is refused the same way.
pub(crate) fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let too_large = |len: u64| {
        Error::format(format!(
            "{} holds {len} bytes, over the {limit}-byte limit for this kind of file",
            path.display()
        ))
    };
    let (file, metadata) = open_regular(path)?;
    if metadata.len() > limit {
        return Err(too_large(metadata.len()));
    }
    let mut bytes = Vec::new();
    bytes
        .try_reserve_exact(metadata.len() as usize)
        .map_err(|_| {
            Error::out_of_memory(format!(
                "no memory to read the {} bytes of {}",
                metadata.len(),
                path.display()
            ))
        })?;
    // `read_to_end` retries interrupted reads itself.
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::from_io(&e, "reading", path))?;
    if bytes.len() as u64 > limit {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

fn not_a_regular_file(path: &Path, metadata: &Metadata) -> Error {
    let kind = metadata.file_type();
    let what = if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "something else"
    };
    Error::format(format!(
        "{} is {what}, not a regular file: strata reads only regular files",
        path.display()
    ))
}
