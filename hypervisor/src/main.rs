//! The twostage hypervisor binary (runs on `aarch64-unknown-none`).
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {
        core::hint::spin_loop();
    }
}

/// On a hosted target there is nothing to run: the hypervisor is a bare-metal image.
#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("the hypervisor runs on aarch64-unknown-none; use scripts/run");
    std::process::exit(2);
}
