//! The change feed: every transaction a node commits that concerns the others becomes one
//! numbered message on NATS.
//!
//! The store's writer calls [`FeedWriter`] (a [`CommitFeed`]) with each transaction: `mark`
//! adds `Op::FeedMark { node, seq }` to the transaction itself, so the shared store records
//! which feed message each committed transaction is, and a snapshot read says exactly which
//! messages it contains ([`Snapshot::feed_cuts`](crate::store::Snapshot)); `committed` turns
//! the transaction's committed ops into [`Item`]s and hands the message to the publisher task
//! (never blocking the writer). Each node's messages are numbered 1, 2, 3… without gaps, across
//! restarts (the numbering resumes from the store), so a receiver that sees a gap knows it
//! missed something and resynchronises from the store instead of serving stale state.
//!
//! What the items carry:
//! - sessions and version reports: their values (the hot path, applied as they are);
//! - configuration (instances, products, devices) and documents: only their keys, re-read by
//!   the receiver, so concurrent changes made through two nodes cannot be applied out of order.

use crate::store::{CommitFeed, Op, SessionWrite, StoreError};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedSender;

/// One message of a node's feed (or one part of it: a large transaction is split so that no
/// NATS message exceeds the server's payload limit; all parts carry the same `seq`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedMessage {
    pub node: u16,
    pub seq: u64,
    /// Parts of one transaction are numbered from 0; `last` closes the transaction.
    pub part: u32,
    pub last: bool,
    pub items: Vec<Item>,
}

/// One committed change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Item {
    Session {
        pk: String,
        dn: String,
        epoch: u64,
        online: bool,
        at_ms: i64,
        ip: Option<String>,
    },
    Version {
        pk: String,
        dn: String,
        module: String,
        version: String,
    },
    /// Every session of `node` older than `before_ms` ended.
    NodeReleased {
        node: u16,
        before_ms: i64,
        at_ms: i64,
    },
    Instance {
        id: String,
    },
    Product {
        pk: String,
    },
    Device {
        pk: String,
        dn: String,
    },
    Doc {
        kind: String,
        id: String,
    },
}

impl Item {
    /// The item an op announces, if any.
    fn of(op: &Op) -> Option<Item> {
        Some(match op {
            Op::PutInstance(i) => Item::Instance {
                id: i.instance_id.clone(),
            },
            Op::DeleteInstance { instance_id } => Item::Instance {
                id: instance_id.clone(),
            },
            Op::PutProduct(p) => Item::Product {
                pk: p.product_key.clone(),
            },
            Op::DeleteProduct { product_key } => Item::Product {
                pk: product_key.clone(),
            },
            Op::PutDevice(d) => Item::Device {
                pk: d.product_key.clone(),
                dn: d.device_name.clone(),
            },
            Op::DeleteDevice {
                product_key,
                device_name,
            } => Item::Device {
                pk: product_key.clone(),
                dn: device_name.clone(),
            },
            Op::SetConnection {
                product_key,
                device_name,
                last_seen_ms,
                client_ip,
                session,
            } => {
                let (epoch, online) = match *session {
                    SessionWrite::Online(e) => (e, true),
                    SessionWrite::Offline(e) => (e, false),
                };
                Item::Session {
                    pk: product_key.clone(),
                    dn: device_name.clone(),
                    epoch,
                    online,
                    at_ms: *last_seen_ms,
                    ip: client_ip.clone(),
                }
            }
            Op::SetVersion {
                product_key,
                device_name,
                module,
                version,
                ..
            } => Item::Version {
                pk: product_key.clone(),
                dn: device_name.clone(),
                module: module.clone(),
                version: version.clone(),
            },
            Op::ReleaseNode {
                node,
                before_ms,
                at_ms,
            } => Item::NodeReleased {
                node: *node,
                before_ms: *before_ms,
                at_ms: *at_ms,
            },
            Op::PutDoc { kind, id, .. } | Op::DeleteDoc { kind, id } => Item::Doc {
                kind: (*kind).to_owned(),
                id: id.clone(),
            },
            Op::PutDeviceProperties {
                product_key,
                device_name,
                ..
            } => Item::Doc {
                kind: crate::store::DEVICE_PROPERTIES.to_owned(),
                id: crate::store::device_doc_id(product_key, device_name),
            },
            Op::FeedMark { .. } | Op::Fence { .. } => return None,
        })
    }
}

/// The feed's end on the store's writer thread.
pub struct FeedWriter {
    node: u16,
    /// The next message's number.
    next: u64,
    committed: Arc<AtomicU64>,
    out: UnboundedSender<FeedMessage>,
}

impl FeedWriter {
    /// A feed whose last committed message was `last` (read from the store at start) and
    /// whose messages go to `out`; `committed` follows the last committed number.
    pub fn new(
        node: u16,
        last: u64,
        committed: Arc<AtomicU64>,
        out: UnboundedSender<FeedMessage>,
    ) -> FeedWriter {
        committed.store(last, Ordering::Release);
        FeedWriter {
            node,
            next: last + 1,
            committed,
            out,
        }
    }
}

impl CommitFeed for FeedWriter {
    fn mark(&mut self, submissions: &[&[Op]]) -> Option<Op> {
        let concerns = submissions
            .iter()
            .flat_map(|ops| ops.iter())
            .any(|op| !matches!(op, Op::FeedMark { .. } | Op::Fence { .. }));
        concerns.then_some(Op::FeedMark {
            node: self.node,
            seq: self.next,
        })
    }

    fn committed(&mut self, submissions: &[&[Op]], results: &[Result<(), StoreError>]) {
        let items = submissions
            .iter()
            .zip(results)
            .filter(|(_, result)| result.is_ok())
            .flat_map(|(ops, _)| ops.iter().filter_map(Item::of))
            .collect();
        let seq = self.next;
        self.next += 1;
        // Announced even when every submission rolled back: the number is taken (the mark
        // committed), and a receiver must not take its absence for a lost message.
        let _ = self.out.send(FeedMessage {
            node: self.node,
            seq,
            part: 0,
            last: true,
            items,
        });
        self.committed.store(seq, Ordering::Release);
    }
}

/// Splits a message into parts of at most `max_bytes` encoded (each part has at least one
/// item, so a single huge item still goes out alone).
pub fn split(message: FeedMessage, max_bytes: usize) -> Vec<FeedMessage> {
    let FeedMessage {
        node, seq, items, ..
    } = message;
    let mut parts: Vec<FeedMessage> = Vec::new();
    let mut current: Vec<Item> = Vec::new();
    let mut size = 0usize;
    // Item sizes are estimated from their encoding; the envelope adds a few bytes.
    for item in items {
        let len = postcard::experimental::serialized_size(&item).unwrap_or(max_bytes);
        if !current.is_empty() && size + len > max_bytes.saturating_sub(64) {
            parts.push(FeedMessage {
                node,
                seq,
                part: parts.len() as u32,
                last: false,
                items: std::mem::take(&mut current),
            });
            size = 0;
        }
        size += len;
        current.push(item);
    }
    parts.push(FeedMessage {
        node,
        seq,
        part: parts.len() as u32,
        last: true,
        items: current,
    });
    parts
}

pub fn encode(message: &FeedMessage) -> Vec<u8> {
    // Encoding a plain struct of strings and integers into a Vec cannot fail.
    postcard::to_allocvec(message).unwrap_or_default()
}

pub fn decode(bytes: &[u8]) -> Result<FeedMessage, postcard::Error> {
    postcard::from_bytes(bytes)
}

/// Where a receiver is in one origin node's feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Position {
    /// The last message applied completely.
    pub applied: u64,
    /// Parts of message `applied + 1` applied so far.
    pub parts: u32,
}

/// What a receiver does with an arriving message, given its position in the origin's feed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Apply it (it is the next part).
    Apply,
    /// Already applied (or contained in the snapshot the receiver loaded): ignore.
    Old,
    /// Something before it is missing: resynchronise from the store.
    Gap,
}

impl Position {
    pub fn judge(&self, seq: u64, part: u32) -> Verdict {
        if seq <= self.applied {
            Verdict::Old
        } else if seq == self.applied + 1 && part == self.parts {
            Verdict::Apply
        } else if seq == self.applied + 1 && part < self.parts {
            Verdict::Old
        } else {
            Verdict::Gap
        }
    }

    /// Moves past an applied part.
    pub fn advance(&mut self, seq: u64, last: bool) {
        if last {
            self.applied = seq;
            self.parts = 0;
        } else {
            self.parts += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::{device, instance, version};

    fn feed() -> (
        FeedWriter,
        tokio::sync::mpsc::UnboundedReceiver<FeedMessage>,
        Arc<AtomicU64>,
    ) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let committed = Arc::new(AtomicU64::new(0));
        (FeedWriter::new(4, 41, committed.clone(), tx), rx, committed)
    }

    #[test]
    fn transactions_are_numbered_on_from_the_stored_position() {
        let (mut writer, mut rx, committed) = feed();
        assert_eq!(committed.load(Ordering::Acquire), 41);
        let ops = [Op::PutInstance(instance("i1"))];
        let subs: Vec<&[Op]> = vec![&ops];
        assert_eq!(writer.mark(&subs), Some(Op::FeedMark { node: 4, seq: 42 }));
        writer.committed(&subs, &[Ok(())]);
        assert_eq!(committed.load(Ordering::Acquire), 42);
        let message = rx.try_recv().unwrap();
        assert_eq!((message.node, message.seq, message.last), (4, 42, true));
        assert_eq!(message.items, vec![Item::Instance { id: "i1".into() }]);
        assert_eq!(writer.mark(&subs), Some(Op::FeedMark { node: 4, seq: 43 }));
    }

    #[test]
    fn rolled_back_submissions_are_left_out_but_the_number_is_used() {
        let (mut writer, mut rx, _) = feed();
        let a = [Op::PutDevice(device("pk", "dev1"))];
        let b = [version("pk", "dev2", "MCU", "2.0")];
        let subs: Vec<&[Op]> = vec![&a, &b];
        writer.mark(&subs);
        writer.committed(&subs, &[Err(StoreError::Closed), Ok(())]);
        let message = rx.try_recv().unwrap();
        assert_eq!(message.seq, 42);
        assert_eq!(
            message.items,
            vec![Item::Version {
                pk: "pk".into(),
                dn: "dev2".into(),
                module: "MCU".into(),
                version: "2.0".into()
            }]
        );
        writer.committed(&[&a], &[Err(StoreError::Closed)]);
        let message = rx.try_recv().unwrap();
        assert_eq!((message.seq, message.items.len()), (43, 0));
    }

    #[test]
    fn an_empty_transaction_gets_no_mark() {
        let (mut writer, _, _) = feed();
        assert_eq!(writer.mark(&[]), None);
        assert_eq!(writer.mark(&[&[]]), None);
    }

    #[test]
    fn sessions_carry_their_epoch_and_direction() {
        let op = Op::SetConnection {
            product_key: "pk".into(),
            device_name: "d".into(),
            last_seen_ms: 9,
            client_ip: Some("10.0.0.1".into()),
            session: SessionWrite::Offline(77),
        };
        assert_eq!(
            Item::of(&op),
            Some(Item::Session {
                pk: "pk".into(),
                dn: "d".into(),
                epoch: 77,
                online: false,
                at_ms: 9,
                ip: Some("10.0.0.1".into())
            })
        );
    }

    #[test]
    fn a_deleted_instance_is_announced_by_its_key() {
        let op = Op::DeleteInstance {
            instance_id: "iot-gone".into(),
        };
        // The receiver re-reads it, finds nothing and forgets it.
        assert_eq!(
            Item::of(&op),
            Some(Item::Instance {
                id: "iot-gone".into()
            })
        );
    }

    #[test]
    fn large_messages_split_into_ordered_parts_and_round_trip() {
        let items: Vec<Item> = (0..1000)
            .map(|i| Item::Device {
                pk: "product".into(),
                dn: format!("device-{i:05}"),
            })
            .collect();
        let message = FeedMessage {
            node: 2,
            seq: 7,
            part: 0,
            last: true,
            items: items.clone(),
        };
        let parts = split(message, 4_096);
        assert!(parts.len() > 4, "{} parts", parts.len());
        for (i, p) in parts.iter().enumerate() {
            assert_eq!(p.part, i as u32);
            assert_eq!(p.last, i == parts.len() - 1);
            assert!(
                encode(p).len() <= 4_096,
                "part {i}: {} bytes",
                encode(p).len()
            );
            assert_eq!(decode(&encode(p)).unwrap(), *p);
        }
        let joined: Vec<Item> = parts.into_iter().flat_map(|p| p.items).collect();
        assert_eq!(joined, items);
    }

    #[test]
    fn positions_accept_the_next_part_and_detect_gaps() {
        use Verdict::*;
        let mut at = Position {
            applied: 10,
            parts: 0,
        };
        let table = [
            ((9, 0), Old),
            ((10, 0), Old),
            ((11, 1), Gap),
            ((12, 0), Gap),
            ((11, 0), Apply),
        ];
        for ((seq, part), want) in table {
            assert_eq!(at.judge(seq, part), want, "seq {seq} part {part}");
        }
        at.advance(11, false);
        assert_eq!(at.judge(11, 0), Old);
        assert_eq!(at.judge(11, 1), Apply);
        at.advance(11, true);
        assert_eq!(
            at,
            Position {
                applied: 11,
                parts: 0
            }
        );
        assert_eq!(at.judge(12, 0), Apply);
    }
}
