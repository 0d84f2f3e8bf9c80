//! The large-RAM reset check (`arg` bit 16, with bit 3): a reset scrubs all of a VM's
//! RAM, however many CPUs the hypervisor spreads the scrub over.
//!
//! The VM has [`SIZE`] of RAM, not the usual 2 MiB; the RAM above the first 2 MiB (what
//! the rest of the guest uses) is seen through an alias at [`ALIAS`], mapped by
//! `build_tables`. On the first boot the guest writes a nonzero word into every 64-byte
//! line of it (so each of the hypervisor's 2 MiB scrub pieces is dirty) before the reset
//! check resets the VM; on the second boot every one of those words must read zero.

use core::fmt::Write;

use super::{check, hvc, Uart, RAM, VM_BOOTS};

/// The VM's RAM with this check (the description's `memory` must say as much).
pub const SIZE: u64 = 32 << 20;
/// Where `build_tables` maps the RAM above the first 2 MiB: free VA, away from the
/// aliases other checks map just above the first 2 MiB.
pub const ALIAS: u64 = 0x1_0000_0000 + RAM.0 + RAM.1;
/// Bytes behind [`ALIAS`].
pub const ALIAS_SIZE: u64 = SIZE - RAM.1;
/// One word written per this many bytes.
const STRIDE: u64 = 64;

/// The word written at offset `off` of the alias: never zero.
fn pattern(off: u64) -> u64 {
    off.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1
}

/// First boot: dirties the RAM above the first 2 MiB. Second boot: checks it is zero.
pub fn big_ram_check() {
    let boots = hvc(VM_BOOTS, &[]);
    let first = boots[1] == 1;
    let mut nonzero = 0u64;
    let mut first_nonzero = 0;
    for off in (0..ALIAS_SIZE).step_by(STRIDE as usize) {
        let p = (ALIAS + off) as *mut u64;
        if first {
            // SAFETY: the alias maps RAM of this VM that nothing else uses.
            unsafe { p.write_volatile(pattern(off)) };
        } else {
            // SAFETY: as above.
            if unsafe { p.read_volatile() } != 0 {
                if nonzero == 0 {
                    first_nonzero = RAM.0 + RAM.1 + off;
                }
                nonzero += 1;
            }
        }
    }
    if first {
        println!(
            "big-ram: {} MiB above the first 2 MiB dirtied",
            ALIAS_SIZE >> 20
        );
    } else {
        check(
            "big-ram-scrubbed",
            nonzero == 0,
            format_args!(
                "{nonzero} nonzero lines after the reset, the first at IPA {first_nonzero:#x}"
            ),
        );
    }
}
