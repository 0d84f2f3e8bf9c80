//! The twostage hypervisor binary (runs on `aarch64-unknown-none`).
//!
//! Everything it does is in `hypervisor::machine`: start-up (console, device tree, heap,
//! frames, stage 1, secondary CPUs), then the VMs. This file only wires the boot entry
//! points to it.
#![cfg_attr(target_os = "none", no_std, no_main)]
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

#[cfg(target_os = "none")]
mod bare_metal {
    use hypervisor::machine;

    boot::entry_points! {
        primary: primary_main,
        secondary: secondary_main,
        exception: machine::el2_exception,
    }

    /// Starts the machine, creates the VMs from the VM description and runs this CPU's
    /// vCPU.
    fn primary_main(dtb: usize) -> ! {
        let started = machine::primary(dtb);
        machine::run::run_vms(&started)
    }

    /// Brings this CPU online, then runs its vCPU once the VMs exist.
    fn secondary_main(cpu: usize) -> ! {
        machine::secondary(cpu);
        machine::run::secondary_idle(cpu)
    }

    #[panic_handler]
    fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
        machine::panic(info)
    }
}

/// On a hosted target there is nothing to run: the hypervisor is a bare-metal image.
#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("the hypervisor runs on aarch64-unknown-none; use scripts/run");
    std::process::exit(2);
}
