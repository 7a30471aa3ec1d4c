//! One start never makes two runs: de-duplication by (tenant, type,
//! targetObjectId, payloadHash) among active runs.

use std::collections::HashSet;

use futures_util::future::join_all;
use serde_json::json;

use crate::helpers::{Backend, TENANT, on_both_backends, spawn_app};

on_both_backends!(fifty_concurrent_identical_starts_make_exactly_one_run);
async fn fifty_concurrent_identical_starts_make_exactly_one_run(backend: Backend) {
    let app = spawn_app(backend).await;
    let body =
        json!({"targetObjectId": "policy-9", "payloadHash": "h1", "itemIds": ["a", "b", "c"]});

    let answers = join_all(
        (0..50).map(|_| app.start_run(TENANT, "backup_set_add_policies", Some(body.clone()))),
    )
    .await;

    let created: Vec<_> = answers.iter().filter(|(s, _)| *s == 201).collect();
    let reused: Vec<_> = answers.iter().filter(|(s, _)| *s == 200).collect();
    assert_eq!(created.len(), 1, "{answers:?}");
    assert_eq!(reused.len(), 49, "{answers:?}");
    assert!(reused.iter().all(|(_, b)| b["reused"] == true));
    let ids: HashSet<_> = answers
        .iter()
        .map(|(_, b)| b["run"]["id"].clone())
        .collect();
    assert_eq!(ids.len(), 1, "every answer names the same run");
}

on_both_backends!(a_different_target_or_payload_hash_makes_a_different_run);
async fn a_different_target_or_payload_hash_makes_a_different_run(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut ids = HashSet::new();
    for body in [
        json!({"targetObjectId": "a", "payloadHash": "1"}),
        json!({"targetObjectId": "b", "payloadHash": "1"}),
        json!({"targetObjectId": "a", "payloadHash": "2"}),
        json!({"targetObjectId": "a"}),
        json!({}),
    ] {
        let (status, answer) = app
            .start_run(TENANT, "restore_preview", Some(body.clone()))
            .await;
        assert_eq!(status, 201, "{body} → {answer}");
        ids.insert(answer["run"]["id"].clone());
    }
    assert_eq!(ids.len(), 5);
    // The same key in another tenant or run type is another run too.
    let (status, _) = app
        .start_run("fabrikam", "restore_preview", Some(json!({})))
        .await;
    assert_eq!(status, 201);
    let (status, _) = app
        .start_run(TENANT, "restore_execute", Some(json!({})))
        .await;
    assert_eq!(status, 201);
}

on_both_backends!(null_and_absent_are_the_same_key_whatever_the_items);
async fn null_and_absent_are_the_same_key_whatever_the_items(backend: Backend) {
    let app = spawn_app(backend).await;
    let (status, first) = app.start_run(TENANT, "snapshot_capture", None).await;
    assert_eq!(status, 201);
    for body in [
        json!({}),
        json!({"targetObjectId": null, "payloadHash": null}),
        json!({"itemIds": ["other"]}),
    ] {
        let (status, again) = app.start_run(TENANT, "snapshot_capture", Some(body)).await;
        assert_eq!(status, 200);
        assert_eq!(again["reused"], true);
        assert_eq!(again["run"]["id"], first["run"]["id"]);
    }
    // The empty string is a value, not null.
    let (status, _) = app
        .start_run(
            TENANT,
            "snapshot_capture",
            Some(json!({"targetObjectId": ""})),
        )
        .await;
    assert_eq!(status, 201);
}

on_both_backends!(after_a_run_ends_the_same_start_makes_a_new_run);
async fn after_a_run_ends_the_same_start_makes_a_new_run(backend: Backend) {
    let app = spawn_app(backend).await;
    let body = json!({"targetObjectId": "policy-1", "itemIds": ["a"]});
    let first = app.create_run("snapshot_capture", body.clone()).await;
    app.wait_until_finished("snapshot_capture", &first).await;

    let (status, again) = app.start_run(TENANT, "snapshot_capture", Some(body)).await;

    assert_eq!(status, 201, "{again}");
    assert_eq!(again["reused"], false);
    assert_ne!(again["run"]["id"], first.as_str());
}
