//! The registry's public value types: what the API serialises and what callers pass in.
//!
//! These are snapshots (owned copies); the live state stays inside [`super::Registry`].

use super::{RegistryError, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use utoipa::ToSchema;

/// Largest accepted `page_size`.
pub const MAX_PAGE_SIZE: u32 = 100;
/// `page_size` when none is given.
pub const DEFAULT_PAGE_SIZE: u32 = 20;

/// A validated page request: `page` is 1-based, `page_size` is `1..=100`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, ToSchema)]
pub struct Page {
    pub page: u32,
    pub page_size: u32,
}

impl Page {
    /// Checks the bounds; the error names the bad field (`page` or `page_size`).
    pub fn new(page: u32, page_size: u32) -> Result<Page> {
        if page == 0 {
            return Err(RegistryError::Invalid {
                field: "page",
                message: "must be at least 1".into(),
            });
        }
        if !(1..=MAX_PAGE_SIZE).contains(&page_size) {
            return Err(RegistryError::Invalid {
                field: "page_size",
                message: format!("must be between 1 and {MAX_PAGE_SIZE}"),
            });
        }
        Ok(Page { page, page_size })
    }

    /// Items to skip before this page.
    pub(crate) fn offset(&self) -> usize {
        (self.page as usize - 1).saturating_mul(self.page_size as usize)
    }
}

impl Default for Page {
    fn default() -> Self {
        Page {
            page: 1,
            page_size: DEFAULT_PAGE_SIZE,
        }
    }
}

/// One page of a list, in a stable order (by name).
#[derive(Serialize, Deserialize, Clone, Debug, ToSchema)]
pub struct Paged<T> {
    pub items: Vec<T>,
    /// Matching items over all pages.
    pub total: u64,
    pub page: u32,
    pub page_size: u32,
}

/// An instance: the top-level owner of products (and of data routing). `default` always exists.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, ToSchema)]
pub struct Instance {
    pub instance_id: String,
    pub name: String,
    pub created_at_ms: i64,
}

/// Request to create an instance; `instance_id` is generated (`iot-…`) when absent.
#[derive(Serialize, Deserialize, Clone, Debug, ToSchema)]
pub struct NewInstance {
    #[serde(default)]
    pub instance_id: Option<String>,
    pub name: String,
}

/// A product: a class of devices sharing a `product_key`. `Debug` leaves the secret out.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, ToSchema)]
pub struct Product {
    pub product_key: String,
    pub product_secret: String,
    pub name: String,
    pub instance_id: String,
    pub description: Option<String>,
    pub created_at_ms: i64,
    pub device_count: u64,
}

/// Request to create a product; key and secret are generated when absent, the instance
/// defaults to `default`.
#[derive(Serialize, Deserialize, Clone, Debug, ToSchema)]
pub struct NewProduct {
    pub name: String,
    #[serde(default)]
    pub product_key: Option<String>,
    #[serde(default)]
    pub instance_id: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
}

impl NewProduct {
    /// A product of the default instance with generated key and secret and no description.
    pub fn named(name: impl Into<String>) -> NewProduct {
        NewProduct {
            name: name.into(),
            product_key: None,
            instance_id: None,
            description: None,
        }
    }
}

/// A device as the registry holds it, secret included (the API decides who sees what).
/// `Debug` leaves the secret out.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, ToSchema)]
pub struct Device {
    pub product_key: String,
    pub device_name: String,
    pub device_secret: String,
    /// The instance that owns the device (and receives its data).
    pub instance_id: String,
    pub enabled: bool,
    pub tags: BTreeMap<String, String>,
    /// An authenticated MQTT session is open (always false right after a restart).
    pub online: bool,
    /// Cluster mode: the node holding the device's session (absent on a single node and
    /// while offline).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<u16>,
    /// Last connect or disconnect, ms since the Unix epoch.
    pub last_seen_ms: Option<i64>,
    /// Address of the last connection.
    pub client_ip: Option<String>,
    /// module -> last reported version.
    pub versions: BTreeMap<String, String>,
    pub created_at_ms: i64,
}

/// Request to create a device; the secret is generated (32 chars) when absent. `Debug` leaves
/// the secret out.
#[derive(Serialize, Deserialize, Clone, Default, ToSchema)]
pub struct NewDevice {
    pub device_name: String,
    #[serde(default)]
    pub device_secret: Option<String>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

// Secrets sign MQTT CONNECTs: a `{:?}` in a log line must not print one.
impl fmt::Debug for Product {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Product")
            .field("product_key", &self.product_key)
            .field("product_secret", &REDACTED)
            .field("name", &self.name)
            .field("instance_id", &self.instance_id)
            .field("description", &self.description)
            .field("created_at_ms", &self.created_at_ms)
            .field("device_count", &self.device_count)
            .finish()
    }
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Device")
            .field("product_key", &self.product_key)
            .field("device_name", &self.device_name)
            .field("device_secret", &REDACTED)
            .field("instance_id", &self.instance_id)
            .field("enabled", &self.enabled)
            .field("tags", &self.tags)
            .field("online", &self.online)
            .field("last_seen_ms", &self.last_seen_ms)
            .field("client_ip", &self.client_ip)
            .field("versions", &self.versions)
            .field("created_at_ms", &self.created_at_ms)
            .finish()
    }
}

impl fmt::Debug for NewDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewDevice")
            .field("device_name", &self.device_name)
            .field(
                "device_secret",
                &self.device_secret.as_ref().map(|_| REDACTED),
            )
            .field("tags", &self.tags)
            .finish()
    }
}

/// What `Debug` prints instead of a secret.
pub(crate) const REDACTED: &str = "<redacted>";

/// Partial update; absent fields stay as they are. `tags` replaces the whole set.
#[derive(Serialize, Deserialize, Clone, Debug, Default, ToSchema)]
pub struct DeviceUpdate {
    #[serde(default)]
    pub enabled: Option<bool>,
    #[serde(default)]
    pub tags: Option<BTreeMap<String, String>>,
}

/// Device list filter. `tag_key` alone matches devices having that tag; with `tag_value` the
/// value must match too.
#[derive(Serialize, Deserialize, Clone, Debug, Default, ToSchema)]
pub struct DeviceFilter {
    #[serde(default)]
    pub online: Option<bool>,
    #[serde(default)]
    pub tag_key: Option<String>,
    #[serde(default)]
    pub tag_value: Option<String>,
}

impl DeviceFilter {
    pub(crate) fn validate(&self) -> Result<()> {
        if self.tag_value.is_some() && self.tag_key.is_none() {
            return Err(RegistryError::Invalid {
                field: "tag_value",
                message: "needs tag_key".into(),
            });
        }
        Ok(())
    }
}

/// Outcome of one row of a batch create, in input order. Serialised with a `status` tag:
/// `{"status":"created", …device}` or
/// `{"status":"failed","row":3,"device_name":"x","error_code":"FG.InvalidParameter","message":"…"}`.
#[derive(Serialize, Deserialize, Clone, Debug, ToSchema)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum RowResult {
    Created(Device),
    Failed {
        /// 1-based position of the row in the request.
        row: usize,
        device_name: String,
        /// Same codes as [`RegistryError::code`].
        error_code: String,
        message: String,
    },
}
