//! The EL1 test guest (runs on `aarch64-unknown-none`).
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {
        core::hint::spin_loop();
    }
}

/// On a hosted target there is nothing to run: the test guest is a bare-metal image.
#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!("the test guest runs under the hypervisor; use scripts/test");
    std::process::exit(2);
}
