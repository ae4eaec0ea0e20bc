//! Stress through the C ABI, as a command: (a) threads acquiring and releasing random layers of
//! every kind (fp8 per-channel computed in bf16, f16 read from disk computed in f32, plain; host
//! and checkpoint layers) under a budget of 2.5 layers, every view verified byte for byte, the
//! budget checked after every acquire; (b) a single-threaded soak with prefetching whose resident
//! memory must not grow after warm-up, and which must hold 0 bytes once its groups are destroyed.
//! Exits non-zero on the first wrong byte, budget overrun, unexpected status or leak.
//!
//! Run: cargo bench --bench stress [-- --seconds 60 --threads 8 --passes 10000 --warmup 100
//!      --max-growth-kib 1024 --seed 1]

#[path = "../tests/common/mod.rs"]
mod common;
use common::stress::*;
use std::time::Duration;

struct Args {
    seconds: u64,
    threads: usize,
    passes: usize,
    warmup: usize,
    max_growth_kib: i64,
    seed: u64,
}

fn parse() -> Args {
    let mut args = Args {
        seconds: 60,
        threads: 8,
        passes: 10_000,
        warmup: 100,
        max_growth_kib: 1024,
        seed: 1,
    };
    let mut argv = std::env::args().skip(1);
    while let Some(flag) = argv.next() {
        // cargo bench passes --bench to every bench binary.
        if flag == "--bench" {
            continue;
        }
        let value = argv
            .next()
            .unwrap_or_else(|| usage(&format!("{flag} needs a value")));
        let number = || -> u64 {
            value
                .parse()
                .unwrap_or_else(|_| usage(&format!("{flag} {value}: not a number")))
        };
        match flag.as_str() {
            "--seconds" => args.seconds = number(),
            "--threads" => args.threads = number() as usize,
            "--passes" => args.passes = number() as usize,
            "--warmup" => args.warmup = number() as usize,
            "--max-growth-kib" => args.max_growth_kib = number() as i64,
            "--seed" => args.seed = number(),
            _ => usage(&format!("unknown argument {flag}")),
        }
    }
    if args.threads == 0 {
        usage("--threads must be at least 1");
    }
    args
}

fn usage(problem: &str) -> ! {
    eprintln!(
        "{problem}\nusage: cargo bench --bench stress -- [--seconds N] [--threads N] [--passes N] [--warmup N] [--max-growth-kib N] [--seed N]"
    );
    std::process::exit(2);
}

fn main() {
    let args = parse();
    let threads = run_threads(&ThreadsConfig {
        device: HOST,
        threads: args.threads,
        duration: Duration::from_secs(args.seconds),
        layers_of_budget: 2.5,
        seed: args.seed,
    });
    threads.print();

    let soak = soak(&SoakConfig {
        passes: args.passes,
        warmup: args.warmup,
    });
    soak.print();
    let mut failed = false;
    if soak.held_after_destroy != (0, 0) {
        eprintln!("FAIL: bytes still held after destroying every group");
        failed = true;
    }
    if soak.growth() > args.max_growth_kib << 10 {
        eprintln!(
            "FAIL: RSS grew by {} KiB after warm-up (bound {} KiB)",
            soak.growth() / 1024,
            args.max_growth_kib
        );
        failed = true;
    }
    if failed {
        std::process::exit(1);
    }
    println!("stress: OK");
}
