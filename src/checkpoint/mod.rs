// TEMPORARY STUB (replaced by the checkpoint helper's module)
use crate::dtype::DType;
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;
pub struct Checkpoint {
    tensors: Vec<TensorInfo>,
    files: Vec<Arc<ShardFile>>,
}
pub struct ShardFile {
    path: PathBuf,
}
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: Option<DType>,
    pub dtype_name: String,
    pub shape: Vec<u64>,
    pub file: Arc<ShardFile>,
    pub offset: u64,
    pub nbytes: u64,
}
impl std::fmt::Debug for ShardFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.path)
    }
}
impl Checkpoint {
    pub fn open(_path: &Path) -> Result<Checkpoint> {
        Err(Error::unsupported("stub"))
    }
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }
    pub fn files(&self) -> &[Arc<ShardFile>] {
        &self.files
    }
    pub fn total_bytes(&self) -> u64 {
        0
    }
}
impl ShardFile {
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn read_at(&self, _offset: u64, _dst: &mut [u8]) -> Result<()> {
        Err(Error::unsupported("stub"))
    }
}
