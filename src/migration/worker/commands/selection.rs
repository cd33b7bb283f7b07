//! The device selection of a canary or a picked rollback: one check for both, so the two can
//! only differ in which devices they want (see [`Purpose`]).

use crate::migration::model::*;
use crate::migration::MigrationError;
use crate::registry::Registry;
use std::collections::HashMap;

/// What a selection is for, which decides the devices it may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Purpose {
    /// Devices not in the target yet.
    Canary,
    /// Devices in the target.
    Rollback,
}

impl Purpose {
    /// Why a device owned by `owner` cannot be selected for this purpose, if it cannot.
    fn refusal(self, dn: &str, owner: &str, target: &str) -> Option<String> {
        match (self, owner == target) {
            (Purpose::Canary, true) => {
                Some(format!("device {dn:?} is already in the target instance"))
            }
            (Purpose::Rollback, false) => Some(format!(
                "device {dn:?} is not migrated; nothing to roll back"
            )),
            _ => None,
        }
    }

    fn empty_message(self) -> &'static str {
        match self {
            Purpose::Canary => "at least one device is required",
            Purpose::Rollback => "at least one device is required (or {\"all\":true})",
        }
    }
}

/// Checks the `device_names` of a canary or a picked rollback of the task `doc`: not empty, at
/// most [`MAX_PICKED`], then each row (see [`check_selection`]). Returns the accepted names in
/// input order and the refused rows; an error when no row is usable.
pub(super) fn select(
    registry: &Registry,
    doc: &TaskDoc,
    names: Vec<String>,
    purpose: Purpose,
) -> Result<(Vec<String>, Vec<RejectedRow>), MigrationError> {
    if names.is_empty() {
        return Err(MigrationError::Invalid {
            field: "device_names",
            message: purpose.empty_message().into(),
        });
    }
    if names.len() > MAX_PICKED {
        return Err(MigrationError::TooMany {
            field: "device_names",
            max: MAX_PICKED,
        });
    }
    let target = doc.target_instance_id.as_str();
    let (accepted, rejected) = check_selection(registry, &doc.product_key, names, |dn, owner| {
        purpose.refusal(dn, owner, target).map_or(Ok(()), Err)
    });
    if accepted.is_empty() {
        return Err(no_device_selected("device_names", &rejected));
    }
    Ok((accepted, rejected))
}

/// Checks a device-name selection against the product: duplicates, unknown names, and
/// `eligible` (why a known device cannot be selected). Returns the accepted names in input
/// order and the refused rows.
fn check_selection(
    registry: &Registry,
    pk: &str,
    names: Vec<String>,
    mut eligible: impl FnMut(&str, &str) -> Result<(), String>,
) -> (Vec<String>, Vec<RejectedRow>) {
    let mut first_row: HashMap<String, usize> = HashMap::with_capacity(names.len());
    let mut accepted = Vec::with_capacity(names.len());
    let mut rejected = Vec::new();
    for (i, dn) in names.into_iter().enumerate() {
        let row = i + 1;
        let reject = |code: &str, msg: String| RejectedRow {
            row,
            device_name: dn.clone(),
            error_code: code.to_owned(),
            error_msg: msg,
        };
        if dn.is_empty() {
            rejected.push(reject("FG.1001", "empty device name".into()));
            continue;
        }
        if let Some(first) = first_row.get(&dn) {
            rejected.push(reject(
                "FG.1001",
                format!("duplicate: {dn:?} already appears at row {first}"),
            ));
            continue;
        }
        first_row.insert(dn.clone(), row);
        match registry.device_instance(pk, &dn) {
            None => rejected.push(reject(
                "FG.2003",
                format!("device {dn:?} not found in product {pk}"),
            )),
            Some(owner) => match eligible(&dn, &owner) {
                Ok(()) => accepted.push(dn),
                Err(why) => rejected.push(reject("FG.1001", why)),
            },
        }
    }
    (accepted, rejected)
}
fn no_device_selected(field: &'static str, rejected: &[RejectedRow]) -> MigrationError {
    let examples: Vec<String> = rejected
        .iter()
        .take(3)
        .map(|r| format!("row {}: {}", r.row, r.error_msg))
        .collect();
    MigrationError::Invalid {
        field,
        message: format!(
            "no usable device in the selection ({} refused; {})",
            rejected.len(),
            examples.join("; ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::Purpose;

    #[test]
    fn each_purpose_refuses_the_other_side_of_the_target() {
        let cases = [
            (Purpose::Canary, "source", None),
            (
                Purpose::Canary,
                "target",
                Some("device \"d\" is already in the target instance"),
            ),
            (
                Purpose::Rollback,
                "source",
                Some("device \"d\" is not migrated; nothing to roll back"),
            ),
            (Purpose::Rollback, "target", None),
        ];
        for (purpose, owner, want) in cases {
            assert_eq!(
                purpose.refusal("d", owner, "target").as_deref(),
                want,
                "{purpose:?} of a device in {owner}"
            );
        }
        assert!(!Purpose::Canary.empty_message().contains("all"));
        assert!(Purpose::Rollback
            .empty_message()
            .contains(r#"{"all":true}"#));
    }
}
