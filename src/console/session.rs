//! Console sessions: an API token exchanged for a sealed cookie (`HttpOnly`, `SameSite=Strict`)
//! that any node holding the key can open, the revocations that end sessions before they
//! expire (logout), and the per-session CSRF token every console form carries.
//!
//! The cookie is the session: `v1.` then base64url of a random nonce and the AES-256-GCM
//! sealing of `{sid, token, seen_ms}` — the session's random id, the API token it was opened
//! with (console writes are sent to the API as that token's bearer request, so the API decides
//! what the caller may do exactly as it does for curl) and when it was last used. Nobody
//! without the key reads or forges one. The role is the token's role *now* (a token removed
//! from the configuration ends its sessions), the CSRF token is an HMAC of the session id, and
//! a session unused for [`IDLE_TTL`] is over: the guard re-seals the cookie with a new
//! `seen_ms` at most every [`RESEAL_AFTER`].
//!
//! The key: on a single node a random one per process (sessions end with the process); in
//! cluster mode the cluster's, from PostgreSQL (`cluster_secrets`), so a cookie sealed by one
//! node opens on every node behind a round-robin balancer. Logout records the session id as
//! revoked until the cookie could no longer be valid anyway: in memory, and in cluster mode as
//! a `console.revoked` store document every node follows (a [`DocFollower`]), settled before
//! the logout answers — so a logged-out cookie is refused on every node.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::api::{Role, TokenSet};
use crate::cluster::{Cluster, DocFollower};
use crate::store::{Op, Store, StoreError};

/// Name of the session cookie.
pub const COOKIE: &str = "fleetgate_console";
/// A session unused for this long is over (the operator logs in again).
pub const IDLE_TTL: Duration = Duration::from_secs(8 * 3600);
/// A cookie older than this is re-sealed with the time of the request (the idle clock).
pub const RESEAL_AFTER: Duration = Duration::from_secs(5 * 60);
/// Name of the cluster's session key in `cluster_secrets`.
pub const KEY_NAME: &str = "console-session-key";
/// Store documents of revoked sessions (cluster mode), keyed by session id.
pub const REVOKED_DOC: &str = "console.revoked";
/// Associated data of every sealed cookie: a cookie is nothing else's ciphertext.
const AAD: &[u8] = b"fleetgate console session v1";

/// What a request carries once its cookie was opened: the caller's role, its CSRF token and
/// the API token the session was opened with.
#[derive(Clone)]
pub struct Session {
    pub role: Role,
    pub csrf: Arc<str>,
    pub(crate) token: Arc<str>,
    sid: Arc<str>,
    /// The request's client (its connection's peer, or the one a PROXY header named), which
    /// the console's API calls carry as theirs: the API logs it, and an engine call passed on
    /// with a PROXY header names it.
    pub(crate) client: Option<std::net::SocketAddr>,
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

/// The sealed part of a cookie.
#[derive(Serialize, Deserialize)]
struct Sealed {
    sid: String,
    token: String,
    seen_ms: i64,
}

/// A `console.revoked` document's body.
#[derive(Serialize, Deserialize)]
struct Revoked {
    /// After this the cookie is expired anyway and the revocation can go.
    until_ms: i64,
}

/// A cookie that opened: the session, and the re-sealed cookie to send back when the one
/// presented is older than [`RESEAL_AFTER`].
pub struct Opened {
    pub session: Session,
    pub reseal: Option<String>,
}

/// Cluster mode: where revocations are written and announced.
struct Shared {
    store: Store,
    cluster: Arc<Cluster>,
}

/// The sealing keys, the revoked session ids, and (cluster mode) the store they go to.
pub struct Sessions {
    cipher: Aes256Gcm,
    /// Keyed once; cloned for each CSRF token.
    csrf_mac: Hmac<Sha256>,
    /// Session id → until when it stays revoked (ms).
    revoked: Mutex<HashMap<String, i64>>,
    shared: OnceLock<Shared>,
}

impl Default for Sessions {
    /// A node of its own: a random key for this process.
    fn default() -> Self {
        let mut key = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        Sessions::with_key(&key)
    }
}

/// Writing a revocation failed: the session is still ended on this node.
#[derive(Debug, thiserror::Error)]
#[error("the logout could not be recorded for the other nodes: {0}")]
pub struct NotShared(#[from] StoreError);

/// A key for one purpose from the session key (which is uniformly random).
fn derive(key: &[u8; 32], label: &[u8]) -> [u8; 32] {
    Sha256::new()
        .chain_update(label)
        .chain_update(key)
        .finalize()
        .into()
}

impl Sessions {
    /// Sessions sealed with (keys derived from) `key`.
    pub fn with_key(key: &[u8; 32]) -> Sessions {
        let seal = derive(key, b"console cookie seal");
        let mut csrf_key = [0u8; 64];
        csrf_key[..32].copy_from_slice(&derive(key, b"console csrf 1"));
        csrf_key[32..].copy_from_slice(&derive(key, b"console csrf 2"));
        Sessions {
            cipher: Aes256Gcm::new((&seal).into()),
            csrf_mac: <Hmac<Sha256> as hmac::digest::KeyInit>::new(&csrf_key.into()),
            revoked: Mutex::new(HashMap::new()),
            shared: OnceLock::new(),
        }
    }

    /// Cluster mode: logouts are written to `store` as `console.revoked` documents and settled
    /// through `cluster`. Register the sessions as the cluster's [`DocFollower`] too.
    pub fn share(&self, store: Store, cluster: Arc<Cluster>) {
        let _ = self.shared.set(Shared { store, cluster });
    }

    fn csrf_of(&self, sid: &str) -> String {
        let mut mac = self.csrf_mac.clone();
        mac.update(sid.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    fn seal(&self, sealed: &Sealed) -> String {
        let plain = serde_json::to_vec(sealed).unwrap_or_default();
        let mut nonce = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let Ok(ct) = self.cipher.encrypt(
            Nonce::from_slice(&nonce),
            Payload {
                msg: &plain,
                aad: AAD,
            },
        ) else {
            // Only a plaintext longer than AES-GCM's limit fails; a token never is.
            return String::new();
        };
        let mut raw = nonce.to_vec();
        raw.extend_from_slice(&ct);
        format!("v1.{}", B64.encode(raw))
    }

    fn unseal(&self, cookie: &str) -> Option<Sealed> {
        let raw = B64.decode(cookie.strip_prefix("v1.")?).ok()?;
        if raw.len() < 12 {
            return None;
        }
        let (nonce, ct) = raw.split_at(12);
        let plain = self
            .cipher
            .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad: AAD })
            .ok()?;
        serde_json::from_slice(&plain).ok()
    }

    /// Opens a session for `token` (already known to the gateway); returns the cookie value.
    pub fn open(&self, token: &str, now_ms: i64) -> String {
        let mut sid = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut sid);
        self.seal(&Sealed {
            sid: hex::encode(sid),
            token: token.to_owned(),
            seen_ms: now_ms,
        })
    }

    /// The session of a cookie value: sealed with this key, used within [`IDLE_TTL`], not
    /// revoked, and its token still one of `tokens`.
    pub fn get(&self, cookie: &str, tokens: &TokenSet, now_ms: i64) -> Option<Opened> {
        let sealed = self.unseal(cookie)?;
        let idle = now_ms.saturating_sub(sealed.seen_ms);
        if idle >= IDLE_TTL.as_millis() as i64 || self.is_revoked(&sealed.sid, now_ms) {
            return None;
        }
        let role = tokens.role_of(&sealed.token)?;
        let reseal = (idle >= RESEAL_AFTER.as_millis() as i64).then(|| {
            self.seal(&Sealed {
                sid: sealed.sid.clone(),
                token: sealed.token.clone(),
                seen_ms: now_ms,
            })
        });
        Some(Opened {
            session: Session {
                role,
                csrf: self.csrf_of(&sealed.sid).into(),
                token: sealed.token.into(),
                sid: sealed.sid.into(),
                client: None,
            },
            reseal,
        })
    }

    fn is_revoked(&self, sid: &str, now_ms: i64) -> bool {
        let map = self.revoked.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(sid).is_some_and(|&until| until > now_ms)
    }

    /// Ends `session` (logout) on this node at once and, in cluster mode, on every node: the
    /// revocation is written, and settled, before this returns. Revocations that outlived every
    /// cookie they could refuse are dropped on the way.
    pub async fn close(&self, session: &Session, now_ms: i64) -> Result<(), NotShared> {
        // The newest cookie of this session was sealed no later than now.
        let until_ms = now_ms + IDLE_TTL.as_millis() as i64;
        let expired: Vec<String> = {
            let mut map = self.revoked.lock().unwrap_or_else(PoisonError::into_inner);
            let expired = map
                .iter()
                .filter(|(_, &until)| until <= now_ms)
                .map(|(sid, _)| sid.clone())
                .collect::<Vec<_>>();
            for sid in &expired {
                map.remove(sid);
            }
            map.insert(session.sid.to_string(), until_ms);
            expired
        };
        let Some(shared) = self.shared.get() else {
            return Ok(());
        };
        let mut ops = vec![Op::PutDoc {
            kind: REVOKED_DOC,
            id: session.sid.to_string(),
            body: serde_json::to_string(&Revoked { until_ms }).unwrap_or_default(),
        }];
        ops.extend(expired.into_iter().map(|id| Op::DeleteDoc {
            kind: REVOKED_DOC,
            id,
        }));
        shared.store.submit(ops).await?;
        shared.cluster.settle().await;
        Ok(())
    }

    /// Revoked sessions known here (expired ones included until the next logout drops them).
    pub fn revoked_len(&self) -> usize {
        self.revoked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

impl DocFollower for Sessions {
    fn kinds(&self) -> Vec<&'static str> {
        vec![REVOKED_DOC]
    }

    fn changed(&self, _kind: &str, id: &str, body: Option<&str>) {
        let mut map = self.revoked.lock().unwrap_or_else(PoisonError::into_inner);
        match body.and_then(|b| serde_json::from_str::<Revoked>(b).ok()) {
            Some(r) => {
                map.insert(id.to_owned(), r.until_ms);
            }
            None => {
                map.remove(id);
            }
        }
    }

    fn reloaded(&self, _kind: &str, docs: &[(String, String)]) {
        let mut map = self.revoked.lock().unwrap_or_else(PoisonError::into_inner);
        // Revocations made here stay: a reload never forgets a logout this node answered.
        for (id, body) in docs {
            if let Ok(r) = serde_json::from_str::<Revoked>(body) {
                map.insert(id.clone(), r.until_ms);
            }
        }
    }
}

/// The session cookie's value in a `Cookie` header value, if any.
pub fn cookie_value(header: &str) -> Option<&str> {
    header.split(';').find_map(|pair| {
        let (name, value) = pair.trim().split_once('=')?;
        (name == COOKIE && !value.is_empty()).then_some(value)
    })
}

/// `Set-Cookie` for a session's (re-)sealed cookie.
pub fn set_cookie(value: &str) -> String {
    format!(
        "{COOKIE}={value}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={}",
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

    const T0: i64 = 1_765_000_000_000;

    fn tokens() -> TokenSet {
        TokenSet::new([
            ("viewer-token-0123", Role::Viewer),
            ("admin-token-0123", Role::Admin),
        ])
    }

    #[test]
    fn a_cookie_opens_with_its_key_only_and_never_shows_the_token() {
        let s = Sessions::with_key(&[7; 32]);
        let cookie = s.open("viewer-token-0123", T0);
        assert!(!cookie.contains("viewer"), "sealed, not encoded: {cookie}");
        let got = s.get(&cookie, &tokens(), T0 + 1).expect("open session");
        assert_eq!(got.session.role, Role::Viewer);
        assert_eq!(&*got.session.token, "viewer-token-0123");
        assert!(got.reseal.is_none());
        assert!(got.session.csrf_matches(&got.session.csrf));
        assert!(!got.session.csrf_matches(""));
        assert!(!got.session.csrf_matches(&format!("{}x", got.session.csrf)));

        let other_node = Sessions::with_key(&[7; 32]);
        let there = other_node
            .get(&cookie, &tokens(), T0 + 1)
            .expect("same key");
        assert_eq!(
            there.session.csrf, got.session.csrf,
            "one CSRF token everywhere"
        );
        assert!(Sessions::with_key(&[8; 32])
            .get(&cookie, &tokens(), T0)
            .is_none());
        assert!(Sessions::default().get(&cookie, &tokens(), T0).is_none());

        // Tampered, truncated or foreign values open nothing.
        let mut bytes = cookie.clone().into_bytes();
        let last = bytes.len() - 2;
        bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(bytes).unwrap();
        for bad in [
            tampered.as_str(),
            &cookie[..cookie.len() - 4],
            "v1.",
            "abc",
            "",
        ] {
            assert!(s.get(bad, &tokens(), T0).is_none(), "{bad}");
        }
        // Another session has another CSRF token.
        let second = s.open("viewer-token-0123", T0);
        let second = s.get(&second, &tokens(), T0).unwrap();
        assert_ne!(second.session.csrf, got.session.csrf);
    }

    #[test]
    fn idle_expiry_reseal_token_removal_and_revocation() {
        let s = Sessions::with_key(&[1; 32]);
        let cookie = s.open("admin-token-0123", T0);
        let idle = IDLE_TTL.as_millis() as i64;
        let reseal = RESEAL_AFTER.as_millis() as i64;
        assert!(s
            .get(&cookie, &tokens(), T0 + reseal - 1)
            .unwrap()
            .reseal
            .is_none());
        let later = s.get(&cookie, &tokens(), T0 + reseal).unwrap();
        let fresh = later.reseal.expect("re-sealed after RESEAL_AFTER");
        assert!(
            s.get(&cookie, &tokens(), T0 + idle).is_none(),
            "idle too long"
        );
        let fresh_opened = s.get(&fresh, &tokens(), T0 + idle).expect("used since");
        assert_eq!(
            fresh_opened.session.csrf, later.session.csrf,
            "the same session"
        );

        // A token no longer configured ends its sessions.
        let only_viewer = TokenSet::new([("viewer-token-0123", Role::Viewer)]);
        assert!(s.get(&cookie, &only_viewer, T0).is_none());

        // Logout: every cookie of the session is refused, other sessions are not.
        let other = s.open("admin-token-0123", T0);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(s.close(&fresh_opened.session, T0 + 10))
            .unwrap();
        assert!(s.get(&cookie, &tokens(), T0 + 11).is_none());
        assert!(s.get(&fresh, &tokens(), T0 + 11).is_none());
        assert!(s.get(&other, &tokens(), T0 + 11).is_some());
        // The revocation is dropped by a later logout once it can refuse nothing.
        let o = s.get(&other, &tokens(), T0 + 11).unwrap().session;
        rt.block_on(s.close(&o, T0 + 10 + idle)).unwrap();
        assert_eq!(s.revoked_len(), 1);
    }

    #[test]
    fn revocations_follow_the_documents_of_other_nodes() {
        let s = Sessions::with_key(&[2; 32]);
        let cookie = s.open("viewer-token-0123", T0);
        let sid = s
            .get(&cookie, &tokens(), T0)
            .unwrap()
            .session
            .sid
            .to_string();
        let body = serde_json::json!({"until_ms": T0 + 1000}).to_string();
        s.changed(REVOKED_DOC, &sid, Some(&body));
        assert!(s.get(&cookie, &tokens(), T0).is_none());
        assert!(
            s.get(&cookie, &tokens(), T0 + 1000).is_some(),
            "not past until_ms"
        );
        s.changed(REVOKED_DOC, &sid, None);
        assert!(s.get(&cookie, &tokens(), T0).is_some());
        s.reloaded(REVOKED_DOC, &[(sid.clone(), body)]);
        assert!(s.get(&cookie, &tokens(), T0).is_none());
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
