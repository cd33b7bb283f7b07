//! The package: a ZIP with a manifest, one JSON file per object and the firmware bytes.
//!
//! ```text
//! manifest.json                 format, format_version, gateway_version, created time, encryption
//!                               parameters, the objects and EVERY other file with its SHA-256
//! manifest.mac                  (only with secrets) hex HMAC-SHA256 of manifest.json's bytes
//! objects/product/{pk}.json     {"type","id","data":{…},"secrets":"<base64 AES-GCM ciphertext>"|null}
//! objects/device/{pk}/{dn}.json
//! objects/firmware/{fid}.json
//! objects/ota_job/{jid}.json
//! objects/migration_task/{tid}.json
//! firmware/{sha256}             the firmware bytes (one file per distinct content)
//! ```
//!
//! Reading verifies everything before anything is returned: the archive opens, the set of
//! entries equals the manifest's file list, every file's size and SHA-256 match, the manifest
//! MAC and every secret authenticate with the operator's key. A caller (the import) therefore
//! never sees a partly valid package.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::crypto::{CryptoError, PackageKey};
use super::model::ObjectType;

pub const FORMAT: &str = "fleetgate-export";
pub const FORMAT_VERSION: u32 = 1;
pub const MANIFEST: &str = "manifest.json";
pub const MANIFEST_MAC: &str = "manifest.mac";
/// Largest manifest or object file read (firmware files are bounded by their listed size).
const MAX_META_BYTES: u64 = 64 * 1024 * 1024;

/// Errors of writing or reading a package.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    #[error("not a readable ZIP archive: {0}")]
    BadZip(String),
    #[error("malformed package: {0}")]
    Malformed(String),
    #[error("checksum mismatch for {0} (the package was damaged or tampered with)")]
    ChecksumMismatch(String),
    #[error("package format version {0} is newer than this gateway supports ({FORMAT_VERSION})")]
    Unsupported(u32),
    #[error("the package holds encrypted secrets: secrets_key is required")]
    MissingKey,
    #[error("wrong secrets_key, or the manifest was tampered with")]
    WrongKey,
    #[error("cannot write the package: {0}")]
    Io(#[from] std::io::Error),
}

impl From<CryptoError> for PackageError {
    fn from(e: CryptoError) -> Self {
        match e {
            CryptoError::WrongKey => PackageError::WrongKey,
            CryptoError::Malformed(what) => PackageError::Malformed(format!("bad {what}")),
        }
    }
}

impl From<zip::result::ZipError> for PackageError {
    fn from(e: zip::result::ZipError) -> Self {
        PackageError::BadZip(e.to_string())
    }
}

/// How the secrets are protected (never the key itself).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Encryption {
    /// `AES-256-GCM`.
    pub cipher: String,
    /// `PBKDF2-HMAC-SHA256`.
    pub kdf: String,
    pub iterations: u32,
    /// Base64, 16 bytes.
    pub salt: String,
}

/// One object in the manifest.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ManifestObject {
    pub id: String,
    #[serde(rename = "type")]
    pub object_type: ObjectType,
    pub name: String,
    pub path: String,
    /// The object's JSON file.
    pub file: String,
    /// SHA-256 of `file`.
    pub sha256: String,
    /// Nonce of the object's sealed secrets (base64), when it has some.
    #[serde(default)]
    pub secrets_nonce: Option<String>,
    /// Firmware only: the file holding its bytes.
    #[serde(default)]
    pub blob: Option<String>,
}

/// Every file besides the manifest (and its MAC).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ManifestFile {
    pub path: String,
    pub sha256: String,
    pub size: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    pub gateway_version: String,
    /// RFC 3339.
    pub created_at: String,
    pub created_at_ms: i64,
    pub job_id: String,
    pub job_name: String,
    pub encryption: Option<Encryption>,
    pub objects: Vec<ManifestObject>,
    pub files: Vec<ManifestFile>,
}

/// An object's JSON file.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ObjectFile {
    #[serde(rename = "type")]
    pub object_type: ObjectType,
    pub id: String,
    pub data: serde_json::Value,
    /// Base64 AES-256-GCM ciphertext of the secrets' JSON (nonce in the manifest).
    pub secrets: Option<String>,
}

/// An object to write: its identity, data, plaintext secrets and firmware bytes.
#[derive(Debug, Clone)]
pub struct ExportItem {
    pub id: String,
    pub object_type: ObjectType,
    pub name: String,
    pub path: String,
    pub data: serde_json::Value,
    pub secrets: Option<serde_json::Value>,
    /// `(sha256, path on disk)` of firmware bytes.
    pub blob: Option<(String, PathBuf)>,
}

/// The associated data that binds sealed secrets to their object.
pub fn secrets_aad(t: ObjectType, id: &str) -> String {
    format!("{}:{id}", t.as_str())
}

/// File name of an object inside the package.
pub fn object_file_name(t: ObjectType, id: &str) -> String {
    let dir = t.as_str().to_ascii_lowercase();
    format!("objects/{dir}/{id}.json")
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// What [`write_package`] reports per item: `Ok(())` or why it failed.
pub type ItemOutcome = Result<(), String>;

/// Writes the package to `dest` (via a temp file renamed into place). Items whose firmware
/// bytes cannot be read fail alone and are left out; the caller decides whether that fails the
/// job. `key` is `(passphrase, iterations)` and is required when any item has secrets.
pub fn write_package(
    dest: &Path,
    meta: (&str, &str, i64),
    items: &[ExportItem],
    key: Option<(&str, u32)>,
) -> Result<(u64, Vec<ItemOutcome>), PackageError> {
    let (job_id, job_name, created_at_ms) = meta;
    let encryption = key.map(|(_, iterations)| Encryption {
        cipher: "AES-256-GCM".into(),
        kdf: "PBKDF2-HMAC-SHA256".into(),
        iterations,
        salt: super::crypto::new_salt(),
    });
    let package_key = match (&encryption, key) {
        (Some(enc), Some((pass, _))) => Some(PackageKey::derive(pass, &enc.salt, enc.iterations)?),
        _ => None,
    };
    let tmp = dest.with_extension("zip.tmp");
    let file = std::fs::File::create(&tmp)?;
    let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(file));
    let json_opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    // Firmware is usually compressed already; storing it keeps exports fast.
    let blob_opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .large_file(true);

    let mut files: Vec<ManifestFile> = Vec::new();
    let mut objects: Vec<ManifestObject> = Vec::new();
    let mut written_blobs: BTreeSet<String> = BTreeSet::new();
    let mut outcomes = Vec::with_capacity(items.len());
    for item in items {
        let mut blob_name = None;
        if let Some((sha, path)) = &item.blob {
            let name = format!("firmware/{sha}");
            if !written_blobs.contains(sha) {
                let (size, actual) = match copy_blob(&mut zip, &name, path, blob_opts) {
                    Ok(v) => v,
                    Err(e) => {
                        outcomes.push(Err(format!("cannot read firmware bytes: {e}")));
                        continue;
                    }
                };
                if actual != *sha {
                    // The stored blob no longer matches its address: do not ship it.
                    outcomes.push(Err(format!(
                        "stored firmware bytes do not match their sha256 {sha}"
                    )));
                    continue;
                }
                written_blobs.insert(sha.clone());
                files.push(ManifestFile {
                    path: name.clone(),
                    sha256: sha.clone(),
                    size,
                });
            }
            blob_name = Some(name);
        }
        let (nonce, sealed) = match (&item.secrets, &package_key) {
            (Some(secrets), Some(k)) => {
                let (n, ct) = k.seal(
                    secrets.to_string().as_bytes(),
                    &secrets_aad(item.object_type, &item.id),
                );
                (Some(n), Some(ct))
            }
            (Some(_), None) => {
                return Err(PackageError::Malformed(
                    "secrets without a secrets_key".into(),
                ))
            }
            _ => (None, None),
        };
        let body = ObjectFile {
            object_type: item.object_type,
            id: item.id.clone(),
            data: item.data.clone(),
            secrets: sealed,
        };
        let bytes =
            serde_json::to_vec_pretty(&body).map_err(|e| PackageError::Malformed(e.to_string()))?;
        let name = object_file_name(item.object_type, &item.id);
        zip.start_file(name.as_str(), json_opts)?;
        zip.write_all(&bytes)?;
        let sha = sha256_hex(&bytes);
        files.push(ManifestFile {
            path: name.clone(),
            sha256: sha.clone(),
            size: bytes.len() as u64,
        });
        objects.push(ManifestObject {
            id: item.id.clone(),
            object_type: item.object_type,
            name: item.name.clone(),
            path: item.path.clone(),
            file: name,
            sha256: sha,
            secrets_nonce: nonce,
            blob: blob_name,
        });
        outcomes.push(Ok(()));
    }
    let manifest = Manifest {
        format: FORMAT.into(),
        format_version: FORMAT_VERSION,
        gateway_version: env!("CARGO_PKG_VERSION").into(),
        created_at: super::model::rfc3339_ms(created_at_ms),
        created_at_ms,
        job_id: job_id.into(),
        job_name: job_name.into(),
        encryption,
        objects,
        files,
    };
    let manifest_bytes =
        serde_json::to_vec_pretty(&manifest).map_err(|e| PackageError::Malformed(e.to_string()))?;
    zip.start_file(MANIFEST, json_opts)?;
    zip.write_all(&manifest_bytes)?;
    if let Some(k) = &package_key {
        zip.start_file(MANIFEST_MAC, json_opts)?;
        zip.write_all(k.mac(&manifest_bytes).as_bytes())?;
    }
    let writer = zip.finish()?;
    let file = writer
        .into_inner()
        .map_err(|e| PackageError::Io(e.into_error()))?;
    file.sync_all()?;
    let size = file.metadata()?.len();
    drop(file);
    std::fs::rename(&tmp, dest)?;
    Ok((size, outcomes))
}

/// Streams a blob into the archive, returning its size and actual SHA-256.
fn copy_blob<W: Write + std::io::Seek>(
    zip: &mut zip::ZipWriter<W>,
    name: &str,
    path: &Path,
    opts: zip::write::SimpleFileOptions,
) -> Result<(u64, String), PackageError> {
    let mut src = std::fs::File::open(path)?;
    zip.start_file(name, opts)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        let n = src.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        zip.write_all(&buf[..n])?;
        size += n as u64;
    }
    Ok((size, hex::encode(hasher.finalize())))
}

/// An object read from a verified package, secrets decrypted.
#[derive(Debug, Clone)]
pub struct PackageObject {
    pub meta: ManifestObject,
    pub data: serde_json::Value,
    pub secrets: Option<serde_json::Value>,
}

/// A fully verified package.
#[derive(Debug)]
pub struct VerifiedPackage {
    pub manifest: Manifest,
    pub objects: Vec<PackageObject>,
    /// Firmware bytes by file name (`firmware/{sha256}`).
    pub blobs: HashMap<String, Vec<u8>>,
}

fn read_entry<R: Read + std::io::Seek>(
    zip: &mut zip::ZipArchive<R>,
    name: &str,
    limit: u64,
) -> Result<Vec<u8>, PackageError> {
    let entry = zip
        .by_name(name)
        .map_err(|_| PackageError::Malformed(format!("missing file {name}")))?;
    let mut out = Vec::new();
    // `take` bounds what a lying header (a ZIP bomb) can make us inflate.
    entry
        .take(limit.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|e| PackageError::BadZip(format!("{name}: {e}")))?;
    if out.len() as u64 > limit {
        return Err(PackageError::Malformed(format!("{name} is too large")));
    }
    Ok(out)
}

/// Opens and verifies a package (see the module docs); `key` is the operator's passphrase.
/// CPU- and memory-heavy: call it off the async workers.
pub fn read_package(bytes: &[u8], key: Option<&str>) -> Result<VerifiedPackage, PackageError> {
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes))?;
    let manifest_bytes = read_entry(&mut zip, MANIFEST, MAX_META_BYTES)?;
    let manifest: Manifest = serde_json::from_slice(&manifest_bytes)
        .map_err(|e| PackageError::Malformed(format!("manifest.json: {e}")))?;
    if manifest.format != FORMAT {
        return Err(PackageError::Malformed(format!(
            "format {:?} is not {FORMAT:?}",
            manifest.format
        )));
    }
    if manifest.format_version > FORMAT_VERSION || manifest.format_version == 0 {
        return Err(PackageError::Unsupported(manifest.format_version));
    }

    // The entries must be exactly the listed files (+ manifest and its MAC).
    let mut listed: BTreeMap<&str, &ManifestFile> = BTreeMap::new();
    for f in &manifest.files {
        if listed.insert(f.path.as_str(), f).is_some() {
            return Err(PackageError::Malformed(format!("{} listed twice", f.path)));
        }
    }
    let entries: Vec<String> = zip.file_names().map(str::to_owned).collect();
    for name in &entries {
        let known = name == MANIFEST
            || (name == MANIFEST_MAC && manifest.encryption.is_some())
            || listed.contains_key(name.as_str());
        if !known {
            return Err(PackageError::Malformed(format!(
                "{name} is not listed in the manifest"
            )));
        }
    }
    let mut contents: HashMap<String, Vec<u8>> = HashMap::with_capacity(listed.len());
    for (path, f) in &listed {
        let data = read_entry(&mut zip, path, f.size)?;
        if data.len() as u64 != f.size || sha256_hex(&data) != f.sha256 {
            return Err(PackageError::ChecksumMismatch((*path).to_owned()));
        }
        contents.insert((*path).to_owned(), data);
    }

    let package_key = match &manifest.encryption {
        None => None,
        Some(enc) => {
            if enc.cipher != "AES-256-GCM" || enc.kdf != "PBKDF2-HMAC-SHA256" {
                return Err(PackageError::Malformed(format!(
                    "unsupported encryption {} / {}",
                    enc.cipher, enc.kdf
                )));
            }
            if enc.iterations > 10_000_000 {
                return Err(PackageError::Malformed("absurd iteration count".into()));
            }
            let pass = key.ok_or(PackageError::MissingKey)?;
            let k = PackageKey::derive(pass, &enc.salt, enc.iterations)?;
            let mac = read_entry(&mut zip, MANIFEST_MAC, 1024)?;
            let mac = String::from_utf8(mac)
                .map_err(|_| PackageError::Malformed("manifest.mac".into()))?;
            k.verify_mac(&manifest_bytes, &mac)?;
            Some(k)
        }
    };

    let mut seen = BTreeSet::new();
    let mut objects = Vec::with_capacity(manifest.objects.len());
    for m in &manifest.objects {
        if !seen.insert((m.object_type, m.id.clone())) {
            return Err(PackageError::Malformed(format!(
                "{} {} listed twice",
                m.object_type.as_str(),
                m.id
            )));
        }
        let raw = contents
            .get(&m.file)
            .ok_or_else(|| PackageError::Malformed(format!("{} is not listed", m.file)))?;
        if sha256_hex(raw) != m.sha256 {
            return Err(PackageError::ChecksumMismatch(m.file.clone()));
        }
        let file: ObjectFile = serde_json::from_slice(raw)
            .map_err(|e| PackageError::Malformed(format!("{}: {e}", m.file)))?;
        if file.object_type != m.object_type || file.id != m.id {
            return Err(PackageError::Malformed(format!(
                "{} does not hold {} {}",
                m.file,
                m.object_type.as_str(),
                m.id
            )));
        }
        let secrets = match (&file.secrets, &m.secrets_nonce, &package_key) {
            (None, None, _) => None,
            (Some(ct), Some(nonce), Some(k)) => {
                let plain = k.open(nonce, ct, &secrets_aad(m.object_type, &m.id))?;
                Some(
                    serde_json::from_slice(&plain)
                        .map_err(|_| PackageError::Malformed(format!("secrets of {}", m.id)))?,
                )
            }
            _ => {
                return Err(PackageError::Malformed(format!(
                    "secrets of {} {} without encryption parameters",
                    m.object_type.as_str(),
                    m.id
                )))
            }
        };
        if let Some(blob) = &m.blob {
            if !contents.contains_key(blob) || !blob.starts_with("firmware/") {
                return Err(PackageError::Malformed(format!(
                    "missing firmware file {blob}"
                )));
            }
        }
        objects.push(PackageObject {
            meta: m.clone(),
            data: file.data,
            secrets,
        });
    }
    let blobs = contents
        .into_iter()
        .filter(|(k, _)| k.starts_with("firmware/"))
        .collect();
    Ok(VerifiedPackage {
        manifest,
        objects,
        blobs,
    })
}
