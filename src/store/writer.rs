//! The writer thread: the only code that calls the backend.
//!
//! It blocks for the first message, then drains whatever else is already queued (without
//! waiting for more: latency under light load is one transaction, throughput under heavy load
//! is one fsync per drain) and commits it as one transaction. Messages are handled strictly in
//! arrival order, so a `Load` or `Shutdown` sees every earlier submission committed.

use super::{Msg, Op, Reply, StoreBackend};
use crate::metrics::Metrics;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::Instant;

/// Stop draining once a transaction holds this many ops, to bound commit latency and memory.
/// A single submission is never split, so one larger than this still commits whole.
const MAX_OPS_PER_TX: usize = 16_384;

pub(super) fn run<B: StoreBackend>(mut backend: B, rx: Receiver<Msg>, metrics: Arc<Metrics>) {
    let mut carried: Option<Msg> = None;
    loop {
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
            Msg::Load(reply) => {
                let _ = reply.send(backend.load());
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
                commit(&mut backend, batch, op_count, &metrics);
            }
        }
    }
}

fn commit<B: StoreBackend>(
    backend: &mut B,
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
    let submissions: Vec<&[Op]> = batch.iter().map(|(ops, _)| ops.as_slice()).collect();
    let outcome = backend.commit(&submissions);
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
