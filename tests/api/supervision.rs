//! Supervision policy: deadlines, per-tenant slots in creation order, a
//! global cap on items in flight, and fairness across tenants.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::future::BoxFuture;
use runpilot::config::Dur;
use runpilot::domain::{ItemError, ItemId, RunType};
use runpilot::runtime::executor::{AttemptError, ItemExecutor, ItemRequest, PlanRequest};
use serde_json::{Value, json};

use crate::helpers::{
    Backend, TENANT, on_both_backends, spawn_app_with, spawn_app_with_executors, tune,
};

fn time(run: &Value, field: &str) -> chrono::DateTime<chrono::FixedOffset> {
    chrono::DateTime::parse_from_rfc3339(run[field].as_str().unwrap()).unwrap()
}

on_both_backends!(a_run_past_its_deadline_fails_with_deadline_exceeded);
async fn a_run_past_its_deadline_fails_with_deadline_exceeded(backend: Backend) {
    let app = spawn_app_with(backend, |c| {
        tune(c, RunType::SnapshotCapture, |s| {
            s.delay = Dur(Duration::from_millis(150));
            s.concurrency = 1;
            s.deadline = Some(Dur(Duration::from_millis(400)));
        })
    })
    .await;
    let ids: Vec<String> = (0..10).map(|n| format!("i{n}")).collect();
    let id = app
        .create_run("snapshot_capture", json!({"itemIds": ids}))
        .await;

    let run = app.wait_until_finished("snapshot_capture", &id).await;

    assert_eq!(run["safeError"]["code"], "deadline_exceeded", "{run}");
    let succeeded = run["counts"]["succeeded"].as_u64().unwrap();
    assert!(succeeded < 10);
    assert_eq!(
        run["safeError"]["context"]["canceledItems"]
            .as_u64()
            .unwrap(),
        10 - succeeded
    );
    assert_eq!(
        run["status"],
        if succeeded > 0 { "partial" } else { "failed" }
    );
}

on_both_backends!(a_tenants_runs_beyond_its_limit_wait_queued_and_start_in_creation_order);
async fn a_tenants_runs_beyond_its_limit_wait_queued_and_start_in_creation_order(backend: Backend) {
    let app = spawn_app_with(backend, |c| {
        c.limits.max_active_runs_per_tenant = 1;
        tune(c, RunType::RestoreExecute, |s| {
            s.delay = Dur(Duration::from_millis(60))
        });
    })
    .await;
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(
            app.create_run(
                "restore_execute",
                json!({"targetObjectId": n.to_string(), "itemIds": ["a", "b"]}),
            )
            .await,
        );
    }
    let (_, third) = app.get_run(TENANT, "restore_execute", &ids[2]).await;
    assert_eq!(third["status"], "queued");
    assert!(third["startedAt"].is_null());

    let mut runs = Vec::new();
    for id in &ids {
        runs.push(app.wait_until_finished("restore_execute", id).await);
    }

    for pair in runs.windows(2) {
        assert_eq!(pair[1]["status"], "succeeded");
        assert!(
            time(&pair[1], "startedAt") >= time(&pair[0], "finishedAt"),
            "{} then {}",
            pair[0],
            pair[1]
        );
    }
}

/// Counts attempts in flight at once across every run.
struct Gauge {
    now: Arc<AtomicUsize>,
    max: Arc<AtomicUsize>,
}

impl ItemExecutor for Gauge {
    fn plan(&self, _: PlanRequest) -> BoxFuture<'static, Result<Vec<ItemId>, ItemError>> {
        Box::pin(async { Ok(vec![]) })
    }

    fn execute(&self, _: ItemRequest) -> BoxFuture<'static, Result<(), AttemptError>> {
        let (now, max) = (self.now.clone(), self.max.clone());
        Box::pin(async move {
            let current = now.fetch_add(1, Ordering::SeqCst) + 1;
            max.fetch_max(current, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(40)).await;
            now.fetch_sub(1, Ordering::SeqCst);
            Ok(())
        })
    }
}

on_both_backends!(items_in_flight_never_exceed_the_global_cap);
async fn items_in_flight_never_exceed_the_global_cap(backend: Backend) {
    let max = Arc::new(AtomicUsize::new(0));
    let gauge = Arc::new(Gauge {
        now: Arc::new(AtomicUsize::new(0)),
        max: max.clone(),
    });
    let app = spawn_app_with_executors(
        backend,
        |c| c.limits.max_items_in_flight = 3,
        |e| e.set(RunType::SnapshotCapture, gauge),
    )
    .await;
    let ids: Vec<String> = (0..12).map(|n| format!("i{n}")).collect();
    let a = app
        .create_run(
            "snapshot_capture",
            json!({"targetObjectId": "a", "itemIds": ids}),
        )
        .await;
    let b = app
        .create_run(
            "snapshot_capture",
            json!({"targetObjectId": "b", "itemIds": ids}),
        )
        .await;

    app.wait_until_finished("snapshot_capture", &a).await;
    app.wait_until_finished("snapshot_capture", &b).await;

    let seen = max.load(Ordering::SeqCst);
    assert!(seen <= 3, "{seen} attempts at once");
    assert!(seen >= 2, "the gauge saw only {seen}");
}

on_both_backends!(one_tenants_queue_does_not_delay_another_tenants_run);
async fn one_tenants_queue_does_not_delay_another_tenants_run(backend: Backend) {
    let app = spawn_app_with(backend, |c| {
        c.limits.max_items_in_flight = 8;
        tune(c, RunType::BackupSetAddPolicies, |s| {
            s.delay = Dur(Duration::from_millis(80))
        });
    })
    .await;
    let five: Vec<String> = (0..5).map(|n| format!("p{n}")).collect();
    let mut busy = Vec::new();
    for n in 0..20 {
        let (status, body) = app
            .start_run(
                "busy-tenant",
                "backup_set_add_policies",
                Some(json!({"targetObjectId": n.to_string(), "itemIds": five})),
            )
            .await;
        assert_eq!(status, 201);
        busy.push(body["run"]["id"].as_str().unwrap().to_owned());
    }
    let (status, quiet) = app
        .start_run(
            TENANT,
            "backup_set_add_policies",
            Some(json!({"itemIds": five})),
        )
        .await;
    assert_eq!(status, 201);
    let quiet_id = quiet["run"]["id"].as_str().unwrap().to_owned();

    let quiet = app
        .wait_until_finished("backup_set_add_policies", &quiet_id)
        .await;
    let tenth = app
        .wait_for_tenant_run(
            "busy-tenant",
            "backup_set_add_policies",
            &busy[9],
            crate::helpers::is_terminal,
        )
        .await;

    assert_eq!(quiet["status"], "succeeded");
    assert!(
        time(&quiet, "finishedAt") < time(&tenth, "finishedAt"),
        "the quiet tenant's run waited behind the busy tenant's queue: {quiet} vs {tenth}"
    );
}
