//! Firmware packages: metadata, content-addressed bytes, signed download URLs.
//!
//! # What lives where
//!
//! - Bytes: `{data_dir}/firmware/{sha256}` ([`blob`]). Two packages with identical bytes share
//!   one file; deleting a package removes the file only when no other package refers to it.
//! - Metadata: one `ota.firmware` store document per package (JSON of [`FirmwarePackage`]),
//!   mirrored in memory for reads. Every change is durable before the call returns.
//! - The download signing key: `{data_dir}/download-key` ([`token`]).
//!
//! # Cluster mode
//!
//! With a [`SharedFirmware`] ([`Backing::Shared`]: the cluster's PostgreSQL database) the
//! bytes of record live there and the blob directory is this node's cache of them: an upload
//! is stored there before its metadata commits, a download on a node without the file fetches
//! it into the cache first (checking its SHA-256; concurrent downloads of one missing blob
//! fetch it once), a delete releases the shared bytes with the file. The signing key is the
//! cluster's (given at open), and `{data_dir}/download-key` is neither read nor created.
//! Downloads read the package's metadata of record there too, since only the node that
//! drives the engines keeps its index current.
//!
//! # Crash safety
//!
//! An upload is written to a temp file, fsynced, renamed onto its content address, the
//! directory fsynced, and only then is the metadata committed; a delete commits the metadata
//! removal before removing the file. So a crash at any point leaves at worst a file nobody
//! refers to, never a package whose bytes are gone, and [`FirmwareRepo::open`] sweeps such
//! leftovers (temp files and unreferenced blobs).
//!
//! # Locking
//!
//! The in-memory index sits behind a std `RwLock` that is never held across `.await`. Blob
//! installs and removals are serialised by one async gate (`blob_gate`) together with the
//! metadata change they go with, so a delete can never remove a file a concurrent upload of
//! the same bytes has just claimed. Uploads stream in parallel; only their final
//! rename + commit takes the gate.
//!
//! This module knows nothing of the registry: the caller checks the product exists (the API
//! does, see `api::firmware`). It must not touch jobs or tasks (`ota::jobs` owns those and asks
//! here for packages, URLs and [`UpgradeData`]).

mod blob;
mod cache;
mod download;
mod shared;
pub mod token;
mod validate;

use validate::*;

pub use blob::{BlobError, BlobWriter, StagedBlob};
pub use shared::SharedFirmware;
pub use token::{DownloadKey, TokenError};

use std::cmp::Reverse;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use fleetgate_topics::{FirmwareSignMethod, UpgradeData};
use rand::distributions::{Distribution, Uniform};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::registry::{Page, Paged};
use crate::store::{Op, Store, StoreError};

/// Store document kind of package metadata.
pub const DOC_KIND: &str = "ota.firmware";
/// Directory of the blobs inside the data dir.
pub const BLOB_DIR: &str = "firmware";
/// Most source versions one package may list.
pub const MAX_SRC_VERSIONS: usize = 10;
/// Default `max_size` of the settings: 256 MiB.
pub const DEFAULT_MAX_SIZE: u64 = 256 * 1024 * 1024;
/// Module of a package that names none.
pub const DEFAULT_MODULE: &str = fleetgate_topics::DEFAULT_MODULE;

/// A firmware package as stored and as the API shows it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, ToSchema)]
pub struct FirmwarePackage {
    /// `fw-` + 16 lowercase letters/digits.
    #[schema(example = "fw-3k9x0q2m7c1d5e8a")]
    pub firmware_id: String,
    pub product_key: String,
    pub name: String,
    pub version: String,
    /// `default` when the upload named none.
    pub module: String,
    /// Versions this package upgrades from; empty means any.
    pub src_versions: Vec<String>,
    /// Bytes.
    pub size: u64,
    /// Lowercase hex SHA-256 of the bytes (also the download `ETag`).
    pub sha256: String,
    /// Lowercase hex MD5 of the bytes.
    pub md5: String,
    /// `SHA256` or `Md5`: which digest `sign` holds.
    #[schema(value_type = String, example = "SHA256")]
    pub sign_method: FirmwareSignMethod,
    /// `sha256` or `md5`, per `sign_method`.
    pub sign: String,
    pub status: FirmwareStatus,
    pub description: Option<String>,
    pub created_at_ms: i64,
}

/// Verification state of a package (a VERIFY_FIRMWARE job moves it).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FirmwareStatus {
    Unverified,
    Verifying,
    Verified,
    VerifyFailed,
}

impl FirmwareStatus {
    /// The name the API shows (`UNVERIFIED`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            FirmwareStatus::Unverified => "UNVERIFIED",
            FirmwareStatus::Verifying => "VERIFYING",
            FirmwareStatus::Verified => "VERIFIED",
            FirmwareStatus::VerifyFailed => "VERIFY_FAILED",
        }
    }
}

/// What an upload says about the package besides its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewFirmware {
    pub product_key: String,
    pub version: String,
    /// `None` or empty: `default`.
    pub module: Option<String>,
    /// `None` or empty: the version.
    pub name: Option<String>,
    /// `None`: SHA256.
    pub sign_method: Option<FirmwareSignMethod>,
    pub src_versions: Vec<String>,
    pub description: Option<String>,
}

impl NewFirmware {
    /// A package of `product_key` at `version` with every option at its default.
    pub fn new(product_key: impl Into<String>, version: impl Into<String>) -> Self {
        NewFirmware {
            product_key: product_key.into(),
            version: version.into(),
            module: None,
            name: None,
            sign_method: None,
            src_versions: Vec::new(),
            description: None,
        }
    }
}

/// Errors of firmware operations.
#[derive(Debug, thiserror::Error)]
pub enum FirmwareError {
    #[error("firmware {0:?} not found")]
    NotFound(String),
    #[error("firmware {existing} already has version {version:?} of module {module:?} for product {product_key:?}")]
    AlreadyExists {
        product_key: String,
        module: String,
        version: String,
        existing: String,
    },
    #[error("invalid {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("the package is larger than {max} bytes")]
    TooLarge { max: u64 },
    #[error("firmware {0:?} is used by an unfinished job")]
    InUse(String),
    #[error("firmware storage: {0}")]
    Blob(BlobError),
    #[error("cannot set up firmware storage in {path}: {source}")]
    Setup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("corrupt firmware document {id:?}: {message}")]
    Corrupt { id: String, message: String },
    #[error("store: {0}")]
    Store(#[from] StoreError),
}

impl From<BlobError> for FirmwareError {
    fn from(e: BlobError) -> Self {
        match e {
            BlobError::TooLarge { max } => FirmwareError::TooLarge { max },
            e => FirmwareError::Blob(e),
        }
    }
}

/// `fw-` + 16 lowercase letters and digits.
fn generate_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let dist = Uniform::from(0..ALPHABET.len());
    let mut rng = rand::thread_rng();
    let tail: String = (0..16)
        .map(|_| ALPHABET[dist.sample(&mut rng)] as char)
        .collect();
    format!("fw-{tail}")
}

/// The package an upload becomes (a new id, UNVERIFIED), with the digests of its staged bytes.
fn new_package(new: NewFirmware, staged: &StagedBlob) -> Result<FirmwarePackage, FirmwareError> {
    let (module, name, sign_method, src_versions) = normalise(&new)?;
    let sign = match sign_method {
        FirmwareSignMethod::Sha256 => staged.sha256.clone(),
        FirmwareSignMethod::Md5 => staged.md5.clone(),
    };
    Ok(FirmwarePackage {
        firmware_id: generate_id(),
        product_key: new.product_key,
        name,
        version: new.version,
        module,
        src_versions,
        size: staged.size,
        sha256: staged.sha256.clone(),
        md5: staged.md5.clone(),
        sign_method,
        sign,
        status: FirmwareStatus::Unverified,
        description: new.description.filter(|d| !d.is_empty()),
        created_at_ms: crate::clock::now_ms(),
    })
}

/// Seconds since the Unix epoch: download links expire on the wall clock.
fn now_secs() -> u64 {
    (crate::clock::now_ms().max(0) / 1000) as u64
}

// ----- the repository -----

/// Identity of a package: one per (product, module, version).
type Identity = (String, String, String);

fn identity(p: &FirmwarePackage) -> Identity {
    (p.product_key.clone(), p.module.clone(), p.version.clone())
}

#[derive(Default)]
struct Index {
    packages: HashMap<String, FirmwarePackage>,
    by_identity: HashMap<Identity, String>,
    /// Newest first, then by id: the list order.
    order: BTreeSet<(Reverse<i64>, String)>,
}

impl Index {
    fn insert(&mut self, p: FirmwarePackage) {
        self.by_identity.insert(identity(&p), p.firmware_id.clone());
        self.order
            .insert((Reverse(p.created_at_ms), p.firmware_id.clone()));
        self.packages.insert(p.firmware_id.clone(), p);
    }

    fn remove(&mut self, id: &str) -> Option<FirmwarePackage> {
        let p = self.packages.remove(id)?;
        self.by_identity.remove(&identity(&p));
        self.order
            .remove(&(Reverse(p.created_at_ms), p.firmware_id.clone()));
        Some(p)
    }

    fn blob_in_use(&self, sha256: &str) -> bool {
        self.packages.values().any(|p| p.sha256 == sha256)
    }
}

/// Where the bytes of record and the signing key come from.
pub enum Backing {
    /// Single node: the blob directory holds the only copy; the key is
    /// `{data_dir}/download-key`.
    Local,
    /// Cluster mode: the bytes of record are in `firmware` (the blob directory caches them);
    /// `key` is the cluster's.
    Shared {
        firmware: Arc<dyn SharedFirmware>,
        key: DownloadKey,
    },
}

/// One fetch from the shared copy at a time per blob (the others wait and find the file).
type FetchGates = std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>;

/// Firmware packages and their bytes. Share it as `Arc<FirmwareRepo>`.
pub struct FirmwareRepo {
    store: Store,
    blob_dir: PathBuf,
    public_url: String,
    max_size: u64,
    key: DownloadKey,
    index: RwLock<Index>,
    /// Serialises blob install/remove with the metadata change that goes with it.
    blob_gate: tokio::sync::Mutex<()>,
    /// Cluster mode: the bytes and metadata of record.
    shared: Option<Arc<dyn SharedFirmware>>,
    fetching: FetchGates,
}

impl std::fmt::Debug for FirmwareRepo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FirmwareRepo")
            .field("blob_dir", &self.blob_dir)
            .field("public_url", &self.public_url)
            .field("max_size", &self.max_size)
            .field("shared", &self.shared)
            .field("packages", &self.read().packages.len())
            .finish_non_exhaustive()
    }
}

impl FirmwareRepo {
    /// Blobs in `{data_dir}/firmware/`, metadata in `ota.firmware` documents, the download
    /// signing key in `{data_dir}/download-key` (created on first start, 0600).
    ///
    /// `public_url` is the base of download links (`http://host:port`, a trailing `/` is
    /// ignored); `max_size` caps one package's bytes. Blocks while it reads the store and sweeps
    /// the blob directory (start-up only).
    pub fn open(
        data_dir: &Path,
        store: Store,
        public_url: String,
        max_size: u64,
    ) -> Result<Arc<FirmwareRepo>, FirmwareError> {
        Self::open_with(data_dir, store, public_url, max_size, Backing::Local)
    }

    /// [`open`](Self::open) with the bytes of record and the key of `backing` (cluster mode:
    /// [`Backing::Shared`], see the module docs).
    pub fn open_with(
        data_dir: &Path,
        store: Store,
        public_url: String,
        max_size: u64,
        backing: Backing,
    ) -> Result<Arc<FirmwareRepo>, FirmwareError> {
        let blob_dir = data_dir.join(BLOB_DIR);
        std::fs::create_dir_all(&blob_dir).map_err(|source| FirmwareError::Setup {
            path: blob_dir.clone(),
            source,
        })?;
        let (key, shared) = match backing {
            Backing::Local => {
                let key = DownloadKey::load_or_create(data_dir).map_err(|source| {
                    FirmwareError::Setup {
                        path: data_dir.join(token::KEY_FILE),
                        source,
                    }
                })?;
                (key, None)
            }
            Backing::Shared { firmware, key } => (key, Some(firmware)),
        };
        let mut index = Index::default();
        for (id, body) in store.load_documents(DOC_KIND)? {
            let p: FirmwarePackage =
                serde_json::from_str(&body).map_err(|e| FirmwareError::Corrupt {
                    id: id.clone(),
                    message: e.to_string(),
                })?;
            if p.firmware_id != id {
                return Err(FirmwareError::Corrupt {
                    id,
                    message: format!("document holds firmware {:?}", p.firmware_id),
                });
            }
            index.insert(p);
        }
        let referenced: HashSet<String> =
            index.packages.values().map(|p| p.sha256.clone()).collect();
        let report =
            blob::clean_dir(&blob_dir, &referenced).map_err(|source| FirmwareError::Setup {
                path: blob_dir.clone(),
                source,
            })?;
        if shared.is_none() {
            for sha in &report.missing {
                // Only someone removing files by hand gets here (see the module docs); the
                // metadata stays so the operator sees which packages are broken.
                tracing::error!(sha256 = %sha, dir = %blob_dir.display(), "firmware blob missing; its packages cannot be downloaded");
            }
        }
        // Cluster mode: a blob not cached here is fetched by its first download.
        tracing::info!(
            packages = index.packages.len(),
            temp_removed = report.temp_removed,
            orphans_removed = report.orphans_removed,
            not_cached = if shared.is_some() {
                report.missing.len()
            } else {
                0
            },
            shared = shared.is_some(),
            "firmware loaded"
        );
        Ok(Arc::new(FirmwareRepo {
            store,
            blob_dir,
            public_url: public_url.trim_end_matches('/').to_owned(),
            max_size,
            key,
            index: RwLock::new(index),
            blob_gate: tokio::sync::Mutex::new(()),
            shared,
            fetching: FetchGates::default(),
        }))
    }

    /// Reads the package metadata back from the store (blocking). Cluster mode: the node that
    /// takes over the engines learns the packages the previous holder created.
    pub fn reload(&self) -> Result<(), FirmwareError> {
        let mut index = Index::default();
        for (id, body) in self.store.load_documents(DOC_KIND)? {
            let p: FirmwarePackage =
                serde_json::from_str(&body).map_err(|e| FirmwareError::Corrupt {
                    id: id.clone(),
                    message: e.to_string(),
                })?;
            index.insert(p);
        }
        *self.write() = index;
        Ok(())
    }

    fn read(&self) -> RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Cluster mode: the follower of the `ota.firmware` documents other nodes write, which
    /// keeps this node's blob cache free of deleted packages (`cache`; register it with
    /// `Cluster::follow_docs`).
    pub fn cache_follower(&self) -> Arc<dyn crate::cluster::DocFollower> {
        Arc::new(cache::CacheFollower::new(self.blob_dir.clone()))
    }

    /// Installs `staged` under its content address on a blocking thread (rename and fsyncs).
    async fn install(&self, staged: StagedBlob) -> Result<PathBuf, FirmwareError> {
        let installed = tokio::task::spawn_blocking(move || staged.install())
            .await
            .map_err(|e| {
                FirmwareError::Blob(BlobError::Io {
                    what: "install task failed for",
                    path: self.blob_dir.clone(),
                    source: std::io::Error::other(e.to_string()),
                })
            })??;
        Ok(installed)
    }

    /// Largest package accepted, bytes.
    pub fn max_size(&self) -> u64 {
        self.max_size
    }

    /// Base of download links, without a trailing `/`.
    pub fn public_url(&self) -> &str {
        &self.public_url
    }

    pub fn get(&self, firmware_id: &str) -> Option<FirmwarePackage> {
        self.read().packages.get(firmware_id).cloned()
    }

    /// Packages, newest first, optionally of one product.
    pub fn list(&self, product_key: Option<&str>, page: Page) -> Paged<FirmwarePackage> {
        let index = self.read();
        let matching = index
            .order
            .iter()
            .filter_map(|(_, id)| index.packages.get(id))
            .filter(|p| product_key.is_none_or(|pk| p.product_key == pk));
        let mut total = 0u64;
        let mut items = Vec::new();
        let skip = (page.page as usize - 1).saturating_mul(page.page_size as usize);
        for (i, p) in matching.enumerate() {
            total += 1;
            if i >= skip && items.len() < page.page_size as usize {
                items.push(p.clone());
            }
        }
        Paged {
            items,
            total,
            page: page.page,
            page_size: page.page_size,
        }
    }

    /// The package of `product_key` with `module` and `version`, if uploaded.
    pub fn find(&self, product_key: &str, module: &str, version: &str) -> Option<FirmwarePackage> {
        let index = self.read();
        let key = (
            product_key.to_owned(),
            module.to_owned(),
            version.to_owned(),
        );
        index
            .by_identity
            .get(&key)
            .and_then(|id| index.packages.get(id))
            .cloned()
    }

    /// Starts an upload: a temp file in the blob directory that refuses bytes past
    /// [`max_size`](Self::max_size). Feed it with [`BlobWriter::write`], then
    /// [`BlobWriter::finish`] and [`create`](Self::create).
    pub async fn begin_upload(&self) -> Result<BlobWriter, FirmwareError> {
        Ok(BlobWriter::create(&self.blob_dir, self.max_size).await?)
    }

    /// Checks `new` without storing anything (the API calls it before streaming the bytes so
    /// a bad field fails fast).
    pub fn validate(&self, new: &NewFirmware) -> Result<(), FirmwareError> {
        normalise(new)?;
        self.check_identity_free(new)
    }

    fn check_identity_free(&self, new: &NewFirmware) -> Result<(), FirmwareError> {
        let module = match new.module.as_deref() {
            None | Some("") => DEFAULT_MODULE,
            Some(m) => m,
        };
        if let Some(existing) = self.find(&new.product_key, module, &new.version) {
            return Err(FirmwareError::AlreadyExists {
                product_key: existing.product_key,
                module: existing.module,
                version: existing.version,
                existing: existing.firmware_id,
            });
        }
        Ok(())
    }

    /// Stores a package whose bytes were staged by an upload. Durable when it returns; on any
    /// error the staged bytes are discarded (and nothing refers to them).
    pub async fn create(
        &self,
        new: NewFirmware,
        staged: StagedBlob,
    ) -> Result<FirmwarePackage, FirmwareError> {
        let package = new_package(new, &staged)?;
        let body = serde_json::to_string(&package).map_err(|e| FirmwareError::Corrupt {
            id: package.firmware_id.clone(),
            message: e.to_string(),
        })?;
        // Cluster mode: the bytes of record first (the long part, outside the gate).
        if let (Some(shared), Some(temp)) = (&self.shared, staged.temp_path()) {
            shared.persist(&package.sha256, package.size, temp).await?;
        }

        // Every create and delete holds the gate, so the identity checked here stays free
        // until the package is inserted below (a concurrent upload of it gets 409 and installs
        // nothing).
        let _gate = self.blob_gate.lock().await;
        let taken = self.read().by_identity.get(&identity(&package)).cloned();
        if let Some(existing) = taken {
            // Cluster mode: the bytes stored above may be this upload's alone.
            if !self.read().blob_in_use(&package.sha256) {
                self.release_shared(&package.sha256).await;
            }
            return Err(FirmwareError::AlreadyExists {
                product_key: package.product_key,
                module: package.module,
                version: package.version,
                existing,
            });
        }
        // Bytes durable under their address before any metadata refers to them.
        let installed = self.install(staged).await?;
        if let Some(shared) = &self.shared {
            // Again under the gate: a delete of another package with the same bytes may have
            // released them since the first call. Stored bytes make this one query.
            if let Err(e) = shared
                .persist(&package.sha256, package.size, &installed)
                .await
            {
                if !self.read().blob_in_use(&package.sha256) {
                    blob::remove_blob(&self.blob_dir, &package.sha256);
                }
                return Err(e.into());
            }
        }
        let ticket = {
            let mut index = self.write();
            index.insert(package.clone());
            // Submitted under the lock, like `set_status`: store order = memory order.
            self.store.submit(vec![Op::PutDoc {
                kind: DOC_KIND,
                id: package.firmware_id.clone(),
                body,
            }])
        };
        if let Err(e) = ticket.await {
            let shared = {
                let mut index = self.write();
                index.remove(&package.firmware_id);
                index.blob_in_use(&package.sha256)
            };
            // Still under the gate, so nobody can claim the file between check and removal.
            if !shared {
                blob::remove_blob(&self.blob_dir, &package.sha256);
                self.release_shared(&package.sha256).await;
            }
            return Err(e.into());
        }
        tracing::info!(
            firmware_id = %package.firmware_id,
            product_key = %package.product_key,
            module = %package.module,
            version = %package.version,
            size = package.size,
            "firmware stored"
        );
        Ok(package)
    }

    /// Streams `bytes` through an upload and stores the package (tools and tests; the API
    /// streams from the request instead).
    pub async fn create_from_bytes(
        &self,
        new: NewFirmware,
        bytes: &[u8],
    ) -> Result<FirmwarePackage, FirmwareError> {
        normalise(&new)?;
        let mut writer = self.begin_upload().await?;
        for chunk in bytes.chunks(64 * 1024) {
            writer.write(chunk).await?;
        }
        let staged = writer.finish().await?;
        self.create(new, staged).await
    }

    /// Sets a package's verification status (durable when it returns).
    pub async fn set_status(
        &self,
        firmware_id: &str,
        status: FirmwareStatus,
    ) -> Result<FirmwarePackage, FirmwareError> {
        let (updated, previous, ticket) = {
            let mut index = self.write();
            let p = index
                .packages
                .get_mut(firmware_id)
                .ok_or_else(|| FirmwareError::NotFound(firmware_id.to_owned()))?;
            let previous = p.status;
            p.status = status;
            let updated = p.clone();
            let body = serde_json::to_string(&updated).map_err(|e| FirmwareError::Corrupt {
                id: firmware_id.to_owned(),
                message: e.to_string(),
            })?;
            // Submitted under the lock: store order = memory order for this package.
            let ticket = self.store.submit(vec![Op::PutDoc {
                kind: DOC_KIND,
                id: firmware_id.to_owned(),
                body,
            }]);
            (updated, previous, ticket)
        };
        if let Err(e) = ticket.await {
            // Undo in memory unless someone changed it again meanwhile.
            if let Some(p) = self.write().packages.get_mut(firmware_id) {
                if p.status == status {
                    p.status = previous;
                }
            }
            return Err(e.into());
        }
        Ok(updated)
    }

    /// Deletes a package; [`FirmwareError::InUse`] when `in_use` (the caller — OTA jobs — knows
    /// whether an unfinished job uses it). The bytes go too unless another package has the
    /// same bytes. Durable when it returns.
    pub async fn delete(
        &self,
        firmware_id: &str,
        in_use: bool,
    ) -> Result<FirmwarePackage, FirmwareError> {
        let _gate = self.blob_gate.lock().await;
        if !self.read().packages.contains_key(firmware_id) {
            return Err(FirmwareError::NotFound(firmware_id.to_owned()));
        }
        if in_use {
            return Err(FirmwareError::InUse(firmware_id.to_owned()));
        }
        let (removed, ticket) = {
            let mut index = self.write();
            let Some(removed) = index.remove(firmware_id) else {
                return Err(FirmwareError::NotFound(firmware_id.to_owned()));
            };
            let ticket = self.store.submit(vec![Op::DeleteDoc {
                kind: DOC_KIND,
                id: firmware_id.to_owned(),
            }]);
            (removed, ticket)
        };
        if let Err(e) = ticket.await {
            self.write().insert(removed);
            return Err(e.into());
        }
        // Metadata is gone for good; now the bytes, unless shared. The gate keeps a concurrent
        // upload of the same bytes from claiming the file between this check and the removal.
        if !self.read().blob_in_use(&removed.sha256) {
            blob::remove_blob(&self.blob_dir, &removed.sha256);
            self.release_shared(&removed.sha256).await;
        }
        tracing::info!(firmware_id = %firmware_id, "firmware deleted");
        Ok(removed)
    }

    /// Cluster mode: removes the shared bytes of `sha256` unless a package of record still
    /// refers to them. A failure is logged: the metadata is gone already, and the next start of
    /// a node sweeps bytes nobody refers to.
    async fn release_shared(&self, sha256: &str) {
        let Some(shared) = &self.shared else { return };
        match shared.release(sha256).await {
            Ok(removed) => {
                tracing::debug!(sha256 = %sha256, removed, "shared firmware bytes released")
            }
            Err(e) => {
                tracing::warn!(sha256 = %sha256, error = %e, "cannot release shared firmware bytes; a later start sweeps them")
            }
        }
    }
}

#[cfg(test)]
mod tests;
