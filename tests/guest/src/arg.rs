//! The bits of the test guest's `arg` (x0 at entry; `main.rs` says what each does).
//! One definition for the guest and for the QEMU tests and benchmarks that set them
//! (`xtask/src/lib.rs` includes this file as `xtask::guest_arg`; the QEMU tests use that).

/// After the other checks, read the probe page (`arg[63:12]`).
pub const ARG_ABORT: u64 = 1 << 0;
/// Start vCPU 1 with PSCI `CPU_ON`.
pub const ARG_SECOND_VCPU: u64 = 1 << 1;
/// Keep running three more seconds before the final report.
pub const ARG_LINGER: u64 = 1 << 2;
/// Reset the VM once with PSCI `SYSTEM_RESET`.
pub const ARG_RESET: u64 = 1 << 3;
/// The memory-sharing scenario (`guest::sharing`).
pub const ARG_SHARING: u64 = 1 << 4;
/// Split and merge a stage-2 block under load (`guest::split_merge`).
pub const ARG_SPLIT_MERGE: u64 = 1 << 5;
/// The PMU check (`guest::pmu`).
pub const ARG_PMU: u64 = 1 << 6;
/// A lifecycle race on every reset and the power-off (`guest::hostile`).
pub const ARG_RACE: u64 = 1 << 7;
/// A reset by vCPU 1 while vCPU 0 is off (`guest::hostile`).
pub const ARG_OFF_RESET: u64 = 1 << 8;
/// A hostile VM (`guest::hostile`).
pub const ARG_HOSTILE: u64 = 1 << 9;
/// A bystander that outlives the hostile VM (`guest::hostile`).
pub const ARG_BYSTANDER: u64 = 1 << 10;
/// The interrupt checks against the virtual GIC (`guest::irq`).
pub const ARG_IRQ: u64 = 1 << 11;
/// With [`ARG_IRQ`], listen for SGIs that must never come.
pub const ARG_IRQ_LISTEN: u64 = 1 << 12;
/// Send SGIs for three seconds to every target.
pub const ARG_SGI_ATTACK: u64 = 1 << 13;
/// Only the interrupt-latency measurement (`guest::latency`), which also runs on bare
/// QEMU; the ELF entry point `bare_start` sets it.
pub const ARG_LATENCY: u64 = 1 << 14;
/// The MTE check: tags stored before a reset are gone after it (`guest::mte`).
pub const ARG_MTE: u64 = 1 << 15;
/// With [`ARG_RESET`], a VM of 32 MiB whose whole RAM must be scrubbed by the reset
/// (`guest::big_ram`).
pub const ARG_BIG_RAM: u64 = 1 << 16;
