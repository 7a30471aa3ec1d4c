//! A tenant's runs: `GET /admin/t/{tenant}/runs`, newest first, with filters
//! and cursor pages.

use serde_json::{Value, json};

use crate::helpers::{ADMIN_TOKEN, Backend, TENANT, TestApp, on_both_backends, parts, spawn_app};

async fn list(app: &TestApp, query: &str) -> (reqwest::StatusCode, Value) {
    let response = app
        .client
        .get(app.url(&format!("/admin/t/{TENANT}/runs?{query}")))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    parts(response).await
}

fn ids(page: &Value) -> Vec<String> {
    page["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect()
}

on_both_backends!(a_tenants_runs_are_listed_newest_first_with_filters_and_pages);
async fn a_tenants_runs_are_listed_newest_first_with_filters_and_pages(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut created = Vec::new();
    for n in 0..5 {
        let items = if n % 2 == 0 {
            json!(["a"])
        } else {
            json!(["x-fail"])
        };
        created.push(
            app.create_run(
                "restore_preview",
                json!({"targetObjectId": n.to_string(), "itemIds": items}),
            )
            .await,
        );
    }
    created.push(
        app.create_run("snapshot_capture", json!({"itemIds": []}))
            .await,
    );
    let (status, _) = app
        .start_run("fabrikam", "restore_preview", Some(json!({})))
        .await;
    assert_eq!(status, 201);
    for (n, id) in created.iter().enumerate() {
        let run_type = if n < 5 {
            "restore_preview"
        } else {
            "snapshot_capture"
        };
        app.wait_until_finished(run_type, id).await;
    }

    let (status, all) = list(&app, "").await;
    assert_eq!(status, 200, "{all}");
    let newest_first: Vec<String> = created.iter().rev().cloned().collect();
    assert_eq!(
        ids(&all),
        newest_first,
        "only this tenant's runs, newest first"
    );
    assert!(all["nextCursor"].is_null());
    crate::contract::assert_matches_schema("RunRecord", &all["runs"][0]);

    let (_, previews) = list(&app, "type=restore_preview").await;
    assert_eq!(ids(&previews).len(), 5);
    let (_, failed) = list(&app, "type=restore_preview&status=failed").await;
    let expected: Vec<String> = vec![created[3].clone(), created[1].clone()];
    assert_eq!(ids(&failed), expected);

    let mut paged = Vec::new();
    let mut query = "limit=4".to_owned();
    loop {
        let (status, page) = list(&app, &query).await;
        assert_eq!(status, 200, "{page}");
        paged.extend(ids(&page));
        match page["nextCursor"].as_str() {
            Some(cursor) => query = format!("limit=4&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(paged, newest_first);
}

on_both_backends!(bad_run_list_queries_are_400);
async fn bad_run_list_queries_are_400(backend: Backend) {
    let app = spawn_app(backend).await;
    let (status, problem) = list(&app, "type=backup").await;
    assert_eq!(
        (status.as_u16(), problem["code"].as_str()),
        (400, Some("unknown_run_type"))
    );
    for (query, field) in [
        ("status=done", "status"),
        ("limit=0", "limit"),
        ("cursor=nope", "cursor"),
        ("sort=asc", "sort"),
    ] {
        let (status, problem) = list(&app, query).await;
        assert_eq!(status, 400, "{query}: {problem}");
        assert_eq!(problem["code"], "invalid_request");
        assert_eq!(problem["field"], field);
    }
}
