//! Every transition is in the database before it is reported.

use std::time::Duration;

use runpilot::config::Dur;
use runpilot::domain::RunType;
use serde_json::json;

use crate::helpers::{Backend, TENANT, on_both_backends, spawn_app_with};

on_both_backends!(the_database_shows_each_item_and_the_counts_while_a_run_goes);
async fn the_database_shows_each_item_and_the_counts_while_a_run_goes(backend: Backend) {
    let app = spawn_app_with(backend, |c| {
        let mut s = c.run_type(RunType::SnapshotCapture);
        s.delay = Dur(Duration::from_millis(150));
        s.concurrency = 2;
        c.set_run_type(RunType::SnapshotCapture, s);
    })
    .await;
    let items: Vec<String> = (1..=10)
        .map(|n| {
            if n % 4 == 0 {
                format!("item-{n}-fail")
            } else {
                format!("item-{n}")
            }
        })
        .collect();
    let (status, created) = app
        .start_run(TENANT, "snapshot_capture", Some(json!({"itemIds": items})))
        .await;
    assert_eq!(status, 201);
    let id = created["run"]["id"].as_str().unwrap().to_owned();
    let db = app.read_only_db().await;

    // The 201 was sent after the run and its items were committed.
    let stored: (String, i64) = db
        .fetch_one("SELECT status, total FROM runs WHERE id = $1", &[&id])
        .await;
    assert_eq!(stored.1, 10);

    let mut checked_mid_run = 0;
    loop {
        let (_, run) = app.get_run(TENANT, "snapshot_capture", &id).await;
        // One statement, so the run and its items are read in one snapshot
        // (two reads could straddle the commit of an item).
        let (db_status, db_succeeded, db_failed, items_succeeded, items_failed): (
            String,
            i64,
            i64,
            i64,
            i64,
        ) = db
            .fetch_one(
                "SELECT status, succeeded, failed, \
                 (SELECT COUNT(*) FROM run_items WHERE run_id = runs.id \
                  AND status = 'succeeded'), \
                 (SELECT COUNT(*) FROM run_items WHERE run_id = runs.id \
                  AND status = 'failed') \
                 FROM runs WHERE id = $1",
                &[&id],
            )
            .await;

        // What was reported is already stored: the answer is never ahead.
        assert!(
            run["counts"]["succeeded"].as_i64().unwrap() <= db_succeeded,
            "{run}"
        );
        assert!(
            run["counts"]["failed"].as_i64().unwrap() <= db_failed,
            "{run}"
        );
        // The run's counts are its items' outcomes, committed together.
        assert_eq!(items_succeeded, db_succeeded);
        assert_eq!(items_failed, db_failed);

        if run["status"] == "running" && db_succeeded + db_failed > 0 {
            checked_mid_run += 1;
        }
        if crate::helpers::is_terminal(&run) {
            assert_eq!(db_status, run["status"].as_str().unwrap());
            assert_eq!((db_succeeded, db_failed), (8, 2));
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        checked_mid_run >= 2,
        "the run was seen mid-way only {checked_mid_run} times"
    );
}
