//! Reading a fuzz input as fixed-size records, and writing seeds in the same layout.
//!
//! Every target reads its input as a short header and then fixed-size records, one per
//! operation. Each byte of a record picks one field (a value from a small table of
//! interesting ones, or a raw value), so that libFuzzer's byte mutations change one
//! field of one operation at a time and a seed can be written by hand as the records it
//! holds (`crate::seeds`). A record cut short at the end of the input is ignored.

/// A cursor over the fuzz input.
#[derive(Clone, Debug)]
pub struct Bytes<'a> {
    data: &'a [u8],
}

impl<'a> Bytes<'a> {
    /// A cursor at the start of `data`.
    #[must_use]
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    /// The next byte, 0 past the end.
    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    /// The next 8 bytes as a little-endian value (missing bytes read as 0).
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(core::array::from_fn(|_| self.u8()))
    }

    /// The next record of `N` bytes, or `None` when fewer are left.
    pub fn record<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.data.split_first_chunk::<N>()?;
        self.data = rest;
        Some(*head)
    }

    /// Everything not read yet.
    #[must_use]
    pub fn rest(&self) -> &'a [u8] {
        self.data
    }
}

/// `options[b % options.len()]` (`options` is never empty).
#[must_use]
pub fn pick<T: Copy>(options: &[T], b: u8) -> T {
    options[usize::from(b) % options.len()]
}

/// `N` little-endian bytes of `v`, for writing records.
#[must_use]
pub fn le(v: u64) -> [u8; 8] {
    v.to_le_bytes()
}
