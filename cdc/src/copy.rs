//! Parsing of `COPY ... TO STDOUT` text format into row images: tab-separated fields, `\N`
//! for NULL, backslash escapes. Pure and incremental: chunks in, whole rows out.

use bytes::{Bytes, BytesMut};

use crate::pgoutput::Datum;

/// Splits a COPY text stream into rows, whatever the chunk boundaries.
#[derive(Default)]
pub struct CopyRows {
    pending: BytesMut,
}

impl CopyRows {
    /// Adds a chunk and returns the rows it completes.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<Vec<Datum>> {
        self.pending.extend_from_slice(chunk);
        let mut rows = Vec::new();
        while let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
            let line = self.pending.split_to(end + 1);
            rows.push(parse_line(&line[..end]));
        }
        rows
    }

    /// True when no partial row is left over.
    pub fn is_clean(&self) -> bool {
        self.pending.is_empty()
    }
}

/// Parses one line (without its newline) into datums.
pub fn parse_line(line: &[u8]) -> Vec<Datum> {
    line.split(|&b| b == b'\t')
        .map(|field| if field == b"\\N" { Datum::Null } else { Datum::Text(unescape(field)) })
        .collect()
}

fn unescape(field: &[u8]) -> Bytes {
    if !field.contains(&b'\\') {
        return Bytes::copy_from_slice(field);
    }
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let b = field[i];
        i += 1;
        if b != b'\\' || i >= field.len() {
            out.push(b);
            continue;
        }
        let c = field[i];
        i += 1;
        match c {
            b'b' => out.push(8),
            b'f' => out.push(12),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(11),
            b'0'..=b'7' => {
                let mut value = u32::from(c - b'0');
                for _ in 0..2 {
                    match field.get(i) {
                        Some(&d @ b'0'..=b'7') => {
                            value = value * 8 + u32::from(d - b'0');
                            i += 1;
                        }
                        _ => break,
                    }
                }
                out.push(value as u8);
            }
            b'x' => {
                let mut value = 0u32;
                let mut digits = 0;
                while digits < 2 {
                    match field.get(i).and_then(|d| char::from(*d).to_digit(16)) {
                        Some(d) => {
                            value = value * 16 + d;
                            i += 1;
                            digits += 1;
                        }
                        None => break,
                    }
                }
                if digits == 0 {
                    out.push(b'x');
                } else {
                    out.push(value as u8);
                }
            }
            other => out.push(other),
        }
    }
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Datum {
        Datum::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn rows_split_across_chunks() {
        let mut rows = CopyRows::default();
        assert!(rows.push(b"1\ta").is_empty());
        let done = rows.push(b"b\t\\N\n2\tc\tx\n3");
        assert_eq!(
            done,
            vec![vec![text("1"), text("ab"), Datum::Null], vec![text("2"), text("c"), text("x")]]
        );
        assert!(!rows.is_clean());
        assert_eq!(rows.push(b"\t\t\n"), vec![vec![text("3"), text(""), text("")]]);
        assert!(rows.is_clean());
    }

    #[test]
    fn escapes_are_decoded() {
        assert_eq!(parse_line(b"a\\tb\\nc\\\\d"), vec![text("a\tb\nc\\d")]);
        assert_eq!(parse_line(b"\\101\\x42"), vec![text("AB")]);
        assert_eq!(parse_line(b"\\\\x00ff"), vec![text("\\x00ff")], "bytea hex stays text");
    }
}
