//! Device observers: components that keep their own records about devices (OTA tasks,
//! migration per-device status) are told about device changes, whoever made them (API, batch,
//! import, tests calling the registry directly).
//!
//! An observer is called after the change is durable and is awaited: when a registry call
//! returns, every observer has handled it (so `DELETE …/devices/{dn}` answers 204 only once the
//! device's OTA tasks are canceled). Observers must not call back into the registry's mutating
//! device methods (that would recurse); reads are fine. A crash between the registry's commit
//! and an observer's own commit is the observer's to repair at start (both engines do).

use std::future::Future;
use std::pin::Pin;

/// A change of the set of devices or of what selects them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceChange {
    /// Devices were created (one, a batch, or an import).
    Created {
        product_key: String,
        device_names: Vec<String>,
    },
    /// A device's tags were replaced by different ones.
    TagsChanged {
        product_key: String,
        device_name: String,
    },
    /// The device was disabled (it was enabled before): through this node's registry (the
    /// API, an import) or, in cluster mode, through another node (applied from the change
    /// feed or a resync).
    Disabled {
        product_key: String,
        device_name: String,
    },
    /// The device was deleted.
    Deleted {
        product_key: String,
        device_name: String,
        /// The instance that owned it until then (its data's destination), which the registry
        /// no longer knows once the device is gone.
        instance_id: String,
        /// Deleted through another node (cluster mode: applied from the change feed or a
        /// resync): that node's transaction already removed what the store had of the device,
        /// so an observer only drops what it keeps in memory.
        elsewhere: bool,
    },
}

/// The future an observer returns.
pub type ObserverFuture<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// Something that keeps records about devices. Hold engines weakly (`Weak`) in the
/// implementation: the registry holds its observers, and engines hold the registry.
pub trait DeviceObserver: Send + Sync + 'static {
    fn device_changed<'a>(&'a self, change: &'a DeviceChange) -> ObserverFuture<'a>;
}
