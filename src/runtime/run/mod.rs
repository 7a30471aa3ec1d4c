//! `RunActor`: one per live run. It plans the items, supervises their
//! attempts (see `attempt.rs`), and persists every transition before it
//! changes its own state (see `persist.rs`); what it answers to `GetRun` is
//! therefore always the last committed state.

mod attempt;
mod persist;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures_util::FutureExt;
use tokio_util::sync::CancellationToken;

use super::executor::{ItemExecutor, PlanRequest};
use super::registry::{RunFinished, TenantRegistry};
use super::throttle::Throttle;
use super::{CancelOutcome, Shared};
use crate::config::RunTypeConfig;
use crate::domain::{
    ItemError, ItemId, ItemStatus, RunRecord, RunStatus, SafeError, SafeErrorCode, now,
};
use crate::store::StoreError;

/// How many failed item ids a run's safeError context names.
const FAILED_IDS_IN_CONTEXT: usize = 10;

/// The registry gave this run an execution slot: start work.
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct Begin;

/// The run as last committed.
#[derive(Message)]
#[rtype(result = "RunRecord")]
pub(super) struct GetRun;

/// Stop executing the run here without writing anything: another node
/// holds it now (or will). Attempts in flight are aborted.
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct Relinquish;

/// Stop the run: pending items are canceled, attempts in flight aborted.
#[derive(Message)]
#[rtype(result = "Result<CancelOutcome, StoreError>")]
pub(super) struct CancelRun;

/// Where the run is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for a slot (`Begin`).
    Waiting,
    /// Marking the run running, planning, loading items.
    Starting,
    /// Attempts are being dispatched.
    Executing,
    /// The terminal transition is being written.
    Finishing,
}

pub struct RunActor {
    /// The run as last committed; never ahead of the store.
    record: RunRecord,
    /// The run type's settings (concurrency, attempts, timeouts, backoff).
    settings: RunTypeConfig,
    executor: Arc<dyn ItemExecutor>,
    shared: Shared,
    registry: Addr<TenantRegistry>,
    phase: Phase,
    /// Items waiting for an attempt, in planned order.
    ready: VecDeque<ItemId>,
    /// Attempts started per item, as committed.
    attempts: HashMap<ItemId, u32>,
    /// Items with an attempt starting or in flight (their slot is taken
    /// until the attempt's outcome is committed).
    in_flight: HashMap<ItemId, CancellationToken>,
    /// Items waiting out their backoff before the next attempt.
    backing_off: usize,
    /// An acquire of a global in-flight permit is under way.
    acquiring: bool,
    /// Cancelled when the run is stopped early (deadline): aborts attempts.
    stop: CancellationToken,
    /// Why the run was stopped early, if it was.
    stopped: Option<SafeErrorCode>,
    /// The first failed items, for the safeError context.
    failed_ids: Vec<ItemId>,
    /// The tenant's throttle governor (shared with its other runs).
    throttle: Throttle,
    /// Throttled attempts per item, as committed; they do not count
    /// toward `max_attempts`.
    throttled: HashMap<ItemId, u32>,
    /// A wake-up at the end of a throttle pause is scheduled.
    wake_scheduled: bool,
}

impl RunActor {
    pub(super) fn new(
        record: RunRecord,
        shared: Shared,
        registry: Addr<TenantRegistry>,
        throttle: Throttle,
    ) -> Self {
        let settings = shared.config.run_type(record.run_type);
        let executor = shared.executors.get(record.run_type);
        // A cancel that was stored before a restart still holds.
        let stopped = record.cancel_requested.then_some(SafeErrorCode::Canceled);
        let stop = CancellationToken::new();
        if stopped.is_some() {
            stop.cancel();
        }
        Self {
            record,
            settings,
            executor,
            shared,
            registry,
            phase: Phase::Waiting,
            ready: VecDeque::new(),
            attempts: HashMap::new(),
            in_flight: HashMap::new(),
            backing_off: 0,
            acquiring: false,
            stop,
            stopped,
            failed_ids: Vec::new(),
            throttle,
            throttled: HashMap::new(),
            wake_scheduled: false,
        }
    }

    fn plan_request(&self) -> PlanRequest {
        PlanRequest {
            tenant: self.record.tenant.clone(),
            run_type: self.record.run_type,
            run_id: self.record.id,
            target_object_id: self.record.target_object_id.clone(),
            payload_hash: self.record.payload_hash.clone(),
        }
    }

    /// Takes a committed record, unless an older answer arrives after a newer one.
    fn adopt(&mut self, run: RunRecord) {
        if run.counts.done() >= self.record.counts.done() {
            let status_changed = run.status != self.record.status;
            self.record = run;
            if status_changed {
                self.log_transition();
            }
        }
    }

    fn log_transition(&self) {
        let r = &self.record;
        tracing::info!(
            tenant = %r.tenant, run_id = %r.id, run_type = %r.run_type, status = %r.status,
            total = r.counts.total, succeeded = r.counts.succeeded, failed = r.counts.failed,
            "run transition"
        );
    }

    /// queued → running, then the plan, then the items to do.
    fn start(&mut self, ctx: &mut Context<Self>) {
        self.phase = Phase::Starting;
        if self.record.status == RunStatus::Queued {
            let (id, epoch) = (self.record.id, self.record.epoch);
            self.persist(
                ctx,
                move |store| async move { store.mark_running(id, epoch, now()).await }.boxed(),
                |act, run, ctx| {
                    if let Some(run) = run {
                        act.adopt(run);
                    }
                    act.plan(ctx);
                },
            );
        } else {
            self.plan(ctx);
        }
    }

    fn plan(&mut self, ctx: &mut Context<Self>) {
        if self.record.planned || self.stopped.is_some() {
            return self.load_items(ctx);
        }
        let executor = self.executor.clone();
        let request = self.plan_request();
        let timeout = self.settings.item_timeout.0;
        let max_items = self.shared.config.limits.max_items_per_run as usize;
        // A child task: a panicking plan fails the run, not this actor's thread.
        let child =
            actix::spawn(
                async move { tokio::time::timeout(timeout, executor.plan(request)).await },
            );
        let planned = async move {
            match child.await {
                Ok(Ok(Ok(items))) => check_plan(items, max_items),
                Ok(Ok(Err(e))) => Err(e),
                Ok(Err(_elapsed)) => Err(ItemError::new("timeout")),
                Err(_panicked_or_aborted) => Err(ItemError::new("executor_panicked")),
            }
        };
        ctx.spawn(planned.into_actor(self).map(|planned, act, ctx| match planned {
            Ok(items) => {
                let (id, epoch) = (act.record.id, act.record.epoch);
                act.persist(
                    ctx,
                    move |store| {
                        let items = items.clone();
                        async move { store.record_plan(id, epoch, items, now()).await }.boxed()
                    },
                    |act, run, ctx| {
                        if let Some(run) = run {
                            act.adopt(run);
                        }
                        act.load_items(ctx);
                    },
                );
            }
            Err(error) => {
                tracing::warn!(run_id = %act.record.id, code = %error.code, "planning failed");
                let mut context = error.context;
                context.insert("reason".into(), error.code.into());
                act.finish(
                    ctx,
                    RunStatus::Failed,
                    Some(SafeError::new(SafeErrorCode::PlanFailed, context)),
                );
            }
        }));
    }

    /// Reads the items back from the store (one path for new and resumed
    /// runs) and starts dispatching.
    fn load_items(&mut self, ctx: &mut Context<Self>) {
        let id = self.record.id;
        self.persist(
            ctx,
            move |store| async move { store.items(id).await }.boxed(),
            |act, items, ctx| {
                for item in items {
                    match item.status {
                        ItemStatus::Pending | ItemStatus::Running => {
                            act.ready.push_back(item.item_id.clone())
                        }
                        ItemStatus::Failed => {
                            if act.failed_ids.len() < FAILED_IDS_IN_CONTEXT {
                                act.failed_ids.push(item.item_id.clone());
                            }
                        }
                        ItemStatus::Succeeded | ItemStatus::Canceled => {}
                    }
                    act.throttled.insert(item.item_id.clone(), item.throttled);
                    act.attempts.insert(item.item_id, item.attempts);
                }
                act.phase = Phase::Executing;
                act.schedule_deadline(ctx);
                act.fill_slots(ctx);
                act.check_done(ctx);
            },
        );
    }

    fn schedule_deadline(&mut self, ctx: &mut Context<Self>) {
        let Some(deadline) = self.settings.deadline else {
            return;
        };
        let started = self.record.started_at.unwrap_or(self.record.created_at);
        let elapsed = now().as_millis().saturating_sub(started.as_millis());
        let left = deadline
            .0
            .saturating_sub(Duration::from_millis(u64::try_from(elapsed).unwrap_or(0)));
        ctx.run_later(left, |act, ctx| {
            act.stop_early(SafeErrorCode::DeadlineExceeded, ctx)
        });
    }

    /// Stops the run before its items are done: nothing new starts, attempts
    /// in flight are aborted, and the run ends with `code`.
    fn stop_early(&mut self, code: SafeErrorCode, ctx: &mut Context<Self>) {
        if self.stopped.is_some() || self.phase == Phase::Finishing {
            return;
        }
        tracing::info!(run_id = %self.record.id, code = %code, "run stopped early");
        self.stopped = Some(code);
        self.ready.clear();
        self.stop.cancel();
        if self.phase == Phase::Waiting {
            // Never begun: nothing runs, it ends now.
            self.phase = Phase::Executing;
        }
        self.check_done(ctx);
    }

    /// Ends the run once nothing is in flight and nothing is left to do.
    fn check_done(&mut self, ctx: &mut Context<Self>) {
        if self.phase != Phase::Executing || !self.in_flight.is_empty() {
            return;
        }
        if self.stopped.is_none() {
            if !self.ready.is_empty() || self.backing_off > 0 {
                return;
            }
            if self.shared.shutdown.is_cancelled()
                && self.record.counts.done() < self.record.counts.total
            {
                // Left for the next start to resume.
                return;
            }
        }
        let counts = self.record.counts;
        let stopped = self
            .stopped
            .map(|code| (code, counts.total.saturating_sub(counts.done())));
        let (status, safe_error) = SafeError::decide(counts, stopped, &self.failed_ids);
        self.finish(ctx, status, safe_error);
    }

    /// Writes the terminal transition, tells the registry, and stops.
    fn finish(
        &mut self,
        ctx: &mut Context<Self>,
        status: RunStatus,
        safe_error: Option<SafeError>,
    ) {
        self.phase = Phase::Finishing;
        let (id, epoch) = (self.record.id, self.record.epoch);
        let cancel_rest = self.stopped.is_some();
        self.persist(
            ctx,
            move |store| {
                let safe_error = safe_error.clone();
                async move {
                    store
                        .finish_run(id, epoch, status, safe_error, cancel_rest, now())
                        .await
                }
                .boxed()
            },
            |act, run, ctx| {
                if let Some(run) = run {
                    act.adopt(run);
                }
                metrics::counter!(
                    "runpilot_runs_finished_total",
                    "type" => act.record.run_type.as_str(),
                    "status" => act.record.status.as_str()
                )
                .increment(1);
                act.registry.do_send(RunFinished {
                    id: act.record.id,
                    epoch: act.record.epoch,
                });
                ctx.stop();
            },
        );
    }
}

impl RunActor {
    /// Stops here without another write: the run is another node's now.
    /// Attempts in flight are aborted; their items run again there.
    pub(super) fn relinquish(&mut self, ctx: &mut Context<Self>) {
        tracing::warn!(
            tenant = %self.record.tenant, run_id = %self.record.id, epoch = self.record.epoch,
            "this node no longer holds the run; it stops executing it here"
        );
        self.stop.cancel();
        self.registry.do_send(RunFinished {
            id: self.record.id,
            epoch: self.record.epoch,
        });
        ctx.stop();
    }
}

/// A plan's items, checked: not too many, no id twice (the first one stays).
fn check_plan(items: Vec<ItemId>, max_items: usize) -> Result<Vec<ItemId>, ItemError> {
    if items.len() > max_items {
        return Err(ItemError::new("too_many_items")
            .with("planned", items.len())
            .with("max", max_items));
    }
    let mut seen = std::collections::HashSet::new();
    Ok(items
        .into_iter()
        .filter(|i| seen.insert(i.clone()))
        .collect())
}

impl Actor for RunActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Replies to many pollers while items commit; no reason to refuse.
        ctx.set_mailbox_capacity(1024);
    }
}

impl Handler<Begin> for RunActor {
    type Result = ();

    fn handle(&mut self, _: Begin, ctx: &mut Context<Self>) {
        if self.phase == Phase::Waiting {
            self.start(ctx);
        }
    }
}

impl Handler<CancelRun> for RunActor {
    type Result = ResponseActFuture<Self, Result<CancelOutcome, StoreError>>;

    fn handle(&mut self, _: CancelRun, ctx: &mut Context<Self>) -> Self::Result {
        if self.record.status.is_terminal() || self.phase == Phase::Finishing {
            return Box::pin(fut::ready(Ok(CancelOutcome::AlreadyFinished(
                self.record.clone(),
            ))));
        }
        if self.record.cancel_requested {
            // Stored already (perhaps through another node, and seen here in
            // a row an item write returned): stop, if not yet stopping.
            if self.stopped.is_none() {
                self.stop_early(SafeErrorCode::Canceled, ctx);
            }
            return Box::pin(fut::ready(Ok(CancelOutcome::Accepted(self.record.clone()))));
        }
        let store = self.shared.store.clone();
        let id = self.record.id;
        Box::pin(
            async move { store.request_cancel(id, now()).await }
                .into_actor(self)
                .map(|stored, act, ctx| match stored? {
                    Some(run) => {
                        act.adopt(run);
                        act.stop_early(SafeErrorCode::Canceled, ctx);
                        Ok(CancelOutcome::Accepted(act.record.clone()))
                    }
                    None => Ok(CancelOutcome::AlreadyFinished(act.record.clone())),
                }),
        )
    }
}

impl Handler<Relinquish> for RunActor {
    type Result = ();

    fn handle(&mut self, _: Relinquish, ctx: &mut Context<Self>) {
        self.relinquish(ctx);
    }
}

impl Handler<GetRun> for RunActor {
    type Result = MessageResult<GetRun>;

    fn handle(&mut self, _: GetRun, _: &mut Context<Self>) -> Self::Result {
        let mut run = self.record.clone();
        if self.record.status.is_active() {
            run.throttled_until = self.throttle.until();
        }
        MessageResult(run)
    }
}
