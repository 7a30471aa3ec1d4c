//! Item results: `GET …/{runId}/items` with a status filter and cursor pages.

use std::collections::HashSet;

use serde_json::{Value, json};

use crate::helpers::{Backend, on_both_backends, spawn_app};

on_both_backends!(each_item_reports_its_status_attempts_and_last_error);
async fn each_item_reports_its_status_attempts_and_last_error(backend: Backend) {
    let app = spawn_app(backend).await;
    let id = app
        .create_run(
            "snapshot_capture",
            json!({"itemIds": ["a", "b-fail", "c-flaky"]}),
        )
        .await;
    app.wait_until_finished("snapshot_capture", &id).await;

    let (status, page) = app.list_items("snapshot_capture", &id, "").await;

    assert_eq!(status, 200, "{page}");
    let items = page["items"].as_array().unwrap();
    let by_id = |name: &str| items.iter().find(|i| i["itemId"] == name).unwrap().clone();
    assert_eq!(by_id("a")["status"], "succeeded");
    assert_eq!(by_id("a")["attempts"], 1);
    assert!(by_id("a")["lastError"].is_null());
    assert_eq!(by_id("b-fail")["status"], "failed");
    assert_eq!(by_id("b-fail")["lastError"]["code"], "simulated_failure");
    assert_eq!(by_id("c-flaky")["status"], "succeeded");
    assert_eq!(by_id("c-flaky")["attempts"], 2);
    for item in items {
        assert!(
            item["startedAt"].is_string() && item["finishedAt"].is_string(),
            "{item}"
        );
    }
    assert!(page["nextCursor"].is_null());

    let (_, failed) = app
        .list_items("snapshot_capture", &id, "status=failed")
        .await;
    let names: Vec<&Value> = failed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| &i["itemId"])
        .collect();
    assert_eq!(names, [&json!("b-fail")]);
}

on_both_backends!(pages_follow_cursors_through_every_item_once_in_order);
async fn pages_follow_cursors_through_every_item_once_in_order(backend: Backend) {
    let app = spawn_app(backend).await;
    let ids: Vec<String> = (0..25).map(|n| format!("item-{n:02}")).collect();
    let run = app
        .create_run("restore_preview", json!({"itemIds": ids}))
        .await;

    let mut seen = Vec::new();
    let mut query = "limit=10".to_owned();
    let mut pages = 0;
    loop {
        let (status, page) = app.list_items("restore_preview", &run, &query).await;
        assert_eq!(status, 200, "{page}");
        pages += 1;
        seen.extend(
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["itemId"].as_str().unwrap().to_owned()),
        );
        match page["nextCursor"].as_str() {
            Some(cursor) => query = format!("limit=10&cursor={cursor}"),
            None => break,
        }
    }

    assert_eq!(pages, 3);
    assert_eq!(seen, ids);
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 25);
}

on_both_backends!(bad_item_queries_are_400_and_unknown_runs_404);
async fn bad_item_queries_are_400_and_unknown_runs_404(backend: Backend) {
    let app = spawn_app(backend).await;
    let id = app
        .create_run("snapshot_capture", json!({"itemIds": ["a"]}))
        .await;
    for (query, field) in [
        ("status=done", "status"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("cursor=abc", "cursor"),
        ("page=2", "page"),
    ] {
        let (status, problem) = app.list_items("snapshot_capture", &id, query).await;
        assert_eq!(status, 400, "{query}: {problem}");
        assert_eq!(problem["code"], "invalid_request");
        assert_eq!(problem["field"], field);
    }
    let (status, problem) = app
        .list_items(
            "snapshot_capture",
            "01890a5d-ac96-774b-bcce-b302099a8057",
            "",
        )
        .await;
    assert_eq!(
        (status.as_u16(), problem["code"].as_str()),
        (404, Some("not_found"))
    );
    let (status, _) = app.list_items("restore_execute", &id, "").await;
    assert_eq!(status, 404, "another run type's run is not found");
}
