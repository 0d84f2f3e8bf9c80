//! VM descriptions as typed values, written as the `/chosen` nodes of `docs/vms.md`.

use clap::ValueEnum;

use crate::dt::Node;

/// What a stage-2 abort the hypervisor cannot emulate does (`abort-policy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum AbortPolicy {
    /// Inject a synchronous external abort, as KVM and Xen do for an access with
    /// nothing behind it; a kernel's own fault handling takes it from there.
    #[default]
    Inject,
    /// Stop the VM with a log line.
    Stop,
}

/// How stage 2 maps a VM's RAM (`stage2-mappings`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Stage2Mappings {
    /// 1 GiB and 2 MiB blocks where aligned: the right choice on hardware.
    #[default]
    Blocks,
    /// 4 KiB pages only: faster under QEMU's TCG for a guest that invalidates its TLB by
    /// address (`docs/linux-guest.md`).
    Pages,
}

impl AbortPolicy {
    /// The property value.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inject => "inject",
            Self::Stop => "stop",
        }
    }
}

impl Stage2Mappings {
    /// The property value.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Blocks => "blocks",
            Self::Pages => "pages",
        }
    }
}

/// A range of guest RAM: IPA, backing PA, size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ram {
    /// Guest-physical start.
    pub ipa: u64,
    /// Host-physical start.
    pub pa: u64,
    /// Bytes.
    pub size: u64,
}

/// A VM's image: staged in memory, or a file of QEMU's fw-cfg device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Image {
    /// `<name>` and `<name>-ipa`.
    Staged(Staged),
    /// `<name>-fw-cfg` and `<name>-ipa`.
    Fetched(Fetched),
}

impl From<Staged> for Image {
    fn from(s: Staged) -> Self {
        Self::Staged(s)
    }
}

impl From<Fetched> for Image {
    fn from(f: Fetched) -> Self {
        Self::Fetched(f)
    }
}

impl Image {
    /// Where the hypervisor writes it in the VM.
    #[must_use]
    pub fn ipa(&self) -> u64 {
        match self {
            Self::Staged(s) => s.ipa,
            Self::Fetched(f) => f.ipa,
        }
    }

    /// Sets the `name` properties of `n`.
    fn write(&self, n: &mut Node, name: &str) {
        match self {
            Self::Staged(s) => {
                n.set_u64s(name, &[s.pa, s.size]);
            }
            Self::Fetched(f) => {
                n.set_str(&format!("{name}-fw-cfg"), &f.name);
            }
        }
        n.set_u64s(&format!("{name}-ipa"), &[self.ipa()]);
    }
}

/// A file of QEMU's fw-cfg device (`crate::qemu::FwCfgFile`) by its name, and the IPA
/// the hypervisor fetches it to (its size is the device's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fetched {
    /// Its name in the device's directory.
    pub name: String,
    /// Where the hypervisor writes it in the VM.
    pub ipa: u64,
}

/// A file QEMU stages for the hypervisor (`<pa size>`) and the IPA it is copied to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Staged {
    /// Where QEMU's loader puts it.
    pub pa: u64,
    /// Its length.
    pub size: u64,
    /// Where the hypervisor copies it in the VM.
    pub ipa: u64,
}

/// One VM (`compatible = "twostage,vm"`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmNode {
    /// Node name under `/chosen`.
    pub node: String,
    /// `vm-name`.
    pub name: String,
    /// `cpus`: physical CPUs, vCPU *i* on `cpus[i]`.
    pub cpus: Vec<u32>,
    /// `memory`.
    pub memory: Vec<Ram>,
    /// `kernel` (or `kernel-fw-cfg`) and `kernel-ipa`.
    pub kernel: Image,
    /// `initrd` (or `initrd-fw-cfg`) and `initrd-ipa`.
    pub initrd: Option<Image>,
    /// `arg`: x0 of vCPU 0 when the VM gets no DTB.
    pub arg: Option<u64>,
    /// `bootargs`: the VM gets a generated DTB with this command line.
    pub bootargs: Option<String>,
    /// `vuart`: IPA of the emulated UART page.
    pub vuart: Option<u64>,
    /// `console-input`: the console's input goes to this VM's UART.
    pub console_input: bool,
    /// `passthrough-devices`: host DT paths.
    pub devices: Vec<String>,
    /// `stage2-mappings` (the hypervisor's default when `None`).
    pub stage2: Option<Stage2Mappings>,
    /// `abort-policy` (the hypervisor's default when `None`).
    pub abort_policy: Option<AbortPolicy>,
    /// `sharing-max-owned`: live memory-sharing transactions the VM may own (the
    /// hypervisor's default when `None`).
    pub sharing_max_owned: Option<u32>,
    /// `sharing-max-received`: live transactions any one other VM may address to it.
    pub sharing_max_received: Option<u32>,
}

impl VmNode {
    /// A VM called `name` (node `vm-<name>`) on `cpus`, with `memory`, booting `kernel`;
    /// everything else unset.
    #[must_use]
    pub fn new(name: &str, cpus: &[u32], memory: Ram, kernel: impl Into<Image>) -> Self {
        Self {
            node: format!("vm-{name}"),
            name: name.into(),
            cpus: cpus.to_vec(),
            memory: vec![memory],
            kernel: kernel.into(),
            initrd: None,
            arg: None,
            bootargs: None,
            vuart: None,
            console_input: false,
            devices: Vec::new(),
            stage2: None,
            abort_policy: None,
            sharing_max_owned: None,
            sharing_max_received: None,
        }
    }

    /// The device-tree node.
    #[must_use]
    pub fn to_node(&self) -> Node {
        let mut n = Node::new(&self.node);
        n.set_str("compatible", "twostage,vm")
            .set_str("vm-name", &self.name)
            .set_u32s("cpus", &self.cpus);
        let ram: Vec<u64> = self
            .memory
            .iter()
            .flat_map(|r| [r.ipa, r.pa, r.size])
            .collect();
        n.set_u64s("memory", &ram);
        self.kernel.write(&mut n, "kernel");
        if let Some(initrd) = &self.initrd {
            initrd.write(&mut n, "initrd");
        }
        if let Some(arg) = self.arg {
            n.set_u64s("arg", &[arg]);
        }
        if let Some(bootargs) = &self.bootargs {
            n.set_str("bootargs", bootargs);
        }
        if let Some(vuart) = self.vuart {
            n.set_u64s("vuart", &[vuart]);
        }
        if self.console_input {
            n.set("console-input", Vec::new());
        }
        if !self.devices.is_empty() {
            n.set_strs("passthrough-devices", &self.devices);
        }
        if let Some(s) = self.stage2 {
            n.set_str("stage2-mappings", s.as_str());
        }
        if let Some(p) = self.abort_policy {
            n.set_str("abort-policy", p.as_str());
        }
        if let Some(max) = self.sharing_max_owned {
            n.set_u32s("sharing-max-owned", &[max]);
        }
        if let Some(max) = self.sharing_max_received {
            n.set_u32s("sharing-max-received", &[max]);
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dt::DeviceTree;

    fn test_guest() -> VmNode {
        let mut vm = VmNode::new(
            "alpha",
            &[1, 2],
            Ram {
                ipa: 0x4000_0000,
                pa: 0x5000_0000,
                size: 0x20_0000,
            },
            Staged {
                pa: 0x7000_0000,
                size: 0x3_0000,
                ipa: 0x4000_0000,
            },
        );
        vm.arg = Some(0x4020_0001);
        vm.vuart = Some(0x900_0000);
        vm.abort_policy = Some(AbortPolicy::Stop);
        vm.stage2 = Some(Stage2Mappings::Pages);
        vm
    }

    #[test]
    fn properties_are_written_as_docs_vms_md_says() {
        let n = test_guest().to_node();
        assert_eq!(n.name, "vm-alpha");
        assert_eq!(n.strs("compatible"), ["twostage,vm"]);
        assert_eq!(n.prop("cpus"), Some(&[0, 0, 0, 1, 0, 0, 0, 2][..]));
        let memory = n.prop("memory").expect("memory");
        assert_eq!(memory.len(), 24);
        assert_eq!(&memory[8..16], &0x5000_0000u64.to_be_bytes());
        assert_eq!(n.prop("arg"), Some(&0x4020_0001u64.to_be_bytes()[..]));
        assert_eq!(n.strs("abort-policy"), ["stop"]);
        assert_eq!(n.strs("stage2-mappings"), ["pages"]);
        assert_eq!(n.prop("initrd"), None);
        assert_eq!(n.prop("passthrough-devices"), None);
    }

    /// What the hypervisor's own parser reads from a host DTB holding `vm` only.
    fn parsed_by_the_hypervisor(vm: &VmNode) -> hypervisor::config::VmDesc {
        let mut root = Node::new("");
        root.set_u32s("#address-cells", &[2])
            .set_u32s("#size-cells", &[2]);
        root.child_mut("chosen").children.push(vm.to_node());
        let mut blob = DeviceTree {
            root,
            reservations: Vec::new(),
            boot_cpuid: 0,
        }
        .to_dtb()
        .expect("writes");
        let dt = hypervisor::config::HostDt::new(&mut blob).expect("a device tree");
        let ranges = hypervisor::config::HostRanges {
            ram: &[],
            staging: hypervisor::mem::layout::STAGING,
            console: None,
            files: &[hypervisor::config::fw_cfg::FwCfgFile {
                name: "opt/twostage/kernel".into(),
                select: 0x20,
                size: 0x3_0000,
            }],
        };
        let descs = hypervisor::config::parse(&dt, &ranges).expect("the hypervisor accepts it");
        let [d] = &descs[..] else { panic!("{descs:?}") };
        d.clone()
    }

    /// The hypervisor's own parser reads what the writer wrote, field for field.
    #[test]
    fn the_hypervisor_parses_the_written_node() {
        let mut vm = test_guest();
        vm.initrd = Some(
            Staged {
                pa: 0x7100_0000,
                size: 0x1234,
                ipa: 0x4010_0000,
            }
            .into(),
        );
        vm.bootargs = Some("console=ttyAMA0 quiet".into());
        use hypervisor::config::ImageSource;
        use hypervisor::mem::{Ipa, PhysAddr};
        let d = parsed_by_the_hypervisor(&vm);
        assert_eq!(d.name, "alpha");
        assert_eq!(d.cpus, [1, 2]);
        assert_eq!(d.ram_size(), 0x20_0000);
        assert_eq!(d.memory[0].ipa, Ipa::new(0x4000_0000));
        assert_eq!(d.memory[0].pa, PhysAddr::new(0x5000_0000));
        assert_eq!(d.arg, 0x4020_0001);
        assert_eq!(d.bootargs.as_deref(), Some("console=ttyAMA0 quiet"));
        assert_eq!(d.abort, hypervisor::config::AbortPolicy::Stop);
        assert_eq!(d.stage2, hypervisor::config::Stage2Mappings::Pages);
        assert_eq!(d.vuart, Some(Ipa::new(0x900_0000)));
        let initrd = d.initrd.expect("initrd");
        assert_eq!(
            (initrd.src, initrd.size, initrd.ipa),
            (
                ImageSource::Staged(PhysAddr::new(0x7100_0000)),
                0x1234,
                Ipa::new(0x4010_0000)
            )
        );
        // A kernel given as an fw-cfg file: its select key and size come from the
        // device's directory.
        let mut fetched = test_guest();
        fetched.kernel = Fetched {
            name: "opt/twostage/kernel".into(),
            ipa: 0x4000_0000,
        }
        .into();
        let n = fetched.to_node();
        assert_eq!(n.prop("kernel"), None);
        assert_eq!(n.strs("kernel-fw-cfg"), ["opt/twostage/kernel"]);
        let d = parsed_by_the_hypervisor(&fetched);
        assert_eq!(
            (d.kernel.src, d.kernel.size, d.kernel.ipa),
            (ImageSource::FwCfg(0x20), 0x3_0000, Ipa::new(0x4000_0000))
        );
        let mut inject = test_guest();
        inject.abort_policy = Some(AbortPolicy::Inject);
        inject.stage2 = Some(Stage2Mappings::Blocks);
        let d = parsed_by_the_hypervisor(&inject);
        assert_eq!(d.abort, hypervisor::config::AbortPolicy::Inject);
        assert_eq!(d.stage2, hypervisor::config::Stage2Mappings::Blocks);
        assert_eq!(d.sharing, hypervisor::config::SharingLimits::default());
        inject.sharing_max_owned = Some(2);
        inject.sharing_max_received = Some(5);
        let d = parsed_by_the_hypervisor(&inject);
        assert_eq!(
            (d.sharing.owned, d.sharing.received),
            (2, 5),
            "sharing limits"
        );
    }
}
