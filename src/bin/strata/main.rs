//! The strata command line: `demo` (the main job), `inspect` and `plan`.

mod bench;
mod demo;
mod inspect;

use std::collections::HashMap;
use strata::checkpoint::Checkpoint;
use strata::error::{Error, Result};

const USAGE: &str = "strata: run models larger than GPU memory

Usage: strata <command> [options]

Commands:
  demo      Stream a generated model under a budget on the CPU, check the result, print the figures
  inspect   List a checkpoint's layers: tensors, dtypes and bytes per layer
  plan      Which layers stay resident under a budget, bytes streamed per pass, predicted time
  bench     Stream a checkpoint (or a generated one) with synthetic compute: overlap, bytes, stalls

Run `strata <command> --help` for a command's options.";

fn main() {
    // Like other command-line tools, end quietly when the reader of our output goes away
    // (`strata inspect ... | head`) instead of failing on the write.
    // SAFETY: restoring the default action for SIGPIPE before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("demo") => demo::demo(&args[1..]),
        Some("inspect") => inspect::inspect(&args[1..]),
        Some("plan") => inspect::plan(&args[1..]),
        Some("bench") => bench::bench(&args[1..]),
        Some("--help" | "-h" | "help") => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => Err(Error::invalid(format!(
            "unknown command {other:?}\n\n{USAGE}"
        ))),
        None => Err(Error::invalid(USAGE)),
    };
    if let Err(e) = result {
        eprintln!("strata: {}", e.message);
        std::process::exit(2);
    }
}

/// A command's arguments: `--name value` options, `--switch` flags and positional words.
pub struct Args {
    values: HashMap<String, String>,
    switches: Vec<String>,
    pub positional: Vec<String>,
}

impl Args {
    /// Parses `args` for a command taking the options in `valued` and the flags in `switches`;
    /// `Ok(None)` when `--help` was asked for (the usage is printed).
    pub fn parse(
        args: &[String],
        valued: &[&str],
        switches: &[&str],
        usage: &str,
    ) -> Result<Option<Args>> {
        let mut parsed = Args {
            values: HashMap::new(),
            switches: Vec::new(),
            positional: Vec::new(),
        };
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            match arg.as_str() {
                "--help" | "-h" => {
                    println!("{usage}");
                    return Ok(None);
                }
                flag if switches.contains(&flag) => parsed.switches.push(flag.to_owned()),
                flag if valued.contains(&flag) => {
                    let value = it.next().ok_or_else(|| {
                        Error::invalid(format!("{flag} needs a value\n\n{usage}"))
                    })?;
                    parsed.values.insert(flag.to_owned(), value.clone());
                }
                flag if flag.starts_with("--") => {
                    return Err(Error::invalid(format!(
                        "unknown option {flag:?}\n\n{usage}"
                    )))
                }
                word => parsed.positional.push(word.to_owned()),
            }
        }
        Ok(Some(parsed))
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.values.get(name).map(String::as_str)
    }

    pub fn has(&self, name: &str) -> bool {
        self.switches.iter().any(|s| s == name)
    }

    /// A positive whole number, or `default` when the option is absent.
    pub fn number(&self, name: &str, default: u64) -> Result<u64> {
        self.whole(name, default, 1, "a positive number")
    }

    /// A whole number that may be 0 (a count), or `default` when the option is absent.
    pub fn count(&self, name: &str, default: u64) -> Result<u64> {
        self.whole(name, default, 0, "a whole number")
    }

    fn whole(&self, name: &str, default: u64, least: u64, what: &str) -> Result<u64> {
        match self.get(name) {
            None => Ok(default),
            Some(value) => value
                .parse::<u64>()
                .ok()
                .filter(|&n| n >= least)
                .ok_or_else(|| Error::invalid(format!("{name} takes {what}, not {value:?}"))),
        }
    }
}

/// A progress bar on stderr for long work, drawn only where a person watches (stderr is a
/// terminal) and never into machine-readable output.
pub struct Progress {
    enabled: bool,
    drawn: bool,
}

impl Progress {
    pub fn new(machine_readable: bool) -> Progress {
        use std::io::IsTerminal;
        Progress {
            enabled: !machine_readable && std::io::stderr().is_terminal(),
            drawn: false,
        }
    }

    pub fn update(&mut self, phase: &str, done: u64, total: u64) {
        if !self.enabled {
            return;
        }
        const WIDTH: u64 = 30;
        let filled = (done.min(total) * WIDTH)
            .checked_div(total)
            .unwrap_or(WIDTH) as usize;
        let percent = (done.min(total) * 100).checked_div(total).unwrap_or(100);
        eprint!(
            "\r{phase:<28} [{}{}] {percent:>3}%",
            "#".repeat(filled),
            ".".repeat(WIDTH as usize - filled)
        );
        self.drawn = true;
    }

    /// Clears the bar so what follows starts on a clean line.
    pub fn finish(&mut self) {
        if self.drawn {
            eprint!("\r\x1b[K");
            self.drawn = false;
        }
    }
}

/// Opens a checkpoint with a progress bar over its shards' headers (none for `--json`).
pub fn open_checkpoint(path: &std::path::Path, machine_readable: bool) -> Result<Checkpoint> {
    let progress = std::cell::RefCell::new(Progress::new(machine_readable));
    let opened = Checkpoint::open_reporting(path, &|done, total| {
        progress
            .borrow_mut()
            .update("reading checkpoint headers", done, total)
    });
    progress.borrow_mut().finish();
    opened
}

/// The folder a command writes into: the one given, or strata-COMMAND-PID in the temp folder.
/// Created if missing.
pub fn output_dir(given: Option<&std::path::Path>, command: &str) -> Result<std::path::PathBuf> {
    let dir = match given {
        Some(dir) => dir.to_path_buf(),
        None => std::env::temp_dir().join(format!("strata-{command}-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).map_err(|e| Error::from_io(&e, "creating", &dir))?;
    Ok(dir)
}

/// Bytes in binary units, the way people read memory sizes.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Reads "8GiB", "512MiB", "25GB", "1.5TB", "4096": binary (KiB, MiB, GiB, TiB) and decimal (KB,
/// MB, GB, TB) units, with an optional "/s" for rates.
pub fn parse_bytes(text: &str) -> Result<u64> {
    let trimmed = text.trim().trim_end_matches("/s");
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let scale: f64 = match unit.trim() {
        "" | "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024f64.powi(2),
        "GiB" => 1024f64.powi(3),
        "TiB" => 1024f64.powi(4),
        "KB" | "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        other => {
            return Err(Error::invalid(format!(
                "unknown unit {other:?} in {text:?}"
            )))
        }
    };
    let value: f64 = number
        .parse()
        .map_err(|_| Error::invalid(format!("{text:?} is not a size like 8GiB or 25GB")))?;
    Ok((value * scale).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_in_binary_and_decimal_units() {
        assert_eq!(parse_bytes("8GiB").unwrap(), 8 << 30);
        assert_eq!(parse_bytes("25GB/s").unwrap(), 25_000_000_000);
        assert_eq!(parse_bytes("512 MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert_eq!(parse_bytes("1.5KiB").unwrap(), 1536);
        assert!(parse_bytes("8 parsecs").is_err());
        assert!(parse_bytes("GiB").is_err());
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
        assert_eq!(human_bytes(17), "17 B");
    }
}
