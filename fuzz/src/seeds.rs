//! The seed corpus of each target, written by `cargo xtask fuzz --seeds` (the `seeds`
//! example): a few inputs that reach the interesting paths from the start, so that a
//! short run on the committed corpus exercises them.

use crate::mmu_ops::{self, Op};
use crate::{config_dtb, linux_image};

/// Named seed inputs: (file name, bytes).
pub type Seeds = Vec<(String, Vec<u8>)>;

/// Every target's name and seeds.
#[must_use]
pub fn all() -> Vec<(&'static str, Seeds)> {
    vec![
        ("mmu_ops", mmu_ops()),
        ("config_dtb", config_dtb()),
        ("linux_image", linux_image()),
        ("share_calls", share_calls()),
        ("vcpu_exits", vcpu_exits()),
    ]
}

const GIB: u64 = 1 << 30;
const MIB2: u64 = 2 << 20;
const PAGE: u64 = 4096;

fn mmu_ops() -> Seeds {
    let map = |va: u64, pages: u64, flags: mmu::MapFlags| Op::Map {
        va,
        pages,
        out: va + GIB,
        attrs: 0,
        flags,
    };
    // Blocks split by a page unmap and protect, merged back by a map and a coalesce;
    // a GiB block split; a map that runs out of frames half-way.
    let ops = [
        (map(GIB, 1024, mmu::MapFlags::empty()), None),
        (
            Op::Unmap {
                va: GIB + MIB2 + PAGE,
                pages: 1,
            },
            None,
        ),
        (
            Op::Protect {
                va: GIB + 3 * PAGE,
                pages: 2,
                attrs: 1,
            },
            None,
        ),
        (map(GIB + MIB2 + PAGE, 1, mmu::MapFlags::empty()), None),
        (
            Op::Protect {
                va: GIB + 3 * PAGE,
                pages: 2,
                attrs: 0,
            },
            None,
        ),
        (
            Op::Coalesce {
                va: GIB,
                pages: 1024,
            },
            None,
        ),
        (
            Op::SetSw {
                va: GIB,
                pages: 513,
                sw: 5,
            },
            None,
        ),
        (map(0, GIB / PAGE, mmu::MapFlags::REPLACE), None),
        (
            Op::Unmap {
                va: 3 * PAGE,
                pages: 5,
            },
            None,
        ),
        (
            map(2 * GIB + 3 * PAGE, 1536, mmu::MapFlags::NO_BLOCKS),
            Some(2),
        ),
        (map(2 * GIB + 3 * PAGE, 2, mmu::MapFlags::empty()), None),
        (
            Op::Unmap {
                va: 0,
                pages: 2 * GIB / PAGE,
            },
            None,
        ),
    ];
    let records: Vec<u8> = ops
        .iter()
        .flat_map(|&(op, budget)| mmu_ops::encode(op, budget))
        .collect();
    (0..5u8)
        .map(|regime| {
            let mut v = vec![regime, 16, regime & 1];
            v.extend_from_slice(&records);
            (format!("seed-regime{regime}"), v)
        })
        .collect()
}

/// An arm64 Image header: `image_size`, `flags` (bit 0 big endian, bits 2:1 page size,
/// bit 3 anywhere), `text_offset`.
fn image_header(image_size: u64, flags: u64, text_offset: u64) -> Vec<u8> {
    let mut h = vec![0u8; 64];
    h[8..16].copy_from_slice(&text_offset.to_le_bytes());
    h[16..24].copy_from_slice(&image_size.to_le_bytes());
    h[24..32].copy_from_slice(&flags.to_le_bytes());
    h[56..60].copy_from_slice(b"ARM\x64");
    h
}

fn linux_image() -> Seeds {
    const MIB: u64 = 1 << 20;
    let seed = |name: &str, rec: Vec<u8>, head: Vec<u8>, args: &str| {
        let mut v = rec;
        v.extend_from_slice(&head);
        v.extend_from_slice(args.as_bytes());
        (name.to_owned(), v)
    };
    // fields: fixture; RAM base, RAM size, vCPUs, kernel length (option index, raw).
    let linux = [(0, 0), (0, 0), (0, 0), (2, 0), (0, 0), (0, 0)];
    let args = "console=ttyAMA0 earlycon rdinit=/bin/sh";
    vec![
        // Debian's kernel: 256 MiB at 0x4000_0000, two vCPUs, initrd below the DTB,
        // the UART and the GIC passed through.
        seed(
            "seed-debian",
            linux_image::record(linux, 0, (1, 0, 0), (0b0000_0110, 0)),
            image_header(33 * MIB, 0b1010, 0),
            args,
        ),
        // A raw binary with no header, in a 4 MiB RAM, an initrd of raw values.
        seed(
            "seed-raw",
            linux_image::record(
                [(3, 0), (0, 0), (2, 0), (1, 0), (1, 0), (0, 0)],
                0,
                (2, 0x4010_0000, 0x1000),
                (0, 3),
            ),
            vec![0x14; 64],
            "quiet",
        ),
        // An old Image (image_size 0) and one with a text offset, on the 512 MiB
        // single-CPU machine; a big-endian one.
        seed(
            "seed-old-image",
            linux_image::record(
                [(1, 0), (0, 0), (0, 0), (1, 0), (0, 0), (0, 0)],
                0,
                (0, 0, 0),
                (0, 0),
            ),
            image_header(0, 0, 0x8_0000),
            "",
        ),
        seed(
            "seed-text-offset",
            linux_image::record(
                [(0, 0), (2, 0), (1, 0), (4, 0), (0, 0), (0, 0)],
                1,
                (1, 0, 0),
                (0xff, 1),
            ),
            image_header(3 * MIB, 0b0010, 0x20_0000),
            args,
        ),
        seed(
            "seed-big-endian",
            linux_image::record(linux, 0, (0, 0, 0), (0, 0)),
            image_header(33 * MIB, 0b1011, 0),
            args,
        ),
    ]
}

/// A `share_calls` record: call kind (0 SHARE, 1 LEND, 2 RETRIEVE, 3 RELINQUISH,
/// 4 RECLAIM, 5 QUERY, 14 reset, 15 destroy and create again), calling VM slot, first
/// page, page-count or receiver-slot index, receiver VM slot, permissions, handle index
/// (0: the newest).
fn call(kind: u8, by: u8, page: u8, sel: u8, to: u8, perms: u8, handle: u8) -> [u8; 8] {
    [kind, by, page, sel, to, perms, handle, 0]
}

fn share_calls() -> Seeds {
    let calls = [
        // vm0 shares 2 pages with vm1, which retrieves them read-only and asks.
        call(0, 0, 10, 1, 1, 3, 0),
        call(2, 1, 0, 0, 0, 1, 0),
        call(5, 1, 0, 0, 0, 0, 0),
        // vm2 lends 4 pages of its 2 MiB block to vm0 (the block splits), vm0 retrieves
        // them read/write/execute next to the first slot.
        call(1, 2, 40, 3, 0, 7, 0),
        call(2, 0, 0, 2, 0, 7, 0),
        // vm1 gives back, vm0 reclaims; vm0 relinquishes, vm2 reclaims (the block
        // merges again).
        call(3, 1, 0, 0, 0, 0, 1),
        call(4, 0, 0, 0, 0, 0, 1),
        call(3, 0, 0, 0, 0, 0, 0),
        call(4, 2, 0, 0, 0, 0, 0),
        // vm1 shares with vm2, vm2 retrieves, then vm1 is reset and vm2 destroyed
        // and made again mid-transaction.
        call(0, 1, 200, 2, 2, 5, 0),
        call(2, 2, 0, 0, 0, 5, 0),
        call(0, 0, 0, 4, 2, 3, 0),
        call(14, 1, 0, 0, 0, 0, 0),
        call(15, 2, 0, 0, 0, 0, 0),
        call(5, 2, 0, 0, 0, 0, 0xff),
    ];
    vec![("seed-calls".to_owned(), calls.concat())]
}

/// A `vcpu_exits` record with the fields that matter for most seeds: CPU (0: vm0,
/// 1 and 2: vm1's vCPUs 0 and 1, 3: vm2), exception-class index, ISS (25 bits), IPA
/// index, page and offset, function-ID index, three argument indices, PSTATE index, raw
/// value (x4 and raw fields).
#[derive(Clone, Copy, Default)]
struct Exit {
    kind: u8,
    cpu: u8,
    class: u8,
    iss: u32,
    ipa: u8,
    page: u8,
    low: u8,
    fid: u8,
    args: [u8; 3],
    pstate: u8,
    raw: u64,
}

impl Exit {
    fn bytes(self) -> [u8; 24] {
        let mut r = [0u8; 24];
        r[0] = if self.kind == 0 { 3 } else { self.kind };
        r[1] = self.cpu;
        r[2] = self.class;
        r[3] = self.iss as u8;
        r[4] = (self.iss >> 8) as u8;
        r[5] = (self.iss >> 16) as u8;
        // ISS bit 24 (ISV) and IL (32-bit instruction).
        r[6] = ((self.iss >> 24) & 1) as u8 | 0x80;
        r[7] = self.ipa;
        r[8] = self.page;
        r[9] = self.low;
        r[10] = self.fid;
        r[11..14].copy_from_slice(&self.args);
        r[14] = self.pstate;
        r[15] = 1;
        r[16..].copy_from_slice(&self.raw.to_le_bytes());
        r
    }
}

/// An HVC on `cpu` with function-ID index `fid` and argument indices `args`.
fn hvc(cpu: u8, fid: u8, args: [u8; 3], raw: u64) -> Exit {
    Exit {
        cpu,
        fid,
        args,
        raw,
        ..Exit::default()
    }
}

/// A data abort on `cpu` at IPA index `ipa` (+ `low`) with a valid syndrome: register
/// `reg`, `write`, access size 2^`size`, fault status `dfsc`.
fn dabt(cpu: u8, ipa: u8, low: u8, reg: u32, write: bool, size: u32, dfsc: u32) -> Exit {
    Exit {
        cpu,
        class: 5,
        iss: 1 << 24 | size << 22 | reg << 16 | u32::from(write) << 6 | dfsc,
        ipa,
        low,
        ..Exit::default()
    }
}

fn vcpu_exits() -> Seeds {
    // Indices into vcpu_exits' tables.
    let (vm_info, psci_version, cpu_on, cpu_off, affinity) = (18, 0, 3, 2, 4);
    let (system_off, system_reset, share, retrieve, smccc_version) = (6, 7, 21, 23, 10);
    let (zero, one, two, entry, free_ipa, seven) = (0, 1, 2, 4, 7, 10);
    let exits = [
        // vm0: calls, then "ok\n" on the virtual UART and a flag-register read.
        hvc(0, vm_info, [0; 3], 0),
        Exit {
            class: 1,
            ..hvc(0, smccc_version, [0; 3], 0)
        },
        hvc(0, psci_version, [0; 3], 0),
        Exit {
            raw: u64::from(b'o'),
            ..dabt(0, 0, 0, 4, true, 0, 7)
        },
        Exit {
            raw: u64::from(b'\n'),
            ..dabt(0, 0, 0, 4, true, 0, 7)
        },
        dabt(0, 0, 0x18, 7, false, 2, 7),
        // vm1: vCPU 0 starts vCPU 1, which asks who it is and turns itself off.
        hvc(1, cpu_on, [one, entry, seven], 0),
        hvc(2, vm_info, [0; 3], 0),
        hvc(1, affinity, [one, zero, zero], 0),
        hvc(2, cpu_off, [0; 3], 0),
        // vm2: shares two pages with vm0, which retrieves them; an access to nothing
        // from EL0 gets an abort injected; an SError stops vm2.
        hvc(3, share, [entry, two, zero], 3),
        hvc(0, retrieve, [one, free_ipa, one], 0),
        Exit {
            pstate: 2,
            ..dabt(3, 5, 0, 1, false, 3, 6)
        },
        Exit {
            kind: 2,
            cpu: 3,
            ..Exit::default()
        },
        // vm0 resets and starts again; vm1 powers off with vCPU 1 off, and comes back.
        hvc(0, system_reset, [0; 3], 0),
        Exit {
            class: 4,
            ..hvc(0, 0, [0; 3], 0)
        },
        hvc(1, system_off, [0; 3], 0),
        hvc(1, vm_info, [0; 3], 0),
        // vm1 reads nothing: stopped (its abort policy).
        dabt(1, 5, 0, 1, false, 3, 7),
    ];
    let bytes: Vec<u8> = exits.iter().flat_map(|e| e.bytes()).collect();
    vec![("seed-exits".to_owned(), bytes)]
}

fn config_dtb() -> Seeds {
    let mut seeds = Vec::new();
    for (i, f) in config_dtb::FIXTURES.iter().enumerate() {
        let mut raw = vec![0u8];
        raw.extend_from_slice(f);
        seeds.push((format!("seed-fixture{i}"), raw));
        // The fixture with one small cell value changed near its start (header and
        // first properties): the edit mode.
        let mut edited = vec![1u8, i as u8];
        edited.extend_from_slice(&[0x40, 0, 0, 1, 2, 0, 0, 0]);
        seeds.push((format!("seed-fixture{i}-edit"), edited));
    }
    seeds
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mmu_records_decode_to_the_seed_operations() {
        let op = Op::Map {
            va: 2 * GIB + 3 * PAGE,
            pages: 1536,
            out: 3 * GIB + 3 * PAGE,
            attrs: 2,
            flags: mmu::MapFlags::NO_BLOCKS,
        };
        assert_eq!(mmu_ops::decode(mmu_ops::encode(op, Some(2))), (op, Some(2)));
        let whole = Op::Map {
            va: GIB,
            pages: 2 * GIB / PAGE,
            out: 2 * GIB,
            attrs: 4,
            flags: mmu::MapFlags::REPLACE,
        };
        assert_eq!(mmu_ops::decode(mmu_ops::encode(whole, None)), (whole, None));
        let coalesce = Op::Coalesce {
            va: GIB,
            pages: 1024,
        };
        assert_eq!(
            mmu_ops::decode(mmu_ops::encode(coalesce, None)),
            (coalesce, None)
        );
        let sw = Op::SetSw {
            va: GIB,
            pages: 513,
            sw: 5,
        };
        assert_eq!(mmu_ops::decode(mmu_ops::encode(sw, None)), (sw, None));
    }

    #[test]
    fn every_seed_runs_clean() {
        for (target, seeds) in all() {
            for (name, bytes) in seeds {
                eprintln!("{target}/{name}");
                crate::run(target, &bytes);
            }
        }
    }
}

#[cfg(test)]
mod corpus {
    /// Every committed corpus entry (seeds and the inputs of fixed crashes) runs clean.
    #[test]
    fn committed_corpus_runs_clean() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
        let mut n = 0;
        for (target, _) in super::all() {
            let Ok(entries) = std::fs::read_dir(dir.join(target)) else {
                continue;
            };
            for e in entries.flatten() {
                let Ok(data) = std::fs::read(e.path()) else {
                    continue;
                };
                eprintln!("{}", e.path().display());
                crate::run(target, &data);
                n += 1;
            }
        }
        assert!(n > 0, "no corpus entry found");
    }
}
