//! SPEC 3.3: every error is problem JSON with a stable code, checked in the
//! stated order.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{
    ADMIN_TOKEN, Backend, TENANT, TestApp, on_both_backends, parts, spawn_app, spawn_app_with,
};

fn assert_problem(status: StatusCode, body: &Value, expected: u16, code: &str) {
    assert_eq!(status.as_u16(), expected, "{body}");
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], expected, "{body}");
    for key in ["type", "title", "detail"] {
        assert!(body[key].is_string(), "problem JSON lacks {key}: {body}");
    }
}

async fn post_raw(
    app: &TestApp,
    path: &str,
    token: Option<&str>,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> (StatusCode, Value, String) {
    let mut request = app.client.post(app.url(path)).body(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(content_type) = content_type {
        request = request.header("Content-Type", content_type);
    }
    let response = request.send().await.unwrap();
    let media = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let (status, body) = parts(response).await;
    (status, body, media)
}

on_both_backends!(a_missing_or_wrong_token_is_401_before_anything_else);
async fn a_missing_or_wrong_token_is_401_before_anything_else(backend: Backend) {
    let app = spawn_app(backend).await;
    for token in [None, Some("wrong"), Some("")] {
        // Even with a bad tenant and an unknown run type, 401 comes first.
        let (status, body, media) =
            post_raw(&app, "/admin/t/..!/runs/nope", token, None, vec![]).await;
        assert_problem(status, &body, 401, "unauthenticated");
        assert_eq!(media, "application/problem+json");
    }
    let response = app
        .client
        .get(app.url(&format!("/admin/t/{TENANT}/runs/snapshot_capture/x")))
        .header("Authorization", format!("Basic {ADMIN_TOKEN}"))
        .send()
        .await
        .unwrap();
    let (status, body) = parts(response).await;
    assert_problem(status, &body, 401, "unauthenticated");
}

/// One request over a plain TCP connection, the path sent as written.
async fn raw_request(app: &TestApp, method: &str, path: &str) -> (StatusCode, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = app.address.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status: u16 = response[9..12].parse().unwrap();
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    (
        StatusCode::from_u16(status).unwrap(),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

on_both_backends!(a_tenant_id_outside_the_form_is_400_invalid_tenant);
async fn a_tenant_id_outside_the_form_is_400_invalid_tenant(backend: Backend) {
    let app = spawn_app(backend).await;
    let long = "x".repeat(129);
    // HTTP clients remove dot segments, so those go over a raw connection.
    for tenant in ["..", "."] {
        let (status, body) =
            raw_request(&app, "POST", &format!("/admin/t/{tenant}/runs/nope")).await;
        assert_problem(status, &body, 400, "invalid_tenant");
        let (status, body) = raw_request(
            &app,
            "GET",
            &format!("/admin/t/{tenant}/runs/snapshot_capture/x"),
        )
        .await;
        assert_problem(status, &body, 400, "invalid_tenant");
    }
    for tenant in ["a%20b", "t%C3%A4", "a%2Fb", long.as_str()] {
        let (status, body) = app.start_run(tenant, "nope", None).await;
        assert_problem(status, &body, 400, "invalid_tenant");
        let (status, body) = app.get_run(tenant, "snapshot_capture", "x").await;
        assert_problem(status, &body, 400, "invalid_tenant");
    }
}

on_both_backends!(an_unknown_run_type_is_400_on_post_and_get);
async fn an_unknown_run_type_is_400_on_post_and_get(backend: Backend) {
    let app = spawn_app(backend).await;
    let (status, body) = app
        .start_run(TENANT, "backup", Some(json!({"bad": 1})))
        .await;
    assert_problem(status, &body, 400, "unknown_run_type");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("snapshot_capture")
    );
    let (status, body) = app.get_run(TENANT, "backup", "not-an-id").await;
    assert_problem(status, &body, 400, "unknown_run_type");
}

on_both_backends!(bad_bodies_are_400_invalid_request_naming_the_field);
async fn bad_bodies_are_400_invalid_request_naming_the_field(backend: Backend) {
    let app = spawn_app(backend).await;
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"{not json".to_vec(), "body"),
        (br#"{"targetObjectId": 7}"#.to_vec(), "targetObjectId"),
        (br#"{"payloadHash": []}"#.to_vec(), "payloadHash"),
        (br#"{"itemIds": "a"}"#.to_vec(), "itemIds"),
        (br#"{"itemIds": ["a", ""]}"#.to_vec(), "itemIds[1]"),
        (
            format!(r#"{{"itemIds": ["{}"]}}"#, "x".repeat(257)).into_bytes(),
            "itemIds[0]",
        ),
        (br#"{"itemIds": ["a", "a"]}"#.to_vec(), "itemIds[1]"),
        (
            br#"{"targetObjectId": "a", "surprise": true}"#.to_vec(),
            "surprise",
        ),
    ];
    let path = format!("/admin/t/{TENANT}/runs/snapshot_capture");
    for (body, field) in cases {
        let (status, problem, _) = post_raw(
            &app,
            &path,
            Some(ADMIN_TOKEN),
            Some("application/json"),
            body,
        )
        .await;
        assert_problem(status, &problem, 400, "invalid_request");
        assert!(
            problem["field"].as_str().unwrap().contains(field),
            "expected field {field}: {problem}"
        );
    }
    // Nothing was created by any of them.
    let (status, _) = app.start_run(TENANT, "snapshot_capture", None).await;
    assert_eq!(status, 201);
}

on_both_backends!(more_items_than_the_limit_is_400);
async fn more_items_than_the_limit_is_400(backend: Backend) {
    let app = spawn_app_with(backend, |c| c.limits.max_items_per_run = 5).await;
    let (status, body) = app
        .start_run(
            TENANT,
            "snapshot_capture",
            Some(json!({"itemIds": ["1", "2", "3", "4", "5", "6"]})),
        )
        .await;
    assert_problem(status, &body, 400, "invalid_request");
    assert_eq!(body["field"], "itemIds");
}

on_both_backends!(a_body_over_the_limit_is_413);
async fn a_body_over_the_limit_is_413(backend: Backend) {
    let app = spawn_app(backend).await;
    let items: Vec<String> = (0..60_000).map(|n| format!("item-{n:010}")).collect();
    let body = serde_json::to_vec(&json!({"itemIds": items})).unwrap();
    assert!(body.len() > 1024 * 1024);
    let path = format!("/admin/t/{TENANT}/runs/snapshot_capture");
    let (status, problem, _) = post_raw(
        &app,
        &path,
        Some(ADMIN_TOKEN),
        Some("application/json"),
        body,
    )
    .await;
    assert_problem(status, &problem, 413, "payload_too_large");
}

on_both_backends!(a_body_of_another_media_type_is_415_and_no_content_type_is_json);
async fn a_body_of_another_media_type_is_415_and_no_content_type_is_json(backend: Backend) {
    let app = spawn_app(backend).await;
    let path = format!("/admin/t/{TENANT}/runs/snapshot_capture");
    let (status, problem, _) = post_raw(
        &app,
        &path,
        Some(ADMIN_TOKEN),
        Some("text/plain"),
        b"{}".to_vec(),
    )
    .await;
    assert_problem(status, &problem, 415, "unsupported_media_type");
    let (status, body, _) = post_raw(&app, &path, Some(ADMIN_TOKEN), None, b"{}".to_vec()).await;
    assert_eq!(status, 201, "{body}");
    let (status, body, _) = post_raw(
        &app,
        &format!("/admin/t/{TENANT}/runs/restore_execute"),
        Some(ADMIN_TOKEN),
        Some("text/plain"),
        vec![],
    )
    .await;
    assert_eq!(
        status, 201,
        "an empty body is no options whatever its type: {body}"
    );
}

on_both_backends!(unknown_and_malformed_run_ids_are_404);
async fn unknown_and_malformed_run_ids_are_404(backend: Backend) {
    let app = spawn_app(backend).await;
    let id = app.create_run("snapshot_capture", json!({})).await;
    for (tenant, run_type, run_id) in [
        (TENANT, "snapshot_capture", "not-a-uuid"),
        (
            TENANT,
            "snapshot_capture",
            "01890a5d-ac96-774b-bcce-b302099a8057",
        ),
        (TENANT, "restore_execute", id.as_str()),
        ("fabrikam", "snapshot_capture", id.as_str()),
    ] {
        let (status, body) = app.get_run(tenant, run_type, run_id).await;
        assert_problem(status, &body, 404, "not_found");
    }
}

on_both_backends!(unknown_paths_are_404_and_wrong_methods_405_as_problem_json);
async fn unknown_paths_are_404_and_wrong_methods_405_as_problem_json(backend: Backend) {
    let app = spawn_app(backend).await;
    let response = app.client.get(app.url("/nowhere")).send().await.unwrap();
    let (status, body) = parts(response).await;
    assert_problem(status, &body, 404, "not_found");
    let response = app
        .client
        .delete(app.url(&format!("/admin/t/{TENANT}/runs/snapshot_capture")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    let (status, body) = parts(response).await;
    assert_problem(status, &body, 405, "method_not_allowed");
}

on_both_backends!(health_and_readiness_need_no_token);
async fn health_and_readiness_need_no_token(backend: Backend) {
    let app = spawn_app(backend).await;
    for path in ["/healthz", "/readyz"] {
        let response = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(response.status(), 200, "{path}");
    }
}
