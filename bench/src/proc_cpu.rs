//! CPU seconds of processes, from `/proc/{pid}/stat` (Linux).
//!
//! Shared by the benchmark harness (`fleetgate-bench`) and the in-process benchmarks of
//! `benches/` (included there by path): it needs nothing but std.

/// CPU seconds (user + system) of every process whose `/proc/{pid}/stat` `comm` is `name`, or of
/// this process (`None`). Processes that ended in between are not counted (the nodes hold their
/// PostgreSQL connections for the whole run). `/proc` counts in USER_HZ, 100 per second on
/// Linux whatever the kernel's own tick.
pub fn cpu_seconds(name: Option<&str>) -> f64 {
    let ticks = |stat: &str| -> Option<u64> {
        // Fields after the parenthesised comm: state is field 3, utime 14, stime 15.
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
    };
    let total: u64 = match name {
        None => std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| ticks(&s))
            .unwrap_or(0),
        Some(name) => std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
            .filter(|s| s.contains(&format!("({name})")))
            .filter_map(|s| ticks(&s))
            .sum(),
    };
    total as f64 / 100.0
}
