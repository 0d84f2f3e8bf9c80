//! A kernel as the hypervisor's guest (`docs/linux-guest.md`): where its RAM is, where
//! QEMU stages the kernel and initramfs, and the VM node that says so.
//!
//! The guest's RAM starts at the guest-RAM range of `docs/memory-map.md` and is
//! identity-mapped (IPA = PA); the kernel goes where the hypervisor's own Image parser
//! puts it (`hypervisor::linux::image`), which the hypervisor checks against
//! `kernel-ipa`.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use hypervisor::linux::image::{place_kernel, HEADER_LEN, IMAGE_BASE_ALIGN};
use hypervisor::mem::layout::{GUEST_RAM, STAGING};

use crate::dt::Node;
use crate::qemu::Load;
use crate::size::Size;
use crate::vm::{AbortPolicy, Ram, Stage2Mappings, Staged, VmNode};

/// The smallest guest RAM accepted.
pub const MIN_RAM: Size = Size::mib(16);
/// IPA of the virtual PL011 every kernel guest gets: where QEMU virt has its PL011, so
/// `console=ttyAMA0` and earlycon addresses work unchanged.
pub const VUART_IPA: u64 = 0x0900_0000;

/// A kernel guest, as the user asked for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelGuest {
    /// The kernel: an arm64 Image, or a raw binary.
    pub kernel: PathBuf,
    /// Its initramfs.
    pub initrd: Option<PathBuf>,
    /// Its command line.
    pub append: String,
    /// vCPUs (on physical CPUs 0..cpus).
    pub cpus: u32,
    /// RAM.
    pub mem: Size,
    /// Devices passed through (host DT paths); the console and the GIC are the VM's
    /// own virtual ones.
    pub devices: Vec<String>,
    /// What an access to an IPA with nothing behind it does.
    pub abort_policy: AbortPolicy,
    /// How stage 2 maps the RAM.
    pub stage2: Stage2Mappings,
}

/// The VM node and the files QEMU stages for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The VM.
    pub vm: VmNode,
    /// Kernel, then initramfs.
    pub loads: Vec<Load>,
}

fn align_up(v: u64, align: u64) -> u64 {
    v.div_ceil(align) * align
}

fn file_len(path: &Path, what: &str) -> Result<u64, String> {
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("no {what} file '{}' ({e})", path.display()))?;
    if !meta.is_file() {
        return Err(format!("the {what} '{}' is not a file", path.display()));
    }
    Ok(meta.len())
}

impl KernelGuest {
    /// Lays the guest out and writes its VM node. `machine` is the device tree of the
    /// machine it will run on (to check `devices`).
    ///
    /// # Errors
    ///
    /// A one-line message for a file that is missing, a size that does not fit, a
    /// device the machine does not have, or a kernel the hypervisor would refuse.
    pub fn plan(&self, machine: &Node) -> Result<Plan, String> {
        let (ram_base, ram_max) = (GUEST_RAM.base, GUEST_RAM.size);
        let (staging, staging_size) = (STAGING.base, STAGING.size);
        let mem = self.mem.0;
        if mem < MIN_RAM.0 || mem % IMAGE_BASE_ALIGN != 0 {
            return Err(format!(
                "--mem {} is not a multiple of 2M of at least {MIN_RAM}",
                self.mem
            ));
        }
        if mem > ram_max {
            return Err(format!(
                "--mem {} is more than the {} of guest RAM (docs/memory-map.md)",
                self.mem,
                Size(ram_max)
            ));
        }
        if self.cpus == 0 {
            return Err("--cpus must be at least 1".into());
        }
        let klen = file_len(&self.kernel, "kernel")?;
        let mut head = Vec::with_capacity(HEADER_LEN);
        File::open(&self.kernel)
            .and_then(|f| f.take(HEADER_LEN as u64).read_to_end(&mut head))
            .map_err(|e| format!("cannot read {}: {e}", self.kernel.display()))?;
        let placed = place_kernel(&head, klen, ram_base, mem).map_err(|e| {
            format!(
                "{} cannot boot in {} of RAM: {e:?}",
                self.kernel.display(),
                self.mem
            )
        })?;
        let ram_end = ram_base + mem;
        let mut loads = vec![Load {
            file: self.kernel.clone(),
            addr: staging,
        }];
        let mut next = align_up(staging + klen, IMAGE_BASE_ALIGN);
        let initrd = match &self.initrd {
            None => None,
            Some(path) => {
                let ilen = file_len(path, "initrd")?;
                // Just below the top 2 MiB of RAM, where the hypervisor puts the guest DTB.
                let ipa = ram_end
                    .checked_sub(IMAGE_BASE_ALIGN + align_up(ilen, IMAGE_BASE_ALIGN))
                    .filter(|&ipa| ipa >= placed.end)
                    .ok_or_else(|| {
                        format!(
                            "kernel and initrd do not fit in {} of RAM: give --mem more",
                            self.mem
                        )
                    })?;
                let staged = Staged {
                    pa: next,
                    size: ilen,
                    ipa,
                };
                loads.push(Load {
                    file: path.clone(),
                    addr: next,
                });
                next = align_up(next + ilen, IMAGE_BASE_ALIGN);
                Some(staged)
            }
        };
        // The hypervisor stages the guest DTB it builds in the last 2 MiB.
        if next > staging + staging_size - IMAGE_BASE_ALIGN {
            return Err(format!(
                "kernel and initrd are larger than the {} staging range (docs/memory-map.md)",
                Size(staging_size - IMAGE_BASE_ALIGN)
            ));
        }
        let mut devices: Vec<String> = Vec::new();
        for d in &self.devices {
            if machine.find(d).is_none() {
                return Err(format!("--device {d}: the machine has no such node"));
            }
            if !devices.contains(d) {
                devices.push(d.clone());
            }
        }
        let mut vm = VmNode::new(
            "linux",
            &(0..self.cpus).collect::<Vec<_>>(),
            Ram {
                ipa: ram_base,
                pa: ram_base,
                size: mem,
            },
            Staged {
                pa: staging,
                size: klen,
                ipa: placed.load,
            },
        );
        vm.node = "linux-vm".into();
        vm.initrd = initrd;
        vm.bootargs = Some(self.append.clone());
        vm.devices = devices;
        vm.vuart = Some(VUART_IPA);
        vm.abort_policy = Some(self.abort_policy);
        vm.stage2 = Some(self.stage2);
        Ok(Plan { vm, loads })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const MIB: u64 = 1 << 20;

    fn machine() -> Node {
        let mut root = Node::new("");
        let mut gic = Node::new("intc@8000000");
        gic.set_strs("compatible", &["arm,gic-v3"]);
        root.children = vec![
            Node::new("pl011@9000000"),
            gic,
            Node::new("virtio_mmio@a000000"),
        ];
        root
    }

    struct TempFile(PathBuf);
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn file(name: &str, bytes: &[u8]) -> TempFile {
        let path = std::env::temp_dir().join(format!("xtask-{}-{name}", std::process::id()));
        std::fs::File::create(&path)
            .and_then(|mut f| f.write_all(bytes))
            .expect("temporary file");
        TempFile(path)
    }

    /// An arm64 Image header (booting.rst) with `text_offset` and `image_size`.
    fn image(text_offset: u64, image_size: u64, len: usize) -> Vec<u8> {
        let mut h = vec![0u8; len.max(64)];
        h[8..16].copy_from_slice(&text_offset.to_le_bytes());
        h[16..24].copy_from_slice(&image_size.to_le_bytes());
        h[24..32].copy_from_slice(&2u64.to_le_bytes());
        h[56..60].copy_from_slice(b"ARM\x64");
        h
    }

    fn guest(kernel: &Path) -> KernelGuest {
        KernelGuest {
            kernel: kernel.into(),
            initrd: None,
            append: "console=ttyAMA0".into(),
            cpus: 2,
            mem: Size::mib(256),
            devices: Vec::new(),
            abort_policy: AbortPolicy::Inject,
            stage2: Stage2Mappings::Pages,
        }
    }

    #[test]
    fn an_image_is_placed_at_its_text_offset_and_an_initrd_below_the_dtb_area() {
        let k = file("k", &image(0x20_0000, 40 * MIB, 5 * MIB as usize + 3));
        let i = file("i", &[7; 3 * MIB as usize + 1]);
        let mut g = guest(&k.0);
        g.initrd = Some(i.0.clone());
        let plan = g.plan(&machine()).expect("plans");
        let base = GUEST_RAM.base;
        let staging = STAGING.base;
        assert_eq!(plan.vm.kernel.ipa, base + 0x20_0000);
        assert_eq!(plan.vm.kernel.pa, staging);
        assert_eq!(plan.vm.kernel.size, 5 * MIB + 3);
        let initrd = plan.vm.initrd.expect("initrd");
        // Staged at the first 2 MiB boundary after the kernel; in RAM, 4 MiB (its size
        // rounded up) below the top 2 MiB.
        assert_eq!(initrd.pa, staging + 6 * MIB);
        assert_eq!(initrd.ipa, base + 256 * MIB - 2 * MIB - 4 * MIB);
        assert_eq!(plan.loads.len(), 2);
        assert_eq!(plan.loads[1].addr, initrd.pa);
        assert_eq!(plan.vm.cpus, [0, 1]);
        assert!(plan.vm.devices.is_empty(), "no GIC, no host console");
        assert_eq!(plan.vm.vuart, Some(0x0900_0000));
        assert_eq!(plan.vm.memory[0].pa, plan.vm.memory[0].ipa);
    }

    #[test]
    fn a_raw_binary_goes_where_qemus_loader_puts_one() {
        let k = file("raw", &[0x14, 0, 0, 0]);
        let plan = guest(&k.0).plan(&machine()).expect("plans");
        assert_eq!(plan.vm.kernel.ipa, GUEST_RAM.base + 0x8_0000);
    }

    #[test]
    fn bad_requests_are_one_line_errors() {
        let k = file("k2", &image(0x20_0000, 8 * MIB, 4096));
        let m = machine();
        let err = |g: KernelGuest| g.plan(&m).expect_err("refused");
        let mut g = guest(&k.0);
        g.mem = Size::mib(15);
        assert!(err(g).contains("at least 16M"));
        let mut g = guest(&k.0);
        g.mem = Size(GUEST_RAM.size + 2 * MIB);
        assert!(err(g).contains("more than the 512M of guest RAM"));
        let mut g = guest(&k.0);
        g.mem = Size(17 * MIB);
        assert!(err(g).contains("multiple of 2M"));
        let mut g = guest(&k.0);
        g.cpus = 0;
        assert!(err(g).contains("--cpus"));
        let g = guest(Path::new("/no/such/kernel"));
        assert!(err(g).contains("no kernel file '/no/such/kernel'"));
        let mut g = guest(&k.0);
        g.initrd = Some("/no/such/initrd".into());
        assert!(err(g).contains("no initrd file"));
        let mut g = guest(&k.0);
        g.devices = vec!["/nothing@0".into()];
        assert!(err(g).contains("--device /nothing@0: the machine has no such node"));
        let big = file("big-initrd", &vec![0; 20 * MIB as usize]);
        let mut g = guest(&k.0);
        g.mem = Size::mib(16);
        g.initrd = Some(big.0.clone());
        assert!(err(g).contains("do not fit in 16M of RAM"));
        let be = {
            let mut h = image(0, 8 * MIB, 64);
            h[24] |= 1;
            file("be", &h)
        };
        assert!(err(guest(&be.0)).contains("BigEndian"));
    }

    #[test]
    fn extra_devices_are_added_once() {
        let k = file("k3", &image(0, 8 * MIB, 64));
        let mut g = guest(&k.0);
        g.devices = vec!["/virtio_mmio@a000000".into(), "/virtio_mmio@a000000".into()];
        let plan = g.plan(&machine()).expect("plans");
        assert_eq!(plan.vm.devices, ["/virtio_mmio@a000000"]);
    }
}
