//! The publisher task (outbox → RabbitMQ) and the group sampler task.
//!
//! One connection, one confirm-mode channel for data, throwaway channels for admin work. The
//! supervisor loop is ours rather than lapin's auto-recovery: on any connection or channel
//! failure everything in flight is simply forgotten, the connection is dropped and, after an
//! exponential backoff, a new session re-declares the topology and re-reads the outbox from its
//! oldest row. Every row still in the outbox is by definition unacknowledged, so "re-queue from
//! the oldest failed" needs no bookkeeping beyond "delete on ack".

use super::groups::{self, declare_exchange};
use super::outbox::{Fresh, Outbox, OutboxReader, OutboxRow};
use super::{AmqpLink, AmqpStatus, Forwarder};
use futures_util::future::BoxFuture;
use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::FutureExt;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use rand::Rng;
use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Rows read from the outbox per query.
const READ_BATCH: usize = 512;
/// Most rows held in memory waiting to be published (rate-limited targets park rows here).
const MAX_PENDING: usize = 4 * READ_BATCH;
/// How long a stopping publisher waits for confirms in flight.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Pause after a nack before re-sending, so a broker refusing everything is not hammered.
const NACK_PAUSE: Duration = Duration::from_millis(200);
/// Connect (TCP + AMQP handshake) timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("{0}")]
    Amqp(#[from] lapin::Error),
    #[error("outbox: {0}")]
    Outbox(#[from] super::OutboxError),
    #[error("connect timed out")]
    ConnectTimeout,
    #[error("broker answered without publisher confirms")]
    ConfirmsOff,
    #[error("connection or channel closed")]
    Closed,
}

enum SessionEnd {
    Stopped,
    /// This node's drain term ended (cluster mode: the `outbox` lease was lost).
    TermEnded,
}

/// The supervisor: connect, run a session, back off, repeat until stopped.
pub(super) async fn run(
    fwd: Arc<Forwarder>,
    outbox: Outbox,
    url: String,
    mut stop: watch::Receiver<bool>,
) {
    let initial = Duration::from_millis(fwd.config.reconnect_initial_ms);
    let max = Duration::from_millis(fwd.config.reconnect_max_ms);
    let mut backoff = initial;
    loop {
        if *stop.borrow() {
            break;
        }
        fwd.set_status(AmqpStatus::Connecting);
        let mut reached_publishing = false;
        let outcome = session(&fwd, &outbox, &url, &mut stop, &mut reached_publishing).await;
        fwd.detach_link();
        match outcome {
            Ok(SessionEnd::Stopped | SessionEnd::TermEnded) => break,
            Err(e) => {
                fwd.metrics.forwarder_reconnects.inc();
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "AMQP connection lost or failed");
            }
        }
        fwd.set_status(AmqpStatus::Disconnected);
        if reached_publishing {
            backoff = initial;
        }
        let jitter = rand::thread_rng().gen_range(0.8..1.2);
        let pause = backoff.mul_f64(jitter);
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.changed() => break,
        }
        backoff = (backoff * 2).min(max);
    }
    fwd.set_status(AmqpStatus::Disconnected);
}

async fn session(
    fwd: &Arc<Forwarder>,
    outbox: &Outbox,
    url: &str,
    stop: &mut watch::Receiver<bool>,
    reached_publishing: &mut bool,
) -> Result<SessionEnd, SessionError> {
    let props = ConnectionProperties::default().with_connection_name("fleetgate-forwarder".into());
    let connect = tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(url, props));
    let conn = tokio::select! {
        r = connect => r.map_err(|_| SessionError::ConnectTimeout)??,
        _ = stop.changed() => return Ok(SessionEnd::Stopped),
    };
    let link = Arc::new(AmqpLink { conn });
    let result = session_on(fwd, outbox, &link, stop, reached_publishing).await;
    let conn = &link.conn;
    if conn.status().connected() {
        let reason = if result.is_ok() {
            "shutdown"
        } else {
            "reconnecting"
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), conn.close(200, reason.into())).await;
    }
    result
}

async fn session_on(
    fwd: &Arc<Forwarder>,
    outbox: &Outbox,
    link: &Arc<AmqpLink>,
    stop: &mut watch::Receiver<bool>,
    reached_publishing: &mut bool,
) -> Result<SessionEnd, SessionError> {
    // Declare everything known before publishing: a message published before its groups'
    // queues are bound would come back unroutable and be dropped.
    let conn = &link.conn;
    let work = fwd.attach_link(link.clone());
    set_up(fwd, link, work).await?;

    fwd.set_status(AmqpStatus::Connected);
    *reached_publishing = true;
    let mut term = outbox.drain_term();
    let mut health = tokio::time::interval(Duration::from_secs(1));
    loop {
        // A node drains its own file at once; the cluster's table only during its terms of
        // the `outbox` lease. Meanwhile the connection serves the consumer-group API.
        let epoch = loop {
            if let Some(epoch) = *term.borrow_and_update() {
                break epoch;
            }
            tokio::select! {
                _ = stop.changed() => return Ok(SessionEnd::Stopped),
                changed = term.changed() => {
                    if changed.is_err() {
                        // No more terms will come (the lease keeper stopped).
                        let _ = stop.changed().await;
                        return Ok(SessionEnd::Stopped);
                    }
                }
                _ = health.tick() => {
                    if !conn.status().connected() {
                        return Err(SessionError::Closed);
                    }
                }
            }
        };
        if outbox.is_shared() {
            // Cluster mode: groups and tombstones that other nodes wrote since this connection
            // was set up (`follow.rs`) are this term's to declare and delete before publishing.
            set_up(fwd, link, fwd.term_work()).await?;
        }
        let ch = conn.create_channel().await?;
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
        // Deletes of the previous session must be committed before the outbox is re-read, or
        // rows acked just before the failure would be sent again.
        outbox.flush().await;
        let reader = outbox.reader()?;
        if outbox.is_shared() {
            fwd.metrics.forwarder_outbox_drain.set(1);
            tracing::info!(
                term = epoch,
                "AMQP connected; draining the cluster's shared outbox"
            );
        } else {
            fwd.metrics.forwarder_outbox_drain.set(1);
            tracing::info!(outbox_messages = outbox.len(), "AMQP connected; forwarding");
        }
        let end = publish_loop(fwd, outbox, &reader, conn, &ch, stop, epoch, &mut term).await;
        fwd.metrics.forwarder_outbox_drain.set(0);
        match end? {
            SessionEnd::Stopped => return Ok(SessionEnd::Stopped),
            SessionEnd::TermEnded => {
                tracing::warn!(
                    term = epoch,
                    "outbox drain term over (lease lost); unconfirmed rows are left to the next holder"
                );
                if ch.status().connected() {
                    let _ = ch.close(200, "drain term over".into()).await;
                }
            }
        }
    }
}

/// Declares the groups and deletes the queues and exchanges of the tombstones in `work`.
async fn set_up(
    fwd: &Arc<Forwarder>,
    link: &Arc<AmqpLink>,
    work: super::LinkWork,
) -> Result<(), SessionError> {
    // One throwaway channel per group: a queue that exists with other arguments (406) closes
    // its channel, and is then kept as it is rather than failing the session forever.
    for g in work.groups {
        let how = super::declare_on(
            link,
            &g.exchange,
            &g.queue,
            g.ttl_secs,
            fwd.config.queue_type,
        )
        .await?;
        fwd.mark_declared(&g.instance_id, &g.group_id, how, g.ttl_secs);
    }
    if !work.tombstones.is_empty() {
        let admin = link.conn.create_channel().await?;
        for (id, queue) in work.tombstones {
            groups::delete_queue(&admin, &queue).await?;
            if let Err(e) = fwd.forget_tombstone(&id).await {
                tracing::warn!(error = %e, %queue, "cannot forget a deleted group's tombstone");
            }
        }
        let _ = admin.close(200, "setup done".into()).await;
    }
    // Deleted instances' exchanges, after their groups' queues.
    for (instance_id, exchange) in work.exchanges {
        fwd.delete_exchange_tombstone(link, &instance_id, &exchange)
            .await?;
    }
    Ok(())
}

/// What travels with a publish until its confirm arrives.
struct Sent {
    seq: i64,
    size: u64,
    target: String,
    started: Instant,
}

type ConfirmFuture = BoxFuture<'static, (Sent, lapin::Result<Confirmation>)>;

/// The AMQP properties of a row: vendor application headers plus a persistent JSON envelope.
pub(crate) fn properties(row: &OutboxRow) -> BasicProperties {
    let m = &row.msg;
    let message_id = row.message_id();
    let mut headers = FieldTable::default();
    let mut put = |k: &str, v: &str| {
        headers.insert(k.into(), AMQPValue::LongString(LongString::from(v)));
    };
    put("topic", &m.topic);
    put("messageId", &message_id);
    put("productKey", &m.product_key);
    put("deviceName", &m.device_name);
    put("instanceId", &row.target);
    put("kind", m.kind.as_str());
    headers.insert(
        "generateTime".into(),
        AMQPValue::LongLongInt(m.generate_time_ms),
    );
    BasicProperties::default()
        .with_message_id(message_id.into())
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_app_id("fleetgate".into())
        .with_timestamp((m.generate_time_ms.max(0) / 1000) as u64)
        .with_headers(headers)
}

/// Index of the next row to publish: the oldest one whose lane is not rate-limited. A lane is
/// a target's mirrored rows or its own devices' rows ([`Forwarder::mirror_limiter`]); rows of a
/// limited lane keep their order because the lane is skipped as a whole, and a target limit
/// blocks both lanes. Sets `wake` to when a limited lane may go again.
pub(crate) fn pick(
    fwd: &Forwarder,
    pending: &VecDeque<OutboxRow>,
    wake: &mut Option<tokio::time::Instant>,
) -> Option<usize> {
    // (target, mirrored lane only)
    let mut blocked: Vec<(&str, bool)> = Vec::new();
    let block = |at: Duration, wake: &mut Option<tokio::time::Instant>| {
        fwd.metrics.forwarder_rate_limited.inc();
        let at = tokio::time::Instant::now() + at;
        *wake = Some(wake.map_or(at, |w| w.min(at)));
    };
    for (i, row) in pending.iter().enumerate() {
        let target = row.target.as_str();
        if blocked.contains(&(target, false)) {
            continue;
        }
        let mirror = fwd.mirror_limiter(row);
        if mirror.is_some() && blocked.contains(&(target, true)) {
            continue;
        }
        if let Some(limiter) = mirror {
            if let Err(wait) = limiter.check(row.size()) {
                block(wait, wake);
                blocked.push((target, true));
                continue;
            }
        }
        let Some(limiter) = fwd.limiter(target) else {
            return Some(i);
        };
        match limiter.check(row.size()) {
            Ok(()) => return Some(i),
            Err(wait) => {
                block(wait, wake);
                blocked.push((target, false));
            }
        }
    }
    None
}

#[derive(Default)]
struct Deletes {
    seqs: Vec<i64>,
    bytes: u64,
}

impl Deletes {
    fn push(&mut self, sent: &Sent) {
        self.push_row(sent.seq, sent.size);
    }

    fn push_row(&mut self, seq: i64, size: u64) {
        self.seqs.push(seq);
        self.bytes += size;
    }

    fn flush(&mut self, outbox: &Outbox, term: u64) {
        if !self.seqs.is_empty() {
            outbox.delete_in_term(
                std::mem::take(&mut self.seqs),
                std::mem::take(&mut self.bytes),
                term,
            );
        }
    }
}

/// Handles one confirm. `Ok(true)` = a nack (the caller drains and re-reads).
fn on_confirm(
    fwd: &Forwarder,
    sent: Sent,
    result: lapin::Result<Confirmation>,
    deletes: &mut Deletes,
) -> Result<bool, SessionError> {
    let m = &fwd.metrics;
    match result? {
        Confirmation::Ack(None) => {
            m.forwarder_published.inc();
            m.forwarder_confirm_seconds
                .observe(sent.started.elapsed().as_secs_f64());
            fwd.count_published(&sent.target);
            deletes.push(&sent);
            Ok(false)
        }
        Confirmation::Ack(Some(returned)) => {
            // No queue bound to the instance's exchange: no consumer group exists, and only
            // existing subscriptions receive data (vendor semantics). Count and drop.
            m.forwarder_returns.inc();
            m.forwarder_dropped
                .get_or_create(&[("reason", "no_route")])
                .inc();
            tracing::debug!(target_instance = %sent.target, reply = %returned.reply_text, "message returned unroutable; dropped");
            deletes.push(&sent);
            Ok(false)
        }
        Confirmation::Nack(_) => {
            m.forwarder_nacks.inc();
            tracing::warn!(seq = sent.seq, target_instance = %sent.target, "broker nacked a message; it will be re-sent");
            Ok(true)
        }
        Confirmation::NotRequested => Err(SessionError::ConfirmsOff),
    }
}

/// Publishes during drain term `epoch` until stopped, the term ends or the link fails.
#[allow(clippy::too_many_arguments)]
async fn publish_loop(
    fwd: &Arc<Forwarder>,
    outbox: &Outbox,
    reader: &OutboxReader,
    conn: &Connection,
    ch: &Channel,
    stop: &mut watch::Receiver<bool>,
    epoch: u64,
    term: &mut watch::Receiver<Option<u64>>,
) -> Result<SessionEnd, SessionError> {
    let shared = outbox.is_shared();
    // A closed term channel (the file's, or a stopped keeper) never changes again.
    let mut term_open = true;
    let window = fwd.config.inflight_window.max(1);
    let mut cursor = 0i64;
    let mut rows = Rows::default();
    let mut exchanges = Exchanges::new(fwd);
    let mut draining = false;
    let mut health = tokio::time::interval(Duration::from_secs(1));
    health.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    // `more`: rows may be waiting after `cursor`. They come from the outbox's fresh tail (rows
    // just committed) and, for whatever the tail does not hold (rows from before this process,
    // dropped from a full tail, or taken by an earlier session), from the file.
    let mut more = true;
    loop {
        if !draining && more && rows.pending.len() < MAX_PENDING - READ_BATCH {
            refill(outbox, reader, &mut cursor, &mut more, &mut rows.pending).await?;
        }

        let wake = if draining {
            None
        } else {
            publish_ready(fwd, ch, &mut exchanges, &mut rows, window, more).await?
        };

        if draining && rows.inflight.is_empty() {
            // A nack: everything not acked is still in the outbox; start over from the oldest.
            rows.deletes.flush(outbox, epoch);
            outbox.flush().await;
            cursor = 0;
            rows.pending.clear();
            more = true;
            draining = false;
            tokio::time::sleep(NACK_PAUSE).await;
            continue;
        }
        rows.deletes.flush(outbox, epoch);

        let can_publish_more = !draining && rows.inflight.len() < window;
        if can_publish_more && more && rows.pending.len() < MAX_PENDING - READ_BATCH {
            continue;
        }
        if can_publish_more && !rows.pending.is_empty() && wake.is_none() {
            continue;
        }

        tokio::select! {
            biased;
            _ = stop.changed() => {
                settle_for_stop(fwd, outbox, epoch, &mut rows.inflight, &mut rows.deletes).await;
                return Ok(SessionEnd::Stopped);
            }
            Some((sent, res)) = rows.inflight.next(), if !rows.inflight.is_empty() => {
                draining |= on_confirm(fwd, sent, res, &mut rows.deletes)?;
                // Take every confirm already resolved before publishing again.
                while let Some(Some((sent, res))) = rows.inflight.next().now_or_never() {
                    draining |= on_confirm(fwd, sent, res, &mut rows.deletes)?;
                }
            }
            // New rows committed: the loop takes them from the fresh tail.
            _ = outbox.shared.new_rows.notified(), if !more && !draining => more = true,
            // The shared table: rows other nodes committed are found by polling.
            _ = tokio::time::sleep(super::pg_outbox::POLL), if shared && !more && !draining => more = true,
            changed = term.changed(), if term_open => match changed {
                Err(_) => term_open = false,
                Ok(()) if *term.borrow() != Some(epoch) => {
                    // Confirms still in flight are forgotten: their rows stay in the table and
                    // the next holder publishes them again (same message ids).
                    rows.deletes.flush(outbox, epoch);
                    return Ok(SessionEnd::TermEnded);
                }
                Ok(()) => {}
            },
            _ = sleep_until_opt(wake), if wake.is_some() => {}
            // A rate limit changed: rows held back may go now.
            _ = fwd.limits_changed.notified() => {}
            _ = health.tick() => {
                if !conn.status().connected() || !ch.status().connected() {
                    return Err(SessionError::Closed);
                }
            }
        }
    }
}

/// A session's rows: read and waiting, published and waiting for their confirm, confirmed
/// and waiting to be deleted.
#[derive(Default)]
struct Rows {
    pending: VecDeque<OutboxRow>,
    inflight: FuturesUnordered<ConfirmFuture>,
    deletes: Deletes,
}

/// Publishes the pending rows the rate limits let go, until `window` confirms are in flight
/// (or, while `more` rows wait to be read, the buffer runs low). Returns when the first row
/// held back by a rate limit may go.
async fn publish_ready(
    fwd: &Arc<Forwarder>,
    ch: &Channel,
    exchanges: &mut Exchanges,
    rows: &mut Rows,
    window: usize,
    more: bool,
) -> Result<Option<tokio::time::Instant>, SessionError> {
    let mut wake = None;
    while rows.inflight.len() < window {
        let Some(i) = pick(fwd, &rows.pending, &mut wake) else {
            break;
        };
        let Some(row) = rows.pending.remove(i) else {
            break;
        };
        if !exchanges.ready(fwd, ch, &row, &mut rows.deletes).await? {
            continue;
        }
        let confirm = publish_row(fwd, ch, row).await;
        rows.inflight.push(confirm);
        if rows.pending.len() < READ_BATCH && more {
            // Refill before the buffer runs dry.
            break;
        }
    }
    Ok(wake)
}

/// Stopping: takes the confirms that arrive within [`STOP_GRACE`], then commits the deletes.
async fn settle_for_stop(
    fwd: &Forwarder,
    outbox: &Outbox,
    epoch: u64,
    inflight: &mut FuturesUnordered<ConfirmFuture>,
    deletes: &mut Deletes,
) {
    let deadline = tokio::time::Instant::now() + STOP_GRACE;
    while let Ok(Some((sent, res))) = tokio::time::timeout_at(deadline, inflight.next()).await {
        if on_confirm(fwd, sent, res, deletes).is_err() {
            break;
        }
    }
    deletes.flush(outbox, epoch);
    outbox.flush().await;
}

/// Reads the rows after `cursor` into `pending`: from the outbox's fresh tail, or from the file
/// for whatever the tail does not hold; `more` says whether rows may be waiting still.
async fn refill(
    outbox: &Outbox,
    reader: &OutboxReader,
    cursor: &mut i64,
    more: &mut bool,
    pending: &mut VecDeque<OutboxRow>,
) -> Result<(), SessionError> {
    let rows = match outbox.take_fresh(*cursor, READ_BATCH) {
        Fresh::Rows(rows, more_in_tail) => {
            *more = more_in_tail;
            rows
        }
        Fresh::Gap => {
            let rows = reader.read_after(*cursor, READ_BATCH).await?;
            // A short read reached the file's end; anything committed since is in
            // the tail and announced by `new_rows`.
            *more = rows.len() == READ_BATCH;
            rows
        }
    };
    if let Some(last) = rows.last() {
        *cursor = last.seq;
    }
    pending.extend(rows);
    Ok(())
}

/// The instance exchanges declared on this session's channel.
struct Exchanges {
    declared: HashSet<String>,
    /// Exchange deletions seen: when an instance's exchange goes, `declared` is forgotten.
    deletions_seen: u64,
}

impl Exchanges {
    fn new(fwd: &Forwarder) -> Self {
        Exchanges {
            declared: HashSet::new(),
            deletions_seen: fwd.exchanges_deleted(),
        }
    }

    /// Whether `row` may be published: its instance's exchange is declared on this channel
    /// (the first time it is needed, and again after an exchange deletion). `false`: the
    /// instance is gone, and the row is dropped (counted, its delete queued).
    async fn ready(
        &mut self,
        fwd: &Forwarder,
        ch: &Channel,
        row: &OutboxRow,
        deletes: &mut Deletes,
    ) -> Result<bool, SessionError> {
        let deletions = fwd.exchanges_deleted();
        if deletions != self.deletions_seen {
            self.declared.clear();
            self.deletions_seen = deletions;
        }
        if !self.declared.contains(&row.target) {
            if fwd.registry.get_instance(&row.target).is_err() {
                // The instance was deleted after this row was enqueued (its delete waits
                // for an outbox without rows for it, so only a row enqueued in that very
                // moment): its exchange is gone, and declaring it again would leak it.
                fwd.metrics
                    .forwarder_dropped
                    .get_or_create(&[("reason", "deleted_instance")])
                    .inc();
                tracing::debug!(seq = row.seq, target_instance = %row.target, "message for a deleted instance dropped");
                deletes.push_row(row.seq, row.size());
                return Ok(false);
            }
            declare_exchange(ch, &fwd.topology.exchange(&row.target)).await?;
            self.declared.insert(row.target.clone());
        }
        Ok(true)
    }
}

/// Publishes `row` (mandatory, to its instance's exchange) and returns its confirm.
async fn publish_row(fwd: &Forwarder, ch: &Channel, row: OutboxRow) -> ConfirmFuture {
    let exchange = ShortString::try_new(fwd.topology.exchange(&row.target))
        .unwrap_or_else(|_| ShortString::from(""));
    // Fanout ignores the routing key; it carries the topic for tools that show it.
    let routing_key = ShortString::try_new(row.msg.topic.clone()).unwrap_or_else(|_| "".into());
    let props = properties(&row);
    let sent = Sent {
        seq: row.seq,
        size: row.size(),
        target: row.target,
        started: Instant::now(),
    };
    let (ch, msg) = (ch.clone(), row.msg);
    let mut publish = async move {
        let confirm = ch
            .basic_publish(
                exchange,
                routing_key,
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &msg.body,
                props,
            )
            .await?;
        confirm.await
    }
    .boxed();
    // The first poll takes the delivery tag and queues the frames (lapin does both
    // before its first await), so rows go out in this order. Not awaiting the frames'
    // hand-off to lapin's I/O thread here lets a whole burst be queued with one wake-up
    // of that thread instead of a round trip per message.
    match futures_util::poll!(&mut publish) {
        std::task::Poll::Ready(result) => futures_util::future::ready((sent, result)).boxed(),
        std::task::Poll::Pending => async move { (sent, publish.await) }.boxed(),
    }
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The sampler: every `stats_interval_secs`, a passive declare per group feeds the backlog and
/// consumer gauges and the consume-rate estimate; a group whose queue has gone missing (deleted
/// behind our back, or declared while the broker was failing) is declared again.
pub(super) async fn sample(fwd: Arc<Forwarder>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(fwd.config.stats_interval_secs));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let Some(link) = fwd.link() else {
            continue;
        };
        // Groups whose queue RabbitMQ refused are not looked for (nor declared again) until the
        // next connection: only a change on the broker's side can help them.
        let keys: Vec<(String, String)> = super::lock(&fwd.groups)
            .groups
            .iter()
            .filter(|(_, e)| !matches!(e.problem, Some((super::QueueStatus::Refused, _))))
            .map(|(k, _)| k.clone())
            .collect();
        for (iid, gid) in keys {
            let queue = fwd.topology.queue(&iid, &gid);
            let published = fwd.published_to(&iid);
            match super::inspect_on(&link, &queue).await {
                Ok((ready, consumers)) => {
                    let label = [("group", super::groups::doc_id(&iid, &gid))];
                    fwd.metrics
                        .forwarder_group_backlog
                        .get_or_create(&label)
                        .set(i64::from(ready));
                    fwd.metrics
                        .forwarder_group_consumers
                        .get_or_create(&label)
                        .set(i64::from(consumers));
                    if let Some(e) = super::lock(&fwd.groups)
                        .groups
                        .get_mut(&(iid.clone(), gid.clone()))
                    {
                        e.rate
                            .record(Instant::now(), super::now_ms(), ready, published);
                    }
                }
                Err(e) => {
                    if !link.conn.status().connected() {
                        break;
                    }
                    tracing::info!(error = %e, %queue, "consumer group queue missing; declaring it");
                    let exchange = fwd.topology.exchange(&iid);
                    // Still a group? It may have been deleted while we looked (or its
                    // instance, through another node of a cluster).
                    let ttl_secs = super::lock(&fwd.groups)
                        .groups
                        .get(&(iid.clone(), gid.clone()))
                        .map(|e| fwd.message_ttl_secs(&e.group))
                        .filter(|_| fwd.registry.get_instance(&iid).is_ok());
                    if let Some(ttl_secs) = ttl_secs {
                        let queue_type = fwd.config.queue_type;
                        if let Ok(how) =
                            super::declare_on(&link, &exchange, &queue, ttl_secs, queue_type).await
                        {
                            fwd.mark_declared(&iid, &gid, how, ttl_secs);
                        }
                    }
                }
            }
        }
    }
}
