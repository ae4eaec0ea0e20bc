//! Opens arbitrary bytes as a checkpoint, in each of the three layouts strata accepts, and reads
//! every tensor of what opens. Bad input must give an error, never a panic or an abort; and what
//! opened must read back, whole and streamed alike, since nothing changes the files meanwhile.
//!
//! The first byte picks the layout; the rest is cut into files by little-endian u16 lengths:
//!   0: [file]                          one `model.safetensors`
//!   1: [len][index][len][a][b]         `model.safetensors.index.json` beside `a.safetensors`
//!                                      and `b.safetensors`, opened as the index and as the folder
//!   2: [len][a][b]                     a folder of `a.safetensors` and `b.safetensors`
//! Run it with scripts/fuzz.sh; the seeds (fuzz/seeds/checkpoint_open) come from seeds.py.

#![no_main]

use libfuzzer_sys::fuzz_target;
use once_cell::sync::Lazy;
use std::path::{Path, PathBuf};
use strata::checkpoint::{Checkpoint, ReadMode};

/// One folder per process under the temp dir (scripts/fuzz.sh points TMPDIR at memory and removes
/// it after): the files are rewritten on every run.
static DIR: Lazy<PathBuf> = Lazy::new(|| {
    let dir = std::env::temp_dir().join(format!("strata-fuzz-{}", std::process::id()));
    for layout in ["single", "index", "shards"] {
        std::fs::create_dir_all(dir.join(layout)).unwrap();
    }
    dir
});

/// The next `[u16 length][bytes]` piece of `data`, cut short where `data` ends.
fn take<'a>(data: &mut &'a [u8]) -> &'a [u8] {
    let len = match data {
        [low, high, ..] => u16::from_le_bytes([*low, *high]) as usize,
        _ => 0,
    };
    let rest = data.get(2..).unwrap_or(&[]);
    let (piece, rest) = rest.split_at(len.min(rest.len()));
    *data = rest;
    piece
}

fn write(path: &Path, bytes: &[u8]) -> PathBuf {
    std::fs::write(path, bytes).unwrap();
    path.to_path_buf()
}

fn open_and_read_all(path: &Path) {
    let Ok(checkpoint) = Checkpoint::open(path) else {
        return;
    };
    let mut total = 0u64;
    for tensor in checkpoint.tensors() {
        // Validation put every tensor inside a file no larger than the input.
        let mut whole = vec![0u8; tensor.nbytes as usize];
        tensor
            .read_into(&mut whole)
            .expect("an opened tensor reads");
        // Streamed in small pieces with O_DIRECT (buffered where refused), two areas in turn:
        // every unaligned offset and length reads the bytes the buffered read did.
        let mut streamed = Vec::with_capacity(whole.len());
        tensor
            .read_chunks(&mut [0u8; 122], 61, ReadMode::Direct, |offset, piece| {
                assert_eq!(offset, streamed.len() as u64);
                streamed.extend_from_slice(piece);
                Ok(())
            })
            .expect("an opened tensor streams");
        assert!(streamed == whole, "{}: streamed bytes differ", tensor.name);
        total += tensor.nbytes;
    }
    assert_eq!(total, checkpoint.total_bytes());
}

fuzz_target!(|data: &[u8]| {
    let Some((&layout, mut rest)) = data.split_first() else {
        return;
    };
    match layout % 3 {
        0 => open_and_read_all(&write(&DIR.join("single/model.safetensors"), rest)),
        1 => {
            let dir = DIR.join("index");
            let index = write(&dir.join("model.safetensors.index.json"), take(&mut rest));
            write(&dir.join("a.safetensors"), take(&mut rest));
            write(&dir.join("b.safetensors"), rest);
            open_and_read_all(&index);
            open_and_read_all(&dir);
        }
        _ => {
            let dir = DIR.join("shards");
            write(&dir.join("a.safetensors"), take(&mut rest));
            write(&dir.join("b.safetensors"), rest);
            open_and_read_all(&dir);
        }
    }
});
