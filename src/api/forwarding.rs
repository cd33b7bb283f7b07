//! `/api/v1/instances/{iid}/forwarding/rate-limit`: the rate limit of AMQP forwarding to an
//! instance, changed at runtime.
//!
//! PUT and DELETE need an operator token; GET any token. A PUT stores an override for the
//! instance (durable, kept across restarts), DELETE removes it so the configured default
//! (`amqp.rate_limit_*`) applies again; either takes effect on the running publisher at once.
//! Like consumer groups, this works with forwarding off (stored and shown, applied once a
//! broker is configured). The migration's bandwidth limit for mirrored data is separate.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;

use super::auth::RequireOperator;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, ApiPath};
use super::ApiState;
use crate::forwarder::{InstanceRateLimit, RateLimitRequest};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// The forwarding rate-limit route of an instance.
pub(super) fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::default().routes(routes!(get_rate_limit, put_rate_limit, delete_rate_limit))
}

/// The rate limit forwarding to an instance runs under, and where it comes from.
#[utoipa::path(
    get,
    path = "/api/v1/instances/{iid}/forwarding/rate-limit",
    tag = "forwarding",
    params(("iid" = String, Path, description = "Instance id")),
    responses(
        (status = 200, description = "The limit in force: `source` is `instance` (set through this API), `default` (the configured `amqp.rate_limit_*`) or `none`; a null bound is unlimited", body = InstanceRateLimit),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No such instance (FG.2001)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get_rate_limit(
    State(state): State<ApiState>,
    ApiPath(iid): ApiPath<String>,
) -> Result<Json<InstanceRateLimit>, ApiError> {
    Ok(Json(state.forwarder.rate_limit(&iid)?))
}

/// Set the instance's forwarding rate limit (operator). Null or absent bounds are unlimited,
/// so `{}` explicitly lifts a configured default for this instance.
#[utoipa::path(
    put,
    path = "/api/v1/instances/{iid}/forwarding/rate-limit",
    tag = "forwarding",
    params(("iid" = String, Path, description = "Instance id")),
    request_body = RateLimitRequest,
    responses(
        (status = 200, description = "Stored (durable) and applied to the running publisher", body = InstanceRateLimit),
        (status = 400, description = "Invalid field, e.g. a 0 bound (FG.1001 naming it)", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Viewer token", body = ErrorBody),
        (status = 404, description = "No such instance (FG.2001)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn put_rate_limit(
    _op: RequireOperator,
    State(state): State<ApiState>,
    ApiPath(iid): ApiPath<String>,
    ApiJson(req): ApiJson<RateLimitRequest>,
) -> Result<Json<InstanceRateLimit>, ApiError> {
    let limit = req.parse()?;
    Ok(Json(
        state.forwarder.set_rate_limit(&iid, Some(limit)).await?,
    ))
}

/// Remove the instance's rate limit override (operator); the configured default applies again.
#[utoipa::path(
    delete,
    path = "/api/v1/instances/{iid}/forwarding/rate-limit",
    tag = "forwarding",
    params(("iid" = String, Path, description = "Instance id")),
    responses(
        (status = 204, description = "No override any more (also when there was none)"),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Viewer token", body = ErrorBody),
        (status = 404, description = "No such instance (FG.2001)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn delete_rate_limit(
    _op: RequireOperator,
    State(state): State<ApiState>,
    ApiPath(iid): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    state.forwarder.set_rate_limit(&iid, None).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::super::consumer_groups::tests::{app_with, call, OP, VIEW};
    use crate::forwarder::{AmqpSettings, Forwarder, ForwarderConfig, RateLimitSource};
    use crate::metrics::Metrics;
    use axum::http::StatusCode;
    use serde_json::{json, Value};
    use std::sync::Arc;

    const PATH: &str = "/api/v1/instances/iot-a/forwarding/rate-limit";

    fn view(msgs: Option<u32>, bytes: Option<u32>, source: &str) -> Value {
        json!({"instance_id": "iot-a", "msgs_per_sec": msgs, "bytes_per_sec": bytes, "source": source})
    }

    #[tokio::test]
    async fn rate_limit_put_get_delete_checks_auth_and_fields_and_persists() {
        let dir = tempfile::tempdir().unwrap();
        // A configured default of 1000 msgs/s; forwarding off (no url): stored and shown anyway.
        let config = ForwarderConfig::for_tests(AmqpSettings {
            rate_limit_msgs_per_sec: Some(1000),
            ..Default::default()
        });
        let (app, registry, _store) = app_with(dir.path(), config.clone()).await;
        // A forwarder rebuilt from the same store (a restart) sees what the API stored.
        let rebuilt = || {
            Forwarder::open(
                config.clone(),
                dir.path(),
                registry.store().clone(),
                registry.clone(),
                Arc::new(Metrics::new()),
            )
            .unwrap()
            .rate_limit("iot-a")
            .unwrap()
        };

        let (s, v) = call(&app, "GET", PATH, VIEW, None).await;
        assert_eq!((s, v), (StatusCode::OK, view(Some(1000), None, "default")));

        // Auth: no valid token 401; a viewer may read but not change.
        let (s, _) = call(&app, "GET", PATH, "not-a-token", None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        let body = json!({"msgs_per_sec": 5});
        let (s, _) = call(&app, "PUT", PATH, "not-a-token", Some(body.clone())).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        let (s, _) = call(&app, "PUT", PATH, VIEW, Some(body.clone())).await;
        assert_eq!(s, StatusCode::FORBIDDEN);
        let (s, _) = call(&app, "DELETE", PATH, VIEW, None).await;
        assert_eq!(s, StatusCode::FORBIDDEN);

        // Validation: the bad field is named; nothing changes.
        for (bad, field) in [
            (json!({"msgs_per_sec": 0}), "msgs_per_sec"),
            (
                json!({"msgs_per_sec": 10, "bytes_per_sec": 0}),
                "bytes_per_sec",
            ),
            (json!({"msgs_per_sec": -1}), "msgs_per_sec"),
            (json!({"bytes_per_sec": 4_294_967_296u64}), "bytes_per_sec"),
            (json!({"msgs_per_sec": "fast"}), "msgs_per_sec"),
            (json!({"msgs_per_sec": 10, "burst": 20}), "burst"),
        ] {
            let (s, e) = call(&app, "PUT", PATH, OP, Some(bad.clone())).await;
            assert_eq!(
                (s, e["error_code"].as_str(), e["error_ext_msg"].as_str()),
                (StatusCode::BAD_REQUEST, Some("FG.1001"), Some(field)),
                "{bad}: {e}"
            );
        }
        assert_eq!(
            call(&app, "GET", PATH, VIEW, None).await.1["source"],
            "default"
        );

        // Unknown instance: 404 FG.2001 for every method.
        let nope = "/api/v1/instances/nope/forwarding/rate-limit";
        for (method, token, body) in [
            ("GET", VIEW, None),
            ("PUT", OP, Some(json!({"msgs_per_sec": 5}))),
            ("DELETE", OP, None),
        ] {
            let (s, e) = call(&app, method, nope, token, body).await;
            assert_eq!(
                (s, e["error_code"].as_str()),
                (StatusCode::NOT_FOUND, Some("FG.2001")),
                "{method}"
            );
        }

        // Set: shown at once, persisted.
        let (s, v) = call(
            &app,
            "PUT",
            PATH,
            OP,
            Some(json!({"msgs_per_sec": 50, "bytes_per_sec": 65536})),
        )
        .await;
        assert_eq!(
            (s, &v),
            (StatusCode::OK, &view(Some(50), Some(65536), "instance"))
        );
        assert_eq!(call(&app, "GET", PATH, VIEW, None).await.1, v);
        let r = rebuilt();
        assert_eq!(
            (r.msgs_per_sec, r.bytes_per_sec, r.source),
            (Some(50), Some(65536), RateLimitSource::Instance)
        );

        // Both bounds null (or absent): an explicit "unlimited" that beats the default.
        for unlimited in [
            json!({}),
            json!({"msgs_per_sec": null, "bytes_per_sec": null}),
        ] {
            let (s, v) = call(&app, "PUT", PATH, OP, Some(unlimited)).await;
            assert_eq!((s, v), (StatusCode::OK, view(None, None, "instance")));
        }
        let r = rebuilt();
        assert_eq!(
            (r.msgs_per_sec, r.bytes_per_sec, r.source),
            (None, None, RateLimitSource::Instance)
        );

        // Delete: back to the configured default, in memory and in the store; idempotent.
        for _ in 0..2 {
            let (s, v) = call(&app, "DELETE", PATH, OP, None).await;
            assert_eq!((s, v), (StatusCode::NO_CONTENT, Value::Null));
            let (s, v) = call(&app, "GET", PATH, VIEW, None).await;
            assert_eq!((s, v), (StatusCode::OK, view(Some(1000), None, "default")));
        }
        assert_eq!(rebuilt().source, RateLimitSource::Default);
        // Without a configured default there is no limit at all.
        let bare = Forwarder::disabled(
            registry.store().clone(),
            registry.clone(),
            Arc::new(Metrics::new()),
        )
        .unwrap();
        let r = bare.rate_limit("iot-a").unwrap();
        assert_eq!(
            (r.msgs_per_sec, r.bytes_per_sec, r.source),
            (None, None, RateLimitSource::None)
        );
    }
}
