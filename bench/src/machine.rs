//! What the machine under a benchmark run is: cores, memory, kernel, limits, load.

use serde::Serialize;

#[derive(Serialize)]
pub(crate) struct Machine {
    pub nproc: usize,
    pub mem_total_mib: u64,
    pub kernel: String,
    pub cpu_model: String,
    pub nofile_limit: u64,
    pub ephemeral_ports: String,
}

/// The 1-minute load average: other work on the machine skews every number.
pub(crate) fn load1() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

pub(crate) fn machine(nofile: u64) -> Machine {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu_model = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|r| r.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let mem_total_mib = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|r| r.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
        / 1024;
    Machine {
        nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
        mem_total_mib,
        kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
        cpu_model,
        nofile_limit: nofile,
        ephemeral_ports: read("/proc/sys/net/ipv4/ip_local_port_range")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join("-"),
    }
}
