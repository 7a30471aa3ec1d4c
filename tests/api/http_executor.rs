//! The `http` executor against a real worker: an actix-web server started by
//! each test on 127.0.0.1 port 0, answering as the test scripts it and
//! recording what it received.

use std::collections::HashMap;
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::dev::ServerHandle;
use actix_web::{App, HttpRequest, HttpResponse, HttpServer, web};
use runpilot::config::{Dur, ExecutorKind, RunTypeConfig};
use runpilot::domain::RunType;
use serde_json::{Value, json};

use crate::helpers::{Backend, TestApp, is_terminal, on_both_backends, spawn_app_with};

const RUN_TYPE: &str = "restore_execute";

/// One request as the worker received it.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    /// Header names in lower case.
    headers: HashMap<String, String>,
    body: Value,
    /// 1 for the first request with this path and `Idempotency-Key`, 2 for
    /// the next, …
    nth: usize,
    received: Instant,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// What the worker answers, and after how long.
struct Reply {
    status: u16,
    body: Option<Value>,
    retry_after: Option<&'static str>,
    delay: Duration,
}

impl Reply {
    fn status(status: u16) -> Self {
        Self {
            status,
            body: None,
            retry_after: None,
            delay: Duration::ZERO,
        }
    }

    fn ok() -> Self {
        Self::status(200).json(json!({"ok": true}))
    }

    fn json(mut self, body: Value) -> Self {
        self.body = Some(body);
        self
    }

    fn retry_after(mut self, value: &'static str) -> Self {
        self.retry_after = Some(value);
        self
    }

    fn after(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

type Script = dyn Fn(&Seen) -> Reply + Send + Sync;

struct WorkerState {
    script: Box<Script>,
    seen: Mutex<Vec<Seen>>,
    /// When each answer left, with its status.
    answered: Mutex<Vec<(u16, Instant)>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

/// A worker on a random port; stops when dropped.
struct Worker {
    base: String,
    state: Arc<WorkerState>,
    handle: ServerHandle,
}

impl Worker {
    fn start(script: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> Self {
        let state = Arc::new(WorkerState {
            script: Box::new(script),
            seen: Mutex::new(Vec::new()),
            answered: Mutex::new(Vec::new()),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        });
        let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
        let port = listener.local_addr().expect("an address").port();
        let data = web::Data::from(state.clone());
        let server = HttpServer::new(move || {
            App::new()
                .app_data(data.clone())
                .default_service(web::to(answer))
        })
        .workers(1)
        .disable_signals()
        .listen(listener)
        .expect("the worker listens")
        .run();
        let handle = server.handle();
        actix_rt::spawn(server);
        Self {
            base: format!("http://127.0.0.1:{port}"),
            state,
            handle,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    fn seen_at(&self, path: &str) -> Vec<Seen> {
        self.seen().into_iter().filter(|s| s.path == path).collect()
    }

    fn answered(&self) -> Vec<(u16, Instant)> {
        self.state.answered.lock().unwrap().clone()
    }

    fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // The stop command is sent at once; hung handlers are not waited for.
        let _stopping = self.handle.stop(false);
    }
}

async fn answer(
    request: HttpRequest,
    body: web::Bytes,
    state: web::Data<WorkerState>,
) -> HttpResponse {
    let in_flight = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    state.max_in_flight.fetch_max(in_flight, Ordering::SeqCst);
    let headers: HashMap<String, String> = request
        .headers()
        .iter()
        .map(|(name, value)| {
            (
                name.as_str().to_owned(),
                value.to_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let seen = {
        let mut all = state.seen.lock().unwrap();
        let path = request.path().to_owned();
        let key = headers.get("idempotency-key").cloned();
        let nth = 1 + all
            .iter()
            .filter(|s| s.path == path && s.headers.get("idempotency-key") == key.as_ref())
            .count();
        let seen = Seen {
            path,
            headers,
            body: serde_json::from_slice(&body).unwrap_or(Value::Null),
            nth,
            received: Instant::now(),
        };
        all.push(seen.clone());
        seen
    };
    let reply = (state.script)(&seen);
    if !reply.delay.is_zero() {
        // The worker's own work; the only sleeping in these tests.
        tokio::time::sleep(reply.delay).await;
    }
    let mut response =
        HttpResponse::build(actix_web::http::StatusCode::from_u16(reply.status).expect("a status"));
    if let Some(value) = reply.retry_after {
        response.insert_header(("Retry-After", value));
    }
    state.in_flight.fetch_sub(1, Ordering::SeqCst);
    state
        .answered
        .lock()
        .unwrap()
        .push((reply.status, Instant::now()));
    match reply.body {
        Some(body) => response.json(body),
        None => response.finish(),
    }
}

/// The application with `restore_execute` on the http executor.
async fn spawn_app_on(
    backend: Backend,
    worker: &Worker,
    adjust: impl FnOnce(&mut RunTypeConfig),
) -> TestApp {
    let url = worker.url("/items");
    spawn_app_with(backend, move |c| {
        let mut s = c.run_type(RunType::RestoreExecute);
        s.executor = ExecutorKind::Http;
        s.url = Some(url);
        adjust(&mut s);
        c.set_run_type(RunType::RestoreExecute, s);
    })
    .await
}

/// One item's attempts, last error code and context, from the database.
async fn item_row(app: &TestApp, run_id: &str, item: &str) -> (i64, Option<String>, Value) {
    let db = app.read_only_db().await;
    let (attempts, code, context): (i64, Option<String>, Option<String>) = db
        .fetch_one(
            "SELECT attempts, last_error_code, last_error_context FROM run_items
             WHERE run_id = $1 AND item_id = $2",
            &[run_id, item],
        )
        .await;
    let context = context
        .and_then(|c| serde_json::from_str(&c).ok())
        .unwrap_or(Value::Null);
    (attempts, code, context)
}

on_both_backends!(the_worker_receives_the_idempotency_key_and_every_field);
async fn the_worker_receives_the_idempotency_key_and_every_field(backend: Backend) {
    let worker = Worker::start(|_| Reply::ok());
    let app = spawn_app_on(backend, &worker, |_| {}).await;
    let id = app
        .create_run(
            RUN_TYPE,
            json!({"targetObjectId": "policy-42", "payloadHash": "v7", "itemIds": ["setting-1"]}),
        )
        .await;

    let run = app.wait_until_finished(RUN_TYPE, &id).await;

    assert_eq!(run["status"], "succeeded", "{run}");
    let seen = worker.seen_at("/items");
    assert_eq!(seen.len(), 1, "{seen:?}");
    let idempotency_key = format!("{id}:setting-1");
    assert_eq!(
        seen[0].header("idempotency-key"),
        Some(idempotency_key.as_str())
    );
    assert_eq!(seen[0].header("content-type"), Some("application/json"));
    assert_eq!(
        seen[0].body,
        json!({
            "tenantExternalId": "contoso",
            "runType": "restore_execute",
            "runId": id,
            "itemId": "setting-1",
            "targetObjectId": "policy-42",
            "payloadHash": "v7",
            "attempt": 1
        })
    );
}

on_both_backends!(a_503_then_a_200_succeeds_on_the_second_attempt);
async fn a_503_then_a_200_succeeds_on_the_second_attempt(backend: Backend) {
    let worker = Worker::start(|seen| match seen.nth {
        1 => Reply::status(503),
        _ => Reply::ok(),
    });
    let app = spawn_app_on(backend, &worker, |_| {}).await;
    let id = app.create_run(RUN_TYPE, json!({"itemIds": ["a"]})).await;

    let run = app.wait_until_finished(RUN_TYPE, &id).await;

    assert_eq!(run["status"], "succeeded", "{run}");
    let (attempts, _, _) = item_row(&app, &id, "a").await;
    assert_eq!(attempts, 2);
    let sent: Vec<_> = worker
        .seen_at("/items")
        .iter()
        .map(|s| s.body["attempt"].clone())
        .collect();
    assert_eq!(sent, [json!(1), json!(2)]);
}

on_both_backends!(a_429_is_retried_no_sooner_than_its_retry_after);
async fn a_429_is_retried_no_sooner_than_its_retry_after(backend: Backend) {
    let worker = Worker::start(|seen| match seen.nth {
        1 => Reply::status(429).retry_after("1"),
        _ => Reply::ok(),
    });
    // The test configuration caps waits at 50ms; let the hint through.
    let app = spawn_app_on(backend, &worker, |s| {
        s.retry_cap = Dur(Duration::from_secs(10))
    })
    .await;
    let id = app.create_run(RUN_TYPE, json!({"itemIds": ["a"]})).await;

    let run = app.wait_until_finished(RUN_TYPE, &id).await;

    assert_eq!(run["status"], "succeeded", "{run}");
    let answered = worker.answered();
    let seen = worker.seen_at("/items");
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(answered[0].0, 429);
    let waited = seen[1].received.duration_since(answered[0].1);
    assert!(waited >= Duration::from_secs(1), "retried after {waited:?}");
}

on_both_backends!(a_422_with_a_code_fails_the_item_at_once_with_that_code);
async fn a_422_with_a_code_fails_the_item_at_once_with_that_code(backend: Backend) {
    let worker = Worker::start(|_| Reply::status(422).json(json!({"code": "policy_invalid"})));
    let app = spawn_app_on(backend, &worker, |_| {}).await;
    let id = app.create_run(RUN_TYPE, json!({"itemIds": ["a"]})).await;

    let run = app.wait_until_finished(RUN_TYPE, &id).await;

    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(run["safeError"]["code"], "all_items_failed");
    let (attempts, code, context) = item_row(&app, &id, "a").await;
    assert_eq!(attempts, 1);
    assert_eq!(code.as_deref(), Some("policy_invalid"));
    assert_eq!(context, json!({"status": 422}));
    assert_eq!(worker.seen_at("/items").len(), 1);
}

on_both_backends!(a_worker_that_hangs_past_item_timeout_is_retried_then_fails_with_timeout);
async fn a_worker_that_hangs_past_item_timeout_is_retried_then_fails_with_timeout(
    backend: Backend,
) {
    let worker = Worker::start(|_| Reply::ok().after(Duration::from_secs(30)));
    let app = spawn_app_on(backend, &worker, |s| {
        s.item_timeout = Dur(Duration::from_millis(300));
        s.max_attempts = 2;
    })
    .await;
    let id = app.create_run(RUN_TYPE, json!({"itemIds": ["a"]})).await;

    let run = app.wait_until_finished(RUN_TYPE, &id).await;

    assert_eq!(run["status"], "failed", "{run}");
    let (attempts, code, _) = item_row(&app, &id, "a").await;
    assert_eq!((attempts, code.as_deref()), (2, Some("timeout")));
    assert_eq!(worker.seen_at("/items").len(), 2);
}

on_both_backends!(an_unreachable_worker_is_retried_then_fails_with_connection_failed);
async fn an_unreachable_worker_is_retried_then_fails_with_connection_failed(backend: Backend) {
    // A port that was free a moment ago: nothing listens there now.
    let port = {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
        listener.local_addr().expect("an address").port()
    };
    let app = spawn_app_with(backend, |c| {
        let mut s = c.run_type(RunType::RestoreExecute);
        s.executor = ExecutorKind::Http;
        s.url = Some(format!("http://127.0.0.1:{port}/items"));
        s.max_attempts = 2;
        c.set_run_type(RunType::RestoreExecute, s);
    })
    .await;
    let id = app.create_run(RUN_TYPE, json!({"itemIds": ["a"]})).await;

    let run = app.wait_until_finished(RUN_TYPE, &id).await;

    assert_eq!(run["status"], "failed", "{run}");
    let (attempts, code, context) = item_row(&app, &id, "a").await;
    assert_eq!((attempts, code.as_deref()), (2, Some("connection_failed")));
    assert!(
        !context.to_string().contains("127.0.0.1"),
        "no URL in {context}"
    );
}

on_both_backends!(a_run_without_item_ids_is_planned_by_the_plan_endpoint);
async fn a_run_without_item_ids_is_planned_by_the_plan_endpoint(backend: Backend) {
    let worker = Worker::start(|seen| match seen.path.as_str() {
        "/plan" => Reply::ok().json(json!({"itemIds": ["p1", "p2", "p3"]})),
        _ => Reply::ok(),
    });
    let plan_url = worker.url("/plan");
    let app = spawn_app_on(backend, &worker, |s| s.plan_url = Some(plan_url)).await;
    let id = app
        .create_run(
            RUN_TYPE,
            json!({"targetObjectId": "policy-42", "payloadHash": "v7"}),
        )
        .await;

    let run = app.wait_until_finished(RUN_TYPE, &id).await;

    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(
        run["counts"],
        json!({"total": 3, "succeeded": 3, "failed": 0})
    );
    let plans = worker.seen_at("/plan");
    assert_eq!(plans.len(), 1);
    assert_eq!(
        plans[0].body,
        json!({
            "tenantExternalId": "contoso",
            "runType": "restore_execute",
            "runId": id,
            "targetObjectId": "policy-42",
            "payloadHash": "v7"
        })
    );
    let mut items: Vec<_> = worker
        .seen_at("/items")
        .iter()
        .map(|s| s.body["itemId"].as_str().unwrap_or_default().to_owned())
        .collect();
    items.sort();
    assert_eq!(items, ["p1", "p2", "p3"]);
}

on_both_backends!(a_malformed_plan_fails_the_run_with_plan_failed);
async fn a_malformed_plan_fails_the_run_with_plan_failed(backend: Backend) {
    // The target names the malformed answer the worker gives.
    let worker = Worker::start(|seen| match seen.body["targetObjectId"].as_str() {
        Some("numbers") => Reply::ok().json(json!({"itemIds": [1]})),
        _ => Reply::ok().json(json!({"items": []})),
    });
    let plan_url = worker.url("/plan");
    let app = spawn_app_on(backend, &worker, |s| s.plan_url = Some(plan_url)).await;

    for target in ["numbers", "wrong-key"] {
        let id = app
            .create_run(RUN_TYPE, json!({"targetObjectId": target}))
            .await;
        let run = app.wait_until_finished(RUN_TYPE, &id).await;

        assert_eq!(run["status"], "failed", "{run}");
        assert_eq!(run["safeError"]["code"], "plan_failed", "{run}");
        assert_eq!(
            run["safeError"]["context"]["reason"], "plan_invalid",
            "{run}"
        );
    }
    assert!(worker.seen_at("/items").is_empty());
}

on_both_backends!(a_run_without_item_ids_and_without_a_plan_url_fails_with_plan_failed);
async fn a_run_without_item_ids_and_without_a_plan_url_fails_with_plan_failed(backend: Backend) {
    let worker = Worker::start(|_| Reply::ok());
    let app = spawn_app_on(backend, &worker, |_| {}).await;
    let id = app.create_run(RUN_TYPE, json!({})).await;

    let run = app.wait_until_finished(RUN_TYPE, &id).await;

    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(run["safeError"]["code"], "plan_failed");
    assert_eq!(run["safeError"]["context"]["reason"], "plan_url_missing");
    assert!(worker.seen().is_empty());
}

on_both_backends!(items_in_flight_at_the_worker_never_exceed_the_run_concurrency);
async fn items_in_flight_at_the_worker_never_exceed_the_run_concurrency(backend: Backend) {
    let worker = Worker::start(|_| Reply::ok().after(Duration::from_millis(100)));
    let app = spawn_app_on(backend, &worker, |s| s.concurrency = 3).await;
    let items: Vec<String> = (1..=12).map(|n| format!("item-{n}")).collect();
    let id = app.create_run(RUN_TYPE, json!({ "itemIds": items })).await;

    let run = app.wait_until_finished(RUN_TYPE, &id).await;

    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(worker.seen_at("/items").len(), 12);
    let max = worker.max_in_flight();
    assert!(max <= 3, "{max} items in flight at once");
    assert!(max > 1, "items ran one at a time ({max})");
}

on_both_backends!(static_headers_reach_the_worker);
async fn static_headers_reach_the_worker(backend: Backend) {
    let worker = Worker::start(|_| Reply::ok());
    let app = spawn_app_on(backend, &worker, |s| {
        s.headers.insert("Authorization", "Bearer worker-secret");
        s.headers.insert("X-Worker-Scope", "restore");
    })
    .await;
    let id = app.create_run(RUN_TYPE, json!({"itemIds": ["a"]})).await;

    let run = app.wait_until_finished(RUN_TYPE, &id).await;

    assert_eq!(run["status"], "succeeded", "{run}");
    let seen = worker.seen_at("/items");
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].header("authorization"),
        Some("Bearer worker-secret")
    );
    assert_eq!(seen[0].header("x-worker-scope"), Some("restore"));
}

on_both_backends!(a_429_pauses_every_run_of_the_tenant_while_other_tenants_go_on);
async fn a_429_pauses_every_run_of_the_tenant_while_other_tenants_go_on(backend: Backend) {
    let worker = Worker::start(|seen| {
        if seen.body["itemId"] == "a-throttled" && seen.nth == 1 {
            Reply::status(429).retry_after("2")
        } else {
            Reply::ok().after(Duration::from_millis(100))
        }
    });
    // One attempt per item: a throttled attempt must not use it up.
    let app = spawn_app_on(backend, &worker, |s| {
        s.concurrency = 1;
        s.max_attempts = 1;
    })
    .await;
    let numbered = |prefix: &str, n: usize| -> Vec<String> {
        (1..=n).map(|i| format!("{prefix}-{i}")).collect()
    };
    let mut first_items = vec!["a-throttled".to_owned()];
    first_items.extend(numbered("a1", 3));
    let start = |tenant: &'static str, target: &'static str, items: Vec<String>| {
        let app = &app;
        async move {
            let (status, body) = app
                .start_run(
                    tenant,
                    RUN_TYPE,
                    Some(json!({"targetObjectId": target, "itemIds": items})),
                )
                .await;
            assert_eq!(status, 201, "{body}");
            body["run"]["id"].as_str().unwrap().to_owned()
        }
    };
    let a1 = start("throttled-a", "one", first_items).await;
    let a2 = start("throttled-a", "two", numbered("a2", 8)).await;
    let b = start("steady-b", "one", numbered("b", 14)).await;

    let deadline = Instant::now() + Duration::from_secs(10);
    let throttled_at = loop {
        if let Some((_, at)) = worker
            .answered()
            .into_iter()
            .find(|(status, _)| *status == 429)
        {
            break at;
        }
        assert!(Instant::now() < deadline, "the worker never answered 429");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // The 429 reaches runpilot just after the worker sent it: poll.
    loop {
        let (_, paused) = app.get_run("throttled-a", RUN_TYPE, &a2).await;
        if paused["throttledUntil"].is_string() {
            break;
        }
        assert!(
            throttled_at.elapsed() < Duration::from_millis(1800),
            "the other run of the tenant never showed the pause: {paused}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut runs = Vec::new();
    for (tenant, id) in [("throttled-a", &a1), ("throttled-a", &a2), ("steady-b", &b)] {
        runs.push(
            app.wait_for_tenant_run(tenant, RUN_TYPE, id, is_terminal)
                .await,
        );
    }

    for run in &runs {
        assert_eq!(run["status"], "succeeded", "{run}");
        assert!(run["throttledUntil"].is_null());
    }
    // Requests already under way when the 429 arrived may land just after it.
    let window = (
        throttled_at + Duration::from_millis(150),
        throttled_at + Duration::from_millis(1900),
    );
    let in_window = |tenant: &str| {
        worker
            .seen()
            .iter()
            .filter(|s| s.body["tenantExternalId"] == tenant)
            .filter(|s| s.received > window.0 && s.received < window.1)
            .count()
    };
    assert_eq!(in_window("throttled-a"), 0, "tenant A was not paused");
    assert!(
        in_window("steady-b") >= 5,
        "tenant B slowed down: {}",
        in_window("steady-b")
    );
    let resumed = worker
        .seen()
        .iter()
        .filter(|s| s.body["tenantExternalId"] == "throttled-a" && s.received > window.0)
        .map(|s| s.received)
        .min()
        .unwrap();
    assert!(
        resumed >= throttled_at + Duration::from_millis(1950),
        "resumed before Retry-After"
    );
    let db = app.read_only_db().await;
    let (attempts, throttled): (i64, i64) = db
        .fetch_one(
            "SELECT attempts, throttled FROM run_items WHERE run_id = $1 AND item_id = 'a-throttled'",
            &[&a1],
        )
        .await;
    assert_eq!((attempts, throttled), (2, 1));
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("runpilot_tenant_throttle_pauses_total{tenant=\"throttled-a\"}"),
        "{metrics}"
    );
}
