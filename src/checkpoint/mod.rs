//! Safetensors checkpoints: one file, a sharded index, or a directory of shards. Headers are read
//! and validated at open; tensor bytes only with positioned reads when a tier needs them, after
//! checking the file is still the one that was opened (no mapping that a truncation turns into
//! SIGBUS).

use crate::dtype::DType;
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Larger headers are refused as garbage (the format's own limit).
const MAX_HEADER: u64 = 100_000_000;

/// One open safetensors file. Reads go through the descriptor opened at `open`, so a file deleted
/// or replaced by rename keeps reading the original bytes; one changed in place is refused.
pub struct ShardFile {
    path: PathBuf,
    file: File,
    identity: Identity,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Identity {
    len: u64,
    modified_s: i64,
    modified_ns: i64,
}

impl Identity {
    fn of(metadata: &std::fs::Metadata) -> Identity {
        Identity {
            len: metadata.len(),
            modified_s: metadata.mtime(),
            modified_ns: metadata.mtime_nsec(),
        }
    }
}

impl std::fmt::Debug for ShardFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ShardFile({})", self.path.display())
    }
}

impl ShardFile {
    fn open(path: &Path) -> Result<ShardFile> {
        let file = File::open(path).map_err(|e| Error::from_io(&e, "opening", path))?;
        let metadata = file
            .metadata()
            .map_err(|e| Error::from_io(&e, "reading the size of", path))?;
        if !metadata.is_file() {
            return Err(Error::format(format!(
                "{} is not a regular file",
                path.display()
            )));
        }
        Ok(ShardFile {
            path: path.to_owned(),
            file,
            identity: Identity::of(&metadata),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads exactly `dst.len()` bytes at `offset`. A file changed since open is `FORMAT`; a short
    /// read (truncated) is `IO`; an I/O error is retried once, then reported with path and offset.
    pub fn read_at(&self, offset: u64, dst: &mut [u8]) -> Result<()> {
        let now = self
            .file
            .metadata()
            .map_err(|e| Error::from_io(&e, "checking", &self.path))?;
        if Identity::of(&now) != self.identity {
            return Err(if now.len() < self.identity.len {
                Error::io(format!(
                    "{} was truncated since it was opened",
                    self.path.display()
                ))
            } else {
                Error::format(format!(
                    "{} changed since it was opened",
                    self.path.display()
                ))
            });
        }
        let mut retried = false;
        let mut done = 0;
        while done < dst.len() {
            match self.file.read_at(&mut dst[done..], offset + done as u64) {
                Ok(0) => {
                    return Err(Error::io(format!(
                        "{}: unexpected end of file reading {} bytes at offset {}",
                        self.path.display(),
                        dst.len(),
                        offset
                    )))
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // A failed read is retried once: transient errors (a network filesystem) pass.
                Err(_) if !retried => retried = true,
                Err(e) => {
                    return Err(Error::io(format!(
                        "{}: reading {} bytes at offset {}: {e}",
                        self.path.display(),
                        dst.len(),
                        offset + done as u64
                    )))
                }
            }
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    /// None: a dtype strata does not handle (listed; registering it fails).
    pub dtype: Option<DType>,
    pub dtype_name: String,
    pub shape: Vec<u64>,
    pub file: Arc<ShardFile>,
    /// Absolute offset of the tensor's bytes in the file.
    pub offset: u64,
    pub nbytes: u64,
}

pub struct Checkpoint {
    files: Vec<Arc<ShardFile>>,
    tensors: Vec<TensorInfo>,
    index: HashMap<String, usize>,
}

impl Checkpoint {
    /// `path`: one .safetensors file, a `*.safetensors.index.json`, or a directory of shards (its
    /// index file if it has exactly one, else every `*.safetensors` in it, by name).
    pub fn open(path: &Path) -> Result<Checkpoint> {
        let metadata = std::fs::metadata(path).map_err(|e| Error::from_io(&e, "opening", path))?;
        if metadata.is_dir() {
            let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| Error::from_io(&e, "listing", path))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect();
            entries.sort();
            let name = |p: &PathBuf| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or("")
                    .to_owned()
            };
            let indexes: Vec<&PathBuf> = entries
                .iter()
                .filter(|p| name(p).ends_with(".safetensors.index.json"))
                .collect();
            if indexes.len() == 1 {
                return Self::open_index(indexes[0]);
            }
            let shards: Vec<&PathBuf> = entries
                .iter()
                .filter(|p| name(p).ends_with(".safetensors"))
                .collect();
            if shards.is_empty() {
                return Err(Error::not_found(format!(
                    "{} holds no .safetensors file",
                    path.display()
                )));
            }
            let mut checkpoint = Checkpoint {
                files: Vec::new(),
                tensors: Vec::new(),
                index: HashMap::new(),
            };
            for shard in shards {
                checkpoint.add_shard(shard, None)?;
            }
            return Ok(checkpoint);
        }
        if path.to_string_lossy().ends_with(".json") {
            return Self::open_index(path);
        }
        let mut checkpoint = Checkpoint {
            files: Vec::new(),
            tensors: Vec::new(),
            index: HashMap::new(),
        };
        checkpoint.add_shard(path, None)?;
        Ok(checkpoint)
    }

    fn open_index(path: &Path) -> Result<Checkpoint> {
        let text = std::fs::read(path).map_err(|e| Error::from_io(&e, "reading", path))?;
        let json: serde_json::Value = serde_json::from_slice(&text)
            .map_err(|e| Error::format(format!("{} is not valid JSON: {e}", path.display())))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| {
                Error::format(format!("{} has no \"weight_map\" object", path.display()))
            })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut by_shard: Vec<(String, Vec<String>)> = Vec::new();
        for (tensor, shard) in map {
            let shard = shard.as_str().ok_or_else(|| {
                Error::format(format!(
                    "{}: the shard of {tensor:?} is not a string",
                    path.display()
                ))
            })?;
            match by_shard.iter_mut().find(|(s, _)| s == shard) {
                Some((_, names)) => names.push(tensor.clone()),
                None => by_shard.push((shard.to_owned(), vec![tensor.clone()])),
            }
        }
        by_shard.sort();
        let mut checkpoint = Checkpoint {
            files: Vec::new(),
            tensors: Vec::new(),
            index: HashMap::new(),
        };
        for (shard, names) in by_shard {
            checkpoint.add_shard(&dir.join(&shard), Some(&names))?;
        }
        Ok(checkpoint)
    }

    /// Opens one shard and adds its tensors (only `wanted`, when an index names them).
    fn add_shard(&mut self, path: &Path, wanted: Option<&[String]>) -> Result<()> {
        let file = Arc::new(ShardFile::open(path)?);
        let fail = |what: String| Error::format(format!("{}: {what}", path.display()));
        let mut length = [0u8; 8];
        if file.identity.len < 8 {
            return Err(fail("too short to be a safetensors file".into()));
        }
        file.read_at(0, &mut length)?;
        let header_len = u64::from_le_bytes(length);
        if header_len > MAX_HEADER || header_len > file.identity.len - 8 {
            return Err(fail(format!(
                "header length {header_len} is impossible for a file of {} bytes",
                file.identity.len
            )));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_at(8, &mut header)?;
        let metadata: safetensors::tensor::Metadata =
            serde_json::from_slice(&header).map_err(|e| fail(format!("invalid header: {e}")))?;
        let data_start = 8 + header_len;
        let data_len = metadata.data_len() as u64;
        if data_start
            .checked_add(data_len)
            .is_none_or(|end| end > file.identity.len)
        {
            return Err(fail(format!(
                "the header describes {data_len} bytes of data; the file has {}",
                file.identity.len - data_start
            )));
        }
        let tensors = metadata.tensors();
        let mut sorted: Vec<_> = tensors.iter().collect();
        sorted.sort_by_key(|(_, info)| info.data_offsets.0);
        for (name, info) in sorted {
            if wanted.is_some_and(|w| !w.iter().any(|n| n == name)) {
                continue;
            }
            let (begin, end) = info.data_offsets;
            if self.index.contains_key(name.as_str()) {
                return Err(fail(format!("tensor {name:?} is in more than one shard")));
            }
            self.index.insert(name.clone(), self.tensors.len());
            self.tensors.push(TensorInfo {
                name: name.clone(),
                dtype: DType::from_safetensors(info.dtype).ok(),
                dtype_name: info.dtype.to_string(),
                shape: info.shape.iter().map(|&d| d as u64).collect(),
                file: file.clone(),
                offset: data_start + begin as u64,
                nbytes: (end - begin) as u64,
            });
        }
        if let Some(wanted) = wanted {
            if let Some(missing) = wanted.iter().find(|n| !self.index.contains_key(n.as_str())) {
                return Err(fail(format!(
                    "the index names tensor {missing:?}, which this shard does not hold"
                )));
            }
        }
        self.files.push(file);
        Ok(())
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn files(&self) -> &[Arc<ShardFile>] {
        &self.files
    }

    pub fn total_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.nbytes).sum()
    }
}
