//! `[api]`: the API tokens and their roles, and [`Secret`], the string type that never
//! shows in `Debug` or `Display` output.

use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiSettings {
    /// The admin token. Without it, the first start creates one in the data dir and prints it.
    pub token: Option<Secret>,
    /// Further tokens with their roles.
    pub tokens: Vec<TokenSetting>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenSetting {
    pub token: Secret,
    /// `admin`, `operator` or `viewer`.
    pub role: String,
}

/// A string that `Debug` and `Display` never show.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub(super) String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}
