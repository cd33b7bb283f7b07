//! Calls that expect an answer — service calls (the property set being the service
//! `property/set`) and RRPC — and the device answers that complete them: correlation by request
//! id or `messageId`, the synchronous wait, and the call records.

use super::*;

/// Which correlation an answer belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum Channel {
    /// Property set and service calls: the request `id`.
    Service(String),
    /// RRPC: the topic's `messageId`.
    Rrpc(String),
}

pub(super) type Waiters = DashMap<(DeviceKey, Channel), oneshot::Sender<Answer>>;

/// A device's answer.
#[derive(Debug)]
pub(super) enum Answer {
    /// A service answer; it is in the call's record.
    Replied,
    Rrpc(Bytes),
}

impl Commands {
    /// Calls service `identifier` ([`proto::PROPERTY_SET`] for a property set) with `params`.
    /// With `wait`, waits that long for the device's answer; without, returns once sent (the
    /// answer lands in the record later).
    pub async fn call_service(
        &self,
        pk: &str,
        dn: &str,
        identifier: &str,
        params: Value,
        wait: Option<Duration>,
    ) -> Result<CommandRecord, CommandError> {
        self.call_service_at(pk, dn, identifier, params, wait, false)
            .await
    }

    pub(super) async fn call_service_at(
        &self,
        pk: &str,
        dn: &str,
        identifier: &str,
        params: Value,
        wait: Option<Duration>,
        local_only: bool,
    ) -> Result<CommandRecord, CommandError> {
        let kind = if identifier == proto::PROPERTY_SET {
            DownlinkKind::PropertySet
        } else {
            DownlinkKind::Service
        };
        if kind == DownlinkKind::Service && !proto::valid_identifier(identifier) {
            return Err(CommandError::Invalid {
                field: "identifier",
                message: "1-64 characters of A-Z a-z 0-9 _ -".into(),
            });
        }
        if !params.is_object() {
            return Err(CommandError::Invalid {
                field: "params",
                message: "must be a JSON object".into(),
            });
        }
        let device = match self.locate(pk, dn, kind, local_only)? {
            Route::Here(device) => device,
            Route::Remote(device) => {
                let command = RemoteCommand::Service {
                    identifier: identifier.to_owned(),
                    params,
                    wait_ms: wait.map(|w| w.as_millis() as u64),
                };
                let wait = wait.unwrap_or_default();
                return match self.remote(&device, &command, wait).await? {
                    RemoteAnswer::Record { record } => Ok(record),
                    _ => Err(unexpected()),
                };
            }
        };
        let id = self.new_id();
        let topic = proto::service_topic(pk, dn, identifier);
        let payload = ServiceRequest::new(&id, identifier, &params).to_vec();
        let record = CommandRecord::new(&id, pk, dn, kind, identifier, &topic, params, now_ms());
        self.records.insert(record.clone());
        let key = (device, Channel::Service(id.clone()));
        let answer = self
            .exchange(
                key,
                kind,
                Message {
                    topic,
                    payload: payload.into(),
                    qos: Qos::AtMostOnce,
                },
                wait,
            )
            .await;
        match answer {
            Ok(None) => Ok(record),
            // The record was updated by `on_answer` already.
            Ok(Some(_)) => Ok(self.records.get(pk, dn, &id).unwrap_or(record)),
            Err(e) => {
                if matches!(e, CommandError::Timeout { .. }) {
                    self.records.time_out(pk, dn, &id, now_ms());
                }
                Err(e)
            }
        }
    }

    /// Sends an RRPC request and waits up to `wait` for the device's response.
    pub async fn rrpc(
        &self,
        pk: &str,
        dn: &str,
        payload: Bytes,
        wait: Duration,
    ) -> Result<RrpcAnswer, CommandError> {
        self.rrpc_at(pk, dn, payload, wait, false).await
    }

    pub(super) async fn rrpc_at(
        &self,
        pk: &str,
        dn: &str,
        payload: Bytes,
        wait: Duration,
        local_only: bool,
    ) -> Result<RrpcAnswer, CommandError> {
        let kind = DownlinkKind::Rrpc;
        let device = match self.locate(pk, dn, kind, local_only)? {
            Route::Here(device) => device,
            Route::Remote(device) => {
                let command = RemoteCommand::Rrpc {
                    payload: payload.to_vec(),
                    wait_ms: wait.as_millis() as u64,
                };
                return match self.remote(&device, &command, wait).await? {
                    RemoteAnswer::Rrpc {
                        message_id,
                        payload,
                        elapsed_ms,
                    } => Ok(RrpcAnswer {
                        message_id,
                        payload: payload.into(),
                        elapsed_ms,
                    }),
                    _ => Err(unexpected()),
                };
            }
        };
        let message_id = self.new_id();
        let started = Instant::now();
        let key = (device, Channel::Rrpc(message_id.clone()));
        let message = Message {
            topic: proto::rrpc_request_topic(pk, dn, &message_id),
            payload,
            qos: Qos::AtMostOnce,
        };
        match self.exchange(key, kind, message, Some(wait)).await? {
            Some(Answer::Rrpc(payload)) => Ok(RrpcAnswer {
                message_id,
                payload,
                elapsed_ms: started.elapsed().as_millis() as u64,
            }),
            // Only RRPC responses are sent on an RRPC channel.
            _ => Err(unexpected()),
        }
    }

    /// Sends `message`, then (with `wait`) waits for the answer on `key`.
    async fn exchange(
        &self,
        key: (DeviceKey, Channel),
        kind: DownlinkKind,
        message: Message,
        wait: Option<Duration>,
    ) -> Result<Option<Answer>, CommandError> {
        let Some(wait) = wait else {
            self.send(message, kind)?;
            self.count(kind, "delivered");
            return Ok(None);
        };
        let started = Instant::now();
        let (tx, rx) = oneshot::channel();
        // Registered before sending: a fast device may answer before `send` returns.
        self.waiters.insert(key.clone(), tx);
        if let Err(e) = self.send(message, kind) {
            self.waiters.remove(&key);
            return Err(e);
        }
        let answer = tokio::time::timeout(wait, rx).await;
        self.metrics
            .sync_call_seconds
            .get_or_create(&[("kind", kind.as_str())])
            .observe(started.elapsed().as_secs_f64());
        match answer {
            Ok(Ok(answer)) => {
                self.count(kind, "replied");
                Ok(Some(answer))
            }
            // Timed out, or the waiter was dropped (cannot happen while `key` is ours).
            _ => {
                self.waiters.remove(&key);
                self.count(kind, "timed_out");
                Err(CommandError::Timeout {
                    timeout_ms: wait.as_millis() as u64,
                })
            }
        }
    }

    /// The record of a service call or property set of the device. In cluster mode a record
    /// this node does not have is asked of the other nodes (the node that held the device when
    /// the call was made keeps it).
    pub async fn record(
        &self,
        pk: &str,
        dn: &str,
        id: &str,
    ) -> Result<CommandRecord, CommandError> {
        self.registry.get_device(pk, dn)?;
        if let Some(record) = self.records.get(pk, dn, id) {
            return Ok(record);
        }
        let elsewhere = match self.cluster.get() {
            Some(cluster) => self.record_elsewhere(cluster, pk, dn, id).await,
            None => None,
        };
        elsewhere.ok_or_else(|| CommandError::NotFound { id: id.to_owned() })
    }

    /// An answer topic published by `device` (ingest checked it is the session's own). Answers
    /// that match no command (unknown id, late RRPC response, unreadable reply) are counted in
    /// `fleetgate_downlink_answers_dropped_total` and dropped.
    pub fn on_answer(&self, device: &DeviceKey, answer: &DeviceAnswer<'_>, payload: &[u8]) {
        let received = now_ms();
        if let DeviceAnswer::RrpcResponse { message_id, .. } = answer {
            let key = (device.clone(), Channel::Rrpc((*message_id).to_owned()));
            match self.waiters.remove(&key) {
                Some((_, tx)) => {
                    let _ = tx.send(Answer::Rrpc(Bytes::copy_from_slice(payload)));
                }
                None => self.unmatched("rrpc"),
            }
            return;
        }
        let Ok(reply) = Reply::parse(payload) else {
            self.unmatched("malformed");
            return;
        };
        let (pk, dn) = (&device.product_key, &device.device_name);
        let Some(record) = self.records.answer(pk, dn, &reply, received) else {
            self.unmatched("unknown_id");
            return;
        };
        if let Some(fwd) = &self.forwarder {
            fwd.enqueue_detached(ForwardMessage::downlink_reply(
                pk,
                dn,
                &record.topic,
                &reply,
                received,
            ));
        }
        let key = (device.clone(), Channel::Service(reply.id.clone()));
        if let Some((_, tx)) = self.waiters.remove(&key) {
            let _ = tx.send(Answer::Replied);
        }
    }

    fn unmatched(&self, reason: &'static str) {
        self.metrics
            .downlink_answers_dropped
            .get_or_create(&[("reason", reason)])
            .inc();
    }
}
