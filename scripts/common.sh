# Shared definitions for the scripts in this folder (sourced, not run).
# shellcheck shell=bash
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT="$ROOT/out"
mkdir -p "$OUT"

# rust-objcopy from the llvm-tools component of the active toolchain.
objcopy_bin() {
    local sysroot host
    sysroot=$(rustc --print sysroot)
    host=$(rustc -vV | sed -n 's/^host: //p')
    echo "$sysroot/lib/rustlib/$host/bin/llvm-objcopy"
}

# The QEMU machine the hypervisor runs on (used by run, debug and qemu-runner):
# virt with EL2 and GICv3, semihosting for failing exit statuses, no network. The
# caller adds the console setup (-nographic, or a serial file for debugging).
# Usage: qemu_args <cpu model> <cpus> <memory> <image>; sets the array QEMU_ARGS.
qemu_args() {
    QEMU_ARGS=(
        -machine virt,virtualization=on,gic-version=3 -cpu "$1" -smp "$2" -m "$3"
        -nic none -semihosting -no-reboot -kernel "$4"
    )
}
