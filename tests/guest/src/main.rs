//! The EL1 test guest (runs on `aarch64-unknown-none` under the hypervisor; its latency
//! measurement, bit 14 below, also on bare QEMU).
//!
//! Entered at EL1 with the MMU off and x0 = the `arg` of its VM description:
//! - bits \[63:12\]: the page the abort check (bit 0) reads, if nonzero (default
//!   `0x7000_0000`, an IPA the test descriptions never map);
//! - bit 0: after the other checks, read that page
//!   (the VM's abort policy decides what happens; with `inject` the guest expects a
//!   synchronous external abort and reports it);
//! - bit 1: start vCPU 1 with PSCI `CPU_ON` and check that it runs;
//! - bit 2: keep running for three more seconds before the final report;
//! - bit 3: on the first boot, reset the VM with PSCI `SYSTEM_RESET` before the final
//!   report; after the reset, check the boot count;
//! - bit 4: run the memory-sharing scenario with the other VM of the description (VM 0
//!   shares and lends pages, VM 1 retrieves them; `guest::sharing`);
//! - bit 5: split and merge a stage-2 block under load: VM 0 shares and reclaims one
//!   page 250 times while its vCPU 1 checks words on every page of the upper half of
//!   the same 2 MiB RAM block; VM 1 waits for the end (`guest::split_merge`);
//! - bit 6: the PMU check (`guest::pmu`, `docs/cpu-state.md`);
//! - bits 7 to 10: adversarial scenarios (`guest::hostile`): 7, a lifecycle race on every
//!   reset and the power-off; 8, a reset by vCPU 1 while vCPU 0 is off; 9, a hostile VM
//!   (quota, storms, bad PSCI arguments, unused SMCCC ranges, aborts); 10, a bystander
//!   that outlives it (VM 2 of the description must still share while it runs);
//! - bit 11: the interrupt checks against the virtual GIC (`guest::irq`: SPI ownership,
//!   SGIs to itself and to vCPU 1 by target list and broadcast, priorities and active
//!   state, more pending interrupts than list registers, the virtual timer waking WFI
//!   and pending while disabled);
//! - bit 12: with bit 11, listen two seconds for SGIs that must never come (sent by
//!   another VM with bit 13);
//! - bit 13: send SGIs for three seconds by broadcast and to every target (an attacker
//!   VM whose SGIs must stay inside it);
//! - bit 14: only measure interrupt latencies (`guest::latency`: virtual timer, SGIs to
//!   vCPU 1 and to itself, one distributor read), with no hypervisor call, so that the
//!   same image also runs on bare QEMU: there QEMU's ELF loader enters `out/test-guest.elf`
//!   at its ELF entry point `bare_start`, which sets this bit.
//! - bit 15: the MTE check (`guest::mte`, a CPU with FEAT_MTE2): allocation tags stored
//!   on the first boot, then `SYSTEM_RESET`; after it the tags must be 0 again.
//! - bit 16: with bit 3, a VM with 32 MiB of RAM: every 64-byte line above the first
//!   2 MiB is written before the reset and must read zero after it (`guest::big_ram`).
//!
//! It builds its own EL1&0 stage-1 tables with `mmu`, turns the MMU on, runs its checks,
//! prints one `PASS name` or `FAIL name: detail` line per check and a final
//! `DONE pass=N fail=M` through the virtual UART, then powers off with PSCI
//! `SYSTEM_OFF`.
#![cfg_attr(target_os = "none", no_std, no_main)]
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

#[cfg(target_os = "none")]
mod arg;
#[cfg(target_os = "none")]
mod guest;

/// On a hosted target there is nothing to run: the test guest is a bare-metal image.
#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("the test guest runs under the hypervisor; use scripts/test");
    std::process::exit(2);
}
