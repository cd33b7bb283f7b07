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
