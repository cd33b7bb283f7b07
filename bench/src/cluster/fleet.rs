//! The processes of a cluster run: three release nodes on a fresh PostgreSQL database and a
//! NATS cluster name of their own, and HAProxy in front of their MQTT listeners.

use super::*;

/// A three-node cluster behind HAProxy on a fresh database, for another part's run (the OTA
/// campaign, `--parts cluster-ota`): node 1's API, HAProxy's MQTT address.
///
/// HAProxy holds two descriptors per device and a process here may open 20,000, so above
/// [`DEVICES_PER_HAPROXY`] devices the fleet runs several identical HAProxy processes (same
/// servers, same consistent hash: a device lands on the same node through any of them) and the
/// simulator spreads its devices over them.
pub struct Fleet3 {
    pub(super) nodes: Vec<Node>,
    pub(super) haproxies: Vec<Haproxy>,
    pub(super) db: Database,
}

impl Fleet3 {
    pub async fn start(
        args: &Args,
        bins: &Bins,
        work: &Path,
        devices: usize,
        extra: &[String],
    ) -> anyhow::Result<Fleet3> {
        let svc = Services {
            pg_admin: args.pg_url.clone(),
            nats: args.nats_url.clone(),
            haproxy: args.haproxy.clone(),
            haproxy_threads: args.haproxy_threads,
            haproxy_global: args.haproxy_global.clone(),
            haproxy_defaults: args.haproxy_defaults.clone(),
        };
        let db = Database::fresh(&svc.pg_admin).await?;
        let cluster = format!("benchota{}", std::process::id());
        let extra: Vec<String> = extra
            .iter()
            .chain(&args.cluster_node_arg)
            .cloned()
            .collect();
        let mut nodes = Vec::new();
        for id in 1..=3 {
            match start_node(bins, work, &db, &svc, &cluster, id, &extra).await {
                Ok(node) => nodes.push(node),
                Err(e) => {
                    db.drop_now().await;
                    return Err(e);
                }
            }
        }
        wait_members(&nodes.iter().collect::<Vec<_>>()).await?;
        let mut haproxies = Vec::new();
        for index in 0..devices.div_ceil(DEVICES_PER_HAPROXY).max(1) {
            let started =
                Haproxy::start(&svc, work, &nodes.iter().collect::<Vec<_>>(), index).await;
            match started {
                Ok(h) => haproxies.push(h),
                Err(e) => {
                    db.drop_now().await;
                    return Err(e);
                }
            }
        }
        Ok(Fleet3 {
            nodes,
            haproxies,
            db,
        })
    }

    pub fn api(&self) -> &Api {
        &self.nodes[0].api
    }

    /// Where devices connect: the HAProxy processes.
    pub fn mqtt(&self) -> Vec<SocketAddr> {
        self.haproxies.iter().map(|h| h.addr).collect()
    }

    /// RSS of the three nodes together.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        self.nodes.iter().map(|n| n.server.rss_kib()).sum()
    }

    /// CPU time (user + system) of the three nodes so far, seconds.
    pub fn cpu_s(&self) -> anyhow::Result<f64> {
        self.nodes.iter().map(|n| n.server.cpu_s()).sum()
    }

    /// Warnings the three nodes logged.
    pub fn warnings(&self) -> u64 {
        self.nodes
            .iter()
            .map(|n| n.server.log.warnings.load(Ordering::Relaxed))
            .sum()
    }

    /// PostgreSQL transactions committed and rows written in the fleet's database so far.
    pub async fn pg_counters(&self) -> anyhow::Result<(i64, i64)> {
        let client = pg(&self.db.admin).await?;
        let row = client
            .query_one(
                "SELECT xact_commit, tup_inserted + tup_updated + tup_deleted \
                 FROM pg_stat_database WHERE datname = $1",
                &[&self.db.name],
            )
            .await?;
        Ok((row.get(0), row.get(1)))
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        for h in self.haproxies {
            h.stop().await;
        }
        for n in self.nodes {
            n.server.stop().await?;
        }
        self.db.drop_now().await;
        Ok(())
    }
}

/// Where the cluster's services are.
pub(super) struct Services {
    pub(super) pg_admin: String,
    pub(super) nats: String,
    pub(super) haproxy: PathBuf,
    /// HAProxy's `nbthread` (`None`: its default, one thread per CPU).
    pub(super) haproxy_threads: Option<u16>,
    /// Extra lines of HAProxy's `global` and `defaults` sections (experiments).
    pub(super) haproxy_global: Vec<String>,
    pub(super) haproxy_defaults: Vec<String>,
}

/// A fresh PostgreSQL database, dropped (with `FORCE`) by [`Database::drop_now`].
pub(super) struct Database {
    pub(super) admin: String,
    pub(super) name: String,
    pub(super) url: String,
}

impl Database {
    pub(super) async fn fresh(admin: &str) -> anyhow::Result<Database> {
        let client = pg(admin).await?;
        let name = format!(
            "fg_bench_{}_{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_millis()
        );
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await?;
        let (base, _) = admin
            .rsplit_once('/')
            .context("--pg-url needs a database path")?;
        Ok(Database {
            admin: admin.to_owned(),
            url: format!("{base}/{name}"),
            name,
        })
    }

    /// Transactions committed in this database so far.
    pub(super) async fn commits(&self) -> anyhow::Result<i64> {
        let client = pg(&self.admin).await?;
        let row = client
            .query_one(
                "SELECT xact_commit FROM pg_stat_database WHERE datname = $1",
                &[&self.name],
            )
            .await?;
        Ok(row.get(0))
    }

    pub(super) async fn drop_now(self) {
        if let Ok(client) = pg(&self.admin).await {
            let _ = client
                .batch_execute(&format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    self.name
                ))
                .await;
        }
    }
}

pub(super) async fn pg(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("PostgreSQL at {url}"))?;
    tokio::spawn(conn);
    Ok(client)
}

pub(super) struct Node {
    pub(super) id: u16,
    pub(super) server: Server,
    pub(super) api: Api,
}

pub(super) async fn start_node(
    bins: &Bins,
    work: &Path,
    db: &Database,
    svc: &Services,
    cluster: &str,
    id: u16,
    more: &[String],
) -> anyhow::Result<Node> {
    let dir = work.join(format!("node{id}"));
    fresh_dir(&dir)?;
    let extra: Vec<String> = [
        "--store",
        &db.url,
        "--nats-url",
        &svc.nats,
        "--node-id",
        &id.to_string(),
        "--cluster-name",
        cluster,
        "--cluster-heartbeat-ms",
        HEARTBEAT_MS,
        "--cluster-node-timeout-ms",
        NODE_TIMEOUT_MS,
        "--mqtt-proxy-protocol",
        "trusted",
        "--mqtt-proxy-trusted",
        HAPROXY_SOURCE,
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(more.iter().cloned())
    .collect();
    let server = Server::fleetgate_with(bins, &dir, TOKEN, None, &extra).await?;
    let api = Api::new(server.http.context("no http")?, TOKEN);
    Ok(Node { id, server, api })
}

pub(super) struct Haproxy {
    pub(super) addr: SocketAddr,
    pub(super) child: Child,
}

impl Haproxy {
    /// HAProxy number `index` (its own configuration file) in front of `nodes`.
    pub(super) async fn start(
        svc: &Services,
        work: &Path,
        nodes: &[&Node],
        index: usize,
    ) -> anyhow::Result<Haproxy> {
        let addr = free_port()?;
        let servers: String = nodes
            .iter()
            .map(|n| {
                format!(
                    "    server node{} {} send-proxy-v2 check port {} inter 500ms fall 2 rise 2\n",
                    n.id,
                    n.server.mqtt,
                    n.server.http.map_or(0, |h| h.port())
                )
            })
            .collect();
        let threads = svc
            .haproxy_threads
            .map_or(String::new(), |n| format!("    nbthread {n}\n"));
        let lines =
            |extra: &[String]| -> String { extra.iter().map(|l| format!("    {l}\n")).collect() };
        let (global, defaults) = (lines(&svc.haproxy_global), lines(&svc.haproxy_defaults));
        // deploy/haproxy.cfg's MQTT frontend and backend, with this run's addresses.
        let config = format!(
            "global\n    maxconn 9000\n{threads}{global}\
             defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 10m\n    \
             timeout server 10m\n    retries 3\n    option redispatch\n{defaults}\
             frontend mqtt\n    bind {addr}\n    tcp-request inspect-delay 5s\n    \
             tcp-request content reject unless {{ req.payload(0,0),mqtt_is_valid }}\n    \
             tcp-request content set-var(sess.mqtt_user) req.payload(0,0),mqtt_field_value(connect,username)\n    \
             default_backend nodes\n\
             backend nodes\n    balance hash var(sess.mqtt_user)\n    hash-type consistent\n    \
             option httpchk GET /readyz\n    source {HAPROXY_SOURCE}\n{servers}"
        );
        let path = work.join(format!("haproxy-{index}.cfg"));
        std::fs::write(&path, config)?;
        let bin = &svc.haproxy;
        let child = Command::new(bin)
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {} (apt-get install haproxy)", bin.display()))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            ensure!(
                Instant::now() < deadline,
                "haproxy did not listen on {addr}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The health checks mark every node up ("rise 2" × 500 ms).
        tokio::time::sleep(Duration::from_millis(1500)).await;
        Ok(Haproxy { addr, child })
    }

    pub(super) async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

pub(super) fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// Waits until every node lists the other `n - 1`.
pub(super) async fn wait_members(nodes: &[&Node]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    for n in nodes {
        loop {
            let view = n.api.get("/api/v1/cluster", &[]).await?;
            let seen = view["nodes"].as_array().map_or(0, Vec::len);
            if seen == nodes.len() && view["ready"] == true {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "node {} sees {seen} of {} nodes: {view}",
                n.id,
                nodes.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}
