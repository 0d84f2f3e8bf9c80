//! Whole lines from a byte stream a guest writes (a virtual UART), assembled in a fixed
//! buffer: a completed [`Line`] is handed out by value, so the caller prints it after
//! releasing whatever lock guards the buffer, and nothing is allocated.

use core::fmt;

/// A line longer than this is handed out in pieces.
pub const MAX_LINE: usize = 160;

/// One line of guest output: printable ASCII (other bytes replaced by `?`), no newline.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Line {
    bytes: [u8; MAX_LINE],
    len: usize,
}

impl Line {
    const EMPTY: Self = Self {
        bytes: [0; MAX_LINE],
        len: 0,
    };

    /// The text.
    #[must_use]
    pub fn as_str(&self) -> &str {
        // Only printable ASCII is ever stored.
        let bytes = self.bytes.get(..self.len).unwrap_or_default();
        core::str::from_utf8(bytes).unwrap_or("")
    }
}

impl fmt::Debug for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

/// Assembles lines from bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LineBuffer {
    line: Line,
}

impl Default for LineBuffer {
    fn default() -> Self {
        Self::new()
    }
}

impl LineBuffer {
    /// Empty.
    #[must_use]
    pub const fn new() -> Self {
        Self { line: Line::EMPTY }
    }

    /// Adds one byte: `\n` ends the line (an empty one is not handed out), `\r` is
    /// ignored, control bytes and non-ASCII become `?`. Returns the line it completed,
    /// if any (a full buffer completes one too).
    pub fn push(&mut self, byte: u8) -> Option<Line> {
        match byte {
            b'\n' => self.take(),
            b'\r' => None,
            b => {
                let c = if b.is_ascii_graphic() || b == b' ' || b == b'\t' {
                    b
                } else {
                    b'?'
                };
                // `len < MAX_LINE` holds: a full line is handed out right away.
                if let Some(slot) = self.line.bytes.get_mut(self.line.len) {
                    *slot = c;
                    // Below `MAX_LINE` (the slot exists): the sum is exact.
                    self.line.len = self.line.len.saturating_add(1);
                }
                (self.line.len >= MAX_LINE).then(|| self.take_line())
            }
        }
    }

    /// The partial line, if there is one (e.g. before the VM powers off).
    pub fn take(&mut self) -> Option<Line> {
        (self.line.len > 0).then(|| self.take_line())
    }

    fn take_line(&mut self) -> Line {
        core::mem::replace(&mut self.line, Line::EMPTY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(b: &mut LineBuffer, s: &[u8]) -> Vec<String> {
        s.iter()
            .filter_map(|c| b.push(*c))
            .map(|l| l.as_str().to_string())
            .collect()
    }

    #[test]
    fn lines_split_sanitised_and_bounded() {
        let mut b = LineBuffer::new();
        assert_eq!(
            feed(&mut b, b"hello\r\nworld\x01\xff\n\n"),
            ["hello", "world??"]
        );
        let long = vec![b'a'; MAX_LINE + 3];
        let out = feed(&mut b, &long);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].len(), MAX_LINE);
        assert_eq!(b.take().map(|l| l.as_str().to_string()), Some("aaa".into()));
        assert_eq!(b.take(), None);
    }
}
