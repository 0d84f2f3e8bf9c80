//! The arm64 Linux `Image` header and where a guest kernel goes in guest RAM.
//!
//! The header is described in the kernel's `Documentation/arch/arm64/booting.rst`
//! ("Call the kernel image"): 64 bytes at the start of the image, little-endian,
//!
//! | offset | field |
//! |---|---|
//! | 0 | `code0`, `code1` (two instructions) |
//! | 8 | `text_offset`: offset of the image from a 2 MiB aligned base |
//! | 16 | `image_size`: bytes the kernel needs from its load address, BSS included |
//! | 24 | `flags`: bit 0 big-endian, bits 2:1 page size, bit 3 "place anywhere" |
//! | 56 | magic `"ARM\x64"` |
//!
//! A kernel without the magic is a raw binary. It is placed the way QEMU's own loader
//! places one on an AArch64 machine (`load_aarch64_image` in QEMU's `hw/arm/boot.c`):
//! at `KERNEL64_LOAD_ADDR` = 0x8_0000 from the start of RAM, entered at its first byte
//! with x0 = DTB. A header with `image_size == 0` (kernels before v3.17) is placed the
//! same way, as booting.rst says `text_offset` is then 0x8_0000.

use core::fmt;

/// `"ARM\x64"` read as a little-endian `u32`, at byte 56 of an arm64 Image.
pub const IMAGE_MAGIC: u32 = 0x644d_5241;
/// Byte offset of the magic in the header.
pub const MAGIC_OFFSET: usize = 56;
/// Bytes of the header that are read.
pub const HEADER_LEN: usize = 64;
/// Alignment of the base that `text_offset` is counted from.
pub const IMAGE_BASE_ALIGN: u64 = 2 * 1024 * 1024;
/// Load offset from the start of RAM for a raw binary or a pre-3.17 Image (QEMU's
/// `KERNEL64_LOAD_ADDR`).
pub const RAW_LOAD_OFFSET: u64 = 0x8_0000;

/// Page size the kernel was built for (header flags bits 2:1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageSize {
    /// 0: not stated by the image.
    Unspecified,
    /// 1: 4 KiB.
    K4,
    /// 2: 16 KiB.
    K16,
    /// 3: 64 KiB.
    K64,
}

/// The fields of an arm64 Image header that decide how the kernel is loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageHeader {
    /// Offset of the image from a 2 MiB aligned base in RAM.
    pub text_offset: u64,
    /// Bytes the loaded kernel occupies (0 for kernels older than v3.17).
    pub image_size: u64,
    /// Raw `flags` field.
    pub flags: u64,
}

impl ImageHeader {
    /// Reads the header at the start of `image`, or `None` when `image` is not an arm64
    /// Image (too short, or no magic at byte 56).
    #[must_use]
    pub fn parse(image: &[u8]) -> Option<Self> {
        let field = |at: usize| -> Option<u64> {
            let bytes = image.get(at..at.checked_add(8)?)?;
            Some(u64::from_le_bytes(bytes.try_into().ok()?))
        };
        let magic = image.get(MAGIC_OFFSET..MAGIC_OFFSET.checked_add(4)?)?;
        if u32::from_le_bytes(magic.try_into().ok()?) != IMAGE_MAGIC {
            return None;
        }
        Some(Self {
            text_offset: field(8)?,
            image_size: field(16)?,
            flags: field(24)?,
        })
    }

    /// Whether the kernel is big-endian (flags bit 0).
    #[must_use]
    pub fn big_endian(&self) -> bool {
        self.flags & 1 != 0
    }

    /// Page size the kernel was built for (flags bits 2:1).
    #[must_use]
    pub fn page_size(&self) -> PageSize {
        match (self.flags >> 1) & 3 {
            0 => PageSize::Unspecified,
            1 => PageSize::K4,
            2 => PageSize::K16,
            _ => PageSize::K64,
        }
    }

    /// Whether the 2 MiB aligned base may be anywhere in RAM (flags bit 3); otherwise it
    /// should be as close as possible to the start of RAM.
    #[must_use]
    pub fn place_anywhere(&self) -> bool {
        self.flags & (1 << 3) != 0
    }
}

/// How a kernel file was recognised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelKind {
    /// An arm64 Image with a header.
    Image(ImageHeader),
    /// No header: a raw binary, entered at its first byte.
    Raw,
}

/// Why a kernel cannot be placed in the guest's RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlaceError {
    /// The kernel file is empty.
    Empty,
    /// The Image header says the kernel is big-endian; guests run little-endian.
    BigEndian,
    /// The kernel (its `image_size`, or the file when larger) does not fit in RAM.
    TooLarge,
    /// Address arithmetic overflowed (RAM range or header fields out of range).
    Overflow,
}

impl core::error::Error for PlaceError {}

impl fmt::Display for PlaceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Empty => "the kernel file is empty",
            Self::BigEndian => "the kernel is big-endian",
            Self::TooLarge => "the kernel does not fit in RAM",
            Self::Overflow => "the kernel's placement overflows the address space",
        })
    }
}

/// Where a kernel goes: the guest-physical address of its first byte, which is also
/// where the vCPU starts (booting.rst: "jump to the first instruction of the image"),
/// and the end of the memory it may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelPlacement {
    /// Kind of the kernel file.
    pub kind: KernelKind,
    /// Load address = entry point.
    pub load: u64,
    /// First byte after what the kernel may use (`load + max(image_size, file length)`).
    pub end: u64,
}

/// Places a kernel of `file_len` bytes, whose first bytes are `head` (at least
/// [`HEADER_LEN`] of them when the file is that long), in guest RAM
/// `[ram_base, ram_base + ram_size)`.
///
/// # Errors
/// [`PlaceError`] when the file is empty, big-endian, or does not fit.
pub fn place_kernel(
    head: &[u8],
    file_len: u64,
    ram_base: u64,
    ram_size: u64,
) -> Result<KernelPlacement, PlaceError> {
    if file_len == 0 {
        return Err(PlaceError::Empty);
    }
    let ram_end = ram_base.checked_add(ram_size).ok_or(PlaceError::Overflow)?;
    let kind = ImageHeader::parse(head).map_or(KernelKind::Raw, KernelKind::Image);
    let (load, size) = match kind {
        KernelKind::Image(h) if h.big_endian() => return Err(PlaceError::BigEndian),
        KernelKind::Image(h) if h.image_size != 0 => {
            let base = align_up(ram_base, IMAGE_BASE_ALIGN).ok_or(PlaceError::Overflow)?;
            let load = base
                .checked_add(h.text_offset)
                .ok_or(PlaceError::Overflow)?;
            (load, h.image_size.max(file_len))
        }
        KernelKind::Image(_) | KernelKind::Raw => (
            ram_base
                .checked_add(RAW_LOAD_OFFSET)
                .ok_or(PlaceError::Overflow)?,
            file_len,
        ),
    };
    let end = load.checked_add(size).ok_or(PlaceError::Overflow)?;
    if end > ram_end {
        return Err(PlaceError::TooLarge);
    }
    Ok(KernelPlacement { kind, load, end })
}

/// `value` rounded up to a multiple of `align` (a power of two), `None` on overflow.
pub(crate) fn align_up(value: u64, align: u64) -> Option<u64> {
    let mask = align.checked_sub(1)?;
    Some(value.checked_add(mask)? & !mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    /// A header laid out field by field as booting.rst describes it.
    fn header(text_offset: u64, image_size: u64, flags: u64) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&0x9100_0000u32.to_le_bytes());
        h[8..16].copy_from_slice(&text_offset.to_le_bytes());
        h[16..24].copy_from_slice(&image_size.to_le_bytes());
        h[24..32].copy_from_slice(&flags.to_le_bytes());
        h[56..60].copy_from_slice(b"ARM\x64");
        h
    }

    #[test]
    fn parses_each_field_from_its_offset() {
        let h = ImageHeader::parse(&header(0x8_0000, 0x0201_0000, 0b1010)).unwrap();
        assert_eq!(h.text_offset, 0x8_0000);
        assert_eq!(h.image_size, 0x0201_0000);
        assert_eq!(h.flags, 0b1010);
        assert!(!h.big_endian());
        assert_eq!(h.page_size(), PageSize::K4);
        assert!(h.place_anywhere());
    }

    #[test]
    fn flag_bits_decode_independently() {
        let h = |flags| ImageHeader::parse(&header(0, MIB, flags)).unwrap();
        assert!(h(1).big_endian());
        assert_eq!(h(0).page_size(), PageSize::Unspecified);
        assert_eq!(h(2 << 1).page_size(), PageSize::K16);
        assert_eq!(h(3 << 1).page_size(), PageSize::K64);
        assert!(!h(0b0111).place_anywhere());
    }

    #[test]
    fn no_magic_or_short_input_is_not_an_image() {
        let mut h = header(0, MIB, 0);
        h[59] = b'4';
        assert_eq!(ImageHeader::parse(&h), None);
        assert_eq!(
            ImageHeader::parse(&header(0, MIB, 0)[..60]).map(|_| ()),
            Some(())
        );
        assert_eq!(ImageHeader::parse(&header(0, MIB, 0)[..59]), None);
        assert_eq!(ImageHeader::parse(&[]), None);
    }

    #[test]
    fn image_goes_text_offset_above_the_2mib_aligned_ram_base() {
        let p = place_kernel(
            &header(0x8_0000, 4 * MIB, 0b1010),
            3 * MIB,
            0x5000_0000,
            64 * MIB,
        )
        .unwrap();
        assert_eq!(p.load, 0x5008_0000);
        assert_eq!(p.end, 0x5008_0000 + 4 * MIB);
        // A RAM base that is not 2 MiB aligned is rounded up first.
        let p = place_kernel(&header(0, 4 * MIB, 0b1010), 3 * MIB, 0x5010_0000, 64 * MIB).unwrap();
        assert_eq!(p.load, 0x5020_0000);
    }

    #[test]
    fn file_longer_than_image_size_still_counts_whole() {
        let p = place_kernel(&header(0, MIB, 0), 3 * MIB, 0x4000_0000, 64 * MIB).unwrap();
        assert_eq!(p.end, 0x4000_0000 + 3 * MIB);
    }

    #[test]
    fn raw_binary_and_old_image_go_where_qemu_puts_them() {
        let raw = [0x14u8; 128];
        let p = place_kernel(&raw, 128, 0x5000_0000, 16 * MIB).unwrap();
        assert_eq!(p.kind, KernelKind::Raw);
        assert_eq!((p.load, p.end), (0x5008_0000, 0x5008_0080));
        // image_size == 0: text_offset is not trusted, the raw rule applies.
        let p = place_kernel(&header(0x1234_5678, 0, 0), MIB, 0x5000_0000, 16 * MIB).unwrap();
        assert!(matches!(p.kind, KernelKind::Image(_)));
        assert_eq!(p.load, 0x5008_0000);
    }

    #[test]
    fn refuses_what_cannot_run() {
        let ram = (0x5000_0000, 16 * MIB);
        assert_eq!(place_kernel(&[], 0, ram.0, ram.1), Err(PlaceError::Empty));
        assert_eq!(
            place_kernel(&header(0, MIB, 1), MIB, ram.0, ram.1),
            Err(PlaceError::BigEndian)
        );
        assert_eq!(
            place_kernel(&header(0, 16 * MIB + 1, 0), MIB, ram.0, ram.1),
            Err(PlaceError::TooLarge)
        );
        assert_eq!(
            place_kernel(&header(0, 16 * MIB, 0), MIB, ram.0, ram.1).map(|p| p.end),
            Ok(ram.0 + ram.1)
        );
        assert_eq!(
            place_kernel(&header(u64::MAX - MIB, MIB, 0), MIB, ram.0, ram.1),
            Err(PlaceError::Overflow)
        );
        assert_eq!(
            place_kernel(&header(0, MIB, 0), MIB, u64::MAX - MIB, 2 * MIB),
            Err(PlaceError::Overflow)
        );
    }
}
