//! `spawn_app` and `TestApp`: the application on a random port with a
//! database of its own (a SQLite file in a temporary folder, or a fresh
//! PostgreSQL database), and one method per endpoint. `on_both_backends!`
//! turns one test body into a `sqlite` and a `postgres` test.

use std::io::Write;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use reqwest::StatusCode;
use runpilot::config::{Config, Dur, RunTypeConfig};
use runpilot::domain::RunType;
use runpilot::runtime::executor::Executors;
use runpilot::startup::Application;
use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions, SqliteRow};
use sqlx::{Connection, FromRow, PgConnection};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

pub const ADMIN_TOKEN: &str = "test-admin-token";
pub const TENANT: &str = "contoso";

/// Names the PostgreSQL server the `postgres` variants use, e.g.
/// `postgres://postgres@127.0.0.1:5432/test`; each test creates (and drops)
/// a database of its own on it. Unset: those variants return at once.
pub const POSTGRES_URL_VAR: &str = "RUNPILOT_TEST_POSTGRES_URL";

/// Every test database's name starts with this, so leftovers of a killed
/// run can be found and dropped.
const TEST_DATABASE_PREFIX: &str = "runpilot_test_";

/// A leftover test database older than this belongs to no running test
/// (the longest test waits about a minute) and is dropped.
const LEFTOVER_AGE: Duration = Duration::from_secs(30 * 60);

/// Generates `<test>::sqlite` and `<test>::postgres` from one
/// `async fn <test>(backend: Backend)`. The function keeps its sentence name
/// and stays ordinary code (formatted, linted); the macro sits above it:
///
/// ```ignore
/// on_both_backends!(a_run_whose_items_all_succeed_succeeds);
/// async fn a_run_whose_items_all_succeed_succeeds(backend: Backend) { … }
/// ```
///
/// A test module and a function may share a name: one lives in the type
/// namespace, the other in the value namespace.
macro_rules! on_both_backends {
    ($test:ident) => {
        mod $test {
            #[actix_rt::test]
            async fn sqlite() {
                super::$test($crate::helpers::Backend::Sqlite).await;
            }

            #[actix_rt::test]
            async fn postgres() {
                // Without a server this passes at once; the single test
                // `postgres_variants_need_runpilot_test_postgres_url` says so.
                if $crate::helpers::Backend::Postgres.is_available() {
                    super::$test($crate::helpers::Backend::Postgres).await;
                }
            }
        }
    };
}
pub(crate) use on_both_backends;

/// The database a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// Whether tests can run on this backend here: SQLite always,
    /// PostgreSQL when `RUNPILOT_TEST_POSTGRES_URL` names a server.
    pub fn is_available(self) -> bool {
        match self {
            Backend::Sqlite => true,
            Backend::Postgres => postgres_server().is_some(),
        }
    }
}

fn postgres_server() -> Option<String> {
    std::env::var(POSTGRES_URL_VAR)
        .ok()
        .filter(|url| !url.is_empty())
}

/// Without a PostgreSQL server every `postgres` variant passes without
/// running; this test says so, once, in the ordinary `cargo test` output.
/// libtest captures `print!`/`eprint!` of passing tests but not writes to
/// the stderr handle itself, so the line shows without `--nocapture`.
#[test]
fn postgres_variants_need_runpilot_test_postgres_url() {
    if !Backend::Postgres.is_available() {
        let _ = writeln!(
            std::io::stderr(),
            "note: the PostgreSQL tests were not run ({POSTGRES_URL_VAR} is not set; \
             the `::postgres` variants passed without running)"
        );
    }
}

/// A database that lives as long as the test: a SQLite file in a temporary
/// folder, or a PostgreSQL database created for the test and dropped when
/// this is dropped (also when the test fails: unwinding drops it too).
pub enum TestDatabase {
    Sqlite {
        /// Removed with the file when the test ends.
        dir: TempDir,
    },
    Postgres {
        /// The server's own URL (`RUNPILOT_TEST_POSTGRES_URL`), used to
        /// create and drop the test's database.
        server: String,
        /// `runpilot_test_<uuid v7>`: the prefix finds leftovers, the
        /// time inside the id tells their age.
        name: String,
    },
}

impl TestDatabase {
    pub async fn create(backend: Backend) -> TestDatabase {
        match backend {
            Backend::Sqlite => TestDatabase::Sqlite {
                dir: tempfile::tempdir().expect("temp dir"),
            },
            Backend::Postgres => {
                let server = postgres_server().expect("RUNPILOT_TEST_POSTGRES_URL is set");
                let mut admin = PgConnection::connect(&server)
                    .await
                    .unwrap_or_else(|e| panic!("{POSTGRES_URL_VAR}={server} answers: {e}"));
                drop_leftovers_once(&mut admin).await;
                let name = format!("{TEST_DATABASE_PREFIX}{}", uuid::Uuid::now_v7().simple());
                sqlx::query(&format!("CREATE DATABASE \"{name}\""))
                    .execute(&mut admin)
                    .await
                    .expect("the test database is created");
                let _ = admin.close().await;
                TestDatabase::Postgres { server, name }
            }
        }
    }

    /// The SQLite file (in the test's folder); `None` on PostgreSQL.
    pub fn sqlite_file(&self) -> Option<PathBuf> {
        match self {
            TestDatabase::Sqlite { dir } => Some(dir.path().join("data/runpilot.db")),
            TestDatabase::Postgres { .. } => None,
        }
    }

    /// The URL the application is given (`database.url`).
    pub fn url(&self) -> String {
        match self {
            TestDatabase::Sqlite { .. } => {
                let file = self.sqlite_file().expect("a SQLite file");
                format!("sqlite://{}", file.display())
            }
            TestDatabase::Postgres { server, name } => {
                let mut url = reqwest::Url::parse(server).expect("a PostgreSQL URL");
                url.set_path(&format!("/{name}"));
                url.to_string()
            }
        }
    }

    /// Runs one statement with write access: a test that sets up a state
    /// the application would leave (say, when it dies after a write).
    pub async fn execute(&self, sql: &str, binds: &[&str]) {
        match self {
            TestDatabase::Sqlite { .. } => {
                let file = self.sqlite_file().expect("a SQLite file");
                let pool =
                    sqlx::SqlitePool::connect_with(SqliteConnectOptions::new().filename(file))
                        .await
                        .expect("the database opens");
                let mut query = sqlx::query(sql);
                for value in binds {
                    query = query.bind(*value);
                }
                query
                    .execute(&pool)
                    .await
                    .unwrap_or_else(|e| panic!("{sql}: {e}"));
                pool.close().await;
            }
            TestDatabase::Postgres { .. } => {
                let pool = PgPool::connect(&self.url())
                    .await
                    .expect("the database opens");
                let mut query = sqlx::query(sql);
                for value in binds {
                    query = query.bind(*value);
                }
                query
                    .execute(&pool)
                    .await
                    .unwrap_or_else(|e| panic!("{sql}: {e}"));
                pool.close().await;
            }
        }
    }

    /// The database opened for reading only, as a test checks what was
    /// stored without being able to change it.
    pub async fn read_only(&self) -> DbReader {
        match self {
            TestDatabase::Sqlite { .. } => {
                let file = self.sqlite_file().expect("a SQLite file");
                let options = SqliteConnectOptions::new().filename(file).read_only(true);
                let pool = SqlitePoolOptions::new()
                    .max_connections(1)
                    .connect_with(options)
                    .await
                    .expect("the database opens read-only");
                DbReader::Sqlite(pool)
            }
            TestDatabase::Postgres { .. } => {
                let options = PgConnectOptions::from_str(&self.url())
                    .expect("a PostgreSQL URL")
                    .options([("default_transaction_read_only", "on")]);
                let pool = PgPoolOptions::new()
                    .max_connections(1)
                    .connect_with(options)
                    .await
                    .expect("the database opens read-only");
                DbReader::Postgres(pool)
            }
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        match self {
            // `TempDir` removes the folder itself.
            TestDatabase::Sqlite { .. } => {}
            TestDatabase::Postgres { server, name } => drop_database(server, name),
        }
    }
}

/// Drops the database on a thread of its own with a runtime of its own:
/// `Drop` cannot await, and the test's runtime may be unwinding. `FORCE`
/// ends the connections the stopped application still holds. A failure is
/// reported, not raised (a panic in `Drop` while unwinding aborts); the next
/// run drops what is left.
fn drop_database(server: &str, name: &str) {
    let (server, name) = (server.to_owned(), name.to_owned());
    let dropped = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        runtime.block_on(async {
            let mut admin = PgConnection::connect(&server)
                .await
                .map_err(|e| e.to_string())?;
            sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                .execute(&mut admin)
                .await
                .map_err(|e| e.to_string())?;
            let _ = admin.close().await;
            Ok::<_, String>(())
        })
    })
    .join();
    match dropped {
        Ok(Ok(())) => {}
        Ok(Err(e)) => eprintln!("the test database was not dropped: {e}"),
        Err(_) => eprintln!("dropping the test database panicked"),
    }
}

/// Drops the test databases a killed earlier run left behind, once per
/// process. Only old ones: another checkout's tests may be using the same
/// server right now.
async fn drop_leftovers_once(admin: &mut PgConnection) {
    static DONE: AtomicBool = AtomicBool::new(false);
    if DONE.swap(true, Ordering::SeqCst) {
        return;
    }
    let names: Vec<String> =
        sqlx::query_scalar("SELECT datname FROM pg_database WHERE starts_with(datname, $1)")
            .bind(TEST_DATABASE_PREFIX)
            .fetch_all(&mut *admin)
            .await
            .expect("the test databases are listed");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is past 1970");
    for name in names {
        let created = name
            .strip_prefix(TEST_DATABASE_PREFIX)
            .and_then(|id| uuid::Uuid::try_parse(id).ok())
            .and_then(|id| id.get_timestamp())
            .map(|t| {
                let (secs, nanos) = t.to_unix();
                Duration::new(secs, nanos)
            });
        // A name we cannot date was not made here; leave it alone.
        if created.is_some_and(|created| now.saturating_sub(created) > LEFTOVER_AGE) {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                .execute(&mut *admin)
                .await;
        }
    }
}

/// A read-only view of a test's database. The SQL in the tests is portable:
/// `$1` placeholders (sqlx's SQLite reads them too), `BIGINT`/`INTEGER`
/// columns as `i64`, text as `String`.
pub enum DbReader {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

impl DbReader {
    /// The one row `sql` returns, as a tuple; `binds` fill `$1`, `$2`, ….
    pub async fn fetch_one<T>(&self, sql: &str, binds: &[&str]) -> T
    where
        T: for<'r> FromRow<'r, SqliteRow> + for<'r> FromRow<'r, PgRow> + Send + Unpin,
    {
        let rows: Vec<T> = self.fetch_all(sql, binds).await;
        let count = rows.len();
        match <[T; 1]>::try_from(rows) {
            Ok([row]) => row,
            Err(_) => panic!("{sql}: {count} rows, not one"),
        }
    }

    /// Every row `sql` returns, as tuples.
    pub async fn fetch_all<T>(&self, sql: &str, binds: &[&str]) -> Vec<T>
    where
        T: for<'r> FromRow<'r, SqliteRow> + for<'r> FromRow<'r, PgRow> + Send + Unpin,
    {
        // One body, two drivers: the query is built the same way for each.
        macro_rules! fetch_all_on {
            ($pool:expr) => {{
                let mut query = sqlx::query_as(sql);
                for value in binds {
                    query = query.bind(*value);
                }
                query.fetch_all($pool).await
            }};
        }
        let fetched = match self {
            DbReader::Sqlite(pool) => fetch_all_on!(pool),
            DbReader::Postgres(pool) => fetch_all_on!(pool),
        };
        fetched.unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// The single number `sql` returns (a count, a column of one row).
    pub async fn fetch_i64(&self, sql: &str, binds: &[&str]) -> i64 {
        let (n,): (i64,) = self.fetch_one(sql, binds).await;
        n
    }

    pub async fn close(self) {
        match self {
            DbReader::Sqlite(pool) => pool.close().await,
            DbReader::Postgres(pool) => pool.close().await,
        }
    }
}

pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    /// Asks the application to stop as `runpilot serve` does on SIGTERM.
    stop: CancellationToken,
    /// The thread the application runs on, with an actix system of its own,
    /// so that dropping the `TestApp` can wait for a graceful stop (items
    /// in flight finished, store closed). Left to die with the test's
    /// runtime instead, its tasks would drop pooled PostgreSQL connections
    /// outside any runtime, which sqlx answers with a panic.
    server: Option<std::thread::JoinHandle<()>>,
    /// Declared last: dropped after the application stopped, then the
    /// folder is removed or the database dropped.
    db: TestDatabase,
}

/// The configuration tests start from: quick simulated items, fast retries.
pub fn test_config(database_url: String) -> Config {
    let mut config = Config::default();
    config.server.bind = "127.0.0.1:0".into();
    config.database.url = database_url;
    config.auth.admin_token = ADMIN_TOKEN.into();
    for run_type in RunType::ALL {
        config.set_run_type(
            *run_type,
            RunTypeConfig {
                delay: Dur(Duration::from_millis(20)),
                retry_base: Dur(Duration::from_millis(10)),
                retry_cap: Dur(Duration::from_millis(50)),
                ..RunTypeConfig::default()
            },
        );
    }
    config
}

pub async fn spawn_app(backend: Backend) -> TestApp {
    spawn_app_with(backend, |_| {}).await
}

/// Changes one run type's settings in a test configuration.
pub fn tune(config: &mut Config, run_type: RunType, change: impl FnOnce(&mut RunTypeConfig)) {
    let mut settings = config.run_type(run_type);
    change(&mut settings);
    config.set_run_type(run_type, settings);
}

pub async fn spawn_app_with(backend: Backend, adjust: impl FnOnce(&mut Config)) -> TestApp {
    spawn_app_with_executors(backend, adjust, |_| {}).await
}

pub async fn spawn_app_with_executors(
    backend: Backend,
    adjust: impl FnOnce(&mut Config),
    executors: impl FnOnce(&mut Executors),
) -> TestApp {
    let db = TestDatabase::create(backend).await;
    let mut config = test_config(db.url());
    adjust(&mut config);
    let mut chosen = Executors::from_config(&config);
    executors(&mut chosen);
    let (ready, built) = tokio::sync::oneshot::channel();
    let server = std::thread::spawn(move || {
        actix_rt::System::new().block_on(async move {
            let app = match Application::build_with(config, chosen).await {
                Ok(app) => app,
                Err(e) => {
                    let _ = ready.send(Err(e.to_string()));
                    return;
                }
            };
            let _ = ready.send(Ok((app.port(), app.stop_token())));
            if let Err(e) = app.run_until_stopped().await {
                eprintln!("the application stopped with an error: {e}");
            }
        });
    });
    let (port, stop) = built
        .await
        .expect("the application thread answers")
        .unwrap_or_else(|e| panic!("the application builds: {e}"));
    TestApp {
        address: format!("http://127.0.0.1:{port}"),
        client: reqwest::Client::new(),
        stop,
        server: Some(server),
        db,
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(server) = self.server.take() {
            // A panic on that thread was printed already; failing here
            // too (perhaps while unwinding) would only abort the suite.
            let _ = server.join();
        }
    }
}

/// A response's status and its JSON body (Null when it has none).
pub async fn parts(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    let text = response.text().await.expect("a body");
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    (status, body)
}

impl TestApp {
    /// The URL of the application's database (for `runpilot token …`).
    pub fn database_url(&self) -> String {
        self.db.url()
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    /// `POST /admin/t/{tenant}/runs/{type}` with a JSON body (or none).
    pub async fn start_run(
        &self,
        tenant: &str,
        run_type: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut request = self
            .client
            .post(self.url(&format!("/admin/t/{tenant}/runs/{run_type}")))
            .bearer_auth(ADMIN_TOKEN);
        if let Some(body) = body {
            request = request.json(&body);
        }
        parts(request.send().await.expect("request sent")).await
    }

    /// Starts a run that must be created; returns its id.
    pub async fn create_run(&self, run_type: &str, body: Value) -> String {
        let (status, body) = self.start_run(TENANT, run_type, Some(body)).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["run"]["id"].as_str().expect("an id").to_owned()
    }

    /// `GET /admin/t/{tenant}/runs/{type}/{id}`.
    pub async fn get_run(&self, tenant: &str, run_type: &str, id: &str) -> (StatusCode, Value) {
        let response = self
            .client
            .get(self.url(&format!("/admin/t/{tenant}/runs/{run_type}/{id}")))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("request sent");
        parts(response).await
    }

    /// `GET …/{id}/items` with a query string (may be empty).
    pub async fn list_items(&self, run_type: &str, id: &str, query: &str) -> (StatusCode, Value) {
        let response = self
            .client
            .get(self.url(&format!(
                "/admin/t/{TENANT}/runs/{run_type}/{id}/items?{query}"
            )))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("request sent");
        parts(response).await
    }

    /// `POST …/{id}/cancel`.
    pub async fn cancel_run(&self, run_type: &str, id: &str) -> (StatusCode, Value) {
        let response = self
            .client
            .post(self.url(&format!("/admin/t/{TENANT}/runs/{run_type}/{id}/cancel")))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("request sent");
        parts(response).await
    }

    /// Polls the run until `done` holds for it (at most 30 s).
    pub async fn wait_for_run(
        &self,
        run_type: &str,
        id: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        self.wait_for_tenant_run(TENANT, run_type, id, done).await
    }

    /// [`TestApp::wait_for_run`] for a run of another tenant.
    pub async fn wait_for_tenant_run(
        &self,
        tenant: &str,
        run_type: &str,
        id: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, run) = self.get_run(tenant, run_type, id).await;
            assert_eq!(status, StatusCode::OK, "{run}");
            if done(&run) {
                return run;
            }
            assert!(Instant::now() < deadline, "condition not reached: {run}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls the run until its status is terminal.
    pub async fn wait_until_finished(&self, run_type: &str, id: &str) -> Value {
        self.wait_for_run(run_type, id, is_terminal).await
    }

    /// The application's database, opened read-only.
    pub async fn read_only_db(&self) -> DbReader {
        self.db.read_only().await
    }
}

pub fn is_terminal(run: &Value) -> bool {
    matches!(
        run["status"].as_str(),
        Some("succeeded" | "failed" | "partial")
    )
}
