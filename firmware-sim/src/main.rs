//! `firmware-sim`: the command line. Parses flags, merges them over a scenario file, gets the
//! devices (list, generated, or provisioned through the gateway's API), runs the fleet until
//! `--duration`, `--until-idle` or Ctrl-C, and prints the summary (text, or JSON with `--json`).
//! Everything else lives in the library.

use anyhow::{bail, Context, Result};
use clap::Parser;
use firmware_sim::scenario::SignChoice;
use firmware_sim::{devices, Fleet, FleetConfig, FleetHandle, Scenario, Summary};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

/// A fleet of simulated Alibaba Link SDK devices with fault injection.
///
/// Flags override the scenario file's values. Exit status: 0 after a run, 1 when the simulator
/// itself failed (bad arguments or device list, broker unreachable, provisioning failed, no
/// device could connect).
#[derive(Parser, Debug)]
#[command(name = "firmware-sim", version)]
struct Args {
    /// Scenario file (TOML); see firmware-sim/README.md for every key.
    #[arg(short, long, value_name = "FILE")]
    scenario: Option<PathBuf>,

    /// Device list: CSV `ProductKey,DeviceName,DeviceSecret[,SignMethod]` or JSON.
    #[arg(long, value_name = "FILE", group = "source")]
    devices: Option<PathBuf>,
    /// Create N devices through the gateway's HTTP API first (needs --product).
    #[arg(long, value_name = "N", group = "source")]
    provision: Option<usize>,
    /// Make up N devices locally, for a broker without authentication (needs --product).
    #[arg(long, value_name = "N", group = "source")]
    generate: Option<usize>,
    /// Product key of provisioned or generated devices.
    #[arg(long, value_name = "PK")]
    product: Option<String>,
    /// Name prefix of provisioned or generated devices [default: sim-<random>-].
    #[arg(long, value_name = "PREFIX")]
    device_prefix: Option<String>,
    /// Write the device list (with secrets) to FILE, to reuse it with --devices.
    #[arg(long, value_name = "FILE")]
    save_devices: Option<PathBuf>,
    /// Gateway HTTP API base URL [scenario default: http://127.0.0.1:8080].
    #[arg(long, value_name = "URL")]
    api: Option<String>,
    /// API token for --provision.
    #[arg(
        long,
        env = "FLEETGATE_API_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    api_token: Option<String>,

    /// MQTT broker host:port, or several separated by commas (device i of the list connects
    /// to entry i mod n) [default: with --provision, the gateway's own (its /healthz `mqtt`),
    /// and a different port is refused; otherwise 127.0.0.1:1883].
    #[arg(long, value_name = "HOST:PORT")]
    mqtt: Option<String>,
    /// CONNECT sign method: hmacsha1, hmacsha256, hmacmd5 or mixed.
    #[arg(long, value_name = "METHOD")]
    sign_method: Option<SignChoice>,
    /// Fleet-wide CONNECTs per second.
    #[arg(long, value_name = "N")]
    connect_rate: Option<u32>,
    /// Each device waits a random 0..SECS before connecting.
    #[arg(long, value_name = "SECS")]
    start_jitter: Option<f64>,
    /// Seconds between property posts per device (0 = no telemetry).
    #[arg(long, value_name = "SECS")]
    telemetry_interval: Option<f64>,
    /// Seconds before a missing post_reply counts as missing (0 = do not check).
    #[arg(long, value_name = "SECS")]
    reply_timeout: Option<f64>,
    /// Ask firmware/get after every connect (pull mode).
    #[arg(long)]
    pull: bool,
    /// Seconds spent "writing" firmware.
    #[arg(long, value_name = "SECS")]
    write_secs: Option<f64>,
    /// Seconds offline while "rebooting".
    #[arg(long, value_name = "SECS")]
    reboot_secs: Option<f64>,
    /// Ignore the scenario's faults.
    #[arg(long)]
    no_faults: bool,
    /// Seed of every random choice (replays a run).
    #[arg(long, value_name = "N")]
    seed: Option<u64>,

    /// Stop after SECS.
    #[arg(long, value_name = "SECS")]
    duration: Option<f64>,
    /// Stop once no upgrade ran and no OTA message was seen for SECS.
    #[arg(long, value_name = "SECS")]
    until_idle: Option<f64>,
    /// No live display.
    #[arg(short, long)]
    quiet: bool,
    /// Print the summary as JSON (with per-device outcomes) on stdout.
    #[arg(long)]
    json: bool,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    if let Err(e) = run(args).await {
        eprintln!("firmware-sim: error: {e:#}");
        std::process::exit(1);
    }
}

fn positive(name: &str, v: Option<f64>) -> Result<Option<f64>> {
    match v {
        Some(x) if !(x >= 0.0 && x.is_finite()) => bail!("{name} must be a number >= 0"),
        v => Ok(v),
    }
}

async fn run(args: Args) -> Result<()> {
    let (mut sc, explicit_mqtt) = scenario_with_flags(&args)?;
    let seed = sc.seed.unwrap_or_else(rand::random);
    if sc.fleet.devices_file.is_none()
        && sc.fleet.generate.is_none()
        && sc.fleet.provision.is_some()
    {
        // Before any device is created: a mismatch changes nothing on the gateway.
        let addr = devices::gateway_mqtt(&sc.fleet.api, explicit_mqtt.as_deref()).await?;
        if explicit_mqtt.is_none() {
            eprintln!(
                "firmware-sim: connecting to the gateway's MQTT listener at {addr} (from {}/healthz)",
                sc.fleet.api.trim_end_matches('/')
            );
        }
        sc.mqtt.address = addr;
    }

    let devices = load_devices(&sc, args.api_token.as_deref(), seed).await?;
    if let Some(path) = &sc.fleet.save_devices {
        devices::save(path, &devices)?;
        eprintln!(
            "firmware-sim: wrote {} devices to {}",
            devices.len(),
            path.display()
        );
    }

    let mut config = FleetConfig::new(devices, sc.mqtt.address.clone());
    config.mqtt = sc.mqtt.clone();
    config.ota = sc.ota.clone();
    config.telemetry = sc.telemetry.clone();
    config.versions = sc.fleet.versions.clone();
    config.faults = sc.faults.clone();
    config.seed = seed;
    config.name = sc.name.clone();
    let n = config.devices.len();
    let handle = Fleet::start(config).await?;

    let summary = watch(handle, &sc, args.quiet).await;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
        if !args.quiet {
            eprint!("{}", summary.to_text());
        }
    } else {
        print!("{}", summary.to_text());
    }
    if summary.connect.ever_connected == 0 {
        bail!(
            "none of the {n} devices could connect ({} refused by the broker, {} failed): \
             check the address, the device list and the secrets",
            summary.connect.connect_refused,
            summary.connect.connect_failures
        );
    }
    Ok(())
}

/// The scenario (file or default) with the flags over it, validated; and the MQTT address the
/// user gave (flag or scenario key), if any.
fn scenario_with_flags(args: &Args) -> Result<(Scenario, Option<String>)> {
    let mut sc = match &args.scenario {
        Some(p) => Scenario::load(p)?,
        None => Scenario::default(),
    };
    // Flags over the scenario.
    if args.devices.is_some() || args.provision.is_some() || args.generate.is_some() {
        sc.fleet.devices_file = args.devices.clone();
        sc.fleet.provision = args.provision;
        sc.fleet.generate = args.generate;
    }
    if let Some(v) = &args.product {
        sc.fleet.product_key = Some(v.clone());
    }
    if let Some(v) = &args.device_prefix {
        sc.fleet.device_prefix = Some(v.clone());
    }
    if let Some(v) = &args.save_devices {
        sc.fleet.save_devices = Some(v.clone());
    }
    if let Some(v) = &args.api {
        sc.fleet.api = v.clone();
    }
    // An MQTT address the user gave (flag or scenario key); without one, devices provisioned
    // through a gateway connect to that gateway's MQTT listener.
    let explicit_mqtt = match &args.mqtt {
        Some(v) => Some(v.clone()),
        None => match &args.scenario {
            Some(p) if scenario_sets_mqtt_address(p) => Some(sc.mqtt.address.clone()),
            _ => None,
        },
    };
    if let Some(v) = &args.mqtt {
        sc.mqtt.address = v.clone();
    }
    if let Some(v) = args.sign_method {
        sc.mqtt.sign_method = v;
    }
    if let Some(v) = args.connect_rate {
        sc.mqtt.connect_rate = v;
    }
    if let Some(v) = positive("--start-jitter", args.start_jitter)? {
        sc.mqtt.start_jitter_secs = v;
    }
    if let Some(v) = positive("--telemetry-interval", args.telemetry_interval)? {
        sc.telemetry.interval_secs = v;
    }
    if let Some(v) = positive("--reply-timeout", args.reply_timeout)? {
        sc.telemetry.reply_timeout_secs = v;
    }
    if args.pull {
        sc.ota.pull_on_connect = true;
    }
    if let Some(v) = positive("--write-secs", args.write_secs)? {
        sc.ota.write_secs = v;
    }
    if let Some(v) = positive("--reboot-secs", args.reboot_secs)? {
        sc.ota.reboot_secs = v;
    }
    if args.no_faults {
        sc.faults.clear();
    }
    if let Some(v) = args.seed {
        sc.seed = Some(v);
    }
    if let Some(v) = positive("--duration", args.duration)? {
        sc.duration_secs = Some(v);
    }
    if let Some(v) = positive("--until-idle", args.until_idle)? {
        sc.until_idle_secs = Some(v);
    }
    sc.validate()?;
    Ok((sc, explicit_mqtt))
}

/// Runs the fleet until the duration ends, it is idle long enough or Ctrl-C, with a live
/// status line on a terminal (unless `quiet`); then stops it and returns its summary.
async fn watch(handle: FleetHandle, sc: &Scenario, quiet: bool) -> Summary {
    let live = !quiet && std::io::stdout().is_terminal();
    let bar = live.then(|| {
        let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.enable_steady_tick(Duration::from_millis(250));
        bar
    });

    let duration = sc.duration_secs.map(Duration::from_secs_f64);
    let idle = sc.until_idle_secs.map(Duration::from_secs_f64);
    let mut ticker = tokio::time::interval(Duration::from_millis(250));
    let deadline = duration.map(|d| tokio::time::Instant::now() + d);
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = &mut ctrl_c => break,
        }
        if let Some(bar) = &bar {
            bar.set_message(handle.snapshot().line());
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            break;
        }
        if idle.is_some_and(|q| handle.is_idle(q)) {
            break;
        }
    }
    if let Some(bar) = &bar {
        bar.set_message("stopping: disconnecting devices…");
    }
    let summary = handle.stop().await;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    summary
}

/// Whether the scenario file sets `[mqtt] address` (it was loaded once already: unreadable
/// now means not set).
fn scenario_sets_mqtt_address(path: &std::path::Path) -> bool {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| t.parse::<toml::Table>().ok())
        .is_some_and(|t| t.get("mqtt").and_then(|m| m.get("address")).is_some())
}

async fn load_devices(
    sc: &Scenario,
    token: Option<&str>,
    seed: u64,
) -> Result<Vec<firmware_sim::DeviceSpec>> {
    let f = &sc.fleet;
    let prefix = || {
        f.device_prefix
            .clone()
            .unwrap_or_else(|| format!("sim-{}-", devices::run_tag(seed)))
    };
    let product = || {
        f.product_key
            .clone()
            .context("--product (or fleet.product_key) is needed to provision or generate devices")
    };
    if let Some(path) = &f.devices_file {
        return Ok(devices::load(path)?);
    }
    if let Some(n) = f.generate {
        if n == 0 {
            bail!("--generate needs at least 1 device");
        }
        return Ok(devices::generate(&product()?, &prefix(), n, seed));
    }
    if let Some(n) = f.provision {
        if n == 0 {
            bail!("--provision needs at least 1 device");
        }
        let pk = product()?;
        let p = devices::provision(&f.api, token, &pk, &prefix(), n, seed).await?;
        eprintln!(
            "firmware-sim: provisioned {} of {n} devices in {pk} through {}",
            p.devices.len(),
            f.api
        );
        for (name, msg) in p.failed.iter().take(5) {
            eprintln!("firmware-sim:   {name}: {msg}");
        }
        if p.failed.len() > 5 {
            eprintln!("firmware-sim:   … and {} more failures", p.failed.len() - 5);
        }
        if p.devices.is_empty() {
            bail!("provisioning created no device");
        }
        return Ok(p.devices);
    }
    bail!("no devices: give --devices FILE, --provision N or --generate N (or a scenario with fleet.devices_file / provision / generate)")
}
