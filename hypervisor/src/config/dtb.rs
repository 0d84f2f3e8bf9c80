//! In-place clean-up of a flattened device tree before it is parsed.
//!
//! QEMU edits a `-dtb` blob when it loads it (it replaces the memory nodes) and leaves
//! `FDT_NOP` tokens between nodes where the old ones were. The `fdt` crate (0.1) stops at
//! a NOP between sibling nodes, so nodes after it (e.g. `/cpus`, `/chosen`) would not be
//! found. [`strip_nops`] compacts the structure block so no NOP is left (Devicetree
//! Specification v0.4, 5.4 "Structure Block").
//!
//! It also rejects what would make the `fdt` crate panic (it indexes and unwraps on
//! offsets, names and property values it reads from the blob): a VM description comes
//! from whoever builds the DTB, so a malformed one must be an error, not a crash.
//! `docs/decisions.md` ("Host device trees cannot panic the hypervisor") lists every
//! panic site of `fdt` 0.1.5 (pinned) and which check or rule closes it:
//!
//! - the structure: header offsets and sizes inside the blob, a terminated memory
//!   reservation block, one properly nested tree with properties before children, node
//!   and property names that are terminated UTF-8 inside their blocks ([`validate`]);
//! - property values the crate indexes or unwraps ([`check_property`]): every
//!   `#...-cells`, `phandle` and `interrupt-parent` is one 32-bit cell, and every property
//!   the crate reads as a string (`compatible`, `bootargs`, `stdout-path`, ...) is
//!   non-empty and NUL-terminated (Devicetree Specification v0.4, 2.2.4 and 2.3);
//! - the crate's accessors that panic or recurse without bound on a valid tree
//!   (`Fdt::find_node` follows `/aliases` into itself, `Fdt::chosen` needs a `/chosen`)
//!   are refused by `clippy.toml` (`disallowed-methods`); paths are looked up with
//!   `config::find_path` instead.

const FDT_MAGIC: u32 = 0xd00d_feed;
const FDT_BEGIN_NODE: u32 = 1;
const FDT_END_NODE: u32 = 2;
const FDT_PROP: u32 = 3;
const FDT_NOP: u32 = 4;
const FDT_END: u32 = 9;

/// Size of a flattened device tree's header (version 17).
pub const HEADER_SIZE: usize = 40;

/// The `totalsize` of the device tree whose header starts `header`, if `header` holds the
/// FDT magic and a size that covers at least the header itself.
#[must_use]
pub fn total_size(header: &[u8]) -> Option<usize> {
    let total = usize::try_from(be32(header, 4).ok()?).ok()?;
    (be32(header, 0).ok()? == FDT_MAGIC && total >= HEADER_SIZE).then_some(total)
}

/// The blob is not a well-formed flattened device tree; the text says what is wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MalformedDtb(pub &'static str);

impl core::fmt::Display for MalformedDtb {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "not a well-formed flattened device tree: {}", self.0)
    }
}

impl core::error::Error for MalformedDtb {}

const TRUNCATED: MalformedDtb = MalformedDtb("a field lies beyond the end of its block");

/// `at + n`, or the error `why` when it overflows.
fn add(at: usize, n: usize, why: &'static str) -> Result<usize, MalformedDtb> {
    at.checked_add(n).ok_or(MalformedDtb(why))
}

fn be32(b: &[u8], at: usize) -> Result<u32, MalformedDtb> {
    let s = b.get(at..add(at, 4, TRUNCATED.0)?).ok_or(TRUNCATED)?;
    let word: [u8; 4] = s.try_into().map_err(|_| TRUNCATED)?;
    Ok(u32::from_be_bytes(word))
}

fn be32_usize(b: &[u8], at: usize) -> Result<usize, MalformedDtb> {
    usize::try_from(be32(b, at)?).map_err(|_| TRUNCATED)
}

fn align4(x: usize) -> Result<usize, MalformedDtb> {
    x.checked_add(3)
        .map(|v| v & !3)
        .ok_or(MalformedDtb("a length overflows"))
}

/// Most node nesting accepted (the `fdt` crate and the guest tree writer recurse per level).
const MAX_DEPTH: usize = 32;

/// A C string at `at` that ends before `end`, as UTF-8 (the `fdt` crate unwraps both).
fn c_str(blob: &[u8], at: usize, end: usize) -> Result<&str, MalformedDtb> {
    let bytes = blob
        .get(at..end)
        .ok_or(MalformedDtb("a name lies outside its block"))?;
    let len = bytes
        .iter()
        .position(|b| *b == 0)
        .ok_or(MalformedDtb("a name has no terminating NUL"))?;
    let name = bytes.get(..len).ok_or(TRUNCATED)?;
    core::str::from_utf8(name).map_err(|_| MalformedDtb("a name is not UTF-8"))
}

/// Properties whose value the `fdt` crate reads as one big-endian 32-bit cell and
/// unwraps (`cell_sizes`) or that our readers take as one cell.
fn is_single_cell(name: &str) -> bool {
    (name.starts_with('#') && name.ends_with("-cells"))
        || matches!(name, "phandle" | "linux,phandle" | "interrupt-parent")
}

/// Properties the `fdt` crate reads as strings by cutting off the last byte
/// (`Chosen::bootargs`, `stdout`, `stdin`, `Compatible::first`) or that hold a string or
/// string list by the Devicetree Specification (v0.4, 2.3 and 3.6).
fn is_string(name: &str) -> bool {
    matches!(
        name,
        "compatible"
            | "model"
            | "status"
            | "device_type"
            | "name"
            | "bootargs"
            | "stdout-path"
            | "stdin-path"
            | "method"
            | "enable-method"
    )
}

/// Checks a property value that the `fdt` crate (or our own readers) would index or
/// unwrap by the property's name: one cell for `#...-cells`, `phandle` and
/// `interrupt-parent`; a non-empty NUL-terminated value for string properties.
///
/// # Errors
///
/// [`MalformedDtb`] naming the rule the value breaks.
pub fn check_property(name: &str, value: &[u8]) -> Result<(), MalformedDtb> {
    if is_single_cell(name) && value.len() != 4 {
        return Err(MalformedDtb(
            "a #...-cells, phandle or interrupt-parent property is not one 32-bit cell",
        ));
    }
    if is_string(name) && value.last() != Some(&0) {
        return Err(MalformedDtb(
            "a string property is empty or not NUL-terminated",
        ));
    }
    Ok(())
}

/// Where the blocks of a checked blob lie.
struct Layout {
    /// Structure block start and end.
    off: usize,
    end: usize,
    /// How many NOP tokens the structure block has.
    nops: usize,
}

/// Checks everything the `fdt` crate relies on without checking itself: header offsets
/// and sizes inside the blob, a terminated memory-reservation block, and a structure
/// block that is one properly nested tree (properties before child nodes, names in UTF-8,
/// property names inside the strings block, values per [`check_property`]).
fn validate(blob: &[u8]) -> Result<Layout, MalformedDtb> {
    let total = total_size(blob).ok_or(MalformedDtb("no FDT magic or a size below the header"))?;
    let field = |at| be32_usize(blob, at);
    let (off, strings, rsv) = (field(8)?, field(12)?, field(16)?);
    let (version, strings_size, size) = (field(20)?, field(32)?, field(36)?);
    let end = add(off, size, "the structure block overflows")?;
    let strings_end = add(strings, strings_size, "the strings block overflows")?;
    if total > blob.len() {
        return Err(MalformedDtb("totalsize is beyond the blob"));
    }
    if version < 17 {
        return Err(MalformedDtb("version below 17"));
    }
    if end > total || strings_end > total {
        return Err(MalformedDtb("a block lies beyond totalsize"));
    }
    if off % 4 != 0 || rsv % 8 != 0 || rsv < HEADER_SIZE {
        return Err(MalformedDtb("a block is misaligned or overlaps the header"));
    }
    // Removing NOPs rewrites the structure block in place after this check: a strings
    // block inside it would change under names already checked.
    if off < strings_end && strings < end {
        return Err(MalformedDtb(
            "the strings block overlaps the structure block",
        ));
    }
    let blob = blob.get(..total).ok_or(TRUNCATED)?;
    let mut entry = rsv;
    loop {
        let e = blob
            .get(entry..add(entry, 16, TRUNCATED.0)?)
            .ok_or(MalformedDtb(
                "the memory reservation block is not terminated",
            ))?;
        if e.iter().all(|b| *b == 0) {
            break;
        }
        entry = add(entry, 16, TRUNCATED.0)?;
    }
    let structure = blob.get(..end).ok_or(TRUNCATED)?;
    // Per depth: whether the open node already has a child (properties must come first).
    let mut has_child = [false; MAX_DEPTH + 1];
    let mut depth: usize = 0;
    let mut root_done = false;
    let mut pos = off;
    let mut nops: usize = 0;
    let bad_nesting = MalformedDtb("the structure block is not one properly nested tree");
    loop {
        let token = be32(structure, pos)?;
        let len = match token {
            FDT_BEGIN_NODE => {
                if root_done || depth >= MAX_DEPTH {
                    return Err(MalformedDtb("a second root or nodes nested too deep"));
                }
                *has_child.get_mut(depth).ok_or(bad_nesting)? = true;
                depth = add(depth, 1, bad_nesting.0)?;
                *has_child.get_mut(depth).ok_or(bad_nesting)? = false;
                let name = c_str(blob, add(pos, 4, TRUNCATED.0)?, end)?;
                add(4, align4(add(name.len(), 1, TRUNCATED.0)?)?, TRUNCATED.0)?
            }
            FDT_PROP => {
                if depth == 0 || has_child.get(depth).copied().unwrap_or(true) {
                    return Err(MalformedDtb(
                        "a property outside a node or after a child node",
                    ));
                }
                let vlen = be32_usize(structure, add(pos, 4, TRUNCATED.0)?)?;
                let nameoff = be32_usize(structure, add(pos, 8, TRUNCATED.0)?)?;
                let name = c_str(blob, add(strings, nameoff, TRUNCATED.0)?, strings_end)?;
                let at = add(pos, 12, TRUNCATED.0)?;
                let value = structure
                    .get(at..add(at, vlen, TRUNCATED.0)?)
                    .ok_or(MalformedDtb(
                        "a property value lies beyond the structure block",
                    ))?;
                check_property(name, value)?;
                add(12, align4(vlen)?, TRUNCATED.0)?
            }
            FDT_END_NODE => {
                depth = depth.checked_sub(1).ok_or(bad_nesting)?;
                root_done = depth == 0;
                4
            }
            FDT_NOP => {
                nops = add(nops, 1, TRUNCATED.0)?;
                4
            }
            FDT_END if root_done => break,
            _ => return Err(MalformedDtb("an unknown token or the tree is not closed")),
        };
        pos = add(pos, len, TRUNCATED.0)?;
        if pos > end {
            return Err(TRUNCATED);
        }
    }
    Ok(Layout { off, end, nops })
}

/// Length of the token at `read` of a checked structure block, and whether it is kept
/// (NOPs are not).
fn token_len(blob: &[u8], read: usize, end: usize) -> Result<(u32, usize), MalformedDtb> {
    let token = be32(blob, read)?;
    let len = match token {
        FDT_BEGIN_NODE => {
            let name = c_str(blob, add(read, 4, TRUNCATED.0)?, end)?;
            add(4, align4(add(name.len(), 1, TRUNCATED.0)?)?, TRUNCATED.0)?
        }
        FDT_PROP => add(
            12,
            align4(be32_usize(blob, add(read, 4, TRUNCATED.0)?)?)?,
            TRUNCATED.0,
        )?,
        _ => 4,
    };
    Ok((token, len))
}

/// Checks `blob` (see the module documentation) and removes every `FDT_NOP` token from
/// its structure block in place, moving the following tokens down and filling the freed
/// tail with `FDT_END`; updates `size_dt_struct`. Returns how many NOPs were removed.
/// After `Ok`, the `fdt` crate can parse the blob without panicking.
///
/// # Errors
///
/// [`MalformedDtb`] (and `blob` unchanged) when the header, the reservation block or the
/// token stream is not valid.
pub fn strip_nops(blob: &mut [u8]) -> Result<usize, MalformedDtb> {
    let Layout { off, end, nops } = validate(blob)?;
    if nops == 0 {
        return Ok(0);
    }
    // Second pass over the checked block: compact. It reads only tokens the first pass
    // checked (and always ahead of where it writes), so it does not fail half-way.
    let mut read = off;
    let mut write = off;
    loop {
        let (token, len) = token_len(blob, read, end)?;
        let next = add(read, len, TRUNCATED.0)?;
        if token != FDT_NOP {
            if next > end {
                return Err(TRUNCATED);
            }
            blob.copy_within(read..next, write);
            write = add(write, len, TRUNCATED.0)?;
        }
        read = next;
        if token == FDT_END {
            break;
        }
    }
    let new_size = u32::try_from(write.saturating_sub(off)).map_err(|_| TRUNCATED)?;
    while let Some(word) = blob.get_mut(write..add(write, 4, TRUNCATED.0)?.min(end)) {
        if word.len() < 4 {
            break;
        }
        word.copy_from_slice(&FDT_END.to_be_bytes());
        write = add(write, 4, TRUNCATED.0)?;
    }
    blob.get_mut(36..40)
        .ok_or(TRUNCATED)?
        .copy_from_slice(&new_size.to_be_bytes());
    Ok(nops)
}

/// A host device tree, checked and cleaned of NOPs once ([`strip_nops`]) and parsed once:
/// the hardware ([`crate::config::Hardware`]), the VM descriptions ([`crate::config::parse`])
/// and a Linux guest's device tree (`crate::linux`) are all read from this one value.
#[derive(Clone, Copy)]
pub struct HostDt<'a> {
    fdt: fdt::Fdt<'a>,
    blob: &'a [u8],
}

impl core::fmt::Debug for HostDt<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("HostDt")
            .field("at", &self.blob.as_ptr())
            .field("size", &self.blob.len())
            .finish()
    }
}

impl<'a> HostDt<'a> {
    /// Checks `blob` and removes its NOPs in place (see [`strip_nops`]), then parses it.
    ///
    /// # Errors
    ///
    /// [`MalformedDtb`] (and `blob` unchanged) when it is not a well-formed device tree.
    pub fn new(blob: &'a mut [u8]) -> Result<Self, MalformedDtb> {
        strip_nops(blob)?;
        let total = total_size(blob).ok_or(TRUNCATED)?;
        let blob: &'a [u8] = blob.get(..total).ok_or(TRUNCATED)?;
        let fdt = fdt::Fdt::new(blob).map_err(|_| MalformedDtb("the fdt crate refuses it"))?;
        Ok(Self { fdt, blob })
    }

    /// The device tree at physical address `addr`, `totalsize` bytes as its header says.
    ///
    /// # Errors
    ///
    /// [`MalformedDtb`] when there is no device tree header at `addr` or the tree is not
    /// well formed.
    ///
    /// # Safety
    ///
    /// `addr` must point to at least a device tree header, then to `totalsize` bytes that
    /// are readable, writable and used by nothing else for `'a`.
    pub unsafe fn at(addr: u64) -> Result<Self, MalformedDtb> {
        // SAFETY: the caller guarantees a readable header at `addr`.
        let header = unsafe { core::slice::from_raw_parts(addr as *const u8, HEADER_SIZE) };
        let total =
            total_size(header).ok_or(MalformedDtb("no FDT magic or a size below the header"))?;
        // SAFETY: the caller guarantees `totalsize` bytes at `addr` that only we use.
        Self::new(unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, total) })
    }

    /// The parsed tree.
    #[must_use]
    pub fn fdt(&self) -> &fdt::Fdt<'a> {
        &self.fdt
    }

    /// Where the blob lies and how long it is (its address is physical: the hypervisor's
    /// stage 1 is an identity map, and before it the MMU is off).
    #[must_use]
    pub fn range(&self) -> crate::mem::PhysRange {
        crate::mem::PhysRange::new(
            crate::mem::PhysAddr::new(self.blob.as_ptr() as u64),
            self.blob.len() as u64,
        )
    }
}

/// QEMU 7.2's own device tree for `-M virt,gic-version=3,virtualization=on -smp 2 -m 2G
/// -nic none` (dumped with `dumpdtb=`, compacted by `dtc -I dtb -O dtb`), as a [`HostDt`].
#[cfg(test)]
pub(crate) fn qemu_virt() -> HostDt<'static> {
    let blob = include_bytes!("../../testdata/qemu-virt-gicv3-2cpu.dtb");
    HostDt::new(Box::leak(Box::new(*blob))).expect("QEMU's device tree")
}

#[cfg(test)]
// The tests read trees they built (or the hypervisor wrote) with the crate's own lookups.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;
    use vm_fdt::FdtWriter;

    fn tree() -> Vec<u8> {
        let mut w = FdtWriter::new().expect("writer");
        let root = w.begin_node("").expect("root");
        let a = w.begin_node("memory@40000000").expect("node");
        w.property_string("device_type", "memory").expect("prop");
        w.end_node(a).expect("end");
        let cpus = w.begin_node("cpus").expect("node");
        w.property_u32("#address-cells", 1).expect("prop");
        w.end_node(cpus).expect("end");
        let chosen = w.begin_node("chosen").expect("node");
        w.property_string("bootargs", "x").expect("prop");
        w.end_node(chosen).expect("end");
        w.end_node(root).expect("end");
        w.finish().expect("finish")
    }

    /// Turns the first node named `name` into NOPs, as libfdt's `fdt_nop_node` does.
    fn nop_node(blob: &mut [u8], name: &str) {
        let off = be32(blob, 8).expect("off") as usize;
        let mut needle = name.as_bytes().to_vec();
        needle.push(0);
        let at = (off..blob.len() - needle.len())
            .find(|&i| {
                blob[i..i + needle.len()] == needle[..] && be32(blob, i - 4) == Ok(FDT_BEGIN_NODE)
            })
            .expect("node")
            - 4;
        for w in (at..at + blob_skip(blob, at)).step_by(4) {
            blob[w..w + 4].copy_from_slice(&FDT_NOP.to_be_bytes());
        }
    }

    #[test]
    fn total_size_needs_the_magic_and_a_whole_header() {
        let blob = tree();
        assert_eq!(total_size(&blob), Some(blob.len()));
        let mut bad_magic = blob.clone();
        bad_magic[3] ^= 1;
        assert_eq!(total_size(&bad_magic), None);
        let mut tiny = blob.clone();
        tiny[4..8].copy_from_slice(&(HEADER_SIZE as u32 - 1).to_be_bytes());
        assert_eq!(total_size(&tiny), None);
        assert_eq!(total_size(&blob[..6]), None);
    }

    #[test]
    fn nops_between_nodes_are_removed() {
        let mut blob = tree();
        nop_node(&mut blob, "cpus");
        {
            let fdt = fdt::Fdt::new(&blob).expect("valid");
            // The fdt crate stops at the NOPs: this is what the clean-up is for.
            assert!(fdt.find_node("/chosen").is_none());
        }
        let removed = strip_nops(&mut blob).expect("clean");
        assert_eq!(removed, 8, "BEGIN+name(8) + PROP(12+4) + END = 32 bytes");
        let fdt = fdt::Fdt::new(&blob).expect("valid");
        assert!(fdt.find_node("/cpus").is_none());
        assert!(fdt.find_node("/memory").is_some());
        let chosen = fdt.find_node("/chosen").expect("chosen");
        assert_eq!(
            chosen.property("bootargs").and_then(|p| p.as_str()),
            Some("x")
        );
        assert_eq!(strip_nops(&mut blob), Ok(0));
    }

    /// Offset of the first occurrence of `needle` in the structure block.
    fn find(blob: &[u8], needle: &[u8]) -> usize {
        let off = be32(blob, 8).expect("off") as usize;
        off + blob[off..]
            .windows(needle.len())
            .position(|w| w == needle)
            .expect("found")
    }

    #[test]
    fn what_the_fdt_crate_would_panic_on_is_rejected() {
        let good = tree();
        let reject = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut b = good.clone();
            f(&mut b);
            let before = b.clone();
            assert!(matches!(strip_nops(&mut b), Err(MalformedDtb(_))));
            assert_eq!(b, before, "a rejected blob is left alone");
        };
        // Strings block beyond the blob.
        reject(&|b| b[12..16].copy_from_slice(&0x0100_0000u32.to_be_bytes()));
        // Version 16 (no size_dt_struct).
        reject(&|b| b[20..24].copy_from_slice(&16u32.to_be_bytes()));
        // A property name offset outside the strings block.
        reject(&|b| {
            let at = find(b, &FDT_PROP.to_be_bytes());
            b[at + 8..at + 12].copy_from_slice(&0xffffu32.to_be_bytes());
        });
        // A node name that is not UTF-8.
        reject(&|b| {
            let at = find(b, b"cpus");
            b[at] = 0xff;
        });
        // The strings block inside the structure block.
        reject(&|b| {
            let off = be32(b, 8).expect("off");
            b[12..16].copy_from_slice(&(off + 8).to_be_bytes());
        });
        // An END_NODE turned into a NOP: the tree is not closed.
        reject(&|b| {
            let at = find(b, b"chosen");
            let end = at + blob_skip(b, at - 4);
            b[end - 4..end].copy_from_slice(&FDT_NOP.to_be_bytes());
        });
        // A property after a child node: chosen's BEGIN and END become NOPs, so its
        // `bootargs` ends up in the root after the root's children (the crate expects
        // properties first).
        reject(&|b| {
            let at = find(b, b"chosen") - 4;
            for w in (at..at + 12).step_by(4) {
                b[w..w + 4].copy_from_slice(&FDT_NOP.to_be_bytes());
            }
            let end = at + blob_skip(b, at);
            b[end - 4..end].copy_from_slice(&FDT_NOP.to_be_bytes());
        });
    }

    #[test]
    fn strings_inside_the_structure_block_are_refused() {
        // Found by the config_dtb fuzz target: QEMU's tree with a VM node, its strings
        // block moved into the structure block (off_dt_strings 0x1dd8 -> 0x2d8). The
        // names the property offsets reach there pass the checks, but removing the
        // NOPs rewrites those bytes, and the fdt crate then panicked on a name that is
        // no longer UTF-8.
        let mut blob =
            include_bytes!("../../tests/fixtures/virt-gicv3-with-vm-in-chosen.dtb").to_vec();
        blob[14] = 0x02;
        let before = blob.clone();
        assert_eq!(
            HostDt::new(&mut blob).map(|_| ()),
            Err(MalformedDtb(
                "the strings block overlaps the structure block"
            ))
        );
        assert_eq!(blob, before, "a rejected blob is left alone");
    }

    /// Length in bytes of the node starting at the BEGIN_NODE token at `at` (walks
    /// nested tokens; NOPs count as 4 bytes).
    fn blob_skip(b: &[u8], at: usize) -> usize {
        let mut i = at;
        let mut depth = 0;
        loop {
            let t = be32(b, i).expect("token");
            i += match t {
                FDT_BEGIN_NODE => {
                    depth += 1;
                    4 + align4(b[i + 4..].iter().position(|c| *c == 0).expect("name") + 1)
                        .expect("len")
                }
                FDT_PROP => 12 + align4(be32(b, i + 4).expect("len") as usize).expect("len"),
                FDT_END_NODE => {
                    depth -= 1;
                    4
                }
                _ => 4,
            };
            if depth == 0 {
                return i - at;
            }
        }
    }

    #[test]
    fn a_tree_in_memory_is_read_for_its_totalsize_only() {
        // A larger buffer: only `totalsize` bytes may be used.
        let mut buf = tree();
        let len = buf.len();
        nop_node(&mut buf, "cpus");
        buf.extend_from_slice(&[0xaa; 256]);
        // SAFETY: `buf` is readable and writable for its whole length, which covers the
        // header and `totalsize`, and nothing else uses it.
        let dt = unsafe { HostDt::at(buf.as_ptr() as u64) }.expect("a device tree");
        assert_eq!(dt.range().size, len as u64);
        assert!(dt.fdt().find_node("/chosen").is_some(), "NOPs removed");
        let mut zeros = [0u8; 64];
        // SAFETY: 64 readable bytes cover the header; the magic check fails first.
        let bad = unsafe { HostDt::at(zeros.as_mut_ptr() as u64) };
        assert!(bad.is_err());
    }

    #[test]
    fn clean_and_malformed_blobs() {
        let mut blob = tree();
        let copy = blob.clone();
        assert_eq!(strip_nops(&mut blob), Ok(0));
        assert_eq!(blob, copy);
        let mut bad = copy.clone();
        let off = be32(&bad, 8).expect("off") as usize;
        bad[off..off + 4].copy_from_slice(&7u32.to_be_bytes());
        let before = bad.clone();
        assert!(matches!(strip_nops(&mut bad), Err(MalformedDtb(_))));
        assert_eq!(bad, before);
        assert!(matches!(strip_nops(&mut [0u8; 8]), Err(MalformedDtb(_))));
        let mut short = copy[..copy.len() - 8].to_vec();
        assert!(matches!(strip_nops(&mut short), Err(MalformedDtb(_))));
    }
}
