# QEMU arguments that boot a Linux kernel as the hypervisor's guest (sourced by
# scripts/run and scripts/bench-linux, after common.sh). docs/linux-guest.md explains the
# layout; docs/vms.md the VM node written here.
# shellcheck shell=bash

# Guest RAM (identity-mapped, IPA = PA) and the image staging range: docs/memory-map.md.
LINUX_RAM_BASE=$((0x50000000))
LINUX_RAM_MAX=$((0x20000000))
LINUX_STAGING=$((0x70000000))
LINUX_STAGING_SIZE=$((0x10000000))
# Machine RAM: from 0x4000_0000 to past the staging range.
LINUX_MACHINE_MIB=2048
# QEMU machine (as common.sh's qemu_args) and CPU the Linux guest runs on; the bare runs
# of scripts/bench-linux use the same.
LINUX_MACHINE="virt,virtualization=on,gic-version=3"
LINUX_CPU=${LINUX_CPU:-cortex-a57}
# Host devices the guest gets, by host DT path: console UART and the GIC (the generic
# timer comes with every CPU).
LINUX_DEVICES='"/pl011@9000000", "/intc@8000000"'
LINUX_BOOTARGS="console=ttyAMA0"
# How the VM's stage 2 maps its RAM (docs/vms.md, `stage2-mappings`): 4 KiB pages, because
# under QEMU's TCG a stage-2 block turns each of the guest's TLB invalidations by address
# into a flush of QEMU's whole TLB (docs/linux-guest.md has the numbers).
LINUX_STAGE2=${LINUX_STAGE2:-pages}

# "256M", "1G", "512K" or plain bytes -> bytes.
size_bytes() {
    local s=${1^^}
    case $s in
    *K) echo $((${s%K} << 10)) ;;
    *M) echo $((${s%M} << 20)) ;;
    *G) echo $((${s%G} << 30)) ;;
    *[!0-9]*) echo "bad size: $1" >&2; return 1 ;;
    *) echo $((s)) ;;
    esac
}

# Little-endian u64 at byte offset $2 of file $1.
le64() {
    od -A n -t u8 -j "$2" -N 8 "$1" | tr -d ' '
}

# The load offset from the 2 MiB aligned RAM base the hypervisor will choose for this
# kernel (hypervisor/src/linux/image.rs is the rule; the hypervisor checks kernel-ipa
# against it and refuses a mismatch).
kernel_load_offset() {
    local magic
    magic=$(od -A n -t x4 -j 56 -N 4 "$1" | tr -d ' ')
    if [ "$magic" = 644d5241 ] && [ "$(le64 "$1" 16)" != 0 ]; then
        le64 "$1" 8
    else
        echo $((0x80000))
    fi
}

# linux_guest_args KERNEL INITRD|"" APPEND CPUS MEM
# Writes the host DTB with the VM node into $OUT/linux-host.dtb and sets the array
# QEMU_ARGS to everything after `qemu-system-aarch64` but the console options.
linux_guest_args() {
    local kernel=$1 initrd=$2 append=$3 cpus=$4 mem mib2=$((2 << 20))
    mem=$(size_bytes "$5")
    if [ "$mem" -lt $((16 << 20)) ] || [ $((mem % mib2)) -ne 0 ]; then
        echo "linux-guest: --mem must be a multiple of 2 MiB, at least 16 MiB" >&2
        return 1
    fi
    if [ "$mem" -gt $((LINUX_RAM_MAX)) ]; then
        echo "linux-guest: --mem is at most $((LINUX_RAM_MAX >> 20))M (docs/memory-map.md)" >&2
        return 1
    fi
    local ram_end=$((LINUX_RAM_BASE + mem))
    local kipa=$((LINUX_RAM_BASE + $(kernel_load_offset "$kernel")))
    local ksize
    ksize=$(stat -c %s "$kernel")
    # QEMU's loader stages the images in the staging range; the hypervisor copies them into
    # the guest (and stages the guest DTB it builds right after them).
    local kstage=$LINUX_STAGING
    local next=$(((kstage + ksize + mib2 - 1) / mib2 * mib2))
    local initrd_props=""
    local loaders=(-device "loader,file=$kernel,addr=$kstage,force-raw=on")
    if [ -n "$initrd" ]; then
        local isize iipa
        isize=$(stat -c %s "$initrd")
        # Just below the DTB area (the top 2 MiB of RAM), 2 MiB aligned.
        iipa=$((ram_end - mib2 - (isize + mib2 - 1) / mib2 * mib2))
        initrd_props=$(printf 'initrd = /bits/ 64 <0x%x 0x%x>;\n initrd-ipa = /bits/ 64 <0x%x>;' \
            "$next" "$isize" "$iipa")
        loaders+=(-device "loader,file=$initrd,addr=$next,force-raw=on")
        next=$(((next + isize + mib2 - 1) / mib2 * mib2))
    fi
    if [ "$next" -gt $((LINUX_STAGING + LINUX_STAGING_SIZE - mib2)) ]; then
        echo "linux-guest: kernel and initrd do not fit the staging range" >&2
        return 1
    fi
    local machine_mib=$LINUX_MACHINE_MIB
    local cpu_list="" i
    for ((i = 0; i < cpus; i++)); do cpu_list+=" $i"; done

    # The VM node (docs/vms.md), merged into QEMU's own DTB of this machine by mkdtb.
    local frag="$OUT/linux-vm.dts"
    cat >"$frag" <<EOF
/ {
    chosen {
        linux-vm {
            compatible = "twostage,vm";
            vm-name = "linux";
            cpus = <$cpu_list>;
            memory = /bits/ 64 <$LINUX_RAM_BASE $LINUX_RAM_BASE $mem>;
            passthrough-devices = $LINUX_DEVICES;
            kernel = /bits/ 64 <$kstage $ksize>;
            kernel-ipa = /bits/ 64 <$kipa>;
            $initrd_props
            bootargs = "$append";
            abort-policy = "stop";
            stage2-mappings = "$LINUX_STAGE2";
        };
    };
};
EOF
    qemu_args "$LINUX_CPU" "$cpus" "${machine_mib}M" "$OUT/hypervisor.bin"
    "$ROOT/scripts/mkdtb" "$OUT/linux-host.dtb" "$frag" -- "${QEMU_ARGS[@]}"
    QEMU_ARGS+=(-dtb "$OUT/linux-host.dtb" "${loaders[@]}")
}

# bare_linux_args KERNEL INITRD APPEND CPUS MEM: the same kernel straight on QEMU (no
# hypervisor), with the same machine, CPU count and RAM size.
bare_linux_args() {
    QEMU_ARGS=(-M "$LINUX_MACHINE" -cpu "$LINUX_CPU" -smp "$4" -m "$5" -nic none
        -kernel "$1" -append "$3")
    if [ -n "$2" ]; then QEMU_ARGS+=(-initrd "$2"); fi
}
