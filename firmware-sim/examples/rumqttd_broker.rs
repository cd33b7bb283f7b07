//! A stock rumqttd broker (no authentication) for benchmarking the simulator on its own:
//!
//! ```text
//! cargo run --release -p firmware-sim --example rumqttd_broker -- 127.0.0.1:1883
//! ```
//!
//! It knows nothing of Link signatures, so run the simulator with made-up devices
//! (`--generate N --product PK`) and `--reply-timeout 0` (nobody answers posts).

fn main() {
    let listen = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:1883".to_owned());
    let cfg = format!(
        r#"
        id = 0
        [router]
        max_connections = 20010
        max_outgoing_packet_count = 200
        max_segment_size = 104857600
        max_segment_count = 10
        [v4.1]
        name = "v4-1"
        listen = "{listen}"
        next_connection_delay_ms = 0
        [v4.1.connections]
        connection_timeout_ms = 60000
        max_payload_size = 65536
        max_inflight_count = 100
        dynamic_filters = true
        "#
    );
    let config: rumqttd::Config = match toml::from_str(&cfg) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("rumqttd_broker: bad listen address `{listen}`: {e}");
            std::process::exit(2);
        }
    };
    eprintln!("rumqttd_broker: listening on {listen}");
    let mut broker = rumqttd::Broker::new(config);
    if let Err(e) = broker.start() {
        eprintln!("rumqttd_broker: {e}");
        std::process::exit(1);
    }
}
