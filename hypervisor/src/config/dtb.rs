//! In-place clean-up of a flattened device tree before it is parsed.
//!
//! QEMU edits a `-dtb` blob when it loads it (it replaces the memory nodes) and leaves
//! `FDT_NOP` tokens between nodes where the old ones were. The `fdt` crate (0.1) stops at
//! a NOP between sibling nodes, so nodes after it (e.g. `/cpus`, `/chosen`) would not be
//! found. [`strip_nops`] compacts the structure block so no NOP is left (Devicetree
//! Specification v0.4, 5.4 "Structure Block").
//!
//! It also rejects what would make the `fdt` crate panic (it indexes and unwraps on
//! offsets and names it reads from the blob): a VM description comes from whoever
//! builds the DTB, so a malformed one must be an error, not a crash.

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
    let total = be32(header, 4).ok()? as usize;
    (be32(header, 0).ok()? == FDT_MAGIC && total >= HEADER_SIZE).then_some(total)
}

/// The blob is not a well-formed flattened device tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MalformedDtb;

impl core::fmt::Display for MalformedDtb {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("not a well-formed flattened device tree")
    }
}

impl core::error::Error for MalformedDtb {}

fn be32(b: &[u8], at: usize) -> Result<u32, MalformedDtb> {
    let s = b
        .get(at..at.checked_add(4).ok_or(MalformedDtb)?)
        .ok_or(MalformedDtb)?;
    Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

fn align4(x: usize) -> Option<usize> {
    x.checked_add(3).map(|v| v & !3)
}

/// Most node nesting accepted (the `fdt` crate indexes a fixed array by depth).
const MAX_DEPTH: usize = 32;

/// A C string at `at` that ends before `end`, as UTF-8 (the `fdt` crate unwraps both).
fn c_str(blob: &[u8], at: usize, end: usize) -> Result<&str, MalformedDtb> {
    let bytes = blob.get(at..end).ok_or(MalformedDtb)?;
    let len = bytes.iter().position(|b| *b == 0).ok_or(MalformedDtb)?;
    core::str::from_utf8(&bytes[..len]).map_err(|_| MalformedDtb)
}

/// Checks everything the `fdt` crate relies on without checking itself: header offsets
/// and sizes inside the blob, a terminated memory-reservation block, and a structure
/// block that is one properly nested tree (properties before child nodes, names in UTF-8,
/// property names inside the strings block). Returns the structure block's start and
/// end and the number of NOP tokens in it.
fn validate(blob: &[u8]) -> Result<(usize, usize, usize), MalformedDtb> {
    let total = total_size(blob).ok_or(MalformedDtb)?;
    let field = |at| be32(blob, at).map(|v| v as usize);
    let (off, strings, rsv) = (field(8)?, field(12)?, field(16)?);
    let (version, strings_size, size) = (field(20)?, field(32)?, field(36)?);
    let end = off.checked_add(size).ok_or(MalformedDtb)?;
    let strings_end = strings.checked_add(strings_size).ok_or(MalformedDtb)?;
    if total > blob.len() || version < 17 || end > total || strings_end > total {
        return Err(MalformedDtb);
    }
    if off % 4 != 0 || rsv % 8 != 0 || rsv < 40 {
        return Err(MalformedDtb);
    }
    let mut entry = rsv;
    loop {
        let e = blob
            .get(entry..entry.checked_add(16).ok_or(MalformedDtb)?)
            .ok_or(MalformedDtb)?;
        if entry + 16 > total {
            return Err(MalformedDtb);
        }
        if e.iter().all(|b| *b == 0) {
            break;
        }
        entry += 16;
    }
    let blob = &blob[..total];
    // Per depth: whether the open node already has a child (properties must come first).
    let mut has_child = [false; MAX_DEPTH + 1];
    let mut depth = 0;
    let mut root_done = false;
    let mut pos = off;
    let mut nops = 0;
    loop {
        let token = be32(&blob[..end], pos)?;
        let len = match token {
            FDT_BEGIN_NODE => {
                if root_done || depth == MAX_DEPTH {
                    return Err(MalformedDtb);
                }
                has_child[depth] = true;
                depth += 1;
                has_child[depth] = false;
                let name = c_str(blob, pos + 4, end)?;
                4 + align4(name.len() + 1).ok_or(MalformedDtb)?
            }
            FDT_PROP => {
                if depth == 0 || has_child[depth] {
                    return Err(MalformedDtb);
                }
                let vlen = be32(&blob[..end], pos + 4)? as usize;
                let nameoff = be32(&blob[..end], pos + 8)? as usize;
                c_str(
                    blob,
                    strings.checked_add(nameoff).ok_or(MalformedDtb)?,
                    strings_end,
                )?;
                12 + align4(vlen).ok_or(MalformedDtb)?
            }
            FDT_END_NODE => {
                if depth == 0 {
                    return Err(MalformedDtb);
                }
                depth -= 1;
                root_done = depth == 0;
                4
            }
            FDT_NOP => {
                nops += 1;
                4
            }
            FDT_END if root_done => break,
            _ => return Err(MalformedDtb),
        };
        pos = pos
            .checked_add(len)
            .filter(|p| *p <= end)
            .ok_or(MalformedDtb)?;
    }
    Ok((off, end, nops))
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
    let (off, end, nops) = validate(blob)?;
    if nops == 0 {
        return Ok(0);
    }
    // Second pass: compact.
    let mut read = off;
    let mut write = off;
    loop {
        let token = be32(blob, read)?;
        let len = match token {
            FDT_BEGIN_NODE => {
                let name_end = blob[read + 4..end]
                    .iter()
                    .position(|b| *b == 0)
                    .ok_or(MalformedDtb)?;
                4 + align4(name_end + 1).ok_or(MalformedDtb)?
            }
            FDT_PROP => 12 + align4(be32(blob, read + 4)? as usize).ok_or(MalformedDtb)?,
            FDT_END_NODE | FDT_END => 4,
            _ => {
                read += 4;
                continue;
            }
        };
        blob.copy_within(read..read + len, write);
        write += len;
        read += len;
        if token == FDT_END {
            break;
        }
    }
    let new_size = write - off;
    while write + 4 <= end {
        blob[write..write + 4].copy_from_slice(&FDT_END.to_be_bytes());
        write += 4;
    }
    blob[36..40].copy_from_slice(
        &u32::try_from(new_size)
            .map_err(|_| MalformedDtb)?
            .to_be_bytes(),
    );
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
        let total = total_size(blob).ok_or(MalformedDtb)?;
        let blob: &'a [u8] = &blob[..total];
        let fdt = fdt::Fdt::new(blob).map_err(|_| MalformedDtb)?;
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
        let total = total_size(header).ok_or(MalformedDtb)?;
        // SAFETY: the caller guarantees `totalsize` bytes at `addr` that only we use.
        Self::new(unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, total) })
    }

    /// The parsed tree.
    #[must_use]
    pub fn fdt(&self) -> &fdt::Fdt<'a> {
        &self.fdt
    }

    /// Where the blob lies and how long it is.
    #[must_use]
    pub fn range(&self) -> crate::mem::PhysRange {
        crate::mem::PhysRange::new(self.blob.as_ptr() as u64, self.blob.len() as u64)
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
            assert_eq!(strip_nops(&mut b), Err(MalformedDtb));
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
        assert_eq!(strip_nops(&mut bad), Err(MalformedDtb));
        assert_eq!(bad, before);
        assert_eq!(strip_nops(&mut [0u8; 8]), Err(MalformedDtb));
        let mut short = copy[..copy.len() - 8].to_vec();
        assert_eq!(strip_nops(&mut short), Err(MalformedDtb));
    }
}
