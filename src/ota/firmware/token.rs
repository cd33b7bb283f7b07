//! Expiring download tokens: `token = hex(HMAC-SHA256(key, "{firmware_id}\n{expires}"))`.
//!
//! Devices fetch firmware over plain HTTP without an API token, so the URL itself is the
//! credential: it names one package and a deadline, and only the gateway (which holds the key)
//! can mint one. The key is 32 random bytes kept hex-encoded in `{data_dir}/download-key`
//! (created 0600 on first start), so URLs handed out before a restart stay valid after it.
//! Deleting the file revokes every outstanding URL at the next start.

use std::fs;
use std::io::{self, Write};
use std::path::Path;

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Name of the key file inside the data dir.
pub const KEY_FILE: &str = "download-key";

/// Why a download token was refused. The HTTP answer is the same 403 for each; the variants
/// exist for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("missing expires or token")]
    Missing,
    #[error("expires is not a unix time in seconds")]
    BadExpiry,
    #[error("the link has expired")]
    Expired,
    #[error("the token does not match")]
    Mismatch,
}

/// The signing key.
#[derive(Clone)]
pub struct DownloadKey([u8; 32]);

impl std::fmt::Debug for DownloadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DownloadKey(***)")
    }
}

impl DownloadKey {
    /// A key from raw bytes (tests).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        DownloadKey(bytes)
    }

    /// Reads `{data_dir}/download-key`, creating it (mode 0600, 32 random bytes as hex) when
    /// absent. A file that exists but is not 64 hex digits is an error rather than silently
    /// replaced: replacing it would revoke every URL already sent to devices.
    pub fn load_or_create(data_dir: &Path) -> io::Result<DownloadKey> {
        let path = data_dir.join(KEY_FILE);
        match fs::read_to_string(&path) {
            Ok(text) => return parse_key(&path, &text),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        fs::create_dir_all(data_dir)?;
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        match create_private(&path) {
            Ok(mut file) => {
                file.write_all(hex::encode(bytes).as_bytes())?;
                file.write_all(b"\n")?;
                file.sync_all()?;
                Ok(DownloadKey(bytes))
            }
            // Someone else created it between our read and create: theirs wins.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                parse_key(&path, &fs::read_to_string(&path)?)
            }
            Err(e) => Err(e),
        }
    }

    fn mac(&self, firmware_id: &str, expires: u64) -> HmacSha256 {
        // HMAC accepts keys of any length; 32 bytes cannot fail.
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(firmware_id.as_bytes());
        mac.update(b"\n");
        mac.update(expires.to_string().as_bytes());
        mac
    }

    /// The hex token for `firmware_id` valid until `expires` (unix seconds).
    pub fn sign(&self, firmware_id: &str, expires: u64) -> String {
        hex::encode(self.mac(firmware_id, expires).finalize().into_bytes())
    }

    /// Checks the `expires` and `token` query values of a download request at `now_secs`.
    /// The comparison is constant-time; an expired link is refused even with a valid token.
    pub fn verify(
        &self,
        firmware_id: &str,
        expires: Option<&str>,
        token: Option<&str>,
        now_secs: u64,
    ) -> Result<(), TokenError> {
        let (Some(expires), Some(token)) = (expires, token) else {
            return Err(TokenError::Missing);
        };
        // Only the canonical decimal form is ever signed, so "+5" or "05" are refused outright
        // (one signed URL, one spelling).
        let expires = match expires.parse::<u64>() {
            Ok(v) if v.to_string() == expires => v,
            _ => return Err(TokenError::BadExpiry),
        };
        if now_secs > expires {
            return Err(TokenError::Expired);
        }
        let tag = hex::decode(token).map_err(|_| TokenError::Mismatch)?;
        self.mac(firmware_id, expires)
            .verify_slice(&tag)
            .map_err(|_| TokenError::Mismatch)
    }
}

fn parse_key(path: &Path, text: &str) -> io::Result<DownloadKey> {
    let invalid = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} must hold 64 hex digits; delete it to create a new key (this revokes \
                 every download link already sent)",
                path.display()
            ),
        )
    };
    let bytes = hex::decode(text.trim()).map_err(|_| invalid())?;
    let bytes: [u8; 32] = bytes.try_into().map_err(|_| invalid())?;
    Ok(DownloadKey(bytes))
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> DownloadKey {
        DownloadKey::from_bytes([7u8; 32])
    }

    #[test]
    fn token_is_hmac_sha256_of_id_newline_expires() {
        // Independent computation of the documented formula.
        let mut mac = HmacSha256::new_from_slice(&[7u8; 32]).unwrap();
        mac.update(b"fw-abc\n1700000000");
        let expected = hex::encode(mac.finalize().into_bytes());
        assert_eq!(key().sign("fw-abc", 1_700_000_000), expected);
        assert_eq!(expected.len(), 64);
    }

    #[test]
    fn valid_until_expiry_inclusive_then_refused() {
        let k = key();
        let t = k.sign("fw-a", 1000);
        assert_eq!(k.verify("fw-a", Some("1000"), Some(&t), 999), Ok(()));
        assert_eq!(k.verify("fw-a", Some("1000"), Some(&t), 1000), Ok(()));
        assert_eq!(
            k.verify("fw-a", Some("1000"), Some(&t), 1001),
            Err(TokenError::Expired)
        );
    }

    #[test]
    fn tampering_is_refused() {
        let k = key();
        let t = k.sign("fw-a", 1000);
        // Another package, a later expiry, a flipped digit, another key, junk.
        assert_eq!(
            k.verify("fw-b", Some("1000"), Some(&t), 0),
            Err(TokenError::Mismatch)
        );
        assert_eq!(
            k.verify("fw-a", Some("2000"), Some(&t), 0),
            Err(TokenError::Mismatch)
        );
        let mut flipped = t.clone().into_bytes();
        flipped[10] = if flipped[10] == b'0' { b'1' } else { b'0' };
        let flipped = String::from_utf8(flipped).unwrap();
        assert_eq!(
            k.verify("fw-a", Some("1000"), Some(&flipped), 0),
            Err(TokenError::Mismatch)
        );
        let other = DownloadKey::from_bytes([8u8; 32]);
        assert_eq!(
            other.verify("fw-a", Some("1000"), Some(&t), 0),
            Err(TokenError::Mismatch)
        );
        assert_eq!(
            k.verify("fw-a", Some("1000"), Some("zz"), 0),
            Err(TokenError::Mismatch)
        );
        assert_eq!(
            k.verify("fw-a", Some("1000"), Some(&t[..32]), 0),
            Err(TokenError::Mismatch)
        );
        assert_eq!(
            k.verify("fw-a", Some("1000"), Some(""), 0),
            Err(TokenError::Mismatch)
        );
    }

    #[test]
    fn missing_or_odd_expiry_is_refused() {
        let k = key();
        let t = k.sign("fw-a", 1000);
        assert_eq!(
            k.verify("fw-a", None, Some(&t), 0),
            Err(TokenError::Missing)
        );
        assert_eq!(
            k.verify("fw-a", Some("1000"), None, 0),
            Err(TokenError::Missing)
        );
        for bad in [
            "",
            "+1000",
            "01000",
            "-1",
            "1e3",
            " 1000",
            "99999999999999999999999",
        ] {
            assert_eq!(
                k.verify("fw-a", Some(bad), Some(&t), 0),
                Err(TokenError::BadExpiry),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn key_file_is_created_once_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let k1 = DownloadKey::load_or_create(&data).unwrap();
        let text = fs::read_to_string(data.join(KEY_FILE)).unwrap();
        assert_eq!(text.trim().len(), 64);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(data.join(KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let k2 = DownloadKey::load_or_create(&data).unwrap();
        assert_eq!(k1.sign("fw-x", 5), k2.sign("fw-x", 5));
        fs::write(data.join(KEY_FILE), "not hex\n").unwrap();
        let err = DownloadKey::load_or_create(&data).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
