//! Bearer-token authentication and the role split.
//!
//! Roles, from least to most powerful:
//!
//! | role | may |
//! |---|---|
//! | `viewer` | `GET`/`HEAD` only: read instances, products, devices — never a secret |
//! | `operator` | everything a viewer may, plus day-to-day fleet work: create/batch-create/update/enable/disable/delete devices and read their secrets (`…/devices/{dn}/secret`), firmware, OTA jobs, migrations, consumer groups, export/import of what it may create |
//! | `admin` | everything: also create instances, create and delete products, read product secrets (`/products/{pk}/secret`) |
//!
//! Unauthenticated: `/healthz`, `/metrics` and `/api/v1/openapi.json` only. Every other
//! `/api/v1` route sits behind [`authenticate`], which answers 401 (with
//! `WWW-Authenticate: Bearer`) without a known token and 403 when a viewer tries anything but a
//! read — so no write is ever anonymous or read-only-role. Handlers that need more than
//! `operator` take [`RequireAdmin`]; write handlers also take [`RequireOperator`] so that a route
//! accidentally mounted outside the middleware still refuses.
//!
//! Tokens are never stored or compared in the clear: the set keeps SHA-256 digests and a lookup
//! compares the presented token's digest with every entry in constant time (no early exit, no
//! length leak).

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use utoipa::ToSchema;

use super::error::ApiError;

/// Name of the admin token file inside the data dir.
pub const TOKEN_FILE: &str = "api-token";

/// What a token may do. Ordered: `Viewer < Operator < Admin`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name that is not `viewer`, `operator` or `admin`.
#[derive(Debug, thiserror::Error)]
#[error("unknown role {0:?} (expected viewer, operator or admin)")]
pub struct UnknownRole(pub String);

impl FromStr for Role {
    type Err = UnknownRole;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            _ => Err(UnknownRole(s.to_owned())),
        }
    }
}

/// The tokens the API accepts, each with its role.
#[derive(Clone, Default)]
pub struct TokenSet {
    entries: Vec<([u8; 32], Role)>,
}

impl fmt::Debug for TokenSet {
    // Digests are not secrets, but there is nothing useful in printing them either.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSet")
            .field("tokens", &self.entries.len())
            .finish()
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

impl TokenSet {
    /// A set from `(token, role)` pairs. Tokens are trimmed; empty ones are skipped (an empty
    /// token would be a password anyone can guess).
    pub fn new<I, T>(tokens: I) -> Self
    where
        I: IntoIterator<Item = (T, Role)>,
        T: AsRef<str>,
    {
        let mut set = TokenSet::default();
        for (token, role) in tokens {
            set.insert(token.as_ref(), role);
        }
        set
    }

    /// Adds `token` with `role` (ignored when empty after trimming).
    pub fn insert(&mut self, token: &str, role: Role) {
        let token = token.trim();
        if token.is_empty() {
            tracing::warn!(%role, "ignoring an empty API token");
            return;
        }
        self.entries.push((digest(token), role));
    }

    /// `self` plus `token` with the role named `role` (`admin`, `operator`, `viewer`), for
    /// tokens from the config file.
    pub fn with_token(mut self, token: &str, role: &str) -> Result<TokenSet, UnknownRole> {
        let role: Role = role.parse()?;
        self.insert(token, role);
        Ok(self)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The role of `token`, if it is known. Takes the same time whichever entry (if any)
    /// matches; with the same token listed twice the most powerful role wins.
    pub fn role_of(&self, token: &str) -> Option<Role> {
        let presented = digest(token);
        let mut found: Option<Role> = None;
        for (known, role) in &self.entries {
            let hit: bool = known.ct_eq(&presented).into();
            if hit {
                found = Some(found.map_or(*role, |r| r.max(*role)));
            }
        }
        found
    }

    /// The admin token for `serve`: `explicit` (from `--api-token`/env) when given; else the
    /// token stored in `{data_dir}/api-token`; else a new random token written there with mode
    /// 0600 and returned as the second value so the caller can print it once.
    pub fn load_or_create_admin(
        data_dir: &Path,
        explicit: Option<String>,
    ) -> io::Result<(TokenSet, Option<String>)> {
        if let Some(token) = explicit {
            let token = token.trim();
            if token.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "the explicit API token is empty",
                ));
            }
            return Ok((TokenSet::new([(token, Role::Admin)]), None));
        }
        let path = data_dir.join(TOKEN_FILE);
        match read_token_file(&path) {
            Ok(token) => return Ok((TokenSet::new([(token, Role::Admin)]), None)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        fs::create_dir_all(data_dir)?;
        let token = generate_token();
        match create_private(&path) {
            Ok(mut file) => {
                file.write_all(token.as_bytes())?;
                file.write_all(b"\n")?;
                file.sync_all()?;
                Ok((TokenSet::new([(token.as_str(), Role::Admin)]), Some(token)))
            }
            // Another process created it between our read and create: use theirs.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let token = read_token_file(&path)?;
                Ok((TokenSet::new([(token, Role::Admin)]), None))
            }
            Err(e) => Err(e),
        }
    }
}

fn read_token_file(path: &Path) -> io::Result<String> {
    let text = fs::read_to_string(path)?;
    let token = text.trim();
    if token.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is empty; delete it to get a new token", path.display()),
        ));
    }
    warn_if_readable_by_others(path);
    Ok(token.to_owned())
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = fs::metadata(path) {
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %path.display(), "API token file is accessible by group/others; chmod 600 it");
        }
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_path: &Path) {}

#[cfg(unix)]
fn create_private(path: &Path) -> io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

#[cfg(not(unix))]
fn create_private(path: &Path) -> io::Result<fs::File> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
}

/// 256 random bits from the OS, hex, with a prefix secret scanners can recognise.
fn generate_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("fg_{}", hex::encode(bytes))
}

/// Who is calling; inserted into the request by [`authenticate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub role: Role,
}

/// The bearer token of `headers`: `Ok(None)` when there is no Authorization header, `Err` when
/// there is one but it is not a non-empty bearer token.
fn bearer(headers: &HeaderMap) -> Result<Option<&str>, ()> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value.to_str().map_err(|_| ())?;
    let (scheme, token) = value.trim().split_once(' ').ok_or(())?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(());
    }
    Ok(Some(token))
}

/// Middleware for every protected route: 401 without a known token, 403 for a viewer's
/// non-read request; otherwise inserts [`Caller`] and runs the route.
pub async fn authenticate(
    State(tokens): State<Arc<TokenSet>>,
    mut req: Request,
    next: Next,
) -> Response {
    let role = match bearer(req.headers()) {
        Ok(None) => return ApiError::unauthenticated(false).into_response(),
        Err(()) => return ApiError::unauthenticated(true).into_response(),
        Ok(Some(token)) => match tokens.role_of(token) {
            Some(role) => role,
            None => return ApiError::unauthenticated(true).into_response(),
        },
    };
    let read_only = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if !read_only && role < Role::Operator {
        return ApiError::forbidden(format!("role {role} may only read")).into_response();
    }
    tracing::Span::current().record("role", role.as_str());
    req.extensions_mut().insert(Caller { role });
    next.run(req).await
}

fn caller(parts: &Parts) -> Result<Caller, ApiError> {
    parts
        .extensions
        .get::<Caller>()
        .copied()
        .ok_or_else(|| ApiError::unauthenticated(false))
}

/// Extractor: the caller is an admin (403 otherwise).
#[derive(Debug, Clone, Copy)]
pub struct RequireAdmin;

impl<S: Send + Sync> FromRequestParts<S> for RequireAdmin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let c = caller(parts)?;
        if c.role < Role::Admin {
            return Err(ApiError::forbidden(format!(
                "role {} may not do this; admin required",
                c.role
            )));
        }
        Ok(RequireAdmin)
    }
}

/// Extractor: the caller is an operator or admin (403 otherwise).
#[derive(Debug, Clone, Copy)]
pub struct RequireOperator;

impl<S: Send + Sync> FromRequestParts<S> for RequireOperator {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let c = caller(parts)?;
        if c.role < Role::Operator {
            return Err(ApiError::forbidden(format!(
                "role {} may not do this; operator or admin required",
                c.role
            )));
        }
        Ok(RequireOperator)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_looked_up_by_token() {
        let set = TokenSet::new([
            ("a", Role::Admin),
            ("o", Role::Operator),
            ("v", Role::Viewer),
            ("  ", Role::Admin),
        ]);
        assert_eq!(set.len(), 3, "the blank token is skipped");
        assert_eq!(set.role_of("a"), Some(Role::Admin));
        assert_eq!(set.role_of("o"), Some(Role::Operator));
        assert_eq!(set.role_of("v"), Some(Role::Viewer));
        assert_eq!(set.role_of("x"), None);
        assert_eq!(set.role_of(""), None);
        assert_eq!(set.role_of("a "), None);
        assert!(Role::Viewer < Role::Operator && Role::Operator < Role::Admin);
        assert_eq!("Operator".parse::<Role>().unwrap(), Role::Operator);
        assert!("root".parse::<Role>().is_err());
        let set = set.with_token("o2", "OPERATOR").unwrap();
        assert_eq!(set.role_of("o2"), Some(Role::Operator));
        assert!(set.with_token("r", "root").is_err());
    }

    #[test]
    fn bearer_header_parsing() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), Ok(None));
        h.insert(header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        assert_eq!(bearer(&h), Ok(Some("abc")));
        h.insert(header::AUTHORIZATION, "bearer   abc ".parse().unwrap());
        assert_eq!(bearer(&h), Ok(Some("abc")));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h), Err(()));
        h.insert(header::AUTHORIZATION, "Bearer ".parse().unwrap());
        assert_eq!(bearer(&h), Err(()));
    }

    #[test]
    fn admin_token_is_created_once_with_private_mode() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let (set, created) = TokenSet::load_or_create_admin(&data, None).unwrap();
        let token = created.expect("first start creates a token");
        assert!(token.starts_with("fg_") && token.len() == 67, "{token}");
        assert_eq!(set.role_of(&token), Some(Role::Admin));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(data.join(TOKEN_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // Second start: same token, nothing new to print.
        let (set2, created2) = TokenSet::load_or_create_admin(&data, None).unwrap();
        assert!(created2.is_none());
        assert_eq!(set2.role_of(&token), Some(Role::Admin));
        // An explicit token wins and the file's token is not accepted alongside it.
        let (set3, created3) =
            TokenSet::load_or_create_admin(&data, Some(" explicit ".into())).unwrap();
        assert!(created3.is_none());
        assert_eq!(set3.role_of("explicit"), Some(Role::Admin));
        assert_eq!(set3.role_of(&token), None);
        assert!(TokenSet::load_or_create_admin(&data, Some(" ".into())).is_err());
    }

    #[test]
    fn empty_token_file_is_an_error_not_an_open_door() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(TOKEN_FILE), "\n").unwrap();
        let err = TokenSet::load_or_create_admin(dir.path(), None).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
