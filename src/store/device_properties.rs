//! The latest-properties document of a device ([`DEVICE_PROPERTIES`](super::DEVICE_PROPERTIES),
//! written by `crate::command::properties`) and the rule both backends apply when one is
//! written over another ([`Op::PutDeviceProperties`](super::Op::PutDeviceProperties)): per
//! property, the value with the newer device time stays — the rule the snapshot keeps in
//! memory. In cluster mode several nodes write a device's document (the device moved, or
//! reconnected elsewhere): each writes what it has in memory, and no write replaces a newer
//! value with an older one or drops a property the writer never saw.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// One property's latest value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PropertySnapshot {
    #[schema(value_type = Object)]
    pub value: Value,
    /// The device's time of the value (its `time`, or the receive time when it sent none), ms
    /// since the Unix epoch.
    pub time: u64,
    /// When the gateway received it, ms since the Unix epoch.
    pub received_at_ms: i64,
}

impl PropertySnapshot {
    /// Whether a value of device time `time` replaces this one: unless this one is newer (a
    /// device sending buffered, older readings after fresh ones does not roll it back).
    pub fn replaced_by(&self, time: u64) -> bool {
        self.time <= time
    }
}

/// A device's latest properties as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PropertiesDocument {
    pub product_key: String,
    pub device_name: String,
    pub properties: BTreeMap<String, PropertySnapshot>,
}

/// Puts every property of `from` into `into` unless `into` has it with a newer device time.
pub fn merge_properties(
    into: &mut BTreeMap<String, PropertySnapshot>,
    from: BTreeMap<String, PropertySnapshot>,
) {
    for (name, snapshot) in from {
        match into.get_mut(&name) {
            Some(old) if !old.replaced_by(snapshot.time) => {}
            Some(old) => *old = snapshot,
            None => {
                into.insert(name, snapshot);
            }
        }
    }
}

/// The body to store when `written` is written over the stored `stored`: the properties of
/// both, each with the newer device time (a tie goes to `written`). A body that is not a
/// properties document is not merged: an unreadable `stored` is replaced (and logged), an
/// unreadable `written` is stored as it is.
pub(crate) fn merged_body(stored: &str, written: &str) -> String {
    if stored == written {
        return written.to_owned();
    }
    let Ok(mut new) = serde_json::from_str::<PropertiesDocument>(written) else {
        return written.to_owned();
    };
    let old = match serde_json::from_str::<PropertiesDocument>(stored) {
        Ok(old) => old,
        Err(error) => {
            tracing::warn!(%error, product_key = %new.product_key, device_name = %new.device_name,
                "unreadable stored properties snapshot replaced");
            return written.to_owned();
        }
    };
    let mut properties = old.properties;
    merge_properties(&mut properties, std::mem::take(&mut new.properties));
    new.properties = properties;
    serde_json::to_string(&new).unwrap_or_else(|_| written.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(properties: &[(&str, Value, u64)]) -> String {
        let properties = properties
            .iter()
            .map(|(name, value, time)| {
                let snapshot = PropertySnapshot {
                    value: value.clone(),
                    time: *time,
                    received_at_ms: *time as i64 + 1,
                };
                ((*name).to_owned(), snapshot)
            })
            .collect();
        serde_json::to_string(&PropertiesDocument {
            product_key: "pk".into(),
            device_name: "dn".into(),
            properties,
        })
        .unwrap()
    }

    #[test]
    fn a_write_keeps_the_newer_value_of_each_property_and_the_others() {
        let stored = body(&[
            ("A", json!(2), 20),
            ("B", json!("b"), 5),
            ("C", json!(1), 7),
        ]);
        let written = body(&[("A", json!(1), 10), ("C", json!(3), 7), ("D", json!(4), 1)]);
        let merged: PropertiesDocument =
            serde_json::from_str(&merged_body(&stored, &written)).unwrap();
        let want: PropertiesDocument = serde_json::from_str(&body(&[
            ("A", json!(2), 20),
            ("B", json!("b"), 5),
            ("C", json!(3), 7),
            ("D", json!(4), 1),
        ]))
        .unwrap();
        assert_eq!(merged, want);
    }

    #[test]
    fn bodies_that_are_not_documents_are_replaced() {
        let written = body(&[("A", json!(1), 10)]);
        assert_eq!(merged_body("{\"v\":1}", &written), written);
        assert_eq!(merged_body(&written, "{\"v\":2}"), "{\"v\":2}");
    }
}
