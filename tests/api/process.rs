//! The real binary: crash recovery after `kill -9`, graceful SIGTERM, the
//! `migrate` command and configuration errors.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::helpers::{
    ADMIN_TOKEN, Backend, TENANT, TestDatabase, is_terminal, on_both_backends, parts,
};

/// A `runpilot serve` process on a random port.
pub struct Node {
    pub child: Child,
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
    /// Starts `serve` in `dir` on the test's database, with the admin
    /// token unless `env` sets `RUNPILOT_ADMIN_TOKEN` itself.
    pub fn start(dir: &Path, db: &TestDatabase, env: &[(&str, &str)]) -> Node {
        let mut command = runpilot(dir);
        command
            .arg("serve")
            .env("RUNPILOT_BIND", "127.0.0.1:0")
            .env("RUNPILOT_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("RUNPILOT_DATABASE_URL", db.url())
            // A restart with the same node id takes its runs back at once.
            .env("RUNPILOT_CLUSTER__NODE_ID", "test-node")
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

pub fn thirty_items() -> Value {
    let items: Vec<String> = (1..=30).map(|n| format!("item-{n:02}")).collect();
    json!({"targetObjectId": "tenant-backup", "itemIds": items})
}

async fn finished_items(db: &TestDatabase) -> Vec<(String, i64)> {
    let reader = db.read_only().await;
    let rows = reader
        .fetch_all(
            "SELECT item_id, finished_at FROM run_items WHERE status = 'succeeded' \
             ORDER BY item_id",
            &[],
        )
        .await;
    reader.close().await;
    rows
}

on_both_backends!(a_run_survives_kill_9_and_ends_with_exact_counts);
async fn a_run_survives_kill_9_and_ends_with_exact_counts(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDatabase::create(backend).await;
    let slow = [("RUNPILOT_RUN_TYPES__SNAPSHOT_CAPTURE__DELAY", "300ms")];
    let mut node = Node::start(dir.path(), &db, &slow);
    let (status, created) = node.start_run(thirty_items()).await;
    assert_eq!(status, 201);
    let id = created["run"]["id"].as_str().unwrap().to_owned();
    node.wait_for(&id, |r| r["counts"]["succeeded"].as_u64().unwrap() >= 5)
        .await;

    node.child.kill().unwrap(); // SIGKILL: no chance to clean up
    node.child.wait().unwrap();
    let done_before = finished_items(&db).await;
    let reader = db.read_only().await;
    let in_flight_at_kill: Vec<String> = reader
        .fetch_all::<(String,)>(
            "SELECT item_id FROM run_items WHERE status = 'running'",
            &[],
        )
        .await
        .into_iter()
        .map(|(id,)| id)
        .collect();
    reader.close().await;
    assert!(
        done_before.len() >= 5 && done_before.len() < 30,
        "{}",
        done_before.len()
    );

    let node = Node::start(dir.path(), &db, &slow);
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
    // Items in flight at the kill ran again, as their next attempt.
    let reader = db.read_only().await;
    for item in &in_flight_at_kill {
        let attempts = reader
            .fetch_i64("SELECT attempts FROM run_items WHERE item_id = $1", &[item])
            .await;
        assert_eq!(
            attempts, 2,
            "{item}: the attempt count continues after a restart"
        );
    }
    let most = reader
        .fetch_i64("SELECT MAX(attempts) FROM run_items", &[])
        .await;
    assert!(most <= 2, "an item ran more than twice");
    reader.close().await;
}

on_both_backends!(sigterm_lets_running_items_finish_exits_0_and_the_run_resumes);
async fn sigterm_lets_running_items_finish_exits_0_and_the_run_resumes(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDatabase::create(backend).await;
    let slow = [
        ("RUNPILOT_RUN_TYPES__SNAPSHOT_CAPTURE__DELAY", "600ms"),
        ("RUNPILOT_SERVER__SHUTDOWN_GRACE", "10s"),
    ];
    let mut node = Node::start(dir.path(), &db, &slow);
    let (_, created) = node.start_run(thirty_items()).await;
    let id = created["run"]["id"].as_str().unwrap().to_owned();
    node.wait_for(&id, |r| r["counts"]["succeeded"].as_u64().unwrap() >= 4)
        .await;

    node.signal("TERM");
    let status = node.wait_exit(Duration::from_secs(12));

    assert!(status.success(), "exit status {status:?}");
    let reader = db.read_only().await;
    let running = reader
        .fetch_i64(
            "SELECT COUNT(*) FROM run_items WHERE status = 'running'",
            &[],
        )
        .await;
    assert_eq!(
        running, 0,
        "items in flight finished and were stored before exit"
    );
    reader.close().await;
    drop(node);

    let node = Node::start(dir.path(), &db, &slow);
    let run = node.wait_for(&id, is_terminal).await;
    assert_eq!(
        run["counts"],
        json!({"total": 30, "succeeded": 30, "failed": 0})
    );
}

on_both_backends!(migrate_creates_the_schema_and_can_run_again);
async fn migrate_creates_the_schema_and_can_run_again(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDatabase::create(backend).await;

    for _ in 0..2 {
        let output = runpilot(dir.path())
            .arg("migrate")
            .env("RUNPILOT_DATABASE_URL", db.url())
            // A restart with the same node id takes its runs back at once.
            .env("RUNPILOT_CLUSTER__NODE_ID", "test-node")
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
    }

    let reader = db.read_only().await;
    let runs = reader.fetch_i64("SELECT COUNT(*) FROM runs", &[]).await;
    let items = reader
        .fetch_i64("SELECT COUNT(*) FROM run_items", &[])
        .await;
    assert_eq!((runs, items), (0, 0));
    reader.close().await;
}

#[actix_rt::test]
async fn migrate_creates_the_sqlite_file_and_its_folder() {
    let dir = tempfile::tempdir().unwrap();
    let output = runpilot(dir.path())
        .arg("migrate")
        .env("RUNPILOT_DATABASE_URL", "sqlite://nested/deeper/r.db")
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let file = dir.path().join("nested/deeper/r.db");
    assert!(file.exists());
    // WAL is a property of the file: every later connection sees it.
    let pool = sqlx::SqlitePool::connect_with(
        sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&file)
            .read_only(true),
    )
    .await
    .unwrap();
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(mode, "wal");
    pool.close().await;
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

on_both_backends!(a_cancel_stored_before_a_crash_still_holds_after_the_restart);
async fn a_cancel_stored_before_a_crash_still_holds_after_the_restart(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDatabase::create(backend).await;
    let slow = [("RUNPILOT_RUN_TYPES__SNAPSHOT_CAPTURE__DELAY", "300ms")];
    let mut node = Node::start(dir.path(), &db, &slow);
    let (_, created) = node.start_run(thirty_items()).await;
    let id = created["run"]["id"].as_str().unwrap().to_owned();
    node.wait_for(&id, |r| r["counts"]["succeeded"].as_u64().unwrap() >= 2)
        .await;
    node.child.kill().unwrap();
    node.child.wait().unwrap();
    // The state a cancel leaves when the process dies right after storing it.
    db.execute(
        "UPDATE runs SET cancel_requested = TRUE WHERE id = $1",
        &[&id],
    )
    .await;

    let node = Node::start(dir.path(), &db, &slow);
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
    let reader = db.read_only().await;
    let unfinished = reader
        .fetch_i64(
            "SELECT COUNT(*) FROM run_items WHERE status IN ('pending', 'running')",
            &[],
        )
        .await;
    assert_eq!(unfinished, 0);
    reader.close().await;
}
