//! How items decide a run's status, counts and safeError.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use futures_util::future::BoxFuture;
use runpilot::domain::{ItemError, ItemId, RunType};
use runpilot::runtime::executor::{AttemptError, ItemExecutor, ItemRequest, PlanRequest};
use serde_json::json;

use crate::helpers::{
    Backend, on_both_backends, spawn_app, spawn_app_with, spawn_app_with_executors,
};

on_both_backends!(a_run_whose_items_all_succeed_succeeds);
async fn a_run_whose_items_all_succeed_succeeds(backend: Backend) {
    let app = spawn_app(backend).await;
    let id = app
        .create_run("snapshot_capture", json!({"itemIds": ["a", "b", "c"]}))
        .await;

    let run = app.wait_until_finished("snapshot_capture", &id).await;

    assert_eq!(run["status"], "succeeded");
    assert_eq!(
        run["counts"],
        json!({"total": 3, "succeeded": 3, "failed": 0})
    );
    assert!(run["safeError"].is_null());
}

on_both_backends!(some_failing_items_make_a_partial_run);
async fn some_failing_items_make_a_partial_run(backend: Backend) {
    let app = spawn_app(backend).await;
    let id = app
        .create_run(
            "snapshot_capture",
            json!({"itemIds": ["a", "b-fail", "c", "d-fail"]}),
        )
        .await;

    let run = app.wait_until_finished("snapshot_capture", &id).await;

    assert_eq!(run["status"], "partial");
    assert_eq!(
        run["counts"],
        json!({"total": 4, "succeeded": 2, "failed": 2})
    );
    assert_eq!(run["safeError"]["code"], "some_items_failed");
    let mut failed: Vec<_> = run["safeError"]["context"]["failedItemIds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    failed.sort();
    assert_eq!(failed, ["b-fail", "d-fail"]);
}

on_both_backends!(a_run_whose_items_all_fail_fails);
async fn a_run_whose_items_all_fail_fails(backend: Backend) {
    let app = spawn_app(backend).await;
    let id = app
        .create_run("snapshot_capture", json!({"itemIds": ["fail-1", "fail-2"]}))
        .await;

    let run = app.wait_until_finished("snapshot_capture", &id).await;

    assert_eq!(run["status"], "failed");
    assert_eq!(
        run["counts"],
        json!({"total": 2, "succeeded": 0, "failed": 2})
    );
    assert_eq!(run["safeError"]["code"], "all_items_failed");
}

on_both_backends!(flaky_items_succeed_on_their_second_attempt);
async fn flaky_items_succeed_on_their_second_attempt(backend: Backend) {
    let app = spawn_app(backend).await;
    let id = app
        .create_run("snapshot_capture", json!({"itemIds": ["flaky-1", "b"]}))
        .await;

    let run = app.wait_until_finished("snapshot_capture", &id).await;

    assert_eq!(run["status"], "succeeded");
    let db = app.read_only_db().await;
    let attempts = db
        .fetch_i64(
            "SELECT attempts FROM run_items WHERE run_id = $1 AND item_id = 'flaky-1'",
            &[&id],
        )
        .await;
    assert_eq!(attempts, 2);
}

on_both_backends!(a_run_without_item_ids_plans_the_configured_number);
async fn a_run_without_item_ids_plans_the_configured_number(backend: Backend) {
    let app = spawn_app_with(backend, |c| {
        let mut settings = c.run_type(RunType::RestoreExecute);
        settings.items = 7;
        c.set_run_type(RunType::RestoreExecute, settings);
    })
    .await;
    let id = app.create_run("restore_execute", json!({})).await;

    let run = app.wait_until_finished("restore_execute", &id).await;

    assert_eq!(run["status"], "succeeded");
    assert_eq!(
        run["counts"],
        json!({"total": 7, "succeeded": 7, "failed": 0})
    );
}

on_both_backends!(a_run_of_zero_items_succeeds_at_once);
async fn a_run_of_zero_items_succeeds_at_once(backend: Backend) {
    let app = spawn_app(backend).await;
    let id = app
        .create_run("restore_preview", json!({"itemIds": []}))
        .await;

    let run = app.wait_until_finished("restore_preview", &id).await;

    assert_eq!(run["status"], "succeeded");
    assert_eq!(
        run["counts"],
        json!({"total": 0, "succeeded": 0, "failed": 0})
    );
}

/// Panics on an item's first attempt, succeeds after.
struct PanicsOnce {
    calls: Arc<AtomicU32>,
}

impl ItemExecutor for PanicsOnce {
    fn plan(&self, _: PlanRequest) -> BoxFuture<'static, Result<Vec<ItemId>, ItemError>> {
        Box::pin(async { Ok(vec![]) })
    }

    fn execute(&self, request: ItemRequest) -> BoxFuture<'static, Result<(), AttemptError>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            if request.attempt == 1 {
                panic!("executor bug on purpose");
            }
            Ok(())
        })
    }
}

on_both_backends!(a_panicking_attempt_is_a_failed_attempt_not_a_dead_run);
async fn a_panicking_attempt_is_a_failed_attempt_not_a_dead_run(backend: Backend) {
    let calls = Arc::new(AtomicU32::new(0));
    let executor = Arc::new(PanicsOnce {
        calls: calls.clone(),
    });
    let app = spawn_app_with_executors(
        backend,
        |_| {},
        |e| e.set(RunType::SnapshotCapture, executor),
    )
    .await;
    let id = app
        .create_run("snapshot_capture", json!({"itemIds": ["a", "b"]}))
        .await;

    let run = app.wait_until_finished("snapshot_capture", &id).await;

    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    // The service still answers after the panics.
    let (status, _) = app.get_run("contoso", "snapshot_capture", &id).await;
    assert_eq!(status, 200);
}

on_both_backends!(an_item_that_keeps_failing_stops_at_max_attempts);
async fn an_item_that_keeps_failing_stops_at_max_attempts(backend: Backend) {
    struct AlwaysRetryable;
    impl ItemExecutor for AlwaysRetryable {
        fn plan(&self, _: PlanRequest) -> BoxFuture<'static, Result<Vec<ItemId>, ItemError>> {
            Box::pin(async { Ok(vec![]) })
        }
        fn execute(&self, _: ItemRequest) -> BoxFuture<'static, Result<(), AttemptError>> {
            Box::pin(async {
                Err(AttemptError::Retryable {
                    error: ItemError::new("upstream_unavailable"),
                    retry_after: None,
                })
            })
        }
    }
    let app = spawn_app_with_executors(
        backend,
        |c| {
            let mut s = c.run_type(RunType::SnapshotCapture);
            s.max_attempts = 3;
            c.set_run_type(RunType::SnapshotCapture, s);
        },
        |e| e.set(RunType::SnapshotCapture, Arc::new(AlwaysRetryable)),
    )
    .await;
    let id = app
        .create_run("snapshot_capture", json!({"itemIds": ["a"]}))
        .await;

    let run = app.wait_until_finished("snapshot_capture", &id).await;

    assert_eq!(run["status"], "failed");
    let db = app.read_only_db().await;
    let (attempts, code): (i64, String) = db
        .fetch_one(
            "SELECT attempts, last_error_code FROM run_items WHERE run_id = $1",
            &[&id],
        )
        .await;
    assert_eq!((attempts, code.as_str()), (3, "upstream_unavailable"));
}

/// Panics while planning, before returning a future at all.
struct PanicsWhilePlanning;

impl ItemExecutor for PanicsWhilePlanning {
    fn plan(&self, _: PlanRequest) -> BoxFuture<'static, Result<Vec<ItemId>, ItemError>> {
        panic!("plan bug on purpose");
    }

    fn execute(&self, _: ItemRequest) -> BoxFuture<'static, Result<(), AttemptError>> {
        panic!("execute bug on purpose");
    }
}

on_both_backends!(a_panicking_plan_fails_the_run_and_the_service_goes_on);
async fn a_panicking_plan_fails_the_run_and_the_service_goes_on(backend: Backend) {
    let app = spawn_app_with_executors(
        backend,
        |_| {},
        |e| {
            e.set(RunType::RestorePreview, Arc::new(PanicsWhilePlanning));
            e.set(RunType::RestoreExecute, Arc::new(PanicsWhilePlanning));
        },
    )
    .await;
    let planned = app.create_run("restore_preview", json!({})).await;
    let given = app
        .create_run("restore_execute", json!({"itemIds": ["a"]}))
        .await;

    let run = app.wait_until_finished("restore_preview", &planned).await;
    assert_eq!(run["status"], "failed");
    assert_eq!(run["safeError"]["code"], "plan_failed");
    assert_eq!(run["safeError"]["context"]["reason"], "executor_panicked");
    let run = app.wait_until_finished("restore_execute", &given).await;
    assert_eq!(run["status"], "failed", "{run}");
    assert_eq!(run["safeError"]["code"], "all_items_failed");
    // Other runs still run.
    let id = app
        .create_run("snapshot_capture", json!({"itemIds": ["a"]}))
        .await;
    assert_eq!(
        app.wait_until_finished("snapshot_capture", &id).await["status"],
        "succeeded"
    );
}
