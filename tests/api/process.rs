//! The real binary: crash recovery after `kill -9`, graceful SIGTERM, the
//! `migrate` command and configuration errors.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::helpers::{ADMIN_TOKEN, TENANT, is_terminal, parts, read_only_db};

/// A `runpilot serve` process on a random port.
pub struct Node {
    child: Child,
    pub address: String,
    /// Every line the process wrote to stderr (its logs).
    pub logs: Arc<Mutex<Vec<String>>>,
    /// Every line the process wrote to stdout.
    pub out: Arc<Mutex<Vec<String>>>,
    client: reqwest::Client,
}

/// Collects a pipe's lines; sends the port of the "listening" line.
fn collect_lines(
    pipe: impl std::io::Read + Send + 'static,
    lines: Arc<Mutex<Vec<String>>>,
    port: mpsc::Sender<String>,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            if line.contains("listening")
                && let Some(p) = line.split("port=").nth(1)
            {
                let _ = port.send(p.trim().to_owned());
            }
            lines.lock().unwrap().push(line);
        }
    });
}

/// The binary, in `dir`, with a clean environment.
pub fn runpilot(dir: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_runpilot"));
    command
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "info");
    command
}

impl Node {
    /// Starts `serve` in `dir` (its database under `dir/data`), with the
    /// admin token unless `env` sets `RUNPILOT_ADMIN_TOKEN` itself.
    pub fn start(dir: &Path, env: &[(&str, &str)]) -> Node {
        let mut command = runpilot(dir);
        command
            .arg("serve")
            .env("RUNPILOT_BIND", "127.0.0.1:0")
            .env("RUNPILOT_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("RUNPILOT_DATABASE_URL", "sqlite://data/runpilot.db")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("runpilot starts");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let out = Arc::new(Mutex::new(Vec::new()));
        let (port_tx, port_rx) = mpsc::channel();
        collect_lines(child.stderr.take().unwrap(), logs.clone(), port_tx.clone());
        collect_lines(child.stdout.take().unwrap(), out.clone(), port_tx);
        let port = port_rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("no listening line: {:?}", logs.lock().unwrap()));
        Node {
            child,
            address: format!("http://127.0.0.1:{port}"),
            logs,
            out,
            client: reqwest::Client::new(),
        }
    }

    pub async fn start_run(&self, body: Value) -> (reqwest::StatusCode, Value) {
        let response = self
            .client
            .post(format!(
                "{}/admin/t/{TENANT}/runs/snapshot_capture",
                self.address
            ))
            .bearer_auth(ADMIN_TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        parts(response).await
    }

    pub async fn get_run(&self, id: &str) -> Value {
        let response = self
            .client
            .get(format!(
                "{}/admin/t/{TENANT}/runs/snapshot_capture/{id}",
                self.address
            ))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        let (status, body) = parts(response).await;
        assert_eq!(status, 200, "{body}");
        body
    }

    pub async fn wait_for(&self, id: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let run = self.get_run(id).await;
            if done(&run) {
                return run;
            }
            assert!(Instant::now() < deadline, "not reached: {run}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the process did not exit in {within:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn thirty_items() -> Value {
    let items: Vec<String> = (1..=30).map(|n| format!("item-{n:02}")).collect();
    json!({"targetObjectId": "tenant-backup", "itemIds": items})
}

async fn finished_items(db: &Path) -> Vec<(String, i64)> {
    let pool = read_only_db(db).await;
    let rows = sqlx::query_as(
        "SELECT item_id, finished_at FROM run_items WHERE status = 'succeeded' ORDER BY item_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    pool.close().await;
    rows
}

#[actix_rt::test]
async fn a_run_survives_kill_9_and_ends_with_exact_counts() {
    let dir = tempfile::tempdir().unwrap();
    let slow = [("RUNPILOT_RUN_TYPES__SNAPSHOT_CAPTURE__DELAY", "300ms")];
    let mut node = Node::start(dir.path(), &slow);
    let (status, created) = node.start_run(thirty_items()).await;
    assert_eq!(status, 201);
    let id = created["run"]["id"].as_str().unwrap().to_owned();
    node.wait_for(&id, |r| r["counts"]["succeeded"].as_u64().unwrap() >= 5)
        .await;

    node.child.kill().unwrap(); // SIGKILL: no chance to clean up
    node.child.wait().unwrap();
    let db = dir.path().join("data/runpilot.db");
    let done_before = finished_items(&db).await;
    assert!(
        done_before.len() >= 5 && done_before.len() < 30,
        "{}",
        done_before.len()
    );

    let node = Node::start(dir.path(), &slow);
    // The same start after the restart finds the same, still active, run.
    let (status, again) = node.start_run(thirty_items()).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["run"]["id"], id.as_str());
    let run = node.wait_for(&id, is_terminal).await;

    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(
        run["counts"],
        json!({"total": 30, "succeeded": 30, "failed": 0})
    );
    let done_after = finished_items(&db).await;
    assert_eq!(done_after.len(), 30);
    for item in &done_before {
        assert!(
            done_after.contains(item),
            "{item:?} was done again after the restart"
        );
    }
    assert!(
        node.logs
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("run recovered")),
        "the restart logs the recovery"
    );
}

#[actix_rt::test]
async fn sigterm_lets_running_items_finish_exits_0_and_the_run_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let slow = [
        ("RUNPILOT_RUN_TYPES__SNAPSHOT_CAPTURE__DELAY", "600ms"),
        ("RUNPILOT_SERVER__SHUTDOWN_GRACE", "10s"),
    ];
    let mut node = Node::start(dir.path(), &slow);
    let (_, created) = node.start_run(thirty_items()).await;
    let id = created["run"]["id"].as_str().unwrap().to_owned();
    node.wait_for(&id, |r| r["counts"]["succeeded"].as_u64().unwrap() >= 4)
        .await;

    node.signal("TERM");
    let status = node.wait_exit(Duration::from_secs(12));

    assert!(status.success(), "exit status {status:?}");
    let db = dir.path().join("data/runpilot.db");
    let pool = read_only_db(&db).await;
    let running: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM run_items WHERE status = 'running'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        running, 0,
        "items in flight finished and were stored before exit"
    );
    pool.close().await;
    drop(node);

    let node = Node::start(dir.path(), &slow);
    let run = node.wait_for(&id, is_terminal).await;
    assert_eq!(
        run["counts"],
        json!({"total": 30, "succeeded": 30, "failed": 0})
    );
}

#[test]
fn migrate_creates_the_database_and_its_folder() {
    let dir = tempfile::tempdir().unwrap();
    let output = runpilot(dir.path())
        .arg("migrate")
        .env("RUNPILOT_DATABASE_URL", "sqlite://nested/deeper/r.db")
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    assert!(dir.path().join("nested/deeper/r.db").exists());
}

#[test]
fn a_bad_setting_stops_start_up_naming_the_key_and_the_source() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("config")).unwrap();
    std::fs::write(
        dir.path().join("config/runpilot.toml"),
        "[limits]\nmax_items_in_flight = 8\ncolour = \"blue\"\n",
    )
    .unwrap();
    let output = runpilot(dir.path()).arg("serve").output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("colour") && stderr.contains("config/runpilot.toml"),
        "{stderr}"
    );

    let output = runpilot(dir.path())
        .args(["--config", "config/runpilot.toml", "serve"])
        .output()
        .unwrap();
    assert!(!output.status.success());

    std::fs::write(dir.path().join("config/runpilot.toml"), "").unwrap();
    let output = runpilot(dir.path())
        .arg("serve")
        .env("RUNPILOT_SERVER__SHUTDOWN_GRACE", "soon")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("RUNPILOT_SERVER__SHUTDOWN_GRACE"),
        "{stderr}"
    );
}

#[actix_rt::test]
async fn a_cancel_stored_before_a_crash_still_holds_after_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let slow = [("RUNPILOT_RUN_TYPES__SNAPSHOT_CAPTURE__DELAY", "300ms")];
    let mut node = Node::start(dir.path(), &slow);
    let (_, created) = node.start_run(thirty_items()).await;
    let id = created["run"]["id"].as_str().unwrap().to_owned();
    node.wait_for(&id, |r| r["counts"]["succeeded"].as_u64().unwrap() >= 2)
        .await;
    node.child.kill().unwrap();
    node.child.wait().unwrap();
    // The state a cancel leaves when the process dies right after storing it.
    let db = dir.path().join("data/runpilot.db");
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(&db);
    let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
    sqlx::query("UPDATE runs SET cancel_requested = 1 WHERE id = $1")
        .bind(&id)
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;

    let node = Node::start(dir.path(), &slow);
    let run = node.wait_for(&id, is_terminal).await;

    assert_eq!(run["safeError"]["code"], "canceled", "{run}");
    let done = run["counts"]["succeeded"].as_u64().unwrap();
    assert!((2..30).contains(&done));
    assert_eq!(
        run["safeError"]["context"]["canceledItems"]
            .as_u64()
            .unwrap(),
        30 - done
    );
    let pool = read_only_db(&db).await;
    let unfinished: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM run_items WHERE status IN ('pending', 'running')")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(unfinished, 0);
}
