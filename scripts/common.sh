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
