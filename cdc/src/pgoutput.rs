//! Decoder of the pgoutput logical replication messages (protocol version 1).
//!
//! Pure: bytes in, [`Message`] out, with checked reads that turn any truncated or garbled
//! input into a [`DecodeError`] instead of a panic.

use bytes::Bytes;

use crate::lsn::Lsn;

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01).
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// Why a message could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("message ends early: needed {needed} more bytes while reading {what}")]
    Truncated { what: &'static str, needed: usize },
    #[error("unknown pgoutput message type {0:?}")]
    UnknownMessage(char),
    #[error("unexpected byte {found:?} while reading {what}")]
    Unexpected { what: &'static str, found: char },
    #[error("string in {0} is not terminated or not UTF-8")]
    BadString(&'static str),
    #[error("empty message")]
    Empty,
}

/// One column value of a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Datum {
    Null,
    /// A TOASTed value that did not change and that PostgreSQL did not send.
    UnchangedToast,
    /// The value in PostgreSQL's text output format.
    Text(Bytes),
    /// The value in binary format (only with the `binary` option, which ficus does not use).
    Binary(Bytes),
}

/// A row image: one datum per column of the relation.
pub type Tuple = Vec<Datum>;

/// A column of a relation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Part of the replica identity (usually the primary key).
    pub is_key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// The description of a table, sent before its first change and after each schema change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub id: u32,
    pub namespace: String,
    pub name: String,
    /// `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    pub columns: Vec<Column>,
}

/// Which old row image an update or delete carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldKind {
    /// Only the replica-identity columns (`K`).
    Key,
    /// The whole old row, under REPLICA IDENTITY FULL (`O`).
    Full,
}

/// A decoded pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Begin { final_lsn: Lsn, commit_time: i64, xid: u32 },
    Commit { flags: u8, commit_lsn: Lsn, end_lsn: Lsn, commit_time: i64 },
    Origin { commit_lsn: Lsn, name: String },
    Relation(Relation),
    Type { id: u32, namespace: String, name: String },
    Insert { relation: u32, new: Tuple },
    Update { relation: u32, old: Option<(OldKind, Tuple)>, new: Tuple },
    Delete { relation: u32, old: (OldKind, Tuple) },
    Truncate { options: u8, relations: Vec<u32> },
    LogicalMessage { transactional: bool, lsn: Lsn, prefix: String, content: Bytes },
}

/// Decodes one pgoutput message (the payload of an XLogData).
pub fn decode(data: &Bytes) -> Result<Message, DecodeError> {
    let mut r = Reader { data, pos: 0 };
    let tag = r.u8("message type").map_err(|_| DecodeError::Empty)?;
    let message = match tag {
        b'B' => Message::Begin {
            final_lsn: Lsn(r.u64("begin lsn")?),
            commit_time: r.i64("begin timestamp")?,
            xid: r.u32("begin xid")?,
        },
        b'C' => Message::Commit {
            flags: r.u8("commit flags")?,
            commit_lsn: Lsn(r.u64("commit lsn")?),
            end_lsn: Lsn(r.u64("commit end lsn")?),
            commit_time: r.i64("commit timestamp")?,
        },
        b'O' => Message::Origin {
            commit_lsn: Lsn(r.u64("origin lsn")?),
            name: r.string("origin name")?,
        },
        b'R' => Message::Relation(relation(&mut r)?),
        b'Y' => Message::Type {
            id: r.u32("type oid")?,
            namespace: r.string("type namespace")?,
            name: r.string("type name")?,
        },
        b'I' => {
            let relation = r.u32("insert relation")?;
            r.expect(b'N', "insert tuple marker")?;
            Message::Insert { relation, new: tuple(&mut r)? }
        }
        b'U' => update(&mut r)?,
        b'D' => {
            let relation = r.u32("delete relation")?;
            let kind = old_kind(r.u8("delete tuple marker")?, "delete tuple marker")?;
            Message::Delete { relation, old: (kind, tuple(&mut r)?) }
        }
        b'T' => {
            let count = r.u32("truncate relation count")?;
            let options = r.u8("truncate options")?;
            let mut relations = Vec::with_capacity(count.min(1024) as usize);
            for _ in 0..count {
                relations.push(r.u32("truncate relation")?);
            }
            Message::Truncate { options, relations }
        }
        b'M' => {
            let transactional = r.u8("message flags")? & 1 == 1;
            let lsn = Lsn(r.u64("message lsn")?);
            let prefix = r.string("message prefix")?;
            let len = r.u32("message length")? as usize;
            Message::LogicalMessage {
                transactional,
                lsn,
                prefix,
                content: r.bytes(len, "message content")?,
            }
        }
        other => return Err(DecodeError::UnknownMessage(char::from(other))),
    };
    Ok(message)
}

fn relation(r: &mut Reader<'_>) -> Result<Relation, DecodeError> {
    let id = r.u32("relation oid")?;
    let namespace = r.string("relation namespace")?;
    let name = r.string("relation name")?;
    let replica_identity = r.u8("relation replica identity")?;
    let count = r.u16("relation column count")?;
    let mut columns = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        columns.push(Column {
            is_key: r.u8("column flags")? & 1 == 1,
            name: r.string("column name")?,
            type_oid: r.u32("column type")?,
            type_modifier: r.i32("column type modifier")?,
        });
    }
    // pg_catalog relations are sent with an empty namespace.
    let namespace = if namespace.is_empty() { "pg_catalog".to_string() } else { namespace };
    Ok(Relation { id, namespace, name, replica_identity, columns })
}

fn update(r: &mut Reader<'_>) -> Result<Message, DecodeError> {
    let relation = r.u32("update relation")?;
    let marker = r.u8("update tuple marker")?;
    let old = match marker {
        b'N' => None,
        b'K' | b'O' => {
            let kind = old_kind(marker, "update tuple marker")?;
            let old = tuple(r)?;
            r.expect(b'N', "update new tuple marker")?;
            Some((kind, old))
        }
        other => {
            return Err(DecodeError::Unexpected {
                what: "update tuple marker",
                found: char::from(other),
            })
        }
    };
    Ok(Message::Update { relation, old, new: tuple(r)? })
}

fn old_kind(marker: u8, what: &'static str) -> Result<OldKind, DecodeError> {
    match marker {
        b'K' => Ok(OldKind::Key),
        b'O' => Ok(OldKind::Full),
        other => Err(DecodeError::Unexpected { what, found: char::from(other) }),
    }
}

fn tuple(r: &mut Reader<'_>) -> Result<Tuple, DecodeError> {
    let count = r.u16("tuple column count")?;
    let mut datums = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let datum = match r.u8("column kind")? {
            b'n' => Datum::Null,
            b'u' => Datum::UnchangedToast,
            b't' => {
                let len = r.u32("text length")? as usize;
                Datum::Text(r.bytes(len, "text value")?)
            }
            b'b' => {
                let len = r.u32("binary length")? as usize;
                Datum::Binary(r.bytes(len, "binary value")?)
            }
            other => {
                return Err(DecodeError::Unexpected {
                    what: "column kind",
                    found: char::from(other),
                })
            }
        };
        datums.push(datum);
    }
    Ok(datums)
}

/// Checked big-endian reads over a message; values share the message's buffer.
struct Reader<'a> {
    data: &'a Bytes,
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&[u8], DecodeError> {
        let end = self.pos.checked_add(n).filter(|&end| end <= self.data.len()).ok_or(
            DecodeError::Truncated { what, needed: n.saturating_sub(self.data.len() - self.pos) },
        )?;
        let slice = &self.data[self.pos..end];
        self.pos = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }

    fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array(what)?))
    }

    fn expect(&mut self, byte: u8, what: &'static str) -> Result<(), DecodeError> {
        match self.u8(what)? {
            found if found == byte => Ok(()),
            found => Err(DecodeError::Unexpected { what, found: char::from(found) }),
        }
    }

    fn bytes(&mut self, n: usize, what: &'static str) -> Result<Bytes, DecodeError> {
        let start = self.pos;
        self.take(n, what)?;
        Ok(self.data.slice(start..start + n))
    }

    fn string(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let rest = &self.data[self.pos..];
        let len = rest.iter().position(|&b| b == 0).ok_or(DecodeError::BadString(what))?;
        let text = std::str::from_utf8(&rest[..len]).map_err(|_| DecodeError::BadString(what))?;
        let text = text.to_string();
        self.pos += len + 1;
        Ok(text)
    }
}

/// Messages captured from a real server, for the tests of the decoder and of the stream.
#[cfg(test)]
pub mod captured {
    use super::*;

    /// One transaction captured from PostgreSQL 15 with `pg_logical_slot_peek_binary_changes`
    /// (table `cap(id int primary key, name text, big text)`, REPLICA IDENTITY FULL): begin,
    /// relation, insert, update, delete, relation, truncate, a transactional logical message,
    /// commit.
    pub const CAPTURED: [&str; 9] = [
        "4200000000015a462000030427b9706ad6000002e1",
        "520000400c7075626c696300636170006600030169640000000017ffffffff016e616d650000000019ffffffff016269670000000019ffffffff",
        "490000400c4e00037400000001317400000001616e",
        "550000400c4f00037400000001317400000001616e4e00037400000001317400000001626e",
        "440000400c4f00037400000001317400000001626e",
        "520000400c7075626c696300636170006600030169640000000017ffffffff016e616d650000000019ffffffff016269670000000019ffffffff",
        "5400000001000000400c",
        "4d0100000000015a46206669637573000000000568656c6c6f",
        "430000000000015a462000000000015a479000030427b9706ad6",
    ];

    pub fn hex(s: &str) -> Bytes {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect::<Vec<_>>()
            .into()
    }

    /// Captured message `index`, decoded.
    pub fn message(index: usize) -> Message {
        decode(&hex(CAPTURED[index])).expect("decodes")
    }
}

#[cfg(test)]
mod tests {
    use super::captured::{hex, CAPTURED};
    use super::*;

    fn text(s: &str) -> Datum {
        Datum::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    fn captured() -> Vec<Message> {
        (0..CAPTURED.len()).map(super::captured::message).collect()
    }

    #[test]
    fn captured_begin_relation_and_commit_decode() {
        let messages = captured();
        assert_eq!(
            messages[0],
            Message::Begin {
                final_lsn: Lsn(0x15A_4620),
                commit_time: 0x0003_0427_b970_6ad6,
                xid: 737
            }
        );
        let Message::Relation(relation) = &messages[1] else { panic!("{:?}", messages[1]) };
        assert_eq!(
            (relation.id, relation.namespace.as_str(), relation.name.as_str()),
            (16396, "public", "cap")
        );
        assert_eq!(relation.replica_identity, b'f');
        let names: Vec<_> =
            relation.columns.iter().map(|c| (c.name.as_str(), c.type_oid, c.is_key)).collect();
        assert_eq!(names, [("id", 23, true), ("name", 25, true), ("big", 25, true)]);
        assert_eq!(
            messages[8],
            Message::Commit {
                flags: 0,
                commit_lsn: Lsn(0x15A_4620),
                end_lsn: Lsn(0x15A_4790),
                commit_time: 0x0003_0427_b970_6ad6
            }
        );
    }

    #[test]
    fn captured_changes_decode() {
        let messages = captured();
        assert_eq!(
            messages[2],
            Message::Insert { relation: 16396, new: vec![text("1"), text("a"), Datum::Null] }
        );
        assert_eq!(
            messages[3],
            Message::Update {
                relation: 16396,
                old: Some((OldKind::Full, vec![text("1"), text("a"), Datum::Null])),
                new: vec![text("1"), text("b"), Datum::Null],
            }
        );
        assert_eq!(
            messages[4],
            Message::Delete {
                relation: 16396,
                old: (OldKind::Full, vec![text("1"), text("b"), Datum::Null])
            }
        );
        assert_eq!(messages[6], Message::Truncate { options: 0, relations: vec![16396] });
        assert_eq!(
            messages[7],
            Message::LogicalMessage {
                transactional: true,
                lsn: Lsn(0x15A_4620),
                prefix: "ficus".into(),
                content: Bytes::from_static(b"hello")
            }
        );
    }

    #[test]
    fn key_only_updates_and_unchanged_toast_decode() {
        // Update with the old key ('K') and an unchanged TOASTed column ('u').
        let message = hex("550000400c4b00037400000001316e6e4e00037400000001327400000001627500");
        let message = &message[..message.len() - 1];
        assert_eq!(
            decode(&Bytes::copy_from_slice(message)).expect("decodes"),
            Message::Update {
                relation: 16396,
                old: Some((OldKind::Key, vec![text("1"), Datum::Null, Datum::Null])),
                new: vec![text("2"), text("b"), Datum::UnchangedToast],
            }
        );
    }

    #[test]
    fn type_and_origin_messages_decode() {
        // Type 16385 "public"."mood"; Origin at 0/10 named "upstream".
        let type_message = [&[b'Y'][..], &16385u32.to_be_bytes(), b"public\0mood\0"].concat();
        assert_eq!(
            decode(&Bytes::from(type_message)).expect("decodes"),
            Message::Type { id: 16385, namespace: "public".into(), name: "mood".into() }
        );
        let origin = [&[b'O'][..], &16u64.to_be_bytes(), b"upstream\0"].concat();
        assert_eq!(
            decode(&Bytes::from(origin)).expect("decodes"),
            Message::Origin { commit_lsn: Lsn(16), name: "upstream".into() }
        );
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        for message in CAPTURED {
            let bytes = hex(message);
            for len in 0..bytes.len() {
                assert!(decode(&bytes.slice(..len)).is_err(), "{message} cut at {len}");
            }
        }
    }

    #[test]
    fn garbage_is_rejected() {
        assert_eq!(decode(&Bytes::from_static(b"Zxyz")), Err(DecodeError::UnknownMessage('Z')));
        assert!(matches!(decode(&hex("490000400c58")), Err(DecodeError::Unexpected { .. })));
        assert!(matches!(decode(&hex("490000400c4e000178")), Err(DecodeError::Unexpected { .. })));
        assert_eq!(decode(&Bytes::new()), Err(DecodeError::Empty));
        // A length far beyond the message.
        assert!(matches!(
            decode(&hex("490000400c4e000174ffffffff")),
            Err(DecodeError::Truncated { .. })
        ));
    }
}
