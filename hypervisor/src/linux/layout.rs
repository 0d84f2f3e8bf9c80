//! Where the kernel, the initrd and the DTB of a Linux guest sit in its RAM.
//!
//! ```text
//! ram_base                                                         ram_end
//! | kernel (2 MiB aligned base + text_offset, image_size) | ... | initrd | DTB (2 MiB) |
//! ```
//!
//! The kernel goes where [`place_kernel`] says. The DTB gets the last 2 MiB aligned
//! 2 MiB of RAM: booting.rst asks for an 8-byte aligned blob of at most 2 MiB that does
//! not share a 2 MiB block with memory needing other attributes, and at the top it
//! cannot collide with the kernel's BSS. The initrd is wherever the VM description put
//! it; it only has to stay clear of both.

use core::fmt;

use super::image::{place_kernel, KernelPlacement, PlaceError, IMAGE_BASE_ALIGN};

/// Bytes reserved for the guest DTB (booting.rst's limit), 2 MiB aligned.
pub const DTB_AREA: u64 = IMAGE_BASE_ALIGN;

/// The boot layout of one Linux guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinuxLayout {
    /// Where the kernel goes and where vCPU 0 starts.
    pub kernel: KernelPlacement,
    /// IPA of the DTB (x0 at entry); [`DTB_AREA`] bytes are reserved there.
    pub dtb: u64,
}

/// Why a Linux guest cannot be laid out in its RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestLayoutError {
    /// The kernel cannot be placed.
    Kernel(PlaceError),
    /// RAM is too small to hold the kernel and, above it, the DTB area.
    NoRoomForDtb,
    /// The initrd overlaps the kernel or the DTB area, or leaves RAM.
    InitrdOverlap,
}

impl core::error::Error for GuestLayoutError {}

impl fmt::Display for GuestLayoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Kernel(e) => write!(f, "kernel: {e}"),
            Self::NoRoomForDtb => f.write_str("no room for the DTB above the kernel"),
            Self::InitrdOverlap => {
                f.write_str("the initrd overlaps the kernel or the DTB, or leaves RAM")
            }
        }
    }
}

/// Lays out a guest with RAM `[ram_base, ram_base + ram_size)`, a kernel of `kernel_len`
/// bytes starting with `kernel_head`, and an initrd at `initrd` (`[start, end)`).
///
/// # Errors
/// [`GuestLayoutError`] when the pieces do not fit without overlapping.
pub fn plan(
    ram_base: u64,
    ram_size: u64,
    kernel_head: &[u8],
    kernel_len: u64,
    initrd: Option<(u64, u64)>,
) -> Result<LinuxLayout, GuestLayoutError> {
    let kernel = place_kernel(kernel_head, kernel_len, ram_base, ram_size)
        .map_err(GuestLayoutError::Kernel)?;
    // place_kernel checked that ram_base + ram_size does not overflow.
    let ram_end = ram_base
        .checked_add(ram_size)
        .ok_or(GuestLayoutError::NoRoomForDtb)?;
    let dtb = (ram_end & !DTB_AREA.wrapping_sub(1))
        .checked_sub(DTB_AREA)
        .filter(|&d| d >= kernel.end)
        .ok_or(GuestLayoutError::NoRoomForDtb)?;
    if let Some((start, end)) = initrd {
        let inside = start >= ram_base && start < end && end <= ram_end;
        let clear_of = |lo: u64, hi: u64| end <= lo || start >= hi;
        if !inside
            || !clear_of(kernel.load, kernel.end)
            || !clear_of(dtb, dtb.saturating_add(DTB_AREA))
        {
            return Err(GuestLayoutError::InitrdOverlap);
        }
    }
    Ok(LinuxLayout { kernel, dtb })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linux::image::HEADER_LEN;

    const MIB: u64 = 1024 * 1024;

    fn image(image_size: u64) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[16..24].copy_from_slice(&image_size.to_le_bytes());
        h[24] = 0b1010;
        h[56..60].copy_from_slice(b"ARM\x64");
        h
    }

    #[test]
    fn dtb_takes_the_top_2mib_and_initrd_fits_below() {
        let l = plan(
            0x5000_0000,
            256 * MIB,
            &image(33 * MIB),
            32 * MIB,
            Some((0x5fc0_0000, 0x5fdc_0000)),
        )
        .unwrap();
        assert_eq!(l.kernel.load, 0x5000_0000);
        assert_eq!(l.dtb, 0x5fe0_0000);
    }

    #[test]
    fn unaligned_ram_end_rounds_the_dtb_area_down() {
        let l = plan(
            0x5000_0000,
            64 * MIB + 12345,
            &image(8 * MIB),
            8 * MIB,
            None,
        )
        .unwrap();
        assert_eq!(l.dtb, 0x5000_0000 + 62 * MIB);
        assert_eq!(l.dtb % DTB_AREA, 0);
    }

    #[test]
    fn overlaps_are_refused() {
        let ram = (0x5000_0000, 64 * MIB);
        let k = image(33 * MIB);
        let initrd_at = |s: u64, e: u64| plan(ram.0, ram.1, &k, 32 * MIB, Some((s, e)));
        // Into the kernel's BSS (image_size beyond the file).
        assert_eq!(
            initrd_at(0x5000_0000 + 32 * MIB, 0x5000_0000 + 34 * MIB),
            Err(GuestLayoutError::InitrdOverlap)
        );
        // Into the DTB area, outside RAM, empty.
        assert_eq!(
            initrd_at(0x5000_0000 + 61 * MIB, 0x5000_0000 + 62 * MIB + 1),
            Err(GuestLayoutError::InitrdOverlap)
        );
        assert_eq!(
            initrd_at(0x4f00_0000, 0x4f10_0000),
            Err(GuestLayoutError::InitrdOverlap)
        );
        assert_eq!(
            initrd_at(0x5300_0000, 0x5300_0000),
            Err(GuestLayoutError::InitrdOverlap)
        );
        assert!(initrd_at(0x5000_0000 + 33 * MIB, 0x5000_0000 + 62 * MIB).is_ok());
        // Kernel reaching into the DTB area.
        assert_eq!(
            plan(ram.0, ram.1, &image(63 * MIB), 32 * MIB, None),
            Err(GuestLayoutError::NoRoomForDtb)
        );
        assert_eq!(
            plan(ram.0, ram.1, &image(65 * MIB), 32 * MIB, None),
            Err(GuestLayoutError::Kernel(PlaceError::TooLarge))
        );
    }
}
