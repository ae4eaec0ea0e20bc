//! Runs the Python examples (standard library only) against the built shared library.

use std::path::PathBuf;
use std::process::Command;

fn shared_library() -> PathBuf {
    // The test binary is target/<profile>/deps/<name>-<hash>; the library is target/<profile>/.
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let lib = dir.join("libstrata.so");
    assert!(
        lib.exists(),
        "{} is missing: build with cargo test --release",
        lib.display()
    );
    lib
}

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
        .arg(shared_library())
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
