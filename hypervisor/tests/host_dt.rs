//! Host device trees a malicious or careless builder could hand the hypervisor: every one
//! is rejected with an error or accepted, and none panics (or recurses without bound)
//! anywhere on the start-up path that reads it: the check and parse (`HostDt`), the
//! hardware (`Hardware`), the VM descriptions (`config::parse`) and, for a Linux VM, the
//! guest device tree built from the host's (`linux::complete_desc`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use hypervisor::config::{self, Hardware, HostDt, HostRanges};
use hypervisor::mem::layout::STAGING;
use proptest::prelude::*;

/// QEMU 7.2's virt tree with a Linux VM description under `/chosen` and
/// `stdout-path = "/pl011@9000000"`. Its VM was described the old way, with the console
/// and the GIC passed through, which the hypervisor now refuses: [`linux_vm`] gives it
/// the virtual PL011 instead, as `cargo xtask run --linux` does.
const LINUX_VM: &[u8] = include_bytes!("fixtures/virt-gicv3-with-vm-in-chosen.dtb");

/// [`LINUX_VM`] with its VM given the virtual PL011 and no pass-through device (the tree
/// the Linux tests boot).
fn linux_vm() -> Node {
    let mut t = Node::read(LINUX_VM);
    let vm = t.at("chosen/linux-vm");
    vm.props.retain(|(n, _)| n != "passthrough-devices");
    vm.set("vuart", &0x0900_0000u64.to_be_bytes());
    t
}

/// A node of a device tree being edited: name, properties in order, children in order.
#[derive(Clone, Debug)]
struct Node {
    name: String,
    props: Vec<(String, Vec<u8>)>,
    children: Vec<Node>,
}

impl Node {
    fn read(blob: &[u8]) -> Node {
        fn read(n: fdt::node::FdtNode<'_, '_>) -> Node {
            Node {
                name: n.name.to_owned(),
                props: n
                    .properties()
                    .map(|p| (p.name.to_owned(), p.value.to_vec()))
                    .collect(),
                children: n.children().map(read).collect(),
            }
        }
        let fdt = fdt::Fdt::new(blob).unwrap();
        let root = fdt.all_nodes().next().unwrap();
        // The crate names the root "/"; in the blob its name is empty.
        Node {
            name: String::new(),
            ..read(root)
        }
    }

    /// The node at `path` ("" for the root, "chosen/linux-vm" below it).
    fn at(&mut self, path: &str) -> &mut Node {
        let mut node = self;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            node = node
                .children
                .iter_mut()
                .find(|c| c.name == part)
                .unwrap_or_else(|| panic!("no node {part}"));
        }
        node
    }

    fn set(&mut self, name: &str, value: &[u8]) -> &mut Self {
        match self.props.iter_mut().find(|(n, _)| n == name) {
            Some((_, v)) => *v = value.to_vec(),
            None => self.props.push((name.to_owned(), value.to_vec())),
        }
        self
    }

    /// The index path of every node, depth first (for random picks).
    fn paths(&self) -> Vec<Vec<usize>> {
        let mut out = vec![vec![]];
        for (i, c) in self.children.iter().enumerate() {
            out.extend(c.paths().into_iter().map(|mut p| {
                p.insert(0, i);
                p
            }));
        }
        out
    }

    fn by_path(&mut self, path: &[usize]) -> &mut Node {
        path.iter().fold(self, |n, &i| &mut n.children[i])
    }

    /// Writes the tree as a version-17 flattened device tree, without checking anything
    /// (so that malformed values and names reach the hypervisor's checks).
    fn write(&self) -> Vec<u8> {
        fn be(out: &mut Vec<u8>, v: u32) {
            out.extend_from_slice(&v.to_be_bytes());
        }
        fn pad(out: &mut Vec<u8>) {
            while out.len() % 4 != 0 {
                out.push(0);
            }
        }
        fn node(n: &Node, st: &mut Vec<u8>, strings: &mut Vec<u8>) {
            be(st, 1);
            st.extend_from_slice(n.name.as_bytes());
            st.push(0);
            pad(st);
            for (name, value) in &n.props {
                let off = match strings
                    .windows(name.len() + 1)
                    .position(|w| &w[..name.len()] == name.as_bytes() && w[name.len()] == 0)
                {
                    Some(o) => o,
                    None => {
                        strings.extend_from_slice(name.as_bytes());
                        strings.push(0);
                        strings.len() - name.len() - 1
                    }
                };
                be(st, 3);
                be(st, value.len() as u32);
                be(st, off as u32);
                st.extend_from_slice(value);
                pad(st);
            }
            for c in &n.children {
                node(c, st, strings);
            }
            be(st, 2);
        }
        let (mut st, mut strings) = (Vec::new(), Vec::new());
        node(self, &mut st, &mut strings);
        be(&mut st, 9);
        let rsv = 40;
        let off_struct = rsv + 16;
        let off_strings = off_struct + st.len();
        let total = off_strings + strings.len();
        let mut out = Vec::new();
        for v in [
            0xd00d_feed,
            total as u32,
            off_struct as u32,
            off_strings as u32,
            rsv as u32,
            17,
            16,
            0,
            strings.len() as u32,
            st.len() as u32,
        ] {
            be(&mut out, v);
        }
        out.extend_from_slice(&[0; 16]);
        out.extend_from_slice(&st);
        out.extend_from_slice(&strings);
        out
    }
}

/// An arm64 Image header for a kernel of 32 MiB that may be placed anywhere.
fn kernel_head() -> [u8; 64] {
    let mut h = [0u8; 64];
    h[16..24].copy_from_slice(&(33u64 << 20).to_le_bytes());
    h[24] = 0b1010;
    h[56..60].copy_from_slice(b"ARM\x64");
    h
}

/// What start-up does with a host device tree, up to the guest device trees of its Linux
/// VMs; `Ok` with the number of guest device trees built.
fn start_up(blob: &[u8]) -> Result<usize, String> {
    let blob = Box::leak(blob.to_vec().into_boxed_slice());
    let dt = HostDt::new(blob).map_err(|e| e.to_string())?;
    let hw = Hardware::parse(&dt).map_err(|e| e.to_string())?;
    let ranges = HostRanges {
        ram: hw.memory(),
        staging: STAGING,
        console: hw.uart,
        files: &[],
    };
    let vms = config::parse(&dt, &ranges).map_err(|e| e.to_string())?;
    let mut built = 0;
    for mut vm in vms {
        match hypervisor::linux::complete_desc(&mut vm, &dt, &kernel_head(), STAGING) {
            Ok(Some((_, guest))) => {
                // What we write for a guest passes the checks we apply to what we read.
                let mut copy = guest.clone();
                HostDt::new(&mut copy).map_err(|e| format!("guest tree: {e}"))?;
                built += 1;
            }
            Ok(None) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(built)
}

#[test]
fn the_unedited_tree_builds_one_guest_tree() {
    // The fixture as it is: its VM has the GIC and the console passed through.
    let err = start_up(LINUX_VM).unwrap_err();
    assert!(
        err.contains("the GIC and its ITS are never assigned"),
        "{err}"
    );
    // With the virtual PL011 instead (and the test writer reproduces a tree faithfully).
    assert_eq!(start_up(&linux_vm().write()), Ok(1));
}

/// Regression: an empty `stdout-path;` in `/chosen` with a Linux VM made the `fdt` crate
/// cut a byte off an empty value (`Chosen::stdout`) while writing the guest tree.
#[test]
fn an_empty_stdout_path_is_an_error() {
    let mut t = linux_vm();
    t.at("chosen").set("stdout-path", b"");
    let err = start_up(&t.write()).unwrap_err();
    assert!(err.contains("string property is empty"), "{err}");
}

/// Regression: a 2-byte `#address-cells` made the `fdt` crate's `cell_sizes` unwrap a
/// short read when anything read a `reg` below that node.
#[test]
fn a_two_byte_address_cells_is_an_error() {
    for path in ["", "cpus"] {
        let mut t = linux_vm();
        t.at(path).set("#address-cells", &[0, 2]);
        let err = start_up(&t.write()).unwrap_err();
        assert!(err.contains("not one 32-bit cell"), "{path}: {err}");
    }
}

/// Regression: the `fdt` crate's `find_node` falls back to `/aliases` and follows an alias
/// through `find_node` again: an alias naming itself recursed until the stack overflowed
/// (here the tree has no `/chosen`, which the VM descriptions are looked up under).
#[test]
fn a_self_referencing_alias_is_not_followed() {
    let mut t = linux_vm();
    t.children.retain(|c| c.name != "chosen");
    t.children.push(Node {
        name: "aliases".into(),
        props: vec![("/chosen".into(), b"/chosen\0".to_vec())],
        children: vec![],
    });
    // No VM: nothing to build, and no crash.
    assert_eq!(start_up(&t.write()), Ok(0));
}

/// `#address-cells` of 3 or more (PCI style) and huge values: refused or ignored where
/// they are used, never an overflow.
#[test]
fn odd_cell_counts_are_errors_or_ignored() {
    for cells in [0u32, 3, 4, 0xffff_ffff] {
        for path in ["", "cpus", "pl011@9000000"] {
            let mut t = linux_vm();
            t.at(path).set("#address-cells", &cells.to_be_bytes());
            t.at(path).set("#size-cells", &cells.to_be_bytes());
            // Either outcome is fine; what matters is that it returns.
            let _ = start_up(&t.write());
        }
    }
}

/// Property names that the readers look up by name: a mutation renames a property to
/// one of these so that the typed readers see values they do not expect.
const NAMES: &[&str] = &[
    "#address-cells",
    "#size-cells",
    "#interrupt-cells",
    "#clock-cells",
    "reg",
    "ranges",
    "compatible",
    "device_type",
    "status",
    "stdout-path",
    "bootargs",
    "method",
    "phandle",
    "interrupt-parent",
    "clocks",
    "interrupts",
    "cpus",
    "memory",
    "kernel",
    "kernel-ipa",
    "initrd",
    "initrd-ipa",
    "passthrough-devices",
    "passthrough",
    "vuart",
    "abort-policy",
    "vm-name",
];

#[derive(Clone, Debug)]
enum Edit {
    /// Replace the value of property `prop` of node `node` with `value`.
    Value {
        node: prop::sample::Index,
        prop: prop::sample::Index,
        value: Vec<u8>,
    },
    /// Keep the value, cut it to `len` bytes.
    Cut {
        node: prop::sample::Index,
        prop: prop::sample::Index,
        len: usize,
    },
    /// Give a property another name the readers look for.
    Rename {
        node: prop::sample::Index,
        prop: prop::sample::Index,
        name: prop::sample::Index,
    },
    /// Add a property the readers look for.
    Add {
        node: prop::sample::Index,
        name: prop::sample::Index,
        value: Vec<u8>,
    },
    /// Remove a node (not the root).
    Drop { node: prop::sample::Index },
    /// Flip a byte of the written blob.
    Byte { at: prop::sample::Index, value: u8 },
}

fn edit() -> impl Strategy<Value = Edit> {
    let idx = any::<prop::sample::Index>;
    let value = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..24),
        // Plausible values: cells with small numbers, strings that name nodes.
        proptest::collection::vec(0u32..4, 0..6)
            .prop_map(|c| c.iter().flat_map(|v| v.to_be_bytes()).collect()),
        prop::sample::select(vec![
            &b"/pl011@9000000\0"[..],
            b"/chosen\0",
            b"/\0",
            b"\0",
            b"/pl011@9000000",
            b"arm,pl011\0",
            b"memory\0",
            b"cpu\0",
            b"/cpus\0/timer\0",
        ])
        .prop_map(<[u8]>::to_vec),
    ];
    prop_oneof![
        (idx(), idx(), value.clone()).prop_map(|(node, prop, value)| Edit::Value {
            node,
            prop,
            value
        }),
        (idx(), idx(), 0usize..8).prop_map(|(node, prop, len)| Edit::Cut { node, prop, len }),
        (idx(), idx(), idx()).prop_map(|(node, prop, name)| Edit::Rename { node, prop, name }),
        (idx(), idx(), value).prop_map(|(node, name, value)| Edit::Add { node, name, value }),
        idx().prop_map(|node| Edit::Drop { node }),
        (idx(), any::<u8>()).prop_map(|(at, value)| Edit::Byte { at, value }),
    ]
}

fn apply(tree: &mut Node, edits: &[Edit]) -> Vec<u8> {
    let mut bytes = Vec::new();
    for e in edits {
        let paths = tree.paths();
        let n = paths.len();
        let at = |i: &prop::sample::Index| paths[i.index(n)].clone();
        match e {
            Edit::Value { node, prop, value } => {
                let node = tree.by_path(&at(node));
                if !node.props.is_empty() {
                    let i = prop.index(node.props.len());
                    node.props[i].1 = value.clone();
                }
            }
            Edit::Cut { node, prop, len } => {
                let node = tree.by_path(&at(node));
                if !node.props.is_empty() {
                    let i = prop.index(node.props.len());
                    node.props[i].1.truncate(*len);
                }
            }
            Edit::Rename { node, prop, name } => {
                let node = tree.by_path(&at(node));
                if !node.props.is_empty() {
                    let i = prop.index(node.props.len());
                    node.props[i].0 = NAMES[name.index(NAMES.len())].to_owned();
                }
            }
            Edit::Add { node, name, value } => {
                tree.by_path(&at(node))
                    .set(NAMES[name.index(NAMES.len())], value);
            }
            Edit::Drop { node } => {
                let parent = tree.by_path(&at(node));
                if !parent.children.is_empty() {
                    let i = node.index(parent.children.len());
                    parent.children.remove(i);
                }
            }
            Edit::Byte { at, value } => bytes.push((*at, *value)),
        }
    }
    let mut blob = tree.write();
    for (at, value) in bytes {
        let i = at.index(blob.len());
        blob[i] = value;
    }
    blob
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    /// A mutated host tree (values, lengths, names, nodes and raw bytes) is rejected or
    /// accepted by the whole start-up path, never a panic.
    #[test]
    fn mutated_host_trees_never_panic(edits in proptest::collection::vec(edit(), 1..6)) {
        let mut tree = linux_vm();
        let blob = apply(&mut tree, &edits);
        let _ = start_up(&blob);
    }
}
