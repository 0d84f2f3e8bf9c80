//! Guest RAM as the machine writes it: scrubbing it and copying images into it through
//! the guest RAM window ([`super::with_guest_ram`]; the hypervisor's stage 1 does not
//! map it otherwise), with the bulk of the work shared with parked CPUs.
//!
//! Creating a VM scrubs the RAM around its images (all of its RAM for a VM with
//! pass-through MMIO; otherwise the images' 2 MiB chunks, the rest on first touch,
//! [`crate::vm::ram`]), and resetting one does again. A CPU whose vCPU is off, or that
//! has none, is parked through the firmware with nothing to do; the CPU that scrubs wakes
//! the parked CPUs that may help and they take 2 MiB chunks of the work in turn
//! ([`crate::mem::bulk`]), each through its own window slot. Which CPUs may help is
//! decided by [`super::run::helpers_for`]: while the VMs are being created, any; once
//! they run, only CPUs that no VM uses and the CPUs of the VM whose RAM it is, so one
//! VM's reset never takes a CPU of another VM. A helper leaves between two chunks as
//! soon as its own vCPU has a start pending, and parks again when nothing is left.
//! Nothing depends on a helper arriving: the CPU that opened the work does whatever is
//! left.

use super::cpu::{cpu_index, wake};
use super::{scrubs_tags, with_guest_ram};
use crate::config::fw_cfg::FwCfgError;
use crate::config::ImageSource;
use crate::mem::bulk::{cpu_bit, BulkJob, Piece};
use crate::mem::window::Access;
use crate::mem::PhysAddr;
use crate::vm::GuestMemory;

/// Below this, a bulk write is not worth waking CPUs for: one CPU does it alone.
const SHARE_FROM: u64 = 16 << 20;

/// What a bulk write puts in guest RAM.
#[derive(Clone, Copy, Debug)]
enum Fill {
    /// Zeros, written outright (`DC ZVA`): a scrub of RAM about to be used.
    Zero,
    /// Zeros, written only where a block is not zero already: a scrub of much RAM that
    /// may never have been written since power-on (see [`MachineMemory::zero`]).
    ZeroChecked,
    /// The bytes at `src` onwards (an image from the staging range).
    Copy { src: PhysAddr },
}

/// The one bulk write that parked CPUs may help with.
static BULK: BulkJob<Fill> = BulkJob::new();

/// Whether the open bulk write has pieces left for CPU `cpu`.
pub fn has_work(cpu: usize) -> bool {
    BULK.has_pieces_for(cpu)
}

/// CPU `cpu` takes part in the open bulk write, if it is one of its helpers, until
/// nothing is left for it or `keep_going` (asked before each piece) says stop.
pub fn help(cpu: usize, keep_going: impl Fn() -> bool) {
    BULK.help(cpu, keep_going, write);
}

/// Writes one piece, through this CPU's window slot.
fn write(piece: Piece<Fill>) {
    match piece.fill {
        Fill::Zero | Fill::ZeroChecked => {
            let zero: unsafe fn(u64, u64) = if matches!(piece.fill, Fill::Zero) {
                boot::zero_blocks_and_clean
            } else {
                boot::zero_and_clean
            };
            MachineMemory::write_chunks(piece.pa, piece.len, |va, n, _| {
                // SAFETY: the manager only passes guest RAM it has claimed (checked
                // against its pool of guest RAM, and again by the window), which no vCPU
                // can reach at the time (`GuestMemory`); the window maps the chunk
                // writable, as Normal memory, at `va` until this returns.
                unsafe { zero(va, n) };
            });
        }
        Fill::Copy { src } => {
            let src = src.saturating_add(piece.offset);
            MachineMemory::write_chunks(piece.pa, piece.len, |va, n, from| {
                // SAFETY: `src` is in the staging range, which the stage 1 maps
                // ("staging"), and the piece in the VM's RAM (checked by the manager),
                // mapped writable at `va` by the window until this returns; guest RAM and
                // staging do not overlap, and `[src + from, + n)` lies in the staged
                // image.
                unsafe { boot::copy_and_clean(va, src.get().saturating_add(from), n) };
            });
        }
    }
}

/// Writes `[dst, dst + len)` as `fill` says: with the parked CPUs' help if it is large.
fn bulk(fill: Fill, dst: PhysAddr, len: u64) {
    let piece = Piece {
        fill,
        pa: dst,
        len,
        offset: 0,
    };
    if len < SHARE_FROM {
        return write(piece);
    }
    let helpers = super::run::helpers_for(dst);
    let wake_parked = || {
        // `wake` does nothing for a CPU that is not parked (this one, CPU 0, a CPU
        // running a vCPU); a parked one comes back through the secondary entry and
        // finds the work (`super::run::secondary_idle`).
        for cpu in (0..boot::MAX_CPUS).filter(|&cpu| helpers & cpu_bit(cpu) != 0) {
            wake(cpu);
        }
    };
    BULK.run(cpu_index(), fill, (dst, len), helpers, wake_parked, write);
}

/// Guest RAM as the VM manager writes it (see the module documentation).
pub(super) struct MachineMemory;

impl MachineMemory {
    /// Runs `write(va, n, from)` over `[pa, pa + len)` of guest RAM, a window chunk at a
    /// time mapped writable (`from`: the chunk's offset in the range), then clears the
    /// chunk's allocation tags where the CPU has MTE: the scrub and the image copy leave
    /// no tag of a VM behind.
    fn write_chunks(pa: PhysAddr, len: u64, mut write: impl FnMut(u64, u64, u64)) {
        let tags = scrubs_tags();
        let access = if tags {
            Access::ReadWriteTagged
        } else {
            Access::ReadWrite
        };
        let mut from = 0u64;
        with_guest_ram(pa.get(), len, access, |va, n| {
            write(va, n, from);
            if tags {
                // SAFETY: the window maps the chunk Tagged and writable at `va` until this
                // returns, and EL2 may store tags (`scrubs_tags`: FEAT_MTE2,
                // SCTLR_EL2.ATA, MAIR attribute 4 = 0xF0).
                unsafe { boot::clear_tags(va, n) };
            }
            // The chunks lie inside `[pa, pa + len)`: no step passes `len`.
            from = from.saturating_add(n);
        });
    }
}

/// After a scrub or an image copy (every piece done, helpers' included), no CPU's
/// instruction cache may hold what that RAM held before: a guest jumping into scrubbed RAM
/// must not run an earlier user's code from the cache.
impl GuestMemory for MachineMemory {
    /// A scrub below [`SHARE_FROM`] (a chunk on first touch, the gaps around a VM's
    /// images, a chunk a sharing call hands over) is of RAM about to be written: zeroed
    /// outright. A larger one (all of a VM's RAM at start) checks each block first: under
    /// QEMU, RAM nobody wrote since power-on reads as zero without the host allocating
    /// it, and a check writes (and makes QEMU allocate) none of it.
    fn zero(&self, pa: PhysAddr, len: u64) {
        let fill = if len < SHARE_FROM {
            Fill::Zero
        } else {
            Fill::ZeroChecked
        };
        bulk(fill, pa, len);
        boot::invalidate_icache_after_write();
    }

    /// A staged image is copied (with the parked CPUs' help if it is large). A file of
    /// fw-cfg is written by the device straight into the VM's RAM (the allocation tags
    /// cleared first: a DMA write leaves them as they were).
    fn load(&self, dst: PhysAddr, src: ImageSource, len: u64) -> Result<(), FwCfgError> {
        let result = match src {
            ImageSource::Staged(src) => {
                bulk(Fill::Copy { src }, dst, len);
                Ok(())
            }
            ImageSource::FwCfg(select) => {
                // The device writes wherever it is told: the same check as the window's
                // for the CPUs' own writes (guest RAM only, or the machine stops).
                super::check_guest_ram(dst.get(), len);
                if super::scrubs_tags() {
                    MachineMemory::write_chunks(dst, len, |_, _, _| {});
                }
                // A file's size is 32 bits (`config::fw_cfg`): `len` came from one.
                let len = u32::try_from(len).map_err(|_| FwCfgError::TooLong)?;
                super::fw_cfg::read(select, dst, len)
            }
        };
        boot::invalidate_icache_after_write();
        result
    }

    fn clean_to_poc(&self, va: u64, len: u64) {
        // `[va, va + len)` is the hypervisor's own memory (a register page on its heap),
        // mapped at EL2.
        boot::clean_dcache_range(va, len);
    }
}
