//! The committed header is exactly what cbindgen generates from the code, and its version macros
//! agree with Cargo.toml and with strata_version().

use std::path::Path;

fn generated_header() -> Vec<u8> {
    let crate_dir = env!("CARGO_MANIFEST_DIR");
    let config = cbindgen::Config::from_file(Path::new(crate_dir).join("cbindgen.toml"))
        .expect("cbindgen.toml");
    let bindings = cbindgen::Builder::new()
        .with_crate(crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen generates the header");
    let mut out = Vec::new();
    bindings.write(&mut out);
    out
}

#[test]
fn committed_header_is_fresh() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("include/strata.h");
    let generated = generated_header();
    if std::env::var_os("STRATA_BLESS").is_some() {
        std::fs::write(&path, &generated).expect("write include/strata.h");
        return;
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "include/strata.h is stale: regenerate it with STRATA_BLESS=1 cargo test --release --test header"
    );
}

fn header_define(header: &str, name: &str) -> u32 {
    let prefix = format!("#define {name} ");
    header
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("{name} missing from the header"))
        .trim()
        .parse()
        .expect("a number")
}

#[test]
fn version_agrees_everywhere() {
    let header =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("include/strata.h"))
            .unwrap();
    let major = header_define(&header, "STRATA_VERSION_MAJOR");
    let minor = header_define(&header, "STRATA_VERSION_MINOR");
    let patch = header_define(&header, "STRATA_VERSION_PATCH");
    assert_eq!(
        format!("{major}.{minor}.{patch}"),
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(
        strata::ffi::error::strata_version(),
        (major << 16) | (minor << 8) | patch
    );
}

#[test]
fn status_numbers_are_fixed() {
    let header =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("include/strata.h"))
            .unwrap();
    let expected = [
        "STRATA_OK",
        "STRATA_ERR_NULL_ARGUMENT",
        "STRATA_ERR_INVALID_ARGUMENT",
        "STRATA_ERR_INVALID_HANDLE",
        "STRATA_ERR_NOT_FOUND",
        "STRATA_ERR_IO",
        "STRATA_ERR_FORMAT",
        "STRATA_ERR_UNSUPPORTED",
        "STRATA_ERR_OUT_OF_MEMORY",
        "STRATA_ERR_BUDGET",
        "STRATA_ERR_STATE",
        "STRATA_ERR_NO_DEVICE",
        "STRATA_ERR_DEVICE",
        "STRATA_ERR_BUFFER_TOO_SMALL",
        "STRATA_ERR_PANIC",
    ];
    for (number, name) in expected.iter().enumerate() {
        assert_eq!(header_define(&header, name), number as u32, "{name}");
        // SAFETY: strata_status_name returns a static NUL-terminated string for every status.
        let from_library = unsafe {
            std::ffi::CStr::from_ptr(strata::ffi::error::strata_status_name(number as u32))
        };
        assert_eq!(from_library.to_str().unwrap(), *name);
    }
}
