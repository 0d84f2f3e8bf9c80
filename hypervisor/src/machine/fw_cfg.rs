//! QEMU's fw-cfg device as the hypervisor drives it: a probe at start-up, then DMA reads
//! of whole files into physical memory (the encodings and the directory's checks are
//! [`crate::config::fw_cfg`]'s; QEMU `docs/specs/fw_cfg.rst`, "DMA interface").
//!
//! A transfer is one request in the hypervisor's own memory (identity-mapped: its
//! address is its physical one), written to the DMA register; QEMU carries it out before
//! the register write completes and clears the request's control word (or sets its error
//! bit). The device is used only if the device tree says `dma-coherent`, so neither the
//! request nor the bytes need cache maintenance around it (the barriers order the
//! request's stores before the register write, and the device's writes before the
//! reads after it). One transfer at a time: the selector is the device's only state. A
//! guest that starts with its MMU off reads the fetched image from memory, where a
//! coherent device's writes are.
//!
//! A transfer that does not end within the bound is given up, and the device with it:
//! it might still write the request or its destination later, so it is never used again.

use alloc::vec;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, Ordering};

use aarch64_cpu::asm::barrier;
use spin::{Mutex, Once};

use crate::config::fw_cfg::{
    dir_count, dir_len, dma_address_value, parse_dir, selector_value, DmaAccess, DmaStatus,
    FwCfgError, FwCfgFile, DATA, DMA_ADDRESS, ID_DMA, KEY_FILE_DIR, KEY_ID, KEY_SIGNATURE,
    SELECTOR, SIGNATURE,
};
use crate::config::FwCfgDevice;
use crate::mem::PhysAddr;

/// Most bytes one transfer moves. QEMU copies a transfer in one go while holding its
/// global lock, which every other vCPU's device access waits for: 2 MiB at a time, a
/// VM's reset holds another VM's CPU up for one such copy at most, not for a whole
/// 36 MB kernel and initramfs.
const DMA_CHUNK: u32 = 2 << 20;

/// Reads of a request's control word before a transfer is given up (QEMU finishes one
/// before the register write returns; this only bounds a device that never does).
const DONE_POLLS: u32 = 1 << 20;

/// The device, once [`probe`] found it usable.
static DEVICE: Once<FwCfg> = Once::new();

/// The one request in flight, under the device's lock.
static REQUEST: Mutex<DmaAccess> = Mutex::new(DmaAccess::read(0, 0, 0));

/// Set when a transfer did not end: the device is not used again.
static ABANDONED: AtomicBool = AtomicBool::new(false);

/// The physical address of the hypervisor's own memory at `p` (a static, a stack, the
/// heap): the stage 1 maps all of it at VA = PA (`crate::mem::stage1`).
fn own<T>(p: *mut T) -> PhysAddr {
    PhysAddr::new(p as u64)
}

struct FwCfg {
    base: usize,
}

/// Probes the device the device tree names: the `"QEMU"` signature and the DMA
/// interface, then its file directory. Call it once, after the stage 1 maps the device.
///
/// # Errors
/// [`FwCfgError`] when the device is not coherent, not QEMU's, has no DMA, or its
/// directory is unreadable.
pub fn probe(dev: FwCfgDevice) -> Result<Vec<FwCfgFile>, FwCfgError> {
    if !dev.dma_coherent {
        return Err(FwCfgError::NotCoherent);
    }
    let fw = FwCfg {
        base: dev.regs.base.get() as usize,
    };
    if fw.read_item::<4>(KEY_SIGNATURE) != SIGNATURE {
        return Err(FwCfgError::NoSignature);
    }
    if u32::from_le_bytes(fw.read_item::<4>(KEY_ID)) & ID_DMA == 0 {
        return Err(FwCfgError::NoDma);
    }
    let fw = DEVICE.call_once(|| fw);
    let mut head = [0u8; 4];
    fw.dma_read(KEY_FILE_DIR, own(head.as_mut_ptr()), 4)?;
    let count = dir_count(head)?;
    let mut dir = vec![0u8; dir_len(count).saturating_add(4)];
    // At most 4 + 64 * 4096 bytes (`dir_count`).
    fw.dma_read(KEY_FILE_DIR, own(dir.as_mut_ptr()), dir.len() as u32)?;
    Ok(parse_dir(dir.get(4..).unwrap_or_default()))
}

/// Reads the first `len` bytes of the file selected by `select` to physical address `pa`
/// (memory the caller owns until this returns).
///
/// # Errors
/// [`FwCfgError::Transfer`], [`FwCfgError::Timeout`] or [`FwCfgError::Abandoned`];
/// [`FwCfgError::NoDma`] before a successful [`probe`].
pub fn read(select: u16, pa: PhysAddr, len: u32) -> Result<(), FwCfgError> {
    DEVICE
        .get()
        .ok_or(FwCfgError::NoDma)?
        .dma_read(select, pa, len)
}

/// [`read`] into `buf`, the hypervisor's own memory.
///
/// # Errors
/// As [`read`]; [`FwCfgError::TooLong`] for a buffer of 4 GiB or more.
pub fn read_into(select: u16, buf: &mut [u8]) -> Result<(), FwCfgError> {
    let len = u32::try_from(buf.len()).map_err(|_| FwCfgError::TooLong)?;
    read(select, own(buf.as_mut_ptr()), len)
}

impl FwCfg {
    /// The address of the register at `offset` (inside the mapped block).
    const fn reg(&self, offset: usize) -> usize {
        self.base.wrapping_add(offset)
    }

    /// The first `N` bytes of item `key`, through the data register.
    fn read_item<const N: usize>(&self, key: u16) -> [u8; N] {
        let _lock = REQUEST.lock();
        let mut bytes = [0u8; N];
        // SAFETY: `base` is the device's register block, mapped Device-nGnRE by the stage
        // 1 (`driven_devices`); the selector takes a 16-bit write, the data register
        // byte reads that return the item's bytes in order.
        unsafe {
            (self.reg(SELECTOR) as *mut u16).write_volatile(selector_value(key));
            for b in &mut bytes {
                *b = (self.reg(DATA) as *const u8).read_volatile();
            }
        }
        bytes
    }

    /// Reads `len` bytes of item `select` from its start to `pa`, in transfers of at
    /// most [`DMA_CHUNK`] bytes (each one after the first goes on where the last ended).
    fn dma_read(&self, select: u16, pa: PhysAddr, len: u32) -> Result<(), FwCfgError> {
        let mut request = REQUEST.lock();
        let mut done = 0u32;
        loop {
            let n = len.saturating_sub(done).min(DMA_CHUNK);
            // `done` is at most `len`, so the sum stays inside the destination.
            let to = pa.saturating_add(u64::from(done)).get();
            *request = if done == 0 {
                DmaAccess::read(select, n, to)
            } else {
                DmaAccess::read_on(n, to)
            };
            self.transfer(&mut request)?;
            done = done.saturating_add(n);
            if done == len {
                return Ok(());
            }
        }
    }

    /// Hands the device `request` and waits (bounded) for it to end.
    fn transfer(&self, request: &mut DmaAccess) -> Result<(), FwCfgError> {
        if ABANDONED.load(Ordering::Acquire) {
            return Err(FwCfgError::Abandoned);
        }
        let at: *mut DmaAccess = request;
        // The request's stores reach memory before the device is told to read it.
        barrier::dsb(barrier::SY);
        // SAFETY: as in `read_item`; the DMA register takes a 64-bit write of the
        // request's physical address (identity-mapped static memory), big-endian.
        unsafe {
            (self.reg(DMA_ADDRESS) as *mut u64).write_volatile(dma_address_value(own(at).get()));
        }
        let control = DmaAccess::control_ptr(at);
        for _ in 0..DONE_POLLS {
            // SAFETY: `control` points into the request the caller's lock guards; the
            // device writes it, hence the volatile read.
            let status = DmaAccess::status(unsafe { control.read_volatile() });
            match status {
                DmaStatus::Busy => core::hint::spin_loop(),
                DmaStatus::Done => {
                    // The device's writes are seen by the reads that follow.
                    barrier::dsb(barrier::SY);
                    return Ok(());
                }
                DmaStatus::Failed => return Err(FwCfgError::Transfer),
            }
        }
        ABANDONED.store(true, Ordering::Release);
        Err(FwCfgError::Timeout)
    }
}
