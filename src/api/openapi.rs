//! The OpenAPI document, generated from the handlers' `#[utoipa::path]` annotations and the
//! request/response types' `ToSchema` derives. A path is written once, in its handler's
//! annotation: each API file's `routes()` registers its handlers with utoipa-axum's `routes!`,
//! which routes them and documents them together ([`document`]).

use std::sync::LazyLock;

use utoipa::openapi::path::{Operation, ParameterIn};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{RefOr, Response, ResponseBuilder, Schema};
use utoipa::{Modify, OpenApi};

use super::auth::Role;
use super::batch::{BatchCreateRequest, BatchCreateResponse, BatchRowResult, RowStatus};
use super::cluster::{ClusterView, NodeView};
use super::consumer_groups;
use super::devices::{
    CreateDeviceRequest, CreatedDevice, DeviceDetails, DeviceSecret, DeviceSummary,
    UpdateDeviceRequest,
};
use super::error::{ErrorBody, ErrorCode};
use super::export::ImportForm;
use super::firmware::{DownloadUrl, FirmwareUploadForm};
use super::instances::CreateInstanceRequest;
use super::migrations::{
    CanaryRequest, ConfigRequest, ConfigResponse, CreateMigrationRequest, DataSyncRequest,
    RollbackRequest, SelectionResponse,
};
use super::ota::{
    CancelJobRequest, CancelTasksRequest, ChangedCount, ConfirmRequest, JobStatisticsView,
    JobUploadForm,
};
use super::products::{CreateProductRequest, CreatedProduct, ProductSecret, ProductSummary};
use super::RouteLimits;
use crate::export::{
    ConflictPolicy, ExportJob, ExportRequest, ImportResult, ImportSummary, JobKind, JobObject,
    JobState, ObjectRequest, ObjectType, Status as ExportStatus,
};
use crate::forwarder::{
    ConsumerGroup, ConsumerGroupDetails, InstanceRateLimit, NewConsumerGroup, RateLimitRequest,
    RateLimitSource,
};
use crate::migration::{
    Actor, DataSyncView, DeviceMigration, DeviceMigrationStatus, DeviceStatus, DeviceTotals,
    LogEntry, MigrationConfig, MigrationMethod, RejectedRow, ResumeMode, SummaryStatus,
    TaskDetails, TaskState,
};
use crate::ota::engine::{DeviceJob, FirmwareStatistics, TimelineEntry};
use crate::ota::model::{
    AbortAction, AbortSpec, HistoryEntry, Job, JobSpec, JobStatistics, JobStatus, JobType, JobView,
    NotSelected, RampSpec, RateSpec, Selection, TagFilter, TargetKind, TaskCounters, TaskView,
    VersionCount, VersionDistribution,
};
use crate::ota::{FailureReason, QueueReason, TaskEvent, TaskStatus};
use crate::ota::{FirmwarePackage, FirmwareStatus};
use crate::registry::Instance;

/// The fleetgate operator API document (served at `/api/v1/openapi.json`).
#[derive(OpenApi)]
#[openapi(
    info(
        title = "fleetgate operator API",
        description = "Operator API of the fleetgate MQTT device-fleet gateway."
    ),
    components(schemas(
        ErrorBody,
        ClusterView,
        NodeView,
        ExportRequest,
        ObjectRequest,
        ObjectType,
        ExportJob,
        JobObject,
        JobKind,
        JobState,
        ExportStatus,
        ImportResult,
        ImportSummary,
        ConflictPolicy,
        ImportForm,
        Role,
        Instance,
        CreateInstanceRequest,
        ConsumerGroup,
        consumer_groups::CreatedConsumerGroup,
        NewConsumerGroup,
        ConsumerGroupDetails,
        RateLimitRequest,
        InstanceRateLimit,
        RateLimitSource,
        CreateProductRequest,
        ProductSummary,
        CreatedProduct,
        ProductSecret,
        CreateDeviceRequest,
        UpdateDeviceRequest,
        DeviceSummary,
        CreatedDevice,
        DeviceSecret,
        DeviceDetails,
        DeviceMigrationStatus,
        BatchCreateRequest,
        BatchCreateResponse,
        BatchRowResult,
        RowStatus,
        CreateMigrationRequest,
        ConfigRequest,
        ConfigResponse,
        CanaryRequest,
        RollbackRequest,
        SelectionResponse,
        DataSyncRequest,
        TaskDetails,
        TaskState,
        SummaryStatus,
        DeviceStatus,
        DeviceTotals,
        DeviceMigration,
        DataSyncView,
        MigrationConfig,
        MigrationMethod,
        ResumeMode,
        RejectedRow,
        LogEntry,
        Actor,
        FirmwarePackage,
        FirmwareStatus,
        FirmwareUploadForm,
        DownloadUrl,
        JobSpec,
        JobType,
        Selection,
        TargetKind,
        TagFilter,
        RateSpec,
        RampSpec,
        AbortSpec,
        AbortAction,
        Job,
        JobStatus,
        JobView,
        NotSelected,
        TaskCounters,
        TaskView,
        TaskStatus,
        QueueReason,
        FailureReason,
        HistoryEntry,
        JobStatistics,
        JobStatisticsView,
        FirmwareStatistics,
        DeviceJob,
        TimelineEntry,
        VersionDistribution,
        VersionCount,
        TaskEvent,
        JobUploadForm,
        super::ota::JobRequest,
        CancelJobRequest,
        CancelTasksRequest,
        ConfirmRequest,
        ChangedCount,
    )),
    tags(
        (name = "system", description = "Health, metrics and this document (no token needed)"),
        (name = "instances", description = "Instances: owners of products and data routing"),
        (name = "consumer-groups", description = "AMQP consumer groups: one RabbitMQ queue per group on the instance's exchange; every group gets every message of the instance's devices"),
        (name = "forwarding", description = "AMQP forwarding to an instance: its rate limit, changed at runtime"),
        (name = "products", description = "Products: classes of devices sharing a product_key"),
        (name = "devices", description = "Devices: identities, secrets, tags, online state"),
        (name = "commands", description = "Cloud-to-device: publish and broadcast, property set, service calls (async and sync), RRPC, latest properties"),
        (name = "migrations", description = "Instance migration: per-product tasks moving devices to a target instance (canary, full, pause/continue, rollback, data sync)"),
        (name = "firmware", description = "Firmware packages: upload, signed download links with Range support"),
        (name = "export", description = "Export/import jobs: move products, devices (secrets encrypted), firmware and OTA jobs between gateways as ZIP packages"),
        (name = "ota", description = "OTA jobs: per-device tasks with timeouts, retries, push rate, cancel/confirm, statistics"),
    )
)]
struct ApiDoc;

/// The document: [`ApiDoc`]'s information, schemas and tags, the paths of every routed handler
/// (collected by the routers themselves, so a routed path cannot be missing and none is
/// written twice), then the shared conventions. Built once.
pub fn document() -> &'static utoipa::openapi::OpenApi {
    static DOC: LazyLock<utoipa::openapi::OpenApi> = LazyLock::new(|| {
        // The limits only shape the routers' layers, not the document.
        let limits = RouteLimits {
            batch: 0,
            upload: 0,
            import: 0,
        };
        let mut doc = ApiDoc::openapi();
        doc.merge(super::public_routes().into_openapi());
        doc.merge(super::protected_routes(&limits).into_openapi());
        Conventions.modify(&mut doc);
        SharedResponses.modify(&mut doc);
        doc
    });
    &DOC
}

/// Adds the bearer scheme and the prose that cannot come from annotations: roles and the
/// error-code table (generated from [`ErrorCode`], so it cannot drift).
struct Conventions;

impl Modify for Conventions {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An API token: `Authorization: Bearer <token>`"))
                    .build(),
            ),
        );
        let base = openapi.info.description.clone().unwrap_or_default();
        openapi.info.description = Some(format!(
            "{base}\n\n## Authentication\n\n`/healthz`, `/metrics` and `/api/v1/openapi.json` \
             are open, and `/firmware/{{fid}}/download` checks its signed link (`expires`, \
             `token`) instead of a bearer token; every other `/api/v1` call needs `Authorization: Bearer <token>` (401 otherwise). Roles: `viewer` may only \
             read (GET), and no secrets; `operator` may also manage devices (create, batch, update, \
             enable/disable, delete, read their secrets) and upload firmware; `admin` may do everything, including creating instances \
             and creating/deleting products and reading product secrets (403 otherwise); consumer groups need `operator` to create or delete, forwarding rate limits to set or remove.\n\n## Errors\n\nEvery error \
             response has the body `{{\"error_code\":\"FG.xxxx\",\"error_msg\":\"…\",\
             \"error_ext_msg\":null,\"request_id\":\"…\"}}`; `error_ext_msg` names the \
             offending field when there is one, and `request_id` equals the `x-request-id` \
             response header.\n\n{}\n## Lists\n\nLists take `page` (1-based) and `page_size` \
             (1..=100, default 20) and return `{{\"items\",\"total\",\"page\",\"page_size\"}}`. \
             \n\n## Methods\n\nA method a path does not list here gets 405 (`FG.0405`) \
             with an `Allow` header naming the path's methods (`GET` implies `HEAD`); \
             `OPTIONS` on any path answers 204 with the same `Allow` header. Neither needs a \
             token. No CORS headers are sent.\n\n## Secrets\n\nA device or product secret is returned to the caller that \
             created it (`POST …/devices` → `device_secret`, the created rows of \
             `POST …/devices/batch`, `POST /api/v1/products` → `product_secret`) and otherwise \
             only on explicit request: `GET /api/v1/products/{{pk}}/devices/{{dn}}/secret` \
             (operator or admin) and `GET /api/v1/products/{{pk}}/secret` (admin). Lists, \
             single GETs, updates, logs and job records never carry one; export packages carry \
             them only encrypted with the exporter's `secrets_key`.",
            ErrorCode::markdown_table()
        ));
    }
}

/// Makes the document say what the shared extractors and middleware do on every route, so that
/// no handler annotation has to repeat it (and none can forget it):
///
/// - 400 on every operation that takes a path or query parameter or a body (the extractors
///   refuse a malformed one — unknown query parameter, wrong type, bad JSON, wrong
///   Content-Type — with `FG.1000`…`FG.1004`);
/// - 401 on every operation that needs a token, and 403 on its writes (a viewer token);
/// - 413 on every operation with a body (the route's body limit, `FG.0413`);
/// - 429 on the export/import routes, which are all rate limited;
/// - the bounds the server enforces on the list parameters (`page` ≥ 1, `page_size`
///   1..=100) and on the path identifiers (product key, device name, instance id).
///
/// An annotation that lists one of these responses keeps its own description.
struct SharedResponses;

impl Modify for SharedResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for (path, item) in openapi.paths.paths.iter_mut() {
            let rate_limited =
                path.starts_with("/api/v1/export") || path.starts_with("/api/v1/import");
            let operations = [
                (true, &mut item.get),
                (false, &mut item.put),
                (false, &mut item.post),
                (false, &mut item.delete),
                (false, &mut item.patch),
            ];
            for (read, op) in operations {
                if let Some(op) = op.as_mut() {
                    shared_responses(op, path.contains('{'), read, rate_limited);
                    constrain_parameters(op);
                }
            }
        }
    }
}

fn error_response(description: &str) -> RefOr<Response> {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            utoipa::openapi::ContentBuilder::new()
                .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                    "ErrorBody",
                ))))
                .build(),
        )
        .build()
        .into()
}

fn shared_responses(op: &mut Operation, path_params: bool, read: bool, rate_limited: bool) {
    let has_body = op.request_body.is_some();
    let has_params = path_params || op.parameters.as_ref().is_some_and(|p| !p.is_empty());
    let secured = op
        .security
        .as_ref()
        .is_some_and(|s| !s.is_empty() && s.iter().any(|r| r != &Default::default()));
    let mut add = |status: &str, description: &str| {
        op.responses
            .responses
            .entry(status.to_owned())
            .or_insert_with(|| error_response(description));
    };
    if has_params || has_body {
        add(
            "400",
            "Invalid path or query parameter or body (`error_ext_msg` names it)",
        );
    }
    if secured {
        add("401", "No valid token");
        if !read {
            add("403", "The token's role may not do this (a viewer token)");
        }
    }
    if has_body {
        add("413", "Body larger than this route accepts (FG.0413)");
    }
    if rate_limited {
        add("429", "Too many requests (Retry-After)");
    }
}

/// Bounds of the list parameters and path identifiers, as the registry checks them.
fn constrain_parameters(op: &mut Operation) {
    use crate::registry::MAX_PAGE_SIZE;
    for p in op.parameters.iter_mut().flatten() {
        let Some(RefOr::T(Schema::Object(o))) = p.schema.as_mut() else {
            continue;
        };
        match (&p.parameter_in, p.name.as_str()) {
            (ParameterIn::Query, "page") => {
                o.minimum = Some(1.into());
                o.maximum = Some((u32::MAX as usize).into());
            }
            (ParameterIn::Query, "page_size") => {
                o.minimum = Some(1.into());
                o.maximum = Some((MAX_PAGE_SIZE as usize).into());
            }
            (ParameterIn::Path, "pk") => o.pattern = Some("^[A-Za-z0-9]{1,32}$".into()),
            (ParameterIn::Path, "dn") => o.pattern = Some("^[A-Za-z0-9_@.:-]{4,32}$".into()),
            (ParameterIn::Path, "iid") => o.pattern = Some("^[A-Za-z0-9_-]{1,64}$".into()),
            // Consumer group ids and service identifiers: 1..=64 of `A-Z a-z 0-9 _ -`.
            (ParameterIn::Path, "gid" | "identifier") => {
                o.pattern = Some("^[A-Za-z0-9_-]{1,64}$".into())
            }
            _ => {}
        }
    }
}
