//! The memory-sharing calls as guests make them (`docs/hypercalls.md`, "Memory sharing
//! between VMs"): function IDs, the decoded [`Request`], permissions, and the FF-A status
//! codes returned in x0.

use crate::mem::Ipa;
use core::fmt;

use super::page_state::PageState;

/// Function IDs (SMC64 fast calls, vendor-specific hypervisor service).
pub mod fid {
    /// Share pages: the owner keeps its access.
    pub const SHARE: u32 = 0xC600_0010;
    /// Lend pages: the owner loses its access until it reclaims them.
    pub const LEND: u32 = 0xC600_0011;
    /// Map a transaction's pages into the receiver.
    pub const RETRIEVE: u32 = 0xC600_0012;
    /// Unmap a transaction's pages from the receiver.
    pub const RELINQUISH: u32 = 0xC600_0013;
    /// End a pending transaction: the pages return to the owner.
    pub const RECLAIM: u32 = 0xC600_0014;
    /// Describe a transaction.
    pub const QUERY: u32 = 0xC600_0015;
    // FF-A's `DONATE` would be 0xC600_0016: not offered (`NOT_SUPPORTED`).
}

/// Most pages one request may name.
pub const MAX_PAGES: u64 = 65_536;

/// Why a call failed (nothing changed then). The values returned in x0 are FF-A's
/// status codes (DEN 0077, "Status values").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// `INVALID_PARAMETERS` (-2).
    InvalidParameters,
    /// `NO_MEMORY` (-3): no table frame, or the owner's limit of live transactions
    /// (`sharing-max-owned`) is reached.
    NoMemory,
    /// `BUSY` (-4): the receiver's limit of live transactions from this owner
    /// (`sharing-max-received`) is reached.
    Busy,
    /// `DENIED` (-6).
    Denied,
    /// `NO_DATA` (-9).
    NoData,
}

impl Error {
    /// The FF-A status code.
    #[must_use]
    pub const fn code(self) -> i64 {
        match self {
            Self::InvalidParameters => -2,
            Self::NoMemory => -3,
            Self::Busy => -4,
            Self::Denied => -6,
            Self::NoData => -9,
        }
    }

    /// A failed `mmu` operation: out of frames is [`Error::NoMemory`]; anything else
    /// (the range was checked before) is reported as a bad parameter.
    pub(super) const fn from_mmu(e: mmu::Error) -> Self {
        match e {
            mmu::Error::OutOfFrames => Self::NoMemory,
            _ => Self::InvalidParameters,
        }
    }
}

impl core::error::Error for Error {}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::InvalidParameters => "INVALID_PARAMETERS",
            Self::NoMemory => "NO_MEMORY",
            Self::Busy => "BUSY",
            Self::Denied => "DENIED",
            Self::NoData => "NO_DATA",
        })
    }
}

/// Access permissions of a transaction: bit 0 read, bit 1 write, bit 2 execute (EL1 and
/// EL0). Read is always set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Perms(u8);

impl Perms {
    const READ: u8 = 1;
    const WRITE: u8 = 2;
    const EXEC: u8 = 4;

    /// Checks the guest's value: read set, nothing above bit 2.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidParameters`] otherwise.
    pub const fn from_raw(raw: u64) -> Result<Self, Error> {
        if raw & !7 != 0 || raw & 1 == 0 {
            Err(Error::InvalidParameters)
        } else {
            Ok(Self(raw as u8))
        }
    }

    /// The value as the guest passes it.
    #[must_use]
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// Whether every permission of `self` is also in `other`.
    #[must_use]
    pub const fn within(self, other: Self) -> bool {
        self.0 & !other.0 == 0
    }

    /// The stage-2 attributes of a borrowed mapping with these permissions: normal
    /// write-back memory, state shared-borrowed.
    #[must_use]
    pub fn borrowed_attributes(self) -> mmu::Attributes {
        use mmu::Permissions as P;
        let mut p = P::READ;
        if self.0 & Self::WRITE != 0 {
            p |= P::WRITE;
        }
        if self.0 & Self::EXEC != 0 {
            p |= P::EXEC_EL1 | P::EXEC_EL0;
        }
        mmu::Attributes::normal(p).with_sw(PageState::SharedBorrowed.sw())
    }
}

impl fmt::Display for Perms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let flag = |bit, c| if self.0 & bit != 0 { c } else { '-' };
        write!(
            f,
            "{}{}{}",
            flag(Self::READ, 'r'),
            flag(Self::WRITE, 'w'),
            flag(Self::EXEC, 'x')
        )
    }
}

/// Share (the owner keeps access) or lend (it does not).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `SHARE`.
    Share,
    /// `LEND`.
    Lend,
}

/// A decoded memory-sharing call, arguments as the guest passed them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// `SHARE` or `LEND`: x1 = owner IPA, x2 = page count, x3 = receiver VM id,
    /// x4 = permissions granted.
    Give {
        /// Share or lend.
        kind: Kind,
        /// Owner IPA.
        ipa: Ipa,
        /// Page count.
        pages: u64,
        /// Receiver VM id.
        receiver: u64,
        /// Permissions granted.
        perms: u64,
    },
    /// `RETRIEVE`: x1 = handle, x2 = receiver IPA, x3 = permissions asked.
    Retrieve {
        /// Handle.
        handle: u64,
        /// Receiver IPA.
        ipa: Ipa,
        /// Permissions asked.
        perms: u64,
    },
    /// `RELINQUISH`: x1 = handle.
    Relinquish {
        /// Handle.
        handle: u64,
    },
    /// `RECLAIM`: x1 = handle.
    Reclaim {
        /// Handle.
        handle: u64,
    },
    /// `QUERY`: x1 = handle, or 0 for the oldest pending transaction addressed to the
    /// caller by owner x2.
    Query {
        /// Handle or 0.
        handle: u64,
        /// With handle 0: the owner VM id.
        owner: u64,
    },
}

impl Request {
    /// The call `x` (x0..x7 at the `HVC`/`SMC`) makes, if its function ID (w0) is a
    /// memory-sharing call.
    #[must_use]
    pub fn decode(x: &[u64; 8]) -> Option<Self> {
        Some(match x[0] as u32 {
            fid::SHARE | fid::LEND => Self::Give {
                kind: if x[0] as u32 == fid::SHARE {
                    Kind::Share
                } else {
                    Kind::Lend
                },
                ipa: Ipa::new(x[1]),
                pages: x[2],
                receiver: x[3],
                perms: x[4],
            },
            fid::RETRIEVE => Self::Retrieve {
                handle: x[1],
                ipa: Ipa::new(x[2]),
                perms: x[3],
            },
            fid::RELINQUISH => Self::Relinquish { handle: x[1] },
            fid::RECLAIM => Self::Reclaim { handle: x[1] },
            fid::QUERY => Self::Query {
                handle: x[1],
                owner: x[2],
            },
            _ => return None,
        })
    }
}

/// The registers x0..x3 a call returns: `Ok` values as the ABI lays them out, an error
/// as its status code in x0 and zeros.
#[must_use]
pub fn result_regs(r: Result<[u64; 3], Error>) -> [u64; 4] {
    match r {
        Ok([x1, x2, x3]) => [0, x1, x2, x3],
        Err(e) => [e.code() as u64, 0, 0, 0],
    }
}
