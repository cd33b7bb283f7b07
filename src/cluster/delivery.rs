//! Node-directed messages: a downlink ([`Cluster::deliver`]) or a command
//! ([`Cluster::command`]) for a device held by another node goes to that node's subject
//! `fg.{name}.node.{id}`, and this node serves the same subject for the devices it holds. The
//! registry's sessions are the directory; "no responders" or "not here" means the device is
//! offline.

use super::{epoch, Cluster, ClusterError};
use crate::broker::{DeviceKey, Downlink};
use crate::registry::Registry;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// A message for a device held by another node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Delivery {
    pub product_key: String,
    pub device_name: String,
    #[serde(flatten)]
    pub message: DeliveryKind,
}

/// What a [`Delivery`] carries: the kinds of node-directed messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(crate) enum DeliveryKind {
    /// A message to publish to the device; answered with [`Delivered`].
    Publish {
        topic: String,
        payload: Vec<u8>,
        /// QoS 1 through the router (kept for a persistent session), else QoS 0.
        qos1: bool,
    },
    /// A command the holder carries out itself (cloud-to-device calls that wait for the
    /// device's answer): an opaque body for the holder's [`CommandHandler`], answered with
    /// the body it returns.
    Command { body: Vec<u8> },
}

/// Carries out [`Cluster::command`]s for devices this node holds (the app installs
/// `command::Commands`). Bodies are the handler's own; the cluster only transports them.
pub trait CommandHandler: Send + Sync + 'static {
    fn handle(
        &self,
        device: DeviceKey,
        body: Vec<u8>,
    ) -> futures_util::future::BoxFuture<'static, Vec<u8>>;
}

/// Where [`Cluster::deliver`] left a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Delivered {
    /// Handed to the session of the node that holds the device.
    Sent { node: u16 },
    /// No node holds the device.
    Offline,
}

impl Cluster {
    /// Sends a message to a device through the node that holds it. A device held here is
    /// served by the local downlink.
    pub async fn deliver(
        &self,
        device: &DeviceKey,
        topic: String,
        payload: Bytes,
        qos1: bool,
    ) -> Result<Delivered, ClusterError> {
        let Some(attached) = self.attached.get() else {
            return Ok(Delivered::Offline);
        };
        let Some(epoch) = attached
            .registry
            .session_of(&device.product_key, &device.device_name)
        else {
            return Ok(Delivered::Offline);
        };
        let node = epoch::node_of(epoch);
        if node == self.node {
            return Ok(deliver_here(
                self.node,
                &attached.downlink,
                device,
                topic,
                payload,
                qos1,
            ));
        }
        let delivery = Delivery {
            product_key: device.product_key.clone(),
            device_name: device.device_name.clone(),
            message: DeliveryKind::Publish {
                topic,
                payload: payload.to_vec(),
                qos1,
            },
        };
        let body = serde_json::to_vec(&delivery).unwrap_or_default();
        match self
            .client
            .request(self.subjects.node(node), body.into())
            .await
        {
            Ok(reply) => Ok(serde_json::from_slice(&reply.payload).unwrap_or(Delivered::Offline)),
            Err(e) if e.kind() == async_nats::client::RequestErrorKind::NoResponders => {
                Ok(Delivered::Offline)
            }
            Err(e) => Err(ClusterError::Nats(e.to_string())),
        }
    }

    /// Installs what carries out [`Cluster::command`]s sent to this node (once).
    pub fn set_command_handler(&self, handler: Arc<dyn CommandHandler>) {
        let _ = self.commands.set(handler);
    }

    /// Sends a command body to the node that holds `device` and returns that node's answer,
    /// waiting at most `timeout`. `Ok(None)`: no other node holds the device (a device held
    /// here is the caller's to serve). See [`Cluster::command_on`].
    pub async fn command(
        &self,
        device: &DeviceKey,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Option<Vec<u8>>, ClusterError> {
        let Some(attached) = self.attached.get() else {
            return Ok(None);
        };
        let Some(epoch) = attached
            .registry
            .session_of(&device.product_key, &device.device_name)
        else {
            return Ok(None);
        };
        let node = epoch::node_of(epoch);
        if node == self.node {
            return Ok(None);
        }
        self.command_on(node, device, body, timeout).await
    }

    /// Sends a command body about `device` to node `node`, whether or not it holds the device
    /// (e.g. to read what it keeps about the device), and returns its answer, waiting at most
    /// `timeout`. `Ok(None)`: the node is not there.
    pub async fn command_on(
        &self,
        node: u16,
        device: &DeviceKey,
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<Option<Vec<u8>>, ClusterError> {
        let delivery = Delivery {
            product_key: device.product_key.clone(),
            device_name: device.device_name.clone(),
            message: DeliveryKind::Command { body },
        };
        let request = async_nats::Request::new()
            .payload(serde_json::to_vec(&delivery).unwrap_or_default().into())
            .timeout(Some(timeout));
        match self
            .client
            .send_request(self.subjects.node(node), request)
            .await
        {
            Ok(reply) => Ok(Some(reply.payload.to_vec())),
            Err(e) if e.kind() == async_nats::client::RequestErrorKind::NoResponders => Ok(None),
            Err(e) => Err(ClusterError::Nats(e.to_string())),
        }
    }

    /// Serves `fg.{name}.node.{id}`: messages for devices this node holds.
    pub(super) async fn serve_deliveries(
        self: Arc<Self>,
        mut requests: async_nats::Subscriber,
        _registry: Arc<Registry>,
        downlink: Downlink,
    ) {
        use futures_util::StreamExt;
        while let Some(request) = requests.next().await {
            let Some(reply) = request.reply.clone() else {
                continue;
            };
            let outcome = match serde_json::from_slice::<Delivery>(&request.payload) {
                Ok(d) => {
                    let device = DeviceKey {
                        product_key: d.product_key,
                        device_name: d.device_name,
                    };
                    match d.message {
                        DeliveryKind::Publish {
                            topic,
                            payload,
                            qos1,
                        } => {
                            deliver_here(self.node, &downlink, &device, topic, payload.into(), qos1)
                        }
                        DeliveryKind::Command { body } => {
                            // Off the loop: a command may wait seconds for the device.
                            if let Some(handler) = self.commands.get() {
                                let answer = handler.handle(device, body);
                                let client = self.client.clone();
                                tokio::spawn(async move {
                                    let _ = client.publish(reply, answer.await.into()).await;
                                });
                            } else {
                                // An empty answer: the caller reports it instead of waiting.
                                let _ = self.client.publish(reply, Bytes::new()).await;
                            }
                            continue;
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "malformed delivery request");
                    Delivered::Offline
                }
            };
            let body = serde_json::to_vec(&outcome).unwrap_or_default();
            let _ = self.client.publish(reply, body.into()).await;
        }
    }
}

/// Hands a message to a session of this node.
fn deliver_here(
    node: u16,
    downlink: &Downlink,
    device: &DeviceKey,
    topic: String,
    payload: Bytes,
    qos1: bool,
) -> Delivered {
    if !downlink.is_connected(device) {
        return Delivered::Offline;
    }
    let sent = if qos1 {
        downlink.publish(topic, payload).is_ok()
    } else {
        downlink.publish_qos0(topic, payload).is_ok()
    };
    if sent {
        Delivered::Sent { node }
    } else {
        Delivered::Offline
    }
}
