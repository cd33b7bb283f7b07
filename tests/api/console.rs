//! The operator console (`/console`): sessions, CSRF and roles over plain HTTP, and whole
//! operator journeys in a real Chromium driven through WebDriver (chromedriver), against the
//! in-process gateway with rumqttc devices.
//!
//! The browser tests need Debian's `chromium` and `chromium-driver`; without them they fail,
//! saying how to install them (as every service-backed test does). With `FLEETGATE_CONSOLE_SCREENSHOTS=1` they save a
//! screenshot of each screen under `docs/console/`.

use crate::helpers::*;
use fantoccini::{Client, ClientBuilder, Locator};
use rumqttc::{Packet, QoS};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

// ---------------------------------------------------------------------------------------------
// Plain HTTP: sessions, CSRF, roles.

/// A cookie-less HTTP client that does not follow redirects (we look at them).
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Logs in with `token`; returns the `name=value` cookie.
async fn login(t: &TestApp, token: &str) -> String {
    let resp = client()
        .post(t.url("/console/login"))
        .form(&[("token", token)])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303, "login redirects to the dashboard");
    let set = resp
        .headers()
        .get("set-cookie")
        .expect("a session cookie")
        .to_str()
        .unwrap()
        .to_owned();
    assert!(set.contains("HttpOnly"), "{set}");
    assert!(set.contains("SameSite=Strict"), "{set}");
    set.split(';').next().unwrap().to_owned()
}

async fn page(t: &TestApp, cookie: &str, path: &str) -> (u16, String) {
    let resp = client()
        .get(t.url(path))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

/// The CSRF token of a page's forms.
fn csrf_of(html: &str) -> String {
    let at = html
        .find("name=\"csrf\" value=\"")
        .expect("a form with a CSRF field");
    let rest = &html[at + "name=\"csrf\" value=\"".len()..];
    rest[..rest.find('"').unwrap()].to_owned()
}

async fn post_form(t: &TestApp, cookie: &str, path: &str, form: &[(&str, &str)]) -> (u16, String) {
    let resp = client()
        .post(t.url(path))
        .header("cookie", cookie)
        .form(form)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

async fn firmware(t: &TestApp, pk: &str, version: &str) -> String {
    let form = reqwest::multipart::Form::new()
        .text("product_key", pk.to_owned())
        .text("version", version.to_owned())
        .part(
            "file",
            reqwest::multipart::Part::bytes(format!("image {version}").into_bytes())
                .file_name("fw.bin"),
        );
    let resp = t
        .http
        .post(t.url("/api/v1/firmware"))
        .bearer_auth(ADMIN_TOKEN)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let v: Value = resp.json().await.unwrap();
    v["firmware_id"].as_str().unwrap().to_owned()
}

/// A job for `pk` whose tasks wait in CONFIRM (nothing moves until confirmed).
async fn held_job(t: &TestApp, pk: &str) -> String {
    t.create_device(pk, "held-dev-1").await;
    let fid = firmware(t, pk, "9.0.0").await;
    let (status, job) = t
        .post(
            "/api/v1/ota/jobs",
            json!({"firmware_id": fid, "target": "ALL", "force": true, "need_confirm": true}),
        )
        .await;
    assert_eq!(status, 201, "{job}");
    job["job_id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn pages_need_a_session_and_a_bad_token_gets_none() {
    let t = spawn_app().await;
    let (status, _) = page(&t, "", "/console").await;
    assert_eq!(status, 303, "no session: to the login page");
    let resp = client().get(t.url("/")).send().await.unwrap();
    assert_eq!(resp.headers()["location"], "/console");

    let resp = client()
        .post(t.url("/console/login"))
        .form(&[("token", "not-a-token")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert!(resp.headers().get("set-cookie").is_none());

    let cookie = login(&t, OPERATOR_TOKEN).await;
    let (status, html) = page(&t, &cookie, "/console").await;
    assert_eq!(status, 200);
    assert!(
        html.contains("Dashboard") && html.contains("operator"),
        "{html}"
    );

    // Forwarding: the instance's consumer groups, read through the API.
    let (status, group) = t
        .post(
            "/api/v1/instances/default/consumer-groups",
            json!({"group_id": "console-group", "name": "analytics"}),
        )
        .await;
    assert_eq!(status, 201, "{group}");
    let (status, fwd) = page(&t, &cookie, "/console/forwarding").await;
    assert_eq!(status, 200);
    assert!(
        fwd.contains("data-group=\"console-group\"") && fwd.contains("analytics"),
        "{fwd}"
    );

    // Logout ends the session on the server, not just in the browser.
    let csrf = csrf_of(&html);
    let (status, _) = post_form(&t, &cookie, "/console/logout", &[("csrf", &csrf)]).await;
    assert_eq!(status, 303);
    let (status, _) = page(&t, &cookie, "/console").await;
    assert_eq!(status, 303, "the old cookie no longer opens a page");
}

#[tokio::test]
async fn a_post_without_the_csrf_token_is_refused_and_changes_nothing() {
    let t = spawn_app().await;
    let pk = t.create_product("csrf").await;
    let jid = held_job(&t, &pk).await;
    let cookie = login(&t, OPERATOR_TOKEN).await;
    let (_, html) = page(&t, &cookie, &format!("/console/ota/jobs/{jid}")).await;
    let csrf = csrf_of(&html);
    let path = format!("/console/ota/jobs/{jid}/pause");

    let (status, body) = post_form(&t, &cookie, &path, &[]).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("CSRF"), "{body}");
    let (status, _) = post_form(&t, &cookie, &path, &[("csrf", "0000")]).await;
    assert_eq!(status, 403);
    // Another session's token does not do either.
    let other = login(&t, OPERATOR_TOKEN).await;
    let (_, other_html) = page(&t, &other, "/console").await;
    let (status, _) = post_form(&t, &cookie, &path, &[("csrf", &csrf_of(&other_html))]).await;
    assert_eq!(status, 403);
    // A cross-site form (Origin of another host) is refused even with the token.
    let resp = client()
        .post(t.url(&path))
        .header("cookie", &cookie)
        .header("origin", "http://evil.example")
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let (_, job) = t.get(&format!("/api/v1/ota/jobs/{jid}")).await;
    assert_eq!(job["status"], "IN_PROGRESS", "nothing was paused: {job}");

    let (status, _) = post_form(&t, &cookie, &path, &[("csrf", &csrf)]).await;
    assert_eq!(status, 303, "with its token the same form works");
    let (_, job) = t.get(&format!("/api/v1/ota/jobs/{jid}")).await;
    assert_eq!(job["status"], "PAUSED", "{job}");
}

#[tokio::test]
async fn a_viewer_sees_no_controls_and_a_forged_post_is_refused() {
    let t = spawn_app().await;
    let pk = t.create_product("viewer").await;
    let jid = held_job(&t, &pk).await;
    let cookie = login(&t, VIEWER_TOKEN).await;

    let (status, html) = page(&t, &cookie, &format!("/console/ota/jobs/{jid}")).await;
    assert_eq!(status, 200);
    assert!(html.contains("id=\"job-bar\""), "the viewer sees the job");
    assert!(
        !html.contains("data-action=\"pause\""),
        "no pause button for a viewer"
    );
    assert!(
        !html.contains("data-action=\"cancel\""),
        "no cancel button for a viewer"
    );
    let (_, html) = page(&t, &cookie, &format!("/console/products/{pk}")).await;
    assert!(!html.contains("New device") && !html.contains("Show product secret"));
    let (_, html) = page(
        &t,
        &cookie,
        &format!("/console/products/{pk}/devices/held-dev-1"),
    )
    .await;
    assert!(!html.contains("Show secret"));
    let (status, _) = page(&t, &cookie, "/console/ota/new").await;
    assert_eq!(status, 403);

    // The forged form: a valid session and CSRF token, but a viewer's.
    let csrf = csrf_of(&html);
    for (path, form) in [
        (
            format!("/console/ota/jobs/{jid}/cancel"),
            vec![("csrf", csrf.as_str())],
        ),
        (
            format!("/console/products/{pk}/devices/held-dev-1/secret"),
            vec![("csrf", csrf.as_str())],
        ),
        (
            format!("/console/products/{pk}/devices/held-dev-1/delete"),
            vec![("csrf", csrf.as_str())],
        ),
        (
            "/console/products".to_owned(),
            vec![("csrf", csrf.as_str()), ("name", "x")],
        ),
    ] {
        let (status, body) = post_form(&t, &cookie, &path, &form).await;
        assert_eq!(status, 403, "{path}: {body}");
        assert!(!body.contains("secret\" id"), "no secret leaks");
    }
    let (_, job) = t.get(&format!("/api/v1/ota/jobs/{jid}")).await;
    assert_eq!(job["status"], "IN_PROGRESS", "{job}");
    t.device(&pk, "held-dev-1").await;
    // Logging out is the one post a viewer may make.
    let (status, body) = post_form(&t, &cookie, "/console/logout", &[("csrf", &csrf)]).await;
    assert_eq!(status, 303, "{body}");
    assert_eq!(page(&t, &cookie, "/console").await.0, 303, "logged out");

    // An operator may read a device secret (on request) but not a product secret (admin).
    let op = login(&t, OPERATOR_TOKEN).await;
    let (_, html) = page(
        &t,
        &op,
        &format!("/console/products/{pk}/devices/held-dev-1"),
    )
    .await;
    let csrf = csrf_of(&html);
    let (status, html) = post_form(
        &t,
        &op,
        &format!("/console/products/{pk}/devices/held-dev-1/secret"),
        &[("csrf", &csrf)],
    )
    .await;
    assert_eq!(status, 200);
    let secret = t.device_secret(&pk, "held-dev-1").await;
    assert!(
        html.contains(&secret),
        "the operator asked for the device secret"
    );
    let (status, html) = post_form(
        &t,
        &op,
        &format!("/console/products/{pk}/secret"),
        &[("csrf", &csrf)],
    )
    .await;
    assert_eq!(
        status, 403,
        "the API refuses an operator the product secret: {html}"
    );
    assert!(!html.contains(&t.product_secret(&pk).await));
}

#[tokio::test]
async fn the_job_form_shows_the_apis_validation_error_on_the_field() {
    let t = spawn_app().await;
    let pk = t.create_product("form").await;
    t.create_device(&pk, "form-dev-1").await;
    let fid = firmware(&t, &pk, "2.0.0").await;
    let cookie = login(&t, OPERATOR_TOKEN).await;
    let (_, html) = page(&t, &cookie, "/console/ota/new").await;
    let csrf = csrf_of(&html);
    let (status, html) = post_form(
        &t,
        &cookie,
        "/console/ota/jobs",
        &[
            ("csrf", &csrf),
            ("firmware_id", &fid),
            ("target", "ALL"),
            ("force", "true"),
            ("retry_count", "99"),
        ],
    )
    .await;
    assert_eq!(status, 400, "{html}");
    assert!(html.contains("id=\"form-error\""), "{html}");
    assert!(
        html.contains("retry_count"),
        "the API's message names the field"
    );
    let field = html.find("id=\"f-retry_count\"").expect("the field");
    let tag_start = html[..field].rfind('<').unwrap();
    let tag = &html[tag_start..tag_start + html[tag_start..].find('>').unwrap()];
    assert!(tag.contains("aria-invalid=\"true\""), "{tag}");
    assert!(
        tag.contains("value=\"99\""),
        "the operator's input is kept: {tag}"
    );
    let (_, jobs) = t.get("/api/v1/ota/jobs").await;
    assert_eq!(jobs["total"], 0, "nothing was created");
}

// ---------------------------------------------------------------------------------------------
// A real browser.

/// chromedriver on an ephemeral port with a Chromium of a fresh profile; killed on drop.
struct Browser {
    client: Client,
    driver: tokio::process::Child,
    _profile: tempfile::TempDir,
}

fn executable(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

impl Browser {
    /// Panics when chromedriver or chromium is missing.
    async fn start() -> Browser {
        // fantoccini's rustls needs a process-wide crypto provider; ring is the one we build.
        let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
        let (Some(driver), Some(chromium)) = (
            executable("chromedriver"),
            executable("chromium").or_else(|| executable("chromium-browser")),
        ) else {
            panic!(
                "the console's browser tests need Debian's chromium and chromedriver: \
                 apt-get install chromium chromium-driver"
            );
        };
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let driver = tokio::process::Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("chromedriver starts");
        let profile = tempfile::tempdir().unwrap();
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": chromium,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                    "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1280,1000",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            }),
        );
        let url = format!("http://127.0.0.1:{port}");
        let deadline = tokio::time::Instant::now() + WAIT;
        let client = loop {
            match ClientBuilder::rustls()
                .unwrap()
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                Ok(c) => break c,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("no WebDriver session: {e}"),
            }
        };
        Browser {
            client,
            driver,
            _profile: profile,
        }
    }

    async fn goto(&self, url: &str) {
        self.client.goto(url).await.unwrap();
    }

    async fn css(&self, sel: &str) -> fantoccini::elements::Element {
        self.client
            .wait()
            .at_most(WAIT)
            .for_element(Locator::Css(sel))
            .await
            .unwrap_or_else(|e| panic!("no {sel}: {e}"))
    }

    async fn fill(&self, sel: &str, text: &str) {
        let e = self.css(sel).await;
        e.clear().await.unwrap_or_else(|err| panic!("{sel}: {err}"));
        e.send_keys(text)
            .await
            .unwrap_or_else(|err| panic!("{sel}: {err}"));
    }

    async fn click(&self, sel: &str) {
        self.css(sel)
            .await
            .click()
            .await
            .unwrap_or_else(|err| panic!("{sel}: {err}"));
    }

    /// `sel`'s text; found again when htmx replaced it between the find and the read.
    async fn text(&self, sel: &str) -> String {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match self.css(sel).await.text().await {
                Ok(text) => return text,
                Err(e) if tokio::time::Instant::now() > deadline => panic!("{sel}: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    async fn has(&self, sel: &str) -> bool {
        !self
            .client
            .find_all(Locator::Css(sel))
            .await
            .unwrap()
            .is_empty()
    }

    /// Polls `sel`'s text until `pred` holds (the page updates itself; nothing reloads it).
    async fn wait_text(&self, sel: &str, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + WAIT * 3;
        loop {
            let text = match self.client.find(Locator::Css(sel)).await {
                Ok(e) => e.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            if pred(&text) {
                return text;
            }
            if tokio::time::Instant::now() > deadline {
                let src = self.client.source().await.unwrap_or_default();
                panic!("{sel} never showed {what} (last {text:?}); page:\n{src}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Saves the page as `docs/console/{name}.png` when `FLEETGATE_CONSOLE_SCREENSHOTS` is set.
    async fn shot(&self, name: &str) {
        if std::env::var_os("FLEETGATE_CONSOLE_SCREENSHOTS").is_none() {
            return;
        }
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/console");
        std::fs::create_dir_all(&dir).unwrap();
        let png = self.client.screenshot().await.unwrap();
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }

    async fn close(mut self) {
        let _ = self.client.close().await;
        let _ = self.driver.kill().await;
    }
}

/// A device that takes upgrades: subscribes, reports 1.0.0, then follows `script`.
struct OtaDevice {
    dev: Device,
    pk: String,
    dn: String,
}

impl OtaDevice {
    async fn connect(t: &TestApp, pk: &str, dn: &str, secret: &str) -> OtaDevice {
        let mut dev = connect(t.mqtt_addr(), &credentials(pk, dn, secret)).await;
        dev.client
            .subscribe(format!("/ota/device/upgrade/{pk}/{dn}"), QoS::AtLeastOnce)
            .await
            .unwrap();
        dev.wait_packet("SUBACK", |p| matches!(p, Packet::SubAck(_)))
            .await;
        let mut d = OtaDevice {
            dev,
            pk: pk.into(),
            dn: dn.into(),
        };
        d.send("inform", json!({"version": "1.0.0"})).await;
        d
    }

    async fn send(&mut self, kind: &str, params: Value) {
        let topic = format!("/ota/device/{kind}/{}/{}", self.pk, self.dn);
        self.dev
            .client
            .publish(
                topic,
                QoS::AtLeastOnce,
                false,
                json!({"id": "1", "params": params}).to_string(),
            )
            .await
            .unwrap();
        self.dev
            .wait_packet("PUBACK", |p| matches!(p, Packet::PubAck(_)))
            .await;
    }

    /// Waits for the upgrade push, then succeeds (reports `version`) or fails with `code`.
    async fn upgrade(&mut self, outcome: Result<&str, i32>) {
        let p = self.dev.next_publish().await;
        assert!(p.topic.starts_with("/ota/device/upgrade/"), "{}", p.topic);
        self.send("progress", json!({"step": "30", "desc": "downloading"}))
            .await;
        match outcome {
            Ok(version) => self.send("inform", json!({"version": version})).await,
            Err(code) => {
                self.send(
                    "progress",
                    json!({"step": code.to_string(), "desc": "failed"}),
                )
                .await
            }
        }
    }
}

#[tokio::test]
async fn an_operator_runs_a_rollout_in_a_real_browser() {
    let b = Browser::start().await;
    let t = spawn_app().await;

    // Log in: `/` leads to the login page; the admin token opens a session.
    b.goto(&t.url("/")).await;
    b.css("#token").await;
    b.shot("login").await;
    b.fill("#token", "wrong-token").await;
    b.click("form.login button").await;
    b.wait_text("p.error", "the refusal", |t| t.contains("not known"))
        .await;
    b.fill("#token", ADMIN_TOKEN).await;
    b.click("form.login button").await;
    b.wait_text("h1", "the dashboard", |t| t == "Dashboard")
        .await;

    // A product, two devices by hand and two from a CSV file.
    b.goto(&t.url("/console/products")).await;
    b.fill("input[name=name]", "Meters").await;
    b.click("form[action='/console/products'] button").await;
    b.wait_text("h1", "the product page", |t| t == "Product Meters")
        .await;
    let pk = b.css("dl.props dd code").await.text().await.unwrap();
    let mut secrets = Vec::new();
    for dn in ["meter-0001", "meter-0002"] {
        b.fill("input[name=device_name]", dn).await;
        b.click("form[action$='/devices'] button").await;
        b.wait_text("p.notice", "the new device", |t| t.contains(dn))
            .await;
        let secret = b.text("#secret").await;
        assert_eq!(
            secret,
            t.device_secret(&pk, dn).await,
            "the secret shown once"
        );
        secrets.push((dn.to_owned(), secret));
    }
    let csv = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(csv.path(), "DeviceName\nmeter-0003\nmeter-0004\nbad name\n").unwrap();
    b.css("input[type=file][name=file]")
        .await
        .send_keys(&csv.path().display().to_string())
        .await
        .unwrap();
    b.click("form[action*='/devices/import'] button").await;
    b.wait_text("#import-results", "per-row results", |t| {
        t.contains("2 created, 1 failed") && t.contains("bad name")
    })
    .await;
    b.shot("product").await;
    for dn in ["meter-0003", "meter-0004"] {
        secrets.push((dn.to_owned(), t.device_secret(&pk, dn).await));
    }

    // Devices come online at 1.0.0.
    let mut devices = Vec::new();
    for (dn, secret) in &secrets {
        devices.push(OtaDevice::connect(&t, &pk, dn, secret).await);
    }
    t.wait_device(&pk, "meter-0004", "version 1.0.0", |d| {
        d["versions"]["default"] == "1.0.0"
    })
    .await;

    // Upload firmware 2.0.0 through the form.
    let image = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(image.path(), b"firmware image 2.0.0").unwrap();
    b.goto(&t.url("/console/firmware")).await;
    b.css("select[name=product_key]")
        .await
        .select_by_value(&pk)
        .await
        .unwrap();
    b.fill("input[name=version]", "2.0.0").await;
    b.css("input[type=file][name=file]")
        .await
        .send_keys(&image.path().display().to_string())
        .await
        .unwrap();
    b.click("form[enctype='multipart/form-data'] button").await;
    let row = b
        .wait_text("#firmware tbody tr", "the package", |t| t.contains("2.0.0"))
        .await;
    assert!(row.contains("UNVERIFIED"), "{row}");
    b.shot("firmware").await;
    let fid = row.split_whitespace().next().unwrap().to_owned();

    // The job form: the API's refusal is shown on the form, then the job is created.
    b.goto(&t.url("/console/ota/new")).await;
    b.css("select[name=firmware_id]")
        .await
        .select_by_value(&fid)
        .await
        .unwrap();
    b.fill("#f-name", "meters to 2.0.0").await;
    b.click("form.stack button[type=submit]").await;
    b.wait_text("#form-error", "the refusal", |t| t.contains("VERIFIED"))
        .await;
    b.shot("job-form-error").await;
    b.click("input[name=force]").await;
    b.click("form.stack button[type=submit]").await;
    b.wait_text("#job-status", "the running job", |t| t == "IN_PROGRESS")
        .await;
    let job_url = b.client.current_url().await.unwrap().to_string();
    let jid = job_url.rsplit('/').next().unwrap().to_owned();

    // Mark the document: the bar must move without a reload.
    b.client
        .execute("window.fleetgateMarker = 42; return true;", vec![])
        .await
        .unwrap();
    let mut outcomes = devices.into_iter();
    let mut handles = Vec::new();
    for (i, mut d) in outcomes.by_ref().enumerate() {
        let outcome = match i {
            0 | 1 => Ok("2.0.0"),
            2 => Err(-2),
            _ => Err(-4),
        };
        handles.push(tokio::spawn(async move {
            d.upgrade(outcome).await;
            d
        }));
    }
    let mut devices = Vec::new();
    for h in handles {
        devices.push(h.await.unwrap());
    }
    b.wait_text("li[data-status=SUCCEEDED] .count", "2 succeeded", |t| {
        t == "2"
    })
    .await;
    b.wait_text("li[data-status=FAILED] .count", "2 failed", |t| t == "2")
        .await;
    assert_eq!(b.text("tr[data-reason=DOWNLOAD_FAILED] .count").await, "1");
    assert_eq!(b.text("tr[data-reason=WRITE_FAILED] .count").await, "1");
    b.wait_text("#job-status", "the finished job", |t| t == "COMPLETED")
        .await;
    assert_eq!(b.text("#success-rate").await, "50.0%");
    let marker = b
        .client
        .execute("return window.fleetgateMarker || 0;", vec![])
        .await
        .unwrap();
    assert_eq!(
        marker,
        json!(42),
        "the page updated in place, it was not reloaded"
    );
    // The push chart: every device was notified once, within a minute or two.
    b.wait_text("#push-chart", "the push chart", |_| true).await;
    let pushed = b
        .client
        .execute(
            "return [...document.querySelectorAll('#push-chart rect.bar')]\
             .reduce((n, r) => n + Number(r.dataset.count), 0);",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(pushed, json!(4), "4 devices notified in the chart");
    let label = b.css("#push-chart").await.attr("aria-label").await.unwrap();
    assert!(
        label.unwrap_or_default().starts_with("4 devices notified"),
        "the chart's text alternative"
    );
    // The per-device table is paged and rendered with the page (only the bar is live).
    b.client.refresh().await.unwrap();
    let failed_row = b.text("tr[data-device=meter-0003]").await;
    assert!(failed_row.contains("DOWNLOAD_FAILED (-2)"), "{failed_row}");
    b.shot("job").await;
    b.client
        .execute(
            "document.getElementById('push-rate').scrollIntoView(); return true;",
            vec![],
        )
        .await
        .unwrap();
    b.shot("job-push-rate").await;
    let (_, job) = t.get(&format!("/api/v1/ota/jobs/{jid}")).await;
    assert_eq!(job["counters"]["succeeded"], 2, "{job}");

    // Device detail: versions and the OTA timeline.
    b.goto(&t.url(&format!("/console/products/{pk}/devices/meter-0001")))
        .await;
    b.wait_text("dl.props", "the new version", |t| {
        t.contains("default=2.0.0")
    })
    .await;
    b.shot("device").await;

    // Pause and cancel a job whose tasks wait for confirmation.
    let (status, fw3) = t
        .request(
            reqwest::Method::GET,
            "/api/v1/firmware",
            None,
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(status, 200, "{fw3}");
    let fid3 = firmware(&t, &pk, "3.0.0").await;
    let (status, job2) = t
        .post(
            "/api/v1/ota/jobs",
            json!({"firmware_id": fid3, "target": "ALL", "force": true, "need_confirm": true,
                   "name": "held rollout"}),
        )
        .await;
    assert_eq!(status, 201, "{job2}");
    let jid2 = job2["job_id"].as_str().unwrap();
    b.goto(&t.url(&format!("/console/ota/jobs/{jid2}"))).await;
    b.click("button[data-action=pause]").await;
    b.wait_text("#job-status", "paused", |t| t == "PAUSED")
        .await;
    b.click("button[data-action=cancel]").await;
    b.wait_text("#job-status", "canceled", |t| t == "CANCELED")
        .await;
    assert!(
        !b.has("button[data-action=pause]").await,
        "no controls on a finished job"
    );

    // The dashboard: counts and the version chart.
    b.goto(&t.url("/console")).await;
    assert_eq!(b.text("#devices-total").await, "4");
    b.wait_text("#devices-online", "4 online", |t| t == "4")
        .await;
    let chart = b.css("svg.chart").await.html(false).await.unwrap();
    assert!(
        chart.contains("2.0.0") && chart.contains("1.0.0"),
        "{chart}"
    );
    b.shot("dashboard").await;
    // The dashboard follows the fleet without a reload.
    b.client
        .execute("window.fleetgateMarker = 7; return true;", vec![])
        .await
        .unwrap();
    t.create_device(&pk, "meter-0005").await;
    b.wait_text("#devices-total", "5 devices", |t| t == "5")
        .await;
    assert_eq!(
        b.client
            .execute("return window.fleetgateMarker || 0;", vec![])
            .await
            .unwrap(),
        json!(7),
        "the dashboard updated in place"
    );

    // Export the product (its devices and firmware) with a passphrase, then import the
    // package back: everything is already here.
    b.goto(&t.url("/console/export")).await;
    b.click(&format!("input[name=product][value='{pk}']")).await;
    b.fill("#x-name", "meters backup").await;
    b.fill("#x-secrets_key", "correct horse battery staple")
        .await;
    b.click("form[action='/console/export'] button[type=submit]")
        .await;
    b.wait_text("#job-state", "the finished export", |t| t == "SUCCESSFUL")
        .await;
    b.css("#download").await;
    b.shot("export").await;
    let export_id = b
        .client
        .current_url()
        .await
        .unwrap()
        .path()
        .rsplit('/')
        .next()
        .unwrap()
        .to_owned();
    let package = t
        .http
        .get(t.url(&format!("/api/v1/export/{export_id}/package")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let zip = tempfile::Builder::new().suffix(".zip").tempfile().unwrap();
    std::fs::write(zip.path(), &package).unwrap();
    b.goto(&t.url("/console/export")).await;
    b.css("#i-package")
        .await
        .send_keys(&zip.path().display().to_string())
        .await
        .unwrap();
    b.fill("#i-secrets_key", "correct horse battery staple")
        .await;
    b.click("form[action^='/console/import'] button[type=submit]")
        .await;
    b.wait_text("#job-state", "the finished import", |t| t == "SUCCESSFUL")
        .await;
    let summary = b.text("#import-summary").await;
    assert!(
        summary.starts_with("0 created") && summary.ends_with("0 failed"),
        "{summary}"
    );
    b.shot("import").await;
    b.goto(&t.url("/console/export")).await;
    assert!(b.has(&format!("#exports tr[data-job='{export_id}']")).await);
    assert!(b.has("#imports tr[data-job]").await);

    // A canary migration to another instance, rolled back.
    let (status, body) = t
        .post(
            "/api/v1/instances",
            json!({"instance_id": "iot-target", "name": "Target"}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    b.goto(&t.url("/console/migrations")).await;
    b.css("select[name=product_key]")
        .await
        .select_by_value(&pk)
        .await
        .unwrap();
    b.css("select[name=target_instance_id]")
        .await
        .select_by_value("iot-target")
        .await
        .unwrap();
    b.fill(
        "form[action='/console/migrations'] input[name=name]",
        "meters to target",
    )
    .await;
    b.click("form[action='/console/migrations'] button").await;
    b.wait_text("#migration-state", "a new task", |t| {
        t.starts_with("TO_MIGRATE")
    })
    .await;
    // The canary from a CSV file: per-row results, then the page follows the task by itself.
    let csv = tempfile::Builder::new().suffix(".csv").tempfile().unwrap();
    std::fs::write(csv.path(), "DeviceName\nmeter-0001\nnot-a-meter\n").unwrap();
    b.css("form[action*='/canary-csv'] input[type=file]")
        .await
        .send_keys(&csv.path().display().to_string())
        .await
        .unwrap();
    b.click("form[action*='/canary-csv'] button").await;
    b.wait_text("#selection-results", "per-row results", |t| {
        t.contains("1 accepted, 1 refused") && t.contains("not-a-meter")
    })
    .await;
    b.wait_text("#migration-state", "the canary done", |t| {
        t.starts_with("CANARY_COMPLETED")
    })
    .await;
    assert_eq!(
        t.device(&pk, "meter-0001").await["instance_id"],
        "iot-target"
    );
    b.shot("migration").await;
    // A change made elsewhere (here: the API) shows up without a reload.
    b.client
        .execute("window.fleetgateMarker = 9; return true;", vec![])
        .await
        .unwrap();
    let tid = b
        .css("form[action$='/rollback']")
        .await
        .attr("action")
        .await
        .unwrap()
        .unwrap()
        .trim_start_matches("/console/migrations/")
        .trim_end_matches("/rollback")
        .to_owned();
    let (status, body) = t
        .post(
            &format!("/api/v1/migrations/{tid}/data-sync"),
            json!({"enabled": true}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    b.wait_text("#data-sync", "data sync on", |t| t.starts_with("on"))
        .await;
    assert_eq!(
        b.client
            .execute("return window.fleetgateMarker || 0;", vec![])
            .await
            .unwrap(),
        json!(9),
        "the migration page updated in place"
    );
    let (status, body) = t
        .post(
            &format!("/api/v1/migrations/{tid}/data-sync"),
            json!({"enabled": false}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    b.click("form[action$='/rollback'] button").await;
    b.wait_text("#migration-state", "the rollback done", |t| {
        t.starts_with("TO_MIGRATE")
    })
    .await;
    b.wait_text("tr[data-device=meter-0001]", "rolled back", |t| {
        t.contains("ROLLED_BACK")
    })
    .await;
    assert_eq!(t.device(&pk, "meter-0001").await["instance_id"], "default");

    // A narrow screen (a phone in the field) still shows the job.
    b.client.set_window_size(390, 844).await.unwrap();
    b.goto(&job_url).await;
    b.css("#job-bar").await;
    b.shot("job-narrow").await;
    b.client.set_window_size(1280, 1000).await.unwrap();

    // Log out: back to the login page, and the console is closed to this browser.
    b.click("header .who button").await;
    b.css("#token").await;
    b.goto(&t.url("/console")).await;
    b.css("#token").await;
    drop(devices);
    b.close().await;
}

/// An admin deletes an instance from the Forwarding page (its groups only when asked); an
/// operator gets no button and a forged post is refused by the API.
#[tokio::test]
async fn an_admin_deletes_an_instance_from_the_forwarding_page() {
    let t = spawn_app().await;
    let (s, b) = t
        .post(
            "/api/v1/instances",
            json!({"instance_id": "iot-old", "name": "old"}),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    let (s, b) = t
        .post(
            "/api/v1/instances/iot-old/consumer-groups",
            json!({"group_id": "g", "name": "g"}),
        )
        .await;
    assert_eq!(s, 201, "{b}");
    const DELETE: &str = "/console/instances/iot-old/delete";

    let op = login(&t, OPERATOR_TOKEN).await;
    let (_, html) = page(&t, &op, "/console/forwarding").await;
    assert!(!html.contains(DELETE), "no delete button for an operator");
    let csrf = csrf_of(&html);
    let (status, _) = post_form(&t, &op, DELETE, &[("csrf", &csrf), ("sure", "yes")]).await;
    assert_eq!(status, 403);

    let admin = login(&t, ADMIN_TOKEN).await;
    let (_, html) = page(&t, &admin, "/console/forwarding").await;
    assert!(html.contains(DELETE), "{html}");
    assert!(
        !html.contains("/console/instances/default/delete"),
        "default cannot be deleted"
    );
    let csrf = csrf_of(&html);
    // Unticked: nothing happens. Without its groups: the API's refusal is shown.
    let (status, _) = post_form(&t, &admin, DELETE, &[("csrf", &csrf)]).await;
    assert_eq!(status, 400);
    let (status, html) = post_form(&t, &admin, DELETE, &[("csrf", &csrf), ("sure", "yes")]).await;
    assert_eq!(status, 409, "{html}");
    assert!(html.contains("consumer groups"), "{html}");
    assert_eq!(t.get("/api/v1/instances/iot-old").await.0, 200);
    let (status, _) = post_form(
        &t,
        &admin,
        DELETE,
        &[("csrf", &csrf), ("sure", "yes"), ("groups", "yes")],
    )
    .await;
    assert_eq!(status, 303);
    assert_eq!(t.get("/api/v1/instances/iot-old").await.0, 404);
}

/// PBKDF2 rounds of the console's export tests (the default costs ~0.7 s per keyed job in a
/// debug build; the derivation is not what they test).
const TEST_KDF_ITERATIONS: u32 = 1_000;
const EXPORT_KEY: &str = "correct horse battery staple";

/// Reloads `path` until its HTML contains `needle` (a job running on its own).
async fn page_until(t: &TestApp, cookie: &str, path: &str, needle: &str) -> String {
    let deadline = tokio::time::Instant::now() + WAIT * 3;
    loop {
        let (status, html) = page(t, cookie, path).await;
        assert_eq!(status, 200, "{html}");
        if html.contains(needle) {
            return html;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path} never showed {needle}: {html}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The `Location` of a redirect.
fn location(resp: &reqwest::Response) -> String {
    resp.headers()
        .get("location")
        .expect("a redirect")
        .to_str()
        .unwrap()
        .to_owned()
}

/// The opening tag of the element with `id` in `html`.
fn tag_of<'a>(html: &'a str, id: &str) -> &'a str {
    let at = html
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id}"));
    let start = html[..at].rfind('<').unwrap();
    &html[start..start + html[start..].find('>').unwrap()]
}

async fn post_multipart(
    t: &TestApp,
    cookie: &str,
    path: &str,
    form: reqwest::multipart::Form,
) -> reqwest::Response {
    client()
        .post(t.url(path))
        .header("cookie", cookie)
        .multipart(form)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn export_and_import_jobs_run_from_the_console() {
    let src = spawn_app_with(|s| s.export.kdf_iterations = TEST_KDF_ITERATIONS).await;
    let dst = spawn_app_with(|s| s.export.kdf_iterations = TEST_KDF_ITERATIONS).await;
    let pk = src.create_product("export me").await;
    src.create_device(&pk, "exp-dev-1").await;
    let op = login(&src, OPERATOR_TOKEN).await;
    let (status, html) = page(&src, &op, "/console/export").await;
    assert_eq!(status, 200);
    assert!(html.contains("action=\"/console/export\""), "{html}");
    assert!(html.contains("action=\"/console/import?csrf="), "{html}");
    let csrf = csrf_of(&html);

    // The API's refusal (no passphrase for the secrets) is shown on the form, input kept.
    let (status, html) = post_form(
        &src,
        &op,
        "/console/export",
        &[("csrf", &csrf), ("product", &pk), ("name", "no key")],
    )
    .await;
    assert_eq!(status, 400, "{html}");
    assert!(html.contains("id=\"export-error\""), "{html}");
    assert!(html.contains("secrets_key"), "{html}");
    assert!(tag_of(&html, "x-secrets_key").contains("aria-invalid=\"true\""));
    assert!(tag_of(&html, "x-name").contains("value=\"no key\""));
    assert!(
        html.contains(&format!("value=\"{pk}\" checked")),
        "the product stays ticked"
    );

    // Started with one: the job page, then the package through the console.
    let resp = client()
        .post(src.url("/console/export"))
        .header("cookie", &op)
        .form(&[
            ("csrf", csrf.as_str()),
            ("product", &pk),
            ("name", "move"),
            ("secrets_key", EXPORT_KEY),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    let job_path = location(&resp);
    let id = job_path
        .strip_prefix("/console/export/")
        .unwrap()
        .to_owned();
    let html = page_until(&src, &op, &job_path, "id=\"job-state\">SUCCESSFUL").await;
    assert!(html.contains(&format!("/default/{pk}/exp-dev-1")), "{html}");
    assert!(html.contains("FGX_003"), "the log: {html}");
    let download = format!("{job_path}/package");
    assert!(html.contains(&format!("href=\"{download}\"")), "{html}");
    let resp = client()
        .get(src.url(&download))
        .header("cookie", &op)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/zip");
    let package = resp.bytes().await.unwrap().to_vec();
    let api_copy = src
        .http
        .get(src.url(&format!("/api/v1/export/{id}/package")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(package, api_copy.to_vec(), "the API's package, unchanged");

    // Imported into another gateway by its admin: a wrong passphrase first (the API's 400).
    let admin = login(&dst, ADMIN_TOKEN).await;
    let (_, html) = page(&dst, &admin, "/console/export").await;
    let csrf2 = csrf_of(&html);
    let form = |key: &str| {
        reqwest::multipart::Form::new()
            .part(
                "package",
                reqwest::multipart::Part::bytes(package.clone()).file_name("move.zip"),
            )
            .text("secrets_key", key.to_owned())
            .text("conflict_policy", "skip")
            .text("name", "")
    };
    let import = format!("/console/import?csrf={csrf2}");
    let resp = post_multipart(&dst, &admin, &import, form("not the passphrase")).await;
    assert_eq!(resp.status(), 400);
    assert!(resp.text().await.unwrap().contains("FG.4005"));
    let resp = post_multipart(&dst, &admin, &import, form(EXPORT_KEY)).await;
    assert_eq!(resp.status(), 303);
    let import_path = location(&resp);
    assert!(
        import_path.starts_with("/console/import/imp-"),
        "{import_path}"
    );
    let html = page_until(&dst, &admin, &import_path, "id=\"job-state\">SUCCESSFUL").await;
    assert!(html.contains("2 created"), "{html}");
    assert_eq!(
        dst.device_secret(&pk, "exp-dev-1").await,
        src.device_secret(&pk, "exp-dev-1").await
    );
    let (_, list) = page(&dst, &admin, "/console/export").await;
    assert!(list.contains(&format!(
        "data-job=\"{}\"",
        import_path.rsplit('/').next().unwrap()
    )));

    // A viewer sees the jobs but no form and no download; its forged posts are refused.
    let viewer = login(&src, VIEWER_TOKEN).await;
    let (status, html) = page(&src, &viewer, "/console/export").await;
    assert_eq!(status, 200);
    assert!(html.contains(&format!("data-job=\"{id}\"")), "{html}");
    assert!(!html.contains("action=\"/console/export\""), "{html}");
    assert!(!html.contains("action=\"/console/import"), "{html}");
    let (_, job_html) = page(&src, &viewer, &job_path).await;
    assert!(!job_html.contains(&download), "{job_html}");
    let csrf_v = csrf_of(&job_html);
    let (status, _) = post_form(
        &src,
        &viewer,
        "/console/export",
        &[
            ("csrf", &csrf_v),
            ("product", &pk),
            ("secrets_key", EXPORT_KEY),
        ],
    )
    .await;
    assert_eq!(status, 403);
    let resp = post_multipart(
        &src,
        &viewer,
        &format!("/console/import?csrf={csrf_v}"),
        form(EXPORT_KEY),
    )
    .await;
    assert_eq!(resp.status(), 403);
    let resp = client()
        .get(src.url(&download))
        .header("cookie", &viewer)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403, "the package is the operator's");
    // Without the CSRF token an operator's post is refused too.
    let resp = post_multipart(&src, &op, "/console/import", form(EXPORT_KEY)).await;
    assert_eq!(resp.status(), 403);
    let (_, html) = page(&src, &op, "/console/export").await;
    assert_eq!(
        html.matches("data-job=").count(),
        1,
        "one export, no import: {html}"
    );
}

#[tokio::test]
async fn a_canary_starts_from_a_csv_file_with_per_row_results() {
    let t = spawn_app().await;
    let pk = t.create_product("canary csv").await;
    for dn in ["csv-dev-1", "csv-dev-2"] {
        t.create_device(&pk, dn).await;
    }
    let (status, body) = t
        .post(
            "/api/v1/instances",
            json!({"instance_id": "iot-canary", "name": "Canary"}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, task) = t
        .post(
            "/api/v1/migrations",
            json!({"product_key": pk, "target_instance_id": "iot-canary"}),
        )
        .await;
    assert_eq!(status, 201, "{task}");
    let tid = task["task_id"].as_str().unwrap().to_owned();
    let path = format!("/console/migrations/{tid}");
    let op = login(&t, OPERATOR_TOKEN).await;
    let (_, html) = page(&t, &op, &path).await;
    let csrf = csrf_of(&html);
    let upload = format!("{path}/canary-csv?csrf={csrf}");
    let csv = |text: &str| {
        reqwest::multipart::Form::new().part(
            "file",
            reqwest::multipart::Part::bytes(text.as_bytes().to_vec()).file_name("canary.csv"),
        )
    };

    // The API's validation: no DeviceName column.
    let resp = post_multipart(&t, &op, &upload, csv("Name\ncsv-dev-1\n")).await;
    assert_eq!(resp.status(), 400);
    assert!(resp.text().await.unwrap().contains("DeviceName"));

    let resp = post_multipart(
        &t,
        &op,
        &upload,
        csv("DeviceName\ncsv-dev-1\nno-such-dev\ncsv-dev-1\n"),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let html = resp.text().await.unwrap();
    assert!(html.contains("id=\"selection-results\""), "{html}");
    assert!(html.contains("1 accepted, 2 refused"), "{html}");
    assert!(html.contains("data-row=\"2\""), "{html}");
    assert!(
        html.contains("FG.2003"),
        "the unknown device's code: {html}"
    );
    assert!(html.contains("data-row=\"3\""), "the duplicate: {html}");
    page_until(&t, &op, &path, "CANARY_COMPLETED").await;
    assert_eq!(
        t.device(&pk, "csv-dev-1").await["instance_id"],
        "iot-canary"
    );
    assert_eq!(t.device(&pk, "csv-dev-2").await["instance_id"], "default");

    // A viewer's forged upload is refused.
    let viewer = login(&t, VIEWER_TOKEN).await;
    let (_, html) = page(&t, &viewer, &path).await;
    assert!(!html.contains("canary-csv"), "no upload form for a viewer");
    let resp = post_multipart(
        &t,
        &viewer,
        &format!("{path}/canary-csv?csrf={}", csrf_of(&html)),
        csv("DeviceName\ncsv-dev-2\n"),
    )
    .await;
    assert_eq!(resp.status(), 403);
}
