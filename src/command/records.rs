//! The record table of service calls and property sets: what was sent, and the device's answer
//! once it came. Bounded (`commands.max_records`, oldest evicted first) and in memory only: a
//! record is for reading an answer shortly after the call; the durable copy of an answer is the
//! message forwarded to the consumer groups.

use super::DownlinkKind;
use fleetgate_topics::Reply;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};

/// Where a call stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CommandStatus {
    /// Sent; no answer yet.
    Sent,
    /// The device answered (see `reply`; its `code` says whether it succeeded).
    Replied,
    /// A synchronous call gave up waiting (a later answer still lands here).
    TimedOut,
}

/// The device's answer: the Alink reply's fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RecordedReply {
    /// 200 for success, else the device's error code.
    pub code: i32,
    pub message: String,
    #[schema(value_type = Object)]
    pub data: Value,
    /// When the answer arrived, ms since the Unix epoch.
    pub received_at_ms: i64,
}

/// One service call or property set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CommandRecord {
    /// The request `id` the device answers with.
    pub id: String,
    pub product_key: String,
    pub device_name: String,
    /// `property_set` or `service`.
    pub kind: DownlinkKind,
    /// The service identifier (`property/set` for a property set).
    pub identifier: String,
    /// The request topic.
    pub topic: String,
    #[schema(value_type = Object)]
    pub params: Value,
    pub status: CommandStatus,
    pub sent_at_ms: i64,
    pub reply: Option<RecordedReply>,
}

impl CommandRecord {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        id: &str,
        pk: &str,
        dn: &str,
        kind: DownlinkKind,
        identifier: &str,
        topic: &str,
        params: Value,
        sent_at_ms: i64,
    ) -> Self {
        CommandRecord {
            id: id.to_owned(),
            product_key: pk.to_owned(),
            device_name: dn.to_owned(),
            kind,
            identifier: identifier.to_owned(),
            topic: topic.to_owned(),
            params,
            status: CommandStatus::Sent,
            sent_at_ms,
            reply: None,
        }
    }
}

type Key = (String, String, String);

struct Table {
    records: HashMap<Key, CommandRecord>,
    order: VecDeque<Key>,
}

/// The bounded table. A std mutex: never held across an await, every operation is short.
pub(super) struct Records {
    table: Mutex<Table>,
    capacity: usize,
}

fn key(pk: &str, dn: &str, id: &str) -> Key {
    (pk.to_owned(), dn.to_owned(), id.to_owned())
}

impl Records {
    pub(super) fn new(capacity: usize) -> Self {
        Records {
            table: Mutex::new(Table {
                records: HashMap::new(),
                order: VecDeque::new(),
            }),
            capacity,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn insert(&self, record: CommandRecord) {
        let k = key(&record.product_key, &record.device_name, &record.id);
        let mut t = self.lock();
        while t.order.len() >= self.capacity {
            match t.order.pop_front() {
                Some(old) => {
                    t.records.remove(&old);
                }
                None => break,
            }
        }
        t.order.push_back(k.clone());
        t.records.insert(k, record);
    }

    pub(super) fn get(&self, pk: &str, dn: &str, id: &str) -> Option<CommandRecord> {
        self.lock().records.get(&key(pk, dn, id)).cloned()
    }

    /// Records the device's answer; `None` when no call of the device has its id.
    pub(super) fn answer(
        &self,
        pk: &str,
        dn: &str,
        reply: &Reply,
        received_at_ms: i64,
    ) -> Option<CommandRecord> {
        let mut t = self.lock();
        let record = t.records.get_mut(&key(pk, dn, &reply.id))?;
        record.status = CommandStatus::Replied;
        record.reply = Some(RecordedReply {
            code: reply.code,
            message: reply.message.clone(),
            data: reply.data.clone(),
            received_at_ms,
        });
        Some(record.clone())
    }

    /// A synchronous call gave up (unless the answer won the race).
    pub(super) fn time_out(&self, pk: &str, dn: &str, id: &str, _at_ms: i64) {
        let mut t = self.lock();
        if let Some(r) = t.records.get_mut(&key(pk, dn, id)) {
            if r.status == CommandStatus::Sent {
                r.status = CommandStatus::TimedOut;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record(id: &str) -> CommandRecord {
        CommandRecord::new(
            id,
            "pk",
            "dn",
            DownlinkKind::Service,
            "reboot",
            "/sys/pk/dn/thing/service/reboot",
            json!({}),
            1,
        )
    }

    #[test]
    fn the_oldest_records_go_first() {
        let records = Records::new(2);
        for id in ["1", "2", "3"] {
            records.insert(record(id));
        }
        assert!(records.get("pk", "dn", "1").is_none());
        assert!(records.get("pk", "dn", "2").is_some());
        assert!(records.get("pk", "dn", "3").is_some());
    }

    #[test]
    fn answers_match_device_and_id() {
        let records = Records::new(10);
        records.insert(record("1"));
        let reply = Reply::error("1", 9201, "busy");
        assert!(records.answer("pk", "other", &reply, 5).is_none());
        assert!(records
            .answer("pk", "dn", &Reply::success("2"), 5)
            .is_none());
        let answered = records.answer("pk", "dn", &reply, 5).unwrap();
        assert_eq!(answered.status, CommandStatus::Replied);
        assert_eq!(answered.reply.unwrap().code, 9201);
        // A late answer after a time-out still lands; a time-out never hides an answer.
        records.time_out("pk", "dn", "1", 6);
        assert_eq!(
            records.get("pk", "dn", "1").unwrap().status,
            CommandStatus::Replied
        );
    }
}
