//! scripts/install.sh as a C, C++ or CMake user meets it: install into a temporary prefix, then
//! build programs against that prefix alone, with pkg-config and with find_package(strata).
//!
//! Needs bash, cc, c++ and pkg-config; the CMake part needs cmake and prints a SKIPPED line
//! without it (`.ci/run` installs both).

mod common;
use common::library_dir;
use common::programs::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Installs the libraries this test binary was built with (cargo cannot run inside cargo test,
/// so the script is told where they are rather than building them).
fn install(prefix: &Path) {
    let mut command = Command::new("bash");
    command
        .arg(manifest_dir().join("scripts/install.sh"))
        .arg("--prefix")
        .arg(prefix)
        .arg("--lib-dir")
        .arg(library_dir());
    let output = command.output().expect("running bash");
    assert!(
        output.status.success(),
        "scripts/install.sh failed\n{}",
        describe(&output)
    );
}

/// Says on the terminal, even though cargo test captures test output, that a part did not run.
fn skipped(what: &str, why: &str) {
    common::skip(&format!("SKIPPED: {what}: {why}"));
}

fn found(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `pkg-config ARGS strata` against the prefix only.
fn pkg_config(prefix: &Path, args: &[&str]) -> Vec<String> {
    let mut command = Command::new("pkg-config");
    command
        .env("PKG_CONFIG_PATH", prefix.join("lib/pkgconfig"))
        .args(args)
        .arg("strata");
    let output = command.output().expect("running pkg-config");
    assert!(
        output.status.success(),
        "pkg-config failed\n{}",
        describe(&output)
    );
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

fn example(path: &str) -> PathBuf {
    manifest_dir().join(path)
}

#[test]
fn the_prefix_holds_versioned_libraries_both_headers_and_both_package_files() {
    let dir = BuildDir::new("install-layout");
    let prefix = dir.path().join("prefix");
    install(&prefix);
    let lib = prefix.join("lib");
    let version = env!("CARGO_PKG_VERSION");
    let soname = concat!("libstrata.so.", env!("CARGO_PKG_VERSION_MAJOR"));
    assert_eq!(
        std::fs::read_link(lib.join("libstrata.so")).unwrap(),
        Path::new(soname)
    );
    assert_eq!(
        std::fs::read_link(lib.join(soname)).unwrap(),
        PathBuf::from(format!("libstrata.so.{version}"))
    );
    for file in [
        format!("lib/libstrata.so.{version}"),
        "lib/libstrata.a".into(),
        "include/strata.h".into(),
        "include/strata.hpp".into(),
        "lib/pkgconfig/strata.pc".into(),
        "lib/cmake/strata/strataConfig.cmake".into(),
        "lib/cmake/strata/strataConfigVersion.cmake".into(),
    ] {
        assert!(prefix.join(&file).is_file(), "{file} was not installed");
    }
    if found("pkg-config") {
        assert_eq!(pkg_config(&prefix, &["--modversion"]), [version]);
    }
}

#[test]
fn c_and_cpp_programs_build_with_pkg_config_and_run() {
    if !found("pkg-config") {
        skipped(
            "building against the install with pkg-config",
            "no pkg-config on PATH",
        );
        return;
    }
    require_compiler("cc");
    require_compiler("c++");
    let dir = BuildDir::new("install-pkg-config");
    let prefix = dir.path().join("prefix");
    install(&prefix);
    let flags = pkg_config(&prefix, &["--cflags", "--libs"]);
    let rpath = format!("-Wl,-rpath,{}", prefix.join("lib").display());
    for (compiler, std_flags, source, name) in [
        ("cc", C_FLAGS, "examples-c/minimal.c", "minimal"),
        ("c++", CXX_FLAGS, "examples-cpp/engine.cpp", "engine"),
    ] {
        let exe = dir.path().join(name);
        let mut command = Command::new(compiler);
        command
            .args(std_flags)
            .arg(example(source))
            .arg("-o")
            .arg(&exe)
            .args(&flags)
            .arg(&rpath);
        compile(command, &format!("{source} with pkg-config"));
        assert_ok(name, &run(&exe, &[], dir.path()));
    }
}

#[test]
fn a_cmake_project_finds_strata_and_links_it_shared_and_static() {
    if !found("cmake") {
        skipped("the CMake find_package(strata) test", "no cmake on PATH");
        return;
    }
    require_compiler("cc");
    require_compiler("c++");
    let dir = BuildDir::new("install-cmake");
    let prefix = dir.path().join("prefix");
    install(&prefix);
    let project = dir.path().join("project");
    std::fs::create_dir_all(&project).unwrap();
    std::fs::write(
        project.join("CMakeLists.txt"),
        format!(
            "cmake_minimum_required(VERSION 3.16)\n\
             project(consumer C CXX)\n\
             find_package(strata {version} REQUIRED)\n\
             add_executable(minimal \"{minimal}\")\n\
             target_link_libraries(minimal PRIVATE strata::strata)\n\
             add_executable(minimal_static \"{minimal}\")\n\
             target_link_libraries(minimal_static PRIVATE strata::strata_static)\n\
             add_executable(engine \"{engine}\")\n\
             set_target_properties(engine PROPERTIES CXX_STANDARD 17 CXX_STANDARD_REQUIRED ON)\n\
             target_link_libraries(engine PRIVATE strata::strata)\n",
            version = env!("CARGO_PKG_VERSION"),
            minimal = example("examples-c/minimal.c").display(),
            engine = example("examples-cpp/engine.cpp").display(),
        ),
    )
    .unwrap();
    let build = dir.path().join("build");
    let mut configure = Command::new("cmake");
    configure
        .arg("-S")
        .arg(&project)
        .arg("-B")
        .arg(&build)
        .arg(format!("-DCMAKE_PREFIX_PATH={}", prefix.display()));
    compile(configure, "the CMake project (configure)");
    let mut make = Command::new("cmake");
    make.arg("--build").arg(&build);
    compile(make, "the CMake project (build)");
    for (exe, name) in [
        ("minimal", "minimal"),
        ("minimal_static", "minimal"),
        ("engine", "engine"),
    ] {
        assert_ok(name, &run(&build.join(exe), &[], dir.path()));
    }
}
