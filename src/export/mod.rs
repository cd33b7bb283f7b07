//! Export and import jobs (docs/DESIGN.md §7, docs/EXPORT.md): move products, devices (with
//! their secrets, encrypted), firmware packages, OTA jobs and migration task definitions between
//! gateways as ZIP packages.
//!
//! # Shape
//!
//! - [`ExportService::start_export`] resolves the requested ids (and their dependencies)
//!   against the registry, firmware repository, OTA engine and migration engine *in the request*, so unknown ids
//!   fail it; then it records an IN_PROGRESS job, answers, and a tokio task writes the package
//!   to `{data_dir}/exports/{id}.zip` ([`package::write_package`], on a blocking thread).
//! - [`ExportService::start_import`] verifies the whole package first ([`package::read_package`]:
//!   archive, manifest MAC, checksums of every file, every secret, unpacking bounded by the
//!   `max_unpacked_*` settings) and refuses a bad one before any job exists; a task then plans every object against this gateway (created / identical /
//!   conflict) and only then writes, in dependency order. With `conflict_policy=fail` a single
//!   conflict means nothing is written.
//! - Jobs are `export.job` / `import.job` store documents (status, per-object status, log),
//!   written at start and end; a job a restart interrupted is marked FAILED when loaded (in a
//!   cluster: by the next holder of the engines' lease, when its term begins).
//! - Cluster mode ([`ExportService::share_packages`], [`SharedPackages`]): a finished package
//!   is stored in the shared database before the job says SUCCESSFUL, and a node asked for a
//!   package it does not have (the next holder, after the one that ran the export died)
//!   fetches it into its `exports/` directory first ([`ExportService::package_file_ready`]).
//!   Firmware a package includes is fetched into the firmware cache before it is written.
//! - [`limit`]: the 429 "too many requests" checks the API applies to these routes.
//! - `resolve`: the requested objects and their dependencies, in import order; `import`: the
//!   import job's planning and writing.
//!
//! This module changes registry, firmware, OTA and migration state only through their public
//! methods (a migration task is imported with [`MigrationEngine::create`]).
//!
//! Roles ([`Privilege`]): an import writes only what its starter could create through the API
//! (a package that would create a product is refused for an operator before the job exists),
//! and an export carries only the secrets its starter could read (an operator's export leaves
//! product secrets out). A device an import disables, re-keys or moves is disconnected through
//! [`DeviceRevokedHook`].

pub mod crypto;
pub mod limit;
pub mod model;
pub mod package;

mod import;
mod resolve;
mod shared;

pub use limit::{ExportLimiter, Limited};
pub use model::*;
pub use package::PackageError;
pub use shared::SharedPackages;

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;

use dashmap::DashMap;
use serde_json::json;

use crate::config::ExportSettings;
use crate::migration::{MigrationEngine, TaskFilter};
use crate::ota::engine::JobFilter;
use crate::ota::{FirmwareRepo, OtaEngine};
use crate::registry::{DeviceFilter, Page, Registry};
use crate::store::{Op, Store, StoreError};
use package::ExportItem;

/// Store document kinds.
pub const EXPORT_DOC: &str = "export.job";
pub const IMPORT_DOC: &str = "import.job";
/// Directory of finished packages inside the data dir.
pub const EXPORT_DIR: &str = "exports";

/// Errors of export/import requests.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{kind} job {id:?} not found")]
    NotFound { kind: &'static str, id: String },
    #[error("the package of export {id:?} is not available: the job is {state}")]
    NotReady { id: String, state: &'static str },
    #[error("invalid {field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("missing field {0}")]
    Missing(&'static str),
    #[error("unknown objects: {}", .0.join(", "))]
    UnknownObjects(Vec<String>),
    #[error("objects: at most {max} objects per export job (got {got})")]
    TooMany { max: usize, got: usize },
    #[error("the package was refused: {0}")]
    Package(#[from] PackageError),
    #[error("{}", .0.reason)]
    Limited(Limited),
    /// The starter's role may not write some objects of the package.
    #[error("{0}")]
    Forbidden(String),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Internal(String),
}

/// Called with `(product_key, device_name)` after an import disabled a device, changed its
/// secret or moved it, so the app can drop the MQTT session it may no longer hold (the same
/// hook the API's PATCH uses).
pub type DeviceRevokedHook = Arc<dyn Fn(&str, &str) + Send + Sync>;

/// Which secrets an export carries: none when the request left them out, otherwise those its
/// starter may read.
#[derive(Debug, Clone, Copy)]
struct SecretsFor {
    include: bool,
    by: Privilege,
}

impl SecretsFor {
    fn of(self, t: ObjectType) -> bool {
        self.include && self.by.may_read_secrets(t)
    }
}

fn now() -> i64 {
    crate::clock::now_ms()
}

fn new_id(prefix: &str) -> String {
    use rand::distributions::{Alphanumeric, DistString};
    format!(
        "{prefix}-{}",
        Alphanumeric
            .sample_string(&mut rand::thread_rng(), 16)
            .to_ascii_lowercase()
    )
}

struct Inner {
    registry: Arc<Registry>,
    firmware: Arc<FirmwareRepo>,
    ota: OtaEngine,
    migration: Arc<MigrationEngine>,
    store: Store,
    dir: PathBuf,
    settings: ExportSettings,
    jobs: DashMap<String, JobRecord>,
    limiter: Arc<ExportLimiter>,
    on_device_revoked: DeviceRevokedHook,
    /// Cluster mode: the packages of record ([`SharedPackages`]).
    shared: std::sync::OnceLock<Arc<dyn SharedPackages>>,
    /// One package fetch at a time (they are rare: the first download after a takeover).
    fetching: tokio::sync::Mutex<()>,
}

/// How [`ExportService::open`] treats jobs left IN_PROGRESS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// One node: they were interrupted by this node's restart; marked FAILED.
    Running,
    /// Cluster mode: left as they are until this node drives the engines.
    Standby,
}

/// Every job in the store; with `fail_interrupted`, the ones IN_PROGRESS become FAILED
/// (durably, before they are returned). Blocking.
fn load_jobs(
    store: &Store,
    fail_interrupted: bool,
) -> Result<DashMap<String, JobRecord>, ExportError> {
    let jobs = DashMap::new();
    let mut ops = Vec::new();
    for kind in [EXPORT_DOC, IMPORT_DOC] {
        for (id, body) in store.load_documents(kind)? {
            let mut job: JobRecord = match serde_json::from_str(&body) {
                Ok(j) => j,
                Err(e) => {
                    tracing::error!(id = %id, error = %e, "corrupt export/import job skipped");
                    continue;
                }
            };
            if fail_interrupted && job.status.state == JobState::InProgress {
                let msg = "interrupted by a gateway restart (or, in a cluster, by the loss of the node that ran it)";
                job.status = Status::new(JobState::Failed, msg);
                job.ended_at_ms = Some(now());
                job.log("ERROR", "FGX_009", msg);
                ops.push(doc_op(&job));
            }
            jobs.insert(id, job);
        }
    }
    if !ops.is_empty() {
        store.submit_blocking(ops)?;
    }
    Ok(jobs)
}

/// Export/import jobs. Cheap to clone.
#[derive(Clone)]
pub struct ExportService {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ExportService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportService")
            .field("dir", &self.inner.dir)
            .field("jobs", &self.inner.jobs.len())
            .finish_non_exhaustive()
    }
}

impl ExportService {
    /// Loads the jobs and creates `{data_dir}/exports`. Blocking: start-up only. On one node
    /// ([`Start::Running`]) a job a restart interrupted is marked FAILED now; in a cluster
    /// ([`Start::Standby`]) that is done by the holder of the engines' lease when its term
    /// begins ([`ExportService::activate`]) — another node's restart must not touch the jobs
    /// the holder runs.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        data_dir: &std::path::Path,
        store: Store,
        registry: Arc<Registry>,
        firmware: Arc<FirmwareRepo>,
        ota: OtaEngine,
        migration: Arc<MigrationEngine>,
        settings: ExportSettings,
        on_device_revoked: DeviceRevokedHook,
        start: Start,
    ) -> Result<ExportService, ExportError> {
        let dir = data_dir.join(EXPORT_DIR);
        std::fs::create_dir_all(&dir)
            .map_err(|e| ExportError::Internal(format!("cannot create {}: {e}", dir.display())))?;
        // Fetches a stop interrupted (cluster mode): the next download fetches again.
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(".fetch-") {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        let jobs = load_jobs(&store, start == Start::Running)?;
        let limiter = Arc::new(ExportLimiter::new(&settings));
        Ok(ExportService {
            inner: Arc::new(Inner {
                registry,
                firmware,
                ota,
                migration,
                store,
                dir,
                settings,
                jobs,
                limiter,
                on_device_revoked,
                shared: std::sync::OnceLock::new(),
                fetching: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// Cluster mode: finished packages are stored in `shared` too, and a package this node
    /// does not have is fetched from there (see [`SharedPackages`]). Set once, at start.
    pub fn share_packages(&self, shared: Arc<dyn SharedPackages>) {
        if self.inner.shared.set(shared).is_err() {
            tracing::warn!("export packages are already shared; the second store is ignored");
        }
    }

    /// Cluster mode: this node took the engines' lease. Reloads the jobs from the store and
    /// marks the ones the previous holder left IN_PROGRESS as FAILED (their packages were
    /// being written on that node), as a restart does on one node.
    pub async fn activate(&self) -> Result<(), ExportError> {
        let store = self.inner.store.clone();
        let jobs = tokio::task::spawn_blocking(move || load_jobs(&store, true))
            .await
            .map_err(|e| ExportError::Internal(format!("loading the jobs failed: {e}")))??;
        self.inner.jobs.clear();
        for (id, job) in jobs {
            self.inner.jobs.insert(id, job);
        }
        Ok(())
    }

    pub fn limiter(&self) -> &Arc<ExportLimiter> {
        &self.inner.limiter
    }

    pub fn settings(&self) -> &ExportSettings {
        &self.inner.settings
    }

    /// A job of `kind` by id.
    pub fn get(&self, kind: JobKind, id: &str) -> Result<JobRecord, ExportError> {
        self.inner
            .jobs
            .get(id)
            .map(|j| j.value().clone())
            .filter(|j| j.kind == kind)
            .ok_or_else(|| ExportError::NotFound {
                kind: kind_name(kind),
                id: id.to_owned(),
            })
    }

    /// The file of a finished export's package on this node; `NotReady` while running or
    /// after a failure. Cluster mode: a package this node does not have is fetched from the
    /// shared copy first.
    pub async fn package_file_ready(&self, id: &str) -> Result<PathBuf, ExportError> {
        let path = self.package_path(id)?;
        let Some(shared) = self.inner.shared.get() else {
            return Ok(path);
        };
        if tokio::fs::try_exists(&path).await.unwrap_or(false) {
            return Ok(path);
        }
        let _one = self.inner.fetching.lock().await;
        if tokio::fs::try_exists(&path).await.unwrap_or(false) {
            return Ok(path);
        }
        let temp = self.inner.dir.join(format!(".fetch-{id}.zip"));
        let fetched = shared.fetch(id, &temp).await;
        let installed = match fetched {
            Ok(true) => tokio::fs::rename(&temp, &path)
                .await
                .map_err(|e| format!("cannot install {}: {e}", path.display())),
            Ok(false) => Err(format!(
                "the package of export {id} is missing from the shared database"
            )),
            Err(e) => Err(e),
        };
        if let Err(e) = installed {
            let _ = tokio::fs::remove_file(&temp).await;
            return Err(ExportError::Internal(e));
        }
        tracing::info!(export_id = %id, "export package fetched from the shared database");
        Ok(path)
    }

    /// Path of a finished export's package; `NotReady` while running or after a failure.
    pub fn package_path(&self, id: &str) -> Result<PathBuf, ExportError> {
        let job = self.get(JobKind::Export, id)?;
        match job.status.state {
            JobState::Successful => Ok(self.package_file(id)),
            JobState::InProgress => Err(ExportError::NotReady {
                id: id.to_owned(),
                state: "IN_PROGRESS",
            }),
            JobState::Failed => Err(ExportError::NotReady {
                id: id.to_owned(),
                state: "FAILED",
            }),
        }
    }

    fn package_file(&self, id: &str) -> PathBuf {
        self.inner.dir.join(format!("{id}.zip"))
    }

    /// Stores `job` in memory and durably.
    async fn save(&self, job: JobRecord) -> Result<(), StoreError> {
        let ticket = {
            // Submitted while the entry is held: store order = memory order.
            let op = doc_op(&job);
            let id = job.id.clone();
            let mut slot = self.inner.jobs.entry(id).or_insert_with(|| job.clone());
            *slot = job;
            self.inner.store.submit(vec![op])
        };
        ticket.await
    }

    // ----- export -----

    /// Validates and resolves the request, records the job and starts it. Answers at once.
    pub async fn start_export(
        &self,
        req: ExportRequest,
        by: Privilege,
    ) -> Result<JobRecord, ExportError> {
        let started_by = by.as_str();
        if req.objects.is_empty() {
            return Err(ExportError::Invalid {
                field: "objects",
                message: "name at least one object".into(),
            });
        }
        if req.objects.len() > MAX_REQUESTED_OBJECTS {
            return Err(ExportError::TooMany {
                max: MAX_REQUESTED_OBJECTS,
                got: req.objects.len(),
            });
        }
        let created = now();
        let name = job_name(req.name.as_deref(), || format!("job-{created}"))?;
        let secrets = SecretsFor {
            include: req.include_secrets.unwrap_or(true),
            by,
        };
        let items = self.resolve(&req.objects, secrets)?;
        let has_secrets = items.iter().any(|i| i.secrets.is_some());
        let key = export_key(req.secrets_key.as_deref(), has_secrets)?;
        let blob_bytes: u64 = items
            .iter()
            .filter_map(|i| {
                i.data
                    .get("size")
                    .and_then(|s| s.as_u64())
                    .filter(|_| i.blob.is_some())
            })
            .sum();
        let slot = self
            .inner
            .limiter
            .reserve(blob_bytes)
            .map_err(ExportError::Limited)?;

        let mut job = export_job(name, created, &items, has_secrets, started_by);
        job.log(
            "INFO",
            "FGX_002",
            format!(
                "Starting export operation. Job Name: {} Job Id: {} Objects: {} (requested {}) Secrets: {} Started by: {started_by}",
                job.name,
                job.id,
                items.len(),
                req.objects.len(),
                if has_secrets { "encrypted" } else { "not included" },
            ),
        );
        let products_without_secret = items
            .iter()
            .filter(|i| i.object_type == ObjectType::Product && i.secrets.is_none())
            .count();
        if secrets.include && products_without_secret > 0 {
            job.log(
                "WARN",
                "FGX_006",
                format!(
                    "{products_without_secret} product(s) exported without their product_secret: only an admin's export carries product secrets (an import creates such a product with a new secret)"
                ),
            );
        }
        self.save(job.clone()).await?;
        let this = self.clone();
        let id = job.id.clone();
        tokio::spawn(async move {
            this.run_export(id, items, key).await;
            drop(slot);
        });
        Ok(job)
    }

    async fn run_export(&self, id: String, items: Vec<ExportItem>, key: Option<String>) {
        let Ok(mut job) = self.get(JobKind::Export, &id) else {
            return;
        };
        self.cache_firmware(&items).await;
        let dest = self.package_file(&id);
        let iterations = self.inner.settings.kdf_iterations.max(1);
        let (job_id, job_name, created) = (job.id.clone(), job.name.clone(), job.created_at_ms);
        let written = tokio::task::spawn_blocking(move || {
            let key = key.as_deref().map(|k| (k, iterations));
            package::write_package(&dest, (&job_id, &job_name, created), &items, key)
        })
        .await;
        let outcome = match written {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(e) => Err(format!("export task failed: {e}")),
        };
        match outcome {
            Ok((size, per_item)) => {
                let failed = record_items(&mut job, per_item);
                self.conclude_written(&mut job, &id, size, failed).await;
            }
            Err(msg) => {
                for o in &mut job.objects {
                    o.status = Status::new(JobState::Failed, "not exported");
                }
                job.log("ERROR", "FGX_005", format!("Export failed: {msg}"));
                job.status = Status::new(JobState::Failed, format!("Export failed: {msg}"));
            }
        }
        let end = now();
        job.ended_at_ms = Some(end);
        let msg = format!(
            "Finished export operation. Job Name: {} Start Time: {} End Time: {} Started by: {} Start Method: API Status: {}",
            job.name,
            rfc3339_ms(job.started_at_ms.unwrap_or(job.created_at_ms)),
            rfc3339_ms(end),
            job.started_by.clone().unwrap_or_default(),
            state_str(job.status.state)
        );
        job.log("INFO", "FGX_003", msg);
        if let Err(e) = self.save(job).await {
            tracing::error!(job_id = %id, error = %e, "cannot persist export job");
        }
    }

    /// Cluster mode: firmware this node has not cached yet is fetched from the shared copy
    /// first (a failure leaves the file missing; writing then fails that object alone).
    async fn cache_firmware(&self, items: &[ExportItem]) {
        for item in items {
            if item.blob.is_none() {
                continue;
            }
            if let Some(f) = self.inner.firmware.get(&item.id) {
                if let Err(e) = self.inner.firmware.local_blob(&f).await {
                    tracing::warn!(firmware_id = %f.firmware_id, error = %e, "cannot fetch firmware bytes for an export");
                }
            }
        }
    }

    /// The export job's state once its package is written with `failed` objects left out:
    /// successful when none failed and the package is stored (cluster mode: in the shared
    /// database too); otherwise failed, and the package removed.
    async fn conclude_written(&self, job: &mut JobRecord, id: &str, size: u64, failed: usize) {
        // Cluster mode: the package is stored where every node reads it before the
        // job says it is there.
        let stored = match self.inner.shared.get() {
            Some(shared) if failed == 0 => shared.persist(id, &self.package_file(id)).await,
            _ => Ok(()),
        };
        if let Err(e) = &stored {
            job.log(
                "ERROR",
                "FGX_005",
                format!("Export failed: cannot store the package: {e}"),
            );
        }
        if failed == 0 && stored.is_ok() {
            job.package_size = Some(size);
            job.status = Status::new(JobState::Successful, "Export completed successfully.");
        } else if failed == 0 {
            let _ = std::fs::remove_file(self.package_file(id));
            job.status = Status::new(
                JobState::Failed,
                "Export failed: the package could not be stored in the shared database",
            );
        } else {
            let _ = std::fs::remove_file(self.package_file(id));
            job.status = Status::new(
                JobState::Failed,
                format!("{failed} object(s) could not be exported"),
            );
        }
    }

    /// Every job of `kind`, newest first (for listings).
    pub fn list(&self, kind: JobKind) -> Vec<JobRecord> {
        let mut all: Vec<JobRecord> = self
            .inner
            .jobs
            .iter()
            .filter(|j| j.kind == kind)
            .map(|j| j.value().clone())
            .collect();
        all.sort_by(|a, b| b.created_at_ms.cmp(&a.created_at_ms).then(a.id.cmp(&b.id)));
        all
    }

    /// Used by [`filter_jobs`] in the import.
    fn ota(&self) -> &OtaEngine {
        &self.inner.ota
    }

    fn migration(&self) -> &Arc<MigrationEngine> {
        &self.inner.migration
    }
}

/// Migration tasks of `pk` on this gateway (a product has at most one; every page anyway).
fn filter_migrations(engine: &MigrationEngine, pk: &str) -> Vec<crate::migration::TaskDetails> {
    let mut out = Vec::new();
    let mut page = 1;
    loop {
        let Ok(pg) = Page::new(page, 100) else { break };
        let list = engine.list(
            &TaskFilter {
                product_key: Some(pk.to_owned()),
                state: None,
            },
            pg,
        );
        let n = list.items.len();
        out.extend(list.items);
        if n < 100 {
            break;
        }
        page += 1;
    }
    out
}

/// Jobs of `pk` on this gateway (every page).
fn filter_jobs(ota: &OtaEngine, pk: &str) -> Vec<crate::ota::Job> {
    let mut out = Vec::new();
    let mut page = 1;
    loop {
        let Ok(pg) = Page::new(page, 100) else { break };
        let list = ota.list_jobs(
            &JobFilter {
                product_key: Some(pk.to_owned()),
                ..JobFilter::default()
            },
            pg,
        );
        let n = list.items.len();
        out.extend(list.items.into_iter().map(|v| v.job));
        if n < 100 {
            break;
        }
        page += 1;
    }
    out
}

pub(crate) fn state_str(s: JobState) -> &'static str {
    match s {
        JobState::InProgress => "IN_PROGRESS",
        JobState::Successful => "SUCCESSFUL",
        JobState::Failed => "FAILED",
    }
}

/// The passphrase of an export: required (and long enough) when the package carries secrets,
/// ignored otherwise.
fn export_key(secrets_key: Option<&str>, has_secrets: bool) -> Result<Option<String>, ExportError> {
    match (secrets_key, has_secrets) {
        (_, false) => Ok(None),
        (None, true) => Err(ExportError::Missing("secrets_key")),
        (Some(k), true) if k.chars().count() < crypto::MIN_KEY_CHARS => Err(ExportError::Invalid {
            field: "secrets_key",
            message: format!("at least {} characters", crypto::MIN_KEY_CHARS),
        }),
        (Some(k), true) => Ok(Some(k.to_owned())),
    }
}

/// A new export job, in progress, with one object per item.
fn export_job(
    name: String,
    created: i64,
    items: &[ExportItem],
    has_secrets: bool,
    started_by: &str,
) -> JobRecord {
    JobRecord {
        id: new_id("exp"),
        kind: JobKind::Export,
        name,
        created_at_ms: created,
        updated_at_ms: created,
        started_at_ms: Some(created),
        ended_at_ms: None,
        status: Status::new(JobState::InProgress, "In Progress"),
        objects: items
            .iter()
            .map(|i| JobObject::in_progress(&i.id, &i.name, &i.path, i.object_type))
            .collect(),
        log: Vec::new(),
        package_size: None,
        secrets_included: has_secrets,
        conflict_policy: None,
        started_by: Some(started_by.to_owned()),
    }
}

/// Each object's status from what writing the package said of its item, and its log line;
/// returns how many failed.
fn record_items(job: &mut JobRecord, per_item: Vec<package::ItemOutcome>) -> usize {
    let mut failed = 0usize;
    for (o, r) in job.objects.iter_mut().zip(per_item) {
        match r {
            Ok(()) => {
                o.status = Status {
                    state: JobState::Successful,
                    message: None,
                }
            }
            Err(msg) => {
                failed += 1;
                o.status = Status::new(JobState::Failed, msg);
            }
        }
    }
    let lines: Vec<(String, String, String)> = job
        .objects
        .iter()
        .map(|o| match o.status.state {
            JobState::Successful => (
                "INFO".to_owned(),
                "FGX_004".to_owned(),
                format!(
                    "Successfully exported object [{}] of type [{}] id [{}]",
                    o.path,
                    o.object_type.as_str(),
                    o.id
                ),
            ),
            _ => (
                "ERROR".to_owned(),
                "FGX_005".to_owned(),
                format!(
                    "Failed to export object [{}] of type [{}] id [{}]: {}",
                    o.path,
                    o.object_type.as_str(),
                    o.id,
                    o.status.message.clone().unwrap_or_default()
                ),
            ),
        })
        .collect();
    for (level, code, msg) in lines {
        job.log(&level, &code, msg);
    }
    failed
}

fn kind_name(kind: JobKind) -> &'static str {
    match kind {
        JobKind::Export => "export",
        JobKind::Import => "import",
    }
}

fn doc_op(job: &JobRecord) -> Op {
    Op::PutDoc {
        kind: match job.kind {
            JobKind::Export => EXPORT_DOC,
            JobKind::Import => IMPORT_DOC,
        },
        id: job.id.clone(),
        body: serde_json::to_string(job).unwrap_or_default(),
    }
}

/// Longest export or import job name, characters.
pub const MAX_JOB_NAME_CHARS: usize = 128;

/// A job's name as given (trimmed), or `default()` when absent or blank: at most
/// [`MAX_JOB_NAME_CHARS`] characters without control characters.
pub(crate) fn job_name(
    given: Option<&str>,
    default: impl FnOnce() -> String,
) -> Result<String, ExportError> {
    match given.map(str::trim) {
        None | Some("") => Ok(default()),
        Some(n) if n.chars().count() > MAX_JOB_NAME_CHARS || n.chars().any(char::is_control) => {
            Err(ExportError::Invalid {
                field: "name",
                message: format!(
                    "at most {MAX_JOB_NAME_CHARS} characters without control characters"
                ),
            })
        }
        Some(n) => Ok(n.to_owned()),
    }
}

#[cfg(test)]
mod tests;
