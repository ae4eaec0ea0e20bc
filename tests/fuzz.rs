//! A short run of every fuzz target in fuzz/ (libFuzzer through cargo-fuzz), so that each keeps
//! building and keeps passing on its committed seeds plus what a few seconds of mutation find.
//! The long runs are `scripts/fuzz.sh SECONDS`; .ci/run installs cargo-fuzz, and without it this
//! test says SKIPPED (under CI=true it fails instead).

mod common;
use std::io::Write;
use std::path::PathBuf;
use std::process::Command;

/// Seconds per target: enough to replay the seeds and mutate a few thousand inputs.
const SECONDS_PER_TARGET: u32 = 15;

#[test]
fn every_fuzz_target_survives_a_short_run() {
    let installed = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !installed {
        common::skip("SKIPPED: cargo-fuzz is not installed (cargo install cargo-fuzz --locked)");
        return;
    }
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let output = Command::new("bash")
        .arg(repo.join("scripts/fuzz.sh"))
        .arg(SECONDS_PER_TARGET.to_string())
        .current_dir(&repo)
        // The fuzz crate is its own workspace with its own target folder.
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .expect("bash runs scripts/fuzz.sh");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "a fuzz target failed; its input is in fuzz/artifacts/ (replay it as scripts/fuzz.sh \
         says)\n{stdout}\n{}",
        tail(&stderr, 8000)
    );
    let targets = stdout.lines().filter(|l| l.starts_with("== ")).count();
    assert!(targets >= 2, "expected every target to run:\n{stdout}");
    // One line per target for the log: how many inputs ran.
    for line in stderr
        .lines()
        .filter(|l| l.starts_with("stat::number_of_executed_units"))
    {
        let _ = writeln!(std::io::stderr(), "{line}");
    }
}

fn tail(text: &str, bytes: usize) -> &str {
    let mut start = text.len().saturating_sub(bytes);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}
