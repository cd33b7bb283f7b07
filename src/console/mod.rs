//! The operator web console at `/console` (and `/`, which redirects there): server-rendered
//! HTML (maud) with htmx for the live parts, every asset embedded in the binary.
//!
//! Owns pages, sessions and CSRF; owns no business logic. Reads come from the same
//! [`Registry`](crate::registry::Registry), [`OtaEngine`](crate::ota::OtaEngine),
//! [`MigrationEngine`](crate::migration::MigrationEngine) and
//! [`ExportService`](crate::export::ExportService) queries the API handlers call; in cluster
//! mode a page reading the engines is rendered by the node that drives them ([`engine_pages`]),
//! whose engines are the ones loaded, as the API passes its engine calls on. It writes to
//! the store only its own `console.revoked` documents (cluster mode, [`session`]). Every
//! write is sent to the API router itself ([`ApiClient`]) as a bearer request with the
//! session's token, so authentication, the role split, validation, error codes, cluster
//! settling and the revocation hooks are the API's, unchanged; the console only turns a form
//! into the API's JSON and the answer (or the API's error body) into a page.
//!
//! Request flow: [`guard`] runs on every `/console` route but the login page and the assets.
//! It finds the session from the cookie (or redirects to the login page), and for a `POST`
//! checks the session's CSRF token — from the `csrf` form field, the `csrf` query parameter
//! (multipart uploads, so the body streams through untouched) or the `x-csrf-token` header
//! (htmx) — and the `Origin` header when one is sent. A viewer's session gets pages without
//! mutating controls, and its `POST`s are refused here with 403 before the API would refuse
//! them too.

mod dashboard;
mod exports;
mod firmware;
mod fleet;
mod forwarding;
mod migrations;
mod ota;
pub mod session;
mod view;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::{to_bytes, Body};
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use serde_json::Value;
use tower::ServiceExt;
use tower_http::catch_panic::CatchPanicLayer;

use crate::api::ApiState;
use session::{Session, Sessions};

/// Largest url-encoded form body the console reads to find its CSRF field (uploads are
/// multipart and carry the token in the query instead).
const FORM_LIMIT: usize = 1024 * 1024;

/// Everything console handlers need.
#[derive(Clone)]
pub(crate) struct Console {
    pub api_state: ApiState,
    pub api: ApiClient,
    pub sessions: Arc<Sessions>,
}

/// The API router, called in-process for every console write.
#[derive(Clone)]
pub(crate) struct ApiClient {
    router: Router,
}

/// The API's answer to an in-process call.
pub(crate) struct ApiAnswer {
    pub status: StatusCode,
    pub body: Value,
}

impl ApiAnswer {
    /// The answer of a response the API gave (its body read as JSON, `null` when it is not).
    pub async fn read(resp: Response) -> ApiAnswer {
        let (parts, body) = resp.into_parts();
        let raw = to_bytes(body, usize::MAX).await.unwrap_or_default();
        ApiAnswer {
            status: parts.status,
            body: serde_json::from_slice(&raw).unwrap_or(Value::Null),
        }
    }

    pub fn ok(&self) -> bool {
        self.status.is_success()
    }

    /// The API's error message (`error_msg`), for a failed call.
    pub fn error_msg(&self) -> String {
        self.body["error_msg"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| format!("the API answered {}", self.status))
    }

    /// The field the API blamed (`error_ext_msg`), if any.
    pub fn error_field(&self) -> Option<&str> {
        self.body["error_ext_msg"].as_str()
    }

    pub fn error_code(&self) -> &str {
        self.body["error_code"].as_str().unwrap_or("")
    }
}

impl ApiClient {
    /// Sends `method path` with `body` (of `content_type`) as the session's bearer request and
    /// returns the API's response itself (a download streams through unchanged).
    pub async fn response(
        &self,
        session: &Session,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: Body,
    ) -> Result<Response, ApiAnswer> {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::AUTHORIZATION, format!("Bearer {}", session.token));
        if let Some(ct) = content_type {
            req = req.header(header::CONTENT_TYPE, ct);
        }
        if let Some(peer) = session.client {
            req = req.extension(ConnectInfo(peer));
        }
        let req = req.body(body).map_err(|e| ApiAnswer {
            status: StatusCode::BAD_REQUEST,
            body: serde_json::json!({"error_msg": format!("bad request: {e}")}),
        })?;
        match self.router.clone().oneshot(req).await {
            Ok(r) => Ok(r),
            Err(never) => match never {},
        }
    }

    /// Sends `method path` with `body` (of `content_type`) as the session's bearer request.
    pub async fn call(
        &self,
        session: &Session,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: Body,
    ) -> ApiAnswer {
        let resp = match self
            .response(session, method, path, content_type, body)
            .await
        {
            Ok(r) => r,
            Err(answer) => return answer,
        };
        ApiAnswer::read(resp).await
    }

    /// A JSON request (`body` serialised), or a bodiless one with `Value::Null`.
    pub async fn json(
        &self,
        session: &Session,
        method: Method,
        path: &str,
        body: &Value,
    ) -> ApiAnswer {
        if body.is_null() {
            return self.call(session, method, path, None, Body::empty()).await;
        }
        self.call(
            session,
            method,
            path,
            Some("application/json"),
            Body::from(body.to_string()),
        )
        .await
    }

    pub async fn get(&self, session: &Session, path: &str) -> ApiAnswer {
        self.json(session, Method::GET, path, &Value::Null).await
    }
}

/// `app` (the API router) with the console mounted in front of it: `/` and `/console/…` are
/// the console's, everything else goes to `app` unchanged.
pub fn mount(app: Router, state: ApiState) -> Router {
    let metrics = state.metrics.clone();
    let console = Console {
        api: ApiClient {
            router: app.clone(),
        },
        sessions: state.console_sessions.clone(),
        api_state: state,
    };
    let guarded = Router::new()
        .route("/console", get(dashboard::page))
        .route("/console/dashboard/live", get(dashboard::live))
        .route("/console/logout", post(logout))
        .merge(fleet::routes())
        .merge(firmware::routes())
        .merge(exports::routes())
        .merge(ota::routes())
        .merge(migrations::routes())
        .merge(forwarding::routes())
        // Inside the guard: a follower passes on only requests whose session it opened.
        .route_layer(axum::middleware::from_fn_with_state(
            console.clone(),
            engine_pages,
        ))
        .route_layer(axum::middleware::from_fn_with_state(console.clone(), guard));
    let pages = Router::new()
        .route("/", get(|| async { Redirect::to("/console") }))
        .route("/console/", get(|| async { Redirect::to("/console") }))
        .route("/console/login", get(login_page).post(login))
        .route("/console/assets/htmx.min.js", get(view::htmx_js))
        .route("/console/assets/console.css", get(view::css))
        .merge(guarded)
        .route_layer(axum::middleware::from_fn(security_headers))
        .route_layer(CatchPanicLayer::custom(
            crate::api::middleware::panic_response,
        ))
        .route_layer(axum::middleware::from_fn_with_state(
            metrics,
            crate::api::middleware::observe,
        ))
        .with_state(console);
    // `route_layer`: the layers above wrap console routes only; `app` has its own.
    pages.fallback_service(app)
}

/// Headers on every console response: no framing, no sniffing, no caching of pages (they
/// may show secrets), and a policy that allows only our own scripts and styles.
async fn security_headers(req: Request, next: Next) -> Response {
    let is_asset = req.uri().path().starts_with("/console/assets/");
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; \
             frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    if !is_asset {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}

/// The session of the request's cookie, if it is live (and its cookie re-sealed when due).
fn session_of(console: &Console, headers: &HeaderMap) -> Option<session::Opened> {
    let cookie = headers.get(header::COOKIE)?.to_str().ok()?;
    console.sessions.get(
        session::cookie_value(cookie)?,
        &console.api_state.tokens,
        crate::clock::now_ms(),
    )
}

/// Whether an `Origin` header, when present, names this host (the request's `Host`).
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let (Ok(origin), Some(Ok(host))) = (
        origin.to_str(),
        headers.get(header::HOST).map(|h| h.to_str()),
    ) else {
        return false;
    };
    origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .is_some_and(|o| o == host)
}

/// The CSRF token of a url-encoded form body.
fn csrf_field(body: &[u8]) -> Option<String> {
    form_urlencoded::parse(body)
        .find(|(k, _)| k == "csrf")
        .map(|(_, v)| v.into_owned())
}

/// See the module docs.
async fn guard(State(console): State<Console>, req: Request, next: Next) -> Response {
    let Some(opened) = session_of(&console, req.headers()) else {
        if req.method() == Method::GET {
            return Redirect::to("/console/login").into_response();
        }
        return view::error_page(
            None,
            StatusCode::UNAUTHORIZED,
            "Your session has ended. Log in again.",
        );
    };
    let mut session = opened.session;
    session.client = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(peer)| *peer);
    let mut resp = checked(req, session, next).await;
    // Not over a logout's clearing of the cookie.
    let clears = resp.headers().contains_key(header::SET_COOKIE);
    if let (Some(cookie), false) = (opened.reseal, clears) {
        if let Ok(v) = HeaderValue::from_str(&session::set_cookie(&cookie)) {
            resp.headers_mut().append(header::SET_COOKIE, v);
        }
    }
    resp
}

/// Whether a console page reads the OTA, migration or export engines (or the firmware the OTA
/// engine holds): the dashboard (running jobs and migrations), OTA jobs and their form,
/// firmware, migrations, export/import.
fn engine_page(path: &str) -> bool {
    let under = |prefix: &str| {
        path.strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    };
    path == "/console"
        || path == "/console/dashboard/live"
        || under("/console/ota")
        || under("/console/firmware")
        || under("/console/migrations")
        || under("/console/export")
        || under("/console/import")
}

/// Cluster mode: a page that reads the engines ([`engine_page`]) is rendered by the node that
/// drives them, passed on as the API's engine calls are (`crate::api::to_engines`; the
/// session cookie opens there too), so every node shows the same job, migration or export;
/// this node's engines are in standby and empty. Only reads: a form's `POST` is served here
/// and its API call is passed on by the API itself. While no node drives the engines (a
/// takeover), 503 with a page saying so.
async fn engine_pages(State(console): State<Console>, req: Request, next: Next) -> Response {
    let read = req.method() == Method::GET || req.method() == Method::HEAD;
    if !read || !engine_page(req.uri().path()) {
        return next.run(req).await;
    }
    let session = req.extensions().get::<Session>().cloned();
    match crate::api::to_engines(&console.api_state, req).await {
        crate::api::EngineCall::Here(req) => next.run(req).await,
        crate::api::EngineCall::Answered(resp) => resp,
        crate::api::EngineCall::Unavailable(message) => view::error_page(
            session.as_ref(),
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("Cannot show this page now: {message}."),
        ),
    }
}

/// The guard's checks of a request whose session is live.
async fn checked(req: Request, session: Session, next: Next) -> Response {
    if req.method() == Method::GET || req.method() == Method::HEAD {
        let mut req = req;
        req.extensions_mut().insert(session);
        return next.run(req).await;
    }
    if !same_origin(req.headers()) {
        return view::error_page(
            Some(&session),
            StatusCode::FORBIDDEN,
            "Refused: the form was sent from another site.",
        );
    }
    let (mut parts, body) = req.into_parts();
    let from_query = parts.uri.query().and_then(|q| csrf_field(q.as_bytes()));
    let from_header = parts
        .headers
        .get("x-csrf-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let is_form = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/x-www-form-urlencoded"));
    let (presented, body) = if let Some(t) = from_header.or(from_query) {
        (Some(t), body)
    } else if is_form {
        let bytes = match to_bytes(body, FORM_LIMIT).await {
            Ok(b) => b,
            Err(_) => {
                return view::error_page(
                    Some(&session),
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "The form is too large.",
                )
            }
        };
        (csrf_field(&bytes), Body::from(bytes))
    } else {
        (None, body)
    };
    if !presented.is_some_and(|t| session.csrf_matches(&t)) {
        tracing::warn!(path = %parts.uri.path(), "console POST without a valid CSRF token");
        return view::error_page(
            Some(&session),
            StatusCode::FORBIDDEN,
            "Refused: the form's CSRF token is missing or stale. Reload the page and try again.",
        );
    }
    // Logging out is every role's.
    if !session.may_operate() && parts.uri.path() != "/console/logout" {
        return view::error_page(
            Some(&session),
            StatusCode::FORBIDDEN,
            "Refused: a viewer may not change anything.",
        );
    }
    parts.extensions.insert(session);
    next.run(Request::from_parts(parts, body)).await
}

async fn login_page(State(console): State<Console>, headers: HeaderMap) -> Response {
    if session_of(&console, &headers).is_some() {
        return Redirect::to("/console").into_response();
    }
    view::login(None, StatusCode::OK)
}

#[derive(serde::Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(State(console): State<Console>, headers: HeaderMap, body: Body) -> Response {
    if !same_origin(&headers) {
        return view::login(
            Some("Refused: the form was sent from another site."),
            StatusCode::FORBIDDEN,
        );
    }
    let Ok(bytes) = to_bytes(body, 64 * 1024).await else {
        return view::login(
            Some("The form is too large."),
            StatusCode::PAYLOAD_TOO_LARGE,
        );
    };
    let Ok(form) = serde_urlencoded::from_bytes::<LoginForm>(&bytes) else {
        return view::login(Some("Enter an API token."), StatusCode::BAD_REQUEST);
    };
    let token = form.token.trim();
    let Some(role) = (!token.is_empty())
        .then(|| console.api_state.tokens.role_of(token))
        .flatten()
    else {
        tracing::warn!("console login with an unknown token");
        return view::login(
            Some("That token is not known to this gateway."),
            StatusCode::UNAUTHORIZED,
        );
    };
    let cookie = console.sessions.open(token, crate::clock::now_ms());
    tracing::info!(%role, "console login");
    (
        [(header::SET_COOKIE, session::set_cookie(&cookie))],
        Redirect::to("/console"),
    )
        .into_response()
}

async fn logout(State(console): State<Console>, session: Sess) -> Response {
    if let Err(e) = console
        .sessions
        .close(&session, crate::clock::now_ms())
        .await
    {
        // Ended here; another node may still take the cookie until it expires.
        tracing::error!(error = %e, "console logout not shared with the other nodes");
        return view::error_page(
            None,
            StatusCode::SERVICE_UNAVAILABLE,
            "Logged out on this node only: the other nodes could not be told. Log out again.",
        );
    }
    (
        [(header::SET_COOKIE, session::clear_cookie())],
        Redirect::to("/console/login"),
    )
        .into_response()
}

/// `Extension<Session>` as the guard inserted it.
pub(crate) type Sess = Extension<Session>;

#[cfg(test)]
mod tests {
    use super::engine_page;

    #[test]
    fn the_pages_that_read_the_engines() {
        for path in [
            "/console",
            "/console/dashboard/live",
            "/console/ota",
            "/console/ota/new",
            "/console/ota/jobs/j1/live",
            "/console/ota/jobs/j1/tasks/d1",
            "/console/firmware",
            "/console/migrations/t1/live-devices",
            "/console/export/x/log",
            "/console/import/x",
        ] {
            assert!(engine_page(path), "{path}");
        }
        for path in [
            "/console/login",
            "/console/products",
            "/console/products/pk/devices/d1",
            "/console/forwarding",
            "/console/otax",
            "/console/exports",
            "/console/assets/console.css",
        ] {
            assert!(!engine_page(path), "{path}");
        }
    }
}
