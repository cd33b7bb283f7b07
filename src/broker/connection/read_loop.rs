//! The established session's loop: socket reads, upstream PUBLISH handling and acks,
//! SUBSCRIBE/UNSUBSCRIBE through the ACL, the router link's notifications and downstream
//! acks, and the keep-alive deadline. SUBSCRIBE and UNSUBSCRIBE are in `read_loop/subscribe.rs`.

mod subscribe;

use subscribe::{on_subscribe, on_unsubscribe};

use crate::broker::codec::{self, Frame, UpPublish};
use crate::broker::session::SessionHandle;
use crate::broker::violation;
use crate::broker::{acl, DeviceHooks, DisconnectReason, PublishOutcome, RunOutcome, UpMessage};
use futures_util::FutureExt;
use rumqttd::local::LinkRx;
use rumqttd::protocol::{
    self, Packet, PingResp, PubAck, PubAckReason, PubComp, PubCompReason, PubRec, PubRecReason,
    Publish, QoS, SubAck, SubscribeReasonCode,
};
use rumqttd::Notification;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

use super::{Conn, Flow, Live, Socket, AUTO_SUBSCRIBE_PKID};

/// Most router notifications handled per wake-up (one socket write).
const NOTIFICATION_BATCH: usize = 256;

/// The established session's loop. Returns why it ended (from this side).
///
/// The futures that wait for something other than the socket (a retire, broker shutdown, the
/// router link, direct deliveries, the keep-alive deadline) live across turns of the loop and
/// are only made anew once they fired. Made per turn, i.e. per socket read, they registered and
/// dropped two `Notify` waiters, a channel waiter and a timer entry each time: ~5% of the
/// gateway's CPU in the 1,000-device ingest.
pub(super) async fn run<S, H>(
    conn: &mut Conn<S>,
    link_rx: LinkRx,
    live: &Live<H>,
    flow: &mut Flow,
    shutdown: &mut watch::Receiver<bool>,
    keep_alive: Option<Duration>,
) -> DisconnectReason
where
    S: Socket,
    H: DeviceHooks,
{
    let mut last_read = Instant::now();
    // Never polled without a keep-alive (the branch is disabled); the deadline moves forward
    // lazily: when it fires, the session expires only if nothing was read since.
    let period = keep_alive.unwrap_or(Duration::from_secs(3600));
    let keep_alive_timer = tokio::time::sleep_until(last_read + period);
    let stopped = live.handle.stopped();
    let stopping = crate::broker::stopping(shutdown);
    let direct_ready = live.handle.direct_ready();
    let link_next = next_notification(link_rx);
    tokio::pin!(keep_alive_timer, stopped, stopping, direct_ready, link_next);
    loop {
        // Unbiased on purpose (like rumqttd's RemoteLink): a chatty socket must not starve
        // downstream delivery, nor the other way round.
        tokio::select! {
            _ = &mut stopped => return live.handle.reason().unwrap_or(DisconnectReason::Kicked),
            _ = &mut stopping => return DisconnectReason::Kicked,
            read = conn.fill() => match read {
                Ok(0) | Err(_) => return DisconnectReason::ConnectionLost,
                Ok(_) => {
                    last_read = Instant::now();
                    // The two handlers are boxed: ~1.1 KB each, they would otherwise be part
                    // of every connection's task for its lifetime, idle or not (one allocation
                    // per read or per notification batch, each costing syscalls anyway).
                    if let Err(reason) = Box::pin(on_socket_data(conn, live, flow)).await {
                        return reason;
                    }
                }
            },
            (mut link_rx, notification) = &mut link_next => match notification {
                Ok(first) => {
                    let handled =
                        Box::pin(on_notifications(first, conn, &mut link_rx, live, flow)).await;
                    if let Err(reason) = handled {
                        return reason;
                    }
                    link_next.set(next_notification(link_rx));
                }
                Err(_) => {
                    // The router dropped the link by itself: its id may already be reused.
                    live.handle.forget_link(DisconnectReason::ConnectionLost);
                    return DisconnectReason::ConnectionLost;
                }
            },
            _ = &mut direct_ready => {
                direct_ready.set(live.handle.direct_ready());
                let written = match write_direct(conn, &live.handle, flow) {
                    Ok(written) => written,
                    Err(reason) => return reason,
                };
                if written && conn.flush().await.is_err() {
                    return DisconnectReason::ConnectionLost;
                }
            }
            _ = &mut keep_alive_timer, if keep_alive.is_some() => {
                let deadline = last_read + period;
                if deadline <= Instant::now() {
                    tracing::debug!("keep-alive expired");
                    return DisconnectReason::ConnectionLost;
                }
                keep_alive_timer.as_mut().reset(deadline);
            }
        }
    }
}

/// [`LinkRx::next`] on an owned receiver, handed back with the result: the future can then
/// outlive one turn of [`run`]'s loop, and the receiver is free for [`on_notifications`] once
/// it completed.
async fn next_notification(
    mut link_rx: LinkRx,
) -> (
    LinkRx,
    Result<Option<Notification>, rumqttd::local::LinkError>,
) {
    let next = link_rx.next().await;
    (link_rx, next)
}

/// Most rounds of [`on_socket_data`] whose acks share one socket write.
const COALESCE_ROUNDS: usize = 4;
/// Sessions handling socket data at once from which on the gateway counts as saturated, and
/// [`on_socket_data`] coalesces.
const COALESCE_BUSY_SESSIONS: usize = 256;

/// Handles what the socket has to say, then writes the answers. `Err` ends the session.
///
/// When the gateway is saturated (at least [`COALESCE_BUSY_SESSIONS`] sessions handling data
/// at once), the answers go out once the socket has nothing more ready: data that arrived
/// while a round was processed (a device with reports in flight sends more as acks reach it,
/// and a durable round waits for a store commit) is handled first, so its acks share the
/// write. One `sendto` per round was a third of the ingest path's CPU, and a saturated
/// gateway's acks wait in its run queue anyway. Short of that, acks go out after each round: a
/// device that pipelines deeply against an idle gateway would otherwise be throttled to one
/// window per commit (−25% for 100 flooding devices). At most [`COALESCE_ROUNDS`] rounds, so a
/// device that never pauses still gets its acks; checking the socket costs nothing when tokio
/// already knows it is drained.
async fn on_socket_data<S, H>(
    conn: &mut Conn<S>,
    live: &Live<H>,
    flow: &mut Flow,
) -> Result<(), DisconnectReason>
where
    S: Socket,
    H: DeviceHooks,
{
    let busy = Busy::enter(&live.shared.busy_sessions);
    let mut outcome = on_buffered(conn, live, flow).await;
    let rounds = if busy.sessions >= COALESCE_BUSY_SESSIONS {
        COALESCE_ROUNDS
    } else {
        1
    };
    for _ in 1..rounds {
        if outcome.is_err() {
            break;
        }
        match conn.fill().now_or_never() {
            Some(Ok(n)) if n > 0 => outcome = on_buffered(conn, live, flow).await,
            // Nothing ready, or an end the session loop's next read reports again.
            _ => break,
        }
    }
    drop(busy);
    // What was handled before an error or a DISCONNECT still gets its acks.
    if conn.flush().await.is_err() {
        return Err(DisconnectReason::ConnectionLost);
    }
    outcome
}

/// One session counted in [`Shared::busy_sessions`] while alive (also when its task is dropped
/// mid-way).
struct Busy<'a> {
    counter: &'a std::sync::atomic::AtomicUsize,
    /// Sessions handling data, this one included, when it entered.
    sessions: usize,
}

impl<'a> Busy<'a> {
    fn enter(counter: &'a std::sync::atomic::AtomicUsize) -> Self {
        let sessions = counter.fetch_add(1, Ordering::Relaxed) + 1;
        Busy { counter, sessions }
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Handles every complete packet in the read buffer, queueing the answers. `Err` ends the
/// session.
async fn on_buffered<S, H>(
    conn: &mut Conn<S>,
    live: &Live<H>,
    flow: &mut Flow,
) -> Result<(), DisconnectReason>
where
    S: Socket,
    H: DeviceHooks,
{
    let mut to_link = Vec::new();
    let mut outcome = Ok(());
    let mut pipeline: Vec<UpPublish> = Vec::new();
    loop {
        let frame = match codec::next_frame(&mut conn.rbuf, conn.max_packet) {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(error = %e, "malformed packet");
                violation::from_parse_error(&e).emit(&live.shared.metrics);
                outcome = Err(DisconnectReason::ConnectionLost);
                break;
            }
        };
        let frame = match frame {
            Frame::Publish(publish) if publish.qos < 2 && pipeline.len() < PIPELINE_MAX => {
                pipeline.push(publish);
                continue;
            }
            other => other,
        };
        // Anything else keeps its place in the stream: the PUBLISHes before it are done first.
        if let Err(reason) = on_publishes(&mut pipeline, conn, live, flow).await {
            outcome = Err(reason);
            break;
        }
        if let Err(reason) = on_frame(frame, conn, live, flow, &mut to_link).await {
            outcome = Err(reason);
            break;
        }
        // A (UN)SUBSCRIBE reaches the router before anything the following packets cause: a
        // device that subscribes to its reply topic and posts in the same write must find its
        // subscription in place when the reply (published through the gateway link, another
        // sender on the router's channel) arrives.
        if matches!(
            to_link.last(),
            Some(Packet::Subscribe(..) | Packet::Unsubscribe(..))
        ) {
            live.shared.router.wait_capacity().await;
            if !live.handle.send(std::mem::take(&mut to_link)) {
                return Err(DisconnectReason::ConnectionLost);
            }
        }
        // Replies to what this packet asked for were just queued for this very task: write them
        // now, so a long read of requests cannot fill the session's direct queue.
        if let Err(reason) = write_direct(conn, &live.handle, flow) {
            outcome = Err(reason);
            break;
        }
    }
    // What was read before an error still gets processed and acknowledged.
    if let Err(reason) = on_publishes(&mut pipeline, conn, live, flow).await {
        outcome = outcome.and(Err(reason));
    }
    // What was handled before an error or a DISCONNECT still gets its acks.
    if !to_link.is_empty() {
        live.shared.router.wait_capacity().await;
        if !live.handle.send(to_link) {
            return Err(DisconnectReason::ConnectionLost);
        }
    }
    outcome
}

async fn on_frame<S, H>(
    frame: Frame,
    conn: &mut Conn<S>,
    live: &Live<H>,
    flow: &mut Flow,
    to_link: &mut Vec<Packet>,
) -> Result<(), DisconnectReason>
where
    S: Socket,
    H: DeviceHooks,
{
    let lost = |_| DisconnectReason::ConnectionLost;
    let packet = match frame {
        Frame::Publish(publish) => return on_publish(publish, conn, live, flow).await,
        Frame::Other(packet) => *packet,
    };
    match packet {
        Packet::PubRel(rel, _) => {
            flow.incoming_qos2.remove(&rel.pkid);
            let comp = PubComp {
                pkid: rel.pkid,
                reason: PubCompReason::Success,
            };
            conn.queue(Packet::PubComp(comp, None)).map_err(lost)
        }
        Packet::Subscribe(subscribe, _) => on_subscribe(subscribe, conn, live, flow, to_link),
        Packet::Unsubscribe(unsubscribe, _) => on_unsubscribe(unsubscribe, conn, live, to_link),
        Packet::PingReq(_) => conn.queue(Packet::PingResp(PingResp)).map_err(lost),
        Packet::PubAck(ack, _) => ack_downstream(&mut flow.awaiting_ack, ack.pkid, 1, || {
            to_link.push(Packet::PubAck(ack, None))
        }),
        Packet::PubRec(rec, _) => ack_downstream(&mut flow.awaiting_ack, rec.pkid, 2, || {
            to_link.push(Packet::PubRec(rec, None))
        }),
        Packet::PubComp(comp, _) => {
            match flow.awaiting_comp.iter().position(|id| *id == comp.pkid) {
                Some(0) => {
                    flow.awaiting_comp.pop_front();
                    to_link.push(Packet::PubComp(comp, None));
                    Ok(())
                }
                Some(_) => Err(DisconnectReason::ConnectionLost),
                None => Ok(()),
            }
        }
        Packet::Disconnect(..) => Err(DisconnectReason::ClientDisconnect),
        other => {
            tracing::debug!(packet = ?other, "unexpected packet");
            Err(DisconnectReason::ConnectionLost)
        }
    }
}

/// A device's PUBACK (QoS 1) or PUBREC (QoS 2) for a downstream message. rumqttd drops a link
/// on an unsolicited or out-of-order ack, and then reuses its id: so only the expected next ack
/// is forwarded, a duplicate (not awaited at all) is ignored, and an out-of-order one ends the
/// connection here, cleanly.
pub(super) fn ack_downstream(
    awaiting: &mut VecDeque<(u16, u8)>,
    pkid: u16,
    qos: u8,
    forward: impl FnOnce(),
) -> Result<(), DisconnectReason> {
    match awaiting.iter().position(|(id, _)| *id == pkid) {
        Some(0) if awaiting.front().is_some_and(|(_, q)| *q == qos) => {
            awaiting.pop_front();
            forward();
            Ok(())
        }
        Some(_) => {
            tracing::debug!(pkid, "out-of-order or mismatched ack");
            Err(DisconnectReason::ConnectionLost)
        }
        None => Ok(()),
    }
}

/// Whether the session's device may publish on `topic`; a refusal is counted and logged.
fn publish_allowed<H: DeviceHooks>(live: &Live<H>, topic: &str) -> bool {
    let device = &live.session.device;
    let allowed = acl::topic_allowed(&device.product_key, &device.device_name, topic);
    if !allowed {
        live.shared
            .metrics
            .acl_denied
            .get_or_create(&[("kind", "publish")])
            .inc();
        tracing::debug!(topic, "publish refused by ACL");
    }
    allowed
}

/// An upstream PUBLISH: ACL, `on_publish`, then our own ack ("acknowledged means processed").
/// A publish on a topic the device does not own is dropped and counted, and still acked like the
/// vendor broker does (a silent drop; closing would only make the device reconnect and retry).
/// One the hooks withhold ends the session without its ack ([`withhold`]).
async fn on_publish<S, H>(
    publish: UpPublish,
    conn: &mut Conn<S>,
    live: &Live<H>,
    flow: &mut Flow,
) -> Result<(), DisconnectReason>
where
    S: Socket,
    H: DeviceHooks,
{
    let lost = |_| DisconnectReason::ConnectionLost;
    let topic = match violation::topic_name(&publish.topic) {
        Ok(topic) => topic,
        Err(violation) => {
            violation.emit(&live.shared.metrics);
            return Err(DisconnectReason::ConnectionLost);
        }
    };
    // A QoS 2 retransmission (same id before its PUBREL) is acknowledged, not processed again.
    let duplicate = publish.qos == 2 && flow.incoming_qos2.contains(&publish.pkid);
    if !duplicate && publish_allowed(live, topic) {
        let message = up_message(topic, &publish);
        let outcome = live.hooks.on_publish(&live.session, message).await;
        if outcome == PublishOutcome::Withheld && publish.qos > 0 {
            return Err(withhold(live, 1));
        }
    }
    match publish.qos {
        1 => {
            let ack = PubAck {
                pkid: publish.pkid,
                reason: PubAckReason::Success,
            };
            conn.queue(Packet::PubAck(ack, None)).map_err(lost)
        }
        2 => {
            flow.incoming_qos2.insert(publish.pkid);
            let rec = PubRec {
                pkid: publish.pkid,
                reason: PubRecReason::Success,
            };
            conn.queue(Packet::PubRec(rec, None)).map_err(lost)
        }
        _ => Ok(()),
    }
}

fn up_message<'a>(topic: &'a str, publish: &UpPublish) -> UpMessage<'a> {
    UpMessage {
        topic,
        payload: publish.payload.clone(),
        // The codec refuses any other value.
        qos: protocol::qos(publish.qos).unwrap_or(QoS::AtMostOnce),
    }
}

/// Ends the session without acknowledging `unacked` QoS 1/2 PUBLISHes the hooks could not take
/// (or that came after one): MQTT 3.1.1 has no negative ack, and a device resends what was
/// not acknowledged when it reconnects.
fn withhold<H: DeviceHooks>(live: &Live<H>, unacked: u64) -> DisconnectReason {
    live.shared.metrics.publishes_withheld.inc_by(unacked);
    tracing::debug!(
        unacked,
        "PUBLISH not taken: closing without acknowledging it"
    );
    DisconnectReason::Withheld
}

/// Most QoS 0/1 PUBLISHes of one socket read handled together by [`on_publishes`].
const PIPELINE_MAX: usize = 32;

/// Handles consecutive QoS 0/1 PUBLISHes of one read together, then acknowledges them in order.
///
/// The run goes to the hooks at once ([`DeviceHooks::on_publishes`]: ingest writes its version
/// reports with one store submission), so a device with ten reports in flight has them
/// committed in one store transaction instead of ten consecutive ones; the PUBACKs still go
/// out only after the whole run was processed, in packet order. QoS 2 (duplicate detection)
/// and every other packet take the one-at-a-time path, after the run before them.
///
/// A QoS 1 message the hooks withhold ends the session: the messages before it are
/// acknowledged, it and every QoS 1 message after it are not (MQTT wants PUBACKs in order).
async fn on_publishes<S, H>(
    pipeline: &mut Vec<UpPublish>,
    conn: &mut Conn<S>,
    live: &Live<H>,
    flow: &mut Flow,
) -> Result<(), DisconnectReason>
where
    S: Socket,
    H: DeviceHooks,
{
    if pipeline.is_empty() {
        return Ok(());
    }
    // A PUBLISH that breaks the protocol closes the connection; those before it are still
    // processed and acknowledged, those after it are not (the client resends them).
    let broken = pipeline.iter().enumerate().find_map(|(i, publish)| {
        violation::topic_name(&publish.topic)
            .err()
            .map(|violation| (i, violation))
    });
    if let Some((i, _)) = broken {
        pipeline.truncate(i);
    }
    let mut allowed = Vec::with_capacity(pipeline.len());
    // Per message of the pipeline: its index in `allowed`, when it passed the ACL.
    let mut run_index = Vec::with_capacity(pipeline.len());
    for publish in pipeline.iter() {
        // Every topic left passed the check above.
        let Ok(topic) = violation::topic_name(&publish.topic) else {
            continue;
        };
        if publish_allowed(live, topic) {
            run_index.push(Some(allowed.len()));
            allowed.push(up_message(topic, publish));
        } else {
            run_index.push(None);
        }
    }
    let outcome = if allowed.is_empty() {
        RunOutcome::processed()
    } else {
        // Boxed: the hooks' future would otherwise sit in every connection's task for good.
        Box::pin(live.hooks.on_publishes(&live.session, &allowed)).await
    };
    drop(allowed);
    let mut acked = Ok(());
    for (i, publish) in pipeline.iter().enumerate() {
        if publish.qos != 1 {
            continue;
        }
        if run_index[i].is_some_and(|at| outcome.get(at) == PublishOutcome::Withheld) {
            let unacked = pipeline[i..].iter().filter(|p| p.qos == 1).count() as u64;
            acked = Err(withhold(live, unacked));
            break;
        }
        let ack = PubAck {
            pkid: publish.pkid,
            reason: PubAckReason::Success,
        };
        if conn.queue(Packet::PubAck(ack, None)).is_err() {
            acked = Err(DisconnectReason::ConnectionLost);
            break;
        }
    }
    // Handled either way: never handed to the hooks again.
    pipeline.clear();
    acked?;
    // The replies to this run were just queued for this very task (at most one per PUBLISH,
    // and a run is shorter than the session's direct queue): write them now.
    write_direct(conn, &live.handle, flow)?;
    match broken {
        Some((_, violation)) => {
            violation.emit(&live.shared.metrics);
            Err(DisconnectReason::ConnectionLost)
        }
        None => Ok(()),
    }
}

/// Writes a batch of router notifications to the device.
async fn on_notifications<S, H>(
    first: Option<Notification>,
    conn: &mut Conn<S>,
    link_rx: &mut LinkRx,
    live: &Live<H>,
    flow: &mut Flow,
) -> Result<(), DisconnectReason>
where
    S: Socket,
    H: DeviceHooks,
{
    let mut batch: Vec<Notification> = first.into_iter().collect();
    while batch.len() < NOTIFICATION_BATCH {
        match link_rx.next().now_or_never() {
            Some(Ok(Some(n))) => batch.push(n),
            // Nothing ready, or an error the next `next()` will report again.
            _ => break,
        }
    }
    let lost = |_| DisconnectReason::ConnectionLost;
    let mut unscheduled = false;
    for notification in batch {
        let packet = match notification {
            Notification::Unschedule => {
                unscheduled = true;
                continue;
            }
            Notification::Disconnect(..) => {
                // The router is dropping this link (it then reuses the id): do not answer it.
                live.handle.forget_link(DisconnectReason::ConnectionLost);
                return Err(DisconnectReason::ConnectionLost);
            }
            other => Option::<Packet>::from(other),
        };
        match packet {
            Some(Packet::Publish(publish, _)) => {
                let at = conn.wbuf.len();
                conn.queue(Packet::Publish(publish, None)).map_err(lost)?;
                if let Some((qos @ 1..=2, pkid)) = codec::publish_meta(&conn.wbuf[at..]) {
                    flow.awaiting_ack.push_back((pkid, qos));
                }
            }
            Some(Packet::PubRel(rel, _)) => {
                flow.awaiting_comp.push_back(rel.pkid);
                conn.queue(Packet::PubRel(rel, None)).map_err(lost)?;
            }
            Some(Packet::SubAck(ack, _)) => {
                let pending = flow
                    .pending_subacks
                    .iter()
                    .position(|p| p.pkid == ack.pkid)
                    .and_then(|i| flow.pending_subacks.remove(i));
                let codes = match pending {
                    Some(pending) => {
                        record_grants(&live.handle, pending.paths, &ack.return_codes);
                        merge_suback(&pending.allowed, ack.return_codes)
                    }
                    None => ack.return_codes,
                };
                // The answer to our own `_ss=1` subscription is not the device's business.
                if ack.pkid != AUTO_SUBSCRIBE_PKID {
                    let suback = SubAck {
                        pkid: ack.pkid,
                        return_codes: codes,
                    };
                    conn.queue(Packet::SubAck(suback, None)).map_err(lost)?;
                }
            }
            // Answered by us already (UNSUBACK, PINGRESP) or not expected on a device link
            // (acks of upstream publishes, which never go to the router).
            Some(_) | None => {}
        }
    }
    if conn.flush().await.is_err() {
        return Err(DisconnectReason::ConnectionLost);
    }
    if unscheduled && link_rx.wake().await.is_err() {
        live.handle.forget_link(DisconnectReason::ConnectionLost);
        return Err(DisconnectReason::ConnectionLost);
    }
    Ok(())
}

/// Records the filters the router granted (a success code in their place) for direct delivery.
fn record_grants(handle: &SessionHandle, paths: Vec<String>, codes: &[SubscribeReasonCode]) {
    for (path, code) in paths.into_iter().zip(codes) {
        if matches!(
            code,
            SubscribeReasonCode::Success(_)
                | SubscribeReasonCode::QoS0
                | SubscribeReasonCode::QoS1
                | SubscribeReasonCode::QoS2
        ) {
            handle.grant(path);
        }
    }
}

/// Writes the session's queued direct messages as QoS 0 PUBLISHes (not flushed). Returns whether
/// there were any.
fn write_direct<S: Socket>(
    conn: &mut Conn<S>,
    handle: &SessionHandle,
    flow: &mut Flow,
) -> Result<bool, DisconnectReason> {
    handle.take_direct(&mut flow.direct);
    let written = !flow.direct.is_empty();
    for message in flow.direct.drain(..) {
        let publish = Publish::new(message.topic, message.payload, false);
        conn.queue(Packet::Publish(publish, None))
            .map_err(|_| DisconnectReason::ConnectionLost)?;
    }
    Ok(written)
}

/// The device's SUBACK: the router's codes for the filters that passed the ACL, in their places,
/// and failure (0x80) for the others.
pub(super) fn merge_suback(
    allowed: &[bool],
    router_codes: Vec<SubscribeReasonCode>,
) -> Vec<SubscribeReasonCode> {
    let mut router_codes = router_codes.into_iter();
    allowed
        .iter()
        .map(|ok| match ok {
            true => router_codes.next().unwrap_or(SubscribeReasonCode::Failure),
            false => SubscribeReasonCode::Failure,
        })
        .collect()
}
