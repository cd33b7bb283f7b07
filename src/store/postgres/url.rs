//! [`PostgresUrl`]: the validated `postgres://` URL of the store, shown without its password.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use tokio_postgres::config::SslMode;
use tokio_postgres::Config;

/// Where the PostgreSQL store lives: a `postgres://` (or `postgresql://`) URL as libpq takes it,
/// e.g. `postgres://fleetgate:pw@db.internal:5432/fleetgate`.
///
/// Checked when the settings load, so a typo fails at start with the setting named instead of
/// at the first connection. `Display` and `Debug` replace the password (in the user-info part
/// and in a `password=` parameter) with `***`, so the URL can be logged.
#[derive(Clone)]
pub struct PostgresUrl {
    raw: String,
    config: Arc<Config>,
}

impl PostgresUrl {
    /// Parses and checks `url`; the error says what is wrong without repeating the password.
    pub fn parse(url: &str) -> Result<PostgresUrl, String> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(
                "must be a postgres:// or postgresql:// URL (leave it unset for SQLite in the \
                 data dir)"
                    .into(),
            );
        }
        let config = Config::from_str(url).map_err(|e| {
            let cause = std::error::Error::source(&e)
                .map(|s| format!(": {s}"))
                .unwrap_or_default();
            format!("invalid PostgreSQL URL {}{cause}", redact(url))
        })?;
        if config.get_hosts().is_empty() && config.get_hostaddrs().is_empty() {
            return Err(format!("{} names no host", redact(url)));
        }
        if config.get_ssl_mode() == SslMode::Require {
            return Err(
                "sslmode=require: TLS connections to PostgreSQL are not supported yet \
                 (use a local socket, a private network or a TLS-terminating proxy)"
                    .into(),
            );
        }
        Ok(PostgresUrl {
            raw: url.to_owned(),
            config: Arc::new(config),
        })
    }

    /// The URL as given, password included (for connecting only).
    pub fn expose(&self) -> &str {
        &self.raw
    }

    pub(crate) fn config(&self) -> &Config {
        &self.config
    }
}

impl PartialEq for PostgresUrl {
    fn eq(&self, other: &Self) -> bool {
        self.raw == other.raw
    }
}

impl Eq for PostgresUrl {}

impl fmt::Display for PostgresUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&redact(&self.raw))
    }
}

impl fmt::Debug for PostgresUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PostgresUrl({self})")
    }
}

impl TryFrom<String> for PostgresUrl {
    type Error = String;

    fn try_from(url: String) -> Result<Self, String> {
        PostgresUrl::parse(&url)
    }
}

impl From<PostgresUrl> for String {
    fn from(url: PostgresUrl) -> String {
        url.raw
    }
}

impl serde::Serialize for PostgresUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.raw)
    }
}

impl<'de> serde::Deserialize<'de> for PostgresUrl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        PostgresUrl::parse(&raw).map_err(serde::de::Error::custom)
    }
}

/// `url` with its passwords replaced by `***`. Splits the URL the way tokio-postgres's parser
/// does (credentials up to the first `@`, then host, path, `?` parameters), so whatever that
/// parser would take as a password is what gets hidden.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "***".into();
    };
    let mut out = format!("{scheme}://");
    let rest = match rest.split_once('@') {
        Some((credentials, rest)) => {
            match credentials.split_once(':') {
                Some((user, _password)) => out.push_str(&format!("{user}:***@")),
                None => out.push_str(&format!("{credentials}@")),
            }
            rest
        }
        None => rest,
    };
    let (location, params) = match rest.split_once('?') {
        Some((location, params)) => (location, Some(params)),
        None => (rest, None),
    };
    out.push_str(location);
    if let Some(params) = params {
        out.push('?');
        let params: Vec<String> = params
            .split('&')
            .map(|param| match param.split_once('=') {
                Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
                _ => param.to_owned(),
            })
            .collect();
        out.push_str(&params.join("&"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hidden_wherever_the_parser_finds_them() {
        for (url, shown) in [
            (
                "postgres://postgres@127.0.0.1:5432/postgres",
                "postgres://postgres@127.0.0.1:5432/postgres",
            ),
            (
                "postgres://fg:s3cr3t@db:5432/fleetgate",
                "postgres://fg:***@db:5432/fleetgate",
            ),
            (
                "postgresql://fg:a:b%40c@h1:5432,h2:5433/db?application_name=x",
                "postgresql://fg:***@h1:5432,h2:5433/db?application_name=x",
            ),
            (
                "postgres://fg@db/fleetgate?password=s3cr3t&connect_timeout=5",
                "postgres://fg@db/fleetgate?password=***&connect_timeout=5",
            ),
            ("postgres://db", "postgres://db"),
            (
                "postgres://db/fg?connect_timeout=5&keepalives_idle=30&tcp_user_timeout=30",
                "postgres://db/fg?connect_timeout=5&keepalives_idle=30&tcp_user_timeout=30",
            ),
        ] {
            let parsed = PostgresUrl::parse(url).unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(parsed.to_string(), shown);
            assert!(!format!("{parsed:?}").contains("s3cr3t"));
            assert_eq!(parsed.expose(), url);
        }
    }

    #[test]
    fn bad_urls_are_refused_with_a_reason_and_without_the_password() {
        for (url, reason) in [
            ("/var/lib/fleetgate.db", "postgres://"),
            ("mysql://root@localhost/db", "postgres://"),
            ("host=localhost user=postgres", "postgres://"),
            (
                "postgres://fg:s3cr3t@db:notaport/x",
                "invalid PostgreSQL URL",
            ),
            ("postgres://fg:s3cr3t@/fleetgate", "names no host"),
            ("postgres://db/x?sslmode=require", "TLS"),
            ("postgres://db/x?no_such_option=1", "invalid PostgreSQL URL"),
        ] {
            let error = PostgresUrl::parse(url).expect_err(url);
            assert!(error.contains(reason), "{url}: {error}");
            assert!(!error.contains("s3cr3t"), "{url}: {error}");
        }
    }
}
