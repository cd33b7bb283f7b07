//! Content-addressed blob files: `{data_dir}/firmware/{sha256}`.
//!
//! An upload streams into a temp file (`.upload-{random}`) in the same directory while SHA-256
//! and MD5 are computed chunk by chunk, so memory use does not depend on the package size. The
//! size limit is enforced while streaming. [`BlobWriter::finish`] fsyncs the file;
//! [`StagedBlob::install`] renames it onto its content address and fsyncs the directory. Until
//! then a dropped writer or staged blob removes its temp file; after a crash, [`clean_dir`]
//! removes leftovers at start.

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};

use md5::Md5;
use rand::distributions::{Alphanumeric, DistString};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

/// Prefix of in-progress uploads; never a valid content address.
const TEMP_PREFIX: &str = ".upload-";

/// Whether `name` is a content address (64 lowercase hex digits).
pub(crate) fn is_blob_name(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Why writing a blob failed.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("the package is larger than {max} bytes")]
    TooLarge { max: u64 },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// Cluster mode: the shared database holds no bytes under this address.
    #[error("the bytes of firmware {sha256} are missing from the shared database")]
    Missing { sha256: String },
    /// Cluster mode: bytes read back from the shared database are not the ones stored.
    #[error("the bytes of firmware {sha256} read from the shared database are corrupt: {message}")]
    Corrupt { sha256: String, message: String },
    /// Cluster mode: the shared database failed.
    #[error("shared firmware storage: {what}: {message}")]
    Shared { what: &'static str, message: String },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> BlobError + 'a {
    move |source| BlobError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// An upload in progress. Dropping it removes the temp file.
pub struct BlobWriter {
    file: Option<tokio::fs::File>,
    path: PathBuf,
    dir: PathBuf,
    sha256: Sha256,
    md5: Md5,
    size: u64,
    max_size: u64,
}

impl std::fmt::Debug for BlobWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobWriter")
            .field("path", &self.path)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl BlobWriter {
    /// Creates a new temp file in `dir` that accepts at most `max_size` bytes.
    pub(crate) async fn create(dir: &Path, max_size: u64) -> Result<BlobWriter, BlobError> {
        let name = format!(
            "{TEMP_PREFIX}{}",
            Alphanumeric.sample_string(&mut rand::thread_rng(), 16)
        );
        let path = dir.join(name);
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .await
            .map_err(io_err("cannot create", &path))?;
        Ok(BlobWriter {
            file: Some(file),
            path,
            dir: dir.to_path_buf(),
            sha256: Sha256::new(),
            md5: Md5::new(),
            size: 0,
            max_size,
        })
    }

    /// Bytes written so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends `chunk`; [`BlobError::TooLarge`] (nothing more is written) once the total would
    /// pass the limit.
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), BlobError> {
        let new_size = self.size.saturating_add(chunk.len() as u64);
        if new_size > self.max_size {
            return Err(BlobError::TooLarge { max: self.max_size });
        }
        let Some(file) = self.file.as_mut() else {
            // Only `finish` takes the file, and it consumes `self`.
            return Err(BlobError::Io {
                what: "write after finish to",
                path: self.path.clone(),
                source: io::Error::other("writer already finished"),
            });
        };
        file.write_all(chunk)
            .await
            .map_err(io_err("cannot write", &self.path))?;
        self.sha256.update(chunk);
        self.md5.update(chunk);
        self.size = new_size;
        Ok(())
    }

    /// Flushes and fsyncs the temp file and returns it with its digests.
    pub async fn finish(mut self) -> Result<StagedBlob, BlobError> {
        if let Some(mut file) = self.file.take() {
            file.flush()
                .await
                .map_err(io_err("cannot flush", &self.path))?;
            file.sync_all()
                .await
                .map_err(io_err("cannot fsync", &self.path))?;
        }
        let staged = StagedBlob {
            temp: Some(std::mem::take(&mut self.path)),
            dir: std::mem::take(&mut self.dir),
            size: self.size,
            sha256: hex::encode(std::mem::take(&mut self.sha256).finalize()),
            md5: hex::encode(std::mem::take(&mut self.md5).finalize()),
        };
        Ok(staged)
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        // `finish` empties the path once the staged blob owns the file.
        if !self.path.as_os_str().is_empty() {
            self.file.take();
            remove_quietly(&self.path);
        }
    }
}

/// A complete, fsynced upload not yet at its content address. Dropping it removes the temp
/// file.
#[derive(Debug)]
pub struct StagedBlob {
    temp: Option<PathBuf>,
    dir: PathBuf,
    pub size: u64,
    /// Lowercase hex.
    pub sha256: String,
    /// Lowercase hex.
    pub md5: String,
}

impl StagedBlob {
    /// The temp file holding the bytes (`None` once installed).
    pub(crate) fn temp_path(&self) -> Option<&Path> {
        self.temp.as_deref()
    }

    /// Renames the temp file onto `{dir}/{sha256}` and fsyncs the directory so the name is
    /// durable before any metadata refers to it. When the address already exists (the same
    /// bytes were uploaded before) the existing file is kept: same name, same content.
    pub(crate) fn install(mut self) -> Result<PathBuf, BlobError> {
        let target = self.dir.join(&self.sha256);
        let Some(temp) = self.temp.take() else {
            return Ok(target);
        };
        if target.exists() {
            remove_quietly(&temp);
        } else if let Err(source) = std::fs::rename(&temp, &target) {
            remove_quietly(&temp);
            return Err(BlobError::Io {
                what: "cannot rename upload to",
                path: target,
                source,
            });
        }
        sync_dir(&self.dir).map_err(io_err("cannot fsync", &self.dir))?;
        Ok(target)
    }
}

impl Drop for StagedBlob {
    fn drop(&mut self) {
        if let Some(temp) = self.temp.take() {
            remove_quietly(&temp);
        }
    }
}

fn remove_quietly(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove firmware file");
        }
    }
}

/// Removes `{dir}/{sha256}`; a missing file is fine.
pub(crate) fn remove_blob(dir: &Path, sha256: &str) {
    if is_blob_name(sha256) {
        remove_quietly(&dir.join(sha256));
    }
}

#[cfg(unix)]
fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> io::Result<()> {
    Ok(())
}

/// What [`clean_dir`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct CleanReport {
    pub temp_removed: usize,
    pub orphans_removed: usize,
    /// Referenced blobs that are not on disk.
    pub missing: Vec<String>,
}

/// Start-up sweep of the blob directory: removes interrupted uploads and blobs no package
/// references (left by a crash between a rename and its metadata commit, or between a
/// metadata delete and the file's removal), and reports referenced blobs that are missing.
/// Files that are neither are left alone.
pub(crate) fn clean_dir(dir: &Path, referenced: &HashSet<String>) -> io::Result<CleanReport> {
    let mut report = CleanReport::default();
    let mut present = HashSet::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with(TEMP_PREFIX) {
            remove_quietly(&entry.path());
            report.temp_removed += 1;
        } else if is_blob_name(name) {
            if referenced.contains(name) {
                present.insert(name.to_owned());
            } else {
                remove_quietly(&entry.path());
                report.orphans_removed += 1;
            }
        }
    }
    report.missing = referenced
        .iter()
        .filter(|s| !present.contains(*s))
        .cloned()
        .collect();
    report.missing.sort();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn streams_hashes_and_installs_by_content() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = BlobWriter::create(dir.path(), 100).await.unwrap();
        w.write(b"hello ").await.unwrap();
        w.write(b"world").await.unwrap();
        let staged = w.finish().await.unwrap();
        assert_eq!(staged.size, 11);
        assert_eq!(staged.sha256, hex::encode(Sha256::digest(b"hello world")));
        assert_eq!(staged.md5, hex::encode(Md5::digest(b"hello world")));
        let path = staged.install().unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"hello world");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec![hex::encode(Sha256::digest(b"hello world"))]);
    }

    #[tokio::test]
    async fn over_the_limit_and_dropped_uploads_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = BlobWriter::create(dir.path(), 10).await.unwrap();
        w.write(b"0123456789").await.unwrap();
        assert!(matches!(
            w.write(b"x").await,
            Err(BlobError::TooLarge { max: 10 })
        ));
        drop(w);
        let staged = {
            let mut w = BlobWriter::create(dir.path(), 10).await.unwrap();
            w.write(b"abc").await.unwrap();
            w.finish().await.unwrap()
        };
        drop(staged);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn clean_dir_removes_temps_and_orphans_and_reports_missing() {
        let dir = tempfile::tempdir().unwrap();
        let kept = "a".repeat(64);
        let orphan = "b".repeat(64);
        let missing = "c".repeat(64);
        std::fs::write(dir.path().join(&kept), b"k").unwrap();
        std::fs::write(dir.path().join(&orphan), b"o").unwrap();
        std::fs::write(dir.path().join(".upload-xyz"), b"t").unwrap();
        std::fs::write(dir.path().join("README"), b"r").unwrap();
        let referenced: HashSet<String> = [kept.clone(), missing.clone()].into();
        let report = clean_dir(dir.path(), &referenced).unwrap();
        assert_eq!(
            report,
            CleanReport {
                temp_removed: 1,
                orphans_removed: 1,
                missing: vec![missing],
            }
        );
        assert!(dir.path().join(&kept).exists());
        assert!(!dir.path().join(&orphan).exists());
        assert!(dir.path().join("README").exists());
    }
}
