//! `[ota]`: firmware package limits, download links and upgrade pushes.

use serde::{Deserialize, Serialize};

/// `[ota]`: firmware packages and upgrade pushes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OtaSettings {
    /// Largest firmware package accepted by an upload, bytes (default 256 MiB).
    pub max_firmware_bytes: u64,
    /// How long a firmware download link sent to a device stays valid, seconds (default 24 h).
    pub download_url_ttl_secs: u64,
    /// After a device connects, wait this long before pushing an upgrade to it, ms (it
    /// subscribes after the CONNACK; a version report from the device ends the wait early).
    pub connect_push_delay_ms: u64,
    /// Progress-percent updates are written in batches this often, ms.
    pub progress_flush_ms: u64,
}

impl Default for OtaSettings {
    fn default() -> Self {
        OtaSettings {
            max_firmware_bytes: 256 * 1024 * 1024,
            download_url_ttl_secs: 24 * 3600,
            connect_push_delay_ms: 1_000,
            progress_flush_ms: 200,
        }
    }
}
