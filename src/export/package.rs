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
//! Reading verifies everything before anything is returned: the archive opens, the manifest
//! MAC authenticates with the operator's key (when the package has secrets) before anything
//! else in the manifest is believed, the set of entries equals the manifest's file list, every
//! file's size and SHA-256 match, and every secret authenticates. A caller (the import)
//! therefore never sees a partly valid package.
//!
//! Reading is bounded by real bytes, never by what the package claims ([`UnpackLimits`]): a
//! file whose listed size passes `max_unpacked_entry_bytes`, or files listed at more than
//! `max_unpacked_bytes` together, are refused before anything is inflated; every file is
//! inflated through `Read::take(listed size + 1)`, so one that holds more than it claims (a
//! ZIP bomb) is refused after one byte too many. Firmware files are only hashed while
//! verifying, never held: the import streams them out of the archive again
//! ([`VerifiedPackage::blob`]). Memory is the upload plus the manifest and object files.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Cursor, Read, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::crypto::{CryptoError, PackageKey};
use super::model::ObjectType;

pub const FORMAT: &str = "fleetgate-export";
pub const FORMAT_VERSION: u32 = 1;
pub const MANIFEST: &str = "manifest.json";
pub const MANIFEST_MAC: &str = "manifest.mac";
/// Largest manifest or object file read (they are parsed in memory).
const MAX_META_BYTES: u64 = 64 * 1024 * 1024;
/// Largest `manifest.mac` read.
const MAX_MAC_BYTES: u64 = 1024;
/// Chunk in which files are inflated and streamed.
const CHUNK: usize = 64 * 1024;

/// How much reading a package may inflate, in real bytes (`[export]` settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpackLimits {
    /// Largest single file (`export.max_unpacked_entry_bytes`).
    pub entry_bytes: u64,
    /// All files together, the manifest included (`export.max_unpacked_bytes`).
    pub total_bytes: u64,
}

/// Errors of writing or reading a package.
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    #[error("not a readable ZIP archive: {0}")]
    BadZip(String),
    #[error("malformed package: {0}")]
    Malformed(String),
    #[error("checksum mismatch for {0} (the package was damaged or tampered with)")]
    ChecksumMismatch(String),
    #[error("{path} holds more than the {listed} bytes the manifest lists (the package was damaged or tampered with)")]
    SizeMismatch { path: String, listed: u64 },
    /// One file is larger than a limit; `setting` names it.
    #[error("{path} unpacks to more than {limit} bytes ({setting})")]
    EntryTooLarge {
        path: String,
        limit: u64,
        setting: &'static str,
    },
    #[error("the package unpacks to more than {limit} bytes (export.max_unpacked_bytes)")]
    TooLarge { limit: u64 },
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
        let blob_name = match write_blob(&mut zip, item, blob_opts, &mut written_blobs, &mut files)
        {
            Ok(name) => name,
            Err(why) => {
                outcomes.push(Err(why));
                continue;
            }
        };
        let (file, object) =
            write_object(&mut zip, item, package_key.as_ref(), json_opts, blob_name)?;
        files.push(file);
        objects.push(object);
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

/// The item's firmware bytes as `firmware/{sha256}`, written once per package (listed in
/// `files`): its name, `None` without firmware. `Err`: why the item fails (bytes unreadable or
/// no longer matching their address), nothing written.
fn write_blob<W: Write + std::io::Seek>(
    zip: &mut zip::ZipWriter<W>,
    item: &ExportItem,
    opts: zip::write::SimpleFileOptions,
    written_blobs: &mut BTreeSet<String>,
    files: &mut Vec<ManifestFile>,
) -> Result<Option<String>, String> {
    let Some((sha, path)) = &item.blob else {
        return Ok(None);
    };
    let name = format!("firmware/{sha}");
    if !written_blobs.contains(sha) {
        let (size, actual) = copy_blob(zip, &name, path, opts)
            .map_err(|e| format!("cannot read firmware bytes: {e}"))?;
        if actual != *sha {
            // The stored blob no longer matches its address: do not ship it.
            return Err(format!(
                "stored firmware bytes do not match their sha256 {sha}"
            ));
        }
        written_blobs.insert(sha.clone());
        files.push(ManifestFile {
            path: name.clone(),
            sha256: sha.clone(),
            size,
        });
    }
    Ok(Some(name))
}

/// The item's object file (its secrets sealed with the package key), written; with its
/// manifest entries.
fn write_object<W: Write + std::io::Seek>(
    zip: &mut zip::ZipWriter<W>,
    item: &ExportItem,
    package_key: Option<&PackageKey>,
    opts: zip::write::SimpleFileOptions,
    blob_name: Option<String>,
) -> Result<(ManifestFile, ManifestObject), PackageError> {
    let (nonce, sealed) = match (&item.secrets, package_key) {
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
    zip.start_file(name.as_str(), opts)?;
    zip.write_all(&bytes)?;
    let sha = sha256_hex(&bytes);
    let file = ManifestFile {
        path: name.clone(),
        sha256: sha.clone(),
        size: bytes.len() as u64,
    };
    let object = ManifestObject {
        id: item.id.clone(),
        object_type: item.object_type,
        name: item.name.clone(),
        path: item.path.clone(),
        file: name,
        sha256: sha,
        secrets_nonce: nonce,
        blob: blob_name,
    };
    Ok((file, object))
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
    /// The archive (the upload), which firmware files are streamed out of.
    archive: Archive,
    /// Firmware files by name (`firmware/{sha256}`), with their verified size and SHA-256.
    blobs: HashMap<String, ManifestFile>,
}

type Archive = zip::ZipArchive<Cursor<Bytes>>;

impl VerifiedPackage {
    /// A firmware file of the package, to stream its bytes ([`BlobSource::stream`]).
    pub fn blob(&self, name: &str) -> Option<BlobSource> {
        self.blobs.get(name).map(|file| BlobSource {
            // Cheap: the archive's index is shared, the bytes are reference-counted.
            archive: self.archive.clone(),
            file: file.clone(),
        })
    }
}

/// One verified firmware file, owned (it can move to a blocking thread).
#[derive(Debug)]
pub struct BlobSource {
    archive: Archive,
    file: ManifestFile,
}

impl BlobSource {
    pub fn size(&self) -> u64 {
        self.file.size
    }

    /// Inflates the file into `sink`, in chunks of at most 64 KiB, checking its size and
    /// SHA-256 again; `sink` returns `false` to stop early (an error). Blocking (it inflates):
    /// call it off the async workers.
    pub fn stream(mut self, mut sink: impl FnMut(&[u8]) -> bool) -> Result<(), PackageError> {
        let path = self.file.path.clone();
        let mut sent = true;
        let (size, sha) = inflate(&mut self.archive, &path, self.file.size, |chunk| {
            sent = sent && sink(chunk);
            sent
        })?;
        if !sent {
            return Err(PackageError::Io(std::io::Error::other(format!(
                "streaming {path} was stopped"
            ))));
        }
        if size != self.file.size || sha != self.file.sha256 {
            return Err(PackageError::ChecksumMismatch(path));
        }
        Ok(())
    }
}

/// What [`inflate`] ran into.
enum Inflated {
    /// The file holds more than `limit` bytes (only `limit + 1` were inflated).
    Over,
    Zip(PackageError),
}

/// Inflates entry `name` through `take(limit + 1)` into `sink` (`false` stops), returning its
/// size and SHA-256. At most `limit + 1` bytes are ever inflated, whatever the ZIP headers or
/// the manifest say.
fn inflate_bounded<R: Read + std::io::Seek>(
    zip: &mut zip::ZipArchive<R>,
    name: &str,
    limit: u64,
    mut sink: impl FnMut(&[u8]) -> bool,
) -> Result<(u64, String), Inflated> {
    let entry = zip
        .by_name(name)
        .map_err(|_| Inflated::Zip(PackageError::Malformed(format!("missing file {name}"))))?;
    let mut reader = entry.take(limit.saturating_add(1));
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut size = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Inflated::Zip(PackageError::BadZip(format!("{name}: {e}")))),
        };
        size += n as u64;
        if size > limit {
            return Err(Inflated::Over);
        }
        hasher.update(&buf[..n]);
        if !sink(&buf[..n]) {
            break;
        }
    }
    Ok((size, hex::encode(hasher.finalize())))
}

/// [`inflate_bounded`] of a listed file: more bytes than listed is a size mismatch.
fn inflate<R: Read + std::io::Seek>(
    zip: &mut zip::ZipArchive<R>,
    path: &str,
    listed: u64,
    sink: impl FnMut(&[u8]) -> bool,
) -> Result<(u64, String), PackageError> {
    inflate_bounded(zip, path, listed, sink).map_err(|e| match e {
        Inflated::Over => PackageError::SizeMismatch {
            path: path.to_owned(),
            listed,
        },
        Inflated::Zip(e) => e,
    })
}

/// Reads a whole (small) file into memory, refusing it past `limit` bytes.
fn read_small<R: Read + std::io::Seek>(
    zip: &mut zip::ZipArchive<R>,
    name: &str,
    limit: u64,
    setting: &'static str,
) -> Result<Vec<u8>, PackageError> {
    let mut out = Vec::new();
    inflate_bounded(zip, name, limit, |chunk| {
        out.extend_from_slice(chunk);
        true
    })
    .map_err(|e| match e {
        Inflated::Over => PackageError::EntryTooLarge {
            path: name.to_owned(),
            limit,
            setting,
        },
        Inflated::Zip(e) => e,
    })?;
    Ok(out)
}

/// Opens and verifies a package (see the module docs); `key` is the operator's passphrase.
/// CPU-heavy (it inflates and hashes every file, and derives the key): call it off the async
/// workers.
pub fn read_package(
    bytes: Bytes,
    key: Option<&str>,
    limits: UnpackLimits,
) -> Result<VerifiedPackage, PackageError> {
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes))?;
    let (manifest, manifest_bytes) = read_manifest(&mut zip, limits)?;
    // With secrets, the manifest is authenticated before anything else in it is believed
    // (file list, sizes, checksums): a rewritten manifest is refused here.
    let package_key = authenticate_manifest(&mut zip, &manifest, &manifest_bytes, key)?;
    let listed = check_listing(&zip, &manifest, manifest_bytes.len() as u64, limits)?;
    let (contents, blobs) = verify_files(&mut zip, &listed)?;
    let objects = verify_objects(&manifest, &contents, &blobs, package_key.as_ref())?;
    Ok(VerifiedPackage {
        manifest,
        objects,
        archive: zip,
        blobs,
    })
}

/// The manifest, bounded in size, of a format and version this gateway reads; with its bytes.
fn read_manifest<R: Read + std::io::Seek>(
    zip: &mut zip::ZipArchive<R>,
    limits: UnpackLimits,
) -> Result<(Manifest, Vec<u8>), PackageError> {
    let (manifest_limit, manifest_setting) = if limits.entry_bytes < MAX_META_BYTES {
        (limits.entry_bytes, "export.max_unpacked_entry_bytes")
    } else {
        (MAX_META_BYTES, "the limit of manifest and object files")
    };
    let manifest_bytes = read_small(zip, MANIFEST, manifest_limit, manifest_setting)?;
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
    Ok((manifest, manifest_bytes))
}

/// With encryption: the key derived from the operator's passphrase, once it verifies the
/// manifest's MAC. `None` without encryption.
fn authenticate_manifest<R: Read + std::io::Seek>(
    zip: &mut zip::ZipArchive<R>,
    manifest: &Manifest,
    manifest_bytes: &[u8],
    key: Option<&str>,
) -> Result<Option<PackageKey>, PackageError> {
    let Some(enc) = &manifest.encryption else {
        return Ok(None);
    };
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
    let mac = read_small(
        zip,
        MANIFEST_MAC,
        MAX_MAC_BYTES,
        "the limit of manifest.mac",
    )?;
    let mac = String::from_utf8(mac).map_err(|_| PackageError::Malformed("manifest.mac".into()))?;
    k.verify_mac(manifest_bytes, &mac)?;
    Ok(Some(k))
}

/// The listed files by path, once the entries are exactly those (+ manifest and its MAC) and
/// their listed sizes fit the limits.
fn check_listing<'m, R: Read + std::io::Seek>(
    zip: &zip::ZipArchive<R>,
    manifest: &'m Manifest,
    manifest_len: u64,
    limits: UnpackLimits,
) -> Result<BTreeMap<&'m str, &'m ManifestFile>, PackageError> {
    // The entries must be exactly the listed files (+ manifest and its MAC).
    let mut listed: BTreeMap<&str, &ManifestFile> = BTreeMap::new();
    for f in &manifest.files {
        if listed.insert(f.path.as_str(), f).is_some() {
            return Err(PackageError::Malformed(format!("{} listed twice", f.path)));
        }
    }
    for name in zip.file_names() {
        let known = name == MANIFEST
            || (name == MANIFEST_MAC && manifest.encryption.is_some())
            || listed.contains_key(name);
        if !known {
            return Err(PackageError::Malformed(format!(
                "{name} is not listed in the manifest"
            )));
        }
    }
    // What the manifest lists must fit the limits before anything is inflated; each file is
    // then inflated no further than its listed size, so the real total fits too.
    let mut total = manifest_len;
    for (path, f) in &listed {
        let (limit, setting) = if is_object_file(path) && MAX_META_BYTES < limits.entry_bytes {
            (MAX_META_BYTES, "the limit of manifest and object files")
        } else {
            (limits.entry_bytes, "export.max_unpacked_entry_bytes")
        };
        if f.size > limit {
            return Err(PackageError::EntryTooLarge {
                path: (*path).to_owned(),
                limit,
                setting,
            });
        }
        total = total.saturating_add(f.size);
        if total > limits.total_bytes {
            return Err(PackageError::TooLarge {
                limit: limits.total_bytes,
            });
        }
    }
    Ok(listed)
}

/// Inflates and checks every listed file: the object files' contents by path (they are parsed
/// next), and the firmware files' listings by path (only hashed).
#[allow(clippy::type_complexity)]
fn verify_files<R: Read + std::io::Seek>(
    zip: &mut zip::ZipArchive<R>,
    listed: &BTreeMap<&str, &ManifestFile>,
) -> Result<(HashMap<String, Vec<u8>>, HashMap<String, ManifestFile>), PackageError> {
    // Object files are kept (they are parsed below); everything else is only hashed.
    let mut contents: HashMap<String, Vec<u8>> = HashMap::new();
    let mut blobs: HashMap<String, ManifestFile> = HashMap::new();
    for (path, f) in listed {
        let keep = is_object_file(path);
        let mut data = Vec::new();
        let (size, sha) = inflate(zip, path, f.size, |chunk| {
            if keep {
                data.extend_from_slice(chunk);
            }
            true
        })?;
        if size != f.size || sha != f.sha256 {
            return Err(PackageError::ChecksumMismatch((*path).to_owned()));
        }
        if keep {
            contents.insert((*path).to_owned(), data);
        } else if path.starts_with("firmware/") {
            blobs.insert((*path).to_owned(), (*f).clone());
        }
    }
    Ok((contents, blobs))
}

/// The manifest's objects, each listed once, its file verified and parsed, its secrets
/// decrypted, its firmware file present.
fn verify_objects(
    manifest: &Manifest,
    contents: &HashMap<String, Vec<u8>>,
    blobs: &HashMap<String, ManifestFile>,
    package_key: Option<&PackageKey>,
) -> Result<Vec<PackageObject>, PackageError> {
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
        let secrets = match (&file.secrets, &m.secrets_nonce, package_key) {
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
            if !blobs.contains_key(blob) {
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
    Ok(objects)
}

/// An object's JSON file (kept in memory and parsed), as opposed to firmware bytes.
fn is_object_file(path: &str) -> bool {
    path.starts_with("objects/")
}

#[cfg(test)]
mod tests;
