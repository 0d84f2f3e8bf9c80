//! Runs one workload once for one crate, for instruction counting and frame counts:
//!
//! ```text
//! workload <crate> <W1..W8> [setup]
//! workload list
//! ```
//!
//! `list` prints every `<crate> <workload>` pair this build can run, one per line.
//!
//! With `setup` it stops after building the inputs and the starting table, so an
//! instruction counter run on both forms gives the workload's own instructions as the
//! difference. Prints `frames=<table frames in use after the workload> check=<checksum>`.
//! Tables are leaked rather than dropped so teardown is counted in neither run.

use std::hint::black_box;
use std::process::ExitCode;

use mmu::{El2, Stage2};
use mmu_bench::mmu::{block_mapped, block_split, merge, split, BenchRegime, Mmu};
use mmu_bench::workload::{after_w1, w1, w2, w3, w3_pages, w4, w4_lookups, w5, w6, w7, w8};
use mmu_bench::Adapter;

fn run<A: Adapter>(workload: &str, setup_only: bool) -> Option<(usize, u64)> {
    let mut check = 0;
    let table = match workload {
        "W1" | "W2" | "W8" => {
            let mut t = A::new();
            if !setup_only {
                match workload {
                    "W1" => w1(black_box(&mut t)),
                    "W2" => w2(black_box(&mut t)),
                    _ => w8(black_box(&mut t)),
                }
            }
            t
        }
        "W3" => {
            let pages = w3_pages();
            let mut t = A::new();
            if !setup_only {
                w3(black_box(&mut t), black_box(&pages));
            }
            t
        }
        "W4" => {
            let addrs = w4_lookups();
            let t = after_w1::<A>();
            if !setup_only {
                check = w4(black_box(&t), black_box(&addrs));
            }
            t
        }
        "W5" | "W6" | "W7" => {
            let mut t = after_w1::<A>();
            if !setup_only {
                match workload {
                    "W5" => w5(black_box(&mut t)),
                    "W6" => w6(black_box(&mut t)),
                    _ => w7(black_box(&mut t)),
                }
            }
            t
        }
        _ => return None,
    };
    let frames = table.frames_in_use();
    std::mem::forget(table);
    Some((frames, check))
}

/// Crates this build can run, in report order.
const CRATES: &[&str] = &[
    "mmu",
    "mmu-stage2",
    "mmu-48",
    "mmu-hint",
    "aarch64-paging",
    #[cfg(target_arch = "aarch64")]
    "page_table_multiarch",
];
const WORKLOADS: [&str; 8] = ["W1", "W2", "W3", "W4", "W5", "W6", "W7", "W8"];
const SPLIT_MERGE: [&str; 4] = [
    "split-mmu",
    "merge-mmu",
    "split-mmu-stage2",
    "merge-mmu-stage2",
];

/// The split/merge workloads of `mmu` alone, on regime `R`.
fn split_merge<R: BenchRegime>(merging: bool, setup_only: bool) -> (usize, u64) {
    let mut t = if merging {
        block_split::<R>()
    } else {
        block_mapped::<R>()
    };
    if !setup_only {
        if merging {
            merge(black_box(&mut t));
        } else {
            split(black_box(&mut t));
        }
    }
    let frames = t.frames_in_use();
    std::mem::forget(t);
    (frames, 0)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|a| a == "list") {
        for krate in CRATES {
            for w in WORKLOADS {
                println!("{krate} {w}");
            }
        }
        for w in SPLIT_MERGE {
            println!("mmu-splitmerge {w}");
        }
        return ExitCode::SUCCESS;
    }
    let (Some(krate), Some(workload)) = (args.first(), args.get(1)) else {
        eprintln!("usage: workload <crate> <W1..W8> [setup]");
        return ExitCode::FAILURE;
    };
    let setup_only = args.get(2).is_some_and(|a| a == "setup");
    let result = match krate.as_str() {
        "mmu" => run::<Mmu<El2>>(workload, setup_only),
        "mmu-stage2" => run::<Mmu<Stage2>>(workload, setup_only),
        "mmu-48" => run::<Mmu<El2, 48>>(workload, setup_only),
        "mmu-hint" => run::<Mmu<El2, 39, true>>(workload, setup_only),
        "mmu-splitmerge" => match workload.as_str() {
            "split-mmu" => Some(split_merge::<El2>(false, setup_only)),
            "merge-mmu" => Some(split_merge::<El2>(true, setup_only)),
            "split-mmu-stage2" => Some(split_merge::<Stage2>(false, setup_only)),
            "merge-mmu-stage2" => Some(split_merge::<Stage2>(true, setup_only)),
            _ => None,
        },
        "aarch64-paging" => run::<mmu_bench::paging::Paging>(workload, setup_only),
        #[cfg(target_arch = "aarch64")]
        "page_table_multiarch" => run::<mmu_bench::multiarch::Multiarch>(workload, setup_only),
        _ => {
            eprintln!("unknown crate {krate}");
            return ExitCode::FAILURE;
        }
    };
    match result {
        Some((frames, check)) => {
            println!("frames={frames} check={check:#x}");
            ExitCode::SUCCESS
        }
        None => {
            eprintln!("unknown workload {workload}");
            ExitCode::FAILURE
        }
    }
}
