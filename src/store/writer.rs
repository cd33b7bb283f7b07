//! The writer thread: the only code that calls the backend.
//!
//! It blocks for the first message, then drains whatever else is already queued and commits it
//! as one transaction: latency under light load is one transaction, throughput under heavy load
//! is one fsync per drain. After a busy transaction (at least `commit_siblings` submissions) it
//! first waits `commit_delay_us` ([`StoreSettings`]), so the next drain gathers more. Messages are handled strictly in
//! arrival order, so a `Load` or `Shutdown` sees every earlier submission committed.

use super::{CommitFeed, Msg, Op, Reply, StoreBackend, StoreSettings};
use crate::metrics::Metrics;
use std::collections::HashSet;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::Instant;

/// Stop draining once a transaction holds this many ops, to bound commit latency and memory.
/// A single submission is never split, so one larger than this still commits whole.
const MAX_OPS_PER_TX: usize = 16_384;

pub(super) fn run<B: StoreBackend>(
    mut backend: B,
    rx: Receiver<Msg>,
    settings: StoreSettings,
    metrics: Arc<Metrics>,
) {
    let mut carried: Option<Msg> = None;
    let mut delay = None;
    let mut feed: Option<Box<dyn CommitFeed>> = None;
    loop {
        if let Some(delay) = delay.take() {
            // Busy: let the next transaction gather more submissions (group commit).
            std::thread::sleep(delay);
        }
        let msg = match carried.take() {
            Some(msg) => msg,
            None => match rx.recv() {
                Ok(msg) => msg,
                // Every handle is gone; nothing can be queued any more.
                Err(_) => return,
            },
        };
        match msg {
            // FIFO: everything queued before the shutdown is already committed.
            Msg::Shutdown => return,
            Msg::SetFeed(f) => feed = Some(f),
            Msg::Load(reply) => {
                let _ = reply.send(backend.load());
            }
            Msg::LoadDocuments(kind, reply) => {
                let _ = reply.send(backend.load_documents(&kind));
            }
            Msg::Submit { ops, reply } => {
                let mut op_count = ops.len();
                let mut batch = vec![(ops, reply)];
                while op_count < MAX_OPS_PER_TX {
                    match rx.try_recv() {
                        Ok(Msg::Submit { ops, reply }) => {
                            op_count += ops.len();
                            batch.push((ops, reply));
                        }
                        Ok(other) => {
                            carried = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                delay = settings.delay_after(batch.len());
                commit(&mut backend, feed.as_deref_mut(), batch, op_count, &metrics);
            }
        }
    }
}

fn commit<B: StoreBackend>(
    backend: &mut B,
    feed: Option<&mut dyn CommitFeed>,
    batch: Vec<(Vec<Op>, Reply)>,
    op_count: usize,
    metrics: &Metrics,
) {
    if op_count == 0 {
        // Only flush barriers: everything before them is committed already.
        for (_, reply) in batch {
            reply.send(Ok(()));
        }
        return;
    }
    let started = Instant::now();
    let skip = superseded(&batch);
    let mut submissions: Vec<&[Op]> = batch
        .iter()
        .zip(&skip)
        .filter(|(_, &skip)| !skip)
        .map(|((ops, _), _)| ops.as_slice())
        .collect();
    metrics
        .store_superseded
        .inc_by((batch.len() - submissions.len()) as u64);
    let (feed, mark) = match feed {
        Some(feed) => {
            let mark = feed.mark(&submissions);
            (mark.is_some().then_some(feed), mark)
        }
        None => (None, None),
    };
    if let Some(mark) = &mark {
        submissions.push(std::slice::from_ref(mark));
    }
    let outcome = backend.commit(&submissions).map(|mut results| {
        if mark.is_some() {
            submissions.pop();
            if let Some(Err(error)) = results.pop() {
                // The others committed all the same, so the feed still announces them; a
                // node resyncing later just applies them once more (harmless).
                tracing::warn!(%error, "the change feed's mark did not commit");
            }
            if let Some(feed) = feed {
                feed.committed(&submissions, &results);
            }
        }
        results
    });
    let outcome = outcome.map(|results| {
        // Superseded submissions share the transaction's fate: `Ok` once it commits.
        let mut results = results.into_iter();
        skip.iter()
            .filter_map(|&skipped| {
                if skipped {
                    Some(Ok(()))
                } else {
                    results.next()
                }
            })
            .collect::<Vec<_>>()
    });
    metrics
        .store_write_seconds
        .observe(started.elapsed().as_secs_f64());
    metrics.store_batch_size.observe(op_count as f64);
    match outcome {
        Ok(results) if results.len() == batch.len() => {
            for ((_, reply), result) in batch.into_iter().zip(results) {
                if let Err(e) = &result {
                    tracing::warn!(error = %e, "store submission rolled back");
                }
                reply.send(result);
            }
        }
        Ok(results) => {
            // A backend bug; never report success for writes we cannot vouch for.
            tracing::error!(
                expected = batch.len(),
                got = results.len(),
                "store backend returned a wrong result count"
            );
            for (_, reply) in batch {
                reply.send(Err(super::StoreError::Corrupt {
                    what: "backend result",
                    message: "wrong number of submission results".into(),
                }));
            }
        }
        Err(e) => {
            tracing::error!(error = %e, ops = op_count, "store transaction failed");
            for (_, reply) in batch {
                reply.send(Err(e.clone()));
            }
        }
    }
}

/// What a single-op submission overwrites, if it is a pure overwrite.
#[derive(PartialEq, Eq, Hash)]
enum Target<'a> {
    Version(&'a str, &'a str, &'a str),
    Doc(&'static str, &'a str),
}

fn overwrite_target(ops: &[Op]) -> Option<Target<'_>> {
    match ops {
        [Op::SetVersion {
            product_key,
            device_name,
            module,
            ..
        }] => Some(Target::Version(product_key, device_name, module)),
        [Op::PutDoc { kind, id, .. }] => Some(Target::Doc(kind, id)),
        _ => None,
    }
}

/// Marks the submissions whose whole effect a LATER submission of the same batch overwrites:
/// a version report or document write followed by another single-op write of the same row.
/// Skipping them leaves the committed state exactly as applying all in order would (the later
/// write replaces every column; a delete in between removes the row either way), and saves a
/// statement per report when a device reports faster than the writer commits.
///
/// Only single-op submissions are skipped and only single-op ones supersede: a later
/// multi-op submission may roll back as a whole (savepoint), which must not take an earlier,
/// independent write with it. A single `SetVersion` fails only when its device is gone, and
/// then the earlier row is gone too (cascade).
fn superseded(batch: &[(Vec<Op>, super::Reply)]) -> Vec<bool> {
    let mut seen: HashSet<Target<'_>> = HashSet::new();
    let mut skip = vec![false; batch.len()];
    for (i, (ops, _)) in batch.iter().enumerate().rev() {
        if let Some(target) = overwrite_target(ops) {
            skip[i] = !seen.insert(target);
        }
    }
    skip
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::{device, instance, product};
    use crate::store::{Reply, SqliteBackend, StoreError};
    use tokio::sync::oneshot;

    type Outcome = oneshot::Receiver<Result<(), StoreError>>;

    fn version(dn: &str, v: &str) -> Op {
        crate::store::tests::version("pk", dn, "MCU", v)
    }

    fn setup() -> SqliteBackend {
        let mut backend = SqliteBackend::open_in_memory().unwrap();
        let ops = vec![
            Op::PutInstance(instance("default")),
            Op::PutProduct(product("pk", "default")),
            Op::PutDevice(device("pk", "a")),
            Op::PutDevice(device("pk", "b")),
        ];
        let results = backend.commit(&[&ops]).unwrap();
        assert!(results[0].is_ok());
        backend
    }

    /// Commits `submissions` as ONE batch, like the writer does when they are queued together.
    fn commit_batch(
        backend: &mut SqliteBackend,
        metrics: &Metrics,
        submissions: Vec<Vec<Op>>,
    ) -> Vec<Outcome> {
        let mut outcomes = Vec::new();
        let batch: Vec<(Vec<Op>, Reply)> = submissions
            .into_iter()
            .map(|ops| {
                let (tx, rx) = oneshot::channel();
                outcomes.push(rx);
                (ops, Reply::Ticket(tx))
            })
            .collect();
        let op_count = batch.iter().map(|(ops, _)| ops.len()).sum();
        commit(backend, None, batch, op_count, metrics);
        outcomes
    }

    fn result(outcome: &mut Outcome) -> Result<(), StoreError> {
        outcome.try_recv().expect("every submission is answered")
    }

    fn stored_version(backend: &mut SqliteBackend, dn: &str) -> Option<String> {
        let snapshot = backend.load().unwrap();
        snapshot
            .devices
            .iter()
            .find(|d| d.record.device_name == dn)
            .and_then(|d| d.versions.get("MCU").cloned())
    }

    #[test]
    fn the_commit_delay_follows_only_busy_transactions() {
        let settings = StoreSettings {
            commit_delay_us: Some(1_000),
            commit_siblings: 8,
            ..StoreSettings::default()
        };
        assert_eq!(settings.delay_after(7), None);
        assert_eq!(
            settings.delay_after(8),
            Some(std::time::Duration::from_millis(1))
        );
        let off = StoreSettings {
            commit_delay_us: Some(0),
            ..settings
        };
        assert_eq!(off.delay_after(10_000), None);
    }

    #[test]
    fn later_reports_of_the_same_row_supersede_earlier_ones() {
        let mut backend = setup();
        let metrics = Metrics::new();
        let mut outcomes = commit_batch(
            &mut backend,
            &metrics,
            vec![
                version("a", "1"),
                version("b", "1"),
                version("a", "2"),
                version("a", "3"),
            ]
            .into_iter()
            .map(|op| vec![op])
            .collect(),
        );
        for outcome in &mut outcomes {
            result(outcome).unwrap();
        }
        assert_eq!(metrics.store_superseded.get(), 2);
        assert_eq!(stored_version(&mut backend, "a").as_deref(), Some("3"));
        assert_eq!(stored_version(&mut backend, "b").as_deref(), Some("1"));
    }

    #[test]
    fn a_later_multi_op_submission_never_supersedes() {
        let mut backend = setup();
        let metrics = Metrics::new();
        // The second submission fails as a whole (unknown device): the first must stay.
        let mut outcomes = commit_batch(
            &mut backend,
            &metrics,
            vec![
                vec![version("a", "1")],
                vec![version("a", "2"), version("nobody", "1")],
            ],
        );
        result(&mut outcomes[0]).unwrap();
        assert!(matches!(
            result(&mut outcomes[1]),
            Err(StoreError::Sqlite(_))
        ));
        assert_eq!(metrics.store_superseded.get(), 0);
        assert_eq!(stored_version(&mut backend, "a").as_deref(), Some("1"));
    }

    #[test]
    fn a_delete_between_reports_leaves_nothing_behind() {
        let mut backend = setup();
        let metrics = Metrics::new();
        let delete = Op::DeleteDevice {
            product_key: "pk".into(),
            device_name: "a".into(),
        };
        let mut outcomes = commit_batch(
            &mut backend,
            &metrics,
            vec![
                vec![version("a", "1")],
                vec![delete],
                vec![version("a", "2")],
            ],
        );
        result(&mut outcomes[0]).unwrap();
        result(&mut outcomes[1]).unwrap();
        // A single failing statement (foreign key) is rolled back alone, without a savepoint.
        assert!(matches!(
            result(&mut outcomes[2]),
            Err(StoreError::Sqlite(_))
        ));
        assert_eq!(stored_version(&mut backend, "a"), None);
        assert_eq!(stored_version(&mut backend, "b"), None);
        assert!(backend
            .load()
            .unwrap()
            .devices
            .iter()
            .all(|d| d.record.device_name != "a"));
    }
}
