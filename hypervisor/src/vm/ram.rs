//! Guest RAM handed to the guest 2 MiB at a time, on first touch.
//!
//! RAM comes from the pool holding whatever its last user left there, so no byte of it
//! reaches a guest before the hypervisor has scrubbed it (zeroed, cleaned to the point
//! of coherency, its MTE tags cleared: `GuestMemory::zero`). Scrubbing all of a VM's RAM
//! when it is created costs time in proportion to its size, most of it for RAM the guest
//! does not touch for a long time: a Debian kernel with 256 MiB writes about a quarter
//! of it on its way to userspace.
//!
//! So a VM's RAM is split into chunks: the 2 MiB-aligned blocks of guest-physical
//! address space, each cut to the RAM region it lies in. Every chunk is mapped when the
//! VM is created (its table frames taken then), each alone and never merged into a
//! larger block, but the guest gets access to a chunk only once it is scrubbed
//! ("ready"); until then it is mapped without any access ([`S2Kind::NotReady`]). The
//! guest's first access to such a chunk faults to EL2, which scrubs it and gives access
//! ([`super::Vm::first_touch`]), and the access runs again. The rules:
//! - the chunks that images are copied into are ready when the VM starts (created or
//!   reset), the images' bytes copied and the rest scrubbed;
//! - a ready chunk stays ready (owned, or shared, or lent away) until the VM is reset
//!   or destroyed: it is never scrubbed under the guest's feet;
//! - a memory-sharing call makes the caller's chunks in its range ready first, so what
//!   it hands to another VM is always scrubbed RAM ([`super::VmManager::share_call`]);
//! - a reset takes every chunk back and starts again from the images' chunks;
//! - a VM with pass-through MMIO gets all of its RAM ready when it starts: a device
//!   there may write RAM by DMA before any CPU touches it, and a first touch after
//!   that would wipe what the device wrote.

use alloc::vec::Vec;

use super::S2Kind;
use crate::config::{GuestRegion, VmDesc};
use crate::mem::Ipa;

/// Size and alignment (in guest-physical address space) of a chunk.
pub const CHUNK: u64 = 2 << 20;

/// The chunks of `r`: first chunk's IPA (aligned down) and how many there are.
fn span(r: &GuestRegion) -> (u64, usize) {
    let first = r.ipa.align_down(CHUNK).get();
    // A checked region ends inside the IPA space: no sum wraps.
    let end = r.ipa.get().saturating_add(r.size);
    let count = end.saturating_sub(first).div_ceil(CHUNK);
    (first, usize::try_from(count).unwrap_or(usize::MAX))
}

/// The `k`-th chunk of `r` (cut to `r`), or `None` past its end.
fn chunk(r: &GuestRegion, first: u64, k: usize) -> Option<GuestRegion> {
    let at = first.checked_add((k as u64).checked_mul(CHUNK)?)?;
    let start = at.max(r.ipa.get());
    let end = at
        .saturating_add(CHUNK)
        .min(r.ipa.get().saturating_add(r.size));
    let ipa = Ipa::new(start);
    let size = end.checked_sub(start).filter(|&s| s > 0)?;
    Some(GuestRegion {
        ipa,
        pa: r.pa_of(ipa, size)?,
        size,
    })
}

/// Which of a VM's chunks are ready (one bit each, regions in description order).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamChunks {
    ready: Vec<bool>,
}

impl RamChunks {
    /// Every chunk of `desc` not ready.
    #[must_use]
    pub fn new(desc: &VmDesc) -> Self {
        let count = desc.memory.iter().map(|r| span(r).1).sum();
        Self {
            ready: alloc::vec![false; count],
        }
    }

    /// The chunks of `desc` that are ready when it starts, after [`start_ranges`] is
    /// mapped.
    #[must_use]
    pub fn at_start(desc: &VmDesc) -> Self {
        let mut chunks = Self::new(desc);
        for (i, _) in start_chunks(desc) {
            if let Some(b) = chunks.ready.get_mut(i) {
                *b = true;
            }
        }
        chunks
    }

    /// Whether chunk `i` is ready.
    #[must_use]
    pub fn is_ready(&self, i: usize) -> bool {
        self.ready.get(i).copied().unwrap_or(false)
    }

    /// Marks chunk `i` ready.
    pub fn set_ready(&mut self, i: usize) {
        if let Some(b) = self.ready.get_mut(i) {
            *b = true;
        }
    }

    /// How many chunks are ready.
    #[cfg(test)]
    #[must_use]
    pub fn ready_count(&self) -> usize {
        self.ready.iter().filter(|&&b| b).count()
    }
}

/// Every chunk of `desc` with its index, in order.
pub fn chunks(desc: &VmDesc) -> impl Iterator<Item = (usize, GuestRegion)> + '_ {
    desc.memory
        .iter()
        .flat_map(|r| {
            let (first, count) = span(r);
            (0..count).filter_map(move |k| chunk(r, first, k))
        })
        .enumerate()
}

/// The chunk holding `ipa`, with its index, if `ipa` is RAM of `desc`.
#[must_use]
pub fn chunk_of(desc: &VmDesc, ipa: Ipa) -> Option<(usize, GuestRegion)> {
    let mut base = 0usize;
    for r in &desc.memory {
        let (first, count) = span(r);
        if r.ipa_range().contains_addr(ipa) {
            let k = usize::try_from((ipa.get().checked_sub(first)?) / CHUNK).ok()?;
            return Some((base.checked_add(k)?, chunk(r, first, k)?));
        }
        base = base.saturating_add(count);
    }
    None
}

/// The chunks of `desc` that overlap `[ipa, ipa + size)`.
pub fn chunks_in(
    desc: &VmDesc,
    ipa: Ipa,
    size: u64,
) -> impl Iterator<Item = (usize, GuestRegion)> + '_ {
    let range = crate::mem::IpaRange::new(ipa, size);
    chunks(desc).filter(move |(_, c)| c.ipa_range().overlaps(&range))
}

/// Whether all of `desc`'s RAM is ready from the start (the module documentation says
/// why a VM with pass-through MMIO gets it so).
#[must_use]
pub fn all_at_start(desc: &VmDesc) -> bool {
    !desc.passthrough.is_empty()
}

/// The chunks ready at start: every chunk an image of `desc` lands in, or all of them
/// ([`all_at_start`]).
fn start_chunks(desc: &VmDesc) -> impl Iterator<Item = (usize, GuestRegion)> + '_ {
    let all = all_at_start(desc);
    chunks(desc).filter(move |(_, c)| {
        all || [Some(desc.kernel), desc.initrd, desc.dtb]
            .into_iter()
            .flatten()
            .any(|img| img.ipa_range().overlaps(&c.ipa_range()))
    })
}

/// Every chunk of `desc` with its stage-2 kind when the VM starts: `Ram` for the start
/// chunks, `NotReady` (mapped without access) for the others. Each chunk is mapped
/// alone and never merged into a larger block, so that making it ready later changes
/// it alone, without a frame.
pub fn start_mappings(desc: &VmDesc) -> impl Iterator<Item = (GuestRegion, S2Kind)> + '_ {
    let ready = RamChunks::at_start(desc);
    chunks(desc).map(move |(i, c)| {
        let kind = if ready.is_ready(i) {
            S2Kind::Ram
        } else {
            S2Kind::NotReady
        };
        (c, kind)
    })
}

/// The RAM of `desc` that is mapped, scrubbed and loaded when the VM starts: its start
/// chunks, neighbours merged (in a region, consecutive chunks are contiguous in both
/// address spaces), so a scrub of many chunks is one bulk write.
#[must_use]
pub fn start_ranges(desc: &VmDesc) -> Vec<GuestRegion> {
    let mut out: Vec<GuestRegion> = Vec::new();
    for (_, c) in start_chunks(desc) {
        if let Some(last) = out.last_mut() {
            let follows = last.ipa.checked_add(last.size) == Some(c.ipa)
                && last.pa.checked_add(last.size) == Some(c.pa);
            if follows {
                last.size = last.size.saturating_add(c.size);
                continue;
            }
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Image;
    use crate::mem::PhysAddr;
    use crate::vm::tests::desc;

    fn region(ipa: u64, pa: u64, size: u64) -> GuestRegion {
        GuestRegion {
            ipa: Ipa::new(ipa),
            pa: PhysAddr::new(pa),
            size,
        }
    }

    /// A VM with two regions: 5 MiB at an IPA 1 MiB past a 2 MiB boundary, and 2 MiB
    /// right after it in IPA space but elsewhere in PA.
    fn two_regions() -> VmDesc {
        let mut d = desc(0x5000_0000, 1);
        d.memory = alloc::vec![
            region(0x4010_0000, 0x5010_0000, 0x50_0000),
            region(0x4060_0000, 0x6000_0000, 0x20_0000),
        ];
        d.kernel.ipa = Ipa::new(0x4010_0000);
        d
    }

    #[test]
    fn chunks_are_cut_at_2_mib_boundaries_and_region_ends() {
        let d = two_regions();
        let all: Vec<(usize, GuestRegion)> = chunks(&d).collect();
        assert_eq!(
            all,
            alloc::vec![
                (0, region(0x4010_0000, 0x5010_0000, 0x10_0000)),
                (1, region(0x4020_0000, 0x5020_0000, 0x20_0000)),
                (2, region(0x4040_0000, 0x5040_0000, 0x20_0000)),
                (3, region(0x4060_0000, 0x6000_0000, 0x20_0000)),
            ]
        );
        assert_eq!(RamChunks::new(&d).ready.len(), 4);
        // Every byte of every region is in exactly one chunk.
        let total: u64 = all.iter().map(|(_, c)| c.size).sum();
        assert_eq!(total, d.ram_size());
    }

    #[test]
    fn chunk_of_finds_the_chunk_and_its_index() {
        let d = two_regions();
        for (i, c) in chunks(&d) {
            for ipa in [
                c.ipa.get(),
                c.ipa.get() + c.size / 2,
                c.ipa.get() + c.size - 1,
            ] {
                assert_eq!(chunk_of(&d, Ipa::new(ipa)), Some((i, c)), "{ipa:#x}");
            }
        }
        for outside in [0x400f_ffff, 0x4080_0000, 0, u64::MAX] {
            assert_eq!(chunk_of(&d, Ipa::new(outside)), None, "{outside:#x}");
        }
    }

    #[test]
    fn the_images_chunks_are_ready_at_start_merged_where_contiguous() {
        let mut d = two_regions();
        // The kernel runs over the first chunk's end; the DTB sits in the last chunk.
        d.kernel.size = 0x10_1000;
        d.dtb = Some(Image {
            src: crate::config::ImageSource::Staged(PhysAddr::new(0x7100_0000)),
            size: 0x1000,
            ipa: Ipa::new(0x4070_0000),
        });
        assert_eq!(
            start_ranges(&d),
            alloc::vec![
                region(0x4010_0000, 0x5010_0000, 0x30_0000),
                region(0x4060_0000, 0x6000_0000, 0x20_0000),
            ],
            "chunks 0 and 1 merge; chunk 3 is contiguous in IPA only"
        );
        let ready = RamChunks::at_start(&d);
        assert_eq!(
            (0..4).map(|i| ready.is_ready(i)).collect::<Vec<_>>(),
            [true, true, false, true]
        );
        assert_eq!(ready.ready_count(), 3);
        assert!(!ready.is_ready(4), "past the end");
    }

    #[test]
    fn a_vm_with_pass_through_mmio_has_all_its_ram_at_start() {
        let mut d = two_regions();
        assert!(!all_at_start(&d));
        d.passthrough.push(region(0x0a00_0000, 0x0a00_0000, 0x1000));
        assert!(all_at_start(&d));
        assert_eq!(RamChunks::at_start(&d).ready_count(), 4);
        assert_eq!(
            start_ranges(&d),
            alloc::vec![
                region(0x4010_0000, 0x5010_0000, 0x50_0000),
                region(0x4060_0000, 0x6000_0000, 0x20_0000),
            ]
        );
    }

    #[test]
    fn chunks_in_a_range_are_those_it_overlaps() {
        let d = two_regions();
        let idx = |ipa: u64, size: u64| {
            chunks_in(&d, Ipa::new(ipa), size)
                .map(|(i, _)| i)
                .collect::<Vec<_>>()
        };
        assert_eq!(idx(0x4020_0000, 0x1000), [1]);
        assert_eq!(idx(0x401f_f000, 0x2000), [0, 1]);
        assert_eq!(
            idx(0x4000_0000, u64::MAX),
            [0, 1, 2, 3],
            "no wrap, no overrun"
        );
        assert!(idx(0x4080_0000, 0x1000).is_empty());
    }
}
