//! What a run measured: live counters ([`Stats`], shared by every device task, lock-free except
//! the per-code reply table), point-in-time [`Snapshot`]s for the progress display and
//! `--until-idle`, per-device [`DeviceOutcome`]s, and the final [`Summary`] (text and JSON).
//!
//! Owns no behaviour: devices write counters, the fleet reads them.

use crate::faults::FaultKind;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

/// Where a device is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    /// Waiting for its jittered start or a connect token.
    Starting,
    Connecting,
    Online,
    /// Disconnected after an error, or offline on purpose (fault), waiting to reconnect.
    Offline,
    /// "Rebooting" after writing firmware.
    Rebooting,
    Stopped,
}

/// How one upgrade attempt ended (so far).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum UpgradeResult {
    InProgress,
    /// Rebooted and reported the target version.
    Succeeded,
    /// Reported a negative progress step.
    Failed {
        code: i32,
        reason: String,
    },
    /// Went silent on purpose (fault `hang`).
    Hung,
    /// Rebooted and reported a version that is neither source nor target (fault `wrong_version`).
    WrongVersion {
        reported: String,
    },
    /// A newer push for the same module replaced it.
    Superseded,
    /// The fleet stopped while it was running.
    Interrupted,
}

/// One upgrade attempt of a device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpgradeRecord {
    /// The device's own sequence number of the attempt (0, 1, …).
    pub seq: u32,
    pub module: String,
    pub from_version: Option<String>,
    pub to_version: String,
    /// The push's `id` (0 for a `firmware/get` reply without a numeric id).
    pub push_id: u64,
    /// `push` or `pull`.
    pub via: String,
    /// Faults injected into this attempt.
    pub faults: Vec<FaultKind>,
    /// The last progress step reported (0 before the first).
    pub last_step: i32,
    pub range_resumes: u32,
    pub result: UpgradeResult,
    pub elapsed_ms: u64,
}

/// Everything the simulator knows about one device at the end (or at any time) of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceOutcome {
    pub product_key: String,
    pub device_name: String,
    pub sign_method: String,
    pub state: DeviceState,
    /// Successful CONNECTs (CONNACK accepted).
    pub connects: u32,
    /// Failed attempts: network errors and timeouts.
    pub connect_failures: u32,
    /// CONNACKs that refused the device (bad credentials, unknown or disabled device).
    pub connect_refused: u32,
    /// Current firmware version per module.
    pub versions: BTreeMap<String, String>,
    /// The most recent upgrade attempts (at most [`MAX_UPGRADE_RECORDS`]).
    pub upgrades: Vec<UpgradeRecord>,
    pub property_posts: u64,
    pub event_posts: u64,
    pub replies_ok: u64,
    pub replies_error: u64,
    pub replies_missing: u64,
    pub last_error: Option<String>,
}

/// Upgrade attempts kept per device, so a long soak's memory stays bounded.
pub const MAX_UPGRADE_RECORDS: usize = 16;

/// Live counters of a run.
#[derive(Default)]
pub struct Stats {
    pub online: AtomicI64,
    pub updating: AtomicI64,
    /// Devices whose first connection attempt has resolved (accepted, refused or failed).
    pub first_attempts_done: AtomicU64,
    pub ever_connected: AtomicU64,
    /// Milliseconds from the fleet's start to the last device's first CONNACK.
    pub last_first_connect_ms: AtomicU64,
    pub connects: AtomicU64,
    pub connect_failures: AtomicU64,
    pub connect_refused: AtomicU64,
    pub disconnects: AtomicU64,
    pub property_posts: AtomicU64,
    pub event_posts: AtomicU64,
    pub malformed_sent: AtomicU64,
    pub replies_missing: AtomicU64,
    pub replies_unmatched: AtomicU64,
    pub publish_dropped: AtomicU64,
    pub pushes_received: AtomicU64,
    pub duplicate_pushes: AtomicU64,
    pub bad_pushes: AtomicU64,
    pub get_requests: AtomicU64,
    pub get_replies_upgrade: AtomicU64,
    pub get_replies_none: AtomicU64,
    pub upgrades_started: AtomicU64,
    pub succeeded: AtomicU64,
    /// Index `n` counts progress code `-(n+1)`.
    pub failed: [AtomicU64; 4],
    pub hung: AtomicU64,
    pub wrong_version: AtomicU64,
    pub superseded: AtomicU64,
    pub progress_sent: AtomicU64,
    pub range_resumes: AtomicU64,
    pub bytes_downloaded: AtomicU64,
    /// Milliseconds from the fleet's start to the last OTA message sent or received.
    pub last_ota_ms: AtomicU64,
    replies_by_code: Mutex<BTreeMap<i32, u64>>,
}

impl Stats {
    pub fn count_reply(&self, code: i32) {
        // A poisoned lock only means another device task panicked mid-increment; the counts
        // are still usable.
        let mut m = self
            .replies_by_code
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *m.entry(code).or_default() += 1;
    }

    pub fn replies_by_code(&self) -> BTreeMap<i32, u64> {
        self.replies_by_code
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn count_failure(&self, code: i32) {
        if let Some(c) = usize::try_from(-code - 1)
            .ok()
            .and_then(|i| self.failed.get(i))
        {
            c.fetch_add(1, Relaxed);
        }
    }

    pub fn ota_activity(&self, now_ms: u64) {
        self.last_ota_ms.fetch_max(now_ms, Relaxed);
    }
}

/// A point-in-time view of a running fleet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub elapsed_secs: f64,
    pub devices: usize,
    pub online: i64,
    pub ever_connected: u64,
    pub first_attempts_done: u64,
    pub connect_failures: u64,
    pub connect_refused: u64,
    pub updating: i64,
    pub upgrades_started: u64,
    pub succeeded: u64,
    /// Keys `"-1"`..`"-4"`.
    pub failed: BTreeMap<String, u64>,
    pub hung: u64,
    pub wrong_version: u64,
    pub property_posts: u64,
    pub event_posts: u64,
    pub replies_by_code: BTreeMap<String, u64>,
    pub replies_missing: u64,
    /// Seconds since the last OTA message sent or received (or since the start).
    pub ota_quiet_secs: f64,
}

impl Snapshot {
    pub(crate) fn take(stats: &Stats, devices: usize, elapsed_ms: u64) -> Self {
        let failed = stats
            .failed
            .iter()
            .enumerate()
            .map(|(i, c)| (format!("-{}", i + 1), c.load(Relaxed)))
            .collect();
        Snapshot {
            elapsed_secs: elapsed_ms as f64 / 1000.0,
            devices,
            online: stats.online.load(Relaxed),
            ever_connected: stats.ever_connected.load(Relaxed),
            first_attempts_done: stats.first_attempts_done.load(Relaxed),
            connect_failures: stats.connect_failures.load(Relaxed),
            connect_refused: stats.connect_refused.load(Relaxed),
            updating: stats.updating.load(Relaxed),
            upgrades_started: stats.upgrades_started.load(Relaxed),
            succeeded: stats.succeeded.load(Relaxed),
            failed,
            hung: stats.hung.load(Relaxed),
            wrong_version: stats.wrong_version.load(Relaxed),
            property_posts: stats.property_posts.load(Relaxed),
            event_posts: stats.event_posts.load(Relaxed),
            replies_by_code: stats
                .replies_by_code()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            replies_missing: stats.replies_missing.load(Relaxed),
            ota_quiet_secs: elapsed_ms.saturating_sub(stats.last_ota_ms.load(Relaxed)) as f64
                / 1000.0,
        }
    }

    /// Total failures of all codes.
    pub fn failed_total(&self) -> u64 {
        self.failed.values().sum()
    }

    /// One status line for the live display.
    pub fn line(&self) -> String {
        let mut s = format!(
            "online {}/{} | updating {} | ok {} | failed",
            self.online, self.devices, self.updating, self.succeeded
        );
        for (code, n) in &self.failed {
            let _ = write!(s, " {code}:{n}");
        }
        let _ = write!(
            s,
            " | hung {} | wrong-ver {} | posts {} | missing replies {}",
            self.hung, self.wrong_version, self.property_posts, self.replies_missing
        );
        if self.connect_refused > 0 {
            let _ = write!(s, " | refused {}", self.connect_refused);
        }
        s
    }
}

/// Connection figures of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectSummary {
    pub devices: usize,
    pub ever_connected: u64,
    /// Devices online just before the fleet was stopped.
    pub online_at_end: i64,
    pub connects: u64,
    pub connect_failures: u64,
    pub connect_refused: u64,
    pub disconnects: u64,
    /// Seconds from the start until the last device first connected.
    pub all_connected_secs: Option<f64>,
    /// Devices first connected per second over that time (includes the configured start
    /// jitter and connect-rate limit: set them wide open to measure the broker).
    pub connect_rate_per_sec: f64,
}

/// Telemetry figures of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TelemetrySummary {
    pub property_posts: u64,
    pub event_posts: u64,
    pub malformed_sent: u64,
    /// Posts (property + event) per second over the whole run.
    pub post_rate_per_sec: f64,
    pub replies_by_code: BTreeMap<String, u64>,
    pub replies_missing: u64,
    /// Replies to no pending request (late after being counted missing, or duplicates).
    pub replies_unmatched: u64,
    /// Publishes dropped because a device's outgoing queue was full.
    pub publish_dropped: u64,
}

/// OTA figures of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OtaSummary {
    pub pushes_received: u64,
    pub duplicate_pushes: u64,
    pub bad_pushes: u64,
    pub get_requests: u64,
    pub get_replies_upgrade: u64,
    pub get_replies_none: u64,
    pub upgrades_started: u64,
    pub succeeded: u64,
    /// Keys `"-1"`..`"-4"`.
    pub failed: BTreeMap<String, u64>,
    pub hung: u64,
    pub wrong_version: u64,
    pub superseded: u64,
    pub in_progress_at_end: i64,
    pub progress_sent: u64,
    pub range_resumes: u64,
    pub bytes_downloaded: u64,
}

/// Process memory from `/proc/self/status` (Linux; `None` elsewhere), taken while the fleet
/// still runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemorySummary {
    pub rss_bytes: Option<u64>,
    pub peak_rss_bytes: Option<u64>,
    pub rss_per_device_bytes: Option<u64>,
    /// CPU time (user + system) this process used so far, in seconds: with the run's elapsed
    /// time it tells whether the simulator or the broker was the bottleneck.
    pub cpu_secs: Option<f64>,
}

/// The final report of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub scenario: Option<String>,
    pub seed: u64,
    pub elapsed_secs: f64,
    pub connect: ConnectSummary,
    pub telemetry: TelemetrySummary,
    pub ota: OtaSummary,
    pub memory: MemorySummary,
    pub devices: Vec<DeviceOutcome>,
}

impl Summary {
    pub(crate) fn build(
        scenario: Option<String>,
        seed: u64,
        stats: &Stats,
        elapsed_ms: u64,
        devices: Vec<DeviceOutcome>,
        memory: MemorySummary,
    ) -> Self {
        let snap = Snapshot::take(stats, devices.len(), elapsed_ms);
        let ever = stats.ever_connected.load(Relaxed);
        let last_first = stats.last_first_connect_ms.load(Relaxed);
        let all_connected_secs =
            (ever as usize == devices.len() && ever > 0).then_some(last_first as f64 / 1000.0);
        let connect_rate_per_sec = if last_first > 0 {
            ever as f64 / (last_first as f64 / 1000.0)
        } else {
            0.0
        };
        let secs = (elapsed_ms as f64 / 1000.0).max(1e-3);
        let posts = snap.property_posts + snap.event_posts;
        Summary {
            scenario,
            seed,
            elapsed_secs: elapsed_ms as f64 / 1000.0,
            connect: ConnectSummary {
                devices: devices.len(),
                ever_connected: ever,
                online_at_end: snap.online,
                connects: stats.connects.load(Relaxed),
                connect_failures: snap.connect_failures,
                connect_refused: snap.connect_refused,
                disconnects: stats.disconnects.load(Relaxed),
                all_connected_secs,
                connect_rate_per_sec,
            },
            telemetry: TelemetrySummary {
                property_posts: snap.property_posts,
                event_posts: snap.event_posts,
                malformed_sent: stats.malformed_sent.load(Relaxed),
                post_rate_per_sec: posts as f64 / secs,
                replies_by_code: snap.replies_by_code,
                replies_missing: snap.replies_missing,
                replies_unmatched: stats.replies_unmatched.load(Relaxed),
                publish_dropped: stats.publish_dropped.load(Relaxed),
            },
            ota: OtaSummary {
                pushes_received: stats.pushes_received.load(Relaxed),
                duplicate_pushes: stats.duplicate_pushes.load(Relaxed),
                bad_pushes: stats.bad_pushes.load(Relaxed),
                get_requests: stats.get_requests.load(Relaxed),
                get_replies_upgrade: stats.get_replies_upgrade.load(Relaxed),
                get_replies_none: stats.get_replies_none.load(Relaxed),
                upgrades_started: snap.upgrades_started,
                succeeded: snap.succeeded,
                failed: snap.failed,
                hung: snap.hung,
                wrong_version: snap.wrong_version,
                superseded: stats.superseded.load(Relaxed),
                in_progress_at_end: snap.updating,
                progress_sent: stats.progress_sent.load(Relaxed),
                range_resumes: stats.range_resumes.load(Relaxed),
                bytes_downloaded: stats.bytes_downloaded.load(Relaxed),
            },
            memory,
            devices,
        }
    }

    /// The human-readable report (without the per-device list).
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let c = &self.connect;
        let t = &self.telemetry;
        let o = &self.ota;
        let _ = writeln!(
            s,
            "firmware-sim summary{} (seed {}, {:.1} s)",
            self.scenario
                .as_deref()
                .map(|n| format!(" of `{n}`"))
                .unwrap_or_default(),
            self.seed,
            self.elapsed_secs
        );
        let _ = writeln!(
            s,
            "  connect:   {}/{} devices connected ({} online at end), {:.0} first connects/s{}; \
             {} failures, {} refused, {} disconnects",
            c.ever_connected,
            c.devices,
            c.online_at_end,
            c.connect_rate_per_sec,
            c.all_connected_secs
                .map(|s| format!(", all in {s:.1} s"))
                .unwrap_or_default(),
            c.connect_failures,
            c.connect_refused,
            c.disconnects
        );
        let codes: Vec<String> = t
            .replies_by_code
            .iter()
            .map(|(k, v)| format!("{k}:{v}"))
            .collect();
        let _ = writeln!(
            s,
            "  telemetry: {} property posts, {} events ({:.1} posts/s), {} malformed; replies [{}], \
             {} missing, {} unmatched, {} dropped",
            t.property_posts,
            t.event_posts,
            t.post_rate_per_sec,
            t.malformed_sent,
            codes.join(" "),
            t.replies_missing,
            t.replies_unmatched,
            t.publish_dropped
        );
        let failed: Vec<String> = o.failed.iter().map(|(k, v)| format!("{k}:{v}")).collect();
        let _ = writeln!(
            s,
            "  ota:       {} upgrades ({} pushes, {} via firmware/get): {} succeeded, failed [{}], \
             {} hung, {} wrong version, {} superseded, {} still running; {} Range resumes, {} bytes",
            o.upgrades_started,
            o.pushes_received,
            o.get_replies_upgrade,
            o.succeeded,
            failed.join(" "),
            o.hung,
            o.wrong_version,
            o.superseded,
            o.in_progress_at_end,
            o.range_resumes,
            o.bytes_downloaded
        );
        let mb = |b: Option<u64>| {
            b.map(|b| format!("{:.1} MiB", b as f64 / 1048576.0))
                .unwrap_or_else(|| "n/a".into())
        };
        let _ = writeln!(
            s,
            "  process:   RSS {} (peak {}), {} per device; {} CPU",
            mb(self.memory.rss_bytes),
            mb(self.memory.peak_rss_bytes),
            self.memory
                .rss_per_device_bytes
                .map(|b| format!("{:.1} KiB", b as f64 / 1024.0))
                .unwrap_or_else(|| "n/a".into()),
            self.memory
                .cpu_secs
                .map(|c| format!("{c:.1} s"))
                .unwrap_or_else(|| "n/a".into())
        );
        s
    }
}

/// Current and peak resident set size of this process.
pub fn memory(devices: usize) -> MemorySummary {
    let status = std::fs::read_to_string("/proc/self/status").ok();
    let field = |name: &str| -> Option<u64> {
        let line = status.as_deref()?.lines().find(|l| l.starts_with(name))?;
        let kb: u64 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kb * 1024)
    };
    let rss = field("VmRSS:");
    MemorySummary {
        rss_bytes: rss,
        peak_rss_bytes: field("VmHWM:"),
        rss_per_device_bytes: rss.and_then(|r| r.checked_div(devices as u64)),
        cpu_secs: cpu_secs(),
    }
}

/// utime + stime from `/proc/self/stat`, assuming the usual 100 clock ticks per second.
fn cpu_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may contain spaces: count fields after its closing `)`.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of the file are the 12th and 13th after the name.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_counts_by_code() {
        let s = Stats::default();
        s.count_failure(-2);
        s.count_failure(-2);
        s.count_failure(-4);
        s.count_failure(-9); // not a protocol code: ignored
        s.count_failure(3);
        let snap = Snapshot::take(&s, 3, 1000);
        assert_eq!(snap.failed["-2"], 2);
        assert_eq!(snap.failed["-4"], 1);
        assert_eq!(snap.failed_total(), 3);
        s.count_reply(200);
        s.count_reply(200);
        s.count_reply(460);
        let snap = Snapshot::take(&s, 3, 1000);
        assert_eq!(snap.replies_by_code["200"], 2);
        assert_eq!(snap.replies_by_code["460"], 1);
        assert!(snap.line().contains("-2:2"));
    }

    #[test]
    fn reads_own_memory() {
        let m = memory(10);
        if cfg!(target_os = "linux") {
            assert!(m.rss_bytes.unwrap() > 0);
            assert!(m.peak_rss_bytes.unwrap() >= m.rss_bytes.unwrap());
            assert_eq!(m.rss_per_device_bytes, Some(m.rss_bytes.unwrap() / 10));
            assert!(m.cpu_secs.unwrap() >= 0.0);
        }
    }
}
