//! A kernel as the hypervisor's guest, once or several times side by side
//! (`docs/linux-guest.md`): where each VM's RAM is, the kernel and initramfs as files of
//! QEMU's fw-cfg device (once, for every VM), and the VM nodes that say so.
//!
//! Each VM's RAM is identity-mapped (IPA = PA) at the first free place of the machine's
//! RAM, from `hypervisor::mem::layout::GUEST_RAM_BASE` on, around the staging range
//! (`docs/memory-map.md`); the kernel goes where the hypervisor's own Image parser
//! puts it (`hypervisor::linux::image`), which the hypervisor checks against
//! `kernel-ipa`. The hypervisor fetches both files by DMA straight into each VM's RAM,
//! at creation and at every reset: nothing is staged, and their size is not bounded by
//! the staging range. VM *i* runs on physical CPUs `i * cpus ..`.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use hypervisor::linux::image::{place_kernel, HEADER_LEN, IMAGE_BASE_ALIGN};
use hypervisor::mem::layout;

/// [`layout::GUEST_RAM_BASE`], as the raw address the device tree writer takes.
const GUEST_RAM_BASE: u64 = layout::GUEST_RAM_BASE.get();
/// Start and size of [`layout::STAGING`], raw.
const STAGING_BASE: u64 = layout::STAGING.base.get();
const STAGING_SIZE: u64 = layout::STAGING.size;

use crate::dt::Node;
use crate::qemu::FwCfgFile;
use crate::size::Size;
use crate::vm::{AbortPolicy, Fetched, Ram, Stage2Mappings, VmNode};

/// The fw-cfg name of the kernel.
pub const KERNEL_FILE: &str = "opt/twostage/kernel";
/// The fw-cfg name of the initramfs.
pub const INITRD_FILE: &str = "opt/twostage/initrd";

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
    /// vCPUs of each VM (VM *i* on physical CPUs `i * cpus .. (i + 1) * cpus`).
    pub cpus: u32,
    /// RAM of each VM.
    pub mem: Size,
    /// How many VMs boot the kernel side by side (`linux` for one; `linux0`, `linux1`, ...
    /// for more).
    pub count: u32,
    /// Devices passed through (host DT paths); the console and the GIC are the VM's
    /// own virtual ones.
    pub devices: Vec<String>,
    /// What an access to an IPA with nothing behind it does.
    pub abort_policy: AbortPolicy,
    /// How stage 2 maps the RAM.
    pub stage2: Stage2Mappings,
}

/// The VM nodes and the files QEMU offers them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The VMs.
    pub vms: Vec<VmNode>,
    /// Kernel, then initramfs (fw-cfg files, one of each for all VMs).
    pub files: Vec<FwCfgFile>,
}

/// Start of the machine's RAM on QEMU virt.
pub const MACHINE_RAM_BASE: u64 = 0x4000_0000;

/// Where `count` VMs of `mem` bytes each go (2 MiB aligned, identity-mapped): first fit
/// from [`GUEST_RAM_BASE`] up, around the staging range; returns their bases and the end
/// of the last one, `None` when they would run past the end of the address space.
fn place_ram(mem: u64, count: u32) -> Option<(Vec<u64>, u64)> {
    let mut bases = Vec::new();
    let mut at = GUEST_RAM_BASE;
    for _ in 0..count {
        // A VM that would reach into staging goes above it.
        if at < STAGING_BASE + STAGING_SIZE && at.checked_add(mem)? > STAGING_BASE {
            at = STAGING_BASE + STAGING_SIZE;
        }
        bases.push(at);
        at = at.checked_add(mem)?;
    }
    Some((bases, at))
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
    /// Checks the numbers the user gave: at least one VM of at least one vCPU, no more
    /// vCPUs in all than the hypervisor brings up CPUs, RAM a multiple of 2 MiB of at
    /// least [`MIN_RAM`], and all the VMs' RAM inside the address space.
    ///
    /// # Errors
    ///
    /// A one-line message naming the option that is wrong.
    pub fn check(&self) -> Result<(), String> {
        let mem = self.mem.0;
        if mem < MIN_RAM.0 || mem % IMAGE_BASE_ALIGN != 0 {
            return Err(format!(
                "--mem {} is not a multiple of 2M of at least {MIN_RAM}",
                self.mem
            ));
        }
        if self.cpus == 0 {
            return Err("--cpus must be at least 1".into());
        }
        if self.count == 0 {
            return Err("--vms-count must be at least 1".into());
        }
        let cpus = u64::from(self.cpus) * u64::from(self.count);
        if cpus > boot::MAX_CPUS as u64 {
            return Err(format!(
                "{} VM(s) of --cpus {} need {cpus} CPUs, more than the {} the hypervisor \
                 brings up",
                self.count,
                self.cpus,
                boot::MAX_CPUS
            ));
        }
        if place_ram(mem, self.count).is_none() {
            return Err(format!(
                "{} VM(s) of --mem {} do not fit in the address space",
                self.count, self.mem
            ));
        }
        Ok(())
    }

    /// The machine RAM the guests need: at least 2 GiB, rounded up to whole GiB.
    ///
    /// # Errors
    ///
    /// What [`KernelGuest::check`] says.
    pub fn machine_mem_needed(&self) -> Result<Size, String> {
        self.check()?;
        let end = place_ram(self.mem.0, self.count).map_or(u64::MAX, |(_, end)| end);
        let gib = 1u64 << 30;
        Ok(Size(
            (end - MACHINE_RAM_BASE)
                .div_ceil(gib)
                .max(2)
                .saturating_mul(gib),
        ))
    }

    /// Lays the guests out and writes their VM nodes. `machine` is the device tree of
    /// the machine they will run on (to check `devices`), `machine_mem` its RAM.
    ///
    /// # Errors
    ///
    /// A one-line message for a file that is missing, a size that does not fit, a
    /// device the machine does not have, or a kernel the hypervisor would refuse.
    pub fn plan(&self, machine: &Node, machine_mem: Size) -> Result<Plan, String> {
        self.check()?;
        let mem = self.mem.0;
        let (bases, end) = place_ram(mem, self.count).ok_or("checked above")?;
        if end > MACHINE_RAM_BASE.saturating_add(machine_mem.0) {
            return Err(format!(
                "{} VM(s) of {} do not fit in the machine's {} of RAM (the hypervisor keeps \
                 the first {} and staging {}; docs/memory-map.md): give --machine-mem {}",
                self.count,
                self.mem,
                machine_mem,
                Size(GUEST_RAM_BASE - MACHINE_RAM_BASE),
                Size(STAGING_SIZE),
                self.machine_mem_needed()?
            ));
        }
        let ram_base = bases[0];
        let klen = file_len(&self.kernel, "kernel")?;
        let mut head = Vec::with_capacity(HEADER_LEN);
        File::open(&self.kernel)
            .and_then(|f| f.take(HEADER_LEN as u64).read_to_end(&mut head))
            .map_err(|e| format!("cannot read {}: {e}", self.kernel.display()))?;
        let placed = place_kernel(&head, klen, ram_base, mem).map_err(|e| {
            format!(
                "{} cannot boot in {} of RAM: {e}",
                self.kernel.display(),
                self.mem
            )
        })?;
        let mut files = vec![FwCfgFile {
            name: KERNEL_FILE.into(),
            file: self.kernel.clone(),
        }];
        let initrd = match &self.initrd {
            None => None,
            Some(path) => {
                let ilen = file_len(path, "initrd")?;
                // Just below the top 2 MiB of RAM, where the hypervisor puts the guest DTB.
                let offset = mem
                    .checked_sub(IMAGE_BASE_ALIGN + align_up(ilen, IMAGE_BASE_ALIGN))
                    .filter(|&off| ram_base + off >= placed.end)
                    .ok_or_else(|| {
                        format!(
                            "kernel and initrd do not fit in {} of RAM: give --mem more",
                            self.mem
                        )
                    })?;
                files.push(FwCfgFile {
                    name: INITRD_FILE.into(),
                    file: path.clone(),
                });
                Some(offset)
            }
        };
        let mut devices: Vec<String> = Vec::new();
        for d in &self.devices {
            if machine.find(d).is_none() {
                return Err(format!("--device {d}: the machine has no such node"));
            }
            if !devices.contains(d) {
                devices.push(d.clone());
            }
        }
        let mut vms = Vec::new();
        for (i, &base) in (0u32..).zip(&bases) {
            let name = if self.count == 1 {
                "linux".to_owned()
            } else {
                format!("linux{i}")
            };
            let first = i * self.cpus;
            let mut vm = VmNode::new(
                &name,
                &(first..first + self.cpus).collect::<Vec<_>>(),
                Ram {
                    ipa: base,
                    pa: base,
                    size: mem,
                },
                Fetched {
                    name: KERNEL_FILE.into(),
                    // The kernel sits at the same offset in every VM's RAM.
                    ipa: placed.load - ram_base + base,
                },
            );
            vm.node = format!("{name}-vm");
            vm.initrd = initrd.map(|offset| {
                Fetched {
                    name: INITRD_FILE.into(),
                    ipa: base + offset,
                }
                .into()
            });
            vm.bootargs = Some(self.append.clone());
            // Devices (and with them DMA) go to the first VM only.
            if i == 0 {
                vm.devices.clone_from(&devices);
            }
            vm.vuart = Some(VUART_IPA);
            // What is typed on the console goes to the first VM.
            vm.console_input = i == 0;
            vm.abort_policy = Some(self.abort_policy);
            vm.stage2 = Some(self.stage2);
            vms.push(vm);
        }
        Ok(Plan { vms, files })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::Image;
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
            count: 1,
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
        let plan = g.plan(&machine(), Size::gib(2)).expect("plans");
        let [vm] = &plan.vms[..] else {
            panic!("{plan:?}")
        };
        let base = GUEST_RAM_BASE;
        assert_eq!(
            vm.kernel,
            Image::Fetched(Fetched {
                name: KERNEL_FILE.into(),
                ipa: base + 0x20_0000
            })
        );
        // In RAM, 4 MiB (its size rounded up) below the top 2 MiB.
        assert_eq!(
            vm.initrd,
            Some(Image::Fetched(Fetched {
                name: INITRD_FILE.into(),
                ipa: base + 256 * MIB - 2 * MIB - 4 * MIB
            }))
        );
        assert_eq!(
            plan.files,
            [(KERNEL_FILE, &k.0), (INITRD_FILE, &i.0)].map(|(name, file)| FwCfgFile {
                name: name.into(),
                file: file.clone()
            })
        );
        assert_eq!(vm.cpus, [0, 1]);
        assert_eq!(vm.name, "linux");
        assert!(vm.devices.is_empty(), "no GIC, no host console");
        assert_eq!(vm.vuart, Some(0x0900_0000));
        assert!(vm.console_input);
        assert_eq!(vm.memory[0].pa, vm.memory[0].ipa);
    }

    #[test]
    fn several_vms_get_their_own_cpus_and_ram_around_staging_and_share_the_images() {
        let k = file("k4", &image(0x20_0000, 40 * MIB, 4096));
        let i = file("i4", &[7; 3 * MIB as usize]);
        let mut g = guest(&k.0);
        g.initrd = Some(i.0.clone());
        g.count = 2;
        g.mem = Size::gib(1);
        assert_eq!(g.machine_mem_needed(), Ok(Size::gib(3)));
        assert!(g.plan(&machine(), Size::gib(2)).is_err(), "does not fit 2G");
        let plan = g.plan(&machine(), Size::gib(4)).expect("plans");
        let [a, b] = &plan.vms[..] else {
            panic!("{plan:?}")
        };
        assert_eq!((a.name.as_str(), b.name.as_str()), ("linux0", "linux1"));
        assert!(a.console_input && !b.console_input, "input goes to one VM");
        assert_eq!((a.cpus.clone(), b.cpus.clone()), (vec![0, 1], vec![2, 3]));
        // 1 GiB does not fit below staging: both go above it, one after the other.
        assert_eq!(a.memory[0].pa, STAGING_BASE + STAGING_SIZE);
        assert_eq!(b.memory[0].pa, a.memory[0].pa + (1 << 30));
        assert_eq!(a.memory[0].ipa, a.memory[0].pa);
        assert_eq!(b.kernel.ipa(), b.memory[0].pa + 0x20_0000);
        let (ia, ib) = (a.initrd.clone().unwrap(), b.initrd.clone().unwrap());
        assert_eq!(ib.ipa() - b.memory[0].pa, ia.ipa() - a.memory[0].pa);
        assert_eq!(plan.files.len(), 2, "one kernel and one initrd for both");
        // Small VMs fill the window below staging first.
        g.mem = Size::mib(256);
        let plan = g.plan(&machine(), Size::gib(2)).expect("plans");
        assert_eq!(plan.vms[1].memory[0].pa, GUEST_RAM_BASE + 256 * MIB);
    }

    #[test]
    fn a_raw_binary_goes_where_qemus_loader_puts_one() {
        let k = file("raw", &[0x14, 0, 0, 0]);
        let plan = guest(&k.0).plan(&machine(), Size::gib(2)).expect("plans");
        assert_eq!(plan.vms[0].kernel.ipa(), GUEST_RAM_BASE + 0x8_0000);
    }

    #[test]
    fn bad_requests_are_one_line_errors() {
        let k = file("k2", &image(0x20_0000, 8 * MIB, 4096));
        let m = machine();
        let err = |g: KernelGuest| g.plan(&m, Size::gib(2)).expect_err("refused");
        let mut g = guest(&k.0);
        g.mem = Size::mib(15);
        assert!(err(g).contains("at least 16M"));
        let mut g = guest(&k.0);
        // 2 GiB of machine RAM hold 512M below staging and 1G above it.
        g.mem = Size(Size::gib(1).0 + 2 * MIB);
        assert!(err(g).contains("do not fit in the machine's 2G of RAM"));
        let mut g = guest(&k.0);
        g.count = 0;
        assert!(err(g).contains("--vms-count"));
        let mut g = guest(&k.0);
        g.mem = Size(17 * MIB);
        assert!(err(g).contains("multiple of 2M"));
        let mut g = guest(&k.0);
        g.cpus = 0;
        assert!(err(g).contains("--cpus"));
        // Sizes and counts that would overflow the RAM placement or allocate a base per
        // VM for billions of VMs are refused before anything is placed.
        let mut g = guest(&k.0);
        g.mem = Size(u64::MAX - (IMAGE_BASE_ALIGN - 1));
        assert!(err(g.clone()).contains("do not fit in the address space"));
        assert!(g.machine_mem_needed().is_err());
        let mut g = guest(&k.0);
        g.cpus = 1;
        g.count = u32::MAX;
        assert!(err(g.clone()).contains(&format!(
            "more than the {} the hypervisor brings up",
            boot::MAX_CPUS
        )));
        assert!(g.machine_mem_needed().is_err());
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
        assert!(err(guest(&be.0)).contains("the kernel is big-endian"));
    }

    #[test]
    fn extra_devices_are_added_once() {
        let k = file("k3", &image(0, 8 * MIB, 64));
        let mut g = guest(&k.0);
        g.devices = vec!["/virtio_mmio@a000000".into(), "/virtio_mmio@a000000".into()];
        let plan = g.plan(&machine(), Size::gib(2)).expect("plans");
        assert_eq!(plan.vms[0].devices, ["/virtio_mmio@a000000"]);
    }
}
