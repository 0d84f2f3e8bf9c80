//! The one device-tree writer: the host DTB the hypervisor boots with.
//!
//! QEMU describes the machine it models (`-machine ...,dumpdtb=`); the tree is read into
//! memory ([`Node`]), VM nodes are added under `/chosen` (typed, from [`crate::vm`], or
//! merged from a user's `.dts` fragment compiled by `dtc`), QEMU's memory nodes are left
//! out (QEMU writes its own when it loads a `-dtb`, turning the old ones into `FDT_NOP`
//! tokens), and `vm-fdt` writes the blob.
//!
//! Reading uses the `fdt` crate on QEMU's and dtc's own output, which is well formed;
//! the hypervisor, which must survive any blob, validates before it reads
//! (`hypervisor::config::dtb`).

use std::fs;
use std::path::Path;
use std::process::Command;

use crate::qemu::{Qemu, QEMU};

/// A device-tree node: properties in order, then children in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Node {
    /// Name with unit address (`pl011@9000000`); empty for the root.
    pub name: String,
    /// `(name, raw value)` pairs.
    pub props: Vec<(String, Vec<u8>)>,
    /// Child nodes.
    pub children: Vec<Node>,
}

impl Node {
    /// An empty node called `name`.
    #[must_use]
    pub fn new(name: &str) -> Self {
        Self {
            name: name.into(),
            ..Self::default()
        }
    }

    /// Sets property `name` to `value` (replacing one of that name).
    pub fn set(&mut self, name: &str, value: Vec<u8>) -> &mut Self {
        match self.props.iter_mut().find(|(n, _)| n == name) {
            Some((_, v)) => *v = value,
            None => self.props.push((name.into(), value)),
        }
        self
    }

    /// A string property.
    pub fn set_str(&mut self, name: &str, value: &str) -> &mut Self {
        self.set_strs(name, &[value])
    }

    /// A string-list property.
    pub fn set_strs<S: AsRef<str>>(&mut self, name: &str, values: &[S]) -> &mut Self {
        let mut bytes = Vec::new();
        for v in values {
            bytes.extend_from_slice(v.as_ref().as_bytes());
            bytes.push(0);
        }
        self.set(name, bytes)
    }

    /// A property of 32-bit cells.
    pub fn set_u32s(&mut self, name: &str, cells: &[u32]) -> &mut Self {
        self.set(name, cells.iter().flat_map(|c| c.to_be_bytes()).collect())
    }

    /// A property of 64-bit values (two cells each, as `docs/vms.md` writes them).
    pub fn set_u64s(&mut self, name: &str, values: &[u64]) -> &mut Self {
        self.set(name, values.iter().flat_map(|v| v.to_be_bytes()).collect())
    }

    /// The value of property `name`.
    #[must_use]
    pub fn prop(&self, name: &str) -> Option<&[u8]> {
        self.props
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    /// The strings of a string-list property.
    #[must_use]
    pub fn strs(&self, name: &str) -> Vec<&str> {
        self.prop(name)
            .map(|v| {
                v.split(|&b| b == 0)
                    .filter(|s| !s.is_empty())
                    .filter_map(|s| std::str::from_utf8(s).ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The child called `name`.
    #[must_use]
    pub fn child(&self, name: &str) -> Option<&Node> {
        self.children.iter().find(|c| c.name == name)
    }

    /// The node at absolute `path` (`/a/b`) below this one.
    #[must_use]
    pub fn find(&self, path: &str) -> Option<&Node> {
        path.strip_prefix('/')?
            .split('/')
            .filter(|p| !p.is_empty())
            .try_fold(self, |node, part| node.child(part))
    }

    /// The child called `name`, added empty if there is none.
    pub fn child_mut(&mut self, name: &str) -> &mut Node {
        let at = match self.children.iter().position(|c| c.name == name) {
            Some(at) => at,
            None => {
                self.children.push(Node::new(name));
                self.children.len() - 1
            }
        };
        &mut self.children[at]
    }

    /// Merges `other` into this node the way dtc merges two blocks of one node:
    /// properties of `other` replace those of the same name, children of the same name
    /// are merged, new ones are appended.
    pub fn merge(&mut self, other: Node) {
        for (name, value) in other.props {
            self.set(&name, value);
        }
        for child in other.children {
            let name = child.name.clone();
            self.child_mut(&name).merge(child);
        }
    }

    /// The path of the first node (depth first) whose `compatible` list holds one of
    /// `compatibles`.
    #[must_use]
    pub fn find_compatible(&self, compatibles: &[&str]) -> Option<String> {
        fn walk(node: &Node, path: &str, want: &[&str]) -> Option<String> {
            for child in &node.children {
                let p = format!("{path}/{}", child.name);
                if child.strs("compatible").iter().any(|c| want.contains(c)) {
                    return Some(p);
                }
                if let Some(found) = walk(child, &p, want) {
                    return Some(found);
                }
            }
            None
        }
        walk(self, "", compatibles)
    }
}

/// A whole device tree.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceTree {
    /// The root node.
    pub root: Node,
    /// The memory reservation block: `(address, size)`.
    pub reservations: Vec<(u64, u64)>,
    /// `boot_cpuid_phys` of the header.
    pub boot_cpuid: u32,
}

impl DeviceTree {
    /// Reads a flattened device tree.
    ///
    /// # Errors
    ///
    /// A message when `blob` is not one.
    pub fn from_dtb(blob: &[u8]) -> Result<Self, String> {
        let fdt = fdt::Fdt::new(blob).map_err(|e| format!("not a device tree blob: {e:?}"))?;
        let root = fdt
            .all_nodes()
            .next()
            .ok_or("a device tree blob without a root node")?;
        fn read(node: fdt::node::FdtNode<'_, '_>) -> Node {
            Node {
                name: node.name.trim_start_matches('/').to_owned(),
                props: node
                    .properties()
                    .map(|p| (p.name.to_owned(), p.value.to_vec()))
                    .collect(),
                children: node.children().map(read).collect(),
            }
        }
        let reservations = fdt
            .memory_reservations()
            .map(|r| (r.address() as u64, r.size() as u64))
            .collect();
        // boot_cpuid_phys: header word 7 (Devicetree Specification 5.2).
        let boot_cpuid = blob
            .get(28..32)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u32::from_be_bytes);
        Ok(Self {
            root: read(root),
            reservations,
            boot_cpuid,
        })
    }

    /// Writes the tree as a flattened device tree blob.
    ///
    /// # Errors
    ///
    /// A message when `vm-fdt` refuses the tree (e.g. a duplicate property name).
    pub fn to_dtb(&self) -> Result<Vec<u8>, String> {
        let reservations: Vec<vm_fdt::FdtReserveEntry> = self
            .reservations
            .iter()
            .map(|&(a, s)| vm_fdt::FdtReserveEntry::new(a, s))
            .collect::<Result<_, _>>()
            .map_err(|e| format!("memory reservation: {e}"))?;
        let mut w = vm_fdt::FdtWriter::new_with_mem_reserv(&reservations)
            .map_err(|e| format!("device tree: {e}"))?;
        w.set_boot_cpuid_phys(self.boot_cpuid);
        fn write(w: &mut vm_fdt::FdtWriter, node: &Node) -> Result<(), vm_fdt::Error> {
            let handle = w.begin_node(&node.name)?;
            for (name, value) in &node.props {
                w.property(name, value)?;
            }
            for child in &node.children {
                write(w, child)?;
            }
            w.end_node(handle)
        }
        write(&mut w, &self.root).map_err(|e| format!("device tree: {e}"))?;
        w.finish().map_err(|e| format!("device tree: {e}"))
    }

    /// Leaves out the `/memory@...` nodes (QEMU adds its own when it loads the blob).
    pub fn drop_memory_nodes(&mut self) {
        self.root
            .children
            .retain(|c| c.name != "memory" && !c.name.starts_with("memory@"));
    }

    /// Adds `vm` under `/chosen`.
    pub fn add_vm(&mut self, vm: Node) {
        let chosen = self.root.child_mut("chosen");
        match chosen.children.iter_mut().find(|c| c.name == vm.name) {
            Some(same) => same.merge(vm),
            None => chosen.children.push(vm),
        }
    }
}

/// Asks QEMU for the device tree of the machine `qemu` would boot.
///
/// # Errors
///
/// QEMU's own message when it cannot build that machine.
pub fn dump(qemu: &Qemu, work: &Path) -> Result<DeviceTree, String> {
    let path = work.join("qemu-machine.dtb");
    let out = Command::new(QEMU)
        .args(qemu.dump_dtb_args(&path))
        .output()
        .map_err(|e| format!("cannot run {QEMU} ({e}): run scripts/setup"))?;
    if !out.status.success() {
        return Err(format!(
            "{QEMU} could not build the machine: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let blob = fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    DeviceTree::from_dtb(&blob)
}

/// Compiles a device-tree source fragment (`/ { chosen { ... }; };` blocks, with or
/// without the `/dts-v1/;` line) with `dtc` and returns its root.
///
/// # Errors
///
/// A message naming the file, with dtc's own when it does not compile.
pub fn compile_fragment(fragment: &Path, work: &Path) -> Result<Node, String> {
    let text = fs::read_to_string(fragment)
        .map_err(|e| format!("cannot read {}: {e}", fragment.display()))?;
    let source = if text.contains("/dts-v1/") {
        text
    } else {
        format!("/dts-v1/;\n{text}")
    };
    let dts = work.join("fragment.dts");
    let dtb = work.join("fragment.dtb");
    fs::write(&dts, source).map_err(|e| format!("{}: {e}", dts.display()))?;
    let out = Command::new("dtc")
        .args(["-q", "-I", "dts", "-O", "dtb", "-o"])
        .arg(&dtb)
        .arg(&dts)
        .output()
        .map_err(|e| format!("cannot run dtc ({e}): run scripts/setup"))?;
    if !out.status.success() {
        return Err(format!(
            "{} does not compile: {}",
            fragment.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let blob = fs::read(&dtb).map_err(|e| format!("{}: {e}", dtb.display()))?;
    Ok(DeviceTree::from_dtb(&blob)?.root)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DeviceTree {
        let mut root = Node::new("");
        root.set_u32s("#address-cells", &[2])
            .set_str("compatible", "linux,dummy-virt");
        let mut uart = Node::new("pl011@9000000");
        uart.set_strs("compatible", &["arm,pl011", "arm,primecell"])
            .set_u64s("reg", &[0x900_0000, 0x1000]);
        let mut mem = Node::new("memory@40000000");
        mem.set_str("device_type", "memory");
        let mut intc = Node::new("intc@8000000");
        intc.set_strs("compatible", &["arm,gic-v3"]);
        let mut its = Node::new("its@8080000");
        its.set_strs("compatible", &["arm,gic-v3-its"]);
        intc.children.push(its);
        root.children = vec![uart, mem, intc, Node::new("chosen")];
        DeviceTree {
            root,
            reservations: vec![(0x4000_0000, 0x1000)],
            boot_cpuid: 0,
        }
    }

    #[test]
    fn a_written_tree_reads_back_the_same() {
        let tree = sample();
        let blob = tree.to_dtb().expect("writes");
        assert_eq!(DeviceTree::from_dtb(&blob).expect("reads"), tree);
    }

    #[test]
    fn memory_nodes_are_dropped_and_vms_added_under_chosen() {
        let mut tree = sample();
        tree.drop_memory_nodes();
        let mut vm = Node::new("vm-a");
        vm.set_str("compatible", "twostage,vm");
        tree.add_vm(vm.clone());
        let mut again = Node::new("vm-a");
        again.set_str("vm-name", "alpha");
        tree.add_vm(again);
        let names: Vec<&str> = tree.root.children.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["pl011@9000000", "intc@8000000", "chosen"]);
        let chosen = tree.root.child("chosen").expect("chosen");
        assert_eq!(chosen.children.len(), 1);
        assert_eq!(chosen.children[0].strs("compatible"), ["twostage,vm"]);
        assert_eq!(chosen.children[0].strs("vm-name"), ["alpha"]);
    }

    #[test]
    fn merge_replaces_properties_and_merges_children() {
        let mut a = sample().root;
        let mut b = Node::new("");
        b.set_str("compatible", "other");
        let mut chosen = Node::new("chosen");
        chosen.set_str("bootargs", "x");
        b.children.push(chosen);
        b.children.push(Node::new("new@1"));
        a.merge(b);
        assert_eq!(a.strs("compatible"), ["other"]);
        assert_eq!(a.prop("#address-cells"), Some(&[0, 0, 0, 2][..]));
        assert_eq!(a.child("chosen").expect("chosen").strs("bootargs"), ["x"]);
        assert_eq!(a.children.len(), 5);
    }

    #[test]
    fn compatible_search_goes_depth_first() {
        let tree = sample();
        assert_eq!(
            tree.root.find_compatible(&["arm,gic-v3-its"]).as_deref(),
            Some("/intc@8000000/its@8080000")
        );
        assert_eq!(
            tree.root.find_compatible(&["arm,pl011"]).as_deref(),
            Some("/pl011@9000000")
        );
        assert_eq!(tree.root.find_compatible(&["none"]), None);
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(DeviceTree::from_dtb(b"not a dtb at all, not at all").is_err());
        assert!(DeviceTree::from_dtb(&[]).is_err());
    }
}
