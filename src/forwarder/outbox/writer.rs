//! The outbox's writer thread: gathers what waits in its channel into one transaction (group
//! commit: inserts and deletes), commits it with the durability each needs, then hands the
//! fresh rows to the publisher and wakes the enqueues waiting for them.

use super::{NewRow, OutboxError, Shared, WriterMsg};
use rusqlite::{params, Connection};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use tokio::sync::oneshot;

/// Rows of one enqueue with the sender that reports their commit.
pub(in crate::forwarder) type PendingInsert =
    (Vec<NewRow>, oneshot::Sender<Result<(), OutboxError>>);

/// Most rows one transaction carries, to bound commit latency.
const MAX_ROWS_PER_TX: usize = 8192;

/// What one writer transaction does: everything waiting in the channel, up to
/// [`MAX_ROWS_PER_TX`] rows (group commit).
#[derive(Default)]
pub(in crate::forwarder) struct Batch {
    pub inserts: Vec<PendingInsert>,
    /// Seqs to delete, with the drain term they were published in.
    pub deletes: Vec<(i64, u64)>,
    pub freed: u64,
    pub flushes: Vec<oneshot::Sender<()>>,
    pub shutdown: bool,
}

impl Batch {
    /// `first`, then whatever else is waiting; a `Shutdown` after the first message is left in
    /// `carried` for the next round, so everything before it is committed first.
    pub(in crate::forwarder) fn gather(
        first: WriterMsg,
        rx: &mpsc::Receiver<WriterMsg>,
        carried: &mut Option<WriterMsg>,
    ) -> Batch {
        let mut batch = Batch::default();
        let mut count = 0usize;
        batch.take(first, &mut count);
        while count < MAX_ROWS_PER_TX {
            match rx.try_recv() {
                Ok(WriterMsg::Shutdown) => {
                    *carried = Some(WriterMsg::Shutdown);
                    break;
                }
                Ok(m) => batch.take(m, &mut count),
                Err(_) => break,
            }
        }
        batch
    }

    fn take(&mut self, m: WriterMsg, count: &mut usize) {
        match m {
            WriterMsg::Insert { rows, reply } => {
                *count += rows.len();
                self.inserts.push((rows, reply));
            }
            WriterMsg::Delete { seqs, bytes, term } => {
                *count += seqs.len();
                self.deletes.extend(seqs.into_iter().map(|s| (s, term)));
                self.freed += bytes;
            }
            WriterMsg::Flush(tx) => self.flushes.push(tx),
            WriterMsg::Shutdown => self.shutdown = true,
        }
    }
}

pub(super) fn writer(mut conn: Connection, rx: mpsc::Receiver<WriterMsg>, shared: Arc<Shared>) {
    let mut carried: Option<WriterMsg> = None;
    // `synchronous` currently set on the connection (FULL at open).
    let mut full_sync = true;
    loop {
        let first = match carried.take() {
            Some(m) => m,
            None => match rx.recv() {
                Ok(m) => m,
                Err(_) => return,
            },
        };
        let Batch {
            inserts,
            deletes,
            freed,
            flushes,
            shutdown,
        } = Batch::gather(first, &rx, &mut carried);
        let deletes: Vec<i64> = deletes.into_iter().map(|(seq, _)| seq).collect();
        let started = std::time::Instant::now();
        let inserted: usize = inserts.iter().map(|(r, _)| r.len()).sum();
        // Inserts need FULL (an enqueue resolving means durable even on power loss). A
        // transaction of deletes only may be lost on power loss without harm — the rows are
        // then simply delivered again (at-least-once) — so it skips the WAL fsync.
        let want_full = !inserts.is_empty();
        let mut sync_error = None;
        if want_full != full_sync {
            let level = if want_full { "FULL" } else { "NORMAL" };
            match conn.pragma_update(None, "synchronous", level) {
                Ok(()) => full_sync = want_full,
                Err(e) => sync_error = Some(OutboxError::from(e)),
            }
        }
        let result = match sync_error {
            // Never commit an insert with less than FULL; a deletes-only batch may go either way.
            Some(e) if want_full => Err(e),
            _ => commit(&mut conn, &inserts, &deletes),
        };
        shared
            .metrics
            .forwarder_outbox_commit_seconds
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok((deleted, seqs)) => {
                shared.push_fresh(&inserts, &seqs);
                shared.rows.fetch_add(inserted as u64, Ordering::Relaxed);
                let _ = shared
                    .rows
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |r| {
                        Some(r.saturating_sub(deleted))
                    });
                for (_, reply) in inserts {
                    let _ = reply.send(Ok(()));
                }
                if freed > 0 {
                    shared.release(freed);
                }
                if inserted > 0 {
                    shared.new_rows.notify_one();
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "outbox transaction failed");
                let mut unreserve = 0;
                for (rows, reply) in inserts {
                    unreserve += rows.iter().map(NewRow::size).sum::<u64>();
                    let _ = reply.send(Err(e.clone()));
                }
                // Failed deletes stay in the outbox and are redelivered; their bytes stay counted.
                shared.release(unreserve);
            }
        }
        shared.publish_gauges();
        for tx in flushes {
            let _ = tx.send(());
        }
        if shutdown {
            return;
        }
    }
}

/// `seqs` (any order, duplicates allowed) as sorted runs of consecutive values, `(first, last)`.
pub(crate) fn seq_runs(seqs: &[i64]) -> Vec<(i64, i64)> {
    let mut sorted = seqs.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut runs: Vec<(i64, i64)> = Vec::new();
    for seq in sorted {
        match runs.last_mut() {
            Some((_, last)) if *last + 1 == seq => *last = seq,
            _ => runs.push((seq, seq)),
        }
    }
    runs
}

/// One transaction: every insert, then every delete. Returns the number of rows deleted and
/// the seqs of the inserted rows, in insert order.
fn commit(
    conn: &mut Connection,
    inserts: &[PendingInsert],
    deletes: &[i64],
) -> Result<(u64, Vec<i64>), OutboxError> {
    if inserts.is_empty() && deletes.is_empty() {
        return Ok((0, Vec::new()));
    }
    let tx = conn.transaction()?;
    let mut deleted = 0u64;
    let mut seqs = Vec::with_capacity(inserts.iter().map(|(rows, _)| rows.len()).sum());
    {
        let mut ins = tx.prepare_cached(
            "INSERT INTO outbox (enqueued_at_ms, target, kind, product_key, device_name, topic,
                                 generate_time_ms, body)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?;
        for (rows, _) in inserts {
            for row in rows {
                let m = &row.msg;
                ins.execute(params![
                    row.enqueued_at_ms,
                    row.target,
                    m.kind.as_str(),
                    m.product_key,
                    m.device_name,
                    m.topic,
                    m.generate_time_ms,
                    m.body
                ])?;
                seqs.push(tx.last_insert_rowid());
            }
        }
        // Acks arrive mostly in seq order: one statement per run of consecutive seqs.
        let mut del = tx.prepare_cached("DELETE FROM outbox WHERE seq BETWEEN ?1 AND ?2")?;
        for (first, last) in seq_runs(deletes) {
            deleted += del.execute([first, last])? as u64;
        }
    }
    tx.commit()?;
    Ok((deleted, seqs))
}
