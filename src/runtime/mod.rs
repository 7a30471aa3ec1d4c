//! The actors. A [`Directory`] hands out one [`TenantRegistry`] per tenant;
//! a registry owns the dedup key → live [`RunActor`] map; a run actor plans
//! its items, supervises their attempts and persists every transition.
//!
//! Who messages whom: HTTP handler → `Directory` (a handle) → `TenantRegistry`
//! (`StartRun`, `GetRun`) → `RunActor` (`Begin`, `GetRun`); a run actor tells
//! its registry `RunFinished` after its terminal transition committed.

pub mod executor;
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
    DedupKey, ItemId, ItemRecord, ItemStatus, RunId, RunRecord, RunType, TenantId,
};
use crate::store::{Store, StoreError};
use executor::Executors;

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
}

impl Directory {
    /// Builds the directory on the current arbiter.
    pub fn new(store: Store, config: Arc<Config>, executors: Executors) -> Self {
        let permits = Arc::new(Semaphore::new(config.limits.max_items_in_flight as usize));
        Self {
            shared: Shared {
                store,
                config,
                executors,
                permits,
                shutdown: CancellationToken::new(),
                tracker: TaskTracker::new(),
            },
            arbiter: actix_rt::Arbiter::current(),
            registries: Arc::new(Mutex::new(HashMap::new())),
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

    /// Hands every unfinished run in the store back to its registry
    /// (oldest first); returns how many.
    pub async fn recover(&self) -> Result<usize, RegistryError> {
        let runs = self.shared.store.unfinished_runs().await?;
        let count = runs.len();
        for run in runs {
            let tenant = run.tenant.clone();
            self.registry(&tenant)
                .send(registry::AdoptRun { run })
                .await?;
        }
        Ok(count)
    }

    /// Stops starting attempts and waits up to `grace` for the attempts in
    /// flight to finish and their outcomes to be committed. Returns whether
    /// everything finished in time.
    pub async fn shutdown(&self, grace: Duration) -> bool {
        self.shared.shutdown.cancel();
        self.shared.tracker.close();
        tokio::time::timeout(grace, self.shared.tracker.wait())
            .await
            .is_ok()
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
