//! Runs the Python package's unit tests (python/tests, plain unittest) and its examples against
//! the library this build made. Tests that need numpy or torch skip where those are missing and
//! say so with a "SKIPPED:" line, which is copied to the real stderr so that `cargo test` shows it.

mod common;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs python3 with the package importable and STRATA_LIBRARY set; None without python3.
fn python(args: &[&str], dir: &Path) -> Option<Output> {
    python_with(args, dir, &[])
}

/// `python`, with more environment variables.
fn python_with(args: &[&str], dir: &Path, env: &[(&str, &Path)]) -> Option<Output> {
    let files = common::programs::BuildDir::new("python-output");
    let output = common::programs::output_within(
        Command::new("python3")
            .args(args)
            .current_dir(dir)
            .env("PYTHONPATH", repo().join("python"))
            .env("STRATA_LIBRARY", common::library_dir().join("libstrata.so"))
            .envs(env.iter().copied()),
        files.path(),
        common::programs::SUITE_TIMEOUT,
    );
    match output {
        Ok(output) => Some(output),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            show("SKIPPED: no python3 on this machine");
            None
        }
        Err(e) => panic!("running python3: {e}"),
    }
}

/// Writes past the test harness's capture, so that skips show in a passing run.
fn show(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn check(name: &str, output: Output, expect: &str) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let mut skipped = false;
    for line in stdout.lines().chain(stderr.lines()) {
        // unittest -v writes a test's name and its result on one line, around what it printed.
        if let Some(at) = line.find("SKIPPED:") {
            show(&format!(
                "{name}: {}",
                line[at..].trim_end_matches(" ... ok")
            ));
            skipped = true;
        }
    }
    assert!(
        output.status.success(),
        "{name} failed:\n{stdout}\n{stderr}"
    );
    assert!(
        skipped || stdout.contains(expect) || stderr.contains(expect),
        "{name}: no {expect:?} in\n{stdout}\n{stderr}"
    );
}

#[test]
fn python_unittests() {
    let dir = repo().join("python/tests");
    if let Some(output) = python(&["-m", "unittest", "discover", "-v"], &dir) {
        check("python unittests", output, "\nOK");
    }
}

/// The binding's CUDA tests (python/tests/test_cuda.py), which only skip where there is no GPU,
/// against the emulated driver of tests/gpu/emulated_driver.cpp (see tests/cuda.rs).
#[test]
fn python_cuda_tests_on_the_emulated_driver() {
    let driver = common::programs::BuildDir::new("python-emulated-cuda");
    if !common::programs::build_emulated_driver(driver.path()) {
        show("SKIPPED: the binding's CUDA tests on the emulated driver: no C++ compiler");
        return;
    }
    let dir = repo().join("python/tests");
    let env = [("LD_LIBRARY_PATH", driver.path())];
    let Some(output) = python_with(&["-m", "unittest", "-v", "test_cuda"], &dir, &env) else {
        return;
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stderr.contains("\nOK") && !stderr.contains("SKIPPED"),
        "the binding's CUDA tests on the emulated driver:\n{stdout}\n{stderr}"
    );
}

#[test]
fn python_example_binding_minimal() {
    if let Some(output) = python(&["examples/binding_minimal.py"], &repo().join("python")) {
        check("binding_minimal.py", output, "binding_minimal: OK");
    }
}

#[test]
fn python_example_torch_offload() {
    if let Some(output) = python(&["examples/torch_offload.py"], &repo().join("python")) {
        check("torch_offload.py", output, "torch_offload: OK");
    }
}

/// The GPU benchmark's CPU mode: a small stack, strata against unmanaged, bit for bit.
#[test]
fn python_benchmark_small_on_cpu() {
    let args = [
        "benchmarks/torch_offload_bench.py",
        "--device",
        "cpu",
        "--small",
        "--steps",
        "1",
    ];
    if let Some(output) = python(&args, &repo().join("python")) {
        check("torch_offload_bench.py", output, "torch_offload_bench: OK");
    }
}

/// The CUDA Linear-stack benchmark's CPU mode: the same stack under every budget, each pass bit
/// for bit the unmanaged one.
#[test]
fn python_linear_stack_small_on_cpu() {
    let args = [
        "benchmarks/cuda_linear_stack.py",
        "--device",
        "cpu",
        "--small",
    ];
    if let Some(output) = python(&args, &repo().join("python")) {
        check("cuda_linear_stack.py", output, "cuda_linear_stack: OK");
    }
}
