//! Where the hypervisor's own memory lies: the image, then the heap, then the pool of
//! page-table frames, all below [`HYP_RAM_END`] (see `docs/memory-map.md`).

use core::fmt;

use crate::mem::{PhysAddr, PhysRange, PAGE_SIZE};

/// End of the RAM the hypervisor keeps for itself (`docs/memory-map.md`); guest memory
/// lies above.
pub const HYP_RAM_END: PhysAddr = PhysAddr::new(0x4800_0000);

/// Where the scripts start placing guest RAM: the first 2 MiB boundary clear of the
/// hypervisor's RAM and of the DTB QEMU puts at [`HYP_RAM_END`] (`docs/memory-map.md`).
/// The hypervisor itself takes guest RAM from every RAM bank ([`guest_ram`]).
pub const GUEST_RAM_BASE: PhysAddr = PhysAddr::new(0x5000_0000);

/// Host physical range where QEMU's `-device loader` stages guest images
/// (`docs/memory-map.md`); never mapped into a guest.
pub const STAGING: PhysRange = PhysRange::new(PhysAddr::new(0x7000_0000), 0x1000_0000);

/// Bytes of heap (`buddy_system_allocator`), placed right after the image.
pub const HEAP_SIZE: u64 = 16 << 20;

/// The hypervisor's own physical memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HypMemory {
    /// The loaded image, including BSS and stacks.
    pub image: PhysRange,
    /// The heap.
    pub heap: PhysRange,
    /// The page-table frame pool.
    pub frames: PhysRange,
}

/// Why the hypervisor's memory cannot be laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayoutError {
    /// The image does not lie in RAM described by the device tree.
    ImageNotInRam,
    /// The image, heap and at least one frame do not fit below [`HYP_RAM_END`] (or below
    /// the device tree, if QEMU placed it lower).
    TooSmall,
}

impl core::error::Error for LayoutError {}

impl fmt::Display for LayoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ImageNotInRam => f.write_str("the image is not inside RAM"),
            Self::TooSmall => f.write_str("no room for the heap and page-table frames"),
        }
    }
}

/// `x` rounded up to a page; `None` in the last page below 2^64, which has no page
/// boundary above it.
const fn align_up(x: PhysAddr) -> Option<PhysAddr> {
    x.checked_align_up(PAGE_SIZE)
}

const fn align_down(x: PhysAddr) -> PhysAddr {
    x.align_down(PAGE_SIZE)
}

/// Lays out heap and frame pool after the image.
///
/// The pool ends at [`HYP_RAM_END`], at the end of the RAM region holding the image, or
/// at the device tree if it lies in between, whichever comes first.
///
/// # Errors
///
/// [`LayoutError`] if the image is outside `ram` or the space is too small.
pub fn plan(image: PhysRange, ram: &[PhysRange], dtb: PhysRange) -> Result<HypMemory, LayoutError> {
    let bank = ram
        .iter()
        .find(|r| r.contains(&image))
        .ok_or(LayoutError::ImageNotInRam)?;
    let heap_base = align_up(image.end()).ok_or(LayoutError::TooSmall)?;
    let frames_base = heap_base
        .checked_add(HEAP_SIZE)
        .ok_or(LayoutError::TooSmall)?;
    let mut limit = HYP_RAM_END.min(bank.end());
    if dtb.base >= image.end() && dtb.base < limit {
        limit = dtb.base;
    }
    // At least one frame between `frames_base` and the limit.
    let frames_size = align_down(limit)
        .checked_offset_from(frames_base)
        .filter(|&size| size >= PAGE_SIZE)
        .ok_or(LayoutError::TooSmall)?;
    Ok(HypMemory {
        image,
        heap: PhysRange::new(heap_base, HEAP_SIZE),
        frames: PhysRange::new(frames_base, frames_size),
    })
}

/// The hypervisor's own RAM as [`guest_ram`] and [`staging_ram`] leave it out: from the
/// start of the bank holding its image up to [`HYP_RAM_END`] (or the end of its frame
/// pool, if later).
fn own_ram(ram: &[PhysRange], hyp: &HypMemory) -> (PhysAddr, PhysAddr) {
    let own_start = ram
        .iter()
        .find(|r| r.contains(&hyp.image))
        .map_or(hyp.image.base, |r| r.base);
    (own_start, HYP_RAM_END.max(hyp.frames.end()))
}

/// The pages the device tree `dtb` occupies; one in the last page below 2^64 keeps
/// everything above its start.
fn dtb_hole(dtb: PhysRange) -> (PhysAddr, PhysAddr) {
    (
        align_down(dtb.base),
        align_up(dtb.end()).unwrap_or(PhysAddr::new(u64::MAX)),
    )
}

/// The page-aligned parts of `ranges` (`(start, end)` pairs) outside every one of
/// `holes`, as ranges sorted by address.
fn less(
    ranges: &[(PhysAddr, PhysAddr)],
    holes: &[(PhysAddr, PhysAddr)],
) -> alloc::vec::Vec<PhysRange> {
    let mut out = alloc::vec::Vec::new();
    for &(start, end) in ranges {
        // A range starting in the last page below 2^64 holds no whole page.
        let Some(start) = align_up(start) else {
            continue;
        };
        let mut pieces = alloc::vec![(start, align_down(end))];
        for &(hs, he) in holes {
            let mut next = alloc::vec::Vec::new();
            for (s, e) in pieces {
                if he <= s || hs >= e {
                    next.push((s, e));
                    continue;
                }
                if hs > s {
                    next.push((s, hs));
                }
                if he < e {
                    next.push((he, e));
                }
            }
            pieces = next;
        }
        out.extend(
            pieces
                .into_iter()
                .filter_map(|(s, e)| Some(PhysRange::new(s, e.checked_offset_from(s)?)))
                .filter(|r| r.size > 0),
        );
    }
    out.sort_by_key(|r| r.base);
    out
}

/// The host RAM guests may have: every bank of `ram` less the hypervisor's own (from the
/// start of the bank holding its image up to [`HYP_RAM_END`]), the device tree `dtb`
/// and the [`STAGING`] range, in page-aligned ranges sorted by address.
#[must_use]
pub fn guest_ram(ram: &[PhysRange], hyp: &HypMemory, dtb: PhysRange) -> alloc::vec::Vec<PhysRange> {
    let banks: alloc::vec::Vec<_> = ram.iter().map(|r| (r.base, r.end())).collect();
    let holes = [
        own_ram(ram, hyp),
        dtb_hole(dtb),
        (STAGING.base, STAGING.end()),
    ];
    less(&banks, &holes)
}

/// The part of the [`STAGING`] range that is RAM (inside a bank of `ram`), less the
/// hypervisor's own RAM and the device tree `dtb`: what the hypervisor maps to read the
/// staged images (and write the device trees it stages), in page-aligned ranges sorted by
/// address. Never part of [`guest_ram`].
#[must_use]
pub fn staging_ram(
    ram: &[PhysRange],
    hyp: &HypMemory,
    dtb: PhysRange,
) -> alloc::vec::Vec<PhysRange> {
    let parts: alloc::vec::Vec<_> = ram
        .iter()
        .filter(|r| r.overlaps(&STAGING))
        .map(|r| (r.base.max(STAGING.base), r.end().min(STAGING.end())))
        .collect();
    let holes = [own_ram(ram, hyp), dtb_hole(dtb)];
    less(&parts, &holes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const END: u64 = HYP_RAM_END.get();

    const fn pr(base: u64, size: u64) -> PhysRange {
        PhysRange::new(PhysAddr::new(base), size)
    }

    #[test]
    fn guest_ram_is_every_bank_less_the_hypervisor_dtb_and_staging() {
        let m = plan(IMAGE, &[RAM], pr(END, 0x1800)).unwrap();
        let g = guest_ram(&[RAM], &m, pr(END, 0x1800));
        assert_eq!(
            g,
            [
                pr(END + 0x2000, STAGING.base.get() - END - 0x2000),
                pr(STAGING.end().get(), RAM.end().get() - STAGING.end().get()),
            ]
        );
        // A second bank (and a DTB inside it) counts too; nothing of the hypervisor's.
        let high = pr(0x1_0000_0000, 0x4000_0000);
        let dtb = pr(0x1_0000_0000, 0x1000);
        let g = guest_ram(&[RAM, high], &m, dtb);
        assert_eq!(g.last(), Some(&pr(0x1_0000_1000, 0x3fff_f000)));
        assert!(g.iter().all(|r| !r.overlaps(&m.image)
            && !r.overlaps(&m.heap)
            && !r.overlaps(&m.frames)
            && !r.overlaps(&STAGING)
            && !r.overlaps(&dtb)));
        let total: u64 = g.iter().map(|r| r.size).sum();
        assert_eq!(
            total,
            RAM.size + high.size - (END - RAM.base.get()) - STAGING.size - 0x1000
        );
    }

    #[test]
    fn a_bank_or_dtb_in_the_last_page_below_2_64_adds_no_guest_ram() {
        // Host device trees are input: a memory node or a device tree at the very top
        // of the address space must not round up past 2^64 (which wrapped to 0 and made
        // a bank of everything below it, MMIO included).
        let m = plan(IMAGE, &[RAM], pr(END, 0x1800)).unwrap();
        let normal = guest_ram(&[RAM], &m, pr(END, 0x1800));
        let top = pr(u64::MAX - 0xffe, 0x10);
        assert_eq!(guest_ram(&[RAM, top], &m, pr(END, 0x1800)), normal);
        let g = guest_ram(&[RAM], &m, pr(u64::MAX - 0x10, 0x20));
        assert_eq!(
            g,
            guest_ram(&[RAM], &m, PhysRange::default()),
            "a device tree at the top takes nothing of RAM"
        );
        assert_eq!(
            plan(top, &[top], PhysRange::default()),
            Err(LayoutError::TooSmall)
        );
    }

    #[test]
    fn staging_ram_is_the_staging_range_in_ram_and_never_guest_ram() {
        let dtb = pr(END, 0x1800);
        let m = plan(IMAGE, &[RAM], dtb).unwrap();
        assert_eq!(staging_ram(&[RAM], &m, dtb), [STAGING]);
        // RAM that ends inside the staging range, or before it.
        let short = pr(RAM.base.get(), 0x3800_0000);
        assert_eq!(
            staging_ram(&[short], &m, dtb),
            [pr(STAGING.base.get(), 0x0800_0000)]
        );
        let small = pr(RAM.base.get(), 0x2000_0000);
        assert!(staging_ram(&[small], &m, dtb).is_empty());
        // Two banks around a hole in the middle of the staging range, and a DTB in it.
        let banks = [
            pr(RAM.base.get(), 0x3400_0000),
            pr(0x7800_0000, 0x1000_0000),
        ];
        let dtb = pr(0x7900_0800, 0x1000);
        let m = plan(IMAGE, &banks, dtb).unwrap();
        let staging = staging_ram(&banks, &m, dtb);
        assert_eq!(
            staging,
            [
                pr(0x7000_0000, 0x0400_0000),
                pr(0x7800_0000, 0x0100_0000),
                pr(0x7900_2000, 0x0700_0000 - 0x2000),
            ]
        );
        let guest = guest_ram(&banks, &m, dtb);
        assert!(guest.iter().all(|g| staging.iter().all(|s| !s.overlaps(g))));
        assert_eq!(guest.last(), Some(&pr(STAGING.end().get(), 0x0800_0000)));
    }

    const RAM: PhysRange = pr(0x4000_0000, 2 << 30);
    const IMAGE: PhysRange = pr(0x4020_0000, 0x8_1234);

    #[test]
    fn heap_then_frames_up_to_the_dtb() {
        let m = plan(IMAGE, &[RAM], pr(END, 0x2000)).unwrap();
        assert_eq!(
            m.heap.base.get(),
            0x4028_2000,
            "page aligned after the image"
        );
        assert_eq!(m.heap.size, HEAP_SIZE);
        assert_eq!(m.frames.base, m.heap.end());
        assert_eq!(m.frames.end(), HYP_RAM_END);
        assert!(!m.frames.overlaps(&m.heap) && !m.heap.overlaps(&IMAGE));
    }

    #[test]
    fn dtb_below_the_limit_cuts_the_pool() {
        let dtb = pr(0x4400_0800, 0x2000);
        let m = plan(IMAGE, &[RAM], dtb).unwrap();
        assert_eq!(m.frames.end().get(), 0x4400_0000);
        assert!(!m.frames.overlaps(&dtb));
    }

    #[test]
    fn small_ram_cuts_the_pool() {
        let ram = pr(0x4000_0000, 0x0200_0000 + 0x40_0000 + HEAP_SIZE);
        let m = plan(IMAGE, &[ram], pr(0x5000_0000, 0x1000)).unwrap();
        assert_eq!(m.frames.end(), ram.end());
        let tiny = pr(0x4000_0000, 0x40_0000);
        assert_eq!(
            plan(IMAGE, &[tiny], PhysRange::default()),
            Err(LayoutError::TooSmall)
        );
    }

    #[test]
    fn image_outside_ram() {
        let ram = pr(0x8000_0000, 1 << 30);
        assert_eq!(
            plan(IMAGE, &[ram], PhysRange::default()),
            Err(LayoutError::ImageNotInRam)
        );
    }
}
