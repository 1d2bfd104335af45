//! A zero-copy decoder for the `pgoutput` logical replication protocol, versions 1 and 2.
//!
//! Every message borrows from the input buffer; tuple data is validated once while decoding and
//! then iterated without allocation. Malformed input yields [`DecodeError`], never a panic (fuzzed
//! by `fuzz/fuzz_targets/pgoutput.rs`).
//!
//! In protocol version 2 the messages sent inside a streamed (in-progress) transaction carry the
//! transaction id after the tag; the caller says whether a stream block is open.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("pgoutput message truncated while reading {what} at byte {at}")]
    Truncated { what: &'static str, at: usize },
    #[error("unknown pgoutput message tag {0:#04x}")]
    UnknownTag(u8),
    #[error("invalid {what} byte {value:#04x} at byte {at}")]
    Invalid { what: &'static str, value: u8, at: usize },
    #[error("negative {what} at byte {at}")]
    NegativeLength { what: &'static str, at: usize },
    #[error("string at byte {at} is not NUL-terminated UTF-8")]
    BadString { at: usize },
}

/// One column value inside a tuple.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TupleValue<'a> {
    Null,
    UnchangedToast,
    Text(&'a [u8]),
    Binary(&'a [u8]),
}

/// A validated TupleData block; iterate with [`TupleData::values`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TupleData<'a> {
    count: u16,
    raw: &'a [u8],
}

impl fmt::Debug for TupleData<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.values()).finish()
    }
}

impl<'a> TupleData<'a> {
    pub fn len(&self) -> usize {
        usize::from(self.count)
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The column bytes after the count, exactly as sent.
    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }

    pub fn values(&self) -> impl Iterator<Item = TupleValue<'a>> + 'a {
        let mut r = Reader { buf: self.raw, pos: 0 };
        // Already validated by `Reader::tuple`, so the fallbacks are unreachable in practice;
        // they end the iteration instead of panicking.
        (0..self.count).map_while(move |_| r.value().ok())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelationColumn<'a> {
    /// Part of the replica identity.
    pub is_key: bool,
    pub name: &'a str,
    pub type_oid: u32,
    pub type_modifier: i32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelationBody<'a> {
    pub oid: u32,
    pub namespace: &'a str,
    pub name: &'a str,
    pub replica_identity: u8,
    pub columns: Vec<RelationColumn<'a>>,
}

/// Old-row information of an update or delete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OldTuple<'a> {
    /// `K`: replica identity columns only.
    Key(TupleData<'a>),
    /// `O`: the whole old row (REPLICA IDENTITY FULL).
    Old(TupleData<'a>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message<'a> {
    Begin { final_lsn: u64, commit_time: i64, xid: u32 },
    Commit { flags: u8, commit_lsn: u64, end_lsn: u64, commit_time: i64 },
    Origin { commit_lsn: u64, name: &'a str },
    Relation { xid: Option<u32>, body: RelationBody<'a> },
    Type { xid: Option<u32>, oid: u32, namespace: &'a str, name: &'a str },
    Insert { xid: Option<u32>, relation: u32, new: TupleData<'a> },
    Update { xid: Option<u32>, relation: u32, old: Option<OldTuple<'a>>, new: TupleData<'a> },
    Delete { xid: Option<u32>, relation: u32, old: OldTuple<'a> },
    Truncate { xid: Option<u32>, options: u8, relations: Vec<u32> },
    Message { xid: Option<u32>, transactional: bool, lsn: u64, prefix: &'a str, content: &'a [u8] },
    StreamStart { xid: u32, first_segment: bool },
    StreamStop,
    StreamCommit { xid: u32, flags: u8, commit_lsn: u64, end_lsn: u64, commit_time: i64 },
    StreamAbort { xid: u32, subxid: u32 },
}

pub const TRUNCATE_CASCADE: u8 = 1;
pub const TRUNCATE_RESTART_IDENTITY: u8 = 2;

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.buf.len());
        let end = end.ok_or(DecodeError::Truncated { what, at: self.pos })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }

    fn i16(&mut self, what: &'static str) -> Result<i16, DecodeError> {
        let b = self.take(2, what)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        let b = self.take(4, what)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        self.i32(what).map(|v| v as u32)
    }

    fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(i64::from_be_bytes(a))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        self.i64(what).map(|v| v as u64)
    }

    fn cstr(&mut self) -> Result<&'a str, DecodeError> {
        let at = self.pos;
        let rest = self.buf.get(self.pos..).unwrap_or_default();
        let nul = rest.iter().position(|b| *b == 0).ok_or(DecodeError::BadString { at })?;
        let s = std::str::from_utf8(&rest[..nul]).map_err(|_| DecodeError::BadString { at })?;
        self.pos += nul + 1;
        Ok(s)
    }

    /// A non-negative i32 length or count.
    fn len32(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        let at = self.pos;
        usize::try_from(self.i32(what)?).map_err(|_| DecodeError::NegativeLength { what, at })
    }

    /// A non-negative i16 count.
    fn len16(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        let at = self.pos;
        usize::try_from(self.i16(what)?).map_err(|_| DecodeError::NegativeLength { what, at })
    }

    fn value(&mut self) -> Result<TupleValue<'a>, DecodeError> {
        let at = self.pos;
        match self.u8("column kind")? {
            b'n' => Ok(TupleValue::Null),
            b'u' => Ok(TupleValue::UnchangedToast),
            kind @ (b't' | b'b') => {
                let len = self.len32("column length")?;
                let data = self.take(len, "column value")?;
                Ok(if kind == b't' { TupleValue::Text(data) } else { TupleValue::Binary(data) })
            }
            value => Err(DecodeError::Invalid { what: "column kind", value, at }),
        }
    }

    fn tuple(&mut self) -> Result<TupleData<'a>, DecodeError> {
        let count = self.i16("column count")?;
        let count = u16::try_from(count).map_err(|_| DecodeError::Invalid {
            what: "column count",
            value: 0xff,
            at: self.pos - 2,
        })?;
        let start = self.pos;
        for _ in 0..count {
            self.value()?;
        }
        Ok(TupleData { count, raw: &self.buf[start..self.pos] })
    }

    fn xid_if(&mut self, streaming: bool) -> Result<Option<u32>, DecodeError> {
        if streaming {
            self.u32("xid").map(Some)
        } else {
            Ok(None)
        }
    }

    fn expect(&mut self, what: &'static str, allowed: &[u8]) -> Result<u8, DecodeError> {
        let at = self.pos;
        let b = self.u8(what)?;
        if allowed.contains(&b) {
            Ok(b)
        } else {
            Err(DecodeError::Invalid { what, value: b, at })
        }
    }
}

/// Decodes one pgoutput message. `in_stream` is true between StreamStart and StreamStop
/// (protocol v2), where most messages carry the streamed transaction's xid.
pub fn decode(buf: &[u8], in_stream: bool) -> Result<Message<'_>, DecodeError> {
    let mut r = Reader { buf, pos: 0 };
    let tag = r.u8("message tag")?;
    let m = match tag {
        b'B' => {
            Message::Begin { final_lsn: r.u64("final lsn")?, commit_time: r.i64("commit time")?, xid: r.u32("xid")? }
        }
        b'C' => Message::Commit {
            flags: r.u8("flags")?,
            commit_lsn: r.u64("commit lsn")?,
            end_lsn: r.u64("end lsn")?,
            commit_time: r.i64("commit time")?,
        },
        b'O' => Message::Origin { commit_lsn: r.u64("origin lsn")?, name: r.cstr()? },
        b'R' => {
            let xid = r.xid_if(in_stream)?;
            let oid = r.u32("relation oid")?;
            let namespace = r.cstr()?;
            let name = r.cstr()?;
            let replica_identity = r.expect("replica identity", b"dnfi")?;
            let n = r.len16("column count")?;
            let mut columns = Vec::with_capacity(n.min(1600));
            for _ in 0..n {
                let flags = r.u8("column flags")?;
                columns.push(RelationColumn {
                    is_key: flags & 1 == 1,
                    name: r.cstr()?,
                    type_oid: r.u32("type oid")?,
                    type_modifier: r.i32("type modifier")?,
                });
            }
            Message::Relation { xid, body: RelationBody { oid, namespace, name, replica_identity, columns } }
        }
        b'Y' => {
            Message::Type { xid: r.xid_if(in_stream)?, oid: r.u32("type oid")?, namespace: r.cstr()?, name: r.cstr()? }
        }
        b'I' => {
            let xid = r.xid_if(in_stream)?;
            let relation = r.u32("relation oid")?;
            r.expect("insert tuple marker", b"N")?;
            Message::Insert { xid, relation, new: r.tuple()? }
        }
        b'U' => {
            let xid = r.xid_if(in_stream)?;
            let relation = r.u32("relation oid")?;
            let old = match r.expect("update tuple marker", b"KON")? {
                b'K' => Some(OldTuple::Key(r.tuple()?)),
                b'O' => Some(OldTuple::Old(r.tuple()?)),
                _ => None,
            };
            if old.is_some() {
                r.expect("update new tuple marker", b"N")?;
            }
            Message::Update { xid, relation, old, new: r.tuple()? }
        }
        b'D' => {
            let xid = r.xid_if(in_stream)?;
            let relation = r.u32("relation oid")?;
            let old = match r.expect("delete tuple marker", b"KO")? {
                b'K' => OldTuple::Key(r.tuple()?),
                _ => OldTuple::Old(r.tuple()?),
            };
            Message::Delete { xid, relation, old }
        }
        b'T' => {
            let xid = r.xid_if(in_stream)?;
            let n = r.len32("relation count")?;
            let options = r.u8("truncate options")?;
            // Bound the allocation by what the buffer can hold.
            let mut relations = Vec::with_capacity(n.min(buf.len() / 4));
            for _ in 0..n {
                relations.push(r.u32("relation oid")?);
            }
            Message::Truncate { xid, options, relations }
        }
        b'M' => {
            let xid = r.xid_if(in_stream)?;
            let flags = r.u8("message flags")?;
            let lsn = r.u64("message lsn")?;
            let prefix = r.cstr()?;
            let len = r.len32("content length")?;
            Message::Message {
                xid,
                transactional: flags & 1 == 1,
                lsn,
                prefix,
                content: r.take(len, "message content")?,
            }
        }
        b'S' => Message::StreamStart { xid: r.u32("xid")?, first_segment: r.u8("first segment")? == 1 },
        b'E' => Message::StreamStop,
        b'c' => Message::StreamCommit {
            xid: r.u32("xid")?,
            flags: r.u8("flags")?,
            commit_lsn: r.u64("commit lsn")?,
            end_lsn: r.u64("end lsn")?,
            commit_time: r.i64("commit time")?,
        },
        // v4 appends abort lsn/time for parallel apply; v1–v3 end after the subxid.
        b'A' => Message::StreamAbort { xid: r.u32("xid")?, subxid: r.u32("subxid")? },
        other => return Err(DecodeError::UnknownTag(other)),
    };
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tuple(values: &[Option<&str>]) -> Vec<u8> {
        let mut v = (values.len() as i16).to_be_bytes().to_vec();
        for x in values {
            match x {
                None => v.push(b'n'),
                Some("\u{0}toast") => v.push(b'u'),
                Some(s) => {
                    v.push(b't');
                    v.extend((s.len() as i32).to_be_bytes());
                    v.extend(s.as_bytes());
                }
            }
        }
        v
    }

    #[test]
    fn begin_commit() {
        let mut b = vec![b'B'];
        b.extend(0x0123_u64.to_be_bytes());
        b.extend(7_i64.to_be_bytes());
        b.extend(42_u32.to_be_bytes());
        assert_eq!(decode(&b, false), Ok(Message::Begin { final_lsn: 0x123, commit_time: 7, xid: 42 }));
        let mut c = vec![b'C', 0];
        c.extend(1_u64.to_be_bytes());
        c.extend(2_u64.to_be_bytes());
        c.extend(3_i64.to_be_bytes());
        assert_eq!(decode(&c, false), Ok(Message::Commit { flags: 0, commit_lsn: 1, end_lsn: 2, commit_time: 3 }));
        assert!(matches!(decode(&c[..10], false), Err(DecodeError::Truncated { .. })));
    }

    #[test]
    fn relation_and_update_with_toast_and_streaming_xid() {
        let mut r = vec![b'R'];
        r.extend(99_u32.to_be_bytes()); // xid (streaming)
        r.extend(16384_u32.to_be_bytes());
        r.extend(b"public\0users\0d");
        r.extend(2_i16.to_be_bytes());
        r.push(1);
        r.extend(b"id\0");
        r.extend(20_u32.to_be_bytes());
        r.extend((-1_i32).to_be_bytes());
        r.push(0);
        r.extend(b"bio\0");
        r.extend(25_u32.to_be_bytes());
        r.extend((-1_i32).to_be_bytes());
        let Message::Relation { xid, body } = decode(&r, true).unwrap() else { panic!() };
        assert_eq!(xid, Some(99));
        assert_eq!(body.name, "users");
        assert!(body.columns[0].is_key && !body.columns[1].is_key);

        let mut u = vec![b'U'];
        u.extend(16384_u32.to_be_bytes());
        u.push(b'K');
        u.extend(tuple(&[Some("1"), None]));
        u.push(b'N');
        u.extend(tuple(&[Some("2"), Some("\u{0}toast")]));
        let Message::Update { old: Some(OldTuple::Key(k)), new, .. } = decode(&u, false).unwrap() else { panic!() };
        assert_eq!(k.values().collect::<Vec<_>>(), vec![TupleValue::Text(b"1"), TupleValue::Null]);
        assert_eq!(new.values().collect::<Vec<_>>(), vec![TupleValue::Text(b"2"), TupleValue::UnchangedToast]);
    }

    #[test]
    fn bad_input_is_an_error() {
        assert_eq!(decode(b"Z", false), Err(DecodeError::UnknownTag(b'Z')));
        assert!(decode(b"", false).is_err());
        let mut i = vec![b'I'];
        i.extend(1_u32.to_be_bytes());
        i.push(b'N');
        i.extend(1_i16.to_be_bytes());
        i.push(b't');
        i.extend((-5_i32).to_be_bytes());
        assert!(matches!(decode(&i, false), Err(DecodeError::NegativeLength { what: "column length", .. })));
    }

    proptest! {
        #[test]
        fn never_panics(bytes: Vec<u8>, stream: bool) {
            let _ = decode(&bytes, stream).map(|m| format!("{m:?}"));
        }

        #[test]
        fn tuples_roundtrip(vals: Vec<Option<String>>) {
            let refs: Vec<Option<&str>> = vals.iter().map(|v| v.as_deref().filter(|s| !s.starts_with('\u{0}'))).collect();
            let mut i = vec![b'I'];
            i.extend(7_u32.to_be_bytes());
            i.push(b'N');
            i.extend(tuple(&refs));
            let Ok(Message::Insert { new, .. }) = decode(&i, false) else { panic!("decode") };
            let got: Vec<Option<&[u8]>> = new.values().map(|v| match v { TupleValue::Text(t) => Some(t), _ => None }).collect();
            let want: Vec<Option<&[u8]>> = refs.iter().map(|v| v.map(str::as_bytes)).collect();
            prop_assert_eq!(got, want);
        }
    }
}
