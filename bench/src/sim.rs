//! The firmware simulator (`firmware-sim`, release build) as a separate process: one process
//! for the whole fleet, devices from a CSV the benchmark wrote (provisioned through the API
//! beforehand), a scenario file the benchmark wrote, and the JSON summary with per-device
//! outcomes read from its stdout after a SIGINT (the simulator's Ctrl-C: devices disconnect
//! cleanly, then the summary is printed).

use crate::api::Device;
use anyhow::{bail, Context};
use serde_json::Value;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

/// A running simulator.
pub struct Sim {
    child: Child,
    stdout: JoinHandle<std::io::Result<Vec<u8>>>,
    log: PathBuf,
}

/// Writes `ProductKey,DeviceName,DeviceSecret` rows for `--devices`.
pub fn write_devices(path: &Path, devices: &[Device]) -> anyhow::Result<()> {
    let mut csv = String::from("ProductKey,DeviceName,DeviceSecret\n");
    for d in devices {
        let _ = writeln!(
            csv,
            "{},{},{}",
            d.product_key, d.device_name, d.device_secret
        );
    }
    std::fs::write(path, csv).with_context(|| format!("cannot write {}", path.display()))
}

impl Sim {
    /// Starts `firmware-sim --scenario … --devices … --mqtt … --quiet --json` (device *i* of
    /// `devices` connects to `mqtt[i mod n]`); its stderr goes to `{work}/firmware-sim-{tag}.log`.
    pub async fn start(
        bin: &Path,
        work: &Path,
        tag: &str,
        scenario: &str,
        devices: &[Device],
        mqtt: &[SocketAddr],
    ) -> anyhow::Result<Sim> {
        let scenario_path = work.join(format!("scenario-{tag}.toml"));
        std::fs::write(&scenario_path, scenario)?;
        let devices_path = work.join(format!("devices-{tag}.csv"));
        write_devices(&devices_path, devices)?;
        let log = work.join(format!("firmware-sim-{tag}.log"));
        let mut child = Command::new(bin)
            .arg("--scenario")
            .arg(&scenario_path)
            .arg("--devices")
            .arg(&devices_path)
            .arg("--mqtt")
            .arg(
                mqtt.iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
            )
            .args(["--quiet", "--json"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let mut out = child.stdout.take().context("no stdout")?;
        // Read all the time: a full pipe would block the simulator's summary.
        let stdout = tokio::spawn(async move {
            let mut buf = Vec::new();
            out.read_to_end(&mut buf).await?;
            Ok(buf)
        });
        Ok(Sim { child, stdout, log })
    }

    pub fn pid(&self) -> anyhow::Result<u32> {
        self.child.id().context("firmware-sim already gone")
    }

    /// Resident set size, KiB.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        crate::procs::proc_status_kib(self.pid()?, "VmRSS:")
    }

    /// Fails when the simulator has exited (it should run until stopped).
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "firmware-sim exited early ({status}); see {}",
                self.log.display()
            );
        }
        Ok(())
    }

    /// SIGINT, then the JSON summary (devices disconnect first; 180 s at most).
    pub async fn stop(mut self) -> anyhow::Result<Value> {
        if let Some(pid) = self.child.id() {
            crate::procs::signal(pid, libc::SIGINT);
        }
        let status = tokio::time::timeout(Duration::from_secs(180), self.child.wait())
            .await
            .context("firmware-sim did not stop within 180 s of SIGINT")??;
        let out = self.stdout.await??;
        serde_json::from_slice(&out).with_context(|| {
            format!(
                "firmware-sim ({status}) printed no JSON summary; see {}",
                self.log.display()
            )
        })
    }
}
