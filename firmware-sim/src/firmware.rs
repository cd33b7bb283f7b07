//! Firmware download and verification.
//!
//! [`Download`] streams a package over HTTP without keeping it (the simulator only needs its
//! digests), hashing as it goes, and resumes with `Range: bytes=N-` after a dropped connection,
//! whether the drop was real or injected ([`Download::interrupt`]). [`verify`] checks the
//! upgrade's `sign` with the `signMethod` it names (SHA256 or Md5), for real: corrupted bytes fail.
//!
//! Owns no device state; [`crate::device`] drives it and turns its results into progress steps.

use fleetgate_topics::FirmwareSignMethod;
use md5::{Digest as _, Md5};
use reqwest::header::{CONTENT_RANGE, RANGE};
use reqwest::StatusCode;
use sha2::Sha256;
use std::time::Duration;

/// Why a download or verification failed.
#[derive(Debug, thiserror::Error)]
pub enum FirmwareError {
    #[error("GET {url}: {source}")]
    Request {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("GET {url}: HTTP {status}")]
    Status { url: String, status: StatusCode },
    #[error("GET {url}: gave up after {attempts} attempts, last error: {last}")]
    Exhausted {
        url: String,
        attempts: u32,
        last: String,
    },
    #[error("GET {url}: more bytes than the announced size {size}")]
    TooLong { url: String, size: u64 },
}

/// The digests of a complete package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digests {
    pub len: u64,
    pub sha256: String,
    pub md5: String,
}

/// Incremental SHA-256 and MD5 of a byte stream.
#[derive(Clone, Default)]
pub struct Hasher {
    sha256: Sha256,
    md5: Md5,
    len: u64,
}

impl Hasher {
    pub fn update(&mut self, bytes: &[u8]) {
        self.sha256.update(bytes);
        self.md5.update(bytes);
        self.len += bytes.len() as u64;
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn finish(self) -> Digests {
        Digests {
            len: self.len,
            sha256: hex::encode(self.sha256.finalize()),
            md5: hex::encode(self.md5.finalize()),
        }
    }
}

/// Digests of an in-memory package (tests, servers).
pub fn digests(bytes: &[u8]) -> Digests {
    let mut h = Hasher::default();
    h.update(bytes);
    h.finish()
}

/// Why a package failed verification.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("size {got} differs from the announced {expected}")]
    Size { expected: u64, got: u64 },
    #[error("{method} digest {got} differs from sign {expected}")]
    Sign {
        method: FirmwareSignMethod,
        expected: String,
        got: String,
    },
    #[error("MD5 {got} differs from md5 {expected}")]
    Md5 { expected: String, got: String },
}

/// Checks a package's digests against an upgrade's `size`, `sign` (with `sign_method`) and `md5`.
/// Hex is compared case-insensitively.
pub fn verify(
    d: &Digests,
    size: u64,
    sign_method: FirmwareSignMethod,
    sign: &str,
    md5: &str,
) -> Result<(), VerifyError> {
    if d.len != size {
        return Err(VerifyError::Size {
            expected: size,
            got: d.len,
        });
    }
    let got = match sign_method {
        FirmwareSignMethod::Sha256 => &d.sha256,
        FirmwareSignMethod::Md5 => &d.md5,
    };
    if !got.eq_ignore_ascii_case(sign) {
        return Err(VerifyError::Sign {
            method: sign_method,
            expected: sign.to_owned(),
            got: got.clone(),
        });
    }
    if !d.md5.eq_ignore_ascii_case(md5) {
        return Err(VerifyError::Md5 {
            expected: md5.to_owned(),
            got: d.md5.clone(),
        });
    }
    Ok(())
}

/// One package download, resumable.
pub struct Download {
    client: reqwest::Client,
    url: String,
    size: u64,
    hasher: Hasher,
    response: Option<reqwest::Response>,
    /// The part of the last chunk beyond the caller's limit, served first by the next call.
    leftover: Option<bytes::Bytes>,
    /// Network errors so far (each one costs a retry).
    errors: u32,
    max_retries: u32,
    /// Requests that asked for a `Range` (resumes).
    resumes: u32,
    retry_delay: Duration,
}

impl Download {
    /// A download of `size` bytes from `url`, retrying (with `Range`) up to `max_retries` times
    /// after network errors.
    pub fn new(client: reqwest::Client, url: String, size: u64, max_retries: u32) -> Self {
        Download {
            client,
            url,
            size,
            hasher: Hasher::default(),
            response: None,
            leftover: None,
            errors: 0,
            max_retries,
            resumes: 0,
            retry_delay: Duration::from_millis(200),
        }
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.hasher.len()
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// How many times the download was resumed with a `Range` request.
    pub fn resumes(&self) -> u32 {
        self.resumes
    }

    /// Drops the current connection, as a network failure would; the next [`next_chunk`]
    /// resumes with `Range`. Does not count against the retries.
    ///
    /// [`next_chunk`]: Download::next_chunk
    pub fn interrupt(&mut self) {
        self.response = None;
        self.leftover = None;
    }

    /// Receives the next chunk, accepting at most `limit` bytes of it (the rest is kept for the
    /// next call, so a caller can stop at an exact offset; pass `u64::MAX` for all). Returns the
    /// number of bytes accepted, or `None` when the package is complete.
    pub async fn next_chunk(&mut self, limit: u64) -> Result<Option<u64>, FirmwareError> {
        if let Some(bytes) = self.leftover.take() {
            return self.accept(bytes, limit).map(Some);
        }
        loop {
            if self.response.is_none() {
                if self.size > 0 && self.received() >= self.size {
                    return Ok(None);
                }
                match self.request().await {
                    Ok(r) => self.response = Some(r),
                    Err(e @ FirmwareError::Status { .. }) => return Err(e),
                    Err(e) => {
                        self.failed(e.to_string()).await?;
                        continue;
                    }
                }
            }
            let Some(resp) = self.response.as_mut() else {
                continue;
            };
            match resp.chunk().await {
                Ok(Some(bytes)) if bytes.is_empty() => continue,
                Ok(Some(bytes)) => return self.accept(bytes, limit).map(Some),
                Ok(None) => {
                    self.response = None;
                    if self.size == 0 || self.received() >= self.size {
                        return Ok(None);
                    }
                    // The server closed early: resume where it stopped.
                    self.failed(format!(
                        "connection closed after {} of {} bytes",
                        self.received(),
                        self.size
                    ))
                    .await?;
                }
                Err(e) => {
                    self.response = None;
                    self.failed(e.to_string()).await?;
                }
            }
        }
    }

    fn accept(&mut self, mut bytes: bytes::Bytes, limit: u64) -> Result<u64, FirmwareError> {
        let take = (bytes.len() as u64).min(limit.max(1)) as usize;
        if take < bytes.len() {
            self.leftover = Some(bytes.split_off(take));
        }
        if self.size > 0 && self.received() + bytes.len() as u64 > self.size {
            return Err(FirmwareError::TooLong {
                url: self.url.clone(),
                size: self.size,
            });
        }
        self.hasher.update(&bytes);
        Ok(take as u64)
    }

    /// The digests of what was received; call after [`next_chunk`](Self::next_chunk) gave `None`.
    pub fn finish(self) -> Digests {
        self.hasher.finish()
    }

    async fn failed(&mut self, last: String) -> Result<(), FirmwareError> {
        self.errors += 1;
        if self.errors > self.max_retries {
            return Err(FirmwareError::Exhausted {
                url: self.url.clone(),
                attempts: self.errors,
                last,
            });
        }
        tracing::debug!(url = %self.url, errors = self.errors, %last, "download error, retrying");
        tokio::time::sleep(self.retry_delay).await;
        Ok(())
    }

    async fn request(&mut self) -> Result<reqwest::Response, FirmwareError> {
        let offset = self.received();
        let mut req = self.client.get(&self.url);
        if offset > 0 {
            req = req.header(RANGE, format!("bytes={offset}-"));
            self.resumes += 1;
        }
        let resp = req.send().await.map_err(|source| FirmwareError::Request {
            url: self.url.clone(),
            source,
        })?;
        match resp.status() {
            StatusCode::PARTIAL_CONTENT if offset > 0 => {
                // Only continue if the server resumed exactly where we are.
                let start = resp
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(content_range_start);
                if start != Some(offset) {
                    tracing::debug!(url = %self.url, ?start, offset, "unexpected Content-Range, restarting");
                    self.hasher = Hasher::default();
                    return Box::pin(self.request()).await;
                }
                Ok(resp)
            }
            StatusCode::OK => {
                if offset > 0 {
                    // The server ignored the Range: start over.
                    self.hasher = Hasher::default();
                }
                Ok(resp)
            }
            status => Err(FirmwareError::Status {
                url: self.url.clone(),
                status,
            }),
        }
    }
}

/// The first byte of `bytes N-M/T`.
fn content_range_start(v: &str) -> Option<u64> {
    let rest = v.trim().strip_prefix("bytes ")?;
    let (range, _) = rest.split_once('/')?;
    let (start, _) = range.split_once('-')?;
    start.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const DATA: &[u8] = b"fleetgate firmware image v2.0.0";

    fn good(method: FirmwareSignMethod) -> (Digests, String, String) {
        let d = digests(DATA);
        let sign = match method {
            FirmwareSignMethod::Sha256 => d.sha256.clone(),
            FirmwareSignMethod::Md5 => d.md5.clone(),
        };
        let md5 = d.md5.clone();
        (d, sign, md5)
    }

    #[test]
    fn known_digests() {
        let d = digests(b"abc");
        assert_eq!(
            d.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(d.md5, "900150983cd24fb0d6963f7d28e17f72");
        assert_eq!(d.len, 3);
        // Incremental hashing equals one-shot hashing.
        let mut h = Hasher::default();
        h.update(b"a");
        h.update(b"bc");
        assert_eq!(h.finish(), d);
    }

    #[test]
    fn sign_sha256_good_and_bad() {
        let m = FirmwareSignMethod::Sha256;
        let (d, sign, md5) = good(m);
        assert_eq!(verify(&d, DATA.len() as u64, m, &sign, &md5), Ok(()));
        assert_eq!(
            verify(&d, DATA.len() as u64, m, &sign.to_uppercase(), &md5),
            Ok(())
        );
        let mut corrupted = DATA.to_vec();
        corrupted[3] ^= 1;
        let bad = digests(&corrupted);
        assert!(matches!(
            verify(&bad, DATA.len() as u64, m, &sign, &md5),
            Err(VerifyError::Sign { .. })
        ));
        // An MD5 where a SHA-256 is expected never matches.
        assert!(verify(&d, DATA.len() as u64, m, &md5, &md5).is_err());
    }

    #[test]
    fn sign_md5_good_and_bad() {
        let m = FirmwareSignMethod::Md5;
        let (d, sign, md5) = good(m);
        assert_eq!(verify(&d, DATA.len() as u64, m, &sign, &md5), Ok(()));
        let bad = digests(b"fleetgate firmware image v2.0.1");
        assert!(matches!(
            verify(&bad, DATA.len() as u64, m, &sign, &md5),
            Err(VerifyError::Sign { .. })
        ));
        // A good sign with a wrong md5 field fails too.
        assert!(matches!(
            verify(&d, DATA.len() as u64, m, &sign, &"0".repeat(32)),
            Err(VerifyError::Md5 { .. })
        ));
    }

    #[test]
    fn size_mismatch() {
        let (d, sign, md5) = good(FirmwareSignMethod::Sha256);
        assert_eq!(
            verify(&d, 999, FirmwareSignMethod::Sha256, &sign, &md5),
            Err(VerifyError::Size {
                expected: 999,
                got: DATA.len() as u64
            })
        );
    }

    #[test]
    fn content_range_parsing() {
        assert_eq!(content_range_start("bytes 100-199/200"), Some(100));
        assert_eq!(content_range_start("bytes 0-0/1"), Some(0));
        assert_eq!(content_range_start("bytes */200"), None);
        assert_eq!(content_range_start("items 1-2/3"), None);
    }
}
