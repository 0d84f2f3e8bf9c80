//! Error type.

use core::fmt;

/// Why an operation failed. A failed operation leaves the table and the frame
/// allocator exactly as they were before the call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Error {
    /// An address or size is not a multiple of 4 KiB.
    Misaligned,
    /// The input range lies (partly) outside the table's input address space, wraps
    /// around, or an output address does not fit the configured output size.
    OutOfRange,
    /// [`map`](crate::PageTable::map) without [`MapFlags::REPLACE`](crate::MapFlags::REPLACE)
    /// found a valid mapping at this input address.
    AlreadyMapped {
        /// First input address found mapped.
        va: u64,
    },
    /// The frame allocator could not provide the table frames the operation needs.
    OutOfFrames,
    /// The regime cannot express these attributes (see [`Permissions`](crate::Permissions)).
    UnsupportedAttributes,
    /// The regime configuration (address size, VMID, ASID) is invalid.
    InvalidConfig,
    /// The frame allocator returned a frame the table cannot use: not aligned, or not
    /// entirely below the output address size (a table descriptor could not hold it,
    /// or the walk would take an address-size fault).
    InvalidFrame {
        /// Physical address of the frame (it was given back to the allocator).
        pa: u64,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Misaligned => f.write_str("address or size not 4 KiB aligned"),
            Error::OutOfRange => f.write_str("address range outside the translation table"),
            Error::AlreadyMapped { va } => write!(f, "input address {va:#x} is already mapped"),
            Error::OutOfFrames => f.write_str("out of page-table frames"),
            Error::UnsupportedAttributes => {
                f.write_str("attributes not expressible in this translation regime")
            }
            Error::InvalidConfig => f.write_str("invalid translation regime configuration"),
            Error::InvalidFrame { pa } => {
                write!(f, "table frame {pa:#x} outside the output address space")
            }
        }
    }
}

impl core::error::Error for Error {}
