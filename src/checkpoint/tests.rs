use super::*;
use crate::error::ErrorKind;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// A fresh directory under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(label: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "strata-checkpoint-{label}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes a safetensors file whose tensors hold distinct byte patterns; returns name -> bytes.
fn write_safetensors(path: &Path, tensors: &[(&str, Dtype, &[usize])]) -> HashMap<String, Vec<u8>> {
    let contents: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|&(name, dtype, shape)| {
            let bits: usize = shape.iter().product::<usize>() * dtype.bitsize();
            let seed = name.bytes().fold(7u8, |acc, b| acc.wrapping_mul(31) ^ b);
            let bytes = (0..bits / 8)
                .map(|i| seed.wrapping_add((i * 13) as u8))
                .collect();
            (name.to_string(), dtype, shape.to_vec(), bytes)
        })
        .collect();
    let views = contents.iter().map(|(name, dtype, shape, bytes)| {
        (
            name.as_str(),
            TensorView::new(*dtype, shape.clone(), bytes).unwrap(),
        )
    });
    safetensors::serialize_to_file(views, None, path).unwrap();
    contents
        .into_iter()
        .map(|(name, _, _, bytes)| (name, bytes))
        .collect()
}

/// A hand-made file: the header's length, the header, then `data_len` zero bytes.
fn write_raw(path: &Path, header: &[u8], data_len: usize) {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header);
    bytes.resize(bytes.len() + data_len, 0);
    std::fs::write(path, bytes).unwrap();
}

fn read_tensor(info: &TensorInfo) -> Result<Vec<u8>> {
    let mut bytes = vec![0u8; info.nbytes as usize];
    info.file.read_at(info.offset, &mut bytes)?;
    Ok(bytes)
}

fn open_error(path: &Path) -> Error {
    match Checkpoint::open(path) {
        Ok(_) => panic!("{} opened", path.display()),
        Err(e) => e,
    }
}

fn assert_error(error: &Error, kind: ErrorKind, needles: &[&str]) {
    assert_eq!(error.kind, kind, "{error}");
    for needle in needles {
        assert!(error.message.contains(needle), "{needle:?} not in {error}");
    }
}

fn names(checkpoint: &Checkpoint) -> Vec<&str> {
    checkpoint
        .tensors()
        .iter()
        .map(|t| t.name.as_str())
        .collect()
}

fn assert_reads_back(checkpoint: &Checkpoint, expected: &HashMap<String, Vec<u8>>) {
    for info in checkpoint.tensors() {
        assert_eq!(
            &read_tensor(info).unwrap(),
            &expected[&info.name],
            "{}",
            info.name
        );
    }
}

#[test]
fn a_single_file_lists_every_tensor_and_reads_its_bytes() {
    let dir = TempDir::new("single");
    let path = dir.path("model.safetensors");
    let specs: [(&str, Dtype, &[usize], Option<DType>); 7] = [
        ("embed.weight", Dtype::F32, &[3, 4], Some(DType::F32)),
        ("norm.weight", Dtype::BF16, &[4], Some(DType::BF16)),
        ("proj.weight", Dtype::F8_E4M3, &[2, 8], Some(DType::F8E4M3)),
        ("positions", Dtype::I64, &[5], Some(DType::I64)),
        ("mask", Dtype::BOOL, &[7], Some(DType::Bool)),
        ("scale", Dtype::F64, &[], Some(DType::F64)),
        ("nothing", Dtype::F16, &[0, 3], Some(DType::F16)),
    ];
    let layout: Vec<_> = specs.iter().map(|&(n, d, s, _)| (n, d, s)).collect();
    let expected = write_safetensors(&path, &layout);
    let checkpoint = Checkpoint::open(&path).unwrap();
    let file_bytes = std::fs::read(&path).unwrap();

    assert_eq!(checkpoint.tensors().len(), specs.len());
    assert_eq!(checkpoint.files().len(), 1);
    assert_eq!(checkpoint.files()[0].path(), path);
    for (name, dtype, shape, strata_dtype) in specs {
        let info = checkpoint.tensor(name).unwrap();
        assert_eq!(info.name, name);
        assert_eq!(info.dtype, strata_dtype);
        assert_eq!(info.dtype_name, dtype.to_string());
        assert_eq!(
            info.shape,
            shape.iter().map(|&d| d as u64).collect::<Vec<_>>()
        );
        assert_eq!(info.nbytes, expected[name].len() as u64);
        assert!(Arc::ptr_eq(&info.file, &checkpoint.files()[0]));
        // The offset is absolute: the file's own bytes at it are the tensor's.
        let start = info.offset as usize;
        assert_eq!(
            &file_bytes[start..start + expected[name].len()],
            expected[name]
        );
    }
    assert_reads_back(&checkpoint, &expected);
    let total: usize = expected.values().map(Vec::len).sum();
    assert_eq!(checkpoint.total_bytes(), total as u64);
    assert!(checkpoint.tensor("missing").is_none());
}

#[test]
fn tensors_come_by_offset_and_empty_ones_by_name() {
    let dir = TempDir::new("order");
    let path = dir.path("order.safetensors");
    // JSON order differs from offset order; "z" and "a" are empty and share offset 0.
    write_raw(
        &path,
        br#"{"late":{"dtype":"U8","shape":[2],"data_offsets":[4,6]},
             "z":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},
             "early":{"dtype":"F16","shape":[2],"data_offsets":[0,4]},
             "a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},
             "__metadata__":{"format":"pt"}}"#,
        6,
    );
    for _ in 0..3 {
        let checkpoint = Checkpoint::open(&path).unwrap();
        assert_eq!(names(&checkpoint), ["a", "z", "early", "late"]);
        let offsets: Vec<u64> = checkpoint.tensors().iter().map(|t| t.offset).collect();
        let data_start = checkpoint.tensor("a").unwrap().offset;
        assert_eq!(
            offsets,
            [data_start, data_start, data_start, data_start + 4]
        );
    }
}

#[test]
fn an_index_splits_a_layer_over_two_shards() {
    let dir = TempDir::new("index");
    let first = "model-00001-of-00002.safetensors";
    let second = "model-00002-of-00002.safetensors";
    let mut expected = write_safetensors(
        &dir.path(first),
        &[
            ("embed", Dtype::F32, &[4, 2]),
            ("layers.0.attn.q", Dtype::BF16, &[2, 2]),
            ("layers.0.attn.k", Dtype::BF16, &[2, 2]),
            ("unlisted", Dtype::F32, &[3]),
        ],
    );
    expected.extend(write_safetensors(
        &dir.path(second),
        &[
            ("layers.0.mlp.up", Dtype::F16, &[2, 4]),
            ("layers.1.attn.q", Dtype::BF16, &[2, 2]),
        ],
    ));
    // The second shard comes first in the map, and one entry names the first shard as "./…".
    let index = dir.path("model.safetensors.index.json");
    std::fs::write(
        &index,
        format!(
            r#"{{"metadata": {{"total_size": 72}}, "weight_map": {{
                "layers.1.attn.q": "{second}", "layers.0.mlp.up": "{second}",
                "layers.0.attn.q": "{first}", "layers.0.attn.k": "./{first}",
                "embed": "{first}"}}}}"#
        ),
    )
    .unwrap();

    for path in [&index, &dir.0] {
        let checkpoint = Checkpoint::open(path).unwrap();
        // By offset within each shard: the writer puts F32 before BF16 before F16, then by name.
        assert_eq!(
            names(&checkpoint),
            [
                "embed",
                "layers.0.attn.k",
                "layers.0.attn.q",
                "layers.1.attn.q",
                "layers.0.mlp.up"
            ]
        );
        assert!(checkpoint.tensor("unlisted").is_none());
        let files = checkpoint.files();
        assert_eq!(files.len(), 2);
        assert!(files[0].path().ends_with(first));
        assert!(files[1].path().ends_with(second));
        for info in checkpoint.tensors() {
            let shard = if info.name.starts_with("layers.0.attn") || info.name == "embed" {
                &files[0]
            } else {
                &files[1]
            };
            assert!(Arc::ptr_eq(&info.file, shard), "{}", info.name);
        }
        assert_reads_back(&checkpoint, &expected);
        assert_eq!(checkpoint.total_bytes(), 72);
    }
}

#[test]
fn a_directory_without_one_index_takes_every_shard_in_name_order() {
    let dir = TempDir::new("directory");
    let mut expected = write_safetensors(&dir.path("b.safetensors"), &[("b1", Dtype::F32, &[2])]);
    expected.extend(write_safetensors(
        &dir.path("a.safetensors"),
        &[("a2", Dtype::I8, &[3]), ("a1", Dtype::F32, &[1])],
    ));
    // None of these is read: not shards, hidden, or two indexes where one is required.
    std::fs::write(dir.path("config.json"), "{}").unwrap();
    std::fs::write(dir.path(".partial.safetensors"), "garbage").unwrap();
    std::fs::write(dir.path("x.safetensors.index.json"), "garbage").unwrap();
    std::fs::write(dir.path("y.safetensors.index.json"), "garbage").unwrap();

    let checkpoint = Checkpoint::open(&dir.0).unwrap();
    assert_eq!(names(&checkpoint), ["a1", "a2", "b1"]);
    assert_eq!(checkpoint.files().len(), 2);
    assert!(checkpoint.files()[0].path().ends_with("a.safetensors"));
    assert_reads_back(&checkpoint, &expected);

    // A symlink to a shard is the same file: one shard, not a duplicate.
    std::os::unix::fs::symlink(dir.path("a.safetensors"), dir.path("c.safetensors")).unwrap();
    let checkpoint = Checkpoint::open(&dir.0).unwrap();
    assert_eq!(names(&checkpoint), ["a1", "a2", "b1"]);
}

#[test]
fn paths_and_names_with_spaces_and_non_ascii_work() {
    let dir = TempDir::new("unicode");
    let model = dir.path("modèle 1");
    std::fs::create_dir(&model).unwrap();
    let shard = model.join("shard été.safetensors");
    let expected = write_safetensors(
        &shard,
        &[("poids.é 1", Dtype::F32, &[2]), ("名前", Dtype::U8, &[3])],
    );
    let index = model.join("modèle.safetensors.index.json");
    std::fs::write(
        &index,
        r#"{"weight_map": {"poids.é 1": "shard été.safetensors", "名前": "shard été.safetensors"}}"#,
    )
    .unwrap();
    for path in [&shard, &index, &model] {
        let checkpoint = Checkpoint::open(path).unwrap();
        assert_eq!(checkpoint.files()[0].path(), shard);
        assert_eq!(names(&checkpoint).len(), 2);
        assert_reads_back(&checkpoint, &expected);
    }
    let error = open_error(&model.join("absent é.safetensors"));
    assert_error(
        &error,
        ErrorKind::NotFound,
        &["modèle 1/absent é.safetensors"],
    );
}

#[test]
fn broken_headers_are_format_errors_naming_the_file_and_the_fault() {
    let dir = TempDir::new("broken");
    let with_length = |length: u64, rest: &[u8]| {
        let mut bytes = length.to_le_bytes().to_vec();
        bytes.extend_from_slice(rest);
        bytes
    };
    let header = |json: &str, data_len: usize| {
        let mut bytes = with_length(json.len() as u64, json.as_bytes());
        bytes.resize(bytes.len() + data_len, 0);
        bytes
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "garbage",
            b"this is not a safetensors file at all".to_vec(),
            "limit",
        ),
        ("short", b"abc".to_vec(), "too short"),
        ("beyond", with_length(1000, b"{}"), "runs past the end"),
        ("over limit", with_length(200_000_000, b"{}"), "limit"),
        ("max length", with_length(u64::MAX, b""), "limit"),
        (
            "not utf8",
            with_length(4, &[0xff, 0xfe, 0x7b, 0x7d]),
            "not UTF-8",
        ),
        ("not json", header("hello, world", 0), "invalid header"),
        (
            "truncated json",
            header(r#"{"t":{"dtype":"F32""#, 0),
            "invalid header",
        ),
        (
            "past eof",
            header(
                r#"{"t":{"dtype":"F32","shape":[1000],"data_offsets":[0,4000]}}"#,
                16,
            ),
            "4000 bytes of data",
        ),
        (
            "lying shape",
            header(
                r#"{"t":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
                8,
            ),
            "invalid header",
        ),
        (
            "gap",
            header(
                r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},
                    "b":{"dtype":"U8","shape":[4],"data_offsets":[8,12]}}"#,
                12,
            ),
            "invalid offset",
        ),
        (
            "overlap",
            header(
                r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},
                    "b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#,
                6,
            ),
            "invalid offset",
        ),
        (
            "reversed offsets",
            header(
                r#"{"t":{"dtype":"U8","shape":[0],"data_offsets":[4,0]}}"#,
                4,
            ),
            "invalid offset",
        ),
        (
            "overflowing shape",
            header(
                r#"{"t":{"dtype":"F64","shape":[4294967296,4294967296,16],"data_offsets":[0,8]}}"#,
                8,
            ),
            "overflow",
        ),
        (
            "shape past u64",
            header(
                r#"{"t":{"dtype":"U8","shape":[18446744073709551616],"data_offsets":[0,1]}}"#,
                1,
            ),
            "invalid header",
        ),
        (
            "huge but consistent",
            header(
                r#"{"t":{"dtype":"U8","shape":[1099511627776],"data_offsets":[0,1099511627776]}}"#,
                1,
            ),
            "1099511627776 bytes of data",
        ),
        (
            "negative dim",
            header(
                r#"{"t":{"dtype":"U8","shape":[-1],"data_offsets":[0,1]}}"#,
                1,
            ),
            "invalid header",
        ),
        (
            "unknown dtype",
            header(
                r#"{"t":{"dtype":"F3","shape":[1],"data_offsets":[0,1]}}"#,
                1,
            ),
            "invalid header",
        ),
        (
            "odd nibbles",
            header(
                r#"{"t":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}"#,
                2,
            ),
            "invalid header",
        ),
        (
            "trailing bytes",
            header(
                r#"{"t":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}"#,
                5,
            ),
            "3 bytes follow",
        ),
    ];
    for (name, bytes, fault) in cases {
        let path = dir.path(&format!("{name}.safetensors"));
        std::fs::write(&path, bytes).unwrap();
        let error = open_error(&path);
        assert_error(
            &error,
            ErrorKind::Format,
            &[&format!("{name}.safetensors"), fault],
        );
    }

    // A directory with a ".safetensors" name is not a shard.
    let shards = TempDir::new("broken-dir");
    std::fs::create_dir(shards.path("sub.safetensors")).unwrap();
    let error = open_error(&shards.0);
    assert_error(
        &error,
        ErrorKind::Format,
        &["sub.safetensors", "not a regular file"],
    );
}

#[test]
fn unsupported_dtypes_are_listed_without_a_dtype() {
    let dir = TempDir::new("unsupported");
    let path = dir.path("odd.safetensors");
    let expected = write_safetensors(
        &path,
        &[
            ("packed", Dtype::F4, &[4]),
            ("counts", Dtype::U16, &[2]),
            ("plain", Dtype::F32, &[1]),
        ],
    );
    let checkpoint = Checkpoint::open(&path).unwrap();
    let packed = checkpoint.tensor("packed").unwrap();
    assert_eq!((packed.dtype, packed.dtype_name.as_str()), (None, "F4"));
    assert_eq!((packed.shape.as_slice(), packed.nbytes), (&[4][..], 2));
    let counts = checkpoint.tensor("counts").unwrap();
    assert_eq!((counts.dtype, counts.dtype_name.as_str()), (None, "U16"));
    assert_eq!(counts.nbytes, 4);
    assert_eq!(checkpoint.tensor("plain").unwrap().dtype, Some(DType::F32));
    assert_reads_back(&checkpoint, &expected);
}

#[test]
fn missing_things_are_not_found() {
    let dir = TempDir::new("missing");
    let error = open_error(&dir.path("missing.safetensors"));
    assert_error(&error, ErrorKind::NotFound, &["missing.safetensors"]);

    let error = open_error(&dir.0);
    assert_error(&error, ErrorKind::NotFound, &["no .safetensors file"]);
    std::fs::write(dir.path("config.json"), "{}").unwrap();
    assert_eq!(open_error(&dir.0).kind, ErrorKind::NotFound);

    let index = dir.path("a.safetensors.index.json");
    std::fs::write(&index, r#"{"weight_map": {"x": "gone.safetensors"}}"#).unwrap();
    let error = open_error(&index);
    assert_error(
        &error,
        ErrorKind::NotFound,
        &["gone.safetensors", "a.safetensors.index.json"],
    );
    std::fs::write(&index, r#"{"weight_map": {}}"#).unwrap();
    assert_eq!(open_error(&index).kind, ErrorKind::NotFound);
}

#[test]
fn lying_indexes_and_duplicate_tensors_are_format_errors() {
    let dir = TempDir::new("lying");
    write_safetensors(&dir.path("one.safetensors"), &[("y", Dtype::F32, &[2])]);
    let index = dir.path("a.safetensors.index.json");
    let cases = [
        ("weight_map = {}", "not valid JSON"),
        (r#"{"metadata": {}}"#, "\"weight_map\""),
        (r#"{"weight_map": ["y"]}"#, "\"weight_map\""),
        (r#"{"weight_map": {"y": 3}}"#, "not a string"),
        (
            r#"{"weight_map": {"y": "one.safetensors", "x": "one.safetensors"}}"#,
            "maps tensor \"x\"",
        ),
    ];
    for (json, fault) in cases {
        std::fs::write(&index, json).unwrap();
        let error = open_error(&index);
        assert_error(
            &error,
            ErrorKind::Format,
            &["a.safetensors.index.json", fault],
        );
    }
    std::fs::remove_file(&index).unwrap();

    write_safetensors(&dir.path("two.safetensors"), &[("y", Dtype::F32, &[2])]);
    let error = open_error(&dir.0);
    assert_error(
        &error,
        ErrorKind::Format,
        &[
            "\"y\"",
            "more than one shard",
            "one.safetensors",
            "two.safetensors",
        ],
    );
}

#[test]
fn an_unreadable_file_is_an_io_error() {
    let dir = TempDir::new("unreadable");
    let path = dir.path("locked.safetensors");
    write_safetensors(&path, &[("t", Dtype::F32, &[1])]);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o000)).unwrap();
    // Root reads whatever the mode says; there is nothing to test then.
    if std::fs::File::open(&path).is_err() {
        let error = open_error(&path);
        assert_error(&error, ErrorKind::Io, &["locked.safetensors"]);
    }
}

#[test]
fn reads_outside_the_file_are_errors() {
    let dir = TempDir::new("bounds");
    let path = dir.path("small.safetensors");
    write_safetensors(&path, &[("t", Dtype::F32, &[4])]);
    let checkpoint = Checkpoint::open(&path).unwrap();
    let file = &checkpoint.files()[0];
    let len = std::fs::metadata(&path).unwrap().len();
    let mut buffer = [0u8; 8];
    let error = file.read_at(len - 4, &mut buffer).unwrap_err();
    assert_error(
        &error,
        ErrorKind::Io,
        &["small.safetensors", "offset", "8 bytes"],
    );
    assert_eq!(
        file.read_at(u64::MAX, &mut buffer).unwrap_err().kind,
        ErrorKind::Io
    );
    file.read_at(len, &mut []).unwrap();
}

#[test]
fn a_file_truncated_after_open_fails_its_reads_without_crashing() {
    let dir = TempDir::new("truncated");
    let path = dir.path("doomed.safetensors");
    write_safetensors(
        &path,
        &[
            ("first", Dtype::F32, &[256]),
            ("second", Dtype::F32, &[256]),
        ],
    );
    let checkpoint = Checkpoint::open(&path).unwrap();
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    // Even the tensor that still lies within the file is refused: the file is not the one opened.
    for info in checkpoint.tensors() {
        let error = read_tensor(info).unwrap_err();
        assert_error(&error, ErrorKind::Io, &["doomed.safetensors", "truncated"]);
    }
}

#[test]
fn a_file_rewritten_in_place_is_refused() {
    let dir = TempDir::new("rewritten");
    let path = dir.path("rewritten.safetensors");
    write_safetensors(&path, &[("w", Dtype::F32, &[4])]);
    let checkpoint = Checkpoint::open(&path).unwrap();
    let info = checkpoint.tensor("w").unwrap();

    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let opened_mtime = file.metadata().unwrap().modified().unwrap();
    file.write_all_at(&[9u8; 16], info.offset).unwrap();
    // Set explicitly: the write alone may land in the same timestamp tick as the open.
    file.set_modified(opened_mtime + Duration::from_secs(2))
        .unwrap();

    let error = read_tensor(info).unwrap_err();
    assert_error(
        &error,
        ErrorKind::Format,
        &["rewritten.safetensors", "changed since it was opened"],
    );
}

#[test]
fn every_field_fstat_gives_that_a_change_moves_is_compared() {
    use super::shard::Identity;
    let path = Path::new("model.safetensors");
    let opened = Identity {
        device: 1,
        inode: 2,
        len: 100,
        modified: (1_700_000_000, 5),
        changed: (1_700_000_000, 5),
        links: 1,
    };
    assert!(opened.check(&opened, path).is_ok());
    // Each field changed alone, as a rewrite would change it, and what the message must name.
    type Change = fn(&mut Identity);
    let cases: [(Change, ErrorKind, &str); 8] = [
        (|now| now.device = 9, ErrorKind::Format, "device"),
        (|now| now.inode = 9, ErrorKind::Format, "inode"),
        (|now| now.len = 101, ErrorKind::Format, "size"),
        (|now| now.len = 99, ErrorKind::Io, "truncated"),
        (
            |now| now.modified.0 += 1,
            ErrorKind::Format,
            "modification time",
        ),
        // Nanoseconds alone: a rewrite within the same second.
        (
            |now| now.modified.1 += 1,
            ErrorKind::Format,
            "modification time",
        ),
        (|now| now.changed.0 += 1, ErrorKind::Format, "change time"),
        (|now| now.changed.1 += 1, ErrorKind::Format, "change time"),
    ];
    for (change, status, named) in cases {
        let mut now = opened;
        change(&mut now);
        let error = opened.check(&now, path).unwrap_err();
        assert_error(&error, status, &["model.safetensors", named]);
    }
    // Deleted, renamed over or linked: the ctime moves with the link count, the bytes stay.
    let unlinked = Identity {
        changed: (1_700_000_100, 0),
        links: 0,
        ..opened
    };
    assert!(opened.check(&unlinked, path).is_ok());
}

#[test]
fn a_file_replaced_by_rename_or_deleted_keeps_its_original_bytes() {
    let dir = TempDir::new("replaced");
    let path = dir.path("replaced.safetensors");
    let original = write_safetensors(&path, &[("w", Dtype::F32, &[4])]);
    let checkpoint = Checkpoint::open(&path).unwrap();

    let fresh = dir.path("fresh.safetensors");
    let replacement =
        write_safetensors(&fresh, &[("v", Dtype::F32, &[4]), ("w", Dtype::F32, &[4])]);
    assert_ne!(replacement["v"], original["w"]);
    std::fs::rename(&fresh, &path).unwrap();
    assert_reads_back(&checkpoint, &original);
    std::fs::remove_file(&path).unwrap();
    assert_reads_back(&checkpoint, &original);
}

#[test]
fn checkpoints_and_shard_files_can_be_shared_across_threads() {
    fn shareable<T: Send + Sync>() {}
    shareable::<Checkpoint>();
    shareable::<ShardFile>();
    shareable::<TensorInfo>();
}

/// A file holding one U8 tensor "t" of `len` bytes, all distinct from their neighbours.
fn write_u8_tensor(path: &Path, len: usize) -> Vec<u8> {
    write_safetensors(path, &[("t", Dtype::U8, &[len])])
        .remove("t")
        .unwrap()
}

#[test]
fn reads_split_into_chunks_in_flight_at_once_return_every_byte() {
    let dir = TempDir::new("chunks");
    let path = dir.path("chunks.safetensors");
    let expected = write_u8_tensor(&path, 100_003);
    let file_bytes = std::fs::read(&path).unwrap();
    let checkpoint = Checkpoint::open(&path).unwrap();
    let file = &checkpoint.files()[0];
    // Chunk sizes that divide the read, that leave a short last chunk, and that give one chunk;
    // reads that start at odd offsets and end at the file's end.
    for chunk in [4096, 4099, 999, 100_003, 1 << 20] {
        for (offset, len) in [
            (0, file_bytes.len()),
            (13, 77_777),
            (file_bytes.len() - 5000, 5000),
        ] {
            let mut buffer = vec![0u8; len];
            file.read_at_in_chunks(offset as u64, &mut buffer, chunk)
                .unwrap();
            assert!(
                buffer == file_bytes[offset..offset + len],
                "chunk {chunk} offset {offset}"
            );
        }
    }
    let info = checkpoint.tensor("t").unwrap();
    let mut buffer = vec![0u8; expected.len()];
    info.read_into(&mut buffer).unwrap();
    assert_eq!(buffer, expected);
    let error = info.read_into(&mut buffer[1..]).unwrap_err();
    assert_error(
        &error,
        crate::error::ErrorKind::InvalidArgument,
        &["tensor t", "100003"],
    );
}

#[test]
fn read_chunks_streams_a_tensor_through_a_smaller_staging_area() {
    let dir = TempDir::new("stream");
    let path = dir.path("stream.safetensors");
    let mut expected = write_safetensors(
        &path,
        &[("big", Dtype::F32, &[2500]), ("empty", Dtype::F32, &[0])],
    );
    let checkpoint = Checkpoint::open(&path).unwrap();
    let big = checkpoint.tensor("big").unwrap();
    let expected_big = expected.remove("big").unwrap();
    // One area read and consumed in turn, and two to four (the next pieces read, by as many
    // threads at once, while one is consumed).
    for (piece_len, areas) in [1000, 3333, 10_000, 20_000]
        .into_iter()
        .flat_map(|len| [(len, 1), (len, 2), (len, 3), (len, 4)])
    {
        let mut staging = vec![0u8; piece_len * areas];
        let mut streamed = Vec::new();
        let mut pieces = Vec::new();
        big.read_chunks(
            &mut staging,
            piece_len,
            ReadMode::Buffered,
            |offset, piece| {
                assert_eq!(offset, streamed.len() as u64);
                pieces.push(piece.len());
                streamed.extend_from_slice(piece);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(streamed, expected_big, "piece {piece_len}, {areas} areas");
        let full = 10_000 / piece_len;
        assert!(pieces[..full.min(pieces.len())]
            .iter()
            .all(|&len| len == piece_len.min(10_000)));
        assert_eq!(pieces.len(), 10_000usize.div_ceil(piece_len));
    }

    let empty = checkpoint.tensor("empty").unwrap();
    empty
        .read_chunks(&mut [], 0, ReadMode::Buffered, |_, _| {
            panic!("an empty tensor has no pieces")
        })
        .unwrap();
    let error = big
        .read_chunks(&mut [], 0, ReadMode::Buffered, |_, _| Ok(()))
        .unwrap_err();
    assert_error(
        &error,
        crate::error::ErrorKind::InvalidArgument,
        &["big", "empty staging"],
    );
    // The consumer's error stops the stream and comes back as it was, with one area or more.
    for areas in [1, 2, 4] {
        let mut calls = 0;
        let error = big
            .read_chunks(
                &mut vec![0u8; 4000 * areas],
                4000,
                ReadMode::Buffered,
                |_, _| {
                    calls += 1;
                    Err(Error::budget("full"))
                },
            )
            .unwrap_err();
        assert_eq!((calls, error), (1, Error::budget("full")));
    }
}

#[test]
fn a_file_changed_while_streaming_fails_the_next_piece() {
    // With k areas the k - 1 pieces after the change may have been read, whole, before it: the
    // one after those fails.
    for (areas, most_pieces) in [(1, 1), (2, 2), (4, 4)] {
        let dir = TempDir::new("stream-change");
        let path = dir.path("moving.safetensors");
        write_u8_tensor(&path, 8192);
        let checkpoint = Checkpoint::open(&path).unwrap();
        let writer = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let opened_mtime = writer.metadata().unwrap().modified().unwrap();
        let mut pieces = 0;
        let error = checkpoint
            .tensor("t")
            .unwrap()
            .read_chunks(
                &mut vec![0u8; 1024 * areas],
                1024,
                ReadMode::Buffered,
                |_, _| {
                    pieces += 1;
                    writer
                        .set_modified(opened_mtime + Duration::from_secs(2))
                        .unwrap();
                    Ok(())
                },
            )
            .unwrap_err();
        assert!(
            (1..=most_pieces).contains(&pieces),
            "{areas} areas: {pieces} pieces"
        );
        assert_error(
            &error,
            ErrorKind::Format,
            &[
                "tensor t",
                "moving.safetensors",
                "changed since it was opened",
            ],
        );
    }
}

#[test]
fn a_read_fault_is_retried_once_and_a_second_is_an_io_error_naming_file_and_offset() {
    let dir = TempDir::new("faults");
    let path = dir.path("flaky.safetensors");
    let expected = write_u8_tensor(&path, 5000);
    let checkpoint = Checkpoint::open(&path).unwrap();
    let info = checkpoint.tensor("t").unwrap();
    let unique = dir.0.file_name().unwrap().to_str().unwrap();
    let mut buffer = vec![0u8; 5000];

    inject_read_faults(unique, 1);
    info.read_into(&mut buffer).unwrap();
    assert_eq!(buffer, expected);

    inject_read_faults(unique, 2);
    let error = info.read_into(&mut buffer).unwrap_err();
    assert_error(
        &error,
        ErrorKind::Io,
        &[
            "tensor t",
            "flaky.safetensors",
            &format!("at offset {}", info.offset),
            "also failed when retried",
            "os error 5",
        ],
    );
    // Both faults were used up: the next read works.
    info.read_into(&mut buffer).unwrap();

    // A read in many chunks whose every chunk fails reports one of them and leaves no thread
    // behind; disarming restores reads.
    inject_read_faults(unique, u32::MAX);
    let mut whole = vec![0u8; std::fs::metadata(&path).unwrap().len() as usize];
    let error = checkpoint.files()[0]
        .read_at_in_chunks(0, &mut whole, 512)
        .unwrap_err();
    assert_error(&error, ErrorKind::Io, &["flaky.safetensors", "at offset"]);
    inject_read_faults(unique, 0);
    checkpoint.files()[0]
        .read_at_in_chunks(0, &mut whole, 512)
        .unwrap();

    // Streamed through two areas or four, a read that fails on the first piece ends the stream
    // with its error, consuming nothing, and leaves no thread behind.
    inject_read_faults(unique, u32::MAX);
    for areas in [2, 4] {
        let error = info
            .read_chunks(
                &mut vec![0u8; 1000 * areas],
                1000,
                ReadMode::Buffered,
                |_, _| panic!("nothing was read"),
            )
            .unwrap_err();
        assert_error(&error, ErrorKind::Io, &["tensor t", "flaky.safetensors"]);
    }
    inject_read_faults(unique, 0);
}

#[test]
fn fault_specs_name_a_substring_and_a_count() {
    assert_eq!(
        shard::parse_fault_spec("shard:3"),
        Some(("shard".to_owned(), 3))
    );
    assert_eq!(
        shard::parse_fault_spec("C:/a b:1"),
        Some(("C:/a b".to_owned(), 1))
    );
    assert_eq!(shard::parse_fault_spec("shard"), None);
    assert_eq!(shard::parse_fault_spec("shard:x"), None);
}

#[test]
fn a_reader_that_panics_ends_the_stream_with_its_panic_not_a_hang() {
    let dir = TempDir::new("reader-panic");
    let path = dir.path("t.safetensors");
    write_u8_tensor(&path, 8000);
    let checkpoint = Checkpoint::open(&path).unwrap();
    let info = checkpoint.tensor("t").unwrap().clone();
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut staging = vec![0u8; 4000];
        let areas: Vec<&mut [u8]> = staging.chunks_exact_mut(1000).collect();
        // The piece at 1000 panics while the others are read: the consumer waits for it.
        let read_piece = |offset: u64, area: &mut [u8]| -> Result<usize> {
            assert!(offset != 1000, "injected reader panic");
            area.fill(1);
            Ok(1000)
        };
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            info.read_overlapped(areas, &read_piece, &mut |_, _| Ok(()))
        }));
        let _ = done.send(outcome.is_err());
    });
    let panicked = finished
        .recv_timeout(Duration::from_secs(20))
        .expect("the stream hung after a reader panicked");
    assert!(panicked, "the reader's panic was not passed on");
}
