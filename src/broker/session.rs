//! The live-session table entry: how other tasks (takeover, kick, shutdown) end a session safely.
//!
//! The hard rule comes from rumqttd: a connection id is reused by the router as soon as it
//! dropped a link, so a `LinkTx` must never be used after its link was disconnected — a late
//! DISCONNECT would end whichever client got the id next. Hence the `LinkTx` lives in
//! [`SessionHandle::link`] behind a mutex, and *retiring* a session takes it out and sends the
//! router a DISCONNECT in one step: from then on nobody can send on the old id. A retirement
//! done by another task (takeover, kick) is synchronous, so a replacement link is registered
//! strictly after the old one's DISCONNECT in the router's FIFO channel.
//!
//! The handle also carries the session's **direct delivery** state: the subscriptions the router
//! granted (recorded at SUBACK, removed at UNSUBSCRIBE) and a small queue through which
//! [`Downlink::publish_qos0`](super::Downlink::publish_qos0) hands QoS 0 messages straight to the
//! connection task, bypassing the router. The queue is a `VecDeque` that allocates on its first
//! message only, so an idle session pays a few dozen bytes for it.

use super::DisconnectReason;
use bytes::Bytes;
use futures_util::FutureExt;
use rumqttd::local::LinkTx;
use rumqttd::protocol::{Disconnect, DisconnectReasonCode, Packet};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use tokio::sync::{watch, Notify};

/// Most QoS 0 messages waiting for one session's connection task. Replies to the device's own
/// requests are written between the packets of the read that caused them, so they never wait
/// here in numbers; the bound is for a device that stopped reading (its task is stuck writing).
pub(crate) const DIRECT_QUEUE: usize = 64;
/// Queue capacity kept after draining; a larger one (after a burst) is released.
const KEPT_QUEUE_CAPACITY: usize = 4;

/// Where a connection's router link is.
enum LinkState {
    /// Authenticated, link not registered yet (waiting for a previous session or the router).
    Pending,
    /// Registered; the only way to talk to the router for this connection.
    Live(LinkTx),
    /// Disconnected from the router (or never registered): never send on it again.
    Retired,
}

/// How far a connection task got; other tasks wait on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Phase {
    /// The router link is being registered.
    Registering,
    /// The link is live or retired: its fate in the router is settled.
    Settled,
    /// The task ended and `on_disconnect` (if due) has returned.
    Done,
}

/// A QoS 0 message for one session.
pub(crate) struct DirectMessage {
    pub topic: Bytes,
    pub payload: Bytes,
}

/// What [`SessionHandle::offer`] did with a message.
pub(crate) enum Offer {
    /// Queued for the connection task, which writes it as a QoS 0 PUBLISH.
    Queued,
    /// The session's queue is full: the message is dropped.
    Full,
    /// Not for this path (persistent session, no granted subscription matches, session ending):
    /// the message is handed back for the router.
    Declined(DirectMessage),
}

/// Direct delivery state of a session.
#[derive(Default)]
struct Direct {
    /// Filters the router granted this session (each once). Only kept for clean sessions.
    grants: Vec<String>,
    queue: VecDeque<DirectMessage>,
    /// Cleared when the session is retired: nothing is queued or granted after that.
    open: bool,
}

/// One entry of the session table (`DeviceKey` → live session).
pub(crate) struct SessionHandle {
    pub conn_id: u64,
    /// `clean_session` of the CONNECT. A persistent session never takes direct deliveries: the
    /// router must see its messages to keep them for a reconnect.
    clean_session: bool,
    direct: Mutex<Direct>,
    direct_ready: Notify,
    link: Mutex<LinkState>,
    /// The first reason given to [`SessionHandle::retire`] wins.
    reason: Mutex<Option<DisconnectReason>>,
    /// `on_connect` was called (and `on_disconnect` is therefore due).
    online: AtomicBool,
    stop: Notify,
    phase: watch::Sender<Phase>,
}

/// Sends packets to a link in one router event. `LinkTx::send` is an `async fn` without any
/// await point (its channel send is a blocking one), so it completes on its first poll.
fn send_now(tx: &mut LinkTx, mut packets: Vec<Packet>) -> bool {
    let Some(last) = packets.pop() else {
        return true;
    };
    tx.buffer().extend(packets);
    matches!(tx.send(last).now_or_never(), Some(Ok(_)))
}

impl SessionHandle {
    pub(crate) fn new(conn_id: u64, clean_session: bool) -> SessionHandle {
        SessionHandle {
            conn_id,
            clean_session,
            direct: Mutex::new(Direct {
                open: true,
                ..Direct::default()
            }),
            direct_ready: Notify::new(),
            link: Mutex::new(LinkState::Pending),
            reason: Mutex::new(None),
            online: AtomicBool::new(false),
            stop: Notify::new(),
            phase: watch::Sender::new(Phase::Registering),
        }
    }

    /// Installs the freshly built link, unless the session was retired meanwhile: then the link
    /// is disconnected at once and `false` is returned.
    pub(crate) fn install(&self, mut tx: LinkTx) -> bool {
        let mut state = lock(&self.link);
        let installed = match *state {
            LinkState::Pending => {
                *state = LinkState::Live(tx);
                true
            }
            LinkState::Live(_) | LinkState::Retired => {
                send_now(&mut tx, vec![disconnect()]);
                false
            }
        };
        drop(state);
        self.phase.send_replace(Phase::Settled);
        installed
    }

    /// Marks a session whose link could not be registered.
    pub(crate) fn link_failed(&self) {
        *lock(&self.link) = LinkState::Retired;
        self.phase.send_replace(Phase::Settled);
    }

    /// Sends packets to the router. Returns `false` when the link is gone (retired or failed):
    /// the caller must end the session.
    pub(crate) fn send(&self, packets: Vec<Packet>) -> bool {
        match &mut *lock(&self.link) {
            LinkState::Live(tx) => send_now(tx, packets),
            LinkState::Pending | LinkState::Retired => false,
        }
    }

    /// The router dropped this link on its own (its notification channel closed): forget the
    /// `LinkTx` without sending anything, its connection id may already belong to someone else.
    pub(crate) fn forget_link(&self, reason: DisconnectReason) {
        self.set_reason(reason);
        self.close_direct();
        *lock(&self.link) = LinkState::Retired;
        self.stop.notify_one();
    }

    /// Ends the session from anywhere: records the reason (first one wins), disconnects the
    /// router link right now and wakes the connection task, which closes the socket and calls
    /// `on_disconnect`.
    pub(crate) fn retire(&self, reason: DisconnectReason) {
        self.set_reason(reason);
        self.close_direct();
        let previous = std::mem::replace(&mut *lock(&self.link), LinkState::Retired);
        if let LinkState::Live(mut tx) = previous {
            send_now(&mut tx, vec![disconnect()]);
        }
        self.stop.notify_one();
    }

    /// The router granted `filter` (a SUBACK success code): matching QoS 0 messages may come
    /// directly from now on. Ignored for persistent sessions and ended ones.
    pub(crate) fn grant(&self, filter: String) {
        if !self.clean_session {
            return;
        }
        let mut direct = lock(&self.direct);
        if direct.open && !direct.grants.contains(&filter) {
            direct.grants.push(filter);
        }
    }

    /// The device unsubscribed `filter`: its messages go through the router again (which
    /// forgets the subscription right after).
    pub(crate) fn revoke(&self, filter: &str) {
        lock(&self.direct).grants.retain(|f| f != filter);
    }

    /// Offers a QoS 0 message for direct delivery. Never blocks: a full queue drops it.
    pub(crate) fn offer(&self, message: DirectMessage) -> Offer {
        let mut direct = lock(&self.direct);
        let granted = std::str::from_utf8(&message.topic).is_ok_and(|topic| {
            direct
                .grants
                .iter()
                .any(|filter| rumqttd::protocol::matches(topic, filter))
        });
        if !direct.open || !granted {
            return Offer::Declined(message);
        }
        if direct.queue.len() >= DIRECT_QUEUE {
            return Offer::Full;
        }
        direct.queue.push_back(message);
        drop(direct);
        self.direct_ready.notify_one();
        Offer::Queued
    }

    /// Resolves when a direct message may be waiting (a wake-up counts even if it came before).
    pub(crate) async fn direct_ready(&self) {
        self.direct_ready.notified().await
    }

    /// Moves every queued direct message to `out`.
    pub(crate) fn take_direct(&self, out: &mut Vec<DirectMessage>) {
        // Consume a pending wake-up first, then take the queue: a message offered after this
        // point stores a new wake-up, so none is ever left behind without one, and the task does
        // not wake up again for messages it already took.
        let _ = self.direct_ready.notified().now_or_never();
        let mut direct = lock(&self.direct);
        out.extend(direct.queue.drain(..));
        // A burst grew the queue: give the memory back rather than keep it for every session
        // that once had one (a few messages' worth stays, the usual reply at a time).
        if direct.queue.capacity() > KEPT_QUEUE_CAPACITY {
            direct.queue = VecDeque::new();
        }
    }

    /// The session is ending: refuse direct deliveries and drop what waits.
    fn close_direct(&self) {
        let mut direct = lock(&self.direct);
        direct.open = false;
        direct.grants = Vec::new();
        direct.queue = VecDeque::new();
    }

    fn set_reason(&self, reason: DisconnectReason) {
        lock(&self.reason).get_or_insert(reason);
    }

    pub(crate) fn reason(&self) -> Option<DisconnectReason> {
        *lock(&self.reason)
    }

    /// Resolves once [`retire`](Self::retire) or [`forget_link`](Self::forget_link) was called
    /// (a call made before waiting counts).
    pub(crate) async fn stopped(&self) {
        self.stop.notified().await
    }

    pub(crate) fn set_online(&self) {
        self.online.store(true, Ordering::Release);
    }

    pub(crate) fn is_online(&self) -> bool {
        self.online.load(Ordering::Acquire)
    }

    pub(crate) fn set_done(&self) {
        self.phase.send_replace(Phase::Done);
    }

    /// Waits until this session reached `phase` (or its task vanished).
    pub(crate) async fn wait_phase(&self, phase: Phase) {
        let mut rx = self.phase.subscribe();
        // An error means the sender is gone, i.e. the task is gone: nothing left to wait for.
        let _ = rx.wait_for(|p| *p >= phase).await;
    }
}

fn disconnect() -> Packet {
    Packet::Disconnect(
        Disconnect {
            reason_code: DisconnectReasonCode::NormalDisconnection,
        },
        None,
    )
}

/// Locks a mutex, ignoring poisoning: every critical section here leaves the state consistent
/// (a single assignment or a send), so a panic elsewhere must not take the broker down.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
