//! SMCCC dispatch of guest `HVC`/`SMC` calls (Arm DEN 0028): Arm architecture calls,
//! PSCI (Arm DEN 0022) and the twostage vendor-specific hypervisor service.
//! The function IDs and every value returned here are documented in `docs/hypercalls.md`.

use super::cpu_state::spectre::{self, Mitigations};
use crate::mem::Ipa;
use crate::vm::psci::{PsciError, PsciVm};
use smccc::arch as smccc_arch;
use smccc::psci as p;

/// SMCCC version implemented: 1.1 (`major << 16 | minor`).
pub const SMCCC_VERSION_1_1: u64 = 0x1_0001;
/// PSCI version implemented: 1.1.
pub const PSCI_VERSION_1_1: u64 = 0x1_0001;

/// SMCCC `NOT_SUPPORTED` (-1) as returned in x0.
pub const NOT_SUPPORTED: u64 = smccc_arch::error::NOT_SUPPORTED as i64 as u64;

/// Vendor-specific hypervisor service (owning entity 6): function IDs.
pub mod vendor {
    /// Call count query: x0 = number of vendor calls (below).
    pub const CALL_COUNT: u32 = 0x8600_FF00;
    /// UID query: x0..x3 = the twostage service UUID, 32 bits each.
    pub const CALL_UID: u32 = 0x8600_FF01;
    /// Revision query: x0 = major, x1 = minor.
    pub const REVISION: u32 = 0x8600_FF03;
    /// "Which VM am I": x0 = 0, x1 = VM id, x2 = VMID, x3 = vCPU index.
    pub const VM_INFO: u32 = 0xC600_0001;
    /// VM name: x0 = name length in bytes, x1..x3 = its first 24 bytes (little-endian).
    pub const VM_NAME: u32 = 0xC600_0002;
    /// Boot count: x0 = 0, x1 = how many times the VM was started (1, then +1 for each
    /// `SYSTEM_RESET`).
    pub const VM_BOOTS: u32 = 0xC600_0003;
    /// The vendor calls of the service (what `CALL_COUNT` counts): these three and the
    /// memory-sharing calls (`crate::vm::share::fid`).
    pub const CALLS: &[u32] = &[
        VM_INFO,
        VM_NAME,
        VM_BOOTS,
        crate::vm::share::fid::SHARE,
        crate::vm::share::fid::LEND,
        crate::vm::share::fid::RETRIEVE,
        crate::vm::share::fid::RELINQUISH,
        crate::vm::share::fid::RECLAIM,
        crate::vm::share::fid::QUERY,
    ];
    /// Service UID `8b3f1f5e-2a7c-4d10-9b61-74776f737467`, as four 32-bit words in
    /// SMCCC order (x0 = bytes 0-3 little-endian, ...).
    pub const UID: [u32; 4] = [0x5e1f_3f8b, 0x104d_7c2a, 0x7774_619b, 0x6774_736f];
    /// Service revision (major, minor).
    pub const REVISION_VALUE: (u32, u32) = (1, 0);
}

/// Who is calling: the identity a vendor call reports and the memory a PSCI entry point
/// must lie in.
#[derive(Clone, Copy, Debug)]
pub struct Caller<'a> {
    /// VM id (index in the description, stable for the VM's life).
    pub vm_id: u32,
    /// Hardware VMID.
    pub vmid: u16,
    /// Calling vCPU.
    pub vcpu: usize,
    /// VM name.
    pub name: &'a str,
    /// How many times the VM was started.
    pub boots: u32,
    /// What this CPU needs against branch-predictor attacks (SMCCC workaround answers).
    pub spectre: Mitigations,
}

/// What the run loop must do after a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Write x0..x3 and resume the guest.
    Return([u64; 4]),
    /// The calling vCPU turned itself off (PSCI `CPU_OFF` succeeded).
    CpuOff,
    /// The VM asked to power off (`SYSTEM_OFF`).
    SystemOff,
    /// The VM asked to be reset (`SYSTEM_RESET`).
    SystemReset,
    /// A memory-sharing call: the run loop executes it (`crate::vm::VmManager::share_call`,
    /// without the VM's PSCI state locked) and writes x0..x3.
    Share(crate::vm::share::Request),
}

fn ret(x0: u64) -> Outcome {
    Outcome::Return([x0, 0, 0, 0])
}

fn psci_result(r: Result<(), PsciError>) -> Outcome {
    match r {
        Ok(()) => ret(0),
        Err(e) => ret(i64::from(e.code()) as u64),
    }
}

/// PSCI functions this emulation implements (for `PSCI_FEATURES`).
const PSCI_IMPLEMENTED: &[u32] = &[
    p::PSCI_VERSION,
    p::PSCI_CPU_OFF,
    p::PSCI_CPU_ON_32,
    p::PSCI_CPU_ON_64,
    p::PSCI_AFFINITY_INFO_32,
    p::PSCI_AFFINITY_INFO_64,
    p::PSCI_SYSTEM_OFF,
    p::PSCI_SYSTEM_RESET,
    p::PSCI_FEATURES,
    smccc_arch::SMCCC_VERSION,
];

/// Handles one SMCCC call. `x` holds the guest's x0..x7 at the call; `psci` is the VM's
/// vCPU power state (locked by the caller); `entry_ok` tells whether an IPA lies in the
/// VM's RAM. Every function ID not listed in `docs/hypercalls.md` returns
/// `NOT_SUPPORTED`.
pub fn dispatch(
    x: &[u64; 8],
    caller: &Caller<'_>,
    psci: &mut PsciVm,
    entry_ok: impl Fn(Ipa) -> bool,
) -> Outcome {
    // SMCCC: the function ID is w0; the upper half of x0 is ignored.
    let fid = x[0] as u32;
    // SMC32/HVC32 calls (bit 30 clear) take 32-bit arguments.
    let args = x.map(|v| {
        if fid & (1 << 30) == 0 {
            v & 0xffff_ffff
        } else {
            v
        }
    });
    match fid {
        smccc_arch::SMCCC_VERSION => ret(SMCCC_VERSION_1_1),
        smccc_arch::SMCCC_ARCH_FEATURES => match args[1] as u32 {
            smccc_arch::SMCCC_VERSION | smccc_arch::SMCCC_ARCH_FEATURES => ret(0),
            smccc_arch::SMCCC_ARCH_WORKAROUND_1 => ret(spectre::features_wa1(&caller.spectre)),
            smccc_arch::SMCCC_ARCH_WORKAROUND_2 => ret(spectre::features_wa2(&caller.spectre)),
            smccc_arch::SMCCC_ARCH_WORKAROUND_3 => ret(spectre::features_wa3(&caller.spectre)),
            _ => ret(NOT_SUPPORTED),
        },
        // The call itself did the work: it entered EL2 through the entry mitigation
        // (or the CPU needs none). Offered only where the discovery call says so.
        smccc_arch::SMCCC_ARCH_WORKAROUND_1 | smccc_arch::SMCCC_ARCH_WORKAROUND_3 => {
            let offered = if fid == smccc_arch::SMCCC_ARCH_WORKAROUND_1 {
                spectre::features_wa1(&caller.spectre)
            } else {
                spectre::features_wa3(&caller.spectre)
            };
            ret(if offered == NOT_SUPPORTED {
                NOT_SUPPORTED
            } else {
                0
            })
        }
        p::PSCI_VERSION => ret(PSCI_VERSION_1_1),
        p::PSCI_FEATURES => {
            if PSCI_IMPLEMENTED.contains(&(args[1] as u32)) {
                ret(0)
            } else {
                ret(NOT_SUPPORTED)
            }
        }
        p::PSCI_CPU_ON_32 | p::PSCI_CPU_ON_64 => {
            let entry = Ipa::new(args[2]);
            psci_result(psci.cpu_on(args[1], entry, args[3], entry_ok(entry)))
        }
        p::PSCI_CPU_OFF => match psci.cpu_off(caller.vcpu) {
            Ok(()) => Outcome::CpuOff,
            Err(e) => psci_result(Err(e)),
        },
        p::PSCI_AFFINITY_INFO_32 | p::PSCI_AFFINITY_INFO_64 => {
            match psci.affinity_info(args[1], args[2]) {
                Ok(state) => ret(state as u64),
                Err(e) => psci_result(Err(e)),
            }
        }
        p::PSCI_SYSTEM_OFF => Outcome::SystemOff,
        p::PSCI_SYSTEM_RESET => Outcome::SystemReset,
        vendor::CALL_COUNT => ret(vendor::CALLS.len() as u64),
        vendor::CALL_UID => {
            let u = vendor::UID.map(u64::from);
            Outcome::Return(u)
        }
        vendor::REVISION => Outcome::Return([
            u64::from(vendor::REVISION_VALUE.0),
            u64::from(vendor::REVISION_VALUE.1),
            0,
            0,
        ]),
        vendor::VM_INFO => Outcome::Return([
            0,
            u64::from(caller.vm_id),
            u64::from(caller.vmid),
            caller.vcpu as u64,
        ]),
        vendor::VM_BOOTS => Outcome::Return([0, u64::from(caller.boots), 0, 0]),
        vendor::VM_NAME => {
            let bytes = caller.name.as_bytes();
            // The first 24 bytes, eight to a register, the first in the low byte.
            let mut words = [0u64; 3];
            for (word, chunk) in words.iter_mut().zip(bytes.chunks(8)) {
                let mut le = [0u8; 8];
                for (d, s) in le.iter_mut().zip(chunk) {
                    *d = *s;
                }
                *word = u64::from_le_bytes(le);
            }
            Outcome::Return([bytes.len() as u64, words[0], words[1], words[2]])
        }
        _ => crate::vm::share::Request::decode(x).map_or(ret(NOT_SUPPORTED), Outcome::Share),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CALLER: Caller<'static> = Caller {
        vm_id: 3,
        vmid: 17,
        vcpu: 0,
        name: "guest-a",
        boots: 2,
        // QEMU's cortex-a57: no firmware workaround, the BHB loop at EL2 entry.
        spectre: Mitigations {
            v2: spectre::State::Vulnerable,
            bhb: spectre::State::Mitigated,
            v4: spectre::State::Vulnerable,
            bhb_loop: 8,
            firmware_wa1: false,
        },
    };

    fn call(psci: &mut PsciVm, regs: &[u64]) -> Outcome {
        let mut x = [0u64; 8];
        x[..regs.len()].copy_from_slice(regs);
        dispatch(&x, &CALLER, psci, |ipa| {
            (0x4000_0000..0x4010_0000).contains(&ipa.get())
        })
    }

    fn x0(o: Outcome) -> i64 {
        match o {
            Outcome::Return(r) => r[0] as i64,
            other => panic!("expected a return, got {other:?}"),
        }
    }

    #[test]
    fn versions_and_features() {
        let mut ps = PsciVm::new(1);
        assert_eq!(x0(call(&mut ps, &[0x8000_0000])), 0x1_0001);
        assert_eq!(x0(call(&mut ps, &[0x8400_0000])), 0x1_0001);
        assert_eq!(x0(call(&mut ps, &[0x8400_000A, 0xC400_0003])), 0);
        assert_eq!(x0(call(&mut ps, &[0x8400_000A, 0x8000_0000])), 0);
        assert_eq!(
            x0(call(&mut ps, &[0x8400_000A, 0xC400_0001])),
            -1,
            "no CPU_SUSPEND"
        );
        assert_eq!(
            x0(call(&mut ps, &[0x8000_0001, 0x8000_8000])),
            -1,
            "v2 cannot be mitigated without firmware"
        );
        assert_eq!(x0(call(&mut ps, &[0x8000_0001, 0x8000_0001])), 0);
        // The upper half of x0 is ignored.
        assert_eq!(x0(call(&mut ps, &[0xffff_ffff_8000_0000])), 0x1_0001);
    }

    #[test]
    fn unknown_ids_are_not_supported() {
        let mut ps = PsciVm::new(1);
        for fid in [
            0u64,
            0xC600_0000,
            0xC600_0004,
            0x8600_FF02,
            0x8400_0001,
            0xC400_0012,
        ] {
            assert_eq!(x0(call(&mut ps, &[fid])), -1, "fid {fid:#x}");
        }
    }

    #[test]
    fn vendor_calls() {
        let mut ps = PsciVm::new(1);
        assert_eq!(
            call(&mut ps, &[0xC600_0001]),
            Outcome::Return([0, 3, 17, 0])
        );
        assert_eq!(
            x0(call(&mut ps, &[0x8600_FF00])),
            9,
            "3 + 6 memory-sharing calls"
        );
        assert_eq!(call(&mut ps, &[0xC600_0003]), Outcome::Return([0, 2, 0, 0]));
        let Outcome::Return(uid) = call(&mut ps, &[0x8600_FF01]) else {
            panic!()
        };
        assert_eq!(uid, vendor::UID.map(u64::from));
        assert_eq!(call(&mut ps, &[0x8600_FF03]), Outcome::Return([1, 0, 0, 0]));
        let Outcome::Return(name) = call(&mut ps, &[0xC600_0002]) else {
            panic!()
        };
        assert_eq!(name[0], 7);
        assert_eq!(&name[1].to_le_bytes()[..7], b"guest-a");
        assert_eq!(name[1].to_le_bytes()[7], 0);
    }

    #[test]
    fn a_long_name_gives_its_length_and_first_24_bytes() {
        let name = "abcdefgh-ijklmnop-qrstuvwx-yz0123";
        let caller = Caller { name, ..CALLER };
        let mut x = [0u64; 8];
        x[0] = u64::from(vendor::VM_NAME);
        let out = dispatch(&x, &caller, &mut PsciVm::new(1), |_| false);
        let word = |s: &str| u64::from_le_bytes(s.as_bytes().try_into().expect("8 bytes"));
        assert_eq!(
            out,
            Outcome::Return([33, word("abcdefgh"), word("-ijklmno"), word("p-qrstuv")])
        );
    }

    #[test]
    fn memory_sharing_calls_are_handed_to_the_run_loop() {
        use crate::vm::share::abi::Kind;
        use crate::vm::share::Request;
        let mut ps = PsciVm::new(1);
        assert_eq!(
            call(&mut ps, &[0xC600_0011, 0x4000_0000, 2, 1, 3]),
            Outcome::Share(Request::Give {
                kind: Kind::Lend,
                ipa: crate::mem::Ipa::new(0x4000_0000),
                pages: 2,
                receiver: 1,
                perms: 3
            })
        );
        assert_eq!(
            call(&mut ps, &[0xFFFF_0000_C600_0012, 5, 0x8000_0000, 1]),
            Outcome::Share(Request::Retrieve {
                handle: 5,
                ipa: crate::mem::Ipa::new(0x8000_0000),
                perms: 1
            }),
            "the upper half of x0 is ignored"
        );
        assert_eq!(
            call(&mut ps, &[0xC600_0015]),
            Outcome::Share(Request::Query {
                handle: 0,
                owner: 0
            })
        );
        // DONATE is not offered, nor 32-bit forms of the calls.
        for fid in [0xC600_0016u64, 0x8600_0010, 0xC600_0017, 0xC600_000F] {
            assert_eq!(x0(call(&mut ps, &[fid])), -1, "fid {fid:#x}");
        }
    }

    #[test]
    fn psci_cpu_on_through_dispatch() {
        let mut ps = PsciVm::new(2);
        ps.power_on(0, Ipa::new(0x4000_0000), 0).expect("boot");
        ps.take_pending(0);
        assert_eq!(x0(call(&mut ps, &[0xC400_0003, 1, 0x9000_0000, 5])), -9);
        assert_eq!(x0(call(&mut ps, &[0xC400_0003, 7, 0x4000_1000, 5])), -2);
        assert_eq!(
            x0(call(&mut ps, &[0xC400_0003, 1, 0x4000_1002, 5])),
            -9,
            "unaligned entry"
        );
        assert_eq!(x0(call(&mut ps, &[0xC400_0004, 1, 0])), 1, "still off");
        assert_eq!(x0(call(&mut ps, &[0xC400_0003, 1, 0x4000_1000, 5])), 0);
        assert_eq!(
            x0(call(&mut ps, &[0xC400_0004, 1, 0])),
            0,
            "ON from the successful CPU_ON on, before the target's CPU takes the start"
        );
        assert_eq!(
            x0(call(&mut ps, &[0xC400_0003, 1, 0x4000_2000, 6])),
            -4,
            "a second CPU_ON to a pending target is ALREADY_ON"
        );
        assert_eq!(ps.take_pending(1), Some((Ipa::new(0x4000_1000), 5)));
        assert_eq!(x0(call(&mut ps, &[0xC400_0004, 1, 0])), 0);
        // 32-bit CPU_ON truncates its arguments.
        assert_eq!(
            x0(call(&mut ps, &[0x8400_0003, 0xffff_ffff_0000_0001, 0, 0])),
            -4
        );
        assert_eq!(call(&mut ps, &[0x8400_0002]), Outcome::CpuOff);
        assert_eq!(call(&mut ps, &[0x8400_0008]), Outcome::SystemOff);
        assert_eq!(call(&mut ps, &[0x8400_0009]), Outcome::SystemReset);
    }

    #[test]
    fn cpu_off_when_not_on_is_denied() {
        let mut ps = PsciVm::new(1);
        assert_eq!(x0(call(&mut ps, &[0x8400_0002])), -3);
    }

    /// `SMCCC_ARCH_FEATURES` of the three workarounds, and the calls, for CPUs of each
    /// kind (DEN 0028: 0 = implemented and needed, 1 = not needed, -1 = not supported,
    /// -2 = not required for workaround 2).
    #[test]
    fn workaround_discovery_follows_the_cpu() {
        let mut ps = PsciVm::new(1);
        let ask = |ps: &mut PsciVm, caller: &Caller<'_>, x: &[u64]| {
            let mut regs = [0u64; 8];
            regs[..x.len()].copy_from_slice(x);
            x0(dispatch(&regs, caller, ps, |_| true))
        };
        let cases = [
            // (MIDR, ID_AA64PFR0_EL1, firmware WA_1) -> (WA_1, WA_2, WA_3)
            (0x411f_d070, 0x2222, false, (-1, -1, -1)), // A57 on QEMU
            (0x411f_d070, 0x2222, true, (0, -1, 0)),    // A57 with TF-A
            (0x410f_d034, 0x2222, false, (1, -2, 1)),   // A53
            (0x000f_0510, 2 << 56, false, (1, -1, -1)), // max: CSV2, BHB unknown
            (0x414f_d0b1, 1 << 56, false, (1, -1, 0)),  // A76: CSV2, BHB loop
        ];
        for (midr, pfr0, fw, (w1, w2, w3)) in cases {
            let caller = Caller {
                spectre: Mitigations::for_cpu(midr, pfr0, 0, 0, fw),
                ..CALLER
            };
            let got = (
                ask(&mut ps, &caller, &[0x8000_0001, 0x8000_8000]),
                ask(&mut ps, &caller, &[0x8000_0001, 0x8000_7fff]),
                ask(&mut ps, &caller, &[0x8000_0001, 0x8000_3fff]),
            );
            assert_eq!(got, (w1, w2, w3), "MIDR {midr:#x}");
            // Calling a workaround that is offered (0 or 1) returns 0.
            let call1 = ask(&mut ps, &caller, &[0x8000_8000]);
            assert_eq!(call1, if w1 == -1 { -1 } else { 0 }, "MIDR {midr:#x}");
        }
    }
}
