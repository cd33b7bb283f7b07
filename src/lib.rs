//! fleetgate: an MQTT gateway for device fleets.
//!
//! # Layout
//!
//! - [`broker`]: our acceptor (TCP/TLS, Link CONNECT auth, topic ACL) in front of rumqttd's router.
//! - [`registry`]: the only owner of device state (DashMap), rebuilt from [`store`] at start.
//! - [`store`]: durable persistence (SQLite WAL), one writer thread, batched transactions.
//! - [`ingest`]: turns device traffic into registry changes and replies.
//! - [`command`]: cloud-to-device commands (publish, broadcast, property set, service calls,
//!   RRPC) and the latest-properties snapshots.
//! - [`migration`]: instance migration tasks (canary, full, pause, rollback, data sync).
//! - [`forwarder`]: AMQP forwarding to RabbitMQ consumer groups through a durable outbox.
//! - [`ota`]: firmware packages (content-addressed blobs, signed downloads) and upgrade jobs.
//! - [`export`]: export/import jobs (ZIP packages with checksums, encrypted secrets).
//! - [`api`]: the operator HTTP API (axum).
//! - [`app`]: [`app::Application`] wires everything together; `main.rs` only parses the CLI.
//! - [`config`]: settings tree (defaults, TOML file, `FLEETGATE_…` env vars, flags).
//! - [`installation`]: what differs between installations (the default AMQP exchange prefix).
//! - [`listen`]: binding the listeners; a taken default port falls back to the next free one.
//! - [`metrics`]: Prometheus metrics shared by every component.
//! - [`proxy_protocol`]: PROXY headers (v1, v2) naming the real client behind a balancer.
//! - [`admission`]: connection budgets from the open-files limit, per-source caps on
//!   unauthenticated sockets (used by the MQTT and HTTP accept loops).

pub mod admission;
pub mod api;
pub mod app;
pub mod broker;
pub mod clock;
pub mod cluster;
pub mod command;
pub mod config;
pub mod console;
pub mod export;
pub mod forwarder;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod ingest;
pub mod installation;
pub mod listen;
pub mod metrics;
pub mod migration;
pub mod ota;
pub mod proxy_protocol;
pub mod registry;
pub mod schema;
pub mod store;
pub mod telemetry;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
