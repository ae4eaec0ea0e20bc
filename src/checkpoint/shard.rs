//! One open safetensors file: its header, validated at open, and positioned reads of its data.

use super::file::open_regular;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::host::HostBuffer;
use once_cell::sync::{Lazy, OnceCell};
use safetensors::tensor::Metadata;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

/// The safetensors format's own limit; a longer header is garbage, not a checkpoint. An index is
/// held to it too: it lists no more than the headers it points at.
pub(super) const MAX_HEADER_LEN: u64 = 100_000_000;

/// The little-endian header length that starts every safetensors file.
const HEADER_LEN_BYTES: u64 = 8;

/// Reads longer than this are split into chunks of this size, several in flight at once: an NVMe
/// drive reaches its bandwidth only with several requests queued, and copying out of the page
/// cache goes faster on several cores. 2 MiB splits the 2-12 MiB tensors of real models into
/// enough requests to queue, and keeps the per-chunk overhead (a thread hand-off and a system
/// call) far below the time the chunk takes. Not public: cbindgen would put it in the C header.
const READ_CHUNK: usize = 2 << 20;

/// Chunks of one O_DIRECT read in flight at once, and the fewest of a buffered one.
const READS_IN_FLIGHT: usize = 4;

/// Chunks of one buffered read in flight at once: one per host thread, from `READS_IN_FLIGHT` to
/// twice that. A read from the page cache is a copy on the reading core; on a 16-core H200 host a
/// 4 GiB cached file read at 18.6 GB/s with 4 readers and 48.8 GB/s with 8 (`dd`, 4 MiB blocks).
fn buffered_reads_in_flight() -> usize {
    crate::host_threads::default_threads().clamp(READS_IN_FLIGHT, 2 * READS_IN_FLIGHT)
}

/// What an O_DIRECT read must align: file offset, length and buffer address. 4096 covers drives
/// of 512-byte and of 4 KiB logical blocks.
const DIRECT_ALIGN: usize = 4096;

/// Aligned bounce buffers of finished O_DIRECT reads, for the next ones: at most one per read in
/// flight (`READS_IN_FLIGHT` x (`READ_CHUNK` + 2 x `DIRECT_ALIGN`) bytes, about 8 MiB, for the
/// whole process), so a steady stream maps nothing fresh.
static BOUNCE_BUFFERS: Lazy<Mutex<Vec<HostBuffer>>> = Lazy::new(Mutex::default);

/// How a read reaches the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ReadMode {
    /// Through the page cache, straight into the destination.
    #[default]
    Buffered,
    /// With O_DIRECT into aligned bounce buffers, then copied: a cold stream does not fill the
    /// page cache. Where the file system refuses O_DIRECT (tmpfs), reads are buffered.
    Direct,
}

/// One open safetensors file.
///
/// Every read goes through the descriptor opened at `open`. A file deleted or replaced by rename
/// afterwards therefore keeps reading the bytes that were validated (the old inode stays alive),
/// which is correct. A file changed in place is refused: `read_at` compares what `fstat` says with
/// what it said at open (see `Identity`). Nothing is mapped, so a truncation is an error, never a
/// SIGBUS.
#[derive(Debug)]
pub struct ShardFile {
    path: PathBuf,
    file: File,
    identity: Identity,
    /// The same file opened again with O_DIRECT, at the first direct read; None where refused.
    direct: OnceCell<Option<File>>,
}

/// Everything `fstat` gives that a change to the file changes: compared before and after every
/// read with what it was at open.
///
/// The size and mtime alone miss a rewrite that keeps the size and puts the mtime back (`cp -p`,
/// `rsync -t --inplace`, tar over an existing file): the ctime catches it, since every write and
/// every `utimensat` sets it to the current time and no call sets it to anything else. Device and
/// inode name the file; through one open descriptor they stay the same on a local file system,
/// but a network one that reports another file behind it has not kept the file validated.
///
/// Adding or removing a name of the file (deleted, replaced by a rename, hard-linked) sets the
/// ctime too but leaves the bytes alone, and the open descriptor keeps reading them: a ctime
/// that moved along with the link count is therefore not a change. Any other change of metadata
/// (chmod, chown, extended attributes) is, since it cannot be told from a rewrite.
///
/// What is left undetected: a change within the file system's timestamp granularity (a clock
/// tick, a few milliseconds on Linux) of the change before the open, with the size kept; and a
/// rewrite with the mtime put back through a descriptor opened before the file lost or gained a
/// name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Identity {
    pub device: u64,
    pub inode: u64,
    pub len: u64,
    pub modified: (i64, i64),
    pub changed: (i64, i64),
    pub links: u64,
}

impl Identity {
    fn of(metadata: &std::fs::Metadata) -> Identity {
        Identity {
            device: metadata.dev(),
            inode: metadata.ino(),
            len: metadata.len(),
            modified: (metadata.mtime(), metadata.mtime_nsec()),
            changed: (metadata.ctime(), metadata.ctime_nsec()),
            links: metadata.nlink(),
        }
    }

    /// Compares `now` with what the file was at open: `IO` when it is shorter (truncated: its
    /// bytes are gone), `FORMAT` naming what differs when it is otherwise changed.
    pub(super) fn check(&self, now: &Identity, path: &Path) -> Result<()> {
        if now.len < self.len {
            return Err(Error::io(format!(
                "{} was truncated since it was opened ({} bytes, now {})",
                path.display(),
                self.len,
                now.len
            )));
        }
        let differences: Vec<&str> = [
            (self.device != now.device, "device"),
            (self.inode != now.inode, "inode"),
            (self.len != now.len, "size"),
            (self.modified != now.modified, "modification time"),
            (
                self.changed != now.changed && self.links == now.links,
                "change time",
            ),
        ]
        .into_iter()
        .filter_map(|(differs, what)| differs.then_some(what))
        .collect();
        if differences.is_empty() {
            return Ok(());
        }
        Err(Error::format(format!(
            "{} changed since it was opened ({} not as then); reopen the checkpoint",
            path.display(),
            differences.join(", ")
        )))
    }
}

/// A tensor as the header describes it, offsets already made absolute.
pub(super) struct HeaderTensor {
    pub name: String,
    pub dtype: Option<DType>,
    pub dtype_name: String,
    pub shape: Vec<u64>,
    pub offset: u64,
    pub nbytes: u64,
}

impl ShardFile {
    pub(super) fn open(path: &Path) -> Result<ShardFile> {
        let (file, metadata) = open_regular(path)?;
        Ok(ShardFile {
            path: path.to_owned(),
            file,
            identity: Identity::of(&metadata),
            direct: OnceCell::new(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// (device, inode): equal for two shards when they are one file on disk, whatever paths
    /// they were opened by.
    pub(super) fn file_id(&self) -> (u64, u64) {
        (self.identity.device, self.identity.inode)
    }

    /// Device, inode, size and modification time (seconds, nanoseconds) at open: what a host
    /// store compares to tell whether two processes opened the same files.
    pub fn identity_words(&self) -> [u64; 5] {
        let identity = &self.identity;
        [
            identity.device,
            identity.inode,
            identity.len,
            identity.modified.0 as u64,
            identity.modified.1 as u64,
        ]
    }

    /// Reads exactly `dst.len()` bytes at absolute `offset`.
    ///
    /// A file shorter than at open is `IO` (truncated), one otherwise changed in place is `FORMAT`
    /// (see `Identity`); both are checked before and after reading, so bytes written over during
    /// the read are not returned either.
    ///
    /// A read longer than `READ_CHUNK` is split into chunks, several of them read at once by
    /// scoped threads (see `buffered_reads_in_flight`). A failed read of a chunk is retried once
    /// (a transient error on a network filesystem or a flaky drive), then reported as `IO`
    /// naming the file and the offset.
    pub fn read_at(&self, offset: u64, dst: &mut [u8]) -> Result<()> {
        self.read_at_with(offset, dst, ReadMode::Buffered)
    }

    /// `read_at` in the given mode.
    pub fn read_at_with(&self, offset: u64, dst: &mut [u8], mode: ReadMode) -> Result<()> {
        self.read_in_chunks(offset, dst, READ_CHUNK, mode)
    }

    /// `read_at` with the chunk size as a parameter, so tests can split small reads.
    #[cfg(test)]
    pub(super) fn read_at_in_chunks(
        &self,
        offset: u64,
        dst: &mut [u8],
        chunk: usize,
    ) -> Result<()> {
        self.read_in_chunks(offset, dst, chunk, ReadMode::Buffered)
    }

    fn read_in_chunks(
        &self,
        offset: u64,
        dst: &mut [u8],
        chunk: usize,
        mode: ReadMode,
    ) -> Result<()> {
        let direct = match mode {
            ReadMode::Direct => self.direct_file(),
            ReadMode::Buffered => None,
        };
        let in_flight = match direct {
            Some(_) => READS_IN_FLIGHT,
            None => buffered_reads_in_flight(),
        };
        let read_chunk = |position: u64, part: &mut [u8]| match direct {
            Some(direct) => self.read_chunk_direct(direct, position, part),
            None => self.read_chunk(position, part),
        };
        self.check_unchanged()?;
        let end = offset.checked_add(dst.len() as u64);
        if end.is_none_or(|end| end > self.identity.len) {
            return Err(Error::io(format!(
                "{}: reading {} bytes at offset {offset} goes past the end of the file ({} bytes)",
                self.path.display(),
                dst.len(),
                self.identity.len
            )));
        }
        let chunks = dst.len().div_ceil(chunk);
        if chunks <= 1 {
            read_chunk(offset, dst)?;
        } else {
            // Cannot overflow: every chunk ends within `offset + dst.len()`, checked above.
            let queue = Mutex::new(
                dst.chunks_mut(chunk)
                    .enumerate()
                    .map(|(i, part)| (offset + (i * chunk) as u64, part)),
            );
            let failed = AtomicBool::new(false);
            // Each worker takes the next chunk until none is left or one has failed.
            let work = || -> Result<()> {
                while !failed.load(Ordering::Relaxed) {
                    // Taking the next chunk cannot panic, so the lock is never poisoned.
                    let next = queue.lock().unwrap_or_else(PoisonError::into_inner).next();
                    let Some((position, part)) = next else {
                        break;
                    };
                    if let Err(e) = read_chunk(position, part) {
                        failed.store(true, Ordering::Relaxed);
                        return Err(e);
                    }
                }
                Ok(())
            };
            std::thread::scope(|scope| {
                // The calling thread is a worker too; a helper the OS refuses to start only
                // lowers the number of reads in flight.
                let helpers: Vec<_> = (1..chunks.min(in_flight))
                    .filter_map(|_| {
                        std::thread::Builder::new()
                            .name("strata-read".into())
                            .spawn_scoped(scope, work)
                            .ok()
                    })
                    .collect();
                let mut result = work();
                for helper in helpers {
                    match helper.join() {
                        Ok(helper_result) => result = result.and(helper_result),
                        Err(panic) => std::panic::resume_unwind(panic),
                    }
                }
                result
            })?;
        }
        self.check_unchanged()
    }

    /// The file opened again with O_DIRECT (through /proc/self/fd, so the very inode checked at
    /// open, whatever became of its path), or None where the file system refuses it.
    fn direct_file(&self) -> Option<&File> {
        self.direct
            .get_or_init(|| {
                use std::os::fd::AsRawFd;
                use std::os::unix::fs::OpenOptionsExt;
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(direct_flag())
                    .open(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
                    .ok()?;
                let same = file.metadata().is_ok_and(|m| {
                    (m.dev(), m.ino()) == (self.identity.device, self.identity.inode)
                });
                same.then_some(file)
            })
            .as_ref()
    }

    /// `read_chunk` through the O_DIRECT descriptor: the aligned span around `dst` is read into
    /// an aligned bounce buffer and the wanted bytes copied out. A direct read that fails for any
    /// reason (EINVAL where a file system wants another alignment, a transient error) is made
    /// again buffered, which retries and reports as every read does.
    fn read_chunk_direct(&self, direct: &File, offset: u64, dst: &mut [u8]) -> Result<()> {
        let lead = (offset % DIRECT_ALIGN as u64) as usize;
        let start = offset - lead as u64;
        let need = lead + dst.len();
        let span = need.next_multiple_of(DIRECT_ALIGN);
        let reused = BOUNCE_BUFFERS
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
            .filter(|b| b.len() >= span);
        let mut bounce = match reused {
            Some(bounce) => bounce,
            None => HostBuffer::new(span.max(READ_CHUNK + 2 * DIRECT_ALIGN))?,
        };
        let mut done = 0;
        // Each read but one that ends at the end of the file returns whole blocks, so the next
        // one starts aligned; the end of the file need not be aligned.
        let read = loop {
            if done >= need {
                break true;
            }
            let read = match injected_read_fault(&self.path) {
                Some(fault) => Err(fault),
                None => direct.read_at(&mut bounce.as_mut_slice()[done..span], start + done as u64),
            };
            match read {
                Ok(0) => break false,
                Ok(read) => done += read,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break false,
            }
        };
        let result = if read {
            dst.copy_from_slice(&bounce.as_slice()[lead..need]);
            Ok(())
        } else {
            self.read_chunk(offset, dst)
        };
        let mut spare = BOUNCE_BUFFERS
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if spare.len() < READS_IN_FLIGHT {
            spare.push(bounce);
        }
        result
    }

    /// One positioned read of all of `dst`, in as many system calls as the kernel needs.
    fn read_chunk(&self, offset: u64, dst: &mut [u8]) -> Result<()> {
        let mut done = 0;
        let mut retried = false;
        while done < dst.len() {
            // Cannot overflow: the caller checked that `offset + dst.len()` fits in the file.
            let position = offset + done as u64;
            let read = match injected_read_fault(&self.path) {
                Some(fault) => Err(fault),
                None => self.file.read_at(&mut dst[done..], position),
            };
            match read {
                Ok(0) => {
                    return Err(Error::io(format!(
                        "{}: the file ended at offset {position} while reading {} bytes at offset \
                         {offset}",
                        self.path.display(),
                        dst.len()
                    )))
                }
                Ok(read) => done += read,
                // A signal arrived before any byte was read; nothing failed.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) if !retried => retried = true,
                Err(e) => {
                    // Where in the read it failed only says more when some bytes came first.
                    let failed_at = if position == offset {
                        String::new()
                    } else {
                        format!(" failed at offset {position},")
                    };
                    return Err(Error::io(format!(
                        "{}: reading {} bytes at offset {offset}{failed_at} also failed when \
                         retried: {e}",
                        self.path.display(),
                        dst.len()
                    )));
                }
            }
        }
        Ok(())
    }

    fn check_unchanged(&self) -> Result<()> {
        let now = self
            .file
            .metadata()
            .map_err(|e| Error::from_io(&e, "checking", &self.path))?;
        self.identity.check(&Identity::of(&now), &self.path)
    }

    /// Reads and validates the header, returning the tensors by offset (by name among empty ones
    /// sharing an offset). Reads only the header, never tensor data.
    pub(super) fn read_header(&self) -> Result<Vec<HeaderTensor>> {
        let malformed = |what: String| Error::format(format!("{}: {what}", self.path.display()));
        let file_len = self.identity.len;
        if file_len < HEADER_LEN_BYTES {
            return Err(malformed(format!(
                "{file_len} bytes is too short for a safetensors file"
            )));
        }
        let mut header_len = [0u8; HEADER_LEN_BYTES as usize];
        self.read_at(0, &mut header_len)?;
        let header_len = u64::from_le_bytes(header_len);
        if header_len > MAX_HEADER_LEN {
            return Err(malformed(format!(
                "the header length {header_len} is over the {MAX_HEADER_LEN}-byte limit"
            )));
        }
        if header_len > file_len - HEADER_LEN_BYTES {
            return Err(malformed(format!(
                "the header length {header_len} runs past the end of the file ({file_len} bytes)"
            )));
        }
        // Lossless: `header_len` is at most MAX_HEADER_LEN.
        let mut header = vec![0u8; header_len as usize];
        self.read_at(HEADER_LEN_BYTES, &mut header)?;
        let header = std::str::from_utf8(&header)
            .map_err(|e| malformed(format!("the header is not UTF-8: {e}")))?;
        // Deserializing `Metadata` checks that the offsets tile the data section from 0 without
        // gaps or overlaps and agree with dtype x shape, with overflow-checked arithmetic.
        let metadata: Metadata =
            serde_json::from_str(header).map_err(|e| malformed(format!("invalid header: {e}")))?;

        let data_start = HEADER_LEN_BYTES + header_len;
        let data_len = metadata.data_len() as u64;
        let data_end = data_start
            .checked_add(data_len)
            .ok_or_else(|| malformed(format!("the header describes {data_len} bytes of data")))?;
        if data_end > file_len {
            return Err(malformed(format!(
                "the header describes {data_len} bytes of data but the file holds only {}",
                file_len - data_start
            )));
        }
        // The format requires the data to end the file, as the reference reader does: trailing
        // bytes mean the header does not describe this file.
        if data_end < file_len {
            return Err(malformed(format!(
                "{} bytes follow the {data_len} bytes of data the header describes",
                file_len - data_end
            )));
        }

        let mut tensors: Vec<HeaderTensor> = metadata
            .tensors()
            .into_iter()
            .map(|(name, info)| {
                let (begin, end) = info.data_offsets;
                HeaderTensor {
                    dtype: DType::from_safetensors(info.dtype).ok(),
                    dtype_name: info.dtype.to_string(),
                    shape: info.shape.iter().map(|&dim| dim as u64).collect(),
                    // Cannot overflow: validation put every offset within `data_len`.
                    offset: data_start + begin as u64,
                    nbytes: (end - begin) as u64,
                    name,
                }
            })
            .collect();
        tensors.sort_by(|a, b| (a.offset, a.nbytes, &a.name).cmp(&(b.offset, b.nbytes, &b.name)));
        Ok(tensors)
    }
}

/// O_DIRECT where the system has it; elsewhere no flag, and direct reads are buffered ones.
fn direct_flag() -> i32 {
    #[cfg(target_os = "linux")]
    return libc::O_DIRECT;
    #[cfg(not(target_os = "linux"))]
    0
}

/// Read faults armed for tests: (path substring, failures left). Seeded once from the environment
/// variable `STRATA_FAULT_READ=SUBSTRING:COUNT`, so a test that drives the C library from another
/// language can arm them too.
static READ_FAULTS: Lazy<Mutex<Vec<(String, u32)>>> = Lazy::new(|| {
    let armed = std::env::var("STRATA_FAULT_READ")
        .ok()
        .and_then(|spec| parse_fault_spec(&spec));
    Mutex::new(armed.into_iter().collect())
});

/// "SUBSTRING:COUNT" (the substring may itself hold colons); None when malformed.
pub(super) fn parse_fault_spec(spec: &str) -> Option<(String, u32)> {
    let (substring, count) = spec.rsplit_once(':')?;
    Some((substring.to_owned(), count.parse().ok()?))
}

/// Makes the next `count` read system calls on files whose path contains `path_substring` fail
/// with EIO, for tests of the retry and of the error path. A read retries once, so one fault is
/// absorbed and two in a row fail a read. Faults armed with other substrings stay armed.
#[doc(hidden)]
pub fn inject_read_faults(path_substring: &str, count: u32) {
    let mut faults = READ_FAULTS.lock().unwrap_or_else(PoisonError::into_inner);
    faults.retain(|(substring, _)| substring != path_substring);
    faults.push((path_substring.to_owned(), count));
}

/// An EIO to return instead of reading `path`, when a test armed one.
fn injected_read_fault(path: &Path) -> Option<std::io::Error> {
    let mut faults = READ_FAULTS.lock().unwrap_or_else(PoisonError::into_inner);
    if faults.is_empty() {
        return None;
    }
    let path = path.to_string_lossy();
    let (_, left) = faults
        .iter_mut()
        .find(|(substring, left)| *left > 0 && path.contains(substring.as_str()))?;
    *left -= 1;
    Some(std::io::Error::from_raw_os_error(libc::EIO))
}
