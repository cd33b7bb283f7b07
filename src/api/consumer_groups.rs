//! `/api/v1/instances/{iid}/consumer-groups`: AMQP consumer groups of an instance.
//!
//! Create and delete need an operator token; reads any token. Groups work whether AMQP
//! forwarding is on or off: they are persisted and declared in RabbitMQ once a broker is
//! reachable. A group's GET shows its queue's backlog (messages ready, from a passive
//! `queue.declare`), the consumers attached and a consume rate estimated by the forwarder's
//! sampler (RabbitMQ's management API is not required).

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::auth::RequireOperator;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiJson, ApiPath, ApiQuery};
use super::instances::PageQuery;
use super::{ApiState, ItemsPage};
use crate::forwarder::{ConsumerGroup, ConsumerGroupDetails, NewConsumerGroup};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// The consumer-group routes (`/api/v1/instances/{iid}/consumer-groups…`).
pub(super) fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::default()
        .routes(routes!(create_group, list_groups))
        .routes(routes!(get_group, delete_group))
}

/// A group as created, with the RabbitMQ names its consumers need (as `GET` shows them).
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedConsumerGroup {
    #[serde(flatten)]
    pub group: ConsumerGroup,
    /// The instance's exchange (fanout; every group of the instance is bound to it).
    pub exchange: String,
    /// This group's queue: what its consumers read.
    pub queue: String,
}

/// Create a consumer group (operator).
#[utoipa::path(
    post,
    path = "/api/v1/instances/{iid}/consumer-groups",
    tag = "consumer-groups",
    params(("iid" = String, Path, description = "Instance id")),
    request_body = NewConsumerGroup,
    responses(
        (status = 201, description = "Created (durable; declared in RabbitMQ when connected, else on the next connection), with its exchange and queue", body = CreatedConsumerGroup),
        (status = 400, description = "Invalid field", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Viewer token", body = ErrorBody),
        (status = 404, description = "No such instance (FG.2001)", body = ErrorBody),
        (status = 409, description = "Group exists (FG.2104)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn create_group(
    _op: RequireOperator,
    State(state): State<ApiState>,
    ApiPath(iid): ApiPath<String>,
    ApiJson(req): ApiJson<NewConsumerGroup>,
) -> Result<(StatusCode, Json<CreatedConsumerGroup>), ApiError> {
    let forwarder = &state.forwarder;
    let group = forwarder.create_group(&iid, req).await?;
    let topology = forwarder.topology();
    let created = CreatedConsumerGroup {
        exchange: topology.exchange(&group.instance_id),
        queue: topology.queue(&group.instance_id, &group.group_id),
        group,
    };
    Ok((StatusCode::CREATED, Json(created)))
}

/// List an instance's consumer groups (by group id).
#[utoipa::path(
    get,
    path = "/api/v1/instances/{iid}/consumer-groups",
    tag = "consumer-groups",
    params(("iid" = String, Path, description = "Instance id"), PageQuery),
    responses(
        (status = 200, description = "One page of groups", body = ItemsPage<ConsumerGroup>),
        (status = 400, description = "Invalid page or page_size", body = ErrorBody),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No such instance (FG.2001)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn list_groups(
    State(state): State<ApiState>,
    ApiPath(iid): ApiPath<String>,
    ApiQuery(q): ApiQuery<PageQuery>,
) -> Result<Json<ItemsPage<ConsumerGroup>>, ApiError> {
    let page = q.page()?;
    let all = state.forwarder.list_groups(&iid)?;
    let total = all.len() as u64;
    let skip = (page.page as usize - 1).saturating_mul(page.page_size as usize);
    Ok(Json(ItemsPage {
        items: all
            .into_iter()
            .skip(skip)
            .take(page.page_size as usize)
            .collect(),
        total,
        page: page.page,
        page_size: page.page_size,
    }))
}

/// One consumer group with its backlog, consumers and consume rate.
#[utoipa::path(
    get,
    path = "/api/v1/instances/{iid}/consumer-groups/{gid}",
    tag = "consumer-groups",
    params(
        ("iid" = String, Path, description = "Instance id"),
        ("gid" = String, Path, description = "Consumer group id"),
    ),
    responses(
        (status = 200, description = "The group; `backlog`/`consumers` are null while no broker is connected", body = ConsumerGroupDetails),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 404, description = "No such instance (FG.2001) or group (FG.2004)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn get_group(
    State(state): State<ApiState>,
    ApiPath((iid, gid)): ApiPath<(String, String)>,
) -> Result<Json<ConsumerGroupDetails>, ApiError> {
    Ok(Json(state.forwarder.group_details(&iid, &gid).await?))
}

/// Delete a consumer group and its queue, with the messages still in it (operator).
#[utoipa::path(
    delete,
    path = "/api/v1/instances/{iid}/consumer-groups/{gid}",
    tag = "consumer-groups",
    params(
        ("iid" = String, Path, description = "Instance id"),
        ("gid" = String, Path, description = "Consumer group id"),
    ),
    responses(
        (status = 204, description = "Deleted (the queue is deleted now when connected, else on the next connection)"),
        (status = 401, description = "No valid token", body = ErrorBody),
        (status = 403, description = "Viewer token", body = ErrorBody),
        (status = 404, description = "No such instance (FG.2001) or group (FG.2004)", body = ErrorBody),
    ),
    security(("bearer" = []))
)]
pub async fn delete_group(
    _op: RequireOperator,
    State(state): State<ApiState>,
    ApiPath((iid, gid)): ApiPath<(String, String)>,
) -> Result<StatusCode, ApiError> {
    state.forwarder.delete_group(&iid, &gid).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Shared with the tests of the other forwarder routes ([`super::forwarding`]).
#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::api::{router, BodyLimits, Role, TokenSet};
    use crate::forwarder::Forwarder;
    use crate::forwarder::{AmqpSettings, ForwarderConfig};
    use crate::metrics::Metrics;
    use crate::ota::FirmwareRepo;
    use crate::registry::{NewInstance, Registry};
    use crate::store::Store;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use serde_json::{json, Value};
    use std::sync::Arc;
    use tower::ServiceExt;

    pub(in crate::api) const OP: &str = "operator-token-0123456789";
    pub(in crate::api) const VIEW: &str = "viewer-token-0123456789";

    async fn app(dir: &std::path::Path) -> (axum::Router, Arc<Registry>, Store) {
        app_with(dir, ForwarderConfig::default()).await
    }

    /// The API over an in-memory store holding instance `iot-a`, with a forwarder (forwarding
    /// off: no `url`) configured by `config`.
    pub(in crate::api) async fn app_with(
        dir: &std::path::Path,
        config: ForwarderConfig,
    ) -> (axum::Router, Arc<Registry>, Store) {
        let metrics = Arc::new(Metrics::new());
        let store = Store::open_in_memory(metrics.clone()).unwrap();
        let registry = Registry::open(store.clone(), metrics.clone()).unwrap();
        let fwd = Forwarder::open(
            config,
            dir,
            store.clone(),
            registry.clone(),
            metrics.clone(),
        )
        .unwrap();
        let firmware =
            FirmwareRepo::open(dir, store.clone(), "http://127.0.0.1:1".into(), 1 << 20).unwrap();
        let tokens = TokenSet::new([(OP, Role::Operator), (VIEW, Role::Viewer)]);
        let state = ApiState {
            forwarder: fwd,
            ..ApiState::for_tests(
                dir,
                store.clone(),
                registry.clone(),
                metrics,
                tokens,
                firmware,
            )
        };
        registry
            .create_instance(NewInstance {
                instance_id: Some("iot-a".into()),
                name: "A".into(),
            })
            .await
            .unwrap();
        (router(state, BodyLimits::default()), registry, store)
    }

    pub(in crate::api) async fn call(
        app: &axum::Router,
        method: &str,
        uri: &str,
        token: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .header("authorization", format!("Bearer {token}"));
        let body = match body {
            Some(b) => {
                req = req.header("content-type", "application/json");
                Body::from(b.to_string())
            }
            None => Body::empty(),
        };
        let resp = app.clone().oneshot(req.body(body).unwrap()).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let v = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap()
        };
        (status, v)
    }

    #[tokio::test]
    async fn crud_works_with_forwarding_off_and_is_persisted() {
        let dir = tempfile::tempdir().unwrap();
        let (app, registry, store) = app(dir.path()).await;
        let base = "/api/v1/instances/iot-a/consumer-groups";
        let (s, g) = call(
            &app,
            "POST",
            base,
            OP,
            Some(json!({"group_id": "g1", "name": "Analytics"})),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED, "{g}");
        assert_eq!(g["group_id"], "g1");
        // The names consumers need, as GET shows them.
        assert_eq!(g["exchange"], "fleetgate.iot-a", "{g}");
        assert_eq!(g["queue"], "fleetgate.iot-a.g1", "{g}");
        let (s, g2) = call(&app, "POST", base, OP, Some(json!({"name": "Billing"}))).await;
        assert_eq!(s, StatusCode::CREATED);
        let gid2 = g2["group_id"].as_str().unwrap();
        assert_eq!(gid2.len(), 20);
        assert_eq!(g2["queue"], format!("fleetgate.iot-a.{gid2}"));
        let (s, e) = call(
            &app,
            "POST",
            base,
            OP,
            Some(json!({"group_id": "g1", "name": "dup"})),
        )
        .await;
        assert_eq!(
            (s, e["error_code"].as_str()),
            (StatusCode::CONFLICT, Some("FG.2104"))
        );
        let (s, e) = call(
            &app,
            "POST",
            base,
            OP,
            Some(json!({"group_id": "bad.id", "name": "x"})),
        )
        .await;
        assert_eq!(
            (s, e["error_ext_msg"].as_str()),
            (StatusCode::BAD_REQUEST, Some("group_id"))
        );
        let (s, _) = call(&app, "POST", base, VIEW, Some(json!({"name": "x"}))).await;
        assert_eq!(s, StatusCode::FORBIDDEN);
        let (s, e) = call(
            &app,
            "POST",
            "/api/v1/instances/nope/consumer-groups",
            OP,
            Some(json!({"name": "x"})),
        )
        .await;
        assert_eq!(
            (s, e["error_code"].as_str()),
            (StatusCode::NOT_FOUND, Some("FG.2001"))
        );

        let (s, list) = call(&app, "GET", base, VIEW, None).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(list["total"], 2);

        let (s, d) = call(&app, "GET", &format!("{base}/g1"), VIEW, None).await;
        assert_eq!(s, StatusCode::OK, "{d}");
        assert_eq!(d["amqp"], "disabled");
        assert_eq!(d["queue"], "fleetgate.iot-a.g1");
        assert_eq!(d["exchange"], "fleetgate.iot-a");
        assert!(d["backlog"].is_null());
        assert_eq!(
            (&d["queue_type"], &d["queue_status"], &d["queue_error"]),
            (&json!("classic"), &json!("not_declared"), &Value::Null)
        );

        // Persisted: a registry + forwarder rebuilt from the same store sees the groups.
        let fwd2 = Forwarder::disabled(
            registry.store().clone(),
            registry.clone(),
            Arc::new(Metrics::new()),
        )
        .unwrap();
        assert_eq!(fwd2.list_groups("iot-a").unwrap().len(), 2);
        drop(store);

        let (s, _) = call(&app, "DELETE", &format!("{base}/g1"), OP, None).await;
        assert_eq!(s, StatusCode::NO_CONTENT);
        let (s, e) = call(&app, "GET", &format!("{base}/g1"), VIEW, None).await;
        assert_eq!(
            (s, e["error_code"].as_str()),
            (StatusCode::NOT_FOUND, Some("FG.2004"))
        );
        let fwd3 =
            Forwarder::disabled(registry.store().clone(), registry, Arc::new(Metrics::new()))
                .unwrap();
        assert_eq!(fwd3.list_groups("iot-a").unwrap().len(), 1);
    }

    #[tokio::test]
    async fn message_ttl_is_fixed_at_creation_shown_and_validated() {
        let dir = tempfile::tempdir().unwrap();
        let config = ForwarderConfig::for_tests(AmqpSettings {
            queue_message_ttl_secs: 7200,
            ..Default::default()
        });
        let (app, registry, store) = app_with(dir.path(), config).await;
        let base = "/api/v1/instances/iot-a/consumer-groups";
        for (gid, ttl, want) in [
            ("own", json!(60), 60),
            ("forever", json!(0), 0),
            ("default", Value::Null, 7200),
        ] {
            let (s, g) = call(
                &app,
                "POST",
                base,
                OP,
                Some(json!({"group_id": gid, "name": gid, "message_ttl_secs": ttl})),
            )
            .await;
            assert_eq!(
                (s, &g["message_ttl_secs"]),
                (StatusCode::CREATED, &json!(want))
            );
            let (_, d) = call(&app, "GET", &format!("{base}/{gid}"), VIEW, None).await;
            assert_eq!(d["message_ttl_secs"], want, "{d}");
        }
        for bad in [json!(4_294_968), json!(-1), json!("1d")] {
            let (s, e) = call(
                &app,
                "POST",
                base,
                OP,
                Some(json!({"group_id": "bad", "name": "bad", "message_ttl_secs": bad})),
            )
            .await;
            assert_eq!(
                (s, e["error_ext_msg"].as_str()),
                (StatusCode::BAD_REQUEST, Some("message_ttl_secs")),
                "{bad}: {e}"
            );
        }
        // The largest TTL RabbitMQ takes (ms below 2^32) is accepted.
        let (s, _) = call(
            &app,
            "POST",
            base,
            OP,
            Some(json!({"group_id": "max", "name": "max", "message_ttl_secs": 4_294_967})),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED);

        // A document written before TTLs existed still loads: null, i.e. the configured default.
        store
            .submit(vec![crate::store::Op::PutDoc {
                kind: "amqp.group",
                id: "iot-a/old".into(),
                body: r#"{"instance_id":"iot-a","group_id":"old","name":"Old","created_at_ms":1}"#
                    .into(),
            }])
            .await
            .unwrap();
        let fwd = Forwarder::disabled(registry.store().clone(), registry, Arc::new(Metrics::new()))
            .unwrap();
        let ttls: Vec<(String, Option<u32>)> = fwd
            .list_groups("iot-a")
            .unwrap()
            .into_iter()
            .map(|g| (g.group_id, g.message_ttl_secs))
            .collect();
        assert_eq!(
            ttls,
            [
                ("default".to_string(), Some(7200)),
                ("forever".to_string(), Some(0)),
                ("max".to_string(), Some(4_294_967)),
                ("old".to_string(), None),
                ("own".to_string(), Some(60)),
            ]
        );
    }
}
