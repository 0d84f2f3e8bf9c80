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

# median N...: the median of the numbers given (the mean of the middle two for an even
# count).
median() {
    printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 }
        END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# write_bench_section KEY TEXT: replaces the section of docs/BENCHMARKS.md between the
# lines "<!-- KEY: written by ..." and "<!-- KEY: end -->" with TEXT (which carries both
# marker lines), or appends TEXT when there is no such section yet.
write_bench_section() {
    local key=$1 section=$2 doc="$ROOT/docs/BENCHMARKS.md"
    [ -f "$doc" ] || printf '# Benchmarks\n' >"$doc"
    if grep -q "^<!-- $key: written" "$doc"; then
        awk -v new="$section" -v begin="^<!-- $key: written" -v end="^<!-- $key: end -->" '
            $0 ~ begin { print new; skip = 1; next }
            $0 ~ end { skip = 0; next }
            !skip' "$doc" >"$doc.tmp"
        mv "$doc.tmp" "$doc"
    else
        printf '\n%s\n' "$section" >>"$doc"
    fi
}
