//! The MTE check (`arg` bit 15, on a CPU with FEAT_MTE2): allocation tags a VM leaves in
//! its RAM do not survive the scrub and reload of a reset.
//!
//! Two granules are seen through a Tagged alias ([`ALIAS`], mapped by `build_tables`):
//! one in the page the image is copied to, one in RAM the scrub zeroes. On the first boot
//! the guest finds their tags 0, stores tag [`TAG`] in both, reads it back and resets
//! the VM with PSCI `SYSTEM_RESET`; on the second boot both tags must read 0 again.

use core::arch::asm;

use core::fmt::Write;

use super::{check, hvc, Uart, PSCI_SYSTEM_RESET, RAM, VM_BOOTS};

/// Where `build_tables` maps the Tagged alias of two RAM pages: free VA (its own 2 MiB,
/// past the `tlb-unmap` pages).
pub const ALIAS: u64 = 0x4060_0000;
/// The RAM pages behind [`ALIAS`] and [`ALIAS`] + 4 KiB: the first page of the image,
/// and a page of the RAM above `memory_check`'s pattern that the scrub zeroes.
pub const PAGES: [u64; 2] = [RAM.0, RAM.0 + 0x15_0000];
/// The tag stored on the first boot.
const TAG: u64 = 0xa;

/// The granules checked: one in each aliased page, not at a page's start.
const GRANULES: [u64; 2] = [ALIAS + 0x40, ALIAS + 0x1000 + 0x7f0];

/// `ID_AA64PFR1_EL1.MTE` >= 2: allocation tags in memory (FEAT_MTE2).
pub fn has_mte2() -> bool {
    let pfr1: u64;
    // SAFETY: reading an ID register has no side effects.
    unsafe { asm!("mrs {}, S3_0_C0_C4_1", out(reg) pfr1, options(nomem, nostack)) };
    (pfr1 >> 8) & 0xf >= 2
}

/// The allocation tag of the granule at `va` (`LDG`).
///
/// # Safety
///
/// FEAT_MTE2, `SCTLR_EL1.ATA` set, `va` mapped Tagged.
#[target_feature(enable = "mte")]
unsafe fn load_tag(va: u64) -> u64 {
    let mut t = va;
    // SAFETY: the caller's contract; LDG only reads a tag into bits [59:56].
    unsafe { asm!("ldg {t}, [{a}]", t = inout(reg) t, a = in(reg) va, options(nostack, readonly)) };
    (t >> 56) & 0xf
}

/// Stores allocation tag `tag` for the granule at `va` (`STG`; the data is unchanged).
///
/// # Safety
///
/// As [`load_tag`]; nothing else uses the granule's tag.
#[target_feature(enable = "mte")]
unsafe fn store_tag(va: u64, tag: u64) {
    // SAFETY: the caller's contract; STG writes the tag in bits [59:56] of its source.
    unsafe {
        asm!("stg {t}, [{a}]", t = in(reg) va | (tag << 56), a = in(reg) va, options(nostack))
    };
}

fn tags() -> [u64; 2] {
    // SAFETY: `mte_check` runs only with FEAT_MTE2 and the alias mapped Tagged with
    // SCTLR_EL1.ATA set (`build_tables`, `mmu_on`).
    GRANULES.map(|g| unsafe { load_tag(g) })
}

/// The check, on each boot.
pub fn mte_check() {
    if !has_mte2() {
        check("mte-present", false, format_args!("no FEAT_MTE2"));
        return;
    }
    let boots = hvc(VM_BOOTS, &[])[1];
    if boots == 1 {
        let before = tags();
        for g in GRANULES {
            // SAFETY: as in `tags`.
            unsafe { store_tag(g, TAG) };
        }
        let after = tags();
        check(
            "mte-tags-set",
            before == [0, 0] && after == [TAG, TAG],
            format_args!("tags {before:x?} before, {after:x?} after STG"),
        );
        println!("resetting");
        hvc(PSCI_SYSTEM_RESET, &[]);
        println!("FAIL system-reset returned");
        return;
    }
    let now = tags();
    check(
        "mte-tags-scrubbed",
        now == [0, 0],
        format_args!("tags {now:x?} after the reset (boot {boots})"),
    );
}
