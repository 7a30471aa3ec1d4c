//! The actors. A [`Directory`] hands out one [`TenantRegistry`] per tenant;
//! a registry owns the dedup key → live [`RunActor`] map; a run actor plans
//! its items, supervises their attempts and persists every transition.
//!
//! Who messages whom: HTTP handler → `Directory` (a handle) → `TenantRegistry`
//! (`StartRun`, `GetRun`) → `RunActor` (`Begin`, `GetRun`); a run actor tells
//! its registry `RunFinished` after its terminal transition committed.

pub mod executor;
mod lease;
mod registry;
mod run;
mod throttle;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::{Actor, Addr, MailboxError};
use actix_rt::ArbiterHandle;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::domain::{
    DedupKey, ItemId, ItemRecord, ItemStatus, RunId, RunRecord, RunType, TenantId, Timestamp, now,
};
use crate::store::{ClaimScope, Store, StoreError};
use executor::Executors;

pub use crate::store::RunQuery;
pub use registry::TenantRegistry;
pub use run::RunActor;

/// Why the runtime could not answer.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("an actor did not answer")]
    Mailbox(#[from] MailboxError),
}

/// The answer to a start: the run, and whether it was an active run reused.
#[derive(Debug, Clone)]
pub struct Started {
    pub run: RunRecord,
    pub reused: bool,
}

/// The answer to a cancel.
#[derive(Debug, Clone)]
pub enum CancelOutcome {
    /// The cancel is recorded (now or before); the run is stopping.
    Accepted(RunRecord),
    /// The run had ended already.
    AlreadyFinished(RunRecord),
}

/// Which items to list, from where.
#[derive(Debug, Clone)]
pub struct ItemQuery {
    pub status: Option<ItemStatus>,
    /// Items after this position (from the previous page's cursor).
    pub after: Option<u64>,
    pub limit: u32,
}

/// What every actor shares.
#[derive(Clone)]
pub(crate) struct Shared {
    /// This process's name in the cluster: the owner of the runs it executes.
    pub node_id: Arc<str>,
    pub store: Store,
    pub config: Arc<Config>,
    pub executors: Executors,
    /// Item attempts in flight across all runs (`limits.max_items_in_flight`);
    /// waiters are served first come, first served, across tenants.
    pub permits: Arc<Semaphore>,
    /// Cancelled on SIGTERM/SIGINT: no new attempt starts after it.
    pub shutdown: CancellationToken,
    /// Every attempt until its outcome is committed, so shutdown can wait.
    pub tracker: TaskTracker,
}

/// The handle HTTP handlers use: one registry per tenant, made on first use.
#[derive(Clone)]
pub struct Directory {
    shared: Shared,
    /// Where the actors live (the arbiter that built the directory).
    arbiter: ArbiterHandle,
    registries: Arc<Mutex<HashMap<TenantId, Addr<TenantRegistry>>>>,
    /// Stops the lease heartbeat (at shutdown).
    heartbeat_stop: CancellationToken,
}

impl Directory {
    /// Builds the directory on the current arbiter.
    pub fn new(store: Store, config: Arc<Config>, executors: Executors) -> Self {
        let permits = Arc::new(Semaphore::new(config.limits.max_items_in_flight as usize));
        let node_id: Arc<str> = config
            .cluster
            .node_id
            .clone()
            .unwrap_or_else(lease::default_node_id)
            .into();
        Self {
            shared: Shared {
                node_id,
                store,
                config,
                executors,
                permits,
                shutdown: CancellationToken::new(),
                tracker: TaskTracker::new(),
            },
            arbiter: actix_rt::Arbiter::current(),
            registries: Arc::new(Mutex::new(HashMap::new())),
            heartbeat_stop: CancellationToken::new(),
        }
    }

    fn registry(&self, tenant: &TenantId) -> Addr<TenantRegistry> {
        let mut registries = self
            .registries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        registries
            .entry(tenant.clone())
            .or_insert_with(|| {
                let tenant = tenant.clone();
                let shared = self.shared.clone();
                TenantRegistry::start_in_arbiter(&self.arbiter, move |_| {
                    TenantRegistry::new(tenant, shared)
                })
            })
            .clone()
    }

    /// Starts a run, or answers the active run with the same dedup key.
    pub async fn start_run(
        &self,
        tenant: &TenantId,
        key: DedupKey,
        item_ids: Option<Vec<ItemId>>,
    ) -> Result<Started, RegistryError> {
        self.registry(tenant)
            .send(registry::StartRun { key, item_ids })
            .await?
    }

    /// A run of that tenant and type, live or from the store.
    pub async fn get_run(
        &self,
        tenant: &TenantId,
        run_type: RunType,
        id: RunId,
    ) -> Result<Option<RunRecord>, RegistryError> {
        self.registry(tenant)
            .send(registry::GetRun { run_type, id })
            .await?
    }

    /// Cancels a run of that tenant and type; `None` when there is no such run.
    pub async fn cancel_run(
        &self,
        tenant: &TenantId,
        run_type: RunType,
        id: RunId,
    ) -> Result<Option<CancelOutcome>, RegistryError> {
        self.registry(tenant)
            .send(registry::CancelRun { run_type, id })
            .await?
    }

    /// A tenant's runs, newest first.
    pub async fn list_runs(
        &self,
        tenant: &TenantId,
        query: RunQuery,
    ) -> Result<Vec<RunRecord>, RegistryError> {
        self.registry(tenant)
            .send(registry::ListRuns { query })
            .await?
    }

    /// One page of a run's items with their positions; `None` when there
    /// is no such run.
    pub async fn list_items(
        &self,
        tenant: &TenantId,
        run_type: RunType,
        id: RunId,
        query: ItemQuery,
    ) -> Result<Option<Vec<(u64, ItemRecord)>>, RegistryError> {
        self.registry(tenant)
            .send(registry::ListItems {
                run_type,
                id,
                query,
            })
            .await?
    }

    /// Takes the unfinished runs this node may execute at start-up (on the
    /// embedded store every one; on PostgreSQL those whose lease expired or
    /// that this `node_id` held) and hands each to its registry, oldest
    /// first; returns how many.
    pub async fn recover(&self) -> Result<usize, RegistryError> {
        let scope = if self.shared.store.is_embedded() {
            ClaimScope::All
        } else {
            ClaimScope::ExpiredOrOwn
        };
        self.claim(scope).await
    }

    /// Claims the runs in `scope` and hands them to their registries.
    async fn claim(&self, scope: ClaimScope) -> Result<usize, RegistryError> {
        let at = now();
        let runs = self
            .shared
            .store
            .claim_runs(&self.shared.node_id, scope, at, self.lease_end(at))
            .await?;
        let count = runs.len();
        for run in runs {
            let tenant = run.tenant.clone();
            self.registry(&tenant)
                .send(registry::AdoptRun { run })
                .await?;
        }
        Ok(count)
    }

    /// When a lease taken or renewed at `at` ends.
    fn lease_end(&self, at: Timestamp) -> Timestamp {
        let lease = self.shared.config.cluster.lease.0;
        Timestamp::from_millis(at.as_millis() + lease.as_millis() as i64)
    }

    /// Starts the lease heartbeat (renew, relay cancels, take over), tracked
    /// so shutdown waits for it.
    pub fn start_heartbeat(&self) {
        let directory = self.clone();
        let stop = self.heartbeat_stop.clone();
        self.shared
            .tracker
            .spawn_local(lease::heartbeat(directory, stop));
    }

    /// Every live run stops executing here (its lease could not be renewed).
    fn drop_all_runs(&self) {
        let registries = self
            .registries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for registry in registries.values() {
            registry.do_send(registry::DropAll);
        }
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.shared.node_id
    }

    /// Stops starting attempts and waits up to `grace` for the attempts in
    /// flight to finish and their outcomes to be committed. Returns whether
    /// everything finished in time.
    pub async fn shutdown(&self, grace: Duration) -> bool {
        self.shared.shutdown.cancel();
        self.heartbeat_stop.cancel();
        self.shared.tracker.close();
        let finished = tokio::time::timeout(grace, self.shared.tracker.wait())
            .await
            .is_ok();
        // What did not finish is another node's to take at once.
        if let Err(e) = self.shared.store.release_leases(&self.shared.node_id).await {
            tracing::warn!(error = %e, "could not release this node's leases");
        }
        finished
    }

    /// Whether shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.shared.shutdown.is_cancelled()
    }

    /// Whether the store answers (for readiness).
    pub async fn check_store(&self) -> Result<(), StoreError> {
        self.shared.store.ping().await
    }
}
