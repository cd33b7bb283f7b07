//! Stock rumqttd 0.20 as a separate process, for the comparison rows of the benchmark.
//!
//! The configuration is the one rumqttd ships (`rumqttd.toml`: 1 ms `next_connection_delay_ms`,
//! 100 MB × 10 segments, 200 outgoing packets, 100 in flight, 20 KB payloads) with two changes:
//! `max_connections` is raised so the connection curve can go past its 10,010, and there is
//! only one plain v4 listener (no v5, no console, no Prometheus exporter). No authentication.
//!
//! Usage: `stock-rumqttd --listen 127.0.0.1:PORT [--max-connections N]
//! [--next-connection-delay-ms MS]`. rumqttd cannot listen on port 0 and report the port, so the
//! caller picks a free port and polls it until it accepts.

use clap::Parser;
use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};
use std::collections::HashMap;
use std::net::SocketAddr;

#[derive(Parser)]
#[command(
    name = "stock-rumqttd",
    about = "Stock rumqttd 0.20 on one v4 listener, no auth"
)]
struct Args {
    /// Listen address (a concrete port: rumqttd does not report a port-0 listener's port).
    #[arg(long)]
    listen: SocketAddr,
    /// Router connection slots (the shipped config has 10,010).
    #[arg(long, default_value_t = 40_000)]
    max_connections: usize,
    /// rumqttd sleeps this long after every accept (shipped config: 1 ms).
    #[arg(long, default_value_t = 1)]
    next_connection_delay_ms: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let server = ServerSettings {
        name: "v4-1".into(),
        listen: args.listen,
        tls: None,
        next_connection_delay_ms: args.next_connection_delay_ms,
        connections: ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: 20_480,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: args.max_connections,
            max_outgoing_packet_count: 200,
            max_segment_size: 104_857_600,
            max_segment_count: 10,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("1".to_owned(), server)])),
        v5: None,
        ws: None,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: None,
    };
    // Blocks for the life of the process; the benchmark ends it with SIGTERM/SIGKILL.
    Broker::new(config).start()?;
    Ok(())
}
