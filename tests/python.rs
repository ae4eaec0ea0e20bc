//! Runs the Python package's unit tests (python/tests, plain unittest) and its examples against
//! the library this build made, with the interpreter STRATA_PYTHON names (.ci/run sets it to the
//! virtual environment it made with torch, numpy, transformers, diffusers, accelerate and
//! setuptools-rust) or else python3. Tests that need a missing package skip with a "SKIPPED:"
//! line, copied to the real stderr so that `cargo test` shows it; under CI=true a skip for any
//! reason but a missing CUDA driver or device fails the test instead (common::skip).

mod common;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The interpreter the tests run: STRATA_PYTHON, else python3 from PATH.
fn interpreter() -> String {
    std::env::var("STRATA_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

/// Runs `command` with the suite's timeout; None (and a skip) where its program is missing.
fn run(command: &mut Command) -> Option<Output> {
    let files = common::programs::BuildDir::new("python-output");
    match common::programs::output_within(command, files.path(), common::programs::SUITE_TIMEOUT) {
        Ok(output) => Some(output),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            common::skip(&format!(
                "SKIPPED: {:?} is not on this machine",
                command.get_program()
            ));
            None
        }
        Err(e) => panic!("running {command:?}: {e}"),
    }
}

/// Runs the interpreter with the package importable and STRATA_LIBRARY set.
fn python(args: &[&str], dir: &Path) -> Option<Output> {
    python_with(args, dir, &[])
}

/// `python`, with more environment variables.
fn python_with(args: &[&str], dir: &Path, env: &[(&str, &Path)]) -> Option<Output> {
    run(Command::new(interpreter())
        .args(args)
        .current_dir(dir)
        .env("PYTHONPATH", repo().join("python"))
        .env("STRATA_LIBRARY", common::library_dir().join("libstrata.so"))
        .envs(env.iter().copied()))
}

/// What a run printed to say it skipped something: our "SKIPPED:" lines and unittest's own
/// "... skipped 'reason'".
fn skips(output: &Output) -> Vec<String> {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let mut found = Vec::new();
    for line in stdout.lines().chain(stderr.lines()) {
        // unittest -v writes a test's name and its result on one line, around what it printed.
        if let Some(at) = line.find("SKIPPED:") {
            found.push(line[at..].trim_end_matches(" ... ok").to_string());
        } else if let Some(at) = line.find(" ... skipped '") {
            found.push(format!("SKIPPED: {}{}", &line[..at], &line[at + 4..]));
        }
    }
    found
}

fn check(name: &str, output: Output, expect: &str) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{name} failed:\n{stdout}\n{stderr}"
    );
    let skipped = skips(&output);
    for line in &skipped {
        common::skip(&format!("{name}: {line}"));
    }
    assert!(
        !skipped.is_empty() || stdout.contains(expect) || stderr.contains(expect),
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
        common::skip("SKIPPED: the binding's CUDA tests on the emulated driver: no C++ compiler");
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

/// The cargo target folder this test binary was built in (target/<profile>/deps/<binary>).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    exe.ancestors()
        .nth(3)
        .expect("the test binary lives in <target>/<profile>/deps")
        .to_path_buf()
}

/// `pip wheel ./python` builds libstrata into the package (setuptools-rust, see
/// python/pyproject.toml); the wheel installed into a fresh virtual environment, run from a
/// folder outside the checkout with no STRATA_LIBRARY, loads the library it carries and runs
/// the minimal example; STRATA_LIBRARY still overrides it. Nothing downloads: the build backend
/// comes from the test's interpreter (--no-build-isolation; .ci/run installs setuptools-rust
/// there), the fresh environment gets its pip from ensurepip and the wheel with --no-index.
/// `pip install ./python` is this same wheel build followed by this install.
#[test]
fn pip_wheel_carries_the_library_into_a_fresh_environment() {
    let probe = python(&["-c", "import setuptools_rust"], &repo());
    let Some(probe) = probe else { return };
    if !probe.status.success() {
        common::skip("SKIPPED: the wheel build: setuptools-rust is not installed (pip install setuptools-rust)");
        return;
    }
    let dir = common::programs::BuildDir::new("python-wheel");
    let wheels = dir.path().join("wheels");
    // Its own target folder, so that the build neither waits on nor rewrites this test run's.
    let build = run(Command::new(interpreter())
        .args([
            "-m",
            "pip",
            "wheel",
            "--no-build-isolation",
            "--no-deps",
            "--no-index",
            "-w",
        ])
        .arg(&wheels)
        .arg(repo().join("python"))
        .env("CARGO_TARGET_DIR", target_dir().join("python-package")))
    .expect("the interpreter ran a moment ago");
    check("pip wheel ./python", build, "Successfully built strata");
    let built: Vec<PathBuf> = std::fs::read_dir(&wheels)
        .expect("pip wheel made its output folder")
        .map(|entry| entry.expect("a wheel").path())
        .collect();
    assert_eq!(built.len(), 1, "one wheel expected: {built:?}");
    let name = built[0].file_name().unwrap().to_string_lossy().to_string();
    assert!(
        name.starts_with("strata-0.1.0-cp38-abi3-"),
        "a wheel for every CPython >= 3.8 expected, got {name}"
    );

    let venv = dir.path().join("venv");
    let made = run(Command::new(interpreter()).args(["-m", "venv"]).arg(&venv))
        .expect("the interpreter ran a moment ago");
    assert!(made.status.success(), "python -m venv: {made:?}");
    let fresh = venv.join("bin/python");
    let install = run(Command::new(&fresh)
        .args(["-m", "pip", "install", "--no-index", "--no-deps"])
        .arg(&built[0]))
    .expect("the fresh environment's python runs");
    check(
        "pip install strata.whl",
        install,
        "Successfully installed strata",
    );

    let app = dir.path().join("app");
    std::fs::create_dir(&app).unwrap();
    std::fs::copy(
        repo().join("python/examples/binding_minimal.py"),
        app.join("binding_minimal.py"),
    )
    .unwrap();
    let outside = |command: &mut Command| {
        command
            .current_dir(&app)
            .env_remove("STRATA_LIBRARY")
            .env_remove("PYTHONPATH")
            .env_remove("CARGO_TARGET_DIR");
    };
    let mut example = Command::new(&fresh);
    example.arg("binding_minimal.py");
    outside(&mut example);
    let example = run(&mut example).expect("the fresh environment's python runs");
    check(
        "binding_minimal.py from the wheel",
        example,
        "binding_minimal: OK",
    );

    let where_from = "import strata, strata._lib as l; l.lib(); print(l.lib().path)";
    let mut packaged = Command::new(&fresh);
    packaged.args(["-c", where_from]);
    outside(&mut packaged);
    let packaged = run(&mut packaged).expect("the fresh environment's python runs");
    let path = String::from_utf8_lossy(&packaged.stdout).trim().to_string();
    assert!(
        packaged.status.success()
            && path.starts_with(&*venv.to_string_lossy())
            && path.ends_with("strata/libstrata.abi3.so"),
        "the installed package should load the library it carries, got {path:?}: {packaged:?}"
    );

    let chosen = common::library_dir().join("libstrata.so");
    let mut overridden = Command::new(&fresh);
    overridden.args(["-c", where_from]);
    outside(&mut overridden);
    overridden.env("STRATA_LIBRARY", &chosen);
    let overridden = run(&mut overridden).expect("the fresh environment's python runs");
    assert_eq!(
        String::from_utf8_lossy(&overridden.stdout).trim(),
        chosen.to_string_lossy(),
        "STRATA_LIBRARY should override the packaged library: {overridden:?}"
    );
}
