//! Runs the Python examples (standard library only) against the built shared library.

mod common;
use std::path::PathBuf;
use std::process::Command;

#[test]
fn ctypes_minimal_runs() {
    let Ok(python) = which_python() else {
        eprintln!("ctypes_minimal_runs: SKIPPED, no python3 on this machine");
        return;
    };
    let script =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/examples/ctypes_minimal.py");
    let output = Command::new(python)
        .arg(&script)
        .arg(common::library_dir().join("libstrata.so"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("ctypes_minimal: OK"), "{stdout}");
}

fn which_python() -> Result<&'static str, ()> {
    Command::new("python3")
        .arg("--version")
        .output()
        .map(|_| "python3")
        .map_err(|_| ())
}
