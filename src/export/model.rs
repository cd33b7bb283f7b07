//! Export/import value types: requests, the job record (stored as a document and shown by the
//! API), per-object status, and the text log lines.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Most objects one export request may name (the seed's recommended cap).
pub const MAX_REQUESTED_OBJECTS: usize = 1_000;

/// What kind of object an id names.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, ToSchema,
)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ObjectType {
    /// id: the product key.
    Product,
    /// id: `{product_key}/{device_name}`.
    Device,
    /// id: the firmware id.
    Firmware,
    /// id: the OTA job id.
    OtaJob,
    /// id: the migration task id.
    MigrationTask,
}

impl ObjectType {
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectType::Product => "PRODUCT",
            ObjectType::Device => "DEVICE",
            ObjectType::Firmware => "FIRMWARE",
            ObjectType::OtaJob => "OTA_JOB",
            ObjectType::MigrationTask => "MIGRATION_TASK",
        }
    }

    /// Import order: what others depend on first.
    pub(crate) fn rank(self) -> u8 {
        match self {
            ObjectType::Product => 0,
            ObjectType::Device => 1,
            ObjectType::Firmware => 2,
            ObjectType::OtaJob => 3,
            ObjectType::MigrationTask => 4,
        }
    }
}

/// Who starts an export or import, as the API's roles map onto it (a viewer may start
/// neither). An import writes only the kinds of objects its starter may create through the
/// API, and an export carries only the secrets its starter may read: whoever knows the
/// `secrets_key` can decrypt them.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Privilege {
    Operator,
    Admin,
}

impl Privilege {
    pub fn as_str(self) -> &'static str {
        match self {
            Privilege::Operator => "operator",
            Privilege::Admin => "admin",
        }
    }

    /// The least privilege that may create or change objects of `t` through the API:
    /// products (and the instances an imported product brings) are admin business
    /// (`POST /api/v1/products`, `POST /api/v1/instances`); devices, firmware, OTA jobs and
    /// migration tasks are operator work.
    pub fn required_to_write(t: ObjectType) -> Privilege {
        match t {
            ObjectType::Product => Privilege::Admin,
            ObjectType::Device
            | ObjectType::Firmware
            | ObjectType::OtaJob
            | ObjectType::MigrationTask => Privilege::Operator,
        }
    }

    /// The least privilege that may read the secrets of `t` through the API
    /// (`GET …/devices/{dn}/secret`: operator; `GET /api/v1/products/{pk}/secret`: admin).
    pub fn required_to_read_secrets(t: ObjectType) -> Privilege {
        match t {
            ObjectType::Product => Privilege::Admin,
            ObjectType::Device
            | ObjectType::Firmware
            | ObjectType::OtaJob
            | ObjectType::MigrationTask => Privilege::Operator,
        }
    }

    pub fn may_write(self, t: ObjectType) -> bool {
        self >= Privilege::required_to_write(t)
    }

    pub fn may_read_secrets(self, t: ObjectType) -> bool {
        self >= Privilege::required_to_read_secrets(t)
    }
}

impl std::fmt::Display for Privilege {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One object an export request names.
#[derive(Serialize, Deserialize, Clone, Debug, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ObjectRequest {
    /// The object's id (see `type`).
    #[schema(min_length = 1)]
    pub id: String,
    #[serde(rename = "type")]
    pub object_type: ObjectType,
    /// A product brings its devices and firmware, a device its product, firmware its product,
    /// an OTA job its firmware (and product, and the devices a SPECIFIC job names), a migration
    /// task its product (with the product's devices and firmware). Default true.
    #[serde(default)]
    pub include_dependencies: Option<bool>,
}

/// Body of `POST /api/v1/export`.
#[derive(Serialize, Deserialize, Clone, Debug, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExportRequest {
    /// Default `job-<millis>` (also when blank); at most 128 characters, no control characters.
    #[serde(default)]
    #[schema(max_length = 128, pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*$")]
    pub name: Option<String>,
    /// 1 to 1,000 objects.
    #[schema(min_items = 1, max_items = 1000)]
    pub objects: Vec<ObjectRequest>,
    /// Passphrase (≥ 12 characters) that encrypts product and device secrets in the package.
    /// Required whenever products or devices are exported, unless `include_secrets` is false.
    #[serde(default)]
    #[schema(min_length = 12)]
    pub secrets_key: Option<String>,
    /// Default true. False exports products and devices without their secrets; an import then
    /// generates new ones (devices must be re-provisioned).
    #[serde(default)]
    pub include_secrets: Option<bool>,
}

/// IN_PROGRESS → SUCCESSFUL | FAILED.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobState {
    InProgress,
    Successful,
    Failed,
}

/// `{state, message}` of a job or one of its objects.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, ToSchema)]
pub struct Status {
    pub state: JobState,
    pub message: Option<String>,
}

impl Status {
    pub fn new(state: JobState, message: impl Into<String>) -> Self {
        Status {
            state,
            message: Some(message.into()),
        }
    }
}

/// What an import did with one object.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ImportResult {
    Created,
    /// The target already had the same object; nothing changed.
    SkippedIdentical,
    Overwritten,
    /// The target has a different object under the same identity and the policy kept it.
    Conflict,
    Failed,
    /// Nothing to do here (a finished verification job: the package's status came with the
    /// firmware); the message says why.
    Skipped,
}

/// What an import does when the target already has a different object of the same identity.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ConflictPolicy {
    /// Keep the target's object, report `conflict`, import the rest.
    #[default]
    Skip,
    /// Replace the target's object with the package's.
    Overwrite,
    /// Import nothing at all when any object conflicts.
    Fail,
}

impl ConflictPolicy {
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "skip" => Some(ConflictPolicy::Skip),
            "overwrite" => Some(ConflictPolicy::Overwrite),
            "fail" => Some(ConflictPolicy::Fail),
            _ => None,
        }
    }
}

/// One object of a job.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, ToSchema)]
pub struct JobObject {
    pub id: String,
    pub name: String,
    /// `/{instance}/{product_key}/…`, where the object lives.
    pub path: String,
    #[serde(rename = "type")]
    pub object_type: ObjectType,
    pub status: Status,
    /// Imports only: what happened to the object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<ImportResult>,
    /// Imports only: the object's id on this gateway when it differs (firmware, OTA jobs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_id: Option<String>,
}

impl JobObject {
    /// An object a job has just started on (in progress, no result yet).
    pub fn in_progress(id: &str, name: &str, path: &str, object_type: ObjectType) -> JobObject {
        JobObject {
            id: id.to_owned(),
            name: name.to_owned(),
            path: path.to_owned(),
            object_type,
            status: Status {
                state: JobState::InProgress,
                message: None,
            },
            result: None,
            target_id: None,
        }
    }
}

/// `EXPORT` or `IMPORT`.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, ToSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobKind {
    Export,
    Import,
}

/// One log line: `> {code} {level} {time} {message}`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct LogLine {
    pub at_ms: i64,
    pub level: String,
    pub code: String,
    pub message: String,
}

impl LogLine {
    pub fn render(&self) -> String {
        format!(
            "> {} {} {} {}",
            self.code,
            self.level,
            rfc3339_ms(self.at_ms),
            self.message
        )
    }
}

/// Counts of import results.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, ToSchema)]
pub struct ImportSummary {
    pub created: u64,
    pub skipped_identical: u64,
    pub overwritten: u64,
    pub conflict: u64,
    pub failed: u64,
    #[serde(default)]
    pub skipped: u64,
}

/// An export or import job as stored (`export.job` / `import.job` documents).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct JobRecord {
    pub id: String,
    pub kind: JobKind,
    pub name: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub started_at_ms: Option<i64>,
    pub ended_at_ms: Option<i64>,
    pub status: Status,
    pub objects: Vec<JobObject>,
    pub log: Vec<LogLine>,
    /// Exports: bytes of the finished package.
    #[serde(default)]
    pub package_size: Option<u64>,
    /// Exports: whether secrets are in the package (encrypted).
    #[serde(default)]
    pub secrets_included: bool,
    /// Imports: the policy used.
    #[serde(default)]
    pub conflict_policy: Option<ConflictPolicy>,
    /// Who started it (the token's role).
    #[serde(default)]
    pub started_by: Option<String>,
}

impl JobRecord {
    pub fn log(&mut self, level: &str, code: &str, message: impl Into<String>) {
        let now = crate::clock::now_ms();
        self.updated_at_ms = now;
        self.log.push(LogLine {
            at_ms: now,
            level: level.to_owned(),
            code: code.to_owned(),
            message: message.into(),
        });
    }

    pub fn summary(&self) -> ImportSummary {
        let mut s = ImportSummary::default();
        for o in &self.objects {
            match o.result {
                Some(ImportResult::Created) => s.created += 1,
                Some(ImportResult::SkippedIdentical) => s.skipped_identical += 1,
                Some(ImportResult::Overwritten) => s.overwritten += 1,
                Some(ImportResult::Conflict) => s.conflict += 1,
                Some(ImportResult::Failed) => s.failed += 1,
                Some(ImportResult::Skipped) => s.skipped += 1,
                None => {}
            }
        }
        s
    }

    /// The API view; `expand` adds the objects.
    pub fn view(&self, expand: bool) -> ExportJob {
        ExportJob {
            id: self.id.clone(),
            name: self.name.clone(),
            kind: self.kind,
            created_at: rfc3339_ms(self.created_at_ms),
            updated_at: rfc3339_ms(self.updated_at_ms),
            started_at: self.started_at_ms.map(rfc3339_ms),
            ended_at: self.ended_at_ms.map(rfc3339_ms),
            status: self.status.clone(),
            object_count: self.objects.len() as u64,
            package_size: self.package_size,
            secrets_included: (self.kind == JobKind::Export).then_some(self.secrets_included),
            conflict_policy: self.conflict_policy,
            summary: (self.kind == JobKind::Import).then(|| self.summary()),
            objects: expand.then(|| self.objects.clone()),
        }
    }
}

/// A job as `GET /api/v1/export/{id}` and `GET /api/v1/import/{id}` return it.
#[derive(Serialize, Deserialize, Clone, Debug, ToSchema)]
pub struct ExportJob {
    pub id: String,
    pub name: String,
    pub kind: JobKind,
    /// RFC 3339, UTC, milliseconds.
    pub created_at: String,
    pub updated_at: String,
    pub started_at: Option<String>,
    pub ended_at: Option<String>,
    pub status: Status,
    pub object_count: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub package_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets_included: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conflict_policy: Option<ConflictPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<ImportSummary>,
    /// Only with `?expand=objects`; null otherwise.
    pub objects: Option<Vec<JobObject>>,
}

/// `2019-02-05T22:50:08.788Z` for ms since the epoch (UTC, proleptic Gregorian).
pub fn rfc3339_ms(ms: i64) -> String {
    let t = crate::clock::civil(ms);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year, t.month, t.day, t.hour, t.minute, t.second, t.millis
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_matches_known_instants() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_549_407_008_788), "2019-02-05T22:50:08.788Z");
        assert_eq!(rfc3339_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339_ms(-1), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn privileges_follow_the_api_roles() {
        use ObjectType::*;
        // (kind, operator may write, operator may read its secrets); admin may do all.
        let table = [
            (Product, false, false),
            (Device, true, true),
            (Firmware, true, true),
            (OtaJob, true, true),
            (MigrationTask, true, true),
        ];
        for (t, write, secrets) in table {
            assert_eq!(Privilege::Operator.may_write(t), write, "{t:?}");
            assert_eq!(Privilege::Operator.may_read_secrets(t), secrets, "{t:?}");
            assert!(Privilege::Admin.may_write(t), "{t:?}");
            assert!(Privilege::Admin.may_read_secrets(t), "{t:?}");
        }
    }

    #[test]
    fn policy_parses() {
        assert_eq!(ConflictPolicy::parse("SKIP"), Some(ConflictPolicy::Skip));
        assert_eq!(ConflictPolicy::parse("fail"), Some(ConflictPolicy::Fail));
        assert_eq!(ConflictPolicy::parse("merge"), None);
    }
}
