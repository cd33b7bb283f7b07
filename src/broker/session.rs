//! The live-session table entry: how other tasks (takeover, kick, shutdown) end a session safely.
//!
//! The hard rule comes from rumqttd: a connection id is reused by the router as soon as it
//! dropped a link, so a `LinkTx` must never be used after its link was disconnected — a late
//! DISCONNECT would end whichever client got the id next. Hence the `LinkTx` lives in
//! [`SessionHandle::link`] behind a mutex, and *retiring* a session takes it out and sends the
//! router a DISCONNECT in one step: from then on nobody can send on the old id. A retirement
//! done by another task (takeover, kick) is synchronous, so a replacement link is registered
//! strictly after the old one's DISCONNECT in the router's FIFO channel.

use super::DisconnectReason;
use futures_util::FutureExt;
use rumqttd::local::LinkTx;
use rumqttd::protocol::{Disconnect, DisconnectReasonCode, Packet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use tokio::sync::{watch, Notify};

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

/// One entry of the session table (`DeviceKey` → live session).
pub(crate) struct SessionHandle {
    pub conn_id: u64,
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
    pub(crate) fn new(conn_id: u64) -> SessionHandle {
        SessionHandle {
            conn_id,
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
        *lock(&self.link) = LinkState::Retired;
        self.stop.notify_one();
    }

    /// Ends the session from anywhere: records the reason (first one wins), disconnects the
    /// router link right now and wakes the connection task, which closes the socket and calls
    /// `on_disconnect`.
    pub(crate) fn retire(&self, reason: DisconnectReason) {
        self.set_reason(reason);
        let previous = std::mem::replace(&mut *lock(&self.link), LinkState::Retired);
        if let LinkState::Live(mut tx) = previous {
            send_now(&mut tx, vec![disconnect()]);
        }
        self.stop.notify_one();
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
