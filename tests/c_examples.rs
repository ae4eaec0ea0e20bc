//! Builds the C examples (examples-c/*.c) with a C compiler against the built libraries and runs
//! them; also checks that the header compiles as C++ and that static linking works.
//!
//! Needs `cc` and `c++` on PATH (CI installs gcc). The libraries are the ones cargo built for this
//! test binary: run with `cargo test --release --test c_examples`.

mod common;
use common::library_dir;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Flags every C example must compile cleanly under.
const C_FLAGS: &[&str] = &["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic"];
const CXX_FLAGS: &[&str] = &["-std=c++17", "-Wall", "-Wextra", "-Werror", "-pedantic"];
/// The longest an example may run before it counts as hung.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn include_dir() -> PathBuf {
    manifest_dir().join("include")
}

/// Panics with a clear message when `compiler` cannot be run at all.
fn require_compiler(compiler: &str) {
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

/// A fresh directory under the system temp dir, removed when the test passes and kept (and
/// printed) when it fails, so the binaries and files can be inspected.
struct TempDir(PathBuf);

impl TempDir {
    fn new(label: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let dir = std::env::temp_dir().join(format!(
            "strata-c-examples-{label}-{}-{nanos}",
            std::process::id()
        ));
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept {} for inspection", self.0.display());
        } else {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

fn describe(output: &Output) -> String {
    format!(
        "status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Runs a compiler command and panics with its output when it fails.
fn compile(mut command: Command, what: &str) {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("running the compiler for {what}: {e}"));
    assert!(
        output.status.success(),
        "compiling {what} failed\ncommand: {command:?}\n{}",
        describe(&output)
    );
}

/// Puts a link named after the library's soname (`libstrata.so.0`) in `dir`: programs linked
/// against libstrata.so load it by that name, and cargo leaves only libstrata.so.
fn link_soname(dir: &Path) {
    let soname = dir.join(concat!("libstrata.so.", env!("CARGO_PKG_VERSION_MAJOR")));
    if !soname.exists() {
        std::os::unix::fs::symlink(library_dir().join("libstrata.so"), &soname)
            .unwrap_or_else(|e| panic!("linking {}: {e}", soname.display()));
    }
}

/// Compiles one example against the shared library, with an rpath to the soname link made beside
/// it, so it runs from anywhere.
fn compile_shared(source: &Path, exe: &Path) {
    let lib = library_dir();
    let dir = exe.parent().expect("exe is in a directory");
    link_soname(dir);
    let mut cc = Command::new("cc");
    cc.args(C_FLAGS)
        .arg("-I")
        .arg(include_dir())
        .arg(source)
        .arg("-o")
        .arg(exe)
        .arg(format!("-L{}", lib.display()))
        .arg("-lstrata")
        .arg(format!("-Wl,-rpath,{}", dir.display()))
        .arg("-lm");
    compile(cc, &source.display().to_string());
}

/// Runs a program with its output going to files (no pipe can fill up), killing it after
/// RUN_TIMEOUT, and returns what it printed.
fn run(exe: &Path, args: &[&Path], dir: &Path) -> Output {
    let stdout_path = dir.join("stdout.txt");
    let stderr_path = dir.join("stderr.txt");
    let mut child = Command::new(exe)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(File::create(&stdout_path).unwrap())
        .stderr(File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", exe.display()));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > RUN_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{} ran longer than {RUN_TIMEOUT:?}; its output so far:\n{}",
                exe.display(),
                fs::read_to_string(&stdout_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: fs::read(&stdout_path).unwrap(),
        stderr: fs::read(&stderr_path).unwrap(),
    }
}

/// Asserts a clean exit and that the last line printed is "<name>: OK".
fn assert_ok(name: &str, output: &Output) {
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

/// Every examples-c/*.c, sorted.
fn examples() -> Vec<PathBuf> {
    let dir = manifest_dir().join("examples-c");
    let mut sources: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "c"))
        .collect();
    sources.sort();
    sources
}

fn stem(source: &Path) -> String {
    source.file_stem().unwrap().to_string_lossy().into_owned()
}

/// Checks the trace file stream_checkpoint wrote: Chrome trace JSON with events in it.
fn check_trace(path: &Path) {
    let text = fs::read_to_string(path).unwrap_or_else(|e| {
        panic!(
            "stream_checkpoint wrote no trace at {}: {e}",
            path.display()
        )
    });
    let json: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", path.display()));
    let events = json
        .get("traceEvents")
        .and_then(|e| e.as_array())
        .unwrap_or_else(|| panic!("{} has no \"traceEvents\" array", path.display()));
    assert!(!events.is_empty(), "the trace has no events");
}

#[test]
fn every_example_compiles_and_runs() {
    require_compiler("cc");
    let sources = examples();
    let names: Vec<String> = sources.iter().map(|s| stem(s)).collect();
    for expected in ["minimal", "stream_checkpoint"] {
        assert!(
            names.iter().any(|n| n == expected),
            "examples-c/{expected}.c is missing (found {names:?})"
        );
    }

    for source in &sources {
        let name = stem(source);
        let dir = TempDir::new(&name);
        let exe = dir.path().join(&name);
        compile_shared(source, &exe);

        let model = dir.path().join("model.safetensors");
        let trace = dir.path().join("trace.json");
        let args: Vec<&Path> = match name.as_str() {
            "stream_checkpoint" => vec![&model, &trace],
            _ => Vec::new(),
        };
        let output = run(&exe, &args, dir.path());
        assert_ok(&name, &output);
        println!("{name}:\n{}", String::from_utf8_lossy(&output.stdout));
        if name == "stream_checkpoint" {
            check_trace(&trace);
        }
    }
}

#[test]
fn example_links_statically() {
    require_compiler("cc");
    let dir = TempDir::new("static");
    let source = manifest_dir().join("examples-c/minimal.c");
    let exe = dir.path().join("minimal_static");
    let mut cc = Command::new("cc");
    cc.args(C_FLAGS)
        .arg("-I")
        .arg(include_dir())
        .arg(&source)
        .arg("-o")
        .arg(&exe)
        .arg(library_dir().join("libstrata.a"))
        .args(["-lpthread", "-ldl", "-lm"]);
    compile(cc, "minimal.c against libstrata.a");
    // No -L and no rpath: the program can only run if the library is inside it.
    let output = run(&exe, &[], dir.path());
    assert_ok("minimal", &output);
}

#[test]
fn header_compiles_as_cpp_and_is_include_guarded() {
    require_compiler("c++");
    let dir = TempDir::new("cpp");
    let source = dir.path().join("header_twice.cpp");
    // Including it twice proves the include guard; using the API from C++ proves the extern "C"
    // block and the struct definitions are valid C++.
    fs::write(
        &source,
        "#include \"strata.h\"\n\
         #include \"strata.h\"\n\
         int main() {\n\
           strata_options options = strata_options_default();\n\
           strata_context *ctx = nullptr;\n\
           strata_status status = strata_context_create(&options, &ctx);\n\
           strata_context_destroy(ctx);\n\
           return status == STRATA_OK ? 0 : 1;\n\
         }\n",
    )
    .unwrap();
    let mut cxx = Command::new("c++");
    cxx.args(CXX_FLAGS)
        .arg("-x")
        .arg("c++")
        .arg("-fsyntax-only")
        .arg("-I")
        .arg(include_dir())
        .arg(&source);
    compile(cxx, "include/strata.h as C++");
}
