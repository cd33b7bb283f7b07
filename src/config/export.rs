//! `[export]`: export/import job rates, in-flight and package limits, the secrets KDF cost.

use serde::{Deserialize, Serialize};

/// `[export]`: export/import jobs (see docs/EXPORT.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExportSettings {
    /// Export/import starts per minute (governor bucket refill).
    pub start_per_minute: u32,
    /// Starts allowed at once before the rate applies.
    pub start_burst: u32,
    /// Status/log/package reads per second.
    pub reads_per_second: u32,
    pub reads_burst: u32,
    /// Jobs running at once; more starts get 429.
    pub max_jobs_in_flight: usize,
    /// Package bytes held by running jobs; more gets 429.
    pub max_bytes_in_flight: u64,
    /// Largest import upload, bytes (default 512 MiB; imports are verified in memory).
    pub max_package_bytes: u64,
    /// Largest file an import package may unpack to, in real inflated bytes (default
    /// 256 MiB, like `ota.max_firmware_bytes`); a larger one refuses the package with 413.
    pub max_unpacked_entry_bytes: u64,
    /// Most an import package may unpack to, all files together (default 1 GiB); beyond it
    /// the package is refused with 413.
    pub max_unpacked_bytes: u64,
    /// PBKDF2 iterations for the secrets key of new packages.
    pub kdf_iterations: u32,
}

impl Default for ExportSettings {
    fn default() -> Self {
        ExportSettings {
            start_per_minute: 30,
            start_burst: 10,
            reads_per_second: 50,
            reads_burst: 200,
            max_jobs_in_flight: 4,
            max_bytes_in_flight: 1024 * 1024 * 1024,
            max_package_bytes: 512 * 1024 * 1024,
            max_unpacked_entry_bytes: 256 * 1024 * 1024,
            max_unpacked_bytes: 1024 * 1024 * 1024,
            kdf_iterations: 100_000,
        }
    }
}
