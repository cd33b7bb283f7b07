//! A forwarder's surroundings against the test RabbitMQ: the broker ([`rabbit`]), a registry
//! with one instance, one product and its devices and unique names ([`Fixture`]), and
//! [`eventually`]. Used by the forwarder's tests and by its benchmark.

use crate::config::Secret;
use crate::forwarder::{AmqpSettings, ForwardMessage, Forwarder, ForwarderConfig};
use crate::metrics::Metrics;
use crate::registry::{NewDevice, NewInstance, NewProduct, Registry};
use crate::store::Store;
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::{Connection, ConnectionProperties};
use rand::Rng;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Generous bound for anything that should happen "soon" (only to avoid hanging).
pub const PATIENCE: Duration = Duration::from_secs(60);

pub struct Rabbit {
    pub url: String,
    pub conn: Connection,
    pub addr: SocketAddr,
}

impl Rabbit {
    /// The broker's URL with host and port replaced (to go through a [`Proxy`](super::Proxy)).
    pub fn url_via(&self, addr: SocketAddr) -> String {
        super::url_via(&self.url, addr)
    }
}

/// Connects to the test broker; fails the test when it is missing (see
/// [`super::test_amqp_url`]).
pub async fn rabbit(test: &str) -> Rabbit {
    let url = super::test_amqp_url(test).await;
    let conn = Connection::connect(&url, ConnectionProperties::default())
        .await
        .expect("connect");
    let addr = super::broker_addr(&url).await;
    Rabbit { url, conn, addr }
}

/// Polls `f` until it holds; panics after [`PATIENCE`] (only to avoid hanging).
pub async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A registry with one instance, one product and `devices` devices, plus unique names.
pub struct Fixture {
    pub rabbit: Rabbit,
    pub dir: tempfile::TempDir,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub iid: String,
    pub pk: String,
    pub devices: Vec<String>,
    pub prefix: String,
}

impl Fixture {
    pub async fn new(rabbit: Rabbit, devices: usize) -> Fixture {
        let suffix: String = rand::thread_rng()
            .sample_iter(&rand::distributions::Alphanumeric)
            .take(8)
            .map(char::from)
            .collect::<String>()
            .to_lowercase();
        let metrics = Arc::new(Metrics::new());
        let store = Store::open_in_memory(metrics.clone()).unwrap();
        let registry = Registry::open(store, metrics.clone()).unwrap();
        let iid = format!("inst-{suffix}");
        registry
            .create_instance(NewInstance {
                instance_id: Some(iid.clone()),
                name: "test".into(),
            })
            .await
            .unwrap();
        let pk = format!("pk{suffix}");
        registry
            .create_product(NewProduct {
                name: "P".into(),
                product_key: Some(pk.clone()),
                instance_id: Some(iid.clone()),
                description: None,
            })
            .await
            .unwrap();
        let mut names = Vec::new();
        for i in 0..devices {
            let dn = format!("dev{i:04}");
            registry
                .create_device(
                    &pk,
                    NewDevice {
                        device_name: dn.clone(),
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
            names.push(dn);
        }
        Fixture {
            rabbit,
            dir: tempfile::tempdir().unwrap(),
            registry,
            metrics,
            iid,
            pk,
            devices: names,
            prefix: format!("fgtest-{suffix}"),
        }
    }

    pub fn settings(&self, url: &str) -> AmqpSettings {
        AmqpSettings {
            url: Some(Secret::new(url)),
            exchange_prefix: self.prefix.clone(),
            reconnect_initial_ms: 50,
            reconnect_max_ms: 500,
            stats_interval_secs: 1,
            ..Default::default()
        }
    }

    pub fn config(&self, url: &str) -> ForwarderConfig {
        ForwarderConfig::new(self.settings(url)).expect("valid test settings")
    }

    pub fn open(&self, url: &str) -> Arc<Forwarder> {
        Forwarder::open(
            self.config(url),
            self.dir.path(),
            self.registry.store().clone(),
            self.registry.clone(),
            self.metrics.clone(),
        )
        .unwrap()
    }

    pub fn queue(&self, gid: &str) -> String {
        format!("{}.{}.{gid}", self.prefix, self.iid)
    }

    /// A property post from device `d` whose `requestId` is `i`.
    pub fn post(&self, d: usize, i: usize) -> ForwardMessage {
        let req = fleetgate_topics::PropertyPostRequest::parse(
            format!(r#"{{"id":"{i}","params":{{"Seq":{i}}}}}"#).as_bytes(),
        )
        .unwrap();
        ForwardMessage::property_post(
            &self.pk,
            &self.devices[d],
            &req,
            1_700_000_000_000 + i as i64,
        )
    }

    /// Deletes the test's queues and exchange.
    pub async fn cleanup(&self, groups: &[&str]) {
        let ch = self.rabbit.conn.create_channel().await.unwrap();
        for g in groups {
            let _ = ch
                .queue_delete(self.queue(g).into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = ch
            .exchange_delete(
                format!("{}.{}", self.prefix, self.iid).into(),
                ExchangeDeleteOptions::default(),
            )
            .await;
    }
}
