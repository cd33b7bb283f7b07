//! Encryption of the secrets inside a package with a key the operator gives.
//!
//! The operator's `secrets_key` (a passphrase) goes through PBKDF2-HMAC-SHA256 with a random
//! 16-byte salt into 64 bytes: the first 32 are an AES-256-GCM key for the secrets, the last 32
//! an HMAC-SHA256 key that authenticates the manifest (so a package whose manifest was rewritten
//! to match tampered files is still refused when it carries secrets). Every sealed value has its
//! own random 12-byte nonce and is bound to its object (`type` + `id` as associated data), so a
//! ciphertext cannot be moved onto another object. Salt, iteration count and nonces are in the
//! manifest; the key never is.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

/// Shortest accepted `secrets_key`.
pub const MIN_KEY_CHARS: usize = 12;

/// Errors of sealing and opening.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("wrong secrets_key (the package's secrets or manifest do not authenticate)")]
    WrongKey,
    #[error("malformed {0} in the package")]
    Malformed(&'static str),
}

/// Keys derived from the operator's passphrase and a salt.
pub struct PackageKey {
    cipher: Aes256Gcm,
    mac_key: [u8; 32],
}

impl std::fmt::Debug for PackageKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PackageKey(..)")
    }
}

/// A fresh random salt (base64).
pub fn new_salt() -> String {
    let mut salt = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut salt);
    B64.encode(salt)
}

impl PackageKey {
    /// Derives the keys (CPU-heavy by design: call it off the async workers).
    pub fn derive(passphrase: &str, salt_b64: &str, iterations: u32) -> Result<Self, CryptoError> {
        let salt = B64
            .decode(salt_b64)
            .map_err(|_| CryptoError::Malformed("salt"))?;
        if salt.len() < 8 || iterations == 0 {
            return Err(CryptoError::Malformed("key derivation parameters"));
        }
        let okm: [u8; 64] =
            pbkdf2::pbkdf2_hmac_array::<Sha256, 64>(passphrase.as_bytes(), &salt, iterations);
        let cipher = Aes256Gcm::new_from_slice(&okm[..32])
            .map_err(|_| CryptoError::Malformed("derived key"))?;
        let mut mac_key = [0u8; 32];
        mac_key.copy_from_slice(&okm[32..]);
        Ok(PackageKey { cipher, mac_key })
    }

    /// Encrypts `plaintext` bound to `aad`; returns `(nonce_b64, ciphertext_b64)`.
    pub fn seal(&self, plaintext: &[u8], aad: &str) -> (String, String) {
        let mut nonce = [0u8; 12];
        rand::thread_rng().fill_bytes(&mut nonce);
        let ct = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: aad.as_bytes(),
                },
            )
            // AES-GCM encryption fails only past 64 GiB of plaintext.
            .unwrap_or_default();
        (B64.encode(nonce), B64.encode(ct))
    }

    /// Decrypts what [`seal`](Self::seal) produced; [`CryptoError::WrongKey`] when it does not
    /// authenticate (wrong key, or tampered ciphertext/nonce/object).
    pub fn open(&self, nonce_b64: &str, ct_b64: &str, aad: &str) -> Result<Vec<u8>, CryptoError> {
        let nonce = B64
            .decode(nonce_b64)
            .map_err(|_| CryptoError::Malformed("nonce"))?;
        if nonce.len() != 12 {
            return Err(CryptoError::Malformed("nonce"));
        }
        let ct = B64
            .decode(ct_b64)
            .map_err(|_| CryptoError::Malformed("ciphertext"))?;
        self.cipher
            .decrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &ct,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| CryptoError::WrongKey)
    }

    /// Hex HMAC-SHA256 of `bytes` under the manifest key.
    pub fn mac(&self, bytes: &[u8]) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.mac_key)
            .expect("HMAC accepts any key length");
        mac.update(bytes);
        hex::encode(mac.finalize().into_bytes())
    }

    /// Checks a hex MAC in constant time.
    pub fn verify_mac(&self, bytes: &[u8], mac_hex: &str) -> Result<(), CryptoError> {
        let want =
            hex::decode(mac_hex.trim()).map_err(|_| CryptoError::Malformed("manifest.mac"))?;
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.mac_key)
            .expect("HMAC accepts any key length");
        mac.update(bytes);
        mac.verify_slice(&want).map_err(|_| CryptoError::WrongKey)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_wrong_key_or_object_fails() {
        let salt = new_salt();
        let k = PackageKey::derive("correct horse battery", &salt, 1000).unwrap();
        let (n, ct) = k.seal(b"s3cret", "DEVICE:pk/dn");
        assert_eq!(k.open(&n, &ct, "DEVICE:pk/dn").unwrap(), b"s3cret");
        assert!(matches!(
            k.open(&n, &ct, "DEVICE:pk/other"),
            Err(CryptoError::WrongKey)
        ));
        let wrong = PackageKey::derive("incorrect horse battery", &salt, 1000).unwrap();
        assert!(matches!(
            wrong.open(&n, &ct, "DEVICE:pk/dn"),
            Err(CryptoError::WrongKey)
        ));
        let mac = k.mac(b"manifest");
        k.verify_mac(b"manifest", &mac).unwrap();
        assert!(k.verify_mac(b"manifesT", &mac).is_err());
        assert!(wrong.verify_mac(b"manifest", &mac).is_err());
    }
}
