//! Several `runpilot serve` processes on one PostgreSQL database: de-dup
//! across nodes, takeover of a dead node's runs, the epoch fence against a
//! stalled node, and a store that goes away mid-run. These run only with
//! `RUNPILOT_TEST_POSTGRES_URL` (the embedded store serves one process).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::helpers::{ADMIN_TOKEN, Backend, TENANT, TestDatabase, is_terminal};
use crate::process::{Node, thirty_items};

/// Short leases so that takeovers happen within a test.
const LEASE: Duration = Duration::from_secs(2);
const HEARTBEAT: Duration = Duration::from_millis(300);

fn node_env(node_id: &'static str) -> Vec<(&'static str, &'static str)> {
    vec![
        ("RUNPILOT_CLUSTER__NODE_ID", node_id),
        ("RUNPILOT_CLUSTER__LEASE", "2s"),
        ("RUNPILOT_CLUSTER__HEARTBEAT", "300ms"),
        ("RUNPILOT_RUN_TYPES__SNAPSHOT_CAPTURE__DELAY", "200ms"),
    ]
}

/// A fresh PostgreSQL database, or `None` (the test then does nothing).
async fn postgres() -> Option<TestDatabase> {
    if Backend::Postgres.is_available() {
        Some(TestDatabase::create(Backend::Postgres).await)
    } else {
        None
    }
}

fn count(run: &Value, field: &str) -> u64 {
    run["counts"][field].as_u64().unwrap()
}

/// Exact counts: every item once, in succeeded, and no item succeeded twice.
async fn assert_counted_once(db: &TestDatabase, id: &str) {
    let reader = db.read_only().await;
    let (total, succeeded, failed): (i64, i64, i64) = reader
        .fetch_one(
            "SELECT total, succeeded, failed FROM runs WHERE id = $1",
            &[id],
        )
        .await;
    assert_eq!((total, succeeded, failed), (30, 30, 0));
    let items = reader
        .fetch_i64(
            "SELECT COUNT(*) FROM run_items WHERE run_id = $1 AND status = 'succeeded'",
            &[id],
        )
        .await;
    assert_eq!(items, 30);
    let twice = reader
        .fetch_i64(
            "SELECT COUNT(*) FROM (SELECT item_id FROM run_item_attempts WHERE run_id = $1 \
             AND outcome = 'succeeded' GROUP BY item_id HAVING COUNT(*) > 1) AS t",
            &[id],
        )
        .await;
    assert_eq!(twice, 0, "an item was counted twice");
    reader.close().await;
}

#[actix_rt::test]
async fn fifty_concurrent_starts_over_two_nodes_make_exactly_one_run() {
    let Some(db) = postgres().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let a = Node::start(dir.path(), &db, &node_env("node-a"));
    let b = Node::start(dir.path(), &db, &node_env("node-b"));
    let body = json!({"targetObjectId": "policy-7", "itemIds": ["x", "y"]});

    let answers = join_all((0..50).map(|n| {
        let node = if n % 2 == 0 { &a } else { &b };
        node.start_run(body.clone())
    }))
    .await;

    let created = answers.iter().filter(|(s, _)| *s == 201).count();
    let reused = answers.iter().filter(|(s, _)| *s == 200).count();
    assert_eq!((created, reused), (1, 49), "{answers:?}");
    let ids: HashSet<_> = answers
        .iter()
        .map(|(_, b)| b["run"]["id"].clone())
        .collect();
    assert_eq!(ids.len(), 1);
}

#[actix_rt::test]
async fn a_killed_nodes_run_is_taken_over_and_ends_with_exact_counts() {
    let Some(db) = postgres().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let mut a = Node::start(dir.path(), &db, &node_env("node-a"));
    let b = Node::start(dir.path(), &db, &node_env("node-b"));
    let (status, created) = a.start_run(thirty_items()).await;
    assert_eq!(status, 201);
    let id = created["run"]["id"].as_str().unwrap().to_owned();
    a.wait_for(&id, |r| count(r, "succeeded") >= 5).await;

    a.child.kill().unwrap();
    a.child.wait().unwrap();
    let killed = Instant::now();
    let at_kill = count(&b.get_run(&id).await, "succeeded");
    // Node B answers from the store, which moves again once B took over.
    b.wait_for(&id, |r| count(r, "succeeded") > at_kill + 1)
        .await;
    let takeover = killed.elapsed();
    let run = b.wait_for(&id, is_terminal).await;

    assert_eq!(run["status"], "succeeded", "{run}");
    assert_counted_once(&db, &id).await;
    assert!(
        b.logs
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("took over")),
        "node B logs the takeover"
    );
    eprintln!("takeover after kill -9: {takeover:?} (lease {LEASE:?}, heartbeat {HEARTBEAT:?})");
    assert!(
        takeover < LEASE + HEARTBEAT + Duration::from_secs(3),
        "{takeover:?}"
    );
}

#[actix_rt::test]
async fn a_stalled_node_cannot_overwrite_its_successor() {
    let Some(db) = postgres().await else { return };
    let dir = tempfile::tempdir().unwrap();
    let a = Node::start(dir.path(), &db, &node_env("node-a"));
    let b = Node::start(dir.path(), &db, &node_env("node-b"));
    let (_, created) = a.start_run(thirty_items()).await;
    let id = created["run"]["id"].as_str().unwrap().to_owned();
    a.wait_for(&id, |r| count(r, "succeeded") >= 4).await;

    a.signal("STOP"); // a paused process: its attempts are mid-flight
    let at_stop = count(&b.get_run(&id).await, "succeeded");
    b.wait_for(&id, |r| count(r, "succeeded") > at_stop + 1)
        .await;
    a.signal("CONT");
    let run = b.wait_for(&id, is_terminal).await;

    assert_eq!(run["status"], "succeeded", "{run}");
    assert_counted_once(&db, &id).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !a
        .logs
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("no longer holds the run"))
    {
        assert!(
            Instant::now() < deadline,
            "node A never found out it lost the run"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[actix_rt::test]
async fn a_cancel_sent_to_another_node_stops_the_run_where_it_executes() {
    let Some(db) = postgres().await else { return };
    let dir = tempfile::tempdir().unwrap();
    // Items slow enough that the run is still going when the cancel, stored
    // through node B, reaches node A at A's next heartbeat.
    let mut slow = node_env("node-a");
    slow.push(("RUNPILOT_RUN_TYPES__SNAPSHOT_CAPTURE__DELAY", "500ms"));
    let a = Node::start(dir.path(), &db, &slow);
    let b = Node::start(dir.path(), &db, &node_env("node-b"));
    let (_, created) = a.start_run(thirty_items()).await;
    let id = created["run"]["id"].as_str().unwrap().to_owned();
    a.wait_for(&id, |r| count(r, "succeeded") >= 2).await;

    let response = reqwest::Client::new()
        .post(format!(
            "{}/admin/t/{TENANT}/runs/snapshot_capture/{id}/cancel",
            b.address
        ))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let run = a.wait_for(&id, is_terminal).await;

    assert_eq!(run["safeError"]["code"], "canceled", "{run}");
    let done = count(&run, "succeeded");
    assert!(done < 30);
    assert_eq!(run["safeError"]["context"]["canceledItems"], 30 - done);
}

/// A TCP proxy to PostgreSQL that a test can cut and restore.
struct Proxy {
    port: u16,
    down: Arc<AtomicBool>,
    /// Cancelled to close every connection open through the proxy.
    cut: Arc<Mutex<CancellationToken>>,
    stop: CancellationToken,
}

impl Proxy {
    /// Runs on a thread of its own: the test thread blocks while a node starts.
    fn start(upstream: SocketAddr) -> Proxy {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let port = std_listener.local_addr().unwrap().port();
        let down = Arc::new(AtomicBool::new(false));
        let cut = Arc::new(Mutex::new(CancellationToken::new()));
        let stop = CancellationToken::new();
        let (d, c, s) = (down.clone(), cut.clone(), stop.clone());
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let local = tokio::task::LocalSet::new();
            local.block_on(&runtime, async move {
                let listener = TcpListener::from_std(std_listener).unwrap();
                loop {
                    let accepted = tokio::select! {
                        accepted = listener.accept() => accepted,
                        () = s.cancelled() => break,
                    };
                    let Ok((mut client, _)) = accepted else {
                        continue;
                    };
                    if d.load(Ordering::SeqCst) {
                        continue; // dropped: the connection is refused
                    }
                    let token = c.lock().unwrap().clone();
                    tokio::task::spawn_local(async move {
                        let Ok(mut server) = TcpStream::connect(upstream).await else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                            () = token.cancelled() => {}
                        }
                    });
                }
            });
        });
        Proxy {
            port,
            down,
            cut,
            stop,
        }
    }

    fn cut(&self) {
        self.down.store(true, Ordering::SeqCst);
        let mut token = self.cut.lock().unwrap();
        token.cancel();
        *token = CancellationToken::new();
    }

    fn restore(&self) {
        self.down.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.cut.lock().unwrap().cancel();
    }
}

#[actix_rt::test]
async fn a_store_that_goes_away_mid_run_means_503s_then_exact_counts() {
    let Some(db) = postgres().await else { return };
    let mut url = reqwest::Url::parse(&db.url()).unwrap();
    let upstream: SocketAddr =
        format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5432))
            .parse()
            .unwrap();
    let proxy = Proxy::start(upstream);
    url.set_port(Some(proxy.port)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut env = node_env("node-a");
    let proxied = url.to_string();
    env.push(("RUNPILOT_DATABASE_URL", proxied.as_str()));
    // The store is away for less than a lease: the node keeps its runs.
    env.push(("RUNPILOT_CLUSTER__LEASE", "30s"));
    let mut node = Node::start(dir.path(), &db, &env);
    let (_, created) = node.start_run(thirty_items()).await;
    let id = created["run"]["id"].as_str().unwrap().to_owned();
    node.wait_for(&id, |r| count(r, "succeeded") >= 4).await;

    proxy.cut();
    let (status, problem) = node
        .start_run(json!({"targetObjectId": "another", "itemIds": ["z"]}))
        .await;
    assert_eq!(status, 503, "{problem}");
    assert_eq!(problem["code"], "store_unavailable");
    let retry_after = reqwest::Client::new()
        .post(format!(
            "{}/admin/t/{TENANT}/runs/restore_preview",
            node.address
        ))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(retry_after.status(), 503);
    assert!(retry_after.headers().contains_key("retry-after"));
    let stalled = count(&node.get_run(&id).await, "succeeded");
    tokio::time::sleep(Duration::from_millis(1500)).await; // the store stays away a while
    let during = node.get_run(&id).await;
    assert_eq!(
        count(&during, "succeeded"),
        stalled,
        "nothing is reported before it is stored"
    );
    proxy.restore();
    let run = node.wait_for(&id, is_terminal).await;

    assert_eq!(run["status"], "succeeded", "{run}");
    assert_counted_once(&db, &id).await;
    assert!(
        node.child.try_wait().unwrap().is_none(),
        "the process kept running"
    );
}
