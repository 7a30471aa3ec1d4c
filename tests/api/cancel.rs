//! Cancel: pending items canceled, running ones aborted, the run ends with
//! safeError `canceled`; a cancel stored before a crash still holds.

use std::time::Duration;

use runpilot::config::Dur;
use runpilot::domain::RunType;
use serde_json::{Value, json};

use crate::helpers::{Backend, TENANT, on_both_backends, spawn_app, spawn_app_with, tune};

fn items(n: usize) -> Value {
    let ids: Vec<String> = (1..=n).map(|i| format!("item-{i:02}")).collect();
    json!({"itemIds": ids})
}

on_both_backends!(a_cancel_mid_run_stops_it_with_exact_counts);
async fn a_cancel_mid_run_stops_it_with_exact_counts(backend: Backend) {
    let app = spawn_app_with(backend, |c| {
        tune(c, RunType::SnapshotCapture, |s| {
            s.delay = Dur(Duration::from_millis(200));
            s.concurrency = 2;
        })
    })
    .await;
    let id = app.create_run("snapshot_capture", items(20)).await;
    app.wait_for_run("snapshot_capture", &id, |r| {
        r["counts"]["succeeded"].as_u64() >= Some(2)
    })
    .await;

    let (status, accepted) = app.cancel_run("snapshot_capture", &id).await;
    assert_eq!(status, 202, "{accepted}");
    assert_eq!(accepted["cancelRequested"], true);
    let (again, _) = app.cancel_run("snapshot_capture", &id).await;
    assert!(
        again == 202 || again == 409,
        "a second cancel is 202 while under way, 409 after"
    );
    let run = app.wait_until_finished("snapshot_capture", &id).await;

    assert_eq!(run["status"], "partial", "{run}");
    assert_eq!(run["safeError"]["code"], "canceled");
    let counts = &run["counts"];
    let done = counts["succeeded"].as_u64().unwrap() + counts["failed"].as_u64().unwrap();
    let canceled = run["safeError"]["context"]["canceledItems"]
        .as_u64()
        .unwrap();
    assert_eq!(counts["total"], 20);
    assert!(done < 20 && canceled > 0);
    assert_eq!(done + canceled, 20);
    let (_, page) = app.list_items("snapshot_capture", &id, "limit=100").await;
    let statuses: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == "canceled").count() as u64,
        canceled
    );
    assert!(
        statuses.iter().all(|s| *s != "pending" && *s != "running"),
        "{statuses:?}"
    );

    let (status, problem) = app.cancel_run("snapshot_capture", &id).await;
    assert_eq!(
        (status.as_u16(), problem["code"].as_str()),
        (409, Some("already_finished"))
    );
}

on_both_backends!(a_queued_run_canceled_ends_without_running_an_item);
async fn a_queued_run_canceled_ends_without_running_an_item(backend: Backend) {
    let app = spawn_app_with(backend, |c| {
        c.limits.max_active_runs_per_tenant = 1;
        tune(c, RunType::SnapshotCapture, |s| {
            s.delay = Dur(Duration::from_millis(200))
        });
    })
    .await;
    let first = app
        .create_run(
            "snapshot_capture",
            json!({"targetObjectId": "1", "itemIds": ["a", "b", "c", "d", "e"]}),
        )
        .await;
    let second = app
        .create_run(
            "snapshot_capture",
            json!({"targetObjectId": "2", "itemIds": ["x", "y"]}),
        )
        .await;
    let (_, queued) = app.get_run(TENANT, "snapshot_capture", &second).await;
    assert_eq!(queued["status"], "queued");

    let (status, _) = app.cancel_run("snapshot_capture", &second).await;
    assert_eq!(status, 202);
    let run = app.wait_until_finished("snapshot_capture", &second).await;

    assert_eq!(run["status"], "failed");
    assert_eq!(run["safeError"]["code"], "canceled");
    assert_eq!(run["safeError"]["context"]["canceledItems"], 2);
    assert_eq!(
        run["counts"],
        json!({"total": 2, "succeeded": 0, "failed": 0})
    );
    let first = app.wait_until_finished("snapshot_capture", &first).await;
    assert_eq!(first["status"], "succeeded", "the other run is untouched");
}

on_both_backends!(cancel_of_an_unknown_run_is_404);
async fn cancel_of_an_unknown_run_is_404(backend: Backend) {
    let app = spawn_app(backend).await;
    let (status, problem) = app
        .cancel_run("snapshot_capture", "01890a5d-ac96-774b-bcce-b302099a8057")
        .await;
    assert_eq!(
        (status.as_u16(), problem["code"].as_str()),
        (404, Some("not_found"))
    );
    let id = app.create_run("snapshot_capture", json!({})).await;
    let (status, _) = app.cancel_run("restore_execute", &id).await;
    assert_eq!(status, 404);
}
