//! The store on its own, past the registry's in-memory map: the database is
//! the final word on de-duplication, and every transition is a
//! compare-and-set that refuses to run twice.

use futures_util::future::join_all;
use runpilot::config::DatabaseConfig;
use runpilot::domain::Timestamp;
use runpilot::domain::{DedupKey, ItemId, RunId, RunStatus, RunType, TenantId, now};
use runpilot::store::{Created, ItemOutcome, NewRun, Store};

use crate::helpers::{Backend, TestDatabase, on_both_backends};

async fn open(db: &TestDatabase) -> Store {
    let config = DatabaseConfig {
        url: db.url(),
        ..DatabaseConfig::default()
    };
    Store::open(&config).await.expect("the store opens")
}

fn new_run(target: &str, items: Option<&[&str]>) -> NewRun {
    NewRun {
        id: RunId::new(),
        tenant: TenantId::parse("contoso").unwrap(),
        key: DedupKey {
            run_type: RunType::SnapshotCapture,
            target_object_id: Some(target.to_owned()),
            payload_hash: None,
        },
        item_ids: items.map(|ids| ids.iter().map(|i| ItemId::parse(i).unwrap()).collect()),
        created_at: now(),
        owner: "test-node".into(),
        lease_expires_at: Timestamp::from_millis(now().as_millis() + 15_000),
    }
}

on_both_backends!(concurrent_creates_of_one_key_store_exactly_one_run);
async fn concurrent_creates_of_one_key_store_exactly_one_run(backend: Backend) {
    let db = TestDatabase::create(backend).await;
    let store = open(&db).await;

    let answers = join_all((0..20).map(|_| store.create_run(new_run("policy-1", None)))).await;

    let mut new = Vec::new();
    let mut existing = Vec::new();
    for answer in answers {
        match answer.expect("the create is stored") {
            Created::New(run) => new.push(run.id),
            Created::Existing(run) => existing.push(run.id),
        }
    }
    assert_eq!(new.len(), 1, "{new:?}");
    assert!(existing.iter().all(|id| *id == new[0]), "{existing:?}");
    store.close().await;
}

on_both_backends!(an_ended_run_frees_its_key_and_refuses_further_transitions);
async fn an_ended_run_frees_its_key_and_refuses_further_transitions(backend: Backend) {
    let db = TestDatabase::create(backend).await;
    let store = open(&db).await;
    let Created::New(run) = store.create_run(new_run("p", Some(&[]))).await.unwrap() else {
        panic!("the first create makes a run");
    };

    assert!(
        store
            .mark_running(run.id, run.epoch, now())
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        store
            .mark_running(run.id, run.epoch, now())
            .await
            .unwrap()
            .is_none()
    );
    let ended = store
        .finish_run(run.id, run.epoch, RunStatus::Succeeded, None, false, now())
        .await
        .unwrap()
        .expect("the run ends");
    assert_eq!(ended.status, RunStatus::Succeeded);
    assert!(
        store
            .finish_run(run.id, run.epoch, RunStatus::Failed, None, true, now())
            .await
            .unwrap()
            .is_none()
    );

    let again = store.create_run(new_run("p", Some(&[]))).await.unwrap();
    assert!(matches!(again, Created::New(ref r) if r.id != run.id));
    store.close().await;
}

on_both_backends!(an_item_outcome_is_counted_once);
async fn an_item_outcome_is_counted_once(backend: Backend) {
    let db = TestDatabase::create(backend).await;
    let store = open(&db).await;
    let Created::New(run) = store
        .create_run(new_run("q", Some(&["a", "b"])))
        .await
        .unwrap()
    else {
        panic!("the first create makes a run");
    };
    store.mark_running(run.id, run.epoch, now()).await.unwrap();
    let a = ItemId::parse("a").unwrap();
    store
        .start_items(run.id, run.epoch, vec![(a.clone(), 1)], now())
        .await
        .unwrap();

    let first = store
        .finish_item(run.id, run.epoch, a.clone(), ItemOutcome::Succeeded, now())
        .await
        .unwrap();
    let second = store
        .finish_item(run.id, run.epoch, a.clone(), ItemOutcome::Succeeded, now())
        .await
        .unwrap();

    assert_eq!(first.expect("counted").counts.succeeded, 1);
    assert!(second.is_none(), "a finished item is not counted again");
    let items = store.items(run.id).await.unwrap();
    assert_eq!(items.len(), 2);
    assert_eq!((items[0].item_id.as_str(), items[0].attempts), ("a", 1));
    store.close().await;
}
