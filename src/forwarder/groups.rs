//! Consumer groups: the model, RabbitMQ names and the broker-side operations on them.
//!
//! Topology (docs/DESIGN.md §5): one durable **fanout** exchange per instance,
//! `{prefix}.{instance_id}`, and one durable queue per consumer group,
//! `{prefix}.{instance_id}.{group_id}`, bound to it. Fanout gives the vendor's semantics:
//! every group gets every message, and the clients consuming one group's queue compete for
//! its messages. `prefix` is `amqp.exchange_prefix` (default `fleetgate`).
//!
//! Groups are persisted as store documents (`kind = "amqp.group"`, id `{iid}/{gid}`) so they
//! exist while forwarding is off and are declared once a broker is reachable. A group deleted
//! while the broker is unreachable leaves a tombstone (`kind = "amqp.group_deleted"`) whose
//! queue is deleted on the next connection. A deleted instance leaves one for its exchange
//! (`kind = "amqp.exchange_deleted"`, id = the instance id, body = the exchange), deleted in
//! RabbitMQ at once when connected, else on the next connection (unless the instance was
//! created again meanwhile: the exchange is then its own).
//!
//! There is no implicit `DEFAULT_GROUP`: a queue nobody reads would grow without bound in
//! RabbitMQ, so operators create the groups their applications consume (one may be called
//! `DEFAULT_GROUP`).
//!
//! Retention: a group's queue is declared with `x-message-ttl` (the vendor keeps messages one
//! day), from the group's `message_ttl_secs`, which is fixed when the group is created (the
//! request's value, else `amqp.queue_message_ttl_secs`; 0 = no TTL). Groups created before
//! TTLs existed have none stored and follow the configured default. RabbitMQ refuses to
//! re-declare an existing queue with other arguments (406 PRECONDITION_FAILED, which closes
//! the channel); [`declare_group`] then keeps the queue as it is (passive declare + bind) and
//! reports [`Declared::KeptExisting`] — the forwarder warns once per queue and counts it in
//! `fleetgate_forwarder_queues_kept_total`. Deleting and re-creating the group applies the TTL.

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ErrorKind, ExchangeKind};
use rand::distributions::Alphanumeric;
use rand::Rng;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::settings::QueueType;

/// Store document kind of a consumer group.
pub const GROUP_DOC_KIND: &str = "amqp.group";
/// Store document kind of a group whose queue still has to be deleted in RabbitMQ.
pub const TOMBSTONE_DOC_KIND: &str = "amqp.group_deleted";
/// Store document kind of a deleted instance whose exchange still has to be deleted in
/// RabbitMQ (id: the instance id; body: the exchange's name).
pub const EXCHANGE_TOMBSTONE_DOC_KIND: &str = "amqp.exchange_deleted";

/// Largest message TTL, seconds: RabbitMQ's `x-message-ttl` is milliseconds up to 2^32-1.
pub const MAX_MESSAGE_TTL_SECS: u32 = u32::MAX / 1000;

/// A consumer group of an instance.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, ToSchema)]
pub struct ConsumerGroup {
    pub instance_id: String,
    pub group_id: String,
    pub name: String,
    pub created_at_ms: i64,
    /// How long a message waits in the group's queue before RabbitMQ drops it (`x-message-ttl`),
    /// seconds; 0 = forever. Null for groups created before TTLs existed: they follow
    /// `amqp.queue_message_ttl_secs`.
    #[serde(default)]
    pub message_ttl_secs: Option<u32>,
}

/// Request to create a consumer group; `group_id` is generated (20 characters) when absent.
#[derive(Serialize, Deserialize, Clone, Debug, Default, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewConsumerGroup {
    /// 1..=64 of `A-Z a-z 0-9 _ -`.
    #[serde(default)]
    #[schema(min_length = 1, max_length = 64, pattern = "^[A-Za-z0-9_-]{1,64}$")]
    pub group_id: Option<String>,
    /// 1..=64 characters, not blank, no control characters.
    #[schema(
        min_length = 1,
        max_length = 64,
        pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*[^\\s\\u0000-\\u001F\\u007F-\\u009F][^\\u0000-\\u001F\\u007F-\\u009F]*$"
    )]
    pub name: String,
    /// Message TTL of the group's queue, seconds, 0..=4294967 (0 = messages never expire);
    /// `amqp.queue_message_ttl_secs` (default 86400, the vendor's one day) when absent.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 4294967)]
    pub message_ttl_secs: Option<u32>,
}

/// A consumer group with its queue's live numbers.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, ToSchema)]
pub struct ConsumerGroupDetails {
    #[serde(flatten)]
    pub group: ConsumerGroup,
    /// The instance's exchange.
    pub exchange: String,
    /// This group's queue (what consumers read).
    pub queue: String,
    /// The forwarder's broker connection: `disabled`, `connecting`, `connected`, `disconnected`.
    pub amqp: String,
    /// Messages ready in the queue (not yet delivered to a consumer); null without a broker.
    pub backlog: Option<u32>,
    /// Consumers attached to the queue; null without a broker.
    pub consumers: Option<u32>,
    /// Messages per minute taken by this group's consumers, averaged over the last sampling
    /// interval: `(published to the instance + backlog before − backlog now) / interval`.
    /// Null until two samples exist.
    pub consume_rate_per_minute: Option<f64>,
    /// When `consume_rate_per_minute` was last computed (ms since the epoch).
    pub rate_sampled_at_ms: Option<i64>,
    /// The queue type this gateway declares (`amqp.queue_type`): `classic` or `quorum`.
    pub queue_type: QueueType,
    /// What the forwarder found in RabbitMQ when it last declared the group's queue.
    pub queue_status: QueueStatus,
    /// Set while `queue_status` is `type_mismatch`, `other_arguments` or `refused`: what is
    /// wrong, naming the group, and what to do.
    pub queue_error: Option<String>,
}

/// What the forwarder found when it declared a group's queue (`queue_status` of a group).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum QueueStatus {
    /// Not declared on the current connection (no broker connected yet, or the declare failed
    /// and is retried).
    NotDeclared,
    /// Declared with the configured type and arguments, and bound.
    Declared,
    /// It existed with other arguments (e.g. another message TTL): kept as it is, bound and fed.
    OtherArguments,
    /// It existed with the other queue type than `amqp.queue_type`: kept as it is, bound and
    /// fed, without the configured type's guarantees (see `queue_error`).
    TypeMismatch,
    /// RabbitMQ refused the queue's arguments (e.g. a message TTL on a quorum queue before
    /// RabbitMQ 3.10): no queue, the group receives nothing (see `queue_error`).
    Refused,
}

impl QueueStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            QueueStatus::NotDeclared => "not_declared",
            QueueStatus::Declared => "declared",
            QueueStatus::OtherArguments => "other_arguments",
            QueueStatus::TypeMismatch => "type_mismatch",
            QueueStatus::Refused => "refused",
        }
    }
}

/// Exchange and queue names.
#[derive(Debug, Clone)]
pub struct Topology {
    prefix: String,
}

impl Topology {
    pub fn new(prefix: impl Into<String>) -> Self {
        Topology {
            prefix: prefix.into(),
        }
    }

    pub fn exchange(&self, instance_id: &str) -> String {
        format!("{}.{instance_id}", self.prefix)
    }

    pub fn queue(&self, instance_id: &str, group_id: &str) -> String {
        format!("{}.{instance_id}.{group_id}", self.prefix)
    }
}

/// Store document id of a group.
pub fn doc_id(instance_id: &str, group_id: &str) -> String {
    format!("{instance_id}/{group_id}")
}

/// `group_id`: 1..=64 of `A-Z a-z 0-9 _ -` (it becomes part of a queue name).
pub fn validate_group_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 64 {
        return Err("must be 1..=64 characters".into());
    }
    if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err("may contain only A-Z a-z 0-9 _ -".into());
    }
    Ok(())
}

/// `name`: 1..=64 printable characters, not blank.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.trim().is_empty() {
        return Err("must not be empty".into());
    }
    if name.chars().count() > 64 {
        return Err("must be at most 64 characters".into());
    }
    if name.chars().any(char::is_control) {
        return Err("must not contain control characters".into());
    }
    Ok(())
}

/// A message TTL in seconds: at most [`MAX_MESSAGE_TTL_SECS`].
pub fn validate_message_ttl(secs: u32) -> Result<(), String> {
    if secs > MAX_MESSAGE_TTL_SECS {
        return Err(format!(
            "must be at most {MAX_MESSAGE_TTL_SECS} (RabbitMQ's x-message-ttl is milliseconds below 2^32); 0 = no TTL"
        ));
    }
    Ok(())
}

/// A fresh group id (vendor-like: 20 alphanumerics).
pub fn generate_group_id() -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(20)
        .map(char::from)
        .collect()
}

/// Declares the instance's exchange (durable fanout).
pub(crate) async fn declare_exchange(ch: &Channel, exchange: &str) -> Result<(), lapin::Error> {
    ch.exchange_declare(
        exchange.into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
}

/// The queue arguments of a group whose messages live `ttl_secs` (0 = no TTL), in a queue of
/// `queue_type`. A classic queue carries no `x-queue-type` (as before the setting existed, so
/// queues declared by older versions stay equivalent); a quorum queue carries
/// `x-queue-type: quorum`. RabbitMQ 3.10 and later accept `x-message-ttl` on both types; the
/// other quorum-queue conditions (durable, not exclusive, not auto-delete) are how every group
/// queue is declared anyway.
pub(crate) fn queue_arguments(ttl_secs: u32, queue_type: QueueType) -> FieldTable {
    let mut args = FieldTable::default();
    if ttl_secs > 0 {
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(i64::from(ttl_secs) * 1000),
        );
    }
    if queue_type == QueueType::Quorum {
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(queue_type.as_str().into()),
        );
    }
    args
}

/// How [`declare_group`] left a group's queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Declared {
    /// Declared (or found) with the arguments asked for.
    AsAsked,
    /// It existed with other arguments than its type (406, e.g. another message TTL): kept as
    /// it is, and bound. The broker's reply text says which.
    KeptExisting(String),
    /// It existed with the other queue type (406 on `x-queue-type`): kept as it is, and bound,
    /// so it is still fed — but it is not the type `amqp.queue_type` asks for.
    OtherType(String),
    /// RabbitMQ refused the arguments themselves (406 "invalid arg", e.g. `x-message-ttl` on a
    /// quorum queue of a RabbitMQ before 3.10): no queue was declared, nothing is bound.
    Refused(String),
}

/// What a 406 PRECONDITION_FAILED on a queue declare means, from the broker's reply text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The queue exists with another `x-queue-type` ("inequivalent arg 'x-queue-type'").
    OtherType,
    /// The queue exists with another value of some other argument ("inequivalent arg …").
    OtherArguments,
    /// The arguments are not valid for this queue type on this broker ("invalid arg …"): the
    /// queue does not exist.
    InvalidArguments,
}

/// Classifies a 406 reply text (`PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for
/// queue 'q' in vhost '/': received … but current is …`). RabbitMQ reports the first argument
/// that differs, in its own order (`x-message-ttl` before `x-queue-type`): a queue that differs
/// in both is reported as [`Refusal::OtherArguments`].
pub(crate) fn classify_refusal(reply: &str) -> Refusal {
    if reply.contains("invalid arg") {
        Refusal::InvalidArguments
    } else if reply.contains("inequivalent arg 'x-queue-type'") {
        Refusal::OtherType
    } else {
        Refusal::OtherArguments
    }
}

/// Whether `e` is a channel-level 406 PRECONDITION_FAILED (e.g. a queue re-declared with
/// other arguments). It closes the channel it happened on.
pub(crate) fn is_precondition_failed(e: &lapin::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ProtocolError(a)
            if *a.kind() == AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
    )
}

/// The broker's reply text of a protocol error (empty for other errors).
pub(crate) fn reply_text(e: &lapin::Error) -> String {
    match e.kind() {
        ErrorKind::ProtocolError(a) => a.get_message().to_string(),
        _ => String::new(),
    }
}

/// Declares the exchange, the group's durable queue of `queue_type` (with a message TTL when
/// `ttl_secs` > 0) and the binding (all idempotent). When the queue already exists with other
/// arguments or another type, RabbitMQ answers 406 and closes `ch`; the queue is then kept as
/// it is — checked with a passive declare and bound on a fresh channel of `conn` — and the
/// result says so ([`Declared::KeptExisting`], [`Declared::OtherType`]). Arguments RabbitMQ
/// refuses outright give [`Declared::Refused`]. Callers should use a channel they can throw
/// away.
pub(crate) async fn declare_group(
    conn: &Connection,
    ch: &Channel,
    exchange: &str,
    queue: &str,
    ttl_secs: u32,
    queue_type: QueueType,
) -> Result<Declared, lapin::Error> {
    declare_exchange(ch, exchange).await?;
    match ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions::durable(),
            queue_arguments(ttl_secs, queue_type),
        )
        .await
    {
        Ok(_) => {
            bind(ch, exchange, queue).await?;
            Ok(Declared::AsAsked)
        }
        Err(e) if is_precondition_failed(&e) => {
            let reply = reply_text(&e);
            let refusal = classify_refusal(&reply);
            if refusal == Refusal::InvalidArguments {
                return Ok(Declared::Refused(reply));
            }
            let fresh = conn.create_channel().await?;
            let kept = async {
                fresh
                    .queue_declare(
                        queue.into(),
                        QueueDeclareOptions::durable().passive(),
                        FieldTable::default(),
                    )
                    .await?;
                bind(&fresh, exchange, queue).await
            }
            .await;
            if fresh.status().connected() {
                let _ = fresh.close(200, "done".into()).await;
            }
            kept.map(|()| match refusal {
                Refusal::OtherType => Declared::OtherType(reply),
                _ => Declared::KeptExisting(reply),
            })
        }
        Err(e) => Err(e),
    }
}

async fn bind(ch: &Channel, exchange: &str, queue: &str) -> Result<(), lapin::Error> {
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
}

/// Deletes a group's queue (and the messages in it). A missing queue is not an error.
pub(crate) async fn delete_queue(ch: &Channel, queue: &str) -> Result<(), lapin::Error> {
    ch.queue_delete(queue.into(), QueueDeleteOptions::default())
        .await
        .map(|_| ())
}

/// Deletes a deleted instance's exchange (bindings go with it; the queues are deleted on
/// their own). A missing exchange is not an error.
pub(crate) async fn delete_exchange(ch: &Channel, exchange: &str) -> Result<(), lapin::Error> {
    ch.exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
        .await
}

/// `(messages ready, consumers)` of a queue through a passive declare. A missing queue closes
/// the channel (404), so callers use a channel they can throw away.
pub(crate) async fn inspect_queue(ch: &Channel, queue: &str) -> Result<(u32, u32), lapin::Error> {
    let q = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions::durable().passive(),
            FieldTable::default(),
        )
        .await?;
    Ok((q.message_count(), q.consumer_count()))
}

/// Consume-rate bookkeeping of one group, fed by the periodic sampler.
#[derive(Debug, Clone, Default)]
pub(crate) struct RateSampler {
    last: Option<Sample>,
    pub rate_per_minute: Option<f64>,
    pub sampled_at_ms: Option<i64>,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: std::time::Instant,
    ready: u32,
    published: u64,
}

impl RateSampler {
    /// Records a sample: `ready` messages in the queue and `published` messages confirmed to the
    /// instance's exchange so far.
    pub fn record(&mut self, now: std::time::Instant, now_ms: i64, ready: u32, published: u64) {
        if let Some(last) = self.last {
            let secs = now.duration_since(last.at).as_secs_f64();
            if secs > 0.0 {
                let taken = published.saturating_sub(last.published) as f64 + f64::from(last.ready)
                    - f64::from(ready);
                self.rate_per_minute = Some((taken.max(0.0) / secs * 60.0 * 100.0).round() / 100.0);
                self.sampled_at_ms = Some(now_ms);
            }
        }
        self.last = Some(Sample {
            at: now,
            ready,
            published,
        });
    }
}
