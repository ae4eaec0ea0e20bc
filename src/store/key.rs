//! What names a layer's bytes in a store: where each tensor comes from (the file's identity, the
//! offset and length in it, the stored dtype) and the form it takes in the tier (the layout's
//! slots). Two contexts that register the same tensors with the same tier form share one copy;
//! any difference, a rewritten file included, names other bytes.

use crate::checkpoint::TensorInfo;
use crate::registry::TensorMeta;
use crate::slot::TensorSlot;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LayerKey {
    /// The whole description, compared byte for byte: a hash alone could name two layers alike.
    bytes: Vec<u8>,
    /// The identity of each file the tensors come from (see `ShardFile::identity_words`).
    files: Vec<[u64; 5]>,
}

impl LayerKey {
    /// The key of a layer read from `infos` (one per tensor), held as `slots` describe in a
    /// buffer of `size` bytes.
    pub fn new(
        infos: &[TensorInfo],
        tensors: &[TensorMeta],
        slots: &[TensorSlot],
        size: usize,
    ) -> LayerKey {
        let mut words: Vec<u64> = vec![size as u64, infos.len() as u64];
        let mut files: Vec<[u64; 5]> = Vec::new();
        for ((info, meta), slot) in infos.iter().zip(tensors).zip(slots) {
            let identity = info.file.identity_words();
            if !files.contains(&identity) {
                files.push(identity);
            }
            words.extend_from_slice(&identity);
            words.extend_from_slice(&[
                info.offset,
                info.nbytes,
                u64::from(meta.dtype.to_abi()),
                slot.offset as u64,
                u64::from(slot.repr.dtype.to_abi()),
                slot.repr.quant as u64,
                slot.numel as u64,
                slot.rows as u64,
                slot.scales_offset as u64,
            ]);
        }
        LayerKey {
            bytes: words.iter().flat_map(|w| w.to_le_bytes()).collect(),
            files,
        }
    }

    /// A key of the given description, for tests of the store alone.
    #[cfg(test)]
    pub(super) fn from_parts(bytes: Vec<u8>, files: Vec<[u64; 5]>) -> LayerKey {
        LayerKey { bytes, files }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn files(&self) -> &[[u64; 5]] {
        &self.files
    }

    /// FNV-1a of the key: where a named store's table starts looking for it.
    pub fn hash(&self) -> u64 {
        self.bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
    }
}
