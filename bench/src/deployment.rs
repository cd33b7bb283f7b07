//! The gateway(s) a benchmark part runs against: one node on SQLite or three on PostgreSQL and
//! NATS behind HAProxy, started and measured alike (the OTA campaign and the forwarding part
//! run each in the same run).

use crate::api::Api;
use crate::procs::{Bins, Server};
use anyhow::Context;
use std::path::Path;

/// What a run measures: one node or three.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deployment {
    /// One node on SQLite.
    Single,
    /// Three nodes on PostgreSQL and NATS, devices through HAProxy (`cluster::Fleet3`).
    Cluster,
}

/// The gateway(s) of one run.
pub enum Gateway {
    Single(Server),
    Cluster(crate::cluster::Fleet3),
}

impl Gateway {
    /// Starts the deployment's gateway(s) in `dir` for `devices` devices, every node with the
    /// `extra` arguments of `fleetgate serve`.
    pub async fn start(
        deployment: Deployment,
        args: &crate::Args,
        bins: &Bins,
        dir: &Path,
        devices: usize,
        extra: &[String],
    ) -> anyhow::Result<(Gateway, Api)> {
        Ok(match deployment {
            Deployment::Single => {
                let server =
                    Server::fleetgate_with(bins, &dir.join("data"), crate::TOKEN, None, extra)
                        .await?;
                let api = Api::new(server.http.context("no http")?, crate::TOKEN);
                (Gateway::Single(server), api)
            }
            Deployment::Cluster => {
                let fleet = crate::cluster::Fleet3::start(args, bins, dir, devices, extra).await?;
                let api = fleet.api().clone();
                (Gateway::Cluster(fleet), api)
            }
        })
    }

    pub fn mqtt(&self) -> Vec<std::net::SocketAddr> {
        match self {
            Gateway::Single(s) => vec![s.mqtt],
            Gateway::Cluster(f) => f.mqtt(),
        }
    }

    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        match self {
            Gateway::Single(s) => s.rss_kib(),
            Gateway::Cluster(f) => f.rss_kib(),
        }
    }

    /// CPU time (user + system) of every gateway process so far, seconds.
    pub fn cpu_s(&self) -> anyhow::Result<f64> {
        match self {
            Gateway::Single(s) => s.cpu_s(),
            Gateway::Cluster(f) => f.cpu_s(),
        }
    }

    pub fn warnings(&self) -> u64 {
        match self {
            Gateway::Single(s) => s.log.warnings.load(std::sync::atomic::Ordering::Relaxed),
            Gateway::Cluster(f) => f.warnings(),
        }
    }

    /// PostgreSQL (transactions committed, rows written) so far; `None` on one node.
    pub async fn pg_counters(&self) -> anyhow::Result<Option<(i64, i64)>> {
        match self {
            Gateway::Single(_) => Ok(None),
            Gateway::Cluster(f) => f.pg_counters().await.map(Some),
        }
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        match self {
            Gateway::Single(s) => s.stop().await,
            Gateway::Cluster(f) => f.stop().await,
        }
    }
}
