//! scripts/sanitize.sh from `cargo test`: every C and C++ example (stress.c among them) under
//! valgrind memcheck and built with clang's AddressSanitizer and UndefinedBehaviorSanitizer,
//! against the libstrata.so this test was built with. A small program with a leak and a read past
//! an allocation shows that each tool's findings do fail the script.
//!
//! A tool that is not installed skips its tests with a "skipped:" line (CI installs valgrind,
//! clang and the sanitizer runtime; under CI=true such a skip fails the test).

mod common;
use common::library_dir;
use common::programs::{describe, manifest_dir, BuildDir};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn installed(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn sanitize(mode: &str, sources: &[PathBuf]) -> Output {
    Command::new("bash")
        .arg(manifest_dir().join("scripts/sanitize.sh"))
        .arg(mode)
        .args(sources)
        .env("STRATA_LIB_DIR", library_dir())
        .output()
        .expect("running scripts/sanitize.sh")
}

/// The script's summary line for a program and tool.
fn summary_line<'a>(stdout: &'a str, program: &str, tool: &str) -> &'a str {
    stdout
        .lines()
        .find(|l| {
            let mut words = l.split_whitespace();
            words.next() == Some(program) && words.next() == Some(tool)
        })
        .unwrap_or_else(|| panic!("no {tool} line for {program} in:\n{stdout}"))
}

/// Whether the script skipped this tool (its runtime missing): prints why.
fn skipped(stdout: &str) -> bool {
    match stdout.lines().find(|l| l.contains("skipped:")) {
        Some(line) => {
            common::skip(line.trim());
            true
        }
        None => false,
    }
}

fn examples() -> Vec<String> {
    let mut names = Vec::new();
    for (folder, ext) in [("examples-c", "c"), ("examples-cpp", "cpp")] {
        for entry in std::fs::read_dir(manifest_dir().join(folder)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == ext) {
                names.push(path.file_stem().unwrap().to_string_lossy().into_owned());
            }
        }
    }
    assert!(names.iter().any(|n| n == "stress"), "{names:?}");
    names
}

/// Checks every example's line, given what a clean one says.
fn check_examples(mode: &str, tool: &str, clean: &str) {
    let output = sanitize(mode, &[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    if skipped(&stdout) {
        return;
    }
    assert!(
        output.status.success(),
        "scripts/sanitize.sh {mode} failed\n{}",
        describe(&output)
    );
    for name in examples() {
        let line = summary_line(&stdout, &name, tool);
        assert!(line.contains(clean), "{line}");
    }
}

/// Leaks 100 bytes and reads one byte past an 8-byte allocation, then claims success.
fn faulty_program(dir: &Path) -> PathBuf {
    let source = dir.join("faulty.c");
    std::fs::write(
        &source,
        "#include <stdio.h>\n\
         #include <stdlib.h>\n\
         #include <string.h>\n\
         int main(void) {\n\
           char *lost = malloc(100);\n\
           char *small = malloc(8);\n\
           if (lost == NULL || small == NULL) return 1;\n\
           memset(lost, 1, 100);\n\
           memset(small, 2, 8);\n\
           volatile char *p = small;\n\
           int past_the_end = p[8];\n\
           printf(\"%d %d\\nfaulty: OK\\n\", lost[0], past_the_end != 0);\n\
           free(small);\n\
           return 0;\n\
         }\n",
    )
    .unwrap();
    source
}

/// Runs the faulty program through one tool: the script must fail, with `finding` on its line.
fn check_faulty(mode: &str, tool: &str, finding: &str) {
    let dir = BuildDir::new(&format!("sanitize-{mode}"));
    let output = sanitize(mode, &[faulty_program(dir.path())]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    if skipped(&stdout) {
        return;
    }
    assert!(
        !output.status.success(),
        "the faulty program passed\n{}",
        describe(&output)
    );
    let line = summary_line(&stdout, "faulty", tool);
    assert!(line.contains(finding) && line.contains("FAILED"), "{line}");
    assert_eq!(stdout.lines().last(), Some("sanitize: FAILED"));
}

#[test]
fn valgrind_finds_no_error_and_no_leak_in_the_examples() {
    if !installed("valgrind") {
        println!("skipped: valgrind not found");
        return;
    }
    check_examples(
        "valgrind",
        "valgrind",
        "0 errors, definitely lost 0 B, indirectly lost 0 B",
    );
}

#[test]
fn valgrind_findings_fail_the_script() {
    if !installed("valgrind") {
        println!("skipped: valgrind not found");
        return;
    }
    check_faulty("valgrind", "valgrind", "definitely lost 100 B");
}

#[test]
fn address_and_undefined_behavior_sanitizers_find_nothing_in_the_examples() {
    if !installed("clang") {
        println!("skipped: clang not found");
        return;
    }
    check_examples("asan", "asan+ubsan", "sanitizer reports: 0");
}

#[test]
fn sanitizer_findings_fail_the_script() {
    if !installed("clang") {
        println!("skipped: clang not found");
        return;
    }
    check_faulty("asan", "asan+ubsan", "sanitizer reports: 1");
}
