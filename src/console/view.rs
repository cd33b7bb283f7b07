//! The page shell (navigation, session bar), the embedded assets, and the pieces every screen
//! shares: the stacked status bar, the SVG bar chart, pagers, time and error rendering.

use axum::body::Bytes;
use axum::extract::Multipart;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use maud::{html, Markup, DOCTYPE};

use super::session::Session;

const HTMX: &str = include_str!("assets/htmx.min.js");
const CSS: &str = include_str!("assets/console.css");

pub(super) async fn htmx_js() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        HTMX,
    )
        .into_response()
}

pub(super) async fn css() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        CSS,
    )
        .into_response()
}

/// Which navigation entry is current.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Nav {
    Dashboard,
    Products,
    Firmware,
    Ota,
    Migrations,
    Transfers,
    Forwarding,
    None,
}

/// A whole page: head, skip link, navigation, the session bar with logout, and `body`.
pub(super) fn page(title: &str, nav: Nav, session: Option<&Session>, body: Markup) -> Markup {
    let entries = [
        (Nav::Dashboard, "/console", "Dashboard"),
        (Nav::Products, "/console/products", "Products"),
        (Nav::Firmware, "/console/firmware", "Firmware"),
        (Nav::Ota, "/console/ota", "OTA jobs"),
        (Nav::Migrations, "/console/migrations", "Migrations"),
        (Nav::Transfers, "/console/export", "Export/import"),
        (Nav::Forwarding, "/console/forwarding", "Forwarding"),
    ];
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                // No inline <style> from htmx: the content security policy allows none.
                meta name="htmx-config" content=r#"{"includeIndicatorStyles":false}"#;
                title { (title) " · fleetgate" }
                link rel="stylesheet" href="/console/assets/console.css";
                script src="/console/assets/htmx.min.js" defer {}
            }
            body {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    a.brand href="/console" { "fleetgate" }
                    @if let Some(s) = session {
                        nav aria-label="Main" {
                            ul {
                                @for (which, href, label) in entries {
                                    li {
                                        @if which == nav {
                                            a href=(href) aria-current="page" { (label) }
                                        } @else {
                                            a href=(href) { (label) }
                                        }
                                    }
                                }
                            }
                        }
                        div.who {
                            span.role data-role=(s.role.as_str()) { "Signed in as " strong { (s.role.as_str()) } }
                            form method="post" action="/console/logout" {
                                (csrf(s))
                                button.link type="submit" { "Log out" }
                            }
                        }
                    }
                }
                main #main tabindex="-1" {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

/// The hidden CSRF field of a form.
pub(super) fn csrf(s: &Session) -> Markup {
    html! { input type="hidden" name="csrf" value=(&*s.csrf); }
}

/// A page as a response.
pub(super) fn respond(status: StatusCode, markup: Markup) -> Response {
    let mut resp = (status, Html(markup.into_string())).into_response();
    // An error page is already the answer: the API's request layer must not replace it with
    // the JSON error body it gives bare error responses.
    resp.extensions_mut()
        .insert(crate::api::error::StandardErrorBody);
    resp
}

pub(super) fn login(error: Option<&str>, status: StatusCode) -> Response {
    let body = html! {
        form.card.login method="post" action="/console/login" {
            p { "Sign in with an API token: the admin token the gateway printed at its first start (also in "
                code { "{data_dir}/api-token" } "), or an operator or viewer token from " code { "api.tokens" } "." }
            @if let Some(e) = error {
                p.error role="alert" { (e) }
            }
            label for="token" { "API token" }
            input #token type="password" name="token" autocomplete="current-password" required autofocus;
            button type="submit" { "Sign in" }
        }
    };
    respond(status, page("Sign in", Nav::None, None, body))
}

/// An error page with the message (and a way back).
pub(super) fn error_page(session: Option<&Session>, status: StatusCode, msg: &str) -> Response {
    let body = html! {
        p.error role="alert" { (msg) }
        p { a href="/console" { "Back to the dashboard" } }
    };
    respond(
        status,
        page(
            status.canonical_reason().unwrap_or("Error"),
            Nav::None,
            session,
            body,
        ),
    )
}

/// The API's refusal of a console action, as a page.
pub(super) fn api_error(session: &Session, answer: &super::ApiAnswer) -> Response {
    let mut msg = answer.error_msg();
    if !answer.error_code().is_empty() {
        msg = format!("{msg} ({})", answer.error_code());
    }
    error_page(Some(session), answer.status, &msg)
}

/// `ms` since the epoch as `YYYY-MM-DD HH:MM:SS UTC`.
pub(super) fn time(ms: Option<i64>) -> String {
    let Some(ms) = ms else {
        return "—".into();
    };
    let t = crate::clock::civil(ms);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
        t.year, t.month, t.day, t.hour, t.minute, t.second
    )
}

/// One segment of a stacked bar.
pub(super) struct Segment {
    pub label: &'static str,
    pub class: &'static str,
    pub count: u64,
}

/// A stacked horizontal bar (SVG: the policy allows no inline styles) with a legend of
/// counts; screen readers get the counts as text.
pub(super) fn stacked_bar(id: &str, segments: &[Segment]) -> Markup {
    let total: u64 = segments.iter().map(|s| s.count).sum();
    let summary = segments
        .iter()
        .map(|s| format!("{} {}", s.label, s.count))
        .collect::<Vec<_>>()
        .join(", ");
    let mut x = 0.0f64;
    let rects: Vec<(f64, f64, &Segment)> = segments
        .iter()
        .filter(|s| s.count > 0)
        .map(|s| {
            let w = s.count as f64 * 1000.0 / total.max(1) as f64;
            let r = (x, w, s);
            x += w;
            r
        })
        .collect();
    html! {
        svg.statusbar id=(id) role="img" aria-label=(format!("{total} tasks: {summary}"))
            viewBox="0 0 1000 28" preserveAspectRatio="none" width="100%" height="28" {
            rect x="0" y="0" width="1000" height="28" class="empty" {}
            @for (x, w, s) in &rects {
                rect x=(format!("{x:.2}")) y="0" width=(format!("{w:.2}")) height="28" class=(s.class) {
                    title { (s.label) " " (s.count) }
                }
            }
        }
        ul.legend {
            @for s in segments {
                li data-status=(s.label) {
                    span class=(format!("swatch {}", s.class)) {}
                    (s.label) " " strong.count { (s.count) }
                }
            }
        }
    }
}

/// A thin progress bar: `done` of `total`.
pub(super) fn progress(done: u64, total: u64, label: &str) -> Markup {
    let pct = if total == 0 {
        0.0
    } else {
        done as f64 * 100.0 / total as f64
    };
    html! {
        progress max="100" value=(format!("{pct:.0}")) aria-label=(label) {}
        span.small { (done) " / " (total) " (" (format!("{pct:.0}")) "%)" }
    }
}

/// A horizontal SVG bar chart of `(label, value)` rows.
pub(super) fn bar_chart(title: &str, rows: &[(String, u64)]) -> Markup {
    let max = rows.iter().map(|r| r.1).max().unwrap_or(0).max(1);
    let row_h = 22;
    let label_w = 110;
    let bar_w = 180;
    let height = row_h * rows.len().max(1);
    html! {
        svg.chart role="img" aria-label=(title) viewBox=(format!("0 0 {} {height}", label_w + bar_w + 60))
            width="100%" preserveAspectRatio="xMinYMin meet" {
            title { (title) }
            @for (i, (label, value)) in rows.iter().enumerate() {
                @let y = i * row_h;
                @let w = (*value as f64 / max as f64 * bar_w as f64).max(1.0);
                text x=(label_w - 6) y=(y + 15) text-anchor="end" { (label) }
                rect x=(label_w) y=(y + 4) width=(format!("{w:.1}")) height=(row_h - 8) class="bar" {}
                text x=(format!("{:.1}", label_w as f64 + w + 4.0)) y=(y + 15) { (value) }
            }
        }
    }
}

/// A column chart of pushes over time (SVG, no script): one column per bucket of `series`,
/// the busiest bucket's height labelled, the first and last bucket's time (UTC) under the axis.
/// Screen readers get the totals and the peak as text.
pub(super) fn push_chart(id: &str, series: &crate::ota::engine::PushSeries) -> Markup {
    let (w, h, left, bottom, top) = (600.0f64, 160.0f64, 40.0f64, 22.0f64, 8.0f64);
    let total: u64 = series.counts.iter().sum();
    let peak = series.counts.iter().copied().max().unwrap_or(0);
    let minutes = series.bucket_ms / 60_000;
    let unit = if minutes <= 1 {
        "minute".to_owned()
    } else {
        format!("{minutes} minutes")
    };
    let label = if total == 0 {
        "No device was notified yet.".to_owned()
    } else {
        format!(
            "{total} devices notified from {} over {} buckets of {unit}; at most {peak} in one {unit}, {:.0} per minute",
            hhmm(series.start_ms),
            series.counts.len(),
            series.peak_per_minute()
        )
    };
    let n = series.counts.len().max(1) as f64;
    let col = (w - left) / n;
    let plot_h = h - bottom - top;
    let end_ms = series.start_ms + series.bucket_ms * series.counts.len() as i64;
    html! {
        svg.timechart id=(id) role="img" aria-label=(label) viewBox=(format!("0 0 {w} {h}"))
            width="100%" preserveAspectRatio="xMinYMin meet" {
            title { (label) }
            line.axis x1=(left) y1=(h - bottom) x2=(w) y2=(h - bottom) {}
            line.axis x1=(left) y1=(top) x2=(left) y2=(h - bottom) {}
            text x=(left - 4.0) y=(top + 10.0) text-anchor="end" { (peak) }
            text x=(left - 4.0) y=(h - bottom) text-anchor="end" { "0" }
            @for (i, c) in series.counts.iter().enumerate() {
                @if *c > 0 {
                    @let bh = *c as f64 / peak.max(1) as f64 * plot_h;
                    rect.bar x=(format!("{:.2}", left + i as f64 * col + col * 0.1)) y=(format!("{:.2}", h - bottom - bh))
                        width=(format!("{:.2}", (col * 0.8).max(0.5))) height=(format!("{bh:.2}")) data-count=(c) {
                        title { (hhmm(series.start_ms + series.bucket_ms * i as i64)) " " (c) }
                    }
                }
            }
            @if total > 0 {
                text x=(left) y=(h - 6.0) { (hhmm(series.start_ms)) }
                text x=(w) y=(h - 6.0) text-anchor="end" { (hhmm(end_ms)) " UTC" }
            }
        }
    }
}

/// `ms` since the epoch as `HH:MM` (UTC).
fn hhmm(ms: i64) -> String {
    let t = crate::clock::civil(ms);
    format!("{:02}:{:02}", t.hour, t.minute)
}

/// Previous/next links for a paged list; `href(page)` builds a page's URL.
pub(super) fn pager(page: u32, page_size: u32, total: u64, href: impl Fn(u32) -> String) -> Markup {
    let pages = total.div_ceil(u64::from(page_size.max(1))).max(1);
    html! {
        nav.pager aria-label="Pages" {
            @if page > 1 {
                a href=(href(page - 1)) rel="prev" { "← Previous" }
            }
            span { "Page " (page) " of " (pages) " · " (total) " in all" }
            @if u64::from(page) < pages {
                a href=(href(page + 1)) rel="next" { "Next →" }
            }
        }
    }
}

/// `s` percent-encoded for a query value or path segment.
pub(super) fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// A form's submitted values, in order (repeated keys kept).
pub(super) type Fields = Vec<(String, String)>;

/// The first value of `name` in `f`, trimmed (`""` when absent).
pub(super) fn field<'a>(f: &'a Fields, name: &str) -> &'a str {
    f.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.trim())
        .unwrap_or("")
}

/// The bytes of a form's `file` field (a CSV upload), or the page that says what is wrong with
/// the form.
pub(super) async fn uploaded_file(
    session: &Session,
    mut form: Multipart,
) -> Result<Bytes, Response> {
    let mut file: Option<Bytes> = None;
    loop {
        match form.next_field().await {
            Ok(Some(field)) => {
                if field.name() == Some("file") {
                    match field.bytes().await {
                        Ok(b) => file = Some(b),
                        Err(e) => {
                            return Err(error_page(Some(session), e.status(), &e.body_text()))
                        }
                    }
                }
            }
            Ok(None) => break,
            Err(e) => return Err(error_page(Some(session), e.status(), &e.body_text())),
        }
    }
    file.ok_or_else(|| error_page(Some(session), StatusCode::BAD_REQUEST, "Choose a CSV file."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_render_in_utc() {
        assert_eq!(time(Some(0)), "1970-01-01 00:00:00 UTC");
        assert_eq!(time(Some(1_765_000_000_000)), "2025-12-06 05:46:40 UTC");
        assert_eq!(time(None), "—");
    }
}
