//! The `fleetgate` binary as an operator runs it: first start creates the admin token (printed
//! in text mode, only named in JSON logs), ports 0 work and are logged, SIGTERM shuts down
//! cleanly, a second start on the same data dir keeps everything, refused connections are
//! logged, and `check-config` checks a settings file.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStderr, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

struct Gateway {
    child: Child,
    stderr: BufReader<ChildStderr>,
    stdout: ChildStdout,
    http: String,
}

/// The next JSON log line whose message is `message` (within 20 s), skipping others.
fn wait_log(stderr: &mut BufReader<ChildStderr>, message: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut line = String::new();
    loop {
        assert!(Instant::now() < deadline, "no `{message}` log line");
        line.clear();
        if stderr.read_line(&mut line).unwrap() == 0 {
            panic!("fleetgate exited before logging `{message}`");
        }
        if let Ok(v) = serde_json::from_str::<Value>(&line) {
            if v["fields"]["message"] == message {
                return v;
            }
        }
    }
}

/// Starts the binary with JSON logs; on a first start (`first`), waits for the line that names
/// the token's file and reads the token from there (JSON logs never carry it).
fn start(data_dir: &std::path::Path, first: bool) -> (Gateway, Option<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fleetgate"))
        .args([
            "serve",
            "--mqtt-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--log-json",
        ])
        .arg("--data-dir")
        .arg(data_dir)
        .env_remove("FLEETGATE_API_TOKEN")
        .env_remove("FLEETGATE_AMQP_URL")
        .env_remove("FLEETGATE_STORE")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("fleetgate starts");
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let listening = wait_log(&mut stderr, "fleetgate listening");
    let http = listening["fields"]["http"].as_str().unwrap().to_owned();
    let mqtt: std::net::SocketAddr = listening["fields"]["mqtt"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_ne!(mqtt.port(), 0, "the bound MQTT port is logged");
    // The token's line (first start only) is logged right after the listening line.
    let mut token = None;
    if first {
        let created = wait_log(
            &mut stderr,
            "created the admin API token; it is in this file (not logged)",
        );
        let path = created["fields"]["path"]
            .as_str()
            .expect("the file is named");
        assert_eq!(std::path::Path::new(path), data_dir.join("api-token"));
        let t = std::fs::read_to_string(path).unwrap().trim().to_owned();
        assert!(!created.to_string().contains(&t), "the token is not logged");
        token = Some(t);
    }
    let stdout = child.stdout.take().unwrap();
    (
        Gateway {
            child,
            stderr,
            stdout,
            http: format!("http://{http}"),
        },
        token,
    )
}

fn sigterm_and_wait(mut gw: Gateway) -> String {
    let status = Command::new("kill")
        .args(["-TERM", &gw.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = gw.child.try_wait().unwrap() {
            assert!(status.success(), "exit status after SIGTERM: {status:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still running 20 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut rest = String::new();
    let _ = gw.stderr.read_to_string(&mut rest);
    let mut out = String::new();
    let _ = gw.stdout.read_to_string(&mut out);
    assert_eq!(
        out, "",
        "with JSON logs nothing (the token least of all) goes to stdout"
    );
    rest
}

#[tokio::test]
async fn first_start_token_sigterm_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (gw, token) = start(dir.path(), true);
    let token = token.expect("first start creates the admin token");
    assert!(token.starts_with("fg_"), "{token}");

    let client = reqwest::Client::new();
    let resp = client
        .post(format!("{}/api/v1/products", gw.http))
        .bearer_auth(&token)
        .json(&json!({"name": "cli"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let pk = resp.json::<Value>().await.unwrap()["product_key"]
        .as_str()
        .unwrap()
        .to_owned();
    let resp = client
        .post(format!("{}/api/v1/products/{pk}/devices", gw.http))
        .bearer_auth(&token)
        .json(&json!({"device_name": "cli-0001"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);

    let log = sigterm_and_wait(gw);
    assert!(
        log.contains("\"stopped\""),
        "no clean-stop log line:\n{log}"
    );

    let (gw, second_token) = start(dir.path(), false);
    assert!(second_token.is_none());
    let resp = client
        .get(format!("{}/api/v1/products/{pk}/devices/cli-0001", gw.http))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "device kept across the restart");
    sigterm_and_wait(gw);
}

/// Runs `fleetgate serve` with `store` as `--store` (or `FLEETGATE_STORE`) where it cannot
/// start; returns its stderr.
fn failed_start(store: &str, as_env: bool) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fleetgate"));
    cmd.args([
        "serve",
        "--mqtt-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
    ])
    .arg("--data-dir")
    .arg(dir.path())
    .env_remove("FLEETGATE_AMQP_URL")
    .env("FLEETGATE_API_TOKEN", "cli-admin-token-0123456789")
    .env("RUST_LOG", "info");
    if as_env {
        cmd.env("FLEETGATE_STORE", store);
    } else {
        cmd.env_remove("FLEETGATE_STORE").args(["--store", store]);
    }
    let out = cmd.output().expect("fleetgate runs");
    assert!(!out.status.success(), "started with store {store}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_store_url_that_is_not_postgres_is_refused_with_the_setting_named() {
    let stderr = failed_start("mysql://root:hunter2@db/fleetgate", false);
    assert!(stderr.contains("store.url"), "{stderr}");
    assert!(stderr.contains("postgres://"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

#[test]
fn the_postgres_store_is_logged_and_reported_without_its_password() {
    // Nothing listens on port 1: the start fails at the store, after logging it.
    let stderr = failed_start("postgres://fg:hunter2@127.0.0.1:1/fleetgate", true);
    assert!(
        stderr.contains("PostgreSQL at postgres://fg:***@127.0.0.1:1/fleetgate"),
        "{stderr}"
    );
    assert!(stderr.contains("cannot open the store"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

/// The connection limits as an operator sets them (environment variables) and reads them (the
/// start-up log), and the open-files limit raised to the hard limit before they are derived.
#[test]
fn open_files_limit_is_raised_and_limits_come_from_the_environment() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let (_, hard) = rlimit::Resource::NOFILE.get().unwrap();
    let soft = 512.min(hard);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fleetgate"));
    cmd.args([
        "serve",
        "--mqtt-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--log-json",
    ])
    .arg("--data-dir")
    .arg(dir.path())
    .env_remove("FLEETGATE_API_TOKEN")
    .env_remove("FLEETGATE_AMQP_URL")
    .env("FLEETGATE_OPEN_FILES_RESERVE", "100")
    .env("FLEETGATE_MQTT_MAX_SOCKETS", "50")
    .env("FLEETGATE_MQTT_MAX_UNAUTHENTICATED_PER_IP", "5")
    .env("FLEETGATE_HTTP_MAX_CONNECTIONS", "7")
    .env("FLEETGATE_HTTP_MAX_CONNECTIONS_PER_IP", "3")
    .env("RUST_LOG", "info")
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    // SAFETY: only setrlimit (a system call) runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || rlimit::Resource::NOFILE.set(soft, hard));
    }
    let mut child = cmd.spawn().expect("fleetgate starts");
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut raised, mut budgets) = (None, None);
    let mut line = String::new();
    while budgets.is_none() {
        assert!(
            Instant::now() < deadline,
            "no `connection budgets` log line"
        );
        line.clear();
        if stderr.read_line(&mut line).unwrap() == 0 {
            panic!("fleetgate exited before logging its budgets");
        }
        if let Ok(v) = serde_json::from_str::<Value>(&line) {
            match v["fields"]["message"].as_str() {
                Some("open-files limit raised to the hard limit") => raised = Some(v),
                Some("connection budgets") => budgets = Some(v),
                _ => {}
            }
        }
    }
    // Only the start-up is of interest here (the clean stop is tested above).
    child.kill().unwrap();
    child.wait().unwrap();
    let budgets = &budgets.unwrap()["fields"];
    if soft < hard {
        let raised = raised.expect("the raise is logged");
        assert_eq!(raised["fields"]["from"], soft, "{raised}");
        assert_eq!(raised["fields"]["to"], hard, "{raised}");
        assert_eq!(budgets["open_files"], hard, "{budgets}");
    }
    assert_eq!(budgets["reserve"], 100, "{budgets}");
    assert_eq!(budgets["mqtt_sockets"], 50, "{budgets}");
    assert_eq!(budgets["mqtt_unauthenticated_per_ip"], 5, "{budgets}");
    assert_eq!(budgets["http_connections"], 7, "{budgets}");
    assert_eq!(budgets["http_connections_per_ip"], 3, "{budgets}");
}

#[test]
fn a_taken_port_fails_the_start_naming_the_flag_without_creating_the_token() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = held.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_fleetgate"))
        .args([
            "serve",
            "--mqtt-listen",
            &taken,
            "--http-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .env_remove("FLEETGATE_API_TOKEN")
        .env_remove("FLEETGATE_AMQP_URL")
        .env_remove("FLEETGATE_STORE")
        .output()
        .expect("fleetgate runs");
    assert!(!out.status.success(), "started on the taken {taken}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&taken), "{stderr}");
    assert!(stderr.contains("--mqtt-listen"), "{stderr}");
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!dir.path().join("api-token").exists());
    drop(held);
    // The next start that succeeds creates the token.
    let (gw, token) = start(dir.path(), true);
    assert!(token.is_some_and(|t| t.starts_with("fg_")));
    sigterm_and_wait(gw);
}

fn device_credentials(extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fleetgate"))
        .args([
            "device-credentials",
            "--product-key",
            "a1Prod",
            "--device-name",
            "dev-0001",
            "--device-secret",
            "s3cret",
            "--shell",
        ])
        .args(extra)
        .env_remove("FLEETGATE_DEVICE_SECRET")
        .output()
        .expect("fleetgate runs")
}

#[test]
fn device_credentials_take_a_client_id_and_sign_it() {
    use fleetgate_topics::sign::LinkClientId;
    let field = |out: &str, name: &str| -> String {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}='")))
            .and_then(|v| v.strip_suffix('\''))
            .unwrap_or_else(|| panic!("no {name} in {out}"))
            .to_owned()
    };
    for (extra, want) in [
        (vec![], "a1Prod.dev-0001"),
        (vec!["--client-id", "bench-7"], "bench-7"),
    ] {
        let out = device_credentials(&extra);
        assert!(out.status.success());
        let out = String::from_utf8(out.stdout).unwrap();
        let id = LinkClientId::parse(&field(&out, "CLIENT_ID")).unwrap();
        assert_eq!(id.client_id, want);
        assert_eq!(field(&out, "USERNAME"), "dev-0001&a1Prod");
        assert!(id.verify("a1Prod", "dev-0001", "s3cret", &field(&out, "PASSWORD")));
    }
    let out = device_credentials(&["--client-id", "a|b"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--client-id"));
}

/// Text logs (the default): the token created on first start is printed once on stdout.
#[test]
fn first_start_in_text_mode_prints_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_fleetgate"))
        .args([
            "serve",
            "--mqtt-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .env_remove("FLEETGATE_API_TOKEN")
        .env_remove("FLEETGATE_AMQP_URL")
        .env_remove("FLEETGATE_STORE")
        .env_remove("FLEETGATE_LOG_JSON")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("fleetgate starts");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let token = std::fs::read_to_string(dir.path().join("api-token")).unwrap();
    assert!(line.starts_with("Created the admin API token"), "{line}");
    assert!(line.trim_end().ends_with(token.trim()), "{line}");
}

/// A CONNECT that is not even a Link client id (`malformed_client_id`).
fn bad_connect() -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60];
    body.extend_from_slice(&[0, 3, b'b', b'a', b'd']);
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend(body);
    packet
}

/// `FLEETGATE_LOG_JSON=1` gives JSON lines, and a refused CONNECT is logged with the client's
/// address and the reason, like Mosquitto does (the rate limit itself is `Throttle`'s test).
#[test]
fn log_json_from_the_environment_and_refused_connects_are_logged() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_fleetgate"))
        .args([
            "serve",
            "--mqtt-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .env("FLEETGATE_LOG_JSON", "1")
        .env("FLEETGATE_API_TOKEN", "cli-admin-token-0123456789")
        .env_remove("FLEETGATE_AMQP_URL")
        .env_remove("FLEETGATE_STORE")
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("fleetgate starts");
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let listening = wait_log(&mut stderr, "fleetgate listening");
    let mqtt: std::net::SocketAddr = listening["fields"]["mqtt"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let mut local = Vec::new();
    for _ in 0..5 {
        let mut s = std::net::TcpStream::connect(mqtt).unwrap();
        local.push(s.local_addr().unwrap().to_string());
        s.write_all(&bad_connect()).unwrap();
        // The gateway answers with a refusing CONNACK and closes.
        let mut ack = Vec::new();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.read_to_end(&mut ack);
        assert_eq!(ack.get(..3), Some(&[0x20, 2, 0][..]), "{ack:?}");
        assert_ne!(ack[3], 0, "refused");
    }
    let refused = wait_log(&mut stderr, "MQTT connection refused");
    assert_eq!(refused["level"], "WARN", "{refused}");
    assert!(
        matches!(
            refused["fields"]["reason"].as_str(),
            Some("malformed_client_id" | "bad_username")
        ),
        "{refused}"
    );
    assert_eq!(refused["fields"]["client"], local[0], "{refused}");
    assert!(refused["fields"]["not_logged"].is_u64(), "{refused}");
    child.kill().unwrap();
    let mut rest = String::new();
    let _ = stderr.read_to_string(&mut rest);
    child.wait().unwrap();
    assert!(
        !rest.contains("Overriding segment config") && !rest.contains("\"target\":\"rumqttd"),
        "rumqttd's INFO lines are filtered out by default:\n{rest}"
    );
}

fn check_config(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fleetgate"))
        .arg("check-config")
        .args(args)
        .env_remove("FLEETGATE_API_TOKEN")
        .env_remove("FLEETGATE_AMQP_URL")
        .env_remove("FLEETGATE_STORE")
        .env_remove("FLEETGATE_CONFIG")
        .env_remove("FLEETGATE_DATA_DIR")
        .output()
        .expect("fleetgate runs")
}

#[test]
fn check_config_passes_the_example_and_names_what_is_wrong() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/fleetgate.example.toml");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("not-yet");
    let data_arg = data.to_str().unwrap();
    let out = check_config(&["--config", example, "--data-dir", data_arg]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("fleetgate.example.toml: OK"), "{stdout}");
    assert!(stdout.contains("amqp forwarding off"), "{stdout}");
    assert!(!data.exists(), "check-config creates nothing");

    let bad = dir.path().join("bad.toml");
    for (text, named) in [
        ("[mqtt]\nmax_conections = 5\n", "max_conections"),
        ("[mqtt]\nmax_connections = 0\n", "mqtt.max_connections"),
        ("[mqtt.tls]\nlisten = \"127.0.0.1:8883\"\ncert = \"/nonexistent/cert.pem\"\nkey = \"/nonexistent/key.pem\"\n", "/nonexistent/cert.pem"),
    ] {
        std::fs::write(&bad, text).unwrap();
        let out = check_config(&["--config", bad.to_str().unwrap(), "--data-dir", data_arg]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{text} passed");
        assert!(stderr.contains(named), "{text}: {stderr}");
    }
}

#[test]
fn check_config_takes_the_proxy_protocol_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let run = |vars: &[(&str, &str)]| {
        Command::new(env!("CARGO_BIN_EXE_fleetgate"))
            .arg("check-config")
            .arg("--data-dir")
            .arg(dir.path())
            .env_remove("FLEETGATE_API_TOKEN")
            .env_remove("FLEETGATE_AMQP_URL")
            .env_remove("FLEETGATE_STORE")
            .env_remove("FLEETGATE_CONFIG")
            .envs(vars.iter().copied())
            .output()
            .expect("fleetgate runs")
    };
    let out = run(&[
        ("FLEETGATE_MQTT_PROXY_PROTOCOL", "required"),
        ("FLEETGATE_MQTT_PROXY_TRUSTED", "10.0.0.5, 10.0.1.0/24"),
        ("FLEETGATE_HTTP_PROXY_PROTOCOL", "trusted"),
        ("FLEETGATE_HTTP_PROXY_TRUSTED", "10.0.0.6"),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("mqtt PROXY protocol required from 10.0.0.5/32, 10.0.1.0/24"),
        "{stdout}"
    );
    assert!(
        stdout.contains("http PROXY protocol trusted from 10.0.0.6/32"),
        "{stdout}"
    );
    // Without a balancer to trust, or with a mode that does not exist: refused, named.
    for (vars, named) in [
        (
            &[("FLEETGATE_MQTT_PROXY_PROTOCOL", "trusted")][..],
            "mqtt.proxy_trusted",
        ),
        (&[("FLEETGATE_MQTT_PROXY_PROTOCOL", "v2")][..], "v2"),
        (
            &[("FLEETGATE_HTTP_PROXY_PROTOCOL", "required")][..],
            "http.proxy_trusted",
        ),
        (
            &[
                ("FLEETGATE_MQTT_PROXY_PROTOCOL", "trusted"),
                ("FLEETGATE_MQTT_PROXY_TRUSTED", "haproxy"),
            ][..],
            "haproxy",
        ),
    ] {
        let out = run(vars);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{vars:?} passed");
        assert!(stderr.contains(named), "{vars:?}: {stderr}");
    }
}

#[test]
fn check_config_takes_the_amqp_queue_type_from_the_environment_and_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str], vars: &[(&str, &str)]| {
        Command::new(env!("CARGO_BIN_EXE_fleetgate"))
            .arg("check-config")
            .arg("--data-dir")
            .arg(dir.path())
            .args(args)
            .env_remove("FLEETGATE_API_TOKEN")
            .env_remove("FLEETGATE_AMQP_QUEUE_TYPE")
            .env_remove("FLEETGATE_STORE")
            .env_remove("FLEETGATE_CONFIG")
            .env(
                "FLEETGATE_AMQP_URL",
                "amqp://guest:guest@127.0.0.1:5672/%2f",
            )
            .envs(vars.iter().copied())
            .output()
            .expect("fleetgate runs")
    };
    for (args, vars, shown) in [
        (&[][..], &[][..], "classic queues"),
        (
            &[][..],
            &[("FLEETGATE_AMQP_QUEUE_TYPE", "quorum")][..],
            "quorum queues",
        ),
        (
            &["--amqp-queue-type", "classic"][..],
            &[("FLEETGATE_AMQP_QUEUE_TYPE", "quorum")][..],
            "classic queues",
        ),
    ] {
        let out = run(args, vars);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{args:?} {vars:?}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains(shown), "{args:?} {vars:?}: {stdout}");
    }
    let out = run(&[], &[("FLEETGATE_AMQP_QUEUE_TYPE", "stream")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "stream passed");
    assert!(stderr.contains("classic or quorum"), "{stderr}");
}
