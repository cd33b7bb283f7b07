//! Commands for devices held by another node (cluster mode): what travels over NATS
//! (`Cluster::command`), the handler that carries them out on the holder, and the lookup of a
//! call's record on the other nodes.

use super::*;

/// A command for a device held by another node (the body of a `Cluster::command`).
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(super) enum RemoteCommand {
    Publish {
        topic: String,
        payload: Vec<u8>,
        qos1: bool,
    },
    Service {
        identifier: String,
        params: Value,
        wait_ms: Option<u64>,
    },
    Rrpc {
        payload: Vec<u8>,
        wait_ms: u64,
    },
    /// The record of a call this node made (asked of every node on a local miss).
    Record {
        id: String,
    },
}

/// The holder's answer to a [`RemoteCommand`].
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub(super) enum RemoteAnswer {
    Sent {
        sent: Sent,
    },
    Record {
        record: CommandRecord,
    },
    Rrpc {
        message_id: String,
        payload: Vec<u8>,
        elapsed_ms: u64,
    },
    Failed {
        error: RemoteError,
    },
}

/// A [`CommandError`] as it travels between nodes.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "error", rename_all = "snake_case")]
pub(super) enum RemoteError {
    Offline,
    Disabled,
    Timeout { timeout_ms: u64 },
    Busy,
    NotFound { id: String },
    Other { message: String },
}

impl RemoteError {
    fn from_error(e: &CommandError) -> Self {
        match e {
            CommandError::Offline { .. } | CommandError::OfflineQueueFull { .. } => {
                RemoteError::Offline
            }
            CommandError::Timeout { timeout_ms } => RemoteError::Timeout {
                timeout_ms: *timeout_ms,
            },
            CommandError::Disabled { .. } => RemoteError::Disabled,
            CommandError::Busy => RemoteError::Busy,
            CommandError::NotFound { id } => RemoteError::NotFound { id: id.clone() },
            other => RemoteError::Other {
                message: other.to_string(),
            },
        }
    }

    fn into_error(self, device: &DeviceKey) -> CommandError {
        match self {
            RemoteError::Offline => CommandError::Offline {
                product_key: device.product_key.clone(),
                device_name: device.device_name.clone(),
            },
            RemoteError::Disabled => CommandError::Disabled {
                product_key: device.product_key.clone(),
                device_name: device.device_name.clone(),
            },
            RemoteError::Timeout { timeout_ms } => CommandError::Timeout { timeout_ms },
            RemoteError::Busy => CommandError::Busy,
            RemoteError::NotFound { id } => CommandError::NotFound { id },
            RemoteError::Other { message } => CommandError::Broker(message),
        }
    }
}

pub(super) fn unexpected() -> CommandError {
    CommandError::Broker("unexpected answer".into())
}

/// The cluster's [`CommandHandler`]: commands from other nodes, run here.
pub(super) struct RemoteCommands(Weak<Commands>);

impl CommandHandler for RemoteCommands {
    fn handle(
        &self,
        device: DeviceKey,
        body: Vec<u8>,
    ) -> futures_util::future::BoxFuture<'static, Vec<u8>> {
        let commands = self.0.clone();
        Box::pin(async move {
            let answer = match (commands.upgrade(), serde_json::from_slice(&body)) {
                (Some(commands), Ok(command)) => commands.execute(device, command).await,
                (None, _) => RemoteAnswer::Failed {
                    error: RemoteError::Other {
                        message: "the node is shutting down".into(),
                    },
                },
                (_, Err(e)) => RemoteAnswer::Failed {
                    error: RemoteError::Other {
                        message: format!("unreadable command: {e}"),
                    },
                },
            };
            serde_json::to_vec(&answer).unwrap_or_default()
        })
    }
}

impl Commands {
    /// Runs `command` on the node holding `device` (cluster mode) and returns its answer.
    pub(super) async fn remote(
        &self,
        device: &DeviceKey,
        command: &RemoteCommand,
        wait: Duration,
    ) -> Result<RemoteAnswer, CommandError> {
        let offline = || CommandError::Offline {
            product_key: device.product_key.clone(),
            device_name: device.device_name.clone(),
        };
        let Some(cluster) = self.cluster.get() else {
            return Err(offline());
        };
        let body = serde_json::to_vec(command).unwrap_or_default();
        // The holder waits up to `wait` for the device; its answer needs a moment more.
        let answer = cluster
            .command(device, body, wait + REMOTE_MARGIN)
            .await
            .map_err(|e| CommandError::Broker(e.to_string()))?;
        let Some(answer) = answer else {
            return Err(offline());
        };
        match serde_json::from_slice::<RemoteAnswer>(&answer) {
            Ok(RemoteAnswer::Failed { error }) => Err(error.into_error(device)),
            Ok(answer) => Ok(answer),
            Err(_) => Err(CommandError::Broker(
                "the node holding the device gave no usable answer".into(),
            )),
        }
    }

    /// Makes this node carry out commands other nodes send for devices it holds.
    pub fn attach_cluster(self: &Arc<Self>, cluster: Arc<Cluster>) {
        cluster.set_command_handler(Arc::new(RemoteCommands(Arc::downgrade(self))));
        let _ = self.cluster.set(cluster);
    }

    /// Carries out a command another node sent (only for a session held here).
    pub(super) async fn execute(&self, device: DeviceKey, command: RemoteCommand) -> RemoteAnswer {
        let (pk, dn) = (&device.product_key, &device.device_name);
        let result = match command {
            RemoteCommand::Publish {
                topic,
                payload,
                qos1,
            } => {
                let message = Message {
                    topic,
                    payload: payload.into(),
                    qos: if qos1 {
                        Qos::AtLeastOnce
                    } else {
                        Qos::AtMostOnce
                    },
                };
                self.publish_at(pk, dn, message, true)
                    .await
                    .map(|sent| RemoteAnswer::Sent { sent })
            }
            RemoteCommand::Service {
                identifier,
                params,
                wait_ms,
            } => self
                .call_service_at(
                    pk,
                    dn,
                    &identifier,
                    params,
                    wait_ms.map(Duration::from_millis),
                    true,
                )
                .await
                .map(|record| RemoteAnswer::Record { record }),
            RemoteCommand::Rrpc { payload, wait_ms } => self
                .rrpc_at(pk, dn, payload.into(), Duration::from_millis(wait_ms), true)
                .await
                .map(|a| RemoteAnswer::Rrpc {
                    message_id: a.message_id,
                    payload: a.payload.to_vec(),
                    elapsed_ms: a.elapsed_ms,
                }),
            RemoteCommand::Record { id } => self
                .records
                .get(pk, dn, &id)
                .map(|record| RemoteAnswer::Record { record })
                .ok_or(CommandError::NotFound { id }),
        };
        result.unwrap_or_else(|e| RemoteAnswer::Failed {
            error: RemoteError::from_error(&e),
        })
    }

    /// Asks every other live node for the record at once; the first that has it answers.
    pub(super) async fn record_elsewhere(
        &self,
        cluster: &Cluster,
        pk: &str,
        dn: &str,
        id: &str,
    ) -> Option<CommandRecord> {
        let device = DeviceKey {
            product_key: pk.to_owned(),
            device_name: dn.to_owned(),
        };
        let body =
            serde_json::to_vec(&RemoteCommand::Record { id: id.to_owned() }).unwrap_or_default();
        let asks = cluster
            .members()
            .into_iter()
            .map(|m| m.node)
            .filter(|&node| node != cluster.node())
            .map(|node| cluster.command_on(node, &device, body.clone(), RECORD_WAIT));
        let answers = futures_util::future::join_all(asks).await;
        answers.into_iter().find_map(|answer| match answer {
            Ok(Some(body)) => match serde_json::from_slice::<RemoteAnswer>(&body) {
                Ok(RemoteAnswer::Record { record }) => Some(record),
                _ => None,
            },
            // A node that is gone took its records with it (they are in memory).
            Ok(None) | Err(_) => None,
        })
    }
}
