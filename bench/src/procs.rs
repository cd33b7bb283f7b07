//! The brokers under test, each a separate child process so its RSS can be read from
//! `/proc/{pid}/status`: release `fleetgate serve`, `stock-rumqttd` (this crate) and, optionally,
//! Mosquitto with a temporary config. Every listener is on 127.0.0.1.

use anyhow::{bail, Context};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStderr, Command};

/// Which broker a process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Kind {
    Fleetgate,
    /// The same binary with jemalloc preloaded (`LD_PRELOAD`), as an allocator experiment.
    FleetgateJemalloc,
    Rumqttd,
    Mosquitto,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Fleetgate => "fleetgate",
            Kind::FleetgateJemalloc => "fleetgate + jemalloc (LD_PRELOAD)",
            Kind::Rumqttd => "rumqttd 0.20 (stock)",
            Kind::Mosquitto => "mosquitto",
        }
    }
}

/// Warnings and errors a fleetgate process logged (kept for the report), and the server time
/// of its console requests from its access log.
#[derive(Debug, Default)]
pub struct LogTap {
    pub warnings: AtomicU64,
    pub samples: Mutex<Vec<String>>,
    /// `(path, latency_ms)` of each `/console…` request's access-log line (the console part
    /// takes them; at most [`CONSOLE_REQUESTS_KEPT`] wait).
    pub console_requests: Mutex<Vec<(String, f64)>>,
}

/// Console access-log entries a [`LogTap`] keeps until they are taken.
const CONSOLE_REQUESTS_KEPT: usize = 100_000;

/// The path and server time of an access-log line of a console request.
fn console_request(v: &serde_json::Value) -> Option<(String, f64)> {
    if v["fields"]["message"] != "request" {
        return None;
    }
    let path = v["span"]["path"].as_str()?;
    if !path.starts_with("/console") {
        return None;
    }
    Some((path.to_owned(), v["span"]["latency_ms"].as_f64()?))
}

/// A running broker process.
pub struct Server {
    pub kind: Kind,
    pub mqtt: SocketAddr,
    /// fleetgate's HTTP API.
    pub http: Option<SocketAddr>,
    pub log: Arc<LogTap>,
    child: Child,
}

/// Where the binaries are.
#[derive(Debug, Clone)]
pub struct Bins {
    pub fleetgate: PathBuf,
    pub rumqttd: PathBuf,
    pub mosquitto: Option<PathBuf>,
    /// `libjemalloc.so` to preload for [`Kind::FleetgateJemalloc`].
    pub jemalloc: Option<PathBuf>,
    /// Extra environment for fleetgate processes.
    pub gateway_env: Vec<(String, String)>,
}

/// The gateway's connection limits in benchmarks (see [`Server::fleetgate`]).
pub const GATEWAY_LIMITS: [(&str, &str); 5] = [
    ("FLEETGATE_OPEN_FILES_RESERVE", "48"),
    ("FLEETGATE_HTTP_MAX_CONNECTIONS", "24"),
    ("FLEETGATE_HTTP_MAX_CONNECTIONS_PER_IP", "24"),
    ("FLEETGATE_MQTT_MAX_UNAUTHENTICATED_PER_IP", "1000000"),
    ("FLEETGATE_MQTT_PRESSURE_UNAUTHENTICATED", "1000000"),
];

/// The gateway's MQTT and HTTP addresses, from its "fleetgate listening" log line (within
/// 60 s).
async fn listening(
    lines: &mut Lines<BufReader<ChildStderr>>,
) -> anyhow::Result<(SocketAddr, SocketAddr)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let line = tokio::time::timeout_at(deadline.into(), lines.next_line())
            .await
            .context("fleetgate did not report its addresses within 60 s")??
            .context("fleetgate exited before listening")?;
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        let fields = &v["fields"];
        if fields["message"] == "fleetgate listening" {
            let addr = |k: &str| -> anyhow::Result<SocketAddr> {
                fields[k]
                    .as_str()
                    .with_context(|| format!("no `{k}` in {line}"))?
                    .parse()
                    .with_context(|| format!("bad `{k}` in {line}"))
            };
            return Ok((addr("mqtt")?, addr("http")?));
        }
    }
}

/// Drains the gateway's log into `file`, keeping its console requests and a sample of its
/// warnings in `tap`.
async fn tap_log(
    mut lines: Lines<BufReader<ChildStderr>>,
    mut file: Option<tokio::io::BufWriter<tokio::fs::File>>,
    tap: Arc<LogTap>,
) {
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(f) = file.as_mut() {
            if f.write_all(line.as_bytes()).await.is_err()
                || f.write_all(b"\n").await.is_err()
                || f.flush().await.is_err()
            {
                file = None;
            }
        }
        let parsed = serde_json::from_str::<serde_json::Value>(&line).ok();
        if let Some(request) = parsed.as_ref().and_then(console_request) {
            if let Ok(mut kept) = tap.console_requests.lock() {
                if kept.len() < CONSOLE_REQUESTS_KEPT {
                    kept.push(request);
                }
            }
        }
        let level = parsed.and_then(|v| v["level"].as_str().map(str::to_owned));
        if matches!(level.as_deref(), Some("WARN" | "ERROR")) {
            tap.warnings.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut s) = tap.samples.lock() {
                if s.len() < 5 {
                    s.push(line);
                }
            }
        }
    }
}

impl Server {
    /// `fleetgate serve` on 127.0.0.1 port 0 (MQTT and HTTP); the bound addresses come from its
    /// JSON start-up log line (on stderr).
    /// `preload`: a shared library for `LD_PRELOAD` (the jemalloc experiment).
    pub async fn fleetgate(
        bins: &Bins,
        data_dir: &Path,
        token: &str,
        preload: Option<&Path>,
    ) -> anyhow::Result<Server> {
        Server::fleetgate_with(bins, data_dir, token, preload, &[]).await
    }

    /// [`Server::fleetgate`] with extra `serve` arguments (a cluster node's store, NATS and id).
    pub async fn fleetgate_with(
        bins: &Bins,
        data_dir: &Path,
        token: &str,
        preload: Option<&Path>,
        extra: &[String],
    ) -> anyhow::Result<Server> {
        let bin = &bins.fleetgate;
        let mut cmd = Command::new(bin);
        // Every client of a benchmark runs on this host: one source address. The per-address
        // caps and the pressure timeout (an attack's signs) are lifted, and the open-files
        // limit goes to MQTT but for a small reserve and a few HTTP connections, so the
        // connection curve reaches the limit as it did before the budgets. `--gateway-env`
        // can override each.
        cmd.envs(GATEWAY_LIMITS.iter().copied());
        cmd.envs(bins.gateway_env.iter().map(|(k, v)| (k, v)));
        if let Some(lib) = preload {
            cmd.env("LD_PRELOAD", lib);
        }
        let mut child = cmd
            .args(["serve", "--log-json", "--mqtt-listen", "127.0.0.1:0"])
            .args(["--http-listen", "127.0.0.1:0", "--api-token", token])
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            // The gateway logs to stderr; stdout only carries the first-start token notice.
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let stderr = child.stderr.take().context("no stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        let log = Arc::new(LogTap::default());
        let (mqtt, http) = listening(&mut lines).await?;
        // Keep draining the pipe (a full pipe would block the gateway's logging), keep
        // warnings such as rumqttd's "Read cursor start jumped", and keep the whole log beside
        // the node's data (`fleetgate.log`) to read after a run.
        let file = tokio::fs::File::create(data_dir.join("fleetgate.log"))
            .await
            .map(tokio::io::BufWriter::new)
            .ok();
        tokio::spawn(tap_log(lines, file, Arc::clone(&log)));
        Ok(Server {
            kind: if preload.is_some() {
                Kind::FleetgateJemalloc
            } else {
                Kind::Fleetgate
            },
            mqtt,
            http: Some(http),
            log,
            child,
        })
    }

    /// Stock rumqttd (our `stock-rumqttd` bin) on a free port.
    pub async fn rumqttd(bin: &Path) -> anyhow::Result<Server> {
        let mqtt = free_port()?;
        let child = Command::new(bin)
            .arg("--listen")
            .arg(mqtt.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let mut server = Server {
            kind: Kind::Rumqttd,
            mqtt,
            http: None,
            log: Arc::default(),
            child,
        };
        server.wait_listening().await?;
        Ok(server)
    }

    /// Mosquitto with a temporary config: one listener on 127.0.0.1, anonymous, no connection
    /// limit, no persistence; everything else at its defaults (as the issue measured it).
    pub async fn mosquitto(bin: &Path, work: &Path) -> anyhow::Result<Server> {
        let mqtt = free_port()?;
        let conf = work.join(format!("mosquitto-{}.conf", mqtt.port()));
        std::fs::write(
            &conf,
            format!(
                "listener {} 127.0.0.1\nallow_anonymous true\nmax_connections -1\n\
                 persistence false\nlog_dest stderr\nlog_type error\n",
                mqtt.port()
            ),
        )?;
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let mut server = Server {
            kind: Kind::Mosquitto,
            mqtt,
            http: None,
            log: Arc::default(),
            child,
        };
        server.wait_listening().await?;
        Ok(server)
    }

    pub async fn start(kind: Kind, bins: &Bins, dir: &Path, token: &str) -> anyhow::Result<Self> {
        match kind {
            Kind::Fleetgate => Server::fleetgate(bins, dir, token, None).await,
            Kind::FleetgateJemalloc => {
                let lib = bins.jemalloc.as_deref().context("no jemalloc library")?;
                Server::fleetgate(bins, dir, token, Some(lib)).await
            }
            Kind::Rumqttd => Server::rumqttd(&bins.rumqttd).await,
            Kind::Mosquitto => {
                let bin = bins.mosquitto.as_deref().context("no mosquitto binary")?;
                Server::mosquitto(bin, dir).await
            }
        }
    }

    async fn wait_listening(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("{} exited at start: {status}", self.kind.label());
            }
            if tokio::net::TcpStream::connect(self.mqtt).await.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not listen on {} in 30 s",
                    self.kind.label(),
                    self.mqtt
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn pid(&self) -> anyhow::Result<u32> {
        self.child.id().context("process already gone")
    }

    /// Resident set size, KiB (`VmRSS`).
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        proc_status_kib(self.pid()?, "VmRSS:")
    }

    /// CPU time the broker process used so far (user + system), seconds. Clock-tick resolution
    /// (10 ms); a measure of cost per message that other load on the machine barely moves.
    pub fn cpu_s(&self) -> anyhow::Result<f64> {
        cpu_s_of(self.pid()?)
    }

    /// SIGTERM, then SIGKILL after 20 s.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.child.id() {
            signal(pid, libc::SIGTERM);
            if tokio::time::timeout(Duration::from_secs(20), self.child.wait())
                .await
                .is_ok()
            {
                return Ok(());
            }
            eprintln!("{} ignored SIGTERM for 20 s; killing it", self.kind.label());
        }
        self.child.kill().await?;
        Ok(())
    }

    /// SIGKILL, no shutdown of any kind (the durability check).
    pub async fn kill9(mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }
}

/// CPU time process `pid` used so far (user + system), seconds (clock-tick resolution).
pub fn cpu_s_of(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').context("bad /proc/pid/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        Ok(fields
            .get(i)
            .context("short /proc/pid/stat")?
            .parse::<f64>()?)
    };
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok((ticks(11)? + ticks(12)?) / hz)
}

/// CPU time this process used so far (user + system), seconds.
pub fn self_cpu_s() -> anyhow::Result<f64> {
    cpu_s_of(std::process::id())
}

pub fn signal(pid: u32, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// A `kB` field of `/proc/{pid}/status`.
pub fn proc_status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// A port that was free a moment ago (for rumqttd and Mosquitto, which need a concrete port).
fn free_port() -> anyhow::Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?)
}

/// Raise the soft open-files limit to the hard one (children inherit it). Returns the limit.
pub fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                lim = want;
            }
        }
    }
    // `rlim_t` is u64 on Linux x86_64 but not on every target.
    #[allow(clippy::unnecessary_cast)]
    let limit = lim.rlim_cur as u64;
    limit
}
