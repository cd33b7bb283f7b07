//! Fault injection: which faults a device suffers during one upgrade, or on one telemetry post.
//!
//! Pure and seeded. A [`FaultPlan`] is a list of [`FaultRule`]s (kind, probability, optional
//! scope by module / version / device-name pattern) plus the run's seed. Every draw takes its
//! own RNG stream, derived from the seed and the draw's identity (device, module, target version,
//! attempt; or device and post sequence number), so the outcome of one device never depends on
//! how the tokio scheduler interleaved the others: `--seed N` replays a run.
//!
//! This module decides; [`crate::device`] and [`crate::firmware`] act. It performs no I/O.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Why a fault rule was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FaultError {
    #[error("fault #{index} ({kind}): probability {value} is not within 0..=1")]
    Probability {
        index: usize,
        kind: FaultKind,
        value: f64,
    },
    #[error("fault #{index} ({kind}): at_percent [{lo}, {hi}] must satisfy 1 <= lo <= hi <= 99")]
    AtPercent {
        index: usize,
        kind: FaultKind,
        lo: u8,
        hi: u8,
    },
    #[error("fault #{index} ({kind}): {field} must be greater than 0")]
    NotPositive {
        index: usize,
        kind: FaultKind,
        field: &'static str,
    },
    #[error("fault #{index} ({kind}): `on = \"telemetry\"` is only meaningful for malformed_json")]
    TelemetryScope { index: usize, kind: FaultKind },
}

/// Every fault the simulator can inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// Report progress -1 (update failed) at `at_percent`.
    UpdateFailed,
    /// Abort the download at `at_percent` of the bytes and report -2.
    DownloadFailed,
    /// Report -3 after the download although the bytes matched.
    VerifyFailed,
    /// Report -4 while "writing".
    WriteFailed,
    /// Stop reporting anything for this upgrade at `at_percent` (the gateway's timeout fires).
    Hang,
    /// After "rebooting", report a version that is neither the source nor the target.
    WrongVersion,
    /// Disconnect at `at_percent`, stay offline `offline_secs`, come back and resume.
    Offline,
    /// Throttle the download to `bytes_per_sec`.
    SlowDownload,
    /// Drop the download connection at `at_percent`; the device resumes with an HTTP `Range`.
    InterruptDownload,
    /// Send every progress message twice.
    DuplicateProgress,
    /// Send progress messages pairwise swapped (step n+1 before step n).
    OutOfOrderProgress,
    /// Send a truncated (not JSON) message: one progress message of the upgrade (`on = "ota"`),
    /// or a property post (`on = "telemetry"`, drawn per post).
    MalformedJson,
}

impl FaultKind {
    pub const ALL: [FaultKind; 12] = [
        FaultKind::UpdateFailed,
        FaultKind::DownloadFailed,
        FaultKind::VerifyFailed,
        FaultKind::WriteFailed,
        FaultKind::Hang,
        FaultKind::WrongVersion,
        FaultKind::Offline,
        FaultKind::SlowDownload,
        FaultKind::InterruptDownload,
        FaultKind::DuplicateProgress,
        FaultKind::OutOfOrderProgress,
        FaultKind::MalformedJson,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::UpdateFailed => "update_failed",
            FaultKind::DownloadFailed => "download_failed",
            FaultKind::VerifyFailed => "verify_failed",
            FaultKind::WriteFailed => "write_failed",
            FaultKind::Hang => "hang",
            FaultKind::WrongVersion => "wrong_version",
            FaultKind::Offline => "offline",
            FaultKind::SlowDownload => "slow_download",
            FaultKind::InterruptDownload => "interrupt_download",
            FaultKind::DuplicateProgress => "duplicate_progress",
            FaultKind::OutOfOrderProgress => "out_of_order_progress",
            FaultKind::MalformedJson => "malformed_json",
        }
    }

    /// Faults that end the upgrade (at most one per upgrade; the first matching rule wins).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            FaultKind::UpdateFailed
                | FaultKind::DownloadFailed
                | FaultKind::VerifyFailed
                | FaultKind::WriteFailed
                | FaultKind::Hang
                | FaultKind::WrongVersion
        )
    }
}

impl std::fmt::Display for FaultKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a `malformed_json` rule applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultTarget {
    /// Drawn once per upgrade.
    #[default]
    Ota,
    /// Drawn once per property post.
    Telemetry,
}

/// One `[[faults]]` entry of a scenario.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultRule {
    pub kind: FaultKind,
    /// Chance per upgrade (per post for telemetry rules), 0..=1.
    pub probability: f64,
    /// Only upgrades of this module.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
    /// Only devices whose current version of the module is this (the upgrade's source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Only upgrades to this version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_version: Option<String>,
    /// Only devices whose name matches this glob (`*` any run, `?` one character).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<String>,
    /// Where in the upgrade the fault strikes, a percentage drawn uniformly from `[lo, hi]`.
    #[serde(default = "default_at_percent")]
    pub at_percent: [u8; 2],
    /// `offline`: how long the device stays away.
    #[serde(default = "default_offline_secs")]
    pub offline_secs: f64,
    /// `slow_download`: download speed.
    #[serde(default = "default_bytes_per_sec")]
    pub bytes_per_sec: u64,
    /// `wrong_version`: the version reported (default: `{target}-rogue`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_version: Option<String>,
    /// `malformed_json`: `ota` (default) or `telemetry`.
    #[serde(default)]
    pub on: FaultTarget,
}

fn default_at_percent() -> [u8; 2] {
    [10, 90]
}
fn default_offline_secs() -> f64 {
    10.0
}
fn default_bytes_per_sec() -> u64 {
    16 * 1024
}

impl FaultRule {
    /// A rule with default parameters and no scope.
    pub fn new(kind: FaultKind, probability: f64) -> Self {
        FaultRule {
            kind,
            probability,
            module: None,
            version: None,
            target_version: None,
            devices: None,
            at_percent: default_at_percent(),
            offline_secs: default_offline_secs(),
            bytes_per_sec: default_bytes_per_sec(),
            report_version: None,
            on: FaultTarget::Ota,
        }
    }

    /// Restricts the rule to device names matching `glob`.
    pub fn for_devices(mut self, glob: impl Into<String>) -> Self {
        self.devices = Some(glob.into());
        self
    }

    /// Restricts the rule to one module.
    pub fn for_module(mut self, module: impl Into<String>) -> Self {
        self.module = Some(module.into());
        self
    }

    /// Sets where the fault strikes.
    pub fn at(mut self, lo: u8, hi: u8) -> Self {
        self.at_percent = [lo, hi];
        self
    }

    fn validate(&self, index: usize) -> Result<(), FaultError> {
        let kind = self.kind;
        if !(0.0..=1.0).contains(&self.probability) || self.probability.is_nan() {
            return Err(FaultError::Probability {
                index,
                kind,
                value: self.probability,
            });
        }
        let [lo, hi] = self.at_percent;
        if lo == 0 || hi > 99 || lo > hi {
            return Err(FaultError::AtPercent {
                index,
                kind,
                lo,
                hi,
            });
        }
        if kind == FaultKind::Offline && !(self.offline_secs > 0.0 && self.offline_secs.is_finite())
        {
            return Err(FaultError::NotPositive {
                index,
                kind,
                field: "offline_secs",
            });
        }
        if kind == FaultKind::SlowDownload && self.bytes_per_sec == 0 {
            return Err(FaultError::NotPositive {
                index,
                kind,
                field: "bytes_per_sec",
            });
        }
        if self.on == FaultTarget::Telemetry && kind != FaultKind::MalformedJson {
            return Err(FaultError::TelemetryScope { index, kind });
        }
        Ok(())
    }

    fn matches(&self, ctx: &UpgradeContext<'_>) -> bool {
        self.on == FaultTarget::Ota
            && self.module.as_deref().is_none_or(|m| m == ctx.module)
            && self
                .version
                .as_deref()
                .is_none_or(|v| Some(v) == ctx.from_version)
            && self
                .target_version
                .as_deref()
                .is_none_or(|v| v == ctx.to_version)
            && self
                .devices
                .as_deref()
                .is_none_or(|g| glob_match(g, ctx.device_name))
    }

    fn matches_telemetry(&self, device_name: &str, versions: &[(&str, &str)]) -> bool {
        self.on == FaultTarget::Telemetry
            && self
                .devices
                .as_deref()
                .is_none_or(|g| glob_match(g, device_name))
            && match (&self.module, &self.version) {
                (None, None) => true,
                (m, v) => versions.iter().any(|(module, version)| {
                    m.as_deref().is_none_or(|m| m == *module)
                        && v.as_deref().is_none_or(|v| v == *version)
                }),
            }
    }
}

/// What identifies one upgrade attempt, for scoping and seeding.
#[derive(Debug, Clone, Copy)]
pub struct UpgradeContext<'a> {
    pub device_name: &'a str,
    pub module: &'a str,
    /// The device's current version of the module, if it has one.
    pub from_version: Option<&'a str>,
    pub to_version: &'a str,
    /// 0 for the first push of this target, then 1, 2, … (a retry draws afresh).
    pub attempt: u32,
}

/// The fault that ends an upgrade, with where it strikes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TerminalFault {
    UpdateFailed { at_percent: u8 },
    DownloadFailed { at_percent: u8 },
    VerifyFailed,
    WriteFailed,
    Hang { at_percent: u8 },
    WrongVersion { version: String },
}

impl TerminalFault {
    pub fn kind(&self) -> FaultKind {
        match self {
            TerminalFault::UpdateFailed { .. } => FaultKind::UpdateFailed,
            TerminalFault::DownloadFailed { .. } => FaultKind::DownloadFailed,
            TerminalFault::VerifyFailed => FaultKind::VerifyFailed,
            TerminalFault::WriteFailed => FaultKind::WriteFailed,
            TerminalFault::Hang { .. } => FaultKind::Hang,
            TerminalFault::WrongVersion { .. } => FaultKind::WrongVersion,
        }
    }
}

/// Everything that will go wrong during one upgrade attempt. `Default` = nothing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UpgradeFaults {
    pub terminal: Option<TerminalFault>,
    /// `(at_percent, how long)`.
    pub offline: Option<(u8, Duration)>,
    pub slow_bytes_per_sec: Option<u64>,
    pub interrupt_at_percent: Option<u8>,
    pub duplicate_progress: bool,
    pub out_of_order_progress: bool,
    pub malformed_at_percent: Option<u8>,
}

impl UpgradeFaults {
    /// The kinds drawn, in a stable order (for reports).
    pub fn kinds(&self) -> Vec<FaultKind> {
        let mut k = Vec::new();
        if let Some(t) = &self.terminal {
            k.push(t.kind());
        }
        if self.offline.is_some() {
            k.push(FaultKind::Offline);
        }
        if self.slow_bytes_per_sec.is_some() {
            k.push(FaultKind::SlowDownload);
        }
        if self.interrupt_at_percent.is_some() {
            k.push(FaultKind::InterruptDownload);
        }
        if self.duplicate_progress {
            k.push(FaultKind::DuplicateProgress);
        }
        if self.out_of_order_progress {
            k.push(FaultKind::OutOfOrderProgress);
        }
        if self.malformed_at_percent.is_some() {
            k.push(FaultKind::MalformedJson);
        }
        k
    }

    pub fn is_empty(&self) -> bool {
        *self == UpgradeFaults::default()
    }
}

/// The fault rules of a run plus its seed.
#[derive(Debug, Clone, Default)]
pub struct FaultPlan {
    seed: u64,
    rules: Vec<FaultRule>,
}

// Salts separate the RNG streams of different kinds of draws with the same identity.
const SALT_UPGRADE: u64 = 0x5550_4752_4144_4531; // "UPGRADE1"
const SALT_TELEMETRY: u64 = 0x5445_4c45_4d45_5431; // "TELEMET1"

impl FaultPlan {
    /// Checks the rules (probabilities, percentages, parameters).
    pub fn new(seed: u64, rules: Vec<FaultRule>) -> Result<Self, FaultError> {
        for (i, r) in rules.iter().enumerate() {
            r.validate(i)?;
        }
        Ok(FaultPlan { seed, rules })
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    pub fn rules(&self) -> &[FaultRule] {
        &self.rules
    }

    /// Draws the faults of one upgrade attempt. Deterministic in (seed, rules, `ctx`).
    ///
    /// Every rule consumes the same number of draws whether it matches or not, so changing the
    /// scope of one rule never changes what another rule decides.
    pub fn for_upgrade(&self, ctx: &UpgradeContext<'_>) -> UpgradeFaults {
        let mut rng = ChaCha8Rng::seed_from_u64(mix(&[
            self.seed,
            SALT_UPGRADE,
            fnv1a(ctx.device_name.as_bytes()),
            fnv1a(ctx.module.as_bytes()),
            fnv1a(ctx.to_version.as_bytes()),
            u64::from(ctx.attempt),
        ]));
        let mut f = UpgradeFaults::default();
        for rule in &self.rules {
            let roll: f64 = rng.gen();
            let [lo, hi] = rule.at_percent;
            let at: u8 = rng.gen_range(lo..=hi);
            if !(rule.matches(ctx) && roll < rule.probability) {
                continue;
            }
            match rule.kind {
                kind if kind.is_terminal() => {
                    if f.terminal.is_some() {
                        continue;
                    }
                    f.terminal = Some(match kind {
                        FaultKind::UpdateFailed => TerminalFault::UpdateFailed { at_percent: at },
                        FaultKind::DownloadFailed => {
                            TerminalFault::DownloadFailed { at_percent: at }
                        }
                        FaultKind::VerifyFailed => TerminalFault::VerifyFailed,
                        FaultKind::WriteFailed => TerminalFault::WriteFailed,
                        FaultKind::Hang => TerminalFault::Hang { at_percent: at },
                        _ => TerminalFault::WrongVersion {
                            version: rule
                                .report_version
                                .clone()
                                .unwrap_or_else(|| format!("{}-rogue", ctx.to_version)),
                        },
                    });
                }
                FaultKind::Offline => {
                    f.offline = Some((at, Duration::from_secs_f64(rule.offline_secs)));
                }
                FaultKind::SlowDownload => f.slow_bytes_per_sec = Some(rule.bytes_per_sec),
                FaultKind::InterruptDownload => f.interrupt_at_percent = Some(at),
                FaultKind::DuplicateProgress => f.duplicate_progress = true,
                FaultKind::OutOfOrderProgress => f.out_of_order_progress = true,
                FaultKind::MalformedJson => f.malformed_at_percent = Some(at),
                // Terminal kinds are handled by the guard above.
                _ => {}
            }
        }
        f
    }

    /// Whether property post number `seq` of a device goes out malformed.
    /// `versions` are the device's current `(module, version)` pairs, for scoping.
    pub fn malformed_post(&self, device_name: &str, versions: &[(&str, &str)], seq: u64) -> bool {
        let mut rng: Option<ChaCha8Rng> = None;
        for (i, rule) in self.rules.iter().enumerate() {
            if !rule.matches_telemetry(device_name, versions) {
                continue;
            }
            // Seeded lazily: most runs have no telemetry rule and pay nothing per post.
            let rng = rng.get_or_insert_with(|| {
                ChaCha8Rng::seed_from_u64(mix(&[
                    self.seed,
                    SALT_TELEMETRY,
                    fnv1a(device_name.as_bytes()),
                    seq,
                ]))
            });
            // One stream position per rule index keeps rules independent of each other.
            rng.set_word_pos(i as u128 * 16);
            if rng.gen::<f64>() < rule.probability {
                return true;
            }
        }
        false
    }

    /// Whether any rule applies to telemetry at all.
    pub fn has_telemetry_rules(&self) -> bool {
        self.rules.iter().any(|r| r.on == FaultTarget::Telemetry)
    }
}

/// A seeded RNG for one device's own choices (versions, jitter, telemetry values), independent
/// of the fault streams.
pub fn device_rng(seed: u64, device_name: &str, salt: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(mix(&[seed, salt, fnv1a(device_name.as_bytes())]))
}

/// FNV-1a: stable across Rust versions and platforms, unlike `DefaultHasher`.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Combines words into one seed (splitmix64 finaliser after each word).
fn mix(words: &[u64]) -> u64 {
    let mut h: u64 = 0x9e37_79b9_7f4a_7c15;
    for &w in words {
        h ^= w;
        h = h.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = h;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        h = z ^ (z >> 31);
    }
    h
}

/// Glob match with `*` (any run, also empty) and `?` (exactly one character).
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    // Position of the last `*` and the text index it was tried at (classic backtracking).
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx<'a>(dn: &'a str, attempt: u32) -> UpgradeContext<'a> {
        UpgradeContext {
            device_name: dn,
            module: "default",
            from_version: Some("1.0.0"),
            to_version: "2.0.0",
            attempt,
        }
    }

    fn all_kinds_plan(seed: u64, p: f64) -> FaultPlan {
        FaultPlan::new(
            seed,
            FaultKind::ALL
                .iter()
                .map(|&k| FaultRule::new(k, p))
                .collect(),
        )
        .unwrap()
    }

    #[test]
    fn deterministic_under_a_seed() {
        let a = all_kinds_plan(42, 0.3);
        let b = all_kinds_plan(42, 0.3);
        let c = all_kinds_plan(43, 0.3);
        let names: Vec<String> = (0..200).map(|i| format!("sim-{i:05}")).collect();
        let draw = |p: &FaultPlan| -> Vec<UpgradeFaults> {
            names.iter().map(|n| p.for_upgrade(&ctx(n, 0))).collect()
        };
        assert_eq!(draw(&a), draw(&b));
        assert_ne!(draw(&a), draw(&c), "another seed draws differently");
        // Drawing in another order (as another task interleaving would) changes nothing.
        let reversed: Vec<UpgradeFaults> = names
            .iter()
            .rev()
            .map(|n| a.for_upgrade(&ctx(n, 0)))
            .collect();
        let mut forward = draw(&a);
        forward.reverse();
        assert_eq!(forward, reversed);
        // A retry is a new draw.
        let retries: Vec<UpgradeFaults> = names.iter().map(|n| a.for_upgrade(&ctx(n, 1))).collect();
        assert_ne!(draw(&a), retries);
        // Telemetry draws too.
        let t = FaultPlan::new(
            7,
            vec![{
                let mut r = FaultRule::new(FaultKind::MalformedJson, 0.5);
                r.on = FaultTarget::Telemetry;
                r
            }],
        )
        .unwrap();
        let seqs: Vec<bool> = (0..100).map(|s| t.malformed_post("d", &[], s)).collect();
        let again: Vec<bool> = (0..100).map(|s| t.malformed_post("d", &[], s)).collect();
        assert_eq!(seqs, again);
    }

    #[test]
    fn probabilities_are_roughly_honoured() {
        let n = 20_000;
        for (p, kind) in [
            (0.05, FaultKind::DownloadFailed),
            (0.25, FaultKind::DuplicateProgress),
            (0.5, FaultKind::SlowDownload),
        ] {
            let plan = FaultPlan::new(1, vec![FaultRule::new(kind, p)]).unwrap();
            let hits = (0..n)
                .filter(|i| {
                    plan.for_upgrade(&ctx(&format!("d{i}"), 0))
                        .kinds()
                        .contains(&kind)
                })
                .count();
            let rate = hits as f64 / n as f64;
            // 20k Bernoulli draws: sd <= 0.0036; 5 sd of slack.
            assert!((rate - p).abs() < 0.02, "{kind}: {rate} vs {p}");
        }
        let mut tel = FaultRule::new(FaultKind::MalformedJson, 0.1);
        tel.on = FaultTarget::Telemetry;
        let plan = FaultPlan::new(9, vec![tel]).unwrap();
        let hits = (0..n)
            .filter(|&s| plan.malformed_post("dev", &[], s))
            .count();
        assert!((hits as f64 / n as f64 - 0.1).abs() < 0.02, "{hits}");
        // 0 and 1 are exact.
        let never = FaultPlan::new(1, vec![FaultRule::new(FaultKind::Hang, 0.0)]).unwrap();
        let always = FaultPlan::new(1, vec![FaultRule::new(FaultKind::Hang, 1.0)]).unwrap();
        for i in 0..1000 {
            let name = format!("d{i}");
            let c = ctx(&name, 0);
            assert!(never.for_upgrade(&c).is_empty());
            assert!(matches!(
                always.for_upgrade(&c).terminal,
                Some(TerminalFault::Hang { at_percent }) if (10..=90).contains(&at_percent)
            ));
        }
    }

    #[test]
    fn scoping_by_device_module_and_version() {
        let mut r = FaultRule::new(FaultKind::WriteFailed, 1.0)
            .for_devices("edge-*")
            .for_module("MCU");
        r.version = Some("1.0.0".into());
        r.target_version = Some("2.0.0".into());
        let plan = FaultPlan::new(3, vec![r]).unwrap();
        let mk = |dn, module, from, to| UpgradeContext {
            device_name: dn,
            module,
            from_version: from,
            to_version: to,
            attempt: 0,
        };
        let hit = |c: UpgradeContext<'_>| plan.for_upgrade(&c).terminal.is_some();
        assert!(hit(mk("edge-01", "MCU", Some("1.0.0"), "2.0.0")));
        assert!(!hit(mk("core-01", "MCU", Some("1.0.0"), "2.0.0")));
        assert!(!hit(mk("edge-01", "default", Some("1.0.0"), "2.0.0")));
        assert!(!hit(mk("edge-01", "MCU", Some("1.1.0"), "2.0.0")));
        assert!(!hit(mk("edge-01", "MCU", None, "2.0.0")));
        assert!(!hit(mk("edge-01", "MCU", Some("1.0.0"), "3.0.0")));

        // Telemetry scoping by version.
        let mut t = FaultRule::new(FaultKind::MalformedJson, 1.0);
        t.on = FaultTarget::Telemetry;
        t.version = Some("1.0.0".into());
        let plan = FaultPlan::new(3, vec![t]).unwrap();
        assert!(plan.malformed_post("x", &[("default", "1.0.0")], 0));
        assert!(!plan.malformed_post("x", &[("default", "2.0.0")], 0));
        // An OTA malformed rule never fires on telemetry and vice versa.
        let ota = FaultPlan::new(3, vec![FaultRule::new(FaultKind::MalformedJson, 1.0)]).unwrap();
        assert!(!ota.malformed_post("x", &[], 0));
        assert!(!plan
            .for_upgrade(&ctx("x", 0))
            .kinds()
            .contains(&FaultKind::MalformedJson));
    }

    #[test]
    fn rules_are_independent_of_each_others_scope() {
        // Rule 2's decisions must not change when rule 1 is scoped differently.
        let second = FaultRule::new(FaultKind::DuplicateProgress, 0.5);
        let a = FaultPlan::new(
            5,
            vec![FaultRule::new(FaultKind::SlowDownload, 0.5), second.clone()],
        )
        .unwrap();
        let b = FaultPlan::new(
            5,
            vec![
                FaultRule::new(FaultKind::SlowDownload, 0.5).for_devices("nobody"),
                second,
            ],
        )
        .unwrap();
        for i in 0..500 {
            let name = format!("d{i}");
            let c = ctx(&name, 0);
            assert_eq!(
                a.for_upgrade(&c).duplicate_progress,
                b.for_upgrade(&c).duplicate_progress
            );
        }
    }

    #[test]
    fn first_terminal_rule_wins_and_others_combine() {
        let plan = FaultPlan::new(
            1,
            vec![
                FaultRule::new(FaultKind::VerifyFailed, 1.0),
                FaultRule::new(FaultKind::WriteFailed, 1.0),
                FaultRule::new(FaultKind::InterruptDownload, 1.0).at(50, 50),
                FaultRule::new(FaultKind::OutOfOrderProgress, 1.0),
            ],
        )
        .unwrap();
        let f = plan.for_upgrade(&ctx("d", 0));
        assert_eq!(f.terminal, Some(TerminalFault::VerifyFailed));
        assert_eq!(f.interrupt_at_percent, Some(50));
        assert!(f.out_of_order_progress);
        assert_eq!(
            f.kinds(),
            [
                FaultKind::VerifyFailed,
                FaultKind::InterruptDownload,
                FaultKind::OutOfOrderProgress
            ]
        );
        let wrong = FaultPlan::new(1, vec![FaultRule::new(FaultKind::WrongVersion, 1.0)]).unwrap();
        assert_eq!(
            wrong.for_upgrade(&ctx("d", 0)).terminal,
            Some(TerminalFault::WrongVersion {
                version: "2.0.0-rogue".into()
            })
        );
    }

    #[test]
    fn invalid_rules_are_refused() {
        let bad = |r: FaultRule| FaultPlan::new(0, vec![r]).unwrap_err();
        assert!(matches!(
            bad(FaultRule::new(FaultKind::Hang, 1.5)),
            FaultError::Probability { .. }
        ));
        assert!(matches!(
            bad(FaultRule::new(FaultKind::Hang, f64::NAN)),
            FaultError::Probability { .. }
        ));
        assert!(matches!(
            bad(FaultRule::new(FaultKind::Hang, 0.1).at(0, 50)),
            FaultError::AtPercent { .. }
        ));
        assert!(matches!(
            bad(FaultRule::new(FaultKind::Hang, 0.1).at(60, 50)),
            FaultError::AtPercent { .. }
        ));
        let mut slow = FaultRule::new(FaultKind::SlowDownload, 0.1);
        slow.bytes_per_sec = 0;
        assert!(matches!(bad(slow), FaultError::NotPositive { .. }));
        let mut tel = FaultRule::new(FaultKind::Hang, 0.1);
        tel.on = FaultTarget::Telemetry;
        assert!(matches!(bad(tel), FaultError::TelemetryScope { .. }));
    }

    #[test]
    fn globs() {
        for (p, t, m) in [
            ("*", "", true),
            ("*", "abc", true),
            ("sim-*", "sim-0001", true),
            ("sim-*", "xsim-0001", false),
            ("sim-00?1", "sim-0011", true),
            ("sim-00?1", "sim-001", false),
            ("*-01", "edge-01", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
            ("exact", "exact", true),
            ("exact", "exactly", false),
        ] {
            assert_eq!(glob_match(p, t), m, "{p} vs {t}");
        }
    }
}
