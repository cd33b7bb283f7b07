//! The `process_*` metrics every Prometheus client library exports (CPU time, memory, open
//! files, threads, start time), read from `/proc/self` at each scrape. Elsewhere than Linux
//! the family list is empty.

use prometheus_client::registry::Registry;

/// Adds the process collector to `registry` (unprefixed: the names are the standard ones).
pub(super) fn register(registry: &mut Registry) {
    #[cfg(target_os = "linux")]
    registry.register_collector(Box::new(linux::ProcessCollector));
    #[cfg(not(target_os = "linux"))]
    let _ = registry;
}

#[cfg(target_os = "linux")]
mod linux {
    use procfs::process::{LimitValue, Process};
    use prometheus_client::collector::Collector;
    use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
    use prometheus_client::metrics::counter::ConstCounter;
    use prometheus_client::metrics::gauge::ConstGauge;

    #[derive(Debug)]
    pub(super) struct ProcessCollector;

    impl Collector for ProcessCollector {
        fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
            // A reading that fails (procfs not mounted, a race with /proc) leaves its family
            // out of this scrape rather than failing the whole exposition.
            let Ok(me) = Process::myself() else {
                return Ok(());
            };
            let ticks = procfs::ticks_per_second() as f64;
            if let Ok(stat) = me.stat() {
                let cpu = ConstCounter::new((stat.utime + stat.stime) as f64 / ticks);
                cpu.encode(encoder.encode_descriptor(
                    "process_cpu_seconds",
                    "Total user and system CPU time spent in seconds",
                    None,
                    cpu.metric_type(),
                )?)?;
                gauge(
                    &mut encoder,
                    "process_virtual_memory_bytes",
                    "Virtual memory size in bytes",
                    stat.vsize as f64,
                )?;
                gauge(
                    &mut encoder,
                    "process_resident_memory_bytes",
                    "Resident memory size in bytes",
                    (stat.rss * procfs::page_size()) as f64,
                )?;
                gauge(
                    &mut encoder,
                    "process_threads",
                    "Number of OS threads in the process",
                    stat.num_threads as f64,
                )?;
                if let Ok(boot) = procfs::boot_time_secs() {
                    gauge(
                        &mut encoder,
                        "process_start_time_seconds",
                        "Start time of the process since the Unix epoch in seconds",
                        boot as f64 + stat.starttime as f64 / ticks,
                    )?;
                }
            }
            if let Ok(fds) = me.fd_count() {
                gauge(
                    &mut encoder,
                    "process_open_fds",
                    "Number of open file descriptors",
                    fds as f64,
                )?;
            }
            if let Ok(limits) = me.limits() {
                let max = match limits.max_open_files.soft_limit {
                    LimitValue::Value(v) => v as f64,
                    LimitValue::Unlimited => f64::INFINITY,
                };
                gauge(
                    &mut encoder,
                    "process_max_fds",
                    "Maximum number of open file descriptors",
                    max,
                )?;
            }
            Ok(())
        }
    }

    fn gauge(
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        value: f64,
    ) -> Result<(), std::fmt::Error> {
        let g = ConstGauge::new(value);
        g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
    }
}
