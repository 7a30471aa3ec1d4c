//! Tenant isolation: tokens reach only their tenants, revocation holds from
//! the next request on, and no token text reaches a log line.

use std::path::Path;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{
    ADMIN_TOKEN, Backend, TENANT, TestApp, TestDatabase, on_both_backends, parts, spawn_app,
};
use crate::process::{Node, runpilot};

/// Runs `runpilot token …` against the database at `url`; returns stdout.
/// Awaited, not blocking: the application under test shares this thread.
async fn token_command(dir: &Path, url: &str, args: &[&str]) -> String {
    let mut command = tokio::process::Command::from(runpilot(dir));
    let output = command
        .arg("token")
        .args(args)
        .env("RUNPILOT_DATABASE_URL", url)
        .output()
        .await
        .expect("runpilot token runs");
    assert!(output.status.success(), "token {args:?}: {output:?}");
    String::from_utf8(output.stdout).unwrap()
}

/// `token create` for the tenants; returns (id, token) parsed from its output.
async fn create_token(dir: &Path, url: &str, tenants: &[&str]) -> (String, String) {
    let mut args = vec!["create", "--label", "test"];
    for t in tenants {
        args.extend(["--tenant", t]);
    }
    let out = token_command(dir, url, &args).await;
    let token = out.lines().last().expect("a last line").to_owned();
    assert!(token.starts_with("rp_") && !token.contains(' '), "{out}");
    let id = out
        .split_whitespace()
        .nth(2)
        .expect("created token <id> …")
        .to_owned();
    (id, token)
}

fn database_url(app: &TestApp) -> String {
    app.database_url()
}

/// Every tenant-scoped route, as (method, path) with `{t}` for the tenant
/// and `{id}` for a run id of that tenant. A new route belongs here.
fn tenant_routes() -> Vec<(Method, &'static str)> {
    vec![
        (Method::GET, "/admin/t/{t}/runs"),
        (Method::POST, "/admin/t/{t}/runs/snapshot_capture"),
        (Method::GET, "/admin/t/{t}/runs/snapshot_capture/{id}"),
        (Method::GET, "/admin/t/{t}/runs/snapshot_capture/{id}/items"),
        (
            Method::POST,
            "/admin/t/{t}/runs/snapshot_capture/{id}/cancel",
        ),
    ]
}

/// The route's own answer: a success, or a cancel of a run that has ended.
fn answered_normally(status: StatusCode, body: &Value) -> bool {
    status.is_success() || (status == 409 && body["code"] == "already_finished")
}

async fn call(
    app: &TestApp,
    method: &Method,
    path: &str,
    tenant: &str,
    run_id: &str,
    token: Option<&str>,
) -> (StatusCode, Value) {
    let url = app.url(&path.replace("{t}", tenant).replace("{id}", run_id));
    let mut request = app.client.request(method.clone(), url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if *method == Method::POST {
        request = request.json(&json!({"itemIds": ["a"]}));
    }
    parts(request.send().await.unwrap()).await
}

on_both_backends!(every_tenant_route_answers_by_the_tokens_scope);
async fn every_tenant_route_answers_by_the_tokens_scope(backend: Backend) {
    let app = spawn_app(backend).await;
    let dir = tempfile::tempdir().unwrap();
    let url = database_url(&app);
    let (_, contoso) = create_token(dir.path(), &url, &[TENANT, "northwind"]).await;
    let (_, fabrikam) = create_token(dir.path(), &url, &["fabrikam"]).await;
    let run_id = app
        .create_run("snapshot_capture", json!({"itemIds": ["x"]}))
        .await;

    for (method, path) in tenant_routes() {
        let (status, body) = call(&app, &method, path, TENANT, &run_id, None).await;
        assert_eq!(
            (status.as_u16(), body["code"].as_str()),
            (401, Some("unauthenticated")),
            "{method} {path}"
        );
        let (status, body) = call(&app, &method, path, TENANT, &run_id, Some("rp_unknown")).await;
        assert_eq!(
            (status.as_u16(), body["code"].as_str()),
            (401, Some("unauthenticated")),
            "{method} {path}"
        );
        let (status, body) = call(&app, &method, path, TENANT, &run_id, Some(&fabrikam)).await;
        assert_eq!(
            (status.as_u16(), body["code"].as_str()),
            (403, Some("forbidden")),
            "{method} {path}"
        );
        let (status, body) = call(&app, &method, path, TENANT, &run_id, Some(&contoso)).await;
        assert!(
            answered_normally(status, &body),
            "{method} {path}: {status} {body}"
        );
    }
}

on_both_backends!(a_revoked_token_is_refused_from_the_next_request_on);
async fn a_revoked_token_is_refused_from_the_next_request_on(backend: Backend) {
    let app = spawn_app(backend).await;
    let dir = tempfile::tempdir().unwrap();
    let url = database_url(&app);
    let (id, token) = create_token(dir.path(), &url, &[TENANT]).await;
    let run_id = app.create_run("snapshot_capture", json!({})).await;
    for (method, path) in tenant_routes() {
        let (status, body) = call(&app, &method, path, TENANT, &run_id, Some(&token)).await;
        assert!(
            answered_normally(status, &body),
            "{method} {path}: {status} {body}"
        );
    }

    token_command(dir.path(), &url, &["revoke", &id]).await;

    for (method, path) in tenant_routes() {
        let (status, body) = call(&app, &method, path, TENANT, &run_id, Some(&token)).await;
        assert_eq!(
            (status.as_u16(), body["code"].as_str()),
            (401, Some("unauthenticated")),
            "{method} {path}"
        );
    }
    let listed = token_command(dir.path(), &url, &["list"]).await;
    let line = listed
        .lines()
        .find(|l| l.contains(&id))
        .expect("the token is listed");
    assert_eq!(
        line.split_whitespace()
            .filter(|w| w.starts_with("20"))
            .count(),
        3,
        "created, last used and revoked times: {line}"
    );
    assert!(!listed.contains(&token), "list never shows a token");
}

on_both_backends!(a_tenant_token_cannot_tell_another_tenants_run_from_a_missing_one);
async fn a_tenant_token_cannot_tell_another_tenants_run_from_a_missing_one(backend: Backend) {
    let app = spawn_app(backend).await;
    let dir = tempfile::tempdir().unwrap();
    let (_, contoso) = create_token(dir.path(), &database_url(&app), &[TENANT]).await;
    let (status, other) = app
        .start_run("fabrikam", "snapshot_capture", Some(json!({})))
        .await;
    assert_eq!(status, 201);
    let existing = other["run"]["id"].as_str().unwrap();
    let missing = "01890a5d-ac96-774b-bcce-b302099a8057";

    let path = "/admin/t/{t}/runs/snapshot_capture/{id}";
    let seen_existing = call(
        &app,
        &Method::GET,
        path,
        "fabrikam",
        existing,
        Some(&contoso),
    )
    .await;
    let seen_missing = call(
        &app,
        &Method::GET,
        path,
        "fabrikam",
        missing,
        Some(&contoso),
    )
    .await;
    let seen_malformed = call(
        &app,
        &Method::GET,
        "/admin/t/{t}/runs/nope/{id}",
        "fabrikam",
        "x",
        Some(&contoso),
    )
    .await;

    assert_eq!(seen_existing.0, 403);
    assert_eq!(seen_existing, seen_missing);
    assert_eq!(
        seen_existing, seen_malformed,
        "403 comes before the run type is looked at"
    );
    // An unknown tenant is answered the same as a known one.
    let seen_unknown = call(
        &app,
        &Method::GET,
        path,
        "nobody-here",
        existing,
        Some(&contoso),
    )
    .await;
    assert_eq!(seen_existing, seen_unknown);
}

fn wait_for_line(lines: &std::sync::Mutex<Vec<String>>, pattern: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(line) = lines.lock().unwrap().iter().find(|l| l.contains(pattern)) {
            return line.clone();
        }
        assert!(Instant::now() < deadline, "no line with {pattern}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

on_both_backends!(the_first_start_without_an_admin_token_creates_one_shown_once);
async fn the_first_start_without_an_admin_token_creates_one_shown_once(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDatabase::create(backend).await;
    let no_admin = [("RUNPILOT_ADMIN_TOKEN", "")];
    let node = Node::start(dir.path(), &db, &no_admin);
    let shown = wait_for_line(&node.out, "rp_");
    let token = shown.trim().to_owned();
    let response = reqwest::Client::new()
        .post(format!(
            "{}/admin/t/{TENANT}/runs/restore_preview",
            node.address
        ))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let logs = node.logs.lock().unwrap().join("\n");
    assert!(!logs.contains(&token[3..]), "the token was logged");
    drop(node);

    let node = Node::start(dir.path(), &db, &no_admin);
    let response = reqwest::Client::new()
        .get(format!("{}/healthz", node.address))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        node.out.lock().unwrap().iter().all(|l| !l.contains("rp_")),
        "a second start shows no new token"
    );
}

on_both_backends!(no_token_or_hash_reaches_the_logs);
async fn no_token_or_hash_reaches_the_logs(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDatabase::create(backend).await;
    let node = Node::start(dir.path(), &db, &[("RUST_LOG", "debug")]);
    let url = &db.url();
    let (id, token) = create_token(dir.path(), url, &[TENANT]).await;
    let client = reqwest::Client::new();
    let base = format!("{}/admin/t", node.address);
    for bearer in [
        token.as_str(),
        ADMIN_TOKEN,
        "rp_wrong-token-text",
        "not-even-a-token",
    ] {
        for tenant in [TENANT, "fabrikam", ".."] {
            let _ = client
                .post(format!("{base}/{tenant}/runs/snapshot_capture"))
                .bearer_auth(bearer)
                .json(&json!({"itemIds": ["a-fail"]}))
                .send()
                .await
                .unwrap();
        }
    }
    token_command(dir.path(), url, &["revoke", &id]).await;
    let _ = client
        .get(format!("{base}/{TENANT}/runs/snapshot_capture/x"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    let hash = runpilot::access::hash_token(&token);
    let admin_hash = runpilot::access::hash_token(ADMIN_TOKEN);

    let logs = node.logs.lock().unwrap().join("\n");
    assert!(logs.contains("run created"), "the logs were captured");
    for secret in [
        &token[3..],
        ADMIN_TOKEN,
        "wrong-token-text",
        "not-even-a-token",
        &hash,
        &admin_hash,
        "Bearer rp_",
    ] {
        assert!(!logs.contains(secret), "the logs contain {secret}");
    }
    assert!(
        !logs.to_ascii_lowercase().contains("authorization:"),
        "a header was logged"
    );
}

on_both_backends!(metrics_need_no_token_unless_configured_and_then_an_admin_one);
async fn metrics_need_no_token_unless_configured_and_then_an_admin_one(backend: Backend) {
    let open = spawn_app(backend).await;
    let id = open
        .create_run("snapshot_capture", json!({"itemIds": ["a"]}))
        .await;
    open.start_run(TENANT, "snapshot_capture", Some(json!({"itemIds": ["a"]})))
        .await;
    open.wait_until_finished("snapshot_capture", &id).await;
    let response = open.client.get(open.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    for name in [
        "runpilot_runs_started_total{type=\"snapshot_capture\"}",
        "runpilot_runs_reused_total{type=\"snapshot_capture\"}",
        "runpilot_runs_finished_total{type=\"snapshot_capture\",status=\"succeeded\"}",
        "runpilot_item_attempts_total",
        "runpilot_store_write_seconds",
    ] {
        assert!(text.contains(name), "/metrics lacks {name}");
    }

    let guarded = crate::helpers::spawn_app_with(backend, |c| {
        c.server.metrics_require_token = true;
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (_, tenant_token) = create_token(dir.path(), &database_url(&guarded), &[TENANT]).await;
    let get = |token: Option<&str>| {
        let mut request = guarded.client.get(guarded.url("/metrics"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    let (status, body) = parts(get(None).await.unwrap()).await;
    assert_eq!(
        (status.as_u16(), body["code"].as_str()),
        (401, Some("unauthenticated"))
    );
    let (status, body) = parts(get(Some(&tenant_token)).await.unwrap()).await;
    assert_eq!(
        (status.as_u16(), body["code"].as_str()),
        (403, Some("forbidden"))
    );
    let response = get(Some(ADMIN_TOKEN)).await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.text().await.unwrap().contains("runpilot_"));
}
