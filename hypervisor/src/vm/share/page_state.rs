//! The state of each page in a VM's stage 2, kept in the software bits of its entry, and
//! the checks a call makes on a range of pages before it changes anything.

use crate::mem::Ipa;
use mmu::SwBits;

use crate::vm::Stage2Table;

/// State of a mapped page in a VM, kept in the stage-2 software bits \[58:55\] of its
/// entry. Lent and absent pages have no entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageState {
    /// The VM's own RAM page, shared with nobody (`sw` = 0).
    Owned,
    /// The owner's page, shared; the owner keeps its access (`sw` = 1).
    SharedOwned,
    /// Another VM's page mapped into this VM by `RETRIEVE` (`sw` = 2).
    SharedBorrowed,
    /// The VM's own RAM page not scrubbed yet (`sw` = 3), mapped without any access so
    /// that the guest's first touch faults (`crate::vm::ram`).
    NotReady,
}

impl PageState {
    /// The software bits of this state.
    #[must_use]
    pub const fn sw(self) -> SwBits {
        SwBits::truncate(match self {
            Self::Owned => 0,
            Self::SharedOwned => 1,
            Self::SharedBorrowed => 2,
            Self::NotReady => 3,
        })
    }

    /// The state software bits `sw` encode.
    #[must_use]
    pub const fn from_sw(sw: SwBits) -> Option<Self> {
        match sw.bits() {
            0 => Some(Self::Owned),
            1 => Some(Self::SharedOwned),
            2 => Some(Self::SharedBorrowed),
            3 => Some(Self::NotReady),
            _ => None,
        }
    }
}

/// Whether every page of `[ipa, ipa + size)` is mapped in `s2` in state `state`.
pub(super) fn all_in_state<S: Stage2Table>(s2: &S, ipa: Ipa, size: u64, state: PageState) -> bool {
    // A range that wraps holds no pages of any state.
    let Some(end) = ipa.checked_add(size).map(Ipa::get) else {
        return false;
    };
    let walked_ipa = ipa;
    // The walk's mappings are `mmu`'s: raw IPAs in `va`.
    let ipa = ipa.get();
    let mut next = ipa;
    let mut ok = true;
    let walked = s2.walk(walked_ipa, size, &mut |m| {
        let start = m.va.max(ipa);
        if start != next || PageState::from_sw(m.attrs.sw) != Some(state) {
            ok = false;
        }
        // A mapping ends inside the IPA space: the sum cannot saturate.
        next = m.va.saturating_add(m.size).min(end);
    });
    walked.is_ok() && ok && next == end
}

/// Whether nothing is mapped in `s2` in `[ipa, ipa + size)`.
pub(super) fn nothing_mapped<S: Stage2Table>(s2: &S, ipa: Ipa, size: u64) -> bool {
    let mut any = false;
    let walked = s2.walk(ipa, size, &mut |_| any = true);
    walked.is_ok() && !any
}
