//! Building and running programs against the library: compilers, flags, run with a timeout.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Flags every C example must compile cleanly under.
pub const C_FLAGS: &[&str] = &["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic"];
pub const CXX_FLAGS: &[&str] = &["-std=c++17", "-Wall", "-Wextra", "-Werror", "-pedantic"];
/// The longest an example may run before it counts as hung.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(120);
/// The longest a whole test suite run as a child (python's, the emulated-driver runs) may take.
pub const SUITE_TIMEOUT: Duration = Duration::from_secs(600);

pub fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn include_dir() -> PathBuf {
    manifest_dir().join("include")
}

/// Panics with a clear message when `compiler` cannot be run at all.
pub fn require_compiler(compiler: &str) {
    match Command::new(compiler).arg("--version").output() {
        Ok(output) if output.status.success() => {}
        Ok(output) => panic!(
            "`{compiler} --version` failed ({}): the C example tests need a working C/C++ compiler\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ),
        Err(e) => panic!(
            "`{compiler}` was not found on PATH ({e}): the C example tests need a C and a C++ \
             compiler (install gcc and g++, e.g. `apt-get install gcc g++`)"
        ),
    }
}

/// The first C++ compiler on PATH that runs.
pub fn cxx_compiler() -> Option<&'static str> {
    ["c++", "g++", "clang++"].into_iter().find(|compiler| {
        Command::new(compiler)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// Builds tests/gpu/emulated_driver.cpp as `dir`/libcuda.so, for a process started with
/// LD_LIBRARY_PATH=`dir`; false where no C++ compiler runs.
pub fn build_emulated_driver(dir: &Path) -> bool {
    let Some(compiler) = cxx_compiler() else {
        return false;
    };
    let mut cxx = Command::new(compiler);
    cxx.args(CXX_FLAGS)
        .args(["-O2", "-fno-strict-aliasing", "-ffp-contract=off"])
        .args(["-shared", "-fPIC", "-pthread", "-I"])
        .arg(manifest_dir().join("kernels"))
        .arg(manifest_dir().join("tests/gpu/emulated_driver.cpp"))
        .arg("-o")
        .arg(dir.join("libcuda.so"));
    compile(cxx, "tests/gpu/emulated_driver.cpp");
    true
}

/// A fresh directory under the system temp dir, removed when the test passes and kept (and
/// printed) when it fails, so the binaries and files can be inspected.
pub struct BuildDir(PathBuf);

impl BuildDir {
    pub fn new(label: &str) -> BuildDir {
        // Tests of one process make these from several threads at once.
        static MADE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let made = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!(
            "strata-build-{label}-{}-{made}-{nanos}",
            std::process::id()
        ));
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        BuildDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for BuildDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept {} for inspection", self.0.display());
        } else {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

pub fn describe(output: &Output) -> String {
    format!(
        "status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Runs a compiler command and panics with its output when it fails.
pub fn compile(mut command: Command, what: &str) {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("running the compiler for {what}: {e}"));
    assert!(
        output.status.success(),
        "compiling {what} failed\ncommand: {command:?}\n{}",
        describe(&output)
    );
}

/// Runs a program in `dir` with its output going to files there, killing it after RUN_TIMEOUT,
/// and returns what it printed.
pub fn run(exe: &Path, args: &[&Path], dir: &Path) -> Output {
    output_within(
        Command::new(exe).args(args).current_dir(dir),
        dir,
        RUN_TIMEOUT,
    )
    .unwrap_or_else(|e| panic!("starting {}: {e}", exe.display()))
}

/// Runs `command` with its output going to files in `files_in` (no pipe can fill up), and returns
/// what it printed; panics with the output so far if it runs longer than `timeout`, so that a
/// hang fails the test instead of stalling the whole run. Err when it cannot be started.
pub fn output_within(
    command: &mut Command,
    files_in: &Path,
    timeout: Duration,
) -> std::io::Result<Output> {
    let stdout_path = files_in.join("stdout.txt");
    let stderr_path = files_in.join("stderr.txt");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(File::create(&stdout_path)?)
        .stderr(File::create(&stderr_path)?)
        .spawn()?;
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{command:?} ran longer than {timeout:?}; its output so far:\n{}\n{}",
                fs::read_to_string(&stdout_path).unwrap_or_default(),
                fs::read_to_string(&stderr_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok(Output {
        status,
        stdout: fs::read(&stdout_path)?,
        stderr: fs::read(&stderr_path)?,
    })
}

/// Asserts a clean exit and that the last line printed is "<name>: OK".
pub fn assert_ok(name: &str, output: &Output) {
    assert!(
        output.status.success(),
        "{name} failed\n{}",
        describe(output)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().rev().find(|l| !l.trim().is_empty());
    assert_eq!(
        last,
        Some(format!("{name}: OK").as_str()),
        "{name} did not end with \"{name}: OK\"\n{}",
        describe(output)
    );
}
