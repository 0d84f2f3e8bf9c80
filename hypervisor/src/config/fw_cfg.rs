//! QEMU's firmware configuration device (`fw_cfg`, compatible `qemu,fw-cfg-mmio`) as a
//! source of guest images: the protocol's encodings and its file directory, a host input
//! checked like the device tree. The register accesses are `crate::machine::fw_cfg`.
//!
//! QEMU keeps each file given with `-fw_cfg name=...,file=...` in its own memory and, on
//! a DMA request, writes it to the physical address the request names at host `memcpy`
//! speed: a VM's kernel goes straight into its RAM, with nothing staged, and a reset
//! fetches the same pristine bytes again (QEMU `docs/specs/fw_cfg.rst`).

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

/// Offset of the data register (reads the selected item byte by byte, in order).
pub const DATA: usize = 0x0;
/// Offset of the selector register (16 bits, big-endian).
pub const SELECTOR: usize = 0x8;
/// Offset of the DMA address register (64 bits, big-endian; writing it starts the
/// transfer the [`DmaAccess`] at that physical address describes).
pub const DMA_ADDRESS: usize = 0x10;
/// Bytes of registers the hypervisor uses.
pub const REGISTERS_LEN: u64 = 0x18;

/// Item: the signature, `"QEMU"`.
pub const KEY_SIGNATURE: u16 = 0x0000;
/// Item: the interface's features (little-endian 32 bits).
pub const KEY_ID: u16 = 0x0001;
/// Item: the file directory.
pub const KEY_FILE_DIR: u16 = 0x0019;
/// What [`KEY_SIGNATURE`] holds.
pub const SIGNATURE: [u8; 4] = *b"QEMU";
/// [`KEY_ID`] bit: the DMA interface is there.
pub const ID_DMA: u32 = 1 << 1;

/// Control bits of a [`DmaAccess`].
const CONTROL_ERROR: u32 = 1 << 0;
const CONTROL_READ: u32 = 1 << 1;
const CONTROL_SELECT: u32 = 1 << 3;

/// Bytes of one directory entry: size (be32), select (be16), reserved (be16), name (56).
const DIR_ENTRY_LEN: usize = 64;
/// Bytes of a file name, its NUL included.
const NAME_LEN: usize = 56;
/// Most directory entries read (256 KiB of directory): QEMU's default is 32 files
/// (`FW_CFG_FILE_SLOTS_DFLT`); a directory that says it has more than this is refused.
pub const MAX_FILES: u32 = 4096;

/// One file of the directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FwCfgFile {
    /// Its name (`opt/...` for files a user adds).
    pub name: String,
    /// The item key that selects it.
    pub select: u16,
    /// Its length in bytes.
    pub size: u32,
}

/// Why the fw-cfg device cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FwCfgError {
    /// The signature item is not `"QEMU"`.
    NoSignature,
    /// The device has no DMA interface.
    NoDma,
    /// The device tree does not say the device is `dma-coherent`: the hypervisor does no
    /// cache maintenance around a transfer.
    NotCoherent,
    /// The directory says it has more than [`MAX_FILES`] entries.
    TooManyFiles(u32),
    /// A transfer ended with the error bit set.
    Transfer,
    /// A transfer did not end within the hypervisor's bound.
    Timeout,
    /// An earlier transfer did not end: the device is not used again (it might still be
    /// writing).
    Abandoned,
    /// A transfer of 4 GiB or more (a file's size is 32 bits).
    TooLong,
}

impl fmt::Display for FwCfgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoSignature => f.write_str("no \"QEMU\" signature"),
            Self::NoDma => f.write_str("no DMA interface"),
            Self::NotCoherent => f.write_str("the device tree does not say dma-coherent"),
            Self::TooManyFiles(n) => write!(f, "a directory of {n} files (at most {MAX_FILES})"),
            Self::Transfer => f.write_str("a DMA transfer reported an error"),
            Self::Timeout => f.write_str("a DMA transfer did not complete"),
            Self::Abandoned => f.write_str("the device was given up after a transfer hung"),
            Self::TooLong => f.write_str("a transfer of 4 GiB or more"),
        }
    }
}

impl core::error::Error for FwCfgError {}

/// The number of entries the directory's first four bytes announce.
///
/// # Errors
/// [`FwCfgError::TooManyFiles`] past [`MAX_FILES`].
pub fn dir_count(head: [u8; 4]) -> Result<u32, FwCfgError> {
    let n = u32::from_be_bytes(head);
    if n > MAX_FILES {
        return Err(FwCfgError::TooManyFiles(n));
    }
    Ok(n)
}

/// Bytes of the entries of a directory of `count` files (after its four-byte count).
#[must_use]
pub const fn dir_len(count: u32) -> usize {
    (count as usize).saturating_mul(DIR_ENTRY_LEN)
}

/// The files of a directory's entries (the bytes after its count; a partial entry at the
/// end is ignored). An entry whose name is empty, has no NUL or has a byte that is not
/// printable ASCII is left out: no description can name it.
#[must_use]
pub fn parse_dir(entries: &[u8]) -> Vec<FwCfgFile> {
    entries
        .chunks_exact(DIR_ENTRY_LEN)
        .filter_map(|e| <[u8; DIR_ENTRY_LEN]>::try_from(e).ok())
        .filter_map(|e| {
            let [s0, s1, s2, s3, k0, k1, _, _, name @ ..] = e;
            let len = name.iter().position(|&b| b == 0)?;
            let name = name.get(..len).filter(|n| !n.is_empty())?;
            if !name.iter().all(u8::is_ascii_graphic) {
                return None;
            }
            Some(FwCfgFile {
                // Printable ASCII, checked just above.
                name: String::from_utf8_lossy(name).into_owned(),
                select: u16::from_be_bytes([k0, k1]),
                size: u32::from_be_bytes([s0, s1, s2, s3]),
            })
        })
        .collect()
}

/// The longest name a file can have (without its NUL).
pub const MAX_NAME: usize = NAME_LEN - 1;

/// A DMA request as the device reads it from memory: every field big-endian.
#[repr(C, align(16))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaAccess {
    control: u32,
    length: u32,
    address: u64,
}

/// Where a DMA request stands, from its control word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmaStatus {
    /// The device has not finished it.
    Busy,
    /// Every byte was transferred.
    Done,
    /// The device gave up.
    Failed,
}

impl DmaAccess {
    /// A request to select item `select` and read `length` bytes of it, from its start,
    /// to physical address `address`.
    #[must_use]
    pub const fn read(select: u16, length: u32, address: u64) -> Self {
        Self {
            control: ((select as u32) << 16 | CONTROL_SELECT | CONTROL_READ).to_be(),
            length: length.to_be(),
            address: address.to_be(),
        }
    }

    /// A request to read `length` more bytes of the selected item, from where the last
    /// transfer ended, to physical address `address`.
    #[must_use]
    pub const fn read_on(length: u32, address: u64) -> Self {
        Self {
            control: CONTROL_READ.to_be(),
            length: length.to_be(),
            address: address.to_be(),
        }
    }

    /// The status a control word read back from memory says.
    #[must_use]
    pub const fn status(control: u32) -> DmaStatus {
        let control = u32::from_be(control);
        if control & CONTROL_ERROR != 0 {
            DmaStatus::Failed
        } else if control == 0 {
            DmaStatus::Done
        } else {
            DmaStatus::Busy
        }
    }

    /// The control word, as it lies in memory.
    #[cfg(test)]
    #[must_use]
    pub const fn control(&self) -> u32 {
        self.control
    }

    /// Where in the request the device writes its status back.
    #[must_use]
    pub fn control_ptr(this: *mut Self) -> *mut u32 {
        // `control` is the first field of a `repr(C)` struct.
        this.cast()
    }
}

/// The value to write to [`DMA_ADDRESS`] for a request at physical address `pa`: the
/// register is big-endian.
#[must_use]
pub const fn dma_address_value(pa: u64) -> u64 {
    pa.to_be()
}

/// The selector register's value for item `key` (big-endian).
#[must_use]
pub const fn selector_value(key: u16) -> u16 {
    key.to_be()
}

/// The file called `name`, if the directory has one.
#[must_use]
pub fn find<'a>(files: &'a [FwCfgFile], name: &str) -> Option<&'a FwCfgFile> {
    files.iter().find(|f| f.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn entry(size: u32, select: u16, name: &[u8]) -> Vec<u8> {
        let mut e = vec![0u8; DIR_ENTRY_LEN];
        e[..4].copy_from_slice(&size.to_be_bytes());
        e[4..6].copy_from_slice(&select.to_be_bytes());
        e[8..8 + name.len()].copy_from_slice(name);
        e
    }

    #[test]
    fn a_directory_is_read_as_qemu_writes_it() {
        let mut bytes = entry(0x0123_4567, 0x0020, b"opt/twostage/kernel");
        bytes.extend(entry(5, 0x0021, b"bootorder"));
        // A partial entry at the end is not an entry.
        bytes.extend([0xff; 10]);
        let files = parse_dir(&bytes);
        assert_eq!(
            files,
            vec![
                FwCfgFile {
                    name: "opt/twostage/kernel".into(),
                    select: 0x20,
                    size: 0x0123_4567
                },
                FwCfgFile {
                    name: "bootorder".into(),
                    select: 0x21,
                    size: 5
                },
            ]
        );
        assert_eq!(find(&files, "bootorder").map(|f| f.select), Some(0x21));
        assert_eq!(find(&files, "opt/twostage"), None);
    }

    #[test]
    fn entries_named_without_a_nul_or_with_other_bytes_are_left_out() {
        let mut no_nul = entry(1, 0x20, b"");
        no_nul[8..].fill(b'a');
        let mut bytes = no_nul;
        for bad in [&b""[..], b"opt/a\nb", b"opt/\xc3\xa9", b"opt/a b"] {
            bytes.extend(entry(1, 0x21, bad));
        }
        // The longest name fits, with its NUL; the good entry after the bad ones is kept.
        let long = [b'x'; MAX_NAME];
        bytes.extend(entry(7, 0x22, &long));
        let files = parse_dir(&bytes);
        assert_eq!(files.len(), 1, "{files:?}");
        assert_eq!((files[0].select, files[0].name.len()), (0x22, MAX_NAME));
    }

    #[test]
    fn the_count_is_bounded() {
        assert_eq!(dir_count(3u32.to_be_bytes()), Ok(3));
        assert_eq!(dir_count(MAX_FILES.to_be_bytes()), Ok(MAX_FILES));
        assert_eq!(
            dir_count((MAX_FILES + 1).to_be_bytes()),
            Err(FwCfgError::TooManyFiles(MAX_FILES + 1))
        );
        assert_eq!(dir_len(2), 128);
    }

    #[test]
    fn a_dma_read_request_is_big_endian_in_memory() {
        let req = DmaAccess::read(0x0020, 0x0102_0304, 0x5000_0000);
        // SAFETY: `DmaAccess` is 16 bytes of plain integers.
        let bytes: [u8; 16] = unsafe { core::mem::transmute(req) };
        // Control: select 0x0020 in the top half, SELECT (bit 3) and READ (bit 1).
        assert_eq!(bytes[..4], [0x00, 0x20, 0x00, 0x0a]);
        assert_eq!(bytes[4..8], [0x01, 0x02, 0x03, 0x04]);
        assert_eq!(bytes[8..], [0, 0, 0, 0, 0x50, 0, 0, 0]);
        // Going on where the last transfer ended: READ alone, no select.
        // SAFETY: as above.
        let on: [u8; 16] = unsafe { core::mem::transmute(DmaAccess::read_on(0x10, 0x1000)) };
        assert_eq!(on[..8], [0, 0, 0, 0x02, 0, 0, 0, 0x10]);
        assert_eq!(
            dma_address_value(0x4000_1230).to_ne_bytes(),
            0x4000_1230u64.to_be_bytes()
        );
        assert_eq!(selector_value(0x19).to_ne_bytes(), [0x00, 0x19]);
    }

    #[test]
    fn the_status_is_read_from_the_control_word() {
        let req = DmaAccess::read(0x20, 1, 0);
        assert_eq!(DmaAccess::status(req.control()), DmaStatus::Busy);
        assert_eq!(DmaAccess::status(0), DmaStatus::Done);
        // The device sets the error bit and may leave other bits.
        assert_eq!(DmaAccess::status(0x0b_u32.to_be()), DmaStatus::Failed);
        assert_eq!(DmaAccess::status(1_u32.to_be()), DmaStatus::Failed);
    }
}
