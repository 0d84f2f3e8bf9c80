//! In-place clean-up of a flattened device tree before it is parsed.
//!
//! QEMU edits a `-dtb` blob when it loads it (it replaces the memory nodes) and leaves
//! `FDT_NOP` tokens between nodes where the old ones were. The `fdt` crate (0.1) stops at
//! a NOP between sibling nodes, so nodes after it (e.g. `/cpus`, `/chosen`) would not be
//! found. [`strip_nops`] compacts the structure block so no NOP is left (Devicetree
//! Specification v0.4, 5.4 "Structure Block").

const FDT_MAGIC: u32 = 0xd00d_feed;
const FDT_BEGIN_NODE: u32 = 1;
const FDT_END_NODE: u32 = 2;
const FDT_PROP: u32 = 3;
const FDT_NOP: u32 = 4;
const FDT_END: u32 = 9;

/// The blob is not a well-formed flattened device tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MalformedDtb;

fn be32(b: &[u8], at: usize) -> Result<u32, MalformedDtb> {
    let s = b
        .get(at..at.checked_add(4).ok_or(MalformedDtb)?)
        .ok_or(MalformedDtb)?;
    Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

fn align4(x: usize) -> Option<usize> {
    x.checked_add(3).map(|v| v & !3)
}

/// Removes every `FDT_NOP` token from the structure block of `blob` in place, moving the
/// following tokens down and filling the freed tail with `FDT_END`; updates
/// `size_dt_struct`. Returns how many NOPs were removed.
///
/// # Errors
///
/// [`MalformedDtb`] (and `blob` unchanged) when the header or the token stream is not
/// valid.
pub fn strip_nops(blob: &mut [u8]) -> Result<usize, MalformedDtb> {
    if be32(blob, 0)? != FDT_MAGIC {
        return Err(MalformedDtb);
    }
    let total = be32(blob, 4)? as usize;
    let off = be32(blob, 8)? as usize;
    let size = be32(blob, 36)? as usize;
    let end = off.checked_add(size).ok_or(MalformedDtb)?;
    if total > blob.len() || end > total {
        return Err(MalformedDtb);
    }
    // First pass: validate and find the token boundaries, so that a malformed blob is
    // left untouched.
    let mut pos = off;
    let mut nops = 0;
    loop {
        let token = be32(&blob[..end], pos)?;
        let len = match token {
            FDT_BEGIN_NODE => {
                let name_end = blob[pos + 4..end]
                    .iter()
                    .position(|b| *b == 0)
                    .ok_or(MalformedDtb)?;
                4 + align4(name_end + 1).ok_or(MalformedDtb)?
            }
            FDT_PROP => {
                let vlen = be32(&blob[..end], pos + 4)? as usize;
                12 + align4(vlen).ok_or(MalformedDtb)?
            }
            FDT_END_NODE => 4,
            FDT_NOP => {
                nops += 1;
                4
            }
            FDT_END => break,
            _ => return Err(MalformedDtb),
        };
        pos = pos
            .checked_add(len)
            .filter(|p| *p <= end)
            .ok_or(MalformedDtb)?;
    }
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
        let mut i = at;
        let mut depth = 0;
        loop {
            let t = be32(blob, i).expect("token");
            let len = match t {
                FDT_BEGIN_NODE => {
                    depth += 1;
                    4 + align4(blob[i + 4..].iter().position(|b| *b == 0).expect("name") + 1)
                        .expect("len")
                }
                FDT_PROP => 12 + align4(be32(blob, i + 4).expect("len") as usize).expect("len"),
                _ => {
                    depth -= 1;
                    4
                }
            };
            for w in (i..i + len).step_by(4) {
                blob[w..w + 4].copy_from_slice(&FDT_NOP.to_be_bytes());
            }
            i += len;
            if depth == 0 {
                break;
            }
        }
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
