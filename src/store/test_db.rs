//! A fresh database per test, on either backend, so the store suite runs against both.
//!
//! SQLite: a file in a temporary directory. PostgreSQL: `CREATE DATABASE fg_test_{pid}_{n}_{rand}`
//! on the server at `FLEETGATE_TEST_PG_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`),
//! dropped by [`PgDatabase`]'s `Drop` — also when the test fails. The process id and a random
//! part keep parallel test binaries apart. The database collates linguistically (ICU `en-US`,
//! where `j1` sorts before `J3`), so a test notices when the store's order depends on the
//! database's collation. An unreachable server fails the test (never skips).

use super::{PostgresUrl, Store, StoreError, StoreLocation, StoreSettings};
use crate::metrics::Metrics;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use tempfile::TempDir;

const PG_URL_ENV: &str = "FLEETGATE_TEST_PG_URL";
const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backend {
    Sqlite,
    Postgres,
}

/// A store location of its own for one test.
pub(crate) struct TestDb {
    location: StoreLocation,
    _dir: TempDir,
    pg: Option<PgDatabase>,
}

impl TestDb {
    /// What [`super::tests::populate_ops`]'s data loads back as from this backend:
    /// PostgreSQL keeps which session holds a device (cluster mode), SQLite does not.
    pub(crate) fn expected(&self, mut snapshot: super::Snapshot) -> super::Snapshot {
        if self.pg.is_some() {
            for d in &mut snapshot.devices {
                if d.last_seen_ms.is_some() {
                    d.session = Some(super::tests::POPULATED_SESSION);
                    d.epoch_seen = super::tests::POPULATED_SESSION;
                }
            }
        }
        snapshot
    }

    pub(crate) fn new(backend: Backend) -> TestDb {
        let dir = tempfile::tempdir().expect("tempdir");
        match backend {
            Backend::Sqlite => TestDb {
                location: StoreLocation::Sqlite(Store::db_path(&dir.path().join("nested"))),
                _dir: dir,
                pg: None,
            },
            Backend::Postgres => {
                let pg = PgDatabase::create();
                TestDb {
                    location: StoreLocation::Postgres(pg.url().clone()),
                    _dir: dir,
                    pg: Some(pg),
                }
            }
        }
    }

    pub(crate) fn location(&self) -> &StoreLocation {
        &self.location
    }

    /// Opens a store on this database (again: the data of earlier stores is there).
    pub(crate) fn open(&self, metrics: Arc<Metrics>) -> Store {
        self.try_open(metrics)
            .unwrap_or_else(|e| panic!("cannot open the store ({}): {e}", self.location))
    }

    pub(crate) fn try_open(&self, metrics: Arc<Metrics>) -> Result<Store, StoreError> {
        Store::open_with(&self.location, &StoreSettings::default(), metrics)
    }

    /// Runs `sql` on the database behind the store's back.
    pub(crate) fn execute(&self, sql: &str) {
        match (&self.location, &self.pg) {
            (_, Some(pg)) => pg.execute(sql),
            (StoreLocation::Sqlite(path), None) => {
                let conn = rusqlite::Connection::open(path).expect("open the SQLite file");
                conn.execute_batch(sql).expect(sql);
            }
            (StoreLocation::Postgres(_), None) => {
                unreachable!("a PostgreSQL TestDb owns its database")
            }
        }
    }

    /// The single integer `sql` selects.
    pub(crate) fn query_i64(&self, sql: &str) -> i64 {
        match (&self.location, &self.pg) {
            (_, Some(pg)) => pg.query_i64(sql),
            (StoreLocation::Sqlite(path), None) => {
                let conn = rusqlite::Connection::open(path).expect("open the SQLite file");
                conn.query_row(sql, [], |r| r.get(0)).expect(sql)
            }
            (StoreLocation::Postgres(_), None) => {
                unreachable!("a PostgreSQL TestDb owns its database")
            }
        }
    }
}

/// Runs `f` on a thread of its own: [`PgConn`] drives its connection with a runtime of its own,
/// which cannot be started (or dropped) on a thread that runs a test's runtime.
pub(crate) fn off_runtime<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| match s.spawn(f).join() {
        Ok(value) => value,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}

/// A plain connection for tests (not the store's), usable from threads without a runtime.
pub(crate) struct PgConn {
    runtime: tokio::runtime::Runtime,
    client: tokio_postgres::Client,
}

impl PgConn {
    pub(crate) fn connect(url: &str) -> Result<PgConn, tokio_postgres::Error> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for the test connection");
        let client = runtime.block_on(async {
            let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
            tokio::spawn(connection);
            Ok::<_, tokio_postgres::Error>(client)
        })?;
        Ok(PgConn { runtime, client })
    }

    pub(crate) fn execute(&self, sql: &str) {
        self.runtime
            .block_on(self.client.batch_execute(sql))
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }

    pub(crate) fn query_i64(&self, sql: &str) -> i64 {
        self.runtime
            .block_on(self.client.query_one(sql, &[]))
            .and_then(|row| row.try_get(0))
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
    }
}

/// A database created for one test and dropped with this guard.
pub(crate) struct PgDatabase {
    admin_url: String,
    name: String,
    url: PostgresUrl,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

impl PgDatabase {
    pub(crate) fn create() -> PgDatabase {
        let admin_url = std::env::var(PG_URL_ENV).unwrap_or_else(|_| DEFAULT_PG_URL.to_owned());
        let name = format!(
            "fg_test_{}_{}_{:08x}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed),
            rand::random::<u32>()
        );
        off_runtime(|| {
            let admin = PgConn::connect(&admin_url).unwrap_or_else(|e| {
                panic!(
                    "PostgreSQL at {admin_url} is unreachable ({e}): the store tests need it. Start \
                     it with `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main \
                     start`, or point {PG_URL_ENV} at a server (trust auth)"
                )
            });
            // A linguistic collation (not the server's default, often C): the store must not
            // depend on the database's collation for its ordering.
            admin.execute(&format!(
                "CREATE DATABASE {name} TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US'"
            ));
        });
        let url = PostgresUrl::parse(&with_dbname(&admin_url, &name)).expect("test URL");
        PgDatabase {
            admin_url,
            name,
            url,
        }
    }

    pub(crate) fn url(&self) -> &PostgresUrl {
        &self.url
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    /// A connection to the server's admin database (for what cannot be done from inside the
    /// test database, e.g. refusing connections to it).
    pub(crate) fn admin(&self) -> PgConn {
        PgConn::connect(&self.admin_url).expect("connect to the admin database")
    }

    /// A connection of the test's own to this database.
    pub(crate) fn connect(&self) -> PgConn {
        PgConn::connect(self.url.expose()).expect("connect to the test database")
    }

    pub(crate) fn execute(&self, sql: &str) {
        off_runtime(|| self.connect().execute(sql));
    }

    pub(crate) fn query_i64(&self, sql: &str) -> i64 {
        off_runtime(|| self.connect().query_i64(sql))
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        // FORCE: a test that failed (or forgot a store on purpose) may still be connected.
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        let dropped = off_runtime(|| {
            PgConn::connect(&self.admin_url)
                .map(|admin| admin.runtime.block_on(admin.client.batch_execute(&sql)))
        });
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop test database {}: {dropped:?}", self.name);
        }
    }
}

/// `url` with its database name replaced by `name`.
fn with_dbname(url: &str, name: &str) -> String {
    let (base, params) = match url.split_once('?') {
        Some((base, params)) => (base, format!("?{params}")),
        None => (url, String::new()),
    };
    let authority = base.find("://").map_or(0, |i| i + 3);
    let path = base[authority..]
        .find('/')
        .map_or(base.len(), |i| authority + i);
    format!("{}/{name}{params}", &base[..path])
}

#[test]
fn the_test_database_name_replaces_the_one_in_the_url() {
    assert_eq!(
        with_dbname("postgres://postgres@127.0.0.1:5432/postgres", "fg_x"),
        "postgres://postgres@127.0.0.1:5432/fg_x"
    );
    assert_eq!(
        with_dbname("postgres://u:p@h?connect_timeout=3", "fg_x"),
        "postgres://u:p@h/fg_x?connect_timeout=3"
    );
}
