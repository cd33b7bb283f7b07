//! What the app builds the engine with: its settings (the `[migration]` section) and the
//! hooks it calls out to (kick a moved device, set a target's data-sync bandwidth limit).

use serde::Deserialize;
use std::sync::Arc;

/// Engine settings (the `[migration]` section of the configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// Devices moved per second over all tasks (governor); 0 = unthrottled.
    pub devices_per_sec: u32,
    /// Devices moved per batch (one group-committed store transaction).
    pub batch_size: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            devices_per_sec: 500,
            batch_size: 256,
        }
    }
}

/// Called with `(product_key, device_name)` for a connected device that was moved, so the
/// broker drops its session and the device reconnects (into its new instance).
pub type KickFn = Arc<dyn Fn(&str, &str) + Send + Sync>;
/// Called with `(target_instance_id, bytes_per_sec)` when a task's data-sync bandwidth limit
/// applies (`Some`) or stops applying (`None`); the app wires it to the forwarder's limiter.
pub type RateLimitFn = Arc<dyn Fn(&str, Option<u64>) + Send + Sync>;

/// What the engine calls out to.
#[derive(Clone)]
pub struct Hooks {
    pub kick: KickFn,
    pub set_rate_limit: RateLimitFn,
}

impl Default for Hooks {
    fn default() -> Self {
        Hooks {
            kick: Arc::new(|_, _| {}),
            set_rate_limit: Arc::new(|_, _| {}),
        }
    }
}
