//! Safetensors checkpoints: one file, a sharded `*.safetensors.index.json`, or a directory of
//! shards.
//!
//! Opening reads and validates only the headers; tensor bytes are read later, with positioned
//! reads, when a tier needs them: whole (`TensorInfo::read_into`), or through a staging area
//! smaller than the tensor (`TensorInfo::read_chunks`, which can read the next piece while the
//! caller converts the last). Large reads keep several requests in flight (`ShardFile::read_at`).
//! Files are never mapped: a mapping touched after the file was truncated kills the process with
//! SIGBUS, where a read returns an error.

mod file;
mod shard;
#[cfg(test)]
mod tests;

#[doc(hidden)]
pub use shard::inject_read_faults;
pub use shard::{ReadMode, ShardFile};

use crate::dtype::DType;
use crate::error::{Error, Result};
use shard::HeaderTensor;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

const INDEX_SUFFIX: &[u8] = b".safetensors.index.json";

/// Most staging areas `TensorInfo::read_chunks` streams through: all but the one being consumed
/// are being read, so a drive has up to three requests at once. One request at a time, a drive
/// idles between them: the development VM's disk gives 0.9 GB/s (`dd bs=2M iflag=direct`) where
/// four parallel reads give 1.4-2.2 GB/s.
pub(crate) const MAX_STREAM_AREAS: usize = 4;
const SHARD_SUFFIX: &[u8] = b".safetensors";

#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// None: a dtype strata does not handle. The tensor is still listed; registering it fails.
    pub dtype: Option<DType>,
    /// As written in the header, e.g. "BF16", "F8_E4M3", "F4".
    pub dtype_name: String,
    pub shape: Vec<u64>,
    pub file: Arc<ShardFile>,
    /// Absolute byte offset of the tensor's data in `file`.
    pub offset: u64,
    pub nbytes: u64,
}

impl TensorInfo {
    /// Reads the tensor's bytes into `dst`, which must be exactly `nbytes` long.
    pub fn read_into(&self, dst: &mut [u8]) -> Result<()> {
        self.read_into_with(dst, ReadMode::Buffered)
    }

    /// `read_into` in the given mode.
    pub fn read_into_with(&self, dst: &mut [u8], mode: ReadMode) -> Result<()> {
        if dst.len() as u64 != self.nbytes {
            return Err(Error::invalid(format!(
                "tensor {} holds {} bytes, not the {} of the buffer given",
                self.name,
                self.nbytes,
                dst.len()
            )));
        }
        self.file
            .read_at_with(self.offset, dst, mode)
            .map_err(|e| e.context(format!("tensor {}", self.name)))
    }

    /// Streams the tensor through `staging`, which may be smaller than the tensor: reads it in
    /// successive pieces of `piece` bytes (the last one shorter) and calls `consume(offset within
    /// the tensor, piece)` for each, in order; an empty tensor calls `consume` never.
    ///
    /// When `staging` holds several pieces (k areas of `piece` bytes, at most
    /// `MAX_STREAM_AREAS` of them used) and the tensor needs more than one, k - 1 helper
    /// threads read the next pieces while `consume` works on the current one: a conversion
    /// overlaps the reads, and a drive gets k - 1 requests at once (one at a time, a fast drive
    /// idles between them). With one area, it is read and consumed in turn.
    /// The file's identity is checked around every piece, so a file that changes halfway through
    /// fails the stream (after at most k - 1 more pieces, each read whole before the change)
    /// rather than mixing old and new bytes. `consume`'s error stops the stream.
    pub fn read_chunks(
        &self,
        staging: &mut [u8],
        piece: usize,
        mode: ReadMode,
        mut consume: impl FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<()> {
        let piece = piece.min(staging.len());
        if piece == 0 && self.nbytes > 0 {
            return Err(Error::invalid(format!(
                "tensor {}: an empty staging area cannot stream {} bytes",
                self.name, self.nbytes
            )));
        }
        let read_piece = |done: u64, area: &mut [u8]| -> Result<usize> {
            // Lossless: at most `piece`.
            let len = (self.nbytes - done).min(piece as u64) as usize;
            // Cannot overflow: the tensor lies within the file, checked at open.
            self.file
                .read_at_with(self.offset + done, &mut area[..len], mode)
                .map_err(|e| e.context(format!("tensor {}", self.name)))?;
            Ok(len)
        };
        if self.nbytes > piece as u64 && staging.len() >= 2 * piece {
            // No more areas (and reader threads) than the tensor has pieces, nor than
            // `MAX_STREAM_AREAS`, however large the staging area.
            let pieces = usize::try_from(self.nbytes.div_ceil(piece as u64)).unwrap_or(usize::MAX);
            let areas: Vec<&mut [u8]> = staging
                .chunks_exact_mut(piece)
                .take(pieces.min(MAX_STREAM_AREAS))
                .collect();
            if let Some(result) = self.read_overlapped(areas, &read_piece, &mut consume) {
                return result;
            }
        }
        let mut done = 0u64;
        while done < self.nbytes {
            let len = read_piece(done, staging)?;
            consume(done, &staging[..len])?;
            done += len as u64;
        }
        Ok(())
    }

    /// `read_chunks` with helper threads reading into all areas but the one `consume` reads;
    /// None when the OS refuses every thread (the caller then streams in turn).
    fn read_overlapped(
        &self,
        areas: Vec<&mut [u8]>,
        read_piece: &(impl Fn(u64, &mut [u8]) -> Result<usize> + Sync),
        consume: &mut impl FnMut(u64, &[u8]) -> Result<()>,
    ) -> Option<Result<()>> {
        use std::sync::mpsc::sync_channel;
        let count = areas.len();
        // The areas go round: empty ones to the readers, read ones (or an error) back. Both
        // channels hold every area at once, so no side ever blocks on a send, and either side
        // dropping its ends (done, failed, or unwinding) ends the other's loop.
        let (to_readers, empty) = sync_channel::<&mut [u8]>(count);
        let (to_consumer, filled) = sync_channel::<Result<(u64, usize, &mut [u8])>>(count);
        // A reader takes an empty area and the next offset together, so the pieces are handed
        // out in order and the one the consumer waits for is always being read.
        let next = std::sync::Mutex::new((empty, 0u64));
        let nbytes = self.nbytes;
        std::thread::scope(|scope| {
            // Owned here, so that it is dropped when this closure returns, even early: readers
            // waiting for an area then end, and the scope can join them.
            let to_readers = to_readers;
            let reader = |to_consumer: std::sync::mpsc::SyncSender<_>| {
                let next = &next;
                move || {
                    let to_consumer = PanicReporting(to_consumer);
                    let to_consumer = &to_consumer.0;
                    loop {
                        let (area, offset) = {
                            // Nothing panics while it is held, so the lock is never poisoned.
                            let mut next = next.lock().unwrap_or_else(|p| p.into_inner());
                            let offset = next.1;
                            if offset >= nbytes {
                                return;
                            }
                            let Ok(area) = next.0.recv() else {
                                return;
                            };
                            next.1 += (nbytes - offset).min(area.len() as u64);
                            (area, offset)
                        };
                        let read = read_piece(offset, area).map(|len| (offset, len, area));
                        let failed = read.is_err();
                        if to_consumer.send(read).is_err() || failed {
                            return;
                        }
                    }
                }
            };
            let started = (1..count)
                .filter(|_| {
                    std::thread::Builder::new()
                        .name("strata-read".into())
                        .spawn_scoped(scope, reader(to_consumer.clone()))
                        .is_ok()
                })
                .count();
            // The readers hold the only senders left: `filled` ends when the last one ends.
            drop(to_consumer);
            if started == 0 {
                return None;
            }
            for area in areas {
                // Readers that failed on their first pieces have ended: the errors are in
                // `filled`.
                let _ = to_readers.send(area);
            }
            // Pieces arrive in the order their reads end; they are consumed in file order.
            let mut arrived = BTreeMap::new();
            let mut consumed = 0u64;
            // Ends when every reader has sent its last piece, or an error, and ended; or when one
            // panicked, whose panic the scope then passes on.
            for read in filled {
                let (offset, len, area) = match read {
                    Ok(read) => read,
                    Err(e) => return Some(Err(e)),
                };
                arrived.insert(offset, (len, area));
                while let Some((len, area)) = arrived.remove(&consumed) {
                    if let Err(e) = consume(consumed, &area[..len]) {
                        return Some(Err(e));
                    }
                    consumed += len as u64;
                    // Past the last piece the readers have ended and need no area.
                    let _ = to_readers.send(area);
                }
            }
            Some(Ok(()))
        })
    }
}

/// A reader's channel to the consumer, which tells it when the reader panics: the consumer,
/// waiting for the piece that reader held, would otherwise wait for ever (the other readers keep
/// the channel open, waiting for areas it holds). It then returns, the readers end, and the
/// scope passes the panic on.
struct PanicReporting<T>(std::sync::mpsc::SyncSender<Result<T>>);

impl<T> Drop for PanicReporting<T> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // Room is left: the panicking reader held an area, so not every area is queued.
            let _ = self
                .0
                .try_send(Err(Error::state("a checkpoint reader thread panicked")));
        }
    }
}

pub struct Checkpoint {
    files: Vec<Arc<ShardFile>>,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
    total_bytes: u64,
}

impl Checkpoint {
    /// `path`: one .safetensors file, a sharded `*.safetensors.index.json` (any `.json` file is
    /// read as one), or a directory of shards. A directory uses its `*.safetensors.index.json` if
    /// it has exactly one, else every `*.safetensors` file in it, in file-name order; hidden files
    /// are skipped, as the loaders' globs skip them.
    pub fn open(path: &Path) -> Result<Checkpoint> {
        Self::open_reporting(path, &|_, _| {})
    }

    /// `open`, calling `progress(shards read, shards)` as each shard's header is read: a
    /// directory of many shards on a slow disk takes a while.
    pub fn open_reporting(path: &Path, progress: &dyn Fn(u64, u64)) -> Result<Checkpoint> {
        let metadata = std::fs::metadata(path).map_err(|e| Error::from_io(&e, "opening", path))?;
        if metadata.is_dir() {
            Self::open_directory(path, progress)
        } else if path.extension() == Some(OsStr::new("json")) {
            Self::open_index(path, progress)
        } else {
            let file = ShardFile::open(path)?;
            let tensors = file.read_header()?;
            let mut checkpoint = Checkpoint::empty();
            checkpoint.add_shard(Arc::new(file), tensors)?;
            Ok(checkpoint)
        }
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name
            .get(name)
            .and_then(|&index| self.tensors.get(index))
    }

    /// Every tensor, in a deterministic order: shard by shard (shards in file-name order), by
    /// offset within a shard.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// Every shard the tensors come from, once each, in the order of `tensors`.
    pub fn files(&self) -> &[Arc<ShardFile>] {
        &self.files
    }

    /// The data bytes of every tensor listed.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    fn empty() -> Checkpoint {
        Checkpoint {
            files: Vec::new(),
            tensors: Vec::new(),
            by_name: HashMap::new(),
            total_bytes: 0,
        }
    }

    fn open_directory(dir: &Path, progress: &dyn Fn(u64, u64)) -> Result<Checkpoint> {
        let listing_failed = |e: std::io::Error| Error::from_io(&e, "listing", dir);
        let mut indexes = Vec::new();
        let mut shards = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(listing_failed)? {
            let entry = entry.map_err(listing_failed)?;
            let name = entry.file_name();
            let name = name.as_bytes();
            if name.starts_with(b".") {
                continue;
            }
            if name.ends_with(INDEX_SUFFIX) {
                indexes.push(entry.path());
            } else if name.ends_with(SHARD_SUFFIX) {
                shards.push(entry.path());
            }
        }
        if let [index] = indexes.as_slice() {
            return Self::open_index(index, progress);
        }
        if shards.is_empty() {
            return Err(Error::not_found(format!(
                "{} holds no .safetensors file",
                dir.display()
            )));
        }
        shards.sort();
        let mut checkpoint = Checkpoint::empty();
        let mut seen = HashSet::new();
        let total = shards.len() as u64;
        for (done, path) in shards.into_iter().enumerate() {
            progress(done as u64, total);
            let file = ShardFile::open(&path)?;
            // Two names for one file (a symlink into a blob store) are one shard, not duplicates.
            if !seen.insert(file.file_id()) {
                continue;
            }
            let tensors = file.read_header()?;
            checkpoint.add_shard(Arc::new(file), tensors)?;
        }
        progress(total, total);
        Ok(checkpoint)
    }

    /// Takes exactly the tensors the index's `weight_map` names, each from the shard it names;
    /// a shard's other tensors are ignored, as loaders ignore them. The index is held to the size
    /// limit of a safetensors header, and its shards to its own directory (see `shard_path`).
    fn open_index(index: &Path, progress: &dyn Fn(u64, u64)) -> Result<Checkpoint> {
        let text = file::read_bounded(index, shard::MAX_HEADER_LEN)?;
        let json: serde_json::Value = serde_json::from_slice(&text)
            .map_err(|e| Error::format(format!("{} is not valid JSON: {e}", index.display())))?;
        let weight_map = json
            .get("weight_map")
            .and_then(serde_json::Value::as_object)
            .ok_or_else(|| {
                Error::format(format!("{} has no \"weight_map\" object", index.display()))
            })?;
        // Sorted by shard name, so shards come in file-name order whatever the map's order.
        let mut wanted_by_shard: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (tensor, shard) in weight_map {
            let shard = shard.as_str().ok_or_else(|| {
                Error::format(format!(
                    "{}: the shard of tensor {tensor:?} is not a string",
                    index.display()
                ))
            })?;
            wanted_by_shard.entry(shard).or_default().push(tensor);
        }
        if wanted_by_shard.is_empty() {
            return Err(Error::not_found(format!(
                "{} names no shards",
                index.display()
            )));
        }

        let mut shards: Vec<(ShardFile, BTreeSet<&str>)> = Vec::new();
        let mut position: HashMap<(u64, u64), usize> = HashMap::new();
        for (shard, tensors) in wanted_by_shard {
            let file = ShardFile::open(&shard_path(index, shard)?)
                .map_err(|e| e.context(format!("shard of {}", index.display())))?;
            // "a.safetensors" and "./a.safetensors" are one file, opened once.
            match position.get(&file.file_id()) {
                Some(&at) => shards[at].1.extend(tensors),
                None => {
                    position.insert(file.file_id(), shards.len());
                    shards.push((file, tensors.into_iter().collect()));
                }
            }
        }

        let mut checkpoint = Checkpoint::empty();
        let total = shards.len() as u64;
        for (done, (file, wanted)) in shards.into_iter().enumerate() {
            progress(done as u64, total);
            let tensors = file.read_header()?;
            let present: HashSet<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
            if let Some(missing) = wanted.iter().find(|name| !present.contains(*name)) {
                return Err(Error::format(format!(
                    "{} maps tensor {missing:?} to {}, which does not contain it",
                    index.display(),
                    file.path().display()
                )));
            }
            let tensors = tensors
                .into_iter()
                .filter(|t| wanted.contains(t.name.as_str()))
                .collect();
            checkpoint.add_shard(Arc::new(file), tensors)?;
        }
        progress(total, total);
        Ok(checkpoint)
    }

    fn add_shard(&mut self, file: Arc<ShardFile>, tensors: Vec<HeaderTensor>) -> Result<()> {
        for tensor in tensors {
            if let Some(first) = self.tensor(&tensor.name) {
                return Err(Error::format(format!(
                    "tensor {:?} is in more than one shard: {} and {}",
                    tensor.name,
                    first.file.path().display(),
                    file.path().display()
                )));
            }
            // Sparse files can claim exabytes each, so even the sum of real files can overflow.
            self.total_bytes = self.total_bytes.checked_add(tensor.nbytes).ok_or_else(|| {
                Error::format(format!(
                    "{}: the checkpoint's tensors add up to more than 2^64 bytes",
                    file.path().display()
                ))
            })?;
            self.by_name.insert(tensor.name.clone(), self.tensors.len());
            self.tensors.push(TensorInfo {
                name: tensor.name,
                dtype: tensor.dtype,
                dtype_name: tensor.dtype_name,
                shape: tensor.shape,
                file: Arc::clone(&file),
                offset: tensor.offset,
                nbytes: tensor.nbytes,
            });
        }
        self.files.push(file);
        Ok(())
    }
}

/// Where the shard an index names lies: `shard` relative to the index's directory. A name that
/// leaves that directory (an absolute path, or one with a `..` part) is `FORMAT` naming it: an
/// index is a list of its own directory's files, and one that points elsewhere would make strata
/// read whatever file its writer chose. Symbolic links are followed wherever they lead, since a
/// model cache's snapshot directory holds links into its blob store beside it.
fn shard_path(index: &Path, shard: &str) -> Result<PathBuf> {
    let inside = Path::new(shard)
        .components()
        .all(|part| matches!(part, Component::Normal(_) | Component::CurDir));
    if !inside {
        return Err(Error::format(format!(
            "{} names shard {shard:?}, which lies outside the index's directory; an index may \
             name only files under its own directory",
            index.display()
        )));
    }
    // A bare file name has an empty parent.
    Ok(index.parent().unwrap_or(Path::new("")).join(shard))
}
