//! `cargo xtask`: builds, runs, debugs, tests and benchmarks twostage.
//!
//! The library holds what the command line and the QEMU integration tests share: one
//! QEMU command builder ([`qemu`]), one device-tree writer ([`dt`]) with typed VM nodes
//! ([`vm`]), the layout of a kernel guest ([`linux`]), the images in `out/`
//! ([`artifacts`]), running a command with a time limit ([`process`]), the test guest's
//! `arg` bits ([`guest_arg`]) and its latency results ([`latency`]).

pub mod artifacts;
pub mod dt;
/// The test guest's `arg` bits: the guest's own definition.
#[path = "../../tests/guest/src/arg.rs"]
pub mod guest_arg;
pub mod latency;
pub mod linux;
pub mod process;
pub mod qemu;
pub mod size;
pub mod vm;

use std::path::{Path, PathBuf};

use dt::{DeviceTree, Node};
use linux::KernelGuest;
use qemu::{Load, Qemu};
use vm::VmNode;

/// The description of the default guests: two EL1 test-guest VMs.
pub const TEST_GUESTS_DTS: &str = "docs/examples/two-test-guests.dts";

/// `qemu` (its machine, console and extra arguments) booting the hypervisor with the
/// default guests ([`TEST_GUESTS_DTS`], the test guest staged where it says); the host
/// DTB goes into `dir`.
///
/// # Errors
///
/// A missing image, or what [`write_host_dtb`] says.
pub fn test_guests(qemu: Qemu, dir: &Path) -> Result<Qemu, String> {
    let mut qemu = qemu
        .kernel(artifacts::existing(artifacts::Artifact::Hypervisor.bin())?)
        .load(
            artifacts::existing(artifacts::Artifact::TestGuest.bin())?,
            hypervisor::mem::layout::STAGING.base.get(),
        );
    write_host_dtb(
        &mut qemu,
        &[],
        &[artifacts::root().join(TEST_GUESTS_DTS)],
        dir,
    )?;
    Ok(qemu)
}

/// `qemu` (its machine, console and extra arguments) booting the hypervisor with `guest`
/// as its one VM; the host DTB goes into `dir`.
///
/// # Errors
///
/// A missing image, a guest that does not fit the machine or its RAM, or what
/// [`write_host_dtb`] says.
pub fn kernel_guest(qemu: Qemu, guest: &KernelGuest, dir: &Path) -> Result<Qemu, String> {
    let cpus = guest.cpus.saturating_mul(guest.count);
    if cpus > qemu.machine.cpus {
        return Err(format!(
            "{} VM(s) of --cpus {} need {cpus} CPUs, more than the machine's {} \
             (--machine-cpus)",
            guest.count, guest.cpus, qemu.machine.cpus
        ));
    }
    let mut qemu = qemu.kernel(artifacts::existing(artifacts::Artifact::Hypervisor.bin())?);
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let machine = dt::dump(&qemu, dir)?;
    let plan = guest.plan(&machine.root, qemu.machine.memory)?;
    qemu.files = plan.files;
    let nodes: Vec<Node> = plan.vms.iter().map(VmNode::to_node).collect();
    add_vms(&mut qemu, machine, &nodes, &[], dir)?;
    Ok(qemu)
}

/// Writes the host device tree for `qemu`'s machine into `dir/host.dtb`: QEMU's own
/// description of the machine, with `vms` and the VM nodes of the `.dts` `fragments`
/// under `/chosen`. Sets `qemu`'s `-dtb` to it.
///
/// # Errors
///
/// A one-line message when QEMU, dtc or the writer fails, or when a file `qemu` stages
/// is larger than the size the VM node that names its address gives it (the VM would
/// get a truncated image).
pub fn write_host_dtb(
    qemu: &mut Qemu,
    vms: &[Node],
    fragments: &[PathBuf],
    dir: &Path,
) -> Result<DeviceTree, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let machine = dt::dump(qemu, dir)?;
    add_vms(qemu, machine, vms, fragments, dir)
}

/// [`write_host_dtb`] from `tree`, the machine's tree QEMU already dumped for `qemu`.
fn add_vms(
    qemu: &mut Qemu,
    mut tree: DeviceTree,
    vms: &[Node],
    fragments: &[PathBuf],
    dir: &Path,
) -> Result<DeviceTree, String> {
    tree.drop_memory_nodes();
    for vm in vms {
        tree.add_vm(vm.clone());
    }
    for fragment in fragments {
        tree.root.merge(dt::compile_fragment(fragment, dir)?);
    }
    check_staged_sizes(&tree.root, &qemu.loads)?;
    let path = dir.join("host.dtb");
    std::fs::write(&path, tree.to_dtb()?).map_err(|e| format!("{}: {e}", path.display()))?;
    qemu.dtb = Some(path);
    Ok(tree)
}

/// Checks that every staged file fits the `<pa size>` of each VM image property
/// (`kernel`, `initrd`, `dtb`) at its address.
fn check_staged_sizes(root: &Node, loads: &[Load]) -> Result<(), String> {
    let Some(chosen) = root.child("chosen") else {
        return Ok(());
    };
    for vm in &chosen.children {
        for prop in ["kernel", "initrd", "dtb"] {
            let Some(&[pa, size]) = vm.prop(prop).map(be_u64s).as_deref() else {
                continue;
            };
            for load in loads.iter().filter(|l| l.addr == pa) {
                let len = std::fs::metadata(&load.file)
                    .map_err(|e| format!("{}: {e}", load.file.display()))?
                    .len();
                if len > size {
                    return Err(format!(
                        "{} ({len:#x} bytes) is larger than the {prop} size {size:#x} of \
                         /chosen/{}: the VM would get a truncated image",
                        load.file.display(),
                        vm.name
                    ));
                }
            }
        }
    }
    Ok(())
}

fn be_u64s(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .filter_map(|c| c.try_into().ok().map(u64::from_be_bytes))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_staged_file_larger_than_its_vm_image_is_refused() {
        let file = std::env::temp_dir().join(format!("xtask-stage-{}", std::process::id()));
        std::fs::write(&file, [0u8; 100]).expect("temporary file");
        let mut root = Node::new("");
        let mut vm = Node::new("vm-a");
        vm.set_u64s("kernel", &[0x7000_0000, 64]);
        root.child_mut("chosen").children.push(vm);
        let at = |addr| {
            vec![Load {
                file: file.clone(),
                addr,
            }]
        };
        let err = check_staged_sizes(&root, &at(0x7000_0000)).expect_err("too large");
        assert!(
            err.contains("larger than the kernel size 0x40 of /chosen/vm-a"),
            "{err}"
        );
        assert_eq!(check_staged_sizes(&root, &at(0x7100_0000)), Ok(()));
        root.child_mut("chosen").children[0].set_u64s("kernel", &[0x7000_0000, 100]);
        assert_eq!(check_staged_sizes(&root, &at(0x7000_0000)), Ok(()));
        let _ = std::fs::remove_file(file);
    }
}
