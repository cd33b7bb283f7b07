//! The two text formats `/metrics` speaks: OpenMetrics 1.0 (what `prometheus-client` renders)
//! and the Prometheus text format 0.0.4 (what `promtool check metrics`, older scrapers and
//! most ad-hoc parsers read), chosen by the scraper's `Accept` header.
//!
//! The 0.0.4 rendering is derived from the OpenMetrics one, line by line: the samples are the
//! same, only the metadata differs. A counter's family is named after its `_total` sample, an
//! info metric becomes a gauge named after its `_info` sample, and `# UNIT` and `# EOF` go.

use std::collections::HashMap;

/// A text exposition format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `application/openmetrics-text; version=1.0.0`.
    OpenMetrics,
    /// `text/plain; version=0.0.4`.
    Prometheus,
}

impl Format {
    /// The format an `Accept` header asks for: OpenMetrics when it names
    /// `application/openmetrics-text` with a weight at least that of any text/plain range
    /// (Prometheus itself sends `application/openmetrics-text;version=1.0.0,…,text/plain;
    /// version=0.0.4;q=0.5,*/*;q=0.1`); the Prometheus text format otherwise, including when
    /// there is no header (curl, browsers, `promtool`).
    pub fn negotiate(accept: Option<&str>) -> Format {
        let Some(accept) = accept else {
            return Format::Prometheus;
        };
        let (mut openmetrics, mut text) = (0.0_f32, 0.0_f32);
        for range in accept.split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or("").to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.split_once('='))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
                .and_then(|(_, v)| v.trim().parse::<f32>().ok())
                .unwrap_or(1.0)
                .clamp(0.0, 1.0);
            match media.as_str() {
                "application/openmetrics-text" => openmetrics = openmetrics.max(q),
                "text/plain" | "text/*" | "*/*" => text = text.max(q),
                _ => {}
            }
        }
        if openmetrics > 0.0 && openmetrics >= text {
            Format::OpenMetrics
        } else {
            Format::Prometheus
        }
    }

    /// The `Content-Type` of a body in this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// The Prometheus text format 0.0.4 of an OpenMetrics text exposition (as `prometheus-client`
/// renders it: counters, gauges, histograms and info metrics, no exemplars).
pub(crate) fn to_prometheus_text(openmetrics: &str) -> String {
    let types: HashMap<&str, &str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .collect();
    // A family's name in the 0.0.4 format, and its type there.
    let renamed = |name: &str| -> (String, &'static str) {
        match types.get(name).copied() {
            Some("counter") => (format!("{name}_total"), "counter"),
            Some("info") => (format!("{name}_info"), "gauge"),
            Some("gauge") => (name.to_owned(), "gauge"),
            Some("histogram") => (name.to_owned(), "histogram"),
            Some("summary") => (name.to_owned(), "summary"),
            Some("gaugehistogram") => (name.to_owned(), "histogram"),
            Some("stateset") => (name.to_owned(), "gauge"),
            _ => (name.to_owned(), "untyped"),
        }
    };
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            // OpenMetrics escapes `"` in HELP; the 0.0.4 format knows only `\\` and `\n`.
            let help = help.replace("\\\"", "\"");
            out.push_str(&format!("# HELP {} {help}\n", renamed(name).0));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split_once(' ').map_or(rest, |(n, _)| n);
            let (name, kind) = renamed(name);
            out.push_str(&format!("# TYPE {name} {kind}\n"));
        } else if line.starts_with('#') {
            // `# UNIT`, `# EOF`: not part of the 0.0.4 format.
        } else if !line.is_empty() {
            // An exemplar follows ` # ` after the value; 0.0.4 has none.
            let sample = line.split_once(" # ").map_or(line, |(s, _)| s);
            if is_created(sample, &types) {
                continue;
            }
            out.push_str(sample);
            out.push('\n');
        }
    }
    out
}

/// A `_created` sample of a counter or histogram (OpenMetrics only).
fn is_created(sample: &str, types: &HashMap<&str, &str>) -> bool {
    let name = sample.split(['{', ' ']).next().unwrap_or("");
    name.strip_suffix("_created")
        .is_some_and(|family| matches!(types.get(family), Some(&"counter" | &"histogram")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_follows_accept_weights() {
        let prometheus_scraper = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        let cases = [
            (None, Format::Prometheus),
            (Some("*/*"), Format::Prometheus),
            (Some("text/plain"), Format::Prometheus),
            (Some(prometheus_scraper), Format::OpenMetrics),
            (
                Some("application/openmetrics-text; version=1.0.0"),
                Format::OpenMetrics,
            ),
            (
                Some("text/plain;q=0.9, application/openmetrics-text;q=0.5"),
                Format::Prometheus,
            ),
            (
                Some("application/openmetrics-text;q=0, */*"),
                Format::Prometheus,
            ),
            (Some("garbage;;;q=x,,"), Format::Prometheus),
        ];
        for (accept, expected) in cases {
            assert_eq!(Format::negotiate(accept), expected, "{accept:?}");
        }
    }

    #[test]
    fn counters_and_info_are_renamed_for_the_text_format() {
        let om = "# HELP fg_connects Accepted \\\"CONNECTs\\\".\n\
                  # TYPE fg_connects counter\n\
                  fg_connects_total 3\n\
                  fg_connects_created 1700000000.0\n\
                  # HELP fg_build Build.\n\
                  # TYPE fg_build info\n\
                  fg_build_info{version=\"1.0\"} 1\n\
                  # HELP fg_lat Latency.\n\
                  # TYPE fg_lat histogram\n\
                  # UNIT fg_lat seconds\n\
                  fg_lat_sum 0.5\n\
                  fg_lat_count 1\n\
                  fg_lat_bucket{le=\"+Inf\"} 1 # {trace=\"x\"} 0.5\n\
                  # EOF\n";
        let text = to_prometheus_text(om);
        assert_eq!(
            text,
            "# HELP fg_connects_total Accepted \"CONNECTs\".\n\
             # TYPE fg_connects_total counter\n\
             fg_connects_total 3\n\
             # HELP fg_build_info Build.\n\
             # TYPE fg_build_info gauge\n\
             fg_build_info{version=\"1.0\"} 1\n\
             # HELP fg_lat Latency.\n\
             # TYPE fg_lat histogram\n\
             fg_lat_sum 0.5\n\
             fg_lat_count 1\n\
             fg_lat_bucket{le=\"+Inf\"} 1\n"
        );
    }
}
