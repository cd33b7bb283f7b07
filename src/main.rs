//! The `fleetgate` binary: parse the command line, set up logging, start the application.
//! Everything else lives in the library.

use anyhow::Context;
use clap::{Parser, Subcommand};
use fleetgate::app::Application;
use fleetgate::config::{Overrides, Settings};
use fleetgate::proxy_protocol::{ProxyMode, TrustedNet};
use fleetgate_topics::sign::{LinkClientId, LinkCredentials, SignMethod};
use std::net::SocketAddr;
use std::path::PathBuf;

/// jemalloc returns the pages of freed memory and never touches the untouched parts of the large
/// per-connection buffers rumqttd pre-sizes; glibc does both, costing ~13 KB per connection.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read at its start-up (`_RJEM_MALLOC_CONF` in the environment still
/// overrides them). Freed dirty pages go back to the system after 1 s instead of 10 s: a
/// connect storm's handshake buffers no longer count in the RSS of the connections that stay
/// (19,900 idle devices: 390.2 instead of 398.4 MiB), and the steady ingest does not notice.
#[cfg(feature = "jemalloc")]
#[export_name = "_rjem_malloc_conf"]
pub static MALLOC_CONF: &[u8] = b"dirty_decay_ms:1000\0";

#[derive(Parser)]
#[command(
    name = "fleetgate",
    version,
    about = "MQTT device-fleet gateway (Alibaba IoT Link protocol)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (embedded broker, registry, API).
    Serve(Box<ServeArgs>),
    /// Check the settings `serve` would run with (the file, `FLEETGATE_…` variables and the
    /// same flags as `serve`) without starting anything; exits non-zero naming what is wrong.
    CheckConfig(Box<ServeArgs>),
    /// Print the MQTT CONNECT credentials (client id, username, password) of a device, as a
    /// Link SDK would compute them — handy for mosquitto_pub and other generic clients.
    DeviceCredentials {
        #[arg(long)]
        product_key: String,
        #[arg(long)]
        device_name: String,
        #[arg(long, env = "FLEETGATE_DEVICE_SECRET")]
        device_secret: String,
        /// hmacsha1, hmacsha256 or hmacmd5.
        #[arg(long, default_value = "hmacsha256")]
        sign_method: SignMethod,
        /// Add a timestamp (milliseconds) to the signed content.
        #[arg(long)]
        timestamp: bool,
        /// The client id's own part (before the first `|`; it is signed) [default
        /// `{product_key}.{device_name}`, as the Link SDKs send]. Whatever it is, the gateway
        /// keeps one connection per device: a second CONNECT as the same device ends the first.
        #[arg(long)]
        client_id: Option<String>,
        /// Print as shell variable assignments.
        #[arg(long)]
        shell: bool,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// TOML settings file (see README "Configuration").
    #[arg(long, env = "FLEETGATE_CONFIG")]
    config: Option<PathBuf>,
    /// MQTT (plain TCP) listen address [default 0.0.0.0:1883, or the next free port when 1883
    /// is taken; an address given here must be free].
    #[arg(long, env = "FLEETGATE_MQTT_LISTEN")]
    mqtt_listen: Option<SocketAddr>,
    /// MQTT over TLS listen address [default 0.0.0.0:8883 when a certificate is given].
    #[arg(long, env = "FLEETGATE_MQTT_TLS_LISTEN")]
    mqtt_tls_listen: Option<SocketAddr>,
    /// PEM certificate chain for the TLS listener.
    #[arg(long, env = "FLEETGATE_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for the TLS listener.
    #[arg(long, env = "FLEETGATE_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// HTTP API listen address [default 0.0.0.0:8080, or the next free port when 8080 is
    /// taken; an address given here must be free].
    #[arg(long, env = "FLEETGATE_HTTP_LISTEN")]
    http_listen: Option<SocketAddr>,
    /// Data directory [default ./fleetgate-data].
    #[arg(long, env = "FLEETGATE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// RabbitMQ URL; AMQP forwarding is off without it.
    #[arg(long, env = "FLEETGATE_AMQP_URL", hide_env_values = true)]
    amqp_url: Option<String>,
    /// Prefix of the AMQP exchange and queue names [default: this installation's own,
    /// `fleetgate-{8 hex digits}`, chosen on first start and kept in the store].
    #[arg(long, env = "FLEETGATE_AMQP_EXCHANGE_PREFIX")]
    amqp_exchange_prefix: Option<String>,
    /// Type of the consumer-group queues: classic, or quorum (replicated over the RabbitMQ
    /// cluster; RabbitMQ 3.10+) [default classic].
    #[arg(long, env = "FLEETGATE_AMQP_QUEUE_TYPE")]
    amqp_queue_type: Option<fleetgate::forwarder::QueueType>,
    /// Admin API token; without it one is created in the data dir on first start.
    #[arg(long, env = "FLEETGATE_API_TOKEN", hide_env_values = true)]
    api_token: Option<String>,
    /// Base URL of this gateway's HTTP side as devices reach it (firmware download links).
    #[arg(long, env = "FLEETGATE_PUBLIC_URL")]
    public_url: Option<String>,
    /// PostgreSQL URL (`postgres://user:password@host:5432/db`) of the store; without it the
    /// store is SQLite in the data dir.
    #[arg(long = "store", env = "FLEETGATE_STORE", hide_env_values = true)]
    store_url: Option<String>,
    /// Cluster mode: NATS server URL(s), comma-separated (needs a PostgreSQL `--store`;
    /// docs/CLUSTER.md).
    #[arg(long, env = "FLEETGATE_NATS_URL", hide_env_values = true)]
    nats_url: Option<String>,
    /// Cluster mode: this node's id, 1..=511, unique in the cluster.
    #[arg(long, env = "FLEETGATE_NODE_ID")]
    node_id: Option<u16>,
    /// Cluster mode: prefix of the cluster's NATS subjects [default fleetgate].
    #[arg(long, env = "FLEETGATE_CLUSTER_NAME")]
    cluster_name: Option<String>,
    /// Cluster mode: heartbeat period, ms [default 1000].
    #[arg(long, env = "FLEETGATE_CLUSTER_HEARTBEAT_MS")]
    cluster_heartbeat_ms: Option<u64>,
    /// Cluster mode: a node not heard from this long is gone, ms [default 10000].
    #[arg(long, env = "FLEETGATE_CLUSTER_NODE_TIMEOUT_MS")]
    cluster_node_timeout_ms: Option<u64>,
    /// Cluster mode: term of a lease (the engines', the outbox drain's); a dead holder is
    /// replaced after about this long, ms [default 10000].
    #[arg(long, env = "FLEETGATE_CLUSTER_LEASE_TTL_MS")]
    cluster_lease_ttl_ms: Option<u64>,
    /// Most distinct subscription filters per device [default 50].
    #[arg(long, env = "FLEETGATE_MQTT_MAX_SUBSCRIPTIONS_PER_DEVICE")]
    mqtt_max_subscriptions_per_device: Option<usize>,
    /// Most OTA modules kept per device [default 64].
    #[arg(long, env = "FLEETGATE_MQTT_MAX_MODULES_PER_DEVICE")]
    mqtt_max_modules_per_device: Option<usize>,
    /// Refuse CONNECTs whose signed timestamp is further than this from the clock, seconds
    /// [default 0 = not checked].
    #[arg(long, env = "FLEETGATE_MQTT_CONNECT_TIMESTAMP_WINDOW_SECS")]
    mqtt_connect_timestamp_window_secs: Option<u64>,
    /// Log as JSON lines instead of text (the environment variable takes true/false, 1/0,
    /// yes/no, on/off).
    #[arg(long, env = "FLEETGATE_LOG_JSON", value_parser = clap::builder::BoolishValueParser::new())]
    log_json: bool,
    #[command(flatten)]
    limits: LimitArgs,
}

/// Connection limits and timeouts (docs/SECURITY.md); each also a `[mqtt]`/`[http]` setting.
#[derive(clap::Args)]
#[command(next_help_heading = "Connection limits (docs/SECURITY.md)")]
struct LimitArgs {
    /// Open files kept for the store, outbox, listeners [default 128].
    #[arg(long, env = "FLEETGATE_OPEN_FILES_RESERVE")]
    open_files_reserve: Option<u64>,
    /// Open MQTT sockets [default: the open-files limit less the reserve and HTTP's share].
    #[arg(long, env = "FLEETGATE_MQTT_MAX_SOCKETS")]
    mqtt_max_sockets: Option<usize>,
    /// MQTT sockets without an authenticated CONNECT per source address [default 512, at most
    /// a quarter of the MQTT sockets].
    #[arg(long, env = "FLEETGATE_MQTT_MAX_UNAUTHENTICATED_PER_IP")]
    mqtt_max_unauthenticated_per_ip: Option<usize>,
    /// Sockets without a CONNECT from which on new ones get the short timeout [default: 1/8 of
    /// the MQTT sockets].
    #[arg(long, env = "FLEETGATE_MQTT_PRESSURE_UNAUTHENTICATED")]
    mqtt_pressure_unauthenticated: Option<usize>,
    /// CONNECT timeout under pre-CONNECT pressure, seconds [default 2].
    #[arg(long, env = "FLEETGATE_MQTT_CONNECT_TIMEOUT_UNDER_PRESSURE_SECS")]
    mqtt_connect_timeout_under_pressure_secs: Option<u64>,
    /// PROXY protocol from the trusted balancers: off, trusted (their sockets must send a
    /// header), required (and nobody else may connect) [default off].
    #[arg(long, env = "FLEETGATE_MQTT_PROXY_PROTOCOL")]
    mqtt_proxy_protocol: Option<ProxyMode>,
    /// Balancers allowed to send PROXY headers: addresses or CIDR networks, comma-separated.
    #[arg(long, env = "FLEETGATE_MQTT_PROXY_TRUSTED", value_delimiter = ',')]
    mqtt_proxy_trusted: Option<Vec<TrustedNet>>,
    /// Open HTTP connections [default 1024, less with a small open-files limit].
    #[arg(long, env = "FLEETGATE_HTTP_MAX_CONNECTIONS")]
    http_max_connections: Option<usize>,
    /// Open HTTP connections per source address [default 256, at most a quarter of the HTTP
    /// connections].
    #[arg(long, env = "FLEETGATE_HTTP_MAX_CONNECTIONS_PER_IP")]
    http_max_connections_per_ip: Option<usize>,
    /// Seconds for a complete request head (also the keep-alive idle timeout) [default 10].
    #[arg(long, env = "FLEETGATE_HTTP_HEADER_READ_TIMEOUT_SECS")]
    http_header_read_timeout_secs: Option<u64>,
    /// Seconds a request body may deliver nothing [default 30].
    #[arg(long, env = "FLEETGATE_HTTP_BODY_READ_TIMEOUT_SECS")]
    http_body_read_timeout_secs: Option<u64>,
    /// Seconds a response write may make no progress [default 30].
    #[arg(long, env = "FLEETGATE_HTTP_WRITE_TIMEOUT_SECS")]
    http_write_timeout_secs: Option<u64>,
    /// PROXY protocol on the HTTP listener from the trusted balancers: off, trusted (their
    /// connections must send a header), required (and nobody else may connect) [default off].
    #[arg(long, env = "FLEETGATE_HTTP_PROXY_PROTOCOL")]
    http_proxy_protocol: Option<ProxyMode>,
    /// HTTP balancers allowed to send PROXY headers: addresses or CIDR networks, comma-separated.
    #[arg(long, env = "FLEETGATE_HTTP_PROXY_TRUSTED", value_delimiter = ',')]
    http_proxy_trusted: Option<Vec<TrustedNet>>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(*args),
        Command::CheckConfig(args) => check_config(*args),
        Command::DeviceCredentials {
            product_key,
            device_name,
            device_secret,
            sign_method,
            timestamp,
            client_id,
            shell,
        } => {
            let ts = timestamp.then(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis().to_string())
                    .unwrap_or_default()
            });
            let c = match client_id {
                None => LinkCredentials::new(
                    &product_key,
                    &device_name,
                    &device_secret,
                    sign_method,
                    3,
                    ts,
                ),
                Some(id) => {
                    if id.contains('|') || id.is_empty() {
                        anyhow::bail!(
                            "--client-id must not be empty nor contain `|` (it ends the client id's own part)"
                        );
                    }
                    let id = LinkClientId {
                        client_id: id,
                        secure_mode: 3,
                        sign_method,
                        timestamp: ts,
                        auto_subscribe: false,
                    };
                    LinkCredentials {
                        client_id: id.to_client_id_string(),
                        username: format!("{device_name}&{product_key}"),
                        password: id.password(&product_key, &device_name, &device_secret),
                    }
                }
            };
            if shell {
                println!(
                    "CLIENT_ID='{}'\nUSERNAME='{}'\nPASSWORD='{}'",
                    c.client_id, c.username, c.password
                );
            } else {
                println!(
                    "client id: {}\nusername:  {}\npassword:  {}",
                    c.client_id, c.username, c.password
                );
            }
            Ok(())
        }
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    fleetgate::telemetry::init(args.log_json);
    // Before anything opens a file: the connection budgets are derived from this limit.
    match fleetgate::admission::raise_open_files_limit() {
        Ok(l) if l.now > l.before => tracing::info!(
            from = l.before,
            to = l.now,
            hard = l.hard,
            "open-files limit raised to the hard limit"
        ),
        Ok(l) => tracing::info!(limit = l.now, hard = l.hard, "open-files limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-files limit"),
    }
    let settings = load_settings(args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(async move {
        // Before the gateway starts: a stop asked for while it starts is a clean stop.
        let stop = fleetgate::app::StopSignal::install()?;
        let app = Application::build(settings).await?;
        app.run_until_stopped(stop).await
    })
}

/// `check-config`: what `serve` would load, checked as far as it can be without starting.
fn check_config(args: ServeArgs) -> anyhow::Result<()> {
    let file = args.config.clone();
    let settings = load_settings(args)?;
    Application::check_settings(&settings)?;
    match &file {
        Some(path) => println!("{}: OK", path.display()),
        None => println!("settings OK (no --config file: defaults, environment and flags)"),
    }
    for line in fleetgate::config::summary(&settings) {
        println!("  {line}");
    }
    Ok(())
}

/// Defaults, then the `--config` file, then the environment and flags.
fn load_settings(args: ServeArgs) -> anyhow::Result<Settings> {
    let limits = args.limits;
    let settings = Settings::load(
        args.config.as_deref(),
        Overrides {
            mqtt_listen: args.mqtt_listen,
            mqtt_tls_listen: args.mqtt_tls_listen,
            tls_cert: args.tls_cert,
            tls_key: args.tls_key,
            http_listen: args.http_listen,
            data_dir: args.data_dir,
            amqp_url: args.amqp_url,
            amqp_exchange_prefix: args.amqp_exchange_prefix,
            amqp_queue_type: args.amqp_queue_type,
            api_token: args.api_token,
            public_url: args.public_url,
            store_url: args.store_url,
            nats_url: args.nats_url,
            node_id: args.node_id,
            cluster_name: args.cluster_name,
            cluster_heartbeat_ms: args.cluster_heartbeat_ms,
            cluster_node_timeout_ms: args.cluster_node_timeout_ms,
            cluster_lease_ttl_ms: args.cluster_lease_ttl_ms,
            mqtt_max_subscriptions_per_device: args.mqtt_max_subscriptions_per_device,
            mqtt_max_modules_per_device: args.mqtt_max_modules_per_device,
            mqtt_connect_timestamp_window_secs: args.mqtt_connect_timestamp_window_secs,
            open_files_reserve: limits.open_files_reserve,
            mqtt_max_sockets: limits.mqtt_max_sockets,
            mqtt_max_unauthenticated_per_ip: limits.mqtt_max_unauthenticated_per_ip,
            mqtt_pressure_unauthenticated: limits.mqtt_pressure_unauthenticated,
            mqtt_connect_timeout_under_pressure_secs: limits
                .mqtt_connect_timeout_under_pressure_secs,
            mqtt_proxy_protocol: limits.mqtt_proxy_protocol,
            mqtt_proxy_trusted: limits.mqtt_proxy_trusted,
            http_max_connections: limits.http_max_connections,
            http_max_connections_per_ip: limits.http_max_connections_per_ip,
            http_header_read_timeout_secs: limits.http_header_read_timeout_secs,
            http_body_read_timeout_secs: limits.http_body_read_timeout_secs,
            http_write_timeout_secs: limits.http_write_timeout_secs,
            http_proxy_protocol: limits.http_proxy_protocol,
            http_proxy_trusted: limits.http_proxy_trusted,
        },
    )?;
    Ok(settings)
}
