//! Streamed (in-progress) transactions, kept on disk until the source commits or aborts them.
//!
//! With pgoutput protocol 2 the source sends a large transaction in blocks while it runs
//! (`StreamStart` … `StreamStop`), interleaved with other transactions' blocks and with whole
//! committed transactions, and ends it with `StreamCommit` or `StreamAbort`. The log holds
//! transactions whole and in commit order, so each streamed transaction's messages wait here,
//! as the source sent them, and go through the ordinary decoding at its commit — the design of
//! PostgreSQL's own subscriber (`streaming = on`).
//!
//! * **Memory stays flat**: messages go to an unlinked temporary file per transaction (never
//!   left behind by a crash); only relation and type messages are also kept in memory.
//! * **Aborts**: a transaction's abort drops its file; a subtransaction's abort cuts the file
//!   at that subtransaction's first message. While a subtransaction is open only it and its
//!   children write, so everything after that point is rolled back with it; the abort of an
//!   enclosing savepoint lists its children too, and the earliest cut wins.
//! * **Restarts**: nothing here is durable, and need not be: the slot's confirmed position is
//!   never past an uncommitted transaction's commit, so the source streams it again from its
//!   start after a reconnect.

use crate::CaptureError;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::PathBuf;

/// Bytes buffered before a write to the file.
const WRITE_BUFFER: usize = 256 << 10;

/// Every transaction the source is streaming on this connection.
pub(crate) struct Spools {
    dir: PathBuf,
    open: HashMap<u32, Spool>,
    /// The transaction whose block is being received (between `StreamStart` and `StreamStop`).
    pub current: Option<u32>,
    bytes: metrics::Gauge,
}

/// One streamed transaction's messages as the source sent them.
pub(crate) struct Spool {
    xid: u32,
    file: BufWriter<File>,
    len: u64,
    /// Subtransactions with messages here, and the offset of each one's first.
    subxacts: Vec<(u32, u64)>,
    /// Relation and type messages with their offsets. pgoutput sends a table's definition once
    /// per streamed transaction, possibly inside a subtransaction: one cut off by that
    /// subtransaction's abort is written again, as later changes of the table depend on it.
    schema: Vec<(u64, u64, Vec<u8>)>,
    /// The replication origin of the transaction, if any.
    pub origin: Option<String>,
    /// Applied by SynapseDB here: not to be captured (see `CaptureConfig::skip_applied`).
    pub skip: bool,
}

impl Spools {
    pub fn new(dir: PathBuf, source: &str) -> Self {
        Spools {
            dir,
            open: HashMap::new(),
            current: None,
            bytes: metrics::gauge!("synapse_capture_spool_bytes", "source" => source.to_owned()),
        }
    }

    fn error(&self, xid: u32) -> impl FnOnce(std::io::Error) -> CaptureError + '_ {
        move |source| CaptureError::Spool { xid, dir: self.dir.display().to_string(), source }
    }

    /// A transaction's first block starts: a new, empty file (one left from an earlier stream
    /// of the same transaction is replaced).
    pub fn start(&mut self, xid: u32) -> Result<(), CaptureError> {
        std::fs::create_dir_all(&self.dir).map_err(self.error(xid))?;
        let file = tempfile::tempfile_in(&self.dir).map_err(self.error(xid))?;
        let spool = Spool {
            xid,
            file: BufWriter::with_capacity(WRITE_BUFFER, file),
            len: 0,
            subxacts: Vec::new(),
            schema: Vec::new(),
            origin: None,
            skip: false,
        };
        self.open.insert(xid, spool);
        self.update_gauge();
        Ok(())
    }

    pub fn get(&mut self, xid: u32) -> Option<&mut Spool> {
        self.open.get_mut(&xid)
    }

    /// Appends one message of the current block; `subxid` is the (sub)transaction the message
    /// names.
    pub fn push(&mut self, top: u32, subxid: u32, wal_end: u64, data: &[u8]) -> Result<(), CaptureError> {
        let Some(spool) = self.open.get_mut(&top) else {
            return Err(CaptureError::Protocol(format!(
                "a block of streamed transaction {top} arrived without its start"
            )));
        };
        let r = spool.push(subxid, wal_end, data);
        r.map_err(self.error(top))
    }

    /// `StreamAbort`: the whole transaction (`subxid == xid`) or one subtransaction.
    pub fn abort(&mut self, xid: u32, subxid: u32) -> Result<bool, CaptureError> {
        let whole = xid == subxid;
        if whole {
            self.open.remove(&xid);
        } else if let Some(spool) = self.open.get_mut(&xid) {
            let r = spool.abort_subxact(subxid);
            r.map_err(self.error(xid))?;
        }
        self.update_gauge();
        Ok(whole)
    }

    /// `StreamCommit`: the transaction leaves the set, to be read back.
    pub fn take(&mut self, xid: u32) -> Option<Spool> {
        let spool = self.open.remove(&xid);
        self.update_gauge();
        spool
    }

    /// Reads a taken spool back from its start.
    pub fn reader(&self, spool: Spool) -> Result<SpoolReader, CaptureError> {
        let xid = spool.xid;
        spool.into_reader().map_err(self.error(xid))
    }

    pub fn read_error(&self, xid: u32, e: std::io::Error) -> CaptureError {
        self.error(xid)(e)
    }

    /// Bytes held on disk for transactions not yet committed or aborted.
    pub fn bytes(&self) -> u64 {
        self.open.values().map(|s| s.len).sum()
    }

    fn update_gauge(&self) {
        self.bytes.set(self.bytes() as f64);
    }

    /// Refreshes the bytes gauge (after a block).
    pub fn block_done(&self) {
        self.update_gauge();
    }
}

impl Spool {
    fn push(&mut self, subxid: u32, wal_end: u64, data: &[u8]) -> std::io::Result<()> {
        let definition = matches!(data.first(), Some(b'R' | b'Y'));
        if self.skip && !definition {
            // Not captured: only its table definitions are kept (see `schema_messages`).
            return Ok(());
        }
        if subxid != self.xid && !self.subxacts.iter().any(|(x, _)| *x == subxid) {
            self.subxacts.push((subxid, self.len));
        }
        if definition {
            self.schema.push((self.len, wal_end, data.to_vec()));
        }
        let len = u32::try_from(data.len()).map_err(|_| std::io::Error::other("message over 4 GiB"))?;
        self.file.write_all(&wal_end.to_le_bytes())?;
        self.file.write_all(&len.to_le_bytes())?;
        self.file.write_all(data)?;
        self.len += 12 + u64::from(len);
        Ok(())
    }

    /// Drops everything from `subxid`'s first message on (a subtransaction with none here had
    /// nothing streamed: the source dropped its changes itself).
    fn abort_subxact(&mut self, subxid: u32) -> std::io::Result<()> {
        let Some(&(_, cut)) = self.subxacts.iter().find(|(x, _)| *x == subxid) else { return Ok(()) };
        self.subxacts.retain(|(_, at)| *at < cut);
        self.file.flush()?;
        let file = self.file.get_mut();
        file.set_len(cut)?;
        file.seek(SeekFrom::Start(cut))?;
        self.len = cut;
        let (kept, cut_off): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.schema).into_iter().partition(|(at, ..)| *at < cut);
        self.schema = kept;
        for (_, wal_end, data) in cut_off {
            // Counted as the transaction's own: it must survive later cuts.
            self.push(self.xid, wal_end, &data)?;
        }
        Ok(())
    }

    /// Relation and type messages only: for a transaction not captured, whose table definitions
    /// later transactions still rely on (the source does not send them again).
    pub fn schema_messages(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.schema.iter().map(|(_, wal_end, data)| (*wal_end, data.as_slice()))
    }

    pub fn xid(&self) -> u32 {
        self.xid
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    fn into_reader(mut self) -> std::io::Result<SpoolReader> {
        self.file.flush()?;
        let mut file = self.file.into_inner().map_err(|e| e.into_error())?;
        file.seek(SeekFrom::Start(0))?;
        Ok(SpoolReader { file: BufReader::with_capacity(WRITE_BUFFER, file), left: self.len })
    }
}

/// Reads a spooled transaction's messages back in order.
pub(crate) struct SpoolReader {
    file: BufReader<File>,
    left: u64,
}

impl SpoolReader {
    /// The next message and its WAL position into `buf`; `None` at the end.
    pub fn next(&mut self, buf: &mut Vec<u8>) -> std::io::Result<Option<u64>> {
        if self.left == 0 {
            return Ok(None);
        }
        let mut head = [0u8; 12];
        self.file.read_exact(&mut head)?;
        let wal_end = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(head[8..].try_into().expect("4 bytes")) as usize;
        buf.clear();
        buf.resize(len, 0);
        self.file.read_exact(buf)?;
        self.left = self.left.saturating_sub(12 + len as u64);
        Ok(Some(wal_end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An empty set in a directory of its own (kept alive by the caller).
    fn spools() -> (tempfile::TempDir, Spools) {
        let dir = tempfile::tempdir().unwrap();
        let spools = Spools::new(dir.path().to_owned(), "t");
        (dir, spools)
    }

    fn read_all(spools: &Spools, spool: Spool) -> Vec<(u64, Vec<u8>)> {
        let mut r = spools.reader(spool).unwrap();
        let mut out = Vec::new();
        let mut buf = Vec::new();
        while let Some(at) = r.next(&mut buf).unwrap() {
            out.push((at, buf.clone()));
        }
        out
    }

    #[test]
    fn subtransaction_abort_cuts_at_its_first_message_and_keeps_definitions() {
        let (_dir, mut spools) = spools();
        spools.start(10).unwrap();
        spools.push(10, 10, 1, b"I top-1").unwrap();
        // SAVEPOINT a (subxact 11), the transaction's first use of table b.
        spools.push(10, 11, 2, b"R table-b").unwrap();
        spools.push(10, 11, 3, b"I sub-a-1").unwrap();
        // SAVEPOINT b (12, a child of 11) … ROLLBACK TO b.
        spools.push(10, 12, 4, b"I sub-b-1").unwrap();
        assert!(!spools.abort(10, 12).unwrap());
        spools.push(10, 11, 5, b"I sub-a-2").unwrap();
        // ROLLBACK TO a, then the transaction goes on.
        assert!(!spools.abort(10, 11).unwrap());
        spools.push(10, 10, 6, b"I top-2").unwrap();
        // A later subxact cut again must not lose the re-written definition.
        spools.push(10, 13, 7, b"I sub-c-1").unwrap();
        assert!(!spools.abort(10, 13).unwrap());
        let spool = spools.take(10).unwrap();
        let got: Vec<_> =
            read_all(&spools, spool).into_iter().map(|(at, d)| (at, String::from_utf8(d).unwrap())).collect();
        assert_eq!(got, vec![(1, "I top-1".into()), (2, "R table-b".into()), (6, "I top-2".into())]);
        assert_eq!(spools.bytes(), 0);
    }

    #[test]
    fn whole_abort_drops_and_unknown_subtransaction_is_a_no_op() {
        let (_dir, mut spools) = spools();
        spools.start(7).unwrap();
        spools.push(7, 7, 1, b"I a").unwrap();
        assert!(!spools.abort(7, 99).unwrap());
        assert!(spools.bytes() > 0);
        assert!(spools.abort(7, 7).unwrap());
        assert!(spools.take(7).is_none());
        assert_eq!(spools.bytes(), 0);
        // A block of a transaction never started is refused, naming it.
        let e = spools.push(8, 8, 1, b"I b").unwrap_err();
        assert!(e.to_string().contains("streamed transaction 8"), "{e}");
    }

    #[test]
    fn a_transaction_not_captured_keeps_only_its_definitions() {
        let (_dir, mut spools) = spools();
        spools.start(3).unwrap();
        spools.get(3).unwrap().skip = true;
        spools.push(3, 3, 1, b"R table-a").unwrap();
        spools.push(3, 3, 2, b"I row").unwrap();
        spools.push(3, 4, 3, b"Y type").unwrap();
        let spool = spools.take(3).unwrap();
        let kept: Vec<_> = spool.schema_messages().map(|(at, d)| (at, d.to_vec())).collect();
        assert_eq!(kept, vec![(1, b"R table-a".to_vec()), (3, b"Y type".to_vec())]);
        let all = read_all(&spools, spool);
        assert_eq!(all.len(), 2, "the row was written: {all:?}");
    }

    #[test]
    fn interleaved_transactions_keep_their_own_messages() {
        let (dir, mut spools) = spools();
        spools.start(1).unwrap();
        spools.start(2).unwrap();
        for i in 0..10_000u64 {
            let x = 1 + (i % 2) as u32;
            spools.push(x, x, i, format!("I {x}-{i}").as_bytes()).unwrap();
        }
        let two = spools.take(2).unwrap();
        let got = read_all(&spools, two);
        assert_eq!(got.len(), 5_000);
        assert!(got.iter().all(|(at, d)| String::from_utf8_lossy(d) == format!("I 2-{at}")));
        // The files are unlinked from the start: nothing is left in the directory.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
