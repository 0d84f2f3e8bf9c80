//! Whole lines from a byte stream a guest writes (a virtual UART), assembled in a fixed
//! buffer: [`LineBuffer::push`] says when a line is complete and [`LineBuffer::take`]
//! hands it out by value, once per line (not per byte), so the caller prints it after
//! releasing whatever lock guards the buffer, and nothing is allocated.

use core::fmt;

/// A line longer than this is handed out in pieces.
pub const MAX_LINE: usize = 160;

/// One line of guest output: printable ASCII (other bytes replaced by `?`), no newline.
/// Lines compare by their text.
#[derive(Clone, Copy)]
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

impl PartialEq for Line {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Line {}

impl fmt::Debug for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

/// Assembles lines from bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LineBuffer {
    line: Line,
    /// `line` is complete: the next [`Self::push`] starts a new one.
    done: bool,
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
        Self {
            line: Line::EMPTY,
            done: false,
        }
    }

    /// Adds one byte: `\n` ends the line (an empty one is not handed out), `\r` is
    /// ignored, control bytes and non-ASCII become `?`. True if this completed a line (a
    /// full buffer completes one too): [`Self::take`] it before the next push, which
    /// otherwise starts a new line over it.
    pub fn push(&mut self, byte: u8) -> bool {
        if self.done {
            self.clear();
        }
        match byte {
            b'\n' => self.done = self.line.len > 0,
            b'\r' => {}
            b => {
                let c = if b.is_ascii_graphic() || b == b' ' || b == b'\t' {
                    b
                } else {
                    b'?'
                };
                // `len < MAX_LINE` holds: a full line is complete, and cleared first.
                if let Some(slot) = self.line.bytes.get_mut(self.line.len) {
                    *slot = c;
                    // Below `MAX_LINE` (the slot exists): the sum is exact.
                    self.line.len = self.line.len.saturating_add(1);
                }
                self.done = self.line.len >= MAX_LINE;
            }
        }
        self.done
    }

    /// The line so far, complete or not (e.g. before the VM powers off), if it is not
    /// empty; the buffer starts a new one.
    pub fn take(&mut self) -> Option<Line> {
        let line = (self.line.len > 0).then_some(self.line);
        self.clear();
        line
    }

    fn clear(&mut self) {
        self.line.len = 0;
        self.done = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(b: &mut LineBuffer, s: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        for &c in s {
            if b.push(c) {
                out.extend(b.take().map(|l| l.as_str().to_string()));
            }
        }
        out
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

    /// A complete line not taken is replaced by the next one, which holds none of its
    /// bytes; a line taken compares by its text only.
    #[test]
    fn a_new_line_starts_clean() {
        let mut b = LineBuffer::new();
        assert!(!b.push(b'l'));
        assert!(!b.push(b'o'));
        assert!(b.push(b'\n'));
        assert!(!b.push(b'x'), "\"lo\" was not taken: dropped");
        assert!(b.push(b'\n'));
        let x = b.take().unwrap();
        assert_eq!(x.as_str(), "x");
        b.push(b'x');
        assert_eq!(b.take(), Some(x));
    }
}
