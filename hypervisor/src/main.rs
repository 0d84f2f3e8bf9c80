//! The twostage hypervisor binary (runs on `aarch64-unknown-none`).
//!
//! Start-up (console, device tree, heap, frames, stage 1, secondary CPUs) is in
//! `hypervisor::start`; this file wires the boot entry points to it and holds the hooks
//! where the VM code takes over: [`run_vms`] on the primary CPU and [`secondary_idle`]
//! on the others.
#![cfg_attr(target_os = "none", no_std, no_main)]
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

#[cfg(target_os = "none")]
mod bare_metal {
    use hypervisor::start::{self, Machine};

    boot::entry_points! {
        primary: primary_main,
        secondary: secondary_main,
        exception: start::el2_exception,
    }

    fn primary_main(dtb: usize) -> ! {
        let machine = start::primary(dtb);
        run_vms(&machine)
    }

    fn secondary_main(cpu: usize) -> ! {
        start::secondary(cpu);
        secondary_idle(cpu)
    }

    /// Creates the VMs from the VM description and runs this CPU's vCPU.
    fn run_vms(machine: &Machine) -> ! {
        hypervisor::vm::hw::run_vms(machine)
    }

    /// Runs this CPU's vCPU once the VMs exist.
    fn secondary_idle(cpu: usize) -> ! {
        hypervisor::vm::hw::secondary_idle(cpu)
    }

    #[panic_handler]
    fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
        start::panic(info)
    }
}

/// On a hosted target there is nothing to run: the hypervisor is a bare-metal image.
#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("the hypervisor runs on aarch64-unknown-none; use scripts/run");
    std::process::exit(2);
}
