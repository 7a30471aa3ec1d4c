//! `spawn_app` and `TestApp`: the application on a random port with its own
//! SQLite file, and one method per endpoint.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use runpilot::config::{Config, Dur, RunTypeConfig};
use runpilot::domain::RunType;
use runpilot::runtime::executor::Executors;
use runpilot::startup::Application;
use serde_json::Value;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

pub const ADMIN_TOKEN: &str = "test-admin-token";
pub const TENANT: &str = "contoso";

pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    pub db_path: PathBuf,
    stop: CancellationToken,
    _dir: Arc<TempDir>,
}

/// The configuration tests start from: quick simulated items, fast retries.
pub fn test_config(dir: &TempDir) -> Config {
    let mut config = Config::default();
    config.server.bind = "127.0.0.1:0".into();
    config.database.url = format!("sqlite://{}", dir.path().join("runpilot.db").display());
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

pub async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Changes one run type's settings in a test configuration.
pub fn tune(config: &mut Config, run_type: RunType, change: impl FnOnce(&mut RunTypeConfig)) {
    let mut settings = config.run_type(run_type);
    change(&mut settings);
    config.set_run_type(run_type, settings);
}

pub async fn spawn_app_with(adjust: impl FnOnce(&mut Config)) -> TestApp {
    spawn_app_with_executors(adjust, |_| {}).await
}

pub async fn spawn_app_with_executors(
    adjust: impl FnOnce(&mut Config),
    executors: impl FnOnce(&mut Executors),
) -> TestApp {
    let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
    let mut config = test_config(&dir);
    adjust(&mut config);
    let db_path = dir.path().join("runpilot.db");
    let mut chosen = Executors::from_config(&config);
    executors(&mut chosen);
    let app = Application::build_with(config, chosen)
        .await
        .expect("the application builds");
    let address = format!("http://127.0.0.1:{}", app.port());
    let stop = app.stop_token();
    actix_rt::spawn(app.run_until_stopped());
    TestApp {
        address,
        client: reqwest::Client::new(),
        db_path,
        stop,
        _dir: dir,
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.stop.cancel();
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
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (status, run) = self.get_run(TENANT, run_type, id).await;
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

    /// The database file, opened read-only.
    pub async fn read_only_db(&self) -> SqlitePool {
        read_only_db(&self.db_path).await
    }
}

pub fn is_terminal(run: &Value) -> bool {
    matches!(
        run["status"].as_str(),
        Some("succeeded" | "failed" | "partial")
    )
}

pub async fn read_only_db(path: &std::path::Path) -> SqlitePool {
    let options = SqliteConnectOptions::new().filename(path).read_only(true);
    SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .expect("the database opens read-only")
}
