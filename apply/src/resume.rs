//! Where an applier resumes: its stored position, checked against the log by commit LSN.
//!
//! The applier reads the embedded log early (`ChangeLog::read_early`: batches not yet fsynced),
//! so the target may hold a position past the log's durable records. A crash (or a failed
//! append) then loses them, the capture writes the same transactions again from the slot, and
//! their offsets may differ (the new replication session sends its table definitions again).
//! The target stores the commit LSN of the last transaction it applied beside the offset, in the
//! same transaction, so the offset can be checked: it must lie after that transaction's `Commit`
//! and before the next `Begin`. When it does not, the applier reads on from the `Commit` (or,
//! while the log does not hold that transaction yet, from where it will be written again) and
//! skips every transaction committed at or before the stored LSN.

use crate::ApplyError;
use synapse_log::{ChangeLog, Offset, Seek};
use synapse_schemas::{Cursor, LogRecord, Lsn};

/// Records checked between the stored offset and the transaction before it; more than this
/// many non-transaction records in between is treated as a mismatch (resuming earlier is safe).
const CHECK_RECORDS: usize = 4_096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Resume {
    pub from: Offset,
    /// Transactions committed at or before this were applied already (their offsets moved).
    pub skip_through: Option<Lsn>,
}

/// The position to read from, given the target's stored `(next offset, commit LSN)`.
pub(crate) async fn resume_point<L: ChangeLog>(
    log: &L,
    stored: Option<(Offset, Lsn)>,
    labels: &[(&'static str, String)],
) -> Result<Resume, ApplyError> {
    let Some((offset, lsn)) = stored else { return Ok(Resume { from: 0, skip_through: None }) };
    let trusted = Resume { from: offset, skip_through: None };
    // A log read only once durable never takes an offset back; positions without an LSN
    // (nothing committed yet) have nothing to check.
    if !log.reads_early() || lsn == Lsn(0) {
        return Ok(trusted);
    }
    let after = match log.seek(Cursor { commit_lsn: lsn, index: u32::MAX }).await? {
        Seek::At(at) => at,
        // Retention passed it, which it does only below positions that were durable.
        Seek::Gone { .. } => return Ok(trusted),
    };
    let epoch = log.early_epoch();
    let holds_it = match after.checked_sub(1) {
        Some(at) => matches!(
            log.read_early(at, 1, epoch).await?.first(),
            Some((o, LogRecord::Commit(c))) if *o == at && c.commit_lsn == lsn
        ),
        None => false,
    };
    if holds_it && offset >= after && offset <= log.early_head() {
        let between = (offset - after) as usize;
        if between <= CHECK_RECORDS {
            let records = log.read_early(after, between, epoch).await?;
            let no_begin = !records.iter().any(|(o, r)| *o < offset && matches!(r, LogRecord::Begin(_)));
            if records.len() == between && no_begin {
                return Ok(trusted);
            }
        }
    }
    tracing::warn!(
        stored_offset = offset,
        commit_lsn = %lsn,
        resume_at = after,
        "the applied position does not match the log (records read before they were durable were \
         lost and written again): resuming after the stored commit LSN"
    );
    metrics::counter!("synapse_apply_position_realigned_total", labels).increment(1);
    Ok(Resume { from: after, skip_through: Some(lsn) })
}
