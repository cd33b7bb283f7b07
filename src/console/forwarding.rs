//! Forwarding: each instance's consumer groups with their queue, backlog, consumers and
//! consume rate, as `GET /api/v1/instances/{iid}/consumer-groups/{gid}` reports them; admins
//! can delete an instance (`DELETE /api/v1/instances/{iid}`, with its groups when asked).

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use maud::html;
use serde_json::Value;

use super::view::{self, enc, Nav};
use super::{Console, Sess};

pub(super) fn routes() -> Router<Console> {
    Router::new()
        .route("/console/forwarding", get(page))
        .route("/console/instances/{iid}/delete", post(delete_instance))
}

/// Deletes an instance through the API; the form's `sure` box must be ticked, `groups` asks
/// for `force=true`. A refusal (409 naming what is in the way) is shown as the API words it.
async fn delete_instance(
    State(c): State<Console>,
    session: Sess,
    Path(iid): Path<String>,
    body: Bytes,
) -> Response {
    let form: Vec<(String, String)> = form_urlencoded::parse(&body)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let ticked = |name: &str| form.iter().any(|(k, v)| k == name && v == "yes");
    if !ticked("sure") {
        return view::error_page(
            Some(&session),
            StatusCode::BAD_REQUEST,
            "Tick the confirmation box to delete an instance.",
        );
    }
    let force = if ticked("groups") { "?force=true" } else { "" };
    let a = c
        .api
        .json(
            &session,
            Method::DELETE,
            &format!("/api/v1/instances/{}{force}", enc(&iid)),
            &Value::Null,
        )
        .await;
    if !a.ok() {
        return view::api_error(&session, &a);
    }
    Redirect::to("/console/forwarding").into_response()
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "—".into(),
        other => other.to_string(),
    }
}

async fn page(State(c): State<Console>, session: Sess) -> Response {
    let instances = c.api.get(&session, "/api/v1/instances?page_size=100").await;
    if !instances.ok() {
        return view::api_error(&session, &instances);
    }
    let mut sections = Vec::new();
    for i in instances.body["items"].as_array().into_iter().flatten() {
        let iid = s(&i["instance_id"]);
        let groups = c
            .api
            .get(
                &session,
                &format!(
                    "/api/v1/instances/{}/consumer-groups?page_size=100",
                    enc(&iid)
                ),
            )
            .await;
        let mut rows = Vec::new();
        for g in groups.body["items"].as_array().into_iter().flatten() {
            let gid = s(&g["group_id"]);
            let d = c
                .api
                .get(
                    &session,
                    &format!(
                        "/api/v1/instances/{}/consumer-groups/{}",
                        enc(&iid),
                        enc(&gid)
                    ),
                )
                .await;
            rows.push(if d.ok() { d.body } else { g.clone() });
        }
        sections.push(html! {
            section.card aria-labelledby=(format!("i-{iid}")) {
                h2 id=(format!("i-{iid}")) { (s(&i["name"])) " " span.small { (iid) } }
                @if session.is_admin() && iid != "default" {
                    form.inline method="post" action=(format!("/console/instances/{}/delete", enc(&iid))) {
                        (view::csrf(&session))
                        label.check { input type="checkbox" name="sure" value="yes" required; " I mean it" } " "
                        label.check { input type="checkbox" name="groups" value="yes"; " with its consumer groups" } " "
                        button.danger type="submit" { "Delete instance" }
                    }
                }
                @if !groups.ok() {
                    p.error { (groups.error_msg()) }
                } @else if rows.is_empty() {
                    p.small { "No consumer groups." }
                } @else {
                    div.table-wrap { table {
                        thead { tr { th { "Group" } th { "Queue" } th { "Broker" } th { "Backlog" } th { "Consumers" } th { "Consumed/minute" } } }
                        tbody {
                            @for g in &rows {
                                tr data-group=(s(&g["group_id"])) {
                                    td { (s(&g["name"])) br; code.small { (s(&g["group_id"])) } }
                                    td {
                                        code { (s(&g["queue"])) } " "
                                        span.small { (s(&g["queue_type"])) }
                                        @if let Some(e) = g["queue_error"].as_str() {
                                            br; span.error { (e) }
                                        }
                                    }
                                    td { (s(&g["amqp"])) }
                                    td.backlog { (s(&g["backlog"])) }
                                    td { (s(&g["consumers"])) }
                                    td { (g["consume_rate_per_minute"].as_f64().map(|r| format!("{r:.0}")).unwrap_or_else(|| "—".into())) }
                                }
                            }
                        }
                    } }
                }
            }
        });
    }
    let body = html! {
        p.small { "Device data goes to each instance's exchange; every consumer group has its own queue." }
        @for section in sections { (section) }
    };
    view::respond(
        StatusCode::OK,
        view::page("Forwarding", Nav::Forwarding, Some(&session), body),
    )
}
