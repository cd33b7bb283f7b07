//! The Markdown tables printed at the end of a run.

use crate::connect::ConnectRow;
use crate::ingest::IngestRow;
use crate::procs::Kind;
use crate::stats::median;
use crate::{cluster, forward, Args, Results};

fn print_campaigns(r: &Results) {
    println!("\n## OTA campaign (every run)\n");
    println!(
        "| run | deployment | devices | rate/min | job | to COMPLETED s | mismatches | statistics match | \
         pushes per whole minute | max deviation % | mean rate/min | repushes | RSS before MiB | \
         with tasks MiB | peak MiB | MiB per 10,000 tasks | PostgreSQL commits/s | rows/s | load start–end |"
    );
    println!("|---:|---|---:|---:|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    let opt = |v: Option<f64>| v.map_or("–".to_owned(), |v| format!("{v:.0}"));
    for o in &r.ota {
        println!(
            "| {} | {} | {} | {} | {} | {:.1} | {} | {} | {:?} | {:.2} | {:.0} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {:.1}–{:.1} |",
            o.run,
            o.deployment,
            o.settings.devices,
            o.settings.rate_per_minute,
            o.job_status,
            o.completion_secs,
            o.mismatches,
            o.statistics_match,
            o.pushes_per_minute,
            o.max_minute_deviation_pct,
            o.mean_rate_per_minute,
            o.repushes,
            o.gateway_rss_before_kib as f64 / 1024.0,
            o.gateway_rss_with_tasks_kib as f64 / 1024.0,
            o.gateway_rss_peak_kib as f64 / 1024.0,
            o.mib_per_10k_tasks,
            opt(o.pg_commits_per_s),
            opt(o.pg_rows_per_s),
            o.load1_start,
            o.load1_end,
        );
    }
    for o in &r.ota {
        println!("\nrun {}: expected {:?}", o.run, o.expected);
        println!("run {}: observed {:?}", o.run, o.observed);
    }
}

fn print_migrations(r: &Results) {
    println!("\n## Migration of connected devices (every run)\n");
    println!(
        "| run | devices | devices_per_sec | full → COMPLETED s | devices/s | full → all online s | \
         MIGRATED | online in target | reconnected | refused | RSS before → after (→ after rollback) MiB | load start–end |"
    );
    println!("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|");
    for m in &r.migration {
        println!(
            "| {} | {} | {} | {:.2} | {:.0} | {:.2} | {} | {} | {} | {} | {:.1} → {:.1}{} | {:.1}–{:.1} |",
            m.run,
            m.devices,
            m.devices_per_sec
                .map_or_else(|| "default".to_owned(), |r| r.to_string()),
            m.full_to_completed_secs,
            m.devices_per_sec_measured,
            m.full_to_all_online_secs,
            m.migrated,
            m.online_in_target,
            m.reconnected,
            m.connect_refused,
            m.gateway_rss_before_kib as f64 / 1024.0,
            m.gateway_rss_kib as f64 / 1024.0,
            m.gateway_rss_after_rollback_kib
                .map_or_else(String::new, |k| format!(" → {:.1}", k as f64 / 1024.0)),
            m.load1_start,
            m.load1_end,
        );
    }
}

/// The connections table (median of runs).
fn print_connections(args: &Args, r: &Results) {
    println!("\n## Connections (median of {} runs)\n", args.runs);
    println!(
        "| broker | clients | connected | failed | connects/s | handshake p50 ms | p99 ms | \
         RSS MiB | baseline MiB | MiB/1000 | MiB/1000 over baseline | dropped idle | load |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut seen: Vec<(Kind, bool, usize)> = Vec::new();
    for c in &r.connect {
        let k = (c.broker, c.subscribed, c.clients);
        if !seen.contains(&k) {
            seen.push(k);
        }
    }
    seen.sort_by_key(|(kind, sub, n)| (*sub, *kind as u8, *n));
    for (kind, sub, n) in seen {
        let rows: Vec<&ConnectRow> = r
            .connect
            .iter()
            .filter(|c| c.broker == kind && c.clients == n && c.subscribed == sub)
            .collect();
        let med = |f: &dyn Fn(&ConnectRow) -> f64| median(rows.iter().map(|c| f(c)));
        println!(
            "| {}{} | {n} | {:.0} | {:.0} (max {}) | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.2} | {:.0} | {:.1} |",
            kind.label(),
            if sub { ", subscribed" } else { "" },
            med(&|c| c.stats.connected as f64),
            med(&|c| c.stats.failed as f64),
            rows.iter().map(|c| c.stats.failed).max().unwrap_or(0),
            med(&|c| c.stats.rate_per_s),
            med(&|c| c.stats.handshake.p50_ms),
            med(&|c| c.stats.handshake.p99_ms),
            med(&|c| c.rss_kib as f64 / 1024.0),
            med(&|c| c.baseline_rss_kib as f64 / 1024.0),
            med(&|c| c.mib_per_1000),
            med(&|c| c.mib_per_1000_over_baseline),
            med(&|c| c.dropped_while_idle as f64),
            med(&|c| c.load1),
        );
    }
}

/// The ingest and relay table (median of runs), and each gateway scenario's rate against each
/// stock-rumqttd relay's.
fn print_ingest(args: &Args, r: &Results) {
    println!("\n## Ingest and relay (median of {} runs)\n", args.runs);
    println!(
        "| scenario | msg/s | broker CPU µs/msg | PUBACK p50 ms | p99 ms | sent | acked | processed | \
         lost (sum of runs) | stored = last reported | RSS MiB | load |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut names: Vec<String> = Vec::new();
    for row in &r.ingest {
        if !names.contains(&row.scenario) {
            names.push(row.scenario.clone());
        }
    }
    for name in &names {
        let rows: Vec<&IngestRow> = r.ingest.iter().filter(|i| &i.scenario == name).collect();
        let med = |f: &dyn Fn(&IngestRow) -> f64| median(rows.iter().map(|c| f(c)));
        let stored = rows
            .iter()
            .filter_map(|i| i.stored_ok.zip(i.devices_checked))
            .map(|(o, c)| format!("{o}/{c}"))
            .collect::<Vec<_>>();
        println!(
            "| {name} | {:.0} | {:.2} | {:.1} | {:.1} | {:.0} | {:.0} | {:.0} | {} | {} | {:.0} | {:.1} |",
            med(&|i| i.rate),
            med(&|i| i.cpu_us_per_msg),
            med(&|i| i.flood.latency.p50_ms),
            med(&|i| i.flood.latency.p99_ms),
            med(&|i| i.flood.sent as f64),
            med(&|i| i.flood.acked as f64),
            med(&|i| i.processed as f64),
            rows.iter().map(|i| i.lost).sum::<u64>(),
            if stored.is_empty() {
                "—".to_owned()
            } else {
                stored.join(", ")
            },
            med(&|i| i.rss_kib as f64 / 1024.0),
            med(&|i| i.load1),
        );
    }
    // Every gateway scenario against every stock-rumqttd relay of the same run (medians).
    let rate_of = |needle: &str| -> f64 {
        median(
            r.ingest
                .iter()
                .filter(|i| i.scenario == needle)
                .map(|i| i.rate),
        )
    };
    let relay_prefix = format!("{} relay", Kind::Rumqttd.label());
    println!();
    for gw in names.iter().filter(|n| n.starts_with("fleetgate")) {
        for relay in names.iter().filter(|n| n.starts_with(&relay_prefix)) {
            let (a, b) = (rate_of(gw), rate_of(relay));
            if a.is_finite() && b.is_finite() && b > 0.0 {
                println!("- {gw} / {relay}: **{:.0}%**", a / b * 100.0);
            }
        }
    }
}

/// Every table of the run's parts.
pub(crate) fn print(args: &Args, r: &Results) {
    cluster::print_report(args, r);
    forward::print_report(r);
    crate::console::print_report(r);
    crate::c2d::print_report(r);
    if !r.ota.is_empty() {
        print_campaigns(r);
    }
    if !r.migration.is_empty() {
        print_migrations(r);
    }
    if r.connect.is_empty() && r.ingest.is_empty() {
        for n in &r.notes {
            println!("- note: {n}");
        }
        return;
    }
    print_connections(args, r);
    print_ingest(args, r);
    for n in &r.notes {
        println!("- note: {n}");
    }
}
