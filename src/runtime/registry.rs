//! `TenantRegistry`: one per tenant. It owns the map from dedup key to the
//! live run holding it, decides de-duplication (starts are handled one at a
//! time), and gives each tenant at most `max_active_runs_per_tenant` runs
//! executing at once; more wait as `queued`, started in creation order.

use std::collections::{HashMap, VecDeque};

use actix::prelude::*;

use super::run::{self, RunActor};
use super::throttle::Throttle;
use super::{CancelOutcome, ItemQuery, RegistryError, Shared, Started};
use crate::domain::{
    DedupKey, ItemId, ItemRecord, RunId, RunRecord, RunStatus, RunType, TenantId, Timestamp, now,
};
use crate::store::{Created, NewRun, RunQuery};

/// Start a run, or answer the active run that holds the key.
#[derive(Message)]
#[rtype(result = "Result<Started, RegistryError>")]
pub(super) struct StartRun {
    pub key: DedupKey,
    pub item_ids: Option<Vec<ItemId>>,
}

/// A run of this tenant, live or from the store.
#[derive(Message)]
#[rtype(result = "Result<Option<RunRecord>, RegistryError>")]
pub(super) struct GetRun {
    pub run_type: RunType,
    pub id: RunId,
}

/// Cancel a run of this tenant.
#[derive(Message)]
#[rtype(result = "Result<Option<CancelOutcome>, RegistryError>")]
pub(super) struct CancelRun {
    pub run_type: RunType,
    pub id: RunId,
}

/// A page of this tenant's runs, newest first.
#[derive(Message)]
#[rtype(result = "Result<Vec<RunRecord>, RegistryError>")]
pub(super) struct ListRuns {
    pub query: RunQuery,
}

/// A page of a run's items.
#[derive(Message)]
#[rtype(result = "Result<Option<Vec<(u64, ItemRecord)>>, RegistryError>")]
pub(super) struct ListItems {
    pub run_type: RunType,
    pub id: RunId,
    pub query: ItemQuery,
}

/// Take back an unfinished run found in the store at start-up.
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct AdoptRun {
    pub run: RunRecord,
}

/// A run's actor is stopping: its terminal transition committed, or it
/// lost the run to another node. `epoch` tells it from a successor actor
/// of the same run.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct RunFinished {
    pub id: RunId,
    pub epoch: u64,
}

/// A cancel was stored for a run this node executes (perhaps through
/// another node): stop it.
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct CancelStored {
    pub id: RunId,
}

/// This node could not renew its leases: stop executing every run.
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct DropAll;

/// A live run as the registry knows it.
struct LiveRun {
    addr: Addr<RunActor>,
    key: DedupKey,
    /// The epoch the actor writes under.
    epoch: u64,
    /// It holds one of the tenant's execution slots.
    begun: bool,
}

pub struct TenantRegistry {
    tenant: TenantId,
    shared: Shared,
    /// Dedup key → the live run holding it (the fast answer; the store's
    /// unique index is the final word).
    by_key: HashMap<DedupKey, RunId>,
    /// Every run of this tenant with a live actor.
    live: HashMap<RunId, LiveRun>,
    /// Runs waiting for a slot, oldest first.
    waiting: VecDeque<RunId>,
    /// Runs holding a slot.
    executing: usize,
    /// The tenant's throttle governor, shared with each of its runs.
    throttle: Throttle,
}

impl TenantRegistry {
    pub(super) fn new(tenant: TenantId, shared: Shared) -> Self {
        Self {
            tenant,
            shared,
            by_key: HashMap::new(),
            live: HashMap::new(),
            waiting: VecDeque::new(),
            executing: 0,
            throttle: Throttle::default(),
        }
    }

    /// Starts an actor for the run; it begins now when a slot is free (or
    /// when `holds_slot`: it was executing before a restart).
    fn launch(&mut self, run: RunRecord, holds_slot: bool, ctx: &mut Context<Self>) {
        let id = run.id;
        let key = run.dedup_key();
        let epoch = run.epoch;
        let cancel_first = run.cancel_requested;
        let addr = RunActor::new(
            run,
            self.shared.clone(),
            ctx.address(),
            self.throttle.clone(),
        )
        .start();
        self.by_key.insert(key.clone(), id);
        self.live.insert(
            id,
            LiveRun {
                addr,
                key,
                epoch,
                begun: false,
            },
        );
        // A run with a stored cancel begins at once, only to end.
        if holds_slot || self.executing < self.max_executing() || cancel_first {
            self.begin(id);
        } else {
            self.waiting.push_back(id);
            metrics::gauge!("runpilot_queued_runs").increment(1.0);
        }
    }

    fn begin(&mut self, id: RunId) {
        if let Some(live) = self.live.get_mut(&id)
            && !live.begun
        {
            live.begun = true;
            self.executing += 1;
            metrics::gauge!("runpilot_active_runs").increment(1.0);
            live.addr.do_send(run::Begin);
        }
    }

    /// Forgets a live run (its actor stopped or is told to), freeing its slot.
    fn forget(&mut self, id: RunId) {
        let Some(live) = self.live.remove(&id) else {
            return;
        };
        if self.by_key.get(&live.key) == Some(&id) {
            self.by_key.remove(&live.key);
        }
        if live.begun {
            self.executing -= 1;
            metrics::gauge!("runpilot_active_runs").decrement(1.0);
        } else {
            self.waiting.retain(|waiting| *waiting != id);
            metrics::gauge!("runpilot_queued_runs").decrement(1.0);
        }
        while self.executing < self.max_executing() {
            match self.waiting.pop_front() {
                Some(next) => {
                    metrics::gauge!("runpilot_queued_runs").decrement(1.0);
                    self.begin(next)
                }
                None => break,
            }
        }
    }

    fn max_executing(&self) -> usize {
        self.shared.config.limits.max_active_runs_per_tenant as usize
    }
}

impl Actor for TenantRegistry {
    type Context = Context<Self>;
}

impl Handler<StartRun> for TenantRegistry {
    type Result = AtomicResponse<Self, Result<Started, RegistryError>>;

    fn handle(&mut self, msg: StartRun, _: &mut Context<Self>) -> Self::Result {
        let holder = self
            .by_key
            .get(&msg.key)
            .and_then(|id| self.live.get(id))
            .map(|live| live.addr.clone());
        let store = self.shared.store.clone();
        let created_at = now();
        let new_run = NewRun {
            id: RunId::new(),
            tenant: self.tenant.clone(),
            key: msg.key,
            item_ids: msg.item_ids,
            created_at,
            owner: self.shared.node_id.to_string(),
            lease_expires_at: Timestamp::from_millis(
                created_at.as_millis() + self.shared.config.cluster.lease.0.as_millis() as i64,
            ),
        };
        AtomicResponse::new(Box::pin(
            async move {
                if let Some(addr) = holder {
                    // A run that ended but whose `RunFinished` is still on its
                    // way is not reused: the store decides below.
                    if let Ok(run) = addr.send(run::GetRun).await
                        && run.status.is_active()
                    {
                        return Ok(Created::Existing(run));
                    }
                }
                Ok(store.create_run(new_run).await?)
            }
            .into_actor(self)
            .map(
                |created: Result<Created, RegistryError>, act, ctx| match created? {
                    Created::New(run) => {
                        tracing::info!(
                            tenant = %run.tenant, run_id = %run.id, run_type = %run.run_type,
                            status = %run.status, "run created"
                        );
                        metrics::counter!("runpilot_runs_started_total", "type" => run.run_type.as_str())
                            .increment(1);
                        act.launch(run.clone(), false, ctx);
                        Ok(Started { run, reused: false })
                    }
                    Created::Existing(run) => {
                        metrics::counter!("runpilot_runs_reused_total", "type" => run.run_type.as_str())
                            .increment(1);
                        Ok(Started { run, reused: true })
                    }
                },
            ),
        ))
    }
}

impl Handler<GetRun> for TenantRegistry {
    type Result = ResponseFuture<Result<Option<RunRecord>, RegistryError>>;

    fn handle(&mut self, msg: GetRun, _: &mut Context<Self>) -> Self::Result {
        let live = self.live.get(&msg.id).map(|l| l.addr.clone());
        let store = self.shared.store.clone();
        let tenant = self.tenant.clone();
        Box::pin(async move {
            if let Some(addr) = live
                && let Ok(run) = addr.send(run::GetRun).await
            {
                return Ok((run.run_type == msg.run_type).then_some(run));
            }
            // Not live (or stopped just now): the store is current.
            Ok(store.get_run(&tenant, msg.run_type, msg.id).await?)
        })
    }
}

impl Handler<CancelRun> for TenantRegistry {
    type Result = ResponseFuture<Result<Option<CancelOutcome>, RegistryError>>;

    fn handle(&mut self, msg: CancelRun, _: &mut Context<Self>) -> Self::Result {
        let live = self.live.get(&msg.id).map(|l| l.addr.clone());
        let store = self.shared.store.clone();
        let tenant = self.tenant.clone();
        Box::pin(async move {
            if let Some(addr) = live
                && let Ok(run) = addr.send(run::GetRun).await
            {
                if run.run_type != msg.run_type {
                    return Ok(None);
                }
                if let Ok(outcome) = addr.send(run::CancelRun).await {
                    return Ok(Some(outcome?));
                }
            }
            // No live actor here: the store decides.
            let Some(run) = store.get_run(&tenant, msg.run_type, msg.id).await? else {
                return Ok(None);
            };
            if run.status.is_terminal() {
                return Ok(Some(CancelOutcome::AlreadyFinished(run)));
            }
            Ok(Some(match store.request_cancel(msg.id, now()).await? {
                Some(run) => CancelOutcome::Accepted(run),
                None => CancelOutcome::AlreadyFinished(run),
            }))
        })
    }
}

impl Handler<ListRuns> for TenantRegistry {
    type Result = ResponseFuture<Result<Vec<RunRecord>, RegistryError>>;

    fn handle(&mut self, msg: ListRuns, _: &mut Context<Self>) -> Self::Result {
        let store = self.shared.store.clone();
        let tenant = self.tenant.clone();
        // The store is current to the last committed transition.
        Box::pin(async move { Ok(store.list_runs(&tenant, msg.query).await?) })
    }
}

impl Handler<ListItems> for TenantRegistry {
    type Result = ResponseFuture<Result<Option<Vec<(u64, ItemRecord)>>, RegistryError>>;

    fn handle(&mut self, msg: ListItems, _: &mut Context<Self>) -> Self::Result {
        let store = self.shared.store.clone();
        let tenant = self.tenant.clone();
        Box::pin(async move {
            // Items are read from the store, which is current: every item
            // transition is committed before anything reports it.
            if store
                .get_run(&tenant, msg.run_type, msg.id)
                .await?
                .is_none()
            {
                return Ok(None);
            }
            let q = msg.query;
            Ok(Some(
                store.item_page(msg.id, q.status, q.after, q.limit).await?,
            ))
        })
    }
}

impl Handler<AdoptRun> for TenantRegistry {
    type Result = ();

    fn handle(&mut self, msg: AdoptRun, ctx: &mut Context<Self>) {
        if let Some(live) = self.live.get(&msg.run.id) {
            if live.epoch >= msg.run.epoch {
                return;
            }
            // Taken again with a newer epoch (this node's own lease had
            // lapsed): the old actor's writes would be refused; replace it.
            live.addr.do_send(run::Relinquish);
            self.forget(msg.run.id);
        }
        tracing::info!(
            tenant = %msg.run.tenant, run_id = %msg.run.id, run_type = %msg.run.run_type,
            status = %msg.run.status, "run recovered"
        );
        let holds_slot = msg.run.status == RunStatus::Running;
        self.launch(msg.run, holds_slot, ctx);
    }
}

impl Handler<RunFinished> for TenantRegistry {
    type Result = ();

    fn handle(&mut self, msg: RunFinished, _: &mut Context<Self>) {
        // A successor actor of the same run (a newer epoch) stays.
        if self.live.get(&msg.id).is_some_and(|l| l.epoch == msg.epoch) {
            self.forget(msg.id);
        }
    }
}

impl Handler<CancelStored> for TenantRegistry {
    type Result = ();

    fn handle(&mut self, msg: CancelStored, ctx: &mut Context<Self>) {
        if let Some(live) = self.live.get(&msg.id) {
            let addr = live.addr.clone();
            ctx.spawn(
                async move {
                    if let Ok(Err(e)) = addr.send(run::CancelRun).await {
                        tracing::warn!(error = %e, "a stored cancel could not be applied yet");
                    }
                }
                .into_actor(self),
            );
        }
    }
}

impl Handler<DropAll> for TenantRegistry {
    type Result = ();

    fn handle(&mut self, _: DropAll, _: &mut Context<Self>) {
        let ids: Vec<RunId> = self.live.keys().copied().collect();
        for id in ids {
            if let Some(live) = self.live.get(&id) {
                live.addr.do_send(run::Relinquish);
            }
            self.forget(id);
        }
    }
}
