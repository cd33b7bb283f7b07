//! The OTA job form: the empty form, the form refilled with the API's validation error shown
//! against the field it blames, and the mapping of the form's fields to the API's `JobSpec`
//! (only the fields given, nothing checked here: the API validates).

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{html, Markup};
use serde_json::{json, Map, Value};

use crate::console::session::Session;
use crate::console::view::{self, field, Fields, Nav};
use crate::console::{Console, Sess};
use crate::registry::Page;

pub(super) async fn new_job(State(c): State<Console>, session: Sess) -> Response {
    if !session.may_operate() {
        return view::error_page(
            Some(&session),
            StatusCode::FORBIDDEN,
            "A viewer may not create jobs.",
        );
    }
    job_form(&c, &session, &Vec::new(), None, StatusCode::OK)
}

/// The job form, filled with `f`, with the API's `error` (message, blamed field) if any.
fn job_form(
    c: &Console,
    session: &Session,
    f: &Fields,
    error: Option<(String, Option<String>)>,
    status: StatusCode,
) -> Response {
    let firmware = c
        .api_state
        .firmware
        .list(None, Page::new(1, 100).unwrap_or_default());
    let v = FormView {
        f,
        blamed: error
            .as_ref()
            .and_then(|(_, field)| field.as_deref())
            .map(form_field_of),
        message: error.as_ref().map(|e| e.0.clone()),
    };
    let fw_current = field(f, "firmware_id");
    let body = html! {
        @if let Some((msg, _)) = &error {
            p.error role="alert" #form-error { "The API refused the job: " (msg) }
        }
        form.stack method="post" action="/console/ota/jobs" {
            (view::csrf(session))
            label.wide { "Firmware package"
                select name="firmware_id" id="f-firmware_id" required
                    aria-invalid=[v.err_of("firmware_id").map(|_| "true")] {
                    option value="" { "— choose —" }
                    @for p in &firmware.items {
                        option value=(p.firmware_id) selected[p.firmware_id == fw_current] {
                            (p.firmware_id) " · " (p.product_key) " · " (p.module) " " (p.version) " (" (p.status.as_str()) ")"
                        }
                    }
                }
                @if let Some(e) = v.err_of("firmware_id") { span.field-error { (e) } }
            }
            (v.input("name", "Name", "text", ""))
            (v.select("job_type", "Job type", &["UPGRADE_FIRMWARE", "VERIFY_FIRMWARE"]))
            (v.select("target", "Target", &["ALL", "SPECIFIC", "GRAY", "TAG"]))
            (v.select("selection", "Selection", &["STATIC", "DYNAMIC"]))
            label.wide { "Devices (SPECIFIC: names separated by spaces, commas or lines)"
                textarea name="device_names" id="f-device_names" rows="3"
                    aria-invalid=[v.err_of("device_names").map(|_| "true")] { (field(f, "device_names")) }
                @if let Some(e) = v.err_of("device_names") { span.field-error { (e) } }
            }
            (v.input("gray_percent", "Gray percent (GRAY)", "number", "0 < p ≤ 100"))
            (v.input("tag_key", "Tag key (TAG)", "text", ""))
            (v.input("tag_value", "Tag value (TAG)", "text", "empty: any value"))
            (v.input("src_versions", "Source versions", "text", "comma-separated; empty: the package's"))
            (v.input("rate_per_minute", "Rate, devices/minute", "number", "empty: unlimited"))
            (v.input("rate_burst", "Burst", "number", ""))
            (v.input("ramp_factor", "Ramp factor", "number", "1.1..5"))
            (v.input("ramp_every_seconds", "Ramp every seconds", "number", ""))
            (v.input("ramp_every_succeeded", "Ramp every N successes", "number", ""))
            (v.input("ramp_max_per_minute", "Ramp maximum/minute", "number", ""))
            (v.input("start_at", "Start at (UTC)", "datetime-local", "empty: now"))
            (v.input("timeout_seconds", "Timeout, seconds", "number", "per attempt"))
            (v.input("stall_seconds", "Stall timeout, seconds", "number", ""))
            (v.input("retry_count", "Retries", "number", "0..10"))
            (v.input("retry_interval_seconds", "Retry interval, seconds", "number", ""))
            (v.input("abort_min_finished", "Abort after N finished", "number", ""))
            (v.input("abort_failure_percent", "…when failures reach %", "number", ""))
            (v.select("abort_action", "Abort action", &["CANCEL", "PAUSE"]))
            (v.check("need_confirm", "Tasks wait for confirmation"))
            (v.check("overwrite", "Overwrite other jobs' unfinished tasks"))
            (v.check("force", "Allow an unverified package"))
            div.wide { button type="submit" { "Create job" } }
        }
    };
    view::respond(
        status,
        view::page("New OTA job", Nav::Ota, Some(session), body),
    )
}

/// The job form's fields, filled with the given values, each with the API's error when it
/// blames that field.
struct FormView<'a> {
    f: &'a Fields,
    /// The form field the API's error is about.
    blamed: Option<String>,
    message: Option<String>,
}

impl FormView<'_> {
    /// The API's message when it blames form field `name`.
    fn err_of(&self, name: &str) -> Option<String> {
        (self.blamed.as_deref() == Some(name)).then(|| self.message.clone().unwrap_or_default())
    }

    fn input(&self, name: &str, label: &str, kind: &str, hint: &str) -> Markup {
        let e = self.err_of(name);
        html! {
            label {
                (label)
                input type=(kind) name=(name) id=(format!("f-{name}")) value=(field(self.f, name))
                    aria-invalid=[e.as_ref().map(|_| "true")]
                    aria-describedby=[e.as_ref().map(|_| format!("e-{name}"))]
                    step=[(kind == "number").then_some("any")];
                @if !hint.is_empty() { span.small { (hint) } }
                @if let Some(e) = e { span.field-error id=(format!("e-{name}")) { (e) } }
            }
        }
    }

    fn select(&self, name: &str, label: &str, options: &[&str]) -> Markup {
        let current = field(self.f, name);
        html! {
            label { (label)
                select name=(name) id=(format!("f-{name}")) {
                    @for o in options { option value=(o) selected[*o == current] { (o) } }
                }
            }
        }
    }

    fn check(&self, name: &str, label: &str) -> Markup {
        html! { label.check { input type="checkbox" name=(name) value="true" checked[field(self.f, name) == "true"]; " " (label) } }
    }
}

/// The form field showing an error the API reported against `api_field`.
fn form_field_of(api_field: &str) -> String {
    let f = api_field.split('[').next().unwrap_or(api_field);
    match f {
        "start_at_ms" => "start_at".into(),
        "target_tags" => "tag_key".into(),
        "rate" => "rate_per_minute".into(),
        "abort" => "abort_min_finished".into(),
        other => other
            .replace("rate.ramp.", "ramp_")
            .replace("rate.", "rate_")
            .replace("abort.", "abort_"),
    }
}

/// A number as JSON when it parses; otherwise the text itself, so the API's own validation
/// names the field.
fn number(v: &str) -> Value {
    if let Ok(i) = v.parse::<i64>() {
        return json!(i);
    }
    match v.parse::<f64>() {
        Ok(x) if x.is_finite() => json!(x),
        _ => json!(v),
    }
}

/// `YYYY-MM-DDTHH:MM[:SS]` (UTC) as ms since the epoch.
fn datetime_ms(s: &str) -> Option<i64> {
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.splitn(3, ':').map(|x| x.parse::<i64>().ok());
    let (hh, mm) = (t.next()??, t.next()??);
    let ss = t.next().flatten().unwrap_or(0);
    if !(1..=12).contains(&m) || !(1..=31).contains(&day) || hh > 23 || mm > 59 || ss > 59 {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400) + hh * 3600 + mm * 60 + ss) * 1000)
}

/// The API's `JobSpec` JSON from the form: only the fields given, nothing checked here.
fn spec_json(f: &Fields) -> Value {
    let mut spec = Map::new();
    let text = |spec: &mut Map<String, Value>, name: &str| {
        let v = field(f, name);
        if !v.is_empty() {
            spec.insert(name.into(), json!(v));
        }
    };
    for name in ["firmware_id", "job_type", "target", "selection", "name"] {
        text(&mut spec, name);
    }
    for name in [
        "gray_percent",
        "timeout_seconds",
        "stall_seconds",
        "retry_count",
        "retry_interval_seconds",
    ] {
        let v = field(f, name);
        if !v.is_empty() {
            spec.insert(name.into(), number(v));
        }
    }
    let names: Vec<&str> = field(f, "device_names")
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|s| !s.is_empty())
        .collect();
    if !names.is_empty() {
        spec.insert("device_names".into(), json!(names));
    }
    if !field(f, "tag_key").is_empty() {
        let value = Some(field(f, "tag_value")).filter(|v| !v.is_empty());
        spec.insert(
            "target_tags".into(),
            json!([{"key": field(f, "tag_key"), "value": value}]),
        );
    }
    let src = field(f, "src_versions");
    if !src.is_empty() {
        let list: Vec<&str> = src
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        spec.insert("src_versions".into(), json!(list));
    }
    if !field(f, "rate_per_minute").is_empty() {
        let mut rate = Map::new();
        rate.insert("per_minute".into(), number(field(f, "rate_per_minute")));
        if !field(f, "rate_burst").is_empty() {
            rate.insert("burst".into(), number(field(f, "rate_burst")));
        }
        if !field(f, "ramp_factor").is_empty() {
            let mut ramp = Map::new();
            ramp.insert("factor".into(), number(field(f, "ramp_factor")));
            for (form, api) in [
                ("ramp_every_seconds", "every_seconds"),
                ("ramp_every_succeeded", "every_succeeded"),
                ("ramp_max_per_minute", "max_per_minute"),
            ] {
                if !field(f, form).is_empty() {
                    ramp.insert(api.into(), number(field(f, form)));
                }
            }
            rate.insert("ramp".into(), Value::Object(ramp));
        }
        spec.insert("rate".into(), Value::Object(rate));
    }
    let start = field(f, "start_at");
    if !start.is_empty() {
        spec.insert(
            "start_at_ms".into(),
            datetime_ms(start).map_or_else(|| json!(start), |ms| json!(ms)),
        );
    }
    if !field(f, "abort_min_finished").is_empty() || !field(f, "abort_failure_percent").is_empty() {
        spec.insert(
            "abort".into(),
            json!({
                "min_finished": number(field(f, "abort_min_finished")),
                "failure_percent": number(field(f, "abort_failure_percent")),
                "action": field(f, "abort_action"),
            }),
        );
    }
    for name in ["need_confirm", "overwrite", "force"] {
        if field(f, name) == "true" {
            spec.insert(name.into(), json!(true));
        }
    }
    Value::Object(spec)
}

pub(super) async fn create(State(c): State<Console>, session: Sess, body: Bytes) -> Response {
    let f: Fields = form_urlencoded::parse(&body)
        .filter(|(k, _)| k != "csrf")
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let answer = c
        .api
        .json(&session, Method::POST, "/api/v1/ota/jobs", &spec_json(&f))
        .await;
    if answer.ok() {
        let jid = answer.body["job_id"].as_str().unwrap_or_default();
        return Redirect::to(&format!("/console/ota/jobs/{jid}")).into_response();
    }
    let err = (answer.error_msg(), answer.error_field().map(str::to_owned));
    job_form(&c, &session, &f, Some(err), answer.status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_form_becomes_the_api_spec() {
        let f: Fields = [
            ("firmware_id", "fw-1"),
            ("target", "SPECIFIC"),
            ("device_names", "a1b2, c3d4\ne5f6"),
            ("rate_per_minute", "60"),
            ("ramp_factor", "2"),
            ("retry_count", "x"),
            ("start_at", "2026-12-06T16:20"),
            ("force", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let spec = spec_json(&f);
        assert_eq!(spec["device_names"], json!(["a1b2", "c3d4", "e5f6"]));
        assert_eq!(spec["rate"]["per_minute"], json!(60));
        assert_eq!(spec["rate"]["ramp"]["factor"], json!(2));
        assert_eq!(
            spec["retry_count"],
            json!("x"),
            "left for the API to refuse"
        );
        assert_eq!(spec["start_at_ms"], json!(1_796_574_000_000i64));
        assert_eq!(spec["force"], json!(true));
        assert!(spec.get("need_confirm").is_none());
    }

    #[test]
    fn api_fields_map_to_form_fields() {
        assert_eq!(form_field_of("rate.per_minute"), "rate_per_minute");
        assert_eq!(form_field_of("rate.ramp.factor"), "ramp_factor");
        assert_eq!(
            form_field_of("abort.failure_percent"),
            "abort_failure_percent"
        );
        assert_eq!(form_field_of("device_names[3]"), "device_names");
        assert_eq!(form_field_of("start_at_ms"), "start_at");
    }
}
