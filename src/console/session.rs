//! Console sessions: an API token exchanged for a random session id in an `HttpOnly`,
//! `SameSite=Strict` cookie, kept in memory on this node with an idle expiry, and the
//! per-session CSRF token every console form carries.
//!
//! The session keeps the token itself (in memory only, never written anywhere): console writes
//! are sent to the API as that token's bearer request, so the API decides what the caller may
//! do exactly as it does for curl. Session ids are looked up by their SHA-256 digest; CSRF
//! tokens are compared in constant time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::api::Role;

/// Name of the session cookie.
pub const COOKIE: &str = "fleetgate_console";
/// A session unused for this long is gone (the operator logs in again).
pub const IDLE_TTL: Duration = Duration::from_secs(8 * 3600);
/// Most sessions held at once on a node; a login beyond it (after expired ones were dropped)
/// is refused rather than growing memory without bound.
pub const MAX_SESSIONS: usize = 10_000;

/// What a request carries once its cookie was found: the caller's role, its CSRF token and
/// the API token the session was opened with.
#[derive(Clone)]
pub struct Session {
    pub role: Role,
    pub csrf: Arc<str>,
    pub(crate) token: Arc<str>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("role", &self.role)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Whether `presented` is this session's CSRF token (constant time).
    pub fn csrf_matches(&self, presented: &str) -> bool {
        self.csrf.as_bytes().ct_eq(presented.as_bytes()).into()
    }

    pub fn may_operate(&self) -> bool {
        self.role >= Role::Operator
    }

    pub fn is_admin(&self) -> bool {
        self.role >= Role::Admin
    }
}

struct Entry {
    session: Session,
    last_used: Instant,
}

/// The session map of this node.
#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<[u8; 32], Entry>>,
}

/// Too many live sessions on this node.
#[derive(Debug, thiserror::Error)]
#[error("too many console sessions on this node; try again later")]
pub struct Full;

fn random_hex() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    hex::encode(bytes)
}

fn key(id: &str) -> [u8; 32] {
    Sha256::digest(id.as_bytes()).into()
}

impl Sessions {
    /// Opens a session for `token` (already known to have `role`); returns the session id for
    /// the cookie.
    pub fn open(&self, token: &str, role: Role) -> Result<String, Full> {
        let id = random_hex();
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_SESSIONS {
            map.retain(|_, e| now.duration_since(e.last_used) < IDLE_TTL);
            if map.len() >= MAX_SESSIONS {
                return Err(Full);
            }
        }
        map.insert(
            key(&id),
            Entry {
                session: Session {
                    role,
                    csrf: random_hex().into(),
                    token: token.into(),
                },
                last_used: now,
            },
        );
        Ok(id)
    }

    /// The live session with id `id`, refreshing its idle timer; an expired one is dropped.
    pub fn get(&self, id: &str) -> Option<Session> {
        let now = Instant::now();
        let k = key(id);
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let entry = map.get_mut(&k)?;
        if now.duration_since(entry.last_used) >= IDLE_TTL {
            map.remove(&k);
            return None;
        }
        entry.last_used = now;
        Some(entry.session.clone())
    }

    /// Ends the session `id` (logout); unknown ids are ignored.
    pub fn close(&self, id: &str) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.remove(&key(id));
    }

    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The session id in a `Cookie` header value, if any.
pub fn cookie_value(header: &str) -> Option<&str> {
    header.split(';').find_map(|pair| {
        let (name, value) = pair.trim().split_once('=')?;
        (name == COOKIE && !value.is_empty()).then_some(value)
    })
}

/// `Set-Cookie` for a new session.
pub fn set_cookie(id: &str) -> String {
    format!(
        "{COOKIE}={id}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={}",
        IDLE_TTL.as_secs()
    )
}

/// `Set-Cookie` that removes the session cookie.
pub fn clear_cookie() -> String {
    format!("{COOKIE}=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_found_by_its_id_only_and_closes() {
        let s = Sessions::default();
        let id = s.open("tok", Role::Viewer).unwrap();
        let got = s.get(&id).expect("open session");
        assert_eq!(got.role, Role::Viewer);
        assert_eq!(&*got.token, "tok");
        assert!(s.get("not-an-id").is_none());
        assert!(got.csrf_matches(&got.csrf));
        assert!(!got.csrf_matches(""));
        assert!(!got.csrf_matches(&format!("{}x", got.csrf)));
        s.close(&id);
        assert!(s.get(&id).is_none());
        assert!(s.is_empty());
    }

    #[test]
    fn the_cookie_is_read_among_others() {
        assert_eq!(cookie_value("a=1; fleetgate_console=abc; b=2"), Some("abc"));
        assert_eq!(cookie_value("fleetgate_console="), None);
        assert_eq!(cookie_value("x_fleetgate_console=abc"), None);
        let set = set_cookie("abc");
        assert!(set.contains("HttpOnly") && set.contains("SameSite=Strict"));
    }
}
