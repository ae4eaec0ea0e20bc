//! Builds the C examples (examples-c/*.c) and the C++ ones (examples-cpp/*.cpp) against the built
//! libraries and runs them; also checks that the headers compile as C++ and that static linking
//! works.
//!
//! Needs `cc` and `c++` on PATH (CI installs gcc). The libraries are the ones cargo built for this
//! test binary: run with `cargo test --release --test c_examples`.

mod common;
use common::library_dir;
use common::programs::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

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
        .args(["-lm", "-pthread"]);
    compile(cc, &source.display().to_string());
}

/// Every `folder/*.ext` in the repository, sorted.
fn sources(folder: &str, ext: &str) -> Vec<PathBuf> {
    let dir = manifest_dir().join(folder);
    let mut sources: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
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
    let sources = sources("examples-c", "c");
    let names: Vec<String> = sources.iter().map(|s| stem(s)).collect();
    for expected in ["minimal", "stream_checkpoint", "stress"] {
        assert!(
            names.iter().any(|n| n == expected),
            "examples-c/{expected}.c is missing (found {names:?})"
        );
    }

    for source in &sources {
        let name = stem(source);
        let dir = BuildDir::new(&name);
        let exe = dir.path().join(&name);
        compile_shared(source, &exe);

        let model = dir.path().join("model.safetensors");
        let trace = dir.path().join("trace.json");
        let args: Vec<&Path> = match name.as_str() {
            "stream_checkpoint" => vec![&model, &trace],
            "shared_store" => vec![&model],
            // Seconds and threads: a short run of what it does for as long as it is asked.
            "stress" => vec![Path::new("1.5"), Path::new("4")],
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
fn every_cpp_example_compiles_and_runs() {
    require_compiler("c++");
    let sources = sources("examples-cpp", "cpp");
    assert!(
        sources.iter().any(|s| stem(s) == "engine"),
        "examples-cpp/engine.cpp is missing (found {sources:?})"
    );
    for source in &sources {
        let name = stem(source);
        let dir = BuildDir::new(&name);
        let exe = dir.path().join(&name);
        link_soname(dir.path());
        let mut cxx = Command::new("c++");
        cxx.args(CXX_FLAGS)
            .arg("-I")
            .arg(include_dir())
            .arg(source)
            .arg("-o")
            .arg(&exe)
            .arg(format!("-L{}", library_dir().display()))
            .arg("-lstrata")
            .arg(format!("-Wl,-rpath,{}", dir.path().display()));
        compile(cxx, &source.display().to_string());
        let output = run(&exe, &[], dir.path());
        assert_ok(&name, &output);
        println!("{name}:\n{}", String::from_utf8_lossy(&output.stdout));
    }
}

#[test]
fn example_links_statically() {
    require_compiler("cc");
    let dir = BuildDir::new("static");
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
    let dir = BuildDir::new("cpp");
    let source = dir.path().join("header_twice.cpp");
    // Including each twice proves the include guards; using the API from C++ proves the
    // extern "C" block, the struct definitions and the callback typedefs are valid C++.
    fs::write(
        &source,
        "#include \"strata.h\"\n\
         #include \"strata.h\"\n\
         #include \"strata.hpp\"\n\
         #include \"strata.hpp\"\n\
         int main() {\n\
           strata_options options = strata_options_default();\n\
           options.log_fn = [](void *, uint32_t, const char *) {};\n\
           options.progress_fn = [](void *, const char *, uint64_t, uint64_t) {};\n\
           strata_context *ctx = nullptr;\n\
           strata_status status = strata_context_create(&options, &ctx);\n\
           strata_context_destroy(ctx);\n\
           strata::context wrapped(options, [](uint32_t, const char *) {});\n\
           return status == STRATA_OK && wrapped.stats().acquires == 0 ? 0 : 1;\n\
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
    compile(cxx, "include/strata.h and strata.hpp as C++");
}
