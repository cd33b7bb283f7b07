//! The import half: verify (before any job exists), plan every object against this gateway,
//! then write in dependency order (products → devices → firmware → OTA jobs → migration tasks).
//!
//! Identity on the target: a product by key, a device by `pk/dn`, a firmware package by
//! (product, module, version) — its id is new on this gateway — and an OTA job by its content
//! (a job with the same name and the same spec on the same firmware is "identical"; any other
//! job is created anew with a new id). Products are compared on name, description, instance
//! and (when the package carries it) secret; devices on secret, enabled and tags; firmware on
//! its SHA-256. A migration task is identified by its product (a product has at most one
//! task): a task with the same target instance, name and config is "identical", any other task
//! of the product is a conflict — kept even under `overwrite` (a task is never deleted, it may
//! be running). A new task is created in `TO_MIGRATE` through the migration engine; its target
//! instance must already exist on this gateway.
//!
//! Roles: an import writes an object only when its starter's [`Privilege`] may write that kind
//! through the API. A package that would create a product (admin business) is refused whole for
//! an operator before the job exists ([`ExportError::Forbidden`], naming the products), so an
//! operator never gets a half-applied import; the same check runs again per object while
//! writing, in case a product disappeared between the two. Products that already exist here
//! (identical or kept as a conflict) do not count: an operator may import devices, firmware and
//! jobs of existing products.
//!
//! Sessions: a device that an import disables, gives a new secret or moves to another instance
//! is disconnected ([`DeviceRevokedHook`]), as `PATCH {"enabled":false}` does.

use std::collections::HashMap;

use super::package::{PackageObject, VerifiedPackage};
use super::*;
use crate::migration::{Actor, MigrationConfig, NewTask};
use crate::ota::firmware::{NewFirmware, StagedBlob};
use crate::ota::{FirmwarePackage, FirmwareStatus, Job};
use crate::registry::{Device, NewDevice, NewInstance, NewProduct};

mod plan;
mod write;

/// What the plan found for one object.
#[derive(Debug, Clone, PartialEq)]
enum Plan {
    Create,
    Identical,
    /// Nothing to write, for the reason given.
    Skip(String),
    Conflict(String),
    Invalid(String),
}

/// Whether a change ends the right of the device's open MQTT session: disabled, a new secret
/// (the session was signed with the old one) or a new owner instance (its data must route
/// elsewhere). A tag change keeps the session.
fn ends_session(before: &Device, after: &Device) -> bool {
    (before.enabled && !after.enabled)
        || before.device_secret != after.device_secret
        || before.instance_id != after.instance_id
}

fn str_field<'a>(v: &'a serde_json::Value, k: &str) -> Option<&'a str> {
    v.get(k).and_then(|x| x.as_str())
}

/// The definition of an exported migration task (`data.task`).
#[derive(Debug, Clone, serde::Deserialize)]
struct TaskDef {
    product_key: String,
    #[serde(default)]
    source_instance_id: String,
    target_instance_id: String,
    name: String,
    config: MigrationConfig,
}

fn task_def(o: &PackageObject) -> Result<TaskDef, String> {
    o.data
        .get("task")
        .cloned()
        .ok_or_else(|| "migration task object without its definition".to_owned())
        .and_then(|t| {
            serde_json::from_value(t).map_err(|e| format!("bad migration task object: {e}"))
        })
}

impl ExportService {
    /// Verifies `bytes` (refusing a damaged, tampered or wrongly keyed package before anything
    /// happens), records an import job and starts it. Answers at once.
    pub async fn start_import(
        &self,
        bytes: Vec<u8>,
        secrets_key: Option<String>,
        policy: ConflictPolicy,
        name: Option<String>,
        by: Privilege,
    ) -> Result<JobRecord, ExportError> {
        let started_by = by.as_str();
        let created = now();
        let name = super::job_name(name.as_deref(), || format!("import-{created}"))?;
        let size = bytes.len() as u64;
        let slot = self
            .inner
            .limiter
            .reserve(size)
            .map_err(ExportError::Limited)?;
        let limits = package::UnpackLimits {
            entry_bytes: self.inner.settings.max_unpacked_entry_bytes,
            total_bytes: self.inner.settings.max_unpacked_bytes,
        };
        let verified = tokio::task::spawn_blocking(move || {
            package::read_package(bytes::Bytes::from(bytes), secrets_key.as_deref(), limits)
        })
        .await
        .map_err(|e| ExportError::Internal(format!("verify task failed: {e}")))??;
        self.check_privilege(&verified, by)?;
        let mut job = JobRecord {
            id: new_id("imp"),
            kind: JobKind::Import,
            name,
            created_at_ms: created,
            updated_at_ms: created,
            started_at_ms: Some(created),
            ended_at_ms: None,
            status: Status::new(JobState::InProgress, "In Progress"),
            objects: verified
                .objects
                .iter()
                .map(|o| {
                    let m = &o.meta;
                    JobObject::in_progress(&m.id, &m.name, &m.path, m.object_type)
                })
                .collect(),
            log: Vec::new(),
            package_size: Some(size),
            secrets_included: verified.manifest.encryption.is_some(),
            conflict_policy: Some(policy),
            started_by: Some(started_by.to_owned()),
        };
        job.log(
            "INFO",
            "FGI_002",
            format!(
                "Starting import operation. Job Name: {} Source job: {} ({}) Source gateway version: {} Objects: {} Conflict policy: {policy:?} Started by: {started_by}",
                job.name,
                verified.manifest.job_name,
                verified.manifest.job_id,
                verified.manifest.gateway_version,
                verified.objects.len(),
            ),
        );
        job.log(
            "INFO",
            "FGI_006",
            format!(
                "Package verified: {} files, checksums match{}",
                verified.manifest.files.len(),
                if verified.manifest.encryption.is_some() {
                    ", manifest MAC and secrets authenticate"
                } else {
                    ""
                }
            ),
        );
        self.save(job.clone()).await?;
        let this = self.clone();
        let id = job.id.clone();
        tokio::spawn(async move {
            this.run_import(id, verified, policy, by).await;
            drop(slot);
        });
        Ok(job)
    }

    /// Refuses a package that would create objects `by` may not create (today: products that
    /// do not exist on this gateway, for an operator), naming every one of them.
    fn check_privilege(&self, pkg: &VerifiedPackage, by: Privilege) -> Result<(), ExportError> {
        let forbidden: Vec<&PackageObject> = pkg
            .objects
            .iter()
            .filter(|o| !by.may_write(o.meta.object_type))
            .filter(|o| match o.meta.object_type {
                // An existing product is left alone (identical) or kept (conflict): no write.
                ObjectType::Product => str_field(&o.data, "product_key")
                    .is_none_or(|pk| self.inner.registry.get_product(pk).is_err()),
                _ => true,
            })
            .collect();
        if forbidden.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = forbidden
            .iter()
            .map(|o| format!("{} {}", o.meta.object_type.as_str(), o.meta.id))
            .collect();
        Err(ExportError::Forbidden(format!(
            "role {by} may not import this package: it would create {} object(s) that need role {} ({}); nothing was imported. Ask an admin to import it, or create these objects first",
            names.len(),
            Privilege::required_to_write(forbidden[0].meta.object_type).as_str(),
            names.join(", ")
        )))
    }

    async fn run_import(
        &self,
        id: String,
        pkg: VerifiedPackage,
        policy: ConflictPolicy,
        by: Privilege,
    ) {
        let Ok(mut job) = self.get(JobKind::Import, &id) else {
            return;
        };
        // Dependency order; `job.objects` follows the manifest's order, so index by key.
        let mut order: Vec<usize> = (0..pkg.objects.len()).collect();
        order.sort_by_key(|&i| (pkg.objects[i].meta.object_type.rank(), i));

        let plans: Vec<Plan> = pkg.objects.iter().map(|o| self.plan(o, &pkg)).collect();
        let conflicts = plans
            .iter()
            .filter(|p| matches!(p, Plan::Conflict(_)))
            .count();
        if policy == ConflictPolicy::Fail && conflicts > 0 {
            fail_on_conflicts(&mut job, &plans);
            let msg = format!(
                "{conflicts} object(s) conflict and conflict_policy is fail: nothing was imported"
            );
            self.finish_import(job, JobState::Failed, msg).await;
            return;
        }

        let mut fw_map: HashMap<String, String> = HashMap::new();
        for i in order {
            let obj = &pkg.objects[i];
            let outcome = self
                .import_object(obj, &plans[i], &pkg, policy, by, &mut fw_map)
                .await;
            self.record_outcome(&mut job, i, obj, outcome);
        }
        let (state, msg) = import_verdict(&job.summary());
        self.finish_import(job, state, msg).await;
    }

    /// What importing one object under its plan did: its result, the message, and its id on
    /// this gateway. Firmware ids (source → here) go into `fw_map` for the jobs that follow.
    async fn import_object(
        &self,
        obj: &PackageObject,
        plan: &Plan,
        pkg: &VerifiedPackage,
        policy: ConflictPolicy,
        by: Privilege,
        fw_map: &mut HashMap<String, String>,
    ) -> (ImportResult, Option<String>, Option<String>) {
        let writes = matches!(plan, Plan::Create)
            || (matches!(plan, Plan::Conflict(_)) && policy == ConflictPolicy::Overwrite);
        match plan {
            Plan::Invalid(why) => (ImportResult::Failed, Some(why.clone()), None),
            // Checked before the job started; this catches a product that vanished since.
            _ if writes && !by.may_write(obj.meta.object_type) => (
                ImportResult::Failed,
                Some(format!(
                    "role {by} may not write a {} (role {} required)",
                    obj.meta.object_type.as_str(),
                    Privilege::required_to_write(obj.meta.object_type).as_str()
                )),
                None,
            ),
            Plan::Skip(why) => (ImportResult::Skipped, Some(why.clone()), None),
            Plan::Identical => {
                let target = self.identical_target(obj);
                if let (ObjectType::Firmware, Some(t)) = (obj.meta.object_type, &target) {
                    fw_map.insert(obj.meta.id.clone(), t.clone());
                }
                (ImportResult::SkippedIdentical, None, target)
            }
            // Migration tasks are never overwritten: the existing one may be running.
            Plan::Conflict(why) if obj.meta.object_type == ObjectType::MigrationTask => (
                ImportResult::Conflict,
                Some(format!(
                    "kept this gateway's object: {why}{}",
                    if policy == ConflictPolicy::Overwrite {
                        " (migration tasks are never overwritten; delete this gateway's task first if it is not running)"
                    } else {
                        ""
                    }
                )),
                None,
            ),
            Plan::Conflict(why) if policy != ConflictPolicy::Overwrite => (
                ImportResult::Conflict,
                Some(format!("kept this gateway's object: {why}")),
                None,
            ),
            Plan::Conflict(why) => match self.overwrite(obj, pkg, fw_map).await {
                Ok(target) => (ImportResult::Overwritten, Some(why.clone()), target),
                Err(e) => (ImportResult::Failed, Some(e), None),
            },
            Plan::Create => match self.create(obj, pkg, fw_map).await {
                Ok(target) => (ImportResult::Created, None, target),
                Err(e) => (ImportResult::Failed, Some(e), None),
            },
        }
    }

    /// Records object `i`'s outcome in the job: result, status, its path and id here, and the
    /// job's log line.
    fn record_outcome(
        &self,
        job: &mut JobRecord,
        i: usize,
        obj: &PackageObject,
        (result, message, target_id): (ImportResult, Option<String>, Option<String>),
    ) {
        let o = &mut job.objects[i];
        if result != ImportResult::Failed {
            // Where it is on this gateway: a device is created in its product's instance,
            // whatever instance it had on the source (migrations are not carried).
            if let Some(path) = self.local_path(obj) {
                o.path = path;
            }
        }
        o.result = Some(result);
        o.target_id = target_id.filter(|t| *t != o.id);
        o.status = Status {
            state: if result == ImportResult::Failed {
                JobState::Failed
            } else {
                JobState::Successful
            },
            message: message.clone(),
        };
        let (level, code, verb) = match result {
            ImportResult::Created => ("INFO", "FGI_004", "Created"),
            ImportResult::SkippedIdentical => ("INFO", "FGI_004", "Skipped identical"),
            ImportResult::Overwritten => ("WARN", "FGI_004", "Overwrote"),
            ImportResult::Conflict => ("WARN", "FGI_007", "Conflict on"),
            ImportResult::Failed => ("ERROR", "FGI_005", "Failed to import"),
            ImportResult::Skipped => ("INFO", "FGI_004", "Skipped"),
        };
        let line = format!(
            "{verb} object [{}] of type [{}] id [{}]{}",
            o.path,
            o.object_type.as_str(),
            o.id,
            message.map(|m| format!(": {m}")).unwrap_or_default()
        );
        job.log(level, code, line);
    }

    async fn finish_import(&self, mut job: JobRecord, state: JobState, msg: String) {
        let end = now();
        job.ended_at_ms = Some(end);
        job.status = Status::new(state, msg);
        let line = format!(
            "Finished import operation. Job Name: {} Start Time: {} End Time: {} Started by: {} Start Method: API Status: {}",
            job.name,
            rfc3339_ms(job.started_at_ms.unwrap_or(job.created_at_ms)),
            rfc3339_ms(end),
            job.started_by.clone().unwrap_or_default(),
            state_str(state)
        );
        job.log("INFO", "FGI_003", line);
        let id = job.id.clone();
        if let Err(e) = self.save(job).await {
            tracing::error!(job_id = %id, error = %e, "cannot persist import job");
        }
    }
}

/// `conflict_policy` fail with conflicts: every object fails (the conflicting ones as
/// conflicts, with why), and each conflict is logged.
fn fail_on_conflicts(job: &mut JobRecord, plans: &[Plan]) {
    for (o, plan) in job.objects.iter_mut().zip(plans) {
        match plan {
            Plan::Conflict(why) => {
                o.result = Some(ImportResult::Conflict);
                o.status = Status::new(JobState::Failed, why.clone());
            }
            _ => {
                o.result = Some(ImportResult::Failed);
                o.status = Status::new(
                    JobState::Failed,
                    "not imported: conflict_policy is fail and other objects conflict",
                );
            }
        }
    }
    let lines: Vec<String> = job
        .objects
        .iter()
        .filter(|o| o.result == Some(ImportResult::Conflict))
        .map(|o| {
            format!(
                "Conflict on object [{}] of type [{}] id [{}]: {}",
                o.path,
                o.object_type.as_str(),
                o.id,
                o.status.message.clone().unwrap_or_default()
            )
        })
        .collect();
    for l in lines {
        job.log("ERROR", "FGI_007", l);
    }
}

/// The import job's final state and message from its objects' results.
fn import_verdict(s: &ImportSummary) -> (JobState, String) {
    if s.failed == 0 {
        (
            JobState::Successful,
            format!(
                "Import completed: {} created, {} skipped as identical, {} skipped, {} overwritten, {} conflicts kept.",
                s.created, s.skipped_identical, s.skipped, s.overwritten, s.conflict
            ),
        )
    } else {
        (
            JobState::Failed,
            format!(
                "Import finished with {} failed object(s): {} created, {} skipped as identical, {} skipped, {} overwritten, {} conflicts kept.",
                s.failed, s.created, s.skipped_identical, s.skipped, s.overwritten, s.conflict
            ),
        )
    }
}

/// Why an OTA job object is not created again: a finished `VERIFY_FIRMWARE` job. Its result is
/// the package's status, which the firmware object carries (a package VERIFIED on the source is
/// VERIFIED here), and running it again would find its devices already at the target.
fn finished_verification(o: &PackageObject) -> Option<String> {
    let job: Job = serde_json::from_value(o.data.get("job")?.clone()).ok()?;
    (job.spec.job_type == crate::ota::model::JobType::VerifyFirmware && job.status.is_finished())
        .then(|| {
            format!(
                "a finished VERIFY_FIRMWARE job ({}) is not run again: the package's status came with its firmware",
                job.status.as_str()
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(enabled: bool, secret: &str, instance: &str, tag: &str) -> Device {
        Device {
            product_key: "pk".into(),
            device_name: "dev1".into(),
            device_secret: secret.into(),
            instance_id: instance.into(),
            enabled,
            tags: [("t".to_owned(), tag.to_owned())].into(),
            online: true,
            node: None,
            last_seen_ms: None,
            client_ip: None,
            versions: Default::default(),
            created_at_ms: 0,
        }
    }

    #[test]
    fn sessions_end_on_disable_new_secret_or_move_only() {
        let base = device(true, "s1", "default", "a");
        let table = [
            (device(true, "s1", "default", "a"), false, "unchanged"),
            (device(true, "s1", "default", "b"), false, "tags only"),
            (device(false, "s1", "default", "a"), true, "disabled"),
            (device(true, "s2", "default", "a"), true, "new secret"),
            (device(true, "s1", "iot-eu", "a"), true, "moved"),
        ];
        for (after, ends, why) in table {
            assert_eq!(ends_session(&base, &after), ends, "{why}");
        }
        // Already disabled: no session to end.
        let off = device(false, "s1", "default", "a");
        assert!(!ends_session(&off, &off.clone()));
        assert!(!ends_session(&off, &base), "enabling ends nothing");
    }
}
