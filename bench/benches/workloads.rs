//! W1-W8 for every crate, same inputs, one criterion group per workload; the benchmark id
//! is `<crate>/<arch>` so native and `qemu-aarch64` runs sit side by side in one
//! `target/criterion` tree. Only the workload itself is timed: building the starting table
//! (e.g. W1 before W5) happens in criterion's untimed setup, and tables are dropped outside
//! the timed routine.

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};
use mmu::{El2, Stage2};
use mmu_bench::mmu::{block_mapped, block_split, merge, split, BenchRegime, Mmu};
use mmu_bench::workload::{after_w1, w1, w2, w3, w3_pages, w4, w4_lookups, w5, w6, w7, w8};
use mmu_bench::Adapter;

fn id<A: Adapter>() -> BenchmarkId {
    BenchmarkId::new(A::NAME, std::env::consts::ARCH)
}

fn workloads<A: Adapter>(c: &mut Criterion) {
    let pages = w3_pages();
    let addrs = w4_lookups();

    c.benchmark_group("W1").bench_function(id::<A>(), |b| {
        b.iter_batched(
            A::new,
            |mut t| {
                w1(&mut t);
                t
            },
            BatchSize::PerIteration,
        );
    });
    c.benchmark_group("W2").bench_function(id::<A>(), |b| {
        b.iter_batched(
            A::new,
            |mut t| {
                w2(&mut t);
                t
            },
            BatchSize::PerIteration,
        );
    });
    c.benchmark_group("W3").bench_function(id::<A>(), |b| {
        b.iter_batched(
            A::new,
            |mut t| {
                w3(&mut t, black_box(&pages));
                t
            },
            BatchSize::PerIteration,
        );
    });
    let table = after_w1::<A>();
    c.benchmark_group("W4").bench_function(id::<A>(), |b| {
        b.iter(|| w4(&table, black_box(&addrs)));
    });
    drop(table);
    c.benchmark_group("W5").bench_function(id::<A>(), |b| {
        b.iter_batched(
            after_w1::<A>,
            |mut t| {
                w5(&mut t);
                t
            },
            BatchSize::PerIteration,
        );
    });
    c.benchmark_group("W6").bench_function(id::<A>(), |b| {
        b.iter_batched(
            after_w1::<A>,
            |mut t| {
                w6(&mut t);
                t
            },
            BatchSize::PerIteration,
        );
    });
    c.benchmark_group("W7").bench_function(id::<A>(), |b| {
        b.iter_batched(
            after_w1::<A>,
            |mut t| {
                w7(&mut t);
                t
            },
            BatchSize::PerIteration,
        );
    });
    c.benchmark_group("W8").bench_function(id::<A>(), |b| {
        b.iter_batched(
            A::new,
            |mut t| {
                w8(&mut t);
                t
            },
            BatchSize::PerIteration,
        );
    });
}

fn split_merge<R: BenchRegime>(c: &mut Criterion) {
    let id = BenchmarkId::new("mmu-splitmerge", std::env::consts::ARCH);
    c.benchmark_group(format!("split-{}", R::BENCH_NAME))
        .bench_function(id.clone(), |b| {
            b.iter_batched(
                block_mapped::<R>,
                |mut t| {
                    split(&mut t);
                    t
                },
                BatchSize::PerIteration,
            );
        });
    c.benchmark_group(format!("merge-{}", R::BENCH_NAME))
        .bench_function(id, |b| {
            b.iter_batched(
                block_split::<R>,
                |mut t| {
                    merge(&mut t);
                    t
                },
                BatchSize::PerIteration,
            );
        });
}

fn all(c: &mut Criterion) {
    workloads::<Mmu<El2>>(c);
    workloads::<Mmu<Stage2>>(c);
    workloads::<Mmu<El2, 48>>(c);
    workloads::<Mmu<El2, 39, true>>(c);
    split_merge::<El2>(c);
    split_merge::<Stage2>(c);
    workloads::<mmu_bench::paging::Paging>(c);
    #[cfg(target_arch = "aarch64")]
    workloads::<mmu_bench::multiarch::Multiarch>(c);
}

fn config() -> Criterion {
    // Every iteration is milliseconds (seconds under qemu-user): few samples, short warm-up.
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = all
}
criterion_main!(benches);
