//! EL2 entry for the twostage hypervisor.
//!
//! # Image format and boot contract
//!
//! The hypervisor is an arm64 Linux `Image` (Linux `Documentation/arm64/booting.rst`): a
//! 64-byte header whose `text_offset` is `0x20_0000` and whose `image_size` covers the whole
//! image including BSS and stacks. QEMU's `-kernel` recognises the `ARM\x64` magic
//! (hw/arm/boot.c, `load_aarch64_image`), places the image at RAM base + `text_offset`
//! (`0x4020_0000` on `virt`, where the image is linked) and enters it at EL2 with the MMU
//! off and `x0` = physical address of the device tree. The entry code checks that it runs
//! where it was linked and at EL2, and otherwise stops the machine with a failing
//! semihosting exit, after printing the reason through semihosting.
//!
//! # What the binary provides
//!
//! The binary names its Rust entry points with [`entry_points!`]: the primary CPU's main
//! (gets the DTB address), the secondary CPUs' main (gets the CPU index), and the handler
//! for exceptions EL2 takes from itself.
//!
//! # Guest entry and exit
//!
//! `enter_guest` (bare-metal target only) runs a vCPU until its next exception to EL2 and
//! returns the typed [`Exit`]; see `docs/architecture.md`.
//!
//! On the host only the portable parts compile: ESR decoding ([`esr`]) and the frame types.
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]
// Syndromes (`esr`) and exit frames carry values a guest chose: no panics, no unchecked
// indexing or arithmetic, as in the hypervisor crate. Tests may unwrap.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects,
        clippy::panic
    )
)]
#![warn(missing_docs)]

pub mod esr;
mod frame;

#[cfg(all(target_arch = "aarch64", target_os = "none"))]
mod arch;

pub use frame::{ExceptionFrame, ExceptionKind, ExceptionSource, Exit, FpRegs, GuestRegs};

#[cfg(all(target_arch = "aarch64", target_os = "none"))]
pub use arch::{
    clean_dcache_range, clean_invalidate_dcache_range, clear_tags, copy_and_clean, enable_mmu,
    enter_guest, image_layout, invalidate_icache_after_write, publish_secondary_mmu,
    secondary_entry_address, semihosting_exit, semihosting_write0, set_bhb_loop, stack_range,
    zero_and_clean, zero_blocks_and_clean,
};

/// The most CPUs the hypervisor brings up (one stack each).
pub const MAX_CPUS: usize = 8;

/// Size of each CPU's EL2 stack in bytes.
pub const STACK_SIZE: usize = 64 * 1024;

/// Physical address at which the image is linked and must run (see `docs/memory-map.md`).
pub const LOAD_ADDRESS: u64 = 0x4020_0000;

/// The Image header `text_offset`: QEMU loads us at RAM base + this offset.
pub const TEXT_OFFSET: u64 = 0x20_0000;

/// QEMU exit statuses of a failed run (semihosting `SYS_EXIT`). A successful run ends
/// with PSCI `SYSTEM_OFF`, which QEMU turns into status 0.
pub mod exit_status {
    /// A Rust panic in the hypervisor.
    pub const PANIC: u32 = 1;
    /// An unexpected exception taken at EL2.
    pub const EL2_EXCEPTION: u32 = 2;
    /// The image was not loaded at the address it is linked at.
    pub const WRONG_LOAD_ADDRESS: u32 = 3;
    /// The image was not entered at EL2.
    pub const NOT_EL2: u32 = 4;
    /// Start-up failed (unusable device tree, no console, a CPU did not come online, ...).
    pub const STARTUP: u32 = 5;
    /// Every VM is done and at least one was stopped by the hypervisor (`docs/vms.md`).
    pub const VM_FAILED: u32 = 6;
}

/// EL2 translation-regime register values that turn the MMU on (same on every CPU).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct MmuConfig {
    /// `MAIR_EL2`.
    pub mair: u64,
    /// `TCR_EL2`.
    pub tcr: u64,
    /// `TTBR0_EL2`.
    pub ttbr0: u64,
    /// `SCTLR_EL2` (with M set).
    pub sctlr: u64,
}

/// Start and end addresses of the image's sections, from the linker script symbols.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageLayout {
    /// Start of the image and of `.text` (the Image header).
    pub text_start: u64,
    /// End of `.text` (page aligned) = start of `.rodata`.
    pub text_end: u64,
    /// End of `.rodata` (page aligned) = start of `.data`.
    pub rodata_end: u64,
    /// End of `.data`/`.bss` (page aligned) = start of the stacks.
    pub data_end: u64,
    /// End of the stacks and of the whole image (page aligned).
    pub image_end: u64,
}

/// Defines the symbols the assembly entry code calls, with type-checked signatures.
///
/// ```ignore
/// boot::entry_points! {
///     primary: primary_main,       // fn(dtb: usize) -> !
///     secondary: secondary_main,   // fn(cpu: usize) -> !
///     exception: el2_exception,    // fn(&mut ExceptionFrame, ExceptionSource, ExceptionKind)
/// }
/// ```
///
/// The exception handler returns to resume the interrupted code with the (possibly
/// modified) frame; for a fatal exception it does not return.
#[macro_export]
macro_rules! entry_points {
    (primary: $primary:path, secondary: $secondary:path, exception: $exception:path $(,)?) => {
        #[no_mangle]
        extern "C" fn twostage_primary_main(dtb: usize) -> ! {
            let f: fn(usize) -> ! = $primary;
            f(dtb)
        }

        #[no_mangle]
        extern "C" fn twostage_secondary_main(cpu: usize) -> ! {
            let f: fn(usize) -> ! = $secondary;
            f(cpu)
        }

        #[no_mangle]
        extern "C" fn twostage_el2_exception(frame: &mut $crate::ExceptionFrame, info: u64) {
            let f: fn(&mut $crate::ExceptionFrame, $crate::ExceptionSource, $crate::ExceptionKind) =
                $exception;
            let source = if info >> 2 == 0 {
                $crate::ExceptionSource::CurrentElSp0
            } else {
                $crate::ExceptionSource::CurrentElSpx
            };
            f(frame, source, $crate::ExceptionKind::from_raw(info))
        }
    };
}
