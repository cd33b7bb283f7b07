//! The console behind a round-robin HTTP balancer: a session opened through one node works on
//! every node (the cookie is sealed with the cluster's key), and a logout through any node
//! ends it on all of them (a revocation document every node follows).

use super::harness::*;

/// A cookie-less client that does not follow redirects (they are what we look at).
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Logs in through `node`; returns the `name=value` session cookie.
async fn login(node: &Node) -> String {
    let resp = client()
        .post(format!("http://{}/console/login", node.http))
        .form(&[("token", ADMIN_TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303, "login through node {}", node.id);
    let set = resp.headers()["set-cookie"].to_str().unwrap().to_owned();
    set.split(';').next().unwrap().to_owned()
}

async fn page(node: &Node, cookie: &str, path: &str) -> (u16, String) {
    let resp = client()
        .get(format!("http://{}{path}", node.http))
        .header("cookie", cookie)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

fn csrf_of(html: &str) -> String {
    let marker = "name=\"csrf\" value=\"";
    let at = html.find(marker).expect("a form with a CSRF field") + marker.len();
    html[at..at + html[at..].find('"').unwrap()].to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_console_session_from_one_node_works_on_every_node_until_logout() {
    let mut cluster = Cluster::start(3).await;
    let pk = cluster.node(1).api().create_product("console").await;
    let products = format!("/console/products/{pk}");

    let cookie = login(cluster.node(1)).await;
    let other = login(cluster.node(3)).await;
    let mut csrf = Vec::new();
    for node in &cluster.nodes {
        let (status, html) = page(node, &cookie, &products).await;
        assert_eq!(status, 200, "node {} took the cookie: {html}", node.id);
        assert!(html.contains("Product console"), "{html}");
        csrf.push(csrf_of(&html));
    }
    assert!(
        csrf.windows(2).all(|w| w[0] == w[1]),
        "one CSRF token: {csrf:?}"
    );

    // A form from node 2's page, posted through node 3.
    let resp = client()
        .post(format!("http://{}{products}/devices", cluster.node(3).http))
        .header("cookie", &cookie)
        .form(&[("csrf", csrf[1].as_str()), ("device_name", "console-dev-1")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.text().await.unwrap().contains("Created device"));
    let (status, _) = cluster
        .node(1)
        .api()
        .get(&format!("/api/v1/products/{pk}/devices/console-dev-1"))
        .await;
    assert_eq!(status, 200);

    // Logout through node 2 ends the session on every node before it answers; the session
    // opened through node 3 goes on.
    let resp = client()
        .post(format!("http://{}/console/logout", cluster.node(2).http))
        .header("cookie", &cookie)
        .form(&[("csrf", csrf[1].as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    for node in &cluster.nodes {
        let (status, _) = page(node, &cookie, "/console").await;
        assert_eq!(
            status, 303,
            "node {} refuses the logged-out cookie",
            node.id
        );
        let (status, _) = page(node, &other, "/console").await;
        assert_eq!(status, 200, "node {} keeps the other session", node.id);
    }
    // A node that starts afterwards learns the revocation from the shared store.
    cluster.node_mut(2).restart();
    cluster.wait_members(3).await;
    let (status, _) = page(cluster.node(2), &cookie, "/console").await;
    assert_eq!(status, 303, "the restarted node refuses it too");
    let (status, _) = page(cluster.node(2), &other, "/console").await;
    assert_eq!(status, 200, "and still takes the other session");
}

/// `GET path` through `node` until it answers something else than 503 (no node drives the
/// engines for a moment after a start); status and body.
async fn engine_page(node: &Node, cookie: &str, path: &str) -> (u16, String) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, html) = page(node, cookie, path).await;
        if status != 503 || tokio::time::Instant::now() > deadline {
            return (status, html);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// The console's pages that read the engines (dashboard, OTA jobs, firmware, export) show the
/// same on every node: a follower's engines are in standby and empty, so it passes the page on
/// to the node that drives them, as the API passes its engine calls on. A job and an export
/// started through one follower show on every node, the other follower's included.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_node_shows_the_engines_pages_of_the_node_that_drives_them() {
    let cluster = Cluster::start(3).await;
    let holder = engines_node(&cluster, &[1, 2, 3]).await;
    let followers: Vec<u16> = [1, 2, 3].into_iter().filter(|&n| n != holder).collect();
    let via = cluster.node(followers[0]);
    let api = via.api();
    let pk = api.create_product("console-ota").await;
    let names: Vec<String> = (1..=3).map(|i| format!("cdev-{i}")).collect();
    api.create_devices(&pk, &names).await;
    let fw = upload_firmware(via, &pk, "2.0.0", b"console firmware image").await;
    let fid = fw["firmware_id"].as_str().unwrap().to_owned();
    // The devices are offline: the job stays IN_PROGRESS with its three tasks QUEUED.
    let jid = api.start_job(&fid, 60, 60).await;
    let (status, export) = api
        .post(
            "/api/v1/export",
            serde_json::json!({"objects": [{"id": pk, "type": "PRODUCT"}], "include_secrets": false}),
        )
        .await;
    assert_eq!(status, 202, "{export}");
    let eid = export["id"].as_str().unwrap().to_owned();
    wait_for(
        &api,
        &format!("/api/v1/export/{eid}"),
        "export finished",
        WAIT,
        |j| j["status"]["state"] == "SUCCESSFUL",
    )
    .await;

    let cookie = login(via).await;
    for node in &cluster.nodes {
        let role = if node.id == holder {
            "the holder"
        } else {
            "a follower"
        };
        let at = format!("node {} ({role})", node.id);
        let (status, html) = engine_page(node, &cookie, &format!("/console/ota/jobs/{jid}")).await;
        assert_eq!(status, 200, "{at}: the job's page: {html}");
        for dn in &names {
            assert!(
                html.contains(&format!("data-device=\"{dn}\"")),
                "{at}: task of {dn} listed: {html}"
            );
        }
        let (status, html) =
            engine_page(node, &cookie, &format!("/console/ota/jobs/{jid}/live")).await;
        assert_eq!(status, 200, "{at}: the job's live block: {html}");
        assert!(
            html.contains("id=\"job-status\">IN_PROGRESS<"),
            "{at}: {html}"
        );
        let (status, html) = engine_page(
            node,
            &cookie,
            &format!("/console/ota/jobs/{jid}/tasks/cdev-2"),
        )
        .await;
        assert_eq!(status, 200, "{at}: a task's page: {html}");
        let (_, html) = engine_page(node, &cookie, "/console/dashboard/live").await;
        assert!(
            html.contains(&format!("id=\"dj-{jid}\"")),
            "{at}: the dashboard lists the running job: {html}"
        );
        let (_, html) = engine_page(node, &cookie, "/console/ota").await;
        assert!(html.contains(&jid), "{at}: the job list: {html}");
        let (_, html) = engine_page(node, &cookie, "/console/firmware").await;
        assert!(
            html.contains("1 jobs"),
            "{at}: the firmware page counts the job using the package: {html}"
        );
        let (status, html) = engine_page(node, &cookie, &format!("/console/export/{eid}")).await;
        assert_eq!(status, 200, "{at}: the export's page: {html}");
        assert!(html.contains("SUCCESSFUL"), "{at}: {html}");
        let (_, html) = engine_page(node, &cookie, "/console/export").await;
        assert!(html.contains(&eid), "{at}: the export list: {html}");
    }

    // A form posted to a follower is served there, its API call passed on: the job paused
    // through the other follower shows PAUSED everywhere.
    let other = cluster.node(followers[1]);
    let (_, html) = engine_page(other, &cookie, &format!("/console/ota/jobs/{jid}")).await;
    let csrf = csrf_of(&html);
    let resp = client()
        .post(format!(
            "http://{}/console/ota/jobs/{jid}/pause",
            other.http
        ))
        .header("cookie", &cookie)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303, "{}", resp.text().await.unwrap());
    for node in &cluster.nodes {
        let (_, html) = engine_page(node, &cookie, &format!("/console/ota/jobs/{jid}/live")).await;
        assert!(
            html.contains("id=\"job-status\">PAUSED<"),
            "node {}: {html}",
            node.id
        );
    }
}
