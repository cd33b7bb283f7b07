//! What a firmware package's fields may hold, and the defaults `normalise` fills in.

use super::{FirmwareError, FirmwareSignMethod, NewFirmware, DEFAULT_MODULE, MAX_SRC_VERSIONS};

pub(super) fn invalid(field: &'static str, message: impl Into<String>) -> FirmwareError {
    FirmwareError::Invalid {
        field,
        message: message.into(),
    }
}

/// A version: 1..=64 printable ASCII characters (spaces allowed inside, not at the ends).
pub(super) fn check_version(field: &'static str, v: &str) -> Result<(), FirmwareError> {
    let ok = (1..=64).contains(&v.len())
        && v.bytes().all(|b| (0x20..=0x7e).contains(&b))
        && v.trim() == v;
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            "must be 1 to 64 printable ASCII characters without leading or trailing spaces",
        ))
    }
}

/// A module: 1..=64 of `[A-Za-z0-9_.-]`.
pub(super) fn check_module(m: &str) -> Result<(), FirmwareError> {
    let ok = (1..=64).contains(&m.len())
        && m.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            "module",
            "must be 1 to 64 characters of A-Z a-z 0-9 _ . -",
        ))
    }
}

/// The same shape as the registry's product keys: 1..=32 ASCII letters and digits.
pub(super) fn check_product_key(pk: &str) -> Result<(), FirmwareError> {
    if (1..=32).contains(&pk.len()) && pk.bytes().all(|b| b.is_ascii_alphanumeric()) {
        Ok(())
    } else {
        Err(invalid(
            "product_key",
            "must be 1 to 32 characters of A-Z a-z 0-9",
        ))
    }
}

pub(super) fn check_text(field: &'static str, v: &str, max: usize) -> Result<(), FirmwareError> {
    if v.trim().is_empty() {
        return Err(invalid(field, "must not be blank"));
    }
    if v.chars().count() > max || v.chars().any(char::is_control) {
        return Err(invalid(
            field,
            format!("must be at most {max} characters without control characters"),
        ));
    }
    Ok(())
}

/// Validates `new` and fills in the defaults: `(module, name, sign_method, src_versions)`.
pub(super) fn normalise(
    new: &NewFirmware,
) -> Result<(String, String, FirmwareSignMethod, Vec<String>), FirmwareError> {
    check_product_key(&new.product_key)?;
    check_version("version", &new.version)?;
    let module = match new.module.as_deref() {
        None | Some("") => DEFAULT_MODULE.to_owned(),
        Some(m) => {
            check_module(m)?;
            m.to_owned()
        }
    };
    let name = match new.name.as_deref() {
        None | Some("") => new.version.clone(),
        Some(n) => {
            check_text("name", n, 64)?;
            n.to_owned()
        }
    };
    if let Some(d) = &new.description {
        if d.chars().count() > 1024 {
            return Err(invalid("description", "must be at most 1024 characters"));
        }
    }
    if new.src_versions.len() > MAX_SRC_VERSIONS {
        return Err(invalid(
            "src_versions",
            format!("at most {MAX_SRC_VERSIONS} versions"),
        ));
    }
    let mut src_versions: Vec<String> = Vec::with_capacity(new.src_versions.len());
    for v in &new.src_versions {
        check_version("src_versions", v)?;
        if v == &new.version {
            return Err(invalid(
                "src_versions",
                "must not contain the package's own version",
            ));
        }
        if !src_versions.contains(v) {
            src_versions.push(v.clone());
        }
    }
    Ok((
        module,
        name,
        new.sign_method.unwrap_or(FirmwareSignMethod::Sha256),
        src_versions,
    ))
}
