//! Field rules (the vendor's, so data imported from it fits) and generated identifiers.
//!
//! Every check returns [`RegistryError::Invalid`] naming the field, so the API can say which
//! one was wrong. Lengths count characters, not bytes.

use super::{RegistryError, Result};
use rand::distributions::{Alphanumeric, DistString, Distribution, Uniform};
use std::collections::BTreeMap;

pub const MAX_TAGS: usize = 100;

fn invalid(field: &'static str, message: impl Into<String>) -> RegistryError {
    RegistryError::Invalid {
        field,
        message: message.into(),
    }
}

fn check(
    field: &'static str,
    value: &str,
    min: usize,
    max: usize,
    allowed: fn(char) -> bool,
    what: &str,
) -> Result<()> {
    let len = value.chars().count();
    if len < min || len > max || !value.chars().all(allowed) {
        return Err(invalid(
            field,
            format!("must be {min} to {max} characters of {what}"),
        ));
    }
    Ok(())
}

/// 4..=32 of `[A-Za-z0-9_-@.:]`.
pub fn device_name(value: &str) -> Result<()> {
    check(
        "device_name",
        value,
        4,
        32,
        |c| c.is_ascii_alphanumeric() || "_-@.:".contains(c),
        "A-Z a-z 0-9 _ - @ . :",
    )
}

/// 1..=32 ASCII letters and digits, and not a topic namespace (`sys`, `ota`, …): a product
/// called `sys` would own other devices' `/sys/…` topics under the `/{pk}/{dn}/…` ACL rule.
pub fn product_key(value: &str) -> Result<()> {
    check(
        "product_key",
        value,
        1,
        32,
        |c| c.is_ascii_alphanumeric(),
        "A-Z a-z 0-9",
    )?;
    if crate::broker::acl::RESERVED_FIRST_SEGMENTS
        .iter()
        .any(|r| r.eq_ignore_ascii_case(value))
    {
        return Err(invalid(
            "product_key",
            format!("`{value}` is reserved (a topic namespace)"),
        ));
    }
    Ok(())
}

/// 1..=64 of `[A-Za-z0-9_-]`.
pub fn instance_id(value: &str) -> Result<()> {
    check(
        "instance_id",
        value,
        1,
        64,
        |c| c.is_ascii_alphanumeric() || c == '_' || c == '-',
        "A-Z a-z 0-9 _ -",
    )
}

/// A display name: 1..=64 characters, not blank, no control characters.
pub fn name(field: &'static str, value: &str) -> Result<()> {
    if value.trim().is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    check(field, value, 1, 64, |c| !c.is_control(), "printable text")
}

/// Optional product description: at most 100 characters, no control characters but newlines.
pub fn description(value: &str) -> Result<()> {
    check(
        "description",
        value,
        0,
        100,
        |c| !c.is_control() || c == '\n',
        "text",
    )
}

/// A given device secret: 1..=64 printable ASCII characters without spaces (it is an HMAC key
/// that devices type into config files; vendor-issued ones are 32 alphanumerics).
pub fn device_secret(value: &str) -> Result<()> {
    check(
        "device_secret",
        value,
        1,
        64,
        |c| c.is_ascii_graphic(),
        "printable ASCII without spaces",
    )
}

/// At most 100 tags; keys 1..=30 of `[A-Za-z0-9_.-]`, values at most 128 characters.
pub fn tags(tags: &BTreeMap<String, String>) -> Result<()> {
    if tags.len() > MAX_TAGS {
        return Err(RegistryError::TooMany {
            field: "tags",
            max: MAX_TAGS,
        });
    }
    for (key, value) in tags {
        check(
            "tags",
            key,
            1,
            30,
            |c| c.is_ascii_alphanumeric() || "_.-".contains(c),
            "A-Z a-z 0-9 _ . - (tag key)",
        )?;
        if value.chars().count() > 128 || value.chars().any(char::is_control) {
            return Err(invalid(
                "tags",
                format!("value of tag {key:?} must be at most 128 printable characters"),
            ));
        }
    }
    Ok(())
}

/// OTA module name as devices report it: 1..=64 of `[A-Za-z0-9_.-]`.
pub fn module(value: &str) -> Result<()> {
    check(
        "module",
        value,
        1,
        64,
        |c| c.is_ascii_alphanumeric() || "_.-".contains(c),
        "A-Z a-z 0-9 _ . -",
    )
}

/// A reported firmware version: 1..=64 printable characters.
pub fn version(value: &str) -> Result<()> {
    check(
        "version",
        value,
        1,
        64,
        |c| !c.is_control(),
        "printable text",
    )
}

/// Vendor-style product key: `a1` + 9 alphanumerics (11 in all).
pub fn generate_product_key() -> String {
    let mut key = String::with_capacity(11);
    key.push_str("a1");
    Alphanumeric.append_string(&mut rand::thread_rng(), &mut key, 9);
    key
}

/// 16 alphanumerics.
pub fn generate_product_secret() -> String {
    Alphanumeric.sample_string(&mut rand::thread_rng(), 16)
}

/// 32 alphanumerics (~190 bits from the OS-seeded CSPRNG).
pub fn generate_device_secret() -> String {
    Alphanumeric.sample_string(&mut rand::thread_rng(), 32)
}

/// Vendor-style instance id: `iot-` + 14 lowercase alphanumerics.
pub fn generate_instance_id() -> String {
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let pick = Uniform::from(0..CHARS.len());
    let mut rng = rand::thread_rng();
    let mut id = String::with_capacity(18);
    id.push_str("iot-");
    id.extend((0..14).map(|_| CHARS[pick.sample(&mut rng)] as char));
    id
}
